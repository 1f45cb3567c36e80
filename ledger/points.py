"""Loyalty points through the service: the relay lane that puts issuances and redemptions on-chain
with group commit, the indexer's follower that builds the points read model, and its reads.

A batch transaction applies each item on its own (the contract reports a failed item by an event),
so a request is settled straight from its batch's receipt: done, with the lot or the new balance, or
failed, with the contract's reason. Every request carries its on-chain id (issuanceId or
redemptionId), which the contract applies once: sending a request again after a crash or a lost block
is always safe, and finds the first result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Engine, Table, delete, func, insert, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from ledger import loyalty
from ledger.contracts import RevertDecoder
from ledger.eip712 import Redemption, Signature
from ledger.errors import ContractRevert, NonceMismatch
from ledger.loyalty import EventKind, Issuance, LoyaltyPointsClient, PointsEvent, SignedRedemption
from ledger.points_store import PointsBatch, PointsHistory, PointsLot, PointsRequest, PointsStatus
from ledger.relayer import BatchLane, Holds
from ledger.store import as_utc, event_position, sessions, utcnow
from ledger.tx import Receipt, TxRequest, items_per_transaction
from ledger.types import Subject

log = logging.getLogger(__name__)

ERROR_CODES = {
    "LoyaltyPointsInsufficientBalance": "insufficient_points",
    "LoyaltyPointsInvalidSigner": "invalid_signature",
    "LoyaltyPointsExpiredSignature": "signature_expired",
    "InvalidAccountNonce": "nonce_mismatch",
    "LoyaltyPointsUnknownPartner": "unknown_partner",
    "LoyaltyPointsUnboundSubject": "unbound_subject",
    "LoyaltyPointsInvalidAmount": "invalid_amount",
    "LoyaltyPointsInvalidExpiry": "invalid_expiry",
    "LoyaltyPointsRedemptionUsed": "authorisation_used",
    "LoyaltyPointsIssuanceUsed": "issuance_used",
}
_ALREADY_APPLIED = {"LoyaltyPointsRedemptionUsed", "LoyaltyPointsIssuanceUsed"}
LOST_AFTER_ANSWER = "lost_after_answer"  # error code: done once, lost with its block, then refused
LIVE = (PointsStatus.PENDING, PointsStatus.SUBMITTED)
FINAL = (PointsStatus.DONE, PointsStatus.FAILED)


class Completions:
    """Callbacks waiting for requests to reach a final state (the API's synchronous answers). Each is
    called once, with the request's final row (detached: read it, do not change it), so that a waiting
    caller needs no database read for its answer.

    The ids that finished lately are remembered: a caller may subscribe only after its request
    finished (an API worker's event loop, busy under load, can resume a request after its batch was
    already mined and settled), and is then told to read the row instead of waiting for news that
    has come and gone."""

    RECENT = 100_000  # finished ids remembered (a few minutes' worth at the loyalty benchmark's rate)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, list[Callable[[PointsRequest], None]]] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self.listeners: list[Callable[[list[str]], None]] = []
        """Told the ids of every notification (the supervisor tells its API workers)."""

    def subscribe(self, request_id: str, callback: Callable[[PointsRequest], None]) -> bool:
        """Call `callback` with the request's final row; True if it finished already (no call will
        come for it: read the row)."""
        with self._lock:
            self._waiters.setdefault(request_id, []).append(callback)
            return request_id in self._recent

    def unsubscribe(self, request_id: str, callback: Callable[[PointsRequest], None]) -> None:
        with self._lock:
            callbacks = self._waiters.get(request_id, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._waiters.pop(request_id, None)

    def notify(self, requests: Iterable[PointsRequest]) -> None:
        requests = list(requests)
        with self._lock:
            called = [(cb, r) for r in requests for cb in self._waiters.pop(r.id, [])]
            self._remember(r.id for r in requests)
        for callback, request in called:
            callback(request)
        if self.listeners and requests:
            ids = [r.id for r in requests]
            for listener in self.listeners:
                listener(ids)

    def finished(self, request_ids: Iterable[str]) -> list[str]:
        """Note that `request_ids` reached a final state (told by another process); returns those
        someone here waits for (their rows are to be read and given to `notify`)."""
        with self._lock:
            ids = list(request_ids)
            self._remember(ids)
            return [i for i in ids if i in self._waiters]

    def _remember(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._recent[request_id] = None
        while len(self._recent) > self.RECENT:
            self._recent.popitem(last=False)


def signed_redemption(request: PointsRequest) -> SignedRedemption:
    assert request.partner is not None
    assert request.nonce is not None
    return SignedRedemption(
        Redemption(
            subject=Subject(request.subject),
            partner=request.partner,  # type: ignore[arg-type]
            amount=request.amount,
            redemption_id=request.ref,
            nonce=int(request.nonce),
            deadline=request.deadline,
        ),
        Signature(v=request.v, r=request.r, s=request.s),
    )


def issuance(request: PointsRequest) -> Issuance:
    return Issuance(Subject(request.subject), request.amount, request.expires_at, request.ref)


class PointsRelayer(BatchLane):
    """The points lane of the relayer. It shares the operator key with the consent relayer and runs in
    the same thread (see `ledger.relayer.run_lanes`), so the local nonce has one writer."""

    def __init__(
        self,
        engine: Engine,
        points: LoyaltyPointsClient,
        *,
        max_batch: int = 500,
        max_in_flight: int = 8,
        lost_after: float = 10.0,
        completions: Completions | None = None,
        wake: threading.Event | None = None,
        holds: Holds | None = None,
    ) -> None:
        super().__init__(
            points.sender,
            linger=0.005,
            max_in_flight=max_in_flight,
            lost_after=lost_after,
            on_mined=None,
            wake=wake,
            holds=holds,
        )
        self.points = points
        # the larger of the two kinds of item: a redemption (nine words) and an issuance (four)
        self.max_batch = items_per_transaction(max_batch, 9 * 32)
        self.completions = completions or Completions()
        self._sessions = sessions(engine)
        self._other_kind_waiting = False  # the last batch left pending requests of the other kind

    def recover(self) -> None:
        """Settle what a previous run left: batches mined, still pending in the node, or lost."""
        with self._sessions() as session:
            batches = [
                (b.id, b.tx_hash, b.operator_nonce)
                for b in session.scalars(select(PointsBatch).where(PointsBatch.status == "sent"))
            ]
        self._recover_batches(batches)

    # sending -------------------------------------------------------------------------------------

    def _send_next(self) -> int:
        with self._sessions() as session:
            oldest = session.scalars(
                select(PointsRequest)
                .where(PointsRequest.status == PointsStatus.PENDING)
                .order_by(PointsRequest.seq)
                .limit(1)
            ).first()
            if oldest is None:
                return 0
            requests = list(
                session.scalars(
                    select(PointsRequest)
                    .where(PointsRequest.status == PointsStatus.PENDING, PointsRequest.kind == oldest.kind)
                    .order_by(PointsRequest.seq)
                    .limit(self.max_batch)
                )
            )
            # A partial batch of one kind leaves the other kind's requests for another batch, sent at once.
            self._other_kind_waiting = len(requests) < self.max_batch and (
                session.scalar(
                    select(PointsRequest.seq)
                    .where(PointsRequest.status == PointsStatus.PENDING, PointsRequest.kind != oldest.kind)
                    .limit(1)
                )
                is not None
            )
        if oldest.kind == "issue":
            data = self.points.encode_issue_batch([issuance(r) for r in requests])
            gas = loyalty.issue_gas(len(requests))
        else:
            data = self.points.encode_redeem_batch([signed_redemption(r) for r in requests])
            gas = loyalty.redeem_gas(len(requests))

        def record(tx_hash: str, nonce: int) -> int | None:
            with self._sessions.begin() as session:
                batch = PointsBatch(tx_hash=tx_hash, kind=oldest.kind, operator_nonce=nonce, size=len(requests))
                session.add(batch)
                session.flush()
                claimed = session.execute(
                    update(PointsRequest)
                    .where(
                        PointsRequest.seq.in_([r.seq for r in requests]), PointsRequest.status == PointsStatus.PENDING
                    )
                    .values(status=PointsStatus.SUBMITTED, batch_id=batch.id, tx_hash=tx_hash, updated_at=utcnow())
                ).rowcount  # type: ignore[attr-defined]
                if claimed == len(requests):
                    return batch.id
                batch.status = "dropped"  # something else moved them meanwhile; never sent
                session.execute(
                    update(PointsRequest)
                    .where(PointsRequest.batch_id == batch.id, PointsRequest.status == PointsStatus.SUBMITTED)
                    .values(status=PointsStatus.PENDING, batch_id=None, tx_hash=None)
                )
                return None

        sent = self._submit(TxRequest(to=self.points.address, data=data, gas=gas), record)
        return len(requests) if sent else 0

    def _more_after(self, sent: int) -> bool:
        return sent >= self.max_batch or (sent > 0 and self._other_kind_waiting)

    # settling ------------------------------------------------------------------------------------

    def _settle(self, batch_id: int, receipt: Receipt) -> int:
        self._forget(batch_id)
        outcomes = {e.ref: e for e in self.points.logs(receipt) if e.kind is not EventKind.EXPIRED}
        finished: list[PointsRequest] = []
        with self._sessions.begin() as session:
            batch = session.get(PointsBatch, batch_id)
            assert batch is not None
            batch.status = "mined" if receipt.status == 1 else "reverted"
            requests = list(session.scalars(select(PointsRequest).where(PointsRequest.batch_id == batch_id)))
            for request in requests:
                if request.status != PointsStatus.SUBMITTED:
                    continue
                event = outcomes.get(request.ref)
                if receipt.status != 1 or event is None:
                    _requeue(session, request)
                    continue
                if event.kind in (EventKind.ISSUE_REJECTED, EventKind.REDEEM_REJECTED):
                    cause = self.points.decoder.decode(event.reason)
                    if cause.error in _ALREADY_APPLIED:
                        first = self.first_result(request)
                        if first is not None:
                            event = first  # sent again after a crash or a lost block: the first result stands
                    if event.kind in (EventKind.ISSUE_REJECTED, EventKind.REDEEM_REJECTED):
                        if self.holds(cause.error, request.subject, request.partner):
                            _requeue(session, request)  # its binding or partner role is being put back
                            continue
                        if isinstance(cause, NonceMismatch) and _in_turn(session, request, cause):
                            _requeue(session, request)  # an earlier one the chain lost goes first
                            continue
                        request.status = PointsStatus.FAILED
                        if _was_answered(request):
                            _lost_after_answer(request, cause)
                        else:
                            _refused(request, cause)
                        request.tx_hash, request.block_number = receipt.tx_hash, receipt.block_number
                        request.updated_at = utcnow()
                        finished.append(request)
                        continue
                _finish(request, event)
                finished.append(request)
        if receipt.status != 1:
            log.warning("points batch %s reverted as a whole; its requests are queued again", receipt.tx_hash)
        self.completions.notify(finished)
        return len(requests)

    def first_result(self, request: PointsRequest) -> PointsEvent | None:
        """The event that applied this request's id the first time, from the chain's logs."""
        decoded = [loyalty.decode(dict(entry)) for entry in self.applied_logs(request)]
        return next((e for e in decoded if e is not None), None)

    def applied_logs(self, request: PointsRequest) -> list[Any]:
        """The chain's logs of events applying this request's id (`Issued` or `Redeemed`), oldest first."""
        kind, position = (loyalty.ISSUED, 2) if request.kind == "issue" else (loyalty.REDEEMED, 3)
        topics: list[Any] = [kind, None, None, None][: position + 1]
        topics[position] = "0x" + request.ref.hex()
        return list(
            self.points.w3.eth.get_logs(
                {"address": self.points.address, "fromBlock": 0, "toBlock": "latest", "topics": topics}
            )
        )

    def audit(self, older_than: float | None = None) -> int:
        """Requeue done requests whose block the node lost before the indexer saw it (a node crash
        before its state was written): their transaction is no longer known. The contract applies an
        id once, so this never spends twice."""
        cutoff = self._moved_before(older_than)
        with self._sessions() as session:
            stale = [
                r
                for r in session.scalars(
                    select(PointsRequest)
                    .where(PointsRequest.status == PointsStatus.DONE, PointsRequest.indexed.is_(False))
                    .limit(5000)
                )
                if as_utc(r.updated_at).timestamp() < cutoff
            ]
        lost: list[int] = []
        known: dict[str, bool] = {}
        for request in stale:
            assert request.tx_hash is not None
            if request.tx_hash not in known:
                known[request.tx_hash] = self.sender.known(request.tx_hash)
            if not known[request.tx_hash]:
                lost.append(request.seq)
        if lost:
            with self._sessions.begin() as session:
                for request in session.scalars(select(PointsRequest).where(PointsRequest.seq.in_(lost))):
                    _requeue(session, request, status=PointsStatus.DONE)
            log.warning("%d points requests were no longer on the chain; queued again", len(lost))
        return len(lost)

    def _drop(self, batch_id: int, reason: str) -> None:
        self._forget(batch_id)
        with self._sessions.begin() as session:
            batch = session.get(PointsBatch, batch_id)
            assert batch is not None
            batch.status = "dropped"
            for request in session.scalars(select(PointsRequest).where(PointsRequest.batch_id == batch_id)):
                _requeue(session, request)
        log.warning("points batch %s dropped (%s); its requests are queued again", batch_id, reason)


def _in_turn(session: Session, request: PointsRequest, cause: NonceMismatch) -> bool:
    """Whether a redemption refused for its nonce can still apply in turn: the chain's nonce for its
    controller and partner is below its own, and every nonce in between belongs to a redemption of ours
    that has not failed (queued, in flight, or done on a chain the node has since lost, which the
    indexer's rollback or the audit queues again). That happens after a loss of blocks, when the
    relayer sends the next redemption before the service has noticed that the previous one is gone.
    Only a real gap is final (as for consent changes, `Relayer._fail`)."""
    current, own = int(cause.args_by_name["currentNonce"]), int(request.nonce or 0)
    if not current < own:
        return False  # used already, by another redemption: final
    live = {
        int(nonce)
        for nonce in session.scalars(
            select(PointsRequest.nonce).where(
                PointsRequest.subject == request.subject,
                PointsRequest.kind == "redeem",
                PointsRequest.controller == request.controller,
                PointsRequest.partner == request.partner,
                PointsRequest.status != PointsStatus.FAILED,
            )
        )
        if nonce is not None
    }
    return own - current <= len(live) and all(nonce in live for nonce in range(current, own))


def _was_answered(request: PointsRequest) -> bool:
    """Whether the request was done once already: applied in a block the chain then lost, and queued
    again. `_finish` set its lot or balance, and neither a requeue nor a rollback clears them."""
    return (request.lot_id if request.kind == "issue" else request.balance) is not None


def _refused(request: PointsRequest, cause: ContractRevert) -> None:
    """The chain refused the request. Its answer goes to the partner or issuer, so it names the reason,
    not the revert's facts (the customer's pseudonym, their balance): those go to the log."""
    request.error_code = ERROR_CODES.get(cause.error, "rejected")
    request.error_detail = None if cause.error in ERROR_CODES else f"the contract refused it ({cause.error})"
    log.info("points request %s (%s) was refused: %s", request.id, request.kind, cause)


def _lost_after_answer(request: PointsRequest, cause: ContractRevert) -> None:
    """A request answered as done, lost with its block, failed when applied again (its authorisation's
    deadline or a lot it spent expired before the node was back). The caller holds an answer the chain
    does not: say so plainly (a repeat of its Idempotency-Key gets this code), and loudly, so that the
    operator can settle it with the partner or issuer."""
    request.error_code = LOST_AFTER_ANSWER
    request.error_detail = f"done once, in a block the node lost; applying it again failed: {cause.error}"
    log.error(
        "points request %s (%s) was answered as done, but the node lost its block and applying it again failed: %s",
        request.id,
        request.kind,
        cause,
    )


def _requeue(session: Session, request: PointsRequest, status: str = PointsStatus.SUBMITTED) -> None:
    if request.status != status:
        return
    request.status = PointsStatus.PENDING
    request.batch_id = None
    request.tx_hash = None
    request.block_number = None
    request.updated_at = utcnow()


def _finish(request: PointsRequest, event: PointsEvent) -> None:
    request.status = PointsStatus.DONE
    request.tx_hash = event.tx_hash
    request.block_number = event.block_number
    request.lot_id = event.lot_id if event.kind is EventKind.ISSUED else None
    request.balance = event.balance if event.kind is EventKind.REDEEMED else None
    request.error_code = None
    request.error_detail = None
    request.updated_at = utcnow()


# the read model ------------------------------------------------------------------------------------


class PointsFollower:
    """The indexer's part for `LoyaltyPoints`: history rows, live lots, and requests marked indexed."""

    def __init__(self, address: str, decoder: RevertDecoder, completions: Completions | None = None) -> None:
        self.address = address
        self.topics = loyalty.TOPICS
        self.decoder = decoder
        self.completions = completions

    def apply(self, session: Session, logs: Sequence[dict[str, Any]], times: dict[int, int]) -> int:
        decoded = [e for e in (loyalty.decode(dict(item)) for item in logs) if e is not None]
        if not decoded:
            return 0
        # Core statements for the rows every event makes (the ORM's per-object work was most of the
        # follower's time); ORM objects only for the rare requests the relayer has not settled.
        connection = session.connection()
        connection.execute(
            insert(cast(Table, PointsHistory.__table__)),
            [
                {
                    **event_position(e, times),
                    "kind": int(e.kind),
                    "subject": e.subject,
                    "ref": e.ref or bytes(32),
                    "partner": e.partner,
                    "lot_id": e.lot_id,
                    "amount": e.amount,
                    "balance": e.balance,
                    "expires_at": e.expires_at,
                    "reason": self.decoder.decode(e.reason).error if e.reason else None,
                }
                for e in decoded
            ],
        )
        _fold_lots(session, decoded)
        applied = [e for e in decoded if e.kind in (EventKind.ISSUED, EventKind.REDEEMED)]
        if applied:
            refs = [e.ref for e in applied]
            requests = cast(Table, PointsRequest.__table__)
            unsettled = [
                ref
                for ref, status in connection.execute(
                    select(requests.c.ref, requests.c.status).where(requests.c.ref.in_(refs))
                )
                if status != PointsStatus.DONE
            ]
            connection.execute(update(requests).where(requests.c.ref.in_(refs)).values(indexed=True))
            finished = []
            if unsettled:  # the relayer has not settled them yet: the chain says done
                by_ref = {e.ref: e for e in applied}
                for request in session.scalars(select(PointsRequest).where(PointsRequest.ref.in_(unsettled))):
                    _finish(request, by_ref[request.ref])
                    finished.append(request)
            if finished and self.completions is not None:
                # Waiting callers hear of it once it is committed (the relayer's settle will skip it).
                completions = self.completions
                sa_event.listen(session, "after_commit", lambda _s: completions.notify(finished), once=True)
        return len(decoded)

    def rollback(self, session: Session, ancestor: int) -> None:
        gone = list(session.scalars(select(PointsHistory).where(PointsHistory.block_number > ancestor)))
        session.execute(delete(PointsHistory).where(PointsHistory.block_number > ancestor))
        for subject in {e.subject for e in gone}:
            session.execute(delete(PointsLot).where(PointsLot.subject == subject))
            history = session.scalars(
                select(PointsHistory)
                .where(PointsHistory.subject == subject)
                .order_by(PointsHistory.block_number, PointsHistory.log_index)
            )
            session.flush()
            _fold_lots(session, [_as_event(h) for h in history])
        # What the chain no longer has is sent again (the contract applies each id once).
        session.execute(
            update(PointsRequest)
            .where(PointsRequest.status == PointsStatus.DONE, PointsRequest.block_number > ancestor)
            .values(status=PointsStatus.PENDING, tx_hash=None, block_number=None, batch_id=None, indexed=False)
        )


