"""The whole service over HTTP on the `rpc` backend, against a chain that behaves as Hyperledger Besu
(QBFT) documents: anvil behind `tests/ledger/besu_proxy.py` (eth_getLogs over 5,000 blocks and
batches over 1,024 calls refused, no revert reasons in receipts, a 97-byte PoA `extraData`, a base fee
of 0 with eth_gasPrice saying 1,000 wei). The service's keys, made in its data dir, hold no ether."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from eth_account import Account
from web3.types import RPCEndpoint

from ledger.backends import AnvilBackend, http_provider
from ledger.settings import ChainSettings
from tests.api.conftest import q, running_service
from tests.ledger.besu_proxy import MAX_LOGS_RANGE, BesuProxy

pytestmark = [pytest.mark.anvil, pytest.mark.slow]


def test_the_service_keeps_consent_on_a_besu_network(tmp_path: Path) -> None:
    (tmp_path / "node").mkdir()
    (tmp_path / "service").mkdir()
    node = AnvilBackend(
        ChainSettings(backend="anvil", block_time=0.05, state_interval=3600), Account.create(), tmp_path / "node"
    )
    node.start()
    try:
        with (
            BesuProxy(node.url) as proxy,
            running_service(
                tmp_path / "service", chain={"backend": "rpc", "rpc_url": proxy.url, "confirmations": 0}
            ) as service,
        ):
            early = service.new_customer()
            granted = service.change(early, action="grant", attributes=["user.contact.email"])
            service.wait_status(early, granted.json()["id"], "active")
            # More blocks than one eth_getLogs may span, between that customer's changes and the next.
            http_provider(node.url, 300).make_request(RPCEndpoint("anvil_mine"), [hex(MAX_LOGS_RANGE + 100)])

            customer = service.new_customer()
            accepted = service.change(customer, action="grant", attributes=["user.contact.email", "user.name"])
            assert accepted.status_code == 202, accepted.text
            done = service.wait_status(customer, accepted.json()["id"], "active")
            revoked = service.change(customer, action="revoke", attributes=["user.name"])
            service.wait_status(customer, revoked.json()["id"], "revoked")
            again = service.change(early, action="revoke", attributes=["user.contact.email"])
            service.wait_status(early, again.json()["id"], "revoked")

            listing = service.client.get(f"/api/v1/customers/{q(customer.did)}/consents", headers=customer.headers)
            assert [(c["status"], c["attributes"]) for c in listing.json()] == [("active", ["user.contact.email"])]
            verified = service.client.post("/api/v1/audit/verify", headers={"X-API-Key": service.auditor_key})
            assert verified.status_code == 200, verified.text
            assert verified.json()["ok"] is True

            ledger = service.runtime.ledger
            rpc = ledger.backend.rpc
            assert rpc("eth_getTransactionByHash", done["tx_hash"])["gasPrice"] == "0x0"
            for key in (ledger.consent.sender.account, ledger.access_log.sender.account):
                assert rpc("eth_getBalance", key.address, "latest") == "0x0"
            assert proxy.refused == Counter()  # nothing asked that Besu refuses
            assert max(proxy.log_ranges) == MAX_LOGS_RANGE  # the indexer crossed the blocks in Besu's ranges
    finally:
        node.stop()
