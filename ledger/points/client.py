"""The points client: typed client of `LoyaltyPoints` (issuance and redemption, single or batched,
and reads), the encoding of its batches, and the decoding of its events."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak

from ledger.contracts import ContractClient
from ledger.eip712 import Domain, Redemption, Signature, redemption_nonce
from ledger.logs import bytes_of, hex_of, int_of
from ledger.tx import Receipt
from ledger.types import Subject, checksummed

CONTRACT_NAME = "LoyaltyPoints"
ISSUER_ROLE = keccak(text="ISSUER_ROLE")
RELAYER_ROLE = keccak(text="RELAYER_ROLE")

# Gas bounds for a batch (no pre-flight per batch). Measured by tests/ledger (gas bounds): an issuance
# into a new lot costs < 75k, a redemption < 90k plus ~10k per lot it empties or sweeps.
GAS_PER_ISSUANCE = 110_000
GAS_PER_REDEMPTION = 160_000
GAS_PER_BATCH = 60_000

ISSUE_BATCH_SELECTOR = keccak(text="issueBatch((bytes32,uint128,uint64,bytes32)[])")[:4]
REDEEM_BATCH_SELECTOR = keccak(
    text="redeemBatch((bytes32,address,uint256,bytes32,uint256,uint256,uint8,bytes32,bytes32)[])"
)[:4]


@dataclass(frozen=True)
class Issuance:
    subject: Subject
    amount: int
    expires_at: int
    issuance_id: bytes

    def as_abi(self) -> tuple[Any, ...]:
        return (self.subject, self.amount, self.expires_at, self.issuance_id)


@dataclass(frozen=True)
class SignedRedemption:
    redemption: Redemption
    signature: Signature

    def as_abi(self) -> tuple[Any, ...]:
        r, sig = self.redemption, self.signature
        return (r.subject, r.partner, r.amount, r.redemption_id, r.nonce, r.deadline, sig.v, sig.r, sig.s)


@dataclass(frozen=True)
class Lot:
    lot_id: int
    remaining: int
    expires_at: int


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _b32(value: bytes, name: str) -> bytes:
    if len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes")
    return value


def encode_issuances(issuances: Sequence[Issuance]) -> bytes:
    """ABI encoding of an `Issuance[]` argument: all fields static, four words per item (as in
    `ledger.consent.client.encode_changes`; tests compare it with eth_abi)."""
    parts = [_word(0x20), _word(len(issuances))]
    for i in issuances:
        if not (0 <= i.amount < 2**128 and 0 <= i.expires_at < 2**64):
            raise ValueError("amount must fit uint128 and expiresAt uint64")
        parts += [_b32(i.subject, "subject"), _word(i.amount), _word(i.expires_at), _b32(i.issuance_id, "issuanceId")]
    return b"".join(parts)


def encode_redemptions(redemptions: Sequence[SignedRedemption]) -> bytes:
    """ABI encoding of a `SignedRedemption[]` argument: nine static words per item."""
    parts = [_word(0x20), _word(len(redemptions))]
    for signed in redemptions:
        r, sig = signed.redemption, signed.signature
        if not (0 <= r.amount < 2**256 and 0 <= r.nonce < 2**256 and 0 <= r.deadline < 2**256 and 0 <= sig.v < 256):
            raise ValueError("amount, nonce and deadline must fit uint256 and v uint8")
        parts += [
            _b32(r.subject, "subject"),
            bytes(12) + bytes.fromhex(r.partner[2:]),
            _word(r.amount),
            _b32(r.redemption_id, "redemptionId"),
            _word(r.nonce),
            _word(r.deadline),
            _word(sig.v),
            _b32(sig.r, "r"),
            _b32(sig.s, "s"),
        ]
    return b"".join(parts)


def issue_gas(count: int) -> int:
    return GAS_PER_BATCH + GAS_PER_ISSUANCE * count


def redeem_gas(count: int) -> int:
    return GAS_PER_BATCH + GAS_PER_REDEMPTION * count


# logs ----------------------------------------------------------------------------------------------


class EventKind(enum.IntEnum):
    ISSUED = 0
    REDEEMED = 1
    EXPIRED = 2
    ISSUE_REJECTED = 3
    REDEEM_REJECTED = 4


ISSUED = "0x" + keccak(text="PointsIssued(bytes32,bytes32,uint64,uint256,uint64)").hex()
REDEEMED = "0x" + keccak(text="PointsRedeemed(bytes32,address,bytes32,uint256,uint256,uint256)").hex()
EXPIRED = "0x" + keccak(text="PointsExpired(bytes32,uint64,uint256)").hex()
ISSUE_REJECTED = "0x" + keccak(text="IssuanceRejected(bytes32,bytes32,bytes)").hex()
REDEEM_REJECTED = "0x" + keccak(text="RedemptionRejected(bytes32,address,bytes32,bytes)").hex()
TOPICS = [ISSUED, REDEEMED, EXPIRED, ISSUE_REJECTED, REDEEM_REJECTED]
_KINDS = dict(zip(TOPICS, EventKind, strict=True))


@dataclass(frozen=True)
class PointsEvent:
    """One `LoyaltyPoints` log. `ref` is the issuance or redemption id (empty for an expiry)."""

    kind: EventKind
    block_number: int
    block_hash: str
    log_index: int
    tx_hash: str
    subject: bytes
    ref: bytes
    partner: str | None = None
    lot_id: int = 0
    amount: int = 0
    balance: int = 0
    expires_at: int = 0
    nonce: int = 0
    reason: bytes = b""


def decode(log: dict[str, Any]) -> PointsEvent | None:
    topics = [hex_of(t) for t in log["topics"]]
    kind = _KINDS.get(topics[0]) if topics else None
    if kind is None:
        return None
    data = bytes_of(log["data"])
    words = [int.from_bytes(data[i : i + 32], "big") for i in range(0, len(data), 32)]
    common: dict[str, Any] = {
        "kind": kind,
        "block_number": int_of(log["blockNumber"]),
        "block_hash": hex_of(log["blockHash"]),
        "log_index": int_of(log["logIndex"]),
        "tx_hash": hex_of(log["transactionHash"]),
        "subject": bytes.fromhex(topics[1][2:]),
    }
    if kind is EventKind.ISSUED:
        lot_id, amount, expires_at = words
        return PointsEvent(
            ref=bytes.fromhex(topics[2][2:]), lot_id=lot_id, amount=amount, expires_at=expires_at, **common
        )
    if kind is EventKind.EXPIRED:
        lot_id, amount = words
        return PointsEvent(ref=b"", lot_id=lot_id, amount=amount, **common)
    if kind is EventKind.REDEEMED:
        amount, balance, nonce = words
        return PointsEvent(
            ref=bytes.fromhex(topics[3][2:]),
            partner=checksummed("0x" + topics[2][-40:]),
            amount=amount,
            balance=balance,
            nonce=nonce,
            **common,
        )
    reason = data[64 : 64 + words[1]]
    if kind is EventKind.ISSUE_REJECTED:
        return PointsEvent(ref=bytes.fromhex(topics[2][2:]), reason=reason, **common)
    return PointsEvent(
        ref=bytes.fromhex(topics[3][2:]),
        partner=checksummed("0x" + topics[2][-40:]),
        reason=reason,
        **common,
    )


# the client ----------------------------------------------------------------------------------------


class LoyaltyPointsClient(ContractClient):
    """Operator-side client: the operator issues and relays; customers sign redemptions."""

    @cached_property
    def domain(self) -> Domain:
        """The EIP-712 domain of the messages the contract checks (the chain id is the sender's)."""
        return Domain(name=CONTRACT_NAME, chain_id=self.sender.chain_id, verifying_contract=self.address)

    # reads -------------------------------------------------------------------------------------

    def balance_of(self, subject: Subject) -> int:
        return int(self.call("balanceOf", subject))

    def lots_of(self, subject: Subject) -> list[Lot]:
        ids, lots = self.call("lotsOf", subject)
        return [Lot(int(i), int(lot[0]), int(lot[1])) for i, lot in zip(ids, lots, strict=True)]

    def totals(self) -> tuple[int, int, int]:
        issued, redeemed, expired = self.call("totals")
        return int(issued), int(redeemed), int(expired)

    def nonce_of(self, controller: ChecksumAddress, partner: ChecksumAddress) -> int:
        """The next keyed nonce of `controller` for redemptions at `partner` (key included)."""
        return int(self.call("nonces", controller, int(partner, 16)))

    def redemption_used(self, redemption_id: bytes) -> bool:
        return bool(self.call("redemptionUsed", redemption_id))

    def redemption_message(
        self,
        subject: Subject,
        partner: ChecksumAddress,
        amount: int,
        redemption_id: bytes,
        *,
        sequence: int,
        deadline: int,
    ) -> Redemption:
        return Redemption(subject, partner, amount, redemption_id, redemption_nonce(partner, sequence), deadline)

    # actions -----------------------------------------------------------------------------------

    def issue(self, issuance: Issuance) -> Receipt:
        """Issue one lot; a failure raises its decoded error and nothing is sent."""
        return self.transact(self.encode("issue", issuance.as_abi()))

    def redeem(self, signed: SignedRedemption) -> Receipt:
        return self.transact(self.encode("redeem", signed.as_abi()))

    def sweep(self, subject: Subject, max_lots: int = 2**256 - 1) -> Receipt:
        return self.transact(self.encode("sweepExpired", subject, max_lots))

    def encode_issue_batch(self, issuances: Sequence[Issuance]) -> bytes:
        return ISSUE_BATCH_SELECTOR + encode_issuances(issuances)

    def encode_redeem_batch(self, redemptions: Sequence[SignedRedemption]) -> bytes:
        return REDEEM_BATCH_SELECTOR + encode_redemptions(redemptions)

    def issue_batch(self, issuances: Sequence[Issuance]) -> Receipt:
        """Issue many lots in one transaction; items that fail show as `ISSUE_REJECTED` logs."""
        return self.transact(self.encode_issue_batch(issuances), gas=issue_gas(len(issuances)))

    def redeem_batch(self, redemptions: Sequence[SignedRedemption]) -> Receipt:
        """Relay many redemptions in one transaction; items that fail show as `REDEEM_REJECTED` logs."""
        return self.transact(self.encode_redeem_batch(redemptions), gas=redeem_gas(len(redemptions)))

    def logs(self, receipt: Receipt) -> list[PointsEvent]:
        """This contract's events in `receipt`, in log order."""
        decoded = []
        for entry in receipt.logs:
            if checksummed(entry["address"]) != self.address:
                continue
            event = decode(dict(entry))
            if event is not None:
                decoded.append(event)
        return decoded
