"""Chaos check: partners redeem at load through a running `consent-ledger serve` while its managed node
is killed with SIGKILL again and again. The service restarts the node from its last state dump, so the
blocks mined since are lost; what they held must be applied again, once, in order.

    python scripts/chaos_points.py            # 9,000 redemptions, the node killed 4 times
    python scripts/chaos_points.py --quick    # a small run for CI

Set-up as `bench_loyalty.py` (customers enrolled, keys bound, points issued, authorisations signed in
advance with consecutive nonces per customer and partner; one point each). Then, once the load has
settled, it checks against the chain itself:
- every redemption sent ends applied (each was valid: a crash of the node must refuse none), whether
  its partner was answered 200 at once or "still pending" (503, to retry with its key);
- every redemption answered 200 is on-chain exactly once, and no redemption id twice;
- each customer's balance on-chain, in the read model, and as the applied redemptions imply, agree.

Prints its figures, then one line of JSON; exits 1 if any check failed. Runs like this found bugs that
the smaller tests did not show: a later redemption sent before the lost earlier one was refused for
its nonce (or could take its points), and redemptions were refused as unbound while the read model had
rolled back their customers' key bindings. Tests pin each (`tests/ledger/test_points_pipeline.py`,
`tests/api/test_points_api.py`); this is the check at load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from eth_utils.crypto import keccak
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger.points.client import REDEEMED
from scripts.bench_api import Service
from scripts.bench_loyalty import POINTS_EACH, presign, set_up, start_partners
from scripts.loadgen import Outcome

ROLLED_BACK = re.compile(r"chain reorganised below block (\d+): rolling the read model back to (\d+)")
UNSETTLED = """select count(*) from points_requests
               where status not in ('done', 'failed') or (status = 'done' and not indexed)"""


def rpc(url: str, method: str, params: list[Any]) -> Any:
    return httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, timeout=60).json()[
        "result"
    ]


NODE = {"backend": "geth"}  # the managed node (`--backend`)


def pid_file(data_dir: Path) -> Path:
    return data_dir / "chain" / f"{NODE['backend']}.pid"


def node_url(data_dir: Path) -> str:
    return "http://127.0.0.1:" + pid_file(data_dir).read_text().split()[1]


def restarted(data_dir: Path, killed: int, timeout: float = 60) -> None:
    """Until the service has started its node again (another process, answering)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            if int(pid_file(data_dir).read_text().split()[0]) != killed:
                rpc(node_url(data_dir), "eth_blockNumber", [])
                return
        except (OSError, ValueError, IndexError, httpx.TransportError):
            pass  # the file is being rewritten, or the node is not answering yet
    raise SystemExit("the service did not start its node again")


def settle(data_dir: Path, timeout: float = 120) -> None:
    """Until every points request is final, every done one indexed, and the read model's newest block
    is the node's block of that number (the service has caught up with the chain as it is now)."""
    engine = create_engine(f"sqlite:///{data_dir / 'service.db'}")
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as db:
                left = db.execute(text(UNSETTLED)).scalar()
                newest = db.execute(
                    text("select number, hash from indexed_blocks order by number desc limit 1")
                ).first()
            if not left and newest is not None:
                try:
                    block = rpc(node_url(data_dir), "eth_getBlockByNumber", [hex(newest[0]), False])
                except httpx.TransportError:
                    block = None
                if block is not None and block["hash"] == newest[1]:
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"the service did not settle: {left} points requests unsettled")
            time.sleep(0.2)
    finally:
        engine.dispose()


