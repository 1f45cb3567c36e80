"""Errors as RFC 9457 problem details (application/problem+json) with a stable `code`."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import SignInFailed, WrongOrigin
from api.problems import type_of
from identity.errors import InvalidDid, InvalidPII, SubjectErased, UnknownSubject
from ledger.eip712 import TypedDataError
from ledger.errors import (
    AccessRejected,
    BatchItemFailed,
    ConsentRejected,
    ContractRevert,
    InsufficientPoints,
    InvalidSignature,
    LedgerError,
    NonceMismatch,
    PointsRejected,
    RecoveryRejected,
    SignatureExpired,
    Unauthorized,
    UnknownAttributes,
)

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    """RFC 9457 problem details, plus `code`: a stable, machine-readable error name."""

    type: str = Field(description="URI naming the problem type")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    code: str = Field(description="stable error code, e.g. invalid_signature")
    errors: list[dict[str, Any]] | None = Field(default=None, description="field errors, for validation_error")


class ApiError(Exception):
    """Raised by route handlers; rendered as problem+json.

    Not under api's error root (`api.service_errors.ServiceError`), alone of the package's exceptions:
    it is no failure but an answer, what translation at the HTTP edge makes of one (`problem`), with
    its status and code already chosen. Under the root, an `except ServiceError` translating a
    failure would catch an answer made already and translate it again; and the command line, which
    prints the roots, never sees one."""

    def __init__(self, status: int, code: str, title: str, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail or title)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.extra = extra


def request_path(request: Request) -> str:
    """The request's path as `request.url.path` gives it, without building the whole URL (host header,
    scheme, query: ~3 % of an API worker's time on the redemption route)."""
    return str(request.scope["path"]).replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")


def problem_response(
    request: Request, status: int, code: str, title: str, detail: str | None = None, **extra: Any
) -> JSONResponse:
    body = {
        "type": type_of(code),
        "title": title,
        "status": status,
        "code": code,
        "instance": request_path(request),
    }
    if detail:
        body["detail"] = detail
    body.update({k: v for k, v in extra.items() if v is not None})
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


_HTTP_CODES = {401: "unauthenticated", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}

# A stable code per kind of invalid field (pydantic's error types), for clients to act on.
_VALIDATION_CODES = {
    "int_type": "not_an_integer",
    "int_parsing": "not_an_integer",
    "int_from_float": "not_an_integer",
    "greater_than": "out_of_range",
    "greater_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "less_than_equal": "out_of_range",
    "invalid_name": "invalid_name",
    "string_pattern_mismatch": "invalid_format",
    "string_too_short": "invalid_length",
    "string_too_long": "invalid_length",
    "too_short": "invalid_length",
    "too_long": "invalid_length",
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
}


def _field(loc: list[Any]) -> str:
    """A field's name as the client wrote it: `issuances[0].amount`, without pydantic's `body.` prefix."""
    parts = loc[1:] if len(loc) > 1 and loc[0] in ("body", "query", "path", "header") else loc
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or "body"


class Answer(NamedTuple):
    """The HTTP answer to an error family: status, code and title, and whether the exception's text is
    the detail (only where it names no facts) and which of its attributes join the body."""

    status: int
    code: str
    title: str
    detail: bool = False
    extra: tuple[str, ...] = ()


