"""The service database's shared machinery (SQLAlchemy): engines, sessions and the write lock, bulk
statements and group commit, the checkpointer, schema creation, and the indexer's own tables.

SQLite by default (WAL, one writer at a time), PostgreSQL by URL. Each pipeline's tables are its own
(`ledger.consent.tables`, `ledger.points.tables`, `ledger.access.tables`), declared on `Base`:
importing them registers them for `create_schema`. Accepted requests are committed here before the
API acknowledges them; the relayers put them on-chain; the indexer records what the chain says and
is the only writer of the read models.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    Integer,
    String,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import CursorResult, Dialect, Result
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, InstrumentedAttribute, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.expression import UpdateBase

log = logging.getLogger(__name__)


class LoggedEvent(Protocol):
    """Where a contract event sits in the chain (every contract's decoded events have this)."""

    @property
    def block_number(self) -> int: ...
    @property
    def block_hash(self) -> str: ...
    @property
    def log_index(self) -> int: ...
    @property
    def tx_hash(self) -> str: ...


def event_position(event: LoggedEvent, times: dict[int, int]) -> dict[str, Any]:
    """The columns every event row of the read model has: its place in the chain, and its block's time."""
    return {
        "block_number": event.block_number,
        "block_hash": event.block_hash,
        "log_index": event.log_index,
        "tx_hash": event.tx_hash,
        "block_time": times[event.block_number],
    }


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored here is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class IndexedEvent:
    """The columns every event table of the read model begins with: a row id, then the event's place in
    the chain and its block's time (what `event_position` gives). A mixin: its columns come before the
    table's own (`sort_order`), as each table declared them itself before."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True, sort_order=-1)
    block_number: Mapped[int] = mapped_column(BigInteger, sort_order=-1)
    block_hash: Mapped[str] = mapped_column(String(66), sort_order=-1)
    log_index: Mapped[int] = mapped_column(Integer, sort_order=-1)
    tx_hash: Mapped[str] = mapped_column(String(66), sort_order=-1)
    block_time: Mapped[int] = mapped_column(BigInteger, sort_order=-1)


T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class IndexedBlock(Base):
    """Hashes of recently indexed blocks, to notice a reorganisation."""

    __tablename__ = "indexed_blocks"

    number: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    hash: Mapped[str] = mapped_column(String(66))


class IndexerCursor(Base):
    __tablename__ = "indexer_cursor"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    block_number: Mapped[int] = mapped_column(BigInteger)


def create_schema(engine: Engine) -> None:
    """Create the service's tables, and bring a database an earlier version made up to date: columns
    and indexes declared since (`create_all` adds missing tables only), indexes no longer declared.
    One process at a time (`serve` and `principals add` may start together on an old database: each
    would find a column or index missing, and the second to add it would fail)."""
    with _schema_lock(engine):
        Base.metadata.create_all(engine)
        for column in sorted(_add_columns(engine) & BACKFILLS.keys()):
            with engine.begin() as connection:
                BACKFILLS[column](connection)
        for table in Base.metadata.sorted_tables:
            for index in table.indexes:
                index.create(engine, checkfirst=True)
        with engine.begin() as connection:
            for name in sorted(RETIRED_INDEXES):
                connection.execute(text(f"DROP INDEX IF EXISTS {name}"))


# What the tables' modules register for `create_schema` to bring an older database up to date: how to
# fill a column it adds, for the rows already there ("table.column" -> the statement, run once the column
# is added), and the indexes no longer declared, to drop.
BACKFILLS: dict[str, Callable[[Connection], None]] = {}
RETIRED_INDEXES: set[str] = set()

SCHEMA_LOCK = 0x636F6E73656E74  # a PostgreSQL advisory lock key of this service's schema changes


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """SQLite: the database's write lock (between threads and processes); PostgreSQL: an advisory lock,
    held by a connection of its own until the schema is up to date."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK})
                connection.commit()
        return
    with _write_lock(engine) or nullcontext():
        yield


def _add_columns(engine: Engine) -> set[str]:
    """Add the columns declared since a database was made to its tables; returns them ("table.column").
    Only nullable ones can be added (old rows get NULL): a column that must hold a value needs its own
    migration, so one is refused here rather than added wrong."""
    inspector = inspect(engine)
    added: set[str] = set()
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable or column.primary_key or column.server_default is not None:
                raise RuntimeError(f"{table.name}.{column.name} cannot be added to an existing database as NULL")
            kind = column.type.compile(dialect=engine.dialect)
            with engine.begin() as connection:
                connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
            added.add(f"{table.name}.{column.name}")
    return added


def delete_in_batches(
    sessions: Callable[[], AbstractContextManager[Session]],
    key: InstrumentedAttribute[Any],
    condition: ColumnElement[bool],
    *,
    batch: int,
) -> int:
    """Delete the rows of `key`'s table that meet `condition`, at most `batch` per write transaction (the
    write lock is shared with every request's writers); returns how many."""
    table = key.class_
    deleted = 0
    while True:
        with sessions() as session:
            chosen = select(key).where(condition).limit(batch).scalar_subquery()
            count = int(session.execute(delete(table).where(key.in_(chosen))).rowcount)  # type: ignore[attr-defined]
        deleted += count
        if count < batch:
            return deleted


def make_engine(url: str, *, durable: bool = True, checkpoints: bool = True) -> Engine:
    """An engine for the service database. `durable=False` (SQLite only) is for writers of what can be
    derived again, such as the indexer's read model (rebuilt from the chain from its cursor, which is
    in the same transactions): their commits are not synced to disk (WAL, synchronous=NORMAL) and are
    made durable by the next synced commit of any writer, as the log is one sequence. A power loss
    can lose only a suffix of them, never leave a part of one. This took the indexer's fsync (7.4 ms
    of its ~28 ms per block) out of the write lock every request's outbox commit queues on.

    `checkpoints=False` (SQLite): commits never copy the WAL back into the database; a `Checkpointer`
    must run beside them. SQLite's automatic checkpoint runs inside the commit that takes the WAL past
    1000 pages, and that writer holds the write lock meanwhile: copying ~4 MB and syncing the file
    made one commit in a few blocks' worth take 5-10 ms longer, and every writer queued behind it."""
    sqlite = url.startswith("sqlite")
    synchronous = "FULL" if durable else "NORMAL"
    # Request threads each hold a connection briefly; SQLite connections are cheap, so allow many.
    pool = {"pool_size": 32, "max_overflow": 64} if sqlite else {"pool_size": 16, "max_overflow": 16}
    # A pre-ping (a `SELECT 1` at every checkout) finds server connections that were dropped; a SQLite
    # file has none, and the ping cost a query per session on the hot paths.
    engine = create_engine(url, future=True, pool_pre_ping=not sqlite, **pool)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer
            cursor.execute(f"PRAGMA synchronous = {synchronous}")  # FULL: an acknowledged request survives power loss
            cursor.execute("PRAGMA busy_timeout = 10000")
            if not checkpoints:
                cursor.execute("PRAGMA wal_autocheckpoint = 0")  # `Checkpointer` does it, outside the lock
            cursor.close()

    return engine


class Checkpointer:
    """Copies a SQLite database's write-ahead log back into it, in the background, for engines made
    with `checkpoints=False`. A passive checkpoint waits for no reader or writer, and it takes no
    `WriteLock`: writers go on appending to the log while it copies and syncs."""

    def __init__(self, engine: Engine) -> None:
        self.path = _sqlite_file(engine)
        self._lock = _write_lock(engine)
        self._connection: sqlite3.Connection | None = None

    def _passive(self) -> tuple[int, int, int]:
        assert self.path is not None
        if self._connection is None:
            self._connection = sqlite3.connect(self.path, isolation_level=None, timeout=10, check_same_thread=False)
        busy, frames, copied = self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(busy), int(frames), int(copied)

    def step(self) -> tuple[int, int, int]:
        """Checkpoint: (1 if it could not run, frames in the log, frames copied). Most of the log is copied
        while writers go on; what they appended meanwhile is copied under the write lock, so that the copy
        is complete and the next writer starts the log from its beginning again (a log only ever copied
        beside busy writers is never complete, and grows without bound)."""
        if self.path is None:
            return (0, 0, 0)
        busy, frames, copied = self._passive()
        if busy or frames == 0:
            return busy, frames, copied
        assert self._lock is not None
        with self._lock:
            return self._passive()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def run(self, stop: threading.Event, interval: float = 0.5) -> None:
        try:
            while not stop.wait(interval):
                try:
                    self.step()
                except sqlite3.Error as exc:  # a busy database: the next round tries again
                    log.warning("checkpoint of %s failed: %s", self.path, exc)
        finally:
            self.close()


class WriteLock:
    """One writer at a time for a SQLite file: a lock between this process's threads, and a `flock` on
    a file beside the database between the service's processes (API workers and the supervisor).

    SQLite serialises writers itself, but a waiting writer sleeps in its busy handler in steps of up
    to 100 ms, and a read-then-write transaction that loses the race fails with SQLITE_BUSY instead of
    waiting. Queueing here, before the transaction begins, costs a writer only the time of the writes
    ahead of it. Re-entrant within a thread, as the thread lock is."""

    def __init__(self, path: str | None) -> None:
        self._thread_lock = threading.RLock()
        self._path = path
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> WriteLock:
        self._thread_lock.acquire()
        if self._path is not None and self._depth == 0:
            try:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *_exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()


def _sqlite_file(engine: Engine) -> str | None:
    """The path of the engine's SQLite database file; None for another database or one in memory."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database


def _write_lock(engine: Engine) -> WriteLock | None:
    if engine.dialect.name != "sqlite":
        return None
    database = _sqlite_file(engine)
    key = str(engine.url)
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(key)
        if lock is None:
            lock = _WRITE_LOCKS[key] = WriteLock(f"{database}-writer.lock" if database else None)
    return lock


class Sessions(sessionmaker[Session]):
    """A sessionmaker whose `begin()` first takes the database's write lock when it is SQLite (see
    `WriteLock`). Reads (`Sessions()`) take no lock: WAL readers never wait."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, expire_on_commit=False)
        self._lock = _write_lock(engine)

    @contextmanager
    def begin(self) -> Iterator[Session]:
        if self._lock is None:
            with super().begin() as session:
                yield session
            return
        with self._lock, super().begin() as session:
            yield session


