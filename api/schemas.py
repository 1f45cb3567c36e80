"""Request and response models. Separate in and out models: PII appears only in `CustomerCreate`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from pydantic.config import JsonDict

from api.fields import Description, Key, Name, Points, Reference, Title, UnixTime
from ledger.access import DivergenceCode

# What the reference shows in its examples: shapes only (no real key, DID or signature).
ADDRESS = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
DID = "did:web:ledger.example.com:dids:3f1c9a2b7d6e45f08a1b2c3d4e5f60718293a4b5c6d7e8f9011223344556677"
SIGNATURE = "0x" + "ab" * 65
SIGNED: JsonDict = {
    "typed_data": {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "ConsentGrant": [
                {"name": "subject", "type": "bytes32"},
                {"name": "partner", "type": "address"},
                {"name": "purpose", "type": "bytes32"},
                {"name": "attributes", "type": "uint256"},
                {"name": "validUntil", "type": "uint64"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ],
        },
        "primaryType": "ConsentGrant",
        "domain": {"name": "ConsentRegistry", "version": "1", "chainId": 31337, "verifyingContract": ADDRESS},
        "message": {
            "subject": "0x3f1c9a2b7d6e45f08a1b2c3d4e5f60718293a4b5c6d7e8f9011223344556677",
            "partner": ADDRESS,
            "purpose": "0x637984d116b942a8438c0eff01d86754cf70982294ee461859e8b81f825f34c6",
            "attributes": 1,
            "validUntil": 0,
            "nonce": 0,
            "deadline": 1796684870,
        },
    },
    "signature": SIGNATURE,
}


class TypedDataSubmission(BaseModel):
    """What a wallet signed: the typed data exactly as prepared, and its 65-byte signature (0x-hex)."""

    model_config = ConfigDict(json_schema_extra={"examples": [SIGNED]})

    typed_data: dict[str, Any]
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")


# A partner's own order reference: printable ASCII, no leading or trailing space, bounded (it is stored
# with the redemption and shown in statements; control characters would garble a CSV or a terminal).
PARTNER_REFERENCE = r"^[!-~](?:[ -~]*[!-~])?$"
PartnerReference = Annotated[
    str | None,
    Field(
        max_length=64,
        pattern=PARTNER_REFERENCE,
        description="the partner's own order reference (printable ASCII, at most 64 characters), kept off-chain "
        "with the redemption and shown in the partner's statement and the customer's history",
    ),
]


class RedemptionSubmission(TypedDataSubmission):
    """A partner's redemption with the customer's signed authorisation (typed data and signature)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{**SIGNED, "reference": "order-1042"}]})

    reference: PartnerReference = None


