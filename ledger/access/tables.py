"""The access log's tables in the service database: the read model the indexer builds from
`AccessBatchRecorded` events (`ledger.access.follower`), one row per entry."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from ledger.access.client import AccessEvent
from ledger.store import Base
from ledger.types import Purpose


class AccessEntry(Base):
    """An entry of an `AccessBatchRecorded` log as indexed: the auditor's and the customer's view of the
    access log."""

    __tablename__ = "access_entries"
    __table_args__ = (
        Index("ix_access_subject", "subject", "index"),
        Index("ix_access_partner_purpose", "partner", "purpose", "block_time"),
        Index("ix_access_block", "block_number"),
        Index("ix_access_time", "block_time"),
    )

    index: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    subject: Mapped[bytes] = mapped_column(LargeBinary(32))
    partner: Mapped[str] = mapped_column(String(42))
    purpose: Mapped[bytes] = mapped_column(LargeBinary(32))
    attributes: Mapped[str] = mapped_column(String(80))  # uint256 as decimal
    request_id: Mapped[bytes] = mapped_column(LargeBinary(32))
    permitted: Mapped[bool] = mapped_column(Boolean)
    head: Mapped[bytes] = mapped_column(LargeBinary(32))
    block_number: Mapped[int] = mapped_column(BigInteger)
    block_hash: Mapped[str] = mapped_column(String(66))
    log_index: Mapped[int] = mapped_column(Integer)
    tx_hash: Mapped[str] = mapped_column(String(66))
    block_time: Mapped[int] = mapped_column(BigInteger)

    def event(self) -> AccessEvent:
        return AccessEvent(
            index=self.index,
            subject=bytes(self.subject),
            partner=self.partner,
            purpose=Purpose(bytes(self.purpose)),
            attributes=int(self.attributes),
            request_id=bytes(self.request_id),
            permitted=self.permitted,
            head=bytes(self.head),
            block_number=self.block_number,
            block_hash=self.block_hash,
            log_index=self.log_index,
            tx_hash=self.tx_hash,
        )
