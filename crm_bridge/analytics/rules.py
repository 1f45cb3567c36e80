"""Association rules over baskets: mlxtend's `fpgrowth` finds the frequent itemsets and
`association_rules` the rules (support, confidence, lift).

FP-growth builds its tree one basket at a time in Python, so on a large release it mines a seeded
uniform sample of baskets, as Toivonen (1996, "Sampling large databases for association rules")
does: the sample is mined at a threshold lowered by the Hoeffding bound (so an itemset frequent on
all baskets is frequent in the sample with probability >= 1 - `MISS_PROBABILITY`; never lowered
below half of `min_support`, to bound the work on a small sample), then every
candidate and every itemset of the sample's *negative border* (the minimal itemsets the sample found
infrequent) is counted on all baskets. Only itemsets whose support on ALL baskets reaches
`min_support` make rules, so the sample's noise can neither add a rule below the threshold nor, by
ranking, hide the true top rule. If a border itemset turns out frequent on all baskets, the sample
missed something: the border of the enlarged collection is counted again (Toivonen's second pass)
until no border itemset is frequent, which makes the collection exactly the frequent itemsets
(up to `MAX_LEN` items). Counting is over the distinct baskets weighted by how many orders hold each.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from math import log, sqrt
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from mlxtend.frequent_patterns import association_rules, fpgrowth
from scipy import sparse

from crm_bridge.analytics import privacy
from crm_bridge.analytics.data import Released, Requirement, figure, starts_of
from crm_bridge.analytics.privacy import Disclosure

RULE_COLUMNS = ["antecedents", "consequents", "support", "confidence", "lift", "baskets", "customers"]
MAX_LEN = 4  # the longest itemset mined
MISS_PROBABILITY = 0.001  # Toivonen's delta: the chance the lowered threshold misses a given frequent itemset


def requirement(released: Released) -> Requirement:
    return Requirement("association rules", (released.fields.basket, released.fields.timestamp, released.fields.amount))


@dataclass(frozen=True)
class Baskets:
    """Each order's basket as an index into the distinct baskets, each of those a row of products."""

    distinct: np.ndarray  # bool (distinct basket × product); the last row is the empty basket
    of_order: np.ndarray  # per order: its row in `distinct`
    products: list[str]

    def matrix(self, orders: np.ndarray | None = None) -> np.ndarray:
        """The (order × product) matrix, for all orders or the given ones."""
        picked: np.ndarray = self.distinct[self.of_order if orders is None else self.of_order[orders]]
        return picked

    def containing(self, products: list[str]) -> np.ndarray:
        """Per order: whether its basket holds every one of `products`."""
        columns = [self.products.index(p) for p in products]
        per_basket: np.ndarray = np.all(self.distinct[:, columns], axis=1)
        hit: np.ndarray = per_basket[self.of_order]
        return hit


def baskets(released: Released) -> Baskets:
    """The orders' baskets: the products column split once per distinct basket, not once per order."""
    of_order, dictionary = released.codes_for_orders(released.fields.basket)
    lists = pc.split_pattern(pc.fill_null(dictionary.cast(pa.string()), ""), released.fields.basket_separator)
    items = pc.utf8_trim_whitespace(lists.flatten())
    encoded = pc.dictionary_encode(items)
    names = encoded.dictionary.to_pylist()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    row = np.repeat(np.arange(len(lengths)), lengths)
    code = encoded.indices.to_numpy(zero_copy_only=False)
    # Columns in product-name order, filled in place (no reordering copy of a large matrix).
    order = sorted((i for i, n in enumerate(names) if n), key=lambda i: names[i])
    column = np.full(len(names), -1, np.int64)
    column[order] = np.arange(len(order))
    col = column[code] if len(code) else np.zeros(0, np.int64)
    keep = col >= 0
    # + the empty basket (a null cell). Column-major: counting reads a product's column at a time.
    distinct = np.zeros((len(lengths) + 1, len(order)), dtype=bool, order="F")
    distinct[row[keep], col[keep]] = True
    of_order = np.where(of_order < 0, len(lengths), of_order)
    return Baskets(distinct, of_order, [names[i] for i in order])


