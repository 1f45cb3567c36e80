"""Pseudonyms: keyed, deterministic per person, distinct across people and pepper versions."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from identity.errors import KeyMaterialError
from identity.normalize import PII, normalize_email, normalize_pii
from identity.pseudonym import PepperRing, Pseudonymizer
from tests.identity.test_normalize import emails

PEPPERS = PepperRing({1: b"\x01" * 32, 2: b"\x02" * 32}, current=2)


@given(emails, st.sampled_from(["", " "]))
def test_equivalent_spellings_give_one_subject(email: str, pad: str) -> None:
    pseudonyms = Pseudonymizer(PEPPERS)
    a = pseudonyms.subject(normalize_pii({"email": email}))
    b = pseudonyms.subject(normalize_pii({"email": pad + email.upper() + pad, "name": "Whoever"}))
    assert a == b
    assert len(a) == 32


@given(emails, emails)
def test_different_people_get_different_subjects(a: str, b: str) -> None:
    assume(normalize_email(a) != normalize_email(b))
    pseudonyms = Pseudonymizer(PEPPERS)
    assert pseudonyms.subject(PII(email=normalize_email(a))) != pseudonyms.subject(PII(email=normalize_email(b)))


def test_the_subject_is_keyed_not_a_plain_hash() -> None:
    pii = PII(email="ann@example.com")
    subject = Pseudonymizer(PEPPERS).subject(pii)
    assert subject != hashlib.sha256(b"ann@example.com").digest()
    other_pepper = Pseudonymizer(PepperRing({1: os.urandom(32)}, current=1)).subject(pii)
    assert subject != other_pepper


def test_pepper_versions_derive_different_subjects() -> None:
    pseudonyms = Pseudonymizer(PEPPERS)
    pii = PII(email="ann@example.com")
    assert pseudonyms.subject(pii, version=1) != pseudonyms.subject(pii, version=2)
    assert pseudonyms.subject(pii) == pseudonyms.subject(pii, version=2)


def test_email_wins_over_phone_and_phone_alone_works() -> None:
    pseudonyms = Pseudonymizer(PEPPERS)
    both = PII(email="ann@example.com", phone="+442079460958")
    assert pseudonyms.subject(both) == pseudonyms.subject(PII(email="ann@example.com"))
    assert pseudonyms.subject(PII(phone="+442079460958")) != pseudonyms.subject(both)


def test_blind_index_is_domain_separated_from_subjects() -> None:
    pseudonyms = Pseudonymizer(PEPPERS)
    pii = PII(email="ann@example.com")
    assert pseudonyms.blind_index("email", "ann@example.com") != pseudonyms.subject(pii)
    assert pseudonyms.blind_index("email", "x") != pseudonyms.blind_index("phone", "x")


def test_weak_or_missing_peppers_are_refused() -> None:
    with pytest.raises(KeyMaterialError, match="shorter than 32 bytes"):
        PepperRing({1: b"short"}, current=1)
    with pytest.raises(KeyMaterialError, match="version 3 is not configured"):
        PepperRing({1: b"\x01" * 32}, current=3)


@given(st.lists(emails, max_size=20), st.lists(st.sampled_from(["+442079460958", "+4915112345678"]), max_size=3))
def test_many_subjects_at_once_equal_each_alone(addresses: list[str], phones: list[str]) -> None:
    p = Pseudonymizer(PepperRing({1: os.urandom(32), 2: os.urandom(32)}, 2))
    normal = [normalize_email(a) for a in addresses]
    assert p.subjects("email", normal) == [p.subject(PII(email=a)) for a in normal]
    assert p.subjects("phone", phones, version=1) == [p.subject(PII(phone=n), version=1) for n in phones]
    with pytest.raises(ValueError, match="not 'name'"):
        p.subjects("name", ["x"])
