"""What each field of the API's bodies means, for the reference: one meaning per field name across every
schema (a `tx_hash` is the same thing wherever it appears), with the names that mean different things in
different schemas said per schema. `describe` fills the OpenAPI document's properties that have no
description of their own (a `Field(description=...)` says more and is kept);
`tests/api/test_openapi.py` checks that every property ends with one."""

from __future__ import annotations

from typing import Any

FIELDS = {
    "did": "the customer's DID (did:web), the only name of a customer outside the service",
    "tx_hash": "the transaction on the ledger that holds it (0x-hex)",
    "block_number": "the ledger block that holds it",
    "block_time": "the time of that block (unix seconds, UTC)",
    "partner": "the partner's address on the ledger (0x-hex)",
    "partner_name": "the partner's name",
    "purpose": "the purpose's key (a Fideslang data use), e.g. analytics.reporting",
    "attributes": "attribute keys (Fideslang data categories), e.g. user.contact.email",
    "pending_grant": "attributes granted and not yet on the ledger (not in effect yet)",
    "pending_revoke": "attributes revoked and not yet on the ledger (in effect already: a revocation counts "
    "once accepted)",
    "valid_until": "unix time the grant lapses; 0: until revoked",
    "amount": "points",
    "balance": "the customer's unexpired points after it",
    "expires_at": "unix time the points lapse",
    "lot_id": "the lot of points (one per issuance) on the ledger",
    "redemption_id": "the redemption's id, as signed by the customer (0x-hex, 32 bytes)",
    "reference": "the issuer's own reference, e.g. an order number",
    "remaining": "points of the lot not yet spent",
    "signature": "the 65-byte signature (0x-hex) of the typed data, by the customer's bound key",
    "typed_data": "EIP-712 typed data exactly as the prepare route returned it",
    "claim_code": "the one-time code from the customer's enrolment",
    "controller": "the address of the key bound to the customer",
    "deadline": "unix time after which the signed message is no longer accepted",
    "nonce": "the customer's next nonce, in the signed message",
    "action": "grant (share) or revoke (stop sharing)",
    "email": "e-mail address (personal data: kept encrypted in the vault, never on the ledger)",
    "phone": "phone number, international or in the service's default region (personal data, as the e-mail)",
    "request_id": "the request that recorded it, as the service's log names it",
    "deploy_block": "the block the contract was deployed in",
    "chain_id": "the ledger's chain id",
    "bit": "the attribute's bit in a consent's attribute mask on the ledger",
    "backend": "the kind of ledger node the service uses (geth, anvil, rpc)",
    "contracts": "the service's contracts on the ledger",
    "issuances": "one per customer issued to, in the request's order",
    "lots": "the customer's lots with unexpired points, soonest expiry first",
    "history": "the customer's points events, newest first",
    "tier": "the customer's tier by points earned in the last 12 months",
    "points_to_next": "points to earn for the next tier",
    "reason": "why the ledger refused it (for a rejected event)",
    "redemptions": "the partner's redemptions in the period, in ledger order",
    "total_points": "the sum of the redemptions' points",
    "access_token": "the bearer token: send it as `Authorization: Bearer …`",
    "token_type": "always Bearer",
    "expires_in": "seconds the token lasts",
    "chain_count": "entries in the log, by the contract",
    "chain_head": "the log's head hash, by the contract",
    "recomputed_head": "the head hash recomputed from the ledger's events",
    "divergence": "the first difference found, if any",
    "@context": "the DID document's JSON-LD contexts",
    "verificationMethod": "the customer's bound key, as a verification method",
    "authentication": "the verification methods that authenticate the customer",
    "assertionMethod": "the verification methods whose signatures are the customer's",
    "didDocument": "the DID document",
    "didResolutionMetadata": "how the DID was resolved (W3C DID Resolution)",
    "didDocumentMetadata": "about the document (created, updated, deactivated)",
}

