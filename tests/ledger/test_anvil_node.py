"""The managed anvil process: clear errors when it cannot start, interval mining, clean stops."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from ledger import anvil_dump
from ledger.anvil import CAPTURE_HOLD, CHECKPOINT_SHARE, AnvilNode, Checkpoints, NotDurable, find_anvil, free_port
from ledger.anvil_dump import NICENESS, dump_problem
from ledger.errors import NodeStartError
from ledger.settings import PROJECT_ROOT

pytestmark = pytest.mark.anvil


def node(tmp_path: Path, **overrides: object) -> AnvilNode:
    options: dict[str, object] = {
        "chain_id": 31337,
        "block_time": 0.1,
        "gas_limit": 10**9,
        "start_timeout": 10,
    }
    options.update(overrides)
    return AnvilNode(find_anvil(PROJECT_ROOT / "node_modules"), tmp_path, **options)  # type: ignore[arg-type]


def test_a_missing_binary_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(NodeStartError, match=r"anvil is not installed.*make setup"):
        find_anvil(tmp_path / "node_modules")


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        anvil = node(tmp_path, port=port)
        with pytest.raises(NodeStartError, match="anvil did not start") as failed:
            anvil.start()
    assert str(anvil.log_file) in str(failed.value)
    assert "Address already in use" in str(failed.value)  # anvil's own words, even with --quiet
    assert not anvil.running


def test_it_never_automines_and_stops_cleanly(tmp_path: Path) -> None:
    anvil = node(tmp_path)
    command = anvil._command()
    assert "--no-mining" in command  # anvil's automine is off; blocks come at our interval instead
    assert "--block-time" not in command
    anvil.start()
    try:
        assert anvil.running
        first = int(str(anvil._call("eth_blockNumber", [])), 16)
        time.sleep(1.0)
        mined = int(str(anvil._call("eth_blockNumber", [])), 16) - first
        assert 5 <= mined <= 12  # one block per 0.1 s, with no transactions at all
        anvil.checkpoint()
        assert '"blocks"' in anvil.state_file.read_text()[:10_000_000]
    finally:
        anvil.stop()
    assert not anvil.running
    assert anvil.state_file.is_file()  # written on the graceful stop


def test_only_the_service_writes_the_state_file_and_a_graceful_stop_writes_the_last_block(tmp_path: Path) -> None:
    """anvil never writes the state file itself (with `--state` it rewrote it in place every 60 s and
    on exit, stalling every RPC answer meanwhile); a graceful stop takes a last checkpoint holding
    the node's head, and the next start loads it: the same chain, block for block."""
    anvil = node(tmp_path, state_interval=3600)  # no periodic checkpoint within this test
    first = anvil._command()
    assert not {"--state", "--dump-state", "--state-interval"} & set(first)
    assert "--load-state" not in first  # nothing to load yet
    anvil.start()
    try:
        _send(anvil)
        time.sleep(0.5)
        anvil._stop_workers_now()  # no more blocks: the head is the last block there will be
        head = int(str(anvil._call("eth_blockNumber", [])), 16)
        hashes = [
            cast(dict[str, Any], anvil._call("eth_getBlockByNumber", [hex(n), False]))["hash"] for n in range(head + 1)
        ]
        assert Checkpoints(tmp_path).durable_block() < head
    finally:
        anvil.stop()
    state = json.loads(anvil.state_file.read_bytes())
    assert state["best_block_number"] == head
    assert len(state["transactions"]) == 1
    assert Checkpoints(tmp_path).durable_block() == head
    assert not anvil.state_file.with_suffix(".tmp").exists()
    again = node(tmp_path, state_interval=3600)
    assert again._command()[-2:] == ["--load-state", str(anvil.state_file)]
    again.start()
    try:
        assert [
            cast(dict[str, Any], again._call("eth_getBlockByNumber", [hex(n), False]))["hash"] for n in range(head + 1)
        ] == hashes
        time.sleep(0.3)  # blocks of the new life
        again.checkpoint()  # refused after every restart before dumps were read by block number
        assert Checkpoints(tmp_path).durable_block() > head
    finally:
        again.stop()


