"""What a released table says about itself: the partner and purpose it was released for, the access
request that logged it, and the attribute category of each released column.

The bridge writes this into the Arrow schema's metadata (so into the Parquet file too); analytics
reads it to know which consent a table carries, and refuses a table that does not carry it.
"""

from __future__ import annotations

import json

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

METADATA_KEY = b"consent_ledger.release"


class ReleaseInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    partner: str = Field(description="The partner address the data was released to.")
    # Older releases carry only the address; a report names the partner by this when it is there.
    partner_name: str | None = Field(default=None, description="The partner's name in the catalogue.")
    purpose: str = Field(description="The purpose (Fideslang data use) the customers consented to.")
    request_id: str = Field(description="The access request id in the on-chain access log (0x hex).")
    columns: dict[str, str] = Field(description="Released column → attribute category (Fideslang data category).")

    def metadata(self) -> dict[bytes, bytes]:
        # Without a name the metadata is what it was before names were carried (older readers forbid
        # keys they do not know).
        return {METADATA_KEY: self.model_dump_json(exclude_none=True).encode()}

    @classmethod
    def of(cls, schema: pa.Schema) -> ReleaseInfo | None:
        """The release a schema describes, or None if it is not a bridge release (or is malformed)."""
        raw = (schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            return None
        try:
            return cls.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            return None
