"""FastAPI dependencies: the runtime, the caller, scope checks."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import APIKeyHeader, HTTPBearer

from api.auth import Caller, customer_caller, now, service_caller
from api.errors import ApiError
from api.runtime import Runtime

# Declared for OpenAPI (security schemes); the checks are in `current_caller`.
_api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="service principals")
_bearer_scheme = HTTPBearer(auto_error=False, description="customers, from Sign-In with Ethereum")


# Dependencies are `async` although they do no awaiting: FastAPI runs a sync dependency in the
# thread pool, one hop per dependency per request; these are quick (the token cache answers almost
# every call), so running them on the event loop saves those hops.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


_TOKENS: dict[str, tuple[Caller, float]] = {}  # bearer token -> (caller, monotonic expiry): one DB read per token


def _cached_customer(runtime: Runtime, token: str) -> Caller | None:
    hit = _TOKENS.get(token)
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    with runtime.sessions() as session:
        caller = customer_caller(session, token)
    if caller is not None:
        if len(_TOKENS) > 100_000:
            _TOKENS.clear()
        assert caller.expires_at is not None
        ttl = min(30.0, (caller.expires_at - now()).total_seconds())  # never past the token's own expiry
        _TOKENS[token] = (caller, time.monotonic() + ttl)
    return caller


async def current_caller(
    runtime: RuntimeDep,
    _key: Annotated[str | None, Depends(_api_key_scheme)] = None,
    _bearer: Annotated[object, Depends(_bearer_scheme)] = None,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    if x_api_key:
        with runtime.sessions() as session:
            service = service_caller(session, x_api_key)
        if service is None:
            raise ApiError(401, "invalid_api_key", "Unknown API key")
        return service
    if authorization and authorization.lower().startswith("bearer "):
        caller = _cached_customer(runtime, authorization[7:].strip())
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


def scope(name: str) -> Callable[[Caller], Awaitable[Caller]]:
    async def check(caller: CallerDep) -> Caller:
        if name not in caller.scopes:
            raise ApiError(403, "insufficient_scope", "Not allowed", f"this route needs the {name} scope")
        return caller

    return check


OperatorWrite = Annotated[Caller, Depends(scope("customers:write"))]
ReferenceRead = Annotated[Caller, Depends(scope("reference:read"))]
ReferenceWrite = Annotated[Caller, Depends(scope("reference:write"))]
ConsentWriter = Annotated[Caller, Depends(scope("consent:write"))]
PointsIssuer = Annotated[Caller, Depends(scope("points:issue"))]
PointsRedeemer = Annotated[Caller, Depends(scope("points:redeem"))]
PointsAuthoriser = Annotated[Caller, Depends(scope("points:authorise"))]
StatementReader = Annotated[Caller, Depends(scope("redemptions:read"))]
