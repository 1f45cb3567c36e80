"""Reference data: partners, purposes (Fideslang data uses), attribute categories (Fideslang data categories)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, status
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from api.deps import ReferenceRead, ReferenceWrite, RuntimeDep
from api.errors import ApiError, responses
from api.models import AttributeRow, Partner, Principal, PurposeRow
from api.reference import purpose_public
from api.schemas import AttributeCreate, AttributePublic, PartnerCreate, PartnerPublic, PurposeCreate, PurposePublic
from ledger.store import as_utc, utcnow
from ledger.types import ATTRIBUTE_BITS

log = logging.getLogger(__name__)
router = APIRouter(tags=["reference"], responses=responses(401, 403))


def _public(partner: Partner) -> PartnerPublic:
    retired = as_utc(partner.retired_at).isoformat() if partner.retired_at is not None else None
    return PartnerPublic(name=partner.name, address=partner.address, retired_at=retired)


@router.get("/partners", response_model=list[PartnerPublic])
def list_partners(runtime: RuntimeDep, _caller: ReferenceRead, include_retired: bool = False) -> list[PartnerPublic]:
    """The partners of the programme (with `include_retired`, also those that have left it)."""
    query = select(Partner).order_by(Partner.name)
    if not include_retired:
        query = query.where(Partner.retired_at.is_(None))
    with runtime.reads() as session:
        return [_public(p) for p in session.scalars(query)]


@router.delete("/partners/{name}", response_model=PartnerPublic, responses=responses(404))
def retire_partner(name: str, runtime: RuntimeDep, _caller: ReferenceWrite) -> PartnerPublic:
    """The partner leaves the programme: its API keys stop working (within 30 s), and the chain takes
    its partner role back, so that no consent to it permits an access any more (the access log checks
    the role), nothing new can be granted to it and it redeems no points. Customers can still revoke
    what they granted it, and records keep its name. Retiring again answers the same."""
    with runtime.sessions() as session:
        partner = session.scalar(select(Partner).where(Partner.name == name))
        if partner is None:
            raise ApiError(404, "unknown_partner", "No such partner", name)
        if partner.retired_at is None:
            partner.retired_at = utcnow()
            keys = update(Principal).where(Principal.address == partner.address, Principal.role == "partner")
            session.execute(keys.where(Principal.revoked_at.is_(None)).values(revoked_at=partner.retired_at))
        answer = _public(partner)
    runtime.invalidate_catalogue()
    try:
        runtime.sync_partners()
    except Exception:  # the node or the supervisor is away: the maintenance thread takes the role every second
        log.warning("the chain could not take retired partner %s's role yet; it will be retried", answer.address)
    return answer


@router.post(
    "/partners", response_model=PartnerPublic, status_code=status.HTTP_201_CREATED, responses=responses(409, 422)
)
def create_partner(body: PartnerCreate, runtime: RuntimeDep, _caller: ReferenceWrite) -> PartnerPublic:
    from web3 import Web3

    address = Web3.to_checksum_address(body.address)
    try:
        with runtime.sessions() as session:
            session.add(Partner(address=address, name=body.name, on_chain=False))
    except IntegrityError as exc:
        raise ApiError(409, "partner_exists", "A partner with that name or address exists") from exc
    runtime.invalidate_catalogue()
    runtime.sync_partners()
    return PartnerPublic(name=body.name, address=address)


@router.get("/purposes", response_model=list[PurposePublic])
def list_purposes(runtime: RuntimeDep, _caller: ReferenceRead) -> list[PurposePublic]:
    with runtime.reads() as session:
        return [purpose_public(p) for p in session.scalars(select(PurposeRow).order_by(PurposeRow.key))]


@router.post(
    "/purposes", response_model=PurposePublic, status_code=status.HTTP_201_CREATED, responses=responses(409, 422)
)
def create_purpose(body: PurposeCreate, runtime: RuntimeDep, _caller: ReferenceWrite) -> PurposePublic:
    row = PurposeRow(key=body.key, name=body.name, description=body.description, legal_basis=body.legal_basis)
    try:
        with runtime.sessions() as session:
            session.add(row)
    except IntegrityError as exc:
        raise ApiError(409, "purpose_exists", "A purpose with that key exists") from exc
    runtime.invalidate_catalogue()
    return purpose_public(row)


@router.get("/attributes", response_model=list[AttributePublic])
def list_attributes(runtime: RuntimeDep, _caller: ReferenceRead) -> list[AttributePublic]:
    with runtime.reads() as session:
        return [
            AttributePublic(bit=a.bit, key=a.key, name=a.name)
            for a in session.scalars(select(AttributeRow).order_by(AttributeRow.bit))
        ]


@router.post(
    "/attributes", response_model=AttributePublic, status_code=status.HTTP_201_CREATED, responses=responses(409, 422)
)
def create_attribute(body: AttributeCreate, runtime: RuntimeDep, _caller: ReferenceWrite) -> AttributePublic:
    try:
        with runtime.sessions() as session:
            highest = session.scalar(select(func.max(AttributeRow.bit)))
            bit = 0 if highest is None else highest + 1  # appended: existing bits never move
            if bit >= ATTRIBUTE_BITS:
                raise ApiError(409, "attributes_full", f"All {ATTRIBUTE_BITS} attribute bits are in use")
            session.add(AttributeRow(bit=bit, key=body.key, name=body.name))
    except IntegrityError as exc:
        raise ApiError(409, "attribute_exists", "An attribute with that key exists") from exc
    runtime.invalidate_catalogue()
    return AttributePublic(bit=bit, key=body.key, name=body.name)
