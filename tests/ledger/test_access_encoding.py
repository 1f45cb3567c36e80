"""The direct ABI encodings of `AccessLog.record`'s arguments and of its event equal eth_abi's."""

from __future__ import annotations

import os

import pytest
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.crypto import keccak

from ledger.access import RECORDED, ZERO_HEAD, Access, decode, encode_request, link


def _entries(count: int) -> list[Access]:
    partner, purpose, request_id = Account.create().address, os.urandom(32), os.urandom(32)
    return [Access(os.urandom(32), partner, purpose, i * 2**200 + 7, request_id) for i in range(count)]


def test_the_request_encoding_is_the_abi_encoding() -> None:
    entries = _entries(3)
    first = entries[0]
    expected = abi_encode(
        ["address", "bytes32", "bytes32", "(bytes32,uint256)[]"],
        [first.partner, first.purpose, first.request_id, [(e.subject, e.attributes) for e in entries]],
    )
    assert encode_request(entries) == expected
    with pytest.raises(ValueError, match="subject"):
        encode_request([Access(b"short", first.partner, first.purpose, 1, first.request_id)])


def test_a_batch_is_one_access_request() -> None:
    entries = _entries(2)
    other = Access(os.urandom(32), entries[0].partner, os.urandom(32), 1, entries[0].request_id)
    with pytest.raises(ValueError, match="share partner, purpose and request id"):
        encode_request([*entries, other])


def test_the_event_decodes_to_the_entries_and_their_heads() -> None:
    """An ABI-encoded `AccessBatchRecorded` log (as a node returns it) gives back every entry, the
    refused ones from the bitmap, and each entry's head from the batch's previous head."""
    entries = _entries(11)
    refused = {0, 8, 10}
    denied = sum(1 << i for i in refused).to_bytes(2, "little")
    previous, first_index = os.urandom(32), 40
    head = previous
    for i, e in enumerate(entries):
        head = link(head, first_index + i, e, i not in refused)
    data = abi_encode(
        ["bytes32", "bytes32", "bytes32", "(bytes32,uint256)[]", "bytes"],
        [entries[0].request_id, previous, head, [(e.subject, e.attributes) for e in entries], denied],
    )
    log = {
        "topics": [
            RECORDED,
            "0x" + first_index.to_bytes(32, "big").hex(),
            "0x" + bytes(12).hex() + entries[0].partner[2:].lower(),
            "0x" + entries[0].purpose.hex(),
        ],
        "data": "0x" + data.hex(),
        "blockNumber": "0x7",
        "blockHash": "0x" + keccak(b"block").hex(),
        "logIndex": "0x0",
        "transactionHash": "0x" + keccak(b"tx").hex(),
    }
    batch = decode(log)
    assert batch is not None
    assert batch.count == 11
    assert batch.refused() == sorted(refused)
    assert (batch.previous_head, batch.head, batch.partner) == (previous, head, entries[0].partner)
    events = batch.events()
    assert [e.access for e in events] == entries
    assert [e.index for e in events] == list(range(40, 51))
    assert [e.permitted for e in events] == [i not in refused for i in range(11)]
    assert events[-1].head == head
    assert decode({**log, "topics": ["0x" + ZERO_HEAD.hex()]}) is None
