"""Loyalty points through HTTP on a real node: issue, authorise, redeem once, balances, tiers, statements."""

from __future__ import annotations

import csv
import io
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from eth_account import Account
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, select, update

from api.auth import create_principal
from api.models import Partner
from ledger.consent import CONTROLLER_OF, ControllerState
from ledger.points import IdempotencyRecord, PointsRequest
from ledger.store import utcnow
from ledger.types import Subject
from tests.api.conftest import Customer, Service, q
from tests.api.test_consent_api import _problem


@pytest.fixture(scope="module")
def issuer(service: Service) -> dict[str, str]:
    with service.runtime.sessions() as session:
        _, key = create_principal(session, "points-issuer", "issuer")
    return {"X-API-Key": key}


@pytest.fixture(scope="module")
def other_partner(service: Service) -> dict[str, str]:
    address = Account.create().address
    with service.runtime.sessions() as session:
        _, key = create_principal(session, "globex", "partner", address)
        session.add(Partner(address=address, name="globex", on_chain=False))
    service.runtime.sync_partners()
    service.runtime.invalidate_catalogue()
    return {"X-API-Key": key}


def partner(service: Service) -> dict[str, str]:
    return {"X-API-Key": service.partner_key}


def issue(service: Service, issuer: dict[str, str], customer: Customer, *amounts: int, **extra: Any) -> httpx.Response:
    body = {"issuances": [{"did": customer.did, "amount": a, **extra} for a in amounts]}
    return service.client.post("/api/v1/points/issuances", json=body, headers=issuer)


def authorise(service: Service, customer: Customer, amount: int, partner_name: str = "acme") -> dict[str, Any]:
    prepared = service.client.post(
        "/api/v1/points/redemptions/prepare", json={"partner": partner_name, "amount": amount}, headers=customer.headers
    )
    assert prepared.status_code == 200, prepared.text
    typed = prepared.json()["typed_data"]
    return {"typed_data": typed, "signature": service.sign_typed(customer.account, typed)}


