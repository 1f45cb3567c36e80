"""Secrets come from settings, never from code.

In development mode the service creates the missing ones in `DATA_DIR/secrets/` (mode 0600) and
says so; in production it refuses to start without them, or with a publicly known or weak one
(anvil's and Hardhat's default accounts; a pepper or key with hardly any distinct bytes).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from pydantic import SecretStr

from api.service_errors import ServiceError
from api.settings import ServiceSettings
from identity.errors import IdentityError
from identity.keys import FileKeyProvider, KeyProvider, decode_key
from identity.pseudonym import PepperRing, Pseudonymizer
from identity.settings import IdentitySettings
from identity.vault import Vault
from identity.vault import make_engine as make_vault_engine
from ledger.settings import ChainSettings

log = logging.getLogger(__name__)

# The mnemonic anvil, Hardhat and Ganache ship with: keys derived from it are public knowledge.
_PUBLIC_MNEMONIC = "test test test test test test test test test test test junk"
_MIN_DISTINCT_BYTES = 12  # 32 random bytes have ~25 distinct values; "0000…" or "abab…" have 1 or 2


class SecretsError(ServiceError):
    """Raised when a required secret is missing, malformed, or a publicly known or weak value outside development."""


@cache
def _public_keys() -> frozenset[str]:
    Account.enable_unaudited_hdwallet_features()
    return frozenset(
        Account.from_mnemonic(_PUBLIC_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}").key.hex().removeprefix("0x")
        for i in range(20)
    )


@dataclass(frozen=True)
class Secrets:
    operator: LocalAccount
    peppers: PepperRing
    master_keys: KeyProvider
    accessor: LocalAccount
    previous_operator: LocalAccount | None = None  # only while the operator key is rotated


def _create_private(path: Path, text: str, what: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    log.warning("development mode: created a new %s in %s (set it in the environment in production)", what, path)


def _weak(material: bytes) -> bool:
    return len(set(material)) < _MIN_DISTINCT_BYTES


def _account(service: ServiceSettings, key_setting: SecretStr | None, role: str) -> LocalAccount:
    """The `role` account's key (operator or accessor) from CONSENT_LEDGER_CHAIN_{ROLE}_KEY; in
    development mode created in the data dir when missing."""
    key = key_setting.get_secret_value().strip() if key_setting else None
    if key is None:
        if not service.development:
            raise SecretsError(
                f"CONSENT_LEDGER_CHAIN_{role.upper()}_KEY is not set: production mode needs the {role}'s private key"
            )
        path = service.data_dir / "secrets" / f"{role}.key"
        if not path.is_file():
            _create_private(path, "0x" + secrets.token_hex(32) + "\n", f"{role} key")
        key = path.read_text(encoding="utf-8").strip()
    try:
        account: LocalAccount = Account.from_key(key)
    except (ValueError, TypeError) as exc:
        raise SecretsError(f"the {role} key is not a valid secp256k1 private key") from exc
    if not service.development and key.lower().removeprefix("0x") in _public_keys():
        raise SecretsError(f"the {role} key is a publicly known development key; refusing to start in production")
    return account


def _peppers(service: ServiceSettings, identity: IdentitySettings) -> PepperRing:
    if identity.peppers:
        ring = identity.pepper_ring()
    elif not service.development:
        raise SecretsError("CONSENT_LEDGER_IDENTITY_PEPPERS is not set: production mode needs the pseudonym pepper")
    else:
        path = service.data_dir / "secrets" / "peppers.json"
        if not path.is_file():
            _create_private(path, json.dumps({"current": 1, "peppers": {"1": secrets.token_hex(32)}}), "pepper")
        raw = json.loads(path.read_text(encoding="utf-8"))
        ring = PepperRing({int(v): decode_key(p) for v, p in raw["peppers"].items()}, int(raw["current"]))
    if not service.development and any(_weak(p) for p in ring.peppers.values()):
        raise SecretsError("a pepper is a default or low-entropy value; refusing to start in production")
    return ring


def _master_keys(service: ServiceSettings, identity: IdentitySettings) -> KeyProvider:
    if identity.master_keys:
        if not service.development and any(
            _weak(decode_key(k.get_secret_value())) for k in identity.master_keys.values()
        ):
            raise SecretsError("a master key is a default or low-entropy value; refusing to start in production")
        return identity.key_provider()
    if not service.development:
        raise SecretsError("CONSENT_LEDGER_IDENTITY_MASTER_KEYS is not set: production mode needs the vault master key")
    path = service.data_dir / "secrets" / "master-keys.json"
    if not path.is_file():
        FileKeyProvider.create(path)
        log.warning("development mode: created a new vault master key in %s", path)
    return FileKeyProvider(path)


def _previous_operator(chain: ChainSettings) -> LocalAccount | None:
    if chain.previous_operator_key is None:
        return None
    try:
        account: LocalAccount = Account.from_key(chain.previous_operator_key.get_secret_value().strip())
    except (ValueError, TypeError) as exc:
        raise SecretsError("CONSENT_LEDGER_CHAIN_PREVIOUS_OPERATOR_KEY is not a valid secp256k1 private key") from exc
    return account


def load_secrets(service: ServiceSettings, chain: ChainSettings, identity: IdentitySettings | None = None) -> Secrets:
    identity = identity or IdentitySettings()
    try:
        return Secrets(
            operator=_account(service, chain.operator_key, "operator"),
            peppers=_peppers(service, identity),
            master_keys=_master_keys(service, identity),
            accessor=_account(service, chain.accessor_key, "accessor"),
            previous_operator=_previous_operator(chain),
        )
    except IdentityError as exc:
        raise SecretsError(str(exc)) from exc


def open_vault(service: ServiceSettings, identity: IdentitySettings, secrets: Secrets) -> Vault:
    """The PII vault (`CONSENT_LEDGER_IDENTITY_DATABASE_URL`, else the data dir's `identity.db`), with
    the keys that read it."""
    url = identity.database_url or f"sqlite:///{(service.data_dir / 'identity.db').resolve()}"
    return Vault(make_vault_engine(url), secrets.master_keys, Pseudonymizer(secrets.peppers))
