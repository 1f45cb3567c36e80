"""The conformance suite on a real anvil node managed by our code, plus what only it can do."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.backends import AnvilBackend, ChainBackend
from ledger.contracts import ensure_deployed
from ledger.settings import ChainSettings
from ledger.tx import TxSender
from tests.ledger.access_conformance import AccessLogConformance
from tests.ledger.conformance import EMAIL, ChainConformance
from tests.ledger.conftest import Accounts, make_ledger, registry_plan
from tests.ledger.loyalty_conformance import LoyaltyConformance


def anvil_settings(**overrides: object) -> ChainSettings:
    return ChainSettings(backend="anvil", block_time=0.05, **overrides)  # type: ignore[arg-type]


@pytest.mark.anvil
class TestAnvil(ChainConformance, LoyaltyConformance, AccessLogConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, accounts: Accounts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChainBackend]:
        with AnvilBackend(anvil_settings(), accounts.operator, tmp_path_factory.mktemp("anvil")) as backend:
            yield backend


@pytest.mark.anvil
def test_restart_keeps_blocks_logs_and_deployment(tmp_path: Path, artifacts: dict[str, object]) -> None:
    accounts = Accounts()
    backend = AnvilBackend(anvil_settings(), accounts.operator, tmp_path)
    backend.start()
    try:
        ledger = make_ledger(backend, artifacts, accounts)  # type: ignore[arg-type]
        deployment = ledger.deployment
        record = tmp_path / "deployment.json"
        deployment.save(record)
        receipt = ledger.registry.apply(ledger.grant(EMAIL))
        head = backend.w3.eth.block_number
    finally:
        backend.stop()
    assert not backend.node.running
    assert (tmp_path / "chain" / "state.json").is_file()

    backend.start()
    try:
        assert backend.w3.eth.block_number >= head
        for account in (accounts.admin, accounts.operator, accounts.stranger):
            accounts.senders[account.address] = TxSender(backend.w3, account)
        again = ensure_deployed(
            backend.w3,
            accounts.senders[accounts.operator.address],
            ledger.artifacts,
            registry_plan(accounts),
            record,
        )
        assert again.contracts == deployment.contracts  # reused, not redeployed
        assert ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)
        logs = backend.w3.eth.get_logs(
            {
                "address": deployment.address("ConsentRegistry"),
                "fromBlock": deployment.deploy_block,
                "toBlock": "latest",
            }
        )
        assert receipt.tx_hash in {"0x" + bytes(log["transactionHash"]).hex() for log in logs}
        # The node keeps mining (interval mining, not automine): blocks appear with no transactions.
        start = backend.w3.eth.block_number
        time.sleep(0.5)
        assert backend.w3.eth.block_number > start
    finally:
        backend.stop()


@pytest.mark.anvil
def test_a_loopback_node_is_reached_whatever_the_proxy_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node on this machine is called directly even where a proxy is set for the outside world:
    requests, left to the environment, sends loopback calls to the proxy too unless NO_PROXY names
    the host."""
    import requests
    from web3 import HTTPProvider, Web3

    from ledger.backends import http_provider

    backend = AnvilBackend(anvil_settings(), Accounts().operator, tmp_path)
    backend.start()
    try:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert Web3(http_provider(backend.url)).eth.block_number >= 0
        by_environment = Web3(HTTPProvider(backend.url, exception_retry_configuration=None))
        with pytest.raises(requests.exceptions.ProxyError):  # the call went to the proxy
            by_environment.eth.block_number  # noqa: B018
    finally:
        backend.stop()
