"""Each package's error families answer from one table, `api.errors.FAMILIES`: the routes' translations
and the ledger handler give what the table says, and nothing in it is shadowed."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import errors
from api.auth import SignInFailed, WrongOrigin
from identity.errors import InvalidDid, InvalidPII, KeyMaterialError, SubjectErased, UnknownSubject
from ledger.eip712 import TypedDataError
from ledger.errors import ChainError, UnknownAttributes
from tests.api.test_consent_api import _problem


def test_no_family_is_shadowed_by_an_earlier_one() -> None:
    """Most specific first: an entry after one for its base class would never be used."""
    kinds = [kind for kind, _ in errors.FAMILIES]
    for n, kind in enumerate(kinds):
        assert not [earlier for earlier in kinds[:n] if issubclass(kind, earlier)], kind


# What the routes answered when each translated these itself (customers, auth): the same, byte for byte.
ROUTE_ANSWERS: list[tuple[Exception, int, str, str, str | None, dict[str, Any]]] = [
    (InvalidDid("not a DID"), 404, "unknown_customer", "No such customer", "not a DID", {}),
    (UnknownSubject("gone"), 404, "unknown_customer", "No such customer", None, {}),
    (SubjectErased("erased"), 409, "customer_erased", "This customer's data was erased", "erased", {}),
    (InvalidPII("email", "no @"), 422, "invalid_pii", "Invalid personal data", "invalid email: no @",
     {"field": "email"}),
    (WrongOrigin("sign in at https://a.example"), 401, "wrong_origin",
     "Sign-in refused: the message is for another site", "sign in at https://a.example", {}),
    (SignInFailed("the message has expired"), 401, "sign_in_failed", "Sign-in refused", "the message has expired", {}),
    # What POST /consents answered when it checked a mask's stray bits itself.
    (UnknownAttributes(192), 422, "unknown_attribute", "No such attribute", "attributes: bit 192 is no attribute's",
     {}),
]  # fmt: skip


@pytest.mark.parametrize(("error", "status", "code", "title", "detail", "extra"), ROUTE_ANSWERS)
def test_a_route_translates_a_family_as_the_table_says(
    error: Exception, status: int, code: str, title: str, detail: str | None, extra: dict[str, Any]
) -> None:
    answer = errors.problem(error)
    assert (answer.status, answer.code, answer.title, answer.detail, answer.extra) == (
        status,
        code,
        title,
        detail,
        extra,
    )


def test_a_fault_has_no_answer() -> None:
    with pytest.raises(TypeError, match="KeyMaterialError"):
        errors.problem(KeyMaterialError("no master key"))


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (TypedDataError("primaryType must be one of Redemption"), 422, "invalid_typed_data"),
        (ChainError("connection refused"), 503, "chain_unavailable"),
    ],
)
def test_a_ledger_family_escaping_a_route_answers_as_the_table_says(error: Exception, status: int, code: str) -> None:
    """TypedDataError is a LedgerError: escaping a route, it is the request's fault, not the node away."""
    app = FastAPI()
    errors.install(app)

    @app.get("/failed")
    def failed() -> None:
        raise error

    with TestClient(app, raise_server_exceptions=False) as client:
        _problem(client.get("/failed"), status, code)
