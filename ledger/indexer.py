"""The event indexer: follows ConsentRegistry's logs (and its followers' contracts, such as
LoyaltyPoints) from the deploy block into the read model.

It resumes from its cursor after a restart, and tolerates reorganisations up to `reorg_depth`
blocks: before going on it checks that the block it stopped at is still on the chain, and if not it
rolls the read model back to the last block both agree on and re-indexes from there. Requests whose
confirming event was rolled back go back to the relayer's queue.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import Engine, Table, bindparam, delete, insert, select, update
from sqlalchemy.orm import Session
from web3 import Web3
from web3.types import RPCEndpoint

from ledger.consent.client import KIND_BIND, KIND_GRANT, TOPICS, RegistryEvent, decode
from ledger.consent.tables import (
    ConsentEvent,
    ConsentRequest,
    ConsentState,
    ControllerState,
    RequestStatus,
    latest_binding,
)
from ledger.errors import ChainError
from ledger.logs import hex_of, int_of
from ledger.store import Bulk, IndexedBlock, IndexerCursor, event_position, sessions, utcnow
from ledger.types import checksummed

log = logging.getLogger(__name__)
CURSOR = "consent_registry"


class Follower(Protocol):
    """Another contract's logs, indexed in the same pass and rolled back with the same reorganisation."""

    address: str
    topics: list[str]

    def apply(self, session: Session, logs: Sequence[dict[str, Any]], times: dict[int, int]) -> int: ...

    def rollback(self, session: Session, ancestor: int) -> None: ...


