"""The portal's pages: customers at `/`, auditors at `/auditor`, and the API reference at `/api/v1/docs`.
Static HTML and ES modules; every call they make is to the same public API (`/api/v1`), with the
customer's key kept in the browser. ethers and Swagger UI come from the npm packages installed at
set-up, served from here (no CDN: the pages work on a machine with no internet)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from api.authz import V1
from api.errors import ApiError
from ledger.settings import PROJECT_ROOT

WEB = Path(__file__).resolve().parent.parent / "web"
ETHERS = PROJECT_ROOT / "node_modules" / "ethers" / "dist" / "ethers.min.js"
SWAGGER_UI = PROJECT_ROOT / "node_modules" / "swagger-ui-dist"
SWAGGER_UI_FILES = {  # what the reference page loads, and nothing else of the package
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
# The pages load nothing from elsewhere and run no inline script; a keyed page is worth a strict policy.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)


def _page(name: str) -> Response:
    return FileResponse(WEB / name, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/")
def customer_portal() -> Response:
    return _page("index.html")


@router.get("/auditor")
def auditor_portal() -> Response:
    return _page("auditor.html")


@router.get("/static/vendor/ethers.min.js")
def ethers() -> Response:
    if not ETHERS.is_file():
        raise ApiError(503, "frontend_not_installed", "ethers is not installed: run `make setup` (npm install)")
    return FileResponse(ETHERS, media_type="text/javascript", headers={"Cache-Control": "public, max-age=3600"})


@router.get(f"{V1}/docs")
def api_reference() -> Response:
    return _page("docs.html")


@router.get("/static/vendor/swagger-ui/{name}")
def swagger_ui(name: str) -> Response:
    media_type = SWAGGER_UI_FILES.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", "Not found")
    if not (SWAGGER_UI / name).is_file():
        raise ApiError(503, "frontend_not_installed", "Swagger UI is not installed: run `make setup` (npm install)")
    return FileResponse(SWAGGER_UI / name, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
