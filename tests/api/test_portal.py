"""The portal end to end: Playwright drives Debian's headless Chromium (/usr/bin/chromium) against a
real `consent-ledger serve` process (managed anvil, relayer, indexer, API and pages); principals and
the bridge export are made with the command line, as an operator would. A customer claims their DID with a key made
in the browser, grants and revokes, sees an access appear after a bridge export, and authorises a
redemption that a partner then redeems; an auditor searches, verifies and exports the log.
Screenshots are kept in test-artifacts/screenshots/."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from playwright.sync_api import Browser, Page, Route, ViewportSize, expect

from ledger.anvil import free_port
from ledger.settings import PROJECT_ROOT
from tests.api.conftest import CLI, ApiClient, Customer, interrupt, q, serve_env, wait_healthy
from tests.conftest import SHOTS, accessibility_violations

PASSPHRASE = "correct horse battery"
ANALYTICS = "Analytics reporting"
PHONE = ViewportSize(width=390, height=844)
DESKTOP = ViewportSize(width=1280, height=900)

pytestmark = [pytest.mark.anvil, pytest.mark.slow]


@dataclass
class Served(ApiClient):
    """`consent-ledger serve` in its own process, and the command line beside it."""

    env: dict[str, str] = field(kw_only=True)

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [*CLI, *args], env=self.env, capture_output=True, text=True, timeout=300, check=False, cwd=PROJECT_ROOT
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


def _principal(env: dict[str, str], role: str, name: str) -> tuple[str, str | None]:
    done = subprocess.run(
        [*CLI, "principals", "add", "--role", role, "--name", name],
        env=env, capture_output=True, text=True, timeout=120, check=True, cwd=PROJECT_ROOT,
    )  # fmt: skip
    key = re.search(r"api key: (\S+)", done.stdout)
    address = re.search(r"address: (0x[0-9a-fA-F]{40})", done.stdout)
    assert key is not None, done.stdout
    return key.group(1), address.group(1) if address else None


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data_dir, port = tmp_path_factory.mktemp("serve"), free_port()
    env = serve_env(CONSENT_LEDGER_DATA_DIR=str(data_dir), CONSENT_LEDGER_PORT=str(port))
    operator_key, _ = _principal(env, "operator", "crm-operator")
    partner_key, partner_address = _principal(env, "partner", "acme")
    auditor_key, _ = _principal(env, "auditor", "audit-firm")
    assert partner_address is not None
    process = subprocess.Popen([*CLI, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(port, process)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield Served(
                client=client,
                operator_key=operator_key,
                partner_key=partner_key,
                auditor_key=auditor_key,
                partner_address=partner_address,
                env=env,
            )
    finally:
        interrupt(process)


def _page(browser: Browser, service: Served, *, phone: bool = False, **options: Any) -> Page:
    context = browser.new_context(
        base_url=str(service.client.base_url).rstrip("/"),
        viewport=PHONE if phone else DESKTOP,
        accept_downloads=True,
        **options,
    )
    page = context.new_page()
    page.set_default_timeout(30_000)
    return page


def _shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _fits(page: Page) -> None:
    """Nothing overflows a phone-sized screen sideways (wide tables scroll inside their own box)."""
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def _enrol(service: Served) -> tuple[str, str, str]:
    email = f"portal.{uuid.uuid4().hex[:8]}@example.com"
    response = service.client.post(
        "/api/v1/customers", json={"email": email, "name": "Portal Person"}, headers=service.operator()
    )
    assert response.status_code == 201, response.text
    return response.json()["did"], response.json()["claim_code"], email


def _claim(page: Page, did: str, claim: str) -> None:
    page.get_by_label("Your DID").fill(did)
    page.get_by_label("Claim code").fill(claim)
    page.get_by_label("New passphrase").first.fill(PASSPHRASE)
    page.get_by_role("button", name="Create my key and claim").click()


def _unlock(page: Page, address: str | None = None) -> None:
    if address is not None:
        page.get_by_role("combobox", name=re.compile(r"^Key")).select_option(address)
    page.get_by_label("Passphrase", exact=True).fill(PASSPHRASE)
    page.get_by_role("button", name="Unlock and sign in").click()


def _stored_addresses(page: Page) -> set[str]:
    """Every address anywhere in the page's localStorage: the keys it holds, sealed or pending."""
    stored = page.evaluate("JSON.stringify(Object.values(localStorage))")
    return {address.lower() for address in re.findall(r"0x[0-9a-fA-F]{40}", stored)}


