"""Two instances of `serve` on one PostgreSQL database and one chain node: both serve the API, one runs the
chain's writers (the leader lock, `ledger.leader`), and when it is killed with SIGKILL mid-load the other
takes over within 10 s; every acknowledged consent change is on-chain exactly once, the read model the
chain's. Real processes, a real PostgreSQL server, a real node (anvil, mined by this test as an external
network makes its own blocks)."""

from __future__ import annotations

import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from api.cli import LEADERSHIP_LOST_EXIT
from ledger.backends import AnvilBackend
from ledger.settings import ChainSettings
from scripts.served import (
    Serve,
    consent_findings,
    customer,
    points_settled,
    read_model_balance_findings,
    redemption_findings,
    wait_confirmed,
)

pytestmark = [pytest.mark.anvil, pytest.mark.slow]

Customer = tuple[LocalAccount, str, dict[str, str]]  # key, DID, bearer header (`scripts.served.customer`)
FAILOVER_LIMIT = 10.0  # seconds from the leader's SIGKILL until the other instance leads
LOADED = 40  # consent changes acknowledged before the kill
SPENDERS = 4  # customers redeeming points
START = 1000  # points each of them is issued


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    """A new database of its own on the session's PostgreSQL server."""
    name = f"ha_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def _leader(serve: Serve) -> str | None:
    answer = serve.client.get("/api/v1/health")
    assert answer.status_code == 200, answer.text
    return answer.json()["leader"]  # type: ignore[no-any-return]


def _load(
    urls: list[str],
    customers: list[Customer],
    stop: threading.Event,
    acknowledged: list[str],
) -> list[threading.Thread]:
    """Each customer's changes in turn, half of the customers through each instance; a customer whose
    instance does not answer goes to the other, as a load balancer would send it."""

    def one(n: int, account: LocalAccount, headers: dict[str, str]) -> None:
        clients = [httpx.Client(base_url=url, timeout=10) for url in urls]
        at, i = n % len(clients), 0
        while not stop.is_set():
            client = clients[at]
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
                at = (at + 1) % len(clients)  # not acknowledged: try the other instance
                continue
            if response.status_code == 202:
                acknowledged.append(response.json()["id"])
                i += 1
            time.sleep(0.02)
        for c in clients:
            c.close()

    threads = [threading.Thread(target=one, args=(n, a, h), daemon=True) for n, (a, _, h) in enumerate(customers)]
    for thread in threads:
        thread.start()
    return threads


class Redemptions:
    """Partners redeeming for some customers, through either instance (the other when one does not answer),
    each redemption with an Idempotency-Key of its own: what was sent and what was answered."""

    def __init__(self, urls: list[str], partner: dict[str, str]) -> None:
        self.urls, self.partner = urls, partner
        self.sent: dict[str, tuple[int, dict[str, Any]]] = {}  # key -> (customer, body)
        self.answered: dict[str, int] = {}
        self._lock = threading.Lock()

    def start(self, customers: list[Customer], stop: threading.Event) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._spend, args=(n, customer, stop), daemon=True)
            for n, customer in enumerate(customers)
        ]
        for thread in threads:
            thread.start()
        return threads

    def _spend(self, n: int, customer: Customer, stop: threading.Event) -> None:
        account, _did, headers = customer
        clients = [httpx.Client(base_url=url, timeout=30) for url in self.urls]
        at = n % len(clients)
        while not stop.is_set():
            client = clients[at]
            try:
                prepared = client.post(
                    "/api/v1/points/redemptions/prepare", json={"partner": "acme", "amount": 7}, headers=headers
                )
                if prepared.status_code != 200:
                    break
                typed = prepared.json()["typed_data"]
                signature = "0x" + bytes(account.sign_message(encode_typed_data(full_message=typed)).signature).hex()
                body, key = {"typed_data": typed, "signature": signature}, str(uuid.uuid4())
                with self._lock:
                    self.sent[key] = (n, body)
                response = client.post(
                    "/api/v1/points/redemptions", json=body, headers={**self.partner, "Idempotency-Key": key}
                )
            except httpx.TransportError:
                at = (at + 1) % len(clients)  # unanswered: retried with its key at the end
                continue
            with self._lock:
                self.answered[key] = response.status_code
            if response.status_code != 200:
                break
        for c in clients:
            c.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[str]:
    """The chain: a node of its own, mined here (as a QBFT network makes its own blocks); its URL."""
    backend = AnvilBackend(
        ChainSettings(backend="anvil", block_time=0.2, state_interval=3600), Account.create(), tmp_path / "node"
    )
    backend.start()
    try:
        assert backend.url is not None
        yield backend.url
    finally:
        backend.stop()


