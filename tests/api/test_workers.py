"""API worker processes beside the supervisor (`api.workers`): a worker runtime serves the API over the
supervisor's node and database and reaches it over the control connection. Both run in this process
here, each with its own uvicorn, so that requests can be sent to the worker alone."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from api.auth import create_principal
from api.models import Partner
from api.routers import points as points_routes
from api.workers import ControlClient, ControlError, ControlServer, WorkerPool
from ledger.backends import AnvilBackend
from ledger.consent import PARTNER_ROLE
from ledger.errors import ChainError, ConsentRejected, RecoveryRejected
from ledger.tx import TxRequest
from tests.api.conftest import Service, start_service

pytestmark = pytest.mark.anvil


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    """(supervisor, worker), both with the operator's, a partner's and an auditor's keys."""
    data_dir = tmp_path_factory.mktemp("workers")
    control_dir = Path(tempfile.mkdtemp(prefix="control-"))
    control = {"control_address": str(control_dir / "control.sock"), "control_key": os.urandom(32)}
    runtime, server, thread, port = start_service(data_dir, role={"role": "supervisor", **control})
    assert isinstance(runtime.ledger.backend, AnvilBackend)
    worker_role = {"role": "worker", "node_url": runtime.ledger.backend.url, "backend_name": "anvil", **control}
    w_runtime, w_server, w_thread, w_port = start_service(data_dir, role=worker_role, service_port=port)
    partner = Account.create().address
    with runtime.sessions() as session:
        _, operator_key = create_principal(session, "crm-operator", "operator")
        _, partner_key = create_principal(session, "acme", "partner", partner)
        _, auditor_key = create_principal(session, "audit-firm", "auditor")
        _, issuer_key = create_principal(session, "points-issuer", "issuer")
        session.add(Partner(address=partner, name="acme", on_chain=False))
    runtime.sync_partners()
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
        httpx.Client(base_url=f"http://127.0.0.1:{w_port}", timeout=60) as w_client,
    ):
        supervisor, worker = (
            Service(
                runtime=rt,
                client=c,
                operator_key=operator_key,
                partner_key=partner_key,
                auditor_key=auditor_key,
                partner_address=partner,
            )
            for rt, c in ((runtime, client), (w_runtime, w_client))
        )
        worker.issuer_key = issuer_key  # type: ignore[attr-defined]
        yield supervisor, worker
    for srv, thr, rt in ((w_server, w_thread, w_runtime), (server, thread, runtime)):
        srv.should_exit = True
        thr.join(timeout=10)
        rt.stop()


def test_a_worker_runs_no_chain_writer_and_cannot_sign(pair: tuple[Service, Service]) -> None:
    _supervisor, worker = pair
    runtime = worker.runtime
    assert runtime.writers is None  # no relayer, points relayer, indexer or key bindings
    with pytest.raises(ChainError, match="does not send transactions"):
        runtime.ledger.consent.sender.sign([TxRequest(to=runtime.ledger.consent.address, data=b"", gas=100_000)])
    health = worker.client.get("/api/v1/health").json()
    assert health["backend"] == "anvil"  # the supervisor's node, not "rpc"


def test_a_customer_binds_and_changes_consent_through_a_worker(pair: tuple[Service, Service]) -> None:
    supervisor, worker = pair
    customer = worker.new_customer()  # the binding is sent by the supervisor, on the worker's behalf
    subject = supervisor.runtime.dids.subject(customer.did)
    assert supervisor.runtime.ledger.consent.controller_of(subject) == customer.account.address
    accepted = worker.change(customer, action="grant", attributes=["user.contact.email"])
    assert accepted.status_code == 202, accepted.text
    # The worker told the supervisor's relayer; the change is on-chain and shows as such everywhere.
    confirmed = worker.wait_status(customer, accepted.json()["id"], "active")
    assert confirmed["tx_hash"]
    seen = supervisor.client.get(f"/api/v1/consents/{accepted.json()['id']}", headers=customer.headers).json()
    assert seen["status"] == "active"
    assert seen["tx_hash"] == confirmed["tx_hash"]


def test_a_contract_refusal_of_a_workers_call_is_told_as_such(pair: tuple[Service, Service]) -> None:
    supervisor, worker = pair
    customer = worker.new_customer()
    subject = supervisor.runtime.dids.subject(customer.did)
    # A second binding of the subject: the contract refuses it in the supervisor, and the worker's call
    # raises what the route turns into 409 already_bound, as in one process.
    with pytest.raises(ConsentRejected, match="AlreadyBound"):
        worker.runtime.bind_controller(subject, Account.create().address)


