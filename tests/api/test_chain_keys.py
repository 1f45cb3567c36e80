"""Rotating the chain keys (`ledger.roles`), on a real anvil node: the operator key by one start with
the old key as CONSENT_LEDGER_CHAIN_PREVIOUS_OPERATOR_KEY, the accessor key by a start with a new one;
a start with an operator key the contracts do not know is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account

from ledger.access import ACCESSOR_ROLE
from ledger.consent import DEFAULT_ADMIN_ROLE, OPERATOR_ROLE, PARTNER_ROLE
from ledger.points import ISSUER_ROLE, RELAYER_ROLE
from ledger.roles import KeyNotAuthorised, _holders
from tests.api.conftest import Service, running_service, start_service

ATTRIBUTES = ["user.contact.email"]


def _roles(service: Service, account: str) -> set[tuple[str, bytes]]:
    runtime = service.runtime
    held = set()
    for name, client, roles in (
        ("ConsentRegistry", runtime.ledger.consent, (DEFAULT_ADMIN_ROLE, OPERATOR_ROLE)),
        ("LoyaltyPoints", runtime.ledger.points, (DEFAULT_ADMIN_ROLE, ISSUER_ROLE, RELAYER_ROLE)),
        ("AccessLog", runtime.ledger.access_log, (DEFAULT_ADMIN_ROLE, ACCESSOR_ROLE)),
    ):
        held |= {(name, role) for role in roles if client.call("hasRole", role, account)}
    return held


def _granted(service: Service) -> None:
    """A consent change goes through the relayer (the operator key) onto the chain."""
    customer = service.customers[0] if service.customers else service.new_customer()
    accepted = service.change(customer, action="grant", attributes=ATTRIBUTES)
    assert accepted.status_code == 202, accepted.text
    service.wait_status(customer, accepted.json()["id"], "active")


def test_the_operator_key_is_rotated_by_one_start_with_the_previous_key(tmp_path: Path) -> None:
    with running_service(tmp_path) as first:
        _granted(first)
        old = first.runtime.secrets.operator
        operator_roles = _roles(first, old.address)
        assert {("ConsentRegistry", OPERATOR_ROLE), ("LoyaltyPoints", RELAYER_ROLE)} <= operator_roles
    new = Account.create()
    rotated = {"operator_key": new.key.hex(), "previous_operator_key": old.key.hex()}
    with running_service(tmp_path, chain=rotated, again=first) as second:
        assert _roles(second, new.address) == operator_roles  # every role moved ...
        assert _roles(second, old.address) == set()  # ... and none is left to the old key
        _granted(second)  # the relayer sends with the new key
        assert second.runtime.ledger.consent is not None
        partner = Account.create().address  # the new key is the admin: it grants partner roles
        second.runtime.ledger.consent.add_partner(partner)
        assert second.runtime.ledger.consent.has_role(PARTNER_ROLE, partner)
    assert json.loads((tmp_path / "deployment.json").read_text())["operator"] == new.address
    with running_service(tmp_path, chain={"operator_key": new.key.hex()}, again=first) as third:
        assert _roles(third, new.address) == operator_roles  # started as it is: nothing to do
    same = {"operator_key": new.key.hex(), "previous_operator_key": new.key.hex()}
    with running_service(tmp_path, chain=same, again=first) as fourth:
        assert _roles(fourth, new.address) == operator_roles  # "rotated" to itself: it keeps its roles
    with pytest.raises(KeyNotAuthorised, match="to rotate it, set CONSENT_LEDGER_CHAIN_PREVIOUS_OPERATOR_KEY"):
        start_service(tmp_path, operator_key=Account.create().key.hex())


def test_a_new_accessor_key_gets_the_role_and_the_old_one_loses_it(tmp_path: Path) -> None:
    with running_service(tmp_path) as first:
        old = first.runtime.secrets.accessor.address
        assert ("AccessLog", ACCESSOR_ROLE) in _roles(first, old)
    new = Account.create()
    with running_service(tmp_path, chain={"accessor_key": new.key.hex()}, again=first) as second:
        assert ("AccessLog", ACCESSOR_ROLE) in _roles(second, new.address)
        assert _roles(second, old) == set()
        assert second.runtime.ledger.access_log is not None
        assert second.runtime.ledger.access_log.sender.account.address == new.address
        # Found by their RoleGranted events, read in windows of a few blocks as a node may require.
        access_log = second.runtime.ledger.access_log
        access_log.log_fetcher.span = 3
        assert _holders(access_log, ACCESSOR_ROLE, 0) == {old, new.address}
