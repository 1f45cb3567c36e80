"""Group commit shares a transaction between callers; a caller whose rows the database cannot store
must fail alone, whatever the reason (here: an integer beyond SQLite's signed 64-bit INTEGER)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

from ledger.points import PointsRequest
from ledger.store import Base, GroupCommit, make_engine, sessions


def _issuance(amount: int) -> PointsRequest:
    return PointsRequest(
        id=str(uuid.uuid4()), kind="issue", ref=os.urandom(32), subject=os.urandom(32), amount=amount, principal="t"
    )


def test_a_row_the_database_cannot_hold_fails_only_its_caller(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    Base.metadata.create_all(engine)
    commits: list[int] = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    writer = GroupCommit(engine, linger=0.2)
    outcomes: dict[str, str] = {}
    start = threading.Barrier(21)

    def put(caller: str, amount: int) -> None:
        start.wait(10)
        try:
            writer.insert([_issuance(amount)])
            outcomes[caller] = "stored"
        except Exception as exc:  # what storing the caller's rows raised
            outcomes[caller] = type(exc).__name__

    calls = [(f"ok{i}", 10 + i) for i in range(20)] + [("bad", 2**63)]
    threads = [threading.Thread(target=put, args=call) for call in calls]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    finally:
        writer.close()
    assert {caller: outcome for caller, outcome in outcomes.items() if caller != "bad"} == {
        f"ok{i}": "stored" for i in range(20)
    }
    assert outcomes["bad"] != "stored"
    with sessions(engine)() as session:
        assert session.scalar(select(func.count()).select_from(PointsRequest)) == 20
        assert session.scalar(select(func.max(PointsRequest.amount))) == 29
    engine.dispose()


def test_a_caller_that_gave_up_does_not_stop_the_writer(tmp_path: Path) -> None:
    """Giving up on a commit (`asyncio.wait_for` timing out) cancels the caller's future; the writer then
    set a result on it, InvalidStateError killed its thread, and every later request waited for ever."""
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    Base.metadata.create_all(engine)
    lock = sessions(engine)._lock
    assert lock is not None
    writer = GroupCommit(engine, linger=0)
    try:
        with lock:  # another writer holds the lock: this one waits for it with the first row taken
            taken = writer.submit([_issuance(1)])
            deadline = time.monotonic() + 10
            while writer._queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            gave_up = taken.cancel()
            dropped = writer.submit([_issuance(2)])
            assert dropped.cancel()  # queued still: never stored
        assert not gave_up
        taken.result(10)
        writer.insert([_issuance(3)], timeout=10)  # the writer lives on
    finally:
        writer.close()
    with sessions(engine)() as session:
        assert sorted(session.scalars(select(PointsRequest.amount))) == [1, 3]
    engine.dispose()


def test_a_database_that_fails_answers_the_batch_once_not_once_per_caller(tmp_path: Path) -> None:
    """A database locked past its busy timeout (10 s) or gone fails a batch for everyone in it: storing
    each caller's rows alone then would make the last of 500 callers wait 500 times as long."""
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    Base.metadata.create_all(engine)
    attempts: list[int] = []

    def locked(*_args: object) -> None:
        attempts.append(1)
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))

    writer = GroupCommit(engine, linger=0.2)
    event.listen(engine, "before_cursor_execute", locked)
    try:
        pending = [writer.submit([_issuance(n)]) for n in range(1, 6)]  # one batch of five callers
        for future in pending:
            assert isinstance(future.exception(10), OperationalError)
    finally:
        event.remove(engine, "before_cursor_execute", locked)
        writer.close()
    assert len(attempts) == 1
    engine.dispose()
