"""The outbox: signed consent changes accepted durably before the API acknowledges them (`Outbox`, and
`OutboxWriter`'s group commit), each carrying its subject's next nonce (`NonceConflict` otherwise),
and the requests read back by id. The relayer's lane takes them from here; a customer's consent
status is read by `ledger.consent.reads`."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Engine, Table, func, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from ledger.consent.client import SignedChange
from ledger.consent.tables import ConsentEvent, ConsentRequest, RequestStatus
from ledger.errors import LedgerError
from ledger.store import drain, fail_unsettled, next_batch, sessions, utcnow, waiting

log = logging.getLogger(__name__)


class NonceConflict(LedgerError):
    """Raised when a signed change does not carry the controller's next nonce (replayed or out of order)."""


class Outbox:
    def __init__(self, engine: Engine) -> None:
        self._sessions = sessions(engine)

    def next_nonce(self, subject: bytes, chain_nonce: int) -> int:
        """The nonce the subject's next change must carry: after everything accepted (failed included)."""
        with self._sessions() as session:
            highest = _highest_nonce(session, subject)
        return max(chain_nonce, -1 if highest is None else highest + 1)

    def accept(self, signed: SignedChange, controller: str, chain_nonce: int) -> ConsentRequest:
        """Store a checked, signed change durably (committed before returning); the relayer takes it from here."""
        change = signed.change
        expected = self.next_nonce(bytes(change.subject), chain_nonce)
        if change.nonce != expected:
            raise NonceConflict(f"nonce {change.nonce} is not the next one ({expected}); prepare the change again")
        request = _row(signed, controller)
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


@dataclass
class _Pending:
    signed: SignedChange
    controller: str
    chain_nonce: Callable[[], int]
    done: Future[ConsentRequest]


