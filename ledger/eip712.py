"""EIP-712 typed data for the messages customers sign (DESIGN.md, Interfaces).

`typed_data()` gives the complete JSON that `eth_signTypedData_v4` takes, so any standard wallet
can sign it unchanged. The digest of our fixed message types is computed directly (keccak of the
ABI-encoded struct) because the generic encoder in eth-account is too slow for the relayer's hot
path; `tests/ledger/test_eip712.py` checks both give the same digest for arbitrary values.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter
from typing import Any, ClassVar

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


def _uint_encoder(bits: int) -> Callable[[int], bytes]:
    """The word of a `uint<bits>` (a closure per width: a partial with a keyword cost a microsecond a message)."""
    end = 1 << bits

    def word(value: int) -> bytes:
        if not 0 <= value < end:
            raise ValueError(f"{value} is out of range for uint{bits}")
        return value.to_bytes(32, "big")

    return word


# The messages customers sign, one specification each (`MessageType`): the EIP-712 type string and
# typehash, the typed data a wallet is given, the struct hash, and the parsing and validation of
# submitted typed data all come from it. The contracts' TYPEHASH constants and their structs' ABI are
# checked against it (tests/ledger/test_eip712.py).


@dataclass(frozen=True)
class Field:
    """One field of a signed message: its EIP-712 name and Solidity type (`bytes32`, `address` or
    `uint<N>`), the attribute of the Python message that holds it, and the largest value the service
    accepts where tighter than the type (what the service stores is a signed 64-bit INTEGER)."""

    name: str
    type: str
    attr: str = ""  # when it differs from `name`
    maximum: int | None = None
    bits: int = field(init=False)  # of a `uint<N>`
    # The field's 32-byte ABI word (every type here is static), refusing a value not of its type.
    word: Callable[[Any], bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.attr:
            object.__setattr__(self, "attr", self.name)
        bits = int(self.type[4:]) if self.type.startswith("uint") else 0
        if not (self.type in ("bytes32", "address") or (8 <= bits <= 256 and bits % 8 == 0)):
            raise ValueError(f"{self.name}: {self.type} is not a type a message of ours has")
        object.__setattr__(self, "bits", bits)
        word = {"bytes32": _bytes32_word, "address": _address_word}.get(self.type)
        object.__setattr__(self, "word", word or _uint_encoder(bits))

    def to_json(self, value: Any) -> Any:
        return "0x" + bytes(value).hex() if self.type == "bytes32" else value

    def read(self, value: Any) -> Any:
        """The submitted JSON value as the Python value, or TypedDataError naming the field."""
        if self.type == "bytes32":
            return _bytes32(value, self.name)
        if self.type == "address":
            return _address(value, self.name)
        return _uint(value, self.bits, self.name, maximum=self.maximum)


@dataclass(frozen=True)
class MessageType:
    """The specification of one EIP-712 message type."""

    primary: str
    fields: tuple[Field, ...]
    type_string: str = field(init=False)  # as the contracts' `..._TYPEHASH` constants spell it
    typehash: bytes = field(init=False)
    _values: Callable[[Any], tuple[Any, ...]] = field(init=False, repr=False, compare=False)
    _words: tuple[Callable[[Any], bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        type_string = self.primary + "(" + ",".join(f"{f.type} {f.name}" for f in self.fields) + ")"
        object.__setattr__(self, "type_string", type_string)
        object.__setattr__(self, "typehash", keccak(text=type_string))
        object.__setattr__(self, "_values", attrgetter(*(f.attr for f in self.fields)))
        object.__setattr__(self, "_words", tuple(f.word for f in self.fields))

    def types(self) -> dict[str, list[dict[str, str]]]:
        """The `types` of the typed data (a new object each time: callers may hand it out)."""
        return {
            "EIP712Domain": EIP712_DOMAIN_FIELDS,
            self.primary: [{"name": f.name, "type": f.type} for f in self.fields],
        }

    def message(self, values: Any) -> dict[str, Any]:
        return {f.name: f.to_json(getattr(values, f.attr)) for f in self.fields}

    def struct_hash(self, values: Any) -> bytes:
        words = [word(value) for word, value in zip(self._words, self._values(values), strict=True)]
        return keccak256(self.typehash + b"".join(words))

    def read(self, message: Any) -> dict[str, Any]:
        """The submitted message's fields by attribute, each checked against its type; exactly the
        fields of this type, no more and no fewer."""
        if not isinstance(message, dict) or set(message) != {f.name for f in self.fields}:
            raise TypedDataError(f"message must have exactly the fields of {self.primary}")
        return {f.attr: f.read(message[f.name]) for f in self.fields}


_STORED = INT64_MAX  # a signed 64-bit INTEGER column: amounts, unix times, consent nonces
_CONSENT_HEAD = (
    Field("subject", "bytes32"),
    Field("partner", "address"),
    Field("purpose", "bytes32"),
    # The whole word is signed; the registry keeps its low `ATTRIBUTE_BITS` (the routes check the rest).
    Field("attributes", "uint256"),
)
_NONCE_DEADLINE = (Field("nonce", "uint256", maximum=_STORED), Field("deadline", "uint256", maximum=_STORED))
CONSENT_GRANT = MessageType(
    "ConsentGrant",
    (*_CONSENT_HEAD, Field("validUntil", "uint64", "valid_until", maximum=_STORED), *_NONCE_DEADLINE),
)
CONSENT_REVOKE = MessageType("ConsentRevoke", (*_CONSENT_HEAD, *_NONCE_DEADLINE))
CONTROLLER_CHANGE = MessageType(
    "ControllerChange",
    (Field("subject", "bytes32"), Field("newController", "address", "new_controller"), *_NONCE_DEADLINE),
)
# The current key's veto of a pending recovery (`ConsentRegistry.cancelRecovery`): names the recovery,
# so it needs no nonce.
RECOVERY_CANCEL = MessageType(
    "RecoveryCancel",
    (
        Field("subject", "bytes32"),
        Field("newController", "address", "new_controller"),
        Field("effectiveAt", "uint64", "effective_at", maximum=_STORED),
        Field("deadline", "uint256", maximum=_STORED),
    ),
)
REDEMPTION = MessageType(
    "Redemption",
    (
        Field("subject", "bytes32"),
        Field("partner", "address"),
        Field("amount", "uint256", maximum=_STORED),
        Field("redemptionId", "bytes32", "redemption_id"),
        Field("nonce", "uint256"),  # keyed (partner above, sequence below): stored as decimal text
        Field("deadline", "uint256", maximum=_STORED),
    ),
)
# Off-chain only: a new customer proves they hold the key they bind, with their claim code.
CONTROLLER_BINDING = MessageType(
    "ControllerBinding",
    (
        Field("subject", "bytes32"),
        Field("controller", "address"),
        Field("claim", "bytes32"),
        Field("deadline", "uint256", maximum=_STORED),
    ),
)
MESSAGE_TYPES = {
    t.primary: t
    for t in (CONSENT_GRANT, CONSENT_REVOKE, CONTROLLER_CHANGE, RECOVERY_CANCEL, REDEMPTION, CONTROLLER_BINDING)
}


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


class Signed:
    """What every message has from its specification (`spec()`): its primary type, its JSON
    message, and its struct hash."""

    SPEC: ClassVar[MessageType]

    def spec(self) -> MessageType:
        return self.SPEC

    @property
    def primary_type(self) -> str:
        return self.spec().primary

    def message(self) -> dict[str, Any]:
        return self.spec().message(self)

    def struct_hash(self) -> bytes:
        return self.spec().struct_hash(self)


@dataclass(frozen=True)
class ConsentChange(Signed):
    """A `ConsentGrant` or `ConsentRevoke` message (a revocation has `valid_until` 0)."""

    kind: ChangeKind
    subject: Subject
    partner: ChecksumAddress
    purpose: Purpose
    attributes: int
    nonce: int
    deadline: int
    valid_until: int = 0

    def spec(self) -> MessageType:
        return CONSENT_GRANT if self.kind is ChangeKind.GRANT else CONSENT_REVOKE


@dataclass(frozen=True)
class ControllerChange(Signed):
    """A `ControllerChange` message: the current controller hands a subject to a new key."""

    subject: Subject
    new_controller: ChecksumAddress
    nonce: int
    deadline: int
    SPEC = CONTROLLER_CHANGE


@dataclass(frozen=True)
class RecoveryCancel(Signed):
    """A `RecoveryCancel` message: the current key vetoes the pending recovery to `new_controller`."""

    subject: Subject
    new_controller: ChecksumAddress
    effective_at: int
    deadline: int
    SPEC = RECOVERY_CANCEL


@dataclass(frozen=True)
class ControllerBinding(Signed):
    """`ControllerBinding`: signed off-chain by a new customer's key; `claim` is keccak256 of the claim code."""

    subject: Subject
    controller: ChecksumAddress
    claim: bytes
    deadline: int
    SPEC = CONTROLLER_BINDING


