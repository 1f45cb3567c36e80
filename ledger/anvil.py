"""A managed anvil node: started and stopped by the service, its state kept in the data dir.

anvil comes from the npm package `@foundry-rs/anvil` (a platform binary inside a registry package).
It always runs with interval mining and a high block gas limit: in automine mode (a block per
transaction) it collapses under load on this machine kind (DESIGN.md, measured facts).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.errors import ChainError, NodeStartError
from ledger.files import write_atomically

log = logging.getLogger(__name__)

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_OS = {"linux": "linux", "darwin": "darwin", "win32": "win32"}


# World states the managed node keeps (one per recent block). Calls at an older block fail; ours read
# old state only to replay a just-mined reverted transaction at `block - 1`. 64 matches the indexer's
# reorganisation depth; 256 held 5.2 GB instead of 2.1 GB with the bridge benchmark's 62,592 consents.
RECENT_STATES = 64

# In the environment of the node we start: the state file it serves (how a later service knows the
# node an earlier one left running; see `running_node`).
STATE_MARKER = "CONSENT_LEDGER_ANVIL_STATE"


def find_anvil(node_modules: Path) -> Path:
    """The anvil binary npm installed for this platform."""
    os_name = _OS.get(sys.platform)
    arch = _ARCH.get(platform.machine().lower())
    if os_name is None or arch is None:
        raise NodeStartError(f"no anvil build for {sys.platform}/{platform.machine()}")
    exe = "anvil.exe" if os_name == "win32" else "anvil"
    binary = node_modules / "@foundry-rs" / f"anvil-{os_name}-{arch}" / "bin" / exe
    if not binary.is_file():
        raise NodeStartError(
            f"anvil is not installed ({binary} is missing): run `make setup` (or `npm ci`) in "
            f"{node_modules.parent}, or set CONSENT_LEDGER_CHAIN_ANVIL_PATH"
        )
    return binary


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead


def _request(method: str, params: list[object]) -> dict[str, object]:
    """A JSON-RPC request to a node."""
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


def _result(method: str, answer: dict[str, Any]) -> object:
    """A node's answer's result, or its error raised."""
    if "error" in answer:
        raise NodeStartError(f"{method}: {answer['error']}")
    return answer.get("result")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server started next (a node, a test's service).

    Taken from outside the kernel's range for the local ports of outgoing connections: a port from
    that range (what binding port 0 gives) that is free when picked can be taken, before the server
    binds it, by any connection this machine opens meanwhile (seen in the suite: a service's port
    held by a client connection to a node started in between). Outside it, only another server's
    choice can collide, and the nodes' starts pick again when their port was taken."""
    low, high = _outgoing_port_range()
    ports = [*range(PORTS_FROM, min(low, 65536)), *range(max(high + 1, PORTS_FROM), 65536)]
    for _ in range(64):
        port = secrets.choice(ports) if ports else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free TCP port on 127.0.0.1")


PORTS_FROM = 10_000  # below: ports that well-known services use


