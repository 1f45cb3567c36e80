"""The access log: auditors list and verify it, customers see who accessed their data."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from api.auth import Scope
from api.deps import AuditReader, OwnAccessesReader, RuntimeDep
from api.errors import ApiError, responses
from api.fields import Key, LogIndex, Name
from api.reference import Catalogue
from api.routers.customers import own_subject, subject_of
from api.runtime import Runtime
from api.schemas import AccessPage, AccessPublic, DivergencePublic, VerificationPublic
from identity.did import DidWeb
from identity.types import Subject
from ledger import eip712
from ledger.access import AccessEntry

router = APIRouter(tags=["audit"], responses=responses(401, 403))
CSV_COLUMNS = [
    "index", "block_time", "did", "partner", "partner_name", "purpose", "attributes", "permitted", "request_id",
    "tx_hash", "block_number",
]  # fmt: skip


def _public(runtime: Runtime, rows: Iterable[AccessEntry]) -> list[AccessPublic]:
    return public_entries(runtime.dids, runtime.catalogue(), rows)


def public_entries(dids: DidWeb, catalogue: Catalogue, rows: Iterable[AccessEntry]) -> list[AccessPublic]:
    """Log entries as auditors and customers see them (names instead of on-chain ids); the CLI shares it."""
    return [
        AccessPublic(
            index=row.index,
            did=dids.did(Subject(bytes(row.subject))),
            partner=row.partner,
            partner_name=catalogue.partners.get(row.partner),
            purpose=catalogue.purpose_key(bytes(row.purpose)),
            attributes=catalogue.names(int(row.attributes)),
            permitted=row.permitted,
            request_id="0x" + bytes(row.request_id).hex(),
            tx_hash=row.tx_hash,
            block_number=row.block_number,
            block_time=row.block_time,
        )
        for row in rows
    ]


def _csv(entries: list[AccessPublic], filename: str) -> Response:
    return Response(
        entries_csv(entries),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def entries_csv(entries: list[AccessPublic]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for e in entries:
        writer.writerow(
            [
                e.index,
                datetime.fromtimestamp(e.block_time, UTC).isoformat(),
                e.did,
                e.partner,
                e.partner_name or "",
                e.purpose,
                " ".join(e.attributes),
                "true" if e.permitted else "false",
                e.request_id,
                e.tx_hash,
                e.block_number,
            ]
        )
    return out.getvalue()


def _epoch(value: datetime | None) -> int | None:
    if value is None:
        return None
    return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())


Format = Annotated[Literal["json", "csv"], Query(description="json (default) or csv")]
Limit = Annotated[int, Query(ge=1, le=10_000, description="entries per page")]
After = Annotated[LogIndex, Query(description="`next_after` of the previous page")]


@router.get(
    "/audit/accesses",
    response_model=AccessPage,
    responses={**responses(404, 422), 200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
)
def accesses(
    runtime: RuntimeDep,
    _caller: AuditReader,
    did: Annotated[str | None, Query(description="only this customer")] = None,
    partner: Annotated[Name | None, Query(description="partner name or address")] = None,
    purpose: Annotated[Key | None, Query(description="purpose key, e.g. analytics.reporting")] = None,
    start: Annotated[datetime | None, Query(alias="from", description="from this time (inclusive), ISO 8601")] = None,
    end: Annotated[datetime | None, Query(alias="to", description="until this time (exclusive), ISO 8601")] = None,
    permitted: Annotated[bool | None, Query(description="true: accesses; false: denied attempts")] = None,
    after: After = -1,
    limit: Limit = 1_000,
    format: Format = "json",
) -> Any:
    """The access log, filtered; pages in log order."""
    catalogue = runtime.catalogue()
    partner_address = None
    if partner is not None:
        partner_address = catalogue.partner(partner, retired=True)
        if partner_address is None:
            raise ApiError(404, "unknown_partner", "No such partner", field="partner")
    if purpose is not None and purpose not in catalogue.purposes:
        raise ApiError(404, "unknown_purpose", "No such purpose", field="purpose")
    first, last = _epoch(start), _epoch(end)
    if first is not None and last is not None and last <= first:
        raise ApiError(422, "invalid_period", "`to` must be after `from`")
    rows = runtime.ledger.access_reader.entries(
        subject=subject_of(runtime, did) if did is not None else None,
        partner=partner_address,
        purpose=eip712.purpose_id(purpose) if purpose is not None else None,
        start=first,
        end=last,
        permitted=permitted,
        after=after,
        limit=limit,
    )
    entries = _public(runtime, rows)
    if format == "csv":
        return _csv(entries, "accesses.csv")
    return AccessPage(entries=entries, next_after=entries[-1].index if len(entries) == limit else None)


@router.post("/audit/verify", response_model=VerificationPublic, responses=responses(503))
def verify(runtime: RuntimeDep, _caller: AuditReader) -> VerificationPublic:
    """Recompute the hash chain from the chain's events; compare it with the contract's head and
    count and with the read model, entry by entry. `ok`, or the first divergence."""
    result = runtime.verify_access_log()
    found = result.divergence
    return VerificationPublic(
        ok=result.ok,
        block_number=result.block_number,
        chain_count=result.chain_count,
        chain_head=result.chain_head,
        recomputed_head=result.recomputed_head,
        read_model_count=result.read_model_count,
        divergence=DivergencePublic(index=found.index, code=found.what, detail=found.detail) if found else None,
    )


@router.get(
    "/customers/{did}/accesses",
    response_model=AccessPage,
    responses={**responses(404), 200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
)
def customer_accesses(
    did: str,
    runtime: RuntimeDep,
    caller: OwnAccessesReader,
    after: After = -1,
    limit: Limit = 1_000,
    format: Format = "json",
) -> Any:
    """Who accessed this customer's data, when and for what (denied attempts included)."""
    subject = own_subject(runtime, caller, did, Scope.AUDIT_READ)
    entries = _public(runtime, runtime.ledger.access_reader.entries(subject=subject, after=after, limit=limit))
    if format == "csv":
        return _csv(entries, "my-accesses.csv")
    return AccessPage(entries=entries, next_after=entries[-1].index if len(entries) == limit else None)
