"""Identity settings (environment variables prefixed ``CONSENT_LEDGER_IDENTITY_``).

Peppers and master keys are secrets: they come from the environment (JSON maps of version or id to
hex), never from code. Example::

    CONSENT_LEDGER_IDENTITY_PEPPERS='{"1": "<64 hex digits>"}'
    CONSENT_LEDGER_IDENTITY_MASTER_KEYS='{"k1": "<64 hex digits>"}'
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from identity.errors import KeyMaterialError
from identity.keys import StaticKeyProvider, decode_key
from identity.pseudonym import PepperRing


class IdentitySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONSENT_LEDGER_IDENTITY_", extra="ignore")

    peppers: dict[int, SecretStr] = Field(
        default_factory=dict, description="Pepper versions (JSON: version → hex, at least 32 bytes each)."
    )
    pepper_version: int | None = Field(
        default=None, description="Version that derives new subjects (default: highest)."
    )
    master_keys: dict[str, SecretStr] = Field(
        default_factory=dict, description="Master keys wrapping data keys (JSON: id → 32 bytes hex)."
    )
    master_key_id: str | None = Field(default=None, description="Master key that wraps new data keys (default: last).")
    default_region: str | None = Field(
        default=None, description="ISO 3166 region for phone numbers written without +country code (e.g. GB)."
    )
    did_web_host: str | None = Field(
        default=None,
        description="Public host of this service in did:web DIDs, port as %3A (default: the API's host and port). "
        "The first start records it in the service database; every process on the data dir uses the recorded one.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the vault (default: SQLite in the data dir)."
    )

    def pepper_ring(self) -> PepperRing:
        if not self.peppers:
            raise KeyMaterialError("CONSENT_LEDGER_IDENTITY_PEPPERS is not set")
        peppers = {v: decode_key(s.get_secret_value()) for v, s in self.peppers.items()}
        return PepperRing(peppers, self.pepper_version if self.pepper_version is not None else max(peppers))

    def key_provider(self) -> StaticKeyProvider:
        if not self.master_keys:
            raise KeyMaterialError("CONSENT_LEDGER_IDENTITY_MASTER_KEYS is not set")
        keys = {k: decode_key(s.get_secret_value()) for k, s in self.master_keys.items()}
        return StaticKeyProvider(keys, self.master_key_id or list(keys)[-1])
