"""The direct ABI encoding of `AccessLog.record`'s argument equals eth_abi's."""

from __future__ import annotations

import os

import pytest
from eth_abi.abi import encode as abi_encode
from eth_account import Account

from ledger.access import Access, encode_accesses


def test_the_access_encoding_is_the_abi_encoding() -> None:
    entries = [
        Access(os.urandom(32), Account.create().address, os.urandom(32), i * 2**200 + 7, os.urandom(32))
        for i in range(3)
    ]
    expected = abi_encode(
        ["(bytes32,address,bytes32,uint256,bytes32)[]"],
        [[(e.subject, e.partner, e.purpose, e.attributes, e.request_id) for e in entries]],
    )
    assert encode_accesses(entries) == expected
    with pytest.raises(ValueError, match="subject"):
        encode_accesses([Access(b"short", entries[0].partner, os.urandom(32), 1, os.urandom(32))])
