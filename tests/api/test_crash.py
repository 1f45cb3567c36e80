"""Nothing acknowledged is lost: kill -9 the service, or the node, while consent changes are in flight;
after a restart every acknowledged change is on-chain exactly once and the read model matches the chain."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import pyarrow.parquet as pq
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from sqlalchemy import select

from ledger.anvil import Checkpoints
from ledger.consent import BoundController
from ledger.contracts import Deployment
from ledger.store import make_engine, sessions
from scripts import generate_crm
from scripts.served import CLI, Serve, balance_on_chain, consent_findings, customer

pytestmark = [pytest.mark.anvil, pytest.mark.geth, pytest.mark.slow]
# The managed nodes: geth (the default: every block on disk when made) and anvil (its chain in memory,
# dumped: a crash loses the blocks since the last dump, which the relayer sends again).
NODES = ["geth", "anvil"]


def _load(
    serve: Serve,
    customers: list[tuple[LocalAccount, str, dict[str, str]]],
    stop: threading.Event,
    acknowledged: list[str],
) -> list[threading.Thread]:
    def one(account: LocalAccount, headers: dict[str, str]) -> None:
        client = httpx.Client(base_url=str(serve.client.base_url), timeout=10)
        i = 0
        while not stop.is_set():
            action = "grant" if i % 2 == 0 else "revoke"
            try:
                prepared = client.post(
                    "/api/v1/consents/prepare",
                    headers=headers,
                    json={
                        "action": action,
                        "partner": "acme",
                        "purpose": "analytics.reporting",
                        "attributes": ["user.contact.email"],
                    },
                )
                if prepared.status_code != 200:
                    time.sleep(0.05)
                    continue
                typed = prepared.json()["typed_data"]
                signature = "0x" + bytes(account.sign_message(encode_typed_data(full_message=typed)).signature).hex()
                response = client.post(
                    "/api/v1/consents", headers=headers, json={"typed_data": typed, "signature": signature}
                )
            except httpx.TransportError:
                time.sleep(0.05)  # the service is down: not acknowledged, try again later
                continue
            if response.status_code == 202:
                acknowledged.append(response.json()["id"])
                i += 1

    threads = [threading.Thread(target=one, args=(a, h), daemon=True) for a, _, h in customers]
    for thread in threads:
        thread.start()
    return threads


def _verify_exactly_once(serve: Serve, acknowledged: list[str], *, node_crashed: bool = False) -> None:
    """See `consent_findings`: every acknowledged change on-chain exactly once, the read model the chain's."""
    assert consent_findings(serve, acknowledged, node_crashed=node_crashed) == []


@pytest.fixture(params=NODES)
def serve(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Serve]:
    instance = Serve(tmp_path, request.param)
    yield instance
    instance.close()


def _prepare(serve: Serve) -> list[tuple[LocalAccount, str, dict[str, str]]]:
    serve.start()
    created = serve.client.post(
        "/api/v1/partners",
        json={"name": "acme", "address": Account.create().address},
        headers={"X-API-Key": serve.operator_key},
    )
    assert created.status_code == 201, created.text
    return [customer(serve, n) for n in range(12)]


def test_kill_9_of_the_service_loses_no_acknowledged_change(serve: Serve) -> None:
    customers = _prepare(serve)
    stop, acknowledged = threading.Event(), []  # type: ignore[var-annotated]
    threads = _load(serve, customers, stop, acknowledged)
    time.sleep(2.0)
    serve.stop(signal.SIGKILL)  # mid-flight: requests accepted, batches unsent, sent, or mined
    killed_at = len(acknowledged)
    serve.start()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert killed_at > 20, "the load did not get going before the kill"
    _verify_exactly_once(serve, acknowledged)


@pytest.mark.parametrize("node", NODES)
def test_kill_9_of_the_node_loses_no_acknowledged_change(tmp_path: Path, node: str) -> None:
    # Without supervision the node stays down until the service is restarted: the worst case.
    serve = Serve(tmp_path, node, CONSENT_LEDGER_CHAIN_SUPERVISE="false")
    try:
        customers = _prepare(serve)
        stop, acknowledged = threading.Event(), []  # type: ignore[var-annotated]
        threads = _load(serve, customers, stop, acknowledged)
        time.sleep(2.0)
        os.kill(serve.node_pid(), signal.SIGKILL)  # anvil: blocks mined since the last state dump are gone
        time.sleep(0.5)
        _account, _did, headers = customers[0]
        down = serve.client.post(
            "/api/v1/consents/prepare",
            headers=headers,
            json={"action": "grant", "partner": "acme", "purpose": "analytics.reporting", "attributes": ["user.name"]},
        )
        assert (down.status_code, down.json()["code"]) == (503, "chain_unavailable")
        assert down.headers["content-type"] == "application/problem+json"
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        serve.stop()
        serve.start()
        assert len(acknowledged) > 20, "the load did not get going before the kill"
        _verify_exactly_once(serve, acknowledged, node_crashed=True)
    finally:
        serve.close()


