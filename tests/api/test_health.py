"""`GET /health`: what the service is connected to, and whether its pipeline keeps up, on a real node."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from ledger.backends import AnvilBackend
from ledger.consent import ConsentRequest
from ledger.store import utcnow
from tests.api.conftest import Service, running_service


def test_a_healthy_service_says_ok(service: Service) -> None:
    health = service.client.get("/api/v1/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert (body["status"], body["problems"]) == ("ok", [])
    assert body["backend"] == "anvil"
    assert body["indexed_block"] is not None
    assert body["indexed_block"] <= body["block_number"]
    assert set(body["oldest_unsettled_s"]) == {"consent", "points"}


def _stuck_change(service: Service) -> httpx.Response:
    """A consent change accepted while the relayer holds its sends for an hour (as after a restart the
    indexer never checks): it stays pending."""
    customer = service.new_customer()
    assert service.runtime.writers is not None
    relayer = service.runtime.writers.relayer
    relayer.lost_after = 3600
    relayer.node_restarted(lambda: False)
    accepted = service.change(customer, action="grant", attributes=["user.contact.email"])
    assert accepted.status_code == 202, accepted.text
    return accepted


def test_requests_that_stop_moving_make_the_service_degraded(tmp_path: Path) -> None:
    """A stuck relayer (here: holding its sends for an hour, as after a restart the indexer never
    checks) leaves accepted changes pending. The API still accepts them; health says what is wrong."""
    with running_service(tmp_path) as service:
        accepted = _stuck_change(service)
        with service.runtime.sessions() as session:  # accepted a minute ago, not moved since
            session.execute(
                update(ConsentRequest)
                .where(ConsentRequest.id == accepted.json()["id"])
                .values(updated_at=utcnow() - timedelta(seconds=60))
            )
        health = service.client.get("/api/v1/health")
        assert health.status_code == 200, health.text  # still serving: acceptance is durable
        body = health.json()
        assert body["status"] == "degraded"
        assert body["oldest_unsettled_s"]["consent"] >= 60
        assert any(p.startswith("consent requests have not moved for") for p in body["problems"])


def test_a_node_that_does_not_answer_gives_503_chain_unavailable(tmp_path: Path) -> None:
    with running_service(tmp_path, chain={"supervise": False}) as service:
        backend = service.runtime.ledger.backend
        assert isinstance(backend, AnvilBackend)
        backend.node.kill()
        health = service.client.get("/api/v1/health")
        assert health.status_code == 503, health.text
        assert health.headers["content-type"] == "application/problem+json"
        assert health.json()["code"] == "chain_unavailable"


def test_readyz_fails_on_a_backlog_over_its_limit_and_a_head_that_stopped_while_requests_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz beside /health: the same stuck relayer, judged against the settings' limits."""
    with running_service(tmp_path) as service:
        accepted = _stuck_change(service)
        ready = service.client.get("/readyz")
        assert ready.status_code == 200, ready.text  # one request waiting a moment: ready

        backend = service.runtime.ledger.backend
        number, stamp = backend.head_block()
        monkeypatch.setattr(backend, "head_block", lambda: (number, stamp - 3600))  # no block for an hour
        ready = service.client.get("/readyz")
        assert ready.status_code == 200, ready.text  # an idle managed node makes no blocks: no stall alone
        with service.runtime.sessions() as session:  # ... but a request has waited past the limit
            session.execute(
                update(ConsentRequest)
                .where(ConsentRequest.id == accepted.json()["id"])
                .values(updated_at=utcnow() - timedelta(seconds=120))
            )
        monkeypatch.setattr(service.runtime.service, "ready_max_backlog", 0)
        stalled = service.client.get("/readyz")
        assert stalled.status_code == 503, stalled.text
        assert stalled.headers["content-type"] == "application/problem+json"
        body = stalled.json()
        assert body["code"] == "not_ready"
        assert body["failing"] == [
            {"check": "head", "problem": body["failing"][0]["problem"]},
            {"check": "backlog", "problem": "1 accepted requests wait to be settled (the limit is 0)"},
        ]
        assert body["failing"][0]["problem"].startswith("the chain's newest block is 36")
        assert "while requests have waited 12" in body["failing"][0]["problem"]
        health = service.client.get("/api/v1/health")
        assert (health.status_code, health.json()["status"]) == (200, "degraded")  # still accepting


def test_metrics_off_answers_404_and_the_probes_still_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSENT_LEDGER_METRICS", "false")
    with running_service(tmp_path) as service:
        off = service.client.get("/metrics")
        assert off.status_code == 404, off.text
        assert off.json()["code"] == "metrics_disabled"
        live = service.client.get("/livez")
        assert (live.status_code, live.json()) == (200, {"status": "alive"})
        assert live.headers["x-request-id"]  # the id is given whether or not requests are counted
