"""Key recovery: a customer who lost their key gets a new one bound, after the operator verified them.

The operator issues a recovery claim code (`POST /customers/{did}/recovery-claims`) once it has
verified the person out of band. With it, the customer's new device proves it holds a new key and
starts the recovery on-chain (`ConsentRegistry.startRecovery`); it takes effect after the contract's
recovery delay (`complete`), and until then the current key may veto it (`cancel`). The operator
alone can therefore never change who speaks for a customer at once: see the README, "Recovering a
lost key".
"""

from __future__ import annotations

import contextlib
import logging
import time
from urllib.parse import urlencode

from eth_utils.crypto import keccak
from fastapi import APIRouter, status
from sqlalchemy import delete, select, update

from api import auth
from api.deps import ConsentWriter, OperatorWrite, OwnAccessesReader, OwnConsentsReader, RuntimeDep
from api.errors import ApiError, responses
from api.models import CustomerSession, RecoveryClaim
from api.recovery import Refusal, issue_claim, refusal
from api.routers.customers import binding_typed_data, own_subject, subject_of
from api.runtime import Runtime
from api.schemas import (
    ControllerPrepare,
    ControllerSubmit,
    KeyEventPublic,
    RecoveryClaimCreated,
    RecoveryClaimUse,
    RecoveryPublic,
    TypedDataPublic,
    TypedDataSubmission,
)
from identity.types import Subject
from ledger import eip712
from ledger.consent import ConsentEvent
from ledger.consent.client import KEY_KINDS, KIND_BIND, KIND_RECOVERY_STARTED, Recovery
from ledger.errors import ContractRevert, LedgerError, RecoveryRejected
from ledger.store import as_utc

log = logging.getLogger(__name__)
router = APIRouter(prefix="/customers", tags=["customers"], responses=responses(403))
CANCEL_DEADLINE = 15 * 60
REPEAT_WAIT = 30  # s a repeated start waits for the first one's transaction
CONSENTS_READ = auth.Scope.CONSENTS_READ
_KEY_EVENT_NAMES = {KIND_BIND: "bound", KIND_RECOVERY_STARTED: "recovery_started"}


def _chain(what: str, exc: LedgerError) -> ApiError:
    """A 503 in plain words; the node's error (which may name addresses or node details) stays in the log."""
    log.warning("recovery: the ledger could not %s: %s", what, type(exc).__name__, exc_info=exc)
    return ApiError(503, "chain_unavailable", f"The ledger could not {what}", "Try again in a few minutes.")


def _pending(runtime: Runtime, subject: Subject) -> tuple[str | None, Recovery | None]:
    """The subject's key and pending recovery, as the chain holds them now."""
    try:
        return runtime.ledger.consent.controller_of(subject), runtime.ledger.consent.recovery_of(subject)
    except LedgerError as exc:
        raise _chain("be read", exc) from exc


def _public(
    runtime: Runtime,
    did: str,
    controller: str | None,
    recovery: Recovery,
    tx_hash: str | None = None,
) -> RecoveryPublic:
    try:
        _head, chain_time = runtime.ledger.backend.head_block()  # the contract's clock, not this machine's
    except LedgerError as exc:
        raise _chain("be read", exc) from exc
    return RecoveryPublic(
        did=did,
        controller=controller or "",
        new_controller=recovery.new_controller,
        effective_at=recovery.effective_at,
        status="due" if recovery.effective_at <= chain_time else "waiting",
        tx_hash=tx_hash,
    )


def _refused(exc: ContractRevert) -> ApiError:
    if exc.error == "ConsentRegistryRecoveryNotDue":
        return ApiError(
            409, "recovery_not_due", "The recovery takes effect later", str(exc.args_by_name["effectiveAt"])
        )
    if isinstance(exc, RecoveryRejected):
        return ApiError(404, "no_recovery", "No recovery is pending for this customer")
    return ApiError(409, "recovery_refused", "The ledger refused the recovery")


@router.post(
    "/{did}/recovery-claims",
    response_model=RecoveryClaimCreated,
    status_code=status.HTTP_201_CREATED,
    responses=responses(404, 409),
)
def issue_recovery_claim(did: str, runtime: RuntimeDep, _caller: OperatorWrite) -> RecoveryClaimCreated:
    """Issue a recovery claim code for a customer who lost their key, once the operator has verified
    the person out of band. It lets one new key start a recovery, which takes effect after the
    ledger's recovery delay unless the current key vetoes it. An earlier unused code stops working."""
    subject = subject_of(runtime, did)
    refused = refusal(runtime.vault.record(subject))
    if refused is Refusal.UNKNOWN:
        raise ApiError(404, "unknown_customer", refused.value)
    if refused is Refusal.ERASED:
        raise ApiError(409, "customer_erased", refused.value)
    if refused is Refusal.NOT_BOUND:
        raise ApiError(409, "not_bound", refused.value)
    with runtime.sessions() as session:
        code, expires_at = issue_claim(session, subject)
    link = f"{runtime.service.origin}/#{urlencode({'did': did, 'recovery': code})}"
    return RecoveryClaimCreated(did=did, claim_code=code, claim_url=link, expires_at=expires_at.isoformat())


