"""CRM bridge and audit end to end on a real serve stack (anvil, uvicorn): consent-filtered release,
log-then-release, auditors' listing and verification, customers' view, and no PII anywhere."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eth_account import Account
from sqlalchemy import delete, select, update

from api.offline import Offline, export
from crm_bridge.bridge import DID_COLUMN, Export
from crm_bridge.mapping import Mapping
from crm_bridge.sources import read_source
from identity.normalize import normalize_email, normalize_name, normalize_phone
from ledger.access import AccessEntry, fetch_events
from ledger.eip712 import purpose_id
from ledger.settings import PROJECT_ROOT
from ledger.store import sessions
from scripts import generate_crm
from tests.api.conftest import Customer, Service, q

PURPOSE = "analytics.reporting"
PURCHASES, DEMOGRAPHIC, LOCATION = "user.behavior.purchase_history", "user.demographic", "user.location"
PURCHASE_COLUMNS = ["order_id", "order_ts", "amount", "products", "channel"]


@dataclass
class Crm:
    dir: Path
    people: list[dict[str, str]]  # customers.csv rows of the customers enrolled here
    customers: list[Customer]

    @property
    def orders(self) -> Path:
        return self.dir / "orders.csv"

    @property
    def mapping(self) -> Path:
        return self.dir / "mapping.toml"


def _enrol(service: Service, person: dict[str, str]) -> Customer:
    account = Account.create()
    response = service.client.post(
        "/api/v1/customers",
        json={"email": person["email"], "phone": person["phone"] or None, "name": person["full_name"]},
        headers=service.operator(),
    )
    assert response.status_code == 201, response.text
    did, claim = response.json()["did"], response.json()["claim_code"]
    assert service.bind(did, claim, account).status_code == 200
    signed_in = service.sign_in(account)
    assert signed_in.status_code == 200, signed_in.text
    return Customer(account=account, did=did, token=signed_in.json()["access_token"])


def _grant(service: Service, customer: Customer, attributes: list[str]) -> None:
    response = service.change(customer, action="grant", purpose=PURPOSE, attributes=attributes)
    assert response.status_code == 202, response.text
    service.wait_status(customer, response.json()["id"], "active")


@pytest.fixture(scope="module")
def crm(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Crm:
    directory = tmp_path_factory.mktemp("crm")
    generate_crm.write(directory, rows=1_500, seed=11)
    with (directory / "customers.csv").open(encoding="utf-8") as handle:
        people = [row for row in csv.DictReader(handle) if row["email"] and row["phone"]]
    # The customers with the most orders, so each appears in several chunks of the export.
    with (directory / "orders.csv").open(encoding="utf-8") as handle:
        counts: dict[str, int] = {}
        for row in csv.DictReader(handle):
            counts[row["customer_id"]] = counts.get(row["customer_id"], 0) + 1
    people = sorted(people, key=lambda p: -counts.get(p["customer_id"], 0))[:6]
    customers = [_enrol(service, person) for person in people]
    _grant(service, customers[0], [PURCHASES, DEMOGRAPHIC])
    _grant(service, customers[1], [PURCHASES, DEMOGRAPHIC, LOCATION])
    _grant(service, customers[2], [PURCHASES])
    _grant(service, customers[3], [PURCHASES])
    # customers[4] consents to nothing; customers[5] only to another purpose.
    response = service.change(customers[5], action="grant", purpose="personalize.content", attributes=[PURCHASES])
    service.wait_status(customers[5], response.json()["id"], "active")
    return Crm(directory, people, customers)


def _offline(service: Service) -> Offline:
    return Offline.open(service=service.runtime.service, chain=service.runtime.chain)  # its node, not the default


def _export(service: Service, crm: Crm, out: Path, **kwargs: Any) -> tuple[pa.Table, Any]:
    offline = _offline(service)
    try:
        stats = export(offline, str(crm.orders), crm.mapping, "acme", PURPOSE, out, **kwargs)
    finally:
        offline.close()
    return pq.read_table(out), stats


def _orders_of(crm: Crm, person: dict[str, str]) -> int:
    with crm.orders.open(encoding="utf-8") as handle:
        return sum(row["customer_id"] == person["customer_id"] for row in csv.DictReader(handle))


def _wait_indexed(service: Service) -> int:
    """Wait until the read model holds every entry the contract counts; returns that count."""
    deadline = time.monotonic() + 30
    assert service.runtime.ledger.access_reader is not None
    assert service.runtime.ledger.access_log is not None
    count = service.runtime.ledger.access_log.count()
    while len(service.runtime.ledger.access_reader.entries(limit=100_000)) < count:
        assert time.monotonic() < deadline, "the indexer did not catch up"
        service.runtime._writers().indexer.wake.set()
        time.sleep(0.05)
    return count


def test_export_releases_only_permitted_rows_and_columns(service: Service, crm: Crm, tmp_path: Path) -> None:
    table, stats = _export(service, crm, tmp_path / "released.parquet")
    dids = [c.did for c in crm.customers]
    released = set(table.column(DID_COLUMN).to_pylist())
    assert released == set(dids[:4])  # granted for this purpose; not 4 (nothing) nor 5 (another purpose)
    assert table.column_names == [DID_COLUMN, *Mapping.load(crm.mapping).columns]
    rows = table.to_pylist()
    for k in range(4):
        mine = [r for r in rows if r[DID_COLUMN] == dids[k]]
        assert len(mine) == _orders_of(crm, crm.people[k])  # every order of a consenting customer
        assert all(r["order_id"] is not None and r["amount"] is not None for r in mine)
        demographics = {(r["age_band"], r["gender"]) for r in mine}
        assert (demographics == {(crm.people[k]["age_band"], crm.people[k]["gender"])}) == (k in (0, 1))
        assert (demographics == {(None, None)}) == (k in (2, 3))
        assert ({r["region"] for r in mine} == {crm.people[k]["region"]}) == (k == 1)
    assert stats.rows_released == len(rows)
    assert stats.subjects_released == 4
    assert stats.entries_recorded == 4
    assert stats.entries_refused == 0
    assert stats.rows_read == 1_500
    # Each released customer has a permitted on-chain entry of this request, mined before release.
    runtime = service.runtime
    w3 = runtime.ledger.backend.w3
    events = list(fetch_events(w3, runtime.ledger.access_log.address, 0, w3.eth.block_number))
    mine = [e for e in events if "0x" + e.request_id.hex() == stats.request_id]
    assert {service.runtime.dids.did(e.subject) for e in mine if e.permitted} == set(dids[:4])
    assert {e.tx_hash for e in mine} == set(stats.transactions)


def test_a_revocation_excludes_the_customer_from_the_very_next_export(
    service: Service, crm: Crm, tmp_path: Path
) -> None:
    customer = crm.customers[3]
    response = service.change(customer, action="revoke", purpose=PURPOSE, attributes=[PURCHASES])
    assert response.status_code == 202, response.text  # accepted: not waiting for the chain
    table, stats = _export(service, crm, tmp_path / "after-revoke.parquet")
    assert customer.did not in set(table.column(DID_COLUMN).to_pylist())
    assert set(table.column(DID_COLUMN).to_pylist()) == {c.did for c in crm.customers[:3]}
    assert stats.entries_recorded == 3


def test_an_access_the_chain_refuses_is_never_released(service: Service, crm: Crm, tmp_path: Path) -> None:
    """A read model that says yes where the chain says no (stale, or tampered with) releases nothing of
    that customer: the contract's own check decides."""
    offline = _offline(service)
    try:
        mapping = Mapping.load(crm.mapping)
        stale: dict[bytes, int] = {service.runtime.dids.subject(c.did): 0b1111_1111 for c in crm.customers}
        run = Export(
            offline.bridge(),
            read_source(crm.orders, text_columns=("email", "phone")),
            mapping,
            partner=service.partner_address,
            purpose=bytes(purpose_id(PURPOSE)),
            purpose_key=PURPOSE,
            attribute_bits=offline.attribute_bits(),
            permissions=stale,
        )
        table = run.to_table()
    finally:
        offline.close()
    # 0 and 1 granted purchases and demographics but the export asks for location too for everyone;
    # the registry permits an entry only for all of its bits, so only customer 1 (who granted all three) passes.
    assert set(table.column(DID_COLUMN).to_pylist()) == {crm.customers[1].did}
    assert run.stats.entries_refused == 5
    assert run.stats.rows_refused_on_chain > 0
    # The refused attempts are on-chain for auditors.
    _wait_indexed(service)
    response = service.client.get(
        "/api/v1/audit/accesses",
        params={"permitted": "false", "did": crm.customers[4].did},
        headers={"X-API-Key": service.auditor_key},
    )
    assert response.status_code == 200, response.text
    assert [e["request_id"] for e in response.json()["entries"]] == [run.stats.request_id]


