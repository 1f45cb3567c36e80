"""The points follower: the indexer's part for `LoyaltyPoints` (see `ledger.indexer.Follower`), which
builds the read model (`ledger.points.tables`: history rows and live lots) from the chain's events and
marks the requests they applied as indexed (and done, if the lane has not settled them yet)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from ledger.contracts import RevertDecoder
from ledger.points.client import TOPICS, EventKind, PointsEvent, decode
from ledger.points.completions import Completions
from ledger.points.tables import PointsHistory, PointsLot, PointsRequest, PointsStatus, finish
from ledger.store import event_position


class PointsFollower:
    """The indexer's part for `LoyaltyPoints`: history rows, live lots, and requests marked indexed."""

    def __init__(self, address: str, decoder: RevertDecoder, completions: Completions | None = None) -> None:
        self.address = address
        self.topics = TOPICS
        self.decoder = decoder
        self.completions = completions

    def prepare(self, logs: Sequence[dict[str, Any]], times: dict[int, int]) -> Callable[[Session], int]:
        """Nothing is made before the write lock: `apply` decodes and writes in the range's transaction."""
        return lambda session: self.apply(session, logs, times)

    def apply(self, session: Session, logs: Sequence[dict[str, Any]], times: dict[int, int]) -> int:
        decoded = [e for e in (decode(dict(item)) for item in logs) if e is not None]
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
                    finish(request, by_ref[request.ref])
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
