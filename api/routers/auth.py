"""Sign-In with Ethereum (EIP-4361) for customers, with the key bound to their DID."""

from __future__ import annotations

from fastapi import APIRouter, status

from api import auth
from api.deps import RuntimeDep
from api.errors import problem, responses
from api.schemas import ChallengeCreate, ChallengePublic, SignIn, TokenPublic
from identity.types import Subject

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post(
    "/siwe/challenge", response_model=ChallengePublic, status_code=status.HTTP_201_CREATED, responses=responses(422)
)
def challenge(body: ChallengeCreate, runtime: RuntimeDep) -> ChallengePublic:
    """An EIP-4361 message for `address` to sign with personal_sign (valid 5 minutes, once), naming the
    service's public origin (CONSENT_LEDGER_PUBLIC_ORIGIN) whatever host the request was sent to."""
    from web3 import Web3

    issued = auth.issue_challenge(
        runtime.signin_key,
        address=Web3.to_checksum_address(body.address),
        origin=runtime.service.origin,
        chain_id=runtime.ledger.deployment.chain_id,
    )
    return ChallengePublic(message=issued.message, expires_at=issued.expires_at.isoformat())


@router.post("/siwe", response_model=TokenPublic, responses=responses(401, 422))
def sign_in(body: SignIn, runtime: RuntimeDep) -> TokenPublic:
    """Exchange the signed message for a bearer token (15 minutes)."""
    try:
        with runtime.sessions() as session:
            token, row = auth.sign_in(
                session, runtime.signin_key, body.message, bytes.fromhex(body.signature[2:]), runtime.service.origin
            )
            subject = Subject(row.subject)
    except auth.SignInFailed as exc:  # WrongOrigin among them, with its own code
        raise problem(exc) from exc
    return TokenPublic(
        access_token=token, expires_in=int(auth.TOKEN_LIFETIME.total_seconds()), did=runtime.dids.did(subject)
    )