def _outgoing_port_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; elsewhere its usual default)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _start_dumper() -> subprocess.Popen[str]:
    """The process that fetches, checks and writes checkpoints (`ledger.anvil_dump`), once it is ready."""
    child = subprocess.Popen(
        [sys.executable, "-m", "ledger.anvil_dump"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.kill()
        child.wait()
        raise OSError("the dump process did not start")
    return child


def _run_hook(hook: Callable[[], None] | None) -> None:
    if hook is None:
        return
    try:
        hook()
    except Exception:  # a listener's failure must not stop block production
        log.exception("block hook failed")


CHECKPOINT_SHARE = 20  # a checkpoint is followed by at least 20 times its duration without one
CAPTURE_HOLD = 0.05  # seconds mining pauses while the node copies the chain for a dump (see `checkpoint`)
MAX_CAPTURE_HOLD = 0.8  # ... at most, when the node has been slow to copy; then mining pauses throughout


# ... or once its duration, while someone waits for a block to be in one (`Checkpoints.wait`): a dump of
# a large chain takes seconds (~12 s at the bridge benchmark's 1,000,000 rows); with 4 here, its
# second and third exports waited for 4 times the previous dump first and took 75 and 122 s in all.
WANTED_SHARE = 1
WANTED_POLL = 0.1  # seconds between the checkpoint loop's looks for such a wait


class NotDurable(ChainError):
    """Raised when no checkpoint of the managed node came to hold a block in time."""


class Checkpoints:
    """Which blocks of a managed node survive a crash of it, seen from any process with its state dir.

    The node keeps its chain in memory; a crash loses every block since its last checkpoint (the state
    file), and the blocks mined after the restart take their numbers. After each checkpoint the
    service writes the newest block it holds to `durable.json` (after the state file: never ahead of
    it). What must not be lost waits for its block to be there (`wait`): the CRM bridge before it
    hands data on, since the access record is the proof that the release was permitted. A waiter
    asks for an early checkpoint through `checkpoint.wanted` (the same form; the service's
    checkpoint loop looks at it every `WANTED_POLL` seconds). A chain with final blocks, such as
    QBFT, needs none of this: its blocks are on the validators' disks when they are made."""

    def __init__(self, state_dir: Path) -> None:
        self.durable_file = state_dir / "durable.json"
        self.wanted_file = state_dir / "checkpoint.wanted"

    @staticmethod
    def _block(path: Path) -> int:
        try:
            return int(json.loads(path.read_text())["block"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    @staticmethod
    def _write(path: Path, block: int) -> None:
        write_atomically(path, json.dumps({"block": block}))

    def durable_block(self) -> int:
        """The newest block a checkpoint holds (-1: none yet)."""
        return self._block(self.durable_file)

    def wanted_block(self) -> int:
        """The newest block someone waits to see in a checkpoint (-1: none)."""
        return self._block(self.wanted_file)

    def mark_durable(self, block: int) -> None:
        self._write(self.durable_file, block)

    def wait(self, block: int, *, timeout: float = 600.0, poll: float = 0.05) -> None:
        """Return once a checkpoint holds block number `block`, asking for one if need be.

        The caller still checks that its transaction's block is the canonical one at that number:
        a crash before the checkpoint replaces it with another block of the same number."""
        if self.durable_block() >= block:
            return
        if self.wanted_block() < block:
            self._write(self.wanted_file, block)  # a lower wish of another waiter is covered
        deadline = time.monotonic() + timeout
        while self.durable_block() < block:
            if time.monotonic() > deadline:
                raise NotDurable(f"no checkpoint of the managed node holds block {block} after {timeout:g}s")
            time.sleep(poll)


@dataclass(frozen=True)
class ChainCopy:
    """What `ManagedProcess.copy_chain` wrote: the files (relative to its destination) and the newest
    block they are known to hold (None: not known, e.g. no checkpoint yet)."""

    files: list[str]
    block: int | None


class ManagedProcess:
    """What the managed nodes (anvil here, geth in `ledger.geth`) share: one node process of ours, or one
    an earlier service left running that we adopted, reached over loopback JSON-RPC.

    Its capabilities, so that no caller outside `ledger` asks which node it has: `url`, the miner's
    hooks (`before_block`, `after_block`), `checkpoint` (write what it holds to disk now), `durable_wait`
    (how to wait until a block survives a crash of it, or None when every block does once made),
    `running_node` (a node some process of the service runs on this state dir) and `copy_chain`."""

    name = "node"  # in messages
    port: int
    _process: subprocess.Popen[bytes] | None
    _adopted: int | None  # pid of a node an earlier service left running
    before_block: Callable[[], None] | None
    after_block: Callable[[], None] | None

    @property
    def log_file(self) -> Path:
        raise NotImplementedError

    @property
    def durable_wait(self) -> Callable[[int], None] | None:
        """Waits (`Checkpoints.wait`) until block n survives a crash of the node; None: each block does
        when it is made."""
        return None

    def checkpoint(self) -> float:
        """Write the chain the node holds to its disk now; the seconds mining was paused for it."""
        raise NotImplementedError

    def running_node(self) -> tuple[int, int] | None:
        """(pid, port) of a live node of ours serving this state dir (maybe another process's)."""
        raise NotImplementedError

    def copy_chain(self, dest: Path, *, timeout: float) -> ChainCopy:
        """Copy the chain into the new directory `dest`, whether the node runs (in any process of the
        service) or not, such that a node started on `dest` holds every block the node held when this
        was called. Raises ChainError (in words) when it cannot."""
        raise NotImplementedError

    def _running_head(self) -> int | None:
        """The newest block of the node running on this state dir (any process's), None when none runs."""
        found = self.running_node()
        if found is None:
            return None
        self.port = found[1]
        try:
            return int(str(self._call("eth_blockNumber", [])), 16)
        except (OSError, ChainError, ValueError) as exc:
            raise ChainError(f"the managed node at {self.url} does not answer: {type(exc).__name__}") from exc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        if self._adopted is not None:
            return _alive(self._adopted)
        return self._process is not None and self._process.poll() is None

    def _call(self, method: str, params: list[object], timeout: float = 30) -> object:
        request = urllib.request.Request(  # noqa: S310 - loopback URL we built
            self.url, data=json.dumps(_request(method, params)).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return _result(method, json.loads(response.read()))

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return ""

    def _signal_adopted(self, sig: int, timeout: float = 30.0) -> None:
        pid = self._adopted
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._adopted = None

    def _end_process(self, graceful: bool, timeout: float = 30.0) -> None:
        """Stop the node process (SIGINT, then SIGKILL after `timeout`) or kill it at once."""
        if self._adopted is not None:
            self._signal_adopted(signal.SIGINT if graceful else signal.SIGKILL, timeout)
            return
        if self._process is None:
            return
        if self._process.poll() is None:
            if graceful:
                self._process.send_signal(signal.SIGINT)
                try:
                    self._process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %ss; killing it", self.name, timeout)
                    graceful = False
            if not graceful:
                os.kill(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._process = None


class AnvilNode(ManagedProcess):
    """One anvil process with interval mining and state persisted to `state_dir/state.json`."""

    name = "anvil"

    def __init__(
        self,
        binary: Path,
        state_dir: Path,
        *,
        chain_id: int,
        block_time: float,
        gas_limit: int,
        port: int = 0,
        state_interval: int = 1,
        start_timeout: float = 30.0,
    ) -> None:
        self.binary = binary
        self.state_dir = state_dir
        self.chain_id = chain_id
        self.block_time = block_time
        self.gas_limit = gas_limit
        self.requested_port = port
        self.state_interval = state_interval
        self.start_timeout = start_timeout
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._adopted: int | None = None  # pid of a node an earlier service left running
        self._mining = threading.Lock()  # a checkpoint's copy never overlaps a block being mined
        self._dumper: subprocess.Popen[str] | None = None  # see `_dump`
        self._dumper_lock = threading.Lock()
        self._capture_hold = CAPTURE_HOLD
        self.checkpoints = Checkpoints(state_dir)
        self._stop_workers = threading.Event()
        self._workers: list[threading.Thread] = []
        # Called by the interval miner just before and just after each block (see `_mine`).
        self.before_block: Callable[[], None] | None = None
        self.after_block: Callable[[], None] | None = None

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "anvil.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "anvil.pid"

    def _command(self) -> list[str]:
        return [
            str(self.binary),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chain-id",
            str(self.chain_id),
            "--no-mining",  # blocks come from our own interval miner, so that checkpoints never race a block
            "--gas-limit",
            str(self.gas_limit),
            "--base-fee",
            "0",
            "--no-priority-fee",
            "--accounts",
            "1",
            "--no-request-size-limit",
            "--quiet",  # it otherwise logs every RPC call: gigabytes a day under load; errors still show
            "--disable-code-size-limit",
            # Keep the world state of recent blocks only (enough for reorganisations and calls at a
            # recent block): by default anvil keeps one per block, and its memory grew past 14 GB in a
            # 1,000,000-row bridge benchmark. Blocks, receipts and logs are kept whole.
            "--prune-history",
            str(RECENT_STATES),
            # Only load: with `--state` or `--dump-state`, anvil also writes the file itself, every
            # 60 s (its default `--state-interval`) and on exit, encoding the whole chain in one of its
            # async tasks, so that every RPC could wait meanwhile (gdb on the node during a 3 s stall of
            # mining and receipts under load found it writing the file), and it encoded, decoded and
            # encoded the chain again to do so. It also wrote the file in place: a crash during it left
            # a truncated file. Our checkpoints (`checkpoint`) write it whole and atomically; a graceful
            # `stop` takes the last one.
            *(("--load-state", str(self.state_file)) if self.state_file.is_file() else ()),
        ]

    def start(self) -> str:
        """Start the node and wait until it answers; returns its URL."""
        if self.running:
            return self.url
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._adopt():
            self._start_workers()
            return self.url
        attempts = 1 if self.requested_port else 3  # a free port can be taken before anvil binds it
        last_error = ""
        for _ in range(attempts):
            self.port = self.requested_port or free_port()
            with self.log_file.open("ab") as log_handle:
                self._process = subprocess.Popen(  # noqa: S603 - our own binary and arguments
                    self._command(),
                    env={**os.environ, STATE_MARKER: str(self.state_file)},
                    stdout=log_handle,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop anvil in order
                )
            write_atomically(self.pid_file, f"{self._process.pid} {self.port}")  # never seen half-written
            try:
                self._wait_ready()
            except NodeStartError as exc:
                last_error = str(exc)
                self.kill()
                continue
            log.info("anvil %s running at %s (state %s)", self.binary, self.url, self.state_file)
            # A new process has nothing but what it loaded from the state file (a node adopted above
            # may hold more, so its mark stays as the last checkpoint left it).
            self.checkpoints.mark_durable(int(str(self._call("eth_blockNumber", [])), 16))
            self._start_workers()
            return self.url
        raise NodeStartError(f"anvil did not start: {last_error}; see {self.log_file}")

    # interval mining and consistent checkpoints ----------------------------------------------------

    def _start_workers(self) -> None:
        """Interval mining (a block every `block_time`, never automine) and a state checkpoint every
        `state_interval` seconds, taken while no block is being mined.

        anvil's own `--block-time` with `--state-interval` dumps the state and the block history under
        separate locks while blocks keep coming, so after a crash its file can hold state effects of
        blocks it does not contain (seen in our crash tests): changes applied with no transaction or
        log left. Mining from here lets each checkpoint see a quiet node.
        """
        if any(w.is_alive() for w in self._workers):
            return
        self._stop_workers.clear()
        self._workers = [
            threading.Thread(target=self._mine, name="anvil-miner", daemon=True),
            threading.Thread(target=self._checkpoint_loop, name="anvil-checkpoint", daemon=True),
        ]
        for worker in self._workers:
            worker.start()

    def _stop_workers_now(self) -> None:
        self._stop_workers.set()
        for worker in self._workers:
            worker.join(timeout=10)
        self._workers = []
        with self._dumper_lock:
            self._close_dumper()

    def _mine(self) -> None:
        """A block every `block_time`. `before_block` runs first, inside the same pause of checkpoints,
        so that what it sends (the relayer's batches: `ledger.lanes.BlockCadence`) is in the block;
        `after_block` runs once it is mined."""
        due = time.monotonic() + self.block_time
        while not self._stop_workers.wait(max(0.0, due - time.monotonic())):
            with self._mining:
                # At a fixed rate: the time the hooks and mining take does not stretch the interval
                # (after a pause, such as a checkpoint, the next block is a whole interval away).
                due = max(due, time.monotonic()) + self.block_time
                _run_hook(self.before_block)
                # A node that is down or restarting is the supervisor's business, not the miner's.
                with contextlib.suppress(OSError, ValueError, NodeStartError):
                    self._call("evm_mine", [])
            _run_hook(self.after_block)

    def _checkpoint_loop(self) -> None:
        pause, wanted_pause = float(self.state_interval), 0.0  # the first one waited for comes at once
        last = time.monotonic()
        while not self._stop_workers.wait(min(WANTED_POLL, pause)):
            since = time.monotonic() - last
            if since < pause and not (
                since >= wanted_pause and self.checkpoints.wanted_block() > self.checkpoints.durable_block()
            ):
                continue
            started = time.monotonic()
            try:
                self.checkpoint()
            except (OSError, ValueError, NodeStartError) as exc:
                log.debug("checkpoint skipped: %s", exc)
            took = time.monotonic() - started
            pause, wanted_pause = self.checkpoint_pause(took), took * WANTED_SHARE
            last = time.monotonic()

    def checkpoint_pause(self, took: float) -> float:
        """Seconds to the next checkpoint after one that took `took`.

        A dump holds every block and transaction (anvil keeps no other history), so it grows with the
        chain: about 3 MB per thousand consent changes (call traces are most of it), seconds of the
        node's and this process's CPU at a hundred thousand. Taken every `state_interval` regardless,
        checkpoints would come to take a core. So checkpoints take at most 1/CHECKPOINT_SHARE of the
        time: what a crash of the node can lose grows with the chain (the relayer sends it again; see
        `Runtime.supervise_node`). While someone waits for a block to be held (`Checkpoints.wait`:
        the bridge, before it releases data), the next one comes after WANTED_SHARE times the last
        one's duration instead."""
        return max(float(self.state_interval), took * CHECKPOINT_SHARE)

    @contextlib.contextmanager
    def mining_paused(self) -> Iterator[None]:
        """No block is mined by the interval miner while inside (a checkpoint's capture, a measurement)."""
        with self._mining:
            yield

    def checkpoint(self) -> float:
        """Write the node's state and block history to the state file, consistently; returns the
        seconds mining was paused for it.

        anvil takes its dump in two steps: it copies the chain (block env, head number, blocks,
        transactions, then accounts, each under its own lock: a block mined in between makes the copy
        inconsistent), then encodes and compresses it with no lock held, which is nearly all of the
        time (3.8 s for 173 MB against under 10 ms for the copy, measured). So mining pauses for
        `CAPTURE_HOLD` only, while the node copies; the dump is then checked (`dump_problem`) and, if
        a block got into the copy all the same, taken again with a longer hold, then with mining
        paused throughout. Before this, every checkpoint paused mining for the whole dump: seconds at
        a hundred thousand changes. The dump is fetched, checked and written by a low-priority
        process of its own (`ledger.anvil_dump`), not by this one, where the relayer and the miner
        run."""
        started = time.monotonic()
        tmp = self.state_file.with_suffix(".tmp")
        paused = 0.0
        # The copy is quick, but a busy node may start on the request late: after a race, hold longer
        # (this checkpoint and the next ones, easing back after clean ones); mining paused throughout
        # is the last resort, and always consistent.
        for hold in (self._capture_hold, min(4 * self._capture_hold, MAX_CAPTURE_HOLD), None):
            outcome, took = self._dump(tmp, hold)
            paused += took
            if outcome["problem"] is None:
                break
            if hold is None:  # the node itself is inconsistent, or its format changed
                raise ValueError(f"anvil_dumpState with mining paused: {outcome['problem']}")
            self._capture_hold = min(2 * self._capture_hold, MAX_CAPTURE_HOLD)
            log.info("checkpoint raced a block (%s): taking it again, holding mining longer", outcome["problem"])
        if hold == self._capture_hold:
            self._capture_hold = max(CAPTURE_HOLD, 0.8 * self._capture_hold)
        os.replace(tmp, self.state_file)
        if outcome.get("head") is not None:
            self.checkpoints.mark_durable(int(outcome["head"]))
        log.info(
            "checkpoint: %.1f MB in %.3f s, mining paused %.3f s",
            outcome["bytes"] / 1e6,
            time.monotonic() - started,
            paused,
        )
        return paused

    def _last_checkpoint(self) -> None:
        """The state file at a graceful stop (mining stopped: the first dump is one moment of the chain)."""
        try:
            self.checkpoint()
        except (OSError, ValueError, NodeStartError) as exc:
            log.warning("the last checkpoint failed (%s): the state file holds the one before", exc)
        finally:
            with self._dumper_lock:
                self._close_dumper()

    def _dump(self, path: Path, hold: float | None) -> tuple[dict[str, Any], float]:
        """Have the dump process write a checked dump to `path`: its outcome, and the seconds mining
        was paused for it: `hold` seconds from when the request was sent, or (None) until it is done."""
        with self._dumper_lock:
            if self._dumper is None or self._dumper.poll() is not None:
                self._dumper = _start_dumper()
            child = self._dumper
            assert child.stdin is not None
            assert child.stdout is not None
            try:
                started = time.monotonic()
                with self.mining_paused():
                    child.stdin.write(json.dumps([self.url, str(path)]) + "\n")
                    child.stdin.flush()
                    if child.stdout.readline().strip() != "sent":
                        raise OSError("the dump process stopped")
                    if hold is None:
                        answer = child.stdout.readline()
                    else:
                        time.sleep(hold)
                paused = time.monotonic() - started
                if hold is not None:
                    answer = child.stdout.readline()
                outcome: dict[str, Any] = json.loads(answer)
            except (OSError, ValueError):
                self._close_dumper()
                raise
        if "error" in outcome:
            raise OSError(f"anvil_dumpState: {outcome['error']}")
        return outcome, paused

    def _close_dumper(self) -> None:
        child, self._dumper = self._dumper, None
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()

    @property
    def durable_wait(self) -> Callable[[int], None] | None:
        """The chain is in memory: a block survives a crash once a checkpoint holds it (`Checkpoints`)."""
        return self.checkpoints.wait

    def copy_chain(self, dest: Path, *, timeout: float) -> ChainCopy:
        """The state file, once a checkpoint holds the running node's head (from a state dump, so it
        holds the blocks too); a stopped node's state file is its whole chain."""
        head = self._running_head()
        if head is not None:
            self.checkpoints.wait(head, timeout=timeout)
        if not self.state_file.is_file():
            raise ChainError(f"{self.state_file} is missing: the managed node has written no state yet")
        dest.mkdir()
        held = self.checkpoints.durable_block()  # written after each dump's file: the copy holds it
        shutil.copyfile(self.state_file, dest / self.state_file.name)  # replaced whole by each dump: one of them
        return ChainCopy([self.state_file.name], None if held < 0 else held)

    def running_node(self) -> tuple[int, int] | None:
        """(pid, port) of a live anvil serving this state dir (started by a service, maybe another process)."""
        try:
            pid_text, port_text = self.pid_file.read_text().split()
            pid, port = int(pid_text), int(port_text)
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return None
        marker = f"{STATE_MARKER}={self.state_file}".encode()
        # (a node started before the marker has the file in its command line, after --state)
        ours = marker in environment or str(self.state_file).encode() in cmdline
        if b"anvil" not in cmdline or not ours or not _alive(pid):
            return None
        return pid, port

    def _adopt(self) -> bool:
        """Take over a node an earlier service left running on this state dir (it was killed).

        The node keeps its chain in memory, so nothing it mined is lost; restarting it from its state
        file instead could lose the tail of its history. Two nodes never share one state file.
        """
        found = self.running_node()
        if found is None:
            return False
        pid, port = found
        self._adopted, self.port = pid, port
        try:
            self._wait_ready()
        except NodeStartError:
            self._signal_adopted(signal.SIGKILL)
            return False
        log.warning("adopted anvil %s left running on %s by an earlier service", pid, self.state_dir)
        return True

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise NodeStartError(f"anvil exited with status {self._process.returncode}: {self._log_tail()}")
            request = urllib.request.Request(  # noqa: S310 - loopback URL we built
                self.url, data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
                    if int(json.loads(response.read())["result"], 16) == self.chain_id:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError):
                time.sleep(0.05)
        raise NodeStartError(f"anvil did not answer within {self.start_timeout:g}s: {self._log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop gracefully: mining stops, a last checkpoint writes the state file, then anvil exits."""
        self._stop_workers_now()
        if self.running:
            self._last_checkpoint()
        self._end_process(graceful=True, timeout=timeout)

    def kill(self) -> None:
        """Kill at once (state since the last checkpoint is lost, as in a crash)."""
        self._stop_workers_now()
        self._end_process(graceful=False)