# Field names that mean different things in different schemas: (schema, field) first.
BY_SCHEMA = {
    ("AccessPage", "entries"): "the page's entries, in log order",
    ("ConsentAccepted", "id"): "the consent request's id (for `GET /consents/{id}`)",
    ("ConsentAccepted", "status"): "pending: stored durably, on the ledger shortly",
    ("ConsentRequestPublic", "id"): "the consent request's id",
    ("ConsentRequestPublic", "status"): "pending, then active (a grant), revoked, expired or failed",
    ("ConsentRequestPublic", "error"): "why it failed: code and detail",
    ("ConsentPublic", "status"): "the consent's state for this partner and purpose",
    ("ConsentBatchItem", "error"): "why this change was refused: code and detail",
    ("IssuancePublic", "id"): "the issuance's id",
    ("IssuancePublic", "status"): "issued (on the ledger) or failed",
    ("IssuancePublic", "error"): "why it failed: code and detail",
    ("RedemptionPublic", "id"): "the redemption request's id",
    ("RedemptionPublic", "status"): "redeemed: on the ledger",
    ("ErrorPublic", "code"): "a stable code, as in problem bodies (`/api/v1/problems/{code}` explains it)",
    ("ErrorPublic", "detail"): "what went wrong, in plain words",
    ("DivergencePublic", "index"): "the log entry where the copy and the ledger first differ",
    ("DivergencePublic", "code"): "what differs",
    ("DivergencePublic", "detail"): "the difference in words",
    ("PointsEventPublic", "kind"): "what happened to the points",
    ("StatementPublic", "start"): "the period's start (unix seconds, inclusive)",
    ("StatementPublic", "end"): "the period's end (unix seconds, exclusive)",
    ("StatementPublic", "count"): "how many redemptions",
    ("TierPublic", "name"): "the tier",
    ("TierPublic", "next"): "the next tier up, if any",
    ("VerificationPublic", "ok"): "whether the log verifies against the ledger",
    ("SignIn", "message"): "the EIP-4361 message exactly as the challenge returned it",
    ("ChallengeCreate", "address"): "the address of the customer's bound key",
    ("LivePublic", "status"): "alive: the process serves",
    ("ReadyPublic", "status"): "ready: every check passed",
    ("DidDocumentPublic", "id"): "the DID",
    ("CustomerCreate", "name"): "the customer's name (personal data, as the e-mail)",
    ("PartnerCreate", "name"): "the partner's name, unique",
    ("PartnerCreate", "address"): "the partner's address on the ledger",
    ("PartnerPublic", "name"): "the partner's name",
    ("PartnerPublic", "address"): "the partner's address on the ledger",
    ("ContractPublic", "name"): "the contract",
    ("ContractPublic", "address"): "its address on the ledger",
    ("PurposeCreate", "key"): "the purpose's key (a Fideslang data use), unique",
    ("PurposeCreate", "name"): "what customers see",
    ("PurposeCreate", "description"): "what the data is used for, in words customers read",
    ("PurposePublic", "key"): "the purpose's key (a Fideslang data use)",
    ("PurposePublic", "name"): "what customers see",
    ("PurposePublic", "description"): "what the data is used for",
    ("PurposeCreate", "legal_basis"): "the GDPR art. 6(1) basis of the processing: consent (a), contract (b), "
    "legal_obligation (c) or legitimate_interests (f); only a consent purpose is the customer's to grant",
    ("PurposePublic", "legal_basis"): "the GDPR art. 6(1) basis of the processing: consent (a), contract (b), "
    "legal_obligation (c) or legitimate_interests (f); only a consent purpose is the customer's to grant",
    ("PurposePublic", "legal_basis_article"): "the article of the basis, e.g. GDPR art. 6(1)(a)",
    ("PurposePublic", "legal_basis_description"): "what the basis means for the customer, in plain words",
    ("AttributeCreate", "key"): "the attribute's key (a Fideslang data category), unique",
    ("AttributeCreate", "name"): "what customers see",
    ("AttributePublic", "key"): "the attribute's key (a Fideslang data category)",
    ("AttributePublic", "name"): "what customers see",
    ("PointsPublic", "balance"): "the customer's unexpired points now",
    ("ChallengePublic", "expires_at"): "when the message stops being accepted (ISO 8601)",
    ("DidDocumentPublic", "controller"): "the DID that controls the document",
    ("SignIn", "signature"): "the 65-byte personal_sign signature (0x-hex) of the message by the customer's bound key",
    ("HealthPublic", "block_number"): "the ledger's newest block",
    ("Problem", "title"): "what went wrong, in plain words",
    ("Problem", "status"): "the HTTP status",
    ("Problem", "detail"): "more about this occurrence",
    ("Problem", "instance"): "the request's path",
}


def describe(schema: dict[str, Any]) -> None:
    """Give every property of the OpenAPI document's component schemas that has no description the
    glossary's (in place)."""
    for name, component in schema.get("components", {}).get("schemas", {}).items():
        for field, spec in component.get("properties", {}).items():
            if "description" in spec:
                continue
            meaning = BY_SCHEMA.get((name, field)) or FIELDS.get(field)
            if meaning is not None:
                spec["description"] = meaning
