"""Slither, the Solidity static analyser, over `contracts/`, compiled by the project's solc-js shim.

Each finding in the project's contracts is fixed, or explained where it stands by a
`// slither-disable-next-line DETECTOR` comment with the reason (Slither then leaves it out).
Findings that lie wholly in OpenZeppelin's code (node_modules/) are not reported; one that also
touches a contract of ours is. Prints what Slither still finds; exits 1
when any of it has high or medium impact, 2 when Slither could not run (no report is not a pass).

Usage: python scripts/slither_check.py [PROJECT_ROOT]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOLC_DIR = Path(__file__).resolve().parent / "slither-path"  # holds `solc`, the shim under that name
BLOCKING = ("High", "Medium")
COMPILE = ["contracts", "--solc-standard-json", "--solc", str(SOLC_DIR / "solc")]
TIMEOUT_S = 300  # a run takes about 6 s here (solc-js compiles the contracts and OpenZeppelin)


class SlitherUnavailable(RuntimeError):
    """Raised when Slither did not run to the end: it then says nothing about the contracts."""


@dataclass(frozen=True)
class Finding:
    """One result of one Slither detector."""

    check: str
    impact: str
    confidence: str
    description: str

    def __str__(self) -> str:
        return f"[{self.impact}, {self.confidence} confidence] {self.check}: {self.description.strip()}"


def run(project_root: Path = ROOT) -> list[Finding]:
    """Slither's findings in `project_root`'s contracts/ (compiled with its node_modules/)."""
    ours = re.escape(str(project_root.resolve() / "contracts"))  # matched against resolved absolute paths
    done = _python_module("slither", [*COMPILE, "--include-paths", ours, "--json", "-"], project_root)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        # Slither logs only "Unable to compile all targets."; crytic-compile alone says why.
        why = _python_module("crytic_compile", COMPILE, project_root).stderr
        raise SlitherUnavailable(
            f"Slither gave no report (exit status {done.returncode}):\n{done.stderr[-2000:]}\n{why[-3000:]}"
        ) from None
    if not report.get("success"):
        raise SlitherUnavailable(f"Slither failed: {report.get('error')}\n{done.stderr[-3000:]}")
    return [
        Finding(check=r["check"], impact=r["impact"], confidence=r["confidence"], description=r["description"])
        for r in report.get("results", {}).get("detectors", [])
    ]


def _python_module(module: str, args: list[str], project_root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{SOLC_DIR}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=project_root,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlitherUnavailable(f"could not run {module}: {exc}") from exc


def blocking(findings: list[Finding]) -> list[Finding]:
    """The findings that fail the check: high or medium impact."""
    return [f for f in findings if f.impact in BLOCKING]


def main() -> int:
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    try:
        findings = run(root)
    except SlitherUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    for finding in findings:
        print(finding, end="\n\n")
    failing = blocking(findings)
    print(f"{len(findings)} finding(s) not fixed or explained in place, {len(failing)} of high or medium impact")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