# Each package's error families and their HTTP answers, in one place; most specific class first.
# Ledger errors reach the handler `install` registers (a route lets a contract's refusal through);
# the others a route translates, raising `problem(exc)`, or an ApiError of its own where it says more
# (its own title, a detail). A family not here is a fault of the service: 500 `internal_error`.
FAMILIES: list[tuple[type[Exception], Answer]] = [
    # The contract's refusals, in plain words: the facts a revert carries (pseudonyms, balances, raw
    # data) stay in the log.
    (InsufficientPoints, Answer(409, "insufficient_points", "Not enough unexpired points")),
    (
        NonceMismatch,
        Answer(409, "nonce_mismatch", "The signed message's nonce is not the next one; prepare it again"),
    ),
    (InvalidSignature, Answer(422, "invalid_signature", "The message was not signed by the customer's bound key")),
    (SignatureExpired, Answer(422, "signature_expired", "The signed message has expired; prepare it again")),
    (Unauthorized, Answer(403, "not_permitted_on_chain", "The ledger does not permit this account to do that")),
    (PointsRejected, Answer(422, "points_rejected", "The ledger refused the points request")),
    (RecoveryRejected, Answer(409, "recovery_refused", "The ledger refused the recovery")),
    (ConsentRejected, Answer(422, "consent_rejected", "The ledger refused the consent change")),
    (AccessRejected, Answer(422, "access_rejected", "The ledger refused the access record")),
    (ContractRevert, Answer(422, "ledger_refused", "The ledger refused the request")),
    (UnknownAttributes, Answer(422, "unknown_attribute", "No such attribute", True)),
    (TypedDataError, Answer(422, "invalid_typed_data", "The signed data is not a message of this ledger", True)),
    (LedgerError, Answer(503, "chain_unavailable", "The ledger is unavailable; try again shortly")),
    # identity
    (InvalidDid, Answer(404, "unknown_customer", "No such customer", True)),
    (UnknownSubject, Answer(404, "unknown_customer", "No such customer")),
    (SubjectErased, Answer(409, "customer_erased", "This customer's data was erased", True)),
    (InvalidPII, Answer(422, "invalid_pii", "Invalid personal data", True, ("field",))),
    # api
    (WrongOrigin, Answer(401, "wrong_origin", "Sign-in refused: the message is for another site", True)),
    (SignInFailed, Answer(401, "sign_in_failed", "Sign-in refused", True)),
]


def answer(exc: Exception) -> Answer | None:
    """The answer `FAMILIES` gives `exc` (a failed batch item: its cause's); None for a fault."""
    cause = exc.cause if isinstance(exc, BatchItemFailed) else exc
    for kind, found in FAMILIES:
        if isinstance(cause, kind):
            return found
    return None


def problem(exc: Exception) -> ApiError:
    """`exc` as the ApiError its family's answer gives, for a route to raise (an ApiError, unlike the
    exception itself, is the answer recorded for a retry with the same Idempotency-Key)."""
    found = answer(exc)
    if found is None:
        raise TypeError(f"{type(exc).__name__} has no answer in api.errors.FAMILIES") from exc
    extra = {name: getattr(exc, name) for name in found.extra}
    return ApiError(found.status, found.code, found.title, str(exc) if found.detail else None, **extra)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return problem_response(request, exc.status, exc.code, exc.title, exc.detail, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": list(e["loc"]),
                "msg": e["msg"],
                "type": e["type"],
                "code": _VALIDATION_CODES.get(e["type"], "validation_error"),
            }
            for e in exc.errors()
        ]
        return problem_response(
            request,
            422,
            codes.pop() if len(codes := {e["code"] for e in errors}) == 1 else "validation_error",
            "The request is not valid",
            "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors),
            errors=errors,
        )

    @app.exception_handler(LedgerError)
    async def _ledger(request: Request, exc: LedgerError) -> JSONResponse:
        error = problem(exc)
        if error.status == 503:
            log.warning("ledger unavailable for %s: %s", request.url.path, exc)
        else:
            log.info("the ledger refused a request to %s: %s", request.url.path, exc)
        return problem_response(request, error.status, error.code, error.title, error.detail, **error.extra)

    app.add_middleware(UnexpectedErrors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return problem_response(request, exc.status_code, code, str(exc.detail))


PROBLEM_SCHEMA_REF = "#/components/schemas/Problem"  # `api.main` puts `Problem` in the components


class UnexpectedErrors:
    """An error no handler expected answers 500 `internal_error`, and the connection serves on.

    Not an `exception_handler(Exception)`: Starlette runs that one in its outermost middleware, which
    re-raises after answering, and the server then closes the connection, so a client's next request
    on it (keep-alive) failed too: one request's failure failed another's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            log.exception("unhandled error in %s", scope["path"])
            if started:  # the answer is under way: only closing the connection can end it
                raise
            await problem_response(Request(scope), 500, "internal_error", "Internal error")(scope, receive, send)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses: `Problem` under problem+json, the only media type they are
    sent as. (As a `model`, FastAPI would document it under the route's media type, application/json.)"""
    return {s: {"content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": PROBLEM_SCHEMA_REF}}}} for s in statuses}
