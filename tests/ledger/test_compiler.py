"""Compilation through py-solc-x and solc-js: cache, rebuilds, and clear toolchain errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import solcx

from ledger.compiler import compile_contracts
from ledger.errors import CompilationError, ToolchainError
from ledger.settings import PROJECT_ROOT, ToolchainSettings


@pytest.fixture
def project(tmp_path: Path) -> ToolchainSettings:
    """A copy of the project's contracts beside the real node_modules."""
    shutil.copytree(PROJECT_ROOT / "contracts", tmp_path / "contracts")
    (tmp_path / "node_modules").symlink_to(PROJECT_ROOT / "node_modules")
    shutil.copy(PROJECT_ROOT / "package-lock.json", tmp_path / "package-lock.json")
    return ToolchainSettings(project_root=tmp_path)


def _count_compiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = solcx.compile_standard

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(solcx, "compile_standard", counting)
    return calls


def test_artifacts_hold_abi_bytecode_version_and_hash(project: ToolchainSettings) -> None:
    artifacts = compile_contracts(project)
    registry = artifacts["ConsentRegistry"]
    assert {e["name"] for e in registry.abi if e["type"] == "function"} >= {
        "applyChange",
        "applyBatch",
        "bindController",
        "rebindController",
        "isPermitted",
        "consentOf",
    }
    assert registry.bytecode.startswith("0x")
    assert len(registry.bytecode) > 1000
    assert registry.compiler_version.startswith("0.8.30+commit")
    assert len(registry.input_hash) == 64
    assert "IConsentRegistry" not in artifacts  # interfaces have no bytecode


def test_the_cache_is_reused_until_a_source_or_setting_changes(
    project: ToolchainSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_compiles(monkeypatch)
    first = compile_contracts(project)
    second = compile_contracts(project)
    assert len(calls) == 1
    assert second == first

    source = project.contracts_dir / "ConsentRegistry.sol"
    source.write_text(source.read_text() + "\n// a comment changes the source hash\n")
    third = compile_contracts(project)
    assert len(calls) == 2
    assert third["ConsentRegistry"].input_hash != first["ConsentRegistry"].input_hash

    optimised_less = project.model_copy(update={"optimizer_runs": 200})
    compile_contracts(optimised_less)
    assert len(calls) == 3


def test_a_solidity_error_is_reported_with_the_compilers_message(project: ToolchainSettings) -> None:
    (project.contracts_dir / "Broken.sol").write_text("pragma solidity ^0.8.24; contract Broken { uint x = ; }")
    with pytest.raises(CompilationError, match=r"Broken\.sol"):
        compile_contracts(project)


def test_missing_node_says_how_to_fix_it(project: ToolchainSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(ToolchainError, match=r"Node\.js is not installed.*make setup"):
        compile_contracts(project)


def test_missing_npm_packages_say_how_to_fix_it(tmp_path: Path) -> None:
    shutil.copytree(PROJECT_ROOT / "contracts", tmp_path / "contracts")
    with pytest.raises(ToolchainError, match=r"npm package solc is missing.*make setup"):
        compile_contracts(ToolchainSettings(project_root=tmp_path))
