"""Every route of the app is in the authorisation matrix (`api.authz.MATRIX`), and what its dependencies
check is what the matrix says: a route added without saying who may call it, or whose dependency drifts
from the matrix, fails here. Built without a service: only the routes and their dependencies are read."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import Mount, Route

from api import deps
from api.auth import CUSTOMER_SCOPES, ROLE_SCOPES, Scope
from api.authz import MATRIX, PUBLIC, Access, OwnOr
from api.main import create_app
from api.runtime import Runtime
from api.settings import ServiceSettings


def _app() -> FastAPI:
    return create_app(cast(Runtime, SimpleNamespace(service=ServiceSettings())))


def _routes(app: FastAPI) -> dict[tuple[str, str], Access | str]:
    """Each (method, path) the app answers, with what its dependencies check (`deps.access`)."""
    found: dict[tuple[str, str], Access | str] = {}
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute):
            rule = deps.access(context.dependant)
        elif isinstance(route, Route | Mount):
            rule = PUBLIC  # FastAPI's documents and the static files: no dependencies
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
        path = context.path
        assert path is not None
        for method in sorted(context.methods or {"GET"}):
            if method != "HEAD":  # answered as GET is
                found[(method, path)] = rule
    return found


def test_every_route_is_in_the_matrix_and_checks_what_it_says() -> None:
    routes = _routes(_app())
    assert sorted(set(routes) - set(MATRIX)) == [], "routes missing from api.authz.MATRIX"
    assert sorted(set(MATRIX) - set(routes)) == [], "rows of api.authz.MATRIX that are no route"
    disagree = {key: (routes[key], MATRIX[key]) for key in MATRIX if routes[key] != MATRIX[key]}
    assert disagree == {}, "(what the route's dependencies check, what the matrix says)"


def test_a_route_whose_dependency_drifts_from_the_matrix_is_found() -> None:
    app = _app()

    @app.get("/api/v1/unlisted")
    def unlisted(_caller: deps.AuditReader) -> None: ...

    @app.get("/api/v1/credentials-only")
    def credentials_only(_caller: deps.CallerDep) -> None: ...

    routes = _routes(app)
    assert routes[("GET", "/api/v1/unlisted")] == Scope.AUDIT_READ
    assert ("GET", "/api/v1/unlisted") not in MATRIX
    assert routes[("GET", "/api/v1/credentials-only")] == "checks [None]"  # no rule of the matrix


def test_every_scope_of_the_matrix_can_be_held() -> None:
    """A route no caller could call is a mistake of the matrix (or of the roles)."""
    granted = set(CUSTOMER_SCOPES).union(*ROLE_SCOPES.values())
    needed = {rule.scope if isinstance(rule, OwnOr) else rule for rule in MATRIX.values() if rule != PUBLIC}
    assert needed - granted == set()
    assert needed == set(Scope), "every scope is required by some route of the matrix"
