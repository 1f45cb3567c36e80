"""The DIDs of a data dir are the same whichever process computes them (`api.did_host`): the service
records their host at its first start, and its workers and the tools beside it use the recorded one,
not what their own port setting would give."""

from __future__ import annotations

import csv
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from eth_account import Account

from crm_bridge.bridge import DID_COLUMN
from ledger.anvil import free_port
from ledger.settings import PROJECT_ROOT
from scripts import generate_crm
from tests.api.conftest import CLI, ApiClient, Customer, q, serve_env, serving

pytestmark = pytest.mark.anvil

PURPOSE, PURCHASES = "analytics.reporting", "user.behavior.purchase_history"


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=serve_env(**env), capture_output=True, text=True, timeout=180, check=False, cwd=PROJECT_ROOT
    )


def _principal(data_dir: Path, role: str, name: str) -> str:
    added = _cli("principals", "add", "--role", role, "--name", name, "--data-dir", str(data_dir))
    found = re.search(r"api key: (\S+)", added.stdout)
    assert found is not None, added.stdout + added.stderr
    return found.group(1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dids")


@pytest.fixture(scope="module")
def crm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("crm")
    generate_crm.write(directory, rows=200, seed=5)
    return directory


@pytest.fixture(scope="module")
def served(data_dir: Path) -> Iterator[tuple[ApiClient, int]]:
    """`serve --port P` with P not the default 8000, an operator and a partner ("acme")."""
    operator, partner = _principal(data_dir, "operator", "crm-operator"), _principal(data_dir, "partner", "acme")
    port = free_port()
    assert port != 8000
    with (
        serving(data_dir, port, workers=2),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
    ):
        yield ApiClient(client, operator, partner, "", ""), port


def test_bridge_export_beside_serve_releases_the_services_dids(
    served: tuple[ApiClient, int], data_dir: Path, crm: Path, tmp_path: Path
) -> None:
    api, port = served
    with (crm / "customers.csv").open(encoding="utf-8") as handle:
        people = [row for row in csv.DictReader(handle) if row["email"]][:3]
    customers = []
    for person in people:
        account = Account.create()
        did, claim = api.enrol(person["email"])
        assert did.startswith(f"did:web:127.0.0.1%3A{port}:dids:")
        assert api.bind(did, claim, account).status_code == 200
        customer = Customer(account=account, did=did, token=api.sign_in(account).json()["access_token"])
        granted = api.change(customer, action="grant", purpose=PURPOSE, attributes=[PURCHASES])
        assert granted.status_code == 202, granted.text
        api.wait_status(customer, granted.json()["id"], "active")
        customers.append(customer)

    out = tmp_path / "released.parquet"
    # Beside it, with nothing but its data dir: no CONSENT_LEDGER_PORT (which would say 8000).
    exported = _cli(
        "bridge", "export", "--input", str(crm / "orders.csv"), "--mapping", str(crm / "mapping.toml"),
        "--partner", "acme", "--purpose", PURPOSE, "--out", str(out), "--data-dir", str(data_dir),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    released = set(pq.read_table(out).column(DID_COLUMN).to_pylist())
    assert released == {c.did for c in customers}

    # The audit listing names them the same way, and a customer's own view of the accesses matches it.
    listed = _cli("audit", "accesses", "--purpose", PURPOSE, "--format", "csv", "--data-dir", str(data_dir))
    assert listed.returncode == 0, listed.stderr
    assert {row["did"] for row in csv.DictReader(listed.stdout.splitlines())} == released
    own = api.client.get(f"/api/v1/customers/{q(customers[0].did)}/accesses", headers=customers[0].headers)
    assert own.status_code == 200, own.text
    assert own.json()

    # A tool told of another host is refused rather than releasing DIDs that join with nothing.
    refused = _cli(
        "audit", "accesses", "--data-dir", str(data_dir), CONSENT_LEDGER_IDENTITY_DID_WEB_HOST="ledger.example.com"
    )
    assert refused.returncode == 2
    assert f"the DIDs of this data dir name 127.0.0.1%3A{port}" in refused.stderr
    agreeing = _cli(
        "audit", "accesses", "--data-dir", str(data_dir), CONSENT_LEDGER_IDENTITY_DID_WEB_HOST=f"127.0.0.1%3A{port}"
    )
    assert agreeing.returncode == 0, agreeing.stderr


def test_a_restart_on_another_port_keeps_the_dids_and_another_host_is_refused(tmp_path: Path) -> None:
    operator = {"X-API-Key": _principal(tmp_path, "operator", "crm-operator")}
    dids = []
    for _ in range(2):
        port = free_port()
        with serving(tmp_path, port, workers=1), httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            enrolled = client.post("/api/v1/customers", json={"email": "moved@example.com"}, headers=operator)
            assert enrolled.status_code == 201, enrolled.text
            dids.append(enrolled.json()["did"])
    assert dids[1] == dids[0]  # the first start's port, as the DIDs handed out then
    started = _cli(
        "serve", "--port", str(free_port()), "--data-dir", str(tmp_path),
        CONSENT_LEDGER_IDENTITY_DID_WEB_HOST="ledger.example.com",
    )  # fmt: skip
    assert started.returncode == 2
    assert f"the DIDs of this data dir name {dids[0].split(':')[2]}" in started.stderr
