"""Consent changes: prepared as EIP-712 typed data, signed by the customer, accepted into the outbox."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, status
from starlette.concurrency import run_in_threadpool

from api.auth import Caller, Scope, controllers_of
from api.deps import ConsentForwarder, ConsentWriter, OwnConsentsReader, RuntimeDep
from api.errors import ApiError, problem, responses
from api.reference import Catalogue
from api.runtime import Runtime
from api.schemas import (
    ConsentAccepted,
    ConsentBatch,
    ConsentBatchItem,
    ConsentBatchPublic,
    ConsentPrepare,
    ConsentPreparePublic,
    ConsentRequestPublic,
    ErrorPublic,
    TypedDataSubmission,
)
from identity.types import Subject
from ledger import eip712
from ledger.consent import ConsentRequest, NonceConflict, RequestStatus, SignedChange
from ledger.eip712 import ChangeKind, ConsentChange
from ledger.errors import UnknownAttributes
from ledger.metrics import count_consent
from ledger.types import attribute_mask

router = APIRouter(prefix="/consents", tags=["consents"], responses=responses(401, 403))
DEADLINE = 15 * 60  # seconds a prepared grant may wait to be signed and relayed (a revocation: see settings)
CONSENTS_READ = Scope.CONSENTS_READ  # an operator's; customers read their own consents


def _controller(caller: Caller) -> str:
    assert caller.address is not None
    return caller.address


def _partner_retired() -> ApiError:
    return ApiError(422, "partner_retired", "The partner has left the programme: nothing can be granted to it")


@router.post("/prepare", response_model=ConsentPreparePublic, responses=responses(422))
def prepare(body: ConsentPrepare, runtime: RuntimeDep, caller: ConsentWriter) -> ConsentPreparePublic:
    """The complete EIP-712 typed data of a grant or revocation, with the next nonce and a deadline."""
    assert caller.subject is not None
    catalogue = runtime.catalogue()
    partner = catalogue.partner(body.partner, retired=body.action == "revoke")  # withdrawing is always possible
    if partner is None:
        if catalogue.partner(body.partner, retired=True) is not None:
            raise _partner_retired()
        raise ApiError(422, "unknown_partner", "No such partner", body.partner)
    if body.purpose not in catalogue.purposes:
        raise ApiError(422, "unknown_purpose", "No such purpose", body.purpose)
    mask, unknown = catalogue.mask(body.attributes)
    if unknown:
        raise ApiError(422, "unknown_attribute", "No such attribute", ", ".join(unknown))
    if body.action == "revoke" and body.valid_until:
        raise ApiError(422, "invalid_validity", "A revocation has no valid_until")
    if body.valid_until and body.valid_until <= time.time():
        raise ApiError(422, "invalid_validity", "valid_until is in the past")
    subject = Subject(caller.subject)
    nonce = runtime.ledger.outbox.next_nonce(subject, runtime.ledger.consent.nonce_of(subject))
    # A grant signed and not used soon must not be usable later; a revocation accepted must not fail
    # because the chain was away past its deadline (its 202 said it would be applied).
    lifetime = DEADLINE if body.action == "grant" else runtime.service.revocation_deadline_days * 86400
    change = ConsentChange(
        kind=ChangeKind.GRANT if body.action == "grant" else ChangeKind.REVOKE,
        subject=subject,
        partner=partner,  # type: ignore[arg-type]
        purpose=eip712.purpose_id(body.purpose),
        attributes=mask,
        nonce=nonce,
        deadline=int(time.time()) + lifetime,
        valid_until=body.valid_until,
    )
    return ConsentPreparePublic(
        typed_data=eip712.typed_data(runtime.ledger.consent.domain, change), nonce=nonce, deadline=change.deadline
    )


def _parsed(runtime: Runtime, body: TypedDataSubmission) -> tuple[ConsentChange, eip712.Signature, str]:
    """The signed change, its signature and who signed it (422 `invalid_typed_data` if it is none of this
    ledger's consent changes)."""
    try:
        change = eip712.parse(body.typed_data, runtime.ledger.consent.domain, ("ConsentGrant", "ConsentRevoke"))
        signature = eip712.Signature.from_bytes(bytes.fromhex(body.signature[2:]))
        signer = eip712.recover(runtime.ledger.consent.domain, change, signature)
    except (eip712.TypedDataError, ValueError) as exc:  # the typed data, or the signature (ValueError)
        raise ApiError(
            422, "invalid_typed_data", "The signed data is not a consent change of this ledger", str(exc)
        ) from exc
    assert isinstance(change, ConsentChange)
    return change, signature, signer


def _acceptable(change: ConsentChange, catalogue: Catalogue) -> None:
    """What `prepare` checks by name, checked on the signed values: the signature makes a change authentic,
    not acceptable, and what is accepted is applied (a 202 says so). Raises the ApiError that says why not."""
    if change.deadline <= time.time():
        raise ApiError(422, "signature_expired", "The signed change has expired; prepare it again")
    if change.partner not in catalogue.partners:
        raise ApiError(422, "unknown_partner", "No such partner", change.partner)
    if change.kind == ChangeKind.GRANT and change.partner in catalogue.retired:
        raise _partner_retired()
    if bytes(change.purpose) not in catalogue.purpose_by_id:
        raise ApiError(422, "unknown_purpose", "No such purpose", "purpose: 0x" + bytes(change.purpose).hex())
    if change.attributes == 0:
        raise ApiError(422, "empty_attributes", "A change names at least one attribute")
    try:  # the signed word is a uint256: bits past what a consent holds are no attribute's either
        attribute_mask(change.attributes, catalogue.attribute_mask)
    except UnknownAttributes as exc:
        raise problem(exc) from exc
    if change.valid_until and change.valid_until <= time.time():
        raise ApiError(422, "invalid_validity", "validUntil is in the past")


async def _catalogue(runtime: Runtime) -> Catalogue:
    catalogue = runtime.cached_catalogue()
    return catalogue if catalogue is not None else await run_in_threadpool(runtime.catalogue)


def _store(
    runtime: Runtime, change: ConsentChange, signature: eip712.Signature, controller: str
) -> Future[ConsentRequest]:
    """Hand a checked change to the outbox's group commit; the future is done when it is durable."""
    registry = runtime.ledger.consent
    return runtime.ledger.writer.accept(
        SignedChange(change, signature), controller, lambda: registry.nonce_of(change.subject)
    )


async def _stored(pending: Future[ConsentRequest]) -> ConsentRequest:
    try:
        return await asyncio.wait_for(asyncio.wrap_future(pending), 30)  # durable (committed) when this returns
    except NonceConflict as exc:
        raise ApiError(409, "nonce_mismatch", "The change's nonce is not the next one", str(exc)) from exc


@router.post("", response_model=ConsentAccepted, status_code=status.HTTP_202_ACCEPTED, responses=responses(409, 422))
async def submit(body: TypedDataSubmission, runtime: RuntimeDep, caller: ConsentWriter) -> ConsentAccepted:
    """Check the customer's signature and store the change durably; it is on-chain shortly after.

    On the event loop: the checks are CPU work of a fraction of a millisecond (no database), and the
    outbox writer's group commit is awaited, not waited for in a pool thread (a thread hop and a
    blocked thread per request were most of this route's cost)."""
    change, signature, signer = _parsed(runtime, body)
    if change.subject != caller.subject:
        raise ApiError(403, "not_your_data", "Customers change only their own consent")
    controller = _controller(caller)
    if signer != controller:
        raise ApiError(
            422,
            "invalid_signature",
            "The change was not signed by your bound key",
            f"signed by {signer}, bound key is {controller}",
        )
    _acceptable(change, await _catalogue(runtime))
    accepted = await _stored(_store(runtime, change, signature, controller))
    runtime.wake_relayer()
    count_consent("accepted")
    return ConsentAccepted(id=accepted.id, status=RequestStatus.PENDING)


@router.post("/batch", response_model=ConsentBatchPublic, responses=responses(422))
async def submit_batch(body: ConsentBatch, runtime: RuntimeDep, _caller: ConsentForwarder) -> ConsentBatchPublic:
    """Up to 500 changes, of any customers, each signed by its customer's bound key: for a back end that
    forwards what its customers signed elsewhere (a mobile app's, a CRM import of consents signed in another
    channel). Each change is checked and answered alone, as `POST /consents` would answer it (202 with its
    request's id, or the status and code it would have got): one failing change fails alone, and those
    accepted are stored durably, with the same guarantees, before the answer. A customer's changes in one
    request are taken in order (nonce after nonce)."""
    catalogue = await _catalogue(runtime)
    results: dict[int, ConsentBatchItem] = {}
    checked: list[tuple[int, ConsentChange, eip712.Signature, str]] = []
    for index, item in enumerate(body.changes):
        try:
            change, signature, signer = _parsed(runtime, item)
            _acceptable(change, catalogue)
        except ApiError as exc:
            results[index] = _refused(index, exc)
            continue
        checked.append((index, change, signature, signer))
    subjects = [Subject(bytes(change.subject)) for _, change, _, _ in checked]
    controllers, erased = await run_in_threadpool(_keys_of, runtime, subjects)
    pending: list[tuple[int, Future[ConsentRequest]]] = []
    for index, change, signature, signer in checked:
        subject = bytes(change.subject)
        if erased.get(Subject(subject)):
            results[index] = _refused(index, ApiError(409, "customer_erased", "This customer's data was erased"))
        elif subject not in controllers:
            results[index] = _refused(
                index,
                ApiError(422, "unbound_subject", "The customer has not bound a key: nothing they sign counts yet"),
            )
        elif signer != controllers[subject]:
            results[index] = _refused(
                index,
                ApiError(
                    422,
                    "invalid_signature",
                    "The change was not signed by the customer's bound key",
                    f"signed by {signer}, bound key is {controllers[subject]}",
                ),
            )
        else:
            pending.append((index, _store(runtime, change, signature, controllers[subject])))
    for index, future in pending:
        try:
            accepted = await _stored(future)
        except ApiError as exc:
            results[index] = _refused(index, exc)
        else:
            results[index] = ConsentBatchItem(index=index, status=status.HTTP_202_ACCEPTED, id=accepted.id)
    if pending:
        runtime.wake_relayer()
    ordered = [results[i] for i in range(len(body.changes))]
    return ConsentBatchPublic(accepted=sum(r.status == status.HTTP_202_ACCEPTED for r in ordered), results=ordered)


def _keys_of(runtime: Runtime, subjects: list[Subject]) -> tuple[dict[bytes, str], dict[Subject, bool]]:
    """The subjects' bound keys (as sign-in finds them) and which the vault says were erased."""
    with runtime.reads() as session:
        controllers = controllers_of(session, [bytes(s) for s in subjects])
    return controllers, runtime.vault.erased_of(subjects)


def _refused(index: int, exc: ApiError) -> ConsentBatchItem:
    detail = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
    return ConsentBatchItem(index=index, status=exc.status, error=ErrorPublic(code=exc.code, detail=detail))


def public_status(request: ConsentRequest) -> str:
    if request.status == RequestStatus.FAILED:
        return "failed"
    if request.status != RequestStatus.CONFIRMED:
        return "pending"
    if request.kind == ChangeKind.REVOKE:
        return "revoked"
    if request.valid_until and request.valid_until <= time.time():
        return "expired"
    return "active"


@router.get("/{request_id}", response_model=ConsentRequestPublic, responses=responses(404))
def get(request_id: str, runtime: RuntimeDep, caller: OwnConsentsReader) -> ConsentRequestPublic:
    """A consent change's status, transaction and block, and its consent receipt once on-chain."""
    request = runtime.ledger.outbox.request(request_id)
    visible = request is not None and (
        (caller.kind == "customer" and caller.subject == request.subject)
        or (caller.kind == "service" and CONSENTS_READ in caller.scopes)
    )
    if request is None or not visible:  # the same answer for "not yours" and "none": ids are not probed
        raise ApiError(404, "unknown_consent_request", "No such consent request")
    catalogue = runtime.catalogue()
    attributes = catalogue.names(int(request.attributes))
    purpose = catalogue.purpose_key(request.purpose)
    receipt = None
    if request.status == RequestStatus.CONFIRMED:
        event = runtime.ledger.outbox.event_for(request)
        receipt = consent_receipt(
            runtime, request, catalogue, purpose, attributes, event.block_time if event else int(time.time())
        )
    return ConsentRequestPublic(
        id=request.id,
        action="grant" if request.kind == ChangeKind.GRANT else "revoke",
        status=public_status(request),  # type: ignore[arg-type]
        partner=request.partner,
        purpose=purpose,
        attributes=attributes,
        valid_until=request.valid_until,
        tx_hash=request.tx_hash,
        block_number=request.block_number,
        error={"code": request.error_code, "detail": request.error_detail or ""} if request.error_code else None,
        receipt=receipt,
    )


def consent_receipt(
    runtime: Runtime,
    request: ConsentRequest,
    catalogue: Catalogue,
    purpose: str,
    attributes: list[str],
    block_time: int,
) -> dict[str, Any]:
    """A Kantara Initiative Consent Receipt (v1.1) for the change, with the chain as evidence."""
    granted = request.kind == ChangeKind.GRANT
    return {
        "version": "KI-CR-v1.1.0",
        "jurisdiction": "EU",
        "consentTimestamp": block_time,
        "collectionMethod": "web form signed with the customer's key (EIP-712)",
        "consentReceiptID": request.id,
        "language": "en",
        "piiPrincipalId": runtime.dids.did(Subject(request.subject)),
        "piiControllers": [
            {
                "piiController": runtime.service.company_name,
                "contact": runtime.service.company_contact,
                "email": runtime.service.company_contact,
            }
        ],
        "policyUrl": "/privacy",
        "services": [
            {
                "service": catalogue.partners.get(request.partner, request.partner),
                "purposes": [
                    {
                        "purpose": purpose,
                        "purposeCategory": [purpose],
                        "consentType": "EXPLICIT",
                        "piiCategory": attributes,
                        "primaryPurpose": False,
                        "termination": "until revoked"
                        if not request.valid_until
                        else datetime.fromtimestamp(request.valid_until, UTC).isoformat(),
                        "thirdPartyDisclosure": True,
                        "thirdPartyName": request.partner,
                    }
                ],
            }
        ],
        "sensitive": False,
        "spiCat": [],
        "action": "grant" if granted else "revoke",
        "evidence": {
            "chainId": runtime.ledger.deployment.chain_id,
            "contract": runtime.ledger.consent.address,
            "txHash": request.tx_hash,
            "blockNumber": request.block_number,
            "signer": request.controller,
            "nonce": request.nonce,
        },
    }
