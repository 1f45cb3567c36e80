"""Which instance runs the chain's single writers when several instances of the service share one
PostgreSQL database: the one whose session holds a PostgreSQL advisory lock.

The relayer (the only user of the operator key and its nonce), the indexer (the only writer of the read
model) and the housekeeping must each run once across the instances; the API runs in all of them. Every
instance tries `pg_try_advisory_lock(LEADER_LOCK)` on a connection of its own; the one that gets it
starts its writers, the others poll every `poll` seconds. A session-level lock is held until its session
ends, and PostgreSQL ends the session of a dead process at once (its kernel closes the socket), so a
standby takes over within a poll of the leader's death.

Fencing. The leader confirms its session every `poll` seconds and acts as the leader only while the last
confirmation is younger than `lease` (`fresh`): its relayer sends nothing otherwise. The lock's session
has TCP keepalives and a TCP user timeout (`_SESSION`) of more than `lease`, so a leader cut off from
the database stops sending before the server ends its session and gives the lock to another. A leader
that finds its session gone calls `on_lost` (`serve` then exits, and its service manager starts it
again as a standby). A leader that is paused (SIGSTOP, a VM frozen) keeps its lock: its kernel keeps
answering the keepalives, so nobody takes over, and nothing is sent twice. Behind the lock, the chain
and the database refuse a second sender anyway: a batch's requests are claimed in the database before
it is signed (`ledger.consent.lane`: one claim wins), the node takes one transaction per operator
nonce, and the contracts apply each subject's nonce and each redemption id once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Connection,
    DateTime,
    Engine,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from ledger.errors import LedgerError
from ledger.files import write_atomically
from ledger.store import SCHEMA_LOCK, Base, rowcount, sessions, utcnow

log = logging.getLogger(__name__)

LEADER_LOCK = SCHEMA_LOCK + 1  # the advisory lock key of the chain's writers
DEPLOYMENT_LOCK = SCHEMA_LOCK + 2  # ... of reading, making and recording the deployment
APPLICATION_PREFIX = "consent-ledger leader "  # the lock session's application_name: prefix and instance

# The lock session's TCP settings, on both ends: a peer that stops answering ends the session after
# about 3 s (keepalive probes when idle, the user timeout when a query waits for its answer). More than
# the lease: a leader cut off from the database stops sending before the server lets the lock go.
_CONNECT = {
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 2,
    "tcp_user_timeout": 3000,
    "connect_timeout": 3,
}
_SESSION = (
    "SET tcp_keepalives_idle = 1",
    "SET tcp_keepalives_interval = 1",
    "SET tcp_keepalives_count = 2",
    "SET tcp_user_timeout = 3000",
)


class Leadership:
    """This instance's claim to lead: `try_acquire` once, then `run` in a thread of its own."""

    def __init__(self, url: str, instance: str, *, poll: float = 0.5, lease: float = 2.0) -> None:
        self.instance = instance
        self.poll = poll
        self.lease = lease
        application = (APPLICATION_PREFIX + instance)[:63]  # PostgreSQL keeps 63 bytes of it
        self._engine: Engine = create_engine(
            url, poolclass=NullPool, connect_args={**_CONNECT, "application_name": application}
        )
        self._connection: Connection | None = None
        self._leading = False
        self._confirmed = -math.inf  # when the lock's session last answered (monotonic)

    @property
    def leading(self) -> bool:
        return self._leading

    def fresh(self) -> bool:
        """Whether this instance may act as the leader now: it holds the lock, and its session answered
        within `lease` seconds."""
        return self._leading and time.monotonic() - self._confirmed < self.lease

    def try_acquire(self) -> bool:
        """Take the lock if no other session holds it; whether this instance leads now. Raises
        SQLAlchemyError when the database cannot be reached."""
        if self._leading:
            return True
        try:
            if self._connection is None:
                connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                self._connection = connection
                for statement in _SESSION:
                    connection.execute(text(statement))
            got = bool(self._connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK}))
        except SQLAlchemyError:
            self._drop()
            raise
        if got:
            self._leading, self._confirmed = True, time.monotonic()
        return got

    def confirm(self) -> bool:
        """While leading: whether the lock's session still answers (it holds the lock while it lives)."""
        if not self._leading or self._connection is None:
            return False
        try:
            self._connection.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            log.critical("the leader lock's database session is gone: %s", exc)
            self._drop()
            return False
        self._confirmed = time.monotonic()
        return True

    def run(self, stop: threading.Event, *, on_gained: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Until `stop`: as a standby, try for the lock every `poll` seconds and call `on_gained` once it is
        ours; as the leader, confirm the session as often, and call `on_lost` (then return) when it is gone."""
        while not stop.wait(self.poll):
            if self._leading:
                if not self.confirm():
                    on_lost()
                    return
                continue
            try:
                gained = self.try_acquire()
            except SQLAlchemyError as exc:
                log.warning("cannot reach the database for the leader lock: %s", exc)
                continue
            if gained:
                log.info("instance %s took over the chain's writers", self.instance)
                on_gained()

    def _drop(self) -> None:
        self._leading = False
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except SQLAlchemyError:
                connection.invalidate()

    def close(self) -> None:
        """Let the lock go, at once (a closed session's locks go when the server has ended it), and the
        engine."""
        if self._leading and self._connection is not None:
            with contextlib.suppress(SQLAlchemyError):  # the session is gone, and its locks with it
                self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LEADER_LOCK})
        self._drop()
        self._engine.dispose()


def leader_of(connection: Connection) -> str | None:
    """The instance holding the leader lock (read from PostgreSQL's lock table), None when none does."""
    name = connection.scalar(
        text(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
            " AND l.classid = CAST(:high AS oid) AND l.objid = CAST(:low AS oid)"
        ),
        {"high": LEADER_LOCK >> 32, "low": LEADER_LOCK & 0xFFFFFFFF},
    )
    if name is None:
        return None
    return str(name).removeprefix(APPLICATION_PREFIX)


class SharedDeployment(Base):
    """The deployment record (`deployment.json`) as the instances sharing this database know it."""

    __tablename__ = "shared_deployment"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    record: Mapped[str] = mapped_column(Text)


@contextlib.contextmanager
def shared_deployment(engine: Engine, path: Path) -> Iterator[None]:
    """Around opening the ledger (which deploys what is missing and records it in `path`) in an instance on
    PostgreSQL: the database's record is written to `path` first, and `path` back to the database after,
    one instance at a time. So a second instance, or a new machine, starts on the contracts the first
    deployed, never deploying its own."""
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": DEPLOYMENT_LOCK})
        connection.commit()
        try:
            with sessions(engine).begin() as session:
                row = session.get(SharedDeployment, "current")
                if row is not None and (not path.is_file() or path.read_text(encoding="utf-8") != row.record):
                    log.info("the deployment record of the shared database written to %s", path)
                    write_atomically(path, row.record)
            yield
            record = path.read_text(encoding="utf-8")
            with sessions(engine).begin() as session:
                row = session.get(SharedDeployment, "current")
                if row is None:
                    session.add(SharedDeployment(name="current", record=record))
                elif row.record != record:  # a rotated operator key is recorded in it
                    row.record = record
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": DEPLOYMENT_LOCK})
            connection.commit()


class LeaderCall(Base):
    """A call a standby instance asks the leader to make (what needs the operator key at once: a key
    binding), and its outcome; deleted by the asker once answered."""

    __tablename__ = "leader_calls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    args: Mapped[str] = mapped_column(Text)  # JSON
    taken: Mapped[bool] = mapped_column(Boolean, default=False)
    outcome: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: [failure or null, value]
    asked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LeaderCallFailed(LedgerError):
    """Raised when a call the leader made for this standby failed: `kind`, `message` and `extra` as the
    leader classified its exception (see `serve_calls`)."""

    def __init__(self, kind: str, message: str, extra: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.extra = extra


Classify = Callable[[BaseException], tuple[str, str, Any]]


def _json(value: Any) -> str:
    return json.dumps(value, default=lambda v: "0x" + v.hex() if isinstance(v, bytes) else str(v))


def ask_leader(
    sessions: Callable[[], AbstractContextManager[Session]],
    name: str,
    args: list[Any],
    *,
    timeout: float = 30.0,
    poll: float = 0.05,
) -> Any:
    """Have the leader instance make the call `name(*args)` (JSON values) and return its value; raises
    LeaderCallFailed with what it raised, or LedgerError when no leader took it within `timeout`."""
    with sessions() as session:
        call = LeaderCall(name=name, args=_json(args))
        session.add(call)
        session.flush()
        call_id = call.id
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            row = session.get(LeaderCall, call_id)
            assert row is not None, "a leader call's row goes only when its asker has read it"
            outcome = row.outcome
            if outcome is not None:
                session.delete(row)  # raised only once this is committed
                answered = True
            elif not row.taken and time.monotonic() > deadline:  # withdrawn, unless a leader took it meanwhile
                withdrawn = session.execute(
                    delete(LeaderCall).where(LeaderCall.id == call_id, LeaderCall.taken.is_(False))
                )
                answered = rowcount(withdrawn) == 1
            else:
                answered = False
        if answered:
            if outcome is None:
                raise LedgerError(f"no instance runs the chain's writers: {name} was not made")
            failure, value = json.loads(outcome)
            if failure is not None:
                raise LeaderCallFailed(*failure)
            return value
        # A call the leader took is waited for: it may be on its way to the chain.
        if time.monotonic() > deadline + timeout:
            raise LedgerError(f"the leader did not finish {name} in time")
        time.sleep(poll)


CALL_WORKERS = 8  # calls a leader makes at once: each waits for its block, and standbys' callers wait too
CALL_RETENTION = timedelta(minutes=10)  # a row whose asker or leader died is removed after this


def serve_calls(
    sessions: Callable[[], AbstractContextManager[Session]],
    calls: dict[str, Callable[..., Any]],
    classify: Classify,
    stop: threading.Event,
    *,
    poll: float = 0.05,
    workers: int = CALL_WORKERS,
) -> None:
    """The leader's side of `ask_leader`, in a thread of its own: take each call asked, make it (up to
    `workers` at once: each waits for its transaction's block, and one at a time let a burst of
    bindings on a standby outwait `ask_leader`'s timeout), record its outcome (a failure as `classify`
    tells it). Rows older than `CALL_RETENTION` are removed: those of an asker that died before
    reading its answer, or of a leader that died after taking a call (its asker gave up long before)."""

    def make(call_id: int, name: str, args: str) -> None:
        try:
            outcome = [None, calls[name](*json.loads(args))]
        except Exception as exc:
            outcome = [list(classify(exc)), None]
        try:
            with sessions() as session:
                session.execute(update(LeaderCall).where(LeaderCall.id == call_id).values(outcome=_json(outcome)))
        except Exception:
            log.exception("recording the outcome of a standby's %s failed", name)

    next_prune = 0.0
    with ThreadPoolExecutor(workers, thread_name_prefix="leader-call") as pool:
        while not stop.wait(poll):
            try:
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + 60
                    with sessions() as session:
                        session.execute(delete(LeaderCall).where(LeaderCall.asked_at < utcnow() - CALL_RETENTION))
                with sessions() as session:
                    asked = list(session.scalars(select(LeaderCall).where(LeaderCall.taken.is_(False))))
                for call in asked:
                    with sessions() as session:  # one leader: the claim only guards against a stale one
                        claimed = session.execute(
                            update(LeaderCall)
                            .where(LeaderCall.id == call.id, LeaderCall.taken.is_(False))
                            .values(taken=True)
                        )
                    if rowcount(claimed) == 1:
                        pool.submit(make, call.id, call.name, call.args)
            except Exception:  # the database may be away for a while; this thread must not die
                log.exception("serving the standbys' calls failed")
                stop.wait(0.5)
