"""Types that say what a value is."""

from __future__ import annotations

from typing import NewType

Subject = NewType("Subject", bytes)
"""A 32-byte keyed pseudonym of a person (HMAC-SHA256 under the pepper); never PII."""

Did = NewType("Did", str)
"""A W3C decentralised identifier, here always did:web."""