def _environment(node: str, database: str) -> dict[str, Any]:
    """Every instance's environment alike: the node and the databases."""
    return {
        "CONSENT_LEDGER_CHAIN_RPC_URL": node,
        "CONSENT_LEDGER_CHAIN_CONFIRMATIONS": "0",
        "CONSENT_LEDGER_DATABASE_URL": database,
        "CONSENT_LEDGER_IDENTITY_DATABASE_URL": database,
    }


def test_the_standby_takes_over_when_the_leader_is_killed(tmp_path: Path, database: str, node: str) -> None:
    shared = _environment(node, database)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # a serves from one process; b from a supervisor and two API workers, which reach the leader through it.
    a = Serve(tmp_path / "a", "rpc", CONSENT_LEDGER_INSTANCE="a", CONSENT_LEDGER_API_WORKERS="1", **shared)
    b: Serve | None = None
    try:
        issuer = {"X-API-Key": a.principal("issuer", "issuer")}
        partner = {"X-API-Key": a.principal("partner", "acme")}
        a.start()
        # What the instances share besides the database and the node: the secrets (the environment's in
        # production). The deployment record comes from the database.
        shutil.copytree(tmp_path / "a" / "secrets", tmp_path / "b" / "secrets")
        b_env: dict[str, Any] = {"CONSENT_LEDGER_INSTANCE": "b", "CONSENT_LEDGER_API_WORKERS": "2"}
        b = Serve(tmp_path / "b", "rpc", operator="op-b", **b_env, **shared)
        b.start()
        assert (_leader(a), _leader(b)) == ("a", "a")
        assert (tmp_path / "b" / "deployment.json").read_text() == (tmp_path / "a" / "deployment.json").read_text()
        # Enrolled and bound through either: the standby asks the leader for the binding (the operator key's).
        customers = [customer(a if n % 2 else b, n, f"ha{n}@example.com") for n in range(8 + SPENDERS)]
        customers, spenders = customers[:8], customers[8:]
        issued = b.client.post(
            "/api/v1/points/issuances",
            json={"issuances": [{"did": did, "amount": START} for _, did, _ in spenders]},
            headers=issuer,
        )
        assert issued.status_code == 201, issued.text
        metrics = b.client.get("/metrics").text
        assert "consent_ledger_leader 0.0" in metrics, "the standby says it leads"

        stop, acknowledged = threading.Event(), []  # type: ignore[var-annotated]
        urls = [str(a.client.base_url), str(b.client.base_url)]
        threads = _load(urls, customers, stop, acknowledged)
        redemptions = Redemptions(urls, partner)
        threads += redemptions.start(spenders, stop)
        loaded = time.monotonic() + 30  # mid-load: some dozens acknowledged (a busy machine takes longer)
        while len(acknowledged) < LOADED and time.monotonic() < loaded:
            time.sleep(0.1)
        time.sleep(0.5)
        standby_log = (tmp_path / "b" / "serve.log").read_text()
        assert "relayer recovered" not in standby_log, "the standby ran a relayer while the leader lived"
        answered_before = list(acknowledged)
        before_kill = len(answered_before)
        killed_at = time.monotonic()
        a.stop(signal.SIGKILL)  # mid-load: requests accepted, batches unsent, sent, or mined
        while (leader := _leader(b)) != "b":
            assert time.monotonic() - killed_at < FAILOVER_LIMIT, f"no take-over within {FAILOVER_LIMIT} s: {leader}"
            time.sleep(0.05)
        failover = time.monotonic() - killed_at
        assert wait_confirmed(b, answered_before, timeout=FAILOVER_LIMIT) == []
        settled = time.monotonic() - killed_at
        print(
            f"\nfailover: instance b leads {failover:.2f} s after the SIGKILL of instance a; the {before_kill} "
            f"changes acknowledged before it are all confirmed {settled:.2f} s after it"
        )
        survived = time.monotonic() + 30  # the load goes on through b alone, for some dozens more
        while len(acknowledged) < before_kill + LOADED and time.monotonic() < survived:
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert before_kill >= LOADED, "the load did not get going before the kill"
        assert len(acknowledged) >= before_kill + LOADED, "the survivor did not take the load"
        assert "consent_ledger_leader 1.0" in b.client.get("/metrics").text
        print(
            f"{len(acknowledged)} consent changes acknowledged in all; redemptions answered: "
            f"{dict(Counter(redemptions.answered.values()))}, {len(redemptions.sent)} sent"
        )
        _check_redemptions(b, redemptions, partner, spenders)
        assert consent_findings(b, acknowledged) == []
    finally:
        a.close()
        if b is not None:
            b.close()