def redeem(
    service: Service, body: dict[str, Any], key: str | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    sent = dict(headers or partner(service))
    sent["Idempotency-Key"] = key or str(uuid.uuid4())
    return service.client.post("/api/v1/points/redemptions", json=body, headers=sent)


def points(service: Service, customer: Customer) -> dict[str, Any]:
    response = service.client.get(f"/api/v1/customers/{q(customer.did)}/points", headers=customer.headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def settled_points(service: Service, customer: Customer, balance: int, timeout: float = 20) -> dict[str, Any]:
    """The read model follows the chain through the indexer: wait until it shows `balance`."""
    deadline = time.monotonic() + timeout
    while True:
        seen = points(service, customer)
        if seen["balance"] == balance:
            return seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)


def chain_balance(service: Service, customer: Customer) -> int:
    assert service.runtime.ledger.points is not None
    assert service.runtime.dids is not None
    return service.runtime.ledger.points.balance_of(service.runtime.dids.subject(customer.did))


def test_issue_authorise_redeem_end_to_end(service: Service, issuer: dict[str, str]) -> None:
    customer = service.new_customer()
    soon = int(time.time()) + 30 * 86400
    issued = issue(service, issuer, customer, 50, expires_at=soon)
    assert issued.status_code == 201, issued.text
    later = issue(service, issuer, customer, 100)
    assert later.status_code == 201, later.text
    (lot,) = later.json()["issuances"]
    assert lot["status"] == "issued"
    assert lot["tx_hash"].startswith("0x")
    assert lot["lot_id"] == 2
    assert lot["expires_at"] >= time.time() + 364 * 86400  # the default lifetime
    before = settled_points(service, customer, 150)
    assert [(x["lot_id"], x["remaining"]) for x in before["lots"]] == [(1, 50), (2, 100)]
    assert before["tier"] == {"name": "bronze", "earned_12m": 150, "next": "silver", "points_to_next": 850}

    redeemed = redeem(service, authorise(service, customer, 70))
    assert redeemed.status_code == 200, redeemed.text
    answer = redeemed.json()
    assert (answer["status"], answer["amount"], answer["balance"], answer["did"]) == ("redeemed", 70, 80, customer.did)
    assert answer["partner"] == service.partner_address
    assert chain_balance(service, customer) == 80
    after = settled_points(service, customer, 80)
    assert [(x["lot_id"], x["remaining"]) for x in after["lots"]] == [(2, 80)]  # soonest expiry spent first
    assert [(h["kind"], h["amount"]) for h in after["history"]] == [("redeemed", 70), ("issued", 100), ("issued", 50)]
    assert after["history"][0]["partner_name"] == "acme"
    assert after["history"][0]["tx_hash"] == answer["tx_hash"]


def test_a_retry_with_the_same_key_gets_the_first_answer(service: Service, issuer: dict[str, str]) -> None:
    customer = service.new_customer()
    assert issue(service, issuer, customer, 100).status_code == 201
    body = authorise(service, customer, 30)
    key = str(uuid.uuid4())
    first = redeem(service, body, key)
    assert first.status_code == 200, first.text
    again = redeem(service, body, key)
    assert (again.status_code, again.json()) == (200, first.json())
    other_body = authorise(service, customer, 5)
    reused = redeem(service, other_body, key)
    _problem(reused, 422, "idempotency_key_reused")
    # The same authorisation under another key is refused: it works once.
    _problem(redeem(service, body), 409, "authorisation_used")
    assert chain_balance(service, customer) == 70
    missing = service.client.post("/api/v1/points/redemptions", json=body, headers=partner(service))
    _problem(missing, 400, "idempotency_key_required")


def test_a_forgotten_idempotency_key_never_spends_twice(service: Service, issuer: dict[str, str]) -> None:
    """Keys are remembered `idempotency_key_hours` (24); the maintenance thread's prune forgets older
    ones. A retry with a forgotten key is a new request whose authorisation was used: refused."""
    customer = service.new_customer()
    assert issue(service, issuer, customer, 100).status_code == 201
    old_key, recent_key = str(uuid.uuid4()), str(uuid.uuid4())
    body = authorise(service, customer, 30)
    assert redeem(service, body, old_key).status_code == 200
    later_body = authorise(service, customer, 5)
    recent = redeem(service, later_body, recent_key)
    assert recent.status_code == 200, recent.text
    with service.runtime.sessions() as session:
        session.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.key == old_key)
            .values(created_at=utcnow() - timedelta(hours=25))
        )
    service.runtime.prune()
    with service.runtime.reads() as session:
        kept = session.scalars(select(IdempotencyRecord.key).where(IdempotencyRecord.key.in_([old_key, recent_key])))
        assert set(kept) == {recent_key}
    _problem(redeem(service, body, old_key), 409, "authorisation_used")
    again = redeem(service, later_body, recent_key)
    assert (again.status_code, again.json()) == (200, recent.json())
    assert chain_balance(service, customer) == 65


def test_fifty_concurrent_identical_requests_spend_once(service: Service, issuer: dict[str, str]) -> None:
    customer = service.new_customer()
    assert issue(service, issuer, customer, 100).status_code == 201
    body = authorise(service, customer, 40)
    key = str(uuid.uuid4())
    answers: list[httpx.Response] = []
    lock = threading.Lock()
    url = str(service.client.base_url)

    def send() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            response = client.post(
                "/api/v1/points/redemptions", json=body, headers={**partner(service), "Idempotency-Key": key}
            )
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=send) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in answers] == [200] * 50, {r.text for r in answers}
    assert len({r.text for r in answers}) == 1
    assert answers[0].json()["balance"] == 60
    assert chain_balance(service, customer) == 60
    assert service.runtime.dids is not None
    subject = bytes(service.runtime.dids.subject(customer.did))
    with service.runtime.sessions() as session:
        from sqlalchemy import func, select

        assert (
            session.scalar(select(func.count()).where(PointsRequest.subject == subject, PointsRequest.kind == "redeem"))
            == 1
        )
        assert session.scalar(select(func.count()).where(IdempotencyRecord.key == key)) == 1


