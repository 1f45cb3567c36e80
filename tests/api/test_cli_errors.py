"""The command line answers a failure of any package with one line and exit status 2, not a traceback;
a bug (an exception outside the packages' roots) keeps its traceback."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from api import cli
from api.did_host import did_web
from api.secrets import SecretsError
from api.service_errors import ServiceError, ToolError
from api.settings import ServiceSettings
from api.workers import ControlError
from crm_bridge.errors import BridgeError
from identity.errors import IdentityError, InvalidDid
from identity.settings import IdentitySettings
from ledger.errors import LedgerError
from ledger.store import create_schema, make_engine, sessions


def _failing(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    def handler(_args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr(cli, "_compile", handler)  # `compile` takes no arguments


@pytest.mark.parametrize(
    "error",
    [
        ServiceError("the service refused"),
        ToolError("no partner named 'nobody'"),
        SecretsError("CONSENT_LEDGER_CHAIN_OPERATOR_KEY is not set"),
        ControlError("lost", "the supervisor is gone"),
        LedgerError("the node does not answer"),
        IdentityError("a master key is missing"),
        BridgeError("the mapping is malformed"),
    ],
)
def test_a_failure_of_a_package_is_one_line(
    error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _failing(monkeypatch, error)
    assert cli.main(["compile"]) == 2
    assert capsys.readouterr().err == f"consent-ledger: {error}\n"


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _failing(monkeypatch, ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["compile"])


def test_a_malformed_flag_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What the command line parses itself (an address, a day, the settings' --k) is translated where it
    is parsed."""
    db = ["--data-dir", str(tmp_path)]
    assert cli.main(["principals", "add", "--role", "partner", "--name", "p", "--address", "0x12", *db]) == 2
    assert capsys.readouterr().err.startswith("consent-ledger: ")
    report = ["analytics", "report", "--input", str(tmp_path / "in.parquet"), "--out", str(tmp_path / "out")]
    assert cli.main([*report, "--as-of", "yesterday"]) == 2
    assert capsys.readouterr().err == "consent-ledger: Invalid isoformat string: 'yesterday'\n"
    assert cli.main([*report, "--k", "1"]) == 2
    assert "greater than or equal to 2" in capsys.readouterr().err


def test_a_host_did_web_cannot_name_is_an_identity_error(tmp_path: Path) -> None:
    """`serve --host ::1` makes DIDs of `::1%3A8000`, which did:web cannot name: the start fails with
    InvalidDid (one line from the command line), not with DidWeb's ValueError (a traceback)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    create_schema(engine)
    service = ServiceSettings(host="::1", port=8000, data_dir=tmp_path)
    with sessions(engine)() as session, pytest.raises(InvalidDid, match="not a did:web host"):
        did_web(session, service, IdentitySettings(did_web_host=None), record=True)
    engine.dispose()