def test_the_service_restarts_a_killed_node_by_itself(serve: Serve) -> None:
    customers = _prepare(serve)
    stop, acknowledged = threading.Event(), []  # type: ignore[var-annotated]
    threads = _load(serve, customers, stop, acknowledged)
    time.sleep(2.0)
    serve.kill_node_and_wait_for_its_restart()
    time.sleep(2.0)  # load goes on against the restarted node
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert serve.process is not None
    assert serve.process.poll() is None  # the service itself never stopped
    assert len(acknowledged) > 20, "the load did not get going"
    _verify_exactly_once(serve, acknowledged, node_crashed=True)


def test_contracts_deployed_at_the_first_start_survive_a_node_crash_before_any_periodic_checkpoint(
    tmp_path: Path,
) -> None:
    """The first start deploys the contracts. A node killed before its first periodic checkpoint (an hour
    away here) used to come back as an empty chain: the service could neither go on nor start again."""
    serve = Serve(tmp_path, "anvil", CONSENT_LEDGER_CHAIN_STATE_INTERVAL="3600")
    try:
        serve.start()
        serve.kill_node_and_wait_for_its_restart()
        deployment = Deployment.load(serve.data_dir / "deployment.json")
        for name, contract in deployment.contracts.items():
            deadline = time.monotonic() + 30
            while True:
                try:
                    code = serve.rpc("eth_getCode", [contract.address, "latest"])
                    break
                except httpx.TransportError:  # the new node is not answering yet
                    assert time.monotonic() < deadline, "the restarted node does not answer"
                    time.sleep(0.1)
            assert code not in (None, "0x"), f"{name} is gone from the restarted node"
        customer(serve, 0)  # and the service works on: enrol, bind a key on-chain, sign in
    finally:
        serve.close()


def _latest_binding(serve: Serve) -> str:
    """The transaction of the service's latest key binding, from its record of them."""
    engine = make_engine(f"sqlite:///{serve.data_dir / 'service.db'}")
    try:
        with sessions(engine)() as session:
            latest = session.scalars(select(BoundController).order_by(BoundController.block_number.desc())).first()
    finally:
        engine.dispose()
    assert latest is not None
    return latest.tx_hash


def _grant(
    serve: Serve, account: LocalAccount, headers: dict[str, str], partner: str = "acme", attribute: str = "user.name"
) -> str:
    typed = serve.client.post(
        "/api/v1/consents/prepare",
        headers=headers,
        json={"action": "grant", "partner": partner, "purpose": "analytics.reporting", "attributes": [attribute]},
    ).json()["typed_data"]
    signature = "0x" + bytes(account.sign_message(encode_typed_data(full_message=typed)).signature).hex()
    accepted = serve.client.post(
        "/api/v1/consents", headers=headers, json={"typed_data": typed, "signature": signature}
    )
    assert accepted.status_code == 202, accepted.text
    return str(accepted.json()["id"])


