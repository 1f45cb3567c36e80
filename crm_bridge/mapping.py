"""Which CRM column is which: the PII fields that identify a person, and the attribute category
(Fideslang data category, as in the consent registry's attribute list) each other column belongs to.

A column the mapping does not name is never released; a PII column can never be released:

```toml
[pii]
email = "email"          # CRM column holding the e-mail address
phone = "phone"
name = "full_name"

[columns]
order_id = "user.behavior.purchase_history"
order_ts = "user.behavior.purchase_history"
amount = "user.behavior.purchase_history"
age_band = "user.demographic"
```
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crm_bridge.errors import MappingError

PII_FIELDS = ("email", "phone", "name")


class PiiColumns(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    email: str | None = None
    phone: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _identifies(self) -> PiiColumns:
        if self.email is None and self.phone is None:
            raise ValueError("[pii] must name an email or a phone column (a subject derives from one of them)")
        return self

    def columns(self) -> dict[str, str]:
        """PII field → CRM column."""
        return {f: c for f in PII_FIELDS if (c := getattr(self, f)) is not None}


class Mapping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pii: PiiColumns
    columns: dict[str, str] = Field(description="CRM column → attribute category key")
    default_region: str | None = Field(
        default=None, description="Region for phone numbers written without a country code (e.g. GB)."
    )

    @model_validator(mode="after")
    def _no_pii_released(self) -> Mapping:
        leaked = sorted(set(self.columns) & set(self.pii.columns().values()))
        if leaked:
            raise ValueError(f"PII columns cannot be released: {', '.join(leaked)}")
        if "did" in self.columns:
            raise ValueError("'did' is the output's key column; rename the CRM column")
        return self

    def categories(self) -> set[str]:
        return set(self.columns.values())

    def read_columns(self) -> tuple[str, ...]:
        """The CRM columns an export reads: the identifiers a subject derives from (e-mail, phone) and
        the columns it may release. Anything else (the name, internal ids) is never even parsed."""
        identifiers = [c for f, c in self.pii.columns().items() if f != "name"]
        return tuple(dict.fromkeys([*identifiers, *self.columns]))

    def check_columns(self, available: list[str]) -> None:
        missing = sorted(set(self.read_columns()) - set(available))
        if missing:
            raise MappingError(f"the input has no column {', '.join(missing)}")

    @classmethod
    def load(cls, path: Path) -> Mapping:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise MappingError(f"cannot read the mapping {path}: {exc}") from exc
        return cls.parse(raw, str(path))

    @classmethod
    def parse(cls, raw: dict[str, object], where: str = "mapping") -> Mapping:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'mapping'}: {e['msg']}" for e in exc.errors())
            raise MappingError(f"{where}: {problems}") from exc
