"""Contract refusals answer as client errors in plain words; the node being away stays 503."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import errors
from ledger.errors import (
    BatchItemFailed,
    ChainError,
    ConsentRejected,
    InsufficientPoints,
    InvalidSignature,
    LedgerError,
    NonceMismatch,
    PointsRejected,
    SignatureExpired,
    TransactionFailed,
    Unauthorized,
    UnknownRevert,
)
from tests.api.test_consent_api import _problem

SUBJECT = b"\x5a" * 32
SIGNER = InvalidSignature("ConsentRegistryInvalidSigner", {"subject": SUBJECT})
REFUSALS = [
    (InsufficientPoints("LoyaltyPointsInsufficientBalance", {"balance": 7319}), 409, "insufficient_points"),
    (NonceMismatch("InvalidAccountNonce", {"account": "0x" + "ab" * 20, "currentNonce": 7319}), 409, "nonce_mismatch"),
    (SIGNER, 422, "invalid_signature"),
    (SignatureExpired("ConsentRegistryExpiredSignature", {"deadline": 7319}), 422, "signature_expired"),
    (PointsRejected("LoyaltyPointsUnboundSubject", {"subject": SUBJECT}), 422, "points_rejected"),
    (ConsentRejected("ConsentRegistryUnboundSubject", {"subject": SUBJECT}), 422, "consent_rejected"),
    (Unauthorized("AccessControlUnauthorizedAccount", {"account": "0x" + "ab" * 20}), 403, "not_permitted_on_chain"),
    (BatchItemFailed(3, SIGNER), 422, "invalid_signature"),
    (UnknownRevert("0x7319", {"data": SUBJECT}), 422, "ledger_refused"),
    (ChainError("connection refused by 127.0.0.1:7319"), 503, "chain_unavailable"),
    (TransactionFailed("not mined in time", tx_hash="0x" + "5a" * 32), 503, "chain_unavailable"),
]  # fmt: skip


@pytest.mark.parametrize(("error", "status", "code"), REFUSALS)
def test_a_contract_refusal_is_a_client_error_in_plain_words(error: LedgerError, status: int, code: str) -> None:
    """A refusal is the request's fault, not the node being away (503 `chain_unavailable` is kept for
    that), and its answer carries none of the revert's facts: pseudonyms, balances, raw data."""
    app = FastAPI()
    errors.install(app)

    @app.get("/refused")
    def refused() -> None:
        raise error

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/refused")
    problem = _problem(response, status, code)
    assert "detail" not in problem
    assert SUBJECT.hex() not in response.text
    assert "7319" not in response.text