def test_auditors_list_and_export_customers_see_their_own(service: Service, crm: Crm, tmp_path: Path) -> None:
    _table, stats = _export(service, crm, tmp_path / "listing.parquet")
    chain_count = _wait_indexed(service)
    auditor = {"X-API-Key": service.auditor_key}
    everything = service.client.get("/api/v1/audit/accesses", headers=auditor).json()["entries"]
    assert len(everything) == chain_count
    assert [e["index"] for e in everything] == list(range(chain_count))
    filtered = service.client.get(
        "/api/v1/audit/accesses",
        params={"partner": "acme", "purpose": PURPOSE, "did": crm.customers[0].did, "permitted": "true"},
        headers=auditor,
    ).json()["entries"]
    assert filtered
    assert {(e["did"], e["partner_name"], e["purpose"], e["permitted"]) for e in filtered} == {
        (crm.customers[0].did, "acme", PURPOSE, True)
    }
    assert stats.request_id in {e["request_id"] for e in filtered}
    assert set(filtered[-1]["attributes"]) == {PURCHASES, DEMOGRAPHIC}
    assert filtered[-1]["tx_hash"] in stats.transactions
    # A time window after the last entry holds nothing; one around it holds it.
    last = everything[-1]["block_time"]
    late = service.client.get("/api/v1/audit/accesses", params={"from": _iso(last + 1)}, headers=auditor).json()[
        "entries"
    ]
    assert late == []
    window = service.client.get(
        "/api/v1/audit/accesses", params={"from": _iso(last), "to": _iso(last + 1)}, headers=auditor
    ).json()["entries"]
    assert everything[-1] in window
    # Paging.
    page = service.client.get("/api/v1/audit/accesses", params={"limit": 2}, headers=auditor).json()
    assert [e["index"] for e in page["entries"]] == [0, 1]
    assert page["next_after"] == 1
    # CSV.
    exported = service.client.get("/api/v1/audit/accesses", params={"format": "csv"}, headers=auditor)
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(exported.text)))
    assert [int(line["index"]) for line in lines] == list(range(chain_count))
    assert {line["did"] for line in lines} == {e["did"] for e in everything}
    # Bad filters are clear errors.
    unknown = service.client.get("/api/v1/audit/accesses", params={"partner": "nobody"}, headers=auditor)
    assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_partner")
    backwards = service.client.get(
        "/api/v1/audit/accesses", params={"from": _iso(last), "to": _iso(last - 10)}, headers=auditor
    )
    assert (backwards.status_code, backwards.json()["code"]) == (422, "invalid_period")
    # A customer sees who accessed their data; not another customer's.
    a, b = crm.customers[0], crm.customers[1]
    own = service.client.get(f"/api/v1/customers/{q(a.did)}/accesses", headers=a.headers)
    assert own.status_code == 200
    assert own.json()["entries"]
    assert {e["did"] for e in own.json()["entries"]} == {a.did}
    other = service.client.get(f"/api/v1/customers/{q(b.did)}/accesses", headers=a.headers)
    assert (other.status_code, other.json()["code"]) == (403, "not_your_data")


