"""The consent path through HTTP on a real node: enrol, bind, sign in, grant, revoke, status, receipts."""

from __future__ import annotations

import copy
import gzip
import re
import threading
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
import segno
from eth_account import Account
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy import text as sql
from starlette.requests import Request

from api import auth
from api.auth import digest, now, prune_expired
from api.errors import request_path
from api.models import ClaimCode, CustomerSession, SignInChallenge
from identity.errors import SubjectErased
from ledger.backends import AnvilBackend
from ledger.consent import BoundController, ControllerState
from ledger.eip712 import purpose_id
from ledger.store import _write_lock, create_schema, make_engine, sessions
from tests.api.conftest import Customer, Service, q, running_service, siwe_signed

PROBLEM = "application/problem+json"


def _problem(response: object, status: int, code: str) -> dict[str, object]:
    import httpx

    assert isinstance(response, httpx.Response)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = dict(response.json())
    assert body["code"] == code
    assert body["status"] == status
    assert body["type"] == f"/api/v1/problems/{code}"
    return body


def test_grant_then_revoke_end_to_end(service: Service) -> None:
    customer = service.new_customer()
    accepted = service.change(customer, action="grant", attributes=["user.contact.email", "user.name"])
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "pending"
    done = service.wait_status(customer, accepted.json()["id"], "active")
    assert done["tx_hash"].startswith("0x")
    assert done["block_number"] > 0
    assert done["attributes"] == ["user.contact.email", "user.name"]
    receipt = done["receipt"]
    assert receipt["version"] == "KI-CR-v1.1.0"
    assert receipt["piiPrincipalId"] == customer.did
    assert receipt["services"][0]["purposes"][0]["piiCategory"] == ["user.contact.email", "user.name"]
    assert receipt["evidence"]["txHash"] == done["tx_hash"]
    assert receipt["evidence"]["signer"] == customer.account.address

    listing = service.client.get(f"/api/v1/customers/{q(customer.did)}/consents", headers=customer.headers).json()
    assert [(c["partner_name"], c["purpose"], c["status"], c["attributes"]) for c in listing] == [
        ("acme", "marketing.communications.email", "active", ["user.contact.email", "user.name"])
    ]

    revoked = service.change(customer, action="revoke", attributes=["user.name"])
    assert revoked.status_code == 202
    # Deny wins at once, before the chain has it.
    (now,) = service.client.get(f"/api/v1/customers/{q(customer.did)}/consents", headers=customer.headers).json()
    assert now["attributes"] == ["user.contact.email"]
    assert now["pending_revoke"] == ["user.name"]
    service.wait_status(customer, revoked.json()["id"], "revoked")
    registry = service.runtime.ledger.consent
    assert registry is not None
    from ledger.eip712 import purpose_id

    subject = service.runtime.dids.subject(customer.did)
    assert registry.is_permitted(subject, service.partner_address, purpose_id("marketing.communications.email"), 1)  # type: ignore[arg-type]
    assert not registry.is_permitted(subject, service.partner_address, purpose_id("marketing.communications.email"), 4)  # type: ignore[arg-type]
    # The operator sees the same consents.
    as_operator = service.client.get(f"/api/v1/customers/{q(customer.did)}/consents", headers=service.operator())
    assert as_operator.status_code == 200
    assert as_operator.json()[0]["attributes"] == ["user.contact.email"]


