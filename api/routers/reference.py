"""Reference data: partners, purposes (Fideslang data uses), attribute categories (Fideslang data categories)."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from api.deps import ReferenceRead, ReferenceWrite, RuntimeDep
from api.errors import ApiError, responses
from api.models import AttributeRow, Partner, PurposeRow
from api.schemas import AttributeCreate, AttributePublic, PartnerCreate, PartnerPublic, PurposeCreate, PurposePublic
from ledger.consent import ATTRIBUTE_BITS
from ledger.eip712 import purpose_id

router = APIRouter(tags=["reference"], responses=responses(401, 403))


@router.get("/partners", response_model=list[PartnerPublic])
def list_partners(runtime: RuntimeDep, _caller: ReferenceRead) -> list[PartnerPublic]:
    with runtime.reads() as session:
        return [
            PartnerPublic(name=p.name, address=p.address)
            for p in session.scalars(select(Partner).order_by(Partner.name))
        ]


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
        return [
            PurposePublic(key=p.key, id="0x" + bytes(purpose_id(p.key)).hex(), name=p.name, description=p.description)
            for p in session.scalars(select(PurposeRow).order_by(PurposeRow.key))
        ]


@router.post(
    "/purposes", response_model=PurposePublic, status_code=status.HTTP_201_CREATED, responses=responses(409, 422)
)
def create_purpose(body: PurposeCreate, runtime: RuntimeDep, _caller: ReferenceWrite) -> PurposePublic:
    try:
        with runtime.sessions() as session:
            session.add(PurposeRow(key=body.key, name=body.name, description=body.description))
    except IntegrityError as exc:
        raise ApiError(409, "purpose_exists", "A purpose with that key exists") from exc
    runtime.invalidate_catalogue()
    return PurposePublic(
        key=body.key, id="0x" + bytes(purpose_id(body.key)).hex(), name=body.name, description=body.description
    )


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