def _toggle(page: Page, attribute: str, purpose: str = ANALYTICS) -> Any:
    """The switch of one kind of data, in its purpose's "Which data" disclosure (opened if it is closed)."""
    card = page.locator("li.purpose", has=page.get_by_role("heading", name=purpose, exact=True))
    details = card.locator(".choice[data-partner='acme'] details")
    expect(details).to_have_count(1)
    if not details.evaluate("(details) => details.open"):
        details.locator("summary").click()
    return page.get_by_role("checkbox", name=f"Share {attribute} with acme for {purpose}")


def _switch(page: Page, purpose: str = ANALYTICS, partner: str = "acme") -> Any:
    """A purpose's switch for one partner: the default choice, all kinds of data at once."""
    return page.get_by_role("switch", name=f"Share with {partner} for {purpose}")


def _consents(service: Served, did: str) -> list[dict[str, Any]]:
    response = service.client.get(f"/api/v1/customers/{q(did)}/consents", headers=service.operator())
    assert response.status_code == 200, response.text
    return list(response.json())


def _consent_once(service: Served, did: str, purpose: str, attributes: list[str]) -> dict[str, Any]:
    """The customer's consent for `purpose`, once the API shows exactly `attributes` active on-chain.
    The page sends queued changes one after another, so between two of them it shows no pending
    change for a moment: the API, not the badge, says when both are in."""
    deadline = time.monotonic() + 30
    while True:
        found = [c for c in _consents(service, did) if c["purpose"] == purpose]
        assert len(found) <= 1, found
        consent = found[0] if found else None
        if consent and sorted(consent["attributes"]) == sorted(attributes) and consent["status"] == "active":
            return consent
        assert time.monotonic() < deadline, f"consent never became {attributes} active: {consent}"
        time.sleep(0.2)


def _bridge_export(service: Served, email: str, tmp_path: Path) -> None:
    crm = tmp_path / "crm.csv"
    with crm.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "order_ts", "amount", "age_band"])
        writer.writerow([email.upper(), "2026-01-05T10:00:00Z", "42.50", "25-34"])
        writer.writerow([email, "2026-02-11T12:30:00Z", "17.25", "25-34"])
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        '[pii]\nemail = "email"\n\n[columns]\norder_ts = "user.behavior.purchase_history"\n'
        'amount = "user.behavior.purchase_history"\nage_band = "user.demographic"\n',
        encoding="utf-8",
    )
    stats = json.loads(
        service.cli("bridge", "export", "--input", str(crm), "--mapping", str(mapping), "--partner", "acme",
                    "--purpose", "analytics.reporting", "--out", str(tmp_path / "out.parquet"))
    )  # fmt: skip
    assert stats["rows_released"] == 2


def _revocation_on_its_way(purpose: str, attribute: str) -> Any:
    """A route handler for the customer's consent listing that answers as the service does while a
    revocation of `attribute` for `purpose` is accepted and not yet on-chain: no longer permitted
    (deny wins), listed in pending_revoke."""

    def handle(route: Route) -> None:
        answer = route.fetch()
        consents = answer.json()
        for consent in consents:
            if consent["purpose"] == purpose:
                consent["pending_revoke"] = sorted({*consent["pending_revoke"], attribute})
                consent["attributes"] = [a for a in consent["attributes"] if a != attribute]
        route.fulfill(response=answer, json=consents)

    return handle


