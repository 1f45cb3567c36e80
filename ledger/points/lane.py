"""The points lane: the relayer's lane that puts issuances and redemptions on-chain in batch
transactions, and settles each request from its batch's receipt.

A batch transaction applies each item on its own (the contract reports a failed item by an event),
so a request is settled straight from its batch's receipt: done, with the lot or the new balance, or
failed, with the contract's reason. Every request carries its on-chain id (issuanceId or
redemptionId), which the contract applies once: sending a request again after a crash or a lost block
is always safe, and finds the first result.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from ledger.eip712 import Redemption, Signature
from ledger.errors import ContractRevert, NonceMismatch
from ledger.lanes import BatchLane, Holds
from ledger.points.client import (
    ISSUED,
    REDEEMED,
    EventKind,
    Issuance,
    LoyaltyPointsClient,
    PointsEvent,
    SignedRedemption,
    decode,
    issue_gas,
    redeem_gas,
)
from ledger.points.completions import Completions
from ledger.points.tables import PointsBatch, PointsRequest, PointsStatus, finish
from ledger.store import as_utc, sessions, utcnow
from ledger.tx import Receipt, TxRequest, items_per_transaction
from ledger.types import Subject

log = logging.getLogger(__name__)

ERROR_CODES = {
    "LoyaltyPointsInsufficientBalance": "insufficient_points",
    "LoyaltyPointsInvalidSigner": "invalid_signature",
    "LoyaltyPointsExpiredSignature": "signature_expired",
    "InvalidAccountNonce": "nonce_mismatch",
    "LoyaltyPointsUnknownPartner": "unknown_partner",
    "LoyaltyPointsUnboundSubject": "unbound_subject",
    "LoyaltyPointsInvalidAmount": "invalid_amount",
    "LoyaltyPointsInvalidExpiry": "invalid_expiry",
    "LoyaltyPointsRedemptionUsed": "authorisation_used",
    "LoyaltyPointsIssuanceUsed": "issuance_used",
}
_ALREADY_APPLIED = {"LoyaltyPointsRedemptionUsed", "LoyaltyPointsIssuanceUsed"}
LOST_AFTER_ANSWER = "lost_after_answer"  # error code: done once, lost with its block, then refused


def signed_redemption(request: PointsRequest) -> SignedRedemption:
    assert request.partner is not None
    assert request.nonce is not None
    return SignedRedemption(
        Redemption(
            subject=Subject(request.subject),
            partner=request.partner,  # type: ignore[arg-type]
            amount=request.amount,
            redemption_id=request.ref,
            nonce=int(request.nonce),
            deadline=request.deadline,
        ),
        Signature(v=request.v, r=request.r, s=request.s),
    )


def issuance(request: PointsRequest) -> Issuance:
    return Issuance(Subject(request.subject), request.amount, request.expires_at, request.ref)


class PointsRelayer(BatchLane):
    """The points lane of the relayer. It shares the operator key with the consent relayer and runs in
    the same thread (see `ledger.lanes.run_lanes`), so the local nonce has one writer."""

    def __init__(
        self,
        engine: Engine,
        points: LoyaltyPointsClient,
        *,
        max_batch: int = 500,
        max_in_flight: int = 8,
        lost_after: float = 10.0,
        completions: Completions | None = None,
        wake: threading.Event | None = None,
        holds: Holds | None = None,
    ) -> None:
        super().__init__(
            points.sender,
            linger=0.005,
            max_in_flight=max_in_flight,
            lost_after=lost_after,
            on_mined=None,
            wake=wake,
            holds=holds,
        )
        self.points = points
        # the larger of the two kinds of item: a redemption (nine words) and an issuance (four)
        self.max_batch = items_per_transaction(max_batch, 9 * 32)
        self.completions = completions or Completions()
        self._sessions = sessions(engine)
        self._other_kind_waiting = False  # the last batch left pending requests of the other kind

    def recover(self) -> None:
        """Settle what a previous run left: batches mined, still pending in the node, or lost."""
        with self._sessions() as session:
            batches = [
                (b.id, b.tx_hash, b.operator_nonce)
                for b in session.scalars(select(PointsBatch).where(PointsBatch.status == "sent"))
            ]
        self._recover_batches(batches)

    # sending -------------------------------------------------------------------------------------

    def _send_next(self) -> int:
        with self._sessions() as session:
            oldest = session.scalars(
                select(PointsRequest)
                .where(PointsRequest.status == PointsStatus.PENDING)
                .order_by(PointsRequest.seq)
                .limit(1)
            ).first()
            if oldest is None:
                return 0
            requests = list(
                session.scalars(
                    select(PointsRequest)
                    .where(PointsRequest.status == PointsStatus.PENDING, PointsRequest.kind == oldest.kind)
                    .order_by(PointsRequest.seq)
                    .limit(self.max_batch)
                )
            )
            # A partial batch of one kind leaves the other kind's requests for another batch, sent at once.
            self._other_kind_waiting = len(requests) < self.max_batch and (
                session.scalar(
                    select(PointsRequest.seq)
                    .where(PointsRequest.status == PointsStatus.PENDING, PointsRequest.kind != oldest.kind)
                    .limit(1)
                )
                is not None
            )
        if oldest.kind == "issue":
            data = self.points.encode_issue_batch([issuance(r) for r in requests])
            gas = issue_gas(len(requests))
        else:
            data = self.points.encode_redeem_batch([signed_redemption(r) for r in requests])
            gas = redeem_gas(len(requests))

        def record(tx_hash: str, nonce: int) -> int | None:
            with self._sessions.begin() as session:
                batch = PointsBatch(tx_hash=tx_hash, kind=oldest.kind, operator_nonce=nonce, size=len(requests))
                session.add(batch)
                session.flush()
                claimed = session.execute(
                    update(PointsRequest)
                    .where(
                        PointsRequest.seq.in_([r.seq for r in requests]), PointsRequest.status == PointsStatus.PENDING
                    )
                    .values(status=PointsStatus.SUBMITTED, batch_id=batch.id, tx_hash=tx_hash, updated_at=utcnow())
                ).rowcount  # type: ignore[attr-defined]
                if claimed == len(requests):
                    return batch.id
                batch.status = "dropped"  # something else moved them meanwhile; never sent
                session.execute(
                    update(PointsRequest)
                    .where(PointsRequest.batch_id == batch.id, PointsRequest.status == PointsStatus.SUBMITTED)
                    .values(status=PointsStatus.PENDING, batch_id=None, tx_hash=None)
                )
                return None

        sent = self._submit(TxRequest(to=self.points.address, data=data, gas=gas), record)
        return len(requests) if sent else 0

    def _more_after(self, sent: int) -> bool:
        return sent >= self.max_batch or (sent > 0 and self._other_kind_waiting)

    # settling ------------------------------------------------------------------------------------

    def _settle(self, batch_id: int, receipt: Receipt) -> int:
        self._forget(batch_id)
        outcomes = {e.ref: e for e in self.points.logs(receipt) if e.kind is not EventKind.EXPIRED}
        finished: list[PointsRequest] = []
        with self._sessions.begin() as session:
            batch = session.get(PointsBatch, batch_id)
            assert batch is not None
            batch.status = "mined" if receipt.status == 1 else "reverted"
            requests = list(session.scalars(select(PointsRequest).where(PointsRequest.batch_id == batch_id)))
            for request in requests:
                if request.status != PointsStatus.SUBMITTED:
                    continue
                event = outcomes.get(request.ref)
                if receipt.status != 1 or event is None:
                    _requeue(session, request)
                    continue
                if event.kind in (EventKind.ISSUE_REJECTED, EventKind.REDEEM_REJECTED):
                    cause = self.points.decoder.decode(event.reason)
                    if cause.error in _ALREADY_APPLIED:
                        first = self.first_result(request)
                        if first is not None:
                            event = first  # sent again after a crash or a lost block: the first result stands
                    if event.kind in (EventKind.ISSUE_REJECTED, EventKind.REDEEM_REJECTED):
                        if self.holds(cause.error, request.subject, request.partner):
                            _requeue(session, request)  # its binding or partner role is being put back
                            continue
                        if isinstance(cause, NonceMismatch) and _in_turn(session, request, cause):
                            _requeue(session, request)  # an earlier one the chain lost goes first
                            continue
                        request.status = PointsStatus.FAILED
                        if _was_answered(request):
                            _lost_after_answer(request, cause)
                        else:
                            _refused(request, cause)
                        request.tx_hash, request.block_number = receipt.tx_hash, receipt.block_number
                        request.updated_at = utcnow()
                        finished.append(request)
                        continue
                finish(request, event)
                finished.append(request)
        if receipt.status != 1:
            log.warning("points batch %s reverted as a whole; its requests are queued again", receipt.tx_hash)
        self.completions.notify(finished)
        return len(requests)

    def first_result(self, request: PointsRequest) -> PointsEvent | None:
        """The event that applied this request's id the first time, from the chain's logs."""
        decoded = [decode(entry) for entry in self.applied_logs(request)]
        return next((e for e in decoded if e is not None), None)

    def applied_logs(self, request: PointsRequest) -> list[dict[str, Any]]:
        """The chain's logs of events applying this request's id (`Issued` or `Redeemed`), oldest first."""
        kind, position = (ISSUED, 2) if request.kind == "issue" else (REDEEMED, 3)
        topics: list[Any] = [kind, None, None, None][: position + 1]
        topics[position] = "0x" + request.ref.hex()
        return self.points.get_logs(topics)

    def audit(self, older_than: float | None = None) -> int:
        """Requeue done requests whose block the node lost before the indexer saw it (a node crash
        before its state was written): their transaction is no longer known. The contract applies an
        id once, so this never spends twice."""
        cutoff = self._moved_before(older_than)
        with self._sessions() as session:
            stale = [
                r
                for r in session.scalars(
                    select(PointsRequest)
                    .where(PointsRequest.status == PointsStatus.DONE, PointsRequest.indexed.is_(False))
                    .limit(5000)
                )
                if as_utc(r.updated_at).timestamp() < cutoff
            ]
        lost: list[int] = []
        known: dict[str, bool] = {}
        for request in stale:
            assert request.tx_hash is not None
            if request.tx_hash not in known:
                known[request.tx_hash] = self.sender.known(request.tx_hash)
            if not known[request.tx_hash]:
                lost.append(request.seq)
        if lost:
            with self._sessions.begin() as session:
                for request in session.scalars(select(PointsRequest).where(PointsRequest.seq.in_(lost))):
                    _requeue(session, request, status=PointsStatus.DONE)
            log.warning("%d points requests were no longer on the chain; queued again", len(lost))
        return len(lost)

    def _drop(self, batch_id: int, reason: str) -> None:
        self._forget(batch_id)
        with self._sessions.begin() as session:
            batch = session.get(PointsBatch, batch_id)
            assert batch is not None
            batch.status = "dropped"
            for request in session.scalars(select(PointsRequest).where(PointsRequest.batch_id == batch_id)):
                _requeue(session, request)
        log.warning("points batch %s dropped (%s); its requests are queued again", batch_id, reason)


def _in_turn(session: Session, request: PointsRequest, cause: NonceMismatch) -> bool:
    """Whether a redemption refused for its nonce can still apply in turn: the chain's nonce for its
    controller and partner is below its own, and every nonce in between belongs to a redemption of ours
    that has not failed (queued, in flight, or done on a chain the node has since lost, which the
    indexer's rollback or the audit queues again). That happens after a loss of blocks, when the
    relayer sends the next redemption before the service has noticed that the previous one is gone.
    Only a real gap is final (as for consent changes, `Relayer._fail`)."""
    current, own = int(cause.args_by_name["currentNonce"]), int(request.nonce or 0)
    if not current < own:
        return False  # used already, by another redemption: final
    live = {
        int(nonce)
        for nonce in session.scalars(
            select(PointsRequest.nonce).where(
                PointsRequest.subject == request.subject,
                PointsRequest.kind == "redeem",
                PointsRequest.controller == request.controller,
                PointsRequest.partner == request.partner,
                PointsRequest.status != PointsStatus.FAILED,
            )
        )
        if nonce is not None
    }
    return own - current <= len(live) and all(nonce in live for nonce in range(current, own))


def _was_answered(request: PointsRequest) -> bool:
    """Whether the request was done once already: applied in a block the chain then lost, and queued
    again. `_finish` set its lot or balance, and neither a requeue nor a rollback clears them."""
    return (request.lot_id if request.kind == "issue" else request.balance) is not None


def _refused(request: PointsRequest, cause: ContractRevert) -> None:
    """The chain refused the request. Its answer goes to the partner or issuer, so it names the reason,
    not the revert's facts (the customer's pseudonym, their balance): those go to the log."""
    request.error_code = ERROR_CODES.get(cause.error, "rejected")
    request.error_detail = None if cause.error in ERROR_CODES else f"the contract refused it ({cause.error})"
    log.info("points request %s (%s) was refused: %s", request.id, request.kind, cause)


def _lost_after_answer(request: PointsRequest, cause: ContractRevert) -> None:
    """A request answered as done, lost with its block, failed when applied again (its authorisation's
    deadline or a lot it spent expired before the node was back). The caller holds an answer the chain
    does not: say so plainly (a repeat of its Idempotency-Key gets this code), and loudly, so that the
    operator can settle it with the partner or issuer."""
    request.error_code = LOST_AFTER_ANSWER
    request.error_detail = f"done once, in a block the node lost; applying it again failed: {cause.error}"
    log.error(
        "points request %s (%s) was answered as done, but the node lost its block and applying it again failed: %s",
        request.id,
        request.kind,
        cause,
    )


def _requeue(session: Session, request: PointsRequest, status: str = PointsStatus.SUBMITTED) -> None:
    if request.status != status:
        return
    request.status = PointsStatus.PENDING
    request.batch_id = None
    request.tx_hash = None
    request.block_number = None
    request.updated_at = utcnow()
