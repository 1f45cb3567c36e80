"""The benchmarks' HTTP load generator: keep-alive connections posting prepared requests in order.

It shares the machine's cores with the service it measures, so it must cost little per request.
`drive` uses wrk (C, from Debian's `wrk` package; `make setup` installs it) with `wrk_lanes.lua`:
one thread and connection per lane, the requests built in advance, so that the client's share is
what sending and reading bytes costs. `drive_aiohttp` is the Python fallback (aiohttp on uvloop,
about 0.13 ms of CPU per request here; httpx cost 1 to 2.7 ms), used where wrk is not installed
outside CI and for runs that must re-send on a lost connection (wrk does not).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    finished_at: float = 0.0  # wall clock of the last answer
    resent: int = 0  # requests sent again after their connection was lost

    @classmethod
    def merged(cls, outcomes: Sequence[Outcome], label: str) -> Outcome:
        """The client processes' outcomes as one; prints each distinct first refusal."""
        total = cls()
        for outcome in outcomes:
            total.latencies += outcome.latencies
            total.answers += outcome.answers
            total.errors += outcome.errors
            total.cpu_seconds += outcome.cpu_seconds
            total.finished_at = max(total.finished_at, outcome.finished_at)
            total.resent += outcome.resent
        for first_error in {o.first_error for o in outcomes if o.first_error}:
            print(f"[{label}] refused: {first_error}", flush=True)
        if total.resent:
            print(f"[{label}] {total.resent} requests sent again after their connection was lost", flush=True)
        return total


WRK_SCRIPT = Path(__file__).with_name("wrk_lanes.lua")


def wrk_path() -> str | None:
    """wrk's path; None where it is not installed (refused under CI, whose set-up installs it)."""
    path = shutil.which("wrk")
    if path is None and os.environ.get("CI") == "true":
        raise RuntimeError("wrk is not installed: `make setup` installs Debian's wrk package")
    return path


def drive(url: str, lanes: Sequence[Sequence[Call]], start_at: float, expect: int, timeout: float = 900) -> Outcome:
    """Post each lane's calls in order, the lanes concurrently (one connection each), starting at
    `start_at` (wall clock): with wrk where it is installed, else with `drive_aiohttp`."""
    if wrk_path() is None:
        return drive_aiohttp(url, lanes, start_at, expect)
    return drive_wrk(url, lanes, start_at, expect, timeout=timeout)


def raw_request(url: str, call: Call) -> bytes:
    """`call` as the bytes of an HTTP/1.1 POST on a keep-alive connection to `url`."""
    host = urlsplit(url).netloc
    head = [f"POST {call.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(call.body)}"]
    head += [f"{name}: {value}" for name, value in call.headers.items() if name.lower() != "content-length"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + call.body


def drive_wrk(url: str, lanes: Sequence[Sequence[Call]], start_at: float, expect: int, timeout: float = 900) -> Outcome:
    """`drive` with wrk: each lane's requests written out in advance, one wrk thread per lane. Lanes
    whose requests are not all answered within `timeout` (a lost connection) count them as errors."""
    wrk = wrk_path()
    assert wrk is not None
    lanes = [calls for calls in lanes if calls]
    outcome = Outcome()
    if not lanes:
        return outcome
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        for i, calls in enumerate(lanes):
            with open(f"{tmp}/lane-{i}", "wb") as out:
                for call in calls:
                    request = raw_request(url, call)
                    if b"\0" in request:
                        raise ValueError("a request holds a NUL byte, which wrk_lanes.lua uses to separate them")
                    out.write(request + b"\0")
        time.sleep(max(0.0, start_at - time.time()))
        command = [wrk, "-t", str(len(lanes)), "-c", str(len(lanes)), "-d", f"{int(timeout) + 60}s"]
        command += ["--timeout", f"{int(timeout)}s", "-s", str(WRK_SCRIPT), url, "--", tmp, str(expect)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        results = [Path(tmp) / f"result-{i}" for i in range(len(lanes))]
        deadline = time.monotonic() + timeout
        while not all(r.exists() for r in results) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        time.sleep(0.05)  # the last lane's file is complete once written and closed
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # wrk sleeps out its duration unless interrupted
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        outcome.cpu_seconds = usage.ru_utime + usage.ru_stime
        report = process.stdout.read().decode(errors="replace") if process.stdout else ""
        for calls, result in zip(lanes, results, strict=True):
            if result.exists():
                outcome.finished_at = max(outcome.finished_at, result.stat().st_mtime)
            else:
                outcome.errors += len(calls)
                outcome.first_error = outcome.first_error or f"a lane did not finish: {report[-300:]}"
                continue
            for line in result.read_bytes().splitlines():
                kind, value, body = [*line.split(b" ", 2), b""][:3]
                if kind == b"ok":
                    outcome.latencies.append(float(value))
                    outcome.answers.append(body)
                elif kind == b"resent":
                    outcome.resent += int(value)
                else:
                    outcome.errors += 1
                    outcome.first_error = outcome.first_error or f"{value.decode()}: {body[:300]!r}"
    return outcome


def drive_aiohttp(url: str, lanes: Sequence[Sequence[Call]], start_at: float, expect: int, retries: int = 2) -> Outcome:
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
        outcome.finished_at = time.time()
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
