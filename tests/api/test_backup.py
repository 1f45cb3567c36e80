"""`consent-ledger backup`: taken while the service runs, the copy starts as a data dir holding
everything accepted before it (real anvil node, real SQLite files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from api.backup import backup
from api.cli import main
from ledger.anvil import Checkpoints, NotDurable
from ledger.eip712 import purpose_id
from tests.api.conftest import q, running_service, start_service

PURPOSE = "marketing.communications.email"


def test_a_backup_taken_while_serving_starts_as_a_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, copy = tmp_path / "data", tmp_path / "backup"
    monkeypatch.setenv("CONSENT_LEDGER_CHAIN_BACKEND", "anvil")  # the node start_service runs (the CLI reads it)
    with running_service(data) as service:
        runtime = service.runtime
        customer = service.new_customer()
        before = service.change(customer, action="grant", attributes=["user.contact.email"])
        granted = service.wait_status(customer, before.json()["id"], "active")
        subject = runtime.dids.subject(customer.did)
        pii = runtime.vault.pii(subject)
        port = runtime.service.port  # the DIDs name it

        assert main(["backup", str(copy), "--data-dir", str(data)]) == 0
        manifest = json.loads(capsys.readouterr().out)
        assert {"service.db", "identity.db", "chain/state.json", "deployment.json"} <= set(manifest["copied"])
        assert manifest["chain_block"] >= granted["block_number"]
        assert json.loads((copy / "backup.json").read_text()) == manifest

        after = service.change(customer, action="grant", attributes=["user.name"])  # not in the backup
        service.wait_status(customer, after.json()["id"], "active")

        assert main(["backup", str(copy), "--data-dir", str(data)]) == 2  # never over another backup
        assert "is not empty" in capsys.readouterr().err

        # One that fails part way (no dump comes in time) leaves nothing that looks like a backup.
        def no_dump(self: Checkpoints, block: int, *, timeout: float = 0.0, poll: float = 0.0) -> None:
            raise NotDurable(f"no checkpoint of the managed node holds block {block} after {timeout:g}s")

        failed = tmp_path / "failed"
        with monkeypatch.context() as patch:
            patch.setattr(Checkpoints, "wait", no_dump)
            with pytest.raises(NotDurable):
                backup(runtime.service, runtime.chain, runtime.identity, failed)
        assert not failed.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["backup", "data"]

    restored = tmp_path / "restored"
    shutil.copytree(copy, restored)
    runtime, server, thread, served_at = start_service(restored, service_port=port)
    try:
        assert runtime.vault.pii(subject) == pii  # the vault, readable with the copied key
        with httpx.Client(base_url=f"http://127.0.0.1:{served_at}", timeout=30) as client:
            listing = client.get(f"/api/v1/customers/{q(customer.did)}/consents", headers=customer.headers)
            assert listing.status_code == 200, listing.text  # the customer's session came along too
            (consent,) = listing.json()
            assert consent["attributes"] == ["user.contact.email"]  # the grant before; not the one after
            assert consent["status"] == "active"
        partner = service.partner_address
        assert runtime.ledger.consent.is_permitted(subject, partner, purpose_id(PURPOSE), 1)  # type: ignore[arg-type]
        assert not runtime.ledger.consent.is_permitted(subject, partner, purpose_id(PURPOSE), 4)  # type: ignore[arg-type]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        runtime.stop()


@pytest.mark.geth
def test_a_backup_of_the_geth_chain_taken_while_serving_starts_as_a_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default node: its blocks read from the running node, imported (executed again) at the
    restored data dir's first start; the same chain, block for block, with the grant made before."""
    data, copy = tmp_path / "data", tmp_path / "backup"
    with running_service(data, chain={"backend": "geth"}) as service:
        runtime = service.runtime
        customer = service.new_customer()
        before = service.change(customer, action="grant", attributes=["user.contact.email"])
        granted = service.wait_status(customer, before.json()["id"], "active")
        subject = runtime.dids.subject(customer.did)
        port = runtime.service.port
        assert main(["backup", str(copy), "--data-dir", str(data)]) == 0
        manifest = json.loads(capsys.readouterr().out)
        assert {"chain/genesis.json", "chain/blocks.rlp", "service.db", "deployment.json"} <= set(manifest["copied"])
        assert manifest["chain_block"] >= granted["block_number"]
        w3 = runtime.ledger.backend.w3
        hashes = {n: bytes(w3.eth.get_block(n)["hash"]) for n in range(manifest["chain_block"] + 1)}
        after = service.change(customer, action="grant", attributes=["user.name"])  # not in the backup
        service.wait_status(customer, after.json()["id"], "active")

    restored = tmp_path / "restored"
    shutil.copytree(copy, restored)
    runtime, server, thread, _ = start_service(restored, service_port=port, backend="geth")
    try:
        w3 = runtime.ledger.backend.w3
        assert {n: bytes(w3.eth.get_block(n)["hash"]) for n in hashes} == hashes  # the same chain
        assert (restored / "chain" / "blocks.rlp.imported").is_file()
        partner = service.partner_address
        assert runtime.ledger.consent.is_permitted(subject, partner, purpose_id(PURPOSE), 1)  # type: ignore[arg-type]
        assert not runtime.ledger.consent.is_permitted(subject, partner, purpose_id(PURPOSE), 4)  # type: ignore[arg-type]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        runtime.stop()
