"""Defaults derived from the settings are derived in one place: every process of a data dir opens the
same service database."""

from __future__ import annotations

from pathlib import Path

from api.settings import ServiceSettings
from ledger.settings import PROJECT_ROOT


def test_the_service_database_defaults_to_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    relative = Path("var-relative")
    assert ServiceSettings(data_dir=relative).service_database_url == f"sqlite:///{(relative / 'service.db').resolve()}"
    url = "postgresql+psycopg://ledger@db/ledger"
    assert ServiceSettings(data_dir=tmp_path, database_url=url).service_database_url == url


def test_no_module_builds_a_database_url_of_its_own() -> None:
    """The serve runtime, the CLI and the offline tools built the default URL each (three copies, which
    had to agree); now `ServiceSettings.service_database_url` does, and the vault's opener its own."""
    building = {
        str(path.relative_to(PROJECT_ROOT))
        for path in (PROJECT_ROOT / "api").rglob("*.py")
        if "sqlite:///" in path.read_text(encoding="utf-8")
    }
    assert building == {"api/settings.py", "api/secrets.py"}
