"""`Bulk` runs the indexer's statements through the driver with the rows prepared beforehand: what it
writes must be exactly what SQLAlchemy's own `execute` writes, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from sqlalchemy import Engine, Table, bindparam, insert, select, update

from ledger.consent import ConsentEvent, ConsentRequest, RequestStatus, follower
from ledger.store import Base, Bulk, create_schema

REQUESTS = cast(Table, ConsentRequest.__table__)
EVENTS = cast(Table, ConsentEvent.__table__)
SUBJECTS = [os.urandom(32) for _ in range(5)]
AT = datetime(2026, 12, 5, 9, 30, 15, 123456, tzinfo=UTC)


def requests() -> list[dict[str, Any]]:
    return [
        {
            "id": f"req-{i}",
            "kind": 1 + i % 2,
            "subject": SUBJECTS[i % 5],
            "partner": "0x" + "1" * 40,
            "purpose": bytes([i]) * 32,
            "attributes": str(2**200 + i),  # a uint256 mask, beyond 64 bits
            "valid_until": 0,
            "nonce": i // 5,
            "deadline": 1_900_000_000,
            "controller": "0x" + "2" * 40,
            "v": 27,
            "r": b"r" * 32,
            "s": b"s" * 32,
            "status": RequestStatus.FAILED if i == 7 else RequestStatus.SUBMITTED,
            "failed_at": AT if i == 7 else None,
            "created_at": AT,
            "updated_at": AT,
        }
        for i in range(20)
    ]


def events() -> list[dict[str, Any]]:
    return [
        {
            "block_number": 10 + i // 4,
            "block_hash": "0x" + f"{10 + i // 4:064x}",
            "log_index": i % 4,
            "tx_hash": "0x" + "a" * 64,
            "block_time": 1_800_000_000 + i,
            "kind": 1 + i % 2,
            "subject": SUBJECTS[i % 5],
            "partner": "0x" + "1" * 40,
            "purpose": bytes([i]) * 32,
            "changed": str(i),
            "attributes": str(2**200 + i),
            "valid_until": 0 if i % 2 else 1_900_000_000,
            "nonce": i // 5,
        }
        for i in range(20)
    ]


def confirmations() -> list[dict[str, Any]]:
    later = AT + timedelta(seconds=3)
    return [
        {
            "e_subject": SUBJECTS[i % 5],
            "e_nonce": i // 5,
            "e_kind": 1 + i % 2,
            "e_tx": f"0x{i:064x}",
            "e_block": 40 + i,
            "e_at": later,
        }
        for i in (0, 3, 6, 7, 12, 15, 18)  # 7 failed: it is not confirmed
    ]


def snapshot(engine: Engine) -> tuple[list[Any], list[Any]]:
    with engine.connect() as connection:
        rows = connection.execute(select(REQUESTS).order_by(ConsentRequest.seq)).all()
        logged = connection.execute(select(EVENTS).order_by(ConsentEvent.id)).all()
    return [tuple(r) for r in rows], [tuple(e) for e in logged]


def test_bulk_writes_exactly_what_sqlalchemy_writes(service_db: Engine) -> None:
    engine = service_db
    with engine.begin() as connection:
        connection.execute(insert(REQUESTS), requests())
        connection.execute(follower._INSERT_EVENTS, events())
        connection.execute(follower._CONFIRM, confirmations())
    expected = snapshot(engine)
    with engine.connect() as connection:
        statuses = connection.execute(select(ConsentRequest.status).order_by(ConsentRequest.seq)).scalars().all()
    assert statuses.count(RequestStatus.CONFIRMED) == 6  # the scenario confirms some; the failed one stays failed
    assert statuses[7] == RequestStatus.FAILED
    Base.metadata.drop_all(engine)
    create_schema(engine)

    new_events, confirmed = Bulk(follower._INSERT_EVENTS, engine.dialect), Bulk(follower._CONFIRM, engine.dialect)
    prepared = new_events.prepare(events()), confirmed.prepare(confirmations())
    with engine.begin() as connection:
        connection.execute(insert(REQUESTS), requests())
        new_events.execute(connection, prepared[0])
        confirmed.execute(connection, prepared[1])
    assert snapshot(engine) == expected


def test_bulk_takes_values_fixed_in_the_statement_and_requires_the_rest(service_db: Engine) -> None:
    engine = service_db
    table = REQUESTS
    statement = (
        update(table)
        .where(table.c.id == bindparam("k_id"))
        .values(
            status=RequestStatus.FAILED, error_code="gone", updated_at=bindparam("k_at", type_=table.c.updated_at.type)
        )
    )
    bulk = Bulk(statement, engine.dialect)
    later = AT + timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(insert(table), requests())
        bulk.execute(connection, bulk.prepare([{"k_id": "req-3", "k_at": later}]))
        bulk.execute(connection, [])  # nothing to do is allowed
    with engine.connect() as connection:
        row = connection.execute(select(table).where(table.c.id == "req-3")).one()
        untouched = connection.execute(select(table).where(table.c.id == "req-4")).one()
    assert (row.status, row.error_code) == (RequestStatus.FAILED, "gone")
    assert row.updated_at.replace(tzinfo=row.updated_at.tzinfo or UTC) == later
    assert untouched.status == RequestStatus.SUBMITTED
    assert untouched.error_code is None
    with pytest.raises(KeyError):
        bulk.prepare([{"k_id": "req-4"}])  # a bare bindparam must come from the row


def test_bulk_refuses_a_statement_it_cannot_run_row_by_row(service_db: Engine) -> None:
    engine = service_db
    table = REQUESTS
    expanding = update(table).where(table.c.id.in_(bindparam("ids", expanding=True))).values(error_code="x")
    with pytest.raises(ValueError, match="plain bound parameters"):
        Bulk(expanding, engine.dialect)
