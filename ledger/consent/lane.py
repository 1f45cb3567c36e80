"""The consent lane: the relayer's lane (`Relayer`) that puts accepted consent requests on-chain, in
`applyBatch` transactions sent by the single writer for the operator key (`ledger.lanes.run_lanes`).

Group commit: requests that arrive within `linger` seconds of each other, up to `max_batch`, share
one `applyBatch` transaction; several batches may be in flight at once (local nonce, no waiting).
Crash safety: a batch is recorded (its hash and operator nonce, and its requests marked submitted)
before it is sent. After a restart a recorded batch is either mined (settled from its receipt),
still known to the node (waited for), or lost (its requests go back to the queue). A request is
confirmed only by the indexer, from the chain's own event, so nothing is counted twice.

A reverted batch is diagnosed by replaying it: the contract names the failing item and its reason;
that request fails alone, and the others go back to the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from sqlalchemy import Engine, Select, Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from ledger.consent.client import (
    GRANTED,
    REVOKED,
    ConsentRegistryClient,
    SignedChange,
    batch_gas,
    decode,
    max_changes_per_batch,
)
from ledger.consent.tables import ConsentEvent, ConsentRequest, ConsentState, RelayBatch, RequestStatus
from ledger.eip712 import ChangeKind, ConsentChange, Signature
from ledger.errors import BatchItemFailed, ContractRevert, LedgerError, NonceMismatch
from ledger.lanes import BatchLane, Holds
from ledger.metrics import count_consent
from ledger.store import as_utc, rowcount, sessions, utcnow
from ledger.tx import Receipt, TxRequest
from ledger.types import Purpose, Subject

log = logging.getLogger(__name__)

ERROR_CODES = {
    "ConsentRegistryInvalidSigner": "invalid_signature",
    "ConsentRegistryExpiredSignature": "signature_expired",
    "InvalidAccountNonce": "nonce_mismatch",
    "ConsentRegistryUnknownPartner": "unknown_partner",
    "ConsentRegistryEmptyAttributes": "empty_attributes",
    "ConsentRegistryAttributesOutOfRange": "attributes_out_of_range",
    "ConsentRegistryInvalidValidity": "invalid_validity",
    "ConsentRegistryUnboundSubject": "unbound_subject",
}


class _Raced(LedgerError):
    """Raised inside a transaction to abandon a batch whose requests changed under it (caught where
    raised; under the package's root all the same, as every exception the package defines)."""


_BATCHES = cast(Table, RelayBatch.__table__)
_REQUESTS = cast(Table, ConsentRequest.__table__)

# One change of a subject at a time on its way: a subject's pending changes wait while an earlier one is
# submitted (sent, or mined and not yet confirmed by the indexer), then go together, in order. The
# contract applies a change whose nonce is above the subject's next one (skipping what failed before
# it), so a later change must never reach the chain while an earlier one could still: if that
# earlier batch reverted, or was lost with its block, the later one would apply first and the earlier
# could never apply. Uncorrelated: the database reads the (few) submitted subjects once per statement.
_SUBMITTED_SUBJECTS = select(ConsentRequest.subject).where(ConsentRequest.status == RequestStatus.SUBMITTED)

# What a batch needs of its pending requests: whole subjects, oldest first. Each subject's pending
# changes go in one batch (in seq order, which is its nonce order), the subjects ordered by their oldest
# change, until the batch is full. Taking the oldest changes whatever their subject instead put every
# busy customer's oldest change in the first batch of a block, and nothing was left for a second: one
# transaction per block however much waited (~370 changes a block, the most one transaction holds).
_ELIGIBLE = (ConsentRequest.status == RequestStatus.PENDING, ConsentRequest.subject.not_in(_SUBMITTED_SUBJECTS))


def _pending(held: bool) -> Select[*tuple[Any, ...]]:
    eligible = (*_ELIGIBLE, _NOT_HELD) if held else _ELIGIBLE
    oldest = (
        select(ConsentRequest.subject, func.min(ConsentRequest.seq).label("oldest"))
        .where(*eligible)
        .group_by(ConsentRequest.subject)
        .subquery()
    )
    return (
        select(
            ConsentRequest.seq,
            ConsentRequest.kind,
            ConsentRequest.subject,
            ConsentRequest.partner,
            ConsentRequest.purpose,
            ConsentRequest.attributes,
            ConsentRequest.nonce,
            ConsentRequest.deadline,
            ConsentRequest.valid_until,
            ConsentRequest.v,
            ConsentRequest.r,
            ConsentRequest.s,
        )
        .join(oldest, oldest.c.subject == ConsentRequest.subject)
        .where(*eligible)
        .order_by(oldest.c.oldest, ConsentRequest.seq)
        .limit(bindparam("limit"))
    )


# Held back: subjects whose binding the chain lost, while it is put back (see `Relayer._fail`).
_NOT_HELD = ConsentRequest.subject.not_in(bindparam("held", expanding=True))
_PENDING, _PENDING_HELD = _pending(held=False), _pending(held=True)
HOLD = 1.0  # seconds a held subject's requests stay out of batches before they are tried again


class ChangeRow(Protocol):
    """A stored consent change: a `ConsentRequest`, or a row of `_PENDING`."""

    @property
    def kind(self) -> int: ...
    @property
    def subject(self) -> bytes: ...
    @property
    def partner(self) -> str: ...
    @property
    def purpose(self) -> bytes: ...
    @property
    def attributes(self) -> str: ...
    @property
    def nonce(self) -> int: ...
    @property
    def deadline(self) -> int: ...
    @property
    def valid_until(self) -> int: ...
    @property
    def v(self) -> int: ...
    @property
    def r(self) -> bytes: ...
    @property
    def s(self) -> bytes: ...


def signed_change(request: ChangeRow) -> SignedChange:
    change = ConsentChange(
        kind=ChangeKind(request.kind),
        subject=Subject(request.subject),
        partner=request.partner,  # type: ignore[arg-type]
        purpose=Purpose(request.purpose),
        attributes=int(request.attributes),
        nonce=request.nonce,
        deadline=request.deadline,
        valid_until=request.valid_until,
    )
    return SignedChange(change, Signature(v=request.v, r=request.r, s=request.s))


class Relayer(BatchLane):
    def __init__(
        self,
        engine: Engine,
        registry: ConsentRegistryClient,
        *,
        max_batch: int = 500,
        linger: float = 0.005,
        max_in_flight: int = 16,
        lost_after: float = 10.0,
        on_mined: Callable[[], None] | None = None,
        wake: threading.Event | None = None,
        holds: Holds | None = None,
    ) -> None:
        super().__init__(
            registry.sender,
            linger=linger,
            max_in_flight=max_in_flight,
            lost_after=lost_after,
            on_mined=on_mined,
            wake=wake,
            holds=holds,
        )
        self.registry = registry
        self.max_batch = max_changes_per_batch(max_batch)
        self._sessions = sessions(engine)
        # subject -> until when (monotonic) its requests stay out of batches: one rejected item reverts a
        # whole batch, so a request waiting for its binding would otherwise stop everyone's.
        self._held: dict[bytes, float] = {}

    # start-up ------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Settle what a previous run left: mined, still pending in the node, or lost."""
        self.sender.resync_nonce()
        with self._sessions() as session:
            batches = [
                (b.id, b.tx_hash, b.operator_nonce)
                for b in session.scalars(select(RelayBatch).where(RelayBatch.status == "sent"))
            ]
        self._recover_batches(batches)
        log.info("relayer recovered: %d batches in flight", len(self._in_flight))

    def audit(self, older_than: float | None = None) -> int:
        return self.audit_submitted(older_than)

    # sending -------------------------------------------------------------------------------------

    def _held_now(self) -> list[bytes]:
        now = time.monotonic()
        for subject in [s for s, until in self._held.items() if until <= now]:
            del self._held[subject]
        return list(self._held)

    def _send_next(self) -> int:
        held = self._held_now()
        with self._sessions() as session:
            parameters: dict[str, Any] = {"limit": self.max_batch, **({"held": held} if held else {})}
            requests = list(session.execute(_PENDING_HELD if held else _PENDING, parameters))
        if not requests:
            return 0
        data = self.registry.encode_batch([signed_change(r) for r in requests])

        def record(tx_hash: str, nonce: int) -> int | None:
            try:
                # Core statements on the session's connection: the ORM's flush and its UPDATE, which
                # synchronised the session by fetching the claimed rows back, cost more than the writes.
                with self._sessions.begin() as session:
                    connection = session.connection()
                    batch_id: int = connection.execute(
                        insert(_BATCHES)
                        .values(tx_hash=tx_hash, operator_nonce=nonce, size=len(requests))
                        .returning(_BATCHES.c.id)
                    ).scalar_one()
                    # The batch's requests by their seqs (no longer one range: whole subjects, not the
                    # oldest rows). Should one of them be gone, or its subject be submitted meanwhile, the
                    # count differs and nothing is claimed.
                    claimed = connection.execute(
                        update(_REQUESTS)
                        .where(
                            _REQUESTS.c.seq.in_(bindparam("seqs", expanding=True)),
                            _REQUESTS.c.status == RequestStatus.PENDING,
                            _REQUESTS.c.subject.not_in(_SUBMITTED_SUBJECTS),
                            *([_REQUESTS.c.subject.not_in(held)] if held else []),
                        )
                        .values(
                            status=RequestStatus.SUBMITTED, batch_id=batch_id, tx_hash=tx_hash, updated_at=utcnow()
                        ),
                        {"seqs": [r.seq for r in requests]},
                    ).rowcount
                    if claimed != len(requests):
                        raise _Raced  # something else moved them meanwhile (rolls the batch record back)
                    return batch_id
            except _Raced:
                return None

        sent = self._submit(TxRequest(to=self.registry.address, data=data, gas=batch_gas(len(requests))), record)
        return len(requests) if sent else 0

    # settling ------------------------------------------------------------------------------------

    def audit_submitted(self, older_than: float | None = None) -> int:
        """Re-queue submitted requests the chain has lost.

        A batch can be mined on a node that then loses those blocks (a crash before its state was
        written) before the indexer saw them: no reorganisation is visible, yet the changes are gone.
        So a request submitted for longer than `older_than` (default `lost_after`) and still unconfirmed
        is checked: its transaction must still be known to the node; one marked as already applied must
        show in its subject's on-chain nonce. Otherwise it goes back to the queue (the nonce makes a
        duplicate impossible).
        """
        cutoff = self._moved_before(older_than)
        with self._sessions() as session:
            stale = [
                r
                for r in session.scalars(
                    select(ConsentRequest).where(ConsentRequest.status == RequestStatus.SUBMITTED).limit(5000)
                )
                if as_utc(r.updated_at).timestamp() < cutoff and r.batch_id not in self._in_flight
            ]
        if not stale:
            return 0
        lost: list[int] = []
        applied: list[ConsentRequest] = []
        known: dict[str, bool] = {}
        nonces: dict[bytes, int] = {}
        for request in stale:
            if request.tx_hash is not None and request.batch_id is not None:
                if request.tx_hash not in known:
                    known[request.tx_hash] = self.sender.known(request.tx_hash)
                if not known[request.tx_hash]:
                    lost.append(request.seq)
            else:  # marked applied by an earlier transaction: the chain's nonce must have moved past it
                if request.subject not in nonces:
                    nonces[request.subject] = self.registry.nonce_of(Subject(request.subject))
                if nonces[request.subject] <= request.nonce:
                    lost.append(request.seq)
                else:
                    applied.append(request)
        with self._sessions.begin() as session:
            for seq in lost:
                self._requeue(session, seq)
            for request in applied:  # on-chain and indexed, but the confirmation was missed: take it from the event
                event = session.scalar(
                    select(ConsentEvent).where(
                        ConsentEvent.subject == request.subject,
                        ConsentEvent.nonce == request.nonce,
                        ConsentEvent.kind == request.kind,
                    )
                )
                if event is not None:
                    changed = session.execute(
                        update(ConsentRequest)
                        .where(ConsentRequest.seq == request.seq, ConsentRequest.status == RequestStatus.SUBMITTED)
                        .values(
                            status=RequestStatus.CONFIRMED,
                            tx_hash=event.tx_hash,
                            block_number=event.block_number,
                            updated_at=utcnow(),
                        )
                    )
                    count_consent("confirmed", rowcount(changed))
                elif not self._logged(request):
                    self._history_lost(session, request)
        if lost:
            log.warning("%d submitted requests were no longer on the chain; queued again", len(lost))
        return len(lost)

    def _changes_logged(self, subject: bytes) -> list[tuple[int, int]]:
        """(nonce, kind) of every change of `subject` the chain's history holds."""
        logs = self.registry.get_logs([[GRANTED, REVOKED], "0x" + bytes(subject).hex()])
        decoded = (decode(entry) for entry in logs)
        return [(e.nonce, e.kind) for e in decoded if e is not None]

    def _logged(self, request: ConsentRequest) -> bool:
        """Whether the chain's history holds the event of this change (the indexer will pick it up)."""
        return (request.nonce, request.kind) in self._changes_logged(request.subject)

    def _passed_over(self, request: ConsentRequest, cause: ContractRevert) -> bool:
        """Whether `cause` refused the change because a later change of its subject applied while it did
        not: the chain moved the subject's nonce past it without it (it skips nonces), so it can never
        apply. The relayer sends none of a subject's changes while an earlier one is on its way, but a
        chain that lost the earlier one's block and kept the later one's would do it; the change must
        then fail, not be taken for applied."""
        if not isinstance(cause, NonceMismatch) or int(cause.args_by_name["currentNonce"]) <= request.nonce:
            return False
        logged = self._changes_logged(request.subject)
        return (request.nonce, request.kind) not in logged and any(nonce > request.nonce for nonce, _ in logged)

    def _history_lost(self, session: Session, request: ConsentRequest) -> None:
        """The change's effect is on-chain (its controller's nonce moved past it) but no block holds its
        transaction any more: a node restored from a state file that was ahead of its block history.
        Record that plainly, and take the consent from the contract's state, which is the truth."""
        consent = self.registry.consent_of(Subject(request.subject), request.partner, Purpose(request.purpose))  # type: ignore[arg-type]
        session.merge(
            ConsentState(
                subject=request.subject,
                partner=request.partner,
                purpose=request.purpose,
                attributes=str(consent.attributes),
                valid_until=consent.valid_until,
                block_number=self.registry.w3.eth.block_number,
                tx_hash="",
            )
        )
        changed = session.execute(
            update(ConsentRequest)
            .where(ConsentRequest.seq == request.seq, ConsentRequest.status == RequestStatus.SUBMITTED)
            .values(
                status=RequestStatus.CONFIRMED,
                error_code="history_lost",
                updated_at=utcnow(),
                error_detail="applied on-chain (the controller's nonce is used) but the node lost the block",
            )
        )
        count_consent("confirmed", rowcount(changed))
        log.error(
            "consent request %s: applied on-chain but the node lost its block; state taken from the contract",
            request.id,
        )

    def _settle(self, batch_id: int, receipt: Receipt) -> int:
        """Mark the batch mined (its requests are confirmed by the indexer, from their events) or find
        out why it reverted. Two statements under the write lock: loading the batch's requests there
        held it for milliseconds per batch, and every process's writers wait on it."""
        self._forget(batch_id)
        with self._sessions.begin() as session:
            session.execute(
                update(RelayBatch)
                .where(RelayBatch.id == batch_id)
                .values(status="mined" if receipt.status == 1 else "reverted")
            )
            size = session.scalar(select(RelayBatch.size).where(RelayBatch.id == batch_id))
        if receipt.status != 1:
            with self._sessions() as session:
                requests = self._batch_requests(session, batch_id)
            self._diagnose(batch_id, requests)
            return max(1, len(requests))
        return max(1, size or 0)

    def _batch_requests(self, session: Session, batch_id: int) -> list[ConsentRequest]:
        return list(
            session.scalars(
                select(ConsentRequest).where(ConsentRequest.batch_id == batch_id).order_by(ConsentRequest.seq)
            )
        )

    def _diagnose(self, batch_id: int, requests: Sequence[ConsentRequest]) -> None:
        """Find the item that made the batch revert; it fails alone, the rest are queued again."""
        live = [r for r in requests if r.status == RequestStatus.SUBMITTED]
        culprit: tuple[ConsentRequest, ContractRevert] | None = None
        if live:
            try:
                self.registry.estimate(self.registry.encode_batch([signed_change(r) for r in live]))
            except BatchItemFailed as failure:
                culprit = (live[failure.index], failure.cause)
            except LedgerError as exc:
                log.warning("could not diagnose batch %s: %s", batch_id, exc)
        passed_over = False
        if culprit is not None:
            try:
                passed_over = self._passed_over(*culprit)  # a node call: made before the write lock
            except Exception as exc:  # the node's logs are not to be had now: all are sent again
                log.warning("could not read the events of batch %s's refused change: %s", batch_id, exc)
                culprit = None
        with self._sessions.begin() as session:
            for request in live:
                if culprit is not None and request.seq == culprit[0].seq:
                    self._fail(session, request, culprit[1], passed_over=passed_over)
                else:
                    self._requeue(session, request.seq)

    def _fail(
        self, session: Session, request: ConsentRequest, cause: ContractRevert, *, passed_over: bool = False
    ) -> None:
        if self.holds(cause.error, request.subject, request.partner):
            self._requeue(session, request.seq)  # its binding or partner role is being put back
            self._held[request.subject] = time.monotonic() + HOLD
            return
        code = ERROR_CODES.get(cause.error, "rejected")
        if isinstance(cause, NonceMismatch) and int(cause.args_by_name["currentNonce"]) > request.nonce:
            if passed_over:
                code = "superseded"  # a change signed after it applied first; it can never apply
            else:
                # That nonce was used: by this very change in an earlier (reorganised or resent)
                # transaction. The indexer confirms it from the chain's event (or the audit finds the
                # node lost its block: `_history_lost`).
                # Only while still submitted: the indexer may have confirmed it meanwhile.
                session.execute(
                    update(ConsentRequest)
                    .where(ConsentRequest.seq == request.seq, ConsentRequest.status == RequestStatus.SUBMITTED)
                    .values(batch_id=None, updated_at=utcnow())
                )
                return
        now = utcnow()
        changed = session.execute(
            update(ConsentRequest)
            .where(ConsentRequest.seq == request.seq, ConsentRequest.status == RequestStatus.SUBMITTED)
            .values(
                status=RequestStatus.FAILED,
                batch_id=None,
                error_code=code,
                error_detail=str(cause)[:500],
                updated_at=now,
                failed_at=now,  # leaves the live nonce index
            )
        )
        count_consent("failed", rowcount(changed))
        if request.kind == ChangeKind.REVOKE:
            # Accepted (202) and now not on-chain: the read model stops denying what the customer withdrew.
            log.error(
                "accepted revocation %s failed on-chain (%s): the customer's withdrawal is not recorded; "
                "they must revoke again",
                request.id,
                cause,
            )
        else:
            log.info("consent request %s failed on-chain: %s", request.id, cause)

    def _requeue(self, session: Session, seq: int) -> None:
        session.execute(
            update(ConsentRequest)
            .where(ConsentRequest.seq == seq, ConsentRequest.status == RequestStatus.SUBMITTED)
            .values(status=RequestStatus.PENDING, batch_id=None, tx_hash=None, updated_at=utcnow())
        )

    def _drop(self, batch_id: int, reason: str) -> None:
        self._forget(batch_id)
        with self._sessions.begin() as session:
            batch = session.get(RelayBatch, batch_id)
            assert batch is not None
            batch.status = "dropped"
            for request in self._batch_requests(session, batch_id):
                self._requeue(session, request.seq)
        log.warning("batch %s dropped (%s); its requests are queued again", batch_id, reason)