def run(customers: int, partners: int, tills: int, per_pair: int, kills: int, interval: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="chaos-points-") as tmp:
        data_dir = Path(tmp)
        service = Service(data_dir, CONSENT_LEDGER_CHAIN_BACKEND=NODE["backend"])
        try:
            print(f"set-up: {customers} customers enrol, bind keys, get points ...", flush=True)
            partner_keys, people, domain = set_up(service, customers, partners)
            address = domain.verifying_contract
            work = presign(people, [a for _, a in partner_keys], per_pair, domain)  # type: ignore[misc]
            total = sum(len(w) for w in work)
            print(
                f"{partners} partners redeem {total} times with {tills} tills each; the node is killed "
                f"{kills} times, every {interval} s ...",
                flush=True,
            )
            procs, queue, _ = start_partners(service.url, [key for key, _ in partner_keys], work, tills)
            time.sleep(1.0)
            for _ in range(kills):
                time.sleep(interval)
                killed = int(pid_file(data_dir).read_text().split()[0])
                os.kill(killed, signal.SIGKILL)
                restarted(data_dir, killed)
            outcomes = [queue.get() for _ in procs]
            for proc in procs:
                proc.join()
            outcome = Outcome.merged(outcomes, "chaos")
            settle(data_dir)

            url = node_url(data_dir)
            logs = rpc(url, "eth_getLogs", [{"address": address, "fromBlock": "0x0", "topics": [REDEEMED]}])
            on_chain = Counter(entry["topics"][3] for entry in logs)
            answers = [json.loads(a) for a in outcome.answers]
            # Every redemption sent (its id: its customer's subject). A partner told "still pending" (503:
            # not on-chain within 30 s) retries with its key for the answer; the service's database
            # says how each one ended.
            messages = [json.loads(body)["typed_data"]["message"] for share in work for _, body in share]
            sent = {m["redemptionId"]: m["subject"][2:] for m in messages}
            engine = create_engine(f"sqlite:///{data_dir / 'service.db'}")
            with engine.connect() as db:
                rows = db.execute(text("select ref from points_requests where kind = 'redeem' and status = 'done'"))
                done = {"0x" + bytes(ref).hex() for (ref,) in rows}
                spent: Counter[str] = Counter(sent[ref] for ref in done if ref in sent)
                balance_of = "0x" + keccak(text="balanceOf(bytes32)")[:4].hex()
                mismatches = 0
                for person in people:
                    chain = int(
                        rpc(url, "eth_call", [{"to": address, "data": balance_of + person["subject"]}, "latest"]), 16
                    )
                    model = db.execute(
                        text("select coalesce(sum(remaining), 0) from points_lots where subject = :s"),
                        {"s": bytes.fromhex(person["subject"])},
                    ).scalar()
                    mismatches += not (chain == model == POINTS_EACH - spent[person["subject"]])
            engine.dispose()
        finally:
            service.stop()
        log = (data_dir / "serve.log").read_text()
    rollbacks = [int(below) - int(to) for below, to in ROLLED_BACK.findall(log)]
    return {
        "redemptions": total,
        "answered": len(answers),
        # Answers other than 200: "still pending" (503, not on-chain within 30 s; a retry with the key
        # gets the answer) or a refusal (then also counted in `refused`).
        "still_pending_answers": outcome.errors,
        "refused": sum(ref not in done for ref in sent),  # ended failed, or never stored
        "answered_not_on_chain_once": sum(on_chain[a["redemption_id"]] != 1 for a in answers),
        "applied_twice": sum(n > 1 for n in on_chain.values()),
        "on_chain_not_done": len(set(on_chain) - done),
        "balance_mismatches": mismatches,
        "node_kills": kills,
        "node_restarts": log.count(f"the managed {NODE['backend']} node is not running; starting it again"),
        "rolled_back_blocks": sum(rollbacks),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--partners", type=int, default=2, help="partner client processes")
    parser.add_argument("--tills", type=int, default=100, help="concurrent requests per partner")
    parser.add_argument("--per-pair", type=int, default=15, help="redemptions per customer and partner")
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--interval", type=float, default=4.0, help="seconds between kills")
    parser.add_argument("--backend", default="geth", choices=["geth", "anvil"], help="the managed node")
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    args = parser.parse_args(argv)
    NODE["backend"] = args.backend
    if args.quick:
        args.customers, args.tills, args.per_pair, args.kills, args.interval = 40, 20, 30, 3, 1.5
    figures = run(args.customers, args.partners, args.tills, args.per_pair, args.kills, args.interval)
    wrong = [
        k
        for k in (
            "refused",
            "answered_not_on_chain_once",
            "applied_twice",
            "on_chain_not_done",
            "balance_mismatches",
        )
        if figures[k]
    ]
    if figures["answered"] + figures["still_pending_answers"] != figures["redemptions"]:
        wrong.append("unanswered")
    if figures["node_restarts"] != figures["node_kills"]:
        wrong.append("node_restarts")
    print(
        f"{figures['answered']} of {figures['redemptions']} redemptions answered at once, "
        f"{figures['still_pending_answers']} still pending after 30 s, {figures['refused']} refused in the end; "
        f"the node was killed {figures['node_kills']} times and restarted {figures['node_restarts']} times; "
        f"{figures['rolled_back_blocks']} blocks were lost and rolled back"
    )
    print("checks: " + ("all passed" if not wrong else "FAILED: " + ", ".join(wrong)))
    print(json.dumps(figures))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
