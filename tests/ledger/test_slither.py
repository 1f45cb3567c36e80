"""Slither over contracts/: no high or medium finding, and every other one fixed or explained in place.

An accepted finding is explained in the contract, on the line before it:
`// slither-disable-next-line DETECTOR: the reason`. When Slither cannot run the tests fail: no
report is not a clean report.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from ledger.settings import PROJECT_ROOT
from scripts.slither_check import Finding, SlitherUnavailable, blocking, run

pytestmark = pytest.mark.slow

EXPLANATION = re.compile(r"^\s*// slither-disable-next-line .*\n", re.MULTILINE)


@pytest.fixture(scope="module")
def findings() -> list[Finding]:
    return run(PROJECT_ROOT)


def test_no_high_or_medium_finding(findings: list[Finding]) -> None:
    failing = blocking(findings)
    assert not failing, "fix these, or explain each where it stands:\n\n" + "\n\n".join(map(str, failing))


def test_every_finding_is_fixed_or_explained_where_it_stands(findings: list[Finding]) -> None:
    assert not findings, "fix these, or explain each where it stands:\n\n" + "\n\n".join(map(str, findings))


def test_the_contracts_findings_come_back_without_their_explanations(tmp_path: Path) -> None:
    """The check sees the project's contracts: with the explanations removed, the accepted findings are
    reported again, the two medium ones (the unused error argument of `ECDSA.tryRecover`) failing it."""
    shutil.copytree(PROJECT_ROOT / "contracts", tmp_path / "contracts")
    (tmp_path / "node_modules").symlink_to(PROJECT_ROOT / "node_modules")
    for source in (tmp_path / "contracts").glob("*.sol"):
        source.write_text(EXPLANATION.sub("", source.read_text(encoding="utf-8")), encoding="utf-8")

    found = run(tmp_path)

    failing = blocking(found)
    assert sorted((f.check, f.description.split(" ")[0]) for f in failing) == [
        ("unused-return", "ConsentRegistry._signer(IConsentRegistry.SignedChange)"),
        ("unused-return", "LoyaltyPoints._redeem(ILoyaltyPoints.SignedRedemption)"),
    ]
    # Only findings that touch our contracts: none of those wholly in OpenZeppelin's (dead-code, incorrect-exp, ...).
    assert {f.check for f in found} == {
        "unused-return", "timestamp", "calls-loop", "assembly", "costly-loop", "naming-convention", "pragma"
    }  # fmt: skip


def test_slither_that_cannot_compile_is_an_error_that_says_why(tmp_path: Path) -> None:
    shutil.copytree(PROJECT_ROOT / "contracts", tmp_path / "contracts")  # no node_modules: no solc-js

    with pytest.raises(SlitherUnavailable, match=r"solc-js is not installed under .*: run `npm ci` there"):
        run(tmp_path)
