"""The bridge's errors. Messages name columns and counts, never values (values may be PII)."""

from __future__ import annotations


class BridgeError(Exception):
    """Root of the bridge's errors."""


class MappingError(BridgeError):
    """The mapping file is malformed or does not fit the input."""


class SourceError(BridgeError):
    """The CRM export cannot be read."""


class AccessRefused(BridgeError):
    """The access log did not record the batch (so nothing of it may be released)."""
