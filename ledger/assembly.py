"""The ledger a process of the service runs, built from settings and a role, started, fully typed.

Every role (`Role`) gets a `Ledger`: the chain backend, the deployed contracts and their clients, the
request tables' writers and the read models' readers. The roles that run the chain's single writers
(`all`, `supervisor`) also get `Writers`: the key bindings, the indexer with its followers, and the
consent and points lanes. An API worker (`worker`) reaches its supervisor's node and deployment and
never sends a transaction.

    ledger = open_ledger(chain, toolchain, engine, data_dir, keys=Keys(operator, accessor), tiers=tiers)
    writers = chain_writers(ledger, engine, lanes, hooks)   # all / supervisor only
    ...
    ledger.close()

`api.runtime.Runtime` assembles the service from these; the command-line tools (with the running node's
URL) and the benchmarks that drive the chain directly (`scripts/bench_consent.py`, `bench_bridge.py`,
`bench_scale.py`) open the contracts with `open_contracts` rather than wiring clients of their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from eth_account.signers.local import LocalAccount
from sqlalchemy import Engine
from web3 import Web3

from ledger.access import AccessFollower, AccessLogClient, AccessReader
from ledger.backends import ChainBackend, create_backend, remote_backend
from ledger.compiler import Artifact, compile_contracts
from ledger.consent import (
    Bindings,
    ConsentFollower,
    ConsentReader,
    ConsentRegistryClient,
    Outbox,
    OutboxWriter,
    Relayer,
)
from ledger.contracts import ContractClient, Deployment, RevertDecoder, ensure_deployed, ledger_plan
from ledger.errors import DeploymentError
from ledger.indexer import Indexer
from ledger.points import Completions, LoyaltyPointsClient, PointsFollower, PointsReader, PointsRelayer
from ledger.roles import OPERATOR_ROLES, check_keys
from ledger.settings import ChainSettings, ToolchainSettings
from ledger.store import GroupCommit, make_engine
from ledger.tx import TxSender

log = logging.getLogger(__name__)

Role = Literal["all", "supervisor", "worker"]


@dataclass(frozen=True)
class Keys:
    """The service's chain keys: the operator (consent, points, roles), the accessor (the access log), and
    a previous operator key being rotated out, if any (`ledger.roles.check_keys`)."""

    operator: LocalAccount
    accessor: LocalAccount
    previous_operator: LocalAccount | None = None


@dataclass
class Contracts:
    """The chain and the deployed contracts' clients."""

    backend: ChainBackend
    deployment: Deployment
    artifacts: dict[str, Artifact]
    decoder: RevertDecoder
    consent: ConsentRegistryClient
    points: LoyaltyPointsClient
    access_log: AccessLogClient

    @property
    def w3(self) -> Web3:
        return self.backend.w3

    def close(self) -> None:
        """Stop the chain backend (a managed node stops; a remote one is let go)."""
        self.backend.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass
class Ledger(Contracts):
    """What every role of the service has once the ledger is open: the contracts, and over the service
    database the request tables' writers and the read models' readers."""

    outbox: Outbox
    writer: OutboxWriter  # consent requests, batched into few commits
    inserts: GroupCommit  # new points requests, likewise
    consent_reader: ConsentReader
    points_reader: PointsReader
    access_reader: AccessReader

    def close(self) -> None:
        """Stop the writers' threads and the chain backend."""
        self.writer.close()
        self.inserts.close()
        super().close()


