"""A managed go-ethereum (geth) node: the embedded chain of `serve`, its blocks and state on disk.

Why geth and not anvil (issue "The ledger at a company's scale"): anvil keeps the chain in memory and
rebuilds the complete account and storage tries for every block it mines, so each block costs time
in proportion to the number of customers (72 ms of CPU at 10,000, 6.2 s at 1,000,000), and a crash
loses every block since its last whole-chain dump. geth updates its tries incrementally (a block
costs what it changes) and writes every block with its state to its database before it answers.

How the node is run (all checked against geth v1.17.10's source; see `docs/architecture.md`):

- `--dev` with a genesis of our own (`genesis`): one node, no peers, no consensus client (geth's
  simulated beacon). Its own block timer is set out of reach (`NEVER`): blocks come from this
  module's miner through `testing_commitBlockV1` (geth's block-building call for tests and tools),
  timed to the relayer's batches as anvil's are (`before_block`, `after_block`).
- Prague rules, not Osaka: Osaka caps a transaction at 2^24 gas (EIP-7825), below a batch of changes.
  Base fee 0 and a fixed gas limit (`--miner.gaslimit`): a private chain's gas is not a market.
- `--state.scheme hash --gcmode archive`: every block's state is written to the database when the
  block is made (nothing is kept in memory to be flushed later), and every past block's state stays
  readable (the revert replay at `block - 1` and `audit verify` read old blocks).
- `--db.engine leveldb`: a LevelDB write has reached the operating system when it returns (its log is
  written before the call returns; pebble, geth's default, hands its log to a background flusher),
  so a SIGKILL of the node loses nothing it had mined. A power loss can still lose what the kernel
  had not written; fsync per block is what a production QBFT network's validators are for.

Timestamps are whole seconds and each block's must be later than its parent's (a rule of the chain,
not of geth). Blocks are made when something is waiting, as often as `block_time`, but never more
than `max_lead` seconds ahead of the clock (`CONSENT_LEDGER_CHAIN_MAX_CLOCK_LEAD`, 2 by default): a
burst gets blocks every `block_time`, sustained load one block a second (with bigger batches), and
the chain's clock is never more than `max_lead` s fast. Contracts compare `block.timestamp` with
signature deadlines and consents' `validUntil`: a consent lapses at most that early.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from eth_account import Account

from ledger.anvil import ChainCopy, Checkpoints, ManagedProcess, _alive, _request, _result, _run_hook, free_port
from ledger.errors import ChainError, NodeStartError
from ledger.files import write_atomically

log = logging.getLogger(__name__)

GETH_MODULE = "github.com/ethereum/go-ethereum/cmd/geth"
GETH_VERSION = "v1.17.10"  # the Makefile builds this one (`make setup`)

# geth's own development key (`--dev` prefunds it; published in its source): the faucet that funds the
# service's accounts on this development chain, as anvil's published accounts do on anvil's.
DEV_KEY = "0xb71c71a67e1177ad4e901695e1b4b9ee17ae16c6668d313eac2f96dbcda3f291"
FAUCET_WEI = 10**36
NEVER = 10**9  # seconds: the simulated beacon's own block timer (`--dev.period`) never fires again
ZERO32 = "0x" + "00" * 32
GAS_LIMIT_FACTOR = 8  # the node's block gas limit, in settings' gas limits (see `GethNode.__init__`)
IPC_PATH_MAX = 108  # bytes of a Unix socket's path, its final NUL included (Linux's sun_path)
FAUCET_GAS_PRICE = 10**9  # wei: the faucet's transfers stay minable even if the base fee ever rose

# Forks after Prague are left out of the genesis (see the module's docstring).
_KEPT_FORK_TIMES = {"shanghaiTime", "cancunTime", "pragueTime"}


def find_geth() -> Path:
    """The geth binary `make setup` built (next to this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "geth"
    if beside.is_file():
        return beside
    found = shutil.which("geth")
    if found:
        return Path(found)
    raise NodeStartError(
        f"geth is not installed ({beside} is missing): run `make setup` (it builds {GETH_MODULE}@{GETH_VERSION} "
        "with Go), or set CONSENT_LEDGER_CHAIN_GETH_PATH"
    )


def genesis(binary: Path, *, chain_id: int, gas_limit: int, funded: str) -> dict[str, Any]:
    """geth's development genesis (with its system contracts), for our chain id, Prague rules, base fee 0
    and `gas_limit`, with `funded` holding `FAUCET_WEI`."""
    try:
        dumped = subprocess.run(  # noqa: S603 - our own binary
            [str(binary), "--dev", "--verbosity", "1", "dumpgenesis"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise NodeStartError(f"{binary} could not write a genesis ({exc}): is it geth {GETH_VERSION}?") from exc
    spec: dict[str, Any] = json.loads(dumped.stdout)
    config = spec["config"]
    config["chainId"] = chain_id
    for key in [k for k in config if k.endswith("Time") and k not in _KEPT_FORK_TIMES]:
        del config[key]
    schedule = config.get("blobSchedule", {})
    for fork in [f for f in schedule if f not in ("cancun", "prague")]:
        del schedule[fork]
    spec["gasLimit"] = hex(gas_limit)
    spec["baseFeePerGas"] = "0x0"
    spec["timestamp"] = hex(int(time.time()))
    # Keep the system contracts (Prague calls them in every block); fund the faucet only.
    spec["alloc"] = {a: v for a, v in spec["alloc"].items() if v.get("code")}
    spec["alloc"][funded.removeprefix("0x")] = {"balance": hex(FAUCET_WEI)}
    for key in ("excessBlobGas", "blobGasUsed", "slotNumber"):
        spec.pop(key, None)
    return spec


class ChainIdMismatch(NodeStartError):
    """The node's chain is another chain than the settings name."""


class GethNode(ManagedProcess):
    """One geth process on `state_dir/geth`, its blocks made by this object's miner thread."""

    name = "geth"

    def __init__(
        self,
        binary: Path,
        state_dir: Path,
        *,
        chain_id: int,
        block_time: float,
        gas_limit: int,
        port: int = 0,
        start_timeout: float = 30.0,
        max_lead: int = 2,
        cache_mb: int = 512,
    ) -> None:
        self.binary = binary
        self.state_dir = state_dir
        self.chain_id = chain_id
        self.block_time = block_time
        # Eight times the setting: EIP-1559 raises the base fee after any block above half the limit,
        # and with a base fee of a few wei the 1/8 decrease rounds to nothing, so it never comes back to
        # 0, and transactions priced when it was 0 would wait for ever. What the service has in flight at
        # once (16 consent batches of 45 M gas, 16 points batches of 72 M, the bridge's pipelined access
        # records of 41 M each) stays far below half of it; a block that passes it is logged.
        self.gas_limit = GAS_LIMIT_FACTOR * gas_limit
        self.requested_port = port
        self.start_timeout = start_timeout
        self.max_lead = max_lead
        self.cache_mb = cache_mb
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._adopted: int | None = None
        self._mining = threading.Lock()
        self._stop_workers = threading.Event()
        self._workers: list[threading.Thread] = []
        self._last_time = 0  # the newest block's timestamp
        self._last_made = 0.0  # when (monotonic) this miner made its last block
        self._lead_warned = 0.0
        self._failures_logged = 0.0
        self.offset = 0  # seconds the chain's clock is set ahead (`increase_time`, development only)
        self.checkpoints = Checkpoints(state_dir)
        self.before_block: Callable[[], None] | None = None
        self.after_block: Callable[[], None] | None = None

    # files and process -------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "geth"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "geth.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "geth.pid"

    @property
    def pid(self) -> int | None:
        if self._adopted is not None:
            return self._adopted
        return None if self._process is None else self._process.pid

    @property
    def last_time(self) -> int:
        """The newest block's timestamp (as this miner last saw it)."""
        return self._last_time

    @functools.cached_property
    def ipc_path(self) -> Path:
        """geth's IPC socket, the only place it serves the namespaces that rewind the chain, make blocks
        or write files (`debug`, `testing`: `debug_setHead`, `testing_commitBlockV1`,
        `debug_writeMemProfile`); geth makes it readable by its own user alone (0600). Its loopback
        HTTP port, which any local user reaches, serves `eth`, `net`, `web3`, `txpool`. In the state directory,
        or where its path is too long for a socket's (108 bytes with the final NUL), in a private
        directory of this user's named after the state directory's path (found again by any process;
        made by `_private_ipc_dir` as the node starts)."""
        path = self.state_dir.resolve() / "geth.ipc"
        if len(os.fsencode(path)) < IPC_PATH_MAX:
            return path
        digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:24]
        return Path(tempfile.gettempdir()) / f"consent-ledger-{os.getuid()}-{digest}" / "geth.ipc"

    def _private_ipc_dir(self) -> None:
        """Make the private directory `ipc_path` is in, if it is not the state directory."""
        private = self.ipc_path.parent
        if private == self.state_dir.resolve():
            return
        with contextlib.suppress(FileExistsError):
            private.mkdir(mode=0o700)
        info = private.lstat()  # not a link someone put there, and nobody else's
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise NodeStartError(f"{private} is not a private directory of this user: remove it")

    @property
    def genesis_file(self) -> Path:
        return self.state_dir / "genesis.json"

    @property
    def import_file(self) -> Path:
        """Blocks a backup holds (`api.backup`): imported into a new data directory at its first start."""
        return self.state_dir / "blocks.rlp"

    def _initialise(self) -> None:
        """Write the genesis block into a new data directory (once); then the blocks of a backup, if any.
        A genesis file already there (a backup's) is used as it is: a new one is a different chain."""
        if (self.data_dir / "geth" / "chaindata").is_dir():
            if not self.import_file.is_file():
                return
            # A backup's import that did not finish (the file is set aside only when it has): again.
            log.warning("the import of %s did not finish: starting it again", self.import_file)
            shutil.rmtree(self.data_dir)
        genesis_file = self.genesis_file
        if not genesis_file.is_file():
            spec = genesis(
                self.binary, chain_id=self.chain_id, gas_limit=self.gas_limit, funded=Account.from_key(DEV_KEY).address
            )
            write_atomically(genesis_file, json.dumps(spec, indent=1))
        done = subprocess.run(  # noqa: S603 - our own binary and arguments
            [
                str(self.binary),
                "init",
                "--datadir",
                str(self.data_dir),
                "--state.scheme",
                "hash",
                "--db.engine",
                "leveldb",
                str(genesis_file),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise NodeStartError(f"geth init failed: {done.stderr[-2000:]}")
        if self.import_file.is_file():
            self._import(self.import_file)

    def _import(self, blocks: Path) -> None:
        """Execute a backup's blocks into the new data directory (every one checked as geth checks any
        block), then set the file aside."""
        log.info("importing the chain's blocks from %s (every block is executed again)", blocks)
        timeout = 3600 + blocks.stat().st_size / 50_000  # an hour, and 20 s per MB of blocks
        done = subprocess.run(  # noqa: S603 - our own binary and arguments
            [
                str(self.binary),
                "import",
                "--datadir",
                str(self.data_dir),
                "--state.scheme",
                "hash",
                "--gcmode",
                "archive",
                str(blocks),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise NodeStartError(f"geth import of {blocks} failed: {done.stderr[-2000:]}")
        os.replace(blocks, blocks.with_suffix(".rlp.imported"))

    def export_blocks(self, dest: Path, *, batch: int = 50) -> int:
        """Write every block after genesis to `dest` (RLP, one after another: what `geth import` reads),
        from the running node; the newest block written. Blocks once made are never replaced here (one
        miner, no forks), so the file holds the chain up to that block."""
        head = int(str(self._call("eth_blockNumber", [])), 16)
        partial = dest.with_suffix(".partial")
        with partial.open("wb") as out:
            for first in range(1, head + 1, batch):
                numbers = range(first, min(first + batch, head + 1))
                requests = [
                    {"jsonrpc": "2.0", "id": n, "method": "debug_getRawBlock", "params": [hex(n)]} for n in numbers
                ]
                answers = sorted(self._ipc_exchange(requests, timeout=120), key=lambda a: int(a["id"]))
                for answer in answers:
                    if "error" in answer:
                        raise NodeStartError(f"debug_getRawBlock {answer['id']}: {answer['error']}")
                    out.write(bytes.fromhex(str(answer["result"])[2:]))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, dest)
        return head

    def copy_chain(self, dest: Path, *, timeout: float) -> ChainCopy:
        """The genesis and every block after it. While a node runs (any process's), the blocks are read
        from it into `blocks.rlp` (`export_blocks`), which the first start on `dest` imports, executing
        each block again; a stopped node's database is copied as it is. Blocks once made are never
        replaced here, so the copy holds every block there was when this was called."""
        if not self.genesis_file.is_file():
            raise ChainError(f"{self.genesis_file} is missing: the managed node has not started yet")
        dest.mkdir()
        shutil.copyfile(self.genesis_file, dest / self.genesis_file.name)
        if self._running_head() is not None:  # running (its port is now set), and it answers
            try:
                block = self.export_blocks(dest / self.import_file.name)
            except (OSError, NodeStartError) as exc:
                raise ChainError(f"reading the chain's blocks from the managed node failed: {exc}") from exc
        else:
            # Stopped: nobody writes it. geth takes this lock (flock) while it runs: held here, no geth can
            # start on the data dir during the copy, and one running that we did not recognise makes this
            # refuse.
            with (self.data_dir / "geth" / "LOCK").open("a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    raise ChainError(
                        f"a geth node holds {self.data_dir}: back up while `serve` runs, or stop it"
                    ) from exc
                shutil.copytree(self.data_dir, dest / self.data_dir.name, ignore=shutil.ignore_patterns("LOCK"))
            block = self.checkpoints.durable_block()  # the head as it stopped
        return ChainCopy(sorted(p.name for p in dest.iterdir()), block)

    def _command(self, auth_port: int) -> list[str]:
        return [
            str(self.binary),
            "--dev",
            "--dev.period",
            str(NEVER),
            "--datadir",
            str(self.data_dir.resolve()),  # absolute: how `running_node` knows it from any working directory
            "--state.scheme",
            "hash",
            "--gcmode",
            "archive",
            "--db.engine",
            "leveldb",
            # No state snapshot (the flat copy of the state geth builds in the background for snap sync
            # peers and faster reads). With 10,000,000 customers' state its generation, aborted and
            # resumed around every block, kept 0.8-0.95 of a core busy on an idle node and made an empty
            # block cost 50-300 ms; a single node serves no peers. `--snapshot=false` alone is not
            # enough: in snap sync mode, geth's default, it turns the snapshot back on.
            "--syncmode",
            "full",
            "--snapshot=false",
            "--cache",
            str(self.cache_mb),
            "--http",
            "--http.addr",
            "127.0.0.1",
            "--http.port",
            str(self.port),
            "--http.api",
            "eth,net,web3,txpool",  # `debug` and `testing` on the IPC socket only (`ipc_path`)
            "--authrpc.addr",
            "127.0.0.1",
            "--authrpc.port",
            str(auth_port),
            "--port",
            "0",
            "--nodiscover",
            "--maxpeers",
            "0",
            "--ipcpath",
            str(self.ipc_path),
            "--miner.gaslimit",
            str(self.gas_limit),
            # No local-transaction tracker: it journals what was sent to `transactions.rlp` and sends it
            # again at start and every so often, so after a restart it could put back a transaction the
            # relayer has since replaced at that nonce. The relayer alone decides what is sent again.
            "--txpool.nolocals",
            # The operator sends up to `relayer_max_in_flight` batches per lane before any is mined.
            "--txpool.accountslots",
            "4096",
            "--txpool.accountqueue",
            "4096",
            "--txpool.globalslots",
            "65536",
            "--txpool.globalqueue",
            "65536",
            # No log index: eth_getLogs searches blocks' blooms and receipts instead. The index (geth's
            # "filter maps") cost 5 of the 6.5 ms of CPU an empty block took here, more as the chain grew
            # (25 ms a block at 40,000 blocks and a million customers' state); our reads of logs are of
            # recent blocks (the indexer) or one pass over the history (`audit verify`).
            "--history.logs.disable",
            "--rpc.gascap",
            "0",  # eth_call and estimates of large batches are not capped at 50M gas
            "--rpc.txfeecap",
            "0",
            "--rpc.batch-request-limit",
            "100000",
            "--rpc.batch-response-max-size",
            str(1 << 30),
            "--verbosity",
            "3",  # until its first block (see `_wait_startup_block`), then 2
        ]

    def start(self) -> str:
        """Start the node (initialising its data directory the first time) and its miner; its URL."""
        if self.running:
            return self.url
        # A miner left from a node that died must not make blocks before the new node's start-up block.
        self._stop_workers_now()
        self._adopted = None  # an adopted node that died is not this one
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._adopt():
            self._after_start()
            return self.url
        self._initialise()
        self._private_ipc_dir()
        attempts = 1 if self.requested_port else 3  # a free port can be taken before geth binds it
        last_error = ""
        for _ in range(attempts):
            self.port = self.requested_port or free_port()
            log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
            with self.log_file.open("ab") as log_handle:
                self._process = subprocess.Popen(  # noqa: S603 - our own binary and arguments
                    self._command(free_port()),
                    stdout=log_handle,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop geth in order
                )
            write_atomically(self.pid_file, f"{self._process.pid} {self.port}")
            try:
                self._wait_ready()
                self._wait_startup_block(log_start)
            except ChainIdMismatch:
                self.kill()
                raise
            except NodeStartError as exc:
                last_error = str(exc)
                self.kill()
                continue
            log.info("geth %s running at %s (data %s)", self.binary, self.url, self.data_dir)
            self._after_start()
            return self.url
        raise NodeStartError(f"geth did not start: {last_error}; see {self.log_file}")

    def _after_start(self) -> None:
        head = self._head()
        self._last_time = int(head["timestamp"], 16)
        # A chain whose clock was set ahead (`increase_time`) stays ahead: blocks go on from it.
        self.offset = max(self.offset, self._last_time - int(time.time()) - self.max_lead)
        self.checkpoints.mark_durable(int(head["number"], 16))  # every block it has is on its disk
        self._start_workers()

    def _wait_startup_block(self, log_start: int) -> None:
        """Wait for the one block geth's simulated beacon makes as it starts (its block timer fires at
        once, however long `--dev.period`), then turn the log down to warnings. geth answers RPC before
        that block: a block of ours made meanwhile could be replaced by it (two blocks on one parent,
        the later made canonical), and a transaction whose receipt was seen would be back in the pool.
        geth says it in its log at `--verbosity 3`: a new head, or why it could not make the block."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            with self.log_file.open("rb") as handle:
                handle.seek(log_start)
                started = handle.read()
            if b"Chain head was updated" in started or b"Error performing sealing work" in started:
                self.privileged("debug_verbosity", [2])  # warnings and errors: at 3 it logs every block
                return
            if self._process is not None and self._process.poll() is not None:
                raise NodeStartError(f"geth exited with status {self._process.returncode}: {self._log_tail()}")
            time.sleep(0.02)
        raise NodeStartError(f"geth made no first block within {self.start_timeout:g}s: {self._log_tail()}")

    def running_node(self) -> tuple[int, int] | None:
        """(pid, port) of a live geth serving this data directory (started by a service, maybe another process)."""
        try:
            pid_text, port_text = self.pid_file.read_text().split()
            pid, port = int(pid_text), int(port_text)
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if not cmdline or not cmdline[0].endswith(b"geth") or str(self.data_dir.resolve()).encode() not in cmdline:
            return None
        return (pid, port) if _alive(pid) else None

    def _adopt(self) -> bool:
        """Take over a node an earlier service left running on this data directory (it was killed)."""
        found = self.running_node()
        if found is None:
            return False
        pid, port = found
        self._adopted, self.port = pid, port
        try:
            self._wait_ready()
        except ChainIdMismatch:
            self._adopted = None  # not ours to stop: say so
            raise
        except NodeStartError:
            self._signal_adopted(signal.SIGKILL)
            return False
        log.warning("adopted geth %s left running on %s by an earlier service", pid, self.data_dir)
        return True

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise NodeStartError(f"geth exited with status {self._process.returncode}: {self._log_tail()}")
            try:
                answered = int(str(self._call("eth_chainId", [], timeout=2)), 16)
            except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError, NodeStartError):
                time.sleep(0.05)
                continue
            if answered != self.chain_id:
                raise ChainIdMismatch(
                    f"the chain in {self.data_dir} has chain id {answered}; CONSENT_LEDGER_CHAIN_CHAIN_ID is "
                    f"{self.chain_id}: set it to {answered}, or use another data dir"
                )
            return
        raise NodeStartError(f"geth did not answer within {self.start_timeout:g}s: {self._log_tail()}")

    def privileged(self, method: str, params: list[object], timeout: float = 30) -> object:
        """A JSON-RPC call over geth's IPC socket (`ipc_path`): the namespaces not served over HTTP."""
        return _result(method, self._ipc_exchange(_request(method, params), timeout))

    def _ipc_exchange(self, request: Any, timeout: float) -> Any:
        """Send one request (or a batch) over the IPC socket and read its answer: geth writes each as
        one JSON value and a newline."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.ipc_path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            received = bytearray()
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError(f"geth closed {self.ipc_path} before it answered")
                received += chunk
                if received.endswith(b"\n"):
                    with contextlib.suppress(ValueError):  # a newline inside a value: read on
                        return json.loads(received)

    def _head(self) -> dict[str, Any]:
        head = self._call("eth_getBlockByNumber", ["latest", False])
        assert isinstance(head, dict)
        return head

    # blocks ------------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        if any(w.is_alive() for w in self._workers):
            return
        self._stop_workers.clear()
        self._workers = [threading.Thread(target=self._mine, name="geth-miner", daemon=True)]
        for worker in self._workers:
            worker.start()

    def _stop_workers_now(self) -> None:
        self._stop_workers.set()
        for worker in self._workers:
            worker.join(timeout=10)
        self._workers = []

    def _next_time(self) -> int | None:
        """The next block's timestamp, or None while it would be more than `max_lead` s ahead of the clock
        and the last block was made less than two seconds ago: past the lead, one block every two
        wall-clock seconds still, so that the lead shrinks by a second every two under any load and a
        clock stepped back (or a chain set ahead) slows the chain down but never stops it."""
        now = int(time.time()) + self.offset
        stamp = max(now, self._last_time + 1)
        if stamp - now <= self.max_lead:
            return stamp
        if time.monotonic() - self._last_made >= 2.0:
            if time.monotonic() - self._lead_warned > 60:
                self._lead_warned = time.monotonic()
                log.warning("the chain's newest block is %d s ahead of this machine's clock", stamp - 1 - now)
            return stamp
        return None

    def _pending(self) -> int:
        status = self.privileged("txpool_status", [])
        assert isinstance(status, dict)
        return int(status["pending"], 16)

    def commit(self, timestamp: int, transactions: list[str] | None = None) -> str:
        """Make one block now at `timestamp`, with what the pool holds (or exactly `transactions`, raw and
        hex: [] for an empty block); its hash. Written to the node's database before it returns."""
        attributes = {
            "timestamp": hex(timestamp),
            "prevRandao": ZERO32,
            "suggestedFeeRecipient": "0x" + "00" * 20,
            "withdrawals": [],
            "parentBeaconBlockRoot": ZERO32,
        }
        block_hash = str(self.privileged("testing_commitBlockV1", [attributes, transactions, None], timeout=120))
        self._last_time = timestamp
        self._last_made = time.monotonic()
        return block_hash

    def _mine(self) -> None:
        """Every `block_time`: if the clock allows a block, `before_block` (the relayer sends its batches),
        then a block if anything is waiting, then `after_block`."""
        due = time.monotonic() + self.block_time
        while not self._stop_workers.wait(max(0.0, due - time.monotonic())):
            mined = False
            with self._mining:
                due = max(due, time.monotonic()) + self.block_time
                if self._next_time() is None:
                    continue
                _run_hook(self.before_block)
                stamp = self._next_time()
                # A node that is down or restarting is the supervisor's business; any other failure is
                # logged (once a minute at most) and the miner goes on: it must never die quietly.
                try:
                    if stamp is not None and self._pending() > 0:
                        self.commit(stamp)
                        self._check_block()
                        mined = True
                except Exception as exc:
                    if self.running and time.monotonic() - self._failures_logged > 60:
                        self._failures_logged = time.monotonic()
                        log.warning("geth did not make a block: %s", exc)
            if mined:
                _run_hook(self.after_block)

    def _check_block(self) -> None:
        """After a block: mark it durable (it is on the node's disk), and say so if it raised the base fee."""
        head = self._head()
        self.checkpoints.mark_durable(int(head["number"], 16))
        if int(head.get("baseFeePerGas", "0x0"), 16) > 0:
            log.warning(
                "block %d used %d of %d gas: the base fee is now %d wei (transactions priced for 0 may wait)",
                int(head["number"], 16),
                int(head["gasUsed"], 16),
                int(head["gasLimit"], 16),
                int(head["baseFeePerGas"], 16),
            )

    def mine_now(self, *, advance: int = 0) -> None:
        """One block at once, empty or not, `advance` seconds on (development: `increase_time`)."""
        with self._mining:
            self.offset += advance
            now = int(time.time()) + self.offset
            self.commit(max(now, self._last_time + 1))
            self._check_block()

    @contextlib.contextmanager
    def mining_paused(self) -> Iterator[None]:
        with self._mining:
            yield

    def checkpoint(self) -> float:
        """Nothing to write: every block is in the node's database when it is made (kept for the
        interface the managed anvil node has); returns the seconds mining was paused (0)."""
        return 0.0

    # stopping ----------------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> None:
        """Stop gracefully: the miner stops, then geth closes its database."""
        self._stop_workers_now()
        self._end_process(graceful=True, timeout=timeout)

    def kill(self) -> None:
        """Kill at once, as a crash would."""
        self._stop_workers_now()
        self._end_process(graceful=False)
