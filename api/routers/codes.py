"""Short redemption codes: the customer's signed `Redemption` kept by the service behind 10 characters a
partner can type (or scan from a QR code). The customer stores, lists and cancels them here; the partner
redeems one on `POST /points/redemptions` with `{code, reference}` (see `api.routers.points`).

Why guessing is no risk: a code is 10 Crockford base32 characters from `secrets` (50 bits); only the
partner the authorisation names can redeem it (another partner's guess of it is `unknown_code`, as a
wrong code is); it lapses with the authorisation's deadline (15 minutes); and a partner whose lookups
fail too often is refused for a while (`FailedLookups`)."""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from typing import Annotated

import segno
from fastapi import APIRouter, Path, status
from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from api.deps import PointsAuthoriser, RuntimeDep
from api.errors import ApiError, responses
from api.runtime import Runtime
from api.schemas import RedemptionCodePublic, RedemptionCodesPublic, TypedDataSubmission
from identity.types import Subject
from ledger import eip712
from ledger.consent import CONTROLLER_OF
from ledger.eip712 import Redemption
from ledger.points import REQUEST_BY_REF, RedemptionCode, RedemptionCodeEnd
from ledger.types import MAX_POINTS

router = APIRouter(tags=["points"], responses=responses(401, 403))

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
LENGTH = 10  # 50 bits
_READ_AS = str.maketrans({"I": "1", "L": "1", "O": "0"})  # what Crockford decodes the look-alikes as
_IGNORED = str.maketrans("", "", " -\t")
MAX_ATTEMPTS = 5  # a new code that collides with a stored one is drawn again (2**-50 each: never, in practice)

CodeParam = Annotated[
    str,
    Path(max_length=32, description="the short code, any case, spaces and hyphens ignored", examples=["K7QX-3MZP-9D"]),
]


def new_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


def normalise(text: str) -> str | None:
    """The code `text` names, as stored: upper case, without spaces and hyphens, look-alikes read as
    Crockford does; None when it cannot be one."""
    code = text.translate(_IGNORED).upper().translate(_READ_AS)
    if len(code) != LENGTH or any(c not in ALPHABET for c in code):
        return None
    return code


def grouped(code: str) -> str:
    """`K7QX3MZP9D` as read aloud or typed: `K7QX-3MZP-9D`."""
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def qr_svg(code: str) -> str:
    """The code as a QR code (an SVG data: URI); it holds the code only, grouped, as a scanner types it."""
    return str(segno.make(grouped(code), error="m").svg_data_uri(scale=6, border=2))


class FailedLookups:
    """Refuse a partner's code lookups for a while once too many have failed (`LIMIT` in `WINDOW`
    seconds): a guessing partner gets a handful of tries per window, against 2**50 codes. Per API
    process (each worker keeps its own count): cheap, and the bound it gives stays astronomically small."""

    LIMIT = 10
    WINDOW = 15 * 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, partner: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(partner, deque())
        while failures and failures[0] <= now - self.WINDOW:
            failures.popleft()
        return failures

    def check(self, partner: str) -> None:
        """Raise 429 `too_many_code_failures` while `partner` is locked out."""
        now = time.monotonic()
        with self._lock:
            failures = self._recent(partner, now)
            if len(failures) >= self.LIMIT:
                wait = int(failures[0] + self.WINDOW - now) + 1
                raise ApiError(
                    429,
                    "too_many_code_failures",
                    "Too many unknown codes; wait before trying again",
                    f"{len(failures)} failed code lookups in {int(self.WINDOW // 60)} minutes; try again in {wait} s",
                )

    def failed(self, partner: str) -> None:
        with self._lock:
            self._recent(partner, time.monotonic()).append(time.monotonic())

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()


FAILED_LOOKUPS = FailedLookups()

_CODE_WITH_END = select(RedemptionCode.__table__, RedemptionCodeEnd.outcome).outerjoin(
    RedemptionCodeEnd, RedemptionCodeEnd.code_id == RedemptionCode.id
)


def ended(outcome: str) -> ApiError:
    if outcome == "cancelled":
        return ApiError(409, "code_cancelled", "The customer cancelled this code")
    return ApiError(409, "code_used", "This code was used already")


def expired() -> ApiError:
    return ApiError(410, "code_expired", "This code has expired; the customer can make a new one")