class Counter:
    """Exact itemset counts on all orders: a product's distinct baskets are listed once, and an
    itemset's count is the orders of the distinct baskets holding all its products."""

    def __init__(self, found: Baskets) -> None:
        self.found = found
        self.distinct = found.distinct
        self.weight = np.bincount(found.of_order, minlength=len(found.distinct))
        self.rows = [np.flatnonzero(found.distinct[:, j]) for j in range(found.distinct.shape[1])]

    def holding(self, itemset: tuple[int, ...]) -> np.ndarray:
        """The distinct baskets that hold every product of `itemset`."""
        rows = min((self.rows[j] for j in itemset), key=len)
        for j in itemset:
            rows = rows[self.distinct[rows, j]]
        return rows

    @cached_property
    def _pairs(self) -> np.ndarray:
        """Every pair's count (singles on the diagonal) in one sparse product Xᵀ·diag(w)·X: most
        candidates are pairs, and this costs one pass over the baskets' items, not one per pair."""
        lengths = [len(r) for r in self.rows]
        x = sparse.csc_matrix(
            (np.ones(sum(lengths), np.float64), np.concatenate(self.rows), np.concatenate([[0], np.cumsum(lengths)])),
            shape=self.distinct.shape,
        )
        counts: np.ndarray = np.rint((x.T @ sparse.diags(self.weight.astype(np.float64)) @ x).toarray()).astype(
            np.int64
        )
        return counts

    def count(self, itemset: tuple[int, ...]) -> int:
        if len(itemset) <= 2:
            return int(self._pairs[itemset[0], itemset[-1]])
        return int(self.weight[self.holding(itemset)].sum())

    @cached_property
    def _by_basket(self) -> tuple[np.ndarray, np.ndarray]:
        """The orders grouped by distinct basket, and where each basket's group starts."""
        return np.argsort(self.found.of_order, kind="stable"), starts_of(self.weight)

    def orders(self, itemset: tuple[int, ...]) -> np.ndarray:
        """The orders whose basket holds every product of `itemset` (work in their number, not all orders)."""
        by_basket, start = self._by_basket
        rows = self.holding(itemset)
        sizes = self.weight[rows]
        offsets = np.repeat(start[rows] - (np.cumsum(sizes) - sizes), sizes)
        picked: np.ndarray = by_basket[offsets + np.arange(int(sizes.sum()))]
        return picked


def negative_border(frequent: set[tuple[int, ...]], products: int, max_len: int) -> set[tuple[int, ...]]:
    """The itemsets (sorted product tuples, at most `max_len` long) not in the downward-closed
    collection `frequent` whose every subset one item shorter is in it (Toivonen's Bd⁻)."""
    border: set[tuple[int, ...]] = {(j,) for j in range(products) if (j,) not in frequent}
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for itemset in frequent:
        if len(itemset) < max_len:
            by_prefix.setdefault(itemset[:-1], []).append(itemset[-1])
    for prefix, lasts in by_prefix.items():  # apriori join: two sets sharing all but their last item
        for a, b in combinations(sorted(lasts), 2):
            candidate = (*prefix, a, b)
            if candidate not in frequent and all(
                candidate[:i] + candidate[i + 1 :] in frequent for i in range(len(candidate))
            ):
                border.add(candidate)
    return border


@dataclass(frozen=True)
class Mined:
    support: dict[tuple[int, ...], int]  # every itemset frequent on all baskets → its count there
    candidates_counted: int  # itemsets counted on all baskets (sample's frequent ones and borders)
    border_misses: int  # border itemsets of the sample found frequent on all baskets (0: the sample missed nothing)
    passes: int  # counting passes over all baskets (1 unless the border showed a miss)


def frequent_itemsets(
    found: Baskets, min_support: float, sample: int, seed: int = 0, counter: Counter | None = None
) -> Mined:
    """The itemsets whose support on ALL orders reaches `min_support`, with their exact counts."""
    n = len(found.of_order)
    need = int(np.ceil(min_support * n - 1e-9))  # the smallest count that reaches min_support
    if n <= sample:  # small enough: FP-growth on every basket is exact
        frame = pd.DataFrame(found.matrix(), columns=range(found.distinct.shape[1]))
        sets = fpgrowth(frame, min_support=min_support, max_len=MAX_LEN)
        support = {tuple(sorted(s)): round(v * n) for s, v in zip(sets["itemsets"], sets["support"], strict=True)}
        return Mined({s: c for s, c in support.items() if c >= need}, 0, 0, 0)
    picked = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    frame = pd.DataFrame(found.matrix(picked), columns=range(found.distinct.shape[1]))
    # Toivonen's lowered threshold; never below half of min_support (on a small sample the bound is
    # loose and mining near zero explodes): a miss that allows is caught by the border and recounted.
    lowered = max(min_support - sqrt(log(1 / MISS_PROBABILITY) / (2 * sample)), min_support / 2)
    sets = fpgrowth(frame, min_support=lowered, max_len=MAX_LEN)
    del frame
    counter = counter or Counter(found)
    candidates = {tuple(sorted(s)) for s in sets["itemsets"]}
    counts = {s: counter.count(s) for s in candidates}
    border = negative_border(candidates, found.distinct.shape[1], MAX_LEN)
    counts.update({s: counter.count(s) for s in border})
    frequent = {s for s, c in counts.items() if c >= need}
    misses = sum(1 for s in border if counts[s] >= need)
    passes, found_new = 1, misses > 0
    while found_new:  # the second pass: count the border of what is now known frequent
        passes += 1
        fresh = negative_border(frequent, found.distinct.shape[1], MAX_LEN) - counts.keys()
        counts.update({s: counter.count(s) for s in fresh})
        new = {s for s in fresh if counts[s] >= need}
        frequent |= new
        found_new = bool(new)
    return Mined({s: counts[s] for s in frequent}, len(counts), misses, passes)


