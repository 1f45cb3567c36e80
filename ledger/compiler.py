"""Compiling `contracts/*.sol` with solc-js through py-solc-x, with a content-addressed cache.

solc comes from the npm package `solc` (pinned in package.json): no native binary can be downloaded
on these machines. `solc_shim.cjs` makes solc-js look like the `solc` CLI that py-solc-x drives.
Artifacts are rebuilt only when a source, the lock file (OpenZeppelin and solc versions), the shim
or a compiler setting changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import solcx
import solcx.wrapper
from solcx.exceptions import SolcError

from ledger.errors import CompilationError, ToolchainError
from ledger.files import write_atomically
from ledger.settings import ToolchainSettings, get_toolchain_settings

SHIM = Path(__file__).resolve().parent / "solc_shim.cjs"
_FIX = "run `make setup` (or `npm ci`) in {root}"


@dataclass(frozen=True)
class Artifact:
    """One compiled contract."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str
    compiler_version: str
    input_hash: str


def check_toolchain(settings: ToolchainSettings) -> None:
    """Raise one clear `ToolchainError` naming the command that fixes a missing piece."""
    if shutil.which("node") is None:
        raise ToolchainError(
            "Node.js is not installed: the Solidity compiler (solc-js) runs on it. "
            "Install Node.js 20 or newer (for example `apt-get install nodejs npm`), then "
            + _FIX.format(root=settings.project_root)
        )
    for package in ("solc", "@openzeppelin/contracts"):
        if not (settings.node_modules / package / "package.json").is_file():
            raise ToolchainError(
                f"npm package {package} is missing under {settings.node_modules}: "
                + _FIX.format(root=settings.project_root)
            )


def _standard_input(settings: ToolchainSettings, sources: dict[str, str]) -> dict[str, Any]:
    return {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sorted(sources.items())},
        "settings": {
            "evmVersion": settings.evm_version,
            "optimizer": {"enabled": True, "runs": settings.optimizer_runs},
            "viaIR": False,
            "metadata": {"bytecodeHash": "none"},
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
        },
    }


def _input_hash(settings: ToolchainSettings, standard_input: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(standard_input, sort_keys=True).encode())
    for pinned in (settings.project_root / "package-lock.json", SHIM):
        digest.update(pinned.read_bytes() if pinned.is_file() else b"-")
    return digest.hexdigest()


def compile_contracts(settings: ToolchainSettings | None = None) -> dict[str, Artifact]:
    """Compile every `contracts/*.sol` (or reuse the cached build) and return artifacts by contract name."""
    settings = settings or get_toolchain_settings()
    sources = {
        f"contracts/{path.name}": path.read_text(encoding="utf-8")
        for path in sorted(settings.contracts_dir.glob("*.sol"))
    }
    if not sources:
        raise CompilationError(f"no Solidity sources in {settings.contracts_dir}")
    standard_input = _standard_input(settings, sources)
    input_hash = _input_hash(settings, standard_input)
    cache = settings.artifacts_dir / "contracts.json"
    if cache.is_file():
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("input_hash") == input_hash:
            return {name: Artifact(**fields) for name, fields in cached["artifacts"].items()}

    check_toolchain(settings)
    try:
        version = str(solcx.wrapper.get_solc_version(SHIM, with_commit_hash=True))
        output = solcx.compile_standard(
            standard_input,
            solc_binary=SHIM,
            base_path=settings.project_root,
            allow_paths=[settings.contracts_dir, settings.node_modules / "@openzeppelin"],
        )
    except SolcError as exc:
        raise CompilationError(f"solc rejected the contracts:\n{exc.message}") from exc
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ToolchainError(f"could not run solc-js ({exc}): " + _FIX.format(root=settings.project_root)) from exc

    artifacts: dict[str, Artifact] = {}
    for unit in sources:
        for name, contract in output["contracts"].get(unit, {}).items():
            bytecode = contract["evm"]["bytecode"]["object"]
            if not bytecode:  # interfaces and abstract contracts
                continue
            artifacts[name] = Artifact(
                name=name,
                abi=contract["abi"],
                bytecode="0x" + bytecode,
                deployed_bytecode="0x" + contract["evm"]["deployedBytecode"]["object"],
                compiler_version=version,
                input_hash=input_hash,
            )
    write_atomically(
        cache,
        json.dumps({"input_hash": input_hash, "artifacts": {n: a.__dict__ for n, a in artifacts.items()}}, indent=1),
    )
    return artifacts


def error_abis(settings: ToolchainSettings | None = None) -> list[dict[str, Any]]:
    """Every custom error of every compiled contract (OpenZeppelin's included), for decoding reverts."""
    seen: dict[str, dict[str, Any]] = {}
    for artifact in compile_contracts(settings).values():
        for entry in artifact.abi:
            if entry["type"] == "error":
                seen.setdefault(entry["name"], entry)
    return list(seen.values())
