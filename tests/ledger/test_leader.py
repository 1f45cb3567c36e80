"""The leader lock on a real PostgreSQL server: one holder at a time, a standby takes over when the
leader's session ends, and a leader whose session is gone stops acting as the leader (fencing); and the
calls a standby asks the leader to make through the database."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text

from ledger.errors import ConsentRejected, LedgerError
from ledger.leader import LeaderCall, LeaderCallFailed, Leadership, ask_leader, leader_of, serve_calls
from ledger.store import sessions


@pytest.fixture
def admin(postgres_url: str) -> Iterator[Engine]:
    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def _end_session(admin: Engine, instance: str) -> None:
    """End the lock session of `instance` from the server's side, as when its process dies."""
    with admin.connect() as connection:
        ended = connection.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = :name AND pid <> pg_backend_pid()"
            ),
            {"name": f"consent-ledger leader {instance}"},
        )
    assert ended == 1


def _holder(admin: Engine) -> str | None:
    with admin.connect() as connection:
        return leader_of(connection)


def test_one_holder_and_a_take_over_when_its_session_ends(postgres_url: str, admin: Engine) -> None:
    first, second = Leadership(postgres_url, "first", poll=0.05), Leadership(postgres_url, "second", poll=0.05)
    stop, gained, lost = threading.Event(), threading.Event(), threading.Event()
    standby = threading.Thread(
        target=second.run, args=(stop,), kwargs={"on_gained": gained.set, "on_lost": lost.set}, daemon=True
    )
    try:
        assert first.try_acquire() is True
        assert second.try_acquire() is False
        assert (first.leading, first.fresh(), second.leading, second.fresh()) == (True, True, False, False)
        assert _holder(admin) == "first"

        standby.start()
        time.sleep(0.3)
        assert not gained.is_set(), "the standby took the lock from a live leader"

        _end_session(admin, "first")
        assert gained.wait(5), "the standby did not take over"
        assert second.fresh()
        assert _holder(admin) == "second"
        assert not first.confirm()
        assert not first.leading
        assert not first.fresh()
        assert not lost.is_set()
    finally:
        stop.set()
        standby.join(timeout=5)
        first.close()
        second.close()
    assert _holder(admin) is None  # closing lets the lock go


def test_a_leader_whose_session_is_gone_calls_on_lost_and_is_no_longer_fresh(postgres_url: str, admin: Engine) -> None:
    leader = Leadership(postgres_url, "fenced", poll=0.05, lease=0.5)
    stop, lost = threading.Event(), threading.Event()
    try:
        assert leader.try_acquire()
        watcher = threading.Thread(
            target=leader.run, args=(stop,), kwargs={"on_gained": lambda: None, "on_lost": lost.set}, daemon=True
        )
        watcher.start()
        time.sleep(0.2)
        assert leader.fresh()
        assert not lost.is_set()
        _end_session(admin, "fenced")
        assert lost.wait(5), "the leader did not notice that its lock was gone"
        assert not leader.fresh()
        watcher.join(timeout=5)
        assert not watcher.is_alive()  # it stops watching once the lock is gone
    finally:
        stop.set()
        leader.close()


def test_a_leader_that_cannot_confirm_its_session_is_not_fresh_after_its_lease(postgres_url: str) -> None:
    # A paused leader (or one whose checks hang) acts as the leader only within `lease` of its last check.
    leader = Leadership(postgres_url, "paused", lease=0.3)
    try:
        assert leader.try_acquire()
        assert leader.fresh()
        time.sleep(0.4)
        assert leader.leading
        assert not leader.fresh()
        assert leader.confirm()
        assert leader.fresh()
    finally:
        leader.close()


def _classify(exc: BaseException) -> tuple[str, str, Any]:
    if isinstance(exc, ConsentRejected):
        return "rejected", str(exc), (exc.error, exc.args_by_name)
    return "error", str(exc), None


def test_a_standby_call_is_made_by_the_leader_with_its_value_or_its_refusal(calls_db: Engine) -> None:
    made: list[tuple[str, str]] = []

    def bind(subject: str, controller: str) -> tuple[str, int]:
        if controller == "taken":
            raise ConsentRejected("ConsentRegistryControllerAlreadySet", {"subject": bytes.fromhex(subject)})
        made.append((subject, controller))
        return "0xabc", 7

    stop = threading.Event()
    leader = threading.Thread(
        target=serve_calls, args=(sessions(calls_db).begin, {"bind_controller": bind}, _classify, stop), daemon=True
    )
    leader.start()
    try:
        ask = sessions(calls_db).begin
        assert ask_leader(ask, "bind_controller", ["01ff", "0xC0"]) == ["0xabc", 7]
        assert made == [("01ff", "0xC0")]
        with pytest.raises(LeaderCallFailed) as refused:
            ask_leader(ask, "bind_controller", ["02", "taken"])
        assert refused.value.kind == "rejected"
        assert refused.value.extra == ["ConsentRegistryControllerAlreadySet", {"subject": "0x02"}]
        assert made == [("01ff", "0xC0")]
    finally:
        stop.set()
        leader.join(timeout=5)
    with sessions(calls_db)() as session:
        assert session.scalar(select(func.count()).select_from(LeaderCall)) == 0  # the asker deletes what it read


def test_a_call_no_leader_takes_fails_and_is_withdrawn(calls_db: Engine) -> None:
    with pytest.raises(LedgerError, match="no instance runs the chain's writers"):
        ask_leader(sessions(calls_db).begin, "bind_controller", ["01", "0xC0"], timeout=0.3)
    with sessions(calls_db)() as session:
        assert session.scalar(select(func.count()).select_from(LeaderCall)) == 0  # a later leader will not make it


def test_a_leader_makes_standbys_calls_at_once_and_removes_rows_left_by_the_dead(calls_db: Engine) -> None:
    """Calls wait for their block: made one at a time, a burst of bindings on a standby outwaited the
    asker's timeout. Four calls that each finish only when all four are being made (a barrier) finish.
    And a row whose leader died after taking it (no outcome, asked long ago) is removed."""
    barrier = threading.Barrier(4, timeout=10)

    def bind(subject: str, controller: str) -> tuple[str, int]:
        barrier.wait()  # BrokenBarrierError (the call fails) unless four are made at once
        return "0x" + subject, 1

    with sessions(calls_db).begin() as session:
        session.add(
            LeaderCall(name="bind_controller", args="[]", taken=True, asked_at=datetime.now(UTC) - timedelta(hours=1))
        )
    stop = threading.Event()
    leader = threading.Thread(
        target=serve_calls, args=(sessions(calls_db).begin, {"bind_controller": bind}, _classify, stop), daemon=True
    )
    leader.start()
    try:
        answers: list[Any] = [None] * 4

        def ask(i: int) -> None:
            answers[i] = ask_leader(sessions(calls_db).begin, "bind_controller", [f"0{i}", "0xC0"])

        askers = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join(timeout=30)
        assert answers == [["0x00", 1], ["0x01", 1], ["0x02", 1], ["0x03", 1]]
    finally:
        stop.set()
        leader.join(timeout=15)
    with sessions(calls_db)() as session:
        assert session.scalar(select(func.count()).select_from(LeaderCall)) == 0  # the dead leader's row too
