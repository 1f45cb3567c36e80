"""Types that say what a value is."""

from __future__ import annotations

from functools import lru_cache
from typing import NewType

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address

from identity.types import Subject

__all__ = ["Address", "Purpose", "Subject", "checksummed"]

Purpose = NewType("Purpose", bytes)
"""keccak256 of a purpose key such as ``marketing.email``."""

Address = ChecksumAddress


@lru_cache(maxsize=1 << 16)
def checksummed(address: str | bytes) -> ChecksumAddress:
    """`to_checksum_address`, remembered: checksumming hashes the address (~10 us), and the same
    contracts, partners and customers' keys come back all the time (signatures, event logs). An
    invalid address raises, which is not remembered."""
    return to_checksum_address(address)
