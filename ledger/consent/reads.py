"""The consent reads: each customer's consent status and each partner's permissions, from the read
model (`ConsentState`) combined with what is accepted but not yet on-chain (the outbox's live
requests): a pending revocation takes effect at once (deny wins while pending); a pending grant only
once its event is on-chain."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Engine, Integer, Select, literal, null, select, union_all

from ledger.consent.tables import LIVE, ConsentRequest, ConsentState
from ledger.eip712 import ChangeKind
from ledger.store import sessions
from ledger.types import AttributeMask, Purpose


@dataclass(frozen=True)
class ConsentStatus:
    partner: str
    purpose: Purpose
    attributes: AttributeMask  # effective now: on-chain, minus pending revocations, lapsed → 0
    on_chain: AttributeMask
    pending_grant: AttributeMask
    pending_revoke: AttributeMask
    valid_until: int
    status: str  # active, pending, revoked, expired
    tx_hash: str | None
    block_number: int | None


class ConsentReader:
    """Consent status for customers, and permissions for the bridge, each read in one statement (one
    snapshot of the read model and the live requests)."""

    def __init__(self, engine: Engine) -> None:
        self._sessions = sessions(engine)

    def consents_of(self, subject: bytes, now: int | None = None) -> list[ConsentStatus]:
        now = int(time.time()) if now is None else now
        states: dict[tuple[str, bytes], Any] = {}
        pending: dict[tuple[str, bytes], tuple[int, int]] = {}
        with self._sessions() as session:
            # One statement, so one snapshot: the state and the live requests must be of the same moment.
            # Read apart, an indexer commit in between (confirming a revocation: its request leaves the
            # live ones as its effect enters the state) showed the old bits with no revocation pending.
            for row in session.execute(_subject_view(subject)):
                key = (row.partner, bytes(row.purpose))
                if row.kind == _STATE:
                    states[key] = row
                    continue
                grant, revoke = pending.get(key, (0, 0))
                if row.kind == ChangeKind.GRANT:
                    grant |= int(row.attributes)
                else:
                    revoke |= int(row.attributes)
                pending[key] = (grant, revoke)
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
                    purpose=Purpose(key[1]),
                    attributes=AttributeMask(effective),
                    on_chain=AttributeMask(on_chain),
                    pending_grant=AttributeMask(grant),
                    pending_revoke=AttributeMask(revoke),
                    valid_until=valid_until,
                    status=status,
                    tx_hash=state.tx_hash if state else None,
                    block_number=state.block_number if state else None,
                )
            )
        return result

    def effective(self, subject: bytes, partner: str, purpose: bytes, now: int | None = None) -> AttributeMask:
        """Attributes `partner` may use now for `purpose` (deny wins while a revocation is pending)."""
        for status in self.consents_of(subject, now):
            if status.partner == partner and status.purpose == purpose:
                return status.attributes
        return AttributeMask(0)

    def permissions(self, partner: str, purpose: bytes, now: int | None = None) -> dict[bytes, AttributeMask]:
        """Every subject's attributes that `partner` may use now for `purpose`, as `effective` gives
        them one by one (deny wins while a revocation is pending); subjects with none are left out.
        Read in one statement (one snapshot), as `consents_of`: the bridge releases by this."""
        now = int(time.time()) if now is None else now
        on_chain: dict[bytes, AttributeMask] = {}
        revoking: list[tuple[bytes, int]] = []
        with self._sessions() as session:
            for subject, attributes, valid_until, kind in session.execute(_permission_view(partner, purpose)):
                if kind == _STATE:
                    lapsed = valid_until != 0 and valid_until <= now
                    on_chain[bytes(subject)] = AttributeMask(0 if lapsed else int(attributes))
                else:
                    revoking.append((bytes(subject), int(attributes)))
        for subject, attributes in revoking:
            if subject in on_chain:
                on_chain[subject] = AttributeMask(on_chain[subject] & ~attributes)
        return {subject: bits for subject, bits in on_chain.items() if bits}


_STATE = -1  # the `kind` of a consent_state row in the views below (requests carry their ChangeKind)


def _subject_view(subject: bytes) -> Select[Any]:
    """A subject's on-chain consents and its live requests, in one statement."""
    states = select(
        ConsentState.partner,
        ConsentState.purpose,
        ConsentState.attributes,
        ConsentState.valid_until,
        ConsentState.tx_hash,
        ConsentState.block_number,
        literal(_STATE, Integer).label("kind"),
    ).where(ConsentState.subject == subject)
    requests = select(
        ConsentRequest.partner,
        ConsentRequest.purpose,
        ConsentRequest.attributes,
        ConsentRequest.valid_until,
        null().label("tx_hash"),
        null().label("block_number"),
        ConsentRequest.kind,
    ).where(ConsentRequest.subject == subject, ConsentRequest.status.in_(LIVE))
    return cast(Select[Any], union_all(states, requests))


def _permission_view(partner: str, purpose: bytes) -> Select[Any]:
    """Every subject's on-chain consent to (partner, purpose) and the live revocations of it, in one statement."""
    states = select(
        ConsentState.subject,
        ConsentState.attributes,
        ConsentState.valid_until,
        literal(_STATE, Integer).label("kind"),
    ).where(ConsentState.partner == partner, ConsentState.purpose == purpose)
    revocations = select(
        ConsentRequest.subject, ConsentRequest.attributes, ConsentRequest.valid_until, ConsentRequest.kind
    ).where(
        ConsentRequest.partner == partner,
        ConsentRequest.purpose == purpose,
        ConsentRequest.kind == ChangeKind.REVOKE,
        ConsentRequest.status.in_(LIVE),
    )
    return cast(Select[Any], union_all(states, revocations))
