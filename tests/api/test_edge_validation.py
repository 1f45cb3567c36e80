"""Every field is checked at the edge against its type and meaning, on a real service: integers
against their Solidity type and the database's 64-bit INTEGER, strictly (no bool, string or float
where an integer is due), names against a printable character set; `POST /consents` checks all that
`POST /consents/prepare` checks. A refusal is a 422 problem with a stable code naming the field."""

from __future__ import annotations

import copy
import os
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from api.auth import create_principal
from ledger.consent import ConsentRequest
from ledger.eip712 import purpose_id
from ledger.points import PointsRequest
from ledger.types import Subject
from tests.api.conftest import Customer, Service, q
from tests.api.test_consent_api import _problem

# Values no integer field takes, whatever its range, and the code each gets.
NOT_INTEGERS: list[tuple[object, str]] = [(True, "not_an_integer"), ("10", "not_an_integer"), (" 5 ", "not_an_integer")]
NOT_INTEGERS += [(1.0, "not_an_integer"), (-1, "out_of_range")]
TOO_LARGE = [2**63, 2**64, 2**192, 2**256]


@pytest.fixture(scope="module")
def issuer(service: Service) -> dict[str, str]:
    with service.runtime.sessions() as session:
        _, key = create_principal(session, "edge-issuer", "issuer")
    return {"X-API-Key": key}


@pytest.fixture(scope="module")
def customer(service: Service) -> Customer:
    return service.new_customer()


def _requests_of(service: Service, subject: bytes) -> int:
    with service.runtime.reads() as session:
        return int(session.scalar(select(func.count()).where(PointsRequest.subject == subject)) or 0)


def _consents_of(service: Service, subject: bytes) -> int:
    with service.runtime.reads() as session:
        return int(session.scalar(select(func.count()).where(ConsentRequest.subject == subject)) or 0)


def _subject(service: Service, customer: Customer) -> bytes:
    assert service.runtime.dids is not None
    return bytes(service.runtime.dids.subject(customer.did))


@pytest.mark.parametrize(("field", "value", "code"), [
    *[("amount", v, c) for v, c in NOT_INTEGERS],
    *[("amount", v, "out_of_range") for v in [0, 10**15 + 1, *TOO_LARGE]],
    *[("expires_at", v, c) for v, c in NOT_INTEGERS],
    *[("expires_at", v, "out_of_range") for v in TOO_LARGE],
])  # fmt: skip
def test_an_issuance_integer_out_of_its_type_is_refused_and_nothing_is_queued(
    service: Service, issuer: dict[str, str], customer: Customer, field: str, value: object, code: str
) -> None:
    item: dict[str, Any] = {"did": customer.did, "amount": 5, field: value}
    before = _requests_of(service, _subject(service, customer))
    response = service.client.post("/api/v1/points/issuances", json={"issuances": [item]}, headers=issuer)
    problem = _problem(response, 422, code)
    assert f"issuances[0].{field}" in str(problem["detail"])
    assert _requests_of(service, _subject(service, customer)) == before


def test_an_issuance_at_the_edge_of_the_range_is_applied(
    service: Service, issuer: dict[str, str], customer: Customer
) -> None:
    item = {"did": customer.did, "amount": 10**15, "expires_at": 2**63 - 1}
    response = service.client.post("/api/v1/points/issuances", json={"issuances": [item]}, headers=issuer)
    assert response.status_code == 201, response.text
    (issued,) = response.json()["issuances"]
    assert (issued["status"], issued["amount"], issued["expires_at"]) == ("issued", 10**15, 2**63 - 1)


def test_points_are_issued_only_to_enrolled_customers(service: Service, issuer: dict[str, str]) -> None:
    assert service.runtime.dids is not None
    stranger = Subject(os.urandom(32))
    did = service.runtime.dids.did(stranger)  # well formed, but nobody enrolled it
    response = service.client.post(
        "/api/v1/points/issuances", json={"issuances": [{"did": did, "amount": 5}]}, headers=issuer
    )
    problem = _problem(response, 422, "unknown_customer")
    assert "issuances[0].did" in str(problem["detail"])
    assert _requests_of(service, bytes(stranger)) == 0


def test_no_points_are_issued_to_an_erased_customer(service: Service, issuer: dict[str, str]) -> None:
    enrolled = service.client.post(
        "/api/v1/customers", json={"email": f"erased-{uuid.uuid4().hex}@example.com"}, headers=service.operator()
    )
    assert enrolled.status_code == 201, enrolled.text
    did = enrolled.json()["did"]
    assert service.client.delete(f"/api/v1/customers/{q(did)}", headers=service.operator()).status_code == 200
    response = service.client.post(
        "/api/v1/points/issuances", json={"issuances": [{"did": did, "amount": 5}]}, headers=issuer
    )
    problem = _problem(response, 422, "customer_erased")
    assert "issuances[0].did" in str(problem["detail"])
    assert service.runtime.dids is not None
    assert _requests_of(service, bytes(service.runtime.dids.subject(did))) == 0


@pytest.mark.parametrize(("value", "code"), [*NOT_INTEGERS, *[(v, "out_of_range") for v in TOO_LARGE]])
def test_a_redemption_amount_must_be_a_plain_integer(
    service: Service, customer: Customer, value: object, code: str
) -> None:
    response = service.client.post(
        "/api/v1/points/redemptions/prepare", json={"partner": "acme", "amount": value}, headers=customer.headers
    )
    _problem(response, 422, code)