def prepare(service: Service, customer: Customer, amount: int) -> httpx.Response:
    return service.client.post(
        "/api/v1/points/redemptions/prepare", json={"partner": "acme", "amount": amount}, headers=customer.headers
    )


def test_insufficient_points_is_a_clear_error_that_changes_nothing(
    service: Service, issuer: dict[str, str], other_partner: dict[str, str]
) -> None:
    customer = service.new_customer()
    assert issue(service, issuer, customer, 10).status_code == 201
    # A code for more than the customer holds is refused when it is asked for, in plain words.
    asked = _problem(prepare(service, customer, 11), 409, "insufficient_points")
    assert (asked["title"], asked["detail"]) == ("Not enough unexpired points", "11 asked, 10 held")
    # Two codes for the whole balance (at two partners): the second redeemed finds it spent, on-chain.
    key = str(uuid.uuid4())
    body = authorise(service, customer, 10)
    assert redeem(service, authorise(service, customer, 10, "globex"), headers=other_partner).json()["balance"] == 0
    refused = redeem(service, body, key)
    problem = _problem(refused, 409, "insufficient_points")
    # Plain words to the partner: not the revert's facts (the customer's pseudonym and balance).
    assert problem["title"] == "Not enough unexpired points"
    assert set(problem) == {"type", "title", "status", "code", "instance", "request_id"}
    assert body["typed_data"]["message"]["subject"][2:].lower() not in refused.text.lower()
    assert "balance" not in refused.text.lower()
    assert chain_balance(service, customer) == 0
    # Errors are replayed too.
    assert redeem(service, body, key).json() == refused.json()
    # The failed authorisation used no nonce: the next one works.
    assert issue(service, issuer, customer, 5).status_code == 201
    assert redeem(service, authorise(service, customer, 5)).json()["balance"] == 0


def test_bad_authorisations_are_refused_before_the_chain(
    service: Service, issuer: dict[str, str], other_partner: dict[str, str]
) -> None:
    customer = service.new_customer()
    assert issue(service, issuer, customer, 100).status_code == 201
    body = authorise(service, customer, 10)  # for acme
    _problem(redeem(service, body, headers=other_partner), 403, "not_your_authorisation")
    forged = {"typed_data": body["typed_data"], "signature": service.sign_typed(Account.create(), body["typed_data"])}
    _problem(redeem(service, forged), 422, "invalid_signature")
    tampered = {
        "typed_data": {**body["typed_data"], "message": {**body["typed_data"]["message"], "amount": 99}},
        "signature": body["signature"],
    }
    _problem(redeem(service, tampered), 422, "invalid_signature")
    _problem(
        redeem(service, {"typed_data": {"primaryType": "ConsentGrant"}, "signature": body["signature"]}),
        422,
        "invalid_typed_data",
    )
    assert chain_balance(service, customer) == 100
    # Each partner redeems its own authorisations; they do not wait for each other.
    at_globex = authorise(service, customer, 20, "globex")
    assert redeem(service, at_globex, headers=other_partner).json()["balance"] == 80
    assert redeem(service, body).json()["balance"] == 70


def test_expired_points_cannot_be_spent(service: Service, issuer: dict[str, str]) -> None:
    customer = service.new_customer()
    assert issue(service, issuer, customer, 30, expires_at=int(time.time()) + 3).status_code == 201
    assert issue(service, issuer, customer, 5).status_code == 201
    before = authorise(service, customer, 35)  # all of it, while it lasts
    time.sleep(4)
    assert points(service, customer)["balance"] == 5
    _problem(redeem(service, before), 409, "insufficient_points")  # the chain counts only unexpired lots
    _problem(prepare(service, customer, 6), 409, "insufficient_points")
    assert redeem(service, authorise(service, customer, 5)).json()["balance"] == 0
    seen = settled_points(service, customer, 0)
    assert ("expired", 30) in [(h["kind"], h["amount"]) for h in seen["history"]]
    _problem(issue(service, issuer, customer, 5, expires_at=int(time.time()) - 1), 422, "invalid_expiry")


