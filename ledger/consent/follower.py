"""The consent follower: the indexer's part for `ConsentRegistry` (see `ledger.indexer.Follower`), which
builds the read model (`ledger.consent.tables`: the events' history, current consents, bound keys) from
the chain's events and confirms the requests they applied. After a reorganisation it folds the
consents again from the history that is left, and queues again the requests whose events were taken
back."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from web3 import Web3

from ledger.consent.client import CHANGE_KINDS, KIND_BIND, KIND_GRANT, TOPICS, RegistryEvent, decode
from ledger.consent.tables import (
    ConsentEvent,
    ConsentRequest,
    ConsentState,
    ControllerState,
    RequestStatus,
    latest_binding,
)
from ledger.metrics import count_consent
from ledger.store import Bulk, IndexedBlock, event_position, utcnow


class ConsentFollower:
    """The indexer's part for `ConsentRegistry`: history rows, folded consents, bound keys, and requests
    confirmed by their events."""

    def __init__(self, address: str, dialect: Dialect) -> None:
        self.address: str = Web3.to_checksum_address(address)
        self.topics = TOPICS
        self._insert_events = Bulk(_INSERT_EVENTS, dialect)
        self._delete_states = Bulk(_DELETE_STATES, dialect)
        self._insert_states = Bulk(_INSERT_STATES, dialect)
        self._confirm = Bulk(_CONFIRM, dialect)

    def prepare(self, logs: Sequence[dict[str, Any]], times: dict[int, int]) -> Callable[[Session], int]:
        """Decode the range's logs and make the rows of the bulk statements now, before the indexer takes
        the write lock, which every request's commit waits on."""
        decoded = [e for e in (decode(item) for item in logs) if e is not None]
        new_events = self._insert_events.prepare(_event_row(e, times) for e in decoded)
        now = utcnow()
        confirmations = self._confirm.prepare(_confirmation(e, now) for e in decoded if e.kind in CHANGE_KINDS)

        def apply(session: Session) -> int:
            self._apply(session, decoded, new_events, confirmations)
            return len(decoded)

        return apply

    def _apply(
        self, session: Session, decoded: list[RegistryEvent], new_events: list[Any], confirmations: list[Any]
    ) -> None:
        """Apply a range's events in bulk: driver-level statements with their rows made before the write
        lock was taken (`Bulk`; the ORM per row, then SQLAlchemy's per-row parameters, were the
        indexer's cost, and it holds the lock every request's commit waits on)."""
        if not decoded:
            return
        connection = session.connection()
        self._insert_events.execute(connection, new_events)
        # The indexer's block hashes, for these events' blocks too: a reorganisation's common ancestor is
        # looked for among them.
        for number, block_hash in {e.block_number: e.block_hash for e in decoded}.items():
            session.merge(IndexedBlock(number=number, hash=block_hash))
        for bound in (e for e in decoded if e.kind == KIND_BIND):
            session.merge(
                ControllerState(subject=bound.subject, controller=bound.partner, block_number=bound.block_number)
            )
        changes = [e for e in decoded if e.kind in CHANGE_KINDS]  # recoveries are read from the history
        if not changes:
            return
        # Fold the range into the latest state per key, starting from what is stored.
        keys = {(e.subject, e.partner, e.purpose) for e in changes}
        states = _STATES
        stored = {
            (s.subject, s.partner, s.purpose): s.valid_until
            for s in connection.execute(
                select(states.c.subject, states.c.partner, states.c.purpose, states.c.valid_until).where(
                    states.c.subject.in_({k[0] for k in keys})
                )
            )
        }
        latest: dict[tuple[bytes, str, bytes], dict[str, object]] = {}
        for e in changes:
            key = (e.subject, e.partner, e.purpose)
            previous_until = latest[key]["valid_until"] if key in latest else stored.get(key, 0)
            latest[key] = {
                "subject": e.subject,
                "partner": e.partner,
                "purpose": e.purpose,
                "attributes": str(e.attributes),
                "valid_until": e.valid_until if e.kind == KIND_GRANT else previous_until,
                "block_number": e.block_number,
                "tx_hash": e.tx_hash,
            }
        replaced = keys & set(stored)
        self._delete_states.execute(
            connection,
            self._delete_states.prepare({"k_subject": k[0], "k_partner": k[1], "k_purpose": k[2]} for k in replaced),
        )
        self._insert_states.execute(connection, self._insert_states.prepare(latest.values()))
        # Requests are confirmed by the chain's own event (`_CONFIRM`).
        count_consent("confirmed", self._confirm.execute(connection, confirmations))

    def rollback(self, session: Session, ancestor: int) -> None:
        gone = list(session.scalars(select(ConsentEvent).where(ConsentEvent.block_number > ancestor)))
        session.execute(delete(ConsentEvent).where(ConsentEvent.block_number > ancestor))
        _refold(session, gone)
        # What the chain no longer has must be sent again (the signatures are still valid).
        session.execute(
            update(ConsentRequest)
            .where(ConsentRequest.status == RequestStatus.CONFIRMED, ConsentRequest.block_number > ancestor)
            .values(status=RequestStatus.PENDING, tx_hash=None, block_number=None, batch_id=None, updated_at=utcnow())
        )