def test_changes_sent_between_two_blocks_share_one_transaction(tmp_path: Path) -> None:
    """The service mines its own blocks, so the relayer sends one batch just before each block
    (BlockCadence) instead of one every few milliseconds of requests: changes accepted 15 ms apart
    (three times the relayer's linger) over several blocks make one transaction per block.

    Blocks every 0.4 s here, not the module service's 0.05 s: a loaded machine takes longer than
    0.05 s for each change's two requests, and then every change would have a block of its own."""
    with running_service(tmp_path, chain={"block_time": 0.4}) as service:
        customers = [service.new_customer() for _ in range(3)]
        accepted: list[tuple[Customer, str]] = []
        for round_ in range(4):
            for customer in customers:
                response = service.change(
                    customer, action="grant" if round_ % 2 == 0 else "revoke", attributes=["user.name"]
                )
                assert response.status_code == 202, response.text
                accepted.append((customer, response.json()["id"]))
                time.sleep(0.015)
        done = [
            service.wait_status(customer, request_id, "active" if i // 3 % 2 == 0 else "revoked")
            for i, (customer, request_id) in enumerate(accepted)
        ]
    blocks: dict[int, set[str]] = {}
    for change in done:
        blocks.setdefault(change["block_number"], set()).add(change["tx_hash"])
    assert all(len(transactions) == 1 for transactions in blocks.values()), blocks
    assert len(blocks) < len(done)  # and so fewer transactions than changes


def test_the_did_lists_the_bound_key(service: Service) -> None:
    customer = service.customers[0] if service.customers else service.new_customer()
    result = service.client.get(f"/api/v1/dids/{quote(customer.did, safe='')}").json()
    (method,) = result["didDocument"]["verificationMethod"]
    assert method["blockchainAccountId"].endswith(customer.account.address)


def test_customers_cannot_touch_each_others_data(service: Service) -> None:
    alice, bob = service.new_customer(), service.new_customer()
    accepted = service.change(alice, action="grant", attributes=["user.contact.email"])
    request_id = accepted.json()["id"]
    _problem(
        service.client.get(f"/api/v1/customers/{q(alice.did)}/consents", headers=bob.headers), 403, "not_your_data"
    )
    _problem(service.client.get(f"/api/v1/consents/{request_id}", headers=bob.headers), 404, "unknown_consent_request")
    # Bob submits a change signed by Alice for Alice's subject: refused, even with a valid signature.
    prepared = service.prepare(alice, action="grant", attributes=["user.location"]).json()["typed_data"]
    signature = service.sign_typed(alice.account, prepared)
    _problem(
        service.client.post(
            "/api/v1/consents", json={"typed_data": prepared, "signature": signature}, headers=bob.headers
        ),
        403,
        "not_your_data",
    )


def test_services_need_the_right_role(service: Service) -> None:
    partner = {"X-API-Key": service.partner_key}
    _problem(
        service.client.post("/api/v1/customers", json={"email": "x@example.com"}, headers=partner),
        403,
        "insufficient_scope",
    )
    _problem(service.client.post("/api/v1/customers", json={"email": "x@example.com"}), 401, "unauthenticated")
    _problem(
        service.client.post("/api/v1/customers", json={"email": "x@example.com"}, headers={"X-API-Key": "clk_nope"}),
        401,
        "invalid_api_key",
    )
    _problem(service.client.get("/api/v1/partners", headers={"Authorization": "Bearer nope"}), 401, "invalid_token")
    # A partner may not read a customer's consents; a service may not prepare a customer's change.
    customer = service.customers[0] if service.customers else service.new_customer()
    _problem(
        service.client.get(f"/api/v1/customers/{q(customer.did)}/consents", headers=partner), 403, "insufficient_scope"
    )
    _problem(
        service.client.post(
            "/api/v1/consents/prepare",
            headers=service.operator(),
            json={"action": "grant", "partner": "acme", "purpose": "analytics.reporting", "attributes": ["user.name"]},
        ),
        403,
        "insufficient_scope",
    )
    _problem(
        service.client.post("/api/v1/partners", headers=partner, json={"name": "x", "address": "0x" + "1" * 40}),
        403,
        "insufficient_scope",
    )


def test_forged_tampered_and_replayed_changes_are_refused(service: Service) -> None:
    customer = service.new_customer()
    typed = service.prepare(customer, action="grant", attributes=["user.contact.email"]).json()["typed_data"]
    forged = service.sign_typed(Account.create(), typed)
    _problem(
        service.client.post(
            "/api/v1/consents", json={"typed_data": typed, "signature": forged}, headers=customer.headers
        ),
        422,
        "invalid_signature",
    )
    signature = service.sign_typed(customer.account, typed)
    tampered = copy.deepcopy(typed)
    tampered["message"]["attributes"] = 255
    _problem(
        service.client.post(
            "/api/v1/consents", json={"typed_data": tampered, "signature": signature}, headers=customer.headers
        ),
        422,
        "invalid_signature",
    )
    other_chain = copy.deepcopy(typed)
    other_chain["domain"]["chainId"] = 1
    _problem(
        service.client.post(
            "/api/v1/consents", json={"typed_data": other_chain, "signature": signature}, headers=customer.headers
        ),
        422,
        "invalid_typed_data",
    )
    first = service.client.post(
        "/api/v1/consents", json={"typed_data": typed, "signature": signature}, headers=customer.headers
    )
    assert first.status_code == 202
    _problem(
        service.client.post(
            "/api/v1/consents", json={"typed_data": typed, "signature": signature}, headers=customer.headers
        ),
        409,
        "nonce_mismatch",
    )


def test_bad_input_gets_a_clear_problem(service: Service) -> None:
    body = _problem(
        service.client.post("/api/v1/customers", json={"email": "not-an-address"}, headers=service.operator()),
        422,
        "invalid_pii",
    )
    assert body["field"] == "email"
    assert "not-an-address" not in str(body)
    body = _problem(
        service.client.post("/api/v1/customers", json={"email": 5}, headers=service.operator()), 422, "validation_error"
    )
    assert body["errors"]
    customer = service.customers[0] if service.customers else service.new_customer()
    _problem(
        service.prepare(customer, action="grant", purpose="nope", attributes=["user.name"]), 422, "unknown_purpose"
    )
    _problem(service.prepare(customer, action="grant", attributes=["user.ssn"]), 422, "unknown_attribute")
    _problem(
        service.prepare(customer, action="grant", partner="nobody", attributes=["user.name"]), 422, "unknown_partner"
    )


def test_claim_codes_work_once_and_only_for_their_customer(service: Service) -> None:
    did, claim = service.enrol("claims@example.com")
    other_did, _ = service.enrol("claims2@example.com")
    key = Account.create()
    _problem(
        service.client.post(
            f"/api/v1/customers/{q(other_did)}/controller/prepare", json={"claim_code": claim, "address": key.address}
        ),
        403,
        "invalid_claim_code",
    )
    assert service.bind(did, claim, key).status_code == 200
    _problem(
        service.client.post(
            f"/api/v1/customers/{q(did)}/controller/prepare", json={"claim_code": claim, "address": key.address}
        ),
        403,
        "invalid_claim_code",
    )
    _problem(
        service.client.post("/api/v1/customers", json={"email": "claims@example.com"}, headers=service.operator()),
        409,
        "already_enrolled",
    )


def test_erasure_destroys_the_pii_deactivates_the_did_and_leaves_the_customer_their_key(service: Service) -> None:
    customer = service.new_customer()
    granted = service.change(customer, action="grant", attributes=["user.contact.email"])
    service.wait_status(customer, granted.json()["id"], "active")
    email = f"user{len(service.customers) - 1}.{customer.account.address[2:10].lower()}@example.com"  # new_customer's
    unbound_did, claim = service.enrol("erase-before-binding@example.com")
    assert service.runtime.dids is not None
    assert service.runtime.vault is not None
    subject = service.runtime.dids.subject(customer.did)
    assert service.runtime.vault.pii(subject).email == email

    erased = service.client.delete(f"/api/v1/customers/{q(customer.did)}", headers=service.operator())
    assert erased.status_code == 200, erased.text
    assert erased.json()["did"] == customer.did
    again = service.client.delete(f"/api/v1/customers/{q(customer.did)}", headers=service.operator())
    assert again.json() == erased.json()  # the same answer: nothing more to do

    with pytest.raises(SubjectErased):
        service.runtime.vault.pii(subject)
    assert service.client.get(f"/api/v1/dids/{q(customer.did)}").status_code == 410  # deactivated
    _problem(
        service.client.post("/api/v1/customers", json={"email": email}, headers=service.operator()),
        409,
        "customer_erased",
    )
    # Their pseudonymous records stay, and their key still controls them: they can still withdraw.
    assert service.sign_in(customer.account).status_code == 200
    revoked = service.change(customer, action="revoke", attributes=["user.contact.email"])
    assert revoked.status_code == 202, revoked.text

    # Erased before binding a key: the claim code no longer binds one.
    assert service.client.delete(f"/api/v1/customers/{q(unbound_did)}", headers=service.operator()).status_code == 200
    prepare = {"claim_code": claim, "address": Account.create().address}
    _problem(
        service.client.post(f"/api/v1/customers/{q(unbound_did)}/controller/prepare", json=prepare),
        403,
        "invalid_claim_code",
    )
    unknown = customer.did.rsplit(":", 1)[0] + ":" + "ab" * 32
    _problem(
        service.client.delete(f"/api/v1/customers/{q(unknown)}", headers=service.operator()), 404, "unknown_customer"
    )


def test_a_repeated_binding_gets_the_first_answer_and_a_half_done_one_is_finished(service: Service) -> None:
    did, claim = service.enrol("repeat@example.com")
    key = Account.create()
    typed = service.client.post(
        f"/api/v1/customers/{q(did)}/controller/prepare", json={"claim_code": claim, "address": key.address}
    ).json()["typed_data"]
    submitted = {"claim_code": claim, "typed_data": typed, "signature": service.sign_typed(key, typed)}
    first = service.client.post(f"/api/v1/customers/{q(did)}/controller", json=submitted)
    assert first.status_code == 200, first.text
    # The client lost the answer and sends the request again: the same answer, nothing bound twice.
    again = service.client.post(f"/api/v1/customers/{q(did)}/controller", json=submitted)
    assert (again.status_code, again.json()) == (200, first.json())
    # Another key, signing for itself with the spent code, gets nothing.
    thief = Account.create()
    stolen = copy.deepcopy(typed)
    stolen["message"]["controller"] = thief.address
    _problem(
        service.client.post(
            f"/api/v1/customers/{q(did)}/controller",
            json={"claim_code": claim, "typed_data": stolen, "signature": service.sign_typed(thief, stolen)},
        ),
        403,
        "invalid_claim_code",
    )
    # The service stopped after the binding was mined and before it was recorded or answered: the
    # customer's retry finishes it (recorded for restores, in the vault) from the chain, sending nothing.
    did, claim = service.enrol("half-done@example.com")
    key = Account.create()
    typed = service.client.post(
        f"/api/v1/customers/{q(did)}/controller/prepare", json={"claim_code": claim, "address": key.address}
    ).json()["typed_data"]
    runtime = service.runtime
    subject = runtime.dids.subject(did)
    with runtime.sessions() as session:
        session.execute(update(ClaimCode).where(ClaimCode.code_hash == digest(claim)).values(used_at=now()))
    mined = runtime.ledger.consent.bind_controller(subject, key.address)
    finished = service.client.post(
        f"/api/v1/customers/{q(did)}/controller",
        json={"claim_code": claim, "typed_data": typed, "signature": service.sign_typed(key, typed)},
    )
    assert finished.status_code == 200, finished.text
    assert finished.json() == {
        "did": did, "controller": key.address, "tx_hash": mined.tx_hash, "block_number": mined.block_number
    }  # fmt: skip
    with runtime.reads() as session:
        recorded = session.get(BoundController, bytes(subject))
    assert recorded is not None
    assert (recorded.controller, recorded.tx_hash) == (key.address, mined.tx_hash)
    record = runtime.vault.record(subject)
    assert record is not None
    assert record.controller == key.address
    assert service.sign_in(key).status_code == 200
    _problem(
        service.client.post("/api/v1/customers", json={"email": "half-done@example.com"}, headers=service.operator()),
        409,
        "already_enrolled",
    )


def test_sign_in_needs_a_bound_key_and_a_fresh_message(service: Service) -> None:
    stranger = Account.create()
    _problem(service.sign_in(stranger), 401, "sign_in_failed")
    customer = service.customers[0] if service.customers else service.new_customer()
    challenge = service.client.post("/api/v1/auth/siwe/challenge", json={"address": customer.account.address})
    message = challenge.json()["message"]
    assert "wants you to sign in with your Ethereum account:" in message
    signed = siwe_signed(customer.account, message)
    assert service.client.post("/api/v1/auth/siwe", json=signed).status_code == 200
    used = _problem(service.client.post("/api/v1/auth/siwe", json=signed), 401, "sign_in_failed")
    assert used["detail"] == "the message was used already; ask for a new one"


def _signin_rows(service: Service) -> int:
    with service.runtime.reads() as session:
        return session.scalar(select(func.count()).select_from(SignInChallenge)) or 0


def test_asking_for_sign_in_challenges_stores_nothing(service: Service) -> None:
    """The challenge route needs no credentials: asking for challenges must not grow the database. Nor
    does a sign-in refused for an unbound key; only a customer's sign-in records its message."""
    before = _signin_rows(service)
    for _ in range(25):
        asked = service.client.post("/api/v1/auth/siwe/challenge", json={"address": Account.create().address})
        assert asked.status_code == 201, asked.text
    _problem(service.sign_in(Account.create()), 401, "sign_in_failed")
    assert _signin_rows(service) == before
    customer = service.customers[0] if service.customers else service.new_customer()
    assert service.sign_in(customer.account).status_code == 200
    assert _signin_rows(service) == before + 1


def test_a_sign_in_message_altered_or_invented_is_refused(service: Service) -> None:
    """The service keeps no copy of what it issued: the nonce carries a MAC of the whole message."""
    customer = service.customers[0] if service.customers else service.new_customer()
    other = service.new_customer()
    issued = service.client.post("/api/v1/auth/siwe/challenge", json={"address": customer.account.address})
    message = issued.json()["message"]
    nonce = re.search(r"^Nonce: (\w+)$", message, re.MULTILINE)
    assert nonce is not None
    assert len(nonce.group(1)) == 32
    later = (now() + timedelta(days=1)).isoformat(timespec="seconds").replace("+00:00", "Z")
    altered = [
        re.sub(r"^Expiration Time: .*$", f"Expiration Time: {later}", message, flags=re.MULTILINE),
        message.replace(customer.account.address, other.account.address),  # signed by the other's key below
        message.replace(nonce.group(1), nonce.group(1)[:16] + "0" * 16),
        message.replace(nonce.group(1), nonce.group(1)[:16]),
        message.replace("Sign in to the consent ledger", "Sign in to another ledger"),
    ]
    for n, text in enumerate(altered):
        assert text != message
        signer = other.account if n == 1 else customer.account
        refused = _problem(
            service.client.post("/api/v1/auth/siwe", json=siwe_signed(signer, text)), 401, "sign_in_failed"
        )
        assert refused["detail"] == "the message is not one this service issued"
    signed_in = service.client.post("/api/v1/auth/siwe", json=siwe_signed(customer.account, message))
    assert signed_in.status_code == 200, signed_in.text  # the message as issued still works


def test_an_expired_sign_in_message_is_refused(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    customer = service.customers[0] if service.customers else service.new_customer()
    issued_at = now() - auth.CHALLENGE_LIFETIME - timedelta(seconds=1)
    with monkeypatch.context() as patched:
        patched.setattr(auth, "now", lambda: issued_at)
        issued = service.client.post("/api/v1/auth/siwe/challenge", json={"address": customer.account.address})
    refused = _problem(
        service.client.post("/api/v1/auth/siwe", json=siwe_signed(customer.account, issued.json()["message"])),
        401,
        "sign_in_failed",
    )
    assert refused["detail"] == "the message has expired; ask for a new one"


def test_a_binding_the_indexer_has_not_read_in_time_is_still_pending_and_answered_when_asked_again(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the indexer can be late: the binding is mined, the request's wait for the read model ends.
    That is 503 `still_pending` in plain words (not a 500), and the same request asked again gets the answer
    of the binding mined the first time, sending nothing."""
    runtime = service.runtime
    assert runtime.writers is not None
    indexer = runtime.writers.indexer
    gate = threading.Event()
    step = indexer.step

    def stalled() -> int:
        gate.wait(30)
        return step()

    did, claim = service.enrol("late-indexer@example.com")
    key = Account.create()
    typed = service.client.post(
        f"/api/v1/customers/{q(did)}/controller/prepare", json={"claim_code": claim, "address": key.address}
    ).json()["typed_data"]
    submitted = {"claim_code": claim, "typed_data": typed, "signature": service.sign_typed(key, typed)}
    monkeypatch.setattr(runtime, "index_wait", 0.5)
    monkeypatch.setattr(indexer, "step", stalled)
    try:
        late = _problem(
            service.client.post(f"/api/v1/customers/{q(did)}/controller", json=submitted), 503, "still_pending"
        )
        assert late["detail"] == "send the same request again for the answer"
        subject = runtime.dids.subject(did)
        assert runtime.ledger.consent.controller_of(subject) == key.address  # bound on-chain all the same
    finally:
        gate.set()
    monkeypatch.setattr(runtime, "index_wait", 30.0)
    answered = service.client.post(f"/api/v1/customers/{q(did)}/controller", json=submitted)
    assert answered.status_code == 200, answered.text
    assert answered.json()["controller"] == key.address
    assert service.sign_in(key).status_code == 200


def test_sign_in_works_while_the_read_model_has_rolled_back_the_customers_binding(service: Service) -> None:
    """After the node lost blocks, the read model has rolled back their binding events until the service
    has bound the keys again and the indexer has seen it (about a second). Sign-in answers from the
    service's own record of the bindings it made meanwhile; a key it never bound is still refused."""
    customer = service.new_customer()
    assert service.runtime.dids is not None
    subject = bytes(service.runtime.dids.subject(customer.did))
    with service.runtime.sessions() as session:  # as a rollback past the binding leaves the read model
        session.execute(delete(ControllerState).where(ControllerState.subject == subject))
        session.commit()
    signed_in = service.sign_in(customer.account)
    assert signed_in.status_code == 200, signed_in.text
    headers = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
    listing = service.client.get(f"/api/v1/customers/{q(customer.did)}/consents", headers=headers)
    assert listing.status_code == 200, listing.text  # the token is this customer's
    _problem(service.sign_in(Account.create()), 401, "sign_in_failed")


def test_expired_sign_in_challenges_and_sessions_are_pruned_in_batches(tmp_path: Path) -> None:
    """Every sign-in leaves a session and its used message: expired ones are deleted (a few rows per
    write transaction), live ones kept."""
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    create_schema(engine)
    past, later = now() - timedelta(seconds=1), now() + timedelta(minutes=5)
    with sessions(engine).begin() as session:
        for n, expires in enumerate([past] * 5 + [later]):
            session.add(SignInChallenge(nonce=f"c{n}", address="0x0", message="m", expires_at=expires))
            session.add(CustomerSession(token_hash=f"t{n}", subject=bytes(32), address="0x0", expires_at=expires))
    assert prune_expired(sessions(engine).begin, batch=2) == 10
    with sessions(engine)() as session:
        assert session.scalars(select(SignInChallenge.nonce)).all() == ["c5"]
        assert session.scalars(select(CustomerSession.token_hash)).all() == ["t5"]
    assert prune_expired(sessions(engine).begin) == 0
    engine.dispose()


def test_the_service_prunes_expired_sign_ins_and_keeps_live_ones(tmp_path: Path) -> None:
    with running_service(tmp_path, prune_interval=0.2) as service:
        customer = service.new_customer()
        live = service.client.post("/api/v1/auth/siwe/challenge", json={"address": customer.account.address})
        assert live.status_code == 201, live.text
        past = now() - timedelta(seconds=1)
        with service.runtime.sessions() as session:
            session.add(SignInChallenge(nonce="expired", address="0x0", message="m", expires_at=past))
            session.add(CustomerSession(token_hash="expired", subject=bytes(32), address="0x0", expires_at=past))

        def expired() -> int:
            with service.runtime.reads() as session:
                return sum(
                    session.scalar(select(func.count()).select_from(table).where(table.expires_at < now())) or 0
                    for table in (SignInChallenge, CustomerSession)
                )

        deadline = time.monotonic() + 10
        while expired():
            assert time.monotonic() < deadline, "expired sign-ins were not pruned"
            time.sleep(0.1)
        assert _signin_rows(service) >= 1  # the customer's sign-in message: used, kept until it expires
        listing = service.client.get(f"/api/v1/customers/{q(customer.did)}/consents", headers=customer.headers)
        assert listing.status_code == 200, listing.text  # the customer's session is live, and kept


def test_reference_data_uses_the_fideslang_taxonomy(service: Service) -> None:
    headers = {"X-API-Key": service.auditor_key}
    purposes = {p["key"] for p in service.client.get("/api/v1/purposes", headers=headers).json()}
    assert {"marketing.communications.email", "analytics.reporting", "essential.service"} <= purposes
    attributes = service.client.get("/api/v1/attributes", headers=headers).json()
    assert attributes[0] == {"bit": 0, "key": "user.contact.email", "name": "E-mail address"}
    created = service.client.post(
        "/api/v1/attributes", json={"key": "user.financial", "name": "Financial"}, headers=service.operator()
    )
    assert created.status_code == 201
    assert created.json()["bit"] == len(attributes)


def test_each_purpose_says_its_legal_basis(service: Service) -> None:
    """Issue 32: "Essential service" was offered for consent. Each purpose carries its GDPR art. 6(1) basis
    in plain words; only a consent purpose is the customer's to grant."""
    headers = {"X-API-Key": service.auditor_key}
    purposes = {p["key"]: p for p in service.client.get("/api/v1/purposes", headers=headers).json()}
    essential = purposes["essential.service"]
    assert (essential["legal_basis"], essential["legal_basis_article"]) == ("contract", "GDPR art. 6(1)(b), contract")
    assert essential["legal_basis_description"] == "Needed to provide the service you signed up for."
    assert purposes["analytics.reporting"]["legal_basis"] == "consent"
    assert {p["legal_basis"] for k, p in purposes.items() if k != "essential.service"} == {"consent"}
    created = service.client.post(
        "/api/v1/purposes",
        json={"key": "legal.tax_records", "name": "Tax records", "legal_basis": "legal_obligation"},
        headers=service.operator(),
    )
    assert created.status_code == 201, created.text
    assert created.json()["legal_basis_article"] == "GDPR art. 6(1)(c), legal obligation"
    listed = {p["key"]: p for p in service.client.get("/api/v1/purposes", headers=headers).json()}
    assert listed["legal.tax_records"] == created.json()
    refused = service.client.post(
        "/api/v1/purposes", json={"key": "x.y", "name": "X", "legal_basis": "whim"}, headers=service.operator()
    )
    assert refused.status_code == 422


def test_purposes_of_a_database_made_before_legal_bases_get_theirs(tmp_path: Path) -> None:
    """An older database has no `legal_basis` column: it is added, and the seeded essential service is
    the contract's, every other purpose consent."""
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as connection:
        connection.execute(
            sql("CREATE TABLE purposes (key VARCHAR(100) PRIMARY KEY, name VARCHAR(200), description VARCHAR(500))")
        )
        connection.execute(
            sql("INSERT INTO purposes VALUES ('essential.service', 'E', ''), ('analytics.reporting', 'A', '')")
        )
    create_schema(engine)
    with engine.begin() as connection:
        found = connection.execute(sql("SELECT key, legal_basis FROM purposes")).all()
        rows: dict[str, str | None] = {str(key): basis for key, basis in found}
    assert rows == {"essential.service": "contract", "analytics.reporting": "consent"}


def test_no_pii_reaches_the_chain_or_the_service_database(service: Service) -> None:
    """E-mail, phone and name go only to the encrypted vault: not calldata, logs, storage or service.db."""
    response = service.client.post(
        "/api/v1/customers",
        json={"email": "Priya.Sharma@Example.org", "phone": "+44 20 7946 0123", "name": "Priya Sharma"},
        headers=service.operator(),
    )
    assert response.status_code == 201, response.text
    did, claim = response.json()["did"], response.json()["claim_code"]
    account = Account.create()
    assert service.bind(did, claim, account).status_code == 200
    from tests.api.conftest import Customer

    customer = Customer(account=account, did=did, token=service.sign_in(account).json()["access_token"])
    accepted = service.change(customer, action="grant", attributes=["user.contact.email", "user.contact.phone_number"])
    service.wait_status(customer, accepted.json()["id"], "active")

    needles = [
        variant.encode(enc)
        for value in ("priya.sharma@example.org", "+442079460123", "442079460123", "priya sharma", "priya", "sharma")
        for variant in (value, value.upper(), value.title())
        for enc in ("utf-8", "utf-16-le")
    ]
    w3 = service.runtime.ledger.backend.w3
    registry = service.runtime.ledger.consent
    assert registry is not None
    haystack = bytearray()
    for number in range(service.runtime.ledger.deployment.deploy_block, w3.eth.block_number + 1):
        block = w3.eth.get_block(number, full_transactions=True)
        for tx in block["transactions"]:
            assert not isinstance(tx, bytes)  # full transactions, not hashes
            haystack += bytes(tx["input"])
    for log in w3.eth.get_logs({"address": registry.address, "fromBlock": 0, "toBlock": "latest"}):
        haystack += bytes(log["data"]) + b"".join(bytes(t) for t in log["topics"])
    subject = bytes.fromhex(did.rsplit(":", 1)[1])
    assert subject in haystack  # the pseudonym is there: the scan covers what was written
    # All storage of all accounts, as the node dumps it (hex inside gzip'd JSON).
    state = gzip.decompress(bytes.fromhex(service.runtime.ledger.backend.rpc("anvil_dumpState")[2:])).lower()
    assert b"storage" in state
    database = (service.runtime.service.data_dir / "service.db").read_bytes()
    wal = service.runtime.service.data_dir / "service.db-wal"
    database += wal.read_bytes() if wal.exists() else b""
    for needle in needles:
        assert needle not in haystack, f"PII on-chain: {needle!r}"
        assert needle.hex().encode() not in state, f"PII in contract storage: {needle!r}"
        assert needle.lower() not in database.lower(), f"PII in service.db: {needle!r}"


@pytest.mark.parametrize("path", ["/api/v1/points/redemptions", "/a?b#c\\d", "/caf\u00e9/%20x"])
def test_a_problem_names_the_path_as_the_url_does(path: str) -> None:
    """`request_path` (the problem's `instance`, without building the whole URL) is `request.url.path`."""
    scope = {
        "type": "http",
        "path": path,
        "headers": [(b"host", b"ledger.example:8443")],
        "query_string": b"q=1#x",
        "scheme": "https",
        "server": ("127.0.0.1", 8000),
    }
    request = Request(scope)
    assert request_path(request) == request.url.path


def test_the_read_model_is_not_synced_to_disk_but_acknowledged_requests_are(service: Service) -> None:
    """The indexer's writes are derived from the chain (rebuilt from its cursor after a loss), so its
    commits do not wait for an fsync under the write lock; the outbox's do. Both queue on one lock."""
    runtime = service.runtime

    def synchronous(engine: Engine) -> int:
        with engine.connect() as connection:
            return int(connection.exec_driver_sql("PRAGMA synchronous").scalar_one())

    assert runtime.writers is not None
    derived = runtime.writers.derived_engine
    assert derived is not None
    assert runtime.writers.indexer._sessions.kw["bind"] is derived
    assert synchronous(derived) == 1  # NORMAL
    assert synchronous(runtime.engine) == 2  # FULL: the outbox, idempotency records, everything acknowledged
    assert _write_lock(derived) is _write_lock(runtime.engine)
    # No commit copies the log back into the database (the writer holding the lock paid for it): the
    # supervisor's checkpointer does.
    for engine in (runtime.engine, derived):
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == 0
    assert "checkpointer" in [thread.name for thread in runtime._threads if thread.is_alive()]


def test_an_accepted_revocation_survives_an_outage_longer_than_a_grants_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 202 says the change will be applied. The chain checks each signature's deadline when the change
    reaches it, so a chain away for longer than the deadline would make an accepted change fail: for a
    revocation, the customer's withdrawal undone. A prepared revocation's deadline is therefore long
    (`revocation_deadline_days`); a grant's stays short (a grant signed and left unused must not work
    later). Here the chain's clock jumps two hours between signing and relaying."""
    with running_service(tmp_path) as service:
        revoking, granting = service.new_customer(), service.new_customer()
        first = service.change(revoking, action="grant", attributes=["user.contact.email", "user.name"])
        service.wait_status(revoking, first.json()["id"], "active")

        signed = []
        for customer, action in ((revoking, "revoke"), (granting, "grant")):
            prepared = service.prepare(customer, action=action, attributes=["user.name"])
            assert prepared.status_code == 200, prepared.text
            typed = prepared.json()["typed_data"]
            signed.append((customer, typed, service.sign_typed(customer.account, typed)))
        (_, revocation, _), (_, grant, _) = signed
        days = service.runtime.service.revocation_deadline_days
        assert revocation["message"]["deadline"] >= time.time() + days * 86400 - 60
        assert grant["message"]["deadline"] <= time.time() + 15 * 60

        backend = service.runtime.ledger.backend
        assert isinstance(backend, AnvilBackend)
        head = backend.w3.eth.get_block("latest")["timestamp"]
        backend.rpc("evm_increaseTime", 2 * 3600)  # the chain comes back two hours later
        while backend.w3.eth.get_block("latest")["timestamp"] < head + 2 * 3600:
            time.sleep(0.05)

        ids = []
        for customer, typed, signature in signed:
            accepted = service.client.post(
                "/api/v1/consents", json={"typed_data": typed, "signature": signature}, headers=customer.headers
            )
            assert accepted.status_code == 202, accepted.text
            ids.append(accepted.json()["id"])
        service.wait_status(revoking, ids[0], "revoked")
        failed = service.wait_status(granting, ids[1], "failed")
        assert failed["error"]["code"] == "signature_expired"  # the grant's deadline had passed on-chain

        registry = service.runtime.ledger.consent
        assert registry is not None
        subject = service.runtime.dids.subject(revoking.did)
        purpose = purpose_id("marketing.communications.email")
        assert registry.is_permitted(subject, service.partner_address, purpose, 1)  # type: ignore[arg-type]
        assert not registry.is_permitted(subject, service.partner_address, purpose, 4)  # type: ignore[arg-type]

        # Away for longer than that, an accepted revocation fails: the operator is told, loudly.
        prepared = service.prepare(revoking, action="revoke", attributes=["user.contact.email"])
        typed = prepared.json()["typed_data"]
        backend.rpc("evm_increaseTime", (days + 1) * 86400)
        head = backend.w3.eth.get_block("latest")["timestamp"]
        while backend.w3.eth.get_block("latest")["timestamp"] <= head:
            time.sleep(0.05)
        with caplog.at_level("ERROR", logger="ledger.consent.lane"):
            accepted = service.client.post(
                "/api/v1/consents",
                json={"typed_data": typed, "signature": service.sign_typed(revoking.account, typed)},
                headers=revoking.headers,
            )
            assert accepted.status_code == 202, accepted.text
            service.wait_status(revoking, accepted.json()["id"], "failed")
        assert f"accepted revocation {accepted.json()['id']} failed on-chain" in caplog.text
        assert registry.is_permitted(subject, service.partner_address, purpose, 1)  # type: ignore[arg-type]


def test_the_enrolment_answers_a_qr_code_of_the_claim_link(service: Service) -> None:
    """The operator gives the customer a link or its QR code (printed, or on a screen): either opens the
    portal with the DID and the claim code filled in."""
    body = {"email": "qr.person@example.com"}
    created = service.client.post("/api/v1/customers", json=body, headers=service.operator())
    assert created.status_code == 201, created.text
    answer = created.json()
    assert answer["claim_qr"].startswith("data:image/svg+xml")
    # The QR code holds the link itself (the same symbol segno makes of it), not the code or the DID alone.
    assert answer["claim_qr"] == segno.make(answer["claim_url"], error="m").svg_data_uri(scale=4, border=2)
