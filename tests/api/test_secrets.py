"""Secrets: created in development (and said so), required and checked in production."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from api.secrets import SecretsError, load_secrets
from api.settings import ServiceSettings
from ledger.settings import ChainSettings

ANVIL_ACCOUNT_0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def test_development_creates_an_operator_key_once_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    service = ServiceSettings(mode="development", data_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        first = load_secrets(service, ChainSettings())
    assert "created a new operator key" in caplog.text
    key_file = tmp_path / "secrets" / "operator.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    caplog.clear()
    again = load_secrets(service, ChainSettings())
    assert again.operator.address == first.operator.address
    assert "created" not in caplog.text


def test_production_refuses_to_start_without_an_operator_key(tmp_path: Path) -> None:
    with pytest.raises(SecretsError, match="CONSENT_LEDGER_CHAIN_OPERATOR_KEY is not set"):
        load_secrets(ServiceSettings(mode="production", data_dir=tmp_path), ChainSettings())
    assert not (tmp_path / "secrets").exists()


def test_production_refuses_a_publicly_known_key(tmp_path: Path) -> None:
    chain = ChainSettings(operator_key=SecretStr(ANVIL_ACCOUNT_0))
    with pytest.raises(SecretsError, match="publicly known"):
        load_secrets(ServiceSettings(mode="production", data_dir=tmp_path), chain)


def test_production_accepts_a_real_key_from_settings(tmp_path: Path) -> None:
    key = "0x" + "5a" * 32
    chain = ChainSettings(operator_key=SecretStr(key))
    loaded = load_secrets(ServiceSettings(mode="production", data_dir=tmp_path), chain)
    assert loaded.operator.key.hex().removeprefix("0x") == "5a" * 32


def test_a_malformed_key_is_a_clear_error(tmp_path: Path) -> None:
    chain = ChainSettings(operator_key=SecretStr("not-a-key"))
    with pytest.raises(SecretsError, match="not a valid secp256k1 private key"):
        load_secrets(ServiceSettings(mode="production", data_dir=tmp_path), chain)
