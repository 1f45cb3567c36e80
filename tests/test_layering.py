"""Dependencies point one way (DESIGN.md): api -> crm_bridge -> ledger -> identity."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from ledger.settings import PROJECT_ROOT

ALLOWED = {
    "identity": set(),
    "ledger": {"identity"},
    "crm_bridge": {"ledger", "identity"},
    "api": {"crm_bridge", "ledger", "identity"},
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_downwards(package: str) -> None:
    ours = set(ALLOWED)
    violations = {
        f"{path.relative_to(PROJECT_ROOT)} imports {name}"
        for path in (PROJECT_ROOT / package).rglob("*.py")
        for name in _imports(path) & ours
        if name != package and name not in ALLOWED[package]
    }
    assert not violations


def test_analytics_reads_only_what_the_bridge_released() -> None:
    """crm_bridge.analytics takes released tables: it may not reach raw CRM data (sources, the bridge),
    identity (PII) or the ledger."""
    allowed = {"crm_bridge.release", "crm_bridge.errors"}
    violations = set()
    for path in (PROJECT_ROOT / "crm_bridge" / "analytics").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                else []
            )
            for name in names:
                ours = name.split(".")[0] in ALLOWED
                if ours and not name.startswith("crm_bridge.analytics") and name not in allowed:
                    violations.add(f"{path.relative_to(PROJECT_ROOT)} imports {name}")
    assert not violations


BACKEND_NAMES = {"inprocess", "geth", "anvil", "rpc"}
# What a chain backend is, and the nodes behind it: `ledger` alone knows them.
BACKEND_KINDS = {
    "InProcessBackend",
    "GethBackend",
    "AnvilBackend",
    "ManagedBackend",
    "RpcBackend",
    "GethNode",
    "AnvilNode",
    "Checkpoints",
}


def _backend_branches(path: Path) -> set[str]:
    """Where a module compares something with a backend's name, or imports a backend or node class."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = {
                element.value
                for operand in operands
                for element in (operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand])
                if isinstance(element, ast.Constant) and isinstance(element.value, str)
            }
            if names & BACKEND_NAMES:
                found.add(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} compares with {sorted(names)}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ledger"):
            for alias in node.names:
                if alias.name in BACKEND_KINDS:
                    found.add(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} imports {alias.name}")
    return found


@pytest.mark.parametrize("package", ["api", "crm_bridge", "identity"])
def test_no_branch_on_the_chain_backend_outside_ledger(package: str) -> None:
    """What differs between chain backends is asked of the backend (`ChainBackend.url`, `.miner`,
    `.checkpoint`, `.restart_if_stopped`, `ledger.backends.node_url`, `durable_wait`, the node's
    `copy_chain`): adding a backend is a change to `ledger` alone."""
    violations = set().union(*(_backend_branches(path) for path in (PROJECT_ROOT / package).rglob("*.py")))
    assert not violations


# The pipelines' packages have the same parts under the same names (docs/architecture.md, "The
# pipelines' parts"): a newcomer who knows one finds their way in the other.
PIPELINE_PARTS = {"client", "tables", "lane", "follower", "reads"}
PIPELINES = {
    # part names it lacks, and why
    "points": ({}, {"completions"}),
    "access": ({"lane": "the bridge records each access request itself, synchronously"}, {"verification"}),
    "consent": ({}, {"outbox", "bindings"}),
}


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_each_pipeline_has_the_common_parts(pipeline: str) -> None:
    """Each pipeline package has the common parts (but those it lacks, for a stated reason) and its own
    named extras, nothing else; each part says in its docstring what it is; the package exports names
    that exist."""
    missing, extras = PIPELINES[pipeline]
    folder = PROJECT_ROOT / "ledger" / pipeline
    assert not (PROJECT_ROOT / "ledger" / f"{pipeline}.py").exists()  # no module shadowed by the package
    modules = {path.stem for path in folder.glob("*.py")} - {"__init__"}
    assert modules == (PIPELINE_PARTS - set(missing)) | extras
    for name in modules | {"__init__"}:
        tree = ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"ledger/{pipeline}/{name}.py says what it is"
    package = importlib.import_module(f"ledger.{pipeline}")
    assert all(hasattr(package, name) for name in package.__all__)
