"""Fixtures for the ledger tests: a fresh ConsentRegistry per test on the class's chain backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak
from sqlalchemy import Engine

from ledger import eip712
from ledger.access import AccessLogClient
from ledger.backends import ChainBackend
from ledger.compiler import Artifact, compile_contracts
from ledger.consent import ConsentRegistryClient, SignedChange
from ledger.contracts import Deployment, RevertDecoder, ensure_deployed, ledger_plan
from ledger.eip712 import ChangeKind, ConsentChange, Domain
from ledger.points import LoyaltyPointsClient
from ledger.store import Base, create_schema, make_engine
from ledger.tx import TxSender
from ledger.types import Purpose, Subject

MARKETING_EMAIL = eip712.purpose_id("marketing.email")


@pytest.fixture(scope="session")
def artifacts() -> dict[str, Artifact]:
    return compile_contracts()


@dataclass
class Accounts:
    """One chain's actors; the admin and the operator are different keys so roles are really tested."""

    admin: LocalAccount = field(default_factory=Account.create)
    operator: LocalAccount = field(default_factory=Account.create)
    stranger: LocalAccount = field(default_factory=Account.create)
    accessor: LocalAccount = field(default_factory=Account.create)
    senders: dict[str, TxSender] = field(default_factory=dict)


def registry_plan(accounts: Accounts) -> list[tuple[str, Any]]:
    return ledger_plan(accounts.admin.address, accounts.operator.address, accounts.accessor.address)


@dataclass
class Ledger:
    backend: ChainBackend
    artifacts: dict[str, Artifact]
    accounts: Accounts
    deployment: Deployment
    partner: ChecksumAddress
    customer: LocalAccount
    subject: Subject
    purpose: Purpose = MARKETING_EMAIL

    @property
    def decoder(self) -> RevertDecoder:
        return RevertDecoder(list(self.artifacts.values()))

    def client(self, account: LocalAccount) -> ConsentRegistryClient:
        sender = self.accounts.senders[account.address]
        return ConsentRegistryClient(
            self.backend.w3,
            self.deployment.address("ConsentRegistry"),
            self.artifacts["ConsentRegistry"],
            sender,
            self.decoder,
        )

    @property
    def registry(self) -> ConsentRegistryClient:
        return self.client(self.accounts.operator)

    def points_client(self, account: LocalAccount) -> LoyaltyPointsClient:
        return LoyaltyPointsClient(
            self.backend.w3,
            self.deployment.address("LoyaltyPoints"),
            self.artifacts["LoyaltyPoints"],
            self.accounts.senders[account.address],
            self.decoder,
        )

    @property
    def points(self) -> LoyaltyPointsClient:
        return self.points_client(self.accounts.operator)

    def access_client(self, account: LocalAccount) -> AccessLogClient:
        return AccessLogClient(
            self.backend.w3,
            self.deployment.address("AccessLog"),
            self.artifacts["AccessLog"],
            self.accounts.senders[account.address],
            self.decoder,
        )

    @property
    def access_log(self) -> AccessLogClient:
        return self.access_client(self.accounts.accessor)

    @property
    def admin(self) -> ConsentRegistryClient:
        return self.client(self.accounts.admin)

    def now(self) -> int:
        return int(self.backend.w3.eth.get_block("latest")["timestamp"])

    def change(
        self,
        kind: ChangeKind,
        attributes: int,
        *,
        subject: Subject | None = None,
        partner: ChecksumAddress | None = None,
        purpose: Purpose | None = None,
        nonce: int | None = None,
        deadline: int | None = None,
        valid_until: int = 0,
    ) -> ConsentChange:
        subject = subject or self.subject
        return ConsentChange(
            kind=kind,
            subject=subject,
            partner=partner or self.partner,
            purpose=purpose or self.purpose,
            attributes=attributes,
            nonce=self.registry.nonce_of(subject) if nonce is None else nonce,
            deadline=self.now() + 3600 if deadline is None else deadline,
            valid_until=valid_until,
        )

    def sign(self, change: ConsentChange, *, key: bytes | None = None, domain: Domain | None = None) -> SignedChange:
        signature = eip712.sign(key or bytes(self.customer.key), domain or self.registry.domain, change)
        return SignedChange(change, signature)

    def grant(self, attributes: int, **kwargs: Any) -> SignedChange:
        return self.sign(self.change(ChangeKind.GRANT, attributes, **kwargs))

    def revoke(self, attributes: int, **kwargs: Any) -> SignedChange:
        return self.sign(self.change(ChangeKind.REVOKE, attributes, **kwargs))


def make_ledger(backend: ChainBackend, artifacts: dict[str, Artifact], accounts: Accounts) -> Ledger:
    """Deploy a fresh registry with a registered partner and a customer whose key is bound."""
    w3 = backend.w3
    for account in (accounts.admin, accounts.operator, accounts.stranger, accounts.accessor):
        if account.address not in accounts.senders:
            backend.fund(account.address)
            accounts.senders[account.address] = TxSender(w3, account, receipt_timeout=60)
    deployment = ensure_deployed(
        w3, accounts.senders[accounts.operator.address], artifacts, registry_plan(accounts), record=None
    )
    customer = Account.create()
    ledger = Ledger(
        backend=backend,
        artifacts=artifacts,
        accounts=accounts,
        deployment=deployment,
        partner=Account.create().address,
        customer=customer,
        subject=Subject(keccak(customer.key)),
    )
    ledger.admin.add_partner(ledger.partner)
    ledger.registry.bind_controller(ledger.subject, customer.address)
    return ledger


@pytest.fixture
def ledger(backend: ChainBackend, artifacts: dict[str, Artifact], accounts: Accounts) -> Ledger:
    return make_ledger(backend, artifacts, accounts)


@pytest.fixture(params=["sqlite", "postgresql"])
def service_db(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    """An empty service database with the current schema, on SQLite and on PostgreSQL."""
    url = (
        f"sqlite:///{tmp_path / 'service.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    engine = make_engine(url)
    Base.metadata.drop_all(engine)
    create_schema(engine)
    return engine
