"""Types that say what a value is."""

from __future__ import annotations

from typing import NewType

from eth_typing import ChecksumAddress

Subject = NewType("Subject", bytes)
"""A 32-byte keyed pseudonym of a person (never PII)."""

Purpose = NewType("Purpose", bytes)
"""keccak256 of a purpose key such as ``marketing.email``."""

Address = ChecksumAddress
