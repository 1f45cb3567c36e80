"""The running service's parts, started and stopped in order: chain, contracts, clients."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from api.secrets import Secrets
from api.settings import ServiceSettings
from identity.did import DidWeb, Resolver
from identity.pseudonym import Pseudonymizer
from identity.settings import IdentitySettings
from identity.vault import Vault, make_engine
from ledger.backends import ChainBackend, create_backend
from ledger.compiler import Artifact, compile_contracts
from ledger.consent import ConsentRegistryClient
from ledger.contracts import Deployment, RevertDecoder, ensure_deployed
from ledger.settings import ChainSettings, ToolchainSettings
from ledger.tx import TxSender

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    service: ServiceSettings
    chain: ChainSettings
    toolchain: ToolchainSettings
    secrets: Secrets
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    backend: ChainBackend | None = None
    vault: Vault | None = None
    dids: DidWeb | None = None
    resolver: Resolver | None = None
    deployment: Deployment | None = None
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    consent: ConsentRegistryClient | None = None

    def start(self) -> None:
        self.service.data_dir.mkdir(parents=True, exist_ok=True)
        url = self.identity.database_url or f"sqlite:///{(self.service.data_dir / 'identity.db').resolve()}"
        self.vault = Vault(make_engine(url), self.secrets.master_keys, Pseudonymizer(self.secrets.peppers))
        self.vault.create_schema()
        self.dids = self.identity.did_method(f"{self.service.host}%3A{self.service.port}")
        self.resolver = Resolver(self.dids, self.vault)
        self.artifacts = compile_contracts(self.toolchain)
        self.backend = create_backend(self.chain, self.secrets.operator, self.service.data_dir)
        w3 = self.backend.start()
        sender = TxSender(w3, self.secrets.operator, receipt_timeout=self.chain.receipt_timeout)
        operator = self.secrets.operator.address
        self.deployment = ensure_deployed(
            w3,
            sender,
            self.artifacts,
            [("ConsentRegistry", lambda _d: [operator, operator])],
            self.service.data_dir / "deployment.json",
        )
        decoder = RevertDecoder(list(self.artifacts.values()))
        self.consent = ConsentRegistryClient(
            w3, self.deployment.address("ConsentRegistry"), self.artifacts["ConsentRegistry"], sender, decoder
        )
        log.info(
            "chain %s (%s backend), ConsentRegistry at %s since block %s",
            self.deployment.chain_id,
            self.backend.name,
            self.deployment.address("ConsentRegistry"),
            self.deployment.deploy_block,
        )

    def stop(self) -> None:
        if self.backend is not None:
            self.backend.stop()
            self.backend = None
        if self.vault is not None:
            self.vault.engine.dispose()
            self.vault = None
