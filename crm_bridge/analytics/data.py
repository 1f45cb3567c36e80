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
        self.starts = starts_of(self.counts)

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


def starts_of(counts: np.ndarray) -> np.ndarray:
    """Where each group starts in an array sorted by group, given the groups' sizes."""
    starts: np.ndarray = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return starts


def dictionary_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(per-row code, distinct values) of a column; nulls get code -1. Dictionary-encoded columns
    (as `Released` reads string columns) are taken as they are, without decoding a string per row."""
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    column = column.unify_dictionaries()
    if column.num_chunks == 0:
        return np.zeros(0, np.int64), pa.array([], column.type.value_type)
    dictionary = column.chunk(0).dictionary
    codes = np.concatenate(
        [pc.fill_null(c.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64) for c in column.chunks]
    )
    return codes, dictionary


class Released:
    """A table the bridge released (a Parquet file, or an Arrow table), checked for its release
    metadata. Columns are read when a method needs them, string columns dictionary-encoded: a million
    customers' orders are a few hundred MB of arrays, not gigabytes of strings."""

    def __init__(self, source: pa.Table | Path, fields: Fields | None = None, *, as_of: int | None = None) -> None:
        if isinstance(source, pa.Table):
            schema, self._table, self._path = source.schema, source, None
        else:
            try:
                schema = pq.read_schema(source)
            except (OSError, pa.ArrowInvalid) as exc:
                raise NotAReleasedTable(f"cannot read {source}: {exc}") from exc
            self._table, self._path = None, source
        info = ReleaseInfo.of(schema)
        if info is None:
            raise NotAReleasedTable(
                "the input carries no release metadata: analytics takes only tables `bridge export` released"
            )
        if DID not in schema.names:
            raise NotAReleasedTable(f"the input has no {DID!r} column")
        self.info, self.schema, self.fields, self._as_of = info, schema, fields or Fields(), as_of

    @property
    def as_of_given(self) -> bool:
        """Whether the analysis time was given (the analyst's --as-of) rather than taken from the data."""
        return self._as_of is not None

    def at(self, as_of: int) -> Released:
        """The same release analysed as of `as_of` (orders from then on left out)."""
        source = self._table if self._table is not None else self._path
        assert source is not None
        return Released(source, self.fields, as_of=as_of)

    def _column(self, name: str) -> pa.ChunkedArray:
        if self._table is not None:
            return self._table.column(name)
        field = self.schema.field(name)
        text = pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
        table = pq.read_table(self._path, columns=[name], read_dictionary=[name] if text else None)
        return table.column(name)

    # consent ------------------------------------------------------------------------------------

    def released(self, column: str, category: str) -> bool:
        """Whether the release carries `column` as an attribute of `category`."""
        return self.info.columns.get(column) == category and column in self.schema.names

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
        ts_col = self._column(f.timestamp)
        if pa.types.is_timestamp(ts_col.type):
            ts_col = pc.cast(ts_col, pa.timestamp("s", ts_col.type.tz)).cast(pa.int64())
        valid = ~pc.is_null(ts_col).to_numpy(zero_copy_only=False)
        ts = pc.fill_null(ts_col, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        del ts_col
        amount_col = self._column(f.amount)
        valid &= ~pc.is_null(amount_col).to_numpy(zero_copy_only=False)
        amount = pc.fill_null(pc.cast(amount_col, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        del amount_col
        codes, dictionary = dictionary_codes(self._column(DID))
        valid &= codes >= 0
        if self._as_of is not None:
            valid &= ts < self._as_of  # orders after the analysis time are the future
        rows = np.flatnonzero(valid)
        codes, ts, amount = codes[rows], ts[rows], amount[rows]
        # Renumber the customers present (a customer whose cells were all withheld is not one here).
        present, codes = np.unique(codes, return_inverse=True)
        base = int(ts.min()) if len(ts) else 0
        if len(ts) and int(ts.max()) - base < 1 << 32:
            order = np.argsort((codes.astype(np.int64) << 32) | (ts - base))  # one int64 sort: a lexsort's speed x3
        else:
            order = np.lexsort((ts, codes))
        as_of = self._as_of if self._as_of is not None else (int(ts.max()) // DAY + 1) * DAY if len(ts) else 0
        return Orders(
            dids=dictionary.take(pa.array(present)),
            customer=codes[order],
            ts=ts[order],
            amount=amount[order],
            rows=rows[order],
            as_of=as_of,
        )

    def codes_for_orders(self, name: str) -> tuple[np.ndarray, pa.Array]:
        """A released column aligned with `orders` (one value per order, in its order), as
        (per-order code into the distinct values, distinct values); -1 for a null."""
        codes, dictionary = dictionary_codes(self._column(name))
        return codes[self.orders.rows], dictionary


def figure(value: float, digits: int = 4) -> float:
    """A float as the report shows it: `digits` significant digits (JSON and HTML print the same)."""
    v = float(value)
    if v == 0 or not np.isfinite(v):
        return 0.0 if v == 0 else v
    return float(f"{v:.{digits}g}")