def test_a_recovery_started_through_a_worker_is_sent_by_the_supervisor(pair: tuple[Service, Service]) -> None:
    supervisor, worker = pair
    customer = worker.new_customer()
    subject = supervisor.runtime.dids.subject(customer.did)
    new_key = Account.create().address
    worker.runtime.recovery("start", subject, new_key)
    pending = supervisor.runtime.ledger.consent.recovery_of(subject)
    assert pending is not None
    assert pending.new_controller == new_key
    # Not due: the contract's refusal crosses the process boundary as its own class.
    with pytest.raises(RecoveryRejected, match="RecoveryNotDue"):
        worker.runtime.recovery("complete", subject)
    assert supervisor.runtime.ledger.consent.controller_of(subject) == customer.account.address


def test_a_partner_added_through_a_worker_is_known_to_every_process(pair: tuple[Service, Service]) -> None:
    supervisor, worker = pair
    customer = worker.new_customer()
    change = {"partner": "initech", "action": "grant", "attributes": ["user.contact.email"]}
    for service in (supervisor, worker):  # both have the reference data cached now
        refused = service.prepare(customer, **change)
        assert (refused.status_code, refused.json()["code"]) == (422, "unknown_partner")
    address = Account.create().address
    created = worker.client.post(
        "/api/v1/partners", json={"name": "initech", "address": address}, headers=worker.operator()
    )
    assert created.status_code == 201, created.text
    assert supervisor.runtime.ledger.consent.has_role(PARTNER_ROLE, address)
    for service in (supervisor, worker):
        prepared = service.prepare(customer, **change)
        assert prepared.status_code == 200, prepared.text


def test_a_redemption_through_a_worker_is_answered_once_on_chain(
    pair: tuple[Service, Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The supervisor tells the worker which requests settled; without that the worker would only
    # find out by polling the database, which this test counts.
    polls: list[int] = []
    read = points_routes._read

    def counted(*args: Any) -> Any:
        polls.append(1)
        return read(*args)

    monkeypatch.setattr(points_routes, "_read", counted)
    _supervisor, worker = pair
    customer = worker.new_customer()
    issuer = {"X-API-Key": worker.issuer_key}  # type: ignore[attr-defined]
    issued = worker.client.post(
        "/api/v1/points/issuances", json={"issuances": [{"did": customer.did, "amount": 100}]}, headers=issuer
    )
    assert issued.status_code in (200, 201), issued.text
    prepared = worker.client.post(
        "/api/v1/points/redemptions/prepare", json={"partner": "acme", "amount": 30}, headers=customer.headers
    )
    assert prepared.status_code == 200, prepared.text
    typed = prepared.json()["typed_data"]
    body = {"typed_data": typed, "signature": worker.sign_typed(customer.account, typed)}
    headers = {"X-API-Key": worker.partner_key, "Idempotency-Key": str(uuid.uuid4())}
    redeemed = worker.client.post("/api/v1/points/redemptions", json=body, headers=headers)
    assert redeemed.status_code in (200, 201), redeemed.text
    answer: dict[str, Any] = redeemed.json()
    assert answer["balance"] == 70
    assert answer["tx_hash"]
    assert polls == [], "the answers came from polling, not from the supervisor's word"


def test_a_worker_hears_when_the_supervisor_is_gone(tmp_path: Path) -> None:
    lost = threading.Event()
    heard: list[tuple[Any, ...]] = []
    server = ControlServer(
        str(tmp_path / "c.sock"),
        b"k" * 32,
        on_wake=lambda: None,
        on_invalidate=lambda: None,
        calls={"echo": lambda x: x, "fail": lambda: 1 / 0},
        classify=lambda exc: ("error", str(exc), None),
    )
    client = ControlClient(str(tmp_path / "c.sock"), b"k" * 32, on_message=heard.append, on_lost=lost.set)
    assert client.call("echo", [1, "two"]) == [1, "two"]
    with pytest.raises(ControlError, match="division by zero"):
        client.call("fail")
    server.broadcast(("invalidate",))
    server.close()
    assert lost.wait(10), "the worker was not told"
    assert heard == [("invalidate",)]
    with pytest.raises(ControlError, match="gone"):
        client.call("echo", 1)


def test_a_control_connection_needs_the_runs_key(tmp_path: Path) -> None:
    server = ControlServer(
        str(tmp_path / "c.sock"),
        b"k" * 32,
        on_wake=lambda: None,
        on_invalidate=lambda: None,
        calls={},
        classify=lambda exc: ("error", str(exc), None),
    )
    try:
        with pytest.raises(AuthenticationError):
            ControlClient(str(tmp_path / "c.sock"), b"x" * 32, on_message=lambda m: None, on_lost=lambda: None)
        assert server.workers == 0
    finally:
        server.close()


def test_a_worker_runs_below_the_supervisor_from_its_start() -> None:
    """Niced by itself after its imports (a second or more), a worker already answering requests still
    ran at the supervisor's priority meanwhile (and `test_api_workers_share_the_port…` met one at 0)."""
    pool = WorkerPool([sys.executable, "-c", "import time; time.sleep(30)"], count=2, env=dict(os.environ), nice=4)
    pool.start()
    try:
        expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 4)
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pool.pids] == [expected] * 2
    finally:
        pool.stop(timeout=5)
