"""The identity package's exceptions: one root, families under it."""

from __future__ import annotations


class IdentityError(Exception):
    """Raised for any failure inside the identity package."""


class InvalidPII(IdentityError):
    """Raised when a PII value cannot be normalised; `field` names which one (never the value)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid {field}: {reason}")
        self.field = field
        self.reason = reason


class KeyMaterialError(IdentityError):
    """Raised when a pepper or master key is missing, malformed or unknown."""


class VaultError(IdentityError):
    """Raised when the PII vault cannot do what was asked."""


class UnknownSubject(VaultError):
    """Raised when no subject with that pseudonym is enrolled."""


class SubjectErased(VaultError):
    """Raised when the subject's PII was erased (its data key destroyed)."""


class TamperedCiphertext(VaultError):
    """Raised when a ciphertext or wrapped key fails authentication: altered, or moved to another row."""


class InvalidDid(IdentityError):
    """Raised when a string is not a DID this service issues (W3C DID syntax, our did:web host)."""


class DidHostMismatch(IdentityError):
    """Raised when a process would issue DIDs with another host than the data dir's service records."""
