"""The points tables in the service database: the lane's queue (issuances and redemptions, with their
idempotency records) and the read model the follower builds from `LoyaltyPoints` events."""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from ledger.points.client import EventKind, PointsEvent
from ledger.store import Base, IndexedEvent, delete_in_batches, utcnow


class PointsStatus(enum.StrEnum):
    PENDING = "pending"  # accepted, not yet sent
    SUBMITTED = "submitted"  # in a sent batch transaction
    DONE = "done"  # applied on-chain (settled from its transaction's receipt)
    FAILED = "failed"  # the chain refused it; `error_code` says why


LIVE = (PointsStatus.PENDING, PointsStatus.SUBMITTED)
FINAL = (PointsStatus.DONE, PointsStatus.FAILED)


class PointsRequest(Base):
    """One issuance or redemption to put on-chain. `ref` is its on-chain id (issuanceId or
    redemptionId): the contract applies an id once, so sending a request again is always safe."""

    __tablename__ = "points_requests"
    __table_args__ = (
        Index("ix_points_requests_status_seq", "status", "seq"),
        Index("ix_points_requests_live_nonce", "controller", "partner", "status"),
        # Settling a batch reads its requests, under the write lock: by scanning the table, that
        # grew with every redemption ever made.
        Index("ix_points_requests_batch", "batch_id"),
        Index("ix_points_requests_unindexed", "status", "indexed"),  # the audit's done-but-unseen requests
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    kind: Mapped[str] = mapped_column(String(8))  # issue, redeem
    ref: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    subject: Mapped[bytes] = mapped_column(LargeBinary(32), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger, default=0)  # issuances
    partner: Mapped[str | None] = mapped_column(String(42), default=None)  # redemptions
    controller: Mapped[str | None] = mapped_column(String(42), default=None)
    nonce: Mapped[str | None] = mapped_column(String(80), default=None)  # uint256 as decimal (keyed)
    deadline: Mapped[int] = mapped_column(BigInteger, default=0)
    v: Mapped[int] = mapped_column(Integer, default=0)
    r: Mapped[bytes] = mapped_column(LargeBinary(32), default=b"")
    s: Mapped[bytes] = mapped_column(LargeBinary(32), default=b"")
    principal: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default=PointsStatus.PENDING)
    batch_id: Mapped[int | None] = mapped_column(Integer, default=None)
    tx_hash: Mapped[str | None] = mapped_column(String(66), default=None)
    block_number: Mapped[int | None] = mapped_column(BigInteger, default=None)
    lot_id: Mapped[int | None] = mapped_column(BigInteger, default=None)
    balance: Mapped[int | None] = mapped_column(BigInteger, default=None)  # after a redemption
    indexed: Mapped[bool] = mapped_column(default=False)  # the indexer has seen its event
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_detail: Mapped[str | None] = mapped_column(String(500), default=None)
    # The partner's own order reference of a redemption (printable, bounded by the API): off-chain only,
    # shown in the partner's statement and the customer's history. Nullable: added to older databases.
    reference: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RedemptionCode(Base):
    """A customer's signed `Redemption`, kept by the service behind a short code the partner types (see
    `api.routers.codes`). The signature never leaves the service: the partner redeems by the code, and
    only the partner the authorisation names can. Whether it is still outstanding is `RedemptionCodeEnd`'s
    to say (used or cancelled), or its deadline's."""

    __tablename__ = "redemption_codes"
    __table_args__ = (Index("ix_redemption_codes_subject", "subject", "deadline"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(10), unique=True)  # Crockford base32, normalised
    redemption_id: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    subject: Mapped[bytes] = mapped_column(LargeBinary(32))
    controller: Mapped[str] = mapped_column(String(42))
    partner: Mapped[str] = mapped_column(String(42))
    amount: Mapped[int] = mapped_column(BigInteger)
    nonce: Mapped[str] = mapped_column(String(80))  # uint256 as decimal (keyed)
    deadline: Mapped[int] = mapped_column(BigInteger)
    v: Mapped[int] = mapped_column(Integer)
    r: Mapped[bytes] = mapped_column(LargeBinary(32))
    s: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RedemptionCodeEnd(Base):
    """How a code ended: `used` (a partner's redemption was queued with it, in the same transaction as
    the request) or `cancelled` (by the customer). The primary key makes the two race safely: whichever
    commits first wins, the other gets an IntegrityError."""

    __tablename__ = "redemption_code_ends"

    code_id: Mapped[int] = mapped_column(Integer, primary_key=True)  # RedemptionCode.id
    outcome: Mapped[str] = mapped_column(String(16))  # used, cancelled
    request_id: Mapped[str | None] = mapped_column(String(36), default=None)  # the PointsRequest, when used
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PointsBatch(Base):
    """A points batch transaction: recorded before it is sent, so a restart can find it."""

    __tablename__ = "points_batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tx_hash: Mapped[str] = mapped_column(String(66), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    operator_nonce: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="sent")  # sent, mined, reverted, dropped
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdempotencyRecord(Base):
    """What a principal's `Idempotency-Key` was first used for: the requests it queued, or the error
    answer it got (see `api.idempotency`)."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("principal", "key", name="uq_idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    principal: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(255))
    route: Mapped[str] = mapped_column(String(100))
    request_hash: Mapped[str] = mapped_column(String(64))
    request_ids: Mapped[str] = mapped_column(Text, default="")  # the points requests it made, space-separated
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)  # None: answered by its requests
    body: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)  # pruned by it


def prune_idempotency_records(
    sessions: Callable[[], AbstractContextManager[Session]], older_than: timedelta, *, batch: int = 5_000
) -> int:
    """Forget the Idempotency-Keys first used more than `older_than` ago; returns how many. A retry
    with a forgotten key is a new request: one whose authorisation was used is refused (the on-chain
    id is unique), never applied twice."""
    cutoff = utcnow() - older_than
    return delete_in_batches(sessions, IdempotencyRecord.id, IdempotencyRecord.created_at < cutoff, batch=batch)


class PointsLot(Base):
    """A live lot as of the indexed head: what is left of it and when it expires."""

    __tablename__ = "points_lots"

    subject: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    lot_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)


class PointsHistory(IndexedEvent, Base):
    """A `LoyaltyPoints` log as indexed: issued, redeemed, expired, or a rejected batch item (its id and
    place in the chain are `IndexedEvent`'s columns)."""

    __tablename__ = "points_history"
    __table_args__ = (
        UniqueConstraint("block_hash", "log_index", name="uq_points_event_position"),
        Index("ix_points_history_subject", "subject", "block_number"),
        Index("ix_points_history_partner", "partner", "block_time"),
        Index("ix_points_history_block", "block_number"),
        Index("ix_points_history_ref", "ref"),
    )

    kind: Mapped[int] = mapped_column(Integer)  # ledger.points.client.EventKind
    subject: Mapped[bytes] = mapped_column(LargeBinary(32))
    ref: Mapped[bytes] = mapped_column(LargeBinary(32))
    partner: Mapped[str | None] = mapped_column(String(42), default=None)
    lot_id: Mapped[int] = mapped_column(BigInteger, default=0)
    amount: Mapped[int] = mapped_column(BigInteger, default=0)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str | None] = mapped_column(String(100), default=None)


def finish(request: PointsRequest, event: PointsEvent) -> None:
    """Mark a request done by the event that applied it (the lane from its batch's receipt, the follower
    from the chain's logs when it sees the event first)."""
    request.status = PointsStatus.DONE
    request.tx_hash = event.tx_hash
    request.block_number = event.block_number
    request.lot_id = event.lot_id if event.kind is EventKind.ISSUED else None
    request.balance = event.balance if event.kind is EventKind.REDEEMED else None
    request.error_code = None
    request.error_detail = None
    request.updated_at = utcnow()


# The redemption route's reads, built once and run on a Core connection: measured on SQLite, a
# statement built per call and run through an ORM session cost 170 us; prebuilt, on a connection, 37 us.
IDEMPOTENCY_RECORD = select(
    IdempotencyRecord.request_hash,
    IdempotencyRecord.route,
    IdempotencyRecord.request_ids,
    IdempotencyRecord.status_code,
    IdempotencyRecord.body,
).where(IdempotencyRecord.principal == bindparam("principal"), IdempotencyRecord.key == bindparam("key"))
REQUEST_BY_REF = select(PointsRequest.id).where(PointsRequest.ref == bindparam("ref"))
