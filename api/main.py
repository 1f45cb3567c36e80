"""The FastAPI application: routers gathered under /api/v1."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from api import errors
from api.routers import audit, auth, consents, customers, dids, pages, points, reference, system
from api.runtime import Runtime

API_PREFIX = "/api/v1"


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="Consent & loyalty ledger",
        version="0.1.0",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
    )
    app.state.runtime = runtime
    errors.install(app)
    v1 = APIRouter(prefix=API_PREFIX)
    v1.include_router(system.router)
    v1.include_router(dids.router)
    v1.include_router(auth.router)
    v1.include_router(customers.router)
    v1.include_router(consents.router)
    v1.include_router(points.router)
    v1.include_router(audit.router)
    v1.include_router(reference.router)
    app.include_router(v1)
    app.include_router(dids.did_web)
    pages.install(app)
    return app
