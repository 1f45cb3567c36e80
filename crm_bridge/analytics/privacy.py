"""k-anonymity of outputs: no published figure, nor any combination of published figures, describes
fewer than k customers.

Hiding the rows below k is not enough once a total is published beside them: a segment's revenue
minus its shown heat-map cells is the revenue of the cells left out, and if those hold one customer
that is one customer's revenue. So every table whose cells add up to a published total (the whole
population, or a group such as a segment) is decided by `complementary` and built by
`Disclosure.cells`: *complementary suppression*, after the cells below k more cells are hidden until
what a published total leaves unexplained (the total minus its shown cells) is nothing or at least k
customers.

For a two-level hierarchy (cells within groups within the population) this is sufficient: the
unexplained parts of the published groups, and of the population outside them, are disjoint, and the
published figures determine only sums of whole parts; every such sum is over 0 or at least k customers.
Tables that publish one customer's value (a decile's minimum or maximum) are not built at all; running
sums (gains curves) are taken over shown cells only. Association rules, whose itemsets nest, are
kept only while no two nested itemsets differ by fewer than k customers (`nested_ok`) and no
inclusion–exclusion over the published itemsets' counts gives a group of 1 .. k−1 baskets or of
baskets of fewer than k customers (`lattice_ok`), and the analysis time is one that dates no single
order (`as_of`).

`Disclosure(k, audit=True)` also records which customers each published figure sums over, so that a
test can attack every table the report publishes (tests/crm_bridge/analytics/test_privacy.py).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from crm_bridge.analytics.errors import TooFewCustomers

COUNT = "customers"


class Table(TypedDict):
    columns: list[str]
    rows: list[dict[str, Any]]
    suppressed_rows: int


@dataclass(frozen=True)
class Figure:
    """An audit record: a published figure (a row, a group's or a population's total) and the
    units (customers of a population) it sums over."""

    table: str
    population: str
    members: np.ndarray  # bool per unit
    customers: int  # the count the figure publishes


def complementary(sizes: np.ndarray, k: int, group_of: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which cells, and which groups of cells, may be shown so that no published total minus its shown
    cells describes fewer than k customers.

    `sizes`: customers per cell (the cells partition the population, whose total is published);
    `group_of`: each cell's group (groups also publish totals) or None. Returns (shown cells, shown
    groups). Cells below k are hidden; where a shown group's hidden cells hold 0 < h < k customers, its
    smallest shown cells are hidden too until h ≥ k; where the hidden cells outside shown groups hold
    0 < h < k, the shown group with the least hidden mass is withheld (its smallest cell hidden if it
    had none) until h ≥ k. Cells and groups are few (tens), so this is a loop over them, not customers.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    hidden = (sizes > 0) & (sizes < k)
    groups = np.zeros(len(sizes), np.int64) if group_of is None else np.asarray(group_of, dtype=np.int64)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    group_size = np.bincount(groups, weights=sizes, minlength=n_groups)
    shown_group = group_size >= k if group_of is not None else np.zeros(n_groups, dtype=bool)

    def hide_until_k(member: np.ndarray) -> None:
        while 0 < sizes[member & hidden].sum() < k:
            candidates = np.flatnonzero(member & ~hidden & (sizes > 0))
            if not len(candidates):
                return
            hidden[candidates[np.argmin(sizes[candidates])]] = True

    for g in np.flatnonzero(shown_group):
        hide_until_k(groups == g)
    while True:
        outside = ~shown_group[groups]  # cells whose group publishes no total: only the population's counts them
        residual = sizes[outside & hidden].sum()
        if not 0 < residual < k:
            break
        if not shown_group.any():  # no groups (or all withheld): hide more cells of the population
            before = hidden.sum()
            hide_until_k(np.ones(len(sizes), dtype=bool))
            if hidden.sum() == before:
                break
            continue
        mass = np.bincount(groups, weights=sizes * hidden, minlength=n_groups)
        candidates = np.flatnonzero(shown_group)
        g = candidates[np.argmin(np.where(mass[candidates] > 0, mass[candidates], np.inf))]
        if mass[g] == 0:
            g = candidates[np.argmin(group_size[candidates])]
            in_g = np.flatnonzero((groups == g) & (sizes > 0))
            hidden[in_g[np.argmin(sizes[in_g])]] = True
        shown_group[g] = False
    return ~hidden & (sizes > 0), shown_group


PERIODS_DAYS = (1, 7, 28, 91, 365)  # the analysis time's granularity, the finest with k customers


def as_of(customer: np.ndarray, ts: np.ndarray, k: int, day: int = 86_400) -> tuple[int, int] | None:
    """(time, period in days): the end of the last period (a day, else 7, 28, 91 or 365 days counted
    from 1970-01-01) in which at least k customers ordered; None if there is none.

    Taken from the data, the analysis time would date the latest single order; this time ends a period
    in which at least k customers bought, and the orders after it (fewer than k customers in a period)
    are left out as if not yet made. One pass over the orders, sorted by customer then time as `Orders`
    holds them."""
    if not len(ts):
        return None
    for days in PERIODS_DAYS:
        period = ts // (day * days)
        first = np.ones(len(ts), dtype=bool)  # the first order of a (customer, period)
        first[1:] = (customer[1:] != customer[:-1]) | (period[1:] != period[:-1])
        start = int(period.min())
        busy = np.flatnonzero(np.bincount(period[first] - start) >= k)
        if len(busy):
            return (start + int(busy[-1]) + 1) * day * days, days
    return None


def nested_ok(
    contains: dict[frozenset[str], np.ndarray],
    new: set[frozenset[str]],
    customer: np.ndarray,
    customers: int,
    k: int,
    buyers: dict[frozenset[str], int] | None = None,
) -> bool:
    """Whether published counts of nested itemsets reveal no small group by difference.

    A rule publishes the basket counts of its itemset, its antecedent and its consequent (through
    support, confidence and lift) and the customers of its itemset. For two published itemsets I ⊂ J
    (the empty itemset, all baskets, included), count(I) − count(J) is the number of baskets holding
    I but not J, and customers(I) − customers(J) a number of customers: the customers of those
    baskets, and that difference, must be none or at least k. `contains` maps each itemset to its
    per-basket mask; `customer` is each basket's customer; only pairs with an itemset in `new` are
    checked (the others were); `buyers` caches each itemset's customers across calls. Pairwise
    differences only: combinations of more than two itemsets are not checked."""

    buyers = {} if buyers is None else buyers

    def customers_of(mask: np.ndarray) -> int:
        return int(np.count_nonzero(np.bincount(customer[mask], minlength=customers)))

    for i in contains:
        for j in contains:
            if i < j and (i in new or j in new):
                for itemset in (i, j):
                    if itemset not in buyers:
                        buyers[itemset] = customers_of(contains[itemset])
                gap = buyers[i] - buyers[j]
                if 0 < gap < k:
                    return False
                if gap >= k:
                    continue  # each of those customers has a basket with I and without J
                rest = contains[i] & ~contains[j]
                baskets = int(np.count_nonzero(rest))
                if 0 < baskets < k or (baskets and customers_of(rest) < k):
                    return False
    return True


LATTICE_STEPS = 50_000  # groups looked at per rule before `lattice_ok` gives up (and the rule is withheld)


@dataclass(frozen=True)
class Patterns:
    """The baskets as seen by the itemsets that may be published: each order's pattern (which of the
    candidate products its basket holds), the patterns' products and how many orders hold each."""

    products: list[str]
    holds: np.ndarray  # bool (pattern × product)
    of_order: np.ndarray  # per order: its pattern
    weight: np.ndarray  # per pattern: orders
    customer: np.ndarray  # per order: its customer
    customers: int
    most_orders: int  # the most orders one customer has

    @classmethod
    def of(
        cls,
        distinct: np.ndarray,
        of_order: np.ndarray,
        columns: list[int],
        products: list[str],
        customer: np.ndarray,
        customers: int,
    ) -> Patterns:
        """From the distinct baskets (bool, basket × product) and each order's basket, for `columns`
        (the products named `products`), and each order's customer."""
        sub = np.ascontiguousarray(distinct[:, columns])
        keys = np.packbits(sub, axis=1)
        unique, first, pattern = np.unique(
            keys.view(np.dtype((np.void, keys.shape[1]))).ravel(), return_index=True, return_inverse=True
        )
        of_pattern = pattern.ravel()[of_order]
        most = int(np.bincount(customer, minlength=customers).max()) if len(customer) else 0
        weight = np.bincount(of_pattern, minlength=len(unique))
        return cls(products, sub[first], of_pattern, weight, customer, customers, most)

    def containing(self, itemset: frozenset[str]) -> np.ndarray:
        """Per pattern: whether it holds every product of `itemset`."""
        columns = [self.products.index(p) for p in itemset]
        held: np.ndarray = np.all(self.holds[:, columns], axis=1)
        return held


