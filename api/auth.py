"""Who is calling: services by `X-API-Key` (stored hashed, with a role and scopes), customers by a
short-lived bearer token obtained with Sign-In with Ethereum (EIP-4361) using their bound key."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from eth_account import Account
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.models import CustomerSession, Principal, SignInChallenge
from ledger import eip712
from ledger.bindings import BoundController
from ledger.store import ControllerState, as_utc

ROLE_SCOPES: dict[str, frozenset[str]] = {
    "operator": frozenset(
        {"customers:write", "customers:read", "consents:read", "points:read", "reference:read", "reference:write"}
    ),
    "issuer": frozenset({"points:issue", "reference:read"}),
    "partner": frozenset({"points:redeem", "redemptions:read", "reference:read"}),
    "auditor": frozenset({"audit:read", "reference:read"}),
}
CUSTOMER_SCOPES = frozenset({"consent:read", "consent:write", "points:read", "points:authorise", "reference:read"})
TOKEN_LIFETIME = timedelta(minutes=15)
CHALLENGE_LIFETIME = timedelta(minutes=5)
PRUNE_BATCH = 5_000  # expired rows deleted in one write transaction (`prune_expired`)
API_KEY_PREFIX = "clk_"


def digest(secret: str) -> str:
    """API keys and tokens are 256-bit random values: a plain SHA-256 is enough to store them."""
    return hashlib.sha256(secret.encode()).hexdigest()


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Caller:
    kind: str  # "service" or "customer"
    name: str
    role: str
    scopes: frozenset[str]
    subject: bytes | None = None
    address: str | None = None
    expires_at: datetime | None = None


class PrincipalExists(Exception):
    """Raised when a principal with that name exists already."""


def create_principal(session: Session, name: str, role: str, address: str | None = None) -> tuple[Principal, str]:
    """A new service principal and its API key (shown once; only its hash is stored)."""
    if role not in ROLE_SCOPES:
        raise ValueError(f"unknown role {role!r}")
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    principal = Principal(
        name=name, role=role, scopes=" ".join(sorted(ROLE_SCOPES[role])), key_hash=digest(key), address=address
    )
    session.add(principal)
    try:
        session.flush()
    except IntegrityError as exc:
        raise PrincipalExists(name) from exc
    return principal, key


def service_caller(session: Session, api_key: str) -> Caller | None:
    principal = session.scalar(select(Principal).where(Principal.key_hash == digest(api_key)))
    if principal is None:
        return None
    return Caller(
        kind="service",
        name=principal.name,
        role=principal.role,
        scopes=frozenset(principal.scopes.split()),
        address=principal.address,
    )


def customer_caller(session: Session, token: str) -> Caller | None:
    row = session.get(CustomerSession, digest(token))
    if row is None or as_utc(row.expires_at) <= now():
        return None
    return Caller(
        kind="customer",
        name=row.address,
        role="customer",
        scopes=CUSTOMER_SCOPES,
        subject=row.subject,
        address=row.address,
        expires_at=as_utc(row.expires_at),
    )


# Sign-In with Ethereum ------------------------------------------------------------------------------

_NONCE = re.compile(r"^Nonce: ([A-Za-z0-9]{8,32})$", re.MULTILINE)


def siwe_message(
    *, domain: str, uri: str, address: str, chain_id: int, nonce: str, issued: datetime, expires: datetime
) -> str:
    """An EIP-4361 message, exactly as the ABNF lays it out."""

    def stamp(t: datetime) -> str:
        return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    return (
        f"{domain} wants you to sign in with your Ethereum account:\n{address}\n\n"
        "Sign in to the consent ledger to manage your consent and points.\n\n"
        f"URI: {uri}\nVersion: 1\nChain ID: {chain_id}\nNonce: {nonce}\n"
        f"Issued At: {stamp(issued)}\nExpiration Time: {stamp(expires)}"
    )


def issue_challenge(session: Session, *, address: str, domain: str, uri: str, chain_id: int) -> SignInChallenge:
    nonce = secrets.token_hex(8)
    issued = now()
    challenge = SignInChallenge(
        nonce=nonce,
        address=address,
        expires_at=issued + CHALLENGE_LIFETIME,
        message=siwe_message(
            domain=domain,
            uri=uri,
            address=address,
            chain_id=chain_id,
            nonce=nonce,
            issued=issued,
            expires=issued + CHALLENGE_LIFETIME,
        ),
    )
    session.add(challenge)
    return challenge


class SignInFailed(Exception):
    """Raised when a sign-in message or signature is not acceptable; the text says why."""


def sign_in(session: Session, message: str, signature: bytes) -> tuple[str, CustomerSession]:
    """Check a signed EIP-4361 message we issued; returns a new bearer token for the key's subject."""
    match = _NONCE.search(message)
    challenge = session.get(SignInChallenge, match.group(1)) if match else None
    if challenge is None or challenge.message != message:
        raise SignInFailed("the message is not one this service issued")
    if challenge.used_at is not None or as_utc(challenge.expires_at) <= now():
        raise SignInFailed("the message was used already or has expired; ask for a new one")
    try:
        signer = eip712.personal_signer(message, signature)
    except ValueError as exc:
        raise SignInFailed("the signature is malformed") from exc
    if signer != challenge.address:
        raise SignInFailed("the message was not signed by the address in it")
    claimed = session.execute(
        update(SignInChallenge)
        .where(SignInChallenge.nonce == challenge.nonce, SignInChallenge.used_at.is_(None))
        .values(used_at=now())
    ).rowcount  # type: ignore[attr-defined]
    if claimed != 1:
        raise SignInFailed("the message was used already")
    subject = session.scalar(select(ControllerState.subject).where(ControllerState.controller == signer))
    if subject is None:
        # The read model may have rolled back a binding the node lost, which the service is putting back
        # (as `ledger.bindings.CONTROLLER_OF`): its own record of the bindings it made answers meanwhile.
        subject = session.scalar(select(BoundController.subject).where(BoundController.controller == signer))
    if subject is None:
        raise SignInFailed("this key is not bound to any customer")
    token = secrets.token_urlsafe(32)
    row = CustomerSession(token_hash=digest(token), subject=subject, address=signer, expires_at=now() + TOKEN_LIFETIME)
    session.add(row)
    return token, row


def prune_expired(sessions: Callable[[], AbstractContextManager[Session]], *, batch: int = PRUNE_BATCH) -> int:
    """Delete the sign-in challenges and customer sessions that have expired; returns how many.

    Nothing else bounds these tables: a challenge is handed out to anyone who asks (it is what they
    sign), and every sign-in leaves a session. In write transactions of at most `batch` rows: the
    service database's write lock is shared with the API's outbox writers."""
    pruned = 0
    cutoff = now()
    for table, key in ((SignInChallenge, SignInChallenge.nonce), (CustomerSession, CustomerSession.token_hash)):
        while True:
            with sessions() as session:
                expired = select(key).where(table.expires_at < cutoff).limit(batch).scalar_subquery()
                deleted = session.execute(delete(table).where(key.in_(expired))).rowcount  # type: ignore[attr-defined]
            pruned += deleted
            if deleted < batch:
                break
    return pruned


def new_address() -> tuple[str, str]:
    """A fresh partner account: (address, private key hex)."""
    account = Account.create()
    return account.address, account.key.hex()
