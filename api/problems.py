"""What each problem `code` means and what to do about it: the page a problem's `type` names
(`/api/v1/problems/{code}`, RFC 9457 §3.1.1: a URI reference with the full path). One entry per code
the service sends; `tests/api/test_problem_types.py` checks that every code in the source is here.

`status` is the usual status of the code (a few are sent with another where the same cause meets a
different request: `unknown_partner` is 404 on a partner's own route and 422 in a body that names one)."""

from __future__ import annotations

from typing import NamedTuple

from api.authz import V1
from ledger.types import ATTRIBUTE_BITS

PAGES = f"{V1}/problems"


def type_of(code: str) -> str:
    """A problem's `type`: the page about its code (a URI reference with the full path, RFC 9457 §3.1.1)."""
    return f"{PAGES}/{code}"


class ProblemType(NamedTuple):
    status: int
    title: str
    about: str  # what happened and what to do, in plain words, for the person who reads the page


PROBLEMS: dict[str, ProblemType] = {
    # the request itself
    "body_too_large": ProblemType(
        413,
        "The request body is too large",
        "The body is over the service's size limit (CONSENT_LEDGER_MAX_BODY_BYTES, 1 MiB by default). Send "
        "less at once: a batch route takes at most the number of items its reference says.",
    ),
    "body_too_deep": ProblemType(
        422,
        "The request body is nested too deeply",
        "JSON arrays and objects inside each other more deeply than any request of this API needs. Send the "
        "body the reference shows.",
    ),
    "missing_field": ProblemType(
        422, "A field is missing", "The body or query lacks a field the route needs; `detail` names it."
    ),
    "unknown_field": ProblemType(
        422,
        "Unknown field",
        "The body has a field the route does not take (often a typo); `detail` names it. Nothing was done.",
    ),
    "not_an_integer": ProblemType(
        422,
        "Not an integer",
        "A number must be a plain JSON integer: not a string, a fraction or a float such as 1.0.",
    ),
    "out_of_range": ProblemType(
        422,
        "Out of range",
        "A number is below its minimum or above its maximum (amounts fit the contracts' integer types); "
        "`detail` names the field and the limit.",
    ),
    "invalid_length": ProblemType(
        422, "Too short or too long", "A text or a list is shorter or longer than allowed; `detail` says which."
    ),
    "invalid_format": ProblemType(
        422,
        "Invalid format",
        "A text does not have the form the field needs (a 0x-hex signature of 65 bytes, an address, …).",
    ),
    "invalid_name": ProblemType(
        422,
        "Invalid name",
        "A name holds characters it may not (control characters, or nothing but spaces). Use printable text.",
    ),
    "validation_error": ProblemType(422, "Invalid request", "The request does not match the route's schema."),
    "idempotency_key_required": ProblemType(
        400,
        "An Idempotency-Key header is needed",
        "Send a new random key (a UUID) with each redemption, and the same key when you send the same "
        "redemption again: that is how a retry after a lost answer never spends twice.",
    ),
    "idempotency_key_reused": ProblemType(
        422,
        "This Idempotency-Key was used for another request",
        "A key stands for one request. Use a new key for a new request.",
    ),
    # who is asking
    "unauthenticated": ProblemType(
        401,
        "Authentication required",
        "Send an API key (`X-API-Key`) or a customer's bearer token (`Authorization: Bearer …`).",
    ),
    "invalid_api_key": ProblemType(
        401, "Unknown API key", "The key is not one the service issued, or it was rotated or revoked."
    ),
    "invalid_token": ProblemType(
        401,
        "The bearer token is unknown or has expired",
        "Tokens last 15 minutes. Sign in again with the customer's key (`POST /auth/siwe`).",
    ),
    "sign_in_failed": ProblemType(
        401,
        "Sign-in refused",
        "The signed sign-in message was not accepted; `detail` says why (expired, used, or the key is bound "
        "to no customer). Ask for a new message and sign it with the bound key.",
    ),
    "wrong_origin": ProblemType(
        401,
        "Sign-in refused: the message is for another site",
        "The sign-in message names another site than the one it was sent to: a page of another site may "
        "be trying to use your signature. Sign in from this service's own page.",
    ),
    "forbidden": ProblemType(403, "Forbidden", "The caller may not do this."),
    "insufficient_scope": ProblemType(
        403,
        "Not allowed",
        "The caller's role does not include what the route needs; `detail` names the scope. Ask the "
        "operator for a principal of the right role.",
    ),
    "not_your_data": ProblemType(
        403, "Not your data", "Customers see and change only their own data; this is another customer's."
    ),
    "not_a_partner": ProblemType(
        403, "Only partners have redemption statements", "Use a partner's API key for this route."
    ),
    "not_your_authorisation": ProblemType(
        403,
        "This authorisation is for another partner",
        "The customer authorised a redemption at another partner: only that partner can redeem it.",
    ),
    "not_permitted_on_chain": ProblemType(
        403,
        "The ledger does not permit this account to do that",
        "The contract refused the sending account's role. An operator checks the service's keys and roles.",
    ),
    # customers and keys
    "unknown_customer": ProblemType(
        404, "No such customer", "No customer has this DID here (check it was copied whole)."
    ),
    "customer_erased": ProblemType(
        409,
        "This customer's data was erased",
        "The customer's personal data was erased on request; nothing more can be done for them.",
    ),
    "invalid_pii": ProblemType(
        422, "Invalid personal data", "An e-mail address, phone number or name is not valid; `field` names it."
    ),
    "already_enrolled": ProblemType(
        409,
        "This customer is enrolled and has bound a key",
        "Enrolment is once per person; the customer's DID is in the answer's `did`.",
    ),
    "invalid_claim_code": ProblemType(
        403,
        "The claim code is not valid for this customer",
        "The code does not belong to this DID, or it was mistyped. Copy both from the enrolment letter.",
    ),
    "claim_code_expired": ProblemType(403, "The claim code has expired", "Ask the operator for a new claim code."),
    "claim_code_used": ProblemType(
        409,
        "The claim code was used already",
        "A claim code binds one key, once. If that was you, sign in with that key.",
    ),
    "already_bound": ProblemType(
        409, "This customer has bound a key already", "The customer's key is bound; sign in with it."
    ),
    "not_bound": ProblemType(
        409,
        "This customer has not bound a key yet",
        "A recovery replaces a bound key; a customer without one binds theirs with the enrolment claim code.",
    ),
    "no_recovery": ProblemType(
        404,
        "No recovery is pending for this customer",
        "No key recovery is waiting (it was completed, vetoed by the customer's key, or never started).",
    ),
    "recovery_not_due": ProblemType(
        409,
        "The recovery takes effect later",
        "A recovery waits the ledger's recovery delay, so that the customer's current key can veto it; "
        "`detail` is the unix time from which it can be completed.",
    ),
    "recovery_refused": ProblemType(409, "The ledger refused the recovery", "The recovery cannot go on as asked."),
    "unbound_subject": ProblemType(
        422,
        "The customer has not bound a key",
        "Nothing a customer signs counts until they have claimed their DID with a key of their own.",
    ),
    # signed messages
    "invalid_typed_data": ProblemType(
        422,
        "The signed data is not a message of this ledger",
        "Send the typed data exactly as the prepare route returned it, signed with eth_signTypedData_v4.",
    ),
    "invalid_signature": ProblemType(
        422,
        "Not signed by the customer's bound key",
        "The signature does not come from the key bound to the customer, or the signed data was changed after signing.",
    ),
    "signature_expired": ProblemType(
        422,
        "The signed message has expired",
        "Signed messages carry a deadline (15 minutes for a grant or a redemption). Prepare it again and sign "
        "the new one.",
    ),
    "nonce_mismatch": ProblemType(
        409,
        "The signed message's nonce is not the next one",
        "Another change or redemption of this customer was accepted in between. Prepare it again (the new "
        "one carries the next nonce) and sign that.",
    ),
    "authorisation_used": ProblemType(
        409,
        "This authorisation was used already",
        "An authorisation redeems once. Ask the customer for a new one.",
    ),
    # consent
    "unknown_partner": ProblemType(404, "No such partner", "No partner of that name or address is registered."),
    "partner_retired": ProblemType(
        422,
        "The partner has left the programme",
        "Nothing new can be granted to it or redeemed at it; what was granted to it can still be revoked.",
    ),
    "unknown_purpose": ProblemType(404, "No such purpose", "No purpose has that key; `GET /purposes` lists them."),
    "unknown_attribute": ProblemType(
        422, "No such attribute", "An attribute category is not registered; `GET /attributes` lists them."
    ),
    "empty_attributes": ProblemType(
        422, "A change names at least one attribute", "Name the attribute categories the change is about."
    ),
    "invalid_validity": ProblemType(
        422,
        "Invalid validity",
        "valid_until must be in the future, and only a grant has one (a revocation ends the consent now).",
    ),
    "unknown_consent_request": ProblemType(404, "No such consent request", "No consent change of yours has this id."),
    # points
    "insufficient_points": ProblemType(
        409,
        "Not enough unexpired points",
        "The customer holds fewer unexpired points than the amount. Nothing was spent.",
    ),
    # short redemption codes
    "invalid_code": ProblemType(
        422,
        "That is not a redemption code",
        "A redemption code is 10 characters: digits and letters except I, L, O and U (any case; spaces and "
        "hyphens are ignored). Check what the customer shows.",
    ),
    "unknown_code": ProblemType(
        404,
        "No such code",
        "No outstanding code of this customer (on the customer's routes), or none for this partner (on the "
        "redemption route). A partner whose lookups fail too often is refused for a while.",
    ),
    "code_cancelled": ProblemType(
        409, "The customer cancelled this code", "Nothing was spent. Ask the customer for a new code."
    ),
    "code_used": ProblemType(
        409,
        "This code was used already",
        "A code redeems once; a retry of that redemption with its Idempotency-Key gets its answer. Ask the "
        "customer for a new code for another redemption.",
    ),
    "code_expired": ProblemType(
        410,
        "This code has expired",
        "A code works until its authorisation's deadline (15 minutes after it was made). Nothing was spent: "
        "the customer can make a new one.",
    ),
    "code_outstanding": ProblemType(
        409,
        "You have an outstanding code for this partner",
        "The ledger takes a customer's authorisations at a partner one after another, so there is one "
        "outstanding code per partner: use it or cancel it, then make a new one.",
    ),
    "too_many_code_failures": ProblemType(
        429,
        "Too many unknown codes; wait before trying again",
        "This partner's code lookups failed 10 times in 15 minutes; lookups by code are refused until the "
        "oldest failure is 15 minutes old (`detail` says when). Redemptions with typed data still work.",
    ),
    "invalid_amount": ProblemType(422, "Invalid amount", "An amount of points must be a whole number above 0."),
    "invalid_expiry": ProblemType(422, "The expiry is in the past", "Points must expire after they are issued."),
    "invalid_period": ProblemType(
        422, "Invalid period", "`to` must be after `from` (both ISO 8601; UTC unless they say)."
    ),
    "still_pending": ProblemType(
        503,
        "Not on-chain yet",
        "The request was accepted and will be applied; the answer was not ready in time. Send the same "
        "request again (with the same Idempotency-Key, where it has one) for the answer: it is never "
        "applied twice.",
    ),
    "busy": ProblemType(
        503,
        "Too many concurrent duplicates of this request",
        "Many copies of one request (one Idempotency-Key) arrived at once. Retry after a moment.",
    ),
    "conflict": ProblemType(409, "Conflicting request", "Another request changed the same thing at once; retry."),
    # reference data
    "partner_exists": ProblemType(409, "A partner with that name or address exists", "Choose another name."),
    "purpose_exists": ProblemType(409, "A purpose with that key exists", "Choose another key."),
    "attribute_exists": ProblemType(409, "An attribute with that key exists", "Choose another key."),
    "attributes_full": ProblemType(
        409,
        "No room for another attribute",
        f"A consent holds {ATTRIBUTE_BITS} attribute categories (one bit each), and every one is taken.",
    ),
    # the ledger
    "chain_unavailable": ProblemType(
        503,
        "The ledger is unavailable",
        "The chain node did not answer in time. Requests already accepted are kept and applied when it is "
        "back; try this one again shortly.",
    ),
    "ledger_refused": ProblemType(
        422, "The ledger refused the request", "The contract refused it; `detail` says why in plain words."
    ),
    "consent_rejected": ProblemType(422, "The ledger refused the consent change", "The contract refused it."),
    "points_rejected": ProblemType(422, "The ledger refused the points request", "The contract refused it."),
    "access_rejected": ProblemType(422, "The ledger refused the access record", "The contract refused it."),
    # the service
    "not_ready": ProblemType(
        503,
        "Not ready to serve",
        "One or more of the readiness checks failed (`failing` names each: the database, the vault key, the "
        "node answering, the chain's head moving, the relayer's backlog). A load balancer sends requests "
        "elsewhere until it passes again.",
    ),
    "metrics_disabled": ProblemType(
        404, "Metrics are off", "The operator turned metrics off (CONSENT_LEDGER_METRICS=false)."
    ),
    "not_found": ProblemType(404, "Not found", "No such route or resource. The reference is at /api/v1/docs."),
    "method_not_allowed": ProblemType(405, "Method not allowed", "The route exists; not with this HTTP method."),
    "frontend_not_installed": ProblemType(
        503,
        "The pages' scripts are not installed",
        "The operator runs `make setup` (it installs the npm packages the pages load).",
    ),
    "internal_error": ProblemType(
        500,
        "Internal error",
        "Something failed that should not have. Nothing was half-applied. The operator finds the cause in "
        "the service's log under the answer's `request_id`.",
    ),
}