def lattice_ok(
    published: Collection[frozenset[str]],
    new: Collection[frozenset[str]],
    patterns: Patterns,
    k: int,
) -> bool:
    """Whether no inclusion–exclusion over the published itemsets' counts reveals a group of 1 .. k−1
    baskets, or of baskets of fewer than k customers.

    With the counts of I and of J1 … Jm ⊃ I published, and of every union of some of the J's, the
    baskets holding I but none of the J's number Σ_{V ⊆ {J1..Jm}} (−1)^|V| count(I ∪ ⋃V): e.g. three
    itemsets beside {a}: count(a) − count(ab) − count(ac) + count(abc). Pairs (m = 1) are `nested_ok`'s
    case; this checks every such group of the published lattice (the empty itemset, all baskets,
    included) that involves an itemset of `new`, by a depth-first walk that adds the J's one at a time
    (a group only shrinks as J's are added, and an empty one ends its branch). A walk longer than
    `LATTICE_STEPS` gives up: the rule is withheld rather than left unchecked."""
    lattice: set[frozenset[str]] = set(published) | {frozenset()}
    fresh = set(new)
    held = {itemset: patterns.containing(itemset) for itemset in lattice}
    steps = 0

    def safe(group: np.ndarray) -> bool:
        baskets = int(patterns.weight[group].sum())
        if baskets == 0:
            return True
        if baskets < k:
            return False
        if baskets >= k * patterns.most_orders:  # at most `most_orders` of them are one customer's
            return True
        orders = group[patterns.of_order]
        buyers = np.count_nonzero(np.bincount(patterns.customer[orders], minlength=patterns.customers))
        return bool(buyers >= k)

    def walk(
        base: frozenset[str],
        above: list[frozenset[str]],
        start: int,
        chosen: list[frozenset[str]],
        unions: set[frozenset[str]],
        group: np.ndarray,
    ) -> bool:
        nonlocal steps
        for i in range(start, len(above)):
            extra = above[i]
            if any(j <= extra for j in chosen):
                continue  # holding `extra` implies holding a J already taken: the same group
            grown = unions | {extra} | {u | extra for u in unions}
            if not grown <= lattice:
                continue  # some intersection's count is not published: not derivable this way
            steps += 1
            if steps > LATTICE_STEPS:
                return False
            smaller = group & ~held[extra]
            if (base in fresh or grown & fresh) and not safe(smaller):
                return False
            if smaller.any() and not walk(base, above, i + 1, [*chosen, extra], grown, smaller):
                return False
        return True

    for base in sorted(lattice, key=lambda s: (len(s), sorted(s))):
        above = sorted((j for j in lattice if base < j), key=lambda s: (len(s), sorted(s)))
        if not walk(base, above, 0, [], set(), held[base] & (patterns.weight > 0)):
            return False
    return True