class Indexer:
    def __init__(
        self,
        w3: Web3,
        engine: Engine,
        registry: str,
        deploy_block: int,
        *,
        reorg_depth: int = 64,
        chunk: int = 5_000,
        max_events: int = 1_000,
        on_change: Callable[[], None] | None = None,
        on_rollback: Callable[[int], None] | None = None,
        followers: Sequence[Follower] = (),
    ) -> None:
        self.w3 = w3
        self.followers = list(followers)
        self.registry = Web3.to_checksum_address(registry)
        self.deploy_block = deploy_block
        self.reorg_depth = reorg_depth
        self.chunk = chunk
        # Logs applied in one transaction at most (whole blocks; a bigger block alone). Catching up after
        # a pause in one transaction held the write lock, which every request's commit waits on, for
        # a hundred milliseconds and more.
        self.max_events = max_events
        self.on_change = on_change
        self.on_rollback = on_rollback  # told the block rolled back to, after the rollback
        # When the newest step that compared the read model with the chain began (monotonic clock): the
        # relayers wait for one that began after a restart of the node (`BatchLane.node_restarted`).
        self.checked_at = -math.inf
        self._sessions = sessions(engine)
        self._insert_events = Bulk(_INSERT_EVENTS, engine.dialect)
        self._delete_states = Bulk(_DELETE_STATES, engine.dialect)
        self._insert_states = Bulk(_INSERT_STATES, engine.dialect)
        self._confirm = Bulk(_CONFIRM, engine.dialect)
        self.wake = threading.Event()

    # chain access --------------------------------------------------------------------------------

    def _rpc(self, method: str, params: list[Any]) -> Any:
        response = self.w3.provider.make_request(RPCEndpoint(method), params)
        if "error" in response:
            raise ChainError(f"{method}: {response['error']}")
        return response["result"]

    def _block(self, number: int) -> dict[str, Any] | None:
        block = self._rpc("eth_getBlockByNumber", [hex(number), False])
        return dict(block) if block else None

    def _timestamp(self, number: int) -> int:
        block = self._block(number)
        if block is None:
            raise ChainError(f"block {number} vanished while indexing it")
        return int_of(block["timestamp"])

    def _times(self, logs: Sequence[dict[str, Any]]) -> dict[int, int]:
        """The timestamp of each block the logs are from: from the logs themselves where the node
        says (`blockTimestamp`: anvil, geth 1.14+), else asked block by block."""
        times: dict[int, int] = {}
        unstamped: set[int] = set()
        for item in logs:
            number, stamp = int_of(item["blockNumber"]), item.get("blockTimestamp")
            if stamp is None:
                unstamped.add(number)
            else:
                times[number] = int_of(stamp)
        for number in unstamped - times.keys():
            times[number] = self._timestamp(number)
        return times

    def _hash_of(self, number: int) -> str | None:
        block = self._block(number)
        return hex_of(block["hash"]) if block else None

    # state ---------------------------------------------------------------------------------------

    def cursor(self) -> int:
        with self._sessions() as session:
            row = session.get(IndexerCursor, CURSOR)
            return row.block_number if row else self.deploy_block - 1

    def step(self) -> int:
        """Index what is new; returns how many events were applied (negative after a rollback)."""
        began = time.monotonic()
        cursor = self.cursor()
        rolled_back = self._check_reorg(cursor)
        self.checked_at = began  # what is indexed agrees with the chain as it was then (rolled back if not)
        if rolled_back is not None:
            return -rolled_back
        head = int(self._rpc("eth_blockNumber", []), 16)
        if head <= cursor:
            return 0
        to = min(head, cursor + self.chunk)
        addresses = [self.registry, *(Web3.to_checksum_address(f.address) for f in self.followers)]
        topics = [t for f in self.followers for t in f.topics] + TOPICS
        logs = self._rpc(
            "eth_getLogs",
            [{"address": addresses, "fromBlock": hex(cursor + 1), "toBlock": hex(to), "topics": [topics]}],
        )
        if len(logs) > self.max_events:
            logs, to = _whole_blocks(logs, self.max_events)
        by_address: dict[str, list[dict[str, Any]]] = {}
        for item in logs:
            by_address.setdefault(checksummed(item["address"]), []).append(dict(item))
        decoded = [e for e in (decode(item) for item in by_address.get(self.registry, [])) if e is not None]
        times = self._times(logs)
        to_hash = self._hash_of(to)
        if to_hash is None:
            return 0  # the head moved back under us; the next step sees the reorg
        applied = len(decoded)
        new_events = self._insert_events.prepare(_event_row(e, times) for e in decoded)  # before the lock
        now = utcnow()
        confirmations = self._confirm.prepare(_confirmation(e, now) for e in decoded if e.kind != KIND_BIND)
        with self._sessions.begin() as session:
            self._apply(session, decoded, new_events, confirmations)
            for follower in self.followers:
                applied += follower.apply(session, by_address.get(checksummed(follower.address), []), times)
            self._set_cursor(session, to, to_hash)
        if applied and self.on_change is not None:
            self.on_change()
        return applied

    def _set_cursor(self, session: Session, number: int, block_hash: str) -> None:
        session.merge(IndexerCursor(name=CURSOR, block_number=number))
        session.merge(IndexedBlock(number=number, hash=block_hash))
        session.execute(delete(IndexedBlock).where(IndexedBlock.number < number - self.reorg_depth))

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
        for number, block_hash in {e.block_number: e.block_hash for e in decoded}.items():
            session.merge(IndexedBlock(number=number, hash=block_hash))
        for bound in (e for e in decoded if e.kind == KIND_BIND):
            session.merge(
                ControllerState(subject=bound.subject, controller=bound.partner, block_number=bound.block_number)
            )
        changes = [e for e in decoded if e.kind != KIND_BIND]
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
        self._confirm.execute(connection, confirmations)

    # reorganisations ----------------------------------------------------------------------------

    def _check_reorg(self, cursor: int) -> int | None:
        """None when the cursor block is still canonical; else roll back and return the depth."""
        if cursor < self.deploy_block:
            return None
        with self._sessions() as session:
            latest = session.scalar(select(IndexedBlock).order_by(IndexedBlock.number.desc()).limit(1))
        if latest is None or latest.number != cursor:
            return None
        if self._hash_of(cursor) == latest.hash:
            return None  # the common case: one row read, one block asked for
        with self._sessions() as session:
            known = list(session.scalars(select(IndexedBlock).order_by(IndexedBlock.number.desc())))
        ancestor = self.deploy_block - 1
        for block in known[1:]:
            if self._hash_of(block.number) == block.hash:
                ancestor = block.number
                break
        else:
            ancestor = max(self.deploy_block - 1, cursor - self.reorg_depth)
        log.warning("chain reorganised below block %s: rolling the read model back to %s", cursor, ancestor)
        self.rollback(ancestor)
        return cursor - ancestor

    def rollback(self, ancestor: int) -> None:
        with self._sessions.begin() as session:
            gone = list(session.scalars(select(ConsentEvent).where(ConsentEvent.block_number > ancestor)))
            session.execute(delete(ConsentEvent).where(ConsentEvent.block_number > ancestor))
            session.execute(delete(IndexedBlock).where(IndexedBlock.number > ancestor))
            session.merge(IndexerCursor(name=CURSOR, block_number=ancestor))
            self._refold(session, gone)
            for follower in self.followers:
                follower.rollback(session, ancestor)
            # What the chain no longer has must be sent again (the signatures are still valid).
            session.execute(
                update(ConsentRequest)
                .where(ConsentRequest.status == RequestStatus.CONFIRMED, ConsentRequest.block_number > ancestor)
                .values(
                    status=RequestStatus.PENDING, tx_hash=None, block_number=None, batch_id=None, updated_at=utcnow()
                )
            )
        if self.on_rollback is not None:
            self.on_rollback(ancestor)
        if self.on_change is not None:
            self.on_change()

    def _refold(self, session: Session, gone: Iterable[ConsentEvent]) -> None:
        keys = {(e.subject, e.partner, e.purpose) for e in gone if e.kind != KIND_BIND}
        subjects = {e.subject for e in gone if e.kind == KIND_BIND}
        for subject, partner, purpose in keys:
            session.execute(
                delete(ConsentState).where(
                    ConsentState.subject == subject, ConsentState.partner == partner, ConsentState.purpose == purpose
                )
            )
            remaining = session.scalars(
                select(ConsentEvent)
                .where(
                    ConsentEvent.subject == subject, ConsentEvent.partner == partner, ConsentEvent.purpose == purpose
                )
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

    # running -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, interval: float = 0.05) -> None:
        while not stop.is_set():
            try:
                while self.step() != 0 and not stop.is_set():
                    pass
            except Exception:  # a node hiccup must not kill the indexer; it resumes from its cursor
                log.exception("indexer step failed; retrying")
                stop.wait(1.0)
            self.wake.wait(interval)
            self.wake.clear()


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


def _whole_blocks(logs: Sequence[dict[str, Any]], most: int) -> tuple[list[dict[str, Any]], int]:
    """The first blocks' logs, `most` at most unless the first block alone has more, and the last of
    those blocks. `logs` are in chain order, as eth_getLogs returns them."""
    numbers = [int_of(item["blockNumber"]) for item in logs]
    first_left_out = numbers[most]
    last = first_left_out - 1 if first_left_out > numbers[0] else numbers[0]
    return [item for item, number in zip(logs, numbers, strict=True) if number <= last], last
