"""Keys people cannot lose (issue 32), end to end in the portal: Playwright drives Debian's Chromium
against a real service (managed anvil, in this process so that the test can move the chain's clock).

A customer downloads an encrypted backup of their key (the Web3 Secret Storage format wallets read)
and restores it in a fresh browser; a customer who lost their key recovers with the operator's code
on a "new device" (a fresh browser context), the old key sees the recovery and, in another case,
vetoes it. Desktop and phone sizes, axe-core finds no violation, screenshots in
test-artifacts/screenshots/."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from playwright.sync_api import Browser, Page, ViewportSize, expect

from tests.api.conftest import Service, q, running_service
from tests.conftest import SHOTS, accessibility_violations

PASSPHRASE = "correct horse battery"
BACKUP_PASSPHRASE = "a different long phrase"
PHONE = ViewportSize(width=390, height=844)
DESKTOP = ViewportSize(width=1280, height=900)
RECOVERY_DELAY = 72 * 3600  # the contract's default
SIZES = pytest.mark.parametrize("phone", [False, True], ids=["desktop", "phone"])

pytestmark = [pytest.mark.anvil, pytest.mark.slow]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("portal-recovery")) as running:
        yield running


def _page(browser: Browser, service: Service, *, phone: bool) -> Page:
    """A fresh browser context: a new device, with nothing in its storage."""
    context = browser.new_context(
        base_url=str(service.client.base_url).rstrip("/"), viewport=PHONE if phone else DESKTOP, accept_downloads=True
    )
    page = context.new_page()
    page.set_default_timeout(60_000)  # scrypt of a keystore takes seconds on a busy machine
    return page


def _shot(page: Page, name: str, phone: bool) -> None:
    page.screenshot(path=str(SHOTS / f"{name}-{'phone' if phone else 'desktop'}.png"), full_page=True)


def _checked(page: Page, phone: bool) -> None:
    assert accessibility_violations(page) == []
    if phone:  # nothing overflows sideways
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def _claimed(browser: Browser, service: Service, *, phone: bool) -> tuple[Page, str, str]:
    """A customer who claimed their DID in this browser (its key made and kept here), signed in."""
    response = service.client.post(
        "/api/v1/customers", json={"email": f"keys.{uuid.uuid4().hex[:8]}@example.com"}, headers=service.operator()
    )
    assert response.status_code == 201, response.text
    page = _page(browser, service, phone=phone)
    page.goto(response.json()["claim_url"])
    page.locator("#claim-form").get_by_label("New passphrase").fill(PASSPHRASE)
    page.get_by_role("button", name="Create my key and claim").click()
    did = response.json()["did"]
    expect(page.locator("#did")).to_have_text(did)
    return page, did, page.locator("#address").inner_text()


def _history(page: Page) -> Any:
    return page.locator("#key-history li")


@SIZES
def test_a_key_backup_is_downloaded_and_restored_on_a_new_device(
    service: Service, browser: Browser, tmp_path: Path, phone: bool
) -> None:
    page, did, address = _claimed(browser, service, phone=phone)
    expect(_history(page)).to_have_count(1)
    expect(_history(page).first).to_contain_text("Key bound")
    page.get_by_text("Back up your key").click()  # folded until asked for: the phone page stays short
    page.get_by_label("Backup passphrase").fill(BACKUP_PASSPHRASE)
    with page.expect_download() as download:
        page.get_by_role("button", name="Download backup").click()
    expect(page.locator("#backup-form .note.ok")).to_contain_text("Backup downloaded")
    _checked(page, phone)
    _shot(page, "key-backup", phone)
    assert download.value.suggested_filename == f"consent-ledger-key-{address}.json"
    backup = tmp_path / download.value.suggested_filename
    download.value.save_as(backup)
    keystore = json.loads(backup.read_text(encoding="utf-8"))
    # The standard a wallet imports: Web3 Secret Storage v3, scrypt; eth_account opens it.
    crypto = keystore.get("crypto") or keystore["Crypto"]  # ethers writes "Crypto", as geth does
    assert (keystore["version"], crypto["kdf"], crypto["cipher"]) == (3, "scrypt", "aes-128-ctr")
    assert Account.from_key(Account.decrypt(keystore, BACKUP_PASSPHRASE)).address == address
    page.context.close()

    fresh = _page(browser, service, phone=phone)
    fresh.goto("/")
    fresh.get_by_text("Restore your key from a backup file").click()
    form = fresh.locator("#restore-form")
    form.get_by_label("Backup file").set_input_files(str(backup))
    form.get_by_label("Passphrase of the backup").fill("not the passphrase")
    form.get_by_role("button", name="Restore and sign in").click()
    expect(form.locator(".note.error")).to_have_text("That passphrase does not open this backup.")
    _checked(fresh, phone)
    form.get_by_label("Passphrase of the backup").fill(BACKUP_PASSPHRASE)
    form.get_by_role("button", name="Restore and sign in").click()
    expect(fresh.locator("#did")).to_have_text(did)
    expect(fresh.locator("#address")).to_have_text(address)
    expect(fresh.locator("#status")).to_contain_text("Key restored from your backup")
    _shot(fresh, "key-restored", phone)
    # Kept in this browser now, sealed under the backup's passphrase: it unlocks after signing out.
    fresh.get_by_role("button", name="Sign out").click()
    fresh.get_by_label("Passphrase", exact=True).fill(BACKUP_PASSPHRASE)
    fresh.get_by_role("button", name="Unlock and sign in").click()
    expect(fresh.locator("#did")).to_have_text(did)
    fresh.context.close()


def test_the_old_key_sees_a_recovery_and_vetoes_it(service: Service, browser: Browser) -> None:
    """Before the tests that move the chain's clock: a veto carries a deadline of this machine's time."""
    page, did, address = _claimed(browser, service, phone=False)
    code = service.client.post(f"/api/v1/customers/{q(did)}/recovery-claims", headers=service.operator())
    assert code.status_code == 201, code.text
    hostile = Account.create()
    prepared = service.client.post(
        f"/api/v1/customers/{q(did)}/recovery/prepare",
        json={"claim_code": code.json()["claim_code"], "address": hostile.address},
    ).json()["typed_data"]
    started = service.client.post(
        f"/api/v1/customers/{q(did)}/recovery",
        json={
            "claim_code": code.json()["claim_code"],
            "typed_data": prepared,
            "signature": service.sign_typed(hostile, prepared),
        },
    )
    assert started.status_code == 200, started.text
    alert = page.locator("#recovery-alert")
    expect(alert).to_be_visible(timeout=30_000)  # the page looks every 5 s
    expect(alert).to_contain_text(hostile.address[:8])
    expect(_history(page).first).to_contain_text("Recovery to this key started")
    assert accessibility_violations(page) == []
    _shot(page, "recovery-seen-by-the-old-key", False)
    page.get_by_role("button", name="Cancel this recovery").click()
    expect(page.locator("#status")).to_have_text("Recovery cancelled: your key stays in control.")
    expect(alert).to_be_hidden()
    expect(_history(page).first).to_contain_text("Recovery to this key cancelled")
    _shot(page, "recovery-vetoed", False)
    assert service.runtime.ledger.consent.controller_of(service.runtime.dids.subject(did)) == address
    page.context.close()

    # An auditor sees the same from the ledger's events: bound, recovery started, vetoed.
    auditor = _page(browser, service, phone=False)
    auditor.goto("/auditor")
    auditor.get_by_label("API key").fill(service.auditor_key)
    auditor.get_by_role("button", name="Sign in").click()
    auditor.get_by_label("Key history of DID").fill(did)
    auditor.get_by_role("button", name="Show").click()
    events = auditor.locator("#key-history li")
    expect(events).to_have_count(3)
    assert [events.nth(i).get_attribute("data-event") for i in range(3)] == [
        "bound",
        "recovery_started",
        "recovery_cancelled",
    ]
    expect(events.nth(1)).to_contain_text(hostile.address)
    expect(events.nth(1)).to_contain_text("effective from")
    assert accessibility_violations(auditor) == []
    _shot(auditor, "auditor-key-history", False)
    auditor.set_viewport_size(PHONE)
    _checked(auditor, True)
    _shot(auditor, "auditor-key-history", True)
    auditor.context.close()


@SIZES
def test_a_lost_key_is_recovered_with_the_operators_code(service: Service, browser: Browser, phone: bool) -> None:
    old, did, old_address = _claimed(browser, service, phone=phone)
    issued = service.client.post(f"/api/v1/customers/{q(did)}/recovery-claims", headers=service.operator())
    assert issued.status_code == 201, issued.text

    # The new device opens the operator's link: the DID and the code are filled in.
    new = _page(browser, service, phone=phone)
    new.goto(issued.json()["claim_url"])
    form = new.locator("#recover-form")
    expect(form.get_by_label("DID to recover")).to_have_value(did)
    expect(form.get_by_label("Recovery code")).to_have_value(issued.json()["claim_code"])
    assert new.evaluate("location.hash") == ""
    form.get_by_label("Passphrase for the new key").fill(PASSPHRASE)
    form.get_by_role("button", name="Make a new key and start the recovery").click()
    expect(form.locator(".note.ok")).to_contain_text("Recovery started")
    expect(new.locator("#pending-recovery")).to_be_visible()
    _checked(new, phone)
    _shot(new, "recovery-started", phone)

    # Too early: the page says from when.
    new.get_by_role("button", name="Finish recovery").click()
    expect(new.locator("#pending-recovery .note.error")).to_contain_text("Your new key takes effect from")

    # The old key, still signed in elsewhere, is told.
    expect(old.locator("#recovery-alert")).to_be_visible(timeout=30_000)
    _checked(old, phone)
    old.context.close()

    service.runtime.ledger.backend.increase_time(RECOVERY_DELAY)
    new.get_by_role("button", name="Finish recovery").click()
    expect(new.locator("#unlock-form .note.ok")).to_contain_text("Your new key is in effect")
    new.get_by_label("Passphrase", exact=True).fill(PASSPHRASE)
    new.get_by_role("button", name="Unlock and sign in").click()
    expect(new.locator("#did")).to_have_text(did)
    new_address = new.locator("#address").inner_text()
    assert new_address != old_address
    expect(_history(new)).to_have_count(3)
    expect(_history(new).first).to_contain_text("Key bound")
    expect(_history(new).first.locator("code").first).to_have_attribute("title", new_address)
    expect(new.locator("#recovery-alert")).to_be_hidden()
    _checked(new, phone)
    _shot(new, "recovery-completed", phone)
    subject = service.runtime.dids.subject(did)
    assert service.runtime.ledger.consent.controller_of(subject) == new_address
    assert not re.search(old_address[2:].lower(), json.dumps(new.evaluate("Object.values(localStorage)")).lower())
    new.context.close()
