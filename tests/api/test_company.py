"""The company's name, logo, privacy notice and contact on every page (`CONSENT_LEDGER_COMPANY_*`), as the
service sends them: escaped, linked, and the logo served as an image that runs nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from api.settings import ServiceSettings
from tests.api.conftest import running_service

LOGO = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8"><rect width="8" height="8" fill="#c00"/></svg>'


def test_every_page_names_the_company_and_links_its_notice_and_contact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logo = tmp_path / "logo.svg"
    logo.write_text(LOGO)
    monkeypatch.setenv("CONSENT_LEDGER_COMPANY_NAME", 'Fish & <Chips> "Ltd"')
    monkeypatch.setenv("CONSENT_LEDGER_COMPANY_CONTACT", "dpo@fish.example")
    monkeypatch.setenv("CONSENT_LEDGER_COMPANY_PRIVACY_URL", "https://fish.example/privacy?a=1&b=2")
    monkeypatch.setenv("CONSENT_LEDGER_COMPANY_LOGO", str(logo))
    with running_service(tmp_path / "service") as service:
        for path in ("/", "/auditor", "/api/v1/docs"):
            page = service.client.get(path)
            assert page.status_code == 200, path
            html = page.text
            assert "Fish &amp; &lt;Chips&gt; &quot;Ltd&quot;" in html, path  # escaped, never markup
            assert "<Chips>" not in html
            assert '<a href="https://fish.example/privacy?a=1&amp;b=2">Privacy notice</a>' in html, path
            assert '<a href="mailto:dpo@fish.example">dpo@fish.example</a>' in html, path
            assert page.headers["content-security-policy"].startswith("default-src 'self'")
        for path in ("/", "/auditor"):  # the portals show the name (and logo) at the top
            html = service.client.get(path).text
            header = html[html.index("<header>") : html.index("</header>")]
            assert 'class="company"' in header
            assert 'src="/static/company/logo"' in header
        served = service.client.get("/static/company/logo")
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/svg+xml"
        assert served.headers["content-security-policy"].startswith("default-src 'none'")  # opened alone: inert
        assert served.text == LOGO
        assert service.client.get("/favicon.ico").text == LOGO  # the company's logo is its icon too


def test_without_a_logo_or_notice_the_pages_say_what_there_is(tmp_path: Path) -> None:
    with running_service(tmp_path / "service") as service:
        html = service.client.get("/").text
        assert "Example Retail Ltd" in html
        assert "Privacy notice" not in html  # no address set: no dead link
        assert "mailto:privacy@example.com" in html
        assert "/static/company/logo" not in html
        assert service.client.get("/static/company/logo").status_code == 404
        icon = service.client.get("/favicon.ico")  # browsers ask for it whatever the page says
        assert icon.status_code == 200
        assert icon.headers["content-type"].startswith("image/svg+xml")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("company_name", "Line one\nLine two"),
        ("company_name", ""),
        ("company_contact", "dpo@x.example\r\nBcc: all@x.example"),
        ("company_privacy_url", "javascript:alert(1)"),
        ("company_privacy_url", "https://user:pw@x.example/privacy"),
        ("company_logo", "/etc/passwd"),
        ("company_logo", "/nowhere/logo.png"),
    ],
)
def test_company_settings_that_would_break_a_page_are_refused(tmp_path: Path, field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ServiceSettings(data_dir=tmp_path, **{field: value})  # type: ignore[arg-type]
