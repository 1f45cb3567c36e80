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
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, String, Text, create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.pool import NullPool

from ledger.files import write_atomically
from ledger.store import SCHEMA_LOCK, Base, sessions

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
