"""Liveness, readiness, metrics, what the service is connected to, and whether its pipeline keeps up.

Three questions, three routes. `/livez`: does this process serve (a restart is the cure when not)?
`/readyz`: should traffic come here (database, vault key, node, chain moving on, backlog), 503 naming
each failing check? `/api/v1/health`: what is the service connected to and how far behind is it, for a
person (it says 200 `degraded` while the API still accepts requests, and 503 only when the node does
not answer). `/livez`, `/readyz` and `/metrics` are at the root, where probes and scrapers look."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field

from api import observability
from api.errors import ApiError, responses
from api.observability import oldest_unsettled
from api.runtime import Runtime
from ledger import consent, points
from ledger.consent import ConsentRequest
from ledger.errors import LedgerError
from ledger.indexer import CURSOR
from ledger.points import PointsRequest
from ledger.store import IndexerCursor

router = APIRouter(tags=["system"])
probes = APIRouter(tags=["system"])  # at the root (`api.main`)

# Accepted requests normally settle within a block or two, and after a node restart within seconds.
# One whose state has not changed for this long means a stuck relayer or indexer: worth a look.
STALE_AFTER = 30.0  # seconds
MAX_INDEX_LAG = 100  # blocks the read model may be behind the chain before that, too, is reported


class ContractPublic(BaseModel):
    name: str
    address: str
    deploy_block: int


class HealthPublic(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        description="ok, or degraded when accepted requests have stopped moving or the read model lags "
        "(the API still accepts requests: they are stored durably)"
    )
    problems: list[str] = Field(description="What makes the status degraded, in words")
    backend: str
    chain_id: int
    block_number: int
    indexed_block: int | None = Field(description="The newest block the read model holds")
    oldest_unsettled_s: dict[str, float | None] = Field(
        description="Per pipeline (consent, points): seconds since the oldest unsettled request last "
        "moved (accepted, sent, or queued again); null when none is unsettled"
    )
    contracts: list[ContractPublic]
    instance: str = Field(description="This instance's name (CONSENT_LEDGER_INSTANCE)")
    leader: str | None = Field(
        description="The instance that runs the chain's writers (relayer, indexer): on PostgreSQL the holder of "
        "the leader lock, which several instances may compete for; null while none holds it"
    )


@router.get("/health", response_model=HealthPublic, responses=responses(503))
def health(request: Request) -> HealthPublic:
    runtime: Runtime = request.app.state.runtime
    try:
        block_number = runtime.ledger.backend.head()  # within 2 s, also when the node stalls
    except LedgerError as exc:
        raise ApiError(503, "chain_unavailable", "The chain does not answer", str(exc)) from exc
    with runtime.reads() as session:
        cursor = session.get(IndexerCursor, CURSOR)
        ages = {
            "consent": oldest_unsettled(session, ConsentRequest, consent.LIVE),
            "points": oldest_unsettled(session, PointsRequest, points.LIVE),
        }
    indexed = None if cursor is None else cursor.block_number
    problems = [
        f"{pipeline} requests have not moved for {age:.0f} s"
        for pipeline, age in ages.items()
        if age is not None and age > STALE_AFTER
    ]
    if indexed is not None and block_number - indexed > MAX_INDEX_LAG:
        problems.append(f"the read model is {block_number - indexed} blocks behind the chain")
    return HealthPublic(
        status="degraded" if problems else "ok",
        problems=problems,
        backend=runtime.chain_backend,
        chain_id=runtime.ledger.deployment.chain_id,
        block_number=block_number,
        indexed_block=indexed,
        oldest_unsettled_s=ages,
        instance=runtime.service.instance_name,
        leader=observability.leader(runtime),
        contracts=[
            ContractPublic(name=name, address=c.address, deploy_block=c.block_number)
            for name, c in runtime.ledger.deployment.contracts.items()
        ],
    )


class LivePublic(BaseModel):
    status: Literal["alive"]


class ReadyPublic(BaseModel):
    status: Literal["ready"]
    checks: dict[str, Literal["ok"]] = Field(
        description="Each check and its result: database, vault_key, node, head, backlog"
    )


@probes.get("/livez", response_model=LivePublic)
async def livez() -> LivePublic:
    """200 while this process serves: it asks nothing else (a process that answers is alive)."""
    return LivePublic(status="alive")


@probes.get("/readyz", response_model=ReadyPublic, responses=responses(503))
def readyz(request: Request) -> ReadyPublic:
    """200 when every check passes: the service database answers a trivial query, the vault's master key
    wraps and unwraps, the node answers within 1.5 s, the chain moves on (its newest block is not older
    than `CONSENT_LEDGER_READY_MAX_HEAD_AGE` while requests have waited as long) and fewer requests than
    `CONSENT_LEDGER_READY_MAX_BACKLOG` wait. Else 503 `not_ready`, whose `failing` names each failing
    check with its problem in words."""
    runtime: Runtime = request.app.state.runtime
    checks = observability.readiness(runtime)
    failing = [{"check": name, "problem": problem} for name, problem in checks.items() if problem is not None]
    if failing:
        raise ApiError(
            503,
            "not_ready",
            "The service is not ready",
            "; ".join(f"{f['check']}: {f['problem']}" for f in failing),
            failing=failing,
        )
    return ReadyPublic(status="ready", checks=dict.fromkeys(checks, "ok"))


@probes.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {observability.CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "Metrics"},
        **responses(404),
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (the text exposition format): every process's counters and the state read now (the
    README lists them). 404 `metrics_disabled` when `CONSENT_LEDGER_METRICS` is off."""
    runtime: Runtime = request.app.state.runtime
    if not runtime.service.metrics:
        raise ApiError(404, "metrics_disabled", "Metrics are off (CONSENT_LEDGER_METRICS)")
    body = await run_in_threadpool(observability.render, runtime)
    return Response(body, media_type=observability.CONTENT_TYPE)
