"""The relayer: the single writer for the operator key, putting accepted consent requests on-chain.

Group commit: requests that arrive within `linger` seconds of each other, up to `max_batch`, share
one `applyBatch` transaction; several batches may be in flight at once (local nonce, no waiting).
Crash safety: a batch is recorded (its hash and operator nonce, and its requests marked submitted)
before it is sent. After a restart a recorded batch is either mined (settled from its receipt),
still known to the node (waited for), or lost (its requests go back to the queue). A request is
confirmed only by the indexer, from the chain's own event, so nothing is counted twice.

A reverted batch is diagnosed by replaying it: the contract names the failing item and its reason;
that request fails alone, and the others go back to the queue.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from sqlalchemy import Engine, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from ledger import events
from ledger.consent import ConsentRegistryClient, SignedChange, batch_gas
from ledger.eip712 import ChangeKind, ConsentChange, Signature
from ledger.errors import BatchItemFailed, ChainError, ContractRevert, LedgerError, NonceMismatch
from ledger.store import ConsentEvent, ConsentRequest, ConsentState, RelayBatch, RequestStatus, as_utc, sessions, utcnow
from ledger.tx import Receipt, TxRequest, TxSender, items_per_transaction
from ledger.types import Purpose, Subject

log = logging.getLogger(__name__)

ERROR_CODES = {
    "ConsentRegistryInvalidSigner": "invalid_signature",
    "ConsentRegistryExpiredSignature": "signature_expired",
    "InvalidAccountNonce": "nonce_mismatch",
    "ConsentRegistryUnknownPartner": "unknown_partner",
    "ConsentRegistryEmptyAttributes": "empty_attributes",
    "ConsentRegistryAttributesOutOfRange": "attributes_out_of_range",
    "ConsentRegistryInvalidValidity": "invalid_validity",
    "ConsentRegistryUnboundSubject": "unbound_subject",
}


CHANGE_BYTES = 11 * 32  # one SignedChange in `applyBatch`'s call data (`ledger.consent.encode_changes`)


def max_changes_per_batch(max_batch: int) -> int:
    """`max_batch`, or fewer if that many changes would not fit one transaction (`MAX_TX_DATA_BYTES`)."""
    return items_per_transaction(max_batch, CHANGE_BYTES)


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
    relayer that receipts are there to collect. The miner waits at most `timeout` for the relayer
    (busy or gone: the block is not held up further; what was not sent goes in the next one).
    """

    def __init__(self, *, timeout: float = 0.05, fallback: float = 0.25) -> None:
        self.timeout = timeout
        self.fallback = fallback  # the relayer polls at least this often without a signal
        self.signal = threading.Event()  # the relayer's wake-up: a block is due, or was mined
        self._state = threading.Condition()
        self._due = 0  # blocks announced by the miner
        self._served = 0  # the last of them the relayer has sent for
        self._mined = False

    # the miner's side
    def before_block(self) -> None:
        with self._state:
            self._due += 1
            due = self._due
            self.signal.set()
            # Numbered, so that a relayer still busy with an earlier block does not release this one.
            self._state.wait_for(lambda: self._served >= due, self.timeout)

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
) -> None:
    """The relayer thread: every lane in turn, in one thread, so the operator's local nonce has one
    writer. With a `cadence`, lanes send only when a block is due and poll receipts when one was
    mined (or every `cadence.fallback` seconds). Without one (a node that mines on its own), idle it
    sleeps until a request arrives (`wake`) and then `linger`s so that requests arriving together
    share a batch (group commit)."""
    next_poll = 0.0
    while not stop.is_set():
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
# the chain lost a precondition the service made and is putting back (see `ledger.bindings`).
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


class _Raced(LedgerError):
    """Raised inside a transaction to abandon a batch whose requests changed under it (caught where
    raised; under the package's root all the same, as every exception the package defines)."""


_BATCHES = cast(Table, RelayBatch.__table__)
_REQUESTS = cast(Table, ConsentRequest.__table__)

