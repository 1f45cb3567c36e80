"""Cluster analysis beside RFM: k-means on recency, frequency, spend and the released profile
attributes, k chosen by the silhouette, each cluster described by its centre.

Features per customer: days since the last order, log(1 + orders), log(1 + mean order value) (the
logs tame the long right tails a few heavy buyers give), each standardised; and each released
demographic or location attribute one-hot encoded with every column scaled by 1/√2, so that two
customers in different categories are as far apart as one standard deviation of a behaviour. Only
attributes the release carries as demographic or location are used.

k runs over `ks`; for each, scikit-learn's `MiniBatchKMeans` is fitted on a seeded sample of at most
`fit_sample` customers and the mean silhouette computed on `score_sample` of them (the silhouette is
quadratic in customers). Every customer is assigned to their nearest centre (one vectorised pass)
and a cluster of fewer than k customers (privacy's k) on ALL customers is merged into its members'
nearest other centres, so no cluster shown describes fewer than k; the k with the highest
silhouette after merging is chosen. Each cluster is described by its members' mean recency, orders and
order value, and the most common value of each attribute, and named by the features that set it
apart (its centre's largest standardised deviations from the mean).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from crm_bridge.analytics.data import DAY, Orders, Released, Requirement, figure
from crm_bridge.analytics.errors import AnalyticsError
from crm_bridge.analytics.privacy import Disclosure

METHOD = "cluster analysis"
BEHAVIOUR = ["recency_days", "orders", "mean_order_value"]
# How each behaviour's deviation reads, below and above the mean.
_WORDS = {
    "recency_days": ("recent", "lapsing"),
    "orders": ("occasional", "frequent"),
    "mean_order_value": ("small baskets", "big baskets"),
}
NOT_GIVEN = "not given"


def requirement(released: Released) -> Requirement:
    return Requirement(METHOD, (released.fields.timestamp, released.fields.amount))


def behaviour(orders: Orders) -> np.ndarray:
    """(customers × 3): recency in days, orders, mean order value."""
    recency = (orders.as_of - orders.last_ts()) / DAY
    counts = orders.counts.astype(np.float64)
    return np.column_stack([recency, counts, orders.total() / counts])


def profile(released: Released, orders: Orders) -> tuple[list[str], list[np.ndarray], list[list[str]]]:
    """(attribute names, per attribute each customer's category code, per attribute the category labels)."""
    names, codes, labels = [], [], []
    for name in released.profile_columns():
        per_order, values = released.codes_for_orders(name)
        first = per_order[orders.starts]
        categories = [str(v) for v in values.to_pylist()] + [NOT_GIVEN]
        names.append(name)
        codes.append(np.where(first < 0, len(categories) - 1, first))
        labels.append(categories)
    return names, codes, labels


def design(values: np.ndarray, codes: list[np.ndarray], labels: list[list[str]]) -> np.ndarray:
    """The standardised feature matrix (float32: a million customers in tens of MB)."""
    numeric = np.column_stack([values[:, 0], np.log1p(values[:, 1]), np.log1p(np.maximum(values[:, 2], 0.0))])
    sd = numeric.std(axis=0)
    numeric = (numeric - numeric.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    parts = [numeric.astype(np.float32)]
    for code, names in zip(codes, labels, strict=True):
        onehot = np.zeros((len(code), len(names)), np.float32)
        onehot[np.arange(len(code)), code] = 1 / np.sqrt(2)
        parts.append(onehot)
    matrix: np.ndarray = np.hstack(parts)
    return matrix


def analyse(
    released: Released,
    disclosure: Disclosure,
    *,
    ks: range = range(2, 8),
    fit_sample: int = 20_000,
    score_sample: int = 2_000,
    seed: int = 0,
) -> dict[str, Any]:
    released.require(requirement(released))
    orders = released.orders
    n = orders.customers
    disclosure.population(METHOD, n)
    values = behaviour(orders)
    names, codes, labels = profile(released, orders)
    x = design(values, codes, labels)
    rng = np.random.default_rng(seed)
    fit_rows = rng.choice(n, min(n, fit_sample), replace=False)
    score_rows = fit_rows[: min(len(fit_rows), score_sample)]
    tried: list[dict[str, Any]] = []
    best: tuple[float, int, np.ndarray] | None = None
    for k in ks:
        if k >= len(score_rows):
            break
        with threadpool_limits(1):  # on samples this size OpenMP's threads cost more than they save
            model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=2048).fit(x[fit_rows])
            label, merged = merge_small(model.transform(x), disclosure.k)
            found = int(label.max()) + 1
            score = float(silhouette_score(x[score_rows], label[score_rows])) if found > 1 else -1.0
        tried.append({"k": k, "merged_below_k": merged, "silhouette": figure(score)})
        if found > 1 and (best is None or score > best[0]):
            best = (score, found, label)
    if best is None:
        raise AnalyticsError(f"{METHOD}: no number of clusters gives two clusters of at least k customers")
    score, k, label = best
    size = np.bincount(label, minlength=k)
    overall = x.mean(axis=0)
    spread = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    rows = []
    for c in range(k):
        members = label == c
        mean = values[members].mean(axis=0)
        row: dict[str, Any] = {
            "cluster": "",
            "customers": int(size[c]),
            "share_pct": figure(100 * size[c] / n, 3),
            "recency_days": figure(mean[0]),
            "orders": figure(mean[1]),
            "mean_order_value": figure(mean[2]),
        }
        for name, code, categories in zip(names, codes, labels, strict=True):
            counts = np.bincount(code[members], minlength=len(categories))
            top = int(counts.argmax())
            row[name] = f"{categories[top]} ({figure(100 * counts[top] / size[c], 3):g} %)"
        deviation = (x[members].mean(axis=0) - overall) / spread
        row["cluster"] = _name(deviation, names, labels)
        rows.append(row)
    _unique_names(rows)
    rows.sort(key=lambda r: -r["customers"])
    columns = ["cluster", "customers", "share_pct", *BEHAVIOUR, *names]
    disclosure.population("cluster analysis", n)
    return {
        "customers": n,  # every one of them is in a shown cluster (small ones were merged)
        "features": [*BEHAVIOUR, *names],
        "criterion": "silhouette",
        "k": k,
        "silhouette": figure(score),
        "tried": tried,
        "customers_fitted": len(fit_rows),
        "clusters": disclosure.table(columns, rows),
    }


def merge_small(distances: np.ndarray, floor: int) -> tuple[np.ndarray, int]:
    """Each customer's cluster (nearest centre), after merging every cluster of fewer than `floor`
    customers, smallest first, into its members' nearest remaining centres; (labels 0.., merged)."""
    k = distances.shape[1]
    label = distances.argmin(axis=1)
    alive = np.ones(k, dtype=bool)
    while alive.sum() > 1:
        size = np.bincount(label, minlength=k)
        small = alive & (size < floor)
        if not small.any():
            break
        c = int(np.argmin(np.where(small, size, np.iinfo(np.int64).max)))
        alive[c] = False
        members = label == c
        label[members] = np.flatnonzero(alive)[distances[members][:, alive].argmin(axis=1)]
    renumber = np.cumsum(alive) - 1
    out: np.ndarray = renumber[label]
    return out, int(k - alive.sum())


def _name(deviation: np.ndarray, names: list[str], labels: list[list[str]]) -> str:
    """The (at most three) features that most set a cluster apart, as words."""
    words: list[tuple[float, str]] = []
    for j, feature in enumerate(BEHAVIOUR):
        if abs(deviation[j]) >= 0.3:
            words.append((abs(deviation[j]), _WORDS[feature][int(deviation[j] > 0)]))
    at = len(BEHAVIOUR)
    for name, categories in zip(names, labels, strict=True):
        for j, category in enumerate(categories):
            if deviation[at + j] >= 0.5:
                words.append((float(deviation[at + j]), f"{name.replace('_', ' ')} {category}"))
        at += len(categories)
    words.sort(key=lambda w: -w[0])
    return ", ".join(w for _, w in words[:3]) or "typical customers"


def _unique_names(rows: list[dict[str, Any]]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        seen[row["cluster"]] = seen.get(row["cluster"], 0) + 1
        if seen[row["cluster"]] > 1:
            row["cluster"] = f"{row['cluster']} ({seen[row['cluster']]})"
