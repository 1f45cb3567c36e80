"""Key recovery over HTTP (issue 32): the operator's recovery claim, the new key starting the recovery,
the old key's veto, and completion after the ledger's delay, on a real service and chain."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import select

from api import cli
from api.models import CustomerSession, RecoveryClaim
from ledger.errors import LedgerError
from tests.api.conftest import Customer, Service, q, running_service

RECOVERY_DELAY = 72 * 3600  # the contract's default
PREPARED: dict[str, Any] = {}  # the typed data last prepared for a new key, to send it again


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # Its own service: the last test moves the chain's clock 72 hours on.
    with running_service(tmp_path_factory.mktemp("recovery")) as running:
        yield running


def issue(service: Service, customer: Customer) -> str:
    response = service.client.post(f"/api/v1/customers/{q(customer.did)}/recovery-claims", headers=service.operator())
    assert response.status_code == 201, response.text
    assert response.json()["claim_url"].endswith(f"recovery={response.json()['claim_code']}")
    return str(response.json()["claim_code"])


def start(service: Service, did: str, code: str, key: LocalAccount, *, prepare: bool = True) -> httpx.Response:
    if prepare:
        prepared = service.client.post(
            f"/api/v1/customers/{q(did)}/recovery/prepare", json={"claim_code": code, "address": key.address}
        )
        assert prepared.status_code == 200, prepared.text
        typed = prepared.json()["typed_data"]
        PREPARED[key.address] = typed
    typed = PREPARED[key.address]
    return service.client.post(
        f"/api/v1/customers/{q(did)}/recovery",
        json={"claim_code": code, "typed_data": typed, "signature": service.sign_typed(key, typed)},
    )


def complete(service: Service, did: str, code: str) -> httpx.Response:
    return service.client.post(f"/api/v1/customers/{q(did)}/recovery/complete", json={"claim_code": code})


def keys(service: Service, customer: Customer) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        auditor = {"X-API-Key": service.auditor_key}
        response = service.client.get(f"/api/v1/customers/{q(customer.did)}/keys", headers=auditor)
        assert response.status_code == 200, response.text
        if time.monotonic() > deadline or response.json()[-1]["event"] != "bound" or len(response.json()) > 1:
            return list(response.json())
        time.sleep(0.05)


def test_only_the_operator_issues_recovery_claims(service: Service) -> None:
    customer = service.new_customer()
    path = f"/api/v1/customers/{q(customer.did)}/recovery-claims"
    assert service.client.post(path, headers=customer.headers).status_code == 403
    assert service.client.post(path, headers={"X-API-Key": service.partner_key}).status_code == 403
    assert service.client.post(path).status_code == 401
    unbound, _claim = service.enrol("not-bound-yet@example.com")
    refused = service.client.post(f"/api/v1/customers/{q(unbound)}/recovery-claims", headers=service.operator())
    assert (refused.status_code, refused.json()["code"]) == (409, "not_bound")


def test_the_operator_issues_a_recovery_claim_at_the_command_line(
    service: Service, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    customer = service.new_customer()
    monkeypatch.setenv("CONSENT_LEDGER_CHAIN_BACKEND", "anvil")  # the test service's chain
    data_dir = str(service.runtime.service.data_dir)
    assert cli.main(["customers", "recovery-claim", customer.did, "--data-dir", data_dir]) == 0
    found = re.search(r"recovery code: (\S+)", capsys.readouterr().out)
    assert found is not None
    started = start(service, customer.did, found.group(1), Account.create())
    assert started.status_code == 200, started.text
    unbound, _claim = service.enrol("cli-not-bound@example.com")
    assert cli.main(["customers", "recovery-claim", unbound, "--data-dir", data_dir]) == 2
    assert "has not bound a key yet" in capsys.readouterr().err


def test_erasure_retires_an_unused_recovery_code(service: Service) -> None:
    customer = service.new_customer()
    code = issue(service, customer)
    erased = service.client.delete(f"/api/v1/customers/{q(customer.did)}", headers=service.operator())
    assert erased.status_code == 200, erased.text
    refused = service.client.post(
        f"/api/v1/customers/{q(customer.did)}/recovery/prepare",
        json={"claim_code": code, "address": Account.create().address},
    )
    assert (refused.status_code, refused.json()["code"]) == (403, "invalid_claim_code")
    again = service.client.post(f"/api/v1/customers/{q(customer.did)}/recovery-claims", headers=service.operator())
    assert (again.status_code, again.json()["code"]) == (409, "customer_erased")


def test_erasure_stops_a_pending_recovery(service: Service) -> None:
    customer = service.new_customer()
    code, new_key = issue(service, customer), Account.create()
    assert start(service, customer.did, code, new_key).status_code == 200
    erased = service.client.delete(f"/api/v1/customers/{q(customer.did)}", headers=service.operator())
    assert erased.status_code == 200, erased.text
    with service.runtime.reads() as session:  # the used code is retired too
        claims = session.scalars(
            select(RecoveryClaim.new_controller).where(RecoveryClaim.subject == erased_subject(service, customer))
        ).all()
    assert claims == [None]
    for refused in (complete(service, customer.did, code), start(service, customer.did, code, new_key, prepare=False)):
        assert (refused.status_code, refused.json()["code"]) == (409, "customer_erased")


def erased_subject(service: Service, customer: Customer) -> bytes:
    return bytes(service.runtime.dids.subject(customer.did))


def test_a_recovery_waits_and_the_old_key_sees_it_and_vetoes_it(service: Service) -> None:
    customer = service.new_customer()
    code = issue(service, customer)
    new_key = Account.create()
    with pytest.raises(AssertionError):  # a wrong code prepares nothing
        start(service, customer.did, "not-the-code", new_key)
    started = start(service, customer.did, code, new_key)
    assert started.status_code == 200, started.text
    body = started.json()
    assert (body["controller"], body["new_controller"], body["status"]) == (
        customer.account.address,
        new_key.address,
        "waiting",
    )
    assert abs(body["effective_at"] - (time.time() + RECOVERY_DELAY)) < 3700  # the chain's clock may lead
    assert start(service, customer.did, code, new_key).json()["effective_at"] == body["effective_at"]  # a repeat
    assert start(service, customer.did, code, Account.create()).json()["code"] == "claim_code_used"

    # The customer, still holding the old key, sees it; the operator cannot complete it early.
    seen = service.client.get(f"/api/v1/customers/{q(customer.did)}/recovery", headers=customer.headers)
    assert seen.json()["new_controller"] == new_key.address
    early = complete(service, customer.did, code)
    assert (early.status_code, early.json()["code"]) == (409, "recovery_not_due")
    assert [(e["event"], e["key"]) for e in keys(service, customer)] == [
        ("bound", customer.account.address),
        ("recovery_started", new_key.address),
    ]

    # The veto: signed by the old key, relayed by the operator.
    prepared = service.client.post(
        f"/api/v1/customers/{q(customer.did)}/recovery/cancel/prepare", headers=customer.headers
    )
    assert prepared.status_code == 200, prepared.text
    typed = prepared.json()["typed_data"]
    cancel_path = f"/api/v1/customers/{q(customer.did)}/recovery/cancel"
    forged = service.client.post(
        cancel_path,
        json={"typed_data": typed, "signature": service.sign_typed(new_key, typed)},
        headers=customer.headers,
    )
    assert (forged.status_code, forged.json()["code"]) == (422, "invalid_signature")
    vetoed = service.client.post(
        cancel_path,
        json={"typed_data": typed, "signature": service.sign_typed(customer.account, typed)},
        headers=customer.headers,
    )
    assert vetoed.status_code == 200, vetoed.text
    assert vetoed.json()["status"] == "cancelled"
    gone = service.client.get(f"/api/v1/customers/{q(customer.did)}/recovery", headers=customer.headers)
    assert (gone.status_code, gone.json()["code"]) == (404, "no_recovery")
    assert complete(service, customer.did, code).json()["code"] == "invalid_claim_code"  # its code is spent
    assert keys(service, customer)[-1]["event"] == "recovery_cancelled"
    subject = service.runtime.dids.subject(customer.did)
    assert service.runtime.ledger.consent.controller_of(subject) == customer.account.address


def test_a_start_sent_twice_at_once_starts_one_recovery(service: Service) -> None:
    """A retried start (the first answer lost, or a double click) with the same key gets the same
    answer, not `claim_code_used`, and the chain sees one start."""
    customer = service.new_customer()
    code, new_key = issue(service, customer), Account.create()
    path = f"/api/v1/customers/{q(customer.did)}/recovery"
    prepared = service.client.post(path + "/prepare", json={"claim_code": code, "address": new_key.address})
    typed = prepared.json()["typed_data"]
    body = {"claim_code": code, "typed_data": typed, "signature": service.sign_typed(new_key, typed)}
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: service.client.post(path, json=body), range(2)))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[0].json()["effective_at"] == answers[1].json()["effective_at"]
    assert {a.json()["new_controller"] for a in answers} == {new_key.address}
    again = service.client.post(path, json=body)
    assert (again.status_code, again.json()["effective_at"]) == (200, answers[0].json()["effective_at"])
    assert [e["event"] for e in keys(service, customer)] == ["bound", "recovery_started"]


def test_a_chain_failure_is_told_without_the_nodes_words(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    customer = service.new_customer()

    def fail(_subject: bytes) -> None:
        raise LedgerError("node http://10.0.0.7:8545 refused: internal detail")

    monkeypatch.setattr(service.runtime.ledger.consent, "recovery_of", fail)
    refused = service.client.get(f"/api/v1/customers/{q(customer.did)}/recovery", headers=customer.headers)
    assert (refused.status_code, refused.json()["code"]) == (503, "chain_unavailable")
    assert "10.0.0.7" not in refused.text
    assert "internal detail" not in refused.text
    assert refused.json()["detail"] == "Try again in a few minutes."


def test_another_customer_cannot_see_or_veto_a_recovery(service: Service) -> None:
    customer, other = service.new_customer(), service.new_customer()
    start(service, customer.did, issue(service, customer), Account.create())
    path = f"/api/v1/customers/{q(customer.did)}/recovery"
    assert service.client.get(path, headers=other.headers).json()["code"] == "not_your_data"
    assert service.client.post(path + "/cancel/prepare", headers=other.headers).json()["code"] == "not_your_data"
    history = f"/api/v1/customers/{q(customer.did)}/keys"
    assert service.client.get(history, headers=other.headers).json()["code"] == "not_your_data"
    assert service.client.get(history, headers=service.operator()).json()["code"] == "insufficient_scope"
    assert next(e["event"] for e in service.client.get(history, headers=customer.headers).json()) == "bound"


def test_a_completed_recovery_hands_the_customer_to_the_new_key(service: Service) -> None:
    """Last in this module: it moves the chain's clock past the delay."""
    customer = service.new_customer()
    granted = service.change(customer, action="grant", attributes=["user.contact.email"])
    assert granted.status_code == 202, granted.text
    service.wait_status(customer, granted.json()["id"], "active")
    code = issue(service, customer)
    new_key = Account.create()
    assert start(service, customer.did, code, new_key).status_code == 200
    service.runtime.ledger.backend.increase_time(RECOVERY_DELAY)
    done = complete(service, customer.did, code)
    assert done.status_code == 200, done.text
    assert (done.json()["controller"], done.json()["status"]) == (new_key.address, "completed")
    subject = service.runtime.dids.subject(customer.did)
    assert service.runtime.ledger.consent.controller_of(subject) == new_key.address
    # The old key's sessions ended (a process that cached one forgets it within `api.deps.CACHE_SECONDS`)
    # and it signs in no more; the new key does, and keeps the consents.
    with service.runtime.reads() as session:
        assert session.scalars(select(CustomerSession.address).where(CustomerSession.subject == subject)).all() == []
    assert service.sign_in(customer.account).status_code == 401
    signed_in = service.sign_in(new_key)
    assert signed_in.status_code == 200, signed_in.text
    recovered = Customer(account=new_key, did=customer.did, token=signed_in.json()["access_token"])
    consents = service.client.get(f"/api/v1/customers/{q(customer.did)}/consents", headers=recovered.headers)
    assert [c["attributes"] for c in consents.json()] == [["user.contact.email"]]
    assert service.change(recovered, action="revoke", attributes=["user.contact.email"]).status_code == 202
    history = keys(service, recovered)
    assert [(e["event"], e["key"]) for e in history] == [
        ("bound", customer.account.address),
        ("recovery_started", new_key.address),
        ("bound", new_key.address),
    ]
    assert (
        service.client.get(f"/api/v1/dids/{q(customer.did)}")
        .json()["didDocument"]["verificationMethod"][0]["blockchainAccountId"]
        .endswith(new_key.address)
    )

    # A repeat (the first answer was lost): the same "completed" answer, not `no_recovery` (on which the
    # portal used to drop the new key), and the follow-ups again: an old key's session left over ends.
    with service.runtime.sessions() as session:
        session.add(
            CustomerSession(
                token_hash="0" * 64,
                subject=subject,
                address=customer.account.address,
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )
    again = complete(service, customer.did, code)
    assert again.status_code == 200, again.text
    assert {k: again.json()[k] for k in ("controller", "new_controller", "status", "effective_at")} == {
        "controller": new_key.address,
        "new_controller": new_key.address,
        "status": "completed",
        "effective_at": done.json()["effective_at"],
    }
    restarted = start(service, customer.did, code, new_key)  # a start repeated after completion
    assert (restarted.status_code, restarted.json()["status"]) == (200, "completed")
    with service.runtime.reads() as session:
        left = session.scalars(select(CustomerSession.address).where(CustomerSession.subject == subject)).all()
    assert customer.account.address not in left
