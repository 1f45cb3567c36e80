"""The managed anvil process: clear errors when it cannot start, interval mining, clean stops."""

from __future__ import annotations

import itertools
import socket
import time
from pathlib import Path

import pytest

from ledger.anvil import CHECKPOINT_SHARE, AnvilNode, find_anvil
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


def test_checkpoints_take_a_bounded_share_of_the_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A growing state makes each dump slower; checkpoints must not come to fill the time (mining
    is paused while one is written), whatever `state_interval` asks."""
    anvil = node(tmp_path, state_interval=1)
    assert anvil.checkpoint_pause(0.01) == 1.0  # a quick dump: the configured interval
    assert anvil.checkpoint_pause(2.0) == 2.0 * CHECKPOINT_SHARE  # a slow one: that many times its duration
    spans: list[tuple[float, float]] = []

    def slow_checkpoint() -> None:  # stands in for a large dump: 0.1 s with mining paused
        started = time.monotonic()
        with anvil.mining_paused():
            time.sleep(0.1)
        spans.append((started, time.monotonic()))

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


def test_block_hooks_run_just_before_and_after_each_block(tmp_path: Path) -> None:
    """The relayer's batches are sent from `before_block` (ledger.relayer.BlockCadence): what it sends
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
