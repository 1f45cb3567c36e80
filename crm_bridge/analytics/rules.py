"""Association rules over baskets: mlxtend's `fpgrowth` finds the frequent itemsets and
`association_rules` the rules (support, confidence, lift).

FP-growth builds its tree one basket at a time in Python, so on a large release it mines a seeded
uniform sample of baskets (Toivonen 1996); each rule it reports is then recounted on every basket,
so the support, confidence, lift and customer counts printed are exact, and only the choice of
candidate rules rests on the sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from mlxtend.frequent_patterns import association_rules, fpgrowth

from crm_bridge.analytics.data import Released, Requirement, figure
from crm_bridge.analytics.privacy import Disclosure

RULE_COLUMNS = ["antecedents", "consequents", "support", "confidence", "lift", "baskets", "customers"]


def requirement(released: Released) -> Requirement:
    return Requirement("association rules", (released.fields.basket, released.fields.timestamp, released.fields.amount))


def baskets(released: Released) -> tuple[np.ndarray, list[str]]:
    """A boolean matrix (order × product) and the product names."""
    column = released.column_for_orders(released.fields.basket)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lists = pc.split_pattern(pc.fill_null(column.cast(pa.string()), ""), released.fields.basket_separator)
    items = pc.utf8_trim_whitespace(lists.flatten())
    encoded = pc.dictionary_encode(items)
    names = encoded.dictionary.to_pylist()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    row = np.repeat(np.arange(len(lengths)), lengths)
    code = encoded.indices.to_numpy(zero_copy_only=False)
    keep = np.array([bool(n) for n in names])[code] if len(code) else np.zeros(0, dtype=bool)
    matrix = np.zeros((len(lengths), len(names)), dtype=bool)
    matrix[row[keep], code[keep]] = True
    used = [i for i, n in enumerate(names) if n]
    order = sorted(used, key=lambda i: names[i])
    return matrix[:, order], [names[i] for i in order]


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
    matrix, names = baskets(released)
    n = len(matrix)
    mined = matrix
    if n > sample:
        mined = matrix[np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))]
    frame = pd.DataFrame(mined, columns=names)
    itemsets = fpgrowth(frame, min_support=min_support, use_colnames=True, max_len=4)
    rows: list[dict[str, Any]] = []
    if len(itemsets) and itemsets["itemsets"].map(len).max() > 1:
        found = association_rules(itemsets, metric="confidence", min_threshold=min_confidence)
        found = found.sort_values(["lift", "support"], ascending=False).head(top * 3)
        column = {name: i for i, name in enumerate(names)}
        customer = orders.customer
        for antecedents, consequents in zip(found["antecedents"], found["consequents"], strict=True):
            rows.append(_exact(matrix, customer, orders.customers, column, sorted(antecedents), sorted(consequents)))
    rows.sort(key=lambda r: (-r["lift"], -r["support"], r["antecedents"], r["consequents"]))
    table = disclosure.table(RULE_COLUMNS, rows)
    table["rows"] = table["rows"][:top]
    return {
        "baskets": n,
        "baskets_mined": len(mined),
        "products": len(names),
        "min_support": min_support,
        "frequent_itemsets": len(itemsets),
        "rules": table,
    }


def _exact(
    matrix: np.ndarray,
    customer: np.ndarray,
    customers: int,
    column: dict[str, int],
    antecedents: list[str],
    consequents: list[str],
) -> dict[str, Any]:
    both = matrix[:, [column[i] for i in antecedents + consequents]].all(axis=1)
    lhs = matrix[:, [column[i] for i in antecedents]].all(axis=1)
    rhs = matrix[:, [column[i] for i in consequents]].all(axis=1)
    n = len(matrix)
    n_both, n_lhs, n_rhs = int(both.sum()), int(lhs.sum()), int(rhs.sum())
    return {
        "antecedents": " + ".join(antecedents),
        "consequents": " + ".join(consequents),
        "support": figure(n_both / n),
        "confidence": figure(n_both / n_lhs) if n_lhs else 0.0,
        "lift": figure(n_both * n / (n_lhs * n_rhs)) if n_lhs and n_rhs else 0.0,
        "baskets": n_both,
        "customers": int(np.count_nonzero(np.bincount(customer[both], minlength=customers))),
    }
