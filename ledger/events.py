"""Decoding ConsentRegistry's logs straight from JSON-RPC (fixed layouts; no ABI machinery per log)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_utils.crypto import keccak

from ledger.logs import bytes_of, hex_of, int_of
from ledger.types import AttributeMask, Purpose, checksummed

GRANTED = "0x" + keccak(text="ConsentGranted(bytes32,address,bytes32,uint256,uint256,uint64,uint256)").hex()
REVOKED = "0x" + keccak(text="ConsentRevoked(bytes32,address,bytes32,uint256,uint256,uint256)").hex()
BOUND = "0x" + keccak(text="ControllerBound(bytes32,address,address)").hex()
TOPICS = [GRANTED, REVOKED, BOUND]

KIND_GRANT, KIND_REVOKE, KIND_BIND = 0, 1, 2


@dataclass(frozen=True)
class RegistryEvent:
    kind: int
    block_number: int
    block_hash: str
    log_index: int
    tx_hash: str
    subject: bytes
    partner: str  # the controller for KIND_BIND
    purpose: Purpose
    changed: int  # the signed word (a revocation may name bits above the range; they change nothing)
    attributes: AttributeMask  # the consent's bits after the change, as the registry holds them (uint192)
    valid_until: int
    nonce: int


def decode(log: dict[str, Any]) -> RegistryEvent | None:
    topics = [hex_of(t) for t in log["topics"]]
    if not topics or topics[0] not in TOPICS:
        return None
    data = bytes_of(log["data"])
    words = [int.from_bytes(data[i : i + 32], "big") for i in range(0, len(data), 32)]
    common: dict[str, Any] = {
        "block_number": int_of(log["blockNumber"]),
        "block_hash": hex_of(log["blockHash"]),
        "log_index": int_of(log["logIndex"]),
        "tx_hash": hex_of(log["transactionHash"]),
        "subject": bytes.fromhex(topics[1][2:]),
    }
    if topics[0] == BOUND:
        return RegistryEvent(
            KIND_BIND,
            partner=checksummed("0x" + topics[3][-40:]),
            purpose=Purpose(b""),
            changed=0,
            attributes=AttributeMask(0),
            valid_until=0,
            nonce=0,
            **common,
        )
    partner = checksummed("0x" + topics[2][-40:])
    purpose = Purpose(bytes.fromhex(topics[3][2:]))
    if topics[0] == GRANTED:
        changed, attributes, valid_until, nonce = words
        return RegistryEvent(
            KIND_GRANT,
            partner=partner,
            purpose=purpose,
            changed=changed,
            attributes=AttributeMask(attributes),
            valid_until=valid_until,
            nonce=nonce,
            **common,
        )
    changed, attributes, nonce = words
    return RegistryEvent(
        KIND_REVOKE,
        partner=partner,
        purpose=purpose,
        changed=changed,
        attributes=AttributeMask(attributes),
        valid_until=0,
        nonce=nonce,
        **common,
    )
