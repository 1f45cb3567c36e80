"""Benchmark: concurrent HTTP clients posting signed consent changes to a running `consent-ledger serve`.

    python scripts/bench_api.py             # 100,000 changes (the target run)
    python scripts/bench_api.py --quick     # a small run for CI

Two services are started in turn, each with its own data dir and managed node (`--backend`: geth, the
default, or anvil): the real one
(group commit: many changes per transaction) and a baseline whose relayer sends one transaction per
change. Customers are enrolled, bind keys and sign in over HTTP first (untimed); each customer's
changes are signed in advance with consecutive nonces, as their wallets would. Then keep-alive
connections (`scripts/loadgen.py`: aiohttp, cheap per request, so the load generator does not take the
cores the service needs) post them (one customer's changes in order) and time each acknowledgement.
Confirmation times come from the service's own database: when the indexer saw each change's event
on-chain. Last, the same load generator posts to uvicorn serving an app that does nothing
(`loadgen.null_app`): the HTTP stack's own ceiling on this machine, which bounds any service built
on it. Prints the figures, then one line of JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from sqlalchemy import create_engine, text
from web3 import Web3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.settings import default_api_workers
from ledger import eip712
from ledger.anvil import free_port
from ledger.eip712 import ChangeKind, ConsentChange, Domain
from ledger.types import Subject
from scripts.loadgen import Call, Outcome, drive, wrk_path

CLI = [sys.executable, "-m", "api.cli"]
PURPOSE = "analytics.reporting"
ROUTE, BATCH_ROUTE = "/api/v1/consents", "/api/v1/consents/batch"


class Service:
    def __init__(self, data_dir: Path, **settings: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_")}
        self.env |= {"CONSENT_LEDGER_PORT": str(self.port), "CONSENT_LEDGER_DATA_DIR": str(data_dir), **settings}
        self.operator = self._principal("operator", "bench")
        self.forwarder = self._principal("forwarder", "bench-forwarder")
        self.log = (data_dir / "serve.log").open("ab")
        self.process = subprocess.Popen([*CLI, "serve"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"serve exited; see {data_dir / 'serve.log'}")
            try:
                if self.client.get("/api/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("serve did not start")
            time.sleep(0.2)

    def _principal(self, role: str, name: str) -> dict[str, str]:
        """A new principal's API key header, made with the CLI before `serve` starts."""
        out = subprocess.run(
            [*CLI, "principals", "add", "--role", role, "--name", name],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {"X-API-Key": next(line.split()[2] for line in out.splitlines() if line.startswith("api key:"))}

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=120)
        self.client.close()
        self.log.close()


# Where a service's CPU goes, by the role of each process of its tree (`serve`'s command lines).
ROLES = (
    ("serve-worker", "api_workers"),
    ("anvil_dump", "state_dumps"),
    ("anvil", "node"),
    ("geth", "node"),
    ("serve", "supervisor"),
)


def _tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of `root` and its children, summed by role."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if int(entry) != root and int(stat[1]) != root:
            continue
        role = next((name for marker, name in ROLES if marker in command), "other")
        used[role] = used.get(role, 0.0) + (int(stat[11]) + int(stat[12])) / ticks
    return used


class CpuMeter:
    """The CPU a service's processes use between `start` and `stop`, per request, with the load
    generator's own: where each request's cost goes, and how many requests per second this machine's
    cores could carry at that cost (the bound when nothing else limits)."""

    def __init__(self, service: Service) -> None:
        self.root = service.process.pid
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self, at: float) -> None:
        """At `at` (wall clock: when the load generator starts posting)."""
        time.sleep(max(0.0, at - time.time()))
        self.before = _tree_cpu(self.root)

    def stop(self) -> None:
        after = _tree_cpu(self.root)
        self.used = {role: after[role] - self.before.get(role, 0.0) for role in after}

    def figures(self, requests: int, load_generator_seconds: float) -> dict[str, Any]:
        """`cpu_ms_<role>` per request, `cpu_ms_total`, and `cpu_bound_per_s`."""
        per_request = {role: seconds * 1000 / requests for role, seconds in self.used.items()}
        per_request["load_generator"] = load_generator_seconds * 1000 / requests
        total = sum(per_request.values())
        figures: dict[str, Any] = {f"cpu_ms_{role}": round(ms, 3) for role, ms in per_request.items()}
        figures["cpu_ms_total"] = round(total, 3)
        figures["cpu_bound_per_s"] = round(len(os.sched_getaffinity(0)) * 1000 / total, 1) if total else None
        return figures


