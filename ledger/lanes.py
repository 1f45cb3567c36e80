"""The relayer's machinery that every lane shares: a `Lane` (one kind of work for the operator key),
`run_lanes` (every lane in turn, in one thread, so the operator's local nonce has one writer),
`BlockCadence` (batches sent just before the block that mines them), and `BatchLane` (signed batch
transactions in flight, polled for receipts, given up on when the node no longer knows them).

The lanes themselves are the pipelines' own: `ledger.consent.lane.Relayer` and
`ledger.points.lane.PointsRelayer`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol

from ledger.errors import ChainError
from ledger.store import utcnow
from ledger.tx import Receipt, TxRequest, TxSender

log = logging.getLogger(__name__)


class Lane(Protocol):
    """One kind of work for the operator key: consent changes, or points."""

    @property
    def busy(self) -> bool: ...

    def step(self, *, send: bool = True, poll: bool = True) -> int: ...


class BlockCadence:
    """Batches sent just before the block that mines them, when the service mines its own blocks.

    With interval mining, every transaction sent between two blocks lands in the second one: sending a
    batch each time requests arrive (every few milliseconds under load) gives several small
    transactions per block, each with its own write transaction to claim it, signature, RPC calls,
    receipt and settlement. Instead the miner calls `before_block` just before each block: the relayer
    sends everything pending (one transaction per lane, or several of `max_batch`) and says so, and
    the miner mines. No request waits longer for its block than before. `after_block` tells the
    relayer that receipts are there to collect.

    The miner waits at most `timeout` for the relayer to start (busy or gone: the block is not held
    up further). A relayer that started is waited for up to `patience`, so that a send slowed down by
    a loaded machine still makes this block rather than sharing the next with the next batch. A
    relayer that wakes after the miner gave up on a block sends nothing for it: whatever it sent now
    could only land in the next block, which it sends for anyway (once: it does not skip two in a
    row, so a relayer that is always late still sends). Either way a block holds one batch per lane.
    """

    def __init__(self, *, timeout: float = 0.05, patience: float = 0.5, fallback: float = 0.25) -> None:
        self.timeout = timeout
        self.patience = patience
        self.fallback = fallback  # the relayer polls at least this often without a signal
        self.signal = threading.Event()  # the relayer's wake-up: a block is due, or was mined
        self._state = threading.Condition()
        self._due = 0  # blocks announced by the miner
        self._taken = 0  # the last of them the relayer has started on
        self._served = 0  # the last of them the relayer has sent for
        self._missed = 0  # the last of them the miner made without waiting any longer
        self._skipped = False  # the relayer's last `take` passed over a missed block
        self._mined = False

    # the miner's side
    def before_block(self) -> None:
        with self._state:
            self._due += 1
            due = self._due
            self.signal.set()
            # Numbered, so that a relayer still busy with an earlier block does not release this one.
            if not self._state.wait_for(lambda: self._taken >= due, self.timeout):
                self._missed = due
            else:
                self._state.wait_for(lambda: self._served >= due, self.patience)

    def after_block(self) -> None:
        with self._state:
            self._mined = True
        self.signal.set()

    # the relayer's side
    def take(self) -> tuple[int | None, bool]:
        """(the block due to be sent for, or None; whether a block was mined since the last call)."""
        self.signal.clear()
        with self._state:
            due = self._due if self._due > self._served else None
            if due is not None and due <= self._missed and not self._skipped:
                self._served = due  # made without us: what is pending goes with the next block's batch
                due, self._skipped = None, True
            elif due is not None:
                self._taken, self._skipped = due, False
                self._state.notify_all()
            mined, self._mined = self._mined, False
        return due, mined

    def sent(self, due: int) -> None:
        with self._state:
            self._served = max(self._served, due)
            self._state.notify_all()


def run_lanes(
    lanes: Sequence[Lane],
    wake: threading.Event,
    stop: threading.Event,
    *,
    idle: float = 0.02,
    linger: float = 0.005,
    cadence: BlockCadence | None = None,
    may_run: Callable[[], bool] | None = None,
) -> None:
    """The relayer thread: every lane in turn, in one thread, so the operator's local nonce has one
    writer. With a `cadence`, lanes send only when a block is due and poll receipts when one was
    mined (or every `cadence.fallback` seconds). Without one (a node that mines on its own), idle it
    sleeps until a request arrives (`wake`) and then `linger`s so that requests arriving together
    share a batch (group commit). `may_run`: asked before each round, which is skipped while it says
    no (an instance unsure that it still leads: `ledger.leader.Leadership.fresh`)."""
    next_poll = 0.0
    while not stop.is_set():
        if may_run is not None and not may_run():
            stop.wait(0.1)
            continue
        send = poll = True
        due: int | None = None
        if cadence is not None:
            due, mined = cadence.take()
            send = due is not None
            now = time.monotonic()
            poll = mined or now >= next_poll
            if poll:
                next_poll = now + cadence.fallback
        moved = 0
        for lane in lanes:
            try:
                moved += lane.step(send=send, poll=poll)
            except Exception:  # the node or the database may be away for a while; the relayer must not die
                log.exception("relayer step failed (%s); retrying", type(lane).__name__)
                stop.wait(0.5)
        if cadence is not None:
            if due is not None:
                cadence.sent(due)
            cadence.signal.wait(max(0.0, next_poll - time.monotonic()))
        elif moved == 0:
            if wake.wait(idle if any(lane.busy for lane in lanes) else 0.25):
                time.sleep(linger)
            wake.clear()


# Whether a request rejected with (error, subject, partner) is to be queued again rather than failed:
# the chain lost a precondition the service made and is putting back (see `ledger.consent.bindings`).
Holds = Callable[[str, bytes, "str | None"], bool]


class BatchLane(ABC):
    """What every relay lane shares: signed batch transactions in flight (batch id -> tx hash), polled
    for receipts, and given up on when the node no longer knows them. A lane says how to pick and
    record a batch (`_send_next`, using `_submit`), settle it from its receipt, drop it, and audit."""

    max_batch: int  # requests in one transaction at most (set by each lane)

    def __init__(
        self,
        sender: TxSender,
        *,
        linger: float,
        max_in_flight: int,
        lost_after: float,
        on_mined: Callable[[], None] | None,
        wake: threading.Event | None,
        holds: Holds | None = None,
    ) -> None:
        self.sender = sender
        self.holds = holds or (lambda error, subject, partner: False)
        self.linger = linger
        self.max_in_flight = max_in_flight
        self.lost_after = lost_after
        self.on_mined = on_mined
        self.wake = wake or threading.Event()
        self._in_flight: dict[int, str] = {}  # batch id -> tx hash
        self._checked_at: dict[int, float] = {}  # batch id -> when it was last known to the node
        self._next_audit = time.monotonic() + lost_after
        self._restarts = 0  # times the node was started again from older state (`node_restarted`)
        self._restarts_checked = 0  # ... of which a step has checked everything since
        self._restart_reconciled: Callable[[], bool] | None = None  # as given to `node_restarted`
        self._reconciled: Callable[[], bool] | None = None  # sends wait for this after a restart ...
        self._hold_until = 0.0  # ... but no longer than this (monotonic); both set by the relayer's thread

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    @abstractmethod
    def _send_next(self) -> int:
        """Send the next batch of pending requests; returns how many it holds (0: nothing sent)."""

    @abstractmethod
    def _settle(self, batch_id: int, receipt: Receipt) -> int:
        """Settle a mined batch (call `_forget` first); returns how many requests moved."""

    @abstractmethod
    def _drop(self, batch_id: int, reason: str) -> None:
        """Give a batch up (call `_forget` first) and queue its requests again."""

    @abstractmethod
    def audit(self, older_than: float | None = None) -> int:
        """Re-queue requests the chain has lost, among those last moved more than `older_than` seconds
        ago (default `lost_after`); returns how many."""

    def _moved_before(self, older_than: float | None) -> float:
        """The audit's cutoff (a timestamp): requests last moved before it are checked."""
        return utcnow().timestamp() - (self.lost_after if older_than is None else older_than)

    def node_restarted(self, reconciled: Callable[[], bool] | None = None) -> None:
        """The node was started again from its last saved state (from any thread): what it mined after
        that, and its pending transactions, are gone. The next step checks every batch in flight and
        audits every request at once, instead of those older than `lost_after`: a redemption answered
        just before the crash is applied again within a block or two of the restart, not ten seconds
        later (meanwhile a repeat of it named a transaction the chain no longer had).

        Until `reconciled()` is true (the indexer has compared the read model with the restarted
        node's chain, and queued again what the lost blocks held), nothing is sent, for at most
        `lost_after` seconds: so the lost requests go out again before anything newer, in their first
        order. A customer's later redemption sent first would take the points or the nonce the
        answered one needs, and that one would then fail.

        Called before the node answers again (`Runtime.supervise_node`): until a step has checked
        the restarted node, nothing signed is sent (its nonce may be one the lost blocks had used),
        and the `lost_after` wait counts from that check, not from here (a large state file takes a
        while to load)."""
        self._restart_reconciled = reconciled  # taken over by the relayer's thread at its next check
        self._restarts += 1  # one writer: the thread that restarts the node

    def step(self, *, send: bool = True, poll: bool = True) -> int:
        """Settle mined batches (`poll`) and send new ones (`send`); returns how many requests moved."""
        moved = 0
        restarts = self._restarts
        if restarts != self._restarts_checked:
            # The lost blocks took nonces with them: take the node's again, here, in the one thread that
            # signs (another thread's resync could land between our signing and our send).
            self.sender.resync_nonce()
            for batch_id in self._in_flight:
                self._checked_at[batch_id] = -math.inf  # checked by the next poll
            moved += self.audit(older_than=0.0)
            self._restarts_checked = restarts  # not before: a step that failed (node not up yet) tries again
            # The wait for the indexer counts from here, the node answering: loading a large state file
            # can take longer than `lost_after` itself.
            self._reconciled, self._hold_until = self._restart_reconciled, time.monotonic() + self.lost_after
        send = send and not self._holding()
        moved += self._poll() if poll else 0
        if time.monotonic() >= self._next_audit:
            moved += self.audit()
            self._next_audit = time.monotonic() + self.lost_after / 2
        while send and len(self._in_flight) < self.max_in_flight:
            sent = self._send_next()
            moved += sent
            if not self._more_after(sent):
                break
        return moved

    def _holding(self) -> bool:
        """Whether sends wait, after a restart of the node, for the service to reconcile with its chain."""
        reconciled = self._reconciled
        if reconciled is None:
            return False
        if not reconciled():
            if time.monotonic() < self._hold_until:
                return True
            log.warning(
                "%s: the read model was not checked against the restarted node within %s s; sending",
                type(self).__name__,
                self.lost_after,
            )
        self._reconciled = None
        return False

    def _more_after(self, sent: int) -> bool:
        """Whether to send another batch at once after one of `sent` requests: only after a full one.
        A partial batch took everything pending; what was accepted while it was sent waits for the
        next round (the next block), rather than going out alone in a transaction of its own."""
        return sent >= self.max_batch

    def run(self, stop: threading.Event, idle: float = 0.02) -> None:
        run_lanes([self], self.wake, stop, idle=idle, linger=self.linger)

    def _recover_batches(self, batches: Sequence[tuple[int, str, int]]) -> None:
        """Settle the (batch id, tx hash, operator nonce) a previous run left sent: mined, still pending
        in the node (wait for it), or lost."""
        pending_nonce = self.sender.next_nonce
        for batch_id, tx_hash, operator_nonce in batches:
            (receipt,) = self.sender.receipts([tx_hash])
            if receipt is not None:
                self._settle(batch_id, receipt)
            elif operator_nonce < pending_nonce:
                self._in_flight[batch_id] = tx_hash  # the node has it; wait for it
            else:
                self._drop(batch_id, "not known to the node after a restart")

    def _submit(self, request: TxRequest, record: Callable[[str, int], int | None]) -> bool:
        """Sign `request`, `record` it (returns the batch id, or None when its requests were taken
        meanwhile: then nothing is sent), send it, and track it as in flight."""
        ((tx_hash, raw, nonce),) = self.sender.sign_with_nonces([request])
        batch_id = record(tx_hash, nonce)
        if batch_id is None:
            self.sender.resync_nonce()
            return False
        if self._restarts != self._restarts_checked:
            # The node is being restarted (`node_restarted` is called before it answers): the nonce may
            # be one the lost blocks had used, and the node would hold the batch back behind the gap.
            # The next step takes the nonce again.
            self._drop(batch_id, "the node restarted before it was sent")
            return False
        try:
            self.sender.send_raw([raw])
        except ChainError as exc:
            log.warning("sending batch %s failed: %s", tx_hash, exc)
            self._drop(batch_id, str(exc))
            self.sender.resync_nonce()
            return False
        self._in_flight[batch_id] = tx_hash
        return True

    def _forget(self, batch_id: int) -> None:
        self._in_flight.pop(batch_id, None)
        self._checked_at.pop(batch_id, None)

    def _poll(self) -> int:
        if not self._in_flight:
            return 0
        ids = list(self._in_flight)
        receipts = self.sender.receipts([self._in_flight[i] for i in ids])
        settled = 0
        now = time.monotonic()
        for batch_id, receipt in zip(ids, receipts, strict=True):
            if receipt is not None:
                settled += self._settle(batch_id, receipt)
            elif now - self._checked_at.setdefault(batch_id, now) > self.lost_after:
                settled += self._check_lost(batch_id)
        if settled and self.on_mined is not None:
            self.on_mined()
        return settled

    def _check_lost(self, batch_id: int) -> int:
        """A batch long unmined: if the node no longer knows it (it restarted, or evicted it), queue its
        requests again; the chain's nonces and ids make a late duplicate harmless."""
        tx_hash = self._in_flight[batch_id]
        nonce = self.sender.nonce_of(tx_hash)
        if nonce is not None:
            # Known but not mined: held back behind nonces the node lost, if any (a restart we were not
            # told of, or a send that raced one); nothing of ours is mined until they are filled.
            self._checked_at[batch_id] = time.monotonic()
            try:
                filled = self.sender.fill_gap(nonce)
            except ChainError as exc:  # the check is best effort: it must not stop the relayer's step
                log.warning("could not fill operator nonces below batch %s: %s", tx_hash, exc)
            else:
                if filled:
                    log.warning(
                        "batch %s waited behind %d operator nonces the node had lost; filled them", tx_hash, filled
                    )
            return 0
        self._drop(batch_id, "the node no longer knows the transaction")
        self.sender.resync_nonce()
        return 1
