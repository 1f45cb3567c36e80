"""The field types every schema uses, for any input (hypothesis): what they accept is what the chain's
types and the databases can hold, and nothing else."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from api.fields import Name, Points, UnixTime
from ledger.types import INT64_MAX, MAX_POINTS

NAME = TypeAdapter(Name)
UNIX_TIME = TypeAdapter(UnixTime)
POINTS = TypeAdapter(Points)


@given(st.text(max_size=120))
def test_a_name_is_accepted_exactly_when_it_is_printable_nfc_text(text: str) -> None:
    printable = (
        0 < len(text) <= 100
        and text == text.strip()
        and unicodedata.is_normalized("NFC", text)
        and not any(unicodedata.category(c).startswith("C") for c in text)
    )
    if printable:
        assert NAME.validate_python(text) == text
    else:
        with pytest.raises(ValidationError):
            NAME.validate_python(text)


@given(st.one_of(st.integers(), st.booleans(), st.floats(), st.text(max_size=20), st.none()))
def test_a_unix_time_is_an_int_the_database_holds(value: object) -> None:
    if type(value) is int and 0 <= value <= INT64_MAX:
        assert UNIX_TIME.validate_python(value) == value
    else:
        with pytest.raises(ValidationError):
            UNIX_TIME.validate_python(value)


@given(st.one_of(st.integers(), st.booleans(), st.floats(), st.text(max_size=20)))
def test_points_are_a_positive_int_up_to_the_maximum(value: object) -> None:
    if type(value) is int and 0 < value <= MAX_POINTS:
        assert POINTS.validate_python(value) == value
    else:
        with pytest.raises(ValidationError):
            POINTS.validate_python(value)
