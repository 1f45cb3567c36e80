"""Customers: enrolment from PII and erasure (operator), key binding with a claim code, consent listing."""

from __future__ import annotations

import secrets
import time
from datetime import timedelta
from urllib.parse import urlencode

import segno
from eth_utils.crypto import keccak
from fastapi import APIRouter, status
from sqlalchemy import update
from sqlalchemy.orm import Session
from web3 import Web3

from api import auth
from api.deps import OperatorWrite, OwnConsentsReader, RuntimeDep
from api.errors import ApiError, problem, responses
from api.models import ClaimCode, RecoveryClaim
from api.observability import ERASURES
from api.runtime import Runtime
from api.schemas import (
    ConsentPublic,
    ControllerPrepare,
    ControllerPublic,
    ControllerSubmit,
    CustomerCreate,
    CustomerCreated,
    CustomerErased,
    TypedDataPublic,
)
from identity.errors import InvalidDid, InvalidPII, SubjectErased, UnknownSubject
from identity.normalize import normalize_pii
from identity.types import Subject
from ledger import eip712
from ledger.consent import BoundController, latest_binding, record_binding
from ledger.errors import ConsentRejected, ContractRevert, LedgerError
from ledger.store import as_utc

# 401 is documented by `api.main.document` on the routes that check credentials (not the claim-code ones).
router = APIRouter(prefix="/customers", tags=["customers"], responses=responses(403))
CLAIM_LIFETIME = timedelta(days=7)
BIND_DEADLINE = 15 * 60
CONSENTS_READ = auth.Scope.CONSENTS_READ


def subject_of(runtime: Runtime, did: str) -> Subject:
    try:
        return runtime.dids.subject(did)
    except InvalidDid as exc:
        raise problem(exc) from exc


def _retire_claim_codes(session: Session, subject: Subject, *, recovery: bool = False) -> None:
    """The customer's unused claim code no longer binds a key (with `recovery`, no recovery code starts
    or completes a recovery, the used ones included)."""
    live = update(ClaimCode).where(ClaimCode.subject == subject, ClaimCode.used_at.is_(None))
    session.execute(live.values(used_at=auth.now()))
    if recovery:
        unused = update(RecoveryClaim).where(RecoveryClaim.subject == subject, RecoveryClaim.used_at.is_(None))
        session.execute(unused.values(used_at=auth.now()))
        used = update(RecoveryClaim).where(RecoveryClaim.subject == subject, RecoveryClaim.new_controller.is_not(None))
        session.execute(used.values(new_controller=None))


@router.post("", response_model=CustomerCreated, status_code=status.HTTP_201_CREATED, responses=responses(409, 422))
def enrol(body: CustomerCreate, runtime: RuntimeDep, _caller: OperatorWrite) -> CustomerCreated:
    """Enrol a customer from CRM PII: the PII goes to the vault encrypted; only the pseudonym is used beyond it."""
    try:
        pii = normalize_pii(body.model_dump(), runtime.identity.default_region)
        subject, _created = runtime.vault.enrol(pii)
    except (InvalidPII, SubjectErased) as exc:
        raise problem(exc) from exc
    record = runtime.vault.record(subject)
    if record is not None and record.controller:
        raise ApiError(
            409, "already_enrolled", "This customer is enrolled and has bound a key", did=runtime.dids.did(subject)
        )
    code = secrets.token_urlsafe(12)
    with runtime.sessions() as session:
        _retire_claim_codes(session, subject)  # one live code per customer
        session.add(ClaimCode(code_hash=auth.digest(code), subject=subject, expires_at=auth.now() + CLAIM_LIFETIME))
    did = runtime.dids.did(subject)
    link = f"{runtime.service.origin}/#{urlencode({'did': did, 'claim': code})}"
    qr = segno.make(link, error="m").svg_data_uri(scale=4, border=2)
    return CustomerCreated(did=did, claim_code=code, claim_url=link, claim_qr=str(qr))


def _claim(runtime: Runtime, subject: Subject, code: str, *, used: bool = False) -> bool:
    """Check the claim code; returns whether it was used already (allowed only with `used`)."""
    with runtime.reads() as session:
        claim = session.get(ClaimCode, auth.digest(code))
        if claim is None or claim.subject != subject or (claim.used_at is not None and not used):
            raise ApiError(403, "invalid_claim_code", "The claim code is not valid for this customer")
        if claim.used_at is None and as_utc(claim.expires_at) <= auth.now():
            raise ApiError(403, "claim_code_expired", "The claim code has expired; ask for a new one")
        return claim.used_at is not None