def _not_erased(runtime: Runtime, subject: Subject) -> None:
    """An erased customer's recovery neither starts nor completes (their codes are retired too)."""
    record = runtime.vault.record(subject)
    if record is not None and record.erased_at is not None:
        raise ApiError(409, "customer_erased", Refusal.ERASED.value)


def _claim(runtime: Runtime, subject: Subject, code: str) -> RecoveryClaim:
    """The recovery claim of `code`, valid for `subject` (used ones too: they complete their recovery)."""
    with runtime.reads() as session:
        claim = session.get(RecoveryClaim, auth.digest(code))
        if claim is None or claim.subject != subject or (claim.used_at is not None and claim.new_controller is None):
            raise ApiError(403, "invalid_claim_code", "The claim code is not valid for this customer")
        if claim.used_at is None and as_utc(claim.expires_at) <= auth.now():
            raise ApiError(403, "claim_code_expired", "The claim code has expired; ask for a new one")
        session.expunge(claim)
        return claim


@router.post("/{did}/recovery/prepare", response_model=TypedDataPublic, responses=responses(404, 422))
def prepare_recovery(did: str, body: ControllerPrepare, runtime: RuntimeDep) -> TypedDataPublic:
    """Typed data binding the new key `address` to the customer, for that key to sign (the recovery
    claim code authenticates)."""
    subject = subject_of(runtime, did)
    _claim(runtime, subject, body.claim_code)
    return binding_typed_data(runtime, subject, body)


@router.post("/{did}/recovery", response_model=RecoveryPublic, responses=responses(404, 409, 422))
def start_recovery(did: str, body: ControllerSubmit, runtime: RuntimeDep) -> RecoveryPublic:
    """Start the recovery to the new key, once it has signed the prepared typed data. The answer says
    when it can take effect; a repeat of the request (the same new key) gets the pending recovery, or
    the completed one."""
    subject = subject_of(runtime, did)
    _not_erased(runtime, subject)
    claim = _claim(runtime, subject, body.claim_code)
    try:
        binding = eip712.parse(body.typed_data, runtime.ledger.consent.domain, ("ControllerBinding",))
        signer = eip712.recover(
            runtime.ledger.consent.domain, binding, eip712.Signature.from_bytes(bytes.fromhex(body.signature[2:]))
        )
    except (eip712.TypedDataError, ValueError) as exc:
        raise ApiError(422, "invalid_typed_data", "The signed data is not what was prepared", str(exc)) from exc
    assert isinstance(binding, eip712.ControllerBinding)
    if binding.subject != subject or binding.claim != keccak(text=body.claim_code):
        raise ApiError(422, "invalid_typed_data", "The signed data is for another customer or claim code")
    if signer != binding.controller:
        raise ApiError(422, "invalid_signature", "The binding was not signed by the key it binds")
    if claim.new_controller is not None:  # used: a repeat of the request that started it
        if claim.new_controller != binding.controller:
            raise ApiError(409, "claim_code_used", "The claim code was used already")
        return _repeat(runtime, did, subject, binding.controller)
    if binding.deadline < time.time():
        raise ApiError(422, "signature_expired", "The signed binding has expired; prepare it again")
    with runtime.sessions() as session:
        used = session.execute(
            update(RecoveryClaim)
            .where(RecoveryClaim.code_hash == claim.code_hash, RecoveryClaim.used_at.is_(None))
            .values(used_at=auth.now(), new_controller=binding.controller)
        ).rowcount  # type: ignore[attr-defined]
    if used != 1:  # a concurrent request used it: the same start, or another key's
        if _claim(runtime, subject, body.claim_code).new_controller != binding.controller:
            raise ApiError(409, "claim_code_used", "The claim code was used already")
        return _repeat(runtime, did, subject, binding.controller)
    try:
        tx_hash, _block = runtime.recovery("start", subject, binding.controller)
    except LedgerError as exc:
        with runtime.sessions() as session:  # not started: the code may be used again
            session.execute(
                update(RecoveryClaim)
                .where(RecoveryClaim.code_hash == claim.code_hash)
                .values(used_at=None, new_controller=None)
            )
        if isinstance(exc, ContractRevert):
            raise _refused(exc) from exc
        raise _chain("start the recovery", exc) from exc
    controller, pending = _pending(runtime, subject)
    if pending is None:
        raise ApiError(404, "no_recovery", "No recovery is pending for this customer")
    return _public(runtime, did, controller, pending, tx_hash)