def test_checkpoints_go_on_after_the_node_restarts_from_one(tmp_path: Path) -> None:
    """A node started from a dump holds the genesis block it made itself beside the loaded one (one
    more block 0 with every restart); every checkpoint after a restart used to be refused for it."""
    anvil = node(tmp_path, state_interval=3600)
    anvil.start()
    try:
        time.sleep(0.3)
        anvil.checkpoint()
        time.sleep(1.1)  # the next genesis in another second (a different block 0 for certain)
        anvil.kill()
        anvil.start()
        time.sleep(0.3)
        dumped = json.loads(_dumped(anvil, tmp_path / "after_restart.json"))
        genesis = [b for b in dumped["blocks"] if b["header"]["number"] == "0x0"]
        assert len(genesis) == 2
        head = int(str(anvil._call("eth_blockNumber", [])), 16)
        anvil.checkpoint()
        assert Checkpoints(tmp_path).durable_block() >= head
    finally:
        anvil.stop()
    assert Checkpoints(tmp_path).durable_block() >= head


def test_the_node_keeps_answering_while_it_encodes_a_large_dump(tmp_path: Path) -> None:
    """anvil encodes a dump in one of its async tasks; unless a call on its blocking pool wakes a
    parked runtime thread meanwhile (`anvil_dump.WAKE_CODE`), no RPC was answered until the dump was
    done (every dump of a large chain in a probe)."""
    anvil = node(tmp_path, block_time=3600)
    anvil.start()
    try:
        for _ in range(20):  # 40 MB of incompressible calldata, twice in the dump (input and trace)
            for _ in range(20):
                _send(anvil, "0x" + os.urandom(100_000).hex())  # anvil takes transactions up to 128 kB
            anvil._call("evm_mine", [])
        anvil._stop_workers_now()

        def probe(waits: list[float], done: threading.Event) -> None:
            while not done.is_set():
                started = time.monotonic()
                anvil._call("eth_blockNumber", [])  # a new connection each time, as the miner's
                waits.append(time.monotonic() - started)
                time.sleep(0.005)

        for attempt in range(3):
            waits: list[float] = []
            done = threading.Event()
            prober = threading.Thread(target=probe, args=(waits, done))
            prober.start()
            # Connected a while before the request: a stall then came with every dump without the call
            # (a connection made with the request often got another thread woken as it was accepted).
            connection = http.client.HTTPConnection("127.0.0.1", anvil.port, timeout=60)
            connection.connect()
            time.sleep(0.05)
            started = time.monotonic()
            path = str(tmp_path / f"dump{attempt}.json")
            outcome = anvil_dump.dump(anvil.url, path, lambda: None, connection=connection)
            took = time.monotonic() - started
            done.set()
            prober.join()
            assert outcome["problem"] is None
            assert outcome["bytes"] > 150_000_000
            assert took > 0.5  # long enough for a stall to show
            assert max(waits) < min(1.0, took / 3), (attempt, took, max(waits))  # stalls lasted the whole dump
    finally:
        anvil.stop()


def test_a_node_is_adopted_only_by_a_service_of_its_own_state_dir(tmp_path: Path) -> None:
    """A killed service leaves its node running for the next start; the node is known by the state
    file in its environment, so a pid file copied to another data dir does not hand it over."""
    anvil = node(tmp_path / "a", state_interval=3600)
    anvil.start()
    try:
        found = anvil.running_node()
        assert found is not None
        assert found[0] == cast(Any, anvil._process).pid
        assert _found_from_another_dir(anvil, tmp_path / "b") is None
    finally:
        anvil.stop()
    assert anvil.running_node() is None  # stopped: nothing to adopt


