"""The benchmarks' HTTP load generator: keep-alive connections posting prepared requests in order.

It shares the machine's cores with the service it measures, so it must cost little per request:
aiohttp on uvloop costs about 0.13 ms of CPU per request here, where httpx cost about 1 ms (its
sync client, one thread per connection) to 2.7 ms (its async client at 32 connections) and, with
hundreds of connections, slowed the runs it was measuring.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop


@dataclass(frozen=True)
class Call:
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)  # seconds, answered with the expected status
    answers: list[bytes] = field(default_factory=list)  # their bodies, parsed after the timed run
    errors: int = 0
    first_error: str | None = None
    cpu_seconds: float = 0.0  # the load generator's own CPU time while it posted

    @classmethod
    def merged(cls, outcomes: Sequence[Outcome], label: str) -> Outcome:
        """The client processes' outcomes as one; prints each distinct first refusal."""
        total = cls()
        for outcome in outcomes:
            total.latencies += outcome.latencies
            total.answers += outcome.answers
            total.errors += outcome.errors
            total.cpu_seconds += outcome.cpu_seconds
        for first_error in {o.first_error for o in outcomes if o.first_error}:
            print(f"[{label}] refused: {first_error}", flush=True)
        return total


def drive(url: str, lanes: Sequence[Sequence[Call]], start_at: float, expect: int, retries: int = 2) -> Outcome:
    """Post each lane's calls in order, the lanes concurrently (one connection each), starting at
    `start_at` (wall clock). A call whose connection fails is sent again as it was (same headers,
    so the same idempotency key) up to `retries` times."""
    return uvloop.run(_drive(url, lanes, start_at, expect, retries))


async def _drive(url: str, lanes: Sequence[Sequence[Call]], start_at: float, expect: int, retries: int) -> Outcome:
    outcome = Outcome()
    connector = aiohttp.TCPConnector(limit=len(lanes) or 1, force_close=False)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:

        async def lane(calls: Sequence[Call]) -> None:
            for call in calls:
                started = time.perf_counter()
                for attempt in range(retries + 1):
                    try:
                        async with session.post(call.path, data=call.body, headers=call.headers) as response:
                            status, answer = response.status, await response.read()
                        break
                    except aiohttp.ClientConnectionError:
                        if attempt == retries:
                            raise
                elapsed = time.perf_counter() - started
                if status == expect:
                    outcome.latencies.append(elapsed)
                    outcome.answers.append(answer)
                else:
                    outcome.errors += 1
                    outcome.first_error = outcome.first_error or f"{status}: {answer[:300]!r}"

        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu_before = time.process_time()
        await asyncio.gather(*(lane(calls) for calls in lanes))
        outcome.cpu_seconds = time.process_time() - cpu_before
    return outcome


async def null_app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    """An ASGI app that does no work: it reads the request and answers 202 with a fixed body the size
    of a consent acknowledgement. Served by uvicorn, it measures what the HTTP stack alone does on
    this machine with this load generator (`bench_api.py`'s ceiling)."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 202, "headers": [(b"content-type", b"application/json")]})
    await send(
        {"type": "http.response.body", "body": b'{"id":"00000000-0000-0000-0000-000000000000","status":"pending"}'}
    )
