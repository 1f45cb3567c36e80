"""The direct ABI encodings of `AccessLog.record`'s arguments and of its event equal eth_abi's."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import cast

import pytest
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.crypto import keccak

from ledger.access.client import (
    ENTRY_BYTES,
    RECORD_HEAD_BYTES,
    RECORD_SELECTOR,
    RECORDED,
    ZERO_HEAD,
    Access,
    AccessLogClient,
    decode,
    encode_record,
    encode_request,
    link,
    max_record_entries,
)
from ledger.tx import MAX_TX_DATA_BYTES, TxRequest, TxSender
from ledger.types import Purpose


def _entries(count: int) -> list[Access]:
    partner, purpose, request_id = Account.create().address, Purpose(os.urandom(32)), os.urandom(32)
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
    other = Access(os.urandom(32), entries[0].partner, Purpose(os.urandom(32)), 1, entries[0].request_id)
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


class _Sender:
    """Stands in for `TxSender`: keeps what it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[TxRequest] = []

    def send(self, requests: Sequence[TxRequest]) -> list[str]:
        self.sent.extend(requests)
        return ["0x" + "ab" * 32 for _ in requests]


def test_the_largest_batch_fits_one_transaction_and_a_larger_one_is_refused_unsent() -> None:
    """geth's, Besu's and Nethermind's pools refuse a transaction over 128 KiB: a batch of
    `max_record_entries()` entries is within `MAX_TX_DATA_BYTES`, one more entry would not be, and
    neither the encoding nor the client builds or sends such a transaction."""
    limit = max_record_entries()
    assert limit >= 2_000  # the access conformance suite records 2,000 entries in one batch
    entries = _entries(limit + 1)
    largest = encode_record(entries[:limit])
    assert len(largest) == RECORD_HEAD_BYTES + limit * ENTRY_BYTES <= MAX_TX_DATA_BYTES
    assert len(RECORD_SELECTOR + encode_request(entries)) > MAX_TX_DATA_BYTES  # one more would not fit
    with pytest.raises(ValueError, match=f"{limit + 1} access entries does not fit one transaction: at most {limit}"):
        encode_record(entries)

    sender = _Sender()
    client = AccessLogClient.__new__(AccessLogClient)  # no node: only encoding and sending are used
    client.address, client.sender = Account.create().address, cast(TxSender, sender)
    with pytest.raises(ValueError, match=f"at most {limit}"):
        client.encode_record(entries)
    with pytest.raises(ValueError, match=f"at most {limit}"):
        client.submit(entries)
    assert sender.sent == []  # refused before signing: no nonce taken
    client.submit(entries[:limit])
    (request,) = sender.sent
    assert request.data == largest
