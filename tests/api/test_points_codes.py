"""Short redemption codes through HTTP on a real node: the customer stores a signed authorisation and gets
a code, the named partner redeems it (once) with its own reference, the customer lists and cancels codes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from api.routers import codes
from ledger.points import RedemptionCode
from tests.api.conftest import Customer, Service
from tests.api.test_points_api import authorise, issue, other_partner, partner, points, redeem, settled_points

__all__ = ["other_partner"]  # the fixture, imported for this module's tests

CODES = "/api/v1/points/codes"


@pytest.fixture(scope="module")
def issuer(service: Service) -> dict[str, str]:
    from api.auth import create_principal

    with service.runtime.sessions() as session:
        _, key = create_principal(session, "codes-issuer", "issuer")
    return {"X-API-Key": key}


@pytest.fixture(autouse=True)
def no_lockout() -> Iterator[None]:
    codes.FAILED_LOOKUPS.clear()
    yield
    codes.FAILED_LOOKUPS.clear()


def funded(service: Service, issuer: dict[str, str], amount: int) -> Customer:
    customer = service.new_customer()
    assert issue(service, issuer, customer, amount).status_code == 201
    settled_points(service, customer, amount)
    return customer


def make_code(service: Service, customer: Customer, amount: int, partner_name: str = "acme") -> httpx.Response:
    return service.client.post(CODES, json=authorise(service, customer, amount, partner_name), headers=customer.headers)


def by_code(service: Service, code: str, reference: str | None = None, **kwargs: Any) -> httpx.Response:
    body: dict[str, Any] = {"code": code}
    if reference is not None:
        body["reference"] = reference
    return redeem(service, body, **kwargs)


def listed(service: Service, customer: Customer) -> list[dict[str, Any]]:
    response = service.client.get(CODES, headers=customer.headers)
    assert response.status_code == 200, response.text
    return list(response.json()["codes"])


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = dict(response.json())
    assert body["code"] == code, body
    return body


def test_a_code_is_short_and_redeems_once_with_the_partners_reference(service: Service, issuer: dict[str, str]) -> None:
    customer = funded(service, issuer, 100)
    made = make_code(service, customer, 30)
    assert made.status_code == 201, made.text
    shown = made.json()
    code = shown["code"]
    assert len(code.replace("-", "")) == 10
    assert len(code) <= 12
    assert set(code.replace("-", "")) <= set(codes.ALPHABET)
    assert (shown["amount"], shown["partner"], shown["partner_name"]) == (30, service.partner_address, "acme")
    assert time.time() < shown["expires_at"] <= time.time() + 15 * 60 + 5
    assert shown["qr_svg"].startswith("data:image/svg+xml")
    assert [c["code"] for c in listed(service, customer)] == [code]

    # typed as a person would: lower case, spaces, an O for a 0 and an l for a 1
    typed = code.lower().replace("-", " ").replace("0", "o").replace("1", "l")
    key = str(uuid.uuid4())
    redeemed = by_code(service, typed, "order-1042", key=key)
    assert redeemed.status_code == 200, redeemed.text
    answer = redeemed.json()
    assert (answer["amount"], answer["balance"], answer["reference"]) == (30, 70, "order-1042")
    assert answer["did"] == customer.did
    again = by_code(service, typed, "order-1042", key=key)  # a retry with the key: the first answer
    assert again.status_code == 200
    assert again.json() == answer
    problem(by_code(service, code, "order-1043"), 409, "code_used")  # a new key: never twice
    assert listed(service, customer) == []

    after = settled_points(service, customer, 70)
    (spent,) = [h for h in after["history"] if h["kind"] == "redeemed"]
    assert spent["reference"] == "order-1042"
    statement = service.client.get("/api/v1/partners/me/redemptions", headers=partner(service))
    assert statement.status_code == 200, statement.text
    (line,) = [x for x in statement.json()["redemptions"] if x["redemption_id"] == shown["redemption_id"]]
    assert line["reference"] == "order-1042"
    csv_text = service.client.get(
        "/api/v1/partners/me/redemptions", params={"format": "csv"}, headers=partner(service)
    ).text
    assert csv_text.splitlines()[0].endswith(",reference")
    assert any(row.endswith(",order-1042") for row in csv_text.splitlines())


def test_the_typed_data_body_still_works_and_takes_a_reference(service: Service, issuer: dict[str, str]) -> None:
    customer = funded(service, issuer, 20)
    redeemed = redeem(service, {**authorise(service, customer, 5), "reference": "till 7"})
    assert redeemed.status_code == 200, redeemed.text
    assert redeemed.json()["reference"] == "till 7"
    plain = redeem(service, authorise(service, customer, 5))
    assert plain.status_code == 200, plain.text
    assert plain.json()["reference"] is None


def test_only_the_named_partner_redeems_a_code(
    service: Service, issuer: dict[str, str], other_partner: dict[str, str]
) -> None:
    customer = funded(service, issuer, 50)
    code = make_code(service, customer, 10).json()["code"]
    problem(by_code(service, code, headers=other_partner), 404, "unknown_code")  # as if there were none
    assert points(service, customer)["balance"] == 50
    assert [c["code"] for c in listed(service, customer)] == [code]  # still the named partner's
    assert by_code(service, code).status_code == 200


def test_a_cancelled_code_is_refused_by_code_and_by_its_typed_data(service: Service, issuer: dict[str, str]) -> None:
    customer = funded(service, issuer, 50)
    signed = authorise(service, customer, 10)
    made = service.client.post(CODES, json=signed, headers=customer.headers)
    assert made.status_code == 201, made.text
    code = made.json()["code"]
    cancelled = service.client.delete(f"{CODES}/{code.lower()}", headers=customer.headers)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {"codes": []}
    problem(by_code(service, code), 409, "code_cancelled")
    problem(redeem(service, signed), 409, "code_cancelled")  # the copied typed data: not through the service
    problem(service.client.delete(f"{CODES}/{code}", headers=customer.headers), 409, "code_cancelled")
    assert points(service, customer)["balance"] == 50
    # the nonce was never used: the next authorisation at that partner takes it, and works
    assert by_code(service, make_code(service, customer, 10).json()["code"]).status_code == 200


def test_an_expired_code_is_refused(service: Service, issuer: dict[str, str]) -> None:
    customer = funded(service, issuer, 50)
    code = make_code(service, customer, 10).json()["code"]
    with service.runtime.sessions() as session:
        session.execute(
            update(RedemptionCode)
            .where(RedemptionCode.code == code.replace("-", ""))
            .values(deadline=int(time.time()) - 1)
        )
    problem(by_code(service, code), 410, "code_expired")
    problem(service.client.delete(f"{CODES}/{code}", headers=customer.headers), 410, "code_expired")
    assert listed(service, customer) == []
    assert points(service, customer)["balance"] == 50


def test_a_used_code_cannot_be_cancelled_and_another_customers_is_unknown(
    service: Service, issuer: dict[str, str]
) -> None:
    customer, stranger = funded(service, issuer, 50), service.new_customer()
    code = make_code(service, customer, 10).json()["code"]
    problem(service.client.delete(f"{CODES}/{code}", headers=stranger.headers), 404, "unknown_code")
    assert listed(service, stranger) == []
    assert by_code(service, code).status_code == 200
    problem(service.client.delete(f"{CODES}/{code}", headers=customer.headers), 409, "code_used")


def test_storing_checks_the_authorisation_as_redeeming_does(service: Service, issuer: dict[str, str]) -> None:
    customer, other = funded(service, issuer, 50), funded(service, issuer, 50)
    signed = authorise(service, customer, 10)
    problem(service.client.post(CODES, json=signed, headers=other.headers), 403, "not_your_authorisation")
    forged = {**signed, "signature": service.sign_typed(other.account, signed["typed_data"])}
    problem(service.client.post(CODES, json=forged, headers=customer.headers), 422, "invalid_signature")
    late = authorise(service, customer, 10)
    late["typed_data"]["message"]["deadline"] = int(time.time()) - 1
    late["signature"] = service.sign_typed(customer.account, late["typed_data"])
    problem(service.client.post(CODES, json=late, headers=customer.headers), 422, "signature_expired")
    assert service.client.post(CODES, json=signed, headers=customer.headers).status_code == 201
    problem(service.client.post(CODES, json=signed, headers=customer.headers), 409, "authorisation_used")
    problem(make_code(service, customer, 5), 409, "code_outstanding")  # one per partner: nonces go in order
    assert redeem(service, signed).status_code == 200  # its typed data, by the partner: ends the code
    assert listed(service, customer) == []
    # over the balance when stored (40 left): a redemption's prepare refuses it, so the code route must too
    over = authorise(service, customer, 40)
    assert by_code(service, make_code(service, customer, 30).json()["code"]).status_code == 200
    problem(service.client.post(CODES, json=over, headers=customer.headers), 409, "insufficient_points")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"code": "K7QX-3MZP-9"}, 422, "invalid_code"),  # 9 characters
        ({"code": "K7QX-3MZP-9DU"}, 422, "invalid_code"),  # U is no Crockford digit
        ({"code": "K7QX\n3MZP9D"}, 422, "invalid_code"),  # a control character
        ({"code": "A" * 10_000}, 422, None),  # over the field's bound: refused by the schema
        ({"code": "K7QX3MZP9D", "reference": "bad\x00ref"}, 422, None),
        ({"code": "K7QX3MZP9D", "reference": "tab\there"}, 422, None),
        ({"code": "K7QX3MZP9D", "reference": " padded"}, 422, None),
        ({"code": "K7QX3MZP9D", "reference": "x" * 65}, 422, None),
        ({"code": "K7QX3MZP9D", "reference": "x" * 2_000_000}, 413, "body_too_large"),
        ({"code": "K7QX3MZP9D", "reference": "caf\u00e9"}, 422, None),
    ],
)
def test_malformed_codes_and_references_are_refused(
    service: Service, body: dict[str, Any], status: int, code: str | None
) -> None:
    response = redeem(service, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    if code is not None:
        assert response.json()["code"] == code
    else:  # the schema's refusal names the field of the shape sent, not the other shape's
        assert [e["loc"][1:] for e in response.json()["errors"]] == [["code", next(iter(set(body) - {"code"}), "code")]]
    assert "\x00" not in response.text


def test_a_partner_that_guesses_is_locked_out_for_a_while(
    service: Service, issuer: dict[str, str], other_partner: dict[str, str]
) -> None:
    customer = funded(service, issuer, 50)
    code = make_code(service, customer, 10).json()["code"]
    for _ in range(codes.FailedLookups.LIMIT):
        problem(by_code(service, "0000-0000-00"), 404, "unknown_code")
    locked = problem(by_code(service, code), 429, "too_many_code_failures")
    assert "try again in" in locked["detail"]
    problem(by_code(service, "0000-0000-00", headers=other_partner), 404, "unknown_code")  # per partner
    assert points(service, customer)["balance"] == 50
    codes.FAILED_LOOKUPS.clear()  # the window passed
    assert by_code(service, code).status_code == 200


def test_codes_are_unique_random_and_read_back_as_typed() -> None:
    drawn = {codes.new_code() for _ in range(2000)}
    assert len(drawn) == 2000
    assert all(len(c) == 10 and set(c) <= set(codes.ALPHABET) for c in drawn)
    assert codes.grouped("K7QX3MZP9D") == "K7QX-3MZP-9D"
    assert codes.normalise(" k7qx-3mzp-9d ") == "K7QX3MZP9D"
    assert codes.normalise("IL0O-0000-00") == "1100000000"
    assert codes.normalise("K7QX-3MZP-9U") is None
    assert codes.normalise("K7QX3MZP9") is None


def test_a_cancel_and_redemptions_racing_for_one_code_have_one_winner(service: Service, issuer: dict[str, str]) -> None:
    customer = funded(service, issuer, 50)
    code = make_code(service, customer, 10).json()["code"]
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def send(action: Callable[[], httpx.Response]) -> None:
        answer = action()
        with lock:
            answers.append(answer)

    def cancel() -> httpx.Response:
        with httpx.Client(base_url=service.client.base_url, timeout=60) as client:
            return client.delete(f"{CODES}/{code}", headers=customer.headers)

    def spend() -> httpx.Response:
        headers = {**partner(service), "Idempotency-Key": str(uuid.uuid4())}
        with httpx.Client(base_url=service.client.base_url, timeout=60) as client:
            return client.post("/api/v1/points/redemptions", json={"code": code}, headers=headers)

    threads = [threading.Thread(target=send, args=(f,)) for f in (cancel, spend) * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [a for a in answers if a.status_code == 200]
    assert len(won) == 1, [a.text for a in answers]
    lost = {a.json()["code"] for a in answers if a.status_code != 200}
    assert lost <= {"code_used", "code_cancelled"}, lost
    spent = "balance" in won[0].json()  # a redemption's answer, not the codes still outstanding
    assert settled_points(service, customer, 40 if spent else 50)["balance"] == (40 if spent else 50)
