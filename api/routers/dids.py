"""DIDs: W3C DID resolution under /api/v1, and did:web documents where did:web resolvers look."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.runtime import Runtime
from identity.errors import InvalidDid

RESOLUTION_MEDIA_TYPE = 'application/ld+json;profile="https://w3id.org/did-resolution"'
# W3C DID Resolution, HTTP(S) binding: status codes by resolution error.
_STATUS = {"invalidDid": 400, "notFound": 404}


class DidResolutionPublic(BaseModel):
    """W3C DID Resolution result."""

    didDocument: dict[str, Any] | None  # noqa: N815 - the names the W3C specification gives
    didResolutionMetadata: dict[str, Any]  # noqa: N815
    didDocumentMetadata: dict[str, Any]  # noqa: N815


class DidDocumentPublic(BaseModel):
    """A DID document (W3C DID Core), as did:web resolvers fetch it."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    context: list[str] = Field(alias="@context")
    id: str
    controller: str
    verificationMethod: list[dict[str, Any]] | None = None  # noqa: N815
    authentication: list[str] | None = None
    assertionMethod: list[str] | None = None  # noqa: N815


class ResolutionResponse(JSONResponse):
    """For OpenAPI: a resolution result, whatever its status, is sent as the W3C media type."""

    media_type = RESOLUTION_MEDIA_TYPE


class DidDocumentResponse(JSONResponse):
    media_type = "application/did+json"


def _resolution(description: str) -> dict[str, Any]:
    return {"model": DidResolutionPublic, "description": description}


def _did_web_error(error: str) -> dict[str, Any]:
    """did:web answers its errors as `{"error": ...}` (a resolver reads only the status)."""
    schema = {"type": "object", "properties": {"error": {"const": error}}, "required": ["error"]}
    return {"description": error, "content": {"application/json": {"schema": schema}}}


router = APIRouter(prefix="/dids", tags=["dids"])
did_web = APIRouter(tags=["dids"])


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


@router.get(
    "/{did}",
    summary="Resolve a DID (W3C DID Resolution result)",
    response_model=DidResolutionPublic,
    response_class=ResolutionResponse,
    responses={400: _resolution("invalidDid"), 404: _resolution("notFound"), 410: _resolution("deactivated")},
)
def resolve(did: str, request: Request) -> JSONResponse:
    runtime = _runtime(request)
    result: dict[str, Any] = runtime.resolver.resolve(did)
    error = result["didResolutionMetadata"].get("error")
    status = _STATUS.get(error, 200) if error else (410 if result["didDocumentMetadata"].get("deactivated") else 200)
    return JSONResponse(result, status_code=status, media_type=RESOLUTION_MEDIA_TYPE)


@did_web.get(
    "/dids/{subject_hex}/did.json",
    summary="did:web document",
    response_model=DidDocumentPublic,
    response_class=DidDocumentResponse,
    responses={404: _did_web_error("notFound"), 410: _did_web_error("deactivated")},
)
def did_document(subject_hex: str, request: Request) -> JSONResponse:
    runtime = _runtime(request)
    try:
        subject = runtime.dids.subject(runtime.dids.prefix + subject_hex)
    except InvalidDid:
        return JSONResponse({"error": "notFound"}, status_code=404)
    record = runtime.vault.record(subject)
    if record is None:
        return JSONResponse({"error": "notFound"}, status_code=404)
    if record.erased_at is not None:  # did:web deactivation: the document is gone
        return JSONResponse({"error": "deactivated"}, status_code=410)
    return JSONResponse(runtime.dids.document(record), media_type="application/did+json")
