"""The service database's write lock holds between processes (API workers and the supervisor)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from sqlalchemy import text

from ledger.store import WriteLock, make_engine, sessions

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
