"""The batch route: a back end forwards many customers' signed changes in one request; each is checked
and answered alone, one failing change fails alone, and those accepted go on-chain as single ones do."""

from __future__ import annotations

import copy
import time
from typing import Any

import httpx
import pytest
from eth_account import Account

from api.auth import create_principal
from tests.api.conftest import Customer, Service, q

pytestmark = pytest.mark.anvil
BATCH = "/api/v1/consents/batch"


@pytest.fixture(scope="module")
def forwarder(service: Service) -> dict[str, str]:
    with service.runtime.sessions() as session:
        _, key = create_principal(session, "mobile-backend", "forwarder")
    return {"X-API-Key": key}


def _signed(service: Service, customer: Customer, typed: dict[str, Any], **message: Any) -> dict[str, Any]:
    """`typed` with `message` fields changed, signed by the customer's bound key."""
    changed = copy.deepcopy(typed)
    changed["message"].update(message)
    return {"typed_data": changed, "signature": service.sign_typed(customer.account, changed)}


def _template(service: Service, customer: Customer, action: str = "grant") -> dict[str, Any]:
    prepared = service.prepare(customer, action=action, attributes=["user.contact.email"])
    assert prepared.status_code == 200, prepared.text
    return dict(prepared.json()["typed_data"])


def test_five_hundred_changes_of_many_customers_are_each_answered_and_the_good_ones_go_on_chain(
    service: Service, forwarder: dict[str, str]
) -> None:
    customers = [service.new_customer() for _ in range(5)]
    stranger = Account.create()
    changes: list[dict[str, Any]] = []
    expected: list[tuple[int, str | None]] = []
    for customer in customers:
        grant, revoke = _template(service, customer), _template(service, customer, "revoke")
        first = int(grant["message"]["nonce"])
        for k in range(100):  # a customer's changes in order, grant and revoke in turn: nonce after nonce
            changes.append(_signed(service, customer, grant if k % 2 == 0 else revoke, nonce=first + k))
            expected.append((202, None))
    # A few of the 500 replaced with bad ones, each refused with the code the single route gives.
    bad = {
        10: ("signed by another key", 422, "invalid_signature"),
        150: ("expired", 422, "signature_expired"),
        250: ("not a consent change", 422, "invalid_typed_data"),
        350: ("a nonce used twice", 409, "nonce_mismatch"),
    }
    typed = changes[10]["typed_data"]
    changes[10] = {"typed_data": typed, "signature": service.sign_typed(stranger, typed)}
    changes[150] = _signed(service, customers[1], changes[150]["typed_data"], deadline=int(time.time()) - 1)
    changes[250] = {**changes[250], "typed_data": {**changes[250]["typed_data"], "primaryType": "Nonsense"}}
    changes[350] = copy.deepcopy(changes[349])  # the same change again: its nonce is taken by then
    for index, (_why, code_status, code) in bad.items():
        expected[index] = (code_status, code)
    # A refused change leaves a gap: its customer's later changes do not have the next nonce any more.
    for index in bad:
        for later in range(index + 1, (index // 100 + 1) * 100):
            expected[later] = (409, "nonce_mismatch")
    assert len(changes) == 500

    answer = service.client.post(BATCH, json={"changes": changes}, headers=forwarder, timeout=120)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["index"] for r in results] == list(range(500))
    got = [(r["status"], r["error"]["code"] if r["error"] else None) for r in results]
    assert got == expected
    accepted = [r for r in results if r["status"] == 202]
    assert answer.json()["accepted"] == len(accepted) == sum(1 for s, _ in expected if s == 202)
    for r in results:
        if r["status"] != 202:
            assert r["id"] is None
            assert r["error"]["detail"]  # in plain words
    assert results[10]["error"]["detail"].startswith("The change was not signed by the customer's bound key")
    assert [r["index"] for r in accepted] == [
        *range(10),
        *range(100, 150),
        *range(200, 250),
        *range(300, 350),
        *range(400, 500),
    ]
    # The accepted ones go on-chain as single changes do: each customer's last (a revocation) confirmed.
    for n, customer in enumerate(customers):
        last = max((r for r in accepted if r["index"] // 100 == n), key=lambda r: r["index"])
        assert service.wait_status(customer, last["id"], "revoked", timeout=60)["tx_hash"]


def test_a_customer_without_a_bound_key_or_erased_is_refused_alone(service: Service, forwarder: dict[str, str]) -> None:
    good = service.new_customer()
    erased = service.new_customer()
    template = _template(service, erased)
    did, _claim = service.enrol("unbound.forwarded@example.com")  # enrolled, no key bound yet
    unbound_subject = "0x" + did.rsplit(":", 1)[1]
    erased_change = _signed(service, erased, template)
    gone = service.client.delete(f"/api/v1/customers/{q(erased.did)}", headers=service.operator())
    assert gone.status_code == 200, gone.text
    changes = [
        _signed(service, good, _template(service, good)),
        _signed(service, good, template, subject=unbound_subject, nonce=0),
        erased_change,
    ]
    answer = service.client.post(BATCH, json={"changes": changes}, headers=forwarder)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [(r["status"], r["error"] and r["error"]["code"]) for r in results] == [
        (202, None),
        (422, "unbound_subject"),
        (409, "customer_erased"),
    ]
    assert answer.json()["accepted"] == 1


def test_only_a_forwarder_may_send_a_batch_and_a_batch_has_1_to_500_changes(
    service: Service, forwarder: dict[str, str]
) -> None:
    customer = service.new_customer()
    change = _signed(service, customer, _template(service, customer))
    for headers in (customer.headers, service.operator(), {"X-API-Key": service.partner_key}):
        refused = service.client.post(BATCH, json={"changes": [change]}, headers=headers)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "insufficient_scope"
    assert service.client.post(BATCH, json={"changes": [change]}).status_code == 401
    for count in (0, 501):
        too: httpx.Response = service.client.post(BATCH, json={"changes": [change] * count}, headers=forwarder)
        assert too.status_code == 422, too.text
        assert too.headers["content-type"] == "application/problem+json"
