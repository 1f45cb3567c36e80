"""The conformance suite on the in-process chain (eth-tester with py-evm)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.backends import ChainBackend, InProcessBackend
from ledger.settings import ChainSettings
from tests.ledger.access_conformance import AccessLogConformance
from tests.ledger.conformance import ChainConformance
from tests.ledger.conftest import Accounts
from tests.ledger.loyalty_conformance import LoyaltyConformance


class TestInProcess(ChainConformance, LoyaltyConformance, AccessLogConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, accounts: Accounts) -> Iterator[ChainBackend]:
        with InProcessBackend(ChainSettings(backend="inprocess"), accounts.operator) as backend:
            yield backend


def test_a_tool_is_told_in_words_where_the_chain_is_or_why_it_cannot_reach_it(tmp_path: Path) -> None:
    from ledger.backends import node_url
    from ledger.errors import ChainError, NodeNotRunning

    for backend in ("geth", "anvil"):
        with pytest.raises(NodeNotRunning, match="start `consent-ledger serve` first"):
            node_url(ChainSettings(backend=backend), tmp_path)
    with pytest.raises(ChainError, match="lives inside `serve` only"):
        node_url(ChainSettings(backend="inprocess"), tmp_path)
    with pytest.raises(ChainError, match="CONSENT_LEDGER_CHAIN_RPC_URL is not set"):
        node_url(ChainSettings(backend="rpc"), tmp_path)
    assert node_url(ChainSettings(backend="rpc", rpc_url="http://node:8545"), tmp_path) == "http://node:8545"


def test_only_a_chain_that_can_lose_mined_blocks_makes_its_readers_wait(tmp_path: Path) -> None:
    from ledger.anvil import Checkpoints
    from ledger.backends import durable_wait

    assert durable_wait(ChainSettings(backend="geth"), tmp_path) is None  # each block on its disk when made
    assert durable_wait(ChainSettings(backend="rpc", rpc_url="http://node:8545"), tmp_path) is None
    wait = durable_wait(ChainSettings(backend="anvil"), tmp_path)  # its chain is in memory
    assert wait is not None
    Checkpoints(tmp_path / "chain").mark_durable(5)
    wait(5)  # held by a checkpoint: returns at once
