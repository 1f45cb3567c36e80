"""The consent tables in the service database: the outbox (accepted requests, `ConsentRequest`, and the
relayer's batches, `RelayBatch`), the read model the follower builds from `ConsentRegistry` events
(history, current consents, bound keys), and the bindings the service made (`BoundController`, see
`ledger.consent.bindings`)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import cast

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
    select,
    text,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from ledger.consent.client import KIND_BIND
from ledger.store import BACKFILLS, RETIRED_INDEXES, Base, IndexedEvent, utcnow


class RequestStatus(enum.StrEnum):
    PENDING = "pending"  # accepted, not yet sent
    SUBMITTED = "submitted"  # in a sent batch transaction
    CONFIRMED = "confirmed"  # its event is on-chain (read model)
    FAILED = "failed"  # the chain refused it; `error_code` says why


LIVE = (RequestStatus.PENDING, RequestStatus.SUBMITTED)  # not yet confirmed or failed

LIVE_NONCE_INDEX = "uq_live_nonce"


class ConsentRequest(Base):
    """One accepted, signed consent change (the outbox)."""

    __tablename__ = "consent_requests"
    __table_args__ = (
        # A subject's nonce is used by one live request at most (the outbox no longer gives a failed
        # one's nonce again, see `ledger.consent.outbox._highest_nonce`; rows from before may share it). Live means
        # not failed, told by `failed_at`, which only the failure itself writes: with
        # `status` in the index's WHERE, as before, every status change (claimed, confirmed) rewrote the
        # row's entry, a random page of the index, under the write lock (4.6 ms of the indexer's 7 ms
        # for a 300-row confirmation, measured).
        Index(
            LIVE_NONCE_INDEX,
            "subject",
            "nonce",
            unique=True,
            sqlite_where=text("failed_at IS NULL"),
            postgresql_where=text("failed_at IS NULL"),
        ),
        Index("ix_requests_status_seq", "status", "seq"),
        # Serves a subject's requests, failed ones included (which the partial index above leaves out).
        Index("ix_requests_subject_nonce", "subject", "nonce"),
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    kind: Mapped[int] = mapped_column(Integer)
    subject: Mapped[bytes] = mapped_column(LargeBinary(32))
    partner: Mapped[str] = mapped_column(String(42))
    purpose: Mapped[bytes] = mapped_column(LargeBinary(32))
    attributes: Mapped[str] = mapped_column(String(80))  # uint256 as decimal
    valid_until: Mapped[int] = mapped_column(BigInteger)
    nonce: Mapped[int] = mapped_column(BigInteger)
    deadline: Mapped[int] = mapped_column(BigInteger)
    controller: Mapped[str] = mapped_column(String(42))
    v: Mapped[int] = mapped_column(Integer)
    r: Mapped[bytes] = mapped_column(LargeBinary(32))
    s: Mapped[bytes] = mapped_column(LargeBinary(32))
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.PENDING)
    batch_id: Mapped[int | None] = mapped_column(Integer, default=None)
    tx_hash: Mapped[str | None] = mapped_column(String(66), default=None)
    block_number: Mapped[int | None] = mapped_column(BigInteger, default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_detail: Mapped[str | None] = mapped_column(String(500), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)  # see the index


class RelayBatch(Base):
    """A batch transaction the relayer signed: written before it is sent, so a restart can find it."""

    __tablename__ = "relay_batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Not unique: after a reorganisation the same signed transaction may be sent again.
    tx_hash: Mapped[str] = mapped_column(String(66), index=True)
    operator_nonce: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="sent")  # sent, mined, reverted, dropped
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ConsentEvent(IndexedEvent, Base):
    """A ConsentGranted / ConsentRevoked / ControllerBound log as indexed (the read model's history; its
    id and place in the chain are `IndexedEvent`'s columns)."""

    __tablename__ = "consent_events"
    __table_args__ = (
        UniqueConstraint("block_hash", "log_index", name="uq_event_position"),
        Index("ix_events_key", "subject", "partner", "purpose"),
        Index("ix_events_block", "block_number"),
    )

    kind: Mapped[int] = mapped_column(Integer)
    subject: Mapped[bytes] = mapped_column(LargeBinary(32))
    partner: Mapped[str] = mapped_column(String(42))
    purpose: Mapped[bytes] = mapped_column(LargeBinary(32))
    changed: Mapped[str] = mapped_column(String(80))
    attributes: Mapped[str] = mapped_column(String(80))
    valid_until: Mapped[int] = mapped_column(BigInteger)
    nonce: Mapped[int] = mapped_column(BigInteger)


class ConsentState(Base):
    """Current on-chain consent per (subject, partner, purpose), as of the indexed head."""

    __tablename__ = "consent_state"

    subject: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    partner: Mapped[str] = mapped_column(String(42), primary_key=True)
    purpose: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    attributes: Mapped[str] = mapped_column(String(80))
    valid_until: Mapped[int] = mapped_column(BigInteger)
    block_number: Mapped[int] = mapped_column(BigInteger)
    tx_hash: Mapped[str] = mapped_column(String(66))


class ControllerState(Base):
    """The key bound to each subject on-chain, as of the indexed head."""

    __tablename__ = "controller_state"

    subject: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    controller: Mapped[str] = mapped_column(String(42), index=True)
    block_number: Mapped[int] = mapped_column(BigInteger)


class BoundController(Base):
    """A binding the service made and acknowledged: what the chain must hold."""

    __tablename__ = "bound_controllers"

    subject: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    controller: Mapped[str] = mapped_column(String(42))
    tx_hash: Mapped[str] = mapped_column(String(66))  # of the last transaction that bound it
    block_number: Mapped[int] = mapped_column(BigInteger)


def latest_binding(session: Session, subject: bytes) -> ConsentEvent | None:
    """The read model's newest event binding `subject`'s key (the key is in its `partner`), if any."""
    return session.scalars(
        select(ConsentEvent)
        .where(ConsentEvent.subject == subject, ConsentEvent.kind == KIND_BIND)
        .order_by(ConsentEvent.block_number.desc(), ConsentEvent.log_index.desc())
        .limit(1)
    ).first()


def _mark_failed(connection: Connection) -> None:
    """`consent_requests.failed_at` (added with `LIVE_NONCE_INDEX`), set for the requests that had failed
    before it existed, so that the index sees them as failed."""
    table = cast(Table, ConsentRequest.__table__)
    connection.execute(update(table).where(table.c.status == RequestStatus.FAILED).values(failed_at=table.c.updated_at))


BACKFILLS["consent_requests.failed_at"] = _mark_failed
# The partial unique index on (subject, nonce) WHERE status != 'failed', which `LIVE_NONCE_INDEX` replaced.
RETIRED_INDEXES.add("uq_live_subject_nonce")
