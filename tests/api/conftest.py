"""A real service for API tests: managed anvil, the runtime's threads, uvicorn on a free port."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.signers.local import LocalAccount

from api.auth import create_principal
from api.main import create_app
from api.models import Partner
from api.runtime import Runtime
from api.secrets import load_secrets
from api.settings import ServiceSettings
from identity.settings import IdentitySettings
from ledger.settings import ChainSettings, ToolchainSettings
from scripts.served import q as q  # re-exported: the tests take it from here

CLI = [sys.executable, "-m", "api.cli"]


def serve_env(**extra: str) -> dict[str, str]:
    """The environment for a `consent-ledger` process: ours cleared, the given settings set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_")}
    # The default chain (a managed geth node) with blocks every 0.1 s, its clock let run ahead: tests
    # wait for one confirmation after another, and at the default lead of 2 s they would get one block
    # a second (`tests/ledger/test_backend_geth.py` tests that lead).
    env.update({"CONSENT_LEDGER_CHAIN_BLOCK_TIME": "0.1", "CONSENT_LEDGER_CHAIN_MAX_CLOCK_LEAD": "3600", **extra})
    return env


def add_principal(data_dir: Path, role: str, name: str) -> str:
    """A new principal of `role` in `data_dir`, made with the command line as an operator would; its API key."""
    added = subprocess.run(
        [*CLI, "principals", "add", "--role", role, "--name", name, "--data-dir", str(data_dir)],
        env=serve_env(), capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    found = re.search(r"api key: (\S+)", added.stdout)
    assert found is not None, added.stdout
    return found.group(1)


def wait_healthy(port: int, process: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited early with {process.returncode}: {process.communicate()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2) as response:
                return dict(json.loads(response.read()))
        except OSError:
            time.sleep(0.1)
    raise AssertionError("serve did not answer in time")


def interrupt(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    return output


@dataclass
class Customer:
    account: LocalAccount
    did: str
    token: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class ApiClient:
    """A running service seen over HTTP, with the keys of its principals, and customer helpers."""

    client: httpx.Client
    operator_key: str
    partner_key: str
    auditor_key: str
    partner_address: str
    customers: list[Customer] = field(default_factory=list)

    def operator(self) -> dict[str, str]:
        return {"X-API-Key": self.operator_key}

    def sign_typed(self, account: LocalAccount, typed: dict[str, Any]) -> str:
        return "0x" + bytes(account.sign_message(encode_typed_data(full_message=typed)).signature).hex()

    def enrol(self, email: str) -> tuple[str, str]:
        response = self.client.post(
            "/api/v1/customers", json={"email": email, "name": "Test Person"}, headers=self.operator()
        )
        assert response.status_code == 201, response.text
        return response.json()["did"], response.json()["claim_code"]

    def bind(self, did: str, claim: str, account: LocalAccount) -> httpx.Response:
        prepared = self.client.post(
            f"/api/v1/customers/{q(did)}/controller/prepare", json={"claim_code": claim, "address": account.address}
        )
        assert prepared.status_code == 200, prepared.text
        typed = prepared.json()["typed_data"]
        return self.client.post(
            f"/api/v1/customers/{q(did)}/controller",
            json={"claim_code": claim, "typed_data": typed, "signature": self.sign_typed(account, typed)},
        )

    def sign_in(self, account: LocalAccount) -> httpx.Response:
        challenge = self.client.post("/api/v1/auth/siwe/challenge", json={"address": account.address})
        assert challenge.status_code == 201, challenge.text
        return self.client.post("/api/v1/auth/siwe", json=siwe_signed(account, challenge.json()["message"]))

    def new_customer(self) -> Customer:
        account = Account.create()
        did, claim = self.enrol(f"user{len(self.customers)}.{account.address[2:10].lower()}@example.com")
        bound = self.bind(did, claim, account)
        assert bound.status_code == 200, bound.text
        signed_in = self.sign_in(account)
        assert signed_in.status_code == 200, signed_in.text
        customer = Customer(account=account, did=did, token=signed_in.json()["access_token"])
        self.customers.append(customer)
        return customer

    def prepare(self, customer: Customer, **body: Any) -> httpx.Response:
        body.setdefault("partner", "acme")
        body.setdefault("purpose", "marketing.communications.email")
        return self.client.post("/api/v1/consents/prepare", json=body, headers=customer.headers)

    def change(self, customer: Customer, **body: Any) -> httpx.Response:
        prepared = self.prepare(customer, **body)
        assert prepared.status_code == 200, prepared.text
        typed = prepared.json()["typed_data"]
        return self.client.post(
            "/api/v1/consents",
            json={"typed_data": typed, "signature": self.sign_typed(customer.account, typed)},
            headers=customer.headers,
        )

    def wait_status(self, customer: Customer, request_id: str, wanted: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            response = self.client.get(f"/api/v1/consents/{request_id}", headers=customer.headers)
            assert response.status_code == 200, response.text
            if response.json()["status"] == wanted:
                return dict(response.json())
            assert time.monotonic() < deadline, f"still {response.json()['status']}"
            time.sleep(0.05)


@dataclass
class Service(ApiClient):
    """A service run in this process (its runtime is at hand for tests that look inside)."""

    runtime: Runtime = field(kw_only=True)


def start_service(
    data_dir: Path, *, role: dict[str, Any] | None = None, service_port: int | None = None, **chain: Any
) -> tuple[Runtime, uvicorn.Server, threading.Thread, int]:
    """A runtime and uvicorn in this process; `role` holds Runtime fields for a supervisor or worker,
    and `service_port` the port the service says it has (its DIDs name it) if not the one it listens on."""
    # Bound before the runtime starts and handed to uvicorn: a port only picked could be taken meanwhile.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    try:
        service = ServiceSettings(data_dir=data_dir, port=service_port or port)
        chain_settings = ChainSettings(**{"backend": "anvil", "block_time": 0.05, "max_clock_lead": 3600, **chain})
        runtime = Runtime(
            service=service,
            chain=chain_settings,
            toolchain=ToolchainSettings(),
            secrets=load_secrets(service, chain_settings, IdentitySettings()),
            **(role or {}),
        )
        try:
            runtime.start()
        except BaseException:  # a refused start must not leave its node running
            runtime.stop()
            raise
    except BaseException:
        listener.close()
        raise
    server = uvicorn.Server(
        uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it started: see its log above"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return runtime, server, thread, port


def siwe_signed(account: LocalAccount, message: str) -> dict[str, str]:
    """The sign-in route's body: `message` signed with personal_sign."""
    signature = "0x" + bytes(account.sign_message(encode_defunct(text=message)).signature).hex()
    return {"message": message, "signature": signature}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("service")) as running:
        yield running


@contextlib.contextmanager
def running_service(
    data_dir: Path, *, chain: dict[str, Any] | None = None, again: ApiClient | None = None, **fields: Any
) -> Iterator[Service]:
    """A service in this process with an operator, a partner ("acme") and an auditor; stopped on exit.
    `chain` holds ChainSettings to set, `fields` Runtime fields; `again`, the service that ran in this
    data dir before (a restart: its principals are there already)."""
    runtime, server, thread, port = start_service(data_dir, role=fields or None, **(chain or {}))
    try:
        if again is None:
            partner = Account.create().address
            with runtime.sessions() as session:
                _, operator_key = create_principal(session, "crm-operator", "operator")
                _, partner_key = create_principal(session, "acme", "partner", partner)
                _, auditor_key = create_principal(session, "audit-firm", "auditor")
                session.add(Partner(address=partner, name="acme", on_chain=False))
            runtime.sync_partners()
        else:
            operator_key, partner_key, auditor_key = again.operator_key, again.partner_key, again.auditor_key
            partner = again.partner_address
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield Service(
                runtime=runtime,
                client=client,
                operator_key=operator_key,
                partner_key=partner_key,
                auditor_key=auditor_key,
                partner_address=partner,
            )
    finally:  # a failed test must not leave its node running (a context manager's body raises here)
        server.should_exit = True
        thread.join(timeout=10)
        runtime.stop()


def serve_workers(pid: int) -> list[int]:
    """The API worker processes of the `serve` process `pid`."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            children += [int(c) for c in (task / "children").read_text().split()]
    workers = []
    for child in children:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if "serve-worker" in Path(f"/proc/{child}/cmdline").read_text():
                workers.append(child)
    return sorted(workers)


def _listeners(port: int) -> int:
    """How many TCP sockets listen on local `port`."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            count += int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A"
    return count


@contextlib.contextmanager
def serving(data_dir: Path, port: int, *, workers: int = 2, **env: str) -> Iterator[subprocess.Popen[str]]:
    """`consent-ledger serve` in a process of its own, with `workers` API processes all listening (one: itself);
    stopped with Ctrl-C on exit (its output is then printed, for a failing test)."""
    process = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--data-dir", str(data_dir), "--workers", str(workers)],
        env=serve_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_healthy(port, process)
        deadline = time.monotonic() + 60
        while len(serve_workers(process.pid)) < (workers if workers > 1 else 0) or _listeners(port) < workers:
            assert time.monotonic() < deadline, "the API workers did not start"
            time.sleep(0.1)
        yield process
    finally:
        print(interrupt(process))
