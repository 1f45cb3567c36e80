"""Benchmarks run in CI as --quick: they must work end to end and end with one line of JSON.

No speed is asserted here (speed is measured by the scripts, not by timed tests); the script itself
asserts that every grant it relayed was confirmed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ledger.settings import PROJECT_ROOT


@pytest.mark.anvil
def test_bench_consent_quick_reports_its_figures() -> None:
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "bench_consent.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["grants"] == 2000
    assert figures["grants_per_s"] > 0
    assert figures["baseline_grants_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["grants_per_s"] / figures["baseline_grants_per_s"], rel=0.01)
    assert 30_000 < figures["gas_per_grant"] < 90_000
