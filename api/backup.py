"""`consent-ledger backup DEST`: a copy of a data dir's state, taken while the service runs, that starts
as a data dir of its own (`CONSENT_LEDGER_DATA_DIR=DEST consent-ledger serve`).

What it holds, in this order:
1. the service database and the identity vault (SQLite's online backup API: each file one moment of
   itself, while readers and writers go on);
2. the managed node's chain, holding every block there was once (1) was done: geth's genesis and
   every block after it, read from the running node (`chain/blocks.rlp`, which the restored data dir's
   first start imports, executing each block again), or its database copied as it is when stopped;
   anvil's from a state dump that holds those blocks. The databases then name no block the copied
   chain lacks. The chain may hold more: changes
   accepted after (1) are on it without their request rows, and the indexer rebuilds the read model
   from the chain's events. (The other order would be a node crash: what the databases settled but
   the chain lost, the relayer sends again; but a bridge export released after the chain's copy
   would have its access record missing from it.)
3. `deployment.json`, and in development mode `secrets/` (the vault's master key among them: the
   vault copy is useless without it; in production the secrets come from the environment, and are
   backed up with it, not here).

A database at a `*_DATABASE_URL` other than the data dir's SQLite file (PostgreSQL) is left to its
own tools (`pg_dump`), and a chain the service does not manage (`rpc`) is not copied: its blocks are
on its validators' disks. The manifest (`backup.json`) says what was copied and what was not.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from api.service_errors import ToolError
from api.settings import ServiceSettings
from identity.settings import IdentitySettings
from ledger.backends import managed_node
from ledger.settings import ChainSettings
from ledger.store import utcnow

DUMP_TIMEOUT = 600.0  # seconds to wait for a state dump holding the head (a large chain dumps slowly)


@dataclass
class Manifest:
    created_at: str
    copied: list[str] = field(default_factory=list)
    not_copied: list[str] = field(default_factory=list)
    chain_block: int | None = None  # the copied chain holds at least this block (managed node)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n")


def _sqlite_copy(source: Path, target: Path) -> None:
    src = sqlite3.connect(source)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # all pages in one step: one read transaction, one moment of the database
        finally:
            dst.close()
    finally:
        src.close()


def backup(
    service: ServiceSettings,
    chain: ChainSettings,
    identity: IdentitySettings,
    dest: Path,
    *,
    timeout: float = DUMP_TIMEOUT,
) -> Manifest:
    """Copy `service.data_dir`'s state into `dest` (new or empty); returns the manifest written there."""
    data_dir = service.data_dir
    if not (data_dir / "deployment.json").is_file():
        raise ToolError(f"{data_dir} is not a data dir the service has started in (no deployment.json)")
    if dest.exists() and any(dest.iterdir()):
        raise ToolError(f"{dest} is not empty")
    # Built beside it and renamed into place when whole: a failed backup leaves no DEST that looks like one.
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        manifest = _copy(service, chain, identity, work, timeout)
        os.replace(work, dest)  # onto an empty directory too
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _copy(
    service: ServiceSettings, chain: ChainSettings, identity: IdentitySettings, dest: Path, timeout: float
) -> Manifest:
    data_dir = service.data_dir
    manifest = Manifest(created_at=utcnow().isoformat())

    for name, url in (("service.db", service.database_url), ("identity.db", identity.database_url)):
        if url is not None:
            manifest.not_copied.append(
                f"{name}: the database is at {url.split('://')[0]}://…; back it up with its tools"
            )
        elif (data_dir / name).is_file():
            _sqlite_copy(data_dir / name, dest / name)
            manifest.copied.append(name)

    node = managed_node(chain, data_dir)
    if node is None:
        manifest.not_copied.append("the chain: not a managed node (its blocks are on its validators)")
    else:  # after the databases: the copy holds every block they name
        copied = node.copy_chain(dest / "chain", timeout=timeout)
        manifest.copied += [f"chain/{name}" for name in copied.files]
        manifest.chain_block = copied.block

    shutil.copyfile(data_dir / "deployment.json", dest / "deployment.json")
    manifest.copied.append("deployment.json")
    if (data_dir / "secrets").is_dir():
        shutil.copytree(data_dir / "secrets", dest / "secrets")
        manifest.copied.append("secrets/ (development mode: keep this backup as secret as the keys)")
    manifest.write(dest / "backup.json")
    return manifest