def _not_indexed() -> ApiError:
    return ApiError(
        503,
        "still_pending",
        "The key is bound on-chain and the service has not read it back yet",
        "send the same request again for the answer",
    )


def _wait_indexed(runtime: Runtime, subject: Subject) -> None:
    """Wait for the indexer to read the subject's binding; 503 `still_pending` if it has not in time (the
    binding is on-chain: the same request asked again gets the answer, see `_bound_already`)."""
    try:
        runtime.wait_for_controller(subject)
    except TimeoutError as exc:
        raise _not_indexed() from exc


def _bound_already(runtime: Runtime, did: str, subject: Subject, controller: str) -> ControllerPublic:
    """The answer to a binding request whose claim code was used: the same answer as the first time,
    if the chain binds the subject to the key this request signed for. That is a repeat (the client
    lost the first answer), or the service stopped between mining the binding and answering: then the
    binding is recorded now, as the first request would have done. Nothing is sent to the chain."""
    try:
        held = runtime.ledger.consent.controller_of(subject)
    except LedgerError as exc:
        raise ApiError(503, "chain_unavailable", "The ledger could not be read", str(exc)) from exc
    if held != controller:
        raise ApiError(403, "invalid_claim_code", "The claim code is not valid for this customer")
    _wait_indexed(runtime, subject)
    with runtime.reads() as session:
        event = latest_binding(session, bytes(subject))
    if event is None:
        raise _not_indexed()
    with runtime.sessions() as session:
        if session.get(BoundController, bytes(subject)) is None:
            record_binding(session, subject, controller, event.tx_hash, event.block_number)
    runtime.vault.set_controller(subject, controller, runtime.ledger.deployment.chain_id)
    return ControllerPublic(did=did, controller=controller, tx_hash=event.tx_hash, block_number=event.block_number)


@router.delete("/{did}", response_model=CustomerErased, responses=responses(404))
def erase(did: str, runtime: RuntimeDep, _caller: OperatorWrite) -> CustomerErased:
    """Erase the customer's personal data (GDPR art. 17): the vault destroys their data key, ciphertexts
    and lookup entries (crypto-shredding), the DID is deactivated, an unused claim code and every
    recovery code stop working (a pending recovery is never completed), and `bridge export` releases
    nothing of them any more. The chain keeps its pseudonymous records
    (no personal data is there); a bound key still signs in, and can still revoke consent. The same
    PII cannot be enrolled again. Erasing again answers the same."""
    subject = subject_of(runtime, did)
    record = runtime.vault.record(subject)
    if record is None:
        raise ApiError(404, "unknown_customer", "No such customer")
    with runtime.sessions() as session:  # first: a crash after it leaves a retry to erase
        _retire_claim_codes(session, subject, recovery=True)
    try:
        erased_at = runtime.vault.erase(subject)
    except UnknownSubject as exc:
        raise problem(exc) from exc
    if record.erased_at is None:  # erasing again is no new erasure
        ERASURES.inc()
    return CustomerErased(did=did, erased_at=erased_at.isoformat())


def binding_typed_data(runtime: Runtime, subject: Subject, body: ControllerPrepare) -> TypedDataPublic:
    """The `ControllerBinding` the key `body.address` signs, tied to the claim (or recovery) code that
    authenticated the request: the answer of both prepare routes."""
    binding = eip712.ControllerBinding(
        subject=subject,
        controller=Web3.to_checksum_address(body.address),
        claim=keccak(text=body.claim_code),
        deadline=int(time.time()) + BIND_DEADLINE,
    )
    return TypedDataPublic(typed_data=eip712.typed_data(runtime.ledger.consent.domain, binding))


@router.post("/{did}/controller/prepare", response_model=TypedDataPublic, responses=responses(404, 409, 422))
def prepare_binding(did: str, body: ControllerPrepare, runtime: RuntimeDep) -> TypedDataPublic:
    """Typed data binding `address` to the customer, for their key to sign (the claim code authenticates)."""
    subject = subject_of(runtime, did)
    _claim(runtime, subject, body.claim_code)
    return binding_typed_data(runtime, subject, body)


