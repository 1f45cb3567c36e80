"""Command-line tools that work beside a running `serve`: the bridge export and the audit commands.

They open the service's data dir (database, deployment record, secrets) and talk to the service's
chain node, but they never start a node of their own: the node's blocks are made by `serve`, and
the read model they filter by is kept current by its indexer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select
from web3 import Web3

import api.models  # noqa: F401 - registers the API's tables on the shared metadata
from api.did_host import did_web
from api.models import AttributeRow
from api.reference import Catalogue
from api.secrets import Secrets, load_secrets, open_vault
from api.service_errors import ToolError
from api.settings import ServiceSettings
from crm_bridge.bridge import Bridge, Export, ExportStats, permitted
from crm_bridge.mapping import Mapping
from crm_bridge.sources import is_database_url, read_source
from identity.did import DidWeb
from identity.pseudonym import Pseudonymizer
from identity.settings import IdentitySettings
from identity.types import Subject
from ledger.access import AccessLogClient, Verification, verify
from ledger.assembly import Keys, open_contracts
from ledger.backends import durable_wait, node_url
from ledger.consent import ConsentReader
from ledger.contracts import Deployment
from ledger.eip712 import purpose_id
from ledger.errors import ChainError
from ledger.settings import ChainSettings, ToolchainSettings
from ledger.store import make_engine, sessions


def chain_url(service: ServiceSettings, chain: ChainSettings) -> str:
    """The JSON-RPC URL of the service's chain: the external node, or the managed node `serve` runs."""
    try:
        return node_url(chain, service.data_dir)
    except ChainError as exc:
        raise ToolError(str(exc)) from exc


@dataclass
class Offline:
    """The service's state, opened by a tool."""

    service: ServiceSettings
    chain: ChainSettings
    secrets: Secrets
    identity: IdentitySettings
    engine: Engine
    deployment: Deployment
    w3: Web3
    access_log: AccessLogClient

    @classmethod
    def open(
        cls, data_dir: Path | None = None, *, service: ServiceSettings | None = None, chain: ChainSettings | None = None
    ) -> Offline:
        if service is None:
            service = ServiceSettings(data_dir=data_dir) if data_dir else ServiceSettings()
        chain, identity = chain or ChainSettings(), IdentitySettings()
        secrets = load_secrets(service, chain, identity)
        keys = Keys(secrets.operator, secrets.accessor)
        # The accessor signs the access records of `bridge export`; nothing here signs with the operator.
        contracts = open_contracts(
            chain, ToolchainSettings(), service.data_dir, keys=keys, node_url=chain_url(service, chain)
        )
        engine = make_engine(service.service_database_url)
        return cls(service, chain, secrets, identity, engine, contracts.deployment, contracts.w3, contracts.access_log)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Offline:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def catalogue(self) -> Catalogue:
        with sessions(self.engine)() as session:
            return Catalogue(session)

    def attribute_bits(self) -> dict[str, int]:
        with sessions(self.engine)() as session:
            return {row.key: row.bit for row in session.scalars(select(AttributeRow))}

    def erased(self) -> set[Subject]:
        """The customers whose personal data was erased (`DELETE /customers/{did}`)."""
        vault = open_vault(self.service, self.identity, self.secrets)
        try:
            return vault.erased()
        finally:
            vault.engine.dispose()

    def dids(self) -> DidWeb:
        """The DIDs the data dir's service issues (`api.did_host`), whatever this process's port setting."""
        with sessions(self.engine)() as session:
            return did_web(session, self.service, self.identity, record=False)

    def bridge(self) -> Bridge:
        return Bridge(
            Pseudonymizer(self.secrets.peppers),
            self.dids(),
            self.access_log,
            confirmations=self.chain.confirmations,
            durable=durable_wait(self.chain, self.service.data_dir),
        )

    def verify(self) -> Verification:
        return verify(self.w3, self.access_log, self.engine, self.deployment.contracts["AccessLog"].block_number)


def export(
    offline: Offline,
    source: str,
    mapping_path: Path,
    partner: str,
    purpose: str,
    out: Path,
    *,
    table: str | None = None,
) -> ExportStats:
    """`bridge export`: CRM export → consent-filtered, access-logged Parquet file keyed by DID."""
    mapping = Mapping.load(mapping_path)
    catalogue = offline.catalogue()
    partner_address = catalogue.partner(partner)
    if partner_address is None:
        raise ToolError(f"no partner named {partner!r}")
    if purpose not in catalogue.purposes:
        raise ToolError(f"no purpose {purpose!r} (see GET /api/v1/purposes)")
    pid = bytes(purpose_id(purpose))
    permissions = permitted(ConsentReader(offline.engine), partner_address, pid, offline.erased())
    text_columns = tuple(mapping.pii.columns().values())
    if not is_database_url(source) and not os.path.exists(source):
        raise ToolError(f"no such input file: {source}")
    run = Export(
        offline.bridge(),
        read_source(source, table=table, text_columns=text_columns, columns=mapping.read_columns()),
        mapping,
        partner=partner_address,
        partner_name=partner,  # a report names the partner, not its address
        purpose=pid,
        purpose_key=purpose,
        attribute_bits=offline.attribute_bits(),
        permissions=permissions,
    )
    return run.to_parquet(out)
