"""Shared test policy: under CI=true a skipped test is a failure (nothing may be silently missing)."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from sqlalchemy import Engine, create_engine, delete

from ledger.leader import LeaderCall
from ledger.settings import PROJECT_ROOT
from tests import postgres

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which is not allowed: {report.longrepr}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL server (one per test session) for what must work on both databases."""
    if not postgres.available():
        pytest.skip("PostgreSQL server binaries are not installed")
    with postgres.postgres_server() as url:
        yield url


@pytest.fixture
def calls_db(postgres_url: str) -> Iterator[Engine]:
    """A PostgreSQL database with the table of the calls a standby asks the leader to make (emptied after)."""
    engine = create_engine(postgres_url)
    LeaderCall.__table__.create(engine, checkfirst=True)  # type: ignore[attr-defined]
    yield engine
    with engine.begin() as connection:
        connection.execute(delete(LeaderCall))
    engine.dispose()


# Pages are tested in a real browser: Debian's Chromium, driven by Playwright (its own download is not used).
CHROMIUM = Path(os.environ.get("CONSENT_LEDGER_CHROMIUM", "/usr/bin/chromium"))
SHOTS = PROJECT_ROOT / "test-artifacts" / "screenshots"
AXE = PROJECT_ROOT / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (make setup installs Debian's chromium)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-dev-shm-usage"],  # root; small /dev/shm in containers
        )
        yield launched
        launched.close()


def accessibility_violations(page: Page) -> list[str]:
    """axe-core's (npm) serious and critical WCAG 2 A/AA violations on the page (contrast, labels, ...)."""
    # Evaluated through the devtools protocol: the page's own CSP (no inline script) stays in force.
    page.evaluate(AXE.read_text(encoding="utf-8"))
    found: list[str] = page.evaluate(
        "async () => (await axe.run(document, {runOnly: ['wcag2a', 'wcag2aa']})).violations"
        ".filter(v => ['serious', 'critical'].includes(v.impact)).map(v => v.id + ': ' + v.help)"
    )
    return found