def test_a_key_bound_and_a_partner_added_just_before_the_node_dies_are_put_back(tmp_path: Path) -> None:
    # Checkpoints 5 s apart, so that the binding, the partner's role and the changes below fall between two.
    serve = Serve(tmp_path, "anvil", CONSENT_LEDGER_CHAIN_STATE_INTERVAL="5")
    try:
        issuer = {"X-API-Key": serve.principal("issuer", "issuer")}
        redeemer = {"X-API-Key": serve.principal("partner", "globex")}
        _prepare(serve)
        state = tmp_path / "chain" / "state.json"
        written = state.stat().st_mtime_ns if state.exists() else 0
        deadline = time.monotonic() + 30
        while not state.exists() or state.stat().st_mtime_ns == written:  # a checkpoint was just written
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.02)
        account, did, headers = customer(serve, 99)
        added = serve.client.post(
            "/api/v1/partners",
            json={"name": "initech", "address": Account.create().address},
            headers={"X-API-Key": serve.operator_key},
        )
        assert added.status_code == 201, added.text
        first = _grant(serve, account, headers)
        second = _grant(serve, account, headers, partner="initech")
        issued = serve.client.post(
            "/api/v1/points/issuances", json={"issuances": [{"did": did, "amount": 100}]}, headers=issuer
        )
        assert issued.status_code == 201, issued.text
        typed = serve.client.post(
            "/api/v1/points/redemptions/prepare", json={"partner": "globex", "amount": 30}, headers=headers
        ).json()["typed_data"]
        signature = "0x" + bytes(account.sign_message(encode_typed_data(full_message=typed)).signature).hex()
        redemption = {"typed_data": typed, "signature": signature}
        redeemed = serve.client.post(
            "/api/v1/points/redemptions", json=redemption, headers={**redeemer, "Idempotency-Key": "crash-1"}
        )
        assert (redeemed.status_code, redeemed.json()["balance"]) == (200, 70), redeemed.text
        binding_tx = _latest_binding(serve)
        assert serve.rpc("eth_getTransactionByHash", [binding_tx]) is not None
        serve.kill_node_and_wait_for_its_restart()  # before the next checkpoint: the binding's block is lost
        # The binding left with its block (else this test proves nothing), and the service bound the key again.
        assert serve.rpc("eth_getTransactionByHash", [binding_tx]) is None
        after = _grant(serve, account, headers)  # the customer goes on as if nothing happened
        # The issuance and the redemption are sent again, and the redemption is not refused as unbound.
        deadline = time.monotonic() + 60
        while balance_on_chain(serve, did) != 70:
            assert time.monotonic() < deadline, "the lost issuance and redemption were not applied again"
            time.sleep(0.2)
        again = serve.client.post(
            "/api/v1/points/redemptions", json=redemption, headers={**redeemer, "Idempotency-Key": "crash-1"}
        )
        assert again.status_code == 200
        moved = {"tx_hash", "block_number"}  # a repeat names the transaction that holds it now (api.idempotency)
        assert {k: v for k, v in again.json().items() if k not in moved} == {
            k: v for k, v in redeemed.json().items() if k not in moved
        }
        receipt = serve.rpc("eth_getTransactionReceipt", [again.json()["tx_hash"]])
        assert int(receipt["blockNumber"], 16) == again.json()["block_number"]
        _verify_exactly_once(serve, [first, second, after], node_crashed=True)
        log = (tmp_path / "serve.log").read_text()
        assert "the chain had lost 1 key bindings; bound them again" in log
        assert f"the chain had lost the partner role of {added.json()['address']}; granted it again" in log
        assert _latest_binding(serve) != binding_tx
    finally:
        serve.close()


def test_an_access_the_bridge_released_on_survives_a_crash_of_the_node(tmp_path: Path) -> None:
    """Log, then release, holds through a crash of the managed node: `bridge export` hands its file on
    only once a checkpoint holds the access records' block, however far off the next periodic one is."""
    serve = Serve(tmp_path, "anvil", CONSENT_LEDGER_CHAIN_STATE_INTERVAL="3600")  # no periodic checkpoint in this test
    try:
        _prepare(serve)
        generate_crm.write(tmp_path / "crm", rows=300, seed=11)
        with (tmp_path / "crm" / "orders.csv").open(encoding="utf-8") as handle:
            buyers = {row["customer_id"] for row in csv.DictReader(handle)}
        with (tmp_path / "crm" / "customers.csv").open(encoding="utf-8") as handle:
            person = next(r for r in csv.DictReader(handle) if r["email"] and r["customer_id"] in buyers)
        account, did, headers = customer(serve, 100, person["email"])
        granted = _grant(serve, account, headers, attribute="user.behavior.purchase_history")
        deadline = time.monotonic() + 30
        while serve.client.get(f"/api/v1/consents/{granted}", headers=headers).json()["status"] != "active":
            assert time.monotonic() < deadline, "the grant was not confirmed"
            time.sleep(0.1)
        checkpoints = Checkpoints(tmp_path / "chain")
        before = checkpoints.durable_block()
        out = tmp_path / "released.parquet"
        done = subprocess.run(
            [*CLI, "bridge", "export", "--input", str(tmp_path / "crm" / "orders.csv"), "--mapping",
             str(tmp_path / "crm" / "mapping.toml"), "--partner", "acme", "--purpose", "analytics.reporting",
             "--out", str(out), "--data-dir", str(tmp_path)],
            env=serve.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        stats = json.loads(done.stdout)
        assert stats["rows_released"] > 0
        assert set(pq.read_table(out).column("did").to_pylist()) == {did}
        (access_tx,) = stats["transactions"]
        assert stats["seconds"] >= stats["durable_wait_seconds"] > 0  # it says how long it waited for a dump
        receipt = cast(dict[str, str], serve.rpc("eth_getTransactionReceipt", [access_tx]))
        # The export waited for a checkpoint (the first since the service started) to hold its block.
        assert before < int(receipt["blockNumber"], 16) <= checkpoints.durable_block()
        serve.kill_node_and_wait_for_its_restart()
        kept = cast(dict[str, str] | None, serve.rpc("eth_getTransactionReceipt", [access_tx]))
        assert kept is not None
        assert kept["blockHash"] == receipt["blockHash"]
        audited = subprocess.run(
            [*CLI, "audit", "verify", "--data-dir", str(tmp_path)],
            env=serve.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert audited.returncode == 0, audited.stdout + audited.stderr
    finally:
        serve.close()
