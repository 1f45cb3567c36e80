"""EIP-712 typed data for the messages customers sign (DESIGN.md, Interfaces).

`typed_data()` gives the complete JSON that `eth_signTypedData_v4` takes, so any standard wallet
can sign it unchanged. The digest of our fixed message types is computed directly (keccak of the
ABI-encoded struct) because the generic encoder in eth-account is too slow for the relayer's hot
path; `tests/ledger/test_eip712.py` checks both give the same digest for arbitrary values.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from coincurve import PrivateKey, PublicKey
from eth_abi.abi import encode as abi_encode
from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak

from ledger.errors import LedgerError
from ledger.types import INT64_MAX, Purpose, Subject, checksummed, keccak256
from ledger.types import purpose_id as purpose_id  # where callers find it (defined beside `Purpose`)

DOMAIN_VERSION = "1"
# secp256k1 order / 2: signatures with a larger s are malleable copies, refused here as by ECDSA.sol.
_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0

EIP712_DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
_DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")

MESSAGE_FIELDS: dict[str, list[tuple[str, str]]] = {
    "ConsentGrant": [
        ("subject", "bytes32"),
        ("partner", "address"),
        ("purpose", "bytes32"),
        ("attributes", "uint256"),
        ("validUntil", "uint64"),
        ("nonce", "uint256"),
        ("deadline", "uint256"),
    ],
    "ConsentRevoke": [
        ("subject", "bytes32"),
        ("partner", "address"),
        ("purpose", "bytes32"),
        ("attributes", "uint256"),
        ("nonce", "uint256"),
        ("deadline", "uint256"),
    ],
    "ControllerChange": [
        ("subject", "bytes32"),
        ("newController", "address"),
        ("nonce", "uint256"),
        ("deadline", "uint256"),
    ],
    "Redemption": [
        ("subject", "bytes32"),
        ("partner", "address"),
        ("amount", "uint256"),
        ("redemptionId", "bytes32"),
        ("nonce", "uint256"),
        ("deadline", "uint256"),
    ],
    # Off-chain only: a new customer proves they hold the key they bind, with their claim code.
    "ControllerBinding": [
        ("subject", "bytes32"),
        ("controller", "address"),
        ("claim", "bytes32"),
        ("deadline", "uint256"),
    ],
}


def _type_string(primary: str) -> str:
    return primary + "(" + ",".join(f"{kind} {name}" for name, kind in MESSAGE_FIELDS[primary]) + ")"


TYPEHASHES = {primary: keccak(text=_type_string(primary)) for primary in MESSAGE_FIELDS}


# Every field of our messages is a static type, so a struct's ABI encoding is its 32-byte words one
# after another; built directly, as eth_abi's general encoder took about a third of a signature check.
def _address_word(address: str) -> bytes:
    if len(address) != 42:
        raise ValueError(f"not an address: {address!r}")
    return bytes(12) + bytes.fromhex(address[2:])


def _bytes32_word(value: bytes) -> bytes:
    if len(value) != 32:
        raise ValueError(f"bytes32 is 32 bytes, got {len(value)}")
    return bytes(value)


def _uint_word(value: int, bits: int = 256) -> bytes:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{value} is out of range for uint{bits}")
    return value.to_bytes(32, "big")


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain of one deployed contract."""

    name: str
    chain_id: int
    verifying_contract: ChecksumAddress
    version: str = DOMAIN_VERSION

    def separator(self) -> bytes:
        return _separator(self)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": self.verifying_contract,
        }


@lru_cache(maxsize=64)
def _separator(domain: Domain) -> bytes:
    """The domain separator (cached: a service has one or two domains and hashes it per signature)."""
    return keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                _DOMAIN_TYPEHASH,
                keccak(text=domain.name),
                keccak(text=domain.version),
                domain.chain_id,
                domain.verifying_contract,
            ],
        )
    )


class ChangeKind(enum.IntEnum):
    """Matches `IConsentRegistry.ChangeKind`."""

    GRANT = 0
    REVOKE = 1