@pytest.mark.parametrize(("value", "code"), [*NOT_INTEGERS, *[(v, "out_of_range") for v in TOO_LARGE]])
def test_a_validity_must_be_a_plain_unix_time(service: Service, customer: Customer, value: object, code: str) -> None:
    response = service.prepare(customer, action="grant", attributes=["user.contact.email"], valid_until=value)
    problem = _problem(response, 422, code)
    assert "valid_until" in str(problem["detail"])


def _signed(service: Service, customer: Customer, action: str = "grant", **message: Any) -> httpx.Response:
    """A change prepared, altered as given, then signed with the customer's bound key (so only what
    the service checks can refuse it)."""
    prepared = service.prepare(customer, action=action, attributes=["user.contact.email"])
    assert prepared.status_code == 200, prepared.text
    typed = copy.deepcopy(prepared.json()["typed_data"])
    typed["message"].update(message)
    return service.client.post(
        "/api/v1/consents",
        json={"typed_data": typed, "signature": service.sign_typed(customer.account, typed)},
        headers=customer.headers,
    )


@pytest.mark.parametrize(
    ("message", "code", "detail"),
    [
        ({"deadline": 2**63}, "invalid_typed_data", "deadline"),
        ({"deadline": 2**255}, "invalid_typed_data", "deadline"),
        ({"validUntil": 2**63}, "invalid_typed_data", "validUntil"),
        ({"validUntil": 2**64 - 1}, "invalid_typed_data", "validUntil"),
        ({"nonce": 2**63}, "invalid_typed_data", "nonce"),
        ({"attributes": 2**200}, "unknown_attribute", "attributes"),
        ({"attributes": 1 << 192}, "unknown_attribute", "attributes: bit 192 is no attribute's"),  # one past
        ({"attributes": 2**256 - 1}, "unknown_attribute", "attributes: bit 8 is no attribute's"),
        ({"attributes": 1 << 100}, "unknown_attribute", "attributes"),
        ({"attributes": 1 << 8}, "unknown_attribute", "attributes"),  # the registry names bits 0-7
        ({"validUntil": 1}, "invalid_validity", ""),
        ({"purpose": "0x" + purpose_id("no.such.purpose").hex()}, "unknown_purpose", "purpose"),
    ],
)
def test_a_signed_grant_is_checked_as_its_preparation_is(
    service: Service, customer: Customer, message: dict[str, Any], code: str, detail: str
) -> None:
    before = _consents_of(service, _subject(service, customer))
    problem = _problem(_signed(service, customer, **message), 422, code)
    assert detail in str(problem.get("detail", ""))
    assert _consents_of(service, _subject(service, customer)) == before
    # Nothing was taken: the next change, as prepared, is accepted.
    assert _signed(service, customer).status_code == 202


@pytest.mark.parametrize("attributes", [2**200, 1 << 192, 1 | 1 << 192])
def test_a_signed_revocation_of_an_unknown_attribute_is_refused(
    service: Service, customer: Customer, attributes: int
) -> None:
    """The registry would take a revocation of bits past the ones a consent holds (and change nothing
    with them); the service refuses it as it refuses a grant of them, by `ledger.types.attribute_mask`."""
    before = _consents_of(service, _subject(service, customer))
    problem = _problem(_signed(service, customer, "revoke", attributes=attributes), 422, "unknown_attribute")
    assert problem["detail"] == "attributes: bit 192 is no attribute's" or attributes == 2**200
    assert _consents_of(service, _subject(service, customer)) == before


@pytest.mark.parametrize("route", ["/api/v1/audit/accesses", "customer"])
@pytest.mark.parametrize("after", [2**63, 2**70, -2])
def test_an_access_log_page_past_the_databases_integers_is_refused(
    service: Service, customer: Customer, route: str, after: int
) -> None:
    if route == "customer":
        url, headers = f"/api/v1/customers/{q(customer.did)}/accesses", customer.headers
    else:
        url, headers = route, {"X-API-Key": service.auditor_key}
    problem = _problem(service.client.get(url, params={"after": str(after)}, headers=headers), 422, "out_of_range")
    assert "after" in str(problem["detail"])
    last = service.client.get(url, params={"after": str(2**63 - 1)}, headers=headers)
    assert last.status_code == 200, last.text
    assert last.json() == {"entries": [], "next_after": None}


BAD_NAMES = ["ac\x00me", "ac\nme", "acme\x1b[31m", "ac\u202eme", "ac\u200bme", " acme", "acme ", "Cafe\u0301", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_reference_names_are_printable_text(service: Service, name: str) -> None:
    operator = service.operator()
    key = "t" + uuid.uuid4().hex[:8]
    responses = [
        service.client.post(
            "/api/v1/partners", json={"name": name, "address": "0x" + os.urandom(20).hex()}, headers=operator
        ),
        service.client.post("/api/v1/purposes", json={"key": key, "name": name}, headers=operator),
        service.client.post("/api/v1/attributes", json={"key": key, "name": name}, headers=operator),
    ]
    for response in responses:
        problem = _problem(response, 422, "invalid_length" if name == "" else "invalid_name")
        assert "name" in str(problem["detail"])
    with service.runtime.reads() as session:
        from api.models import AttributeRow, Partner, PurposeRow

        for table, column in (
            (Partner, Partner.name),
            (PurposeRow, PurposeRow.name),
            (AttributeRow, AttributeRow.name),
        ):
            assert session.scalar(select(func.count()).select_from(table).where(column == name)) == 0


def test_a_description_is_printable_text_too(service: Service) -> None:
    response = service.client.post(
        "/api/v1/purposes",
        json={"key": "t" + uuid.uuid4().hex[:8], "name": "Fine", "description": "bad\x00"},
        headers=service.operator(),
    )
    assert "description" in str(_problem(response, 422, "invalid_name")["detail"])
