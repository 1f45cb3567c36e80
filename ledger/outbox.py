"""Accepting signed consent changes into the outbox, and reading consent status.

The status a customer sees combines the chain (read model) with what is accepted but not yet on
it: a pending revocation takes effect at once (deny wins while pending); a pending grant only once
its event is on-chain.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ledger.consent import SignedChange
from ledger.eip712 import ChangeKind
from ledger.errors import LedgerError
from ledger.store import ConsentEvent, ConsentRequest, ConsentState, RequestStatus, sessions

LIVE = (RequestStatus.PENDING, RequestStatus.SUBMITTED)


class NonceConflict(LedgerError):
    """Raised when a signed change does not carry the controller's next nonce (replayed or out of order)."""


@dataclass(frozen=True)
class ConsentStatus:
    partner: str
    purpose: bytes
    attributes: int  # effective now: on-chain, minus pending revocations, lapsed → 0
    on_chain: int
    pending_grant: int
    pending_revoke: int
    valid_until: int
    status: str  # active, pending, revoked, expired
    tx_hash: str | None
    block_number: int | None


class Outbox:
    def __init__(self, engine: Engine) -> None:
        self._sessions = sessions(engine)

    def next_nonce(self, controller: str, chain_nonce: int) -> int:
        """The nonce the controller's next change must carry: after everything accepted and live."""
        with self._sessions() as session:
            highest = session.scalar(
                select(func.max(ConsentRequest.nonce)).where(
                    ConsentRequest.controller == controller, ConsentRequest.status != RequestStatus.FAILED
                )
            )
        return max(chain_nonce, -1 if highest is None else highest + 1)

    def accept(self, signed: SignedChange, controller: str, chain_nonce: int) -> ConsentRequest:
        """Store a checked, signed change durably (committed before returning); the relayer takes it from here."""
        change, sig = signed.change, signed.signature
        expected = self.next_nonce(controller, chain_nonce)
        if change.nonce != expected:
            raise NonceConflict(f"nonce {change.nonce} is not the next one ({expected}); prepare the change again")
        request = ConsentRequest(
            id=str(uuid.uuid4()),
            kind=int(change.kind),
            subject=bytes(change.subject),
            partner=change.partner,
            purpose=bytes(change.purpose),
            attributes=str(change.attributes),
            valid_until=change.valid_until,
            nonce=change.nonce,
            deadline=change.deadline,
            controller=controller,
            v=sig.v,
            r=sig.r,
            s=sig.s,
            status=RequestStatus.PENDING,
        )
        try:
            with self._sessions.begin() as session:
                session.add(request)
        except IntegrityError as exc:  # a concurrent request took this nonce first
            raise NonceConflict(f"nonce {change.nonce} is already used; prepare the change again") from exc
        return request

    def request(self, request_id: str) -> ConsentRequest | None:
        with self._sessions() as session:
            return session.scalar(select(ConsentRequest).where(ConsentRequest.id == request_id))

    def event_for(self, request: ConsentRequest) -> ConsentEvent | None:
        with self._sessions() as session:
            return session.scalar(
                select(ConsentEvent).where(
                    ConsentEvent.subject == request.subject,
                    ConsentEvent.nonce == request.nonce,
                    ConsentEvent.kind == request.kind,
                )
            )

    def requests_of(self, subject: bytes, limit: int = 200) -> list[ConsentRequest]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(ConsentRequest)
                    .where(ConsentRequest.subject == subject)
                    .order_by(ConsentRequest.seq.desc())
                    .limit(limit)
                )
            )

    def consents_of(self, subject: bytes, now: int | None = None) -> list[ConsentStatus]:
        now = int(time.time()) if now is None else now
        with self._sessions() as session:
            states = {
                (s.partner, s.purpose): s
                for s in session.scalars(select(ConsentState).where(ConsentState.subject == subject))
            }
            pending = _pending(session, subject)
        keys = set(states) | set(pending)
        result = []
        for key in sorted(keys):
            state = states.get(key)
            grant, revoke = pending.get(key, (0, 0))
            on_chain = int(state.attributes) if state else 0
            valid_until = state.valid_until if state else 0
            lapsed = valid_until != 0 and valid_until <= now
            effective = 0 if lapsed else on_chain & ~revoke
            if effective:
                status = "active"
            elif grant:
                status = "pending"
            elif lapsed and on_chain:
                status = "expired"
            else:
                status = "revoked"
            result.append(
                ConsentStatus(
                    partner=key[0],
                    purpose=key[1],
                    attributes=effective,
                    on_chain=on_chain,
                    pending_grant=grant,
                    pending_revoke=revoke,
                    valid_until=valid_until,
                    status=status,
                    tx_hash=state.tx_hash if state else None,
                    block_number=state.block_number if state else None,
                )
            )
        return result

    def effective(self, subject: bytes, partner: str, purpose: bytes, now: int | None = None) -> int:
        """Attributes `partner` may use now for `purpose` (deny wins while a revocation is pending)."""
        for status in self.consents_of(subject, now):
            if status.partner == partner and status.purpose == purpose:
                return status.attributes
        return 0


def _pending(session: Session, subject: bytes) -> dict[tuple[str, bytes], tuple[int, int]]:
    pending: dict[tuple[str, bytes], tuple[int, int]] = {}
    rows = session.scalars(
        select(ConsentRequest).where(ConsentRequest.subject == subject, ConsentRequest.status.in_(LIVE))
    )
    for row in rows:
        grant, revoke = pending.get((row.partner, row.purpose), (0, 0))
        bits = int(row.attributes)
        if row.kind == ChangeKind.GRANT:
            grant |= bits
        else:
            revoke |= bits
        pending[(row.partner, row.purpose)] = (grant, revoke)
    return pending
