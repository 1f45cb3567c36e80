"""Benchmark: concurrent partners redeeming customers' points through a running `consent-ledger serve`.

    python scripts/bench_loyalty.py            # 20,000 redemptions (the target run)
    python scripts/bench_loyalty.py --quick    # a small run for CI

Two services are started in turn, each with its own data dir and managed anvil node: the real one
(group commit: the redemptions that arrive together share one `redeemBatch` transaction) and a
baseline whose relayer sends one transaction per redemption. Customers are enrolled, bind keys and
get points first (untimed); their authorisations are signed in advance, as their phones would at the
till. Then partner client processes post redemptions, each with an Idempotency-Key, and time each
answer: a redemption is answered once it is on-chain, so the latency is the confirmation latency.
Prints the figures, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger import eip712
from ledger.eip712 import Domain, Redemption
from ledger.types import Subject
from scripts.bench_api import CLI, CpuMeter, Service, answered, describe_cpu, enrol, percentile
from scripts.loadgen import Call, Outcome, drive, wrk_path

POINTS_EACH = 10**9


def principal(service: Service, role: str, name: str) -> tuple[str, str | None]:
    out = subprocess.run(
        [*CLI, "principals", "add", "--role", role, "--name", name],
        env=service.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key = next(line.split()[2] for line in out.splitlines() if line.startswith("api key:"))
    address = next((line.split()[1] for line in out.splitlines() if line.startswith("address:")), None)
    return key, address


def presign(
    customers: list[dict[str, Any]], partners: list[str], per_pair: int, domain: Domain
) -> list[list[tuple[int, str]]]:
    """Per partner: (customer index, body) in the order a partner's till would send them."""
    deadline = int(time.time()) + 6 * 3600
    work: list[list[tuple[int, str]]] = []
    for partner in partners:
        mine = []
        for sequence in range(per_pair):
            for index, customer in enumerate(customers):
                message = Redemption(
                    Subject(bytes.fromhex(customer["subject"])),
                    partner,  # type: ignore[arg-type]
                    1,
                    os.urandom(32),
                    eip712.redemption_nonce(partner, sequence),
                    deadline,
                )
                signature = eip712.sign(bytes.fromhex(customer["key"]), domain, message)
                body = {
                    "typed_data": eip712.typed_data(domain, message),
                    "signature": "0x" + signature.to_bytes().hex(),
                }
                mine.append((index, json.dumps(body)))
        work.append(mine)
    return work


def partner_process(
    url: str, api_key: str, work: list[tuple[int, str]], lanes: int, start_at: float, results: Any
) -> None:
    """One partner: `lanes` concurrent tills; a customer's redemptions at this partner go in order."""
    by_customer: dict[int, list[str]] = {}
    for index, body in work:
        by_customer.setdefault(index, []).append(body)
    queues = list(by_customer.values())
    plan = [
        [
            Call(
                "/api/v1/points/redemptions",
                body.encode(),
                {"X-API-Key": api_key, "Idempotency-Key": str(uuid.uuid4()), "Content-Type": "application/json"},
            )
            for bodies in queues[i::lanes]
            for body in bodies
        ]
        for i in range(lanes)
    ]
    results.put(drive(url, plan, start_at, expect=200))


def set_up(
    service: Service, customers: int, partners: int
) -> tuple[list[tuple[str, str | None]], list[dict[str, Any]], Domain]:
    """Partners (API key, address), customers enrolled with bound keys and signed in, each issued
    POINTS_EACH; and the points contract's EIP-712 domain."""
    issuer_key, _ = principal(service, "issuer", "bench-issuer")
    partner_keys = [principal(service, "partner", f"partner-{i}") for i in range(partners)]
    with ThreadPoolExecutor(16) as pool:
        people = list(pool.map(lambda n: enrol(service, n), range(customers)))
    for start in range(0, customers, 1000):
        # With an Idempotency-Key, asked again while still pending: the baseline's one transaction per lot
        # may take longer than the service waits before answering.
        issued = answered(
            service.client,
            "/api/v1/points/issuances",
            {
                "issuances": [
                    {"did": f"did:web:127.0.0.1%3A{service.port}:dids:{p['subject']}", "amount": POINTS_EACH}
                    for p in people[start : start + 1000]
                ]
            },
            {"X-API-Key": issuer_key, "Idempotency-Key": str(uuid.uuid4())},
        )
        issued.raise_for_status()
    deployment = json.loads((service.data_dir / "deployment.json").read_text())
    domain = Domain("LoyaltyPoints", deployment["chain_id"], deployment["contracts"]["LoyaltyPoints"]["address"])
    return partner_keys, people, domain


