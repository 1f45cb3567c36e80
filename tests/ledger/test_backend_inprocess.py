"""The conformance suite on the in-process chain (eth-tester with py-evm)."""

from __future__ import annotations

from collections.abc import Iterator

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