@dataclass(frozen=True)
class Signature:
    v: int
    r: bytes
    s: bytes

    @classmethod
    def from_bytes(cls, signature: bytes) -> Signature:
        if len(signature) != 65:
            raise ValueError(f"a signature is 65 bytes, got {len(signature)}")
        v = signature[64]
        return cls(v=v + 27 if v < 27 else v, r=signature[:32], s=signature[32:64])

    def to_bytes(self) -> bytes:
        return self.r + self.s + bytes([self.v])


@dataclass(frozen=True)
class ConsentChange:
    """A `ConsentGrant` or `ConsentRevoke` message (a revocation has `valid_until` 0)."""

    kind: ChangeKind
    subject: Subject
    partner: ChecksumAddress
    purpose: Purpose
    attributes: int
    nonce: int
    deadline: int
    valid_until: int = 0

    @property
    def primary_type(self) -> str:
        return "ConsentGrant" if self.kind is ChangeKind.GRANT else "ConsentRevoke"

    def message(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "subject": "0x" + bytes(self.subject).hex(),
            "partner": self.partner,
            "purpose": "0x" + bytes(self.purpose).hex(),
            "attributes": self.attributes,
            "validUntil": self.valid_until,
            "nonce": self.nonce,
            "deadline": self.deadline,
        }
        return {name: values[name] for name, _ in MESSAGE_FIELDS[self.primary_type]}

    def struct_hash(self) -> bytes:
        grant = self.kind is ChangeKind.GRANT
        words = (
            TYPEHASHES["ConsentGrant" if grant else "ConsentRevoke"]
            + _bytes32_word(self.subject)
            + _address_word(self.partner)
            + _bytes32_word(self.purpose)
            + _uint_word(self.attributes)
        )
        if grant:
            words += _uint_word(self.valid_until, 64)
        return keccak256(words + _uint_word(self.nonce) + _uint_word(self.deadline))


@dataclass(frozen=True)
class ControllerChange:
    """A `ControllerChange` message: the current controller hands a subject to a new key."""

    subject: Subject
    new_controller: ChecksumAddress
    nonce: int
    deadline: int
    primary_type = "ControllerChange"

    def message(self) -> dict[str, Any]:
        return {
            "subject": "0x" + bytes(self.subject).hex(),
            "newController": self.new_controller,
            "nonce": self.nonce,
            "deadline": self.deadline,
        }

    def struct_hash(self) -> bytes:
        return keccak256(
            TYPEHASHES["ControllerChange"]
            + _bytes32_word(self.subject)
            + _address_word(self.new_controller)
            + _uint_word(self.nonce)
            + _uint_word(self.deadline)
        )


@dataclass(frozen=True)
class ControllerBinding:
    """`ControllerBinding`: signed off-chain by a new customer's key; `claim` is keccak256 of the claim code."""

    subject: Subject
    controller: ChecksumAddress
    claim: bytes
    deadline: int
    primary_type = "ControllerBinding"

    def message(self) -> dict[str, Any]:
        return {
            "subject": "0x" + bytes(self.subject).hex(),
            "controller": self.controller,
            "claim": "0x" + self.claim.hex(),
            "deadline": self.deadline,
        }

    def struct_hash(self) -> bytes:
        return keccak256(
            TYPEHASHES["ControllerBinding"]
            + _bytes32_word(self.subject)
            + _address_word(self.controller)
            + _bytes32_word(self.claim)
            + _uint_word(self.deadline)
        )


@dataclass(frozen=True)
class Redemption:
    """A `Redemption` message: the customer lets `partner` spend `amount` points, once (`redemption_id`).

    `nonce` is keyed by the partner (see `redemption_nonce`), so authorisations at different partners
    are independent of each other.
    """

    subject: Subject
    partner: ChecksumAddress
    amount: int
    redemption_id: bytes
    nonce: int
    deadline: int
    primary_type = "Redemption"

    def message(self) -> dict[str, Any]:
        return {
            "subject": "0x" + bytes(self.subject).hex(),
            "partner": self.partner,
            "amount": self.amount,
            "redemptionId": "0x" + self.redemption_id.hex(),
            "nonce": self.nonce,
            "deadline": self.deadline,
        }

    def struct_hash(self) -> bytes:
        return keccak256(
            TYPEHASHES["Redemption"]
            + _bytes32_word(self.subject)
            + _address_word(self.partner)
            + _uint_word(self.amount)
            + _bytes32_word(self.redemption_id)
            + _uint_word(self.nonce)
            + _uint_word(self.deadline)
        )


