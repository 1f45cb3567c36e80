"""Chaos soak: `consent-ledger serve` under a mixed load while the service and its node are killed with
SIGKILL at random points; then nothing acknowledged may be lost or applied twice, the read model must
equal the chain, and the processes' memory and open files must stay flat.

    python scripts/chaos.py                  # 30 minutes, a kill every ~60 s (service and node in turn)
    python scripts/chaos.py --quick          # 2 minutes, a kill every ~25 s (CI)
    python scripts/chaos.py --minutes 10 --every 30 --seed 7

The load, from threads of their own (each its own HTTP connection): every customer signs consent changes
(grant and revoke in turn) and redemptions (a point at a time, with an Idempotency-Key, redeemed by the
partner); `bridge export` releases a CRM export to the partner now and then; a reader reads consent
statuses, balances and the audit log. What the service acknowledged is noted: a consent change answered
202, a redemption answered 200, an export that exited 0 (its access records' transactions).

Faults, at seeded random times (uniform between half and one and a half of `--every` apart), in turn:
a SIGKILL of the service's supervisor (then `serve` is started again, as systemd would), or of its node
(the service starts it again by itself). Each fault's recovery is timed until /health answers 200.

Every `--sample` seconds one JSON line: what was acknowledged so far, the faults, and the RSS and open
files of the service's processes and of the node. At the end the checks (`scripts/served.py`): every
acknowledged consent change on-chain exactly once and the read model equal to the contract; every
redemption asked again with its key gets its one answer, those answered 200 before still 200, each on-chain
once, balances on-chain and in the read model as the answers say; every export's access records on-chain;
RSS and open files in the second half at most 1.5x the first half's (the most of each half's samples).
Ends with one line of JSON; exit status 1 if anything was found. (`chaos_points.py` is the narrower
check at a higher rate: redemptions only, presigned, while the node alone is killed.)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import generate_crm
from scripts.served import (
    CLI,
    Serve,
    consent_findings,
    customer,
    points_settled,
    q,
    read_model_balance_findings,
    redemption_findings,
    renewed,
    sign_in,
    sign_typed,
)

START = 1_000_000  # points each customer holds: redemptions of one never run out
PURPOSE = "analytics.reporting"
FLAT = 1.5  # memory and open files at the end within this factor of the first sample
Customer = tuple[LocalAccount, str, dict[str, str]]


@dataclass
class Tally:
    """What the load saw, shared by its threads (under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    consents: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # acknowledged: (id, owner's headers)
    redemptions: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # key -> (customer, body)
    answered: dict[str, int] = field(default_factory=dict)  # key -> status of its last answer
    exports: list[list[str]] = field(default_factory=list)  # each done export's access transactions
    exports_failed: int = 0
    reads: Counter[str] = field(default_factory=Counter)  # "2xx", "4xx", "5xx", "down"
    refused: Counter[str] = field(default_factory=Counter)  # answers other than acknowledgement, by code


def tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def usage(pids: list[int]) -> tuple[float, int]:
    """RSS (MB) and open files of `pids` together; a process gone meanwhile counts nothing."""
    rss, files = 0.0, 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            files += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        rss += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0) / 1024
    return rss, files


def consent_load(serve: Serve, person: Customer, stop: threading.Event, tally: Tally, pace: float) -> None:
    account, _did, headers = person
    with httpx.Client(base_url=str(serve.client.base_url), timeout=10) as client:
        i = 0
        while not stop.is_set():
            action = "grant" if i % 2 == 0 else "revoke"
            body = {"action": action, "partner": "acme", "purpose": PURPOSE, "attributes": ["user.contact.email"]}
            try:
                prepared = client.post("/api/v1/consents/prepare", headers=headers, json=body)
                if prepared.status_code == 200:
                    typed = prepared.json()["typed_data"]
                    answer = client.post(
                        "/api/v1/consents",
                        headers=headers,
                        json={"typed_data": typed, "signature": sign_typed(account, typed)},
                    )
                else:
                    answer = prepared
            except httpx.TransportError:
                stop.wait(0.2)  # the service is down: nothing acknowledged; try again later
                continue
            if _renewed(client, account, headers, answer):
                continue
            with tally.lock:
                if answer.status_code == 202:
                    tally.consents.append((answer.json()["id"], headers))
                    i += 1
                else:
                    tally.refused[f"consent {answer.status_code} {_code(answer)}"] += 1
            stop.wait(pace)


