"""Benchmark: the CRM bridge end to end, and on-chain access entries per second.

    python scripts/bench_bridge.py            # 1,000,000 CRM rows (the target run)
    python scripts/bench_bridge.py --quick    # a small run for CI

Set-up (untimed): a synthetic CRM export (scripts/generate_crm.py), a managed node with the contracts
(`--backend`: geth, `serve`'s default, or anvil), every customer who would consent bound and granted
on-chain with their own signature, and the read model indexed from the chain's events.

Timed:
1. **bridge**: read the CSV export, pseudonymise, load the read model's permissions, filter rows and
   columns, record one access entry per released customer on-chain, wait until each batch is final,
   write the released rows to Parquet. Then, as `bridge export` does on the managed node, wait until
   the node holds the access records durably (a crash of the node can no longer lose them); timed on
   its own (`checkpoint_wait_s`, `durable_rows_per_s`). geth writes each block to its database as it
   makes it, so the wait is at most the last block's; anvil keeps its chain in memory, and the wait is
   one dump of the whole chain (its length grows with the chain, not with the export). A chain with
   final blocks (QBFT) has no such wait. Run in a fresh
   process so that its peak memory (VmHWM) is the bridge's own; three times (`--runs`), the median
   reported, because a run's time depends on where the node is in its block cycle when each batch
   arrives (runs of one code vary by up to 30%).
   Baseline, same run: the same work done row by row (csv module, each row's PII normalised and
   hashed, a dict per row, a CSV writer), on a sample, without the chain.
2. **access entries**: entries recorded on-chain per second, batched and pipelined (`AccessLog.record`
   with as many entries per transaction as one takes, `max_record_entries()`) vs one entry per
   transaction.

Prints the figures, then one line of JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import create_engine
from web3 import HTTPProvider, Web3
from web3.types import RPCEndpoint

import api.models  # noqa: F401 - the service's tables
from api.reference import DEFAULT_ATTRIBUTES
from crm_bridge.bridge import Bridge, Export, Permissions
from crm_bridge.mapping import Mapping
from crm_bridge.sources import DEFAULT_CHUNK_ROWS, read_csv
from identity.did import DidWeb
from identity.errors import InvalidPII
from identity.normalize import normalize_pii
from identity.pseudonym import PepperRing, Pseudonymizer
from ledger import eip712
from ledger.access import Access, AccessLogClient, max_record_entries
from ledger.anvil import Checkpoints
from ledger.assembly import Keys, open_contracts
from ledger.backends import ManagedBackend
from ledger.compiler import compile_contracts
from ledger.consent import ConsentFollower, ConsentReader, ConsentRegistryClient, SignedChange, batch_gas
from ledger.consent.client import max_changes_per_batch
from ledger.contracts import RevertDecoder
from ledger.geth import GethNode
from ledger.indexer import Indexer
from ledger.settings import ChainSettings, ToolchainSettings
from ledger.store import Base, make_engine
from ledger.tx import TxRequest, TxSender
from scripts import generate_crm

PURPOSE_KEY = "analytics.reporting"
PURPOSE = eip712.purpose_id(PURPOSE_KEY)
BITS = {key: bit for bit, (key, _name) in enumerate(DEFAULT_ATTRIBUTES)}
PEPPER = PepperRing({1: bytes.fromhex(os.environ.setdefault("BENCH_BRIDGE_PEPPER", os.urandom(32).hex()))}, 1)
# (the spawned export process imports this module again: the environment gives it the same pepper)
HOST = "ledger.example"


def _send_all(sender: TxSender, requests: list[TxRequest], what: str) -> None:
    hashes: list[str] = []
    for start in range(0, len(requests), 1000):
        hashes += sender.send(requests[start : start + 1000])
    assert all(r.status == 1 for r in sender.wait(hashes)), f"{what} failed"


def grant_consents(registry: ConsentRegistryClient, sender: TxSender, customers_csv: Path, partner: str) -> int:
    """Set-up: every customer who would consent binds a key and grants, signed with that key."""
    pseudonymizer = Pseudonymizer(PEPPER)
    consenting: list[tuple[bytes, LocalAccount, int]] = []
    with customers_csv.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["consent_purchases"] != "true":
                continue
            try:
                pii = normalize_pii({"email": row["email"] or None, "phone": row["phone"] or None}, "GB")
            except InvalidPII:
                continue
            bits = 1 << BITS["user.behavior.purchase_history"]
            if row["consent_demographics"] == "true":
                bits |= 1 << BITS["user.demographic"]
            consenting.append((bytes(pseudonymizer.subject(pii)), Account.create(), bits))
    _send_all(
        sender,
        [
            TxRequest(to=registry.address, data=registry.encode("bindController", s, a.address), gas=80_000)
            for s, a, _ in consenting
        ],
        "binding",
    )
    deadline = int(time.time()) + 86_400
    signed = []
    for subject, account, bits in consenting:
        change = registry.grant_message(subject, partner, PURPOSE, bits, nonce=0, deadline=deadline)  # type: ignore[arg-type]
        signed.append(SignedChange(change, eip712.sign(bytes(account.key), registry.domain, change)))
    per_tx = max_changes_per_batch(500)  # what one transaction holds (geth refuses more than 128 KiB)
    _send_all(
        sender,
        [
            TxRequest(to=registry.address, data=registry.encode_batch(signed[i : i + per_tx]), gas=batch_gas(per_tx))
            for i in range(0, len(signed), per_tx)
        ],
        "granting",
    )
    return len(consenting)


def status_mb(pid: int | str, field: str) -> float | None:
    """A memory figure (`VmHWM`, `VmRSS`, ...) of a process from /proc, in MB; None where there is none."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, which execve makes
    anew; ru_maxrss would still count the forked parent's memory."""
    peak = status_mb("self", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def block_overhead_ms(backend: ManagedBackend) -> float:
    """How long the node takes to make an empty block at this state size (median of 5): anvil
    recomputes the state root and copies the state for its history on every block; geth updates
    its tries by what changed."""
    times = []
    node = backend.node
    with node.mining_paused():
        for _ in range(5):
            started = time.perf_counter()
            if isinstance(node, GethNode):
                node.commit(node.last_time + 1, [])  # back to back, a second apart on the chain's clock
            else:
                backend.w3.provider.make_request(RPCEndpoint("evm_mine"), [])
            times.append(time.perf_counter() - started)
    if isinstance(node, GethNode):  # the chain's clock ran ahead: let the wall clock catch up
        time.sleep(max(0.0, node.last_time - time.time()))
    return sorted(times)[2] * 1000


def node_rss_mb(backend: ManagedBackend) -> float:
    running = backend.node.running_node()
    return (status_mb(running[0], "VmRSS") if running else None) or 0.0


def export_process(config: dict[str, Any], results: Any) -> None:
    """The timed bridge run, in its own process (its peak memory is the bridge's)."""
    started = time.perf_counter()
    w3 = Web3(HTTPProvider(config["url"], request_kwargs={"timeout": 120}))
    artifacts = compile_contracts()
    accessor = Account.from_key(config["accessor_key"])
    access_log = AccessLogClient(
        w3,
        config["access_log"],
        artifacts["AccessLog"],
        TxSender(w3, accessor, receipt_timeout=300),
        RevertDecoder(list(artifacts.values())),
    )
    engine = create_engine(config["db_url"])
    permissions = ConsentReader(engine).permissions(config["partner"], PURPOSE)
    mapping = Mapping.load(Path(config["mapping"]))
    bridge = Bridge(
        Pseudonymizer(PEPPER),
        DidWeb(HOST),
        access_log,
        pipeline_depth=config["pipeline_depth"],
        durable=Checkpoints(Path(config["state_dir"])).wait,  # as `bridge export` beside `serve` waits
    )
    run = Export(
        bridge,
        read_csv(
            Path(config["orders"]),
            chunk_rows=config["chunk_rows"],
            text_columns=tuple(mapping.pii.columns().values()),
            columns=mapping.read_columns(),
        ),
        mapping,
        partner=config["partner"],
        purpose=PURPOSE,
        purpose_key=PURPOSE_KEY,
        attribute_bits=BITS,
        permissions=permissions,
    )
    stats = run.to_parquet(Path(config["out"]))
    seconds = time.perf_counter() - started
    results.put(
        {
            "seconds": seconds - stats.durable_wait_seconds,  # timed on its own
            "checkpoint_wait": stats.durable_wait_seconds,
            "rows": stats.rows_read,
            "released": stats.rows_released,
            "entries": stats.entries_recorded,
            "refused": stats.entries_refused,
            "transactions": len(stats.transactions),
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def baseline_rows_per_s(orders: Path, mapping: Mapping, permissions: Permissions, sample: int, out: Path) -> float:
    """Row by row, as a first script would: csv module, PII normalised and hashed per row, dict rows."""
    pseudonymizer = Pseudonymizer(PEPPER)
    requested = {column: 1 << BITS[category] for column, category in mapping.columns.items()}
    started = time.perf_counter()
    with orders.open(encoding="utf-8") as source, out.open("w", encoding="utf-8", newline="") as sink:
        writer = csv.DictWriter(sink, fieldnames=["did", *requested])
        writer.writeheader()
        for n, row in enumerate(csv.DictReader(source)):
            if n >= sample:
                break
            try:
                pii = normalize_pii({"email": row["email"] or None, "phone": row["phone"] or None}, "GB")
            except InvalidPII:
                continue
            subject = bytes(pseudonymizer.subject(pii))
            mask = permissions.get(subject, 0)
            if mask:
                released = {c: row[c] if mask & bit else "" for c, bit in requested.items()}
                writer.writerow({"did": f"did:web:{HOST}:dids:{subject.hex()}", **released})
    return sample / (time.perf_counter() - started)


def entries_per_s(client: AccessLogClient, partner: str, count: int, batch: int) -> float:
    request_id = os.urandom(32)  # one access request, as an export is
    entries = [Access(os.urandom(32), partner, PURPOSE, 1 << 5, request_id) for _ in range(count)]
    started = time.perf_counter()
    pending = [(client.submit(entries[i : i + batch]), entries[i : i + batch]) for i in range(0, count, batch)]
    for tx_hash, sent in pending:
        client.settle(tx_hash, sent)
    return count / (time.perf_counter() - started)


def baseline_entries_per_s(client: AccessLogClient, partner: str, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        client.record([Access(os.urandom(32), partner, PURPOSE, 1 << 5, os.urandom(32))])
    return count / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    parser.add_argument("--backend", default="geth", choices=["geth", "anvil"], help="the managed node")
    parser.add_argument("--rows", type=int, help="CRM rows (default 1,000,000; 40,000 with --quick)")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per chunk")
    parser.add_argument("--pipeline-depth", type=int, default=8, help="chunks in flight")
    parser.add_argument(
        "--runs", type=int, help="timed exports on the same node; the median is reported (default 3; 1 with --quick)"
    )
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    rows = args.rows or (40_000 if args.quick else 1_000_000)
    entry_count = 20_000 if args.quick else 200_000
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        root = Path(tmp)
        counts = generate_crm.write(root / "crm", rows, seed=42)
        operator, accessor, partner = Account.create(), Account.create(), Account.create().address
        settings = ChainSettings(
            backend=args.backend, block_time=0.2, gas_limit=2_000_000_000, state_interval=3600, receipt_timeout=600
        )
        keys = Keys(operator, accessor)
        with open_contracts(settings, ToolchainSettings(), root / "chain", keys=keys) as contracts:
            backend = contracts.backend
            assert isinstance(backend, ManagedBackend), "the durable wait measured is the managed node's"
            w3, deployment, registry, sender = (
                contracts.w3,
                contracts.deployment,
                contracts.consent,
                contracts.consent.sender,
            )
            registry.add_partner(partner)
            print("generated; binding and granting ...", file=sys.stderr)
            consenting = grant_consents(registry, sender, root / "crm" / "customers.csv", partner)
            print("granted; indexing ...", file=sys.stderr)
            db_url = f"sqlite:///{root / 'service.db'}"
            engine = make_engine(db_url)
            Base.metadata.create_all(engine)
            indexer = Indexer(
                w3,
                engine,
                deployment.deploy_block,
                followers=[ConsentFollower(registry.address, engine.dialect)],
                chunk=100_000,
            )
            while indexer.step() > 0:
                pass
            permissions = ConsentReader(engine).permissions(partner, PURPOSE)
            engine.dispose()
            overhead = block_overhead_ms(backend)
            print(
                f"set-up: {counts['orders']:,} orders of {counts['customers']:,} customers, {consenting:,} consenting, "
                f"{len(permissions):,} permitted in the read model; the node takes {overhead:.0f} ms per (empty) "
                f"block at this state size and holds {node_rss_mb(backend):,.0f} MB"
            )

            context = multiprocessing.get_context("spawn")
            results = context.Queue()
            config = {
                "url": backend.url,
                "state_dir": str(backend.node.state_dir),
                "access_log": deployment.address("AccessLog"),
                "accessor_key": "0x" + bytes(accessor.key).hex(),
                "db_url": db_url,
                "partner": partner,
                "mapping": str(root / "crm" / "mapping.toml"),
                "orders": str(root / "crm" / "orders.csv"),
                "out": str(root / "released.parquet"),
                "chunk_rows": args.chunk_rows,
                "pipeline_depth": args.pipeline_depth,
            }
            runs = []
            for _ in range(args.runs):  # each a fresh process; the same export again (a new request id)
                child = context.Process(target=export_process, args=(config, results))
                child.start()
                runs.append(results.get(timeout=1800))
                child.join()
                print(f"bridge run: {runs[-1]}", file=sys.stderr)
            bridge = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]  # the median run
            bridge_rows_per_s = bridge["rows"] / bridge["seconds"]
            print("bridge done; baseline ...", file=sys.stderr)

            mapping = Mapping.load(root / "crm" / "mapping.toml")
            sample = min(rows, 20_000 if not args.quick else 5_000)
            base_rows = baseline_rows_per_s(root / "crm" / "orders.csv", mapping, permissions, sample, root / "b.csv")

            access_log = contracts.access_log
            access_log.sender.resync_nonce()  # the export processes sent as the accessor meanwhile
            print("baseline bridge done; access entries ...", file=sys.stderr)
            batched_entries = entries_per_s(access_log, partner, entry_count, max_record_entries())
            print(f"access entries: {entry_count:,} batched ...", file=sys.stderr)
            single_entries = baseline_entries_per_s(access_log, partner, 20 if args.quick else 100)

    figures = {
        "rows": bridge["rows"],
        "rows_released": bridge["released"],
        "bridge_rows_per_s": round(bridge_rows_per_s),
        "bridge_seconds": round(bridge["seconds"], 2),
        "bridge_runs_seconds": [round(run["seconds"], 2) for run in runs],
        "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs), 1),
        "checkpoint_wait_s": round(bridge["checkpoint_wait"], 2),
        "durable_rows_per_s": round(bridge["rows"] / (bridge["seconds"] + bridge["checkpoint_wait"])),
        "node_block_ms": round(overhead),
        "backend": args.backend,
        "access_entries_in_export": bridge["entries"],
        "access_entries_refused": bridge["refused"],
        "export_transactions": bridge["transactions"],
        "baseline_rows_per_s": round(base_rows),
        "rows_ratio": round(bridge_rows_per_s / base_rows, 1),
        "entries_per_s": round(batched_entries),
        "baseline_entries_per_s": round(single_entries, 3),
        "entries_ratio": round(batched_entries / single_entries, 1),
    }
    print(
        f"bridge:   {figures['rows']:,} rows in {figures['bridge_seconds']} s "
        f"(median of {figures['bridge_runs_seconds']}) = {figures['bridge_rows_per_s']:,} rows/s "
        f"({figures['rows_released']:,} released, {figures['access_entries_in_export']:,} access entries in "
        f"{figures['export_transactions']} transactions), peak memory {figures['peak_rss_mb']} MB"
    )
    print(
        f"          then {figures['checkpoint_wait_s']} s until the managed node ({args.backend}) held the records "
        f"durably (no such wait on a chain with final blocks): {figures['durable_rows_per_s']:,} rows/s to a "
        f"durable release"
    )
    print(f"baseline: {figures['baseline_rows_per_s']:,} rows/s row by row; ratio {figures['rows_ratio']}")
    print(
        f"entries:  {figures['entries_per_s']:,}/s batched vs {figures['baseline_entries_per_s']}/s one per "
        f"transaction; ratio {figures['entries_ratio']}"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
