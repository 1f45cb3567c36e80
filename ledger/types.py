"""Types that say what a value is."""

from __future__ import annotations

from typing import NewType

from eth_typing import ChecksumAddress

from identity.types import Subject

__all__ = ["Address", "Purpose", "Subject"]

Purpose = NewType("Purpose", bytes)
"""keccak256 of a purpose key such as ``marketing.email``."""

Address = ChecksumAddress