def test_a_customer_claims_grants_revokes_sees_accesses_and_authorises_a_redemption(
    service: Served, browser: Browser, tmp_path: Path
) -> None:
    did, claim, email = _enrol(service)
    page = _page(browser, service)
    page.goto("/")
    assert accessibility_violations(page) == []

    # Claim: the key is made in the browser and bound on-chain; the page signs in with it (EIP-4361).
    _claim(page, did, claim)
    expect(page.locator("#did")).to_have_text(did)
    address = page.locator("#address").inner_text()
    (stored,) = json.loads(page.evaluate("localStorage.getItem('consent-ledger.keys')"))
    assert set(stored) == {"address", "did", "salt", "iv", "sealed"}  # the key is stored only sealed
    assert (stored["address"], stored["did"]) == (address, did)
    assert _stored_addresses(page) == {address.lower()}  # nothing else is left beside it
    _shot(page, "customer-signed-in")

    # Grant two kinds of data for analytics (the second with the keyboard): turning on, then on.
    _toggle(page, "Purchase history").check()
    _toggle(page, "Demographic data").focus()
    page.keyboard.press("Space")
    row = page.locator(".choice[data-partner='acme'][data-purpose='analytics.reporting']")
    consent = _consent_once(service, did, "analytics.reporting", ["user.behavior.purchase_history", "user.demographic"])
    assert consent["tx_hash"].startswith("0x")
    expect(row.locator(".state")).to_have_text("On for 2 of 8 kinds of data", timeout=30_000)
    expect(row.locator(".badge.pending")).to_have_count(0)
    expect(_toggle(page, "Purchase history")).to_be_checked()
    expect(_toggle(page, "Demographic data")).to_be_checked()
    expect(_switch(page)).to_be_checked()
    _shot(page, "customer-consents-active")

    # Revoke one: in effect at once (deny wins while pending), then on-chain. While it is being recorded
    # the choice says what is in effect, and nothing "pending" beside the "In effect now" the page told
    # (held here: the listing shows the revocation still on its way).
    page.route("**/api/v1/customers/*/consents", _revocation_on_its_way("analytics.reporting", "user.demographic"))
    _toggle(page, "Demographic data").uncheck()
    expect(page.locator("#status")).to_contain_text("In effect now")
    expect(row.locator(".state")).to_have_text("On for 1 of 8 kinds of data")
    expect(row.locator(".badge.pending")).to_have_count(0)
    expect(_toggle(page, "Demographic data")).not_to_be_checked()
    _shot(page, "customer-revocation-recording")
    page.unroute("**/api/v1/customers/*/consents")
    expect(row.locator(".state")).to_have_text("On for 1 of 8 kinds of data", timeout=30_000)
    expect(_toggle(page, "Demographic data")).not_to_be_checked()
    (consent,) = [c for c in _consents(service, did) if c["purpose"] == "analytics.reporting"]
    assert consent["attributes"] == ["user.behavior.purchase_history"]

    # A bridge export for analytics: the access appears in the customer's timeline.
    _bridge_export(service, email, tmp_path)
    entry = page.locator("#accesses li[data-index]")
    expect(entry).to_have_count(1, timeout=30_000)
    expect(entry).to_contain_text("acme")
    expect(entry).to_contain_text("Analytics reporting")
    expect(entry).to_contain_text("Purchase history")
    expect(entry.locator(".badge.allowed")).to_have_count(1)
    _shot(page, "customer-accesses")

    # Points issued by the company, then a redemption code the customer makes for a partner.
    issuer_key, _ = _principal(service.env, "issuer", "points-issuer")
    issued = service.client.post(
        "/api/v1/points/issuances", json={"issuances": [{"did": did, "amount": 500}]}, headers={"X-API-Key": issuer_key}
    )
    assert issued.status_code == 201, issued.text
    expect(page.locator("#balance")).to_have_text("500", timeout=30_000)
    page.locator("#redeem-partner").select_option("acme")
    page.get_by_role("spinbutton", name="Points").fill("120")
    page.get_by_role("button", name="Create code").click()
    expect(page.locator("#redemption-code")).to_have_text(re.compile(r"^[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{2}$"))
    code = page.locator("#redemption-code").inner_text()
    redeemed = service.client.post(
        "/api/v1/points/redemptions",
        json={"code": code},
        headers={"X-API-Key": service.partner_key, "Idempotency-Key": str(uuid.uuid4())},
    )
    assert redeemed.status_code == 200, redeemed.text
    assert redeemed.json()["balance"] == 380
    expect(page.locator("#balance")).to_have_text("380", timeout=30_000)
    expect(page.locator("#history")).to_contain_text("redeemed")
    _shot(page, "customer-points")
    assert accessibility_violations(page) == []

    # Signed out, the key stays sealed in the browser: a wrong passphrase fails, the right one signs in.
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Passphrase", exact=True).fill("not the passphrase")
    page.get_by_role("button", name="Unlock and sign in").click()
    expect(page.locator("#unlock-form .note.error")).to_have_text("That passphrase does not unlock this key.")
    page.get_by_label("Passphrase", exact=True).fill(PASSPHRASE)
    page.get_by_role("button", name="Unlock and sign in").click()
    expect(page.locator("#did")).to_have_text(did)
    page.context.close()