class OutboxWriter:
    """Group commit for acceptance: one writer thread stores the changes that arrive together in one
    transaction (one fsync), and answers each caller when it is durable.

    Each subject's next nonce is cached and re-read from the database when a change does not match
    it (another process accepted one). The chain is asked only for a subject the outbox has never
    seen. Other processes may write too (see `_write`).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 1000,
        linger: float = 0.001,
        chain_nonces: Callable[[Sequence[bytes]], dict[bytes, int]] | None = None,
    ) -> None:
        self._sessions = sessions(engine)
        self.chain_nonces = chain_nonces  # many subjects' chain nonces in one round trip, if the chain can
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._next: dict[bytes, int] = {}
        self._carried: list[_Pending] = []  # taken from the queue under the lock, for the next batch
        self.max_batch = max_batch
        self.linger = linger
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._thread.start()

    def accept(self, signed: SignedChange, controller: str, chain_nonce: Callable[[], int]) -> Future[ConsentRequest]:
        done: Future[ConsentRequest] = Future()
        self._queue.put(_Pending(signed, controller, chain_nonce, done))
        return done

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _expected(self, session: Session, subject: bytes, chain_nonce: Callable[[], int], fresh: bool) -> int:
        if fresh or subject not in self._next:
            highest = _highest_nonce(session, subject)
            self._next[subject] = chain_nonce() if highest is None else highest + 1
        return self._next[subject]

    def _run(self) -> None:
        while True:
            if self._carried:  # marked running when they were taken (`_join`)
                batch, self._carried = self._carried, []
                batch += waiting(drain(self._queue, self.max_batch - len(batch)))
            elif (waited := next_batch(self._queue, self.max_batch, self.linger)) is not None:
                batch = waiting(waited)
            else:
                return
            try:
                self._write(batch, unavailable=self._prefetch(batch))
            except Exception as exc:  # this thread serves every later request: it must not die
                log.exception("the outbox writer could not store a batch")
                self._next.clear()
                fail_unsettled(batch, exc)

    def _join(self, batch: list[_Pending]) -> list[_Pending]:
        """With the write lock held: the changes that arrived while this batch waited for it, which join
        it (group commit across the wait, instead of each waiting for the lock again in the next
        batch). A subject new to this writer needs its nonce looked up first, which may ask the node:
        it and every change after it are carried to the next batch, in order."""
        joined = waiting(drain(self._queue, self.max_batch - len(batch)))
        for at, item in enumerate(joined):
            subject = bytes(item.signed.change.subject)
            if subject not in self._next:
                self._carried = joined[at:]
                return joined[:at]
        return joined

    def _prefetch(self, batch: list[_Pending]) -> dict[bytes, LedgerError]:
        """The next nonces of subjects new to this writer, read before the write lock is taken: a
        subject with no live request needs the chain's nonce, a round trip to the node that held up
        every process's writers when made under the lock. What is read here may be stale by the time
        the lock is held; `_write` then reads again under it (a mismatch, or the unique index).
        Returns the subjects whose nonce could not be had, with why (their requests' answer)."""
        new = {bytes(item.signed.change.subject): item.chain_nonce for item in batch}
        new = {subject: chain_nonce for subject, chain_nonce in new.items() if subject not in self._next}
        unavailable: dict[bytes, LedgerError] = {}
        if not new:
            return unavailable
        with self._sessions() as session:
            highest = {subject: _highest_nonce(session, subject) for subject in new}
        unknown = [subject for subject, nonce in highest.items() if nonce is None]
        on_chain: dict[bytes, int] = {}
        if len(unknown) > 1 and self.chain_nonces is not None:
            # The first change of many customers at once (a start, a campaign): one round trip, not one
            # each, while every request of the batch waits.
            with contextlib.suppress(LedgerError):  # then asked one by one: each failure answers its own
                on_chain = self.chain_nonces(unknown)
        for subject, nonce in highest.items():
            try:
                if nonce is not None:
                    self._next[subject] = nonce + 1
                elif subject in on_chain:
                    self._next[subject] = on_chain[subject]
                else:
                    self._next[subject] = new[subject]()
            except LedgerError as exc:
                unavailable[subject] = exc
        return unavailable

    def _write(
        self, batch: list[_Pending], *, fresh: bool = False, unavailable: dict[bytes, LedgerError] | None = None
    ) -> None:
        """Store the batch in one transaction: checks from the nonce cache, one bulk insert. The rows
        are made before the write lock is taken, which every process's writers share.

        The cached next nonces may be stale when other processes (API workers) accept changes too:
        the unique index on (subject, nonce) then refuses the batch, and it is written again with
        every nonce read afresh (inside the transaction, under the write lock, so what is read is
        what the insert meets)."""
        now = utcnow()
        prepared = [(item, _values(item.signed, item.controller, now)) for item in batch]
        accepted: list[tuple[_Pending, dict[str, Any]]] = []
        refused: list[tuple[_Pending, BaseException]] = []
        in_batch: dict[bytes, int] = {}  # next nonce after this batch's own changes: they are not stored yet
        try:
            with self._sessions.begin() as session:
                if not fresh:
                    joined = self._join(batch)
                    batch += joined
                    prepared += [(item, _values(item.signed, item.controller, now)) for item in joined]
                for item, values in prepared:
                    subject, nonce = values["subject"], values["nonce"]
                    try:
                        if unavailable and subject in unavailable:
                            raise unavailable[subject]
                        expected = in_batch.get(subject)
                        if expected is None:
                            expected = self._expected(session, subject, item.chain_nonce, fresh=fresh)
                            if nonce != expected:
                                expected = self._expected(session, subject, item.chain_nonce, fresh=True)
                        if nonce != expected:
                            raise NonceConflict(
                                f"nonce {nonce} is not the next one ({expected}); prepare the change again"
                            )
                    except LedgerError as exc:
                        refused.append((item, exc))
                        continue
                    in_batch[subject] = expected + 1
                    accepted.append((item, values))
                if accepted:
                    # Core, not the ORM's bulk path: its per-row work was most of this thread's time.
                    table = cast(Table, ConsentRequest.__table__)
                    session.connection().execute(insert(table), [values for _, values in accepted])
        except IntegrityError:
            self._next.clear()
            if not fresh:
                self._write(batch, fresh=True, unavailable=unavailable)
                return
            for item in batch:
                item.done.set_exception(NonceConflict("a concurrent change took this nonce; prepare the change again"))
            return
        except Exception as exc:  # nothing of this batch was stored
            self._next.clear()
            if len(batch) > 1 and not isinstance(exc, OperationalError):
                # One request the database cannot store (a value past its column's range) must not fail
                # the others that shared its commit: each is written again alone, and only its own
                # failure answers it. Not when the database itself failed (locked past its busy
                # timeout, gone): each would wait as long again; every caller hears it.
                log.warning("an outbox batch of %d failed (%s); writing its changes one by one", len(batch), exc)
                for item in batch:
                    self._write([item], fresh=True, unavailable=unavailable)
                return
            for item in batch:
                item.done.set_exception(exc)
            return
        self._next.update(in_batch)
        for item, values in accepted:
            item.done.set_result(ConsentRequest(**values))  # as stored (`seq` aside)
        for item, error in refused:
            item.done.set_exception(error)


def _highest_nonce(session: Session, subject: bytes) -> int | None:
    """The highest nonce of the subject's requests, failed ones included. A failed change's nonce is not
    given again: nonces only move forward on-chain (a change may pass over unused ones), so a change
    signed later always carries a higher nonce than every change signed before it, and nothing signed
    earlier (a failed change the operator still holds) can be applied after it."""
    return session.scalar(select(func.max(ConsentRequest.nonce)).where(ConsentRequest.subject == subject))


def _values(signed: SignedChange, controller: str, now: datetime) -> dict[str, Any]:
    change, sig = signed.change, signed.signature
    return {
        "id": str(uuid.uuid4()),
        "kind": int(change.kind),
        "subject": bytes(change.subject),
        "partner": change.partner,
        "purpose": bytes(change.purpose),
        "attributes": str(change.attributes),
        "valid_until": change.valid_until,
        "nonce": change.nonce,
        "deadline": change.deadline,
        "controller": controller,
        "v": sig.v,
        "r": sig.r,
        "s": sig.s,
        "status": RequestStatus.PENDING,
        "created_at": now,
        "updated_at": now,
    }


def _row(signed: SignedChange, controller: str) -> ConsentRequest:
    return ConsentRequest(**_values(signed, controller, utcnow()))
