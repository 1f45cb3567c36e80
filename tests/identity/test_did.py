"""DIDs: W3C DID Core syntax, did:web paths, and W3C DID resolution results and errors."""

from __future__ import annotations

import pytest

from identity.did import DidWeb, Resolver, is_did
from identity.errors import InvalidDid
from identity.normalize import PII
from identity.types import Subject
from identity.vault import Vault

HOST = "ledger.example.com%3A8443"


@pytest.mark.parametrize(
    "did",
    [
        "did:web:example.com",
        "did:web:localhost%3A8000:dids:00ff",
        "did:example:123456789abcdefghi",
        "did:ethr:0x1:0xb9c5714089478a327f09197987f16f9e5d936e8a",
        "did:a1:b:c:d",
    ],
)
def test_valid_did_syntax(did: str) -> None:
    assert is_did(did)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "did:",
        "did:web:",
        "did:Web:example.com",
        "did:web:exa mple.com",
        "did:web:example.com:",
        "did:web:example.com#key",
        "did:web:example.com/path",
        "did:web:%zz",
        "urn:web:example.com",
    ],
)
def test_invalid_did_syntax(bad: str) -> None:
    assert not is_did(bad)


def test_did_web_round_trip_and_document_path() -> None:
    method = DidWeb(HOST)
    subject = Subject(bytes(range(32)))
    did = method.did(subject)
    assert did == f"did:web:{HOST}:dids:" + bytes(range(32)).hex()
    assert is_did(did)
    assert method.subject(did) == subject
    assert method.document_path(subject) == "/dids/" + bytes(range(32)).hex() + "/did.json"
    with pytest.raises(ValueError, match="did:web host"):
        DidWeb("local host")


@pytest.mark.parametrize(
    ("did", "reason"),
    [
        ("not a did", "W3C DID Core syntax"),
        ("did:web:other.example:dids:" + "00" * 32, "not a DID issued here"),
        (f"did:web:{HOST}:dids:" + "0" * 63, "64 lower-case hex"),
        (f"did:web:{HOST}:dids:" + "AB" * 32, "64 lower-case hex"),
    ],
)
def test_foreign_or_malformed_dids_are_refused(did: str, reason: str) -> None:
    with pytest.raises(InvalidDid, match=reason):
        DidWeb(HOST).subject(did)


@pytest.fixture
def resolver(vault: Vault) -> Resolver:
    return Resolver(DidWeb(HOST), vault)


def test_resolution_errors_are_named_as_the_spec_names_them(resolver: Resolver) -> None:
    invalid = resolver.resolve("did:nope")
    assert invalid["didDocument"] is None
    assert invalid["didResolutionMetadata"]["error"] == "invalidDid"
    missing = resolver.resolve(DidWeb(HOST).did(Subject(b"\x07" * 32)))
    assert missing["didResolutionMetadata"]["error"] == "notFound"
    assert missing["didDocumentMetadata"] == {}


def test_a_subject_resolves_to_its_document_with_the_bound_key(resolver: Resolver, vault: Vault) -> None:
    subject, _ = vault.enrol(PII(email="ann@example.com"))
    did = DidWeb(HOST).did(subject)
    unbound = resolver.resolve(did)
    assert unbound["didResolutionMetadata"] == {"contentType": "application/did+ld+json"}
    assert "verificationMethod" not in unbound["didDocument"]

    controller = "0x" + "Ab" * 20
    vault.set_controller(subject, controller, 31337)
    result = resolver.resolve(did)
    document = result["didDocument"]
    key_id = f"{did}#controller-key"
    assert document == {
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/suites/secp256k1recovery-2020/v2"],
        "id": did,
        "controller": did,
        "verificationMethod": [
            {
                "id": key_id,
                "type": "EcdsaSecp256k1RecoveryMethod2020",
                "controller": did,
                "blockchainAccountId": f"eip155:31337:{controller}",
            }
        ],
        "authentication": [key_id],
        "assertionMethod": [key_id],
    }
    assert set(result["didDocumentMetadata"]) == {"created", "updated"}
    assert result["didDocumentMetadata"]["created"].endswith("Z")
    assert "ann" not in str(result)


def test_an_erased_subject_resolves_as_deactivated(resolver: Resolver, vault: Vault) -> None:
    subject, _ = vault.enrol(PII(email="ann@example.com"))
    vault.set_controller(subject, "0x" + "ab" * 20, 31337)
    vault.erase(subject)
    result = resolver.resolve(DidWeb(HOST).did(subject))
    assert result["didDocumentMetadata"]["deactivated"] is True
    assert "verificationMethod" not in result["didDocument"]