def _repeat(runtime: Runtime, did: str, subject: Subject, key: str) -> RecoveryPublic:
    """The answer to a repeated start of the recovery to `key`: the pending recovery (waiting up to
    `REPEAT_WAIT` s for the first request's transaction), or the completed one."""
    deadline = time.monotonic() + REPEAT_WAIT
    while True:
        controller, pending = _pending(runtime, subject)
        if controller == key:
            effective_at = _started_at(runtime, subject, key)
            return RecoveryPublic(
                did=did, controller=key, new_controller=key, effective_at=effective_at, status="completed"
            )
        if pending is not None and pending.new_controller == key:
            return _public(runtime, did, controller, pending)
        if time.monotonic() > deadline:
            raise ApiError(404, "no_recovery", "No recovery is pending for this customer")
        time.sleep(0.2)


@router.get("/{did}/recovery", response_model=RecoveryPublic, responses=responses(404))
def recovery(did: str, runtime: RuntimeDep, caller: OwnConsentsReader) -> RecoveryPublic:
    """The customer's pending key recovery: the key it hands control to and when it can take effect
    (404 `no_recovery` if none). The customer sees it signed in with their current key, and can veto it."""
    subject = own_subject(runtime, caller, did, CONSENTS_READ)
    controller, pending = _pending(runtime, subject)
    if pending is None:
        raise ApiError(404, "no_recovery", "No recovery is pending for this customer")
    return _public(runtime, did, controller, pending)


@router.post("/{did}/recovery/complete", response_model=RecoveryPublic, responses=responses(404, 409, 422))
def complete_recovery(did: str, body: RecoveryClaimUse, runtime: RuntimeDep) -> RecoveryPublic:
    """Make the pending recovery effective once its time has come (the claim code that started it
    authenticates): the new key controls the customer's consents from now on, the old key's signatures
    are refused, and its sign-ins end."""
    subject = subject_of(runtime, did)
    _not_erased(runtime, subject)
    claim = _claim(runtime, subject, body.claim_code)
    controller, pending = _pending(runtime, subject)
    if claim.new_controller is not None and controller == claim.new_controller:
        # Completed already (a repeat whose first answer was lost): the same answer, and the follow-ups
        # again, which are idempotent, in case the first request stopped before them.
        return _completed(runtime, did, subject, claim.new_controller, _started_at(runtime, subject, controller))
    if pending is None or claim.new_controller is None or pending.new_controller != claim.new_controller:
        raise ApiError(404, "no_recovery", "No recovery of this claim code is pending")
    # Whether it is due is the chain's clock's to say (the contract's check, run before sending).
    try:
        tx_hash, _block = runtime.recovery("complete", subject)
    except ContractRevert as exc:
        raise _refused(exc) from exc
    except LedgerError as exc:
        raise _chain("complete the recovery", exc) from exc
    return _completed(runtime, did, subject, pending.new_controller, pending.effective_at, tx_hash)


def _started_at(runtime: Runtime, subject: Subject, key: str) -> int:
    """When the newest recovery of `subject` to `key` took effect (its announced `effectiveAt`), from the
    read model; 0 if the indexer has not read it."""
    with runtime.reads() as session:
        started = session.scalars(
            select(ConsentEvent.valid_until)
            .where(
                ConsentEvent.subject == subject,
                ConsentEvent.kind == KIND_RECOVERY_STARTED,
                ConsentEvent.partner == key,
            )
            .order_by(ConsentEvent.block_number.desc(), ConsentEvent.log_index.desc())
            .limit(1)
        ).first()
    return int(started or 0)


def _completed(
    runtime: Runtime, did: str, subject: Subject, key: str, effective_at: int, tx_hash: str | None = None
) -> RecoveryPublic:
    """The follow-ups of a completed recovery to `key` (each idempotent), and its answer."""
    runtime.vault.set_controller(subject, key, runtime.ledger.deployment.chain_id)
    with runtime.sessions() as session:
        session.execute(
            delete(CustomerSession).where(CustomerSession.subject == subject, CustomerSession.address != key)
        )
    # Answered once the read model has the new key (sign-in and consent changes check it), or after
    # the wait: the change is on-chain either way, and the indexer reads it within a block.
    with contextlib.suppress(TimeoutError):
        runtime.wait_for_controller(subject, key)
    return RecoveryPublic(
        did=did, controller=key, new_controller=key, effective_at=effective_at, status="completed", tx_hash=tx_hash
    )


