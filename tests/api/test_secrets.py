"""Secrets: created in development (and said so), required and checked in production."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from api.secrets import SecretsError, load_secrets
from api.settings import ServiceSettings
from identity.settings import IdentitySettings
from ledger.settings import ChainSettings

ANVIL_ACCOUNT_0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def _identity(**overrides: object) -> IdentitySettings:
    values: dict[str, object] = {
        "peppers": {1: SecretStr(os.urandom(32).hex())},
        "master_keys": {"k1": SecretStr(os.urandom(32).hex())},
    }
    values.update(overrides)
    return IdentitySettings(**values)  # type: ignore[arg-type]


def _production(tmp_path: Path) -> ServiceSettings:
    return ServiceSettings(mode="production", data_dir=tmp_path)


REAL_KEY = ChainSettings(
    operator_key=SecretStr("0x" + os.urandom(32).hex()), accessor_key=SecretStr("0x" + os.urandom(32).hex())
)


def test_development_creates_every_secret_once_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    service = ServiceSettings(mode="development", data_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        first = load_secrets(service, ChainSettings(), IdentitySettings())
    for what in ("operator key", "accessor key", "pepper", "vault master key"):
        assert f"created a new {what}" in caplog.text
    for name in ("operator.key", "accessor.key", "peppers.json", "master-keys.json"):
        assert stat.S_IMODE((tmp_path / "secrets" / name).stat().st_mode) == 0o600
    caplog.clear()
    again = load_secrets(service, ChainSettings(), IdentitySettings())
    assert again.operator.address == first.operator.address
    assert again.accessor.address == first.accessor.address != first.operator.address
    assert again.peppers == first.peppers
    assert again.master_keys.current_key_id == first.master_keys.current_key_id
    assert "created" not in caplog.text


def test_production_refuses_to_start_without_an_operator_key(tmp_path: Path) -> None:
    with pytest.raises(SecretsError, match="CONSENT_LEDGER_CHAIN_OPERATOR_KEY is not set"):
        load_secrets(_production(tmp_path), ChainSettings(), _identity())
    assert not (tmp_path / "secrets").exists()


def test_production_refuses_without_an_accessor_key(tmp_path: Path) -> None:
    chain = ChainSettings(operator_key=REAL_KEY.operator_key)
    with pytest.raises(SecretsError, match="CONSENT_LEDGER_CHAIN_ACCESSOR_KEY is not set"):
        load_secrets(_production(tmp_path), chain, _identity())


def test_production_refuses_a_publicly_known_key(tmp_path: Path) -> None:
    chain = ChainSettings(operator_key=SecretStr(ANVIL_ACCOUNT_0))
    with pytest.raises(SecretsError, match="operator key is a publicly known"):
        load_secrets(_production(tmp_path), chain, _identity())
    chain = ChainSettings(operator_key=REAL_KEY.operator_key, accessor_key=SecretStr(ANVIL_ACCOUNT_0))
    with pytest.raises(SecretsError, match="accessor key is a publicly known"):
        load_secrets(_production(tmp_path), chain, _identity())


def test_production_refuses_a_missing_pepper_or_master_key(tmp_path: Path) -> None:
    with pytest.raises(SecretsError, match="CONSENT_LEDGER_IDENTITY_PEPPERS is not set"):
        load_secrets(_production(tmp_path), REAL_KEY, _identity(peppers={}))
    with pytest.raises(SecretsError, match="CONSENT_LEDGER_IDENTITY_MASTER_KEYS is not set"):
        load_secrets(_production(tmp_path), REAL_KEY, _identity(master_keys={}))
    assert not (tmp_path / "secrets").exists()


@pytest.mark.parametrize("weak", ["00" * 32, "ab" * 32, "0123456789" * 7 + "01"])
def test_production_refuses_default_or_weak_peppers_and_keys(tmp_path: Path, weak: str) -> None:
    with pytest.raises(SecretsError, match="pepper is a default or low-entropy"):
        load_secrets(_production(tmp_path), REAL_KEY, _identity(peppers={1: SecretStr(weak)}))
    if len(weak) == 64:
        with pytest.raises(SecretsError, match="master key is a default or low-entropy"):
            load_secrets(_production(tmp_path), REAL_KEY, _identity(master_keys={"k1": SecretStr(weak)}))


def test_production_accepts_real_secrets_from_settings(tmp_path: Path) -> None:
    pepper = os.urandom(32).hex()
    loaded = load_secrets(_production(tmp_path), REAL_KEY, _identity(peppers={1: SecretStr(pepper)}))
    assert loaded.peppers.get(1) == bytes.fromhex(pepper)
    assert loaded.master_keys.current_key_id == "k1"


def test_settings_take_json_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    pepper, key = os.urandom(32).hex(), os.urandom(32).hex()
    monkeypatch.setenv("CONSENT_LEDGER_IDENTITY_PEPPERS", json.dumps({"1": "11" * 32, "2": pepper}))
    monkeypatch.setenv("CONSENT_LEDGER_IDENTITY_MASTER_KEYS", json.dumps({"k1": key}))
    settings = IdentitySettings()
    ring = settings.pepper_ring()
    assert ring.current == 2
    assert ring.get(2) == bytes.fromhex(pepper)
    assert settings.key_provider().current_key_id == "k1"


def test_malformed_secrets_are_clear_errors(tmp_path: Path) -> None:
    chain = ChainSettings(operator_key=SecretStr("not-a-key"))
    with pytest.raises(SecretsError, match="not a valid secp256k1 private key"):
        load_secrets(_production(tmp_path), chain, _identity())
    with pytest.raises(SecretsError, match="shorter than 32 bytes"):
        load_secrets(_production(tmp_path), REAL_KEY, _identity(peppers={1: SecretStr("abcd")}))
