"""Group commit shares a transaction between callers; a caller whose rows the database cannot store
must fail alone, whatever the reason (here: an integer beyond SQLite's signed 64-bit INTEGER)."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

from sqlalchemy import event, func, select

from ledger.points_store import PointsRequest
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
