"""No double spend under a retry after a crash: partners redeem while the service, or the node, is
killed with SIGKILL; afterwards every redemption, retried with its Idempotency-Key, gets one answer and
is applied on-chain exactly once. A node crash loses the blocks mined since its last checkpoint, so
redemptions already answered are applied again: the answer stays, and names the transaction that now
holds it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.messages import encode_typed_data
from eth_utils.crypto import keccak
from sqlalchemy import func, select

from ledger.points import PointsRequest, PointsStatus
from ledger.points.client import REDEEMED
from ledger.store import IndexedBlock, make_engine, sessions
from tests.api.conftest import q
from tests.api.test_crash import Serve, _customer, principal

pytestmark = [pytest.mark.geth, pytest.mark.slow]
CUSTOMERS = 8
START = 1000


@pytest.mark.parametrize("victim", ["service", "node"])
def test_a_retry_after_a_crash_never_spends_twice(tmp_path: Path, victim: str) -> None:
    serve = Serve(tmp_path)
    try:
        _never_spends_twice(serve, victim)
    finally:
        serve.close()  # also after a failure: no service or node left running


def _never_spends_twice(serve: Serve, victim: str) -> None:
    issuer = {"X-API-Key": principal(serve, "issuer", "issuer")}
    partner = {"X-API-Key": principal(serve, "partner", "acme")}
    serve.start()
    try:
        customers = [_customer(serve, n) for n in range(CUSTOMERS)]
        issued = serve.client.post(
            "/api/v1/points/issuances",
            json={"issuances": [{"did": did, "amount": START} for _, did, _ in customers]},
            headers=issuer,
        )
        assert issued.status_code == 201, issued.text

        stop = threading.Event()
        sent: dict[str, tuple[int, dict[str, Any]]] = {}  # key -> (customer, body)
        answered: dict[str, int] = {}
        lock = threading.Lock()

        def spend(n: int) -> None:
            account, _did, headers = customers[n]
            client = httpx.Client(base_url=str(serve.client.base_url), timeout=10)
            while not stop.is_set():
                try:
                    prepared = client.post(
                        "/api/v1/points/redemptions/prepare", json={"partner": "acme", "amount": 7}, headers=headers
                    )
                    if prepared.status_code != 200:
                        return
                    typed = prepared.json()["typed_data"]
                    signature = (
                        "0x" + bytes(account.sign_message(encode_typed_data(full_message=typed)).signature).hex()
                    )
                    body = {"typed_data": typed, "signature": signature}
                    key = str(uuid.uuid4())
                    with lock:
                        sent[key] = (n, body)
                    response = client.post(
                        "/api/v1/points/redemptions", json=body, headers={**partner, "Idempotency-Key": key}
                    )
                    with lock:
                        answered[key] = response.status_code
                    if response.status_code != 200:
                        return
                except httpx.TransportError:
                    return  # the service is gone

        threads = [threading.Thread(target=spend, args=(n,)) for n in range(CUSTOMERS)]
        for thread in threads:
            thread.start()
        time.sleep(4)
        if victim == "service":
            serve.stop(signal.SIGKILL)
        else:  # the service restarts the node from its last checkpoint
            os.kill(serve.node_pid(), signal.SIGKILL)
            stop.set()
            # What the lost blocks held is applied again as soon as the node is back: sooner than
            # the relayers' periodic audit (10 s), which finds redemptions settled but never indexed.
            _settled(serve, timeout=8.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert len([k for k, s in answered.items() if s == 200]) > 10, (
            f"the load did not get going before the kill: {Counter(answered.values())}"
        )
    finally:
        if victim == "service" and serve.process is not None and serve.process.poll() is None:
            serve.stop(signal.SIGKILL)

    if victim == "service":
        serve.start()
    try:
        _settled(serve)
        # Every redemption sent, answered or not, is retried with its key: each gets its one answer.
        finals: dict[str, httpx.Response] = {}
        for key, (_n, body) in sent.items():
            finals[key] = serve.client.post(
                "/api/v1/points/redemptions", json=body, headers={**partner, "Idempotency-Key": key}, timeout=60
            )
            again = serve.client.post(
                "/api/v1/points/redemptions", json=body, headers={**partner, "Idempotency-Key": key}, timeout=60
            )
            assert (again.status_code, again.json()) == (finals[key].status_code, finals[key].json())
        for key, status in answered.items():
            if status == 200:
                assert finals[key].status_code == 200, finals[key].text  # acknowledged before the crash: kept
        # Every redemption sent was valid. A crash of the node refuses none of them: what its lost blocks
        # held is applied again before anything newer (no later redemption takes its nonce or points).
        allowed = (200, 409) if victim == "service" else (200,)
        assert all(r.status_code in allowed for r in finals.values()), {r.text for r in finals.values()}

        # On-chain: each redemption id applied at most once, and balances agree with the answers.
        address = json.loads((serve.data_dir / "deployment.json").read_text())["contracts"]["LoyaltyPoints"]["address"]
        node_port = str(serve.node_port())
        w3 = httpx.Client(base_url=f"http://127.0.0.1:{node_port}")
        logs = w3.post(
            "/",
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "eth_getLogs",
                "params": [{"address": address, "fromBlock": "0x0", "toBlock": "latest", "topics": [REDEEMED]}],
            },
        ).json()["result"]
        ids = Counter(entry["topics"][3] for entry in logs)
        assert ids, "no redemption reached the chain"
        assert max(ids.values()) == 1
        redeemed_ok = {finals[k].json()["redemption_id"] for k in finals if finals[k].status_code == 200}
        assert set(ids) == redeemed_ok
        redeemed_keys = [k for k in finals if finals[k].status_code == 200]
        for n, (_account, did, headers) in enumerate(customers):
            mine = [k for k, (who, _) in sent.items() if who == n and finals[k].status_code == 200]
            chain = w3.post(
                "/",
                json={
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "eth_call",
                    "params": [
                        {
                            "to": address,
                            "data": "0x" + keccak(text="balanceOf(bytes32)")[:4].hex() + did.rsplit(":", 1)[1],
                        },
                        "latest",
                    ],
                },
            ).json()["result"]
            assert int(chain, 16) == START - 7 * len(mine)
            points = serve.client.get(f"/api/v1/customers/{q(did)}/points", headers=headers)
            assert points.json()["balance"] == int(chain, 16)  # the read model follows the chain
        # Each answer names the transaction that holds the redemption on the chain as it is now.
        for key in redeemed_keys:
            answer = finals[key].json()
            receipt = w3.post(
                "/",
                json={"jsonrpc": "2.0", "id": 1, "method": "eth_getTransactionReceipt", "params": [answer["tx_hash"]]},
            ).json()["result"]
            assert receipt is not None, f"{key}: answered with a transaction the chain does not hold"
            assert int(receipt["blockNumber"], 16) == answer["block_number"]
    finally:
        serve.stop()


def _settled(serve: Serve, timeout: float = 90) -> None:
    """Until the read model follows the chain as it is now (its newest indexed block is the node's block
    of that number), every redemption is final, and every one done is indexed. After a node crash, those
    in the lost blocks go back to the relayer (by the indexer's rollback, or the relayer's check of
    requests settled but never indexed) and are applied again; until the service has noticed the
    crash, its rows still show the lost chain."""
    engine = make_engine(f"sqlite:///{serve.data_dir / 'service.db'}")
    unsettled = (PointsRequest.status.not_in([PointsStatus.DONE, PointsStatus.FAILED])) | (
        (PointsRequest.status == PointsStatus.DONE) & PointsRequest.indexed.is_(False)
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            with sessions(engine)() as session:
                left = session.scalar(select(func.count()).select_from(PointsRequest).where(unsettled))
                newest = session.execute(
                    select(IndexedBlock.number, IndexedBlock.hash).order_by(IndexedBlock.number.desc()).limit(1)
                ).first()
            if not left and newest is not None and _node_block_hash(serve, newest.number) == newest.hash:
                return
            assert time.monotonic() < deadline, f"{left} points requests did not settle"
            time.sleep(0.2)
    finally:
        engine.dispose()


def _node_block_hash(serve: Serve, number: int) -> str | None:
    """The hash of the node's block `number`; None if it has none, or is down."""
    port = str(serve.node_port())
    try:
        block = httpx.post(
            f"http://127.0.0.1:{port}",
            json={"jsonrpc": "2.0", "id": 1, "method": "eth_getBlockByNumber", "params": [hex(number), False]},
        ).json()["result"]
    except httpx.TransportError:
        return None
    return block["hash"] if block else None
