"""Who is calling: services by `X-API-Key` (stored hashed, with a role and scopes), customers by a
short-lived bearer token obtained with Sign-In with Ethereum (EIP-4361) using their bound key."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.models import CustomerSession, Principal, SignInChallenge
from api.service_errors import ServiceError
from identity.pseudonym import PepperRing
from ledger import eip712
from ledger.consent import BoundController, ControllerState
from ledger.store import as_utc, delete_in_batches


class Scope(StrEnum):
    """What a caller may do. A member is its name as stored (space-separated in `principals.scopes`)
    and as refusals name it; every member is granted to some caller and checked by some route
    (tests/api/test_scopes.py), and `api.authz.MATRIX` says which route needs which."""

    CUSTOMERS_WRITE = "customers:write"
    CONSENTS_READ = "consents:read"
    CONSENT_WRITE = "consent:write"
    POINTS_READ = "points:read"
    POINTS_ISSUE = "points:issue"
    POINTS_REDEEM = "points:redeem"
    POINTS_AUTHORISE = "points:authorise"
    REDEMPTIONS_READ = "redemptions:read"
    REFERENCE_READ = "reference:read"
    REFERENCE_WRITE = "reference:write"
    AUDIT_READ = "audit:read"
    CONSENTS_FORWARD = "consents:forward"


_SCOPES = {scope.value: scope for scope in Scope}
ROLE_SCOPES: dict[str, frozenset[Scope]] = {
    "operator": frozenset(
        {Scope.CUSTOMERS_WRITE, Scope.CONSENTS_READ, Scope.POINTS_READ, Scope.REFERENCE_READ, Scope.REFERENCE_WRITE}
    ),
    "issuer": frozenset({Scope.POINTS_ISSUE, Scope.REFERENCE_READ}),
    "partner": frozenset({Scope.POINTS_REDEEM, Scope.REDEMPTIONS_READ, Scope.REFERENCE_READ}),
    "auditor": frozenset({Scope.AUDIT_READ, Scope.REFERENCE_READ}),
    # A back end that forwards changes its customers signed elsewhere (a mobile app's, a CRM import's).
    "forwarder": frozenset({Scope.CONSENTS_FORWARD, Scope.REFERENCE_READ}),
}
# A customer reads their own consents, points and accesses by being their subject, not by a scope.
CUSTOMER_SCOPES = frozenset({Scope.CONSENT_WRITE, Scope.POINTS_AUTHORISE, Scope.REFERENCE_READ})
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
    scopes: frozenset[Scope]
    subject: bytes | None = None
    address: str | None = None
    expires_at: datetime | None = None


class PrincipalExists(ServiceError):
    """Raised when a principal with that name exists already."""


class NoSuchPrincipal(ServiceError):
    """Raised when no live principal has that name; the text says why (the command line prints it)."""


def stored_scopes(scopes: frozenset[Scope]) -> str:
    """Scopes as `principals.scopes` holds them: their names, sorted, space-separated."""
    return " ".join(sorted(scopes))


def parse_scopes(stored: str) -> frozenset[Scope]:
    """The scopes `principals.scopes` holds. A name that is no `Scope` (one retired since the row was
    written) grants nothing, as before it was retired no route checked it: it is left out."""
    return frozenset(_SCOPES[name] for name in stored.split() if name in _SCOPES)


def _new_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def create_principal(session: Session, name: str, role: str, address: str | None = None) -> tuple[Principal, str]:
    """A new service principal and its API key (shown once; only its hash is stored)."""
    if role not in ROLE_SCOPES:
        raise ValueError(f"unknown role {role!r}")
    key = _new_key()
    principal = Principal(
        name=name, role=role, scopes=stored_scopes(ROLE_SCOPES[role]), key_hash=digest(key), address=address
    )
    session.add(principal)
    try:
        session.flush()
    except IntegrityError as exc:
        raise PrincipalExists(name) from exc
    return principal, key


def _live_principal(session: Session, name: str) -> Principal:
    principal = session.scalar(select(Principal).where(Principal.name == name))
    if principal is None:
        raise NoSuchPrincipal(f"no principal is named {name!r}")
    if principal.revoked_at is not None:
        raise NoSuchPrincipal(f"{name!r} was revoked at {as_utc(principal.revoked_at).isoformat()}")
    return principal


def rotate_key(session: Session, name: str) -> str:
    """A new API key for principal `name` (shown once); the old one stops working. Running API
    processes may still accept the old one for up to `api.deps.CACHE_SECONDS`."""
    principal = _live_principal(session, name)
    key = _new_key()
    principal.key_hash = digest(key)
    principal.key_rotated_at = now()
    return key


def revoke_principal(session: Session, name: str) -> Principal:
    """Principal `name`'s key works no more (for good: the row stays, as what it did names it). Running
    API processes may still accept it for up to `api.deps.CACHE_SECONDS`."""
    principal = _live_principal(session, name)
    principal.revoked_at = now()
    return principal


def service_caller(session: Session, api_key: str) -> Caller | None:
    principal = session.scalar(
        select(Principal).where(Principal.key_hash == digest(api_key), Principal.revoked_at.is_(None))
    )
    if principal is None:
        return None
    return Caller(
        kind="service",
        name=principal.name,
        role=principal.role,
        scopes=parse_scopes(principal.scopes),
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
_URI = re.compile(r"^URI: (\S+)$", re.MULTILINE)
_DOMAIN_SUFFIX = " wants you to sign in with your Ethereum account:"
_EXPIRATION = re.compile(r"^Expiration Time: (\S+)$", re.MULTILINE)
_TAG_CHARS = 16  # hex digits: a nonce is 16 random ones, then 16 of its MAC (32: what _NONCE takes)
_CHALLENGE_KEY_INFO = b"consent-ledger/siwe-challenge/v1"


def siwe_message(
    *, domain: str, uri: str, address: str, chain_id: int, nonce: str, issued: datetime, expires: datetime
) -> str:
    """An EIP-4361 message, exactly as the ABNF lays it out."""

    def stamp(t: datetime) -> str:
        return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    return (
        f"{domain}{_DOMAIN_SUFFIX}\n{address}\n\n"
        "Sign in to the consent ledger to manage your consent and points.\n\n"
        f"URI: {uri}\nVersion: 1\nChain ID: {chain_id}\nNonce: {nonce}\n"
        f"Issued At: {stamp(issued)}\nExpiration Time: {stamp(expires)}"
    )


@dataclass(frozen=True)
class Challenge:
    message: str
    expires_at: datetime


def challenge_key(peppers: PepperRing) -> bytes:
    """The key that authenticates the sign-in challenges this service issued: derived from the current
    pepper (a secret every API process has already), for this use only."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CHALLENGE_KEY_INFO).derive(
        peppers.get(peppers.current)
    )


