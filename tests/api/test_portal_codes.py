"""Short redemption codes in the portal, on a desktop and a phone: the customer makes a code (shown big,
grouped, with its QR code), a partner redeems it by typing it into its till (the API), and the customer
cancels another; refusals are said beside the control that caused them. Screenshots in
test-artifacts/screenshots/."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.api.test_portal import Served, _claim, _enrol, _fits, _page, _principal, _shot, service
from tests.conftest import accessibility_violations

__all__ = ["service"]  # the served fixture, imported for this module's tests

pytestmark = [pytest.mark.anvil, pytest.mark.slow]
GROUPED = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{2}$")


@pytest.fixture(scope="module")
def issuer(service: Served) -> dict[str, str]:
    key, _ = _principal(service.env, "issuer", "codes-issuer")
    return {"X-API-Key": key}


def _till(service: Served, body: dict[str, Any]) -> httpx.Response:
    """The partner's till: a redemption by the code the customer shows."""
    headers = {"X-API-Key": service.partner_key, "Idempotency-Key": str(uuid.uuid4())}
    return service.client.post("/api/v1/points/redemptions", json=body, headers=headers)


def _make_code(page: Page, amount: int) -> None:
    page.locator("#redeem-partner").select_option("acme")
    page.get_by_role("spinbutton", name="Points").fill(str(amount))
    page.get_by_role("button", name="Create code").click()


@pytest.mark.parametrize("phone", [False, True], ids=["desktop", "phone"])
def test_a_customer_makes_a_code_a_partner_redeems_it_and_the_customer_cancels_another(
    service: Served, browser: Browser, issuer: dict[str, str], phone: bool
) -> None:
    size = "phone" if phone else "desktop"
    did, claim, _email = _enrol(service)
    page = _page(browser, service, phone=phone)
    page.goto("/")
    _claim(page, did, claim)
    expect(page.locator("#did")).to_have_text(did)
    issued = service.client.post(
        "/api/v1/points/issuances", json={"issuances": [{"did": did, "amount": 500}]}, headers=issuer
    )
    assert issued.status_code == 201, issued.text
    expect(page.locator("#balance")).to_have_text("500", timeout=30_000)
    expect(page.locator("#codes")).to_contain_text("No outstanding codes.")

    # More than the balance: refused when made, said beside the form.
    _make_code(page, 501)
    expect(page.locator("#redeem-form .note.error")).to_have_text("You do not have that many points. Choose fewer.")

    # A code: short, grouped, with its QR code, and listed as outstanding.
    _make_code(page, 120)
    shown = page.locator("#redemption-code")
    expect(shown).to_have_text(GROUPED)
    code = shown.inner_text()
    expect(page.locator("#code-label")).to_contain_text("Show this code to acme. It works once, for 120 points")
    qr = page.locator("#redemption-qr")
    expect(qr).to_be_visible()
    assert (qr.get_attribute("src") or "").startswith("data:image/svg+xml")
    expect(qr).to_have_attribute("alt", f"QR code of the code {code}")
    expect(page.locator(f"#codes tr[data-code='{code}']")).to_contain_text("120")
    if phone:
        _fits(page)
        # On a phone the outstanding codes are cards, each value named: nothing to scroll sideways for.
        box = "document.querySelector('#codes').parentElement"
        assert page.evaluate(f"{box}.scrollWidth <= {box}.clientWidth + 1")
        expect(page.locator(f"#codes tr[data-code='{code}'] td").first).to_have_attribute("data-label", "Code")
    _shot(page, f"customer-code-{size}")
    assert accessibility_violations(page) == []

    # The partner types it at the till, in lower case and with spaces, with its order reference.
    redeemed = _till(service, {"code": code.lower().replace("-", " "), "reference": "order-1042"})
    assert redeemed.status_code == 200, redeemed.text
    assert (redeemed.json()["balance"], redeemed.json()["reference"]) == (380, "order-1042")
    expect(page.locator("#balance")).to_have_text("380", timeout=30_000)
    expect(page.locator("#history")).to_contain_text("their ref. order-1042")
    expect(page.locator(f"#codes tr[data-code='{code}']")).to_have_count(0)
    assert _till(service, {"code": code}).json()["code"] == "code_used"

    # Another code, and a third for the same partner refused beside the form while it is outstanding.
    _make_code(page, 50)
    expect(shown).not_to_have_text(code)
    other = shown.inner_text()
    assert GROUPED.match(other)
    _make_code(page, 10)
    expect(page.locator("#redeem-form .note.error")).to_have_text(
        "You already have a code for this partner. Use it, or cancel it below, then make a new one."
    )

    # The customer cancels it: gone from the list, and the partner's till is refused.
    row = page.locator(f"#codes tr[data-code='{other}']")
    row.get_by_role("button", name=f"Cancel code {other}").click()
    expect(page.locator("#status")).to_contain_text(f"Code {other} is cancelled")
    expect(row).to_have_count(0)
    expect(page.locator("#codes")).to_contain_text("No outstanding codes.")
    expect(page.locator("#redeem-result")).to_be_hidden()
    refused = _till(service, {"code": other})
    assert (refused.status_code, refused.json()["code"]) == (409, "code_cancelled")
    expect(page.locator("#balance")).to_have_text("380")
    if phone:
        _fits(page)
    _shot(page, f"customer-code-cancelled-{size}")
    assert accessibility_violations(page) == []
    page.context.close()
