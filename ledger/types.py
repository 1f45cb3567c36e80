"""Types that say what a value is."""

from __future__ import annotations

from functools import lru_cache
from typing import NewType

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from sha3 import keccak_256  # safe-pysha3, eth-hash's C backend here (see ledger/__init__.py)

from identity.types import Subject

__all__ = ["INT64_MAX", "MAX_POINTS", "Address", "Purpose", "Subject", "checksummed", "keccak256"]

Purpose = NewType("Purpose", bytes)
"""keccak256 of a purpose key such as ``marketing.email``."""

Address = ChecksumAddress

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


@lru_cache(maxsize=1 << 16)
def checksummed(address: str | bytes) -> ChecksumAddress:
    """`to_checksum_address`, remembered: checksumming hashes the address (~10 us), and the same
    contracts, partners and customers' keys come back all the time (signatures, event logs). An
    invalid address raises, which is not remembered."""
    return to_checksum_address(address)
