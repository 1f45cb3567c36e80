from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pytest

from crm_bridge.release import ReleaseInfo
from scripts import generate_crm


@pytest.fixture(scope="session")
def generated() -> pa.Table:
    """What the bridge would release for 5,000 generated customers who consented to everything."""
    return pa.concat_tables(generate_crm.released(5_000, seed=5))


@pytest.fixture(scope="session")
def textbook() -> pa.Table:
    """5,000 customers whose purchases follow BG/NBD and spend Gamma-Gamma exactly (to check a fit
    recovers the parameters its data was drawn from)."""
    return pa.concat_tables(generate_crm.released(5_000, seed=5, textbook=True))


def restrict(table: pa.Table, *, drop: tuple[str, ...] = (), purpose: str | None = None) -> pa.Table:
    """The same release as if made for another purpose, or without some columns (never consented)."""
    info = ReleaseInfo.of(table.schema)
    assert info is not None
    columns = {c: cat for c, cat in info.columns.items() if c not in drop}
    changed = info.model_copy(update={"columns": columns, "purpose": purpose or info.purpose})
    return table.drop_columns(list(drop)).replace_schema_metadata(changed.metadata())


Restrict = Callable[..., pa.Table]
