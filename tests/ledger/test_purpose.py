"""A purpose is one type, `ledger.types.Purpose`, made from its key in one place."""

from __future__ import annotations

from eth_utils.crypto import keccak

from ledger import eip712, types


def test_a_purpose_id_is_keccak256_of_its_key_as_before() -> None:
    for key in ("marketing.email", "analytics.reporting", "", "ü.x"):
        assert types.purpose_id(key) == keccak(text=key)
    assert eip712.purpose_id is types.purpose_id
