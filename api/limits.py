"""Limits on what a request may make the service read and parse, checked before any route sees it.

Without them one unauthenticated request could take an API worker: a body of any size was read and
parsed in full before being refused, and a JSON body nested 70,000 deep crashed the parser (see
`api/__init__.py`). The body is read here, counting bytes as they arrive, and refused with 413 as soon
as it passes the limit (at once when Content-Length says it will), so an oversized body is never
read whole; a JSON body nested deeper than any request of this API is refused with 422 before it is
parsed. The body read is then handed to the app as it came."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import problem_response

# A JSON string, escapes included; brackets inside strings are text. Possessive, and a string left open
# runs to the end of the body: then every `"` starts a match that succeeds, and one pass over the body
# is all it takes. (Ending only at a closing quote, a body with an open string and many escaped quotes
# made each quote start a scan to the end and fail: quadratic, minutes of a worker's event loop for
# one unauthenticated request under the size limit.)
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_OPEN = frozenset(b"[{")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nested_deeper_than(body: bytes, limit: int) -> bool:
    """Whether the JSON text `body` nests arrays and objects more than `limit` deep (a malformed text is
    the parser's to refuse: this only has to count right for well-formed ones)."""
    if body.count(b"[") + body.count(b"{") <= limit:  # nearly every body: no need to look closer
        return False
    depth = 0
    for byte in _STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        depth += 1 if byte in _OPEN else -1
        if depth > limit:
            return True
    return False


class RequestLimits:
    """ASGI middleware: refuse a body over `max_body` bytes (413 `body_too_large`) or a JSON body nested
    over `max_depth` (422 `body_too_deep`), both problem+json."""

    def __init__(self, app: ASGIApp, *, max_body: int, max_depth: int) -> None:
        self.app = app
        self.max_body = max_body
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay(message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:  # a chunked body, or one longer than it said
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # Whatever the Content-Type says: with the header given twice, this read the last and FastAPI the
        # first, so a JSON body declared as text went unchecked to the parser. No body of this API nests
        # deeply, whatever its type.
        if body and nested_deeper_than(body, self.max_depth):
            response = problem_response(
                Request(scope),
                422,
                "body_too_deep",
                "The request body is nested too deeply",
                f"JSON bodies may nest arrays and objects at most {self.max_depth} deep",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, _replay({"type": "http.request", "body": body, "more_body": False}, receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            Request(scope),
            413,
            "body_too_large",
            "The request body is too large",
            f"request bodies may be at most {self.max_body} bytes",
        )
        await response(scope, receive, send)


def _replay(first: Message, receive: Receive) -> Receive:
    """`receive` with `first` handed out before anything it brings."""
    pending: list[Message] = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
