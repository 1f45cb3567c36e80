"""Every protected route refuses a caller without credentials (401) and one of the wrong kind (403).

Customer A on customer B's objects is covered in test_consent_api.py.
"""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import delete

from api.auth import ROLE_SCOPES, digest
from api.models import Principal
from tests.api.conftest import Service, q

NEW_ADDRESS = "0x" + "7" * 40
CONSENT_BODY = {"action": "grant", "partner": "acme", "purpose": "analytics.reporting", "attributes": ["user.name"]}

# (method, path, body, a caller of the wrong kind: "partner", "auditor" or "customer")
ROUTES = [
    ("POST", "/api/v1/customers", {"email": "route@example.com"}, "partner"),
    ("POST", "/api/v1/customers", {"email": "route@example.com"}, "customer"),
    ("GET", "/api/v1/customers/{did}/consents", None, "auditor"),
    ("DELETE", "/api/v1/customers/{did}", None, "customer"),
    ("DELETE", "/api/v1/customers/{did}", None, "partner"),
    ("POST", "/api/v1/consents/prepare", CONSENT_BODY, "auditor"),
    ("POST", "/api/v1/consents", {"typed_data": {}, "signature": "0x" + "00" * 65}, "partner"),
    ("POST", "/api/v1/partners", {"name": "p", "address": NEW_ADDRESS}, "customer"),
    ("POST", "/api/v1/partners", {"name": "p", "address": NEW_ADDRESS}, "auditor"),
    ("DELETE", "/api/v1/partners/acme", None, "partner"),
    ("DELETE", "/api/v1/partners/acme", None, "customer"),
    ("POST", "/api/v1/purposes", {"key": "x.y", "name": "X"}, "partner"),
    ("POST", "/api/v1/attributes", {"key": "user.x", "name": "X"}, "customer"),
    ("GET", "/api/v1/partners", None, None),
    ("GET", "/api/v1/purposes", None, None),
    ("GET", "/api/v1/attributes", None, None),
    ("GET", "/api/v1/consents/{request_id}", None, None),
    ("POST", "/api/v1/points/issuances", {"issuances": [{"did": "x", "amount": 1}]}, "partner"),
    ("POST", "/api/v1/points/issuances", {"issuances": [{"did": "x", "amount": 1}]}, "customer"),
    ("POST", "/api/v1/points/redemptions/prepare", {"partner": "acme", "amount": 1}, "partner"),
    ("POST", "/api/v1/points/redemptions", {"typed_data": {}, "signature": "0x" + "00" * 65}, "customer"),
    ("POST", "/api/v1/points/redemptions", {"typed_data": {}, "signature": "0x" + "00" * 65}, "auditor"),
    ("GET", "/api/v1/customers/{did}/points", None, "partner"),
    ("GET", "/api/v1/partners/me/redemptions?from=2026-01-01T00:00:00Z&to=2027-01-01T00:00:00Z", None, "customer"),
    ("GET", "/api/v1/partners/me/redemptions?from=2026-01-01T00:00:00Z&to=2027-01-01T00:00:00Z", None, "auditor"),
    ("GET", "/api/v1/audit/accesses", None, "customer"),
    ("GET", "/api/v1/audit/accesses?format=csv", None, "partner"),
    ("POST", "/api/v1/audit/verify", None, "customer"),
    ("POST", "/api/v1/audit/verify", None, "partner"),
    ("GET", "/api/v1/customers/{did}/accesses", None, "partner"),
]


@pytest.mark.parametrize(("method", "path", "body", "wrong"), ROUTES)
def test_protected_routes_refuse_the_wrong_caller(
    service: Service, method: str, path: str, body: dict[str, object] | None, wrong: str | None
) -> None:
    customer = service.customers[0] if service.customers else service.new_customer()
    path = path.format(did=q(customer.did), request_id="00000000-0000-0000-0000-000000000000")
    anonymous = service.client.request(method, path, json=body)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["content-type"] == "application/problem+json"
    assert anonymous.json()["code"] == "unauthenticated"
    if wrong is None:
        return
    headers = {
        "partner": {"X-API-Key": service.partner_key},
        "auditor": {"X-API-Key": service.auditor_key},
        "customer": customer.headers,
    }[wrong]
    refused = service.client.request(method, path, json=body, headers=headers)
    assert refused.status_code == 403, refused.text
    assert refused.json()["code"] in {"insufficient_scope", "not_your_data"}


def test_an_api_key_works_as_soon_as_it_is_added_and_is_cached_once_known(service: Service) -> None:
    key = secrets.token_urlsafe(32)
    headers = {"X-API-Key": key}
    refused = service.client.get("/api/v1/partners", headers=headers)
    assert (refused.status_code, refused.json()["code"]) == (401, "invalid_api_key")
    with service.runtime.sessions() as session:  # added after a refusal: an unknown key is not cached
        session.add(Principal(name="late-auditor", role="auditor", scopes=" ".join(sorted(ROLE_SCOPES["auditor"])),
                              key_hash=digest(key)))  # fmt: skip
    assert service.client.get("/api/v1/partners", headers=headers).status_code == 200
    # Known now: requests authenticate from the cache (no database read), for up to 30 s.
    with service.runtime.sessions() as session:
        session.execute(delete(Principal).where(Principal.name == "late-auditor"))
    assert service.client.get("/api/v1/partners", headers=headers).status_code == 200
