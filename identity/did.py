"""DIDs for subjects, with did:web, and W3C DID resolution.

did:web is a method standard resolvers understand: `did:web:HOST:dids:ID` resolves to
`https://HOST/dids/ID/did.json`, which this service serves. ID is the subject's hex; the subject is
a keyed pseudonym, already public on the chain, so the DID reveals nothing new. HOST is the
service's public host, with a port percent-encoded (`ledger.example.com`, `localhost%3A8000`).

The DID document lists the subject's bound key (the customer's wallet) as an
EcdsaSecp256k1RecoveryMethod2020 verification method with a CAIP-10 `blockchainAccountId`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from identity.errors import InvalidDid
from identity.types import Did, Subject

# W3C DID Core 1.0, section 3.1 (DID Syntax), ABNF:
#   did = "did:" method-name ":" method-specific-id
#   method-name = 1*method-char ; method-char = %x61-7A / DIGIT
#   method-specific-id = *( *idchar ":" ) 1*idchar ; idchar = ALPHA / DIGIT / "." / "-" / "_" / pct-encoded
_IDCHAR = r"(?:[A-Za-z0-9._-]|%[0-9A-Fa-f]{2})"
DID_SYNTAX = re.compile(rf"did:[a-z0-9]+:(?:{_IDCHAR}*:)*{_IDCHAR}+")
_HOST = re.compile(rf"{_IDCHAR}+(?::{_IDCHAR}+)*")

DID_CONTEXT = [
    "https://www.w3.org/ns/did/v1",
    "https://w3id.org/security/suites/secp256k1recovery-2020/v2",
]
CONTENT_TYPE = "application/did+ld+json"
KEY_FRAGMENT = "controller-key"


def is_did(value: str) -> bool:
    """Whether `value` is a DID by the W3C DID Core syntax (no path, query or fragment)."""
    return DID_SYNTAX.fullmatch(value) is not None


@dataclass(frozen=True)
class SubjectRecord:
    """What the resolver needs to know of a subject."""

    subject: Subject
    created_at: datetime
    updated_at: datetime
    erased_at: datetime | None = None
    controller: str | None = None
    chain_id: int | None = None


class SubjectDirectory(Protocol):
    def record(self, subject: Subject) -> SubjectRecord | None: ...


class DidWeb:
    """Issues and parses this service's did:web DIDs."""

    def __init__(self, host: str) -> None:
        if not _HOST.fullmatch(host):
            raise ValueError(f"not a did:web host (percent-encode a port as %3A): {host!r}")
        self.host = host
        self.prefix = f"did:web:{host}:dids:"

    def did(self, subject: Subject) -> Did:
        return Did(self.prefix + bytes(subject).hex())

    def subject(self, did: str) -> Subject:
        """The subject a DID names; raises InvalidDid for anything else."""
        if not is_did(did):
            raise InvalidDid("not a DID (W3C DID Core syntax)")
        if not did.startswith(self.prefix):
            raise InvalidDid(f"not a DID issued here (expected {self.prefix}…)")
        tail = did[len(self.prefix) :]
        if not re.fullmatch(r"[0-9a-f]{64}", tail):
            raise InvalidDid("the subject part must be 64 lower-case hex digits")
        return Subject(bytes.fromhex(tail))

    @staticmethod
    def document_path(subject: Subject) -> str:
        """Where did:web resolvers fetch the document, relative to the host."""
        return f"/dids/{bytes(subject).hex()}/did.json"

    def document(self, record: SubjectRecord) -> dict[str, Any]:
        did = self.did(record.subject)
        document: dict[str, Any] = {"@context": DID_CONTEXT, "id": did, "controller": did}
        if record.controller and record.chain_id is not None and record.erased_at is None:
            key_id = f"{did}#{KEY_FRAGMENT}"
            document["verificationMethod"] = [
                {
                    "id": key_id,
                    "type": "EcdsaSecp256k1RecoveryMethod2020",
                    "controller": did,
                    "blockchainAccountId": f"eip155:{record.chain_id}:{record.controller}",
                }
            ]
            document["authentication"] = [key_id]
            document["assertionMethod"] = [key_id]
        return document


def _timestamp(value: datetime) -> str:
    return value.replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Resolver:
    """W3C DID Resolution: returns the resolution result, never raises for a bad or unknown DID."""

    def __init__(self, method: DidWeb, directory: SubjectDirectory) -> None:
        self.method = method
        self.directory = directory

    def resolve(self, did: str) -> dict[str, Any]:
        try:
            subject = self.method.subject(did)
        except InvalidDid as exc:
            return _failure("invalidDid", str(exc))
        record = self.directory.record(subject)
        if record is None:
            return _failure("notFound", "no such subject")
        metadata: dict[str, Any] = {"created": _timestamp(record.created_at), "updated": _timestamp(record.updated_at)}
        if record.erased_at is not None:
            metadata["deactivated"] = True
            metadata["updated"] = _timestamp(record.erased_at)
        return {
            "didDocument": self.method.document(record),
            "didResolutionMetadata": {"contentType": CONTENT_TYPE},
            "didDocumentMetadata": metadata,
        }


def _failure(error: str, message: str) -> dict[str, Any]:
    return {
        "didDocument": None,
        "didResolutionMetadata": {"error": error, "errorMessage": message},
        "didDocumentMetadata": {},
    }
