"""The api package's exceptions: one root, `ServiceError`, with each family beside the code that raises it
(`auth`, `secrets`, `workers`, `offline`), as `LedgerError`, `IdentityError` and `BridgeError` root theirs.

A module of its own, importing nothing: the command line and the worker supervisor import it, and
`api.errors` (the HTTP side) imports FastAPI. `api.errors` maps each package's families to an HTTP
status; `api.cli` prints any of the four roots as one line.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Raised for any failure inside the api package (not for an HTTP answer: see `api.errors.ApiError`)."""


class ToolError(ServiceError):
    """A command-line tool cannot do what it was asked (with the reason, never a secret or PII)."""
