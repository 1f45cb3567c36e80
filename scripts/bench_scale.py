"""Benchmark: the embedded ledger at a company's scale: what a block costs as the customer base grows.

    python scripts/bench_scale.py                  # geth at 10k, 100k and 1M customers; anvil beside it
                                                   # (the baseline) at 10k and 100k; 1,000,000 blocks
    python scripts/bench_scale.py --sizes 10000,100000,1000000,10000000   # the full run
    python scripts/bench_scale.py --quick          # 10k customers, 2,000 blocks (CI)

State is built as the service builds it, then beyond that as cheaply as it can honestly be: the first
`--real` customers (10,000) are bound and grant consent through the project's batch paths (one
`bindController` each, `applyBatch` of signed changes); every further customer is the same number of
new storage slots in one contract (`FILLER`, a few bytes of EVM that writes a range of slots), the
number a real customer adds to the registry's storage, measured with geth's `prestateTracer`. The
node's tries hold exactly as many leaves as with real customers.

Per size and node it prints: the node's CPU per empty block; how blocks come (anvil: the interval its
miner holds against the 0.2 s asked; geth: blocks only for work, and how long a lone change waits
for its block); the node's RSS and disk; ledger-level grants/s (batched, as the relayer sends them)
with the node's and this process's CPU per grant; a short `bench_api` run through `serve` on the same
chain (changes confirmed per second, confirmation p50/p99, CPU per change); the durable wait of a
10,000-entry access record (what `bridge export` waits before handing data on); restart time; and a
SIGKILL of the node right after a run of batches, counting the acknowledged (mined) transactions the
restarted node lost. Then geth's CPU per empty block over its first and last thousand of `--blocks`
blocks mined back to back, and the growth ratios. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak
from web3 import Web3
from web3.types import RPCEndpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger.access import Access, AccessLogClient, max_record_entries
from ledger.anvil import Checkpoints
from ledger.assembly import Keys, open_contracts
from ledger.backends import ManagedBackend
from ledger.consent import ConsentRegistryClient, max_changes_per_batch
from ledger.geth import GethNode
from ledger.settings import ChainSettings, ToolchainSettings
from ledger.tx import MAX_TX_DATA_BYTES, TxRequest, TxSender
from ledger.types import Subject
from scripts import bench_api
from scripts.bench_consent import PURPOSE, bind_customers, run_batched, sign_grants

# Runtime code: SSTORE(k, k) for k in [start, start + count) (call data: start, count as two words).
FILLER_RUNTIME = bytes.fromhex(
    "6000356020358101"  # start, end = start + count
    "5b80821015601b57"  # loop (8): if not start < end, jump to the end (27)
    "818055"  # SSTORE(start, start)
    "9060010190600856"  # start += 1; jump to the loop
    "5b00"  # end (27): STOP
)
FILLER_INIT = bytes.fromhex(f"60{len(FILLER_RUNTIME):02x}80600b6000396000f3") + FILLER_RUNTIME
FILLER_BASE = 1 << 128  # filler slots: far from the slots the contracts' own layout uses
SLOTS_PER_TX = 40_000  # 22,100 gas each: 0.9 G; two a block stay within the gas limit setting (2 G)
ACCESS_ENTRIES = 10_000


@dataclass
class Chain:
    backend: ManagedBackend
    operator: LocalAccount
    accessor: LocalAccount
    sender: TxSender
    registry: ConsentRegistryClient
    access_log: AccessLogClient
    partner: str
    filler: ChecksumAddress
    state_dir: Path
    customers: int = 0
    slots_filled: int = 0
    figures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def w3(self) -> Web3:
        return self.backend.w3


def node_pid(backend: ManagedBackend) -> int:
    found = backend.node.running_node()
    assert found is not None, "the node is not running"
    return found[0]


def cpu_seconds(pid: int | str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def start_chain(kind: str, root: Path) -> Chain:
    """The managed node of `kind` in `root`, with the contracts deployed as `serve` deploys them."""
    operator, accessor = Account.create(), Account.create()
    settings = ChainSettings(
        backend=kind,  # type: ignore[arg-type]
        block_time=0.2,
        start_timeout=600,
        rpc_timeout=300,
        receipt_timeout=900,
    )
    contracts = open_contracts(settings, ToolchainSettings(), root, keys=Keys(operator, accessor))
    backend = contracts.backend
    assert isinstance(backend, ManagedBackend), f"{kind} is not a managed node"
    registry, access_log, sender = contracts.consent, contracts.access_log, contracts.consent.sender
    partner = Account.create().address
    registry.add_partner(partner)
    (tx,) = sender.send([TxRequest(to=None, data=FILLER_INIT, gas=200_000)])
    (receipt,) = sender.wait([tx])
    assert receipt.status == 1
    assert receipt.contract_address is not None
    return Chain(
        backend, operator, accessor, sender, registry, access_log, partner, receipt.contract_address, root / "chain"
    )


def slots_per_customer(chain: Chain) -> int:
    """New storage slots one customer's binding and grant add to the registry (geth's prestateTracer)."""
    customer = Account.create()
    subject = Subject(keccak(bytes(customer.key)))
    bound = chain.registry.bind_controller(subject, customer.address)
    deadline = int(chain.w3.eth.get_block("latest")["timestamp"]) + 3600
    (grant,) = sign_grants(chain.registry, [customer], chain.partner, deadline)
    granted = chain.registry.apply(grant)
    address = chain.registry.address.lower()
    slots = 0
    for receipt in (bound, granted):
        tracer = {"tracer": "prestateTracer", "tracerConfig": {"diffMode": True}}
        node = chain.backend.node
        if isinstance(node, GethNode):  # geth serves `debug` on its IPC socket only
            diff: Any = node.privileged("debug_traceTransaction", [receipt.tx_hash, tracer])
        else:
            diff = chain.backend.rpc("debug_traceTransaction", receipt.tx_hash, tracer)
        pre = diff["pre"].get(address, {}).get("storage", {})
        post = diff["post"].get(address, {}).get("storage", {})
        slots += len(set(post) - set(pre))
    return slots


def fill(chain: Chain, slots: int) -> float:
    """Write `slots` more filler slots; seconds it took."""
    started = time.perf_counter()
    hashes: list[str] = []
    while slots > 0:
        count = min(SLOTS_PER_TX, slots)
        data = (FILLER_BASE + chain.slots_filled).to_bytes(32, "big") + count.to_bytes(32, "big")
        hashes += chain.sender.send([TxRequest(to=chain.filler, data=data, gas=count * 22_200 + 50_000)])
        chain.slots_filled += count
        slots -= count
        if len(hashes) >= 2:  # a block's worth in the pool at a time
            assert all(r.status == 1 for r in chain.sender.wait(hashes)), "a filler transaction failed"
            hashes = []
    assert all(r.status == 1 for r in chain.sender.wait(hashes)), "a filler transaction failed"
    return time.perf_counter() - started


def empty_block_ms(chain: Chain, blocks: int) -> float:
    """The node's CPU per empty block, mined back to back with the service's miner paused. The kernel
    counts CPU in ticks (10 ms), so the figure resolves 10 ms / `blocks` (`empty_block_resolution_ms`).
    (geth's timestamps move a second per block: then wait until the clock has caught up with the
    chain's, so that what is measured next sees blocks as the service makes them.)"""
    pid = node_pid(chain.backend)
    node = chain.backend.node
    with node.mining_paused():
        before = cpu_seconds(pid)
        for _ in range(blocks):
            mine_empty(chain)
        used = cpu_seconds(pid) - before
    if isinstance(node, GethNode):
        time.sleep(max(0.0, node.last_time - time.time()))
    return used / blocks * 1000


def mine_empty(chain: Chain) -> None:
    node = chain.backend.node
    if isinstance(node, GethNode):
        node.commit(node.last_time + 1, [])  # back to back, one second on each
    else:
        chain.w3.provider.make_request(RPCEndpoint("evm_mine"), [])


def block_timing(chain: Chain, seconds: float = 6.0) -> dict[str, float]:
    """How blocks come while one change at a time is sent every 0.3 s: the mean interval between blocks,
    and how long each change waited for its block (p50, max)."""
    w3 = chain.w3
    customers = bind_customers(chain.registry, chain.sender, int(seconds / 0.3) + 1)
    deadline = int(w3.eth.get_block("latest")["timestamp"]) + 3600
    grants = sign_grants(chain.registry, customers, chain.partner, deadline)
    start_block = w3.eth.block_number
    began = time.monotonic()
    waits = []
    for grant in grants:
        sent = time.monotonic()
        (tx,) = chain.sender.send(
            [TxRequest(to=chain.registry.address, data=chain.registry.encode_batch([grant]), gas=300_000)]
        )
        chain.sender.wait([tx], poll_interval=0.01)
        waits.append(time.monotonic() - sent)
        time.sleep(max(0.0, 0.3 - (time.monotonic() - sent)))
    elapsed = time.monotonic() - began
    blocks = w3.eth.block_number - start_block
    return {
        "blocks_per_s": round(blocks / elapsed, 2),
        "interval_s": round(elapsed / max(blocks, 1), 3),
        "wait_p50_s": round(statistics.median(waits), 3),
        "wait_max_s": round(max(waits), 3),
    }


def grants_run(chain: Chain, count: int) -> dict[str, float]:
    customers = bind_customers(chain.registry, chain.sender, count)
    deadline = int(chain.w3.eth.get_block("latest")["timestamp"]) + 3600
    grants = sign_grants(chain.registry, customers, chain.partner, deadline)
    pid = node_pid(chain.backend)
    node_before, own_before = cpu_seconds(pid), time.process_time()
    elapsed, _gas = run_batched(chain.registry, chain.sender, grants, max_changes_per_batch(500), 4)
    node_cpu, own_cpu = cpu_seconds(pid) - node_before, time.process_time() - own_before
    chain.customers += count
    return {
        "grants_per_s": round(count / elapsed, 1),
        "node_cpu_ms_per_grant": round(node_cpu / count * 1000, 3),
        "bench_cpu_ms_per_grant": round(own_cpu / count * 1000, 3),
    }


def access_record(chain: Chain) -> dict[str, float]:
    """10,000 access entries recorded (in transactions that fit a node's size limit), then the wait until a
    crash of the node could not lose them (what `bridge export` waits before it hands data on)."""
    per_tx = max_record_entries()
    request_id = os.urandom(32)
    entries = [Access(os.urandom(32), chain.partner, PURPOSE, 1, request_id) for _ in range(ACCESS_ENTRIES)]
    started = time.perf_counter()
    hashes = [chain.access_log.submit(entries[i : i + per_tx]) for i in range(0, len(entries), per_tx)]
    receipts = chain.access_log.sender.wait(hashes)
    assert all(r.status == 1 for r in receipts)
    recorded = time.perf_counter() - started
    began = time.perf_counter()
    Checkpoints(chain.state_dir).wait(max(r.block_number for r in receipts), timeout=900)
    return {"access_record_s": round(recorded, 3), "durable_wait_s": round(time.perf_counter() - began, 3)}


def start_again(chain: Chain) -> float:
    """Start the stopped or killed node again on its port (the clients keep their URL) and take the
    senders' nonces from it; seconds the start took."""
    chain.backend.node.requested_port = chain.backend.node.port
    started = time.perf_counter()
    chain.backend.start()
    took = time.perf_counter() - started
    chain.sender.resync_nonce()
    chain.access_log.sender.resync_nonce()
    return took


def restart(chain: Chain) -> float:
    chain.backend.stop()
    return start_again(chain)


def sigkill(chain: Chain, count: int) -> dict[str, float]:
    """Batches of grants mined (acknowledged: their receipts seen), then a SIGKILL of the node at once;
    after the restart, how many of those transactions the chain no longer holds in their blocks."""
    customers = bind_customers(chain.registry, chain.sender, count)
    deadline = int(chain.w3.eth.get_block("latest")["timestamp"]) + 3600
    grants = sign_grants(chain.registry, customers, chain.partner, deadline)
    size = max_changes_per_batch(500)
    hashes = chain.sender.send(
        [
            TxRequest(
                to=chain.registry.address, data=chain.registry.encode_batch(grants[i : i + size]), gas=size * 120_000
            )
            for i in range(0, len(grants), size)
        ]
    )
    receipts = chain.sender.wait(hashes, poll_interval=0.005)
    blocks = {r.block_number: chain.w3.eth.get_block(r.block_number)["hash"] for r in receipts}
    os.kill(node_pid(chain.backend), signal.SIGKILL)
    chain.backend.kill()
    took = start_again(chain)
    w3 = chain.w3
    lost = 0
    for receipt in receipts:
        block = w3.eth.get_block(receipt.block_number) if receipt.block_number <= w3.eth.block_number else None
        if block is None or block["hash"] != blocks[receipt.block_number]:
            lost += 1
    return {
        "sigkill_acknowledged_txs": len(receipts),
        "sigkill_lost_txs": lost,
        "restart_after_sigkill_s": round(took, 2),
    }


def api_run(chain: Chain, size: int, requests: int, customers: int) -> dict[str, Any]:
    """A short `bench_api` run through `serve` on this chain: the node is handed to a service (its data
    dir's `chain` is this one's; it deploys its own contracts beside the customers' state), customers
    enrol and post signed changes over HTTP, and it counts what was confirmed per second. The bench's
    own node is started again afterwards."""
    service_dir = chain.state_dir.parent / f"service-{size}"
    service_dir.mkdir()
    (service_dir / "chain").symlink_to(chain.state_dir)
    chain.backend.stop()
    try:
        figures = bench_api.run(
            f"{chain.backend.name}-{size}", requests, customers, 1, 32, data_dir=service_dir,
            CONSENT_LEDGER_CHAIN_BACKEND=chain.backend.name,
        )  # fmt: skip
    finally:
        start_again(chain)
        shutil.rmtree(service_dir, ignore_errors=True)  # the link, the service's database and secrets
    return {
        "api_changes": figures["requests"],
        "api_rejected": figures["rejected"],
        "api_accepted_per_s": figures["accepted_per_s"],
        "api_confirmed_per_s": figures["confirmed_per_s"],
        "api_confirm_p50_s": figures["confirm_p50_s"],
        "api_confirm_p99_s": figures["confirm_p99_s"],
        "api_cpu_ms_per_change": figures["cpu_ms_total"],
    }


def measure(
    chain: Chain, size: int, grants: int, kill_batches: int, api: tuple[int, int], empty_blocks: int
) -> dict[str, Any]:
    pid = node_pid(chain.backend)
    figures: dict[str, Any] = {"node": chain.backend.name, "customers": size}
    figures.update(block_timing(chain))
    figures["empty_block_cpu_ms"] = round(empty_block_ms(chain, empty_blocks), 3)
    figures["empty_block_resolution_ms"] = round(1000 / os.sysconf("SC_CLK_TCK") / empty_blocks, 3)
    figures.update(grants_run(chain, grants))
    figures.update(access_record(chain))
    pid = node_pid(chain.backend)
    figures["node_rss_mb"] = round(rss_mb(pid), 1)
    figures["disk_mb"] = round(disk_mb(chain.state_dir), 1)
    figures.update(api_run(chain, size, *api))
    figures["restart_s"] = round(restart(chain), 2)
    figures.update(sigkill(chain, kill_batches * max_changes_per_batch(500)))
    print(json.dumps(figures), flush=True)
    return figures


def grow(chain: Chain, size: int, per_customer: int, real: int) -> None:
    """Bring the chain to `size` customers: real ones first (up to `real`), filler slots beyond."""
    if chain.customers < real:
        count = min(real, size) - chain.customers
        if count > 0:
            grants_run(chain, count)
    missing = size - chain.customers - chain.slots_filled // per_customer
    if missing > 0:
        took = fill(chain, missing * per_customer)
        print(f"  {chain.backend.name}: filled {missing:,} customers' slots in {took:.1f} s", flush=True)


def chain_length(chain: Chain, blocks: int) -> dict[str, Any]:
    """geth's CPU per empty block over the first and the last thousand of `blocks` mined back to back, and
    over a thousand at every tenth of the way (printed as it goes: a run stopped early still shows how the
    cost grew)."""
    pid = node_pid(chain.backend)
    window = min(1000, blocks // 2)
    marks = {blocks * k // 10 for k in range(1, 10)} - {0}
    curve: list[tuple[int, float]] = []

    def measured(at: int) -> float:
        before = cpu_seconds(pid)
        for _ in range(window):
            mine_empty(chain)
        ms = (cpu_seconds(pid) - before) / window * 1000
        curve.append((at, round(ms, 3)))
        took = time.perf_counter() - started
        print(f"  after {at:,} blocks: {ms:.3f} ms CPU per empty block, {took:.0f} s", flush=True)
        return ms

    started = time.perf_counter()
    with chain.backend.node.mining_paused():
        first = measured(0)
        made = window
        while made < blocks - window:
            if made in marks and made + window <= blocks - window:
                measured(made)
                made += window
                continue
            mine_empty(chain)
            made += 1
        last = measured(made)
    return {
        "blocks": blocks,
        "first_empty_block_cpu_ms": round(first, 3),
        "last_empty_block_cpu_ms": round(last, 3),
        "ratio": round(last / first, 2),
        "curve": curve,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="customer counts, comma-separated")
    parser.add_argument("--baseline-sizes", default="10000,100000", help="sizes anvil (the baseline) runs at")
    parser.add_argument("--real", type=int, default=10_000, help="customers built through the project's paths")
    parser.add_argument("--grants", type=int, default=5_000, help="grants timed at each size")
    parser.add_argument("--kill-batches", type=int, default=8, help="batches mined before the SIGKILL")
    parser.add_argument("--api-changes", type=int, default=5_000, help="changes posted through the API at each size")
    parser.add_argument("--api-customers", type=int, default=100, help="customers posting them")
    parser.add_argument("--blocks", type=int, default=1_000_000, help="chain length for geth's empty-block cost")
    parser.add_argument(
        "--empty-blocks",
        type=int,
        default=300,
        help="empty blocks whose CPU is measured at each size (geth: as many seconds of waiting after)",
    )
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.empty_blocks = 10
        args.sizes, args.baseline_sizes, args.real, args.grants, args.kill_batches, args.blocks = (
            "10000",
            "10000",
            2_000,
            2_000,
            2,
            2_000,
        )
        args.api_changes, args.api_customers = 400, 20
    sizes = [int(s) for s in args.sizes.split(",")]
    baseline_sizes = [int(s) for s in args.baseline_sizes.split(",") if s]
    results: dict[str, Any] = {"sizes": sizes, "real_customers": args.real, "max_tx_data_bytes": MAX_TX_DATA_BYTES}
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        for kind, kind_sizes in (("geth", sizes), ("anvil", baseline_sizes)):
            if not kind_sizes:
                continue
            chain = start_chain(kind, root / kind)
            try:
                per_customer = results.setdefault("slots_per_customer", slots_per_customer(chain))
                print(f"{kind}: {per_customer} storage slots per customer", flush=True)
                for size in kind_sizes:
                    grow(chain, size, per_customer, args.real)
                    api = (args.api_changes, args.api_customers)
                    chain.figures.append(measure(chain, size, args.grants, args.kill_batches, api, args.empty_blocks))
                if kind == "geth":
                    results["geth_chain_length"] = chain_length(chain, args.blocks)
                    print(json.dumps(results["geth_chain_length"]), flush=True)
            finally:
                chain.backend.stop()
            results[kind] = chain.figures
            shutil.rmtree(root / kind, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    geth = results["geth"]
    results["geth_growth"] = {
        "empty_block_cpu": round(geth[-1]["empty_block_cpu_ms"] / geth[0]["empty_block_cpu_ms"], 2),
        "grants_per_s": round(geth[0]["grants_per_s"] / geth[-1]["grants_per_s"], 2),
        "api_confirmed_per_s": round(geth[0]["api_confirmed_per_s"] / geth[-1]["api_confirmed_per_s"], 2),
        "between": [sizes[0], sizes[-1]],
    }
    if results.get("anvil"):
        anvil = results["anvil"]
        same = [a for a in anvil if a["customers"] == sizes[0]]
        if same:
            results["geth_vs_anvil_at_first_size"] = {
                "empty_block_cpu": round(geth[0]["empty_block_cpu_ms"] / same[0]["empty_block_cpu_ms"], 3),
                "grants_per_s": round(geth[0]["grants_per_s"] / same[0]["grants_per_s"], 2),
                "api_confirmed_per_s": round(geth[0]["api_confirmed_per_s"] / same[0]["api_confirmed_per_s"], 2),
            }
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
