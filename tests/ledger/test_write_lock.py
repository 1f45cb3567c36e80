"""Writing the service database: the write lock holds between processes (API workers and the
supervisor); group commit shares transactions between callers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError

from ledger.store import Base, Checkpointer, GroupCommit, IndexerCursor, WriteLock, make_engine, sessions

HOLDER = """
import sys
from ledger.store import WriteLock
lock = WriteLock(sys.argv[1])
with lock:
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_writer_in_another_process_waits_for_the_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "service.db-writer.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdin is not None
        assert holder.stdout.readline().strip() == "held"
        acquired = threading.Event()

        def write() -> None:
            with WriteLock(path):
                acquired.set()

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        assert not acquired.wait(0.5), "the lock was taken while another process held it"
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert acquired.wait(10), "the lock was not taken once released"
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_reentrant_within_a_thread_and_shared_by_an_engines_sessions(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    try:
        outer, inner = sessions(engine), sessions(engine)
        with outer.begin() as session:
            session.execute(text("CREATE TABLE t (x INTEGER)"))
        with outer.begin() as a:  # a nested write in the same thread does not deadlock on the flock
            a.execute(text("INSERT INTO t VALUES (1)"))
            with inner.begin() as b:
                b.execute(text("SELECT count(*) FROM t"))
        assert (tmp_path / "service.db-writer.lock").exists()
        with outer() as session:
            assert session.execute(text("SELECT count(*) FROM t")).scalar() == 1
    finally:
        engine.dispose()


def test_group_commit_shares_transactions_and_fails_only_a_conflicting_caller(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    Base.metadata.create_all(engine)
    commits: list[int] = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    writer = GroupCommit(engine, linger=0.2)
    outcomes: dict[str, str] = {}

    def put(caller: str, name: str) -> None:
        try:
            writer.insert([IndexerCursor(name=name, block_number=1)])
            outcomes[caller] = "stored"
        except IntegrityError:
            outcomes[caller] = "conflict"

    def together(calls: list[tuple[str, str]]) -> None:
        threads = [threading.Thread(target=put, args=call) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)

    try:
        together([(f"a{i}", f"a{i}") for i in range(10)])
        assert outcomes == {f"a{i}": "stored" for i in range(10)}
        assert len(commits) < 10, "ten callers arriving together did not share a transaction"
        # Two callers inserting the same key among others: one of the two conflicts, everyone else is stored.
        outcomes.clear()
        together([(f"b{i}", f"b{i}") for i in range(6)] + [("dup1", "same"), ("dup2", "same")])
        assert sorted(outcomes.values()).count("conflict") == 1
        assert {outcomes["dup1"], outcomes["dup2"]} == {"stored", "conflict"}
    finally:
        writer.close()
    with sessions(engine)() as session:
        assert session.execute(text("SELECT count(*) FROM indexer_cursor")).scalar() == 17
    engine.dispose()


def test_an_older_database_gets_the_indexes_declared_since(tmp_path: Path) -> None:
    """`create_all` adds missing tables only; `create_schema` also adds an index declared after the
    database was made, such as the one that finds a request by (subject, nonce), failed or not,
    without reading every request the subject ever made."""
    from ledger.store import create_schema

    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_requests_subject_nonce"))
    confirm = (
        "EXPLAIN QUERY PLAN UPDATE consent_requests SET status = 'confirmed' "
        "WHERE subject = x'00' AND nonce = 1 AND kind = 1 AND status != 'confirmed'"
    )
    with engine.connect() as connection:
        assert "ix_requests_subject_nonce" not in str(connection.execute(text(confirm)).all())
    create_schema(engine)
    create_schema(engine)  # and again: nothing to add
    with engine.connect() as connection:
        assert "USING INDEX ix_requests_subject_nonce (subject=? AND nonce=?)" in str(
            connection.execute(text(confirm)).all()
        )
    engine.dispose()


@pytest.mark.parametrize(
    ("query", "index"),
    [
        ("SELECT * FROM points_requests WHERE batch_id = 3", "ix_points_requests_batch"),
        ("SELECT * FROM points_requests WHERE status = 'done' AND indexed = 0", "ix_points_requests_unindexed"),
        ("SELECT seq FROM consent_requests WHERE status = 'pending' ORDER BY seq LIMIT 500", "ix_requests_status_seq"),
        (  # the indexer's confirmation (`ledger.consent.follower._CONFIRM`)
            "SELECT seq FROM consent_requests WHERE subject = x'00' AND nonce = 1 AND kind = 1 "
            "AND failed_at IS NULL AND status != 'confirmed'",
            "uq_live_nonce",
        ),
    ],
)
def test_queries_made_under_the_write_lock_use_an_index(tmp_path: Path, query: str, index: str) -> None:
    """Each runs with every process's writers waiting (or as often as the relayer settles a batch):
    a scan of a table that grows with every request would stall them more as the service ages."""
    import ledger.points.tables  # noqa: F401 - its tables
    from ledger.store import create_schema

    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    create_schema(engine)
    with engine.connect() as connection:
        plan = str(connection.execute(text(f"EXPLAIN QUERY PLAN {query}")).all())
    engine.dispose()
    assert f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan, plan


def _log_frames(path: Path) -> int:
    """Frames in the database's write-ahead log now (a passive checkpoint that copies nothing new)."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        return int(connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
    finally:
        connection.close()


def test_commits_leave_the_log_to_the_checkpointer_which_completes_it_beside_busy_writers(tmp_path: Path) -> None:
    path = tmp_path / "service.db"
    engine = make_engine(f"sqlite:///{path}", checkpoints=False)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE pages (data BLOB)")
    write = sessions(engine)

    def fill(pages: int) -> None:
        with write.begin() as session:
            session.execute(text("INSERT INTO pages VALUES (randomblob(4000))"), [{}] * pages)

    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == 0
    fill(3000)  # well past SQLite's automatic checkpoint at 1000 pages: no commit copied the log back
    assert _log_frames(path) > 3000
    checkpointer = Checkpointer(engine)
    busy, frames, copied = checkpointer.step()
    assert busy == 0
    assert copied == frames > 3000
    fill(1)
    assert _log_frames(path) < 10  # complete: the next writer started the log from its beginning

    # With a writer never pausing, a checkpoint made only beside it would never be complete and the log
    # would grow by every write; the checkpointer finishes under the write lock, so it stays short.
    stop = threading.Event()
    written = 0

    def writer() -> None:
        nonlocal written
        while not stop.is_set():
            fill(20)
            written += 20
            time.sleep(0.001)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        longest = 0
        for _ in range(20):
            time.sleep(0.05)
            longest = max(longest, checkpointer.step()[1])
    finally:
        stop.set()
        thread.join()
    checkpointer.close()
    assert longest < written / 2, (written, longest)  # never copied complete, the log would hold all of it
    assert _log_frames(path) <= longest
    engine.dispose()
