"""The access log's reads: queries of the indexed log (`ledger.access.tables`) for auditors and
customers."""

from __future__ import annotations

from sqlalchemy import Engine, select

from ledger.access.tables import AccessEntry
from ledger.store import sessions


class AccessReader:
    """Queries of the indexed access log (auditors, customers)."""

    def __init__(self, engine: Engine) -> None:
        self._sessions = sessions(engine)

    def entries(
        self,
        *,
        subject: bytes | None = None,
        partner: str | None = None,
        purpose: bytes | None = None,
        start: int | None = None,
        end: int | None = None,
        permitted: bool | None = None,
        after: int = -1,
        limit: int = 1_000,
    ) -> list[AccessEntry]:
        """Entries in log order matching every filter given; `start`/`end` are block times (end
        exclusive); `after` is the last index of the previous page."""
        query = select(AccessEntry).where(AccessEntry.index > after)
        if subject is not None:
            query = query.where(AccessEntry.subject == subject)
        if partner is not None:
            query = query.where(AccessEntry.partner == partner)
        if purpose is not None:
            query = query.where(AccessEntry.purpose == purpose)
        if start is not None:
            query = query.where(AccessEntry.block_time >= start)
        if end is not None:
            query = query.where(AccessEntry.block_time < end)
        if permitted is not None:
            query = query.where(AccessEntry.permitted.is_(permitted))
        with self._sessions() as session:
            return list(session.scalars(query.order_by(AccessEntry.index).limit(limit)))