def open_contracts(
    chain: ChainSettings,
    toolchain: ToolchainSettings,
    data_dir: Path,
    *,
    keys: Keys,
    node_url: str | None = None,
    read_only: bool = False,
) -> Contracts:
    """Start or reach the chain and open the contracts' clients.

    With `node_url` (an API worker, a command-line tool), the chain is the node at that URL, run by
    `serve` or external, and the deployment the data dir's `deployment.json` (DeploymentError when
    there is none, or it is of another chain); `read_only` senders refuse to sign (a worker: the
    supervisor sends). Otherwise the chain is `chain.backend` (a managed node starts), the contracts
    are deployed where missing, and the configured keys are made the ones the contracts authorise (or
    the start is refused)."""
    artifacts = compile_contracts(toolchain)
    decoder = RevertDecoder(list(artifacts.values()))
    record = data_dir / "deployment.json"
    # What nodes limit (Besu: 1,024 calls per JSON-RPC batch, 5,000 blocks per eth_getLogs), from settings.
    sending: dict[str, Any] = {"receipt_timeout": chain.receipt_timeout, "max_batch": chain.rpc_max_batch}
    logs_range = chain.max_logs_range
    backend: ChainBackend
    if node_url is not None:
        if not record.is_file():
            raise DeploymentError(f"{record} does not exist: run `consent-ledger serve` once to deploy the contracts")
        deployment = Deployment.load(record)
        if "AccessLog" not in deployment.contracts:
            raise DeploymentError("the deployment has no AccessLog yet: start `consent-ledger serve` once to deploy it")
        backend = remote_backend(node_url, keys.operator, timeout=chain.rpc_timeout)
        w3 = backend.start()
        if (chain_id := w3.eth.chain_id) != deployment.chain_id:
            backend.stop()
            raise DeploymentError(
                f"the node is chain {chain_id}, the deployment record is for chain {deployment.chain_id}"
            )
        sender = TxSender(w3, keys.operator, read_only=read_only, **sending)
        accessor = TxSender(w3, keys.accessor, read_only=read_only, **sending)
    else:
        backend = create_backend(chain, keys.operator, data_dir)
        w3 = backend.start()
        try:
            backend.prepare_account(keys.accessor.address)
            sender = TxSender(w3, keys.operator, **sending)
            deployed = record.read_bytes() if record.is_file() else None
            operator = keys.operator.address
            plan = ledger_plan(operator, operator, keys.accessor.address)
            deployment = ensure_deployed(w3, sender, artifacts, plan, record)
            if record.read_bytes() != deployed:
                # Contracts were deployed just now: write them to the node's state file before anything
                # is served. A crash of the node before its first periodic checkpoint lost them, and
                # the service could then neither go on nor start again (a chaos run with a long
                # CONSENT_LEDGER_CHAIN_STATE_INTERVAL showed it).
                backend.checkpoint()
            accessor = TxSender(w3, keys.accessor, **sending)
            _check_keys(backend, chain, deployment, artifacts, decoder, sender, keys, record)
        except BaseException:
            backend.stop()
            raise
    return Contracts(
        backend=backend,
        deployment=deployment,
        artifacts=artifacts,
        decoder=decoder,
        consent=ConsentRegistryClient(
            w3,
            deployment.address("ConsentRegistry"),
            artifacts["ConsentRegistry"],
            sender,
            decoder,
            logs_range=logs_range,
        ),
        points=LoyaltyPointsClient(
            w3, deployment.address("LoyaltyPoints"), artifacts["LoyaltyPoints"], sender, decoder, logs_range=logs_range
        ),
        access_log=AccessLogClient(
            w3, deployment.address("AccessLog"), artifacts["AccessLog"], accessor, decoder, logs_range=logs_range
        ),
    )


def open_ledger(
    chain: ChainSettings,
    toolchain: ToolchainSettings,
    engine: Engine,
    data_dir: Path,
    *,
    keys: Keys,
    tiers: dict[str, int],
    node_url: str | None = None,
) -> Ledger:
    """`open_contracts` (an API worker: `node_url`, read-only), and over `engine` the request writers and
    the read models' readers."""
    contracts = open_contracts(chain, toolchain, data_dir, keys=keys, node_url=node_url, read_only=node_url is not None)
    return Ledger(
        **vars(contracts),
        outbox=Outbox(engine),
        writer=OutboxWriter(engine, chain_nonces=contracts.consent.nonces_of),
        inserts=GroupCommit(engine, name="points-inserts"),
        consent_reader=ConsentReader(engine),
        points_reader=PointsReader(engine, tiers),
        access_reader=AccessReader(engine),
    )