def describe_cpu(label: str, figures: dict[str, Any]) -> str:
    parts = sorted(((k[7:], v) for k, v in figures.items() if k.startswith("cpu_ms_") and k != "cpu_ms_total"),
                   key=lambda part: -part[1])  # fmt: skip
    return (
        f"{label:>33}: CPU ms per request: {', '.join(f'{role} {ms:.3f}' for role, ms in parts)}; "
        f"total {figures['cpu_ms_total']:.3f}: at most {figures['cpu_bound_per_s']:,}/s on this machine's "
        f"{len(os.sched_getaffinity(0))} cores"
    )


def answered(
    client: httpx.Client, url: str, body: Any, headers: dict[str, str] | None = None, patience: float = 600
) -> httpx.Response:
    """POST as a client should: asked again (the same request; with the same Idempotency-Key if it has one)
    while the answer is 503 `still_pending`, for `patience` seconds at most (a loaded machine's indexer or
    a slow relayer can take longer than the service waits before answering)."""
    deadline = time.monotonic() + patience
    while True:
        response = client.post(url, json=body, headers=headers, timeout=120)
        pending = response.status_code == 503 and response.json().get("code") == "still_pending"
        if not pending or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def enrol(service: Service, n: int) -> dict[str, Any]:
    account = Account.create()
    client = httpx.Client(base_url=service.url, timeout=60)
    created = client.post("/api/v1/customers", json={"email": f"bench{n}@example.com"}, headers=service.operator)
    did, claim = created.json()["did"], created.json()["claim_code"]
    typed = client.post(
        f"/api/v1/customers/{quote(did, safe='')}/controller/prepare",
        json={"claim_code": claim, "address": account.address},
    ).json()["typed_data"]
    signature = "0x" + bytes(account.sign_message(encode_typed_data(full_message=typed)).signature).hex()
    bound = answered(
        client,
        f"/api/v1/customers/{quote(did, safe='')}/controller",
        {"claim_code": claim, "typed_data": typed, "signature": signature},
    )
    assert bound.status_code == 200, bound.text
    message = client.post("/api/v1/auth/siwe/challenge", json={"address": account.address}).json()["message"]
    signature = "0x" + bytes(account.sign_message(encode_defunct(text=message)).signature).hex()
    token = client.post("/api/v1/auth/siwe", json={"message": message, "signature": signature}).json()
    client.close()
    return {"key": bytes(account.key).hex(), "subject": did.rsplit(":", 1)[1], "token": token["access_token"]}


