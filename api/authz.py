"""Who may call each route: the authorisation matrix, one row per method and path.

A route's dependencies are what enforce it (`api.deps.scope`, `api.deps.own_or`, `api.deps.CallerDep`);
this table is what they must say. tests/api/test_authz.py walks every route of the app, derives its
rule from its dependency tree (`api.deps.access`) and fails when a route is missing here or disagrees,
so a new route cannot be added without saying who may call it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from api.auth import Scope

PUBLIC: Literal["public"] = "public"
"""No credentials are checked (the route may authenticate otherwise: a claim code, a signature)."""


@dataclass(frozen=True)
class OwnOr:
    """A customer on their own data (the handler compares the subject), or a service holding `scope`."""

    scope: Scope


Access = Scope | OwnOr | Literal["public"]

V1 = "/api/v1"
MATRIX: dict[tuple[str, str], Access] = {
    # system, DIDs, sign-in: public
    ("GET", f"{V1}/health"): PUBLIC,
    ("GET", "/livez"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,  # what a scraper reads; no personal data (restrict it at the proxy if wanted)
    ("GET", f"{V1}/dids/{{did}}"): PUBLIC,
    ("GET", "/dids/{subject_hex}/did.json"): PUBLIC,
    ("POST", f"{V1}/auth/siwe/challenge"): PUBLIC,
    ("POST", f"{V1}/auth/siwe"): PUBLIC,
    # customers
    ("POST", f"{V1}/customers"): Scope.CUSTOMERS_WRITE,
    ("DELETE", f"{V1}/customers/{{did}}"): Scope.CUSTOMERS_WRITE,
    ("POST", f"{V1}/customers/{{did}}/controller/prepare"): PUBLIC,  # the claim code authenticates
    ("POST", f"{V1}/customers/{{did}}/controller"): PUBLIC,
    ("GET", f"{V1}/customers/{{did}}/consents"): OwnOr(Scope.CONSENTS_READ),
    # key recovery: the operator issues the code; the code authenticates the new key; the old key vetoes
    ("POST", f"{V1}/customers/{{did}}/recovery-claims"): Scope.CUSTOMERS_WRITE,
    ("POST", f"{V1}/customers/{{did}}/recovery/prepare"): PUBLIC,  # the recovery claim code authenticates
    ("POST", f"{V1}/customers/{{did}}/recovery"): PUBLIC,
    ("POST", f"{V1}/customers/{{did}}/recovery/complete"): PUBLIC,
    ("GET", f"{V1}/customers/{{did}}/recovery"): OwnOr(Scope.CONSENTS_READ),
    ("POST", f"{V1}/customers/{{did}}/recovery/cancel/prepare"): Scope.CONSENT_WRITE,
    ("POST", f"{V1}/customers/{{did}}/recovery/cancel"): Scope.CONSENT_WRITE,
    ("GET", f"{V1}/customers/{{did}}/keys"): OwnOr(Scope.AUDIT_READ),  # the customer, and auditors
    ("GET", f"{V1}/customers/{{did}}/points"): OwnOr(Scope.POINTS_READ),
    ("GET", f"{V1}/customers/{{did}}/accesses"): OwnOr(Scope.AUDIT_READ),
    # consents
    ("POST", f"{V1}/consents/prepare"): Scope.CONSENT_WRITE,
    ("POST", f"{V1}/consents"): Scope.CONSENT_WRITE,
    ("POST", f"{V1}/consents/batch"): Scope.CONSENTS_FORWARD,
    ("GET", f"{V1}/consents/{{request_id}}"): OwnOr(Scope.CONSENTS_READ),
    # points
    ("POST", f"{V1}/points/issuances"): Scope.POINTS_ISSUE,
    ("POST", f"{V1}/points/redemptions/prepare"): Scope.POINTS_AUTHORISE,
    ("POST", f"{V1}/points/redemptions"): Scope.POINTS_REDEEM,
    ("POST", f"{V1}/points/codes"): Scope.POINTS_AUTHORISE,
    ("GET", f"{V1}/points/codes"): Scope.POINTS_AUTHORISE,
    ("DELETE", f"{V1}/points/codes/{{code}}"): Scope.POINTS_AUTHORISE,
    ("GET", f"{V1}/partners/me/redemptions"): Scope.REDEMPTIONS_READ,
    # audit
    ("GET", f"{V1}/audit/accesses"): Scope.AUDIT_READ,
    ("POST", f"{V1}/audit/verify"): Scope.AUDIT_READ,
    # reference data
    ("GET", f"{V1}/partners"): Scope.REFERENCE_READ,
    ("POST", f"{V1}/partners"): Scope.REFERENCE_WRITE,
    ("DELETE", f"{V1}/partners/{{name}}"): Scope.REFERENCE_WRITE,
    ("GET", f"{V1}/purposes"): Scope.REFERENCE_READ,
    ("POST", f"{V1}/purposes"): Scope.REFERENCE_WRITE,
    ("GET", f"{V1}/attributes"): Scope.REFERENCE_READ,
    ("POST", f"{V1}/attributes"): Scope.REFERENCE_WRITE,
    # the portals, their script and the API's own documents
    ("GET", "/"): PUBLIC,
    ("GET", "/auditor"): PUBLIC,
    ("GET", "/static/vendor/ethers.min.js"): PUBLIC,
    ("GET", "/favicon.ico"): PUBLIC,
    ("GET", "/static/company/logo"): PUBLIC,
    ("GET", "/static/vendor/swagger-ui/{name}"): PUBLIC,
    ("GET", f"{V1}/openapi.json"): PUBLIC,
    ("GET", f"{V1}/docs"): PUBLIC,
    ("GET", f"{V1}/problems"): PUBLIC,
    ("GET", f"{V1}/problems/{{code}}"): PUBLIC,
    ("GET", "/static"): PUBLIC,  # a mount: the portals' files
}