@router.post("/{did}/recovery/cancel/prepare", response_model=TypedDataPublic, responses=responses(404))
def prepare_cancel(did: str, runtime: RuntimeDep, caller: ConsentWriter) -> TypedDataPublic:
    """Typed data vetoing the customer's pending recovery, for their current key to sign."""
    subject = own_subject(runtime, caller, did, CONSENTS_READ)
    _controller, pending = _pending(runtime, subject)
    if pending is None:
        raise ApiError(404, "no_recovery", "No recovery is pending for this customer")
    cancel = eip712.RecoveryCancel(
        subject, pending.new_controller, pending.effective_at, deadline=int(time.time()) + CANCEL_DEADLINE
    )
    return TypedDataPublic(typed_data=eip712.typed_data(runtime.ledger.consent.domain, cancel))


@router.post("/{did}/recovery/cancel", response_model=RecoveryPublic, responses=responses(404, 409, 422))
def cancel_recovery(did: str, body: TypedDataSubmission, runtime: RuntimeDep, caller: ConsentWriter) -> RecoveryPublic:
    """Veto the pending recovery with the current key's signature: the recovery is dropped on-chain and
    the current key keeps control."""
    subject = own_subject(runtime, caller, did, CONSENTS_READ)
    domain = runtime.ledger.consent.domain
    try:
        cancel = eip712.parse(body.typed_data, domain, ("RecoveryCancel",))
        signature = eip712.Signature.from_bytes(bytes.fromhex(body.signature[2:]))
        signer = eip712.recover(domain, cancel, signature)
    except (eip712.TypedDataError, ValueError) as exc:
        raise ApiError(422, "invalid_typed_data", "The signed data is not what was prepared", str(exc)) from exc
    assert isinstance(cancel, eip712.RecoveryCancel)
    if cancel.subject != subject:
        raise ApiError(422, "invalid_typed_data", "The signed data is for another customer")
    controller, pending = _pending(runtime, subject)
    if signer != controller:
        raise ApiError(422, "invalid_signature", "The veto was not signed by the customer's current key")
    if pending is None or (pending.new_controller, pending.effective_at) != (
        cancel.new_controller,
        cancel.effective_at,
    ):
        raise ApiError(404, "no_recovery", "No such recovery is pending for this customer")
    if cancel.deadline < time.time():
        raise ApiError(422, "signature_expired", "The signed veto has expired; prepare it again")
    try:
        tx_hash, _block = runtime.recovery(
            "cancel", subject, cancel.new_controller, cancel.effective_at, cancel.deadline, signature.to_bytes()
        )
    except ContractRevert as exc:
        raise _refused(exc) from exc
    except LedgerError as exc:
        raise _chain("cancel the recovery", exc) from exc
    with runtime.sessions() as session:  # its claim code completes nothing now
        session.execute(
            update(RecoveryClaim)
            .where(RecoveryClaim.subject == subject, RecoveryClaim.new_controller == cancel.new_controller)
            .values(new_controller=None)
        )
    return RecoveryPublic(
        did=did,
        controller=controller or "",
        new_controller=cancel.new_controller,
        effective_at=cancel.effective_at,
        status="cancelled",
        tx_hash=tx_hash,
    )


@router.get("/{did}/keys", response_model=list[KeyEventPublic], responses=responses(404))
def key_history(did: str, runtime: RuntimeDep, caller: OwnAccessesReader) -> list[KeyEventPublic]:
    """The customer's key history from the ledger, oldest first: bindings (the first, a change the key
    signed, a completed recovery), recoveries started and recoveries cancelled. For the customer and
    for auditors (who check that every change of key was announced and waited its delay)."""
    subject = own_subject(runtime, caller, did, auth.Scope.AUDIT_READ)
    with runtime.reads() as session:
        events = session.scalars(
            select(ConsentEvent)
            .where(ConsentEvent.subject == subject, ConsentEvent.kind.in_(KEY_KINDS))
            .order_by(ConsentEvent.block_number, ConsentEvent.log_index)
        ).all()
    return [
        KeyEventPublic(
            event=_KEY_EVENT_NAMES.get(e.kind, "recovery_cancelled"),  # type: ignore[arg-type]
            key=e.partner,
            effective_at=e.valid_until if e.kind == KIND_RECOVERY_STARTED else None,
            tx_hash=e.tx_hash,
            block_number=e.block_number,
            block_time=e.block_time,
        )
        for e in events
    ]
