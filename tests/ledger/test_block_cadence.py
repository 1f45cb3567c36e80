"""The relayer's cadence (ledger.lanes.BlockCadence) with a loaded machine's timings: a miner thread
announcing blocks and a relayer thread that is slow to send, or slow to wake. Whatever the timing,
one block gets one batch: that is what keeps one transaction per block under load."""

from __future__ import annotations

import threading
import time

from ledger.lanes import BlockCadence


def _relayer(cadence: BlockCadence, stop: threading.Event, sends: list[int], *, send_time: float) -> None:
    """A relayer as `run_lanes` drives one: take, send (taking `send_time`), say so, wait for a signal."""
    while not stop.is_set():
        due, _ = cadence.take()
        if due is not None:
            time.sleep(send_time)
            sends.append(due)
            cadence.sent(due)
        cadence.signal.wait(0.5)


def test_a_relayer_that_started_is_waited_for_beyond_the_start_timeout() -> None:
    """Sending takes three times the start timeout (a loaded machine): the block waits for the batch instead of
    being made without it (the batch would then share the next block with the next batch)."""
    cadence = BlockCadence(timeout=0.05, patience=1.0)
    stop, sends = threading.Event(), list[int]()
    relayer = threading.Thread(target=_relayer, args=(cadence, stop, sends), kwargs={"send_time": 0.15})
    relayer.start()
    try:
        for block in range(1, 4):
            started = time.monotonic()
            cadence.before_block()
            assert sends[-1:] == [block], "the block was made before its batch was sent"
            assert time.monotonic() - started >= 0.15
    finally:
        stop.set()
        cadence.signal.set()
        relayer.join()


def test_a_relayer_waking_after_the_miner_gave_up_sends_with_the_next_block() -> None:
    """The relayer wakes only after the miner stopped waiting for block 1: a batch sent now would land
    in block 2 beside block 2's own batch, so it sends nothing for block 1 and everything for block 2."""
    cadence = BlockCadence(timeout=0.05, patience=1.0)
    cadence.before_block()  # nobody takes it within the timeout: block 1 is made without a batch
    assert cadence.take() == (None, False)  # woken late: nothing is sent for block 1

    stop, sends = threading.Event(), list[int]()
    relayer = threading.Thread(target=_relayer, args=(cadence, stop, sends), kwargs={"send_time": 0.0})
    relayer.start()
    try:
        cadence.before_block()  # block 2: taken and sent at once
    finally:
        stop.set()
        cadence.signal.set()
        relayer.join()
    assert sends == [2]


def test_a_relayer_that_is_always_late_still_sends() -> None:
    """It passes over one missed block, never two in a row: a relayer always busy past the timeout
    still gets its batches out, one block late."""
    cadence = BlockCadence(timeout=0.01, patience=0.1)
    taken = []
    for _ in range(6):
        cadence.before_block()  # times out: nobody is listening yet
        due, _ = cadence.take()
        taken.append(due)
        if due is not None:
            cadence.sent(due)
    assert taken == [None, 2, None, 4, None, 6]


def test_a_relayer_gone_holds_a_block_up_by_the_start_timeout_only() -> None:
    cadence = BlockCadence(timeout=0.05, patience=5.0)
    started = time.monotonic()
    cadence.before_block()
    assert time.monotonic() - started < 1.0  # not `patience`: the relayer never started