@dataclass(frozen=True)
class Redemption(Signed):
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
    SPEC = REDEMPTION


def redemption_nonce(partner: str, sequence: int) -> int:
    """The keyed nonce of a redemption: the partner's address in the upper 192 bits, a sequence below."""
    return (int(partner, 16) << 64) | sequence


Message = ConsentChange | ControllerChange | RecoveryCancel | ControllerBinding | Redemption


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
    values = MESSAGE_TYPES[primary].read(typed.get("message"))
    parsed = _BUILD[primary](values)
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


_TYPES = {primary: t.types() for primary, t in MESSAGE_TYPES.items()}  # for comparison only: never handed out
_BUILD: dict[str, Callable[[dict[str, Any]], Message]] = {
    "ConsentGrant": lambda values: ConsentChange(kind=ChangeKind.GRANT, **values),
    "ConsentRevoke": lambda values: ConsentChange(kind=ChangeKind.REVOKE, **values),
    "ControllerChange": lambda values: ControllerChange(**values),
    "RecoveryCancel": lambda values: RecoveryCancel(**values),
    "Redemption": lambda values: Redemption(**values),
    "ControllerBinding": lambda values: ControllerBinding(**values),
}


def digest(domain: Domain, message: Message) -> bytes:
    """The 32 bytes that are signed: keccak256(0x1901 ‖ domainSeparator ‖ structHash)."""
    return keccak256(b"\x19\x01" + domain.separator() + message.struct_hash())


def typed_data(domain: Domain, message: Message) -> dict[str, Any]:
    """The complete typed data, as `eth_signTypedData_v4` takes it."""
    primary = message.primary_type
    return {
        "types": message.spec().types(),
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
