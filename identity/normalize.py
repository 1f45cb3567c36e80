"""Normalising PII so that equivalent spellings give one pseudonym.

- e-mail: trimmed, validated and normalised by `email-validator` (IDNA domain, Unicode NFC), then
  lower-cased whole (mail providers treat local parts case-insensitively in practice);
- phone: parsed by `phonenumbers` (a default region for national numbers) and formatted E.164;
- name: Unicode NFKC, case-folded, whitespace collapsed.

Errors name the field, never the value (the value is PII and must not reach logs).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from identity.errors import InvalidPII

_SPACE = re.compile(r"\s+")


# An ASCII dot-atom local part (RFC 5322 atext): email-validator leaves it as it is, so for such an
# address only the domain needs its checks, and those are the same for every address at that domain.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")


@functools.lru_cache(maxsize=65_536)
def _ascii_domain(domain: str) -> str | None:
    """The normalised domain if email-validator accepts addresses there, else None."""
    try:
        return str(validate_email("x@" + domain, check_deliverability=False).domain)
    except EmailNotValidError:
        return None


def _fast_email(candidate: str) -> str | None:
    """The normalised address for the common case (ASCII, dot-atom local part), without running the
    whole validator per address; None when the full validator must decide. A property test checks that
    both give the same answer."""
    if not candidate.isascii():
        return None
    local, at, domain = candidate.rpartition("@")
    if not at or len(local) > 64 or len(candidate) > 254 or not _DOT_ATOM.fullmatch(local):
        return None
    normalised = _ascii_domain(domain.lower())
    return None if normalised is None else f"{local}@{normalised}".lower()


def normalize_email(value: str) -> str:
    candidate = value.strip()
    if not candidate:
        raise InvalidPII("email", "empty")
    fast = _fast_email(candidate)
    if fast is not None:
        return fast
    try:
        result = validate_email(candidate, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidPII("email", "not a valid e-mail address") from exc
    return str(result.normalized).lower()


def normalize_emails(values: Iterable[str]) -> list[str | None]:
    """`normalize_email` of each value, None where it is not a valid address (many at once: the CRM
    bridge meets tens of thousands of new addresses per chunk)."""
    normalised: list[str | None] = []
    for value in values:
        candidate = value.strip()
        fast = _fast_email(candidate) if candidate else None
        if fast is None and candidate:
            try:
                fast = normalize_email(candidate)
            except InvalidPII:
                fast = None
        normalised.append(fast)
    return normalised


def normalize_phone(value: str, default_region: str | None = None) -> str:
    candidate = value.strip()
    if not candidate:
        raise InvalidPII("phone", "empty")
    try:
        number = phonenumbers.parse(candidate, None if candidate.startswith("+") else default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPII("phone", "not a phone number (international numbers start with +)") from exc
    if not phonenumbers.is_valid_number(number):
        raise InvalidPII("phone", "not a valid phone number")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def normalize_name(value: str) -> str:
    folded = _SPACE.sub(" ", unicodedata.normalize("NFKC", value).casefold()).strip()
    if not folded:
        raise InvalidPII("name", "empty")
    if any(unicodedata.category(ch).startswith("C") for ch in folded):
        raise InvalidPII("name", "contains control characters")
    return folded


@dataclass(frozen=True)
class PII:
    """Normalised personal data of one person. Never logged, never sent to the chain."""

    email: str | None = None
    phone: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.email is None and self.phone is None:
            raise InvalidPII("email", "an e-mail address or a phone number is required")

    def __repr__(self) -> str:  # keep PII out of tracebacks and logs
        present = [f for f in ("email", "phone", "name") if getattr(self, f) is not None]
        return f"PII(<redacted: {', '.join(present)}>)"

    __str__ = __repr__

    def fields(self) -> dict[str, str]:
        return {f: v for f in ("email", "phone", "name") if (v := getattr(self, f)) is not None}


def normalize_pii(raw: Mapping[str, str | None], default_region: str | None = None) -> PII:
    """Normalise a record with optional `email`, `phone` and `name`."""
    email, phone, name = (raw.get(k) for k in ("email", "phone", "name"))
    return PII(
        email=normalize_email(email) if email else None,
        phone=normalize_phone(phone, default_region) if phone else None,
        name=normalize_name(name) if name else None,
    )
