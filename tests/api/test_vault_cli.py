"""`consent-ledger vault keys|rotate-master-key` beside a running service (real SQLite files, real
HTTP server): data keys move to a new master key, and the old one can then be retired."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from api.cli import main
from identity.keys import FileKeyProvider, StaticKeyProvider
from identity.vault import Vault
from tests.api.conftest import running_service


def _vault(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code = main(["vault", *args])
    out = capsys.readouterr().out
    return code, json.loads(out) if code == 0 else {}


def test_master_key_rotation_while_serving(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path)
    with running_service(tmp_path) as service:
        runtime = service.runtime
        dids = [service.enrol(f"rotate{n}@example.com")[0] for n in range(3)]
        subjects = [runtime.dids.subject(did) for did in dids]
        pii = [runtime.vault.pii(subject) for subject in subjects]

        assert _vault(capsys, "keys", "--data-dir", data) == (
            0,
            {"current_key": "k1", "data_keys_by_master_key": {"k1": 3}},
        )
        code, report = _vault(capsys, "rotate-master-key", "--new-key", "k2", "--data-dir", data)
        assert code == 0
        assert report == {"current_key": "k2", "rewrapped": 3, "data_keys_by_master_key": {"k2": 3}}

        # The running service reads the re-wrapped keys (its key file is read again for k2), and then
        # wraps new customers' keys under k2 as well.
        assert [runtime.vault.pii(subject) for subject in subjects] == pii
        later = runtime.dids.subject(service.enrol("rotate-later@example.com")[0])
        assert _vault(capsys, "keys", "--data-dir", data)[1]["data_keys_by_master_key"] == {"k2": 4}

        # k1 can be retired: k2 alone reads every customer.
        k2 = json.loads((tmp_path / "secrets" / "master-keys.json").read_text())["keys"]["k2"]
        keys = StaticKeyProvider({"k2": bytes.fromhex(k2)}, "k2")
        only_k2 = Vault(runtime.vault.engine, keys, runtime.vault.pseudonymizer)
        assert [only_k2.pii(subject) for subject in subjects] == pii
        assert only_k2.pii(later).email == "rotate-later@example.com"
        assert isinstance(runtime.secrets.master_keys, FileKeyProvider)


def test_a_vault_no_service_has_used_yet_has_no_data_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _vault(capsys, "keys", "--data-dir", str(tmp_path)) == (
        0,
        {"current_key": "k1", "data_keys_by_master_key": {}},
    )


def test_a_new_master_key_is_made_only_in_the_development_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSENT_LEDGER_IDENTITY_MASTER_KEYS", json.dumps({"k1": os.urandom(32).hex()}))
    assert main(["vault", "rotate-master-key", "--new-key", "k2", "--data-dir", str(tmp_path)]) == 2
    assert "in production add the key to CONSENT_LEDGER_IDENTITY_MASTER_KEYS" in capsys.readouterr().err