class CodeRedemption(BaseModel):
    """A partner's redemption with the customer's short code (the service holds the signed authorisation)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"code": "K7QX-3MZP-9D", "reference": "order-1042"}]}
    )

    code: str = Field(
        max_length=32,
        description="the customer's short code, as the customer shows it: 10 Crockford base32 characters, "
        "any case, spaces and hyphens ignored (I and L read as 1, O as 0)",
    )
    reference: PartnerReference = None


def _redemption_shape(body: Any) -> str:
    return "code" if isinstance(body, dict) and "code" in body else "typed_data"


# A redemption body is one of the two: told apart by its `code`, so a refusal names the fields of the
# shape sent (as a plain union, pydantic listed what each shape lacked).
RedemptionBody = Annotated[
    Annotated[CodeRedemption, Tag("code")] | Annotated[RedemptionSubmission, Tag("typed_data")],
    Discriminator(_redemption_shape),
]


class RedemptionCodePublic(BaseModel):
    """An outstanding short code: what it lets which partner redeem, until when."""

    code: str = Field(description="the short code (10 Crockford base32 characters), grouped for reading")
    partner: str
    partner_name: str | None = None
    amount: int = Field(description="the points the partner may redeem with it, once")
    expires_at: int = Field(description="unix time the code stops working (the authorisation's deadline)")
    redemption_id: str
    qr_svg: str = Field(description="the code as a QR code: an SVG image as a data: URI")


class RedemptionCodesPublic(BaseModel):
    codes: list[RedemptionCodePublic] = Field(description="the customer's outstanding codes, soonest to expire first")


class CustomerCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"email": "ada.lovelace@example.com", "phone": "+44 20 7946 0000", "name": "Ada Lovelace"}]
        },
    )
    email: str | None = Field(default=None, max_length=320)
    phone: str | None = Field(default=None, max_length=40)
    name: str | None = Field(default=None, max_length=200)


class CustomerCreated(BaseModel):
    did: str
    claim_code: str = Field(description="one-time code the customer uses to bind their key")
    claim_url: str = Field(
        description="the portal with the DID and the claim code filled in, to send the customer (both ride in "
        "the URL's fragment, which browsers never send to a server)"
    )
    claim_qr: str = Field(
        description="a QR code of `claim_url` (an SVG `data:` URI), to print on a letter or show on a screen; "
        "a phone's camera opens the portal with both filled in"
    )


class CustomerErased(BaseModel):
    did: str
    erased_at: str = Field(description="when the customer's personal data was destroyed (ISO 8601)")


class ControllerPrepare(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"claim_code": "Jx3kP9qLm2Va", "address": ADDRESS}]})
    claim_code: str = Field(min_length=8, max_length=64)
    address: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$", description="the customer's key address")


class TypedDataPublic(BaseModel):
    typed_data: dict[str, Any] = Field(description="pass unchanged to eth_signTypedData_v4")


class ControllerSubmit(TypedDataSubmission):
    model_config = ConfigDict(json_schema_extra={"examples": [{**SIGNED, "claim_code": "Jx3kP9qLm2Va"}]})
    claim_code: str = Field(min_length=8, max_length=64)


class ControllerPublic(BaseModel):
    did: str
    controller: str
    tx_hash: str
    block_number: int


class RecoveryClaimCreated(BaseModel):
    did: str
    claim_code: str = Field(description="the one-time recovery code to hand the verified customer")
    claim_url: str = Field(description="the portal's link that fills in the DID and the recovery code")
    expires_at: str = Field(description="when the code stops starting a recovery (ISO 8601)")


class RecoveryClaimUse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"claim_code": "Jx3kP9qLm2Va"}]})
    claim_code: str = Field(min_length=8, max_length=64, description="the recovery code that started the recovery")


class RecoveryPublic(BaseModel):
    did: str
    controller: str = Field(description="the key that controls the customer now (the old one until it completes)")
    new_controller: str = Field(description="the key the recovery hands control to")
    effective_at: int = Field(description="unix time from which the recovery can take effect")
    status: Literal["waiting", "due", "completed", "cancelled"] = Field(
        description="waiting: the old key can still veto it; due: it can be completed; completed; cancelled"
    )
    tx_hash: str | None = Field(default=None, description="the transaction of this step, when the request made one")


class KeyEventPublic(BaseModel):
    event: Literal["bound", "recovery_started", "recovery_cancelled"] = Field(
        description="bound: the key controls the customer from then on; recovery_started: a recovery to it "
        "began; recovery_cancelled: the recovery to it was vetoed"
    )
    key: str = Field(description="the key bound, or the key the recovery was to")
    effective_at: int | None = Field(default=None, description="for a recovery started: when it can take effect")
    tx_hash: str
    block_number: int
    block_time: int


class ChallengeCreate(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"address": ADDRESS}]})
    address: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")


class ChallengePublic(BaseModel):
    message: str = Field(description="EIP-4361 message: sign it with personal_sign")
    expires_at: str


class SignIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "message": "127.0.0.1:8000 wants you to sign in with your Ethereum account:\n" + ADDRESS + "\n…",
                    "signature": SIGNATURE,
                }
            ]
        }
    )
    message: str = Field(max_length=2000)
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")


class TokenPublic(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 - the scheme's name, not a secret
    expires_in: int
    did: str


class ConsentPrepare(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "action": "grant",
                    "partner": "acme",
                    "purpose": "analytics.reporting",
                    "attributes": ["user.behavior.purchase_history"],
                    "valid_until": 0,
                }
            ]
        },
    )
    action: Literal["grant", "revoke"]
    partner: Name = Field(description="partner name or address")
    purpose: Key = Field(description="purpose key (Fideslang data use)")
    attributes: list[Key] = Field(
        min_length=1, max_length=200, description="attribute keys (Fideslang data categories)"
    )
    valid_until: UnixTime = Field(default=0, description="unix time the grant lapses; 0 = until revoked")


class ConsentPreparePublic(TypedDataPublic):
    nonce: int
    deadline: int


class ConsentAccepted(BaseModel):
    id: str
    status: str


class ErrorPublic(BaseModel):
    code: str
    detail: str = ""


class ConsentBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"changes": [SIGNED]}]})
    changes: list[TypedDataSubmission] = Field(
        min_length=1, max_length=500, description="changes signed by their customers' bound keys, any customers"
    )


class ConsentBatchItem(BaseModel):
    index: int = Field(description="the change's place in the request's `changes`, from 0")
    status: int = Field(
        description="202: accepted, as `POST /consents` answers it (stored durably; on-chain shortly); "
        "otherwise the status that route would have answered for this change alone, with `error`"
    )
    id: str | None = Field(default=None, description="the consent request's id (for `GET /consents/{id}`)")
    error: ErrorPublic | None = None


class ConsentBatchPublic(BaseModel):
    accepted: int = Field(description="how many changes were accepted")
    results: list[ConsentBatchItem] = Field(description="one per change, in the request's order")


class ConsentRequestPublic(BaseModel):
    id: str
    action: Literal["grant", "revoke"]
    status: Literal["pending", "active", "revoked", "expired", "failed"]
    partner: str
    purpose: str
    attributes: list[str]
    valid_until: int
    tx_hash: str | None
    block_number: int | None
    error: dict[str, str] | None = None
    receipt: dict[str, Any] | None = Field(default=None, description="Kantara Consent Receipt v1.1 (once on-chain)")


class ConsentPublic(BaseModel):
    partner: str
    partner_name: str | None
    purpose: str
    attributes: list[str]
    pending_grant: list[str]
    pending_revoke: list[str]
    valid_until: int
    status: Literal["pending", "active", "revoked", "expired"]
    tx_hash: str | None
    block_number: int | None


class PartnerCreate(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "acme", "address": ADDRESS}]})
    name: Name
    address: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")


class PartnerPublic(BaseModel):
    name: str
    address: str
    retired_at: str | None = Field(default=None, description="set once the operator retired the partner")


# GDPR art. 6(1): (a) consent, (b) contract, (c) legal obligation, (f) legitimate interests.
LegalBasis = Literal["consent", "contract", "legal_obligation", "legitimate_interests"]


class PurposeCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "key": "analytics.reporting",
                    "name": "Analytics reporting",
                    "description": "Aggregate reports on purchases",
                    "legal_basis": "consent",
                }
            ]
        }
    )
    key: Key
    name: Title
    description: Description = ""
    legal_basis: LegalBasis = "consent"


class PurposePublic(BaseModel):
    key: str
    id: str = Field(description="keccak256 of the key, as on-chain")
    name: str
    description: str
    legal_basis: LegalBasis
    legal_basis_article: str
    legal_basis_description: str


class AttributeCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"key": "user.behavior.purchase_history", "name": "Purchase history"}]}
    )
    key: Key
    name: Title


class AttributePublic(BaseModel):
    bit: int
    key: str
    name: str


# loyalty points ------------------------------------------------------------------------------------


class IssuanceItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    did: str = Field(max_length=300)
    amount: Points
    expires_at: UnixTime | None = Field(default=None, description="unix time; default: now + the points lifetime")
    reference: Reference | None = Field(default=None, description="the issuer's own reference, e.g. an order")


class IssuanceCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"issuances": [{"did": DID, "amount": 250, "reference": "order-10293"}]}]},
    )
    issuances: list[IssuanceItem] = Field(min_length=1, max_length=1000)


class IssuancePublic(BaseModel):
    id: str
    did: str
    amount: int
    expires_at: int
    reference: str | None = None
    status: Literal["issued", "failed"]
    lot_id: int | None = None
    tx_hash: str | None = None
    block_number: int | None = None
    error: ErrorPublic | None = None


class IssuancesPublic(BaseModel):
    issuances: list[IssuancePublic]


class RedemptionPrepare(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"partner": "acme", "amount": 120}]})
    partner: Name = Field(description="partner name or address")
    amount: Points


class RedemptionPreparePublic(BaseModel):
    typed_data: dict[str, Any] = Field(description="pass unchanged to eth_signTypedData_v4")
    redemption_id: str
    nonce: str = Field(description="keyed nonce (partner address << 64 | sequence), decimal")
    deadline: int


class RedemptionPublic(BaseModel):
    id: str
    did: str
    partner: str
    amount: int
    redemption_id: str
    status: Literal["redeemed"]
    balance: int = Field(description="the customer's unexpired points after this redemption")
    tx_hash: str
    block_number: int
    reference: str | None = Field(default=None, description="the partner's own order reference, as sent")


class LotPublic(BaseModel):
    lot_id: int
    remaining: int
    expires_at: int


class PointsEventPublic(BaseModel):
    kind: Literal["issued", "redeemed", "expired", "issue_rejected", "redeem_rejected"]
    amount: int
    partner: str | None = None
    partner_name: str | None = None
    lot_id: int | None = None
    balance: int | None = None
    reason: str | None = None
    reference: str | None = Field(
        default=None, description="the partner's own order reference of a redemption, when it sent one"
    )
    tx_hash: str
    block_number: int
    block_time: int


class TierPublic(BaseModel):
    name: str
    earned_12m: int = Field(description="points issued to the customer in the last 12 months")
    next: str | None
    points_to_next: int


class PointsPublic(BaseModel):
    did: str
    balance: int
    lots: list[LotPublic]
    history: list[PointsEventPublic]
    tier: TierPublic


class StatementLine(BaseModel):
    redemption_id: str
    did: str
    amount: int
    reference: str | None = Field(default=None, description="the partner's own order reference, when it sent one")
    tx_hash: str
    block_number: int
    block_time: int


class StatementPublic(BaseModel):
    partner: str
    partner_name: str
    start: int
    end: int
    count: int
    total_points: int
    redemptions: list[StatementLine]


class AccessPublic(BaseModel):
    """One entry of the on-chain access log: who accessed whose data, for what, and whether the
    consent registry allowed it at that block."""

    index: int = Field(description="position in the log (0-based)")
    did: str
    partner: str
    partner_name: str | None
    purpose: str
    attributes: list[str]
    permitted: bool = Field(description="false: a denied attempt (nothing was released)")
    request_id: str
    tx_hash: str
    block_number: int
    block_time: int = Field(description="Unix time of the block")


class AccessPage(BaseModel):
    entries: list[AccessPublic]
    next_after: int | None = Field(description="pass as `after` for the next page; null on the last page")


class DivergencePublic(BaseModel):
    index: int
    code: DivergenceCode
    detail: str


class VerificationPublic(BaseModel):
    ok: bool
    block_number: int = Field(description="the chain block the check was made at")
    chain_count: int
    chain_head: str
    recomputed_head: str
    read_model_count: int = Field(description="entries compared with the read model (those indexed so far)")
    divergence: DivergencePublic | None