def _iso(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def test_verify_finds_a_tampered_or_missing_read_model_row(service: Service, crm: Crm, tmp_path: Path) -> None:
    _export(service, crm, tmp_path / "verify.parquet")
    runtime = service.runtime
    _wait_indexed(service)
    auditor = {"X-API-Key": service.auditor_key}
    fine = service.client.post("/api/v1/audit/verify", headers=auditor)
    assert fine.status_code == 200, fine.text
    assert fine.json()["ok"] is True
    assert fine.json()["chain_head"] == fine.json()["recomputed_head"]
    assert fine.json()["divergence"] is None
    assert fine.json()["read_model_count"] == fine.json()["chain_count"] > 0

    db = sessions(runtime.engine)
    with db.begin() as session:
        row = session.scalars(select(AccessEntry).where(AccessEntry.index == 2)).one()
        original = row.attributes
        row.attributes = str(int(original) | 1)  # someone widens what was accessed
    tampered = service.client.post("/api/v1/audit/verify", headers=auditor).json()
    assert tampered["ok"] is False
    assert tampered["divergence"] == {
        "index": 2,
        "code": "field_mismatch",
        "detail": "attributes differs from the chain",
    }
    with db.begin() as session:
        session.execute(update(AccessEntry).where(AccessEntry.index == 2).values(attributes=original))
        gone = session.scalars(select(AccessEntry).where(AccessEntry.index == 1)).one()
        kept = {c.key: getattr(gone, c.key) for c in AccessEntry.__table__.columns}
        session.delete(gone)
    dropped = service.client.post("/api/v1/audit/verify", headers=auditor).json()
    assert dropped["divergence"]["index"] == 1
    assert dropped["divergence"]["code"] == "missing_in_read_model"
    with db.begin() as session:
        session.add(AccessEntry(**kept))
    assert service.client.post("/api/v1/audit/verify", headers=auditor).json()["ok"] is True
    # An entry the chain never had.
    forged = {**kept, "index": 10_000}
    with db.begin() as session:
        session.add(AccessEntry(**forged))
    extra = service.client.post("/api/v1/audit/verify", headers=auditor).json()["divergence"]
    assert (extra["index"], extra["code"]) == (10_000, "extra_in_read_model")
    with db.begin() as session:
        session.execute(delete(AccessEntry).where(AccessEntry.index == 10_000))
    assert service.client.post("/api/v1/audit/verify", headers=auditor).json()["ok"] is True


def test_the_command_line_exports_from_csv_and_from_a_database_and_verifies(
    service: Service, crm: Crm, tmp_path: Path
) -> None:
    generate_crm.write(tmp_path / "db", rows=300, seed=11, sqlite=True)  # the same seed: the same first people
    env = {
        **os.environ,
        "CONSENT_LEDGER_DATA_DIR": str(service.runtime.service.data_dir),
        "CONSENT_LEDGER_PORT": str(service.runtime.service.port),
        "CONSENT_LEDGER_CHAIN_BACKEND": service.runtime.chain.backend,  # the node this service runs
    }
    command = [sys.executable, "-m", "api.cli"]
    exported: dict[str, Any] = {}
    for name, source in (
        ("csv", ["--input", str(crm.orders)]),
        ("db", ["--input", f"sqlite:///{tmp_path / 'db' / 'crm.db'}", "--table", "orders"]),
    ):
        out = tmp_path / f"{name}.parquet"
        done = subprocess.run(
            [*command, "bridge", "export", *source, "--mapping", str(crm.mapping), "--partner", "acme",
             "--purpose", PURPOSE, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=120, check=False, cwd=PROJECT_ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        stats = exported[name] = json.loads(done.stdout)
        table = pq.read_table(out)
        assert stats["rows_released"] == table.num_rows > 0
        assert set(table.column(DID_COLUMN).to_pylist()) <= {c.did for c in crm.customers[:4]}  # those who granted
    # Analytics takes the released file as it is: the release says what it may be used for.
    analysed = subprocess.run(
        [*command, "analytics", "report", "--input", str(tmp_path / "csv.parquet"), "--out", str(tmp_path / "report"),
         "--k", "2"],
        env=env, capture_output=True, text=True, timeout=300, check=False, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert analysed.returncode == 0, analysed.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    released = pq.read_table(tmp_path / "csv.parquet")
    assert report["release"]["request_id"] == exported["csv"]["request_id"]
    assert report["release"]["purpose"] == PURPOSE
    assert report["rfm"]["customers"] == len(set(released.column(DID_COLUMN).to_pylist()))
    # Four customers at k = 2: every chart's rows are withheld (complementary suppression), and each
    # chart is then a sentence saying so rather than an empty plot.
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("<svg") + html.count("no chart, as every one of its rows") >= 2
    verified = subprocess.run(
        [*command, "audit", "verify"], env=env, capture_output=True, text=True, timeout=120, check=False,
        cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    listed = subprocess.run(
        [*command, "audit", "accesses", "--did", crm.customers[0].did, "--partner", "acme", "--format", "csv"],
        env=env, capture_output=True, text=True, timeout=120, check=False, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    lines = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert lines
    assert {line["did"] for line in lines} == {crm.customers[0].did}
    assert {line["partner_name"] for line in lines} == {"acme"}
    as_json = subprocess.run(
        [*command, "audit", "accesses", "--purpose", PURPOSE, "--from", "2000-01-01T00:00:00+00:00"],
        env=env, capture_output=True, text=True, timeout=120, check=False, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    assert len(json.loads(as_json.stdout)) >= len(lines)
    bad = subprocess.run(
        [*command, "bridge", "export", "--input", str(tmp_path / "missing.csv"), "--mapping", str(crm.mapping),
         "--partner", "acme", "--purpose", PURPOSE, "--out", str(tmp_path / "x.parquet")],
        env=env, capture_output=True, text=True, timeout=120, check=False, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "no such input file" in bad.stderr


def _pii_needles(people: list[dict[str, str]]) -> set[bytes]:
    needles: set[bytes] = set()
    for person in people:
        values = {person["email"].strip(), normalize_email(person["email"]), person["full_name"]}
        values |= {normalize_name(person["full_name"]), person["phone"], normalize_phone(person["phone"], "GB")}
        values |= {person["phone"].replace(" ", "")}
        for value in list(values):
            values |= {value.lower(), value.upper()}
        for value in values:
            for encoded in (value.encode("utf-8"), value.encode("utf-16-le"), value.encode("utf-16-be")):
                needles |= {encoded, encoded.hex().encode(), encoded.hex().upper().encode()}
    return needles


def test_no_pii_in_any_released_table_nor_anywhere_on_chain(service: Service, crm: Crm, tmp_path: Path) -> None:
    table, _stats = _export(service, crm, tmp_path / "scan.parquet")
    needles = _pii_needles(crm.people)
    assert [n for n in needles if n in crm.orders.read_bytes()]  # the needles do find PII where it is
    assert table.num_rows > 0
    released = (tmp_path / "scan.parquet").read_bytes() + json.dumps(table.to_pylist(), default=str).encode()
    assert not [n for n in needles if n in released]
    runtime = service.runtime
    backend = runtime.ledger.backend
    assert backend is not None
    w3 = backend.w3
    head = w3.eth.block_number
    calldata = b"".join(
        bytes(cast(dict[str, Any], tx)["input"])
        for number in range(head + 1)
        for tx in w3.eth.get_block(number, full_transactions=True)["transactions"]
    )
    logs = w3.eth.get_logs({"fromBlock": 0, "toBlock": head})
    log_bytes = b"".join(bytes(log["data"]) + b"".join(bytes(t) for t in log["topics"]) for log in logs)
    # Every account's code and storage, as the node itself dumps it (gzipped JSON, hex-encoded).
    state = gzip.decompress(bytes.fromhex(backend.rpc("anvil_dumpState").removeprefix("0x")))
    assert len(calldata) > 10_000  # the scan did see the run's transactions
    assert len(logs) > 20
    for where, blob in (("calldata", calldata), ("logs", log_bytes), ("storage", state)):
        found = [n for n in needles if n in blob or n in blob.lower()]
        assert not found, f"PII found in {where}"


def test_an_erased_customer_is_released_no_more(service: Service, crm: Crm, tmp_path: Path) -> None:
    """Their consent stays on-chain (pseudonymous), but the company no longer uses their data."""
    erased = crm.customers[2]
    before, _ = _export(service, crm, tmp_path / "before-erasure.parquet")
    assert erased.did in set(before.column(DID_COLUMN).to_pylist())
    answer = service.client.delete(f"/api/v1/customers/{q(erased.did)}", headers=service.operator())
    assert answer.status_code == 200, answer.text
    after, stats = _export(service, crm, tmp_path / "after-erasure.parquet")
    assert set(after.column(DID_COLUMN).to_pylist()) == set(before.column(DID_COLUMN).to_pylist()) - {erased.did}
    assert stats.subjects_released == len(set(after.column(DID_COLUMN).to_pylist()))
