"""Loyalty points: issuers issue, customers authorise, partners redeem (synchronously, once on-chain),
customers see balance, lots, history and tier, partners get statements for settlement."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Connection, select

from api import idempotency
from api.auth import Caller, Scope
from api.deps import (
    OwnPointsReader,
    PointsAuthoriser,
    PointsIssuer,
    PointsRedeemer,
    RuntimeDep,
    StatementReader,
)
from api.errors import PROBLEM_MEDIA_TYPE, ApiError, request_path, responses
from api.observability import REDEMPTIONS
from api.routers import codes
from api.routers.customers import own_subject, subject_of
from api.runtime import Runtime
from api.schemas import (
    CodeRedemption,
    ErrorPublic,
    IssuanceCreate,
    IssuancePublic,
    IssuancesPublic,
    LotPublic,
    PointsEventPublic,
    PointsPublic,
    RedemptionBody,
    RedemptionPrepare,
    RedemptionPreparePublic,
    RedemptionPublic,
    RedemptionSubmission,
    StatementLine,
    StatementPublic,
    TierPublic,
)
from identity.types import Subject
from ledger import eip712
from ledger.consent import CONTROLLER_OF
from ledger.eip712 import Redemption
from ledger.points import (
    FINAL,
    LOST_AFTER_ANSWER,
    REQUEST_BY_REF,
    EventKind,
    PointsReader,
    PointsRequest,
    PointsStatus,
    RedemptionCodeEnd,
)
from ledger.types import MAX_POINTS

router = APIRouter(tags=["points"], responses=responses(401, 403))
DEADLINE = 15 * 60  # seconds an authorisation may wait to be used at the partner
ANSWER_TIMEOUT = 30.0
POINTS_READ = Scope.POINTS_READ  # an operator's; customers read their own points

_IDEMPOTENCY_KEY = "a unique key per operation: a retry with the same key and body gets the first answer"
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255, description=_IDEMPOTENCY_KEY)]
# A redemption without one is refused with 400 `idempotency_key_required` (not FastAPI's 422): the header is
# optional to FastAPI, hidden from its schema, and documented required in the route's OpenAPI instead.
RequiredIdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255, include_in_schema=False)]
REQUIRED_IDEMPOTENCY_KEY = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            "description": _IDEMPOTENCY_KEY,
        }
    ]
}

# The contract's reasons, as HTTP answers.
_FAILURES: dict[str, tuple[int, str]] = {
    "insufficient_points": (409, "Not enough unexpired points"),
    "authorisation_used": (409, "This authorisation was used already"),
    "nonce_mismatch": (409, "The authorisation's nonce is not the next one; authorise again"),
    "invalid_signature": (422, "The authorisation was not signed by the customer's bound key"),
    "signature_expired": (422, "The authorisation has expired; authorise again"),
    "unknown_partner": (422, "The partner is not registered on the ledger"),
    "unbound_subject": (422, "The customer has not bound a key"),
    "invalid_amount": (422, "Invalid amount"),
    "invalid_expiry": (422, "The expiry is in the past"),
    LOST_AFTER_ANSWER: (409, "Done once, then lost with a block the node did not keep; it could not be applied again"),
}


# waiting for the chain -----------------------------------------------------------------------------


POLL_SECONDS = 2.0


async def _wait(runtime: Runtime, request_ids: Sequence[str], *, created: bool) -> list[PointsRequest]:
    """Until every request is done or failed. The relayer hands each final row over when it settles
    it; the database is read for requests that may be final already (a repeat: `created` false) and,
    as a fallback, after `POLL_SECONDS` without news (longer than an answer takes under load: polling
    sooner would read every waiting request again)."""
    reader = runtime.ledger.points_reader
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + ANSWER_TIMEOUT
    final: dict[str, PointsRequest] = {}
    news = asyncio.Event()

    def arrived(row: PointsRequest) -> None:
        final[row.id] = row
        news.set()

    def wake(row: PointsRequest) -> None:  # in the relayer's thread
        loop.call_soon_threadsafe(arrived, row)

    late = [runtime.completions.subscribe(request_id, wake) for request_id in request_ids]
    runtime.wake_relayer()
    read = not created or any(late)  # finished before we listened: its news came and went
    try:
        while True:
            if read:
                missing = [i for i in request_ids if i not in final]
                rows = await run_in_threadpool(_read, reader, missing)
                final.update((r.id, r) for r in rows if r is not None and r.status in FINAL)
            if all(i in final for i in request_ids):
                return [final[i] for i in request_ids]
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(
                    503,
                    "still_pending",
                    "Not on-chain yet",
                    "the request is queued and will be applied; retry with the same Idempotency-Key for the answer",
                )
            news.clear()
            try:
                await asyncio.wait_for(news.wait(), timeout=min(left, POLL_SECONDS))
                read = False
            except TimeoutError:
                read = True
    finally:
        for request_id in request_ids:
            runtime.completions.unsubscribe(request_id, wake)


def _read(reader: PointsReader, request_ids: list[str]) -> list[PointsRequest | None]:
    return [reader.request(i) for i in request_ids]


def _answer(status_code: int, body: dict[str, Any]) -> JSONResponse:
    media = PROBLEM_MEDIA_TYPE if status_code >= 400 else "application/json"
    return JSONResponse(body, status_code=status_code, media_type=media)


def _failure(request: PointsRequest) -> ApiError:
    code = request.error_code or "rejected"
    status_code, title = _FAILURES.get(code, (422, "The ledger refused the request"))
    return ApiError(status_code, code, title, request.error_detail or None, request_id=request.id)


# issuance ------------------------------------------------------------------------------------------


@router.post(
    "/points/issuances",
    response_model=IssuancesPublic,
    status_code=status.HTTP_201_CREATED,
    responses=responses(409, 422, 503),
)
async def issue(
    body: IssuanceCreate, request: Request, runtime: RuntimeDep, caller: PointsIssuer, key: IdempotencyKey = None
) -> JSONResponse:
    """Issue points (one or many lots). Answers once they are on-chain, with each lot; an item the
    chain refuses is reported in its place and the others still apply."""
    now = int(time.time())
    lifetime = runtime.service.points_lifetime_days * 86400
    # Whom the vault holds, in one query and off the event loop (the vault may be a database server),
    # before `build`, which runs on the loop and only after the key's first answer was looked for.
    well_formed = []
    for item in body.issuances:
        with contextlib.suppress(ApiError):
            well_formed.append(subject_of(runtime, item.did))
    erased = await run_in_threadpool(runtime.vault.erased_of, well_formed)

    def build(_connection: Connection) -> list[PointsRequest]:
        rows = []
        for index, item in enumerate(body.issuances):
            try:
                subject = subject_of(runtime, item.did)
            except ApiError as exc:
                raise ApiError(
                    422, "unknown_customer", "No such customer", f"issuances[{index}]: {exc.detail}"
                ) from exc
            if subject not in erased:  # a well-formed DID is not a customer: nobody enrolled it
                raise ApiError(
                    422, "unknown_customer", "No such customer", f"issuances[{index}].did: nobody enrolled it"
                )
            if erased[subject]:
                raise ApiError(
                    422,
                    "customer_erased",
                    "The customer's data was erased",
                    f"issuances[{index}].did: no points are issued to an erased customer",
                )
            expires_at = item.expires_at if item.expires_at is not None else now + lifetime
            if expires_at <= now:
                raise ApiError(422, "invalid_expiry", "The expiry is in the past", f"issuances[{index}]")
            row = PointsRequest(
                id=str(uuid.uuid4()),
                kind="issue",
                ref=os.urandom(32),
                subject=bytes(subject),
                amount=item.amount,
                expires_at=expires_at,
                principal=caller.name,
            )
            rows.append(row)
        return rows

    started = await idempotency.start(
        runtime,
        principal=caller.name,
        key=key,
        route="issue",
        path=request_path(request),
        digest=idempotency.body_hash(await request.body()),
        build=build,
        conflict=lambda: ApiError(409, "conflict", "Conflicting request; retry"),
    )
    if started.status_code is not None:
        assert started.body is not None
        return _answer(started.status_code, started.body)
    rows = await _wait(runtime, started.request_ids, created=started.created)
    dids = runtime.dids
    items = [
        IssuancePublic(
            id=r.id,
            did=dids.did(Subject(r.subject)),
            amount=r.amount,
            expires_at=r.expires_at,
            reference=body.issuances[i].reference,  # rows come in the order of the body's items
            status="issued" if r.status == PointsStatus.DONE else "failed",
            lot_id=r.lot_id,
            tx_hash=r.tx_hash,
            block_number=r.block_number,
            error=ErrorPublic(code=r.error_code, detail=r.error_detail or "") if r.error_code else None,
        )
        for i, r in enumerate(rows)
    ]
    return _answer(201, IssuancesPublic(issuances=items).model_dump(mode="json"))


# redemption ----------------------------------------------------------------------------------------


@router.post("/points/redemptions/prepare", response_model=RedemptionPreparePublic, responses=responses(409, 422))
def prepare(body: RedemptionPrepare, runtime: RuntimeDep, caller: PointsAuthoriser) -> RedemptionPreparePublic:
    """The EIP-712 `Redemption` the customer signs to let a partner spend points, once. Not for more points
    than the customer holds now (409 `insufficient_points`): a code the till would refuse helps nobody."""
    assert caller.subject is not None
    catalogue = runtime.catalogue()
    partner = catalogue.partner(body.partner)
    if partner is None:
        if catalogue.partner(body.partner, retired=True) is not None:
            raise ApiError(422, "partner_retired", "The partner has left the programme")
        raise ApiError(422, "unknown_partner", "No such partner", body.partner)
    balance = runtime.ledger.points.balance_of(Subject(caller.subject))  # unexpired, as the chain has it now
    if body.amount > balance:
        raise ApiError(
            409, "insufficient_points", "Not enough unexpired points", f"{body.amount} asked, {balance} held"
        )
    controller = caller.address
    assert controller is not None
    sequence = runtime.ledger.points_reader.next_sequence(
        controller,
        partner,
        runtime.ledger.points.nonce_of(controller, partner),  # type: ignore[arg-type]
    )
    message = Redemption(
        subject=Subject(caller.subject),
        partner=partner,  # type: ignore[arg-type]
        amount=body.amount,
        redemption_id=os.urandom(32),
        nonce=eip712.redemption_nonce(partner, sequence),
        deadline=int(time.time()) + DEADLINE,
    )
    return RedemptionPreparePublic(
        typed_data=eip712.typed_data(runtime.ledger.points.domain, message),
        redemption_id="0x" + message.redemption_id.hex(),
        nonce=str(message.nonce),
        deadline=message.deadline,
    )


def _redemption_public(runtime: Runtime, row: PointsRequest) -> dict[str, Any]:
    assert row.partner is not None
    assert row.balance is not None and row.tx_hash is not None and row.block_number is not None
    return RedemptionPublic(
        id=row.id,
        did=runtime.dids.did(Subject(row.subject)),
        partner=row.partner,
        amount=row.amount,
        redemption_id="0x" + row.ref.hex(),
        status="redeemed",
        balance=row.balance,
        tx_hash=row.tx_hash,
        block_number=row.block_number,
        reference=row.reference,
    ).model_dump(mode="json")


@router.post(
    "/points/redemptions",
    response_model=RedemptionPublic,
    responses=responses(400, 404, 409, 410, 422, 429, 503),
    openapi_extra=REQUIRED_IDEMPOTENCY_KEY,
)
async def redeem(
    body: RedemptionBody,
    request: Request,
    runtime: RuntimeDep,
    caller: PointsRedeemer,
    key: RequiredIdempotencyKey = None,
) -> JSONResponse:
    """Redeem with the customer's short code (`{code, reference}`), or with the customer's signed
    authorisation itself (`{typed_data, signature, reference}`). Answers when the redemption is
    on-chain, with the customer's new balance. Send an `Idempotency-Key`: a retry with it gets the first
    answer. A partner whose code lookups fail too often is refused for a while (429)."""
    if not key:
        raise ApiError(400, "idempotency_key_required", "Send an Idempotency-Key header with each redemption")
    domain = runtime.ledger.points.domain
    partner = caller.address
    by_code = isinstance(body, CodeRedemption)
    if by_code and partner is not None:
        codes.FAILED_LOOKUPS.check(partner)
    ends: list[object] = []  # the code's end, stored with its request

    def build(connection: Connection) -> list[PointsRequest]:
        ends.clear()
        if isinstance(body, CodeRedemption):
            return [_by_code(connection, body, partner, caller.name, ends)]
        return [_by_typed_data(connection, body, domain, partner, caller.name, ends)]

    started = await idempotency.start(
        runtime,
        principal=caller.name,
        key=key,
        route="redeem",
        path=request_path(request),
        digest=idempotency.body_hash(await request.body()),
        build=build,
        conflict=lambda: _conflict(runtime, ends),
        companions=ends,
    )
    if started.status_code is not None:
        assert started.body is not None
        return _answer(started.status_code, started.body)
    (row,) = await _wait(runtime, started.request_ids, created=started.created)
    if row.status == PointsStatus.DONE:
        status_code, answer = 200, _redemption_public(runtime, row)
    else:
        status_code, answer = row_failure(row, request_path(request))
    if started.created:  # a retry answers again what was counted once
        REDEMPTIONS.labels(outcome="done" if status_code == 200 else "refused").inc()
    return _answer(status_code, answer)


def _by_typed_data(
    connection: Connection,
    body: RedemptionSubmission,
    domain: eip712.Domain,
    partner: str | None,
    principal: str,
    ends: list[object],
) -> PointsRequest:
    try:
        message = eip712.parse(body.typed_data, domain, ("Redemption",))
        signature = eip712.Signature.from_bytes(bytes.fromhex(body.signature[2:]))
        signer = eip712.recover(domain, message, signature)
    except (eip712.TypedDataError, ValueError) as exc:  # the typed data, or the signature (ValueError)
        raise ApiError(
            422, "invalid_typed_data", "The signed data is not a redemption of this ledger", str(exc)
        ) from exc
    assert isinstance(message, Redemption)
    if partner is None or message.partner != partner:
        raise ApiError(403, "not_your_authorisation", "This authorisation is for another partner")
    if not 0 < message.amount <= MAX_POINTS:
        raise ApiError(422, "invalid_amount", "Invalid amount")
    if message.deadline <= time.time():
        raise ApiError(422, "signature_expired", "The authorisation has expired; authorise again")
    controller = connection.execute(CONTROLLER_OF, {"subject": bytes(message.subject)}).scalar()
    if controller is None:
        raise ApiError(422, "unbound_subject", "The customer has not bound a key")
    if signer != controller:
        raise ApiError(
            422,
            "invalid_signature",
            "The authorisation was not signed by the customer's bound key",
            f"signed by {signer}",
        )
    if connection.execute(REQUEST_BY_REF, {"ref": message.redemption_id}).first() is not None:
        raise ApiError(409, "authorisation_used", "This authorisation was used already")
    # An authorisation the customer kept behind a code: cancelled, the service will not redeem it this
    # way either; outstanding, its use ends the code as a redemption by the code would.
    kept = codes.by_redemption_id(connection, message.redemption_id)
    if kept is not None and kept[1] is not None:
        raise codes.ended(kept[1])
    request = PointsRequest(
        id=str(uuid.uuid4()),
        kind="redeem",
        ref=message.redemption_id,
        subject=bytes(message.subject),
        amount=message.amount,
        partner=message.partner,
        controller=controller,
        nonce=str(message.nonce),
        deadline=message.deadline,
        v=signature.v,
        r=signature.r,
        s=signature.s,
        principal=principal,
        reference=body.reference,
    )
    if kept is not None:
        ends.append(RedemptionCodeEnd(code_id=kept[0], outcome="used", request_id=request.id))
    return request


def _by_code(
    connection: Connection, body: CodeRedemption, partner: str | None, principal: str, ends: list[object]
) -> PointsRequest:
    code = codes.for_partner(connection, body.code, partner)
    controller = connection.execute(CONTROLLER_OF, {"subject": code.subject}).scalar()
    if controller != code.controller:  # the customer bound another key since: the signature is void
        raise ApiError(422, "invalid_signature", "The authorisation was not signed by the customer's bound key")
    if connection.execute(REQUEST_BY_REF, {"ref": code.redemption_id}).first() is not None:
        raise codes.ended("used")  # redeemed with its typed data before the code's end was stored
    request = PointsRequest(
        id=str(uuid.uuid4()),
        kind="redeem",
        ref=code.redemption_id,
        subject=code.subject,
        amount=code.amount,
        partner=code.partner,
        controller=code.controller,
        nonce=code.nonce,
        deadline=code.deadline,
        v=code.v,
        r=code.r,
        s=code.s,
        principal=principal,
        reference=body.reference,
    )
    ends.append(RedemptionCodeEnd(code_id=code.id, outcome="used", request_id=request.id))
    return request


def _conflict(runtime: Runtime, ends: list[object]) -> ApiError:
    """What a lost race says: a code's end stored first (cancelled or used), or the on-chain id queued."""
    for end in ends:
        assert isinstance(end, RedemptionCodeEnd)
        with runtime.reads() as session:
            outcome = session.scalar(select(RedemptionCodeEnd.outcome).where(RedemptionCodeEnd.code_id == end.code_id))
        if outcome is not None:
            return codes.ended(outcome)
    return ApiError(409, "authorisation_used", "This authorisation was used already")


