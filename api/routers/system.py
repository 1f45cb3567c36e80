"""Liveness, what the service is connected to, and whether its pipeline keeps up."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from api.errors import ApiError, responses
from api.runtime import Runtime
from ledger import consent, points
from ledger.consent import ConsentRequest
from ledger.errors import LedgerError
from ledger.indexer import CURSOR
from ledger.points import PointsRequest
from ledger.store import IndexerCursor, as_utc, utcnow

router = APIRouter(tags=["system"])

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


Requests = type[ConsentRequest] | type[PointsRequest]


def _head_of(table: Requests, status: str) -> Select[datetime]:
    """When the first request (by acceptance order) in `status` last moved: one index seek (status, seq)."""
    return select(table.updated_at).where(table.status == status).order_by(table.seq).limit(1)


def _oldest_unsettled(session: Session, table: Requests, statuses: Iterable[str]) -> float | None:
    moved = [t for status in statuses if (t := session.scalar(_head_of(table, status))) is not None]
    return None if not moved else max(0.0, (utcnow() - min(as_utc(t) for t in moved)).total_seconds())


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
            "consent": _oldest_unsettled(session, ConsentRequest, consent.LIVE),
            "points": _oldest_unsettled(session, PointsRequest, points.LIVE),
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
        contracts=[
            ContractPublic(name=name, address=c.address, deploy_block=c.block_number)
            for name, c in runtime.ledger.deployment.contracts.items()
        ],
    )
