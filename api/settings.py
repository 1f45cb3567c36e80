"""Service settings (environment variables prefixed ``CONSENT_LEDGER_``)."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_api_workers() -> int:
    """The cores this process may run on (its CPU affinity: `taskset`, a container's cpuset), at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


# A company logo's file types, and what each is served as.
LOGO_TYPES = {
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
}


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONSENT_LEDGER_", extra="ignore")

    mode: Literal["development", "production"] = Field(
        default="development",
        description="development creates missing secrets in the data dir; production refuses to start without them.",
    )
    data_dir: Path = Field(default=Path("var"), description="All state: chain, deployment record, databases.")
    host: str = Field(default="127.0.0.1", description="Address the HTTP API listens on.")
    port: int = Field(default=8000, ge=0, lt=65536, description="Port the HTTP API listens on.")
    public_origin: str | None = Field(
        default=None,
        description="The origin (scheme://host[:port]) customers reach the service at: the domain and URI of "
        "its sign-in messages (EIP-4361), which refuses messages naming any other. Default: http://HOST:PORT.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the service database (default: SQLite in the data dir)."
    )
    instance: str | None = Field(
        default=None,
        description="This instance's name where several serve one PostgreSQL database (/health names the one "
        "that runs the chain's writers by it). Default: the host's name and PORT.",
    )
    api_workers: int = Field(
        default_factory=lambda: default_api_workers(),
        ge=1,
        le=64,
        description="Processes serving the API; with more than one, a supervisor process beside them runs "
        "the node, relayer and indexer. Default: the number of cores, at most 4.",
    )
    api_worker_nice: int = Field(
        default=4,
        ge=0,
        le=19,
        description="Niceness of the API worker processes. Under full load the supervisor's relayer and "
        "indexer come first, so that what is acknowledged is put on-chain as fast as it is accepted "
        "rather than piling up (clients then wait a little longer for acknowledgements instead).",
    )
    access_log: bool = Field(
        default=False,
        description="Log every HTTP request (uvicorn's access log). Off by default, as in gunicorn: a line per "
        "request cost ~3 % of an API process's CPU under load, and a reverse proxy usually logs them.",
    )
    metrics: bool = Field(
        default=True,
        description="Count requests and domain events for Prometheus and serve them at /metrics (off: /metrics "
        "answers 404 and requests are not counted).",
    )
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="How `serve` writes its log: one JSON object a line (with the request id of the request "
        "being served), or plain text for a terminal.",
    )
    ready_max_head_age: float = Field(
        default=60.0,
        gt=0,
        description="/readyz fails when the chain's newest block is older than this (seconds) while requests "
        "have waited for a block as long (a managed node makes blocks only when there is work).",
    )
    ready_max_backlog: int = Field(
        default=10_000,
        ge=1,
        description="/readyz fails when more accepted requests (consent and points) than this wait to be settled.",
    )
    max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        description="Largest request body accepted (bytes); a larger one is refused with 413 before it is read whole.",
    )
    max_json_depth: int = Field(
        default=32,
        ge=4,
        le=256,
        description="Deepest nesting of arrays and objects in a JSON request body (the API's own bodies nest 5 "
        "deep); a deeper body is refused with 422 before it is parsed.",
    )
    relayer_max_batch: int = Field(default=500, ge=1, le=2000, description="Most consent changes in one transaction.")
    relayer_linger: float = Field(
        default=0.005,
        ge=0,
        description="Seconds the relayer waits to fill a batch (an external node; with the managed node "
        "batches are sent just before each block).",
    )
    relayer_max_in_flight: int = Field(default=16, ge=1, description="Batch transactions sent and not yet mined.")
    tiers: dict[str, int] = Field(
        default={"bronze": 0, "silver": 1_000, "gold": 5_000, "platinum": 20_000},
        description="Loyalty tiers: the points a customer must have earned in the last 12 months for each.",
    )
    points_lifetime_days: int = Field(default=365, ge=1, description="Default validity of issued points.")
    revocation_deadline_days: int = Field(
        default=30,
        ge=1,
        description=(
            "How long a prepared revocation's signature stays valid (a grant's: 15 minutes): how long the chain "
            "can be away without an accepted revocation failing for its deadline. Safe, unlike a long-lived "
            "grant: applied late, a revocation only withdraws, and the subject's nonces keep it before any "
            "later change."
        ),
    )
    idempotency_key_hours: int = Field(
        default=24,
        ge=1,
        description=(
            "How long a partner's Idempotency-Key is remembered (a retry with it gets the first answer); "
            "after that a retry is a new request, and one whose authorisation was used is refused (409)."
        ),
    )
    company_name: str = Field(
        default="Example Retail Ltd",
        min_length=1,
        max_length=120,
        description="The data controller, named in receipts and at the top of every page.",
    )
    company_contact: str = Field(
        default="privacy@example.com",
        min_length=3,
        max_length=254,
        description="The controller's privacy contact (an email address), in receipts and on every page.",
    )
    company_privacy_url: str | None = Field(
        default=None,
        description="The privacy notice's address (https), linked from every page; none: no link.",
    )
    company_logo: Path | None = Field(
        default=None,
        description="A PNG, SVG, JPEG or WebP file shown beside the company's name on every page, and as its icon.",
    )

    @field_validator("company_name", "company_contact")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must be one line of text, without control characters")
        return value.strip()

    @field_validator("company_privacy_url")
    @classmethod
    def _privacy_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
            raise ValueError(f"not an http(s) address such as https://example.com/privacy: {value!r}")
        return value.strip()

    @field_validator("company_logo")
    @classmethod
    def _logo(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if value.suffix.lower() not in LOGO_TYPES:
            raise ValueError(f"a logo is a {', '.join(sorted(LOGO_TYPES))} file: {value}")
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("public_origin")
    @classmethod
    def _origin_only(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"not an http(s) origin such as https://ledger.example.com: {value!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"an origin has no query, fragment or credentials: {value!r}")
        return f"{parts.scheme}://{parts.netloc.lower()}"

    @property
    def origin(self) -> str:
        """Where customers reach the service (`public_origin`, else the API's own address)."""
        if self.public_origin is not None:
            return self.public_origin
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"

    def origin_warning(self) -> str | None:
        """What to warn about at start when the public origin is left to its default but customers can
        hardly reach the service at it: the API listening on every interface (`0.0.0.0`), or production
        (behind a proxy or a name). Every sign-in message then names an address the customer's browser
        is not at, and wallets warn of a phishing site at every sign-in."""
        if self.public_origin is not None:
            return None
        if self.host in ("0.0.0.0", "::", "") or not self.development:  # noqa: S104 - comparing, not binding
            return (
                f"CONSENT_LEDGER_PUBLIC_ORIGIN is not set: sign-in messages name {self.origin}, and wallets warn "
                "customers who reach the service at any other address; set it to the address they use"
            )
        return None

    @property
    def development(self) -> bool:
        return self.mode == "development"

    @property
    def instance_name(self) -> str:
        return self.instance or f"{socket.gethostname()}:{self.port}"

    @property
    def service_database_url(self) -> str:
        """The service database: `database_url`, else SQLite in the data dir (`service.db`)."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'service.db').resolve()}"


@lru_cache
def get_service_settings() -> ServiceSettings:
    return ServiceSettings()
