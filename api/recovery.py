"""Recovery claim codes, issued by the operator's route (`api.routers.recovery`) and by the command
line (`consent-ledger customers recovery-claim`): one live code per customer, kept as its hash."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from api import auth
from api.models import RecoveryClaim
from identity.did import SubjectRecord
from identity.types import Subject

RECOVERY_CLAIM_LIFETIME = timedelta(days=7)


def refusal(record: SubjectRecord | None) -> tuple[int, str, str] | None:
    """Why a recovery claim cannot be issued for this customer (status, problem code, title), or None."""
    if record is None:
        return 404, "unknown_customer", "No such customer"
    if record.erased_at is not None:
        return 409, "customer_erased", "This customer's data was erased"
    if not record.controller:
        return 409, "not_bound", "This customer has not bound a key yet; their enrolment claim code binds one"
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
