"""Settings of the chain connection (environment variables prefixed ``CONSENT_LEDGER_CHAIN_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

Backend = Literal["geth", "anvil", "inprocess", "rpc"]


class ToolchainSettings(BaseSettings):
    """Where the Solidity sources and the npm toolchain live, and how they are compiled."""

    model_config = SettingsConfigDict(env_prefix="CONSENT_LEDGER_SOLC_", extra="ignore")

    project_root: Path = Field(
        default=PROJECT_ROOT,
        description="Directory holding contracts/, package.json and node_modules/.",
    )
    build_dir: Path | None = Field(
        default=None, description="Where compiled artifacts are cached (default: PROJECT_ROOT/build)."
    )
    evm_version: str = Field(
        default="shanghai",
        description="EVM version to compile for; shanghai runs on anvil, eth-tester, Besu and GoQuorum 24+.",
    )
    optimizer_runs: int = Field(default=10_000, description="solc optimizer runs (favour cheap calls).")

    @property
    def contracts_dir(self) -> Path:
        return self.project_root / "contracts"

    @property
    def node_modules(self) -> Path:
        return self.project_root / "node_modules"

    @property
    def artifacts_dir(self) -> Path:
        return self.build_dir or self.project_root / "build"


class ChainSettings(BaseSettings):
    """Which chain to use and how to reach it."""

    model_config = SettingsConfigDict(env_prefix="CONSENT_LEDGER_CHAIN_", extra="ignore")

    backend: Backend = Field(
        default="geth",
        description="geth: a go-ethereum node managed by the service (blocks and state on disk); anvil: an anvil "
        "node managed by the service (chain in memory, dumped to disk; fast tests); inprocess: eth-tester "
        "(tests); rpc: an external node.",
    )
    rpc_url: str | None = Field(default=None, description="JSON-RPC URL of the external node (backend=rpc).")
    operator_key: SecretStr | None = Field(
        default=None,
        description="Hex private key of the operator (relayer) account. Required outside development mode.",
    )
    accessor_key: SecretStr | None = Field(
        default=None,
        description="Hex private key of the accessor account (the CRM bridge records accesses with it). "
        "Required outside development mode. A new one gets the role at the next start, and the old loses it.",
    )
    previous_operator_key: SecretStr | None = Field(
        default=None,
        description="To rotate the operator key: the old key, for one start. It hands every role it holds on "
        "the contracts to OPERATOR_KEY and renounces them (`ledger.roles`).",
    )
    confirmations: int = Field(
        default=1,
        ge=0,
        description="Blocks (counting its own) after which a transaction is final: the bridge releases "
        "data only then. 0 and 1 both mean final on inclusion, which suits QBFT/IBFT chains (Besu, GoQuorum), "
        "whose blocks are final when made.",
    )
    max_logs_range: int = Field(
        default=5_000,
        ge=1,
        description="Most blocks one eth_getLogs call spans (Besu refuses more than its --rpc-max-logs-range, "
        "5,000 by default). Longer ranges are asked in parts; a node that refuses a range as too large is "
        "asked again with half of it.",
    )
    rpc_max_batch: int = Field(
        default=1_024,
        ge=1,
        description="Most calls in one JSON-RPC batch (Besu refuses more than its --rpc-http-max-batch-size, "
        "1,024 by default); longer batches are sent in parts.",
    )
    chain_id: int = Field(default=31337, description="Chain id of the managed node.")
    block_time: float = Field(
        default=0.2,
        gt=0,
        description="Seconds between blocks of the managed node (interval mining, never automine).",
    )
    max_clock_lead: int = Field(
        default=2,
        ge=0,
        description="geth: seconds a block's timestamp may be ahead of the clock. Timestamps are whole seconds "
        "and strictly increase, so blocks faster than one a second move the chain's clock on; past this lead "
        "blocks wait for the clock (one a second, bigger batches). Consents lapse at most this early.",
    )
    gas_limit: int = Field(default=2_000_000_000, description="Block gas limit of the managed node.")
    geth_path: Path | None = Field(
        default=None, description="geth binary (default: the one `make setup` built into .venv/bin)."
    )
    anvil_path: Path | None = Field(
        default=None, description="anvil binary (default: the one npm installed under node_modules)."
    )
    anvil_port: int = Field(default=0, ge=0, lt=65536, description="Port of the managed node; 0 picks a free one.")
    state_interval: int = Field(
        default=1,
        ge=1,
        description="Least seconds between the managed node's state dumps to the data dir (a dump that took "
        "t seconds is followed by at least 20·t: dumps grow with the chain, and so does their CPU time).",
    )
    supervise: bool = Field(default=True, description="Start the managed node again if it dies while serving.")
    start_timeout: float = Field(default=30.0, description="Seconds to wait for the managed node to answer.")
    receipt_timeout: float = Field(default=60.0, description="Seconds to wait for a transaction to be mined.")
    rpc_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds to wait for the node's answer to one JSON-RPC call: a stalled node fails a call "
        "(routes answer 503 chain_unavailable, the relayer and indexer try again) instead of holding it.",
    )


@lru_cache
def get_chain_settings() -> ChainSettings:
    return ChainSettings()


@lru_cache
def get_toolchain_settings() -> ToolchainSettings:
    return ToolchainSettings()
