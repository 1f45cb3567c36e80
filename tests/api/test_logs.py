"""The log's format and its net for personal data (`api.logs`), in this process: a JSON object a line
with the request id bound while a request is served, e-mails and phone numbers redacted wherever they
are in a line, its exception included. (`tests/api/test_observability.py` reads a real service's log.)"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from api.logs import REQUEST_ID, configure, scrub

EMAIL, PHONE = "Ann.Lee+promo@Example.co.uk", "+44 20 7946 0958"


@pytest.fixture
def root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _log_failure() -> None:
    log = logging.getLogger("tests.logs")
    token = REQUEST_ID.set("req-42")
    try:
        try:
            raise ValueError(f"no customer {EMAIL}")
        except ValueError:
            log.exception("lookup of %s / %s failed", EMAIL.upper(), PHONE)
    finally:
        REQUEST_ID.reset(token)
    log.info("outside any request")


def test_json_lines_carry_the_request_id_and_no_email_or_phone(
    root_logger: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("json")
    _log_failure()
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["request_id"] == "req-42"
    assert (first["level"], first["logger"]) == ("error", "tests.logs")
    assert first["event"] == "lookup of [redacted] / [redacted] failed"
    assert "ValueError: no customer [redacted]" in first["exception"]
    assert "request_id" not in second
    assert second["event"] == "outside any request"


def test_the_text_format_has_the_same_net(root_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure("text")
    _log_failure()
    err = capsys.readouterr().err
    assert "[req-42] lookup of [redacted] / [redacted] failed" in err
    assert "ValueError: no customer [redacted]" in err
    for needle in (EMAIL, EMAIL.upper(), PHONE, "7946"):
        assert needle not in err


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("mail a.b-c+d@mail.example.org now", "mail [redacted] now"),
        ("call +442079460958 or +1 (415) 555-2671.", "call [redacted] or [redacted]."),
        ("block 1234567 of tx 0xabc, nonce +3", "block 1234567 of tx 0xabc, nonce +3"),  # ids and counts stay
    ],
)
def test_scrub(text: str, clean: str) -> None:
    assert scrub(text) == clean