def redemption_nonce(partner: str, sequence: int) -> int:
    """The keyed nonce of a redemption: the partner's address in the upper 192 bits, a sequence below."""
    return (int(partner, 16) << 64) | sequence


Message = ConsentChange | ControllerChange | ControllerBinding | Redemption


class TypedDataError(LedgerError):
    """Raised when submitted typed data is not exactly a message this service issues.

    Under the package's root, not ValueError: `parse` runs in route handlers, never in a pydantic
    validator (where only ValueError or AssertionError would become a validation error); the routes
    catch it by name, beside the ValueError of a malformed signature (`Signature.from_bytes`, `recover`)."""


_INTEGER_TEXT = re.compile(r"0|[1-9][0-9]*|0x[0-9a-fA-F]+")  # what wallets write: decimal or 0x-hex, nothing else


def _uint(value: Any, bits: int, name: str, *, maximum: int | None = None) -> int:
    """An integer of Solidity type `uint<bits>`, at most `maximum` where the service stores it or it is a
    unix time. JSON numbers, or strings of digits (wallets write integers beyond 2^53 as strings); not a
    bool, a float, or a string with signs, spaces or underscores (which `int()` would take)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypedDataError(f"{name} must be an integer")
    if isinstance(value, str):
        if _INTEGER_TEXT.fullmatch(value) is None:
            raise TypedDataError(f"{name} must be an integer (decimal digits or 0x-hex)")
        value = int(value, 0)
    number = int(value)
    if not 0 <= number < 2**bits:
        raise TypedDataError(f"{name} is out of range for uint{bits}")
    if maximum is not None and number > maximum:
        raise TypedDataError(f"{name} is too large: at most {maximum}")
    return number


def _bytes32(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 66:
        raise TypedDataError(f"{name} must be 32 bytes as 0x-hex")
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise TypedDataError(f"{name} must be 32 bytes as 0x-hex") from None


def _address(value: Any, name: str) -> ChecksumAddress:
    if not isinstance(value, str) or len(value) != 42:
        raise TypedDataError(f"{name} must be an address")
    try:
        return checksummed(value)
    except ValueError:
        raise TypedDataError(f"{name} must be an address") from None


def parse(typed: Any, domain: Domain, allowed: tuple[str, ...]) -> Message:
    """The message in submitted typed data, checked to be exactly what `typed_data` would produce
    for this domain (so the signature is over what we will act on)."""
    if not isinstance(typed, dict):
        raise TypedDataError("typed_data must be an object")
    primary = typed.get("primaryType")
    if primary not in allowed:
        raise TypedDataError(f"primaryType must be one of {', '.join(allowed)}")
    message = typed.get("message")
    if not isinstance(message, dict) or set(message) != {n for n, _ in MESSAGE_FIELDS[primary]}:
        raise TypedDataError(f"message must have exactly the fields of {primary}")
    parsed: Message
    if primary in ("ConsentGrant", "ConsentRevoke"):
        parsed = ConsentChange(
            kind=ChangeKind.GRANT if primary == "ConsentGrant" else ChangeKind.REVOKE,
            subject=Subject(_bytes32(message["subject"], "subject")),
            partner=_address(message["partner"], "partner"),
            purpose=Purpose(_bytes32(message["purpose"], "purpose")),
            attributes=_uint(message["attributes"], 256, "attributes"),
            nonce=_uint(message["nonce"], 256, "nonce", maximum=INT64_MAX),  # the outbox stores it
            deadline=_uint(message["deadline"], 256, "deadline", maximum=INT64_MAX),
            valid_until=_uint(message.get("validUntil", 0), 64, "validUntil", maximum=INT64_MAX),
        )
    elif primary == "Redemption":
        parsed = Redemption(
            subject=Subject(_bytes32(message["subject"], "subject")),
            partner=_address(message["partner"], "partner"),
            amount=_uint(message["amount"], 256, "amount", maximum=INT64_MAX),
            redemption_id=_bytes32(message["redemptionId"], "redemptionId"),
            nonce=_uint(message["nonce"], 256, "nonce"),  # keyed: stored as decimal text
            deadline=_uint(message["deadline"], 256, "deadline", maximum=INT64_MAX),
        )
    elif primary == "ControllerBinding":
        parsed = ControllerBinding(
            subject=Subject(_bytes32(message["subject"], "subject")),
            controller=_address(message["controller"], "controller"),
            claim=_bytes32(message["claim"], "claim"),
            deadline=_uint(message["deadline"], 256, "deadline", maximum=INT64_MAX),
        )
    else:
        parsed = ControllerChange(
            subject=Subject(_bytes32(message["subject"], "subject")),
            new_controller=_address(message["newController"], "newController"),
            nonce=_uint(message["nonce"], 256, "nonce", maximum=INT64_MAX),
            deadline=_uint(message["deadline"], 256, "deadline", maximum=INT64_MAX),
        )
    # Compared with what `typed_data` would give, built once per domain and message type.
    submitted_domain = typed.get("domain")
    if not isinstance(submitted_domain, dict) or {
        k: str(v).lower() for k, v in submitted_domain.items()
    } != _lowered_domain(domain):
        raise TypedDataError("domain is not this service's (name, version, chainId, verifyingContract)")
    if typed.get("types") != _TYPES[primary]:
        raise TypedDataError("types do not match the message type")
    return parsed


@lru_cache(maxsize=64)
def _lowered_domain(domain: Domain) -> dict[str, str]:
    return {k: str(v).lower() for k, v in domain.as_json().items()}


def _types(primary: str) -> dict[str, list[dict[str, str]]]:
    return {
        "EIP712Domain": EIP712_DOMAIN_FIELDS,
        primary: [{"name": name, "type": kind} for name, kind in MESSAGE_FIELDS[primary]],
    }


_TYPES = {primary: _types(primary) for primary in MESSAGE_FIELDS}  # for comparison only: never handed out


def digest(domain: Domain, message: Message) -> bytes:
    """The 32 bytes that are signed: keccak256(0x1901 ‖ domainSeparator ‖ structHash)."""
    return keccak256(b"\x19\x01" + domain.separator() + message.struct_hash())


def typed_data(domain: Domain, message: Message) -> dict[str, Any]:
    """The complete typed data, as `eth_signTypedData_v4` takes it."""
    primary = message.primary_type
    return {
        "types": _types(primary),
        "primaryType": primary,
        "domain": domain.as_json(),
        "message": message.message(),
    }


def sign(private_key: bytes, domain: Domain, message: Message) -> Signature:
    """Sign as a wallet would (low-s, v in {27, 28}); libsecp256k1 through coincurve."""
    raw = PrivateKey(private_key).sign_recoverable(digest(domain, message), hasher=None)
    return Signature(v=raw[64] + 27, r=raw[:32], s=raw[32:64])


def recover(domain: Domain, message: Message, signature: Signature) -> ChecksumAddress:
    """The address whose key made `signature` over `message` (raises ValueError if malformed)."""
    if signature.v not in (27, 28):
        raise ValueError(f"signature v must be 27 or 28, got {signature.v}")
    if int.from_bytes(signature.s, "big") > _HALF_ORDER:
        raise ValueError("signature s is in the upper half of the curve order (malleable)")
    public = PublicKey.from_signature_and_message(
        signature.r + signature.s + bytes([signature.v - 27]), digest(domain, message), hasher=None
    )
    return checksummed(keccak256(public.format(compressed=False)[1:])[-20:])


def personal_signer(message: str, signature: bytes) -> ChecksumAddress:
    """The signer of an EIP-191 `personal_sign` message (what wallets do for Sign-In with Ethereum)."""
    data = message.encode("utf-8")
    prefixed = keccak256(b"\x19Ethereum Signed Message:\n" + str(len(data)).encode() + data)
    sig = Signature.from_bytes(signature)
    if sig.v not in (27, 28) or int.from_bytes(sig.s, "big") > _HALF_ORDER:
        raise ValueError("malformed signature")
    public = PublicKey.from_signature_and_message(sig.r + sig.s + bytes([sig.v - 27]), prefixed, hasher=None)
    return checksummed(keccak256(public.format(compressed=False)[1:])[-20:])