def test_issuances_in_bulk_and_tiers(service: Service, issuer: dict[str, str]) -> None:
    customers = [service.new_customer() for _ in range(3)]
    body = {"issuances": [{"did": c.did, "amount": 600, "reference": f"order-{i}"} for i, c in enumerate(customers)]}
    body["issuances"].append({"did": customers[0].did, "amount": 500})
    keyed = {**issuer, "Idempotency-Key": str(uuid.uuid4())}
    issued = service.client.post("/api/v1/points/issuances", json=body, headers=keyed)
    assert issued.status_code == 201, issued.text
    # A repeat under the key gets the same answer (made again from the requests' final state) and
    # issues nothing more.
    again = service.client.post("/api/v1/points/issuances", json=body, headers=keyed)
    assert (again.status_code, again.json()) == (201, issued.json())
    assert [(i["status"], i["reference"]) for i in issued.json()["issuances"]] == [
        ("issued", "order-0"),
        ("issued", "order-1"),
        ("issued", "order-2"),
        ("issued", None),
    ]
    assert len({i["tx_hash"] for i in issued.json()["issuances"]}) == 1  # one batch transaction
    tier = settled_points(service, customers[0], 1100)["tier"]
    assert tier == {"name": "silver", "earned_12m": 1100, "next": "gold", "points_to_next": 3900}
    unknown = service.client.post(
        "/api/v1/points/issuances", json={"issuances": [{"did": "did:web:nowhere", "amount": 1}]}, headers=issuer
    )
    _problem(unknown, 422, "unknown_customer")


def test_customers_see_only_their_own_points(service: Service, issuer: dict[str, str]) -> None:
    a, b = service.new_customer(), service.new_customer()
    refused = service.client.get(f"/api/v1/customers/{q(b.did)}/points", headers=a.headers)
    _problem(refused, 403, "not_your_data")
    operator = service.client.get(f"/api/v1/customers/{q(b.did)}/points", headers=service.operator())
    assert operator.status_code == 200


def test_partner_statement_for_settlement(service: Service, issuer: dict[str, str]) -> None:
    customer = service.new_customer()
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 5))
    assert issue(service, issuer, customer, 100).status_code == 201
    ids = [redeem(service, authorise(service, customer, n)).json()["redemption_id"] for n in (10, 15)]
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 5))
    settled_points(service, customer, 75)
    params = {"from": start, "to": end}
    statement = service.client.get("/api/v1/partners/me/redemptions", params=params, headers=partner(service))
    assert statement.status_code == 200, statement.text
    mine = [r for r in statement.json()["redemptions"] if r["did"] == customer.did]
    assert [(r["redemption_id"], r["amount"]) for r in mine] == list(zip(ids, [10, 15], strict=True))
    assert statement.json()["total_points"] == sum(r["amount"] for r in statement.json()["redemptions"])
    assert statement.json()["partner_name"] == "acme"
    as_csv = service.client.get(
        "/api/v1/partners/me/redemptions", params={**params, "format": "csv"}, headers=partner(service)
    )
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [(r["redemption_id"], int(r["amount"])) for r in rows if r["did"] == customer.did] == [
        (ids[0], 10),
        (ids[1], 15),
    ]
    backwards = service.client.get(
        "/api/v1/partners/me/redemptions", params={"from": end, "to": start}, headers=partner(service)
    )
    _problem(backwards, 422, "invalid_period")
    # Without a period: this month so far (UTC).
    months = {_month_start()}
    default = service.client.get("/api/v1/partners/me/redemptions", headers=partner(service))
    months.add(_month_start())  # the month may have turned meanwhile
    assert default.status_code == 200, default.text
    assert default.json()["start"] in months
    assert abs(default.json()["end"] - time.time()) < 60
    this_month = [(r["redemption_id"], r["amount"]) for r in mine if r["block_time"] >= default.json()["start"]]
    assert [(r["redemption_id"], r["amount"]) for r in default.json()["redemptions"] if r["did"] == customer.did] == (
        this_month
    )


