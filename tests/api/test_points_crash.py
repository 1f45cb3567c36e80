"""No double spend under a retry after a crash: partners redeem while the service is killed with
SIGKILL; after a restart every redemption, retried with its Idempotency-Key, gets one answer and is
applied on-chain exactly once."""

from __future__ import annotations

import json
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

from ledger import loyalty
from tests.api.test_crash import Serve, _customer, principal

pytestmark = [pytest.mark.anvil, pytest.mark.slow]
CUSTOMERS = 8
START = 1000


def test_a_retry_after_a_crash_never_spends_twice(tmp_path: Path) -> None:
    serve = Serve(tmp_path)
    try:
        _never_spends_twice(serve)
    finally:
        serve.close()  # also after a failure: no service or node left running


def _never_spends_twice(serve: Serve) -> None:
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
        serve.stop(signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert len([k for k, s in answered.items() if s == 200]) > 10, (
            f"the load did not get going before the kill: {Counter(answered.values())}"
        )
    finally:
        if serve.process is not None and serve.process.poll() is None:
            serve.stop(signal.SIGKILL)

    serve.start()
    try:
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
        assert all(r.status_code in (200, 409) for r in finals.values()), {r.text for r in finals.values()}

        # On-chain: each redemption id applied at most once, and balances agree with the answers.
        address = json.loads((serve.data_dir / "deployment.json").read_text())["contracts"]["LoyaltyPoints"]["address"]
        node_port = (serve.data_dir / "chain" / "anvil.pid").read_text().split()[1]
        w3 = httpx.Client(base_url=f"http://127.0.0.1:{node_port}")
        logs = w3.post(
            "/",
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "eth_getLogs",
                "params": [{"address": address, "fromBlock": "0x0", "toBlock": "latest", "topics": [loyalty.REDEEMED]}],
            },
        ).json()["result"]
        ids = Counter(entry["topics"][3] for entry in logs)
        assert ids, "no redemption reached the chain"
        assert max(ids.values()) == 1
        redeemed_ok = {finals[k].json()["redemption_id"] for k in finals if finals[k].status_code == 200}
        assert set(ids) == redeemed_ok
        for n, (_account, did, _headers) in enumerate(customers):
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
    finally:
        serve.stop()
