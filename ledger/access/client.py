"""The access log's client: typed client of `AccessLog`, the encoding of `record`, the hash chain's
step and the decoding of its `AccessBatchRecorded` events.

The contract hashes every entry into a running chain (see `contracts/IAccessLog.sol`); `link`
computes the same step here, so an auditor can recompute the head from the chain's own events and
compare the read model, entry by entry, with them (`ledger.access.verification`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from eth_typing import HexStr
from eth_utils.crypto import keccak
from web3 import Web3
from web3.types import RPCEndpoint

from ledger.contracts import ContractClient
from ledger.errors import TransactionFailed
from ledger.logs import LogFetcher, bytes_of, hex_of, int_of
from ledger.tx import MAX_TX_DATA_BYTES, Receipt, TxRequest, items_per_transaction
from ledger.types import Purpose, checksummed

CONTRACT_NAME = "AccessLog"
ACCESSOR_ROLE = keccak(text="ACCESSOR_ROLE")
RECORD_SELECTOR = keccak(text="record(address,bytes32,bytes32,(bytes32,uint256)[])")[:4]
RECORDED = (
    "0x"
    + keccak(
        text="AccessBatchRecorded(uint256,address,bytes32,bytes32,bytes32,bytes32,(bytes32,uint256)[],bytes)"
    ).hex()
)
ZERO_HEAD = bytes(32)
ENTRY_BYTES = 64  # an entry in calldata and in the event: (subject, attributes)
# `record`'s call data before its entries: selector; partner, purpose, requestId; the array's offset and length.
RECORD_HEAD_BYTES = 4 + 5 * 32

# Gas bound for a batch (no pre-flight): measured by the conformance suite (an entry costs < 12k
# with a cold consent slot); the margin covers a registry with more roles or a longer revert path.
GAS_PER_ENTRY = 20_000
GAS_PER_BATCH = 80_000


@dataclass(frozen=True)
class Access:
    """One access to one subject's data. A batch sent to the contract is one access request: its
    entries share partner, purpose and request id."""

    subject: bytes
    partner: str
    purpose: Purpose
    attributes: int
    request_id: bytes


@dataclass(frozen=True)
class AccessEvent:
    """One entry of the log as the chain has it (an entry of an `AccessBatchRecorded` log). `head` is
    the hash chain's head after it, computed from the batch's `previousHead` (the contract emits the
    head at the end of each batch; `verify` checks both ends)."""

    index: int
    subject: bytes
    partner: str
    purpose: Purpose
    attributes: int
    request_id: bytes
    permitted: bool
    head: bytes
    block_number: int
    block_hash: str
    log_index: int
    tx_hash: str

    @property
    def access(self) -> Access:
        return Access(self.subject, self.partner, self.purpose, self.attributes, self.request_id)


@dataclass(frozen=True)
class AccessBatch:
    """An `AccessBatchRecorded` log: the entries of one `record` call, kept in their ABI encoding
    (what the accessor sent, byte for byte) until someone needs them one by one."""

    first_index: int
    partner: str
    purpose: Purpose
    request_id: bytes
    previous_head: bytes
    head: bytes
    encoded_entries: bytes  # `ENTRY_BYTES` per entry: subject, attributes
    denied: bytes  # bitmap: entry i refused <=> bit i % 8 of byte i // 8
    block_number: int
    block_hash: str
    log_index: int
    tx_hash: str

    @property
    def count(self) -> int:
        return len(self.encoded_entries) // ENTRY_BYTES

    def encoded_request(self) -> bytes:
        """The `record` arguments that logged this batch (compare with what was sent)."""
        return _request_layout(self.partner, self.purpose, self.request_id, self.count, self.encoded_entries)

    def refused(self) -> list[int]:
        """Positions (0-based, within the batch) of the entries the registry refused."""
        bits = int.from_bytes(self.denied, "little")
        positions = []
        while bits:
            low = bits & -bits
            positions.append(low.bit_length() - 1)
            bits ^= low
        return positions

    def events(self) -> list[AccessEvent]:
        """The batch's entries one by one, each with the hash chain's head after it."""
        refused = set(self.refused())
        data, head, events = self.encoded_entries, self.previous_head, []
        for i in range(self.count):
            offset = i * ENTRY_BYTES
            access = Access(
                subject=data[offset : offset + 32],
                partner=self.partner,
                purpose=self.purpose,
                attributes=int.from_bytes(data[offset + 32 : offset + 64], "big"),
                request_id=self.request_id,
            )
            permitted = i not in refused
            head = link(head, self.first_index + i, access, permitted)
            events.append(
                AccessEvent(
                    index=self.first_index + i,
                    subject=access.subject,
                    partner=self.partner,
                    purpose=self.purpose,
                    attributes=access.attributes,
                    request_id=self.request_id,
                    permitted=permitted,
                    head=head,
                    block_number=self.block_number,
                    block_hash=self.block_hash,
                    log_index=self.log_index,
                    tx_hash=self.tx_hash,
                )
            )
        return events


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _address_word(address: str) -> bytes:
    raw = bytes.fromhex(address[2:])
    if len(raw) != 20:
        raise ValueError("partner must be a 20-byte address")
    return bytes(12) + raw


def _b32(value: bytes, name: str) -> bytes:
    if len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes")
    return value


def encode_entries(entries: Sequence[Access]) -> bytes:
    """The entries' (subject, attributes) pairs as the ABI lays out an `Entry[]` after its length
    (and as the event repeats them)."""
    parts = []
    for e in entries:
        if not 0 <= e.attributes < 2**256:
            raise ValueError("attributes must fit uint256")
        parts += [_b32(e.subject, "subject"), _word(e.attributes)]
    return b"".join(parts)


def _request_layout(partner: str, purpose: bytes, request_id: bytes, count: int, encoded_entries: bytes) -> bytes:
    """`record`'s arguments `(partner, purpose, requestId, Entry[])` as the ABI lays them out."""
    head = _address_word(partner) + _b32(purpose, "purpose") + _b32(request_id, "requestId")
    return head + _word(0x80) + _word(count) + encoded_entries