# One change of a subject at a time on its way: a subject's pending changes wait while an earlier one is
# submitted (sent, or mined and not yet confirmed by the indexer), then go together, in order. The
# contract applies a change whose nonce is above the subject's next one (skipping what failed before
# it), so a later change must never reach the chain while an earlier one could still: if that
# earlier batch reverted, or was lost with its block, the later one would apply first and the earlier
# could never apply. Uncorrelated: the database reads the (few) submitted subjects once per statement.
_SUBMITTED_SUBJECTS = select(ConsentRequest.subject).where(ConsentRequest.status == RequestStatus.SUBMITTED)

# What a batch needs of its pending requests, oldest first (columns, not ORM objects: the relayer
# reads up to 500 of them per batch).
_PENDING = (
    select(
        ConsentRequest.seq,
        ConsentRequest.kind,
        ConsentRequest.subject,
        ConsentRequest.partner,
        ConsentRequest.purpose,
        ConsentRequest.attributes,
        ConsentRequest.nonce,
        ConsentRequest.deadline,
        ConsentRequest.valid_until,
        ConsentRequest.v,
        ConsentRequest.r,
        ConsentRequest.s,
    )
    .where(ConsentRequest.status == RequestStatus.PENDING, ConsentRequest.subject.not_in(_SUBMITTED_SUBJECTS))
    .order_by(ConsentRequest.seq)
    .limit(bindparam("limit"))
)
# Held back: subjects whose binding the chain lost, while it is put back (see `Relayer._fail`).
_NOT_HELD = ConsentRequest.subject.not_in(bindparam("held", expanding=True))
HOLD = 1.0  # seconds a held subject's requests stay out of batches before they are tried again


class ChangeRow(Protocol):
    """A stored consent change: a `ConsentRequest`, or a row of `_PENDING`."""

    @property
    def kind(self) -> int: ...
    @property
    def subject(self) -> bytes: ...
    @property
    def partner(self) -> str: ...
    @property
    def purpose(self) -> bytes: ...
    @property
    def attributes(self) -> str: ...
    @property
    def nonce(self) -> int: ...
    @property
    def deadline(self) -> int: ...
    @property
    def valid_until(self) -> int: ...
    @property
    def v(self) -> int: ...
    @property
    def r(self) -> bytes: ...
    @property
    def s(self) -> bytes: ...


def signed_change(request: ChangeRow) -> SignedChange:
    change = ConsentChange(
        kind=ChangeKind(request.kind),
        subject=Subject(request.subject),
        partner=request.partner,  # type: ignore[arg-type]
        purpose=Purpose(request.purpose),
        attributes=int(request.attributes),
        nonce=request.nonce,
        deadline=request.deadline,
        valid_until=request.valid_until,
    )
    return SignedChange(change, Signature(v=request.v, r=request.r, s=request.s))


