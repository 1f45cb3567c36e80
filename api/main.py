"""The FastAPI application: routers gathered under /api/v1."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import APIRoute

from api import deps, errors, glossary
from api.authz import V1
from api.limits import RequestLimits
from api.observability import Observe
from api.routers import audit, auth, codes, consents, customers, dids, pages, points, recovery, reference, system
from api.runtime import Runtime

API_PREFIX = V1

# Each router is included into the app itself, the busiest first. FastAPI matches a request against
# every route before the one it wants, once per level of router nesting: measured in-process, the
# consent route (up to its auth check) cost 560 us of CPU under an /api/v1 router holding the
# others, and 253 us included directly and first.
ROUTERS = (
    consents.router,
    points.router,
    codes.router,
    auth.router,
    system.router,
    dids.router,
    customers.router,
    recovery.router,
    audit.router,
    reference.router,
)
TAGS = ["system", "dids", "auth", "customers", "consents", "points", "audit", "reference"]  # the docs' order


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="Consent & loyalty ledger",
        version="0.1.0",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # api.routers.pages serves the reference from the set-up's own Swagger UI
        redoc_url=None,
        openapi_tags=[{"name": tag} for tag in TAGS],
    )
    app.state.runtime = runtime
    errors.install(app)
    limits = runtime.service
    app.add_middleware(RequestLimits, max_body=limits.max_body_bytes, max_depth=limits.max_json_depth)
    # Outermost (added last): every answer, a refusal by the limits or an unexpected error included,
    # carries its request id and is counted.
    templates: dict[int, str] = {}  # id of each route under /api/v1: its whole path template, for the metrics
    app.add_middleware(Observe, metrics=limits.metrics, templates=templates)
    for router in ROUTERS:
        document(router)
        app.include_router(router, prefix=API_PREFIX)
        templates.update({id(route): API_PREFIX + route.path for route in router.routes if isinstance(route, APIRoute)})
    document(dids.did_web)
    app.include_router(dids.did_web)
    document(system.probes)
    app.include_router(system.probes)
    pages.install(app)
    _add_components(app)
    return app


def document(router: APIRouter) -> None:
    """What each route's OpenAPI must say that its own declaration leaves out: the schemes that can call
    it; 401 where it checks credentials; 422 where it validates a request (the problem+json the validation
    handler sends, in place of FastAPI's own HTTPValidationError) and 400 where it parses a body; 413 (the
    body limit applies to every request) and 503 (a ledger failure is `chain_unavailable` on any route).
    Done before the router is included: the app builds its routes from the router's."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        statuses = [413, 503]
        security = deps.security(route.dependant)
        if security:
            route.openapi_extra = {**(route.openapi_extra or {}), "security": security}
            statuses.append(401)
        if get_flat_params(route.dependant) or route.body_field is not None:
            statuses.append(422)
        if route.body_field is not None:
            statuses.append(400)  # a body that cannot be parsed: Starlette's refusal, as problem+json
        route.responses = {**errors.responses(*statuses), **route.responses}  # the route's own word first


def _add_components(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # generated once and kept in app.openapi_schema
        components = schema.setdefault("components", {})
        components["securitySchemes"] = deps.security_schemes()
        components.setdefault("schemas", {})["Problem"] = errors.Problem.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        glossary.describe(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