def encode_request(entries: Sequence[Access]) -> bytes:
    """ABI encoding of `record`'s arguments for a batch of one access request (tests compare it with
    eth_abi); an empty batch encodes zeros."""
    first = entries[0] if entries else Access(bytes(32), "0x" + "00" * 20, Purpose(bytes(32)), 0, bytes(32))
    request = (first.partner.lower(), first.purpose, first.request_id)
    if any((e.partner.lower(), e.purpose, e.request_id) != request for e in entries):
        raise ValueError("a batch is one access request: its entries must share partner, purpose and request id")
    return _request_layout(first.partner, first.purpose, first.request_id, len(entries), encode_entries(entries))


def link(head: bytes, index: int, access: Access, permitted: bool) -> bytes:
    """One step of the contract's hash chain: keccak256(abi.encode(head, index, subject, partner,
    purpose, attributes, requestId, permitted))."""
    return keccak(
        head
        + _word(index)
        + access.subject
        + _address_word(access.partner)
        + access.purpose
        + _word(access.attributes)
        + access.request_id
        + _word(int(permitted))
    )


def record_gas(count: int) -> int:
    return GAS_PER_BATCH + GAS_PER_ENTRY * count


def max_record_entries() -> int:
    """The most entries one `record` transaction carries: more would take its call data past
    `MAX_TX_DATA_BYTES`, which geth's, Besu's and Nethermind's pools refuse. A longer access request
    is recorded in several transactions (same partner, purpose and request id)."""
    return items_per_transaction(MAX_TX_DATA_BYTES, ENTRY_BYTES, RECORD_HEAD_BYTES)


def encode_record(entries: Sequence[Access]) -> bytes:
    """`record`'s call data for one batch; refuses a batch too large for one transaction."""
    limit = max_record_entries()
    if len(entries) > limit:
        raise ValueError(
            f"a batch of {len(entries)} access entries does not fit one transaction: at most {limit} "
            "(split the access request into several batches)"
        )
    return RECORD_SELECTOR + encode_request(entries)


def decode(log: dict[str, Any]) -> AccessBatch | None:
    """An `AccessBatchRecorded` log (raw JSON-RPC or web3's decoded form), else None."""
    topics = log["topics"]
    if not topics:
        return None
    topics = topics if isinstance(topics[0], str) else [hex_of(t) for t in topics]
    if topics[0] != RECORDED:
        return None
    data = bytes_of(log["data"])
    entries_at = int.from_bytes(data[96:128], "big")
    denied_at = int.from_bytes(data[128:160], "big")
    count = int.from_bytes(data[entries_at : entries_at + 32], "big")
    denied_length = int.from_bytes(data[denied_at : denied_at + 32], "big")
    number = log["blockNumber"]
    return AccessBatch(
        first_index=int(topics[1], 16),
        partner=checksummed("0x" + topics[2][-40:]),
        purpose=Purpose(bytes.fromhex(topics[3][2:])),
        request_id=data[0:32],
        previous_head=data[32:64],
        head=data[64:96],
        encoded_entries=data[entries_at + 32 : entries_at + 32 + count * ENTRY_BYTES],
        denied=data[denied_at + 32 : denied_at + 32 + denied_length],
        block_number=int(number, 16) if isinstance(number, str) else int(number),
        block_hash=hex_of(log["blockHash"]),
        log_index=int_of(log["logIndex"]),
        tx_hash=hex_of(log["transactionHash"]),
    )


