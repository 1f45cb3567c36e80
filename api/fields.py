"""One description of each kind of field the API takes, used by every schema and query parameter, so
that a value the chain's types or the service databases cannot hold is refused at the edge (422),
never while storing a request that shares a commit with others.

Integers are strict in bodies (`true`, `"10"`, `" 5 "` and `1.0` are not integers) and bounded by both
their Solidity type and the databases' signed 64-bit INTEGER. Names are printable text: no control,
format or unassigned characters (NUL, BIDI overrides, zero-width joiners), NFC, no surrounding blanks.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated

from pydantic import AfterValidator, Field, StrictInt
from pydantic_core import PydanticCustomError

from ledger.types import INT64_MAX, MAX_POINTS

UnixTime = Annotated[StrictInt, Field(ge=0, le=INT64_MAX, description="unix time (seconds)")]
"""A unix time: a uint64 on-chain (a consent's validity), a uint256 elsewhere; stored as a signed 64-bit
integer."""

Points = Annotated[StrictInt, Field(gt=0, le=MAX_POINTS, description=f"points, 1 to {MAX_POINTS}")]

LogIndex = Annotated[int, Field(ge=-1, le=INT64_MAX)]
"""A position in the access log as a query parameter (`after`: -1 is before the first entry)."""


def _printable(value: str) -> str:
    if not unicodedata.is_normalized("NFC", value):
        raise PydanticCustomError("invalid_name", "must be in Unicode normal form C (NFC)")
    if value != value.strip():
        raise PydanticCustomError("invalid_name", "must not start or end with blanks")
    if any(unicodedata.category(c)[0] == "C" for c in value):  # Cc, Cf, Cs, Co, Cn
        raise PydanticCustomError("invalid_name", "must not contain control or invisible characters")
    return value


Name = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_printable)]
"""A partner's name, or a partner named by name or address."""

Title = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]
"""A purpose's or an attribute's display name."""

Description = Annotated[str, Field(max_length=500), AfterValidator(_printable)]

Reference = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_printable)]
"""An issuer's own reference for an issuance (an order number)."""

Key = Annotated[str, Field(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)*$", max_length=100)]
"""A purpose or attribute key, Fideslang style: `marketing.communications.email`."""
