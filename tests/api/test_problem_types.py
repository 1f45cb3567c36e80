"""A problem's `type` is a page that says what its code means and what to do (RFC 9457 §3.1.1), not an
opaque URN; and every code the service can send has one."""

from __future__ import annotations

import ast
from pathlib import Path

from api import errors
from api.problems import PAGES, PROBLEMS
from ledger.settings import PROJECT_ROOT
from tests.api.conftest import Service

SENDERS = {"ApiError": 1, "Answer": 1, "problem_response": 2}  # the call, and where its code argument is (from 0)


def _codes_in_source() -> set[str]:
    """Every literal code an `ApiError`, an error family's `Answer` or a `problem_response` is made with."""
    found = set()
    for path in sorted((PROJECT_ROOT / "api").rglob("*.py")):
        for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                at = SENDERS.get(name or "")
                code = node.args[at] if at is not None and len(node.args) > at else None
                if isinstance(code, ast.Constant) and isinstance(code.value, str):
                    found.add(code.value)
    return found


def test_every_code_the_service_sends_has_a_page_and_every_page_a_code() -> None:
    sent = _codes_in_source() | set(errors._VALIDATION_CODES.values()) | set(errors._HTTP_CODES.values())
    sent.add("validation_error")  # a pydantic error type without a code of its own
    assert len(sent) > 50  # the scan found the calls
    assert sent - PROBLEMS.keys() == set(), "codes sent without a page"
    assert PROBLEMS.keys() - sent == set(), "pages of codes never sent"
    for code, kind in PROBLEMS.items():
        assert 400 <= kind.status < 600, code
        assert kind.title, code
        assert kind.about.endswith("."), code


def test_a_problems_type_is_the_page_about_it(service: Service) -> None:
    answer = service.client.get("/api/v1/consents/no-such-request", headers=service.operator())
    assert answer.status_code == 404
    problem = answer.json()
    assert problem["type"] == f"{PAGES}/unknown_consent_request"
    page = service.client.get(problem["type"])  # a URI reference with the full path: resolved against the API's
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "unknown_consent_request" in page.text
    assert PROBLEMS["unknown_consent_request"].about in page.text
    assert "request_id" in page.text
    listing = service.client.get(PAGES)
    assert listing.status_code == 200
    for code in PROBLEMS:
        assert f'href="{PAGES}/{code}"' in listing.text
    missing = service.client.get(f"{PAGES}/no_such_code")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    assert missing.headers["content-type"] == "application/problem+json"
