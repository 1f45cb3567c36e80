"""Normalisation: idempotent, equivalent spellings agree, bad input names its field (never its value)."""

from __future__ import annotations

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from identity import normalize
from identity.errors import InvalidPII
from identity.normalize import PII, normalize_email, normalize_name, normalize_phone, normalize_pii

local_parts = st.from_regex(r"[a-z0-9]([a-z0-9._+-]{0,20}[a-z0-9])?", fullmatch=True).filter(lambda s: ".." not in s)
domains = st.from_regex(r"[a-z][a-z0-9-]{0,15}[a-z0-9]\.(com|org|co\.uk|de|io)", fullmatch=True).filter(
    lambda s: "--" not in s
)
emails = st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains)


def _respell(value: str, flips: list[bool], pad: str) -> str:
    varied = "".join(c.upper() if flip else c for c, flip in zip(value, flips + [False] * len(value), strict=False))
    return f"{pad}{varied}{pad}"


@given(emails, st.lists(st.booleans(), max_size=60), st.sampled_from(["", " ", "\t", "  \n"]))
def test_email_spellings_normalise_to_one_value(email: str, flips: list[bool], pad: str) -> None:
    normal = normalize_email(email)
    assert normalize_email(_respell(email, flips, pad)) == normal
    assert normalize_email(normal) == normal  # idempotent
    assert normal == normal.strip().lower()


@pytest.mark.parametrize("bad", ["", "   ", "no-at-sign", "a@", "@b.com", "a@b", "a b@c.com", "a@@b.com"])
def test_invalid_email_names_the_field_not_the_value(bad: str) -> None:
    with pytest.raises(InvalidPII) as refused:
        normalize_email(bad)
    assert refused.value.field == "email"
    if bad.strip():
        assert bad not in str(refused.value)


def test_unicode_domains_are_normalised() -> None:
    assert normalize_email("Ana@BÜCHER.example") == normalize_email("ana@bücher.example")


@pytest.mark.parametrize(
    ("spelling", "region"),
    [
        ("+44 20 7946 0958", None),
        ("+442079460958", None),
        ("020 7946 0958", "GB"),
        ("(020) 7946-0958", "GB"),
        ("0044 20 7946 0958", "GB"),
    ],
)
def test_phone_spellings_give_e164(spelling: str, region: str | None) -> None:
    assert normalize_phone(spelling, region) == "+442079460958"


@given(st.sampled_from(["+14155552671", "+442079460958", "+4930901820", "+33142685300", "+819012345678"]))
def test_phone_normalisation_is_idempotent(number: str) -> None:
    assert normalize_phone(normalize_phone(number)) == normalize_phone(number)


@pytest.mark.parametrize(
    ("bad", "region"), [("", None), ("12345", None), ("+44 12", None), ("call me", "GB"), ("020 7946 0958", None)]
)
def test_invalid_phone_names_the_field(bad: str, region: str | None) -> None:
    with pytest.raises(InvalidPII) as refused:
        normalize_phone(bad, region)
    assert refused.value.field == "phone"


@given(st.text(min_size=1, max_size=40))
def test_name_normalisation_is_idempotent(name: str) -> None:
    refused: InvalidPII | None = None
    try:
        normalize_name(name)
    except InvalidPII as exc:
        refused = exc
    if refused is not None:
        assert refused.field == "name"
        return
    normal = normalize_name(name)
    assert normalize_name(normal) == normal
    assert "  " not in normal
    assert normal == normal.strip()


@settings(max_examples=50)
@given(st.lists(st.sampled_from([" ", "\t", "\u00a0", "\u2003"]), min_size=1, max_size=3))
def test_name_spellings_agree(spaces: list[str]) -> None:
    sep = "".join(spaces)
    assert normalize_name(f"  ANNE{sep}Müller ") == normalize_name("anne müller")
    assert normalize_name("Straße") == normalize_name("STRASSE")
    assert normalize_name("ﬁona") == normalize_name("fiona")  # NFKC: the ligature is two letters


def test_a_record_needs_an_email_or_a_phone_and_hides_its_values() -> None:
    with pytest.raises(InvalidPII, match="e-mail address or a phone number"):
        normalize_pii({"name": "Ann"})
    pii = normalize_pii({"email": " Ann@Example.COM ", "phone": "+44 20 7946 0958", "name": "Ann  Lee"})
    assert pii == PII(email="ann@example.com", phone="+442079460958", name="ann lee")
    assert "ann" not in repr(pii)
    assert "ann" not in str(pii)


@given(emails, emails)
def test_different_addresses_stay_different(a: str, b: str) -> None:
    assume(a.lower() != b.lower())
    assert normalize_email(a) != normalize_email(b)


# Addresses near the fast path's edges: dots, quotes, atext punctuation, special-use and odd domains.
_LOCAL_CHARS = st.sampled_from(list("aZ09.!#$%&'*+/=?^_`{|}~-\"@ (),:;<>[]\\é"))
_DOMAINS = st.sampled_from(
    ["example.com", "EXAMPLE.org", "mail.example", "foo.test", "localhost", "a-.com", "-a.com", "a.b",
     "xn--bcher-kva.example", "bücher.example", "example..com", "example.com.", "1.2.3.4", "[127.0.0.1]",
     "a" * 64 + ".com", "ex_ample.com"]
)  # fmt: skip


@given(local=st.text(_LOCAL_CHARS, min_size=0, max_size=70), domain=_DOMAINS, pad=st.sampled_from(["", " ", "\t"]))
@settings(max_examples=3000)
def test_the_fast_email_path_agrees_with_the_full_validator(local: str, domain: str, pad: str) -> None:
    candidate = f"{pad}{local}@{domain}{pad}"
    fast = normalize._fast_email(candidate.strip())
    try:
        full: str | None = str(validate_email(candidate.strip(), check_deliverability=False).normalized).lower()
    except EmailNotValidError:
        full = None
    if fast is not None:
        assert fast == full
    try:
        assert normalize.normalize_email(candidate) == full
    except InvalidPII:
        assert full is None


def test_the_fast_email_path_takes_common_addresses_and_leaves_the_rest() -> None:
    assert normalize._fast_email("John.Smith+news@Example.COM") == "john.smith+news@example.com"
    assert normalize._fast_email("x@foo.test") is None  # special-use domain: the validator refuses it
    assert normalize._fast_email('"a b"@example.com') is None  # quoted local part: the validator decides
    assert normalize._fast_email("jörg@example.com") is None  # not ASCII


def _one(value: str) -> str | None:
    try:
        return normalize_email(value)
    except InvalidPII:
        return None


@given(st.lists(st.one_of(emails, st.text(max_size=40), st.sampled_from(["", "  ", "a@b", "Ana@BÜCHER.example"]))))
def test_many_emails_normalise_as_each_does_alone(values: list[str]) -> None:
    assert normalize.normalize_emails(values) == [_one(v) for v in values]
