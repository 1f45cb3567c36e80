"""An error no handler expected answers 500 problem+json, and fails nothing else: not the client's
next request on the same (keep-alive) connection, which a server closing the connection after a
500 did fail."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from api import errors
from ledger.anvil import free_port


@pytest.fixture
def server() -> Iterator[str]:
    app = FastAPI()
    errors.install(app)

    @app.get("/broken")
    def broken() -> None:
        raise RuntimeError("a bug, with a secret 7319 in its message")

    @app.get("/fine")
    def fine() -> dict[str, bool]:
        return {"ok": True}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_an_unexpected_error_is_a_500_problem_and_the_connection_serves_on(server: str) -> None:
    # One connection (httpx keeps it alive between requests), as a partner's till or a browser has.
    with httpx.Client(base_url=server, timeout=10, transport=httpx.HTTPTransport(retries=0)) as client:
        for _ in range(3):
            refused = client.get("/broken")
            assert refused.status_code == 500
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["code"] == "internal_error"
            assert "7319" not in refused.text  # the exception's message stays in the log
            assert refused.headers.get("connection") != "close"
            assert client.get("/fine").json() == {"ok": True}


def test_the_server_keeps_the_connection_after_an_unexpected_error(server: str) -> None:
    """Two requests sent at once on one connection (pipelined, as a busy keep-alive client may): the
    second is answered. The server used to close the connection after the 500, and a request already
    on its way over it was lost (the client saw its connection reset)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        request = "GET {} HTTP/1.1\r\nHost: test\r\n\r\n"
        connection.sendall((request.format("/broken") + request.format("/fine")).encode())
        answer = b""
        while answer.count(b"HTTP/1.1 ") < 2 or not answer.endswith(b'{"ok":true}'):
            chunk = connection.recv(65536)
            assert chunk, f"the server closed the connection after: {answer!r}"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert b"HTTP/1.1 200 " in answer