class Disclosure:
    def __init__(self, k: int, *, audit: bool = False) -> None:
        if k < 2:
            raise ValueError("k must be at least 2")
        self.k = k
        self.audit: list[Figure] | None = [] if audit else None

    def table(self, columns: list[str], rows: Iterable[dict[str, Any]]) -> Table:
        """The rows with at least k customers (each row must say how many it describes). Only for rows
        that no published total adds up (e.g. association rules); cells of a total go through `cells`."""
        self._check(columns, None)
        kept, dropped = [], 0
        for row in rows:
            self._check(columns, row)
            if int(row[COUNT]) >= self.k:
                kept.append(row)
            else:
                dropped += 1
        return Table(columns=columns, rows=kept, suppressed_rows=dropped)

    def cells(
        self,
        columns: list[str],
        rows: Iterable[tuple[int, dict[str, Any]]],
        shown: np.ndarray,
        *,
        name: str = "",
        population: str = "",
        labels: np.ndarray | None = None,
    ) -> Table:
        """The rows of the shown cells, as `complementary` decided: `rows` are (cell, row) in the order
        to print, for the non-empty cells. With `labels` (each unit's cell) the figures are recorded
        for an audit."""
        self._check(columns, None)
        kept, dropped = [], 0
        for i, row in rows:
            self._check(columns, row)
            if shown[i]:
                if int(row[COUNT]) < self.k:
                    raise AssertionError(f"{name}: a shown cell describes fewer than k customers")
                kept.append(row)
                self.record(name, population, labels == i if labels is not None else None, int(row[COUNT]))
            else:
                dropped += 1
        return Table(columns=columns, rows=kept, suppressed_rows=dropped)

    def record(self, table: str, population: str, members: np.ndarray | None, customers: int) -> None:
        """Note, for an audit, that a figure summing over `members` (bool per unit) is published."""
        if self.audit is not None and members is not None:
            self.audit.append(Figure(table, population, np.asarray(members, dtype=bool), customers))

    @staticmethod
    def _check(columns: list[str], row: dict[str, Any] | None) -> None:
        if COUNT not in columns:
            raise ValueError(f"an aggregate table must count its {COUNT!r}")
        if row is not None and set(row) != set(columns):
            raise ValueError(f"row keys {sorted(row)} differ from the columns {columns}")

    def population(self, method: str, customers: int) -> None:
        if customers < self.k:
            raise TooFewCustomers(f"{method}: {customers} customers, fewer than k = {self.k}")
