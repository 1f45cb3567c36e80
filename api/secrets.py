"""Secrets come from settings, never from code. In development mode the service creates the missing
ones in the data dir (and says so); in production it refuses to start without them, or with a
well-known key such as anvil's or Hardhat's default accounts."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from api.settings import ServiceSettings
from ledger.settings import ChainSettings

log = logging.getLogger(__name__)

# The mnemonic anvil, Hardhat and Ganache ship with: keys derived from it are public knowledge.
_PUBLIC_MNEMONIC = "test test test test test test test test test test test junk"


class SecretsError(Exception):
    """Raised when a required secret is missing or is a publicly known value outside development."""


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


def _read_or_create(path: Path, make: str, what: str) -> str:
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(make + "\n")
    log.warning("development mode: created a new %s in %s (set it in the environment in production)", what, path)
    return make


def load_secrets(service: ServiceSettings, chain: ChainSettings) -> Secrets:
    key = chain.operator_key.get_secret_value().strip() if chain.operator_key else None
    if key is None:
        if not service.development:
            raise SecretsError(
                "CONSENT_LEDGER_CHAIN_OPERATOR_KEY is not set: production mode needs the operator's private key"
            )
        key = _read_or_create(
            service.data_dir / "secrets" / "operator.key", "0x" + secrets.token_hex(32), "operator key"
        )
    try:
        operator: LocalAccount = Account.from_key(key)
    except (ValueError, TypeError) as exc:
        raise SecretsError("the operator key is not a valid secp256k1 private key") from exc
    if not service.development and key.lower().removeprefix("0x") in _public_keys():
        raise SecretsError("the operator key is a publicly known development key; refusing to start in production")
    return Secrets(operator=operator)