def _month_start() -> int:
    now = datetime.now(UTC)
    return int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())


def test_the_read_model_matches_the_chain(service: Service) -> None:
    contract, dids = service.runtime.ledger.points, service.runtime.dids
    assert contract is not None
    assert dids is not None
    issued, redeemed, expired = contract.totals()
    balances = 0
    unswept = 0
    for customer in service.customers:
        subject = Subject(dids.subject(customer.did))
        chain = contract.balance_of(subject)
        settled_points(service, customer, chain)  # the read model agrees with the chain
        balances += chain
        unswept += sum(lot.remaining for lot in contract.lots_of(subject) if lot.expires_at <= time.time())
    assert balances == issued - redeemed - expired - unswept


def test_a_redemption_is_accepted_while_the_read_model_has_rolled_back_its_customers_binding(
    service: Service, issuer: dict[str, str]
) -> None:
    """After the node lost blocks, the indexer rolls back their binding events: until the service has
    bound the keys again and the indexer has seen it, the read model knows no key for those customers.
    The service's own record of the binding it made answers meanwhile (a chaos run at load had valid
    redemptions refused as `unbound_subject` in that second)."""
    customer = service.new_customer()
    assert issue(service, issuer, customer, 100).status_code == 201
    body = authorise(service, customer, 10)
    assert service.runtime.dids is not None
    subject = bytes(service.runtime.dids.subject(customer.did))
    with service.runtime.sessions() as session:  # as a rollback past the binding leaves the read model
        session.execute(delete(ControllerState).where(ControllerState.subject == subject))
        session.commit()
    redeemed = redeem(service, body)
    assert redeemed.status_code == 200, redeemed.text
    assert redeemed.json()["balance"] == 90
    # Someone with no binding at all is still refused before the chain.
    stranger = Subject(bytes(32))
    with service.runtime.sessions() as session:
        assert session.execute(CONTROLLER_OF, {"subject": bytes(stranger)}).scalar() is None


def _metric(service: Service, name: str, **labels: str) -> float:
    text = service.client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_metrics_count_each_redemption_once_and_read_the_liability(
    service: Service, issuer: dict[str, str], other_partner: dict[str, str]
) -> None:
    """`/metrics`: a retry with the same Idempotency-Key is no second redemption; the liability and what
    expires within 30 days are the read model's lots, read when scraped."""
    done = refused = "consent_ledger_redemptions_total"
    before = {
        "done": _metric(service, done, outcome="done"),
        "refused": _metric(service, refused, outcome="refused"),
        "liability": _metric(service, "consent_ledger_points_liability"),
        "expiring": _metric(service, "consent_ledger_points_expiring_30d"),
    }
    customer = service.new_customer()
    assert issue(service, issuer, customer, 40, expires_at=int(time.time()) + 10 * 86400).status_code == 201
    assert issue(service, issuer, customer, 100).status_code == 201  # a year
    settled_points(service, customer, 140)
    assert _metric(service, "consent_ledger_points_liability") - before["liability"] == 140
    assert _metric(service, "consent_ledger_points_expiring_30d") - before["expiring"] == 40

    body, key = authorise(service, customer, 30), str(uuid.uuid4())
    assert redeem(service, body, key).status_code == 200
    assert redeem(service, body, key).status_code == 200  # the first answer again
    # A code for 100 of the 110 held; 20 spent at another partner first: the chain refuses the 100.
    too_much = authorise(service, customer, 100)
    assert redeem(service, authorise(service, customer, 20, "globex"), headers=other_partner).status_code == 200
    _problem(redeem(service, too_much), 409, "insufficient_points")
    assert _metric(service, done, outcome="done") - before["done"] == 2
    assert _metric(service, refused, outcome="refused") - before["refused"] == 1
    settled_points(service, customer, 90)
    assert _metric(service, "consent_ledger_points_liability") - before["liability"] == 90
    assert _metric(service, "consent_ledger_points_expiring_30d") - before["expiring"] == 0  # soonest spent first
