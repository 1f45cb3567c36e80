"""Benchmark: signed consent grants confirmed on a managed anvil node, batched vs one transact() each.

    python scripts/bench_consent.py            # 20,000 grants (the target run)
    python scripts/bench_consent.py --quick    # a small run for CI

Customers' signatures are made before the clock starts (customers sign on their own devices); the
timed part is the operator's: encode the batches, sign the transactions locally with a local nonce,
send them as JSON-RPC batches, and wait until every one is mined. The baseline, in the same run on
the same node, relays one grant per `contract.functions.applyChange(...).transact()` (web3 fills in
nonce, gas and price for each) and then waits for all receipts. Prints the figures, then one line of
JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3.middleware import SignAndSendRawMiddlewareBuilder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eth_utils.crypto import keccak

from ledger import eip712
from ledger.assembly import Keys, open_contracts
from ledger.consent import ConsentRegistryClient, SignedChange, batch_gas
from ledger.settings import ChainSettings, ToolchainSettings
from ledger.tx import TxRequest, TxSender
from ledger.types import Subject

PURPOSE = eip712.purpose_id("marketing.email")


def bind_customers(registry: ConsentRegistryClient, sender: TxSender, count: int) -> list[LocalAccount]:
    """Set-up (untimed): `count` customers, each with a bound key."""
    customers = [Account.create() for _ in range(count)]
    requests = [
        TxRequest(to=registry.address, data=registry.encode("bindController", _subject(c), c.address), gas=80_000)
        for c in customers
    ]
    hashes: list[str] = []
    for start in range(0, len(requests), 1000):
        hashes += sender.send(requests[start : start + 1000])
    assert all(r.status == 1 for r in sender.wait(hashes)), "binding customers failed"
    return customers


def _subject(customer: LocalAccount) -> Subject:
    return Subject(keccak(bytes(customer.key)))


def sign_grants(
    registry: ConsentRegistryClient, customers: Sequence[LocalAccount], partner: str, deadline: int
) -> list[SignedChange]:
    signed = []
    for customer in customers:
        change = registry.grant_message(_subject(customer), partner, PURPOSE, 0b111, nonce=0, deadline=deadline)  # type: ignore[arg-type]
        signed.append(SignedChange(change, eip712.sign(bytes(customer.key), registry.domain, change)))
    return signed


def run_batched(
    registry: ConsentRegistryClient,
    sender: TxSender,
    grants: Sequence[SignedChange],
    batch_size: int,
    txs_per_request: int,
) -> tuple[float, int]:
    started = time.perf_counter()
    hashes: list[str] = []
    pending: list[TxRequest] = []
    for start in range(0, len(grants), batch_size):
        chunk = grants[start : start + batch_size]
        pending.append(TxRequest(to=registry.address, data=registry.encode_batch(chunk), gas=batch_gas(len(chunk))))
        if len(pending) == txs_per_request:
            hashes += sender.send(pending)
            pending = []
    if pending:
        hashes += sender.send(pending)
    receipts = sender.wait(hashes, poll_interval=0.01)
    elapsed = time.perf_counter() - started
    failed = [r.tx_hash for r in receipts if r.status != 1]
    assert not failed, f"{len(failed)} batch transactions reverted"
    topic = "0x" + keccak(text="ConsentGranted(bytes32,address,bytes32,uint256,uint256,uint64,uint256)").hex()
    granted = sum(1 for r in receipts for log in r.logs if _hex(log["topics"][0]) == topic)
    assert granted == len(grants), f"{granted} ConsentGranted events for {len(grants)} grants"
    return elapsed, sum(r.gas_used for r in receipts)


def _hex(value: str | bytes) -> str:
    return value if isinstance(value, str) else "0x" + bytes(value).hex()


def run_baseline(registry: ConsentRegistryClient, operator: LocalAccount, grants: Sequence[SignedChange]) -> float:
    w3 = registry.w3
    w3.middleware_onion.inject(SignAndSendRawMiddlewareBuilder.build(operator), layer=0)
    w3.eth.default_account = operator.address
    started = time.perf_counter()
    hashes = [registry.contract.functions.applyChange(g.as_abi()).transact() for g in grants]
    for tx_hash in hashes:
        assert w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120, poll_latency=0.01)["status"] == 1
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grants", type=int, default=20_000)
    parser.add_argument("--baseline", type=int, default=500, help="grants relayed one transact() each")
    parser.add_argument("--batch-size", type=int, default=500, help="grants per transaction")
    parser.add_argument("--txs-per-request", type=int, default=4, help="transactions per JSON-RPC batch")
    parser.add_argument("--block-time", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.grants, args.baseline = 2_000, 100

    operator = Account.create()
    with tempfile.TemporaryDirectory() as data_dir:
        settings = ChainSettings(
            backend="anvil", block_time=args.block_time, gas_limit=30_000_000_000, receipt_timeout=300
        )
        keys = Keys(operator, Account.create())
        with open_contracts(settings, ToolchainSettings(), Path(data_dir), keys=keys) as contracts:
            w3, registry, sender = contracts.w3, contracts.consent, contracts.consent.sender
            partner = Account.create().address
            registry.add_partner(partner)
            print(f"set-up: binding {args.grants + args.baseline} customers and signing their grants ...")
            customers = bind_customers(registry, sender, args.grants + args.baseline)
            deadline = int(w3.eth.get_block("latest")["timestamp"]) + 3600
            grants = sign_grants(registry, customers, partner, deadline)

            elapsed, gas = run_batched(registry, sender, grants[: args.grants], args.batch_size, args.txs_per_request)
            batched_rate = args.grants / elapsed
            spot_checks = grants[: args.grants : max(1, args.grants // 50)]
            assert all(registry.is_permitted(g.change.subject, partner, PURPOSE, 0b111) for g in spot_checks)
            baseline_elapsed = run_baseline(registry, operator, grants[args.grants :])
            baseline_rate = args.baseline / baseline_elapsed

    figures = {
        "grants": args.grants,
        "batch_size": args.batch_size,
        "block_time_s": args.block_time,
        "grants_per_s": round(batched_rate, 1),
        "seconds": round(elapsed, 3),
        "gas_per_grant": round(gas / args.grants),
        "baseline_grants": args.baseline,
        "baseline_grants_per_s": round(baseline_rate, 1),
        "ratio": round(batched_rate / baseline_rate, 1),
    }
    print(
        f"batched : {args.grants} grants in {elapsed:.2f}s = {batched_rate:,.0f} grants/s confirmed, "
        f"{figures['gas_per_grant']:,} gas/grant"
    )
    print(
        f"baseline: {args.baseline} grants in {baseline_elapsed:.2f}s = {baseline_rate:,.0f} grants/s "
        f"(one transact() each)"
    )
    print(f"ratio   : {figures['ratio']}x")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
