"""The service database's schema: what an earlier version made is brought up to date by the next start."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from sqlalchemy import Engine, Table, column, insert, inspect, select, table, text
from sqlalchemy.exc import IntegrityError

from ledger.consent import ConsentRequest, RequestStatus
from ledger.consent.tables import LIVE_NONCE_INDEX
from ledger.store import create_schema

REQUESTS = cast(Table, ConsentRequest.__table__)
SUBJECT = os.urandom(32)
AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def request(n: int, nonce: int, status: RequestStatus, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"req-{n}",
        "kind": 1,
        "subject": SUBJECT,
        "partner": "0x" + "1" * 40,
        "purpose": b"p" * 32,
        "attributes": "1",
        "valid_until": 0,
        "nonce": nonce,
        "deadline": 1_900_000_000,
        "controller": "0x" + "2" * 40,
        "v": 27,
        "r": b"r" * 32,
        "s": b"s" * 32,
        "status": status,
        "created_at": AT,
        "updated_at": AT,
        **extra,
    }


def index_names(engine: Engine) -> set[str]:
    return {i["name"] for i in inspect(engine).get_indexes("consent_requests") if i["name"]}


def test_a_failed_request_frees_its_nonce_and_a_live_one_holds_it(service_db: Engine) -> None:
    with service_db.begin() as connection:
        connection.execute(insert(REQUESTS), [request(1, 0, RequestStatus.FAILED, failed_at=AT)])
        connection.execute(insert(REQUESTS), [request(2, 0, RequestStatus.PENDING)])  # re-signed with nonce 0
    with pytest.raises(IntegrityError), service_db.begin() as connection:
        connection.execute(insert(REQUESTS), [request(3, 0, RequestStatus.PENDING)])
    with service_db.begin() as connection:  # claimed and confirmed: the nonce stays held
        connection.execute(REQUESTS.update().values(status=RequestStatus.CONFIRMED))
    with pytest.raises(IntegrityError), service_db.begin() as connection:
        connection.execute(insert(REQUESTS), [request(4, 0, RequestStatus.PENDING)])


def test_a_database_made_before_failed_at_is_brought_up_to_date(service_db: Engine) -> None:
    """The earlier schema: no `failed_at`; live nonces unique by a partial index on status."""
    with service_db.begin() as connection:
        connection.execute(text(f"DROP INDEX {LIVE_NONCE_INDEX}"))
        connection.execute(text("ALTER TABLE consent_requests DROP COLUMN failed_at"))
        connection.execute(
            text(
                "CREATE UNIQUE INDEX uq_live_subject_nonce ON consent_requests (subject, nonce) "
                "WHERE status != 'failed'"
            )
        )
    earlier = table("consent_requests", *(column(c.name) for c in REQUESTS.columns if c.name != "failed_at"))
    with service_db.begin() as connection:
        connection.execute(
            insert(earlier), [request(1, 0, RequestStatus.FAILED), request(2, 0, RequestStatus.CONFIRMED)]
        )
    assert "uq_live_subject_nonce" in index_names(service_db)

    create_schema(service_db)
    create_schema(service_db)  # and again: nothing left to do

    names = index_names(service_db)
    assert LIVE_NONCE_INDEX in names
    assert "uq_live_subject_nonce" not in names
    with service_db.connect() as connection:
        rows = connection.execute(select(REQUESTS.c.id, REQUESTS.c.failed_at).order_by(REQUESTS.c.seq)).all()
    assert rows[0].id == "req-1"
    assert rows[0].failed_at is not None  # failed before the column existed: marked
    assert rows[1].failed_at is None
    with pytest.raises(IntegrityError), service_db.begin() as connection:
        connection.execute(insert(REQUESTS), [request(3, 0, RequestStatus.PENDING)])  # req-2 holds nonce 0


def test_two_processes_bringing_an_old_database_up_to_date_at_once_both_succeed(service_db: Engine) -> None:
    """`serve` and `principals add` may start together after an upgrade: one waits for the other."""
    with service_db.begin() as connection:
        connection.execute(text(f"DROP INDEX {LIVE_NONCE_INDEX}"))
        connection.execute(text("ALTER TABLE consent_requests DROP COLUMN failed_at"))
    start = threading.Barrier(3)
    failures: list[BaseException] = []

    def upgrade() -> None:
        start.wait()
        try:
            create_schema(service_db)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert LIVE_NONCE_INDEX in index_names(service_db)
    assert "failed_at" in {c["name"] for c in inspect(service_db).get_columns("consent_requests")}


def test_a_column_that_must_hold_a_value_is_not_added_as_null(service_db: Engine) -> None:
    """Old rows would hold NULL where the model says there is always a value: refused, not added."""
    with service_db.begin() as connection:
        connection.execute(text("ALTER TABLE consent_requests DROP COLUMN valid_until"))
    with pytest.raises(RuntimeError, match=r"consent_requests\.valid_until cannot be added"):
        create_schema(service_db)


def test_a_database_made_before_redemption_codes_is_brought_up_to_date(service_db: Engine) -> None:
    """The earlier schema: no partner reference on points requests, no code tables. Old rows keep theirs."""
    with service_db.begin() as connection:
        connection.execute(text("DROP TABLE redemption_code_ends"))
        connection.execute(text("DROP TABLE redemption_codes"))
        connection.execute(text("ALTER TABLE points_requests DROP COLUMN reference"))
        connection.execute(
            text(
                "INSERT INTO points_requests (id, kind, ref, subject, amount, expires_at, deadline, v, r, s, "
                "principal, status, indexed, created_at, updated_at) VALUES ('old', 'redeem', :ref, :subject, 5, "
                "0, 0, 27, :r, :r, 'acme', 'done', :indexed, :at, :at)"
            ),
            {"ref": os.urandom(32), "subject": SUBJECT, "r": b"r" * 32, "at": AT, "indexed": True},
        )
    assert "reference" not in {c["name"] for c in inspect(service_db).get_columns("points_requests")}

    create_schema(service_db)

    assert {"redemption_codes", "redemption_code_ends"} <= set(inspect(service_db).get_table_names())
    with service_db.connect() as connection:
        assert connection.execute(text("SELECT id, reference FROM points_requests")).all() == [("old", None)]
