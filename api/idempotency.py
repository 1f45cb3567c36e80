"""`Idempotency-Key` for the points routes (draft-ietf-httpapi-idempotency-key-header).

The first request with a key stores what it did: the points requests it queued, or the error it
was refused with. The same key with the same body gets that answer again, waiting for it if the first
is still in progress; the same key with another body is refused (422). "The same body" is the same
bytes (the draft's fingerprint of the payload: a retry resends what it sent); canonical JSON of the
parsed body cost ~70 us a request, mostly in printing the 220-bit redemption nonces. Concurrent
duplicates race on the key's unique index: one of them does the work, the others wait for its answer.

A queued request's answer is not stored: it is made from the request's final state (its outcome,
transaction, block and the balance after it), which is what the first caller's answer was made
from, so a repeat gets the same answer without a second write per request. Should the chain lose
the block and the request be applied again, a repeat names the transaction that now holds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from api.errors import ApiError
from api.problems import type_of
from api.runtime import Runtime
from ledger.points import IDEMPOTENCY_RECORD, IdempotencyRecord, PointsRequest

MAX_ATTEMPTS = 5
INSERT_TIMEOUT = 30.0  # seconds


def body_hash(payload: bytes) -> str:
    """The fingerprint of a request's payload."""
    return hashlib.sha256(payload).hexdigest()


@dataclass
class Started:
    """What a request did: the points requests it queued, or an answer that is already final."""

    request_ids: list[str]
    status_code: int | None = None
    body: dict[str, Any] | None = None
    created: bool = False  # queued by this call (not a repeat): none of them can be final yet


def problem_body(error: ApiError, path: str) -> dict[str, Any]:
    body = {
        "type": type_of(error.code),
        "title": error.title,
        "status": error.status,
        "code": error.code,
        "instance": path,
    }
    if error.detail:
        body["detail"] = error.detail
    body.update({k: v for k, v in error.extra.items() if v is not None})
    return body


async def start(
    runtime: Runtime,
    *,
    principal: str,
    key: str | None,
    route: str,
    path: str,
    digest: str,
    build: Callable[[Connection], Sequence[PointsRequest]],
    conflict: Callable[[], ApiError],
    companions: Sequence[object] = (),
) -> Started:
    """Queue the points requests `build` makes (checked first: it raises ApiError on bad input), under
    the idempotency key if there is one. On the event loop, as the consent route is: the reads are a
    few prebuilt statements on a WAL read connection, which never waits for a writer, and the group
    commit is awaited; a thread-pool hop per request was ~7 % of an API worker's CPU.

    `build` only reads (it checks signatures and looks rows up, on a read connection: Core statements
    built once, see `ledger.points.tables`), so it runs outside the write lock;
    the inserts go to the runtime's group commit, which stores concurrent requests' rows in one
    transaction. A concurrent duplicate that got in between is caught by the unique indexes (key,
    and the on-chain id) and handled below. `companions` are rows `build` adds beside its requests (it
    fills the sequence afresh each time it runs), stored in the same transaction: a redemption code's end."""
    for _ in range(MAX_ATTEMPTS):
        rows: list[PointsRequest] = []
        refusal: ApiError | None = None
        with runtime.engine.connect() as connection:  # one read transaction: the key's record, then the checks
            if key is not None:
                record = connection.execute(IDEMPOTENCY_RECORD, {"principal": principal, "key": key}).first()
                if record is not None:
                    if record.request_hash != digest or record.route != route:
                        raise ApiError(
                            422,
                            "idempotency_key_reused",
                            "This Idempotency-Key was used for another request",
                            "use a new key for a new request",
                        )
                    body = json.loads(record.body) if record.body is not None else None
                    return Started(record.request_ids.split(), record.status_code, body)
            try:
                rows = list(build(connection))
            except ApiError as error:
                if key is None:
                    raise
                refusal = error
        if refusal is not None:
            failed = problem_body(refusal, path)
            outcome: dict[str, Any] = {"status_code": refusal.status, "body": json.dumps(failed)}
            started = Started([], refusal.status, failed)
        else:
            outcome = {"request_ids": " ".join(r.id for r in rows)}
            started = Started([r.id for r in rows], created=True)
        objects: list[object] = list(rows)
        if refusal is None:
            objects.extend(companions)
        if key is not None:
            objects.append(IdempotencyRecord(principal=principal, key=key, route=route, request_hash=digest, **outcome))
        try:
            # With other requests' rows: one transaction, one fsync.
            await asyncio.wait_for(asyncio.wrap_future(runtime.ledger.inserts.submit(objects)), INSERT_TIMEOUT)
            return started
        except IntegrityError:
            # Either a concurrent duplicate took the key (look again), or the on-chain id is queued already.
            if key is not None:
                with runtime.reads() as session:
                    taken = session.scalar(
                        select(IdempotencyRecord.id).where(
                            IdempotencyRecord.principal == principal, IdempotencyRecord.key == key
                        )
                    )
                if taken is not None:
                    continue
            raise conflict() from None
    raise ApiError(503, "busy", "Too many concurrent duplicates of this request; retry")
