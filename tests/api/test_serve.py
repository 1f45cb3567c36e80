"""`consent-ledger serve` as a user runs it: a real process tree (service + its geth node), Ctrl-C, restart."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from ledger.anvil import free_port
from tests.api.conftest import CLI, interrupt, serve_env, wait_healthy

pytestmark = pytest.mark.geth


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _serve(data_dir: Path, port: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=serve_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_serve_starts_stops_on_ctrl_c_and_finds_its_state_again(tmp_path: Path) -> None:
    port = free_port()
    first = _serve(tmp_path, port)
    try:
        health = wait_healthy(port, first)
    finally:
        output = interrupt(first)
    assert first.returncode == 0, output
    assert "created a new operator key" in output
    assert "GET /api/v1/health HTTP/1.1 200" not in output  # no access log unless asked for
    assert health["status"] == "ok"
    assert health["backend"] == "geth"  # the default
    contracts = health["contracts"]
    assert {c["name"] for c in contracts} == {"ConsentRegistry", "LoyaltyPoints", "AccessLog"}
    node_pid = int((tmp_path / "chain" / "geth.pid").read_text().split()[0])
    assert not _alive(node_pid), "the node must stop with the service"
    assert (tmp_path / "chain" / "geth" / "geth" / "chaindata").is_dir()

    second = _serve(tmp_path, port)
    try:
        again = wait_healthy(port, second)
    finally:
        output = interrupt(second)
    assert second.returncode == 0, output
    assert "created a new operator key" not in output
    assert again["contracts"] == contracts  # the same deployment, not a new one
    assert again["block_number"] >= health["block_number"]


def test_a_killed_services_node_is_adopted_by_the_next_start(tmp_path: Path) -> None:
    # The node goes on while the service is down; the next start takes it over instead of starting a
    # second one on the same data (and, for anvil, instead of reloading a state file that could lack
    # the tail of its history).
    port = free_port()
    service = _serve(tmp_path, port)
    before = wait_healthy(port, service)
    node_pid = int((tmp_path / "chain" / "geth.pid").read_text().split()[0])
    service.kill()
    service.communicate(timeout=30)
    assert _alive(node_pid)
    again = _serve(tmp_path, port)
    try:
        after = wait_healthy(port, again)
        assert int((tmp_path / "chain" / "geth.pid").read_text().split()[0]) == node_pid
        assert after["contracts"] == before["contracts"]
        assert after["block_number"] >= before["block_number"]
    finally:
        output = interrupt(again)
    assert again.returncode == 0, output
    assert "adopted geth" in output
    deadline = time.monotonic() + 30
    while _alive(node_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(node_pid), "a graceful stop stops the adopted node too"


def _children(pid: int) -> list[int]:
    """Child processes of `pid`, whichever of its threads started them (a thread may end meanwhile)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _sockets(port: int, state: str) -> set[str]:
    """Inodes of the TCP sockets on local `port` in `state` (01 established, 0A listening)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(fields[9])
    return inodes


def _connections_by_process(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections to `port` each process holds (from /proc: socket inodes)."""
    inodes = _sockets(port, "01")
    counts = {}
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        links = [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()]
        counts[pid] = sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in inodes)
    return counts


