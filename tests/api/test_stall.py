"""A stalled chain node (SIGSTOP: it accepts connections and never answers) must not hang the service:
/health answers 503 within 2 s, routes that need the node answer 503 within the RPC timeout, and
once the node answers again so does everything, the relayer and indexer included."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from ledger.anvil import free_port
from tests.api.conftest import ApiClient, add_principal, q, serve_workers, serving

pytestmark = pytest.mark.geth

RPC_TIMEOUT = 5.0  # CONSENT_LEDGER_CHAIN_RPC_TIMEOUT's default


@pytest.fixture(scope="module")
def stalling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiClient, subprocess.Popen[str], Path]]:
    """A real `serve` with two API workers, an operator and a partner ("acme")."""
    data_dir = tmp_path_factory.mktemp("stall")
    keys = {
        "operator": add_principal(data_dir, "operator", "crm-operator"),
        "partner": add_principal(data_dir, "partner", "acme"),
    }
    port = free_port()
    with (
        serving(data_dir, port, workers=2) as process,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
    ):
        yield ApiClient(client, keys["operator"], keys["partner"], "", ""), process, data_dir


def _stop_node(data_dir: Path) -> int:
    pid = int((data_dir / "chain" / "geth.pid").read_text().split()[0])  # the default node
    os.kill(pid, signal.SIGSTOP)
    return pid


def _timed(call: object) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()  # type: ignore[operator]
    return response, time.monotonic() - started


def test_a_stalled_node_fails_health_and_chain_routes_fast_and_all_recover(
    stalling: tuple[ApiClient, subprocess.Popen[str], Path],
) -> None:
    api, process, data_dir = stalling
    workers = serve_workers(process.pid)
    customer = api.new_customer()  # bound and signed in while the node answers
    did, claim = api.enrol("stalled.binding@example.com")
    account = Account.create()
    prepared = api.client.post(
        f"/api/v1/customers/{q(did)}/controller/prepare", json={"claim_code": claim, "address": account.address}
    )
    assert prepared.status_code == 200, prepared.text
    typed = prepared.json()["typed_data"]
    binding = {"claim_code": claim, "typed_data": typed, "signature": api.sign_typed(account, typed)}
    grant = api.prepare(customer, action="grant", attributes=["user.contact.email"])
    assert grant.status_code == 200, grant.text
    change = {"typed_data": grant.json()["typed_data"]}
    change["signature"] = api.sign_typed(customer.account, change["typed_data"])

    node = _stop_node(data_dir)
    try:
        time.sleep(0.5)  # calls under way when it stopped are stuck too
        for _ in range(3):  # each worker, whichever the kernel picks
            health, took = _timed(lambda: api.client.get("/api/v1/health"))
            assert took < 2.0, f"/health took {took:.1f} s"
            assert health.status_code == 503, health.text
            assert health.headers["content-type"] == "application/problem+json"
            assert health.json()["code"] == "chain_unavailable"
            assert health.json()["detail"].startswith("the chain node did not answer within 1.5 s")
        # A key binding is a transaction the supervisor sends at once: it fails within the RPC timeout.
        bound, took = _timed(lambda: api.client.post(f"/api/v1/customers/{q(did)}/controller", json=binding))
        assert (bound.status_code, bound.json()["code"]) == (503, "chain_unavailable"), bound.text
        assert took < 2 * RPC_TIMEOUT + 1, f"the binding took {took:.1f} s to fail"
        # Preparing a consent change reads the customer's nonce from the chain.
        prepared, took = _timed(lambda: api.prepare(customer, action="revoke", attributes=["user.contact.email"]))
        assert (prepared.status_code, prepared.json()["code"]) == (503, "chain_unavailable"), prepared.text
        assert took < 2 * RPC_TIMEOUT + 1, f"preparing took {took:.1f} s to fail"
        # ... and accepting one checks its nonce against the chain's.
        refused, took = _timed(lambda: api.client.post("/api/v1/consents", json=change, headers=customer.headers))
        assert (refused.status_code, refused.json()["code"]) == (503, "chain_unavailable"), refused.text
        assert took < 2 * RPC_TIMEOUT + 1, f"accepting took {took:.1f} s to fail"
    finally:
        os.kill(node, signal.SIGCONT)

    deadline = time.monotonic() + 30
    while (health := api.client.get("/api/v1/health")).status_code != 200:
        assert time.monotonic() < deadline, health.text
        time.sleep(0.2)
    assert health.json()["status"] == "ok"
    # The relayer and indexer lived through it: the change refused meanwhile is accepted and goes on-chain.
    accepted = api.client.post("/api/v1/consents", json=change, headers=customer.headers)
    assert accepted.status_code == 202, accepted.text
    assert api.wait_status(customer, accepted.json()["id"], "active", timeout=60)["tx_hash"]
    # The claim code was not spent by the failed binding: the same request binds now.
    again = api.client.post(f"/api/v1/customers/{q(did)}/controller", json=binding)
    assert again.status_code == 200, again.text
    assert again.json()["controller"] == account.address
    assert serve_workers(process.pid) == workers