class AccessLogClient(ContractClient):
    """The accessor's client: records batches, reads head and count."""

    def head(self, block: int | None = None) -> bytes:
        return bytes(self.contract.functions.head().call(block_identifier=block))

    def count(self, block: int | None = None) -> int:
        return int(self.contract.functions.count().call(block_identifier=block))

    def encode_record(self, entries: Sequence[Access]) -> bytes:
        """`record`'s call data for one batch of at most `max_record_entries()` entries."""
        return encode_record(entries)

    def submit(self, entries: Sequence[Access]) -> str:
        """Send one batch (of one access request, at most `max_record_entries()` entries) without
        waiting; returns its transaction hash. A larger batch raises ValueError, unsent."""
        (tx_hash,) = self.sender.send(
            [TxRequest(to=self.address, data=self.encode_record(entries), gas=record_gas(len(entries)))]
        )
        return tx_hash

    def settle(self, tx_hash: str, entries: Sequence[Access]) -> tuple[Receipt, AccessBatch]:
        """Wait for a batch sent by `submit`; returns its receipt and its log, which must hold exactly
        the entries sent (compared in their encoding: no per-entry decoding on this path)."""
        sent = self.encode_record(entries)
        (receipt,) = self.sender.wait([tx_hash])
        if receipt.status != 1:
            raise self.revert_reason(sent, receipt)
        batches = self.logs(receipt)
        if len(batches) != 1 or RECORD_SELECTOR + batches[0].encoded_request() != sent:
            raise TransactionFailed(f"{tx_hash}: the log does not hold the entries sent", tx_hash=tx_hash)
        return receipt, batches[0]

    def record(self, entries: Sequence[Access]) -> list[AccessEvent]:
        """Record one batch and wait for it; an empty batch or a caller without the role raises unsent."""
        if not entries:
            self.estimate(self.encode_record(entries))  # raises the contract's own error
        return self.settle(self.submit(entries), entries)[1].events()

    def logs(self, receipt: Receipt) -> list[AccessBatch]:
        mine = self.address.lower()
        decoded = []
        for entry in receipt.logs:
            if str(entry["address"]).lower() == mine:
                batch = decode(entry)
                if batch is not None:
                    decoded.append(batch)
        return decoded

    def wait_final(self, receipt: Receipt, confirmations: int, *, timeout: float = 120.0) -> None:
        """Block until `receipt`'s block has `confirmations` blocks (itself included) on top and is
        still canonical; raises if the transaction left the chain meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            head = int(self.w3.eth.block_number)
            if head - receipt.block_number + 1 >= confirmations:
                block = self.w3.provider.make_request(
                    RPCEndpoint("eth_getBlockByNumber"), [hex(receipt.block_number), False]
                ).get("result")
                canonical = hex_of(block["hash"]) if block else None
                if canonical != receipt.block_hash:
                    raise TransactionFailed(
                        f"{receipt.tx_hash} left the chain before it was final", tx_hash=receipt.tx_hash
                    )
                return
            if time.monotonic() > deadline:
                raise TransactionFailed(f"{receipt.tx_hash} not final within {timeout:g}s", tx_hash=receipt.tx_hash)
            time.sleep(0.02)


def fetch_batches(
    w3: Web3, address: str, from_block: int, to_block: int, *, logs: LogFetcher | None = None
) -> Iterator[AccessBatch]:
    """Every `AccessBatchRecorded` log of the contract in [from_block, to_block], in chain order, read
    one eth_getLogs range at a time (`logs`: the contract client's, which knows the node's limit)."""
    logs = logs or LogFetcher(w3)
    query: dict[str, Any] = {"address": Web3.to_checksum_address(address), "topics": [HexStr(RECORDED)]}
    start = from_block
    while start <= to_block:
        end = min(to_block, start + logs.span - 1)
        for item in logs.fetch(query, start, end):
            batch = decode(item)
            if batch is not None:
                yield batch
        start = end + 1


def fetch_events(
    w3: Web3, address: str, from_block: int, to_block: int, *, logs: LogFetcher | None = None
) -> Iterator[AccessEvent]:
    """Every entry the contract logged in [from_block, to_block], in log order."""
    for batch in fetch_batches(w3, address, from_block, to_block, logs=logs):
        yield from batch.events()
