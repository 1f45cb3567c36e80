"""Recovery claim codes, issued by the operator's route (`api.routers.recovery`) and by the command
line (`consent-ledger customers recovery-claim`): one live code per customer, kept as its hash."""

from __future__ import annotations

import enum
import secrets
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from api import auth
from api.models import RecoveryClaim
from identity.did import SubjectRecord
from identity.types import Subject

RECOVERY_CLAIM_LIFETIME = timedelta(days=7)


class Refusal(enum.Enum):
    """Why a recovery claim cannot be issued for a customer."""

    UNKNOWN = "No such customer"
    ERASED = "This customer's data was erased"
    NOT_BOUND = "This customer has not bound a key yet; their enrolment claim code binds one"


def refusal(record: SubjectRecord | None) -> Refusal | None:
    """Why a recovery claim cannot be issued for this customer, or None."""
    if record is None:
        return Refusal.UNKNOWN
    if record.erased_at is not None:
        return Refusal.ERASED
    if not record.controller:
        return Refusal.NOT_BOUND
    return None


def issue_claim(session: Session, subject: Subject) -> tuple[str, datetime]:
    """A new recovery claim code for `subject` and when it expires; an earlier unused one stops working
    (in the caller's write transaction)."""
    code = secrets.token_urlsafe(12)
    expires_at = auth.now() + RECOVERY_CLAIM_LIFETIME
    live = update(RecoveryClaim).where(RecoveryClaim.subject == subject, RecoveryClaim.used_at.is_(None))
    session.execute(live.values(used_at=auth.now()))
    session.add(RecoveryClaim(code_hash=auth.digest(code), subject=subject, expires_at=expires_at))
    return code, expires_at
