"""Types that say what a value is."""

from __future__ import annotations

from functools import lru_cache
from typing import NewType

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from sha3 import keccak_256  # safe-pysha3, eth-hash's C backend here (see ledger/__init__.py)

from identity.types import Subject
from ledger.errors import UnknownAttributes

__all__ = [
    "ALL_ATTRIBUTES",
    "ATTRIBUTE_BITS",
    "INT64_MAX",
    "MAX_POINTS",
    "Address",
    "AttributeMask",
    "Purpose",
    "Subject",
    "attribute_mask",
    "checksummed",
    "keccak256",
    "purpose_id",
]

Purpose = NewType("Purpose", bytes)
"""keccak256 of a purpose key such as ``marketing.email``."""

Address = ChecksumAddress

ATTRIBUTE_BITS = 192
"""How many attributes a consent can hold: `IConsentRegistry.Consent.attributes` is a uint192 (a
consent's bits and its validity share one storage slot) and `ConsentRegistry` refuses to grant a bit
above them. The one definition of that limit: the registry's attribute list, the bridge's mapping and
every mask the service accepts are bound by it."""

ALL_ATTRIBUTES = (1 << ATTRIBUTE_BITS) - 1

AttributeMask = NewType("AttributeMask", int)
"""A set of attributes, bit i for the attribute the registry numbers i (`api.reference`), every bit below
`ATTRIBUTE_BITS`. A NewType, not a class: a mask is a plain int at run time (the relayer and the bridge
handle millions of them); `attribute_mask` is how an int from outside becomes one."""


def attribute_mask(value: int, known: int = ALL_ATTRIBUTES) -> AttributeMask:
    """`value` as an `AttributeMask`, if every bit it sets is below `ATTRIBUTE_BITS` and in `known` (the
    bits the registry names, where the caller has them); else `UnknownAttributes` naming the lowest bit
    that is not. The one check of a mask that enters from outside (a signed change, the bridge)."""
    stray = value & ~(known & ALL_ATTRIBUTES)
    if stray:
        raise UnknownAttributes((stray & -stray).bit_length() - 1)  # negative: bits up to infinity
    return AttributeMask(value)


INT64_MAX = 2**63 - 1
"""The largest integer the service databases store (SQLite's INTEGER and PostgreSQL's BIGINT are signed
64-bit): every unix time, nonce and amount a request carries into them is at most this, whatever its
Solidity type allows."""

MAX_POINTS = 10**15
"""The most points one issuance or redemption moves: far below `INT64_MAX`, so sums of them fit too."""


def keccak256(data: bytes) -> bytes:
    """Keccak-256 of bytes, straight from the C code eth-hash also calls: eth_utils' `keccak` converts
    and checks its arguments first (8.8 us a hash of 200 bytes here, 1.2 us this way). A signed
    request's check hashes three times (struct, digest, signer's address)."""
    return bytes(keccak_256(data).digest())


def purpose_id(key: str) -> Purpose:
    """The id of a purpose key such as ``marketing.email`` (keccak256 of it), as the registry keys
    consents and the access log records them. Also `ledger.eip712.purpose_id`, where callers found it."""
    return Purpose(keccak256(key.encode()))


@lru_cache(maxsize=1 << 16)
def checksummed(address: str | bytes) -> ChecksumAddress:
    """`to_checksum_address`, remembered: checksumming hashes the address (~10 us), and the same
    contracts, partners and customers' keys come back all the time (signatures, event logs). An
    invalid address raises, which is not remembered."""
    return to_checksum_address(address)