class Relayer(BatchLane):
    def __init__(
        self,
        engine: Engine,
        registry: ConsentRegistryClient,
        *,
        max_batch: int = 500,
        linger: float = 0.005,
        max_in_flight: int = 16,
        lost_after: float = 10.0,
        on_mined: Callable[[], None] | None = None,
        wake: threading.Event | None = None,
        holds: Holds | None = None,
    ) -> None:
        super().__init__(
            registry.sender,
            linger=linger,
            max_in_flight=max_in_flight,
            lost_after=lost_after,
            on_mined=on_mined,
            wake=wake,
            holds=holds,
        )
        self.registry = registry
        self.max_batch = max_changes_per_batch(max_batch)
        self._sessions = sessions(engine)
        # subject -> until when (monotonic) its requests stay out of batches: one rejected item reverts a
        # whole batch, so a request waiting for its binding would otherwise stop everyone's.
        self._held: dict[bytes, float] = {}

    # start-up ------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Settle what a previous run left: mined, still pending in the node, or lost."""
        self.sender.resync_nonce()
        with self._sessions() as session:
            batches = [
                (b.id, b.tx_hash, b.operator_nonce)
                for b in session.scalars(select(RelayBatch).where(RelayBatch.status == "sent"))
            ]
        self._recover_batches(batches)
        log.info("relayer recovered: %d batches in flight", len(self._in_flight))

    def audit(self, older_than: float | None = None) -> int:
        return self.audit_submitted(older_than)

    # sending -------------------------------------------------------------------------------------

    def _held_now(self) -> list[bytes]:
        now = time.monotonic()
        for subject in [s for s, until in self._held.items() if until <= now]:
            del self._held[subject]
        return list(self._held)

    def _send_next(self) -> int:
        held = self._held_now()
        with self._sessions() as session:
            pending = _PENDING.where(_NOT_HELD) if held else _PENDING
            requests = list(session.execute(pending, {"limit": self.max_batch, "held": held}))
        if not requests:
            return 0
        data = self.registry.encode_batch([signed_change(r) for r in requests])

        def record(tx_hash: str, nonce: int) -> int | None:
            try:
                # Core statements on the session's connection: the ORM's flush and its UPDATE, which
                # synchronised the session by fetching the claimed rows back, cost more than the writes.
                with self._sessions.begin() as session:
                    connection = session.connection()
                    batch_id: int = connection.execute(
                        insert(_BATCHES)
                        .values(tx_hash=tx_hash, operator_nonce=nonce, size=len(requests))
                        .returning(_BATCHES.c.id)
                    ).scalar_one()
                    # The pending requests in the batch's seq range are the batch (it took the lowest
                    # pending seqs); a range, not an IN list of up to 500 parameters, which SQLAlchemy
                    # built per batch under the write lock. Should another pending row be in the range,
                    # or one of the batch's be gone, the count differs and nothing is claimed.
                    claimed = connection.execute(
                        update(_REQUESTS)
                        .where(
                            _REQUESTS.c.seq.between(requests[0].seq, requests[-1].seq),
                            _REQUESTS.c.status == RequestStatus.PENDING,
                            _REQUESTS.c.subject.not_in(_SUBMITTED_SUBJECTS),
                            *([_REQUESTS.c.subject.not_in(held)] if held else []),
                        )
                        .values(status=RequestStatus.SUBMITTED, batch_id=batch_id, tx_hash=tx_hash, updated_at=utcnow())
                    ).rowcount
                    if claimed != len(requests):
                        raise _Raced  # something else moved them meanwhile (rolls the batch record back)
                    return batch_id
            except _Raced:
                return None

        sent = self._submit(TxRequest(to=self.registry.address, data=data, gas=batch_gas(len(requests))), record)
        return len(requests) if sent else 0

    # settling ------------------------------------------------------------------------------------

    def audit_submitted(self, older_than: float | None = None) -> int:
        """Re-queue submitted requests the chain has lost.

        A batch can be mined on a node that then loses those blocks (a crash before its state was
        written) before the indexer saw them: no reorganisation is visible, yet the changes are gone.
        So a request submitted for longer than `older_than` (default `lost_after`) and still unconfirmed
        is checked: its transaction must still be known to the node; one marked as already applied must
        show in its subject's on-chain nonce. Otherwise it goes back to the queue (the nonce makes a
        duplicate impossible).
        """
        cutoff = self._moved_before(older_than)
        with self._sessions() as session:
            stale = [
                r
                for r in session.scalars(
                    select(ConsentRequest).where(ConsentRequest.status == RequestStatus.SUBMITTED).limit(5000)
                )
                if as_utc(r.updated_at).timestamp() < cutoff and r.batch_id not in self._in_flight
            ]
        if not stale:
            return 0
        lost: list[int] = []
        applied: list[ConsentRequest] = []
        known: dict[str, bool] = {}
        nonces: dict[bytes, int] = {}
        for request in stale:
            if request.tx_hash is not None and request.batch_id is not None:
                if request.tx_hash not in known:
                    known[request.tx_hash] = self.sender.known(request.tx_hash)
                if not known[request.tx_hash]:
                    lost.append(request.seq)
            else:  # marked applied by an earlier transaction: the chain's nonce must have moved past it
                if request.subject not in nonces:
                    nonces[request.subject] = self.registry.nonce_of(Subject(request.subject))
                if nonces[request.subject] <= request.nonce:
                    lost.append(request.seq)
                else:
                    applied.append(request)
        with self._sessions.begin() as session:
            for seq in lost:
                self._requeue(session, seq)
            for request in applied:  # on-chain and indexed, but the confirmation was missed: take it from the event
                event = session.scalar(
                    select(ConsentEvent).where(
                        ConsentEvent.subject == request.subject,
                        ConsentEvent.nonce == request.nonce,
                        ConsentEvent.kind == request.kind,
                    )
                )
                if event is not None:
                    session.execute(
                        update(ConsentRequest)
                        .where(ConsentRequest.seq == request.seq, ConsentRequest.status == RequestStatus.SUBMITTED)
                        .values(
                            status=RequestStatus.CONFIRMED,
                            tx_hash=event.tx_hash,
                            block_number=event.block_number,
                            updated_at=utcnow(),
                        )
                    )
                elif not self._logged(request):
                    self._history_lost(session, request)
        if lost:
            log.warning("%d submitted requests were no longer on the chain; queued again", len(lost))
        return len(lost)

    def _changes_logged(self, subject: bytes) -> list[tuple[int, int]]:
        """(nonce, kind) of every change of `subject` the chain's history holds."""
        logs = self.registry.w3.eth.get_logs(
            {
                "address": self.registry.address,
                "fromBlock": 0,
                "toBlock": "latest",
                "topics": [[events.GRANTED, events.REVOKED], "0x" + bytes(subject).hex()],
            }
        )
        decoded = (events.decode(dict(entry)) for entry in logs)
        return [(e.nonce, e.kind) for e in decoded if e is not None]

    def _logged(self, request: ConsentRequest) -> bool:
        """Whether the chain's history holds the event of this change (the indexer will pick it up)."""
        return (request.nonce, request.kind) in self._changes_logged(request.subject)

    def _passed_over(self, request: ConsentRequest, cause: ContractRevert) -> bool:
        """Whether `cause` refused the change because a later change of its subject applied while it did
        not: the chain moved the subject's nonce past it without it (it skips nonces), so it can never
        apply. The relayer sends none of a subject's changes while an earlier one is on its way, but a
        chain that lost the earlier one's block and kept the later one's would do it; the change must
        then fail, not be taken for applied."""
        if not isinstance(cause, NonceMismatch) or int(cause.args_by_name["currentNonce"]) <= request.nonce:
            return False
        logged = self._changes_logged(request.subject)
        return (request.nonce, request.kind) not in logged and any(nonce > request.nonce for nonce, _ in logged)

    def _history_lost(self, session: Session, request: ConsentRequest) -> None:
        """The change's effect is on-chain (its controller's nonce moved past it) but no block holds its
        transaction any more: a node restored from a state file that was ahead of its block history.
        Record that plainly, and take the consent from the contract's state, which is the truth."""
        consent = self.registry.consent_of(Subject(request.subject), request.partner, Purpose(request.purpose))  # type: ignore[arg-type]
        session.merge(
            ConsentState(
                subject=request.subject,
                partner=request.partner,
                purpose=request.purpose,
                attributes=str(consent.attributes),
                valid_until=consent.valid_until,
                block_number=self.registry.w3.eth.block_number,
                tx_hash="",
            )
        )
        session.execute(
            update(ConsentRequest)
            .where(ConsentRequest.seq == request.seq, ConsentRequest.status == RequestStatus.SUBMITTED)
            .values(
                status=RequestStatus.CONFIRMED,
                error_code="history_lost",
                updated_at=utcnow(),
                error_detail="applied on-chain (the controller's nonce is used) but the node lost the block",
            )
        )
        log.error(
            "consent request %s: applied on-chain but the node lost its block; state taken from the contract",
            request.id,
        )

    def _settle(self, batch_id: int, receipt: Receipt) -> int:
        """Mark the batch mined (its requests are confirmed by the indexer, from their events) or find
        out why it reverted. Two statements under the write lock: loading the batch's requests there
        held it for milliseconds per batch, and every process's writers wait on it."""
        self._forget(batch_id)
        with self._sessions.begin() as session:
            session.execute(
                update(RelayBatch)
                .where(RelayBatch.id == batch_id)
                .values(status="mined" if receipt.status == 1 else "reverted")
            )
            size = session.scalar(select(RelayBatch.size).where(RelayBatch.id == batch_id))
        if receipt.status != 1:
            with self._sessions() as session:
                requests = self._batch_requests(session, batch_id)
            self._diagnose(batch_id, requests)
            return max(1, len(requests))
        return max(1, size or 0)

    def _batch_requests(self, session: Session, batch_id: int) -> list[ConsentRequest]:
        return list(
            session.scalars(
                select(ConsentRequest).where(ConsentRequest.batch_id == batch_id).order_by(ConsentRequest.seq)
            )
        )

    def _diagnose(self, batch_id: int, requests: Sequence[ConsentRequest]) -> None:
        """Find the item that made the batch revert; it fails alone, the rest are queued again."""
        live = [r for r in requests if r.status == RequestStatus.SUBMITTED]
        culprit: tuple[ConsentRequest, ContractRevert] | None = None
        if live:
            try:
                self.registry.estimate(self.registry.encode_batch([signed_change(r) for r in live]))
            except BatchItemFailed as failure:
                culprit = (live[failure.index], failure.cause)
            except LedgerError as exc:
                log.warning("could not diagnose batch %s: %s", batch_id, exc)
        passed_over = False
        if culprit is not None:
            try:
                passed_over = self._passed_over(*culprit)  # a node call: made before the write lock
            except Exception as exc:  # the node's logs are not to be had now: all are sent again
                log.warning("could not read the events of batch %s's refused change: %s", batch_id, exc)
                culprit = None
        with self._sessions.begin() as session:
            for request in live:
                if culprit is not None and request.seq == culprit[0].seq:
                    self._fail(session, request, culprit[1], passed_over=passed_over)
                else:
                    self._requeue(session, request.seq)

    def _fail(
        self, session: Session, request: ConsentRequest, cause: ContractRevert, *, passed_over: bool = False
    ) -> None:
        if self.holds(cause.error, request.subject, request.partner):
            self._requeue(session, request.seq)  # its binding or partner role is being put back
            self._held[request.subject] = time.monotonic() + HOLD
            return
        code = ERROR_CODES.get(cause.error, "rejected")
        if isinstance(cause, NonceMismatch) and int(cause.args_by_name["currentNonce"]) > request.nonce:
            if passed_over:
                code = "superseded"  # a change signed after it applied first; it can never apply
            else:
                # That nonce was used: by this very change in an earlier (reorganised or resent)
                # transaction. The indexer confirms it from the chain's event (or the audit finds the
                # node lost its block: `_history_lost`).
                # Only while still submitted: the indexer may have confirmed it meanwhile.
                session.execute(
                    update(ConsentRequest)
                    .where(ConsentRequest.seq == request.seq, ConsentRequest.status == RequestStatus.SUBMITTED)
                    .values(batch_id=None, updated_at=utcnow())
                )
                return
        now = utcnow()
        session.execute(
            update(ConsentRequest)
            .where(ConsentRequest.seq == request.seq, ConsentRequest.status == RequestStatus.SUBMITTED)
            .values(
                status=RequestStatus.FAILED,
                batch_id=None,
                error_code=code,
                error_detail=str(cause)[:500],
                updated_at=now,
                failed_at=now,  # leaves the live nonce index
            )
        )
        if request.kind == ChangeKind.REVOKE:
            # Accepted (202) and now not on-chain: the read model stops denying what the customer withdrew.
            log.error(
                "accepted revocation %s failed on-chain (%s): the customer's withdrawal is not recorded; "
                "they must revoke again",
                request.id,
                cause,
            )
        else:
            log.info("consent request %s failed on-chain: %s", request.id, cause)

    def _requeue(self, session: Session, seq: int) -> None:
        session.execute(
            update(ConsentRequest)
            .where(ConsentRequest.seq == seq, ConsentRequest.status == RequestStatus.SUBMITTED)
            .values(status=RequestStatus.PENDING, batch_id=None, tx_hash=None, updated_at=utcnow())
        )

    def _drop(self, batch_id: int, reason: str) -> None:
        self._forget(batch_id)
        with self._sessions.begin() as session:
            batch = session.get(RelayBatch, batch_id)
            assert batch is not None
            batch.status = "dropped"
            for request in self._batch_requests(session, batch_id):
                self._requeue(session, request.seq)
        log.warning("batch %s dropped (%s); its requests are queued again", batch_id, reason)
