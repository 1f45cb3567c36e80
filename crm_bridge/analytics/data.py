"""The released table, read for analytics: which consent it carries, and the orders it holds as
numpy arrays sorted by customer then time (one pass of work per method, not per customer).

Real CRM exports are prepared here, once, for every method (`Released.orders`; what was done is
counted in `Orders.preparation` and stated in the report):
- times: any Arrow temporal type (date32/64, timestamps of any unit, with or without a zone), ISO 8601
  strings (fractions, offsets) or epoch seconds. They become wall-clock seconds in the business time
  zone, so `ts // DAY` is the purchase's local day everywhere: a zoned time is converted to it, a time
  without a zone (or a date) is taken as already in it.
- amounts: a missing amount (null or NaN) leaves the order out (its value is unknown, and a method
  that counts orders but not money would disagree with one that does about who bought what).
  A negative amount is a return: netted into its order when an order id column is released (the
  order keeps its own time), else into the customer's latest earlier order; a return with nothing to
  match is left out. An order refunded in full (net <= 0) was no purchase and is left out; a free
  order (0, nothing returned) is a purchase worth 0. The returns are kept beside the orders too (who,
  when: `Orders.return_customer`, `return_ts`), as behaviour (churn counts them before its cutoff).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crm_bridge.analytics.errors import (
    ColumnMissing,
    ConsentMissing,
    NoOrders,
    NotAReleasedTable,
    UnreadableColumn,
)
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
    order_id: str = "order_id"  # optional: matches a return to its order
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
    # What preparing the rows did (counts of rows/orders left out or changed): stated in the report.
    preparation: dict[str, int] = field(default_factory=dict)
    # The returns (rows with a negative amount) of these customers: per return, customer code and time.
    # Netted into their orders above, they are kept here too: a refund is behaviour (churn reads it).
    return_customer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    return_ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
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


def tenths(values: np.ndarray) -> np.ndarray:
    """0..9 per customer, 0 the lowest: ⌊10 · share of customers with a strictly lower value⌋ (the
    "minimum rank" rule, as RFM's quintiles). Equal values share a tenth whatever the row order, so a
    tenth can hold more than a tenth of the customers and another none."""
    lower = np.searchsorted(np.sort(values), values, side="left")  # customers with a strictly lower value
    result: np.ndarray = lower * 10 // max(len(values), 1)
    return result


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


def sorted_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """As `dictionary_codes`, with the distinct values sorted: a row's code depends on its value and
    the set of values, not on the order of the rows (which value happened to come first)."""
    codes, dictionary = dictionary_codes(column)
    if len(dictionary) == 0:
        return codes, dictionary
    order = pc.array_sort_indices(dictionary).to_numpy(zero_copy_only=False)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    ranked: np.ndarray = np.where(codes >= 0, rank[np.maximum(codes, 0)], -1)
    return ranked, dictionary.take(pa.array(order))


def order_keys(column: pa.ChunkedArray) -> np.ndarray:
    """Per row, an int64 key that is equal for equal order ids (−1: no id). Integer ids are their own
    keys (shifted to start at 0); others are dictionary codes. Dictionary-encoding twelve million
    distinct integers costs gigabytes of hash tables, and returns need only equality."""
    if pa.types.is_integer(column.type) and len(column):
        low = pc.min(column).as_py()
        if low is not None:
            shifted = pc.subtract(column.cast(pa.int64()), pa.scalar(low, pa.int64()))
            keys: np.ndarray = pc.fill_null(shifted, -1).to_numpy()
            return keys
    return dictionary_codes(column)[0]


_UNIT_SECONDS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def wall_seconds(column: pa.ChunkedArray, time_zone: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, is-known) per row: a time column as wall-clock seconds in `time_zone` (floored to
    the second), so that `seconds // DAY` is the local day. Zoned times are converted to the zone;
    times without one, dates and epoch integers are taken as they are."""
    kind = column.type
    if pa.types.is_dictionary(kind):  # strings as `Released` reads them: parse each distinct value once
        codes, values = dictionary_codes(column)
        seconds, known = wall_seconds(pa.chunked_array([values], values.type), time_zone, name)
        ok = codes >= 0
        safe = np.where(ok, codes, 0)
        if len(seconds) == 0:
            return np.zeros(len(codes), np.int64), np.zeros(len(codes), bool)
        return np.where(ok, seconds[safe], 0), ok & known[safe]
    if pa.types.is_null(kind):  # the bridge's empty export types its columns as null
        return np.zeros(len(column), np.int64), np.zeros(len(column), bool)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            column = pc.cast(column, pa.timestamp("ns"))  # ISO 8601 without an offset: local already
        except pa.ArrowInvalid:
            try:
                column = pc.cast(column, pa.timestamp("ns", "UTC"))  # with an offset (or Z) on each
            except pa.ArrowInvalid as exc:
                raise UnreadableColumn(
                    f"column {name!r} holds text that is not ISO 8601 times, all with or all without an offset ({exc})"
                ) from exc
        kind = column.type
    known = ~pc.is_null(column).to_numpy(zero_copy_only=False)
    if pa.types.is_timestamp(kind):
        if kind.tz is not None:
            column = pc.local_timestamp(pc.cast(column, pa.timestamp(kind.unit, time_zone)))
        raw = pc.fill_null(column.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
        return raw // _UNIT_SECONDS[kind.unit], known
    if pa.types.is_date32(kind):
        days = pc.fill_null(column.cast(pa.int32()), 0).to_numpy(zero_copy_only=False)
        return days.astype(np.int64) * DAY, known
    if pa.types.is_date64(kind):
        ms = pc.fill_null(column.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
        return ms // 1_000, known
    if pa.types.is_integer(kind):  # epoch seconds
        return pc.fill_null(column.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), known
    raise UnreadableColumn(f"column {name!r} is {kind}: not a date, a time or epoch seconds")


def amounts(column: pa.ChunkedArray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(amount, is-known) per row as float64; null, NaN and infinite amounts are unknown."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    try:
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)  # nulls become NaN
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UnreadableColumn(f"column {name!r} is {column.type}: not amounts ({exc})") from exc
    values = np.asarray(values, np.float64)
    known = np.isfinite(values)
    return np.where(known, values, 0.0), known


def net_returns(
    customer: np.ndarray, ts: np.ndarray, amount: np.ndarray, order: np.ndarray | None
) -> tuple[np.ndarray, dict[str, int]]:
    """Nets returns (negative amounts) into the orders they return, for rows sorted by (customer,
    time): `order` (per row: an order-id code, or None when no order id is released) matches a return
    to its order; without it a return goes to the customer's latest earlier order. Returns (which rows
    are purchases, with `amount` netted in place; counts). Only the rows of returned orders are
    grouped, so a release without returns costs one comparison."""
    counts = {"returns": 0, "returns_matched": 0, "returns_unmatched": 0, "refunded_orders": 0}
    returned = amount < 0
    purchase = ~returned
    counts["returns"] = int(returned.sum())
    if not counts["returns"]:
        return purchase, counts
    rows = np.flatnonzero(returned)
    if order is not None:
        # Rows of orders that have a return, grouped by (customer, order id): each return's target is
        # the first purchase row of its group. Only the rows of customers with a return are looked at,
        # their order ids renumbered from 0 (any int64 id, and a key of customer and id fits 64 bits).
        has_return = np.zeros(int(customer.max()) + 1, dtype=bool)
        has_return[customer[rows]] = True
        candidates = np.flatnonzero(has_return[customer])
        _, compact = np.unique(order[candidates], return_inverse=True)
        key = (customer[candidates].astype(np.int64) << 32) | compact.ravel().astype(np.int64)
        hit = np.isin(key, np.unique(key[returned[candidates]]))
        involved = candidates[hit]
        group_keys, group = np.unique(key[hit], return_inverse=True)
        target_of_group = np.full(len(group_keys), -1, np.int64)
        buying = involved[purchase[involved]]
        first = np.unique(group[purchase[involved]], return_index=True)
        target_of_group[first[0]] = buying[first[1]]
        target = target_of_group[group[~purchase[involved]]]
        rows = involved[~purchase[involved]]
    else:
        # The customer's latest paid purchase row at or before the return (rows are in time order).
        latest = np.maximum.accumulate(np.where(purchase & (amount > 0), np.arange(len(amount)), -1))
        target = latest[rows]
        target[(target >= 0) & (customer[np.maximum(target, 0)] != customer[rows])] = -1
    matched = target >= 0
    np.add.at(amount, target[matched], amount[rows[matched]])
    counts["returns_matched"] = int(matched.sum())
    counts["returns_unmatched"] = int((~matched).sum())
    hit = np.zeros(len(amount), bool)
    hit[target[matched]] = True
    refunded = purchase & hit & (amount <= 0)
    counts["refunded_orders"] = int(refunded.sum())
    return purchase & ~refunded, counts


class Released:
    """A table the bridge released (a Parquet file, or an Arrow table), checked for its release
    metadata. Columns are read when a method needs them, string columns dictionary-encoded: a million
    customers' orders are a few hundred MB of arrays, not gigabytes of strings."""

    def __init__(
        self,
        source: pa.Table | Path,
        fields: Fields | None = None,
        *,
        as_of: int | None = None,
        time_zone: str = "UTC",
    ) -> None:
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
        self.time_zone = time_zone

    @property
    def as_of_given(self) -> bool:
        """Whether the analysis time was given (the analyst's --as-of) rather than taken from the data."""
        return self._as_of is not None

    def at(self, as_of: int) -> Released:
        """The same release analysed as of `as_of` (orders from then on left out)."""
        source = self._table if self._table is not None else self._path
        assert source is not None
        return Released(source, self.fields, as_of=as_of, time_zone=self.time_zone)

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
        """Raise ConsentMissing unless the release was for an analytics purpose and carries the columns;
        ColumnMissing when it carries their category but not a column of that name (the column is
        missing from the data, not the consent from the customers)."""
        purpose_ok = self.info.purpose == ANALYTICS_USE or self.info.purpose.startswith(ANALYTICS_USE + ".")
        missing = [c for c in requirement.columns if not self.released(c, requirement.category)]
        of_category = [c for c, cat in self.info.columns.items() if cat == requirement.category]
        absent = [c for c in missing if c not in self.schema.names]
        if purpose_ok and absent and of_category:
            raise ColumnMissing(requirement.method, absent, [n for n in self.schema.names if n != DID])
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
        """The purchases, prepared as the module docstring says (vectorised: a few array passes)."""
        f = self.fields
        ts, valid = wall_seconds(self._column(f.timestamp), self.time_zone, f.timestamp)
        prep = {"rows": len(ts), "missing_time": int((~valid).sum())}
        amount, known = amounts(self._column(f.amount), f.amount)
        prep["missing_amount"] = int((valid & ~known).sum())
        valid &= known
        # Customers numbered in DID order, not in the order they first appear: every seeded sample or
        # split over customers (churn's fit/calibration split, the cluster and Pareto/NBD samples)
        # then picks the same customers whatever the order of the rows.
        codes, dictionary = sorted_codes(self._column(DID))
        valid &= codes >= 0
        if self._as_of is not None:
            prep["after_as_of"] = int((valid & (ts >= self._as_of)).sum())
            valid &= ts < self._as_of  # orders after the analysis time are the future
        rows = np.flatnonzero(valid)
        if len(rows) == 0:
            raise NoOrders(
                f"the released table holds no order with a customer, a time and an amount ({prep['rows']} rows;"
                f" {prep['missing_time']} without a time, {prep['missing_amount']} without an amount)"
            )
        codes, ts, amount = codes[rows], ts[rows], amount[rows]
        base = int(ts.min())
        if int(ts.max()) - base < 1 << 32 and int(codes.max()) < 1 << 31:
            # One int64 sort: a lexsort's speed x3 (stable: a return stays after its same-second order).
            order = np.argsort((codes.astype(np.int64) << 32) | (ts - base), kind="stable")
        else:
            order = np.lexsort((ts, codes))
        codes, ts, amount, rows = codes[order], ts[order], amount[order], rows[order]
        tied, source = _untie(codes, ts, amount)
        for column in (codes, ts, amount, rows):  # in place: only the tied rows move
            column[tied] = column[source]
        order_ids = None
        if (amount < 0).any() and self.released(f.order_id, PURCHASES):
            order_ids = order_keys(self._column(f.order_id))[rows]
            no_id = order_ids < 0  # a row without an order id is an order of its own
            order_ids[no_id] = order_ids.max() + 1 + np.arange(int(no_id.sum()))
        is_return = amount < 0
        purchase, returns = net_returns(codes, ts, amount, order_ids)
        prep.update(returns)
        prep["free_orders"] = int((purchase & (amount == 0)).sum())
        keep = np.flatnonzero(purchase)
        if len(keep) == 0:
            raise NoOrders(f"the released table holds no purchase: all {len(rows)} orders were returned in full")
        return_codes, return_ts = codes[is_return], ts[is_return]
        codes, ts, amount, rows = codes[keep], ts[keep], amount[keep], rows[keep]
        # Renumber the customers present (a customer whose cells were all withheld is not one here).
        present, codes = np.unique(codes, return_inverse=True)
        at = np.minimum(np.searchsorted(present, return_codes), len(present) - 1)
        kept_returns = present[at] == return_codes  # a customer with no purchase left is not one
        as_of = self._as_of if self._as_of is not None else (int(ts.max()) // DAY + 1) * DAY
        prep["orders"] = len(ts)
        return Orders(
            dids=dictionary.take(pa.array(present)),
            customer=codes.astype(np.int64),
            ts=ts,
            amount=amount,
            rows=rows,
            as_of=as_of,
            preparation=prep,
            return_customer=at[kept_returns].astype(np.int64),
            return_ts=return_ts[kept_returns],
        )

    def codes_for_orders(self, name: str) -> tuple[np.ndarray, pa.Array]:
        """A released column aligned with `orders` (one value per order, in its order), as
        (per-order code into the distinct values, distinct values, sorted: codes are the same whatever
        the row order); -1 for a null."""
        codes, dictionary = sorted_codes(self._column(name))
        return codes[self.orders.rows], dictionary


def _untie(codes: np.ndarray, ts: np.ndarray, amount: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by (customer, time): (tied rows, the row each takes its values from) so that a
    customer's orders of the same second are in a fixed order, the larger amount first (a same-second
    return after its purchase), instead of the order of the released rows."""
    tied = np.flatnonzero((codes[1:] == codes[:-1]) & (ts[1:] == ts[:-1]))
    rows = np.unique(np.concatenate([tied, tied + 1]))
    source: np.ndarray = rows[np.lexsort((-amount[rows], ts[rows], codes[rows]))]
    return rows, source


def figure(value: float, digits: int = 4) -> float:
    """A float as the report shows it: `digits` significant digits (JSON and HTML print the same)."""
    v = float(value)
    if v == 0 or not np.isfinite(v):
        return 0.0 if v == 0 else v
    return float(f"{v:.{digits}g}")
