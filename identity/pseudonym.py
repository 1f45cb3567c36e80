"""Keyed pseudonyms: `subject` = HMAC-SHA256(pepper, domain-separated canonical identifier).

A plain or salted SHA-256 of an e-mail address can be reversed by hashing a list of addresses; an
HMAC cannot without the pepper, which lives only in the service's settings. Peppers are versioned:
a new version derives new subjects, and the vault keeps the old→new link for the data owner.

The canonical identifier is the e-mail address when there is one, else the phone number. Blind
indexes (to find a subject by e-mail or by phone without decrypting anything) use the same pepper
under another domain tag, so an index entry never equals a subject.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from identity.errors import KeyMaterialError
from identity.normalize import PII
from identity.types import Subject

_SUBJECT_TAG = b"consent-ledger/subject/v1\x00"
_INDEX_TAG = b"consent-ledger/blind-index/v1\x00"
MIN_PEPPER_BYTES = 32


@dataclass(frozen=True)
class PepperRing:
    """Every pepper version still needed, and which one derives new subjects."""

    peppers: dict[int, bytes]
    current: int

    def __post_init__(self) -> None:
        if self.current not in self.peppers:
            raise KeyMaterialError(f"pepper version {self.current} is not configured")
        for version, pepper in self.peppers.items():
            if len(pepper) < MIN_PEPPER_BYTES:
                raise KeyMaterialError(f"pepper version {version} is shorter than {MIN_PEPPER_BYTES} bytes")

    def get(self, version: int) -> bytes:
        try:
            return self.peppers[version]
        except KeyError:
            raise KeyMaterialError(f"pepper version {version} is not configured") from None


def _mac(key: bytes, tag: bytes, kind: str, value: str) -> bytes:
    return hmac.digest(key, tag + kind.encode() + b"\x00" + value.encode("utf-8"), "sha256")


class Pseudonymizer:
    def __init__(self, ring: PepperRing) -> None:
        self.ring = ring

    def canonical(self, pii: PII) -> tuple[str, str]:
        """(kind, value) of the identifier the subject derives from."""
        if pii.email is not None:
            return "email", pii.email
        assert pii.phone is not None  # PII requires one of them
        return "phone", pii.phone

    def subject(self, pii: PII, version: int | None = None) -> Subject:
        kind, value = self.canonical(pii)
        return Subject(
            _mac(self.ring.get(self.ring.current if version is None else version), _SUBJECT_TAG, kind, value)
        )

    def subjects(self, kind: str, values: Iterable[str], version: int | None = None) -> list[Subject]:
        """The subjects of many normalised identifiers of one kind ("email" or "phone"), each equal to
        `subject` of a PII holding it (the key schedule and the domain tag are hashed once)."""
        if kind not in ("email", "phone"):
            raise ValueError(f"subjects derive from an email or a phone, not {kind!r}")
        key = self.ring.get(self.ring.current if version is None else version)
        prefix = hmac.new(key, _SUBJECT_TAG + kind.encode() + b"\x00", "sha256")
        derived: list[Subject] = []
        for value in values:
            mac = prefix.copy()
            mac.update(value.encode("utf-8"))
            derived.append(Subject(mac.digest()))
        return derived

    def blind_index(self, kind: str, value: str, version: int | None = None) -> bytes:
        """Digest to look a subject up by `kind` (email or phone) = normalised `value`."""
        return _mac(self.ring.get(self.ring.current if version is None else version), _INDEX_TAG, kind, value)
