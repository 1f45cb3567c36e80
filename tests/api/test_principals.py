"""`consent-ledger principals list|rotate|revoke` beside a running service (real anvil node, real
SQLite file, real HTTP server): a rotated or revoked key stops working without a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect, text

from api import deps
from api.auth import create_principal, digest, revoke_principal, service_caller
from api.cli import main
from ledger.store import create_schema, make_engine, sessions
from tests.api.conftest import Service, running_service

ROUTE = "/api/v1/purposes"  # any role may read it


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _key(out: str) -> str:
    return next(line.split()[2] for line in out.splitlines() if line.startswith("api key:"))


def _refused_soon(service: Service, key: str) -> None:
    """The key is refused once the API processes' cache of it has expired (CACHE_SECONDS)."""
    deadline = time.monotonic() + 10
    while True:
        answer = service.client.get(ROUTE, headers={"X-API-Key": key})
        if answer.status_code == 401:
            assert answer.json()["code"] == "invalid_api_key"
            return
        assert answer.status_code == 200, answer.text
        assert time.monotonic() < deadline, "the key still works"
        time.sleep(0.05)


def _works(client: httpx.Client, key: str) -> bool:
    return client.get(ROUTE, headers={"X-API-Key": key}).status_code == 200


def test_a_rotated_or_revoked_key_stops_working_while_the_service_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deps, "CACHE_SECONDS", 0.3)
    data = str(tmp_path)
    with running_service(tmp_path) as service:
        code, out, _ = _cli(capsys, "principals", "add", "--role", "auditor", "--name", "firm", "--data-dir", data)
        assert code == 0
        first = _key(out)
        assert _works(service.client, first)

        code, out, _ = _cli(capsys, "principals", "rotate", "--name", "firm", "--data-dir", data)
        assert code == 0
        second = _key(out)
        assert second != first
        assert _works(service.client, second)  # at once: a new key is never cached as unknown
        _refused_soon(service, first)

        code, out, _ = _cli(capsys, "principals", "revoke", "--name", "firm", "--data-dir", data)
        assert code == 0
        assert "firm (auditor) is revoked" in out
        _refused_soon(service, second)
        assert _works(service.client, service.auditor_key)  # the others' keys are untouched

        code, _, err = _cli(capsys, "principals", "rotate", "--name", "firm", "--data-dir", data)
        assert code == 2
        assert "'firm' was revoked at" in err
        code, _, err = _cli(capsys, "principals", "revoke", "--name", "nobody", "--data-dir", data)
        assert code == 2
        assert "no principal is named 'nobody'" in err
        assert _works(service.client, service.auditor_key)

        code, out, _ = _cli(capsys, "principals", "list", "--format", "json", "--data-dir", data)
        assert code == 0
        listed = {row["name"]: row for row in json.loads(out)}
        assert set(listed) == {"crm-operator", "acme", "audit-firm", "firm"}
        assert listed["firm"]["role"] == "auditor"
        assert listed["firm"]["key_rotated_at"] is not None
        assert listed["firm"]["revoked_at"] is not None
        assert listed["acme"]["address"] is not None
        assert listed["acme"]["revoked_at"] is None
        assert listed["acme"]["key_rotated_at"] is None
        code, table, _ = _cli(capsys, "principals", "list", "--data-dir", data)
        assert code == 0
        header = ["name", "role", "address", "created_at", "key_rotated_at", "revoked_at"]
        assert table.splitlines()[0].split() == header
        assert len(table.splitlines()) == 5
        for key in (first, second, service.auditor_key):  # no key nor its hash is ever printed
            assert key not in out + table
            assert digest(key) not in out + table


def test_a_database_made_before_key_rotation_and_revocation_gets_their_columns(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    create_schema(engine)
    with sessions(engine).begin() as session:
        _, key = create_principal(session, "old-firm", "auditor")
    with engine.begin() as connection:  # as the earlier version made it
        connection.execute(text("ALTER TABLE principals DROP COLUMN key_rotated_at"))
        connection.execute(text("ALTER TABLE principals DROP COLUMN revoked_at"))
    create_schema(engine)
    assert {"key_rotated_at", "revoked_at"} <= {c["name"] for c in inspect(engine).get_columns("principals")}
    with sessions(engine)() as session:
        caller = service_caller(session, key)
    assert caller is not None
    assert caller.name == "old-firm"
    with sessions(engine).begin() as session:
        revoke_principal(session, "old-firm")
    with sessions(engine)() as session:
        assert service_caller(session, key) is None
    engine.dispose()
