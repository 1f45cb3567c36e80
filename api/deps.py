"""FastAPI dependencies: the runtime, the caller, scope checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import APIKeyHeader, HTTPBearer

from api.auth import Caller, customer_caller, service_caller
from api.errors import ApiError
from api.runtime import Runtime

# Declared for OpenAPI (security schemes); the checks are in `current_caller`.
_api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="service principals")
_bearer_scheme = HTTPBearer(auto_error=False, description="customers, from Sign-In with Ethereum")


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def current_caller(
    runtime: RuntimeDep,
    _key: Annotated[str | None, Depends(_api_key_scheme)] = None,
    _bearer: Annotated[object, Depends(_bearer_scheme)] = None,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    with runtime.sessions() as session:
        if x_api_key:
            caller = service_caller(session, x_api_key)
            if caller is None:
                raise ApiError(401, "invalid_api_key", "Unknown API key")
            return caller
        if authorization and authorization.lower().startswith("bearer "):
            caller = customer_caller(session, authorization[7:].strip())
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


def scope(name: str) -> Callable[[Caller], Caller]:
    def check(caller: CallerDep) -> Caller:
        if name not in caller.scopes:
            raise ApiError(403, "insufficient_scope", "Not allowed", f"this route needs the {name} scope")
        return caller

    return check


OperatorWrite = Annotated[Caller, Depends(scope("customers:write"))]
ReferenceRead = Annotated[Caller, Depends(scope("reference:read"))]
ReferenceWrite = Annotated[Caller, Depends(scope("reference:write"))]
ConsentWriter = Annotated[Caller, Depends(scope("consent:write"))]