def row_failure(row: PointsRequest, path: str) -> tuple[int, dict[str, Any]]:
    error = _failure(row)
    return error.status, idempotency.problem_body(error, path)


# reads ---------------------------------------------------------------------------------------------

_KIND_NAMES: dict[int, Literal["issued", "redeemed", "expired", "issue_rejected", "redeem_rejected"]] = {
    EventKind.ISSUED: "issued",
    EventKind.REDEEMED: "redeemed",
    EventKind.EXPIRED: "expired",
    EventKind.ISSUE_REJECTED: "issue_rejected",
    EventKind.REDEEM_REJECTED: "redeem_rejected",
}


@router.get("/customers/{did}/points", response_model=PointsPublic, responses=responses(404))
def customer_points(did: str, runtime: RuntimeDep, caller: OwnPointsReader) -> PointsPublic:
    """Balance (unexpired points), live lots with their expiry, history and tier."""
    subject = own_subject(runtime, caller, did, POINTS_READ)
    reader = runtime.ledger.points_reader
    now = int(time.time())
    lots = reader.lots(subject, now)
    tier = reader.tier(subject, now)
    partners = runtime.catalogue().partners
    history = reader.history(subject)
    references = reader.references([h.ref for h in history if h.kind == EventKind.REDEEMED])
    return PointsPublic(
        did=did,
        balance=sum(lot.remaining for lot in lots),
        lots=[LotPublic(lot_id=lot.lot_id, remaining=lot.remaining, expires_at=lot.expires_at) for lot in lots],
        history=[
            PointsEventPublic(
                kind=_KIND_NAMES[h.kind],
                amount=h.amount,
                partner=h.partner,
                partner_name=partners.get(h.partner) if h.partner else None,
                lot_id=h.lot_id or None,
                balance=h.balance if h.kind == EventKind.REDEEMED else None,
                reason=h.reason,
                reference=references.get(h.ref) if h.kind == EventKind.REDEEMED else None,
                tx_hash=h.tx_hash,
                block_number=h.block_number,
                block_time=h.block_time,
            )
            for h in history
        ],
        tier=TierPublic(name=tier.name, earned_12m=tier.earned, next=tier.next, points_to_next=tier.to_next),
    )