def _as_event(h: PointsHistory) -> PointsEvent:
    return PointsEvent(
        kind=EventKind(h.kind),
        block_number=h.block_number,
        block_hash=h.block_hash,
        log_index=h.log_index,
        tx_hash=h.tx_hash,
        subject=h.subject,
        ref=h.ref,
        partner=h.partner,
        lot_id=h.lot_id,
        amount=h.amount,
        balance=h.balance,
        expires_at=h.expires_at,
    )


def _fold_lots(session: Session, decoded: Sequence[PointsEvent]) -> None:
    """Apply events to the live lots as the contract does: issue into a lot, expiry removes a lot, a
    redemption empties the soonest-expiring lots (expired ones were removed by events before it)."""
    subjects = {e.subject for e in decoded if e.kind in (EventKind.ISSUED, EventKind.REDEEMED, EventKind.EXPIRED)}
    if not subjects:
        return
    lots: dict[bytes, dict[int, PointsLot]] = {s: {} for s in subjects}
    for lot in session.scalars(select(PointsLot).where(PointsLot.subject.in_(subjects))):
        lots[lot.subject][lot.lot_id] = lot
    for e in decoded:
        owned = lots.get(e.subject)
        if owned is None:
            continue
        if e.kind is EventKind.ISSUED:
            if e.lot_id not in owned:
                owned[e.lot_id] = PointsLot(subject=e.subject, lot_id=e.lot_id, expires_at=e.expires_at, remaining=0)
                session.add(owned[e.lot_id])
            owned[e.lot_id].remaining += e.amount
        elif e.kind is EventKind.EXPIRED:
            if e.lot_id in owned:
                session.delete(owned.pop(e.lot_id))
        elif e.kind is EventKind.REDEEMED:
            left = e.amount
            for lot in sorted(owned.values(), key=lambda x: (x.expires_at, x.lot_id)):
                if left == 0:
                    break
                take = min(lot.remaining, left)
                lot.remaining -= take
                left -= take
                if lot.remaining == 0:
                    del owned[lot.lot_id]
                    session.delete(lot)


