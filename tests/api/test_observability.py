"""Observability of a real `serve` (two API workers, the managed geth node): `/metrics` sums the counters
of every process, labels routes by their template, the log is JSON with the request id and no personal
data, `/livez` answers, `/readyz` names the failing check when the node stalls."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from ledger.anvil import free_port
from tests.api.conftest import CLI, ApiClient, Customer, add_principal, q, serve_env, serve_workers

pytestmark = [pytest.mark.geth, pytest.mark.slow]

# A customer whose personal data is recognisable anywhere it might leak.
EMAIL = "Zelda.Observable@Example.com"
PHONE = "+442079460958"
NAME = "Zelda Quixotic-Observable"
REQUEST_ID = "obs-test-0001"


@dataclass
class Running:
    api: ApiClient
    process: subprocess.Popen[bytes]
    data_dir: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text()

    def fresh(self) -> httpx.Client:
        """A client that opens a connection per request: the kernel spreads them over the workers."""
        return httpx.Client(
            base_url=str(self.api.client.base_url), timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
        )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """`serve` with two API workers and the access log on, an operator and a partner ("acme"); its log
    in a file the tests read."""
    data_dir = tmp_path_factory.mktemp("observed")
    keys = {
        "operator": add_principal(data_dir, "operator", "crm-operator"),
        "partner": add_principal(data_dir, "partner", "acme"),
    }
    port = free_port()
    log = data_dir / "serve.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [*CLI, "serve", "--port", str(port), "--data-dir", str(data_dir), "--workers", "2"],
            env=serve_env(CONSENT_LEDGER_ACCESS_LOG="true"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, log.read_text()
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/readyz").status_code == 200 and len(serve_workers(process.pid)) == 2:
                        break
                assert time.monotonic() < deadline, "serve did not become ready"
                time.sleep(0.2)
            yield Running(ApiClient(client, keys["operator"], keys["partner"], "", ""), process, data_dir, log)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(text: str, name: str, **labels: str) -> float:
    return _samples(text).get((name, frozenset(labels.items())), 0.0)


def _customer(running: Running, email: str, **pii: str) -> Customer:
    api = running.api
    enrolled = api.client.post("/api/v1/customers", json={"email": email, **pii}, headers=api.operator())
    assert enrolled.status_code == 201, enrolled.text
    account = Account.create()
    did, claim = enrolled.json()["did"], enrolled.json()["claim_code"]
    bound = api.bind(did, claim, account)
    assert bound.status_code == 200, bound.text
    signed_in = api.sign_in(account)
    assert signed_in.status_code == 200, signed_in.text
    return Customer(account=account, did=did, token=signed_in.json()["access_token"])


def _per_process(metrics_dir: Path, pid: int, name: str, **labels: str) -> float:
    """What process `pid` alone counted (its own file of the multiprocess directory)."""
    with tempfile.TemporaryDirectory() as alone:
        for file in metrics_dir.glob(f"counter_{pid}.db"):
            (Path(alone) / file.name).write_bytes(file.read_bytes())
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=alone)  # type: ignore[no-untyped-call]
        for family in registry.collect():
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
    return 0.0


def test_livez_answers_while_the_process_serves(running: Running) -> None:
    live = running.api.client.get("/livez")
    assert (live.status_code, live.json()) == (200, {"status": "alive"})


def test_metrics_sum_consent_counts_over_every_process(running: Running) -> None:
    api = running.api
    before = api.client.get("/metrics").text
    customers = [_customer(running, f"metrics{i}@example.com") for i in range(3)]
    ids: list[tuple[Customer, str]] = []
    with running.fresh() as fresh:  # a connection per request: both workers accept changes
        api_fresh = ApiClient(fresh, api.operator_key, api.partner_key, "", "")
        for action in ("grant", "revoke", "grant", "revoke"):
            for customer in customers:
                accepted = api_fresh.change(customer, action=action, attributes=["user.contact.email"])
                assert accepted.status_code == 202, accepted.text
                ids.append((customer, accepted.json()["id"]))
    last = {c.did: rid for c, rid in ids}
    for customer in customers:  # each customer's last change is a revocation: confirmed last
        api.wait_status(customer, last[customer.did], "revoked", timeout=60)

    after = api.client.get("/metrics")
    assert after.status_code == 200, after.text
    assert after.headers["content-type"].startswith("text/plain")
    name = "consent_ledger_consent_changes_total"
    accepted_n = _value(after.text, name, outcome="accepted") - _value(before, name, outcome="accepted")
    confirmed_n = _value(after.text, name, outcome="confirmed") - _value(before, name, outcome="confirmed")
    assert (accepted_n, confirmed_n) == (12, 12)
    assert _value(after.text, name, outcome="failed") == 0
    # The sum is over processes: each worker accepted some (its own file says so), the supervisor,
    # which serves no request, confirmed them all.
    metrics_dir = running.data_dir / "metrics" / str(running.process.pid)  # this run's
    workers = serve_workers(running.process.pid)
    by_worker = [_per_process(metrics_dir, pid, name, outcome="accepted") for pid in workers]
    assert all(n > 0 for n in by_worker), by_worker
    assert sum(by_worker) == _value(after.text, name, outcome="accepted")
    assert _per_process(metrics_dir, running.process.pid, name, outcome="confirmed") == _value(
        after.text, name, outcome="confirmed"
    )
    # The state read at scrape time.
    samples = _samples(after.text)
    assert samples[("consent_ledger_relayer_backlog", frozenset({("pipeline", "consent")}))] == 0
    assert samples[("consent_ledger_chain_up", frozenset())] == 1
    assert samples[("consent_ledger_indexer_lag_blocks", frozenset())] >= 0
    assert samples[("consent_ledger_chain_head_age_seconds", frozenset())] >= 0
    assert ("consent_ledger_points_liability", frozenset()) in samples
    assert ("consent_ledger_points_expiring_30d", frozenset()) in samples


def test_route_labels_are_templates_and_unknown_paths_one_label(running: Running) -> None:
    api = running.api
    customer = _customer(running, "labels@example.com")
    did_path = f"/api/v1/customers/{q(customer.did)}/consents"
    assert api.client.get(did_path, headers=customer.headers).status_code == 200
    assert api.client.get("/api/v1/no/such/route/0xdeadbeef").status_code == 404
    text = api.client.get("/metrics").text
    routes = {dict(labels).get("route") for (name, labels) in _samples(text) if name.startswith("consent_ledger_http")}
    assert {"/api/v1/customers/{did}/consents", "/api/v1/customers/{did}/controller", "unmatched"} <= routes
    assert all(r is not None and (r.startswith("/") or r == "unmatched") for r in routes)
    assert "did:web" not in text
    assert "0xdeadbeef" not in text
    assert q(customer.did) not in text
    assert _value(text, "consent_ledger_http_requests_total", method="GET", route="unmatched", status="404") >= 1


def test_log_lines_are_json_with_the_request_id_and_hold_no_pii(running: Running) -> None:
    api = running.api
    customer = _customer(running, EMAIL, phone=PHONE, name=NAME)
    marked = api.client.get(
        f"/api/v1/customers/{q(customer.did)}/consents", headers={**customer.headers, "X-Request-ID": REQUEST_ID}
    )
    assert marked.status_code == 200, marked.text
    assert marked.headers["x-request-id"] == REQUEST_ID
    generated = api.client.get("/livez").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert api.client.get("/livez", headers={"X-Request-ID": "no spaces or @ here"}).headers["x-request-id"] != (
        "no spaces or @ here"
    )
    # PII a client put in a URL reaches the access log only redacted; erasing is logged by nobody.
    api.client.get("/api/v1/nothing", params={"email": EMAIL.lower(), "phone": PHONE})
    assert api.client.delete(f"/api/v1/customers/{q(customer.did)}", headers=api.operator()).status_code == 200
    assert api.client.post("/api/v1/customers", json={"email": EMAIL}, headers=api.operator()).status_code == 409

    time.sleep(0.5)  # the access log is written as the answer starts
    text = running.log_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert lines, text[-2000:]
    assert len(lines) == len([line for line in text.splitlines() if line.strip()]), "every line is JSON"
    ours = [line for line in lines if line.get("request_id") == REQUEST_ID]
    assert any(line.get("logger") == "uvicorn.access" and line.get("status") == 200 for line in ours), ours
    access = [line for line in lines if line.get("logger") == "uvicorn.access"]
    assert access
    assert all(re.fullmatch(r"[\w.:-]{1,64}", line.get("request_id", "")) for line in access)
    assert all({"time", "level", "event"} <= set(line) for line in lines)
    assert "[redacted]" in text
    for needle in (EMAIL, EMAIL.lower(), PHONE, PHONE[1:], NAME, "Quixotic"):
        assert needle not in text, needle
    erased = _value(api.client.get("/metrics").text, "consent_ledger_vault_erasures_total")
    assert erased == 1


def test_readyz_names_a_stalled_node_and_recovers(running: Running) -> None:
    api = running.api
    ready = api.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "checks": dict.fromkeys(("database", "vault_key", "node", "head", "backlog"), "ok"),
    }
    node = int((running.data_dir / "chain" / "geth.pid").read_text().split()[0])
    os.kill(node, signal.SIGSTOP)
    try:
        for _ in range(2):  # whichever worker answers
            started = time.monotonic()
            stalled = api.client.get("/readyz")
            assert time.monotonic() - started < 3.0
            assert stalled.status_code == 503, stalled.text
            assert stalled.headers["content-type"] == "application/problem+json"
            body: dict[str, Any] = stalled.json()
            assert (body["code"], body["title"]) == ("not_ready", "The service is not ready")
            failing = {f["check"]: f["problem"] for f in body["failing"]}
            assert set(failing) == {"node", "head"}, failing
            assert failing["node"].startswith("the chain node did not answer within 1.5 s")
            assert body["detail"].startswith("node: the chain node did not answer")
        assert _value(api.client.get("/metrics").text, "consent_ledger_chain_up") == 0
        assert api.client.get("/livez").status_code == 200  # alive all the same: a restart would not help
    finally:
        os.kill(node, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while (again := api.client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, again.text
        time.sleep(0.2)
