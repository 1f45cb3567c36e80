"""The relayer's direct calldata encoding must equal the generic ABI encoder's, for any values."""

from __future__ import annotations

import pytest
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st
from web3 import Web3

from ledger.compiler import Artifact
from ledger.consent import SignedChange
from ledger.consent.client import APPLY_BATCH_SELECTOR, encode_changes
from ledger.eip712 import ChangeKind, ConsentChange, Signature
from ledger.types import Purpose, Subject

STRUCT = "(uint8,bytes32,address,bytes32,uint256,uint64,uint256,uint256,uint8,bytes32,bytes32)[]"
b32 = st.binary(min_size=32, max_size=32)
u256 = st.integers(0, 2**256 - 1)
signed_changes = st.builds(
    SignedChange,
    change=st.builds(
        ConsentChange,
        kind=st.sampled_from(ChangeKind),
        subject=b32.map(Subject),
        partner=st.binary(min_size=20, max_size=20).map(to_checksum_address),
        purpose=b32.map(Purpose),
        attributes=u256,
        nonce=u256,
        deadline=u256,
        valid_until=st.integers(0, 2**64 - 1),
    ),
    signature=st.builds(Signature, v=st.integers(0, 255), r=b32, s=b32),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(signed_changes, max_size=8))
def test_direct_encoding_equals_eth_abi(changes: list[SignedChange]) -> None:
    assert encode_changes(changes) == abi_encode([STRUCT], [[c.as_abi() for c in changes]])


def test_the_calldata_is_what_web3_encodes_for_apply_batch(artifacts: dict[str, Artifact]) -> None:
    contract = Web3().eth.contract(abi=artifacts["ConsentRegistry"].abi)
    change = ConsentChange(
        ChangeKind.REVOKE, Subject(b"\x01" * 32), to_checksum_address(b"\x02" * 20), Purpose(b"\x03" * 32), 5, 6, 7
    )
    signed = SignedChange(change, Signature(28, b"\x04" * 32, b"\x05" * 32))
    expected = contract.encode_abi("applyBatch", args=[[signed.as_abi()]])
    assert "0x" + (APPLY_BATCH_SELECTOR + encode_changes([signed])).hex() == expected


def test_out_of_range_values_are_refused() -> None:
    change = ConsentChange(
        ChangeKind.GRANT, Subject(b"\x00" * 31), to_checksum_address(b"\x01" * 20), Purpose(b"\x00" * 32), 1, 0, 0
    )
    with pytest.raises(ValueError, match="32 bytes"):
        encode_changes([SignedChange(change, Signature(27, b"\x00" * 32, b"\x00" * 32))])