def test_api_workers_share_the_port_and_a_second_service_cannot_take_it(tmp_path: Path) -> None:
    port = free_port()
    service = _serve(tmp_path / "a", port, CONSENT_LEDGER_API_WORKERS="2", CONSENT_LEDGER_ACCESS_LOG="true")
    try:
        wait_healthy(port, service)
        workers = [c for c in _children(service.pid) if "serve-worker" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2
        # Under full load the supervisor's relayer and indexer come first (CONSENT_LEDGER_API_WORKER_NICE).
        supervisor_nice = os.getpriority(os.PRIO_PROCESS, service.pid)
        assert [os.getpriority(os.PRIO_PROCESS, w) for w in workers] == [min(19, supervisor_nice + 4)] * 2
        deadline = time.monotonic() + 60
        while len(_sockets(port, "0A")) < 2:  # each worker listens once it has started
            assert time.monotonic() < deadline, "the API worker did not start listening"
            time.sleep(0.1)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
        try:
            for client in clients:  # answered: accepted by whichever process's socket the kernel chose
                client.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert client.recv(12) == b"HTTP/1.1 200"
            counts = _connections_by_process(workers, port)
        finally:
            for client in clients:
                client.close()
        assert sum(counts.values()) == 24, counts  # none with the supervisor, which only holds the port
        assert all(n > 0 for n in counts.values()), f"one process got every connection: {counts}"

        # The workers' SO_REUSEPORT must not let another service (here: another data dir) share the port.
        other = _serve(tmp_path / "b", port)
        output, _ = other.communicate(timeout=60)
        assert other.returncode != 0
        assert "Address already in use" in output
    finally:
        output = interrupt(service)
    assert service.returncode == 0, output
    assert output.count("GET /api/v1/health HTTP/1.1 200") >= 24  # the workers' access log (JSON), as asked


def test_a_killed_api_worker_is_started_again_and_the_service_serves_on(tmp_path: Path) -> None:
    port = free_port()
    service = _serve(tmp_path, port, CONSENT_LEDGER_API_WORKERS="2")
    try:
        wait_healthy(port, service)
        deadline = time.monotonic() + 60
        while len(workers := _workers(service.pid)) < 2 or len(_sockets(port, "0A")) < 2:
            assert time.monotonic() < deadline, "the API workers did not start"
            time.sleep(0.1)
        os.kill(workers[0], signal.SIGKILL)
        while (again := _workers(service.pid)) == workers or len(again) < 2 or len(_sockets(port, "0A")) < 2:
            assert time.monotonic() < deadline, "the killed worker was not started again"
            time.sleep(0.1)
        assert workers[0] not in again
        assert wait_healthy(port, service)["status"] == "ok"
    finally:
        output = interrupt(service)
    assert service.returncode == 0, output
    assert "starting it again" in output


def _workers(pid: int) -> list[int]:
    children = [c for c in _children(pid) if Path(f"/proc/{c}").exists()]
    return sorted(c for c in children if "serve-worker" in Path(f"/proc/{c}/cmdline").read_text())


def test_the_inprocess_backend_serves_from_one_process(tmp_path: Path) -> None:
    port = free_port()
    service = _serve(tmp_path, port, CONSENT_LEDGER_CHAIN_BACKEND="inprocess", CONSENT_LEDGER_API_WORKERS="2")
    try:
        health = wait_healthy(port, service)
        assert health["backend"] == "inprocess"
        assert _workers(service.pid) == []
    finally:
        output = interrupt(service)
    assert service.returncode == 0, output
    assert "serves the API from one process" in output


def test_production_mode_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "serve", "--port", str(free_port()), "--data-dir", str(tmp_path)],
        env=serve_env(CONSENT_LEDGER_MODE="production"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "CONSENT_LEDGER_CHAIN_OPERATOR_KEY is not set" in result.stderr
    assert not (tmp_path / "chain").exists()


def _get(url: str) -> tuple[int, dict[str, Any], str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(json.loads(response.read())), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, dict(json.loads(error.read())), error.headers["Content-Type"]


def test_dids_resolve_over_http_and_deactivate_on_erasure(tmp_path: Path) -> None:
    from api.secrets import load_secrets
    from api.settings import ServiceSettings
    from identity.did import DidWeb
    from identity.normalize import normalize_pii
    from identity.pseudonym import Pseudonymizer
    from identity.settings import IdentitySettings
    from identity.vault import Vault, make_engine
    from ledger.settings import ChainSettings

    port = free_port()
    service = _serve(tmp_path, port)
    try:
        wait_healthy(port, service)
        # The operator's side of enrolment, on the service's own vault file and development secrets.
        secrets = load_secrets(ServiceSettings(data_dir=tmp_path), ChainSettings(operator_key=None), IdentitySettings())
        vault = Vault(
            make_engine(f"sqlite:///{tmp_path / 'identity.db'}"), secrets.master_keys, Pseudonymizer(secrets.peppers)
        )
        subject, _ = vault.enrol(normalize_pii({"email": "Ann.Lee@Example.com"}))
        methods = DidWeb(f"127.0.0.1%3A{port}")
        did = methods.did(subject)
        base = f"http://127.0.0.1:{port}"

        status, result, media = _get(f"{base}/api/v1/dids/{quote(did, safe='')}")  # a DID in a path is escaped
        assert status == 200
        assert media.startswith("application/ld+json")
        assert result["didDocument"]["id"] == did
        status, document, media = _get(f"{base}{methods.document_path(subject)}")
        assert (status, media) == (200, "application/did+json")
        assert document == result["didDocument"]

        status, result, _ = _get(f"{base}/api/v1/dids/did:web:127.0.0.1%253A{port}:dids:{'00' * 32}")
        assert (status, result["didResolutionMetadata"]["error"]) == (404, "notFound")
        status, result, _ = _get(f"{base}/api/v1/dids/not-a-did")
        assert (status, result["didResolutionMetadata"]["error"]) == (400, "invalidDid")

        vault.erase(subject)
        status, result, _ = _get(f"{base}/api/v1/dids/{quote(did, safe='')}")
        assert status == 410
        assert result["didDocumentMetadata"]["deactivated"] is True
        assert _get(f"{base}{methods.document_path(subject)}")[0] == 410
        assert b"ann" not in (tmp_path / "identity.db").read_bytes().lower()
        vault.engine.dispose()
    finally:
        interrupt(service)


def test_api_workers_default_to_the_cores_the_service_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its CPU affinity (taskset, a container's cpuset), not the machine's cores: two workers on one
    allowed core would only take turns with the supervisor."""
    from api.settings import ServiceSettings

    for allowed, workers in (({0}, 1), ({0, 1}, 2), (set(range(16)), 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, allowed=allowed: allowed)
        assert ServiceSettings().api_workers == workers
