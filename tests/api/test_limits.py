"""Request limits (`api.limits`, `api/__init__.py`): a body too large or nested too deep is refused
with problem+json before it is read whole or parsed, and never takes an API worker down."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from api.limits import nested_deeper_than
from ledger.anvil import free_port
from tests.api.conftest import serve_workers, serving

pytestmark = pytest.mark.anvil

CHALLENGE = "/api/v1/auth/siwe/challenge"
DEEP = b"[" * 100_000 + b"]" * 100_000  # the body that crashed a worker: 200 kB, far under the size limit
MiB = 1 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A real `serve` with two API worker processes."""
    port = free_port()
    with serving(tmp_path_factory.mktemp("limits"), port, workers=2) as process:
        yield process, port


def _head(port: int, extra: str) -> socket.socket:
    """A connection that has sent a challenge request's head (its body is the caller's to send)."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(
        f"POST {CHALLENGE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}\r\n".encode()
    )
    return connection


def _response(connection: socket.socket) -> tuple[int, dict[str, str], dict[str, object]]:
    """Status, headers and JSON body of the response on `connection` (read until it closes or is whole)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body[: int(headers["content-length"])])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


def test_deep_bodies_are_refused_and_no_worker_dies(served: tuple[subprocess.Popen[str], int]) -> None:
    process, port = served
    workers = serve_workers(process.pid)
    assert len(workers) == 2
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

        def deep(_: int) -> httpx.Response:
            return client.post(CHALLENGE, content=DEEP, headers={"Content-Type": "application/json"})

        with ThreadPoolExecutor(4) as pool:  # several at once: each worker gets some
            refused = list(pool.map(deep, range(8)))
        for response in refused:
            assert response.status_code == 422, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["code"] == "body_too_deep"
        # At the limit (CONSENT_LEDGER_MAX_JSON_DEPTH, 32) a body is parsed (and then found not to be an
        # object); past it, refused. Brackets inside strings are not nesting.
        assert client.post(CHALLENGE, content=b"[" * 32 + b"]" * 32).json()["code"] == "validation_error"
        assert client.post(CHALLENGE, content=b"[" * 33 + b"]" * 33).json()["code"] == "body_too_deep"
        shallow = json.dumps({"address": "0x" + "11" * 20, "note": "[{" * 1000})  # parsed, then validated
        assert client.post(CHALLENGE, content=shallow).json()["code"] == "validation_error"
        assert client.post(CHALLENGE, json={"address": "0x" + "11" * 20}).status_code == 201
        assert client.get("/api/v1/health").json()["status"] == "ok"
    assert serve_workers(process.pid) == workers, "an API worker died and was started again"
    assert process.poll() is None


def test_a_body_declared_too_large_is_refused_unread(served: tuple[subprocess.Popen[str], int]) -> None:
    process, port = served
    workers = serve_workers(process.pid)
    with _head(port, f"Content-Length: {50 * MiB}\r\n") as connection:
        connection.sendall(b"[" * 1000)  # the rest never comes: the answer must not wait for it
        status, headers, body = _response(connection)
    assert status == 413
    assert headers["content-type"] == "application/problem+json"
    assert body["code"] == "body_too_large"
    assert body["detail"] == f"request bodies may be at most {MiB} bytes"
    assert serve_workers(process.pid) == workers


def test_a_chunked_body_is_refused_once_it_passes_the_limit(served: tuple[subprocess.Popen[str], int]) -> None:
    process, port = served
    workers = serve_workers(process.pid)
    chunk = b" " * 65536
    sent = 0
    with _head(port, "Transfer-Encoding: chunked\r\n") as connection:
        while sent < 50 * MiB:  # what the service reads of it: until it has seen more than the limit
            readable, _, _ = select.select([connection], [], [], 0.01)
            if readable:
                break
            connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        status, _, body = _response(connection)
    assert (status, body["code"]) == (413, "body_too_large")
    assert sent < 4 * MiB, f"the service read {sent} bytes before refusing"
    assert serve_workers(process.pid) == workers


def test_a_body_within_the_limit_is_served(served: tuple[subprocess.Popen[str], int]) -> None:
    _process, port = served
    body = json.dumps({"address": "0x" + "11" * 20, "padding": " " * (MiB - 200)}).encode()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        assert client.post(CHALLENGE, content=body, headers={"Content-Type": "application/json"}).status_code == 201
        too_large = client.post(CHALLENGE, content=body + b" " * 300, headers={"Content-Type": "application/json"})
    assert (too_large.status_code, too_large.json()["code"]) == (413, "body_too_large")


def test_the_service_keeps_the_default_recursion_limit_so_deep_json_cannot_crash_it() -> None:
    # Whatever route a deep text takes to a parser: the service's modules (which import py_ecc and
    # py-evm, both of which raise the limit) leave it at CPython's default, and the parser refuses.
    program = (
        "import json, sys, api.cli, api.runtime, api.offline, crm_bridge.bridge\n"
        "print(sys.getrecursionlimit())\n"
        "try:\n    json.loads('[' * 100000 + ']' * 100000)\nexcept RecursionError:\n    print('refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert (done.returncode, done.stdout.split()) == (0, ["1000", "refused"]), done.stderr[-2000:]


def test_nesting_is_counted_outside_strings() -> None:
    assert not nested_deeper_than(b'{"a": "[[[[[[[[[[", "b": [1, {"c": "]]]]"}]}', 3)
    assert nested_deeper_than(b'{"a": [[{"b": "\\"[["}]]}', 3)
    assert not nested_deeper_than(b'{"a": [[{"b": "\\"[["}]]}', 4)
    assert nested_deeper_than(b"[" * 5 + b"]" * 5, 4)
    assert not nested_deeper_than(b"[]" * 1000, 1)
    started = time.monotonic()
    assert nested_deeper_than(b"[" * MiB, 32)
    assert not nested_deeper_than(b"[1]," * (MiB // 4), 32)
    assert time.monotonic() - started < 2


def test_the_depth_check_is_linear_also_on_an_unclosed_string_of_escaped_quotes() -> None:
    """Each escaped quote of a string left open began a scan to the end of the body that failed: a
    quadratic check, about 3 s for 16,000 of them and most of an hour for a body at the size limit, on
    the worker's event loop (every request of that worker waited), for one unauthenticated request."""
    for body in (b'"' + b'\\"[' * 20_000, b'"' + b'\\"[' * 20_000 + b"\\", b'["' + b'\\"{' * 20_000):
        started = time.perf_counter()
        assert not nested_deeper_than(body, 32)  # the brackets are inside the (unclosed) string
        assert time.perf_counter() - started < 0.5


def test_a_deep_body_is_refused_whatever_content_type_it_names(served: tuple[subprocess.Popen[str], int]) -> None:
    """With Content-Type given twice, the check read the last (text/plain: not checked) and FastAPI the
    first (JSON: parsed), so a deep body reached the parser: a RecursionError and a 500."""
    _, port = served
    deep = b"[" * 900 + b"]" * 900
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for headers in (
            [("Content-Type", "application/json"), ("Content-Type", "text/plain")],
            [("Content-Type", "text/plain")],
        ):
            refused = client.post(CHALLENGE, content=deep, headers=headers)
            assert refused.status_code == 422, refused.text
            assert refused.json()["code"] == "body_too_deep"