@router.get(
    "/partners/me/redemptions",
    response_model=StatementPublic,
    responses={**responses(422), 200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
)
def statement(
    runtime: RuntimeDep,
    caller: StatementReader,
    start: Annotated[
        datetime | None,
        Query(
            alias="from",
            description="period start (inclusive), ISO 8601, UTC unless it says; default: "
            "the start of this month (UTC)",
        ),
    ] = None,
    end: Annotated[
        datetime | None,
        Query(alias="to", description="period end (exclusive), ISO 8601, UTC unless it says; default: now"),
    ] = None,
    format: Annotated[Literal["json", "csv"], Query(description="json (default) or csv")] = "json",
) -> Any:
    """The calling partner's redemptions in a period, for settlement (by default this month so far)."""
    partner = _partner(caller)
    now = datetime.now(UTC)
    first = _epoch(start or now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
    last = _epoch(end) if end is not None else int(now.timestamp()) + 1
    if last <= first:
        raise ApiError(422, "invalid_period", "`to` must be after `from`")
    rows = runtime.ledger.points_reader.statement(partner, first, last)
    references = runtime.ledger.points_reader.references([h.ref for h in rows])
    lines = [
        StatementLine(
            redemption_id="0x" + h.ref.hex(),
            did=runtime.dids.did(Subject(h.subject)),
            amount=h.amount,
            reference=references.get(h.ref),
            tx_hash=h.tx_hash,
            block_number=h.block_number,
            block_time=h.block_time,
        )
        for h in rows
    ]
    if format == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(["redemption_id", "did", "amount", "block_time", "tx_hash", "block_number", "reference"])
        for line in lines:
            writer.writerow(
                [
                    line.redemption_id,
                    line.did,
                    line.amount,
                    datetime.fromtimestamp(line.block_time, UTC).isoformat(),
                    line.tx_hash,
                    line.block_number,
                    line.reference or "",
                ]
            )
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="redemptions-{first}-{last}.csv"'},
        )
    return StatementPublic(
        partner=partner,
        partner_name=caller.name,
        start=first,
        end=last,
        count=len(lines),
        total_points=sum(line.amount for line in lines),
        redemptions=lines,
    )


def _partner(caller: Caller) -> str:
    if caller.address is None:
        raise ApiError(403, "not_a_partner", "Only partners have redemption statements")
    return caller.address


def _epoch(value: datetime) -> int:
    return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())