def unknown() -> ApiError:
    return ApiError(404, "unknown_code", "No such code", "check the code the customer shows")


def for_partner(connection: Connection, text: str, partner: str | None) -> RedemptionCode:
    """The outstanding code `text` names for `partner` (the redemption route's lookup, in its read
    transaction); a malformed, unknown or another partner's code counts as a failed lookup."""
    code = normalise(text)
    if code is None:
        raise ApiError(
            422, "invalid_code", "That is not a redemption code", "10 characters: digits and letters except I, L, O, U"
        )
    found = connection.execute(_CODE_WITH_END.where(RedemptionCode.code == code)).first()
    if found is None or partner is None or found.partner != partner:
        if partner is not None:
            FAILED_LOOKUPS.failed(partner)
        raise unknown()
    if found.outcome is not None:
        raise ended(found.outcome)
    if found.deadline <= time.time():
        raise expired()
    return RedemptionCode(**{c.key: found._mapping[c.key] for c in RedemptionCode.__table__.columns})


def by_redemption_id(connection: Connection, redemption_id: bytes) -> tuple[int, str | None] | None:
    """The code that keeps the authorisation `redemption_id`, if one does: its id and how it ended (the
    typed-data route refuses a cancelled one too, and ends an outstanding one it redeems)."""
    found = connection.execute(
        select(RedemptionCode.id, RedemptionCodeEnd.outcome)
        .outerjoin(RedemptionCodeEnd, RedemptionCodeEnd.code_id == RedemptionCode.id)
        .where(RedemptionCode.redemption_id == redemption_id)
    ).first()
    return None if found is None else (found.id, found.outcome)


def _public(runtime: Runtime, row: RedemptionCode) -> RedemptionCodePublic:
    return RedemptionCodePublic(
        code=grouped(row.code),
        partner=row.partner,
        partner_name=runtime.catalogue().partners.get(row.partner),
        amount=row.amount,
        expires_at=row.deadline,
        redemption_id="0x" + row.redemption_id.hex(),
        qr_svg=qr_svg(row.code),
    )


@router.post(
    "/points/codes",
    response_model=RedemptionCodePublic,
    status_code=status.HTTP_201_CREATED,
    responses=responses(409, 422),
)
def store_code(body: TypedDataSubmission, runtime: RuntimeDep, caller: PointsAuthoriser) -> RedemptionCodePublic:
    """Keep the customer's signed `Redemption` (from the prepare route) and answer a short code for the
    partner to redeem it with, once, until the authorisation's deadline. Checked as a redemption is:
    the ledger's domain, the customer's own, signed by the bound key, not over the balance, not expired.
    One outstanding code per partner (the ledger takes a partner's authorisations in nonce order)."""
    assert caller.subject is not None
    domain = runtime.ledger.points.domain
    try:
        message = eip712.parse(body.typed_data, domain, ("Redemption",))
        signature = eip712.Signature.from_bytes(bytes.fromhex(body.signature[2:]))
        signer = eip712.recover(domain, message, signature)
    except (eip712.TypedDataError, ValueError) as exc:
        raise ApiError(
            422, "invalid_typed_data", "The signed data is not a redemption of this ledger", str(exc)
        ) from exc
    assert isinstance(message, Redemption)
    if bytes(message.subject) != caller.subject:
        raise ApiError(403, "not_your_authorisation", "This authorisation is another customer's")
    partners = runtime.catalogue().partners
    if message.partner not in partners:
        raise ApiError(422, "unknown_partner", "No such partner", message.partner)
    if not 0 < message.amount <= MAX_POINTS:
        raise ApiError(422, "invalid_amount", "Invalid amount")
    if message.deadline <= time.time():
        raise ApiError(422, "signature_expired", "The authorisation has expired; authorise again")
    balance = runtime.ledger.points.balance_of(Subject(caller.subject))
    if message.amount > balance:
        raise ApiError(
            409, "insufficient_points", "Not enough unexpired points", f"{message.amount} asked, {balance} held"
        )
    with runtime.engine.connect() as connection:
        controller = connection.execute(CONTROLLER_OF, {"subject": bytes(message.subject)}).scalar()
        if controller is None:
            raise ApiError(422, "unbound_subject", "The customer has not bound a key")
        if signer != controller:
            raise ApiError(422, "invalid_signature", "The authorisation was not signed by the customer's bound key")
        if connection.execute(REQUEST_BY_REF, {"ref": message.redemption_id}).first() is not None:
            raise ApiError(409, "authorisation_used", "This authorisation was used already")
        if by_redemption_id(connection, message.redemption_id) is not None:
            raise ApiError(409, "authorisation_used", "This authorisation has a code already")
    outstanding = [c for c in _outstanding(runtime, caller.subject) if c.partner == message.partner]
    if outstanding:
        raise ApiError(
            409,
            "code_outstanding",
            "You have an outstanding code for this partner",
            "use it or cancel it first: the ledger takes a partner's authorisations one after another",
        )
    sequence = runtime.ledger.points_reader.next_sequence(
        controller,
        message.partner,
        runtime.ledger.points.nonce_of(controller, message.partner),
    )
    if message.nonce != eip712.redemption_nonce(message.partner, sequence):
        raise ApiError(409, "nonce_mismatch", "The authorisation's nonce is not the next one; authorise again")
    for _ in range(MAX_ATTEMPTS):
        row = RedemptionCode(
            code=new_code(),
            redemption_id=message.redemption_id,
            subject=bytes(message.subject),
            controller=controller,
            partner=message.partner,
            amount=message.amount,
            nonce=str(message.nonce),
            deadline=message.deadline,
            v=signature.v,
            r=signature.r,
            s=signature.s,
        )
        try:
            with runtime.sessions() as session:
                session.add(row)
                session.flush()
                session.expunge(row)
        except IntegrityError:
            with runtime.reads() as session:
                if session.scalar(
                    select(RedemptionCode.id).where(RedemptionCode.redemption_id == message.redemption_id)
                ):
                    raise ApiError(409, "authorisation_used", "This authorisation has a code already") from None
            continue  # the code collided: draw another
        return _public(runtime, row)
    raise ApiError(503, "busy", "No free code was found; retry")