def redemption_load(
    serve: Serve, n: int, person: Customer, partner_key: str, stop: threading.Event, tally: Tally, pace: float
) -> None:
    account, _did, headers = person
    with httpx.Client(base_url=str(serve.client.base_url), timeout=10) as client:
        while not stop.is_set():
            try:
                prepared = client.post(
                    "/api/v1/points/redemptions/prepare", json={"partner": "acme", "amount": 1}, headers=headers
                )
                if _renewed(client, account, headers, prepared):
                    continue
                if prepared.status_code != 200:
                    with tally.lock:
                        tally.refused[f"redemption prepare {prepared.status_code} {_code(prepared)}"] += 1
                    stop.wait(pace)
                    continue
                typed = prepared.json()["typed_data"]
                body = {"typed_data": typed, "signature": sign_typed(account, typed)}
                key = str(uuid.uuid4())
                with tally.lock:
                    tally.redemptions[key] = (n, body)
                answer = client.post(
                    "/api/v1/points/redemptions",
                    json=body,
                    headers={"X-API-Key": partner_key, "Idempotency-Key": key},
                )
            except httpx.TransportError:
                stop.wait(0.2)
                continue
            with tally.lock:
                tally.answered[key] = answer.status_code
                if answer.status_code != 200:
                    tally.refused[f"redemption {answer.status_code} {_code(answer)}"] += 1
            stop.wait(pace)