def _check_keys(
    backend: ChainBackend,
    chain: ChainSettings,
    deployment: Deployment,
    artifacts: dict[str, Artifact],
    decoder: RevertDecoder,
    sender: TxSender,
    keys: Keys,
    record: Path,
) -> None:
    """The contracts authorise the configured operator and accessor keys, or the start is refused; a
    rotated key gets the roles (`ledger.roles.check_keys`), and the deployment record names it."""
    w3 = backend.w3

    def clients(signer: TxSender) -> dict[str, ContractClient]:
        return {
            name: ContractClient(
                w3, deployment.address(name), artifacts[name], signer, decoder, logs_range=chain.max_logs_range
            )
            for name in OPERATOR_ROLES
        }

    previous = None
    if keys.previous_operator is not None:
        backend.prepare_account(keys.previous_operator.address)
        previous = clients(
            TxSender(w3, keys.previous_operator, receipt_timeout=chain.receipt_timeout, max_batch=chain.rpc_max_batch)
        )
    since = deployment.contracts["AccessLog"].block_number
    if check_keys(clients(sender), keys.accessor.address, previous, from_block=since) and previous:
        deployment.operator = keys.operator.address
        deployment.save(record)


@dataclass(frozen=True)
class Lanes:
    """How the relayers batch (`api.settings.ServiceSettings`: relayer_max_batch, _linger, _max_in_flight)."""

    max_batch: int
    linger: float
    max_in_flight: int


@dataclass
class Hooks:
    """What the writers ask of the service above them."""

    holds: Callable[[str, bytes, str | None], bool]
    """Whether a relayer should queue again a request rejected with this error for this subject and
    partner (the chain lost a binding or a role the service puts back) rather than fail it."""
    on_rollback: Callable[[int], None]
    """The indexer rolled the read model back to this block: what was made after it may be gone."""
    completions: Completions = field(default_factory=Completions)
    wake: threading.Event = field(default_factory=threading.Event)
    """Set when new requests are in the database (the relayers' wake-up)."""


@dataclass
class Writers:
    """The chain's single writers (roles `all` and `supervisor`), not yet running: the caller runs the
    indexer and the lanes in its threads (`ledger.lanes.run_lanes`)."""

    bindings: Bindings
    indexer: Indexer
    relayer: Relayer
    points_relayer: PointsRelayer
    derived_engine: Engine | None  # the read model's (SQLite: writes that need not wait for the disk)

    def close(self) -> None:
        if self.derived_engine is not None:
            self.derived_engine.dispose()


def chain_writers(ledger: Ledger, engine: Engine, lanes: Lanes, hooks: Hooks) -> Writers:
    """The key bindings (adopting what the read model holds), the indexer with the consent, points and
    access followers, and the consent and points relayers."""
    # The read model is derived from the chain: its writes need not wait for the disk (see make_engine).
    derived = None
    if engine.dialect.name == "sqlite":
        derived = make_engine(engine.url.render_as_string(hide_password=False), durable=False, checkpoints=False)
    bindings = Bindings(engine, ledger.consent)
    adopted = bindings.adopt_indexed()
    if adopted:
        log.info("recorded %d key bindings from the read model", adopted)
    indexer = Indexer(
        ledger.w3,
        derived or engine,
        ledger.deployment.deploy_block,
        chunk=ledger.backend.settings.max_logs_range,
        followers=[
            ConsentFollower(ledger.consent.address, (derived or engine).dialect),
            PointsFollower(ledger.points.address, ledger.decoder, hooks.completions),
            AccessFollower(ledger.access_log.address),
        ],
        on_rollback=hooks.on_rollback,
    )
    relayer = Relayer(
        engine,
        ledger.consent,
        max_batch=lanes.max_batch,
        linger=lanes.linger,
        max_in_flight=lanes.max_in_flight,
        on_mined=indexer.wake.set,
        wake=hooks.wake,
        holds=hooks.holds,
    )
    points_relayer = PointsRelayer(
        engine,
        ledger.points,
        max_batch=lanes.max_batch,
        max_in_flight=lanes.max_in_flight,
        completions=hooks.completions,
        wake=hooks.wake,
        holds=hooks.holds,
    )
    return Writers(bindings, indexer, relayer, points_relayer, derived)
