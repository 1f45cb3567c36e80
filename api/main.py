"""The FastAPI application: routers gathered under /api/v1."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from api import deps, errors
from api.limits import RequestLimits
from api.routers import audit, auth, consents, customers, dids, pages, points, reference, system
from api.runtime import Runtime

API_PREFIX = "/api/v1"

# Each router is included into the app itself, the busiest first. FastAPI matches a request against
# every route before the one it wants, once per level of router nesting: measured in-process, the
# consent route (up to its auth check) cost 560 us of CPU under an /api/v1 router holding the
# others, and 253 us included directly and first.
ROUTERS = (
    consents.router,
    points.router,
    auth.router,
    system.router,
    dids.router,
    customers.router,
    audit.router,
    reference.router,
)
TAGS = ["system", "dids", "auth", "customers", "consents", "points", "audit", "reference"]  # the docs' order


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="Consent & loyalty ledger",
        version="0.1.0",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        openapi_tags=[{"name": tag} for tag in TAGS],
    )
    app.state.runtime = runtime
    errors.install(app)
    limits = runtime.service
    app.add_middleware(RequestLimits, max_body=limits.max_body_bytes, max_depth=limits.max_json_depth)
    for router in ROUTERS:
        document_security(router)
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(dids.did_web)
    pages.install(app)
    _add_security_schemes(app)
    return app


def document_security(router: APIRouter) -> None:
    """Mark in OpenAPI the routes that take credentials (see `deps.SECURITY`)."""
    for route in router.routes:
        if isinstance(route, APIRoute) and deps.authenticates(route.dependant):
            route.openapi_extra = {**(route.openapi_extra or {}), "security": deps.SECURITY}


def _add_security_schemes(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # generated once and kept in app.openapi_schema
        schema.setdefault("components", {})["securitySchemes"] = deps.security_schemes()
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
