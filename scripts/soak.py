"""Soak: `consent-ledger serve` under a light, steady load for hours; does anything drift?

    python scripts/soak.py --hours 3            # the default node (geth), 2 changes/s
    python scripts/soak.py --minutes 3 --quick  # a short run (CI-sized)
    python scripts/soak.py --backend anvil      # the same against the managed anvil node

Customers enrol, bind keys and sign in over HTTP (untimed); their changes are signed in advance, as
their wallets would. Then one change is posted every 1/`--rate` seconds, round the customers. Every
`--sample` seconds it prints one JSON line: changes confirmed in the window and how long they took
(p50, max; from the service's own database), blocks made, the node's CPU per block and per second,
its RSS, the chain's disk, and how far the newest block's timestamp is ahead of the clock. At the end:
the first and the last samples side by side and their ratios (flat: near 1), then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger.eip712 import Domain
from scripts.bench_api import Service, enrol, presign
from scripts.bench_scale import cpu_seconds, disk_mb, rss_mb


def sign_in(service: Service, key: str) -> str:
    """A new session for the customer whose key is `key` (Sign-In with Ethereum)."""
    account = Account.from_key(key)
    message = service.client.post("/api/v1/auth/siwe/challenge", json={"address": account.address}).json()["message"]
    signature = "0x" + bytes(account.sign_message(encode_defunct(text=message)).signature).hex()
    answer = service.client.post("/api/v1/auth/siwe", json={"message": message, "signature": signature})
    answer.raise_for_status()
    return str(answer.json()["access_token"])


def _ts(value: Any) -> float:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return float(moment.replace(tzinfo=moment.tzinfo or UTC).timestamp())


class Node:
    """The managed node `serve` runs for the data dir (its pid file names its pid and port)."""

    def __init__(self, data_dir: Path, backend: str) -> None:
        self.pid_file = data_dir / "chain" / f"{backend}.pid"
        self.chain_dir = data_dir / "chain"

    def pid_port(self) -> tuple[int, int]:
        pid, port = self.pid_file.read_text().split()
        return int(pid), int(port)

    def head(self) -> tuple[int, int]:
        _, port = self.pid_port()
        block = httpx.post(
            f"http://127.0.0.1:{port}",
            json={"jsonrpc": "2.0", "id": 1, "method": "eth_getBlockByNumber", "params": ["latest", False]},
            timeout=10,
        ).json()["result"]
        return int(block["number"], 16), int(block["timestamp"], 16)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=3.0)
    parser.add_argument("--minutes", type=float, default=None, help="instead of --hours")
    parser.add_argument("--rate", type=float, default=2.0, help="changes posted per second")
    parser.add_argument("--customers", type=int, default=20)
    parser.add_argument("--sample", type=float, default=60.0, help="seconds per sample")
    parser.add_argument("--backend", default="geth", choices=["geth", "anvil"])
    parser.add_argument("--quick", action="store_true", help="3 minutes, 20 s samples")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60 if args.minutes is not None else args.hours * 3600
    if args.quick:
        seconds, args.sample = 180.0, 20.0
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        data_dir = Path(tmp)
        service = Service(data_dir, CONSENT_LEDGER_CHAIN_BACKEND=args.backend)
        try:
            partner = Account.create().address
            service.client.post(
                "/api/v1/partners", json={"name": "soak-partner", "address": partner}, headers=service.operator
            ).raise_for_status()
            with ThreadPoolExecutor(8) as pool:
                people = list(pool.map(lambda n: enrol(service, n), range(args.customers)))
            deployment = json.loads((data_dir / "deployment.json").read_text())
            domain = Domain(
                "ConsentRegistry", deployment["chain_id"], deployment["contracts"]["ConsentRegistry"]["address"]
            )
            per_customer = int(seconds * args.rate / args.customers) + 2
            print(f"signing {per_customer * args.customers:,} changes ...", flush=True)
            bodies = presign(people, per_customer, domain, partner)
            node = Node(data_dir, args.backend)
            engine = create_engine(f"sqlite:///{data_dir / 'service.db'}")
            headers = [{"Authorization": f"Bearer {p['token']}", "Content-Type": "application/json"} for p in people]
            began = time.monotonic()
            window_start = time.time()
            pid, _ = node.pid_port()
            cpu_before, (block_before, _) = cpu_seconds(pid), node.head()
            posted = rejected = 0
            step = 0
            next_post = time.monotonic()
            next_sample = time.monotonic() + args.sample
            while time.monotonic() - began < seconds:
                now = time.monotonic()
                if now >= next_post:
                    who = step % args.customers
                    body = bodies[who][step // args.customers]
                    answer = service.client.post("/api/v1/consents", content=body, headers=headers[who])
                    if answer.status_code == 401:  # the customer's session ended (as a wallet would, again)
                        headers[who]["Authorization"] = f"Bearer {sign_in(service, people[who]['key'])}"
                        answer = service.client.post("/api/v1/consents", content=body, headers=headers[who])
                    posted += 1
                    rejected += answer.status_code != 202
                    step += 1
                    next_post += 1 / args.rate
                if now >= next_sample:
                    window_end = time.time()
                    pid, _ = node.pid_port()
                    cpu_now, (block_now, stamp) = cpu_seconds(pid), node.head()
                    with engine.connect() as db:
                        confirmed = db.execute(
                            text("select created_at, updated_at from consent_requests where status = 'confirmed'")
                        ).all()
                    rows = [(c, u) for c, u in confirmed if window_start <= _ts(u) < window_end]
                    waits = [_ts(u) - _ts(c) for c, u in rows]
                    blocks = block_now - block_before
                    used = cpu_now - cpu_before
                    sample = {
                        "minute": round((time.monotonic() - began) / 60, 1),
                        "posted": posted,
                        "rejected": rejected,
                        "confirmed": len(rows),
                        "confirm_p50_s": round(statistics.median(waits), 3) if waits else None,
                        "confirm_max_s": round(max(waits), 3) if waits else None,
                        "blocks": blocks,
                        "head": block_now,
                        "node_cpu_ms_per_block": round(used / blocks * 1000, 2) if blocks else None,
                        "node_cpu_ms_per_s": round(used / (window_end - window_start) * 1000, 2),
                        "node_rss_mb": round(rss_mb(pid), 1),
                        "chain_disk_mb": round(disk_mb(node.chain_dir), 1),
                        "clock_lead_s": round(stamp - time.time(), 1),
                    }
                    samples.append(sample)
                    print(json.dumps(sample), flush=True)
                    window_start, cpu_before, block_before = window_end, cpu_now, block_now
                    next_sample += args.sample
                time.sleep(max(0.0, min(next_post, next_sample) - time.monotonic()))
            engine.dispose()
        finally:
            service.stop()

    def mean(key: str, part: list[dict[str, Any]]) -> float | None:
        values = [s[key] for s in part if s[key] is not None]
        return round(statistics.mean(values), 3) if values else None

    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    keys = ("confirm_p50_s", "blocks", "node_cpu_ms_per_block", "node_cpu_ms_per_s", "node_rss_mb")
    summary: dict[str, Any] = {"backend": args.backend, "seconds": round(seconds), "rate_per_s": args.rate}
    for key in keys:
        a, b = mean(key, first), mean(key, last)
        summary[f"first_{key}"], summary[f"last_{key}"] = a, b
        summary[f"ratio_{key}"] = round(b / a, 2) if a and b else None
    summary["rejected"] = samples[-1]["rejected"] if samples else None  # (a running count)
    summary["chain_disk_mb"] = samples[-1]["chain_disk_mb"] if samples else None
    summary["max_clock_lead_s"] = max((s["clock_lead_s"] for s in samples), default=None)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