def _refold(session: Session, gone: Iterable[ConsentEvent]) -> None:
    """The consents and bound keys that `gone` events touched, folded again from the history left."""
    keys = {(e.subject, e.partner, e.purpose) for e in gone if e.kind in CHANGE_KINDS}
    subjects = {e.subject for e in gone if e.kind == KIND_BIND}
    for subject, partner, purpose in keys:
        session.execute(
            delete(ConsentState).where(
                ConsentState.subject == subject, ConsentState.partner == partner, ConsentState.purpose == purpose
            )
        )
        remaining = session.scalars(
            select(ConsentEvent)
            .where(ConsentEvent.subject == subject, ConsentEvent.partner == partner, ConsentEvent.purpose == purpose)
            .order_by(ConsentEvent.block_number, ConsentEvent.log_index)
        )
        state: ConsentState | None = None
        for e in remaining:
            valid_until = e.valid_until if e.kind == KIND_GRANT else (state.valid_until if state else 0)
            state = ConsentState(
                subject=subject,
                partner=partner,
                purpose=purpose,
                attributes=e.attributes,
                valid_until=valid_until,
                block_number=e.block_number,
                tx_hash=e.tx_hash,
            )
        if state is not None:
            session.add(state)
    for subject in subjects:
        session.execute(delete(ControllerState).where(ControllerState.subject == subject))
        last = latest_binding(session, subject)
        if last is not None:
            session.add(ControllerState(subject=subject, controller=last.partner, block_number=last.block_number))


def _bound_row(table: Table, names: Iterable[str]) -> dict[str, Any]:
    return {name: bindparam(name, type_=table.c[name].type) for name in names}


_EVENTS = cast(Table, ConsentEvent.__table__)
_STATES = cast(Table, ConsentState.__table__)
_REQUESTS = cast(Table, ConsentRequest.__table__)
_EVENT_COLUMNS = [c.name for c in _EVENTS.columns if c.name != "id"]
_INSERT_EVENTS = insert(_EVENTS).values(_bound_row(_EVENTS, _EVENT_COLUMNS))
_INSERT_STATES = insert(_STATES).values(_bound_row(_STATES, [c.name for c in _STATES.columns]))
_DELETE_STATES = delete(_STATES).where(
    _STATES.c.subject == bindparam("k_subject"),
    _STATES.c.partner == bindparam("k_partner"),
    _STATES.c.purpose == bindparam("k_purpose"),
)
# (subject, nonce, kind) names one live change (found by the live nonce index). A failed one that held
# the nonce before is not it (and two live rows cannot share a nonce).
_CONFIRM = (
    update(_REQUESTS)
    .where(
        _REQUESTS.c.subject == bindparam("e_subject"),
        _REQUESTS.c.nonce == bindparam("e_nonce"),
        _REQUESTS.c.kind == bindparam("e_kind"),
        _REQUESTS.c.failed_at.is_(None),
        _REQUESTS.c.status != RequestStatus.CONFIRMED,
    )
    .values(
        status=RequestStatus.CONFIRMED,
        tx_hash=bindparam("e_tx"),
        block_number=bindparam("e_block"),
        error_code=None,
        error_detail=None,
        updated_at=bindparam("e_at", type_=_REQUESTS.c.updated_at.type),
    )
)


def _event_row(e: RegistryEvent, times: dict[int, int]) -> dict[str, Any]:
    return {
        **event_position(e, times),
        "kind": e.kind,
        "subject": e.subject,
        "partner": e.partner,
        "purpose": e.purpose,
        "changed": str(e.changed),
        "attributes": str(e.attributes),
        "valid_until": e.valid_until,
        "nonce": e.nonce,
    }


def _confirmation(e: RegistryEvent, at: datetime) -> dict[str, Any]:
    return {
        "e_subject": e.subject,
        "e_nonce": e.nonce,
        "e_kind": e.kind,
        "e_tx": e.tx_hash,
        "e_block": e.block_number,
        "e_at": at,
    }
