"""Chain backends behind one interface, chosen by settings (`CONSENT_LEDGER_CHAIN_BACKEND`).

- `InProcessBackend`: eth-tester with py-evm; no server, slow; unit tests.
- `GethBackend`: a managed go-ethereum node (blocks and state on disk, incremental tries); the default
  for `serve`.
- `AnvilBackend`: a managed anvil node (interval mining, chain in memory, dumped to the data dir);
  fast tests.
- `RpcBackend`: any Ethereum JSON-RPC endpoint (Besu or GoQuorum with QBFT in production).

The conformance suite in `tests/ledger/` runs the same tests against every one of them.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from requests.exceptions import RequestException
from web3 import EthereumTesterProvider, Web3
from web3.middleware import ExtraDataToPOAMiddleware
from web3.providers.rpc import HTTPProvider
from web3.providers.rpc.utils import ExceptionRetryConfiguration
from web3.types import RPCEndpoint, Wei

from ledger.anvil import AnvilNode, ManagedProcess, find_anvil
from ledger.errors import ChainError, NodeNotRunning
from ledger.geth import DEV_KEY, FAUCET_GAS_PRICE, GethNode, find_geth
from ledger.settings import ChainSettings, ToolchainSettings, get_toolchain_settings

log = logging.getLogger(__name__)

DEV_FUNDING_WEI = 10**24  # a million ether: dev chains only
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
PROBE_TIMEOUT = 1.5  # seconds a health check waits for the node (`ChainBackend.head`)


def http_provider(url: str, timeout: float = 60, *, retry: bool = True) -> HTTPProvider:
    """web3's HTTP provider; for a node on this machine, with one session that ignores proxy settings.

    By default requests looks the proxy environment up on every call (a fifth of an RPC call's CPU
    time here: 0.70 ms with it, 0.52 ms without, eth_blockNumber against anvil), and a proxy set for
    the outside world would even be used for loopback unless NO_PROXY names it. One explicit session
    serves every thread (requests' connection pool is thread-safe); web3 otherwise keeps a session
    per thread.

    web3 would also try a read that timed out 5 times more: a node that stalled held each such call
    for 6 times `timeout` and more (a health check 9 s at a 1.5 s timeout). A timeout fails the call
    here, as `timeout` says; an HTTP error (a proxy before the node) is tried again, or with `retry`
    false not either."""
    retries = ExceptionRetryConfiguration(errors=(requests.HTTPError,)) if retry else None
    kwargs: dict[str, Any] = {"request_kwargs": {"timeout": timeout}, "exception_retry_configuration": retries}
    if urlsplit(url).hostname in LOOPBACK:
        session = requests.Session()
        session.trust_env = False
        kwargs["session"] = session
    return HTTPProvider(url, **kwargs)


class ChainBackend(ABC):
    """A chain the service can deploy to and transact on, with the operator's key.

    What differs between backends is asked of the backend, never by its name: `url` (how another
    process reaches the chain), `miner` (whether this service makes the blocks, and its hooks),
    `checkpoint` and `restart_if_stopped`."""

    name: ClassVar[str]
    persistent: ClassVar[bool] = False
    """Whether the chain's state survives `stop()` and a later `start()`."""
    in_process: ClassVar[bool] = False
    """Whether the chain lives inside this process (no other process can reach it)."""

    def __init__(self, settings: ChainSettings, operator: LocalAccount) -> None:
        self.settings = settings
        self.operator = operator
        self._w3: Web3 | None = None
        self._probe: Web3 | None = None

    @property
    def w3(self) -> Web3:
        if self._w3 is None:
            raise ChainError(f"the {self.name} backend is not started")
        return self._w3

    @abstractmethod
    def _connect(self) -> Web3:
        """Start or reach the chain and return a connected Web3."""

    def start(self) -> Web3:
        if self._w3 is None:
            self._w3 = self._connect()
            self.prepare_account(self.operator.address)
        return self._w3

    def stop(self) -> None:
        self._w3 = None
        self._probe = None

    @property
    def url(self) -> str | None:
        """The JSON-RPC URL another process of the service reaches the chain at (None: none can)."""
        return None

    @property
    def miner(self) -> ManagedProcess | None:
        """The node whose blocks this service makes, with the hooks its miner calls around each block
        (`before_block`, `after_block`); None when the chain makes its own."""
        return None

    def checkpoint(self) -> None:  # noqa: B027 - optional hook
        """Write what the chain holds to its disk now, where a crash could otherwise lose it (anvil)."""

    def restart_if_stopped(self, before: Callable[[], None]) -> bool:
        """Start again, on the same port and data, a node of ours that died, calling `before` first;
        whether it did. (A chain this service does not run is never restarted by it.)"""
        return False

    def head(self) -> int:
        """The newest block, asked with a timeout of `PROBE_TIMEOUT` seconds whatever `rpc_timeout` is:
        health checks must answer while the node stalls. Raises ChainError when it does not answer."""
        try:
            return int(self._probing().eth.block_number)
        except (RequestException, OSError) as exc:
            raise ChainError(
                f"the chain node did not answer within {PROBE_TIMEOUT:g} s ({type(exc).__name__})"
            ) from exc

    def head_block(self) -> tuple[int, int]:
        """The newest block's number and timestamp (seconds), asked as `head` asks: readiness and metrics
        judge whether the chain moves on by how old its newest block is."""
        try:
            block = self._probing().eth.get_block("latest")
        except (RequestException, OSError) as exc:
            raise ChainError(
                f"the chain node did not answer within {PROBE_TIMEOUT:g} s ({type(exc).__name__})"
            ) from exc
        return int(block["number"]), int(block["timestamp"])

    def _probing(self) -> Web3:
        """A connection whose calls wait at most `PROBE_TIMEOUT` (the node's own for an in-process chain)."""
        w3 = self.w3
        if isinstance(w3.provider, HTTPProvider):
            if self._probe is None:
                self._probe = Web3(http_provider(str(w3.provider.endpoint_uri), PROBE_TIMEOUT, retry=False))
            w3 = self._probe
        return w3

    def prepare_account(self, address: ChecksumAddress) -> None:  # noqa: B027 - optional hook
        """Make sure a service account (operator, accessor) can pay for gas: development chains fund
        it; on production chains it is funded on the chain itself (or gas is free)."""

    def fund(self, address: ChecksumAddress, wei: int = DEV_FUNDING_WEI) -> None:
        """Give `address` ether (development chains only)."""
        raise ChainError(f"the {self.name} backend cannot mint ether; fund {address} on the chain itself")

    def increase_time(self, seconds: int) -> None:
        """Move the chain's clock forward and mine a block (development chains only)."""
        raise ChainError(f"the {self.name} backend cannot move time")

    def rpc(self, method: str, *params: Any) -> Any:
        response = self.w3.provider.make_request(RPCEndpoint(method), list(params))
        if "error" in response:
            raise ChainError(f"{method} failed: {response['error']}")
        return response["result"]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class InProcessBackend(ChainBackend):
    """eth-tester with py-evm, in this process. Blocks are mined per transaction."""

    name = "inprocess"
    in_process = True

    def __init__(self, settings: ChainSettings, operator: LocalAccount) -> None:
        super().__init__(settings, operator)
        self.tester: Any = None

    def _connect(self) -> Web3:
        from eth_tester import EthereumTester, PyEVMBackend

        genesis = PyEVMBackend.generate_genesis_params(overrides={"gas_limit": self.settings.gas_limit})
        self.tester = EthereumTester(backend=PyEVMBackend(genesis_parameters=genesis))
        return Web3(EthereumTesterProvider(self.tester))

    def prepare_account(self, address: ChecksumAddress) -> None:
        self.fund(address)

    def fund(self, address: ChecksumAddress, wei: int = DEV_FUNDING_WEI) -> None:
        w3 = self.w3
        rich = w3.eth.accounts[0]
        amount = min(wei, w3.eth.get_balance(rich) // 4)
        w3.eth.wait_for_transaction_receipt(
            w3.eth.send_transaction({"from": rich, "to": address, "value": Wei(amount)})
        )

    def increase_time(self, seconds: int) -> None:
        latest = self.w3.eth.get_block("latest")
        self.tester.time_travel(int(latest["timestamp"]) + seconds)
        self.tester.mine_blocks(1)


class ManagedBackend(ChainBackend):
    """A node this service starts, stops and supervises, whose blocks its own miner thread makes
    (`node.before_block` / `node.after_block` time the relayer's batches to them)."""

    persistent = True
    node: AnvilNode | GethNode

    @property
    def url(self) -> str:
        return self.node.url

    @property
    def miner(self) -> ManagedProcess:
        return self.node

    def checkpoint(self) -> None:
        self.node.checkpoint()

    def restart_if_stopped(self, before: Callable[[], None]) -> bool:
        if self.node.running:
            return False
        log.warning("the managed %s node is not running; starting it again", self.name)
        before()
        self.node.requested_port = self.node.port
        self.node.start()
        return True

    def _connect(self) -> Web3:
        url = self.node.start()
        return Web3(http_provider(url, self.settings.rpc_timeout))

    def prepare_account(self, address: ChecksumAddress) -> None:
        if self.w3.eth.get_balance(address) < DEV_FUNDING_WEI // 2:
            self.fund(address)

    def stop(self) -> None:
        super().stop()
        self.node.stop()

    def kill(self) -> None:
        """Kill the node as a crash would (tests)."""
        super().stop()
        self.node.kill()


class GethBackend(ManagedBackend):
    """A managed geth node whose database lives in `data_dir/chain/geth/` (`ledger.geth`)."""

    name = "geth"
    node: GethNode

    def __init__(self, settings: ChainSettings, operator: LocalAccount, data_dir: Path) -> None:
        super().__init__(settings, operator)
        self.node = GethNode(
            settings.geth_path or find_geth(),
            data_dir / "chain",
            chain_id=settings.chain_id,
            block_time=settings.block_time,
            gas_limit=settings.gas_limit,
            port=settings.anvil_port,
            start_timeout=settings.start_timeout,
            max_lead=settings.max_clock_lead,
        )
        self._faucet = threading.Lock()

    def fund(self, address: ChecksumAddress, wei: int = DEV_FUNDING_WEI) -> None:
        """A transfer from geth's development key (the genesis funds it), mined at once."""
        w3 = self.w3
        faucet = Account.from_key(DEV_KEY)
        with self._faucet:
            nonce = w3.eth.get_transaction_count(faucet.address, "pending")
            signed = faucet.sign_transaction(
                {
                    "to": address,
                    "value": wei,
                    "gas": 21_000,
                    "gasPrice": FAUCET_GAS_PRICE,
                    "nonce": nonce,
                    "chainId": w3.eth.chain_id,
                }
            )
            tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
            self.node.mine_now()
        if w3.eth.get_transaction_receipt(tx_hash)["status"] != 1:
            raise ChainError(f"funding {address} failed")

    def increase_time(self, seconds: int) -> None:
        self.node.mine_now(advance=seconds)


class AnvilBackend(ManagedBackend):
    """A managed anvil node whose state lives in `data_dir/chain/`."""

    name = "anvil"
    node: AnvilNode

    def __init__(
        self,
        settings: ChainSettings,
        operator: LocalAccount,
        data_dir: Path,
        toolchain: ToolchainSettings | None = None,
    ) -> None:
        super().__init__(settings, operator)
        toolchain = toolchain or get_toolchain_settings()
        self.node = AnvilNode(
            settings.anvil_path or find_anvil(toolchain.node_modules),
            data_dir / "chain",
            chain_id=settings.chain_id,
            block_time=settings.block_time,
            gas_limit=settings.gas_limit,
            port=settings.anvil_port,
            state_interval=settings.state_interval,
            start_timeout=settings.start_timeout,
        )

    def fund(self, address: ChecksumAddress, wei: int = DEV_FUNDING_WEI) -> None:
        self.rpc("anvil_setBalance", address, hex(wei))

    def increase_time(self, seconds: int) -> None:
        self.rpc("evm_increaseTime", seconds)
        self.rpc("evm_mine")


class RpcBackend(ChainBackend):
    """An external JSON-RPC node; the operator account must already be funded (or gas be free)."""

    name = "rpc"
    persistent = True

    @property
    def url(self) -> str | None:
        return self.settings.rpc_url

    def _connect(self) -> Web3:
        if not self.settings.rpc_url:
            raise ChainError("backend rpc needs CONSENT_LEDGER_CHAIN_RPC_URL")
        w3 = Web3(http_provider(self.settings.rpc_url, self.settings.rpc_timeout))
        # QBFT/IBFT and Clique blocks carry the validators and their seals in `extraData` (97 bytes and
        # more on Besu's QBFT), past the 32 bytes web3's block formatter allows: it refuses such a block.
        # The middleware moves the field to `proofOfAuthorityData` for any block, so it is harmless on
        # other chains (nothing here reads `extraData`).
        w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
        try:
            chain_id = w3.eth.chain_id
        except Exception as exc:
            raise ChainError(f"cannot reach the node at {self.settings.rpc_url}: {exc}") from exc
        log.info("connected to chain %s at %s", chain_id, self.settings.rpc_url)
        return w3


BACKENDS: dict[str, type[ChainBackend]] = {
    backend.name: backend for backend in (InProcessBackend, GethBackend, AnvilBackend, RpcBackend)
}


def backend_class(settings: ChainSettings) -> type[ChainBackend]:
    """The class of the backend `settings.backend` names (its class-level capabilities: `in_process`)."""
    return BACKENDS[settings.backend]


def managed_node(settings: ChainSettings, data_dir: Path) -> AnvilNode | GethNode | None:
    """The managed node of `settings.backend` on `data_dir`, not started (tools look for it running);
    None when the service runs no node (the chain is external, or in its process)."""
    common: dict[str, Any] = {"chain_id": settings.chain_id, "block_time": settings.block_time}
    if settings.backend == "geth":
        return GethNode(settings.geth_path or find_geth(), data_dir / "chain", gas_limit=settings.gas_limit, **common)
    if settings.backend == "anvil":
        binary = settings.anvil_path or find_anvil(get_toolchain_settings().node_modules)
        return AnvilNode(binary, data_dir / "chain", gas_limit=settings.gas_limit, **common)
    return None


def node_url(settings: ChainSettings, data_dir: Path) -> str:
    """The JSON-RPC URL of the chain of the service on `data_dir`, for a process other than `serve` (a
    command-line tool): the external node, or the managed node `serve` runs. Raises NodeNotRunning when
    that node is not running, ChainError when no other process can reach the chain."""
    if backend_class(settings).in_process:
        raise ChainError(f"the {settings.backend} chain lives inside `serve` only; tools need geth, anvil or rpc")
    node = managed_node(settings, data_dir)
    if node is None:
        if not settings.rpc_url:
            raise ChainError("CONSENT_LEDGER_CHAIN_RPC_URL is not set")
        return settings.rpc_url
    found = node.running_node()
    if found is None:
        raise NodeNotRunning(
            f"no chain node is running for {data_dir}: start `consent-ledger serve` first "
            "(it makes the blocks and keeps the read model current)"
        )
    return f"http://127.0.0.1:{found[1]}"


def durable_wait(settings: ChainSettings, data_dir: Path) -> Callable[[int], None] | None:
    """How a process of the service on `data_dir` waits until block n survives a crash of the chain's
    node (`ManagedProcess.durable_wait`); None when every block does once made (geth writes each to its
    disk; an external chain with final blocks, such as QBFT, does not lose them)."""
    node = managed_node(settings, data_dir)
    return None if node is None else node.durable_wait


def remote_backend(url: str, operator: LocalAccount, *, timeout: float | None = None) -> ChainBackend:
    """The chain at `url`, run by another process (`serve`'s managed node, seen from an API worker or a
    tool) or external; calls time out after `timeout` seconds (default: `rpc_timeout`'s)."""
    settings = ChainSettings(backend="rpc", rpc_url=url)
    if timeout is not None:
        settings = settings.model_copy(update={"rpc_timeout": timeout})
    return RpcBackend(settings, operator)


def create_backend(settings: ChainSettings, operator: LocalAccount, data_dir: Path) -> ChainBackend:
    """The backend `settings.backend` names."""
    if settings.backend == "inprocess":
        return InProcessBackend(settings, operator)
    if settings.backend == "geth":
        return GethBackend(settings, operator, data_dir)
    if settings.backend == "anvil":
        return AnvilBackend(settings, operator, data_dir)
    return RpcBackend(settings, operator)
