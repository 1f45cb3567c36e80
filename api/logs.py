"""The service's log: one JSON object a line (structlog), the request id of the request being served on
every line written while serving it, and no personal data.

Every module logs through the standard library (`logging.getLogger(__name__)`), as do uvicorn and the
libraries; `configure` hands all of it to structlog's `ProcessorFormatter` on the root logger, so there
is one format and one set of processors, whoever wrote the line:

- `request_id`: from `REQUEST_ID`, which `api.observability.Observe` sets for each request (the client's
  `X-Request-ID` if it is a plain token, else a new one) and which follows the request into the thread
  pool (Starlette runs sync routes with the request's context). Lines of the service's own threads
  (relayer, indexer, outbox writer) serve many requests at once and carry none.
- `scrub_pii`: what the code logs is pseudonyms, ids and hashes, never PII; this is the net under it.
  E-mail addresses and international phone numbers (`+` and digits, as `identity.normalize` writes
  them) are replaced in every string of a line, the exception's text included (a library's error can
  quote its input). A name cannot be told from other words: the rule that no code logs one is held by
  `tests/api/test_observability.py`, which looks for a customer's name, e-mail and phone in the log.
- uvicorn's access log (`CONSENT_LEDGER_ACCESS_LOG`) becomes fields (`method`, `path`, `status`), the
  path percent-decoded before it is scrubbed (an e-mail in a query is `%40`-encoded); the client's
  address, personal data under the GDPR, is left out.
"""

from __future__ import annotations

import logging
import re
import sys
from contextvars import ContextVar
from typing import Literal
from urllib.parse import unquote_plus

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

REDACTED = "[redacted]"
_EMAIL = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"\+\d[\d ().-]{5,18}\d")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def scrub(text: str) -> str:
    """`text` with e-mail addresses and `+`-prefixed phone numbers replaced by `[redacted]`."""
    if "@" in text:
        text = _EMAIL.sub(REDACTED, text)
    if "+" in text:
        text = _PHONE.sub(REDACTED, text)
    return text


def scrub_pii(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = scrub(value)
    return event


def add_request_id(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


def _access_fields(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """uvicorn's access line (`'%s - "%s %s HTTP/%s" %d'` with the client's address first) as fields."""
    record = event.get("_record")
    args = event.pop("positional_args", ())  # the record's (`pass_foreign_args`): only an access line's are used
    if isinstance(record, logging.LogRecord) and record.name == "uvicorn.access" and len(args) == 5:
        _client, method, quoted, version, status = args
        path = scrub(unquote_plus(str(quoted)))  # PII percent-encoded in a path or query is PII still
        event["event"] = f"{method} {path} HTTP/{version} {status}"
        event.update(method=method, path=path, status=status)
    return event


def configure(log_format: Literal["json", "text"] = "json", level: int = logging.INFO) -> None:
    """Route every logger of this process through one handler on stderr, in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
        handler.addFilter(_TextScrubber())
    else:
        pre_chain: list[Processor] = [
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            add_request_id,
            _access_fields,
        ]
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=pre_chain,
                pass_foreign_args=True,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    scrub_pii,
                    structlog.processors.JSONRenderer(),
                ],
            )
        )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class _TextScrubber(logging.Filter):
    """The same net for the text format: the formatted message, with its exception, scrubbed."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if clean != message:
            record.msg, record.args = clean, None
        request_id = REQUEST_ID.get()
        if request_id is not None:
            record.msg, record.args = f"[{request_id}] {record.getMessage()}", None
        return True