def _outstanding(runtime: Runtime, subject: bytes) -> list[RedemptionCode]:
    with runtime.reads() as session:
        rows = session.scalars(
            select(RedemptionCode)
            .outerjoin(RedemptionCodeEnd, RedemptionCodeEnd.code_id == RedemptionCode.id)
            .where(
                RedemptionCode.subject == subject,
                RedemptionCode.deadline > int(time.time()),
                RedemptionCodeEnd.code_id.is_(None),
            )
            .order_by(RedemptionCode.deadline, RedemptionCode.id)
        ).all()
        for row in rows:
            session.expunge(row)
        return list(rows)


@router.get("/points/codes", response_model=RedemptionCodesPublic)
def list_codes(runtime: RuntimeDep, caller: PointsAuthoriser) -> RedemptionCodesPublic:
    """The customer's outstanding codes (not used, cancelled or expired), soonest to expire first."""
    assert caller.subject is not None
    return RedemptionCodesPublic(codes=[_public(runtime, row) for row in _outstanding(runtime, caller.subject)])


@router.delete("/points/codes/{code}", response_model=RedemptionCodesPublic, responses=responses(404, 409, 410, 422))
def cancel_code(code: CodeParam, runtime: RuntimeDep, caller: PointsAuthoriser) -> RedemptionCodesPublic:
    """Cancel an outstanding code: the service will not redeem it, nor its signed authorisation sent as
    typed data. Answers the codes still outstanding. A used code cannot be cancelled (409 `code_used`)."""
    assert caller.subject is not None
    normal = normalise(code)
    if normal is None:
        raise ApiError(
            422, "invalid_code", "That is not a redemption code", "10 characters: digits and letters except I, L, O, U"
        )
    for _ in range(2):
        with runtime.engine.connect() as connection:
            found = connection.execute(_CODE_WITH_END.where(RedemptionCode.code == normal)).first()
        if found is None or found.subject != caller.subject:
            raise unknown()
        if found.outcome is not None:
            raise ended(found.outcome)
        if found.deadline <= time.time():
            raise expired()
        try:
            with runtime.sessions() as session:
                session.add(RedemptionCodeEnd(code_id=found.id, outcome="cancelled"))
        except IntegrityError:
            continue  # a partner redeemed it meanwhile: look again, and say so
        return list_codes(runtime, caller)
    raise ApiError(409, "code_used", "This code was used already")
