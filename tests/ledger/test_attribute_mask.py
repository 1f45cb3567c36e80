"""An attribute mask has one limit, the width of the registry's `Consent.attributes`, defined once
(`ledger.types.ATTRIBUTE_BITS`), and one check where a mask enters (`ledger.types.attribute_mask`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ledger.compiler import Artifact
from ledger.errors import LedgerError, UnknownAttributes
from ledger.types import ALL_ATTRIBUTES, ATTRIBUTE_BITS, attribute_mask

ROOT = Path(__file__).resolve().parents[2]


def test_the_limit_is_the_width_the_registry_stores(artifacts: dict[str, Artifact]) -> None:
    (consent_of,) = [f for f in artifacts["ConsentRegistry"].abi if f.get("name") == "consentOf"]
    (consent,) = consent_of["outputs"]
    widths = {c["name"]: c["type"] for c in consent["components"]}
    assert widths["attributes"] == f"uint{ATTRIBUTE_BITS}"
    assert ALL_ATTRIBUTES == 2**ATTRIBUTE_BITS - 1


@pytest.mark.parametrize("mask", [0, 1, 1 << (ATTRIBUTE_BITS - 1), ALL_ATTRIBUTES])
def test_a_mask_within_the_range_is_taken_as_it_is(mask: int) -> None:
    assert attribute_mask(mask) == mask
    assert type(attribute_mask(mask)) is int  # a NewType: no object per mask


@pytest.mark.parametrize(
    ("mask", "known", "bit"),
    [
        (1 << ATTRIBUTE_BITS, ALL_ATTRIBUTES, ATTRIBUTE_BITS),  # one past the range
        (ALL_ATTRIBUTES + 1, ALL_ATTRIBUTES, ATTRIBUTE_BITS),
        (2**256 - 1, ALL_ATTRIBUTES, ATTRIBUTE_BITS),
        (1 | 1 << 200, ALL_ATTRIBUTES, 200),
        (1 << 8 | 1, 0xFF, 8),  # a bit the registry does not name
        (0b110, 0b010, 2),
        (-1, ALL_ATTRIBUTES, ATTRIBUTE_BITS),
        (1 << ATTRIBUTE_BITS, 2**256 - 1, ATTRIBUTE_BITS),  # `known` cannot widen the range
    ],
)
def test_a_bit_no_attribute_has_is_refused_naming_the_lowest(mask: int, known: int, bit: int) -> None:
    with pytest.raises(UnknownAttributes) as refused:
        attribute_mask(mask, known)
    assert refused.value.bit == bit
    assert str(refused.value) == f"attributes: bit {bit} is no attribute's"
    assert isinstance(refused.value, LedgerError)


def test_the_limit_is_defined_once() -> None:
    """No module of the service writes the width again (a literal 192, 2**192, 1 << 192)."""
    pattern = re.compile(r"\b(?:2\s*\*\*\s*192|1\s*<<\s*192|(?<![\w.])192(?![\w.]))")
    found = []
    for package in ("api", "ledger", "crm_bridge", "identity", "scripts"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "ledger" / "types.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code) and '"""' not in line:
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []
