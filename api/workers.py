"""`serve` in several processes: API workers beside the supervisor.

One Python process serves about 600 signed requests a second here, bound by its interpreter lock,
while the machine's other core idles. So `serve` runs the API in `api_workers` worker processes, each
listening on the service's port (SO_REUSEPORT: the kernel spreads connections over them). The
supervisor serves no requests: it holds what must have a single writer (the managed node, the
relayer with the operator key and its local nonce, the indexer), which in an API process would
compete for the interpreter lock while holding the database's write lock. Workers accept requests
into the service database (the outbox, points requests, idempotency records), read the read model,
and reach the supervisor over a control connection (a Unix socket in a private temp dir,
authenticated with a key made for this run) for the little that needs it:

    worker -> supervisor    ("wake",)                       new work for the relayer
                            ("invalidate",)                 reference data changed
                            ("call", id, name, args)        bind_controller / sync_partners
    supervisor -> worker    ("done", request_ids)           points requests that reached a final state
                            ("invalidate",)
                            ("result", id, error, value)

A worker whose control connection breaks stops at once: the supervisor crashed (a graceful stop
stops the workers first), and a crash of the supervisor is a crash of the service, as it would be in
one process. A worker serving on would answer for a service that is not there and hold the port.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from api.service_errors import ServiceError

log = logging.getLogger(__name__)

CALL_TIMEOUT = 120.0  # a call waits for a transaction to be mined (receipt_timeout is 60 s)


class ControlError(ServiceError):
    """A call to the supervisor failed: the connection broke, or the call itself raised (`kind` says how)."""

    def __init__(self, kind: str, message: str, extra: Any = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.extra = extra


class _Peer:
    """One end of a control connection: sends under a lock (several threads send)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Shut the connection down (both ends' blocked reads see its end), then close it; once, though
        the reading thread and a closing one may both call it (a second close of the descriptor could
        close whatever file reused its number)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            try:
                with socket.fromfd(self.connection.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the other end is gone already
            self.connection.close()

    def send(self, message: tuple[Any, ...]) -> bool:
        try:
            with self._lock:
                self.connection.send(message)
        except (OSError, ValueError):  # the other end is gone
            return False
        return True


class ControlServer:
    """The supervisor's end: accepts workers, serves their messages, broadcasts to them."""

    def __init__(
        self,
        address: str,
        authkey: bytes,
        *,
        on_wake: Callable[[], None],
        on_invalidate: Callable[[], None],
        calls: dict[str, Callable[..., Any]],
        classify: Callable[[BaseException], tuple[str, str, Any]],
    ) -> None:
        self.address = address
        self._listener = Listener(address, family="AF_UNIX", authkey=authkey)
        self._on_wake = on_wake
        self._on_invalidate = on_invalidate
        self._calls = calls
        self._classify = classify
        self._peers: list[_Peer] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="control-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                connection = self._listener.accept()
            except Exception:  # a bad authkey or a closed listener
                if self._closed:
                    return
                log.exception("a control connection was refused")
                continue
            peer = _Peer(connection)
            with self._lock:
                self._peers.append(peer)
            threading.Thread(target=self._serve, args=(peer,), name="control-peer", daemon=True).start()

    def _serve(self, peer: _Peer) -> None:
        try:
            while True:
                message = peer.connection.recv()
                kind = message[0]
                if kind == "wake":
                    self._on_wake()
                elif kind == "invalidate":
                    self._on_invalidate()
                elif kind == "call":
                    threading.Thread(target=self._call, args=(peer, *message[1:]), daemon=True).start()
        except (EOFError, OSError):
            pass
        finally:
            with self._lock:
                if peer in self._peers:
                    self._peers.remove(peer)
            peer.close()

    def _call(self, peer: _Peer, call_id: int, name: str, args: tuple[Any, ...]) -> None:
        try:
            value = self._calls[name](*args)
        except Exception as exc:
            peer.send(("result", call_id, self._classify(exc), None))
        else:
            peer.send(("result", call_id, None, value))

    def broadcast(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            peer.send(message)

    @property
    def workers(self) -> int:
        with self._lock:
            return len(self._peers)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            peers, self._peers = self._peers, []
        for peer in peers:
            peer.close()


class ControlClient:
    """A worker's end: sends wakes and calls; hands what the supervisor says to `on_message`."""

    def __init__(
        self,
        address: str,
        authkey: bytes,
        *,
        on_message: Callable[[tuple[Any, ...]], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._peer = _Peer(Client(address, family="AF_UNIX", authkey=authkey))
        self._on_message = on_message
        self._on_lost = on_lost
        self._ids = itertools.count()
        self._calls: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._read, name="control-client", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                message = self._peer.connection.recv()
                if message[0] == "result":
                    _, call_id, error, value = message
                    with self._lock:
                        future = self._calls.pop(call_id, None)
                    if future is not None:
                        if error is None:
                            future.set_result(value)
                        else:
                            future.set_exception(ControlError(*error))
                else:
                    try:
                        self._on_message(message)
                    except Exception:
                        log.exception("handling %s from the supervisor failed", message[0])
        except (EOFError, OSError):
            pass
        with self._lock:
            calls, self._calls = self._calls, {}
        for future in calls.values():
            future.set_exception(ControlError("lost", "the supervisor is gone"))
        if not self._closed:
            log.error("the control connection to the supervisor broke; stopping this worker")
            self._on_lost()

    def send(self, message: tuple[Any, ...]) -> None:
        self._peer.send(message)

    def call(self, name: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        future: Future[Any] = Future()
        call_id = next(self._ids)
        with self._lock:
            self._calls[call_id] = future
        if not self._peer.send(("call", call_id, name, args)):
            with self._lock:
                self._calls.pop(call_id, None)
            raise ControlError("lost", "the supervisor is gone")
        return future.result(timeout)

    def close(self) -> None:
        self._closed = True
        self._peer.close()


def _mark_dead(pid: int) -> None:
    """A worker exited: prometheus_client's bookkeeping for it (its live gauges go; its counters stay in
    the multiprocess directory and are summed as before: a counter must not go back)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class WorkerPool:
    """The supervisor's API worker processes (`consent-ledger serve-worker`), each listening on the
    service's port beside it and connected to its control socket; one that exits while the service runs
    is started again."""

    def __init__(self, command: list[str], *, count: int, env: dict[str, str], nice: int = 0) -> None:
        self._command = command
        self._count = count
        self._env = env
        self._nice = nice
        self._processes: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()  # restarts and stop() do not cross
        self._thread = threading.Thread(target=self._watch, name="worker-pool", daemon=True)

    def start(self) -> None:
        self._processes = [self._spawn(i) for i in range(self._count)]
        self._thread.start()

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        """Start worker `index`, `nice` below the supervisor at once: set by the worker itself, the
        priority came only after its imports (a second), while it could already be serving."""
        env = self._env | {"CONSENT_LEDGER_WORKER_INDEX": str(index)}
        process = subprocess.Popen(self._command, env=env)  # noqa: S603 - our own command
        if self._nice:
            priority = min(19, os.getpriority(os.PRIO_PROCESS, 0) + self._nice)
            with contextlib.suppress(ProcessLookupError):  # it died at once: the watch starts it again
                os.setpriority(os.PRIO_PROCESS, process.pid, priority)
        return process

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                for index, process in enumerate(self._processes):
                    if process.poll() is not None and not self._stop.is_set():
                        log.warning("API worker %s exited with %s; starting it again", index, process.returncode)
                        _mark_dead(process.pid)
                        self._processes[index] = self._spawn(index)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def stop(self, timeout: float = 15.0) -> None:
        """Ask every worker to finish its requests and stop (SIGTERM), then wait; kill the late."""
        with self._lock:
            self._stop.set()
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self._processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
