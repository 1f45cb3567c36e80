"""One bad request fails alone: requests that arrive together share one commit, and a request with an
integer the database cannot hold (2^63) once failed valid requests of other clients in it (500s)."""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from api.auth import create_principal
from tests.api.conftest import Customer, Service

N = 20


@pytest.fixture(scope="module")
def issuer(service: Service) -> dict[str, str]:
    with service.runtime.sessions() as session:
        _, key = create_principal(session, "burst-issuer", "issuer")
    return {"X-API-Key": key}


@pytest.fixture(scope="module")
def customers(service: Service) -> list[Customer]:
    return [service.new_customer() for _ in range(N + 1)]


def together(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Send every call at once (threads released by one barrier), so they reach the same commit."""
    start = threading.Barrier(len(calls))
    answers: list[httpx.Response | None] = [None] * len(calls)

    def run(i: int) -> None:
        start.wait(30)
        answers[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(a is not None for a in answers), "a request did not finish"
    return [a for a in answers if a is not None]


def _signed(service: Service, customer: Customer, typed: dict[str, Any], **message: Any) -> dict[str, Any]:
    typed = copy.deepcopy(typed)
    typed["message"].update(message)
    return {"typed_data": typed, "signature": service.sign_typed(customer.account, typed)}


def test_issuances_in_a_burst_fail_only_the_bad_one(
    service: Service, issuer: dict[str, str], customers: list[Customer]
) -> None:
    def issuance(customer: Customer, **extra: Any) -> Callable[[], httpx.Response]:
        body = {"issuances": [{"did": customer.did, "amount": 100, **extra}]}
        return lambda: service.client.post("/api/v1/points/issuances", json=body, headers=issuer)

    answers = together([issuance(c) for c in customers[:N]] + [issuance(customers[N], expires_at=2**63)])
    assert [a.status_code for a in answers[:N]] == [201] * N, [a.text for a in answers if a.status_code != 201]
    assert [i["status"] for a in answers[:N] for i in a.json()["issuances"]] == ["issued"] * N
    assert (answers[N].status_code, answers[N].json()["code"]) == (422, "out_of_range")


def test_redemptions_in_a_burst_fail_only_the_bad_one(
    service: Service, issuer: dict[str, str], customers: list[Customer]
) -> None:
    for customer in customers:  # each has points to redeem
        issued = service.client.post(
            "/api/v1/points/issuances", json={"issuances": [{"did": customer.did, "amount": 50}]}, headers=issuer
        )
        assert issued.status_code == 201, issued.text
    bodies = []
    for customer in customers:
        prepared = service.client.post(
            "/api/v1/points/redemptions/prepare", json={"partner": "acme", "amount": 5}, headers=customer.headers
        )
        assert prepared.status_code == 200, prepared.text
        bodies.append((customer, prepared.json()["typed_data"]))
    signed = [_signed(service, c, typed) for c, typed in bodies[:N]]
    bad_customer, bad_typed = bodies[N]
    signed.append(_signed(service, bad_customer, bad_typed, deadline=2**63))
    partner = {"X-API-Key": service.partner_key}

    def redemption(body: dict[str, Any]) -> Callable[[], httpx.Response]:
        headers = {**partner, "Idempotency-Key": str(uuid.uuid4())}
        return lambda: service.client.post("/api/v1/points/redemptions", json=body, headers=headers)

    answers = together([redemption(b) for b in signed])
    assert [a.status_code for a in answers[:N]] == [200] * N, [a.text for a in answers if a.status_code != 200]
    assert (answers[N].status_code, answers[N].json()["code"]) == (422, "invalid_typed_data")
    assert "deadline" in answers[N].json()["detail"]


def test_consent_changes_in_a_burst_fail_only_the_bad_one(service: Service, customers: list[Customer]) -> None:
    prepared = []
    for customer in customers:
        response = service.prepare(customer, action="grant", attributes=["user.contact.email"])
        assert response.status_code == 200, response.text
        prepared.append((customer, response.json()["typed_data"]))
    signed = [(c, _signed(service, c, typed)) for c, typed in prepared[:N]]
    bad_customer, bad_typed = prepared[N]
    signed.append((bad_customer, _signed(service, bad_customer, bad_typed, validUntil=2**63)))

    def change(customer: Customer, body: dict[str, Any]) -> Callable[[], httpx.Response]:
        return lambda: service.client.post("/api/v1/consents", json=body, headers=customer.headers)

    answers = together([change(c, b) for c, b in signed])
    assert [a.status_code for a in answers[:N]] == [202] * N, [a.text for a in answers if a.status_code != 202]
    assert (answers[N].status_code, answers[N].json()["code"]) == (422, "invalid_typed_data")
    assert "validUntil" in answers[N].json()["detail"]