_WRITE_LOCKS: dict[str, WriteLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE executed in a session changed (its result is a cursor's)."""
    return int(cast(CursorResult[Any], result).rowcount)


class Bulk:
    """A Core statement run for many rows by the driver's `executemany`, with the rows' parameters made
    ready beforehand (`prepare`, before the write lock is taken where the caller can).

    `connection.execute(statement, rows)` builds and converts every row's parameters itself, inside
    the call: for the indexer's 300-row confirmation UPDATE that was 8.5 ms, against 2.4 ms for the
    driver running the same SQL with the rows ready (measured on SQLite), and the indexer holds the
    write lock, which every request's commit queues on, meanwhile. The conversion is SQLAlchemy's
    own (each bind's type processor for the dialect); values given to `.values()` are fixed when the
    statement is made, so anything that changes per call (a time) must be a `bindparam`."""

    def __init__(self, statement: UpdateBase, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if compiled.escaped_bind_names or any(b.expanding for b in compiled.binds.values()):
            raise ValueError("Bulk takes plain bound parameters only")
        self.sql = compiled.string
        names = {bind: compiled.bind_names[bind] for bind in compiled.binds.values()}
        # A value given to `.values()` or a literal in a clause; a bare `bindparam` comes from each row.
        self._fixed = {name: bind.effective_value for bind, name in names.items() if not bind.required}
        self._names = list(compiled.positiontup or ()) if compiled.positional else list(names.values())
        self._positional = bool(compiled.positional)
        processors = {name: bind.type.dialect_impl(dialect).bind_processor(dialect) for bind, name in names.items()}
        self._steps = [(name, processors[name]) for name in self._names]

    def prepare(self, rows: Iterable[Mapping[str, Any]]) -> list[Any]:
        """Each row's parameters as the driver takes them: the row's values by bind name, over the
        statement's fixed ones."""
        fixed, steps = self._fixed, self._steps
        prepared: list[Any] = []
        for row in rows:
            values = []
            for name, process in steps:
                value = row[name] if name in row else fixed[name]
                values.append(value if process is None or value is None else process(value))
            prepared.append(tuple(values) if self._positional else dict(zip(self._names, values, strict=True)))
        return prepared

    def execute(self, connection: Connection, prepared: Sequence[Any]) -> int:
        """Run the statement for every prepared row; the rows it changed (for an UPDATE or DELETE)."""
        if not prepared:
            return 0
        return int(connection.exec_driver_sql(self.sql, list(prepared)).rowcount)


def sessions(engine: Engine) -> Sessions:
    return Sessions(engine)


def next_batch(items: queue.Queue[T | None], max_batch: int, linger: float) -> list[T] | None:
    """For a group-commit thread: the next item, and what else arrives within `linger` after it (at
    most `max_batch` in all); None once `None` was put (close), after the items before it."""
    first = items.get()
    if first is None:
        return None
    return [first, *drain(items, max_batch - 1, linger)]


def drain(items: queue.Queue[T | None], most: int, wait: float = 0.0) -> list[T]:
    """What is queued now and what arrives within `wait`, up to `most` items; a close (`None`) stays
    queued, seen again by the next call."""
    drained: list[T] = []
    deadline = time.monotonic() + wait
    while len(drained) < most:
        try:
            item = items.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if item is None:
            items.put(None)
            break
        drained.append(item)
    return drained


@dataclass
class _Insert:
    objects: Sequence[object]
    done: Future[None]


class _Waiting(Protocol):
    @property
    def done(self) -> Future[Any]: ...


W = TypeVar("W", bound=_Waiting)


def waiting(items: list[W]) -> list[W]:
    """The items whose callers still wait, each future now marked running: a caller that gave up first
    (an `asyncio.wait_for` timeout cancels the future it wraps) is not stored, and a caller giving up
    from now on no longer cancels its future, whose result the writer then sets (on a cancelled future
    that raised InvalidStateError, and the writer thread, which every later request waits on, died)."""
    return [item for item in items if item.done.set_running_or_notify_cancel()]


def fail_unsettled(items: Sequence[_Waiting], exc: BaseException) -> None:
    for item in items:
        if not item.done.done():
            item.done.set_exception(exc)


class GroupCommit:
    """Group commit for inserts from many threads: a writer thread stores what arrives within `linger`
    in one transaction (one write lock, one fsync) and tells each caller when its rows are durable.

    A batch that fails is stored again one caller at a time, so that only the caller whose rows broke
    it hears the error: a unique constraint (concurrent duplicates), a value the database cannot hold,
    whatever it was. One request's failure never fails another's (failures are the rare case)."""

    def __init__(
        self, engine: Engine, *, max_batch: int = 500, linger: float = 0.001, name: str = "group-commit"
    ) -> None:
        self._sessions = sessions(engine)
        self._queue: queue.Queue[_Insert | None] = queue.Queue()
        self.max_batch = max_batch
        self.linger = linger
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def insert(self, objects: Sequence[object], timeout: float = 30.0) -> None:
        """Store `objects` (new ORM rows) durably; raises what storing them raised."""
        self.submit(objects).result(timeout)

    def submit(self, objects: Sequence[object]) -> Future[None]:
        """Queue `objects` (new ORM rows); the future is done once they are durable, or failed with
        what storing them raised (for an event loop to await instead of blocking a thread)."""
        done: Future[None] = Future()
        self._queue.put(_Insert(objects, done))
        return done

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (batch := next_batch(self._queue, self.max_batch, self.linger)) is not None:
            batch = waiting(batch)
            try:
                self._write(batch)
            except Exception as exc:  # this thread serves every later request: it must not die
                log.exception("%s: a batch could not be stored", self._thread.name)
                fail_unsettled(batch, exc)

    def _write(self, batch: list[_Insert]) -> None:
        # ORM bulk inserts (a list of dicts per class) rather than add_all(): the unit of work's
        # per-object bookkeeping was most of this thread's time; the objects are not used afterwards.
        rows: dict[type, list[dict[str, Any]]] = {}
        for item in batch:
            for obj in item.objects:
                row = {k: v for k, v in vars(obj).items() if not k.startswith("_sa_")}
                rows.setdefault(type(obj), []).append(row)
        try:
            with self._sessions.begin() as session:
                for cls, values in rows.items():
                    session.execute(insert(cls), values)
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, OperationalError):
                # Rolled back (the rows are new again): store each caller's alone. Not when the database
                # itself failed (locked past its busy timeout, gone): each would wait as long again.
                for item in batch:
                    self._write([item])
                return
            for item in batch:
                item.done.set_exception(exc)
            return
        for item in batch:
            item.done.set_result(None)