def export_load(serve: Serve, crm: Path, stop: threading.Event, tally: Tally, every: float) -> None:
    out = serve.data_dir / "released.parquet"
    while not stop.wait(every):
        done = subprocess.run(
            [*CLI, "bridge", "export", "--input", str(crm / "orders.csv"), "--mapping", str(crm / "mapping.toml"),
             "--partner", "acme", "--purpose", PURPOSE, "--out", str(out), "--data-dir", str(serve.data_dir)],
            env=serve.env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        with tally.lock:
            if done.returncode == 0:
                tally.exports.append(list(json.loads(done.stdout)["transactions"]))
            else:
                tally.exports_failed += 1


def read_load(serve: Serve, auditor_key: str, people: list[Customer], stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(1)
    with httpx.Client(base_url=str(serve.client.base_url), timeout=10) as client:
        while not stop.wait(0.1):
            with tally.lock:
                known = tally.consents[-50:]
            _account, did, headers = rng.choice(people)
            try:
                if known and rng.random() < 0.4:
                    request_id, owner = rng.choice(known)
                    answer = client.get(f"/api/v1/consents/{request_id}", headers=owner)
                elif rng.random() < 0.5:
                    answer = client.get(f"/api/v1/customers/{q(did)}/points", headers=headers)
                    _renewed(client, _account, headers, answer)
                else:
                    answer = client.get(
                        "/api/v1/audit/accesses", params={"limit": 50}, headers={"X-API-Key": auditor_key}
                    )
                kind = f"{answer.status_code // 100}xx"
            except httpx.TransportError:
                kind = "down"
            with tally.lock:
                tally.reads[kind] += 1


def _renewed(client: httpx.Client, account: LocalAccount, headers: dict[str, str], answer: httpx.Response) -> bool:
    """Signed in again if `answer` says the token expired (the load runs longer than a token lasts)."""
    try:
        return renewed(client, account, headers, answer)
    except (httpx.TransportError, AssertionError):
        return False  # the service went away meanwhile: the next round tries again


def _code(answer: httpx.Response) -> str:
    try:
        return str(answer.json().get("code", ""))
    except ValueError:
        return ""


def faults(
    serve: Serve,
    rng: random.Random,
    every: float,
    until: float,
    stop: threading.Event,
    log: list[dict[str, Any]],
    began: float,
) -> None:
    """Kill the service or its node in turn at random times until `until` (monotonic); each recovery timed
    until /health answers 200 again."""
    victim = rng.choice(["service", "node"])
    while not stop.wait(rng.uniform(0.5, 1.5) * every) and time.monotonic() < until:
        started = time.monotonic()
        if victim == "service":
            serve.stop(signal.SIGKILL)  # the supervisor: its workers go with it, the node is adopted again
            serve.start(timeout=180)
        else:
            serve.kill_node_and_wait_for_its_restart(timeout=120)
            serve.wait_healthy(time.monotonic() + 120)
        fault = {
            "victim": victim,
            "at_s": round(started - began, 1),
            "recovered_s": round(time.monotonic() - started, 2),
        }
        log.append(fault)
        print(json.dumps({"fault": fault}), flush=True)
        victim = "node" if victim == "service" else "service"


def run(data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    serve = Serve(data_dir, args.node, fast_chain=False)  # as deployed: the chain's clock keeps to the machine's
    try:
        return _run(serve, rng, args)
    finally:
        serve.close()


def _run(serve: Serve, rng: random.Random, args: argparse.Namespace) -> dict[str, Any]:
    issuer_key = serve.principal("issuer", "issuer")
    partner_key = serve.principal("partner", "acme")
    auditor_key = serve.principal("auditor", "auditor")
    crm = serve.data_dir / "crm"
    generate_crm.write(crm, rows=300, seed=args.seed)
    with (crm / "orders.csv").open(encoding="utf-8") as handle:
        buyers = {row["email"] for row in csv.DictReader(handle) if row["email"]}
    serve.start(timeout=180)
    emails = sorted(buyers)[: args.customers]  # customers the exports find
    print(f"set-up: {len(emails)} customers enrol, bind keys, sign in, get {START:,} points ...", flush=True)
    people = [customer(serve, n, email) for n, email in enumerate(emails)]
    issued = serve.client.post(
        "/api/v1/points/issuances",
        json={"issuances": [{"did": did, "amount": START} for _, did, _ in people]},
        headers={"X-API-Key": issuer_key, "Idempotency-Key": str(uuid.uuid4())},
        timeout=120,
    )
    issued.raise_for_status()

    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=consent_load, args=(serve, p, stop, tally, 0.2)) for p in people]
    threads += [
        threading.Thread(target=redemption_load, args=(serve, n, p, partner_key, stop, tally, 0.2))
        for n, p in enumerate(people)
    ]
    threads.append(threading.Thread(target=export_load, args=(serve, crm, stop, tally, args.export_every)))
    threads.append(threading.Thread(target=read_load, args=(serve, auditor_key, people, stop, tally)))
    began = time.monotonic()
    duration = args.minutes * 60
    fault_log: list[dict[str, Any]] = []
    # The last faults leave time to recover under load before the load stops.
    faulting = threading.Thread(
        target=faults, args=(serve, rng, args.every, began + duration - args.every / 2, stop, fault_log, began)
    )
    print(
        f"load: {len(people)} customers x (consents, redemptions), exports, reads for {args.minutes:g} min", flush=True
    )
    for thread in [*threads, faulting]:
        thread.start()
    samples = []
    while time.monotonic() - began < duration:
        time.sleep(min(args.sample, max(0.0, duration - (time.monotonic() - began))))
        service_rss, service_files = usage(tree(serve.process.pid) if serve.process else [])
        try:
            node_rss, node_files = usage([serve.node_pid()])
        except (OSError, ValueError, IndexError):
            node_rss, node_files = 0.0, 0
        with tally.lock:
            sample = {
                "minute": round((time.monotonic() - began) / 60, 2),
                "consents": len(tally.consents),
                "redemptions": sum(1 for s in tally.answered.values() if s == 200),
                "exports": len(tally.exports),
                "faults": len(fault_log),
                "service_rss_mb": round(service_rss, 1),
                "service_files": service_files,
                "node_rss_mb": round(node_rss, 1),
                "node_files": node_files,
            }
        samples.append(sample)
        print(json.dumps(sample), flush=True)
    stop.set()
    faulting.join()
    for thread in threads:
        thread.join(timeout=120)
    if serve.process is None or serve.process.poll() is not None:
        serve.start(timeout=180)
    serve.wait_healthy(time.monotonic() + 120)
    print("checking ...", flush=True)
    return _check(serve, people, partner_key, tally, samples, fault_log, began)


def _check(
    serve: Serve,
    people: list[Customer],
    partner_key: str,
    tally: Tally,
    samples: list[dict[str, Any]],
    fault_log: list[dict[str, Any]],
    began: float,
) -> dict[str, Any]:
    found: list[str] = []
    for account, _did, headers in people:  # the run outlasted their tokens
        headers["Authorization"] = f"Bearer {sign_in(serve.client, account)}"
    # Redemptions: each asked again with its key (as its client would) gets its one answer.
    found += points_settled(serve, timeout=180)
    finals: dict[str, httpx.Response] = {}
    for key, (_n, body) in tally.redemptions.items():
        deadline = time.monotonic() + 120
        while True:
            final = serve.client.post(
                "/api/v1/points/redemptions",
                json=body,
                headers={"X-API-Key": partner_key, "Idempotency-Key": key},
                timeout=60,
            )
            if final.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        finals[key] = final
    lost = [k for k, status in tally.answered.items() if status == 200 and finals[k].status_code != 200]
    if lost:
        found.append(f"{len(lost)} redemptions answered 200 were not kept: {finals[lost[0]].text[:200]}")
    odd = Counter(f"{r.status_code} {_code(r)}" for r in finals.values() if r.status_code not in (200, 409))
    if odd:
        found.append(f"redemptions without a final answer: {dict(odd)}")
    spent = Counter(people[tally.redemptions[k][0]][1] for k, r in finals.items() if r.status_code == 200)
    found += redemption_findings(serve, finals, dict(spent), {did: START for _a, did, _h in people})
    found += read_model_balance_findings(serve, people)
    # Exports: what was released has its access records on the chain.
    for transactions in tally.exports:
        for tx in transactions:
            if serve.rpc("eth_getTransactionReceipt", [tx]) is None:
                found.append(f"an export's access record {tx} is not on-chain")
    # Memory and open files: flat, the most of the second half's samples against the most of the first's
    # (the most: a sample taken while a killed service starts again sees few of its processes).
    half = max(1, len(samples) // 2)
    flat = {}
    for what in ("service_rss_mb", "service_files", "node_rss_mb", "node_files"):
        early, late = max(s[what] for s in samples[:half]), max(s[what] for s in samples[half:] or samples)
        flat[what] = [early, late]
        if late > FLAT * early:
            found.append(f"{what} grew from {early} to {late} (the most of each half of the run)")
    # The load went on to the end: acknowledgements in the last two sample periods (a client that stops
    # being answered, as when its customers' tokens expired unrenewed, is a finding, not a quiet run).
    for what in ("consents", "redemptions"):
        if len(samples) >= 3 and samples[-1][what] == samples[-3][what]:
            found.append(f"no {what} were acknowledged after minute {samples[-3]['minute']}")
    # Consent changes last: the check stops the service to read the chain through a node of its own.
    acknowledged = [request_id for request_id, _headers in tally.consents]
    found += consent_findings(serve, acknowledged, node_crashed=True)
    recoveries = {
        victim: [f["recovered_s"] for f in fault_log if f["victim"] == victim] for victim in ("service", "node")
    }
    return {
        "node": serve.node,
        "minutes": round((time.monotonic() - began) / 60, 1),
        "faults_service": len(recoveries["service"]),
        "faults_node": len(recoveries["node"]),
        "recovery_service_p50_s": _median(recoveries["service"]),
        "recovery_service_max_s": max(recoveries["service"], default=None),
        "recovery_node_p50_s": _median(recoveries["node"]),
        "recovery_node_max_s": max(recoveries["node"], default=None),
        "consents_acknowledged": len(acknowledged),
        "redemptions_acknowledged": sum(1 for s in tally.answered.values() if s == 200),
        "redemptions_final_200": sum(1 for r in finals.values() if r.status_code == 200),
        "redemptions_final_409": sum(1 for r in finals.values() if r.status_code == 409),
        "exports_done": len(tally.exports),
        "exports_failed": tally.exports_failed,
        "reads": dict(tally.reads),
        "refused": dict(tally.refused.most_common(8)),
        "samples": len(samples),
        "flat": flat,  # what: [the most of the first half, the most of the second]
        "findings": found[:20],
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=60.0, help="mean seconds between faults")
    parser.add_argument("--customers", type=int, default=8)
    parser.add_argument("--export-every", type=float, default=20.0, help="seconds between exports")
    parser.add_argument("--sample", type=float, default=60.0, help="seconds per sample")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--node", default="geth", choices=["geth", "anvil"])
    parser.add_argument("--quick", action="store_true", help="2 minutes, a fault every ~25 s (CI)")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.every, args.sample, args.export_every = 2.0, 25.0, 20.0, 15.0
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        figures = run(Path(tmp), args)
    for finding in figures["findings"]:
        print(f"FOUND: {finding}", flush=True)
    print(json.dumps(figures), flush=True)
    return 1 if figures["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