def _challenge_tag(key: bytes, unsigned: str) -> str:
    return hmac.digest(key, unsigned.encode(), "sha256")[: _TAG_CHARS // 2].hex()


def issue_challenge(key: bytes, *, address: str, origin: str, chain_id: int) -> Challenge:
    """An EIP-4361 message for `address` to sign in at `origin` (the service's, never one a request
    names: a wallet shows the domain and refuses one that is not the site's). Nothing is stored: anyone
    may ask for one, so asking must not grow the database. Its nonce is a random part and a MAC (under
    `key`) of the message with the random part as the nonce, which `sign_in` checks; a message is
    recorded when it is used."""
    domain, uri = urlsplit(origin).netloc, origin
    issued = now()
    expires = issued + CHALLENGE_LIFETIME

    def message(nonce: str) -> str:
        return siwe_message(
            domain=domain, uri=uri, address=address, chain_id=chain_id, nonce=nonce, issued=issued, expires=expires
        )

    random_part = secrets.token_hex(_TAG_CHARS // 2)
    return Challenge(message(random_part + _challenge_tag(key, message(random_part))), expires)


class SignInFailed(ServiceError):
    """Raised when a sign-in message or signature is not acceptable; the text says why."""


class WrongOrigin(SignInFailed):
    """Raised when a sign-in message names another site than this service's origin."""


def _issued_fields(key: bytes, message: str, origin: str) -> tuple[str, str, datetime]:
    """(nonce, address, expiry) of a message `issue_challenge` made with `key` for `origin`, else
    SignInFailed (WrongOrigin for one made for another origin: before it was configured)."""
    nonce = _NONCE.search(message)
    expiry = _EXPIRATION.search(message)
    lines = message.split("\n")
    if nonce is None or expiry is None or len(lines) < 2 or len(nonce.group(1)) != 2 * _TAG_CHARS:
        raise SignInFailed("the message is not one this service issued")
    random_part, tag = nonce.group(1)[:_TAG_CHARS], nonce.group(1)[_TAG_CHARS:]
    unsigned = message.replace(f"\nNonce: {random_part}{tag}\n", f"\nNonce: {random_part}\n")
    if not hmac.compare_digest(_challenge_tag(key, unsigned), tag):
        raise SignInFailed("the message is not one this service issued")
    # Authentic from here on: every line is as issued.
    uri = _URI.search(message)
    if lines[0] != urlsplit(origin).netloc + _DOMAIN_SUFFIX or uri is None or uri.group(1) != origin:
        raise WrongOrigin(f"the message is for another site; sign in at {origin}")
    return nonce.group(1), lines[1], datetime.fromisoformat(expiry.group(1))


def sign_in(session: Session, key: bytes, message: str, signature: bytes, origin: str) -> tuple[str, CustomerSession]:
    """Check a signed EIP-4361 message we issued for `origin`; returns a new bearer token for the key's
    subject. The message is recorded as used (it works once) only once it is known to come from a bound key."""
    nonce, address, expires_at = _issued_fields(key, message, origin)
    if expires_at <= now():
        raise SignInFailed("the message has expired; ask for a new one")
    try:
        signer = eip712.personal_signer(message, signature)
    except ValueError as exc:
        raise SignInFailed("the signature is malformed") from exc
    if signer != address:
        raise SignInFailed("the message was not signed by the address in it")
    subject = session.scalar(select(ControllerState.subject).where(ControllerState.controller == signer))
    if subject is None:
        # The read model may have rolled back a binding the node lost, which the service is putting back
        # (as `ledger.consent.bindings.CONTROLLER_OF`): its own record of the bindings it made answers meanwhile.
        subject = session.scalar(select(BoundController.subject).where(BoundController.controller == signer))
    if subject is None:
        raise SignInFailed("this key is not bound to any customer")
    session.add(SignInChallenge(nonce=nonce, address=signer, message=message, expires_at=expires_at, used_at=now()))
    try:
        session.flush()
    except IntegrityError:
        raise SignInFailed("the message was used already; ask for a new one") from None
    token = secrets.token_urlsafe(32)
    row = CustomerSession(token_hash=digest(token), subject=subject, address=signer, expires_at=now() + TOKEN_LIFETIME)
    session.add(row)
    return token, row


def controllers_of(session: Session, subjects: Collection[bytes]) -> dict[bytes, str]:
    """Each of `subjects`' bound key, as sign-in finds it: the read model's, else the service's own record
    of the bindings it made (see `sign_in`). One query each for many subjects; those with none are absent."""
    wanted = set(subjects)
    state = select(ControllerState.subject, ControllerState.controller).where(ControllerState.subject.in_(wanted))
    found = {bytes(subject): controller for subject, controller in session.execute(state)}
    if missing := wanted - found.keys():
        recorded = select(BoundController.subject, BoundController.controller).where(
            BoundController.subject.in_(missing)
        )
        found |= {bytes(subject): controller for subject, controller in session.execute(recorded)}
    return found


def prune_expired(sessions: Callable[[], AbstractContextManager[Session]], *, batch: int = PRUNE_BATCH) -> int:
    """Delete the used sign-in messages and customer sessions that have expired; returns how many.

    Nothing else bounds these tables: every sign-in leaves a session and its message (kept while it
    could be replayed; only sign-ins with a bound key write them)."""
    cutoff = now()
    return delete_in_batches(
        sessions, SignInChallenge.nonce, SignInChallenge.expires_at < cutoff, batch=batch
    ) + delete_in_batches(sessions, CustomerSession.token_hash, CustomerSession.expires_at < cutoff, batch=batch)


def new_address() -> tuple[str, str]:
    """A fresh partner account: (address, private key hex)."""
    account = Account.create()
    return account.address, account.key.hex()