def test_the_customer_pages_work_on_a_phone(service: Served, browser: Browser) -> None:
    did, claim, _email = _enrol(service)
    page = _page(browser, service, phone=True)
    page.goto("/")
    _fits(page)
    _claim(page, did, claim)
    expect(page.locator("#did")).to_have_text(did)
    _fits(page)
    _switch(page, "Personalised content").check()
    expect(page.locator("#status")).to_contain_text("On once it is on the ledger")
    _shot(page, "customer-phone")
    # A bad claim code is a clear error, not a silent failure.
    other = _page(browser, service, phone=True)
    other.goto("/")
    _claim(other, did, "WRONG-CODE-123")
    expect(other.locator("#claim-form .note.error")).to_contain_text("That claim code does not match this DID")
    page.context.close()
    other.context.close()


def _accessed(service: Served, tmp_path: Path) -> str:
    """A customer who granted acme their purchase history, and a bridge export that accessed it; the DID."""
    did, claim, email = _enrol(service)
    account = Account.create()
    assert service.bind(did, claim, account).status_code == 200
    customer = Customer(account=account, did=did, token=service.sign_in(account).json()["access_token"])
    granted = service.change(
        customer, action="grant", purpose="analytics.reporting", attributes=["user.behavior.purchase_history"]
    )
    service.wait_status(customer, granted.json()["id"], "active")
    _bridge_export(service, email, tmp_path)
    return did


@pytest.mark.parametrize("phone", [False, True], ids=["desktop", "phone"])
def test_the_claim_link_fills_in_the_did_and_the_code(service: Served, browser: Browser, phone: bool) -> None:
    """Claiming needed a 90-character DID pasted beside the code: the enrolment's `claim_url` opens the portal
    with both filled in (in the fragment: never sent to a server), and leaves nothing in the address bar."""
    enrolled = service.client.post(
        "/api/v1/customers", json={"email": f"link.{uuid.uuid4().hex[:8]}@example.com"}, headers=service.operator()
    ).json()
    link = enrolled["claim_url"]
    assert link.startswith(str(service.client.base_url).rstrip("/") + "/#")
    page = _page(browser, service, phone=phone)
    page.goto(link)
    form = page.locator("#claim-form")
    expect(form.get_by_label("Your DID")).to_have_value(enrolled["did"])
    expect(form.get_by_label("Claim code")).to_have_value(enrolled["claim_code"])
    expect(form.locator(".note.ok")).to_have_text(
        "Your DID and claim code are filled in: choose a passphrase to finish."
    )
    expect(form.get_by_label("New passphrase")).to_be_focused()
    assert page.evaluate("location.hash") == ""
    if phone:
        _fits(page)
    _shot(page, f"claim-link-{'phone' if phone else 'desktop'}")
    form.get_by_label("New passphrase").fill(PASSPHRASE)
    form.get_by_role("button", name="Create my key and claim").click()
    expect(page.locator("#did")).to_have_text(enrolled["did"])
    page.context.close()