def analyse(
    released: Released,
    disclosure: Disclosure,
    *,
    min_support: float,
    sample: int,
    top: int = 25,
    min_confidence: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    released.require(requirement(released))
    orders = released.orders
    disclosure.population("association rules", orders.customers)
    found_baskets = baskets(released)
    n = len(found_baskets.of_order)
    counter = Counter(found_baskets)
    mined = frequent_itemsets(found_baskets, min_support, sample, seed, counter)
    rows: list[dict[str, Any]] = []
    if any(len(s) > 1 for s in mined.support):
        names = found_baskets.products
        itemsets = pd.DataFrame(
            {
                "support": [c / n for c in mined.support.values()],
                "itemsets": [frozenset(names[j] for j in s) for s in mined.support],
            }
        )
        found = association_rules(itemsets, num_itemsets=n, metric="confidence", min_threshold=min_confidence)
        found = found.sort_values(["lift", "support"], ascending=False, kind="stable").head(top * 3)
        for antecedents, consequents in zip(found["antecedents"], found["consequents"], strict=True):
            rows.append(_exact(counter, mined.support, orders.customer, sorted(antecedents), sorted(consequents)))
    rows.sort(key=lambda r: (-r["lift"], -r["support"], r["antecedents"], r["consequents"]))
    rows, withheld = _publishable(found_baskets, orders.customer, orders.customers, rows, disclosure.k, top)
    table = disclosure.table(RULE_COLUMNS, rows)
    table["rows"] = table["rows"][:top]
    table["suppressed_rows"] += withheld
    return {
        "baskets": n,
        "baskets_mined": min(n, sample),
        "products": len(found_baskets.products),
        "min_support": min_support,
        "frequent_itemsets": len(mined.support),
        "candidates_counted": mined.candidates_counted,
        "border_misses": mined.border_misses,
        "counting_passes": mined.passes,
        "rules": table,
    }


def _publishable(
    found: Baskets, customer: np.ndarray, customers: int, rows: list[dict[str, Any]], k: int, top: int
) -> tuple[list[dict[str, Any]], int]:
    """The rules, best first, leaving out each one whose counts, beside those of the rules already
    kept, would reveal fewer than k customers by difference: of two nested itemsets
    (`privacy.nested_ok`), or by inclusion–exclusion over all of them (`privacy.lattice_ok`); and how
    many."""
    contains: dict[frozenset[str], np.ndarray] = {frozenset(): np.ones(len(found.of_order), dtype=bool)}
    buyers: dict[frozenset[str], int] = {}
    kept: list[dict[str, Any]] = []
    withheld = 0
    if not rows:
        return kept, withheld
    named = sorted({p for row in rows for side in ("antecedents", "consequents") for p in row[side].split(" + ")})
    patterns = privacy.Patterns.of(
        found.distinct, found.of_order, [found.products.index(p) for p in named], named, customer, customers
    )
    for row in rows:
        if sum(r["customers"] >= k for r in kept) >= top:
            break
        if row["customers"] < k:
            kept.append(row)  # suppressed by the k floor anyway
            continue
        sides = (row["antecedents"].split(" + "), row["consequents"].split(" + "))
        new = {frozenset(items) for items in (*sides, sides[0] + sides[1])} - set(contains)
        trial = contains | {items: found.containing(sorted(items)) for items in new}
        if privacy.nested_ok(trial, new, customer, customers, k, buyers) and privacy.lattice_ok(
            [s for s in trial if s], new, patterns, k
        ):
            contains = trial
            kept.append(row)
        else:
            withheld += 1
    return kept, withheld


def _exact(
    counter: Counter,
    support: dict[tuple[int, ...], int],
    customer: np.ndarray,
    antecedents: list[str],
    consequents: list[str],
) -> dict[str, Any]:
    """A rule's figures from the exact counts (every subset of a frequent itemset is one too), and
    the customers whose orders hold it."""
    products = counter.found.products
    lhs = tuple(sorted(products.index(p) for p in antecedents))
    rhs = tuple(sorted(products.index(p) for p in consequents))
    both = tuple(sorted(lhs + rhs))
    n = len(counter.found.of_order)
    n_both, n_lhs, n_rhs = support[both], support[lhs], support[rhs]
    return {
        "antecedents": " + ".join(antecedents),
        "consequents": " + ".join(consequents),
        "support": figure(n_both / n),
        "confidence": figure(n_both / n_lhs) if n_lhs else 0.0,
        "lift": figure(n_both * n / (n_lhs * n_rhs)) if n_lhs and n_rhs else 0.0,
        "baskets": n_both,
        "customers": len(np.unique(customer[counter.orders(both)])),
    }
