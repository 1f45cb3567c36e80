"""FastAPI dependencies: the runtime, the caller, scope checks."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.security import APIKeyHeader, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import CUSTOMER_SCOPES, ROLE_SCOPES, Caller, Scope, customer_caller, digest, now, service_caller
from api.authz import PUBLIC, Access, OwnOr
from api.errors import ApiError
from api.runtime import Runtime

# The credentials, for OpenAPI only; the checks are in `current_caller`. They are not route
# dependencies: FastAPI solves every dependency node on every request (measured in-process, the
# consent route's auth took ~70 us more with these two schemes and two Header parameters as nodes
# than with one node reading the headers), so `api.main` writes them into the spec instead.
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="service principals")
_BEARER = HTTPBearer(auto_error=False, description="customers, from Sign-In with Ethereum")
_SCHEMES = (_API_KEY, _BEARER)


# Dependencies are `async` although they do no awaiting: FastAPI runs a sync dependency in the
# thread pool, one hop per dependency per request; these are quick (the token cache answers almost
# every call), so running them on the event loop saves those hops.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


# Callers by credential, so that a request needs no database read to authenticate: on the event loop,
# a read would stall every other request for its duration. Entries live 30 s at most (a token never
# past its own expiry); keyed by the credential's digest, so no plaintext credential is kept.
_TOKENS: dict[str, tuple[Caller, float]] = {}  # digest of a bearer token -> (caller, monotonic expiry)
_KEYS: dict[str, tuple[Caller, float]] = {}  # digest of an API key -> (caller, monotonic expiry)
CACHE_SECONDS = 30.0


def _cached(
    runtime: Runtime,
    cache: dict[str, tuple[Caller, float]],
    credential: str,
    lookup: Callable[[Session, str], Caller | None],
) -> Caller | None:
    """The caller a credential names, from `cache` or else the database. Unknown credentials are not
    cached (a key just added works at once); a known one is kept 30 s, never past its own expiry."""
    key = digest(credential)
    hit = cache.get(key)
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    with runtime.reads() as session:
        caller = lookup(session, credential)
    if caller is not None:
        ttl = CACHE_SECONDS
        if caller.expires_at is not None:
            ttl = min(ttl, (caller.expires_at - now()).total_seconds())
        if len(cache) > 100_000:
            cache.clear()
        cache[key] = (caller, time.monotonic() + ttl)
    return caller


async def current_caller(request: Request) -> Caller:
    """The authenticated caller: a service by `X-API-Key`, or a customer by bearer token."""
    runtime: Runtime = request.app.state.runtime
    x_api_key = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization")
    if x_api_key:
        service = _cached(runtime, _KEYS, x_api_key, service_caller)
        if service is None:
            raise ApiError(401, "invalid_api_key", "Unknown API key")
        return service
    if authorization and authorization.lower().startswith("bearer "):
        caller = _cached(runtime, _TOKENS, authorization[7:].strip(), customer_caller)
        if caller is None:
            raise ApiError(
                401, "invalid_token", "The bearer token is unknown or has expired", "Sign in again with your key."
            )
        return caller
    raise ApiError(
        401,
        "unauthenticated",
        "Authentication required",
        "Send X-API-Key (services) or Authorization: Bearer (customers).",
    )


CallerDep = Annotated[Caller, Depends(current_caller)]


# Dependencies that check credentials, with what each requires (None: any authenticated caller).
_AUTHENTICATING: dict[Callable[..., object], Scope | OwnOr | None] = {current_caller: None}
CHECKED_SCOPES: set[Scope] = set()  # every scope some route checks: a scope granted and not here means nothing


def checked(name: Scope) -> Scope:
    """`name`, recorded as a scope a route checks itself (beside a customer's own data, say)."""
    CHECKED_SCOPES.add(name)
    return name


def scope(name: Scope) -> Callable[[Request], Awaitable[Caller]]:
    """A dependency: the caller, who must hold scope `name` (one dependency node, not two)."""
    checked(name)

    async def check(request: Request) -> Caller:
        caller = await current_caller(request)
        if name not in caller.scopes:
            raise ApiError(403, "insufficient_scope", "Not allowed", f"this route needs the {name} scope")
        return caller

    _AUTHENTICATING[check] = name
    return check


def own_or(name: Scope) -> Callable[[Request], Awaitable[Caller]]:
    """A dependency: the caller, of a route that serves a customer their own data and a service holding
    `name` anyone's. It authenticates only: the handler decides (a customer's subject against the data's,
    by `api.routers.customers.own_subject`, or a service's scopes), after it has read the path."""
    checked(name)

    async def check(request: Request) -> Caller:
        return await current_caller(request)

    _AUTHENTICATING[check] = OwnOr(name)
    return check


def _required_scopes(dependant: Dependant) -> list[Scope | OwnOr | None]:
    """What a route's dependency tree checks (None for a check of credentials alone)."""
    found = []
    for d in dependant.dependencies:
        if d.call in _AUTHENTICATING:
            found.append(_AUTHENTICATING[d.call])
        found.extend(_required_scopes(d))
    return found


def access(dependant: Dependant) -> Access | str:
    """Who may call a route, as its dependencies check it (`api.authz.MATRIX` says what it should be);
    a string describing it when it is not one rule of the matrix (several checks, or credentials alone)."""
    needed = _required_scopes(dependant)
    if not needed:
        return PUBLIC
    if len(needed) == 1 and needed[0] is not None:
        return needed[0]
    return f"checks {needed!r}"


def security(dependant: Dependant) -> list[dict[str, list[str]]]:
    """A route's OpenAPI `security`: each scheme whose callers can hold every scope it checks (a route
    only partners may call lists the API key alone); empty when it checks no credentials."""
    needed = _required_scopes(dependant)
    if not needed:
        return []
    scopes = [n.scope if isinstance(n, OwnOr) else n for n in needed]
    service = any(all(n is None or n in held for n in scopes) for held in ROLE_SCOPES.values())
    # A customer may call a route that serves them their own data, whatever scope a service needs there.
    customer = all(n is None or isinstance(n, OwnOr) or n in CUSTOMER_SCOPES for n in needed)
    return [{scheme.scheme_name: []} for scheme, can in ((_API_KEY, service), (_BEARER, customer)) if can]


def security_schemes() -> dict[str, object]:
    """`components.securitySchemes` of the OpenAPI document."""
    return {scheme.scheme_name: jsonable_encoder(scheme.model, by_alias=True, exclude_none=True) for scheme in _SCHEMES}


OperatorWrite = Annotated[Caller, Depends(scope(Scope.CUSTOMERS_WRITE))]
ReferenceRead = Annotated[Caller, Depends(scope(Scope.REFERENCE_READ))]
ReferenceWrite = Annotated[Caller, Depends(scope(Scope.REFERENCE_WRITE))]
ConsentWriter = Annotated[Caller, Depends(scope(Scope.CONSENT_WRITE))]
ConsentForwarder = Annotated[Caller, Depends(scope(Scope.CONSENTS_FORWARD))]
PointsIssuer = Annotated[Caller, Depends(scope(Scope.POINTS_ISSUE))]
PointsRedeemer = Annotated[Caller, Depends(scope(Scope.POINTS_REDEEM))]
PointsAuthoriser = Annotated[Caller, Depends(scope(Scope.POINTS_AUTHORISE))]
StatementReader = Annotated[Caller, Depends(scope(Scope.REDEMPTIONS_READ))]
AuditReader = Annotated[Caller, Depends(scope(Scope.AUDIT_READ))]
# A customer's own, or anyone's for a service with the scope (the handler tells which: `own_subject`).
OwnConsentsReader = Annotated[Caller, Depends(own_or(Scope.CONSENTS_READ))]
OwnPointsReader = Annotated[Caller, Depends(own_or(Scope.POINTS_READ))]
OwnAccessesReader = Annotated[Caller, Depends(own_or(Scope.AUDIT_READ))]