def test_a_leader_whose_lock_is_gone_stops_at_once(tmp_path: Path, database: str, node: str) -> None:
    # Its lock's session ended while it lives (a network cut, an administrator): another instance may take
    # over now, so nothing more may be sent from here. The supervisor exits, and its API workers with it.
    serve = Serve(
        tmp_path, "rpc", CONSENT_LEDGER_INSTANCE="solo", CONSENT_LEDGER_API_WORKERS="2", **_environment(node, database)
    )
    admin = create_engine(database, isolation_level="AUTOCOMMIT")
    try:
        serve.start()
        assert _leader(serve) == "solo"
        assert serve.process is not None
        with admin.connect() as connection:
            ended = connection.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'consent-ledger leader solo'"
                )
            )
        assert ended == 1
        ended_at = time.monotonic()
        assert serve.process.wait(timeout=10) == LEADERSHIP_LOST_EXIT
        print(f"\nthe leader exited {time.monotonic() - ended_at:.2f} s after its lock's session ended")
        deadline = time.monotonic() + 10
        while True:  # its API workers follow it
            try:
                serve.client.get("/livez", timeout=1)
            except httpx.TransportError:
                break
            assert time.monotonic() < deadline, "an API worker serves on without its supervisor"
            time.sleep(0.1)
    finally:
        serve.close()
        admin.dispose()


def _check_redemptions(
    survivor: Serve,
    redemptions: Redemptions,
    partner: dict[str, str],
    spenders: list[Customer],
) -> None:
    """Every redemption sent, answered or not, retried with its key through the survivor gets one answer,
    an acknowledged one (200) the same; on-chain each is applied at most once, exactly those answered 200,
    and balances (on-chain and in the read model) agree with the answers."""
    assert points_settled(survivor) == []
    assert [s for s in redemptions.answered.values() if s == 200], "no redemption was answered"
    finals = {
        key: survivor.client.post(
            "/api/v1/points/redemptions", json=body, headers={**partner, "Idempotency-Key": key}, timeout=60
        )
        for key, (_n, body) in redemptions.sent.items()
    }
    for key, status in redemptions.answered.items():
        if status == 200:
            assert finals[key].status_code == 200, finals[key].text
    # A redemption whose answer the kill cut off may have lost its nonce to the customer's next one: 409.
    assert all(r.status_code in (200, 409) for r in finals.values()), {r.text for r in finals.values()}
    spent = Counter(spenders[redemptions.sent[k][0]][1] for k, r in finals.items() if r.status_code == 200)
    start = {did: START for _account, did, _headers in spenders}
    assert redemption_findings(survivor, finals, {did: 7 * n for did, n in spent.items()}, start) == []
    assert read_model_balance_findings(survivor, spenders) == []
