"""`consent-ledger`: the one command line of the service."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from api import logs
from api.secrets import load_secrets
from api.service_errors import ServiceError, ToolError
from api.settings import ServiceSettings
from crm_bridge.errors import BridgeError
from identity.errors import IdentityError
from ledger.errors import LedgerError
from ledger.settings import ChainSettings, ToolchainSettings

if TYPE_CHECKING:
    import uvicorn
    from sqlalchemy.orm import Session, sessionmaker

    from api.runtime import Runtime

log = logging.getLogger("consent_ledger")


def _claim_port(host: str, port: int, patience: float = 10.0) -> int:
    """Check that the port is free with a plain bind, which any other listener refuses (a previous
    instance's workers may still be letting go of it after a crash: wait a little); returns it."""
    deadline = time.monotonic() + patience
    while True:
        with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
            else:
                return int(probe.getsockname()[1])
        time.sleep(0.2)


def _bind(host: str, port: int, *, shared: bool, listen: bool = True) -> socket.socket:
    """A socket on the API's port. `shared`: one of several (SO_REUSEPORT), each API worker listening
    on its own, so that the kernel spreads connections over the processes evenly (one inherited
    socket is accepted from by whichever process wakes first: under a burst of connections, all of
    them). The supervisor binds one without listening: no connection goes to it, and while it is
    bound no other service can bind the port (only sockets with SO_REUSEPORT may share it)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _wait_for_stop() -> None:
    """Until Ctrl-C or SIGTERM (the supervisor of API workers serves no requests itself)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def _uvicorn_config(runtime: Runtime, service: ServiceSettings) -> uvicorn.Config:
    import uvicorn

    from api.main import create_app

    # log_config=None: uvicorn's loggers go to the root logger, in the service's format (`api.logs`).
    return uvicorn.Config(
        create_app(runtime), log_level="info", log_config=None, lifespan="off", access_log=service.access_log
    )


def _settle_gc() -> None:
    """Once a process has started: what it built to serve (modules, the app and its models, contracts,
    caches) lives as long as it does, so it is frozen out of the collector's generations; full passes
    walked all of it again (~70 ms each in an API worker, every request in it stalled meanwhile).
    Young collections come less often too: each request makes short-lived containers by the hundred."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


GC_YOUNG_THRESHOLD = 10_000  # Python's default is 700


def _metrics_dir(data_dir: Path) -> Path:
    """This service run's Prometheus multiprocess directory, `metrics/<pid>` in the data dir, new: an
    earlier run's counters would be summed with this one's. Earlier runs' directories go, but not one
    whose process still runs (a second start on the same data dir, refused later, must not take a
    running service's counters away). Set in the environment before any metric exists in this process
    (it is the value class prometheus_client picks when first imported), and inherited by the API
    workers (`api.observability` says how the processes' counters are summed)."""
    root = (data_dir / "metrics").resolve()
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if not (old.name.isdigit() and _running(int(old.name))):
            shutil.rmtree(old, ignore_errors=True)
    path = root / str(os.getpid())
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    os.environ[MULTIPROC_ENV] = str(path)
    if "prometheus_client.values" in sys.modules:  # imported already: choose its value class again
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return path


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "data_dir": args.data_dir}.items() if v}
    service = ServiceSettings(**overrides)
    logs.configure(service.log_format, logging.DEBUG if args.verbose else logging.INFO)
    _metrics_dir(service.data_dir)  # before the imports below make any metric

    import uvicorn

    from api.runtime import Runtime
    from api.workers import WorkerPool
    from ledger.backends import backend_class

    # Requests hop between the event loop, the thread pool and the outbox writer; with the default 5 ms
    # GIL switch interval each hop can wait that long behind the relayer or indexer threads.
    sys.setswitchinterval(0.0005)
    workers = args.workers or service.api_workers
    chain = ChainSettings()
    if backend_class(chain).in_process and workers > 1:  # nobody else can reach its chain
        log.info("the %s chain backend serves the API from one process", chain.backend)
        workers = 1
    secrets = load_secrets(service, chain)
    log.info("starting in %s mode, data in %s", service.mode, service.data_dir.resolve())
    if (warning := service.origin_warning()) is not None:
        log.warning("%s", warning)
    control_dir = Path(tempfile.mkdtemp(prefix="consent-ledger-"))  # private (0700): the control socket
    runtime = Runtime(
        service=service,
        chain=chain,
        toolchain=ToolchainSettings(),
        secrets=secrets,
        role="supervisor" if workers > 1 else "all",
        control_address=str(control_dir / "control.sock"),
        control_key=os.urandom(32),
    )

    def leadership_lost() -> None:
        # Another instance may be taking over the chain's writers: nothing more may be sent from here.
        # The process exits (its API workers follow, as their control connection breaks), and its service
        # manager starts it again as a standby. What was acknowledged is in the database already.
        logging.shutdown()
        os._exit(LEADERSHIP_LOST_EXIT)

    runtime.on_leadership_lost = leadership_lost
    pool: WorkerPool | None = None
    sock: socket.socket | None = None
    try:
        runtime.start()
        _settle_gc()
        # After the start, as before: no connection waits on it meanwhile.
        port = _claim_port(service.host, service.port)
        sock = _bind(service.host, port, shared=workers > 1, listen=workers == 1)
        if workers == 1:
            uvicorn.Server(_uvicorn_config(runtime, service)).run(sockets=[sock])
            return 0
        # Several API processes: this one runs the chain's single writers and supervises them. It
        # serves no requests itself: in it they would compete for its interpreter lock with the
        # relayer and indexer, which hold the database's write lock meanwhile.
        backend = runtime.ledger.backend
        assert backend is not None
        node_url = backend.url
        assert node_url is not None, "API workers need a node they can reach"
        assert runtime.control_key is not None and runtime.control_address is not None
        command = [*_cli(), "serve-worker", "--node-url", node_url, "--backend", backend.name]
        command += ["--host", service.host, "--port", str(service.port), "--data-dir", str(service.data_dir)]
        command += ["--listen-port", str(port)]
        if runtime.cadence is not None:
            command.append("--blocks-send")  # the relayer needs no wake-up per request
        env = os.environ | {
            "CONSENT_LEDGER_CONTROL": runtime.control_address,
            "CONSENT_LEDGER_CONTROL_KEY": runtime.control_key.hex(),
        }
        pool = WorkerPool(command, count=workers, env=env, nice=service.api_worker_nice)
        pool.start()
        log.info("API on %s:%s in %s worker processes: %s", service.host, port, workers, pool.pids)
        _wait_for_stop()
    except KeyboardInterrupt:
        pass  # uvicorn shut down gracefully, then re-raised the Ctrl-C; stopping is what was asked
    finally:
        if pool is not None:
            pool.stop()
        if sock is not None:
            sock.close()
        runtime.stop()
        shutil.rmtree(control_dir, ignore_errors=True)
        log.info("stopped; all state is in %s", service.data_dir.resolve())
    return 0


LEADERSHIP_LOST_EXIT = 75  # EX_TEMPFAIL: start again (as a standby)


def _cli() -> list[str]:
    return [sys.executable, "-m", "api.cli"]


def _serve_worker(args: argparse.Namespace) -> int:
    """An API worker process of `serve` (started by it, not by hand)."""
    import uvicorn

    from api.runtime import Runtime

    sys.setswitchinterval(0.0005)
    service = ServiceSettings(host=args.host, port=args.port, data_dir=args.data_dir)  # niced by the supervisor
    logs.configure(service.log_format, logging.DEBUG if args.verbose else logging.INFO)
    chain = ChainSettings()
    runtime = Runtime(
        service=service,
        chain=chain,
        toolchain=ToolchainSettings(),
        secrets=load_secrets(service, chain),
        role="worker",
        control_address=os.environ["CONSENT_LEDGER_CONTROL"],
        control_key=bytes.fromhex(os.environ["CONSENT_LEDGER_CONTROL_KEY"]),
        node_url=args.node_url,
        backend_name=args.backend,
        supervisor_on_blocks=args.blocks_send,
    )
    server = uvicorn.Server(_uvicorn_config(runtime, service))

    def supervisor_gone() -> None:
        # The supervisor crashed (a graceful stop stops the workers first): so does the service, as one
        # process would. Serving on would answer health checks for a service that is not there, and hold
        # the port the next start needs. What was acknowledged is in the database already.
        logging.shutdown()
        os._exit(1)

    runtime.on_control_lost = supervisor_gone
    sock = _bind(args.host, args.listen_port, shared=True)
    try:
        runtime.start()
        _settle_gc()
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        runtime.stop()
    return 0


def _service_settings(args: argparse.Namespace) -> ServiceSettings:
    """The settings, with `--data-dir` over CONSENT_LEDGER_DATA_DIR when given."""
    return ServiceSettings(data_dir=args.data_dir) if args.data_dir else ServiceSettings()


@contextlib.contextmanager
def _principals_db(args: argparse.Namespace) -> Iterator[sessionmaker[Session]]:
    """The service database of `--data-dir` (made or brought up to date), for the `principals` commands."""
    import api.models  # noqa: F401 - the principals table
    import ledger.consent.tables  # noqa: F401 - the consent tables (created, or brought up to date)
    from ledger.store import create_schema, make_engine, sessions

    service = _service_settings(args)
    service.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(service.service_database_url)
    try:
        create_schema(engine)
        yield sessions(engine)
    finally:
        engine.dispose()


def _principals_add(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import IntegrityError
    from web3 import Web3

    from api.auth import PrincipalExists, create_principal, new_address
    from api.models import Partner

    try:
        address: str | None = Web3.to_checksum_address(args.address) if args.address else None
    except ValueError as exc:  # web3's word for a malformed address
        raise ToolError(str(exc)) from exc
    private_key: str | None = None
    if args.role == "partner" and address is None:
        address, private_key = new_address()
    with _principals_db(args) as db:
        try:
            with db.begin() as session:
                _principal, key = create_principal(session, args.name, args.role, address)
                if args.role == "partner":
                    session.add(Partner(address=address, name=args.name, on_chain=False))
        except (PrincipalExists, IntegrityError):
            print(f"consent-ledger: a principal or partner named {args.name!r} exists already", file=sys.stderr)
            return 2
    print(f"name:    {args.name}\nrole:    {args.role}\napi key: {key}   (shown once; only its hash is stored)")
    if address:
        print(f"address: {address}   (gets the partner role on-chain when the service runs)")
    if private_key:
        print(f"partner private key: {private_key}   (shown once; the service does not keep it)")
    return 0


def _principals_list(args: argparse.Namespace) -> int:
    import json

    from sqlalchemy import select

    from api.models import Principal
    from ledger.store import as_utc

    def stamp(moment: datetime | None) -> str | None:
        return None if moment is None else as_utc(moment).isoformat(timespec="seconds")

    with _principals_db(args) as db, db() as session:
        rows = [
            {
                "name": p.name,
                "role": p.role,
                "address": p.address,
                "created_at": stamp(p.created_at),
                "key_rotated_at": stamp(p.key_rotated_at),
                "revoked_at": stamp(p.revoked_at),
            }
            for p in session.scalars(select(Principal).order_by(Principal.name))
        ]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("name", "role", "address", "created_at", "key_rotated_at", "revoked_at")
    table = [columns, *([row[c] or "-" for c in columns] for row in rows)]
    widths = [max(len(str(line[n])) for line in table) for n in range(len(columns))]
    for line in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def _principals_rotate(args: argparse.Namespace) -> int:
    from api.auth import rotate_key
    from api.deps import CACHE_SECONDS

    with _principals_db(args) as db, db.begin() as session:
        key = rotate_key(session, args.name)
    print(f"name:    {args.name}\napi key: {key}   (shown once; only its hash is stored)")
    print(f"The old key stops working within {CACHE_SECONDS:.0f} s.")
    return 0


def _principals_revoke(args: argparse.Namespace) -> int:
    from api.auth import revoke_principal
    from api.deps import CACHE_SECONDS

    with _principals_db(args) as db, db.begin() as session:
        role = revoke_principal(session, args.name).role
    print(f"{args.name} ({role}) is revoked: its key stops working within {CACHE_SECONDS:.0f} s.")
    if role == "partner":
        print("The partner keeps its role on-chain; to retire the partner itself: DELETE /api/v1/partners/{name}.")
    return 0


def _bridge_export(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from api.offline import Offline, export

    offline = Offline.open(args.data_dir)
    try:
        stats = export(offline, args.input, args.mapping, args.partner, args.purpose, args.out, table=args.table)
    finally:
        offline.close()
    print(json.dumps(asdict(stats), indent=2))
    return 0


def _vault(args: argparse.Namespace) -> int:
    """`vault keys` (how many data keys each master key wraps) and `vault rotate-master-key`."""
    import json

    from api.secrets import open_vault
    from identity.keys import FileKeyProvider
    from identity.settings import IdentitySettings

    service, identity = _service_settings(args), IdentitySettings()
    secrets = load_secrets(service, ChainSettings(), identity)
    report: dict[str, object] = {}
    if args.vault_command == "rotate-master-key" and args.new_key:
        if not isinstance(secrets.master_keys, FileKeyProvider):
            print(
                "consent-ledger: --new-key makes a key in the development key file; in production add the key to "
                "CONSENT_LEDGER_IDENTITY_MASTER_KEYS, make it CONSENT_LEDGER_IDENTITY_MASTER_KEY_ID, restart serve, "
                "then run this without --new-key",
                file=sys.stderr,
            )
            return 2
        secrets.master_keys.add_key(args.new_key)
    vault = open_vault(service, identity, secrets)
    try:
        vault.create_schema()  # before the first `serve` too: an empty vault
        report["current_key"] = secrets.master_keys.current_key_id
        if args.vault_command == "rotate-master-key":
            report["rewrapped"] = vault.rotate_master_key()
        report["data_keys_by_master_key"] = vault.key_usage()
    finally:
        vault.engine.dispose()
    print(json.dumps(report, indent=2))
    return 0


def _backup(args: argparse.Namespace) -> int:
    import json

    from api.backup import backup
    from identity.settings import IdentitySettings

    manifest = backup(_service_settings(args), ChainSettings(), IdentitySettings(), args.dest)
    print(json.dumps(manifest.__dict__, indent=2))
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from api.offline import Offline

    with Offline.open(args.data_dir) as offline:
        result = offline.verify()
    print(json.dumps(asdict(result), indent=2))
    return 0 if result.ok else 1


def _recovery_claim(args: argparse.Namespace) -> int:
    """Issue a recovery claim code (as `POST /customers/{did}/recovery-claims`), for an operator at the
    service's machine who has verified the customer in person."""
    from urllib.parse import urlencode

    from api.offline import Offline
    from api.recovery import issue_claim, refusal
    from api.secrets import open_vault
    from identity.errors import InvalidDid
    from ledger.store import sessions

    with Offline.open(args.data_dir) as offline:
        try:
            subject = offline.dids().subject(args.did)
        except InvalidDid as exc:
            raise ToolError(f"not a DID of this service: {exc}") from exc
        vault = open_vault(offline.service, offline.identity, offline.secrets)
        try:
            refused = refusal(vault.record(subject))
        finally:
            vault.engine.dispose()
        if refused is not None:
            raise ToolError(refused.value)
        with sessions(offline.engine).begin() as session:
            code, expires_at = issue_claim(session, subject)
        link = f"{offline.service.origin}/#{urlencode({'did': args.did, 'recovery': code})}"
    print(f"recovery code: {code}   (shown once; valid until {expires_at.isoformat()})\nlink:          {link}")
    return 0


def _audit_accesses(args: argparse.Namespace) -> int:
    import json

    from api.offline import Offline
    from api.routers.audit import entries_csv, public_entries
    from ledger.access import AccessReader
    from ledger.eip712 import purpose_id

    def epoch(value: str | None) -> int | None:
        return int(_iso_time(value).timestamp()) if value else None

    with Offline.open(args.data_dir) as offline:
        catalogue, dids = offline.catalogue(), offline.dids()
        partner = catalogue.partner(args.partner, retired=True) if args.partner else None
        if args.partner and partner is None:
            raise ToolError(f"no partner named {args.partner!r}")
        rows = AccessReader(offline.engine).entries(
            subject=dids.subject(args.did) if args.did else None,
            partner=partner,
            purpose=purpose_id(args.purpose) if args.purpose else None,
            start=epoch(args.start),
            end=epoch(args.end),
            limit=10**9,
        )
        entries = public_entries(dids, catalogue, rows)
    if args.format == "csv":
        sys.stdout.write(entries_csv(entries))
    else:
        print(json.dumps([e.model_dump() for e in entries], indent=2))
    return 0


def _analytics_report(args: argparse.Namespace) -> int:
    from datetime import UTC

    from crm_bridge.analytics.data import Fields, Released
    from crm_bridge.analytics.report import METHODS, build, render
    from crm_bridge.analytics.settings import AnalyticsSettings
    from ledger.files import write_atomically

    settings = AnalyticsSettings() if args.k is None else AnalyticsSettings(k=args.k)  # the flag wins over the env
    as_of = None
    if args.as_of is not None:
        day = _iso_time(args.as_of).replace(tzinfo=UTC)
        as_of = int(day.timestamp()) + 86_400  # the whole named day is observed
    fields = Fields(timestamp=args.timestamp, amount=args.amount, basket=args.basket)
    report = build(Released(args.input, fields, as_of=as_of, time_zone=settings.time_zone), settings)
    for name, text in render(report).items():
        write_atomically(args.out / name, text)
    for refused in report["refused"]:
        print(f"not run: {refused['reason']}", file=sys.stderr)
    print(f"{args.out / 'report.html'}\n{args.out / 'report.json'}")
    return 0 if any(name in report for name in METHODS) else 1


def _iso_time(value: str) -> datetime:
    """A time given on the command line (ISO 8601), else ToolError with datetime's own words."""
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise ToolError(str(exc)) from exc


def _compile(_args: argparse.Namespace) -> int:
    from ledger.compiler import compile_contracts

    for name, artifact in compile_contracts(ToolchainSettings()).items():
        print(f"{name}: {len(artifact.bytecode) // 2 - 1} bytes, solc {artifact.compiler_version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consent-ledger", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the chain, the contracts and the API")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8000)")
    serve.add_argument("--data-dir", type=Path, help="state directory (default ./var)")
    serve.add_argument("--workers", type=int, help="API processes (default CONSENT_LEDGER_API_WORKERS)")
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser("serve-worker", help=argparse.SUPPRESS)  # started by `serve`
    worker.add_argument("--listen-port", type=int, required=True)
    worker.add_argument("--node-url", required=True)
    worker.add_argument("--backend", required=True)
    worker.add_argument("--host", required=True)
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--data-dir", type=Path, required=True)
    worker.add_argument("--blocks-send", action="store_true", help="the supervisor's relayer sends at each block")
    worker.set_defaults(handler=_serve_worker)

    principals = commands.add_parser("principals", help="service accounts (API keys)")
    principal_commands = principals.add_subparsers(dest="principal_command", required=True)
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--data-dir", type=Path, help="state directory (default ./var)")
    add = principal_commands.add_parser("add", parents=[state], help="create a principal and print its API key once")
    add.add_argument("--role", required=True, choices=["operator", "issuer", "partner", "auditor", "forwarder"])
    add.add_argument("--name", required=True)
    add.add_argument("--address", help="partner's own address (default: a new one is made)")
    add.set_defaults(handler=_principals_add)
    listed = principal_commands.add_parser(
        "list", parents=[state], help="every principal: role, address, key rotation, revocation"
    )
    listed.add_argument("--format", choices=["table", "json"], default="table")
    listed.set_defaults(handler=_principals_list)
    rotate = principal_commands.add_parser(
        "rotate", parents=[state], help="print a new API key for a principal; the old one stops"
    )
    rotate.add_argument("--name", required=True)
    rotate.set_defaults(handler=_principals_rotate)
    revoke = principal_commands.add_parser(
        "revoke", parents=[state], help="a principal's API key stops working, for good"
    )
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(handler=_principals_revoke)

    vault = commands.add_parser("vault", help="the PII vault's master keys")
    vault_commands = vault.add_subparsers(dest="vault_command", required=True)
    keys = vault_commands.add_parser(
        "keys", parents=[state], help="the current master key, and how many data keys each master key wraps"
    )
    keys.set_defaults(handler=_vault)
    rewrap = vault_commands.add_parser(
        "rotate-master-key", parents=[state], help="re-wrap every data key under the current master key"
    )
    rewrap.add_argument("--new-key", metavar="ID", help="development: make a new master key ID current first")
    rewrap.set_defaults(handler=_vault)

    bridge = commands.add_parser("bridge", help="release consented CRM data (log, then release)")
    bridge_commands = bridge.add_subparsers(dest="bridge_command", required=True)
    export = bridge_commands.add_parser(
        "export", help="CRM export -> Parquet keyed by DID with permitted columns only, each access logged on-chain"
    )
    export.add_argument("--input", required=True, help="a CSV file, or a database URL (with --table)")
    export.add_argument("--table", help="table to read when --input is a database URL")
    export.add_argument("--mapping", required=True, type=Path, help="TOML: PII columns and attribute categories")
    export.add_argument("--partner", required=True, help="partner name or address the data is for")
    export.add_argument("--purpose", required=True, help="purpose key, e.g. analytics.reporting")
    export.add_argument("--out", required=True, type=Path, help="Parquet file to write")
    export.add_argument("--data-dir", type=Path, help="state directory of the running service (default ./var)")
    export.set_defaults(handler=_bridge_export)

    customers = commands.add_parser("customers", help="customers' keys")
    customer_commands = customers.add_subparsers(dest="customer_command", required=True)
    recovery = customer_commands.add_parser(
        "recovery-claim",
        help="issue a recovery code for a verified customer who lost their key (takes effect after the ledger's delay)",
    )
    recovery.add_argument("did", help="the customer's DID")
    recovery.add_argument("--data-dir", type=Path, help="state directory of the running service (default ./var)")
    recovery.set_defaults(handler=_recovery_claim)

    audit = commands.add_parser("audit", help="the on-chain access log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="recompute the hash chain from chain events; compare with the contract and the read model"
    )
    verify.add_argument("--data-dir", type=Path, help="state directory of the running service (default ./var)")
    verify.set_defaults(handler=_audit_verify)

    listing = audit_commands.add_parser("accesses", help="list the indexed access log, filtered (JSON or CSV)")
    listing.add_argument("--did", help="only this customer")
    listing.add_argument("--partner", help="partner name or address")
    listing.add_argument("--purpose", help="purpose key")
    listing.add_argument("--from", dest="start", help="from this time (ISO 8601, inclusive)")
    listing.add_argument("--to", dest="end", help="until this time (ISO 8601, exclusive)")
    listing.add_argument("--format", choices=["json", "csv"], default="json")
    listing.add_argument("--data-dir", type=Path, help="state directory of the running service (default ./var)")
    listing.set_defaults(handler=_audit_accesses)

    analytics = commands.add_parser("analytics", help="analyses of released data (never raw CRM data)")
    analytics_commands = analytics.add_subparsers(dest="analytics_command", required=True)
    report = analytics_commands.add_parser(
        "report", help="RFM segments, association rules, lifetime value, churn: report.html and report.json"
    )
    report.add_argument("--input", required=True, type=Path, help="a Parquet file `bridge export` wrote")
    report.add_argument("--out", required=True, type=Path, help="directory for report.html and report.json")
    report.add_argument("--k", type=int, help="k-anonymity of every output row (default: CONSENT_LEDGER_ANALYTICS_K)")
    report.add_argument("--as-of", help="analyse up to the end of this day (YYYY-MM-DD; default: the last order's)")
    report.add_argument("--timestamp", default="order_ts", help="column holding the order time")
    report.add_argument("--amount", default="amount", help="column holding the order value")
    report.add_argument("--basket", default="products", help="column holding the products (';'-separated)")
    report.set_defaults(handler=_analytics_report)

    backup = commands.add_parser(
        "backup", help="copy the data dir's state while the service runs (the copy starts as a data dir)"
    )
    backup.add_argument("dest", type=Path, help="a new or empty directory")
    backup.add_argument("--data-dir", type=Path, help="state directory of the running service (default ./var)")
    backup.set_defaults(handler=_backup)

    compile_ = commands.add_parser("compile", help="compile the contracts (cached) and list them")
    compile_.set_defaults(handler=_compile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    # Each package's root, and the settings' validation (of the environment and of flags such as --k:
    # pydantic's ValidationError, raised where a command builds its settings). Anything else is a bug:
    # its traceback is wanted.
    except (ServiceError, LedgerError, BridgeError, IdentityError, ValidationError) as exc:
        print(f"consent-ledger: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
