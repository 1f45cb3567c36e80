"""The points reads: balances, lots, history, tiers and partner statements from the read model
(`ledger.points.tables`), and the next redemption sequence from the queue, for customers and partners."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, func, select

from ledger.points.client import EventKind
from ledger.points.tables import LIVE, PointsHistory, PointsLot, PointsRequest
from ledger.store import sessions


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

    def references(self, refs: Sequence[bytes]) -> dict[bytes, str]:
        """The partners' own references of the redemptions with these on-chain ids, those that have one."""
        if not refs:
            return {}
        with self._sessions() as session:
            rows = session.execute(
                select(PointsRequest.ref, PointsRequest.reference).where(
                    PointsRequest.ref.in_(set(refs)), PointsRequest.reference.is_not(None)
                )
            )
            return {ref: reference for ref, reference in rows if reference is not None}

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
