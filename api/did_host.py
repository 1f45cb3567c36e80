"""The host a data dir's DIDs name, recorded in its service database at the service's first start.

A DID is a customer's name outside the service (in released tables, receipts, the auditors' export):
every process that computes DIDs for a data dir must compute the same ones. Taken from each process's
own settings, they were not: `bridge export` beside `serve --port 8200` named `127.0.0.1%3A8000`
(its default port), so its rows joined with none of the API's DIDs. So the first start records the
host (`CONSENT_LEDGER_IDENTITY_DID_WEB_HOST`, else the API's host and port), and every later start,
API worker and tool uses the recorded one: a start on another port keeps the DIDs (as a restored
backup does); an explicit setting naming another host is refused, since it would rename every
customer."""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, Session, mapped_column

from api.settings import ServiceSettings
from identity.did import DidWeb
from identity.errors import DidHostMismatch, InvalidDid
from identity.settings import IdentitySettings
from ledger.store import Base

DID_HOST = "did_web_host"


class ServiceFact(Base):
    """A fact about the service that must not change with the settings of the process reading it."""

    __tablename__ = "service_facts"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(300))


def configured_host(service: ServiceSettings, identity: IdentitySettings) -> str:
    """The host this process's settings would give DIDs (what the first start records)."""
    return identity.did_web_host or f"{service.host}%3A{service.port}"


def did_host(session: Session, service: ServiceSettings, identity: IdentitySettings, *, record: bool) -> str:
    """The host the data dir's DIDs name; with `record` (a service's start), recorded first if it is not
    yet. Raises DidHostMismatch when CONSENT_LEDGER_IDENTITY_DID_WEB_HOST names another host, or (a
    tool) when no service has recorded one."""
    fact = session.get(ServiceFact, DID_HOST)
    if fact is None:
        if not record:
            raise DidHostMismatch(
                f"no service has recorded the host of its DIDs in {service.data_dir}: "
                "start `consent-ledger serve` on it once"
            )
        fact = ServiceFact(key=DID_HOST, value=configured_host(service, identity))
        session.add(fact)
    elif identity.did_web_host is not None and identity.did_web_host != fact.value:
        raise DidHostMismatch(
            f"the DIDs of this data dir name {fact.value}, CONSENT_LEDGER_IDENTITY_DID_WEB_HOST says "
            f"{identity.did_web_host}: unset it, or set it to {fact.value} (another would rename every customer)"
        )
    return fact.value


def did_web(session: Session, service: ServiceSettings, identity: IdentitySettings, *, record: bool) -> DidWeb:
    """The DIDs of the data dir's service (`did_host`). A host did:web cannot name (a malformed
    CONSENT_LEDGER_IDENTITY_DID_WEB_HOST, or a listen address such as `::1`) is InvalidDid, identity's
    word for it: DidWeb's ValueError is a caller's mistake, and here the caller is the configuration."""
    host = did_host(session, service, identity, record=record)
    try:
        return DidWeb(host)
    except ValueError as exc:
        raise InvalidDid(str(exc)) from exc