def start_partners(
    url: str, keys: Sequence[str], work: Sequence[list[tuple[int, str]]], lanes: int
) -> tuple[list[multiprocessing.Process], Any, float]:
    """One client process per partner (API key, its share of `work`), starting together a second from
    now; each puts its `Outcome` on the queue. Returns (processes, queue, start time)."""
    queue: Any = multiprocessing.Queue()
    start_at = time.time() + 1.0
    procs = [
        multiprocessing.Process(target=partner_process, args=(url, key, work[i], lanes, start_at, queue))
        for i, key in enumerate(keys)
    ]
    for proc in procs:
        proc.start()
    return procs, queue, start_at


def run(label: str, redemptions: int, customers: int, partners: int, lanes: int, **settings: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-loyalty-{label}-") as tmp:
        service = Service(Path(tmp), **settings)
        try:
            print(f"[{label}] set-up: {customers} customers enrol, bind keys, get points ...", flush=True)
            partner_keys, people, domain = set_up(service, customers, partners)
            addresses = [address for _, address in partner_keys]
            assert all(addresses)
            per_pair = max(1, redemptions // (customers * partners))
            work = presign(people, addresses, per_pair, domain)  # type: ignore[arg-type]
            total = per_pair * customers * partners
            print(f"[{label}] {partners} partners redeem {total} times with {lanes} tills each ...", flush=True)
            procs, queue, start_at = start_partners(service.url, [key for key, _ in partner_keys], work, lanes)
            cpu = CpuMeter(service)
            cpu.start(at=start_at)
            outcomes = [queue.get() for _ in procs]
            cpu.stop()  # a redemption is answered once on-chain: each one's whole cost
            for proc in procs:
                proc.join()
        finally:
            service.stop()
    outcome = Outcome.merged(outcomes, label)
    latencies, errors, finished = outcome.latencies, outcome.errors, outcome.finished_at
    return {
        "redemptions": total,
        "redeemed": len(latencies),
        "errors": errors,
        "per_s": round(len(latencies) / (finished - start_at), 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        **cpu.figures(max(1, len(latencies)), outcome.cpu_seconds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redemptions", type=int, default=20_000)
    parser.add_argument("--baseline-redemptions", type=int, default=2_000)
    parser.add_argument("--customers", type=int, default=500)
    parser.add_argument("--partners", type=int, default=2, help="partner client processes")
    parser.add_argument("--lanes", type=int, default=200, help="concurrent requests per partner")
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.redemptions, args.baseline_redemptions, args.customers, args.lanes = 600, 200, 50, 50
    batched = run("batched", args.redemptions, args.customers, args.partners, args.lanes)
    baseline = run(
        "baseline",
        args.baseline_redemptions,
        min(args.customers, args.baseline_redemptions),
        args.partners,
        args.lanes,
        CONSENT_LEDGER_RELAYER_MAX_BATCH="1",
    )
    for label, figures in (("batched", batched), ("baseline (one tx per redemption)", baseline)):
        print(
            f"{label:>33}: {figures['redeemed']} of {figures['redemptions']} redeemed at {figures['per_s']:,}/s "
            f"({figures['errors']} errors); latency to the on-chain answer p50/p99 "
            f"{figures['p50_ms']}/{figures['p99_ms']} ms"
        )
    for label, figures in (("batched", batched), ("baseline (one tx per redemption)", baseline)):
        print(describe_cpu(label, figures))
    result = {f"batched_{k}": v for k, v in batched.items()} | {f"baseline_{k}": v for k, v in baseline.items()}
    result["ratio"] = round(batched["per_s"] / baseline["per_s"], 1)
    result["load_generator"] = "wrk" if wrk_path() else "aiohttp"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