def test_an_auditor_searches_verifies_and_exports(service: Served, browser: Browser, tmp_path: Path) -> None:
    did = _accessed(service, tmp_path)

    page = _page(browser, service)
    page.goto("/auditor")
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-form .note.error")).to_be_visible()
    page.get_by_label("API key").fill(service.auditor_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#log tbody tr").first).to_be_visible()
    assert accessibility_violations(page) == []

    page.get_by_role("button", name="Verify the log").click()
    expect(page.locator("#verification .badge.ok")).to_have_text("verified", timeout=30_000)
    _shot(page, "auditor-verified")

    page.get_by_label("Customer DID").fill(did)
    page.get_by_role("button", name="Search").click()
    rows = page.locator("#log tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("allowed")
    expect(rows.first).to_contain_text("acme")
    with page.expect_download() as download:
        page.get_by_role("button", name="Export CSV").click()
    saved = tmp_path / "accesses.csv"
    download.value.save_as(saved)
    lines = list(csv.DictReader(saved.open(encoding="utf-8")))
    assert [line["did"] for line in lines] == [did]
    _shot(page, "auditor-search")

    phone = _page(browser, service, phone=True)
    phone.goto("/auditor")
    phone.get_by_label("API key").fill(service.auditor_key)
    phone.get_by_role("button", name="Sign in").click()
    expect(phone.locator("#log tbody tr").first).to_be_visible()
    _fits(phone)
    _shot(phone, "auditor-phone")
    page.context.close()
    phone.context.close()


def test_the_auditors_export_holds_the_whole_log_and_the_page_says_what_it_shows(
    service: Served, browser: Browser, tmp_path: Path
) -> None:
    """The export stopped silently at 10,000 rows (one request, the API's most); From and To were local
    time beside a UTC table, unlabelled; the Data column showed attribute keys; a failure hid the request
    id. Here the export's page is made 2 rows, so the module's few entries take several pages."""
    for n in range(4):
        (tmp_path / str(n)).mkdir()
        _accessed(service, tmp_path / str(n))
    everything = service.client.get(
        "/api/v1/audit/accesses", params={"limit": 10_000}, headers={"X-API-Key": service.auditor_key}
    ).json()["entries"]
    assert len(everything) >= 5

    page = _page(browser, service)
    page.goto("/auditor")
    page.get_by_label("API key").fill(service.auditor_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#log tbody tr").first).to_be_visible()
    expect(page.get_by_label("From (UTC)")).to_be_visible()
    expect(page.get_by_label("To (UTC)")).to_be_visible()
    expect(page.locator("#log tbody")).to_contain_text("Purchase history")  # the attribute's name
    expect(page.locator("#log tbody")).not_to_contain_text("user.behavior.purchase_history")
    page.locator("#export").evaluate("button => { button.dataset.page = '2'; }")
    with page.expect_download() as download:
        page.get_by_role("button", name="Export CSV").click()
    saved = tmp_path / "all.csv"
    download.value.save_as(saved)
    exported = list(csv.DictReader(saved.open(encoding="utf-8")))
    assert [int(line["index"]) for line in exported] == [e["index"] for e in everything]
    expect(page.locator("#status")).to_have_text(f"CSV exported: {len(everything)} rows.")

    # A failure of the service's says so in plain words, with the reference that finds it in the log.
    def broken(route: Route) -> None:
        body = {"type": "/api/v1/problems/internal_error", "title": "Internal error", "status": 500,
                "code": "internal_error", "request_id": "req-4f2a9c"}  # fmt: skip
        route.fulfill(status=500, content_type="application/problem+json", body=json.dumps(body))

    page.route("**/api/v1/audit/verify", broken)
    page.get_by_role("button", name="Verify the log").click()
    expect(page.locator("#verify + .note.error")).to_have_text(
        "The service ran into a problem. Please try again in a few minutes. Reference: req-4f2a9c."
    )
    _shot(page, "auditor-export-and-failure")
    page.context.close()


def test_pages_load_nothing_from_elsewhere(service: Served) -> None:
    for path in ("/", "/auditor"):
        response = service.client.get(path)
        assert response.status_code == 200
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert "http" not in response.text.replace('lang="en"', "")
    ethers = service.client.get("/static/vendor/ethers.min.js")
    assert ethers.status_code == 200
    assert ethers.headers["content-type"].startswith("text/javascript")
    assert shutil.which("node") is not None  # the package came from npm at set-up


def test_a_customer_imports_a_key_made_elsewhere(service: Served, browser: Browser) -> None:
    did, claim, _email = _enrol(service)
    account = Account.create()  # e.g. a wallet's key, bound through the API
    assert service.bind(did, claim, account).status_code == 200
    page = _page(browser, service)
    page.goto("/")
    page.get_by_text("Import a key you already have").click()
    page.get_by_label("Private key (0x…)").fill("0x1234")
    page.locator("#import-form").get_by_label("New passphrase").fill(PASSPHRASE)
    page.get_by_role("button", name="Import and sign in").click()
    expect(page.locator("#import-form .note.error")).to_contain_text("not a private key")
    page.get_by_label("Private key (0x…)").fill("0x" + bytes(account.key).hex())
    page.get_by_role("button", name="Import and sign in").click()
    expect(page.locator("#did")).to_have_text(did)
    expect(page.locator("#address")).to_have_text(account.address)
    page.context.close()


def _claimed(browser: Browser, service: Served, *, phone: bool = False) -> tuple[Page, str, str]:
    """A page whose browser holds the bound key of a new customer, signed out; the DID and address."""
    did, claim, _email = _enrol(service)
    page = _page(browser, service, phone=phone)
    page.goto("/")
    _claim(page, did, claim)
    expect(page.locator("#did")).to_have_text(did)
    address = page.locator("#address").inner_text()
    page.get_by_role("button", name="Sign out").click()
    return page, did, address


def _as_earlier_pages_kept_it(page: Page) -> None:
    """Store the page's one key as the pages before this version did: alone, under `consent-ledger.key`."""
    page.evaluate(
        """() => {
            const [{ did, ...key }] = JSON.parse(localStorage.getItem("consent-ledger.keys"));
            localStorage.setItem("consent-ledger.key", JSON.stringify(key));
            localStorage.removeItem("consent-ledger.keys");
        }"""
    )
    page.reload()


def test_a_failed_claim_keeps_the_key_the_browser_holds(service: Served, browser: Browser) -> None:
    page, did, address = _claimed(browser, service)
    _as_earlier_pages_kept_it(page)  # as customers' browsers hold their keys today
    other_did, _claim_code, _email = _enrol(service)

    _claim(page, other_did, "WRONG-CODE-123")
    expect(page.locator("#claim-form .note.error")).to_contain_text("That claim code does not match this DID")
    assert _stored_addresses(page) == {address.lower()}  # not replaced, and no unbound key beside it

    page.reload()
    _unlock(page)
    expect(page.locator("#did")).to_have_text(did)
    expect(page.locator("#address")).to_have_text(address)
    stored = page.evaluate("[localStorage.getItem('consent-ledger.key'), localStorage.getItem('consent-ledger.keys')]")
    assert stored[0] is None  # moved to where keys are kept now, its DID noted
    assert [(key["address"], key["did"]) for key in json.loads(stored[1])] == [(address, did)]
    page.context.close()


@pytest.mark.parametrize("repeat", ["answered", "while_mining"])
def test_a_claim_cut_off_half_way_is_finished_after_a_reload(service: Served, browser: Browser, repeat: str) -> None:
    """The service binds the new key but the page is reloaded before the answer arrives: the reloaded
    page sends the binding again and keeps the key, beside the one the browser held. The route answers
    a repeat as the first time; while the first request is still being mined it refuses the repeat
    (its claim code is used, the chain does not bind the key yet), and the page asks the DID."""
    page, did, address = _claimed(browser, service)
    other_did, other_claim, _email = _enrol(service)
    answered: list[int] = []

    def hold(route: Route) -> None:
        if not answered:
            answered.append(route.fetch(timeout=60_000).status)  # bound; the answer never reaches the page
        elif repeat == "while_mining":
            problem = {"title": "The claim code is not valid for this customer", "status": 403}
            route.fulfill(status=403, json={**problem, "code": "invalid_claim_code"})
        else:
            route.continue_()

    page.route("**/api/v1/customers/*/controller", hold)
    _claim(page, other_did, other_claim)
    deadline = time.monotonic() + 60
    while not answered:
        assert time.monotonic() < deadline, "the binding request never came"
        page.wait_for_timeout(100)
    assert answered == [200]
    page.reload()

    expect(page.locator("#unlock-form .note.ok")).to_have_text(
        "Your claim is finished and its key is stored. Enter its passphrase to sign in."
    )
    expect(page.locator("#pending-claim")).to_be_hidden()
    _shot(page, f"customer-claim-finished-{repeat}")
    _unlock(page)  # the new key is the one chosen
    expect(page.locator("#did")).to_have_text(other_did)
    new_address = page.locator("#address").inner_text()
    assert _stored_addresses(page) == {address.lower(), new_address.lower()}
    page.get_by_role("button", name="Sign out").click()
    _unlock(page, address)
    expect(page.locator("#did")).to_have_text(did)
    page.context.close()


def _chain_away(route: Route) -> None:
    """The API's answer while the node is paused."""
    problem = {
        "type": "/api/v1/problems/chain_unavailable",
        "title": "The chain does not answer",
        "status": 503,
        "code": "chain_unavailable",
        "detail": "ReadTimeout",
    }
    route.fulfill(status=503, content_type="application/problem+json", body=json.dumps(problem))


@pytest.mark.parametrize("phone", [False, True], ids=["desktop", "phone"])
def test_the_ledger_away_is_said_beside_the_switch_and_the_claim_form(
    service: Served, browser: Browser, phone: bool
) -> None:
    """A 503 `chain_unavailable` from the API, or no answer at all, is said in plain words next to the
    control the customer used, and the page does not wait for ever."""
    size = "phone" if phone else "desktop"
    page, did, address = _claimed(browser, service, phone=phone)
    _unlock(page)
    expect(page.locator("#did")).to_have_text(did)
    page.route("**/api/v1/consents/prepare", _chain_away)  # the nonce comes from the chain
    toggle = _switch(page)
    toggle.click()
    expect(toggle).to_have_accessible_description(
        "Failed Not changed. The ledger is not answering right now. Please try again in a few minutes."
    )
    note = page.locator("#consents .note.error")
    expect(note).to_have_count(1)
    # Beside the switch used: the note is in the same choice as the focused switch.
    expect(page.locator("#consents .choice", has=page.locator(".note.error")).locator("input:focus")).to_have_count(1)
    expect(toggle).not_to_be_checked()
    expect(page.locator("body")).not_to_contain_text("chain_unavailable")
    assert _consents(service, did) == []
    _shot(page, f"customer-ledger-away-switch-{size}")
    assert accessibility_violations(page) == []

    # Claiming another account: the desktop page gets no answer at all, the phone a 503.
    page.get_by_role("button", name="Sign out").click()
    other_did, other_claim, _email = _enrol(service)
    if phone:
        page.route("**/controller/prepare", _chain_away)
        said = "The ledger is not answering right now. Please try again in a few minutes."
    else:
        page.route("**/controller/prepare", lambda route: None)  # never answered
        said = "The service did not answer within 15 seconds. Please try again in a few minutes."
    _claim(page, other_did, other_claim)
    expect(page.locator("#claim-form .note.error")).to_have_text(said, timeout=30_000)
    expect(page.get_by_role("button", name="Create my key and claim")).to_be_enabled()
    expect(page.locator("body")).not_to_contain_text("chain_unavailable")
    assert _stored_addresses(page) == {address.lower()}
    if phone:
        _fits(page)
    _shot(page, f"customer-ledger-away-claim-{size}")
    page.context.close()


@pytest.mark.parametrize("phone", [False, True], ids=["desktop", "phone"])
def test_the_api_reference_renders_offline_from_this_service_alone(
    service: Served, browser: Browser, phone: bool
) -> None:
    """`/api/v1/docs` loaded Swagger UI from a CDN: blank on a machine without internet. Every request the
    page makes is answered by this service (anything else is refused here, and recorded), no script or
    policy error is logged, and every operation of the OpenAPI document is listed."""
    page = _page(browser, service, phone=phone)
    origin = str(service.client.base_url).rstrip("/")
    elsewhere: list[str] = []
    errors: list[str] = []

    def only_here(route: Route) -> None:
        if route.request.url.startswith(origin + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto("/api/v1/docs")
    operations = sum(
        1
        for item in service.client.get("/api/v1/openapi.json").json()["paths"].values()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    )
    expect(page.locator(".opblock")).to_have_count(operations)
    expect(page.locator(".opblock-summary-path", has_text="/api/v1/consents/batch")).to_be_visible()
    page.locator(".opblock-summary", has_text="/api/v1/consents/batch").click()  # an operation opened
    expect(page.locator(".opblock-body").first).to_be_visible()
    _shot(page, f"api-reference-{'phone' if phone else 'desktop'}")
    # A problem's `type` is a page a person can read: on a phone too, and accessible.
    page.goto("/api/v1/problems/insufficient_points")
    expect(page.get_by_role("heading", name="insufficient_points")).to_be_visible()
    expect(page.get_by_text("Not enough unexpired points (HTTP 409)")).to_be_visible()
    _fits(page)
    assert accessibility_violations(page) == []
    _shot(page, f"problem-page-{'phone' if phone else 'desktop'}")
    assert elsewhere == []
    assert errors == []
    page.context.close()
