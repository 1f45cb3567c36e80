"""No double spend under a retry after a crash: partners redeem while the service, or the node, is
killed with SIGKILL; afterwards every redemption, retried with its Idempotency-Key, gets one answer and
is applied on-chain exactly once. A node crash loses the blocks mined since its last checkpoint, so
redemptions already answered are applied again: the answer stays, and names the transaction that now
holds it."""

from __future__ import annotations

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

from scripts.served import Serve, customer, points_settled, read_model_balance_findings, redemption_findings

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
    issuer = {"X-API-Key": serve.principal("issuer", "issuer")}
    partner = {"X-API-Key": serve.principal("partner", "acme")}
    serve.start()
    try:
        customers = [customer(serve, n) for n in range(CUSTOMERS)]
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

        # On-chain: each redemption id applied at most once, exactly those answered 200, balances agree
        # with the answers (on-chain and in the read model), and each answer names its transaction.
        assert any(r.status_code == 200 for r in finals.values()), "no redemption reached the chain"
        spent = Counter(customers[sent[k][0]][1] for k, r in finals.items() if r.status_code == 200)
        start = {did: START for _account, did, _headers in customers}
        assert redemption_findings(serve, finals, {did: 7 * n for did, n in spent.items()}, start) == []
        # ... and the check says so when the answers and the chain disagree: one answered redemption left out.
        left_out = next(k for k, r in finals.items() if r.status_code == 200)
        fewer = {k: r for k, r in finals.items() if k != left_out}
        spent[customers[sent[left_out][0]][1]] -= 1
        assert redemption_findings(serve, fewer, {did: 7 * n for did, n in spent.items()}, start) == [
            "the redemptions on-chain are not the ones answered 200",
            f"a customer holds {START - 7 * (spent[customers[sent[left_out][0]][1]] + 1)} points on-chain, "
            f"{START - 7 * spent[customers[sent[left_out][0]][1]]} by the answers",
        ]
        assert read_model_balance_findings(serve, customers) == []
    finally:
        serve.stop()


def _settled(serve: Serve, timeout: float = 90) -> None:
    assert points_settled(serve, timeout) == []