@dataclass(frozen=True)
class Tier:
    name: str
    earned: int  # points issued in the window
    next: str | None
    to_next: int


class PointsReader:
    """Reads for customers and partners, from the read model (and the queue, for nonces)."""

    def __init__(self, engine: Engine, tiers: dict[str, int], tier_window: int = 365 * 86400) -> None:
        self._sessions = sessions(engine)
        self.tiers = sorted(tiers.items(), key=lambda item: item[1])
        self.tier_window = tier_window

    def lots(self, subject: bytes, now: int | None = None) -> list[PointsLot]:
        now = int(time.time()) if now is None else now
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(PointsLot)
                    .where(PointsLot.subject == subject, PointsLot.expires_at > now)
                    .order_by(PointsLot.expires_at, PointsLot.lot_id)
                )
            )

    def balance(self, subject: bytes, now: int | None = None) -> int:
        return sum(lot.remaining for lot in self.lots(subject, now))

    def history(self, subject: bytes, limit: int = 200) -> list[PointsHistory]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(PointsHistory)
                    .where(PointsHistory.subject == subject)
                    .order_by(PointsHistory.block_number.desc(), PointsHistory.log_index.desc())
                    .limit(limit)
                )
            )

    def tier(self, subject: bytes, now: int | None = None) -> Tier:
        now = int(time.time()) if now is None else now
        with self._sessions() as session:
            earned = session.scalar(
                select(func.coalesce(func.sum(PointsHistory.amount), 0)).where(
                    PointsHistory.subject == subject,
                    PointsHistory.kind == int(EventKind.ISSUED),
                    PointsHistory.block_time > now - self.tier_window,
                )
            )
        earned = int(earned or 0)
        current = self.tiers[0][0]
        following: tuple[str, int] | None = None
        for name, threshold in self.tiers:
            if earned >= threshold:
                current = name
            elif following is None:
                following = (name, threshold)
        return Tier(current, earned, following[0] if following else None, following[1] - earned if following else 0)

    def statement(self, partner: str, start: int, end: int) -> list[PointsHistory]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(PointsHistory)
                    .where(
                        PointsHistory.partner == partner,
                        PointsHistory.kind == int(EventKind.REDEEMED),
                        PointsHistory.block_time >= start,
                        PointsHistory.block_time < end,
                    )
                    .order_by(PointsHistory.block_number, PointsHistory.log_index)
                )
            )

    def next_sequence(self, controller: str, partner: str, chain_nonce: int) -> int:
        """The sequence a new authorisation at `partner` gets: after the chain's and any queued one's."""
        with self._sessions() as session:
            queued = session.scalars(
                select(PointsRequest.nonce).where(
                    PointsRequest.controller == controller,
                    PointsRequest.partner == partner,
                    PointsRequest.status.in_(LIVE),
                )
            )
            highest = max((int(n) & (2**64 - 1) for n in queued if n is not None), default=-1)
        return max(chain_nonce & (2**64 - 1), highest + 1)

    def request(self, request_id: str) -> PointsRequest | None:
        with self._sessions() as session:
            return session.scalar(select(PointsRequest).where(PointsRequest.id == request_id))

    def requests(self, request_ids: Sequence[str]) -> list[PointsRequest]:
        """The rows of those of `request_ids` that exist, in one read."""
        with self._sessions() as session:
            return list(session.scalars(select(PointsRequest).where(PointsRequest.id.in_(request_ids))))