def presign(customers: list[dict[str, Any]], per_customer: int, domain: Domain, partner: str) -> list[list[str]]:
    """Each customer's changes as JSON bodies, nonces 0.. in order (grant and revoke alternately)."""
    bodies = []
    deadline = int(time.time()) + 6 * 3600
    for customer in customers:
        own = []
        for nonce in range(per_customer):
            change = ConsentChange(
                ChangeKind.GRANT if nonce % 2 == 0 else ChangeKind.REVOKE,
                Subject(bytes.fromhex(customer["subject"])),
                Web3.to_checksum_address(partner),
                eip712.purpose_id(PURPOSE),
                1 << (nonce // 2 % 8),
                nonce,
                deadline,
            )
            signature = eip712.sign(bytes.fromhex(customer["key"]), domain, change)
            own.append(
                json.dumps(
                    {"typed_data": eip712.typed_data(domain, change), "signature": "0x" + signature.to_bytes().hex()}
                )
            )
        bodies.append(own)
    return bodies


def client_process(
    url: str,
    work: list[tuple[str, list[str]]],
    lanes: int,
    start_at: float,
    results: Any,
    batch: int = 0,
    forwarder: dict[str, str] | None = None,
) -> None:
    """Post each customer's changes in order; customers spread over `lanes` connections, each of
    which takes its customers' changes in turn. With `batch`, each connection posts its sequence in
    requests of `batch` changes to the batch route, as the `forwarder` principal."""
    plan: list[list[Call]] = []
    for i in range(lanes):
        share = work[i::lanes]
        sequence: list[tuple[str, str]] = []
        for step in range(max((len(bodies) for _, bodies in share), default=0)):
            sequence += [(token, bodies[step]) for token, bodies in share if step < len(bodies)]
        if batch:
            assert forwarder is not None
            headers = {**forwarder, "Content-Type": "application/json"}
            plan.append(
                [
                    Call(
                        BATCH_ROUTE,
                        ('{"changes":[' + ",".join(b for _, b in sequence[j : j + batch]) + "]}").encode(),
                        headers,
                    )
                    for j in range(0, len(sequence), batch)
                ]
            )
        else:
            plan.append(
                [
                    Call(ROUTE, body.encode(), {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
                    for token, body in sequence
                ]
            )
    results.put(drive(url, plan, start_at, expect=200 if batch else 202))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(
    label: str,
    requests: int,
    customers: int,
    processes: int,
    lanes: int,
    data_dir: Path | None = None,
    batch: int = 0,
    **settings: str,
) -> dict[str, Any]:
    """`data_dir`: the service's (`bench_scale` hands one whose chain holds its customers); a fresh one
    removed afterwards if not given. `batch`: changes per request to the batch route (0: one change
    per request to `POST /consents`, as a customer's app sends them)."""
    with (
        contextlib.nullcontext(str(data_dir))
        if data_dir
        else tempfile.TemporaryDirectory(prefix=f"bench-{label}-") as tmp
    ):
        service = Service(Path(tmp), **settings)
        try:
            partner = Account.create().address
            service.client.post(
                "/api/v1/partners", json={"name": "bench-partner", "address": partner}, headers=service.operator
            ).raise_for_status()
            print(f"[{label}] set-up: {customers} customers enrol, bind keys, sign in ...", flush=True)
            with ThreadPoolExecutor(16) as pool:
                people = list(pool.map(lambda n: enrol(service, n), range(customers)))
            deployment = json.loads((Path(tmp) / "deployment.json").read_text())
            domain = Domain(
                "ConsentRegistry", deployment["chain_id"], deployment["contracts"]["ConsentRegistry"]["address"]
            )
            per_customer = max(1, requests // customers)
            bodies = presign(people, per_customer, domain, partner)
            total = per_customer * customers
            work = [(p["token"], b) for p, b in zip(people, bodies, strict=True)]
            how = f"in requests of {batch} " if batch else ""
            print(f"[{label}] posting {total} signed changes {how}from {processes}x{lanes} connections ...", flush=True)
            queue: Any = multiprocessing.Queue()
            start_at = time.time() + 1.0
            procs = [
                multiprocessing.Process(
                    target=client_process,
                    args=(service.url, work[i::processes], lanes, start_at, queue, batch, service.forwarder),
                )
                for i in range(processes)
            ]
            for proc in procs:
                proc.start()
            cpu = CpuMeter(service)
            cpu.start(at=start_at)
            outcomes = [queue.get() for _ in procs]
            for proc in procs:
                proc.join()
            outcome = Outcome.merged(outcomes, label)
            posted_done = outcome.finished_at
            latencies, errors = outcome.latencies, outcome.errors
            if batch:
                answers = [json.loads(answer) for answer in outcome.answers]
                ids = [item["id"] for answer in answers for item in answer["results"] if item["status"] == 202]
                refused = [item for answer in answers for item in answer["results"] if item["status"] != 202]
                errors += len(refused)
                if refused:
                    print(f"[{label}] refused in a batch: {refused[0]}", flush=True)
            else:
                ids = [json.loads(answer)["id"] for answer in outcome.answers]
            engine = create_engine(f"sqlite:///{tmp}/service.db")
            deadline = time.time() + 600
            while True:
                with engine.connect() as db:
                    confirmed, failed = db.execute(
                        text("select sum(status = 'confirmed'), sum(status = 'failed') from consent_requests")
                    ).one()
                if (confirmed or 0) + (failed or 0) >= len(ids) or time.time() > deadline:
                    break
                time.sleep(0.2)
            cpu.stop()  # acknowledged and confirmed: each request's whole cost
            with engine.connect() as db:
                rows = db.execute(
                    text("select created_at, updated_at from consent_requests where status = 'confirmed'")
                ).all()
            engine.dispose()
        finally:
            service.stop()

    def ts(value: Any) -> float:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return float(moment.replace(tzinfo=moment.tzinfo or UTC).timestamp())

    created = [ts(c) for c, _ in rows]
    updated = [ts(u) for _, u in rows]
    confirm_latencies = [u - c for c, u in zip(created, updated, strict=True)]
    ack_span = posted_done - start_at
    confirm_span = max(updated) - start_at if updated else float("nan")
    return {
        "requests": total,
        "accepted": len(ids),
        "http_requests": len(latencies) + outcome.errors,
        "rejected": errors,
        "confirmed": len(rows),
        "accepted_per_s": round(len(ids) / ack_span, 1),
        "confirmed_per_s": round(len(rows) / confirm_span, 1),
        "ack_p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "ack_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "confirm_p50_s": round(statistics.median(confirm_latencies), 3) if confirm_latencies else None,
        "confirm_p99_s": round(percentile(confirm_latencies, 0.99), 3),
        **cpu.figures(max(1, len(ids)), outcome.cpu_seconds),
    }


def http_ceiling(requests: int, lanes: int) -> float:
    """Requests/s that uvicorn alone answers (`loadgen.null_app`: no routing, auth, checks or storage),
    with as many processes as `serve` runs by default and the same load generator, connections and
    request size as the measured run: the most any service on this stack can acknowledge here."""
    workers = default_api_workers()  # serve's default (CONSENT_LEDGER_API_WORKERS)
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "scripts.loadgen:null_app", "--host", "127.0.0.1", "--port", str(port)),
            *("--workers", str(workers), "--lifespan", "off", "--no-access-log", "--log-level", "warning"),
        ],
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.post(url + "/api/v1/consents", content=b"{}").status_code == 202:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("uvicorn (null app) did not start")
            time.sleep(0.2)
        body = json.dumps({"typed_data": {"message": {"subject": "0x" + "ab" * 32}}, "signature": "0x" + "cd" * 65})
        body = body.ljust(1150)  # the size of a signed consent change's body
        headers = {"Authorization": "Bearer " + "t" * 43, "Content-Type": "application/json"}
        calls = [Call("/api/v1/consents", body.encode(), headers)] * requests
        start_at = time.time() + 0.5
        outcome = drive(url, [calls[i::lanes] for i in range(lanes)], start_at, expect=202)
        elapsed = outcome.finished_at - start_at
        if outcome.errors:
            raise SystemExit(f"the null app refused {outcome.errors} requests: {outcome.first_error}")
        return round(len(outcome.latencies) / elapsed, 1)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--baseline-requests", type=int, default=5_000)
    parser.add_argument("--customers", type=int, default=400)
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    parser.add_argument("--lanes", type=int, default=32, help="connections per client process")
    parser.add_argument("--ceiling-requests", type=int, default=20_000, help="requests to the null app")
    parser.add_argument("--backend", default="geth", choices=["geth", "anvil"], help="the managed node")
    parser.add_argument("--batch-size", type=int, default=100, help="changes per request to the batch route")
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.baseline_requests, args.customers, args.ceiling_requests = 2_000, 400, 40, 2_000
    node = {"CONSENT_LEDGER_CHAIN_BACKEND": args.backend}
    batched = run("batched", args.requests, args.customers, args.processes, args.lanes, **node)
    baseline = run(
        "baseline",
        args.baseline_requests,
        min(args.customers, args.baseline_requests),
        args.processes,
        args.lanes,
        CONSENT_LEDGER_RELAYER_MAX_BATCH="1",
        **node,
    )
    batch_route = run(
        "batch-route",
        args.requests,
        args.customers,
        args.processes,
        args.lanes,
        batch=args.batch_size,
        **node,
    )
    runs = (
        ("batched", batched),
        ("baseline (one tx per change)", baseline),
        (f"batch route ({args.batch_size} per request)", batch_route),
    )
    for label, figures in runs:
        print(
            f"{label:>30}: {figures['accepted']} accepted at {figures['accepted_per_s']:,}/s, "
            f"{figures['confirmed']} confirmed at {figures['confirmed_per_s']:,}/s; ack p50/p99 "
            f"{figures['ack_p50_ms']}/{figures['ack_p99_ms']} ms; confirmation p50/p99 "
            f"{figures['confirm_p50_s']}/{figures['confirm_p99_s']} s"
        )
    for label, figures in runs:
        print(describe_cpu(label, figures))
    print(f"[ceiling] posting {args.ceiling_requests} requests to uvicorn serving an app that does nothing ...")
    ceiling = http_ceiling(args.ceiling_requests, args.processes * args.lanes)
    share = batched["accepted_per_s"] / ceiling
    batch_share = batch_route["accepted_per_s"] / ceiling
    print(
        f"{'HTTP stack alone (null app)':>30}: {ceiling:,} requests/s; the service acknowledges at "
        f"{100 * share:.1f} % of that one change per request, and at {100 * batch_share:.1f} % counted in "
        f"changes through the batch route"
    )
    result = {f"batched_{k}": v for k, v in batched.items()} | {f"baseline_{k}": v for k, v in baseline.items()}
    result |= {f"batch_route_{k}": v for k, v in batch_route.items()}
    result["batch_size"] = args.batch_size
    result["batch_route_share_of_http_ceiling"] = round(batch_share, 3)
    result["load_generator"] = "wrk" if wrk_path() else "aiohttp"
    result["ratio_confirmed"] = round(batched["confirmed_per_s"] / baseline["confirmed_per_s"], 1)
    result["http_ceiling_per_s"] = ceiling
    result["backend"] = args.backend
    result["share_of_http_ceiling"] = round(share, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
