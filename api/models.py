"""The API's own tables (in the service database beside the ledger's outbox and read model)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, LargeBinary, String, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column

from ledger.store import BACKFILLS, Base, utcnow


class Principal(Base):
    """A service account: operator, issuer, partner or auditor. Only the key's SHA-256 is stored."""

    __tablename__ = "principals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[str] = mapped_column(String(300))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    address: Mapped[str | None] = mapped_column(String(42), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    key_rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)  # its key works no more


class ClaimCode(Base):
    """A one-time code the operator hands a newly enrolled customer to bind their key."""

    __tablename__ = "claim_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[bytes] = mapped_column(LargeBinary(32), index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class RecoveryClaim(Base):
    """A one-time code the operator hands a verified customer who lost their key: it starts a recovery
    to one new key (`new_controller`, set when used) and completes it once due."""

    __tablename__ = "recovery_claims"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[bytes] = mapped_column(LargeBinary(32), index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    new_controller: Mapped[str | None] = mapped_column(String(42), default=None)


class SignInChallenge(Base):
    """An EIP-4361 message that was used to sign in: kept until it expires, so that it works once.
    (Issued messages are not stored: `api.auth.issue_challenge`.)"""

    __tablename__ = "signin_challenges"

    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    address: Mapped[str] = mapped_column(String(42))
    message: Mapped[str] = mapped_column(String(2000))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)  # pruned by it
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class CustomerSession(Base):
    """A customer's bearer token (only its SHA-256), short-lived."""

    __tablename__ = "customer_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[bytes] = mapped_column(LargeBinary(32), index=True)
    address: Mapped[str] = mapped_column(String(42))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)  # pruned by it


class Partner(Base):
    """A partner of the programme. `on_chain`: whether the chain gives its address the partner role
    (granted once added; taken back once retired). A retired partner stays listed: records name it."""

    __tablename__ = "partners"

    address: Mapped[str] = mapped_column(String(42), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    on_chain: Mapped[bool] = mapped_column(default=False)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class PurposeRow(Base):
    """A purpose of processing, named by a Fideslang data use key."""

    __tablename__ = "purposes"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(500), default="")
    # GDPR art. 6(1) basis (`api.reference.LEGAL_BASES`); NULL only in a database made before it existed,
    # until `create_schema` backfills it (`api.reference`).
    legal_basis: Mapped[str | None] = mapped_column(String(32), nullable=True)


def _legal_bases(connection: Connection) -> None:
    """Purposes made before the legal basis was recorded: the seeded "essential.service" is needed for the
    contract (GDPR art. 6(1)(b)); every other purpose was offered for consent, so it stays consent."""
    connection.execute(
        text(
            "UPDATE purposes SET legal_basis = CASE WHEN key = 'essential.service' THEN 'contract' "
            "ELSE 'consent' END WHERE legal_basis IS NULL"
        )
    )


BACKFILLS["purposes.legal_basis"] = _legal_bases


class AttributeRow(Base):
    """An attribute category, named by a Fideslang data category key; `bit` is its place in the bitmask."""

    __tablename__ = "attributes"

    bit: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200))
