"""The released table, read for analytics: which consent it carries, and the orders it holds as
numpy arrays sorted by customer then time (one pass of work per method, not per customer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crm_bridge.analytics.errors import ConsentMissing, NotAReleasedTable
from crm_bridge.release import ReleaseInfo

DID = "did"
# Fideslang: the data use analytics serves (and its children, e.g. analytics.reporting) ...
ANALYTICS_USE = "analytics"
# ... and the data categories it reads.
PURCHASES = "user.behavior.purchase_history"
DEMOGRAPHIC = "user.demographic"
LOCATION = "user.location"
DAY = 86_400


@dataclass(frozen=True)
class Fields:
    """Which released column holds what (defaults: the names `scripts/generate_crm.py` and its mapping use)."""

    timestamp: str = "order_ts"
    amount: str = "amount"
    basket: str = "products"
    basket_separator: str = ";"
    profile: tuple[str, ...] = ("age_band", "gender", "region")  # optional churn features


@dataclass(frozen=True)
class Requirement:
    method: str
    columns: tuple[str, ...]  # released columns the method needs
    category: str = PURCHASES  # the attribute category those columns belong to


@dataclass
class Orders:
    """Orders of customers who released their purchase history, sorted by (customer, time)."""

    dids: pa.Array  # customer code → DID
    customer: np.ndarray  # per order: customer code (int64)
    ts: np.ndarray  # per order: seconds since the epoch (int64)
    amount: np.ndarray  # per order: float64
    rows: np.ndarray  # per order: its row in the released table (to align other columns)
    as_of: int  # analysis time (seconds): the end of the last day with an order, unless given
    starts: np.ndarray = field(init=False)  # customer code → index of its first order
    counts: np.ndarray = field(init=False)  # customer code → number of orders

    def __post_init__(self) -> None:
        self.counts = np.bincount(self.customer, minlength=len(self.dids))
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    @property
    def customers(self) -> int:
        return len(self.dids)

    def first_ts(self) -> np.ndarray:
        first: np.ndarray = self.ts[self.starts]
        return first

    def last_ts(self) -> np.ndarray:
        last: np.ndarray = self.ts[self.starts + self.counts - 1]
        return last

    def total(self) -> np.ndarray:
        return np.bincount(self.customer, weights=self.amount, minlength=self.customers)


class Released:
    """A table the bridge released (Parquet file or Arrow table), checked for its release metadata."""

    def __init__(self, table: pa.Table, fields: Fields | None = None, *, as_of: int | None = None) -> None:
        info = ReleaseInfo.of(table.schema)
        if info is None:
            raise NotAReleasedTable(
                "the input carries no release metadata: analytics takes only tables `bridge export` released"
            )
        if DID not in table.column_names:
            raise NotAReleasedTable(f"the input has no {DID!r} column")
        self.info, self.table, self.fields, self._as_of = info, table, fields or Fields(), as_of

    @classmethod
    def read(cls, path: Path, fields: Fields | None = None, *, as_of: int | None = None) -> Released:
        try:
            table = pq.read_table(path, read_dictionary=[DID])
        except (OSError, pa.ArrowInvalid) as exc:
            raise NotAReleasedTable(f"cannot read {path}: {exc}") from exc
        return cls(table, fields, as_of=as_of)

    # consent ------------------------------------------------------------------------------------

    def released(self, column: str, category: str) -> bool:
        """Whether the release carries `column` as an attribute of `category`."""
        return self.info.columns.get(column) == category and column in self.table.column_names

    def require(self, requirement: Requirement) -> None:
        """Raise ConsentMissing unless the release was for an analytics purpose and carries the columns."""
        purpose_ok = self.info.purpose == ANALYTICS_USE or self.info.purpose.startswith(ANALYTICS_USE + ".")
        missing = [c for c in requirement.columns if not self.released(c, requirement.category)]
        if not purpose_ok or missing:
            raise ConsentMissing(
                requirement.method,
                f"{ANALYTICS_USE}.reporting" if not purpose_ok else self.info.purpose,
                [requirement.category] if missing else [],
                self.info.purpose,
            )

    def profile_columns(self) -> list[str]:
        """The optional profile columns released (demographic or location categories)."""
        return [c for c in self.fields.profile if self.released(c, DEMOGRAPHIC) or self.released(c, LOCATION)]

    # data ---------------------------------------------------------------------------------------

    @cached_property
    def orders(self) -> Orders:
        f = self.fields
        ts_col = self.table.column(f.timestamp)
        if pa.types.is_timestamp(ts_col.type):
            ts_col = pc.cast(ts_col, pa.timestamp("s", ts_col.type.tz)).cast(pa.int64())
        ts = ts_col.to_numpy(zero_copy_only=False)
        amount_col = self.table.column(f.amount)
        valid = ~(
            pc.is_null(ts_col).to_numpy(zero_copy_only=False) | pc.is_null(amount_col).to_numpy(zero_copy_only=False)
        )
        amount = pc.fill_null(pc.cast(amount_col, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        did = self.table.column(DID)
        if not pa.types.is_dictionary(did.type):
            did = pc.dictionary_encode(did)
        did = did.unify_dictionaries()
        dictionary = did.chunk(0).dictionary if did.num_chunks else pa.array([], pa.string())
        codes = (
            np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in did.chunks]).astype(np.int64)
            if did.num_chunks
            else np.zeros(0, np.int64)
        )
        if self._as_of is not None:
            valid &= ts < self._as_of  # orders after the analysis time are the future
        rows = np.flatnonzero(valid)
        codes, ts = codes[rows], ts[rows].astype(np.int64)
        # Renumber the customers present (a customer whose cells were all withheld is not one here).
        present, codes = np.unique(codes, return_inverse=True)
        base = int(ts.min()) if len(ts) else 0
        if len(ts) and int(ts.max()) - base < 1 << 32:
            order = np.argsort((codes << 32) | (ts - base))  # one int64 sort: a lexsort's speed x3
        else:
            order = np.lexsort((ts, codes))
        as_of = self._as_of if self._as_of is not None else (int(ts.max()) // DAY + 1) * DAY if len(ts) else 0
        return Orders(
            dids=dictionary.take(pa.array(present)),
            customer=codes[order],
            ts=ts[order],
            amount=amount[rows][order],
            rows=rows[order],
            as_of=as_of,
        )

    def column_for_orders(self, name: str) -> pa.Array:
        """A released column, aligned with `orders` (one value per order, in its order)."""
        return self.table.column(name).take(pa.array(self.orders.rows))


def figure(value: float, digits: int = 4) -> float:
    """A float as the report shows it: `digits` significant digits (JSON and HTML print the same)."""
    v = float(value)
    if v == 0 or not np.isfinite(v):
        return 0.0 if v == 0 else v
    return float(f"{v:.{digits}g}")