def test_a_node_an_earlier_version_left_running_is_still_adopted(tmp_path: Path) -> None:
    """Before the environment marker, the node had its state file in its command line (`--state`)."""
    anvil = node(tmp_path)
    port = free_port()
    legacy = subprocess.Popen(
        [str(anvil.binary), "--port", str(port), "--quiet", "--state", str(anvil.state_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        anvil.pid_file.write_text(f"{legacy.pid} {port}")
        deadline = time.monotonic() + 10
        while anvil.running_node() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until the child has become anvil (its command line is ours until then)
        assert anvil.running_node() == (legacy.pid, port)
        assert _found_from_another_dir(anvil, tmp_path / "other") is None
    finally:
        legacy.kill()
        legacy.wait()


def _found_from_another_dir(anvil: AnvilNode, state_dir: Path) -> tuple[int, int] | None:
    """What a service of another data dir finds, given a copy of `anvil`'s pid file."""
    other = node(state_dir)
    other.state_dir.mkdir()
    other.pid_file.write_bytes(anvil.pid_file.read_bytes())
    return other.running_node()


def test_checkpoints_take_a_bounded_share_of_the_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A growing state makes each dump slower (seconds of the node's and the supervisor's CPU);
    checkpoints must not come to fill the time, whatever `state_interval` asks."""
    anvil = node(tmp_path, state_interval=1)
    assert anvil.checkpoint_pause(0.01) == 1.0  # a quick dump: the configured interval
    assert anvil.checkpoint_pause(2.0) == 2.0 * CHECKPOINT_SHARE  # a slow one: that many times its duration
    spans: list[tuple[float, float]] = []

    def slow_checkpoint() -> float:  # stands in for a large dump: 0.1 s of work
        started = time.monotonic()
        time.sleep(0.1)
        spans.append((started, time.monotonic()))
        return 0.0

    monkeypatch.setattr(anvil, "checkpoint", slow_checkpoint)
    monkeypatch.setattr("ledger.anvil.CHECKPOINT_SHARE", 4)  # at most a fifth of the time
    anvil.state_interval = 0.05  # type: ignore[assignment]  # asks for far more: 2/3 of the time
    anvil.start()
    try:
        time.sleep(2.5)
    finally:
        anvil.stop()
    assert len(spans) >= 3
    busy = sum(end - start for start, end in spans[:-1])
    assert busy / (spans[-1][0] - spans[0][0]) <= 0.25


def test_a_block_someone_waits_for_is_checkpointed_soon_and_survives_a_crash(tmp_path: Path) -> None:
    """`Checkpoints.wait` (the bridge, before it releases data): from another process's view of the
    state dir, it asks for a checkpoint, which comes at once rather than at the next interval."""
    anvil = node(tmp_path, state_interval=3600)  # no periodic checkpoint within this test
    checkpoints = Checkpoints(tmp_path)

    def block(number: int) -> str:
        return str(cast(dict[str, Any], anvil._call("eth_getBlockByNumber", [hex(number), False]))["hash"])

    anvil.start()
    try:
        assert checkpoints.durable_block() == 0  # a new node: the genesis block only
        time.sleep(0.5)
        head = int(str(anvil._call("eth_blockNumber", [])), 16)
        mined = block(head)
        assert head > 0
        assert checkpoints.durable_block() == 0
        started = time.monotonic()
        checkpoints.wait(head, timeout=10)
        assert time.monotonic() - started < 3
        assert checkpoints.durable_block() >= head
        checkpoints.wait(head, timeout=0)  # held already: no wait
        anvil.kill()  # a crash: the node comes back with the checkpoint's chain
        anvil.start()
        assert block(head) == mined
        assert checkpoints.durable_block() >= head
        anvil._stop_workers_now()  # no checkpoints at all now
        with pytest.raises(NotDurable, match=f"block {head + 10**6}"):
            checkpoints.wait(head + 10**6, timeout=0.3)
    finally:
        anvil.stop()


def test_block_hooks_run_just_before_and_after_each_block(tmp_path: Path) -> None:
    """The relayer's batches are sent from `before_block` (ledger.lanes.BlockCadence): what it sends
    must be in the block mined right after it, and `after_block` must see that block."""
    anvil = node(tmp_path)
    calls: list[tuple[str, int]] = []

    def height() -> int:
        return int(str(anvil._call("eth_blockNumber", [])), 16)

    starts: list[float] = []

    def before() -> None:
        starts.append(time.monotonic())
        calls.append(("before", height()))
        time.sleep(0.05)  # a relayer sending its batches: half the interval
        if len(calls) == 3:
            raise RuntimeError("a listener that fails")  # logged; blocks keep coming

    anvil.before_block = before
    anvil.after_block = lambda: calls.append(("after", height()))
    anvil.start()
    try:
        time.sleep(1.0)
    finally:
        anvil.stop()
    pairs = [(calls[i], calls[i + 1]) for i in range(0, len(calls) - 1, 2)]
    assert len(pairs) >= 5  # the failing listener stopped nothing
    for (first, at), (then, after) in pairs:
        assert (first, then) == ("before", "after")
        assert after == at + 1  # exactly one block between them
    gaps = sorted(b - a for a, b in itertools.pairwise(starts))
    assert gaps[len(gaps) // 2] < 0.125  # blocks keep their rate (0.1 s), the hook's time is not added


def test_after_a_checkpoint_pause_blocks_resume_at_their_interval(tmp_path: Path) -> None:
    """Mining pauses while a checkpoint is written; the blocks missed meanwhile are not made up in a
    burst afterwards (each would carry the relayer's round trip for nothing)."""
    anvil = node(tmp_path)  # a block every 0.1 s
    starts: list[float] = []
    anvil.before_block = lambda: starts.append(time.monotonic())
    anvil.start()
    try:
        time.sleep(0.35)
        with anvil.mining_paused():
            time.sleep(0.5)
            resumed = time.monotonic()
        time.sleep(0.45)
    finally:
        anvil.stop()
    after = [t for t in starts if t >= resumed]
    assert len(after) >= 3
    assert min(b - a for a, b in itertools.pairwise(after)) > 0.07


# checkpoints beside mining -------------------------------------------------------------------------


def _send(anvil: AnvilNode, data: str = "0x", to: str = "0x000000000000000000000000000000000000dEaD") -> None:
    sender = cast(list[str], anvil._call("eth_accounts", []))[0]
    anvil._call(
        "eth_sendTransaction", [{"from": sender, "to": to, "data": data, "gas": hex(5_000_000), "gasPrice": "0x0"}]
    )


def _nonce_at(anvil: AnvilNode) -> Callable[[str, int], int]:
    """What `dump_problem` asks the node: an account's nonce at a block."""
    return lambda address, block: int(str(anvil._call("eth_getTransactionCount", [address, hex(block)])), 16)


def _dumped(anvil: AnvilNode, path: Path) -> bytes:
    outcome, _ = anvil._dump(path, None)
    assert outcome["problem"] is None
    return path.read_bytes()


def _splice(prefix: bytes, chain: bytes, transactions: bytes | None = None) -> bytes:
    """A dump made of the env, accounts and head of `prefix`, the blocks of `chain` and the
    transactions of `transactions` (default `chain`), written as anvil writes it."""
    first, second = json.loads(prefix), json.loads(chain)
    third = json.loads(transactions) if transactions is not None else second
    spliced = {
        "block": first["block"],
        "accounts": first["accounts"],
        "best_block_number": first["best_block_number"],
        "blocks": second["blocks"],
        "transactions": third["transactions"],
        "historical_states": None,
    }
    return json.dumps(spliced, separators=(",", ":")).encode()


def test_a_dump_copied_across_a_block_is_found_out(tmp_path: Path) -> None:
    """anvil copies the chain for a dump in steps (env, head, blocks, transactions, accounts); a block
    mined between two of them must be caught whichever steps it fell between."""
    anvil = node(tmp_path, block_time=3600)  # blocks only when this test mines them
    anvil.start()
    try:
        _send(anvil)
        anvil._call("evm_mine", [])
        before = _dumped(anvil, tmp_path / "before.json")
        _send(anvil)
        anvil._call("evm_mine", [])
        after_tx = _dumped(anvil, tmp_path / "after_tx.json")
        anvil._call("evm_mine", [])  # an empty block: no state changes, no transaction
        after_empty = _dumped(anvil, tmp_path / "after_empty.json")
        nonce_at = _nonce_at(anvil)
        for dump in (before, after_tx, after_empty, _splice(before, before)):
            assert dump_problem(dump, nonce_at) is None  # whole dumps, and the splice itself, are fine
        head = json.loads(before)["best_block_number"]
        ahead = json.loads(after_tx)
        # the accounts were copied after the next block (env and head before it)
        accounts_late = json.loads(before)
        accounts_late["accounts"] = ahead["accounts"]
        problem = dump_problem(json.dumps(accounts_late, separators=(",", ":")).encode(), nonce_at)
        assert problem is not None
        assert "nonce" in problem
        # the env was copied before a block the head already counts
        env_early = json.loads(after_tx)
        env_early["block"] = json.loads(before)["block"]
        assert "block env" in str(dump_problem(json.dumps(env_early, separators=(",", ":")).encode(), nonce_at))
        # blocks (with a transaction, or empty) or transactions copied after the head
        assert f"past head {head}" in str(dump_problem(_splice(before, after_tx, before), nonce_at))
        assert "past head" in str(dump_problem(_splice(after_tx, after_empty), nonce_at))
        # a second genesis block (what a node started from a dump holds) is no problem; a gap is
        two_geneses = json.loads(before)
        first = next(b for b in two_geneses["blocks"] if b["header"]["number"] == "0x0")  # the list is unordered
        genesis = dict(first, header=dict(first["header"], timestamp="0x1"))
        two_geneses["blocks"].append(genesis)
        assert dump_problem(json.dumps(two_geneses, separators=(",", ":")).encode(), nonce_at) is None
        gap = json.loads(before)
        gap["blocks"] = [b for b in gap["blocks"] if int(b["header"]["number"], 16) != head]
        gap["blocks"].append(genesis)  # as many blocks as before, one number short
        assert f"1 of the blocks up to head {head} missing" == dump_problem(
            json.dumps(gap, separators=(",", ":")).encode(), nonce_at
        )
        assert "transactions" in str(dump_problem(_splice(before, before, after_tx), nonce_at))
        assert f"head {head}" in str(dump_problem(_splice(before, before, after_tx), nonce_at))
        assert "unreadable" in str(dump_problem(b'{"block":{}}', nonce_at))
    finally:
        anvil.stop()


def test_checkpoints_do_not_stop_mining_while_the_dump_is_written(tmp_path: Path) -> None:
    """Mining pauses only while the node copies the chain, not while it encodes and compresses it
    (nearly all of a dump's time, which grows with the chain); the file is a consistent moment."""
    anvil = node(tmp_path, block_time=3600)
    anvil.start()
    try:
        for _ in range(8):  # ~13 MB of incompressible history: a dump of several blocks' time
            for _ in range(10):
                _send(anvil, "0x" + os.urandom(60_000).hex())
            anvil._call("evm_mine", [])
        anvil.block_time = 0.05
        anvil._stop_workers_now()
        anvil._start_workers()
        took = time.monotonic()
        first = int(str(anvil._call("eth_blockNumber", [])), 16)
        paused = anvil.checkpoint()
        mined = int(str(anvil._call("eth_blockNumber", [])), 16) - first
        took = time.monotonic() - took
        data = anvil.state_file.read_bytes()
        assert dump_problem(data, _nonce_at(anvil)) is None  # one moment of the chain (its head, now past)
        state = json.loads(data)
        assert len(state["transactions"]) == 80
        assert len(state["blocks"]) == state["best_block_number"] + 1
    finally:
        anvil.stop()
    assert took > 0.25  # a dump of several block intervals ...
    assert paused < CAPTURE_HOLD + 0.05  # ... with mining paused only while the node copied the chain
    assert mined >= 3  # blocks kept coming meanwhile


def test_a_checkpoint_that_raced_a_block_is_taken_again_holding_mining_longer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy node may start copying late, and a block gets into the copy: the dump is taken again with
    a longer hold, then with mining paused throughout; later checkpoints start from the longer hold
    and ease back."""
    anvil = node(tmp_path, block_time=3600)
    holds: list[float | None] = []
    dump = anvil._dump
    races = 2

    def racing(path: Path, hold: float | None) -> tuple[dict[str, Any], float]:
        outcome, paused = dump(path, hold)
        if len(holds) < races:
            outcome["problem"] = "a block in the copy"  # as if one had been mined into it
        holds.append(hold)
        return outcome, paused

    monkeypatch.setattr(anvil, "_dump", racing)
    anvil.start()
    try:
        anvil.checkpoint()
        assert holds == [CAPTURE_HOLD, 4 * CAPTURE_HOLD, None]
        assert anvil._capture_hold == 4 * CAPTURE_HOLD  # doubled after each race
        _send(anvil)
        anvil._call("evm_mine", [])
        anvil.checkpoint()
        assert holds[3:] == [4 * CAPTURE_HOLD]  # no race: kept, and eased for the next one
        assert anvil._capture_hold == pytest.approx(0.8 * 4 * CAPTURE_HOLD)
    finally:
        anvil.stop()
    assert len(json.loads(anvil.state_file.read_bytes())["transactions"]) == 1


def test_checkpoints_are_written_by_one_low_priority_process_that_outlives_a_failed_dump(tmp_path: Path) -> None:
    anvil = node(tmp_path, block_time=3600)
    anvil.start()
    try:
        anvil.checkpoint()
        dumper = anvil._dumper
        assert dumper is not None
        assert os.getpriority(os.PRIO_PROCESS, dumper.pid) == os.getpriority(os.PRIO_PROCESS, 0) + NICENESS
        port, anvil.port = anvil.port, free_port()  # a node that does not answer
        with pytest.raises(OSError, match="anvil_dumpState: ConnectionRefusedError"):
            anvil.checkpoint()
        anvil.port = port
        _send(anvil)
        anvil._call("evm_mine", [])
        anvil.checkpoint()
        assert anvil._dumper is dumper  # the same process: no interpreter start per checkpoint
        assert len(json.loads(anvil.state_file.read_bytes())["transactions"]) == 1
    finally:
        anvil.stop()
    assert dumper.poll() is not None  # stopped with the node


def test_a_free_port_is_one_no_outgoing_connection_can_take_meanwhile() -> None:
    """A port picked for a server is bound a moment later; in between, an outgoing connection's local
    port (from the kernel's range) must not be able to take it (a service's start failed so in CI)."""
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {free_port() for _ in range(300)}
    assert not [port for port in ports if low <= port <= high]
    assert len(ports) > 250  # and spread, so that servers started together do not pick the same one
