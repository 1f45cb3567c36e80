"""Sign-in is bound to the service's public origin (`CONSENT_LEDGER_PUBLIC_ORIGIN`), not to the Host a
request names: a phishing site that relays challenges gets messages naming the real site, which the
customer's wallet flags, and a message naming another site does not sign in."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api import auth
from api.settings import ServiceSettings
from tests.api.conftest import Service, siwe_signed

pytestmark = pytest.mark.anvil


def test_a_challenge_names_the_services_origin_whatever_host_is_asked(service: Service) -> None:
    customer = service.new_customer()
    origin = f"http://127.0.0.1:{service.runtime.service.port}"  # the default: the API's own address
    challenge = service.client.post(
        "/api/v1/auth/siwe/challenge", json={"address": customer.account.address}, headers={"Host": "evil.example"}
    )
    assert challenge.status_code == 201, challenge.text
    message = challenge.json()["message"]
    assert message.startswith(f"127.0.0.1:{service.runtime.service.port} wants you to sign in")
    assert f"\nURI: {origin}\n" in message
    assert "evil.example" not in message
    signed_in = service.client.post("/api/v1/auth/siwe", json=siwe_signed(customer.account, message))
    assert signed_in.status_code == 200, signed_in.text
    assert signed_in.json()["did"] == customer.did


def test_a_message_for_another_origin_does_not_sign_in(service: Service) -> None:
    customer = service.new_customer()
    runtime = service.runtime
    # Authentic (this service's MAC) but naming another site, as the service issued for any Host before.
    for origin in ("http://evil.example", f"https://127.0.0.1:{runtime.service.port}"):
        issued = auth.issue_challenge(
            runtime.signin_key,
            address=customer.account.address,
            origin=origin,
            chain_id=runtime.ledger.deployment.chain_id,
        )
        refused = service.client.post("/api/v1/auth/siwe", json=siwe_signed(customer.account, issued.message))
        assert refused.status_code == 401, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "wrong_origin"
        assert refused.json()["detail"] == f"the message is for another site; sign in at {runtime.service.origin}"
    # Nothing was recorded for them: the customer still signs in.
    assert service.sign_in(customer.account).status_code == 200


def test_the_public_origin_setting() -> None:
    assert ServiceSettings(host="10.1.2.3", port=9000).origin == "http://10.1.2.3:9000"
    assert ServiceSettings(host="::1", port=9000).origin == "http://[::1]:9000"
    assert ServiceSettings(public_origin="https://Ledger.Example.com/").origin == "https://ledger.example.com"
    assert ServiceSettings(public_origin="https://ledger.example.com:8443").origin == "https://ledger.example.com:8443"
    for wrong in ("ledger.example.com", "ftp://ledger.example.com", "https://ledger.example.com/portal", "https://"):
        with pytest.raises(ValidationError, match="origin"):
            ServiceSettings(public_origin=wrong)


def test_serve_warns_when_customers_cannot_be_at_the_default_origin() -> None:
    """Listening on every interface, or in production (behind a proxy or a name), the default origin
    (the API's own address) is not where customers are: every sign-in would make their wallet warn."""
    assert ServiceSettings(host="127.0.0.1", port=8000).origin_warning() is None
    assert ServiceSettings(host="0.0.0.0", public_origin="https://ledger.example.com").origin_warning() is None  # noqa: S104
    warning = ServiceSettings(host="0.0.0.0", port=8000).origin_warning()  # noqa: S104
    assert warning is not None
    assert "CONSENT_LEDGER_PUBLIC_ORIGIN" in warning
    assert "http://0.0.0.0:8000" in warning
    assert ServiceSettings(host="127.0.0.1", mode="production").origin_warning() is not None
