"""Association rules over baskets: mlxtend's `fpgrowth` finds the frequent itemsets and
`association_rules` the rules (support, confidence, lift).

FP-growth builds its tree one basket at a time in Python, so on a large release it mines a seeded
uniform sample of baskets (Toivonen 1996); each rule it reports is then recounted on every basket,
so the support, confidence, lift and customer counts printed are exact, and only the choice of
candidate rules rests on the sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from mlxtend.frequent_patterns import association_rules, fpgrowth

from crm_bridge.analytics import privacy
from crm_bridge.analytics.data import Released, Requirement, figure
from crm_bridge.analytics.privacy import Disclosure

RULE_COLUMNS = ["antecedents", "consequents", "support", "confidence", "lift", "baskets", "customers"]


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
    keep = np.array([bool(n) for n in names], dtype=bool)[code] if len(code) else np.zeros(0, dtype=bool)
    distinct = np.zeros((len(lengths) + 1, len(names)), dtype=bool)  # + the empty basket (a null cell)
    distinct[row[keep], code[keep]] = True
    order = sorted((i for i, n in enumerate(names) if n), key=lambda i: names[i])
    of_order = np.where(of_order < 0, len(lengths), of_order)
    return Baskets(distinct[:, order], of_order, [names[i] for i in order])


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
    picked = None if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    frame = pd.DataFrame(found_baskets.matrix(picked), columns=found_baskets.products)
    mined = len(frame)
    itemsets = fpgrowth(frame, min_support=min_support, use_colnames=True, max_len=4)
    del frame
    rows: list[dict[str, Any]] = []
    if len(itemsets) and itemsets["itemsets"].map(len).max() > 1:
        found = association_rules(itemsets, metric="confidence", min_threshold=min_confidence)
        found = found.sort_values(["lift", "support"], ascending=False).head(top * 3)
        for antecedents, consequents in zip(found["antecedents"], found["consequents"], strict=True):
            rows.append(
                _exact(found_baskets, orders.customer, orders.customers, sorted(antecedents), sorted(consequents))
            )
    rows.sort(key=lambda r: (-r["lift"], -r["support"], r["antecedents"], r["consequents"]))
    rows, withheld = _publishable(found_baskets, orders.customer, orders.customers, rows, disclosure.k, top)
    table = disclosure.table(RULE_COLUMNS, rows)
    table["rows"] = table["rows"][:top]
    table["suppressed_rows"] += withheld
    return {
        "baskets": n,
        "baskets_mined": mined,
        "products": len(found_baskets.products),
        "min_support": min_support,
        "frequent_itemsets": len(itemsets),
        "rules": table,
    }


def _publishable(
    found: Baskets, customer: np.ndarray, customers: int, rows: list[dict[str, Any]], k: int, top: int
) -> tuple[list[dict[str, Any]], int]:
    """The rules, best first, leaving out each one whose counts, beside those of the rules already
    kept, would reveal fewer than k customers by difference (`privacy.nested_ok`); and how many."""
    contains: dict[frozenset[str], np.ndarray] = {frozenset(): np.ones(len(found.of_order), dtype=bool)}
    buyers: dict[frozenset[str], int] = {}
    kept: list[dict[str, Any]] = []
    withheld = 0
    for row in rows:
        if sum(r["customers"] >= k for r in kept) >= top:
            break
        if row["customers"] < k:
            kept.append(row)  # suppressed by the k floor anyway
            continue
        sides = (row["antecedents"].split(" + "), row["consequents"].split(" + "))
        new = {frozenset(items) for items in (*sides, sides[0] + sides[1])} - set(contains)
        trial = contains | {items: found.containing(sorted(items)) for items in new}
        if privacy.nested_ok(trial, new, customer, customers, k, buyers):
            contains = trial
            kept.append(row)
        else:
            withheld += 1
    return kept, withheld


def _exact(
    found: Baskets, customer: np.ndarray, customers: int, antecedents: list[str], consequents: list[str]
) -> dict[str, Any]:
    both = found.containing(antecedents + consequents)
    n = len(both)
    n_both, n_lhs, n_rhs = (
        int(both.sum()),
        int(found.containing(antecedents).sum()),
        int(found.containing(consequents).sum()),
    )
    return {
        "antecedents": " + ".join(antecedents),
        "consequents": " + ".join(consequents),
        "support": figure(n_both / n),
        "confidence": figure(n_both / n_lhs) if n_lhs else 0.0,
        "lift": figure(n_both * n / (n_lhs * n_rhs)) if n_lhs and n_rhs else 0.0,
        "baskets": n_both,
        "customers": int(np.count_nonzero(np.bincount(customer[both], minlength=customers))),
    }
