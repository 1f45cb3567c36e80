"""`GET /health`: what the service is connected to, and whether its pipeline keeps up, on a real node."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

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


def test_requests_that_stop_moving_make_the_service_degraded(tmp_path: Path) -> None:
    """A stuck relayer (here: holding its sends for an hour, as after a restart the indexer never
    checks) leaves accepted changes pending. The API still accepts them; health says what is wrong."""
    with running_service(tmp_path) as service:
        customer = service.new_customer()
        assert service.runtime.writers is not None
        relayer = service.runtime.writers.relayer
        relayer.lost_after = 3600
        relayer.node_restarted(lambda: False)
        accepted = service.change(customer, action="grant", attributes=["user.contact.email"])
        assert accepted.status_code == 202, accepted.text
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
