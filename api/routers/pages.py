"""The portal's pages: customers at `/`, auditors at `/auditor`, and the API reference at `/api/v1/docs`.
Static HTML and ES modules; every call they make is to the same public API (`/api/v1`), with the
customer's key kept in the browser. ethers and Swagger UI come from the npm packages installed at
set-up, served from here (no CDN: the pages work on a machine with no internet)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from api.authz import V1
from api.deps import RuntimeDep
from api.errors import ApiError
from api.problems import PAGES, PROBLEMS, type_of
from api.settings import LOGO_TYPES, ServiceSettings
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


def _company(service: ServiceSettings) -> tuple[str, str, str]:
    """The company's icon link, name (with its logo) and footer, as HTML (every value escaped)."""
    name = escape(service.company_name)
    icon = '<link rel="icon" href="/favicon.ico">\n'
    logo = (
        '<img class="company-logo" src="/static/company/logo" alt="" width="32" height="32">'
        if service.company_logo
        else ""
    )
    brand = f'<p class="company">{logo}<span>{name}</span></p>\n  '
    contact = escape(service.company_contact)
    links = [f'Privacy contact: <a href="mailto:{escape(service.company_contact, quote=True)}">{contact}</a>']
    if service.company_privacy_url:
        links.insert(0, f'<a href="{escape(service.company_privacy_url, quote=True)}">Privacy notice</a>')
    footer = f'<footer class="company-footer"><p>{name} · {" · ".join(links)}</p></footer>\n'
    return icon, brand, footer


def _page(name: str, service: ServiceSettings) -> Response:
    """A page with the company's name, logo, privacy notice and contact (`CONSENT_LEDGER_COMPANY_*`)."""
    icon, brand, footer = _company(service)
    html = (WEB / name).read_text(encoding="utf-8")
    if 'rel="icon"' not in html:
        html = html.replace("</head>", icon + "</head>", 1)
    html = html.replace("<header>\n  ", "<header>\n  " + brand, 1)
    html = html.replace("</body>", footer + "</body>", 1)
    return HTMLResponse(html, headers=SECURITY_HEADERS)


@router.get("/")
def customer_portal(runtime: RuntimeDep) -> Response:
    return _page("index.html", runtime.service)


@router.get("/auditor")
def auditor_portal(runtime: RuntimeDep) -> Response:
    return _page("auditor.html", runtime.service)


@router.get("/favicon.ico")
def favicon(runtime: RuntimeDep) -> Response:
    """The company's logo where one is set, else the service's own icon."""
    return (
        company_logo(runtime)
        if runtime.service.company_logo
        else FileResponse(
            WEB / "static" / "favicon.svg",
            media_type="image/svg+xml",
            headers={"Cache-Control": "public, max-age=3600"},
        )
    )


@router.get("/static/company/logo")
def company_logo(runtime: RuntimeDep) -> Response:
    logo = runtime.service.company_logo
    if logo is None:
        raise ApiError(404, "not_found", "Not found")
    # An SVG the operator gave is shown as an image; opened on its own it may run nothing.
    headers = {
        "Cache-Control": "public, max-age=3600",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    }
    return FileResponse(logo, media_type=LOGO_TYPES[logo.suffix.lower()], headers=headers)


@router.get("/static/vendor/ethers.min.js")
def ethers() -> Response:
    if not ETHERS.is_file():
        raise ApiError(503, "frontend_not_installed", "ethers is not installed: run `make setup` (npm install)")
    return FileResponse(ETHERS, media_type="text/javascript", headers={"Cache-Control": "public, max-age=3600"})


@router.get(f"{V1}/docs")
def api_reference(runtime: RuntimeDep) -> Response:
    return _page("docs.html", runtime.service)


@router.get("/static/vendor/swagger-ui/{name}")
def swagger_ui(name: str) -> Response:
    media_type = SWAGGER_UI_FILES.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", "Not found")
    if not (SWAGGER_UI / name).is_file():
        raise ApiError(503, "frontend_not_installed", "Swagger UI is not installed: run `make setup` (npm install)")
    return FileResponse(SWAGGER_UI / name, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})


def _document(title: str, body: str) -> Response:
    page = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n"
        '<link rel="stylesheet" href="/static/portal.css">\n</head>\n<body>\n'
        f'<main id="main">\n{body}\n</main>\n</body>\n</html>\n'
    )
    return HTMLResponse(page, headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=3600"})


@router.get(PAGES)
def problem_types() -> Response:
    """Every problem code the API sends, with its usual status and title."""
    rows = "\n".join(
        f'<tr><td><a href="{escape(type_of(code))}"><code>{escape(code)}</code></a></td>'
        f"<td>{kind.status}</td><td>{escape(kind.title)}</td></tr>"
        for code, kind in sorted(PROBLEMS.items())
    )
    return _document(
        "Problems the API answers with",
        "<h1>Problems the API answers with</h1>\n"
        "<p>Every error is an RFC 9457 <code>application/problem+json</code> body whose <code>code</code> is one "
        "of these and whose <code>type</code> is this list's link for it. The API reference is at "
        f'<a href="{V1}/docs">{V1}/docs</a>.</p>\n'
        '<div class="scroll"><table>\n<thead><tr><th scope="col">code</th><th scope="col">status</th>'
        f'<th scope="col">title</th></tr></thead>\n<tbody>\n{rows}\n</tbody></table></div>',
    )


@router.get(PAGES + "/{code}")
def problem_type(code: str) -> Response:
    """What the problem `code` means and what to do about it."""
    kind = PROBLEMS.get(code)
    if kind is None:
        raise ApiError(404, "not_found", "No such problem type", f"see {PAGES} for every code")
    return _document(
        f"{code} — {kind.title}",
        f'<p><a href="{PAGES}">All problems</a></p>\n'
        f"<h1><code>{escape(code)}</code></h1>\n<p>{escape(kind.title)} (HTTP {kind.status})</p>\n"
        f"<p>{escape(kind.about)}</p>\n"
        "<p>The answer's <code>detail</code> says more about this request, and its <code>request_id</code> finds "
        "it in the service's log.</p>",
    )


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
