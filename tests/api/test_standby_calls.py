"""What a standby instance asks the leader instance to send with the operator key, through the database
(`ledger.leader`), reaches the leader's writers with the arguments the standby had: a key binding, and
each step of a key recovery (the veto's signature as bytes, not the JSON text that carried it)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine

from api.runtime import Runtime, _classify
from ledger.errors import LedgerError
from ledger.leader import serve_calls
from ledger.store import sessions


class _Writers:
    """The leader's bindings, as far as these calls reach them: what each was asked, and an answer."""

    def __init__(self) -> None:
        self.made: list[tuple[Any, ...]] = []
        self.indexer = type("Indexer", (), {"wake": threading.Event()})()
        self.bindings = self

    def bind(self, subject: bytes, controller: str) -> Any:
        self.made.append(("bind", bytes(subject), controller))
        return type("Receipt", (), {"tx_hash": "0xb1", "block_number": 3})()

    def recovery(self, action: str, subject: bytes, *args: Any) -> Any:
        self.made.append((action, bytes(subject), *args))
        return type("Receipt", (), {"tx_hash": "0xr1", "block_number": 4})()


def _runtime(engine: Engine, writers: _Writers | None) -> Runtime:
    """A Runtime with only what these calls use: its database, and the chain's writers if it leads."""
    runtime = Runtime.__new__(Runtime)
    runtime.sessions = sessions(engine).begin  # type: ignore[method-assign]
    runtime.writers = writers  # type: ignore[assignment]
    runtime.leadership = None
    return runtime


def test_a_standby_s_binding_and_recovery_steps_are_made_by_the_leader_with_their_arguments(
    calls_db: Engine,
) -> None:
    writers = _Writers()
    leader, standby = _runtime(calls_db, writers), _runtime(calls_db, None)
    stop = threading.Event()
    serving = threading.Thread(
        target=serve_calls, args=(leader.sessions, leader.leader_calls(), _classify, stop), daemon=True
    )
    serving.start()
    subject, key, signature = bytes(range(32)), "0x" + "ab" * 20, bytes(range(65))
    try:
        assert standby._bind_controller(subject, key) == ("0xb1", 3)
        assert standby._recovery("start", subject, key) == ("0xr1", 4)
        assert standby._recovery("cancel", subject, key, 1_700_000_000, 1_700_000_600, signature) == ("0xr1", 4)
        assert standby._recovery("complete", subject) == ("0xr1", 4)
    finally:
        stop.set()
        serving.join(timeout=5)
    assert writers.made == [
        ("bind", subject, key),
        ("start", subject, key),
        ("cancel", subject, key, 1_700_000_000, 1_700_000_600, signature),
        ("complete", subject),
    ]


def test_a_leader_whose_lock_is_not_known_fresh_sends_no_binding_or_recovery(calls_db: Engine) -> None:
    """Fencing outside the relayer: a leader whose lock session has not answered within its lease may no
    longer be the leader (another instance may have taken over), so it signs nothing with the operator key."""
    writers = _Writers()
    leader = _runtime(calls_db, writers)
    leader.leadership = type("Stale", (), {"fresh": lambda self: False})()
    with pytest.raises(LedgerError, match="no longer runs the chain's writers"):
        leader._bind_controller(bytes(32), "0x" + "ab" * 20)
    with pytest.raises(LedgerError, match="no longer runs the chain's writers"):
        leader._recovery("complete", bytes(32))
    assert writers.made == []
    leader.leadership = type("Fresh", (), {"fresh": lambda self: True})()
    assert leader._bind_controller(bytes(32), "0x" + "ab" * 20) == ("0xb1", 3)
