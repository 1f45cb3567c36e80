"""Prometheus metrics, request ids and the readiness checks of the service.

Several processes serve one port (`serve`: a supervisor and API workers). A counter is counted by the
process where its event happens (an API worker: HTTP requests, accepted consent changes, redemptions,
erasures; the supervisor: confirmations, failures, access entries, `ledger.metrics`) in
prometheus-client's multiprocess mode: `serve` makes `PROMETHEUS_MULTIPROC_DIR` (`metrics/<pid>` in the
data dir, new at each start: `api.cli`) before any metric exists, every process writes its values to files there,
and `/metrics`, in whichever worker answers, sums every process's files (`MultiProcessCollector`),
those of workers that died and were started again included (a counter must not go back).

What is a state rather than an event (backlogs and their age, indexer lag, head age, points liability
and what expires within 30 days) is read at scrape time from the database and the node
(`DomainCollector`), not kept as gauges: each is one query for whichever process answers, always
current, and the same whoever answers; gauges pushed by many processes would need each to poll the
database and the multiprocess mode to pick one process's value (`livemax`, ...), stale between polls
and wrong for a process that died. The node is asked with a timeout (`ChainBackend.head_block`): a
stalled node leaves its gauges out (and `consent_ledger_chain_up` 0) but never holds a scrape.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Select, func, select, text
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.logs import REQUEST_ID
from ledger import consent, points
from ledger.consent import ConsentRequest
from ledger.errors import LedgerError
from ledger.indexer import CURSOR
from ledger.leader import leader_of
from ledger.points import PointsLot, PointsRequest
from ledger.store import IndexerCursor, as_utc, utcnow

if TYPE_CHECKING:
    from api.runtime import Runtime

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED = "unmatched"  # the route label of every request no route matched: no raw path is a label
EXPIRING_WITHIN = 30 * 86_400  # seconds: "points expiring in 30 days"

HTTP_REQUESTS = Counter(
    "consent_ledger_http_requests",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "consent_ledger_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by method and route template",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
REDEMPTIONS = Counter(
    "consent_ledger_redemptions",
    "Points redemptions answered, by outcome: done or refused (retries not counted)",
    ["outcome"],
)
ERASURES = Counter("consent_ledger_vault_erasures", "Customers whose personal data the vault erased (crypto-shredding)")


# HTTP ----------------------------------------------------------------------------------------------

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def route_label(scope: Scope, templates: dict[int, str]) -> str:
    """The template of the route that served the request (`/api/v1/customers/{did}`), never its path.
    FastAPI puts the route as its router declared it in the scope, its path without the prefix the
    router was included under: `templates` has the whole template of each route included with one
    (by `id`: the routes, which live as long as the app, compare by value and are not hashable)."""
    route = scope.get("route")
    if route is None:
        return UNMATCHED
    template = templates.get(id(route))
    if template is not None:
        return template
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class Observe:
    """Outermost middleware: gives each request an id (the client's `X-Request-ID` when it is a plain
    token of at most 64 characters, else a new one), answers with it, binds it for the log
    (`api.logs.REQUEST_ID`), and counts the request by route template and status."""

    def __init__(self, app: ASGIApp, *, metrics: bool = True, templates: dict[int, str] | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.templates = templates if templates is not None else {}
        # Each (method, route, status)'s children, looked up once: `labels()` took ~2 us a call.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                request_id = candidate if _REQUEST_ID.fullmatch(candidate) else None
                break
        request_id = request_id or uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        header = (b"x-request-id", request_id.encode("ascii"))
        status = 500  # what the server answers when the app raises before starting an answer
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            REQUEST_ID.reset(token)
            if self.metrics:
                key = (scope["method"], route_label(scope, self.templates), status)
                children = self._children.get(key)
                if children is None:  # the routes' templates, methods and statuses: a bounded set
                    method, route, _ = key
                    children = HTTP_REQUESTS.labels(method, route, str(status)), HTTP_DURATION.labels(method, route)
                    self._children[key] = children
                children[0].inc()
                children[1].observe(time.perf_counter() - started)


# The database's and the node's state, read at scrape time -----------------------------------------

Requests = type[ConsentRequest] | type[PointsRequest]
PIPELINES: dict[str, tuple[Requests, tuple[str, ...]]] = {
    "consent": (ConsentRequest, tuple(consent.LIVE)),
    "points": (PointsRequest, tuple(points.LIVE)),
}


def _head_of(table: Requests, status: str) -> Select[datetime]:
    """When the first request (by acceptance order) in `status` last moved: one index seek (status, seq)."""
    return select(table.updated_at).where(table.status == status).order_by(table.seq).limit(1)


def oldest_unsettled(session: Session, table: Requests, statuses: Iterable[str]) -> float | None:
    """Seconds since the oldest unsettled request last moved (accepted, sent, queued again); None: none."""
    moved = [t for status in statuses if (t := session.scalar(_head_of(table, status))) is not None]
    return None if not moved else max(0.0, (utcnow() - min(as_utc(t) for t in moved)).total_seconds())


def backlog(session: Session, table: Requests, statuses: Iterable[str]) -> int:
    """Requests accepted and not yet settled (confirmed, done or failed)."""
    return int(session.scalar(select(func.count()).select_from(table).where(table.status.in_(list(statuses)))) or 0)


def points_outstanding(session: Session, now: int) -> tuple[int, int]:
    """Unexpired points not yet redeemed (the programme's liability), and those of them expiring within
    30 days, from the read model's lots."""
    unexpired = select(func.coalesce(func.sum(PointsLot.remaining), 0)).where(PointsLot.expires_at > now)
    liability = session.scalar(unexpired)
    expiring = session.scalar(
        select(func.coalesce(func.sum(PointsLot.remaining), 0)).where(
            PointsLot.expires_at > now, PointsLot.expires_at <= now + EXPIRING_WITHIN
        )
    )
    return int(liability or 0), int(expiring or 0)


class DomainCollector(Collector):
    """The gauges read when scraped (see the module's docstring for why not kept as gauges)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        now = time.time()
        backlog_g = GaugeMetricFamily(
            "consent_ledger_relayer_backlog", "Requests accepted and not yet settled, per pipeline", labels=["pipeline"]
        )
        oldest_g = GaugeMetricFamily(
            "consent_ledger_relayer_oldest_age_seconds",
            "Seconds since the oldest unsettled request last moved, per pipeline (0: none waits)",
            labels=["pipeline"],
        )
        yield GaugeMetricFamily(
            "consent_ledger_leader",
            "1 when this instance runs the chain's writers (relayer, indexer: the leader lock's holder), 0 when it "
            "stands by",
            value=int(leader(runtime) == runtime.service.instance_name),
        )
        with runtime.reads() as session:
            for pipeline, (table, statuses) in PIPELINES.items():
                backlog_g.add_metric([pipeline], backlog(session, table, statuses))
                oldest_g.add_metric([pipeline], oldest_unsettled(session, table, statuses) or 0.0)
            cursor = session.get(IndexerCursor, CURSOR)
            liability, expiring = points_outstanding(session, int(now))
        yield backlog_g
        yield oldest_g
        yield GaugeMetricFamily(
            "consent_ledger_points_liability", "Issued points neither redeemed nor expired", value=liability
        )
        yield GaugeMetricFamily(
            "consent_ledger_points_expiring_30d", "Of those, the points that expire within 30 days", value=expiring
        )
        try:
            head, stamp = runtime.ledger.backend.head_block()
        except LedgerError:
            yield GaugeMetricFamily("consent_ledger_chain_up", "Whether the chain node answered the scrape", value=0)
            return
        yield GaugeMetricFamily("consent_ledger_chain_up", "Whether the chain node answered the scrape", value=1)
        yield GaugeMetricFamily("consent_ledger_chain_head_block", "The chain's newest block", value=head)
        yield GaugeMetricFamily(
            "consent_ledger_chain_head_age_seconds",
            "Seconds since the newest block's timestamp (a managed node makes blocks only when there is work)",
            value=max(0.0, now - stamp),
        )
        if cursor is not None:
            yield GaugeMetricFamily(
                "consent_ledger_indexer_lag_blocks",
                "Blocks the read model is behind the chain",
                value=max(0, head - cursor.block_number),
            )


def leader(runtime: Runtime) -> str | None:
    """The instance that runs the chain's writers: on PostgreSQL the leader lock's holder (`ledger.leader`),
    read from the database, the same in every process of every instance; otherwise this instance."""
    if runtime.engine.dialect.name != "postgresql":
        return runtime.service.instance_name
    with runtime.engine.connect() as connection:
        return leader_of(connection)


def render(runtime: Runtime) -> bytes:
    """The metrics in Prometheus' text format: every process's counters, and the state read now."""
    if MULTIPROC_ENV in os.environ:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:  # one process (tests, the in-process chain): its own counters
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    registry.register(DomainCollector(runtime))
    return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return iter(self.registry.collect())


# Readiness -----------------------------------------------------------------------------------------


def readiness(runtime: Runtime) -> dict[str, str | None]:
    """Each check's problem in plain words, None where it passes: database, vault key, node, head, backlog."""
    service = runtime.service
    checks: dict[str, str | None] = {}
    waiting: float | None = None
    count = 0
    try:
        with runtime.reads() as session:
            session.execute(text("SELECT 1"))
            for table, statuses in PIPELINES.values():
                count += backlog(session, table, statuses)
                age = oldest_unsettled(session, table, statuses)
                waiting = age if waiting is None or (age is not None and age > waiting) else waiting
        checks["database"] = None
    except Exception as exc:  # whatever the driver raises: the answer is "not ready", with its kind
        log.warning("readiness: the service database failed: %s", exc)
        checks["database"] = f"the service database does not answer ({type(exc).__name__})"
    try:
        keys = runtime.vault.keys
        probe = os.urandom(32)
        key_id = keys.current_key_id
        if keys.unwrap(key_id, keys.wrap(key_id, probe, b"readyz"), b"readyz") != probe:
            raise ValueError("the round trip changed the key")
        checks["vault_key"] = None
    except Exception as exc:
        log.warning("readiness: the vault master key failed: %s", type(exc).__name__)
        checks["vault_key"] = f"the vault's master key cannot be used ({type(exc).__name__})"
    try:
        _head, stamp = runtime.ledger.backend.head_block()
        checks["node"] = None
        age = time.time() - stamp
        limit = service.ready_max_head_age
        # A managed node makes a block only when a transaction waits: an old head is a stall only while
        # requests have waited that long for one.
        if age > limit and waiting is not None and waiting > limit:
            checks["head"] = f"the chain's newest block is {age:.0f} s old while requests have waited {waiting:.0f} s"
        else:
            checks["head"] = None
    except LedgerError as exc:
        checks["node"] = str(exc)
        checks["head"] = "unknown: the chain node did not answer"
    if checks["database"] is None:
        limit_n = service.ready_max_backlog
        checks["backlog"] = (
            f"{count} accepted requests wait to be settled (the limit is {limit_n})" if count > limit_n else None
        )
    else:
        checks["backlog"] = "unknown: the service database did not answer"
    return checks
