"""A partner leaves the programme (`DELETE /partners/{name}`), on a real anvil node: its keys stop, the
chain takes its role back, and with it every permission its consents gave."""

from __future__ import annotations

import time

import pytest
from eth_account import Account

from api import deps
from api.auth import create_principal
from api.models import Partner
from ledger.consent import PARTNER_ROLE
from ledger.eip712 import purpose_id
from ledger.types import checksummed
from tests.api.conftest import Service, q
from tests.api.test_consent_api import _problem

PURPOSE = "analytics.reporting"
ATTRIBUTES = ["user.behavior.purchase_history"]


def _new_partner(service: Service, name: str) -> tuple[str, dict[str, str]]:
    address = Account.create().address
    with service.runtime.sessions() as session:
        _, key = create_principal(session, name, "partner", address)
        session.add(Partner(address=address, name=name, on_chain=False))
    service.runtime.sync_partners()
    service.runtime.invalidate_catalogue()
    return address, {"X-API-Key": key}


def _has_role(service: Service, address: str) -> bool:
    assert service.runtime.ledger.consent is not None
    return service.runtime.ledger.consent.has_role(PARTNER_ROLE, checksummed(address))


def test_a_retired_partner_loses_its_keys_its_role_and_every_permission(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deps, "CACHE_SECONDS", 0.3)  # before its key is first used: cached 0.3 s
    address, key = _new_partner(service, "tempco")
    customer = service.new_customer()
    granted = service.change(customer, action="grant", partner="tempco", purpose=PURPOSE, attributes=ATTRIBUTES)
    assert granted.status_code == 202, granted.text
    service.wait_status(customer, granted.json()["id"], "active")
    registry = service.runtime.ledger.consent
    assert registry is not None
    assert service.runtime.dids is not None
    subject = service.runtime.dids.subject(customer.did)
    mask = 1 << 5  # user.behavior.purchase_history
    assert registry.is_permitted(subject, checksummed(address), purpose_id(PURPOSE), mask)
    assert service.client.get("/api/v1/partners", headers=key).status_code == 200

    retired = service.client.delete("/api/v1/partners/tempco", headers=service.operator())
    assert retired.status_code == 200, retired.text
    assert (retired.json()["name"], retired.json()["address"]) == ("tempco", address)
    assert retired.json()["retired_at"] is not None
    again = service.client.delete("/api/v1/partners/tempco", headers=service.operator())
    assert again.json() == retired.json()

    assert not _has_role(service, address)  # the chain took the role back
    assert not registry.is_permitted(subject, checksummed(address), purpose_id(PURPOSE), mask)
    deadline = time.monotonic() + 10
    while service.client.get("/api/v1/partners", headers=key).status_code != 401:
        assert time.monotonic() < deadline, "the retired partner's key still works"
        time.sleep(0.05)

    listed = service.client.get("/api/v1/partners", headers=service.operator()).json()
    assert "tempco" not in {p["name"] for p in listed}
    everyone = service.client.get("/api/v1/partners?include_retired=true", headers=service.operator()).json()
    assert {p["name"]: p["retired_at"] for p in everyone}["tempco"] == retired.json()["retired_at"]
    assert {p["name"]: p["retired_at"] for p in everyone}["acme"] is None

    _problem(
        service.prepare(customer, action="grant", partner="tempco", purpose=PURPOSE, attributes=ATTRIBUTES),
        422,
        "partner_retired",
    )
    authorise = {"partner": "tempco", "amount": 1}
    prepared = service.client.post("/api/v1/points/redemptions/prepare", json=authorise, headers=customer.headers)
    _problem(prepared, 422, "partner_retired")
    # The customer can still withdraw what they granted it.
    revoked = service.change(customer, action="revoke", partner="tempco", purpose=PURPOSE, attributes=ATTRIBUTES)
    assert revoked.status_code == 202, revoked.text
    assert service.wait_status(customer, revoked.json()["id"], "revoked")["tx_hash"].startswith("0x")
    listing = service.client.get(f"/api/v1/customers/{q(customer.did)}/consents", headers=customer.headers).json()
    assert "tempco" in {c["partner_name"] for c in listing}  # records keep its name

    _problem(service.client.delete("/api/v1/partners/nobody", headers=service.operator()), 404, "unknown_partner")
    assert _has_role(service, service.partner_address)  # the others keep theirs


def test_a_revocation_the_chain_lost_is_made_again(service: Service) -> None:
    """A crash of the node can lose the block that took the role back; the check after it (`verify`,
    as after a restart) takes it again, and leaves live partners theirs."""
    address, _key = _new_partner(service, "lostco")
    assert service.client.delete("/api/v1/partners/lostco", headers=service.operator()).status_code == 200
    assert not _has_role(service, address)
    assert service.runtime.ledger.consent is not None
    service.runtime.ledger.consent.add_partner(checksummed(address))  # as if the revocation's block was lost
    assert _has_role(service, address)
    service.runtime.sync_partners(verify=True)
    assert not _has_role(service, address)
    assert _has_role(service, service.partner_address)