@router.post("/{did}/controller", response_model=ControllerPublic, responses=responses(404, 409, 422))
def bind(did: str, body: ControllerSubmit, runtime: RuntimeDep) -> ControllerPublic:
    """Bind the key on-chain, once its holder has signed the prepared typed data. A repeat of a request
    that bound the key gets the same answer (the claim code was used by it)."""
    subject = subject_of(runtime, did)
    repeat = _claim(runtime, subject, body.claim_code, used=True)
    try:
        binding = eip712.parse(body.typed_data, runtime.ledger.consent.domain, ("ControllerBinding",))
        signer = eip712.recover(
            runtime.ledger.consent.domain, binding, eip712.Signature.from_bytes(bytes.fromhex(body.signature[2:]))
        )
    except (eip712.TypedDataError, ValueError) as exc:  # the typed data, or the signature (ValueError)
        raise ApiError(422, "invalid_typed_data", "The signed data is not what was prepared", str(exc)) from exc
    assert isinstance(binding, eip712.ControllerBinding)
    if binding.subject != subject or binding.claim != keccak(text=body.claim_code):
        raise ApiError(422, "invalid_typed_data", "The signed data is for another customer or claim code")
    if signer != binding.controller:
        raise ApiError(422, "invalid_signature", "The binding was not signed by the key it binds")
    if repeat:
        return _bound_already(runtime, did, subject, binding.controller)
    if binding.deadline < time.time():
        raise ApiError(422, "signature_expired", "The signed binding has expired; prepare it again")
    with runtime.sessions() as session:
        used = session.execute(
            update(ClaimCode)
            .where(ClaimCode.code_hash == auth.digest(body.claim_code), ClaimCode.used_at.is_(None))
            .values(used_at=auth.now())
        ).rowcount  # type: ignore[attr-defined]
    if used != 1:
        raise ApiError(409, "claim_code_used", "The claim code was used already")
    try:
        tx_hash, block_number = runtime.bind_controller(subject, binding.controller)
    except ConsentRejected as exc:
        raise ApiError(409, "already_bound", "This customer has bound a key already", str(exc)) from exc
    except LedgerError as exc:
        with runtime.sessions() as session:  # the code was not spent: let the customer try again
            session.execute(
                update(ClaimCode).where(ClaimCode.code_hash == auth.digest(body.claim_code)).values(used_at=None)
            )
        if isinstance(exc, ContractRevert):
            raise  # a refusal, answered in plain words by api.errors (not with the revert's facts)
        raise ApiError(503, "chain_unavailable", "The ledger could not record the binding", str(exc)) from exc
    runtime.vault.set_controller(subject, binding.controller, runtime.ledger.deployment.chain_id)
    _wait_indexed(runtime, subject)
    return ControllerPublic(did=did, controller=binding.controller, tx_hash=tx_hash, block_number=block_number)


def own_subject(runtime: Runtime, caller: auth.Caller, did: str, operator_scope: auth.Scope) -> Subject:
    """The subject of `did`, if the caller may see it: that customer, or a service with `operator_scope`."""
    subject = subject_of(runtime, did)
    if caller.kind == "customer":
        if caller.subject != subject:
            raise ApiError(403, "not_your_data", "Customers see only their own data")
    elif operator_scope not in caller.scopes:
        raise ApiError(403, "insufficient_scope", "Not allowed", f"this route needs the {operator_scope} scope")
    return subject


@router.get("/{did}/consents", response_model=list[ConsentPublic], responses=responses(404))
def consents(did: str, runtime: RuntimeDep, caller: OwnConsentsReader) -> list[ConsentPublic]:
    """Current consents: per partner and purpose, what is permitted now and what is pending."""
    subject = own_subject(runtime, caller, did, CONSENTS_READ)
    catalogue = runtime.catalogue()
    return [
        ConsentPublic(
            partner=c.partner,
            partner_name=catalogue.partners.get(c.partner),
            purpose=catalogue.purpose_key(c.purpose),
            attributes=catalogue.names(c.attributes),
            pending_grant=catalogue.names(c.pending_grant),
            pending_revoke=catalogue.names(c.pending_revoke),
            valid_until=c.valid_until,
            status=c.status,  # type: ignore[arg-type]
            tx_hash=c.tx_hash,
            block_number=c.block_number,
        )
        for c in runtime.ledger.consent_reader.consents_of(subject)
    ]
