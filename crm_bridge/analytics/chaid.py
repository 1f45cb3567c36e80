"""CHAID decision tree (Kass 1980): which released profile attributes split customers by an
outcome, here whether a customer has lapsed (no order in the last `days` days, among customers whose
first order came before that window).

The tree is grown by the `CHAID` package (PyPI) on a seeded sample of at most `sample` customers:
at each node every permitted attribute's categories are merged while the chi-square test cannot tell
two groups apart (p > `alpha`), and the node is split on the attribute whose merged groups differ
most. Kass's Bonferroni adjustment, which the package does not apply, is applied here: a split's
p-value is multiplied by the number of ways its attribute's c categories could have been merged into
its r groups (nominal: the Stirling number S(c, r)), and a split whose adjusted p-value is not below
`alpha` is pruned. Every attribute is treated as nominal; a withheld value is its own category.

Privacy: each node's size and lapse rate are counted on ALL customers (one vectorised mask per node,
not the sample's counts); a split any of whose children holds fewer than k customers is not shown
(its node stays a leaf), so no node, and no parent minus its shown children, describes fewer than k.
Only columns the release carries as demographic or location attributes are used.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import comb, factorial
from typing import Any

import numpy as np
import pandas as pd

from crm_bridge.analytics.data import DAY, DEMOGRAPHIC, LOCATION, Orders, Released, Requirement, figure
from crm_bridge.analytics.errors import AnalyticsError, ConsentMissing
from crm_bridge.analytics.privacy import Disclosure

METHOD = "CHAID segmentation"
NOT_GIVEN = "not given"
COLUMNS = ["node", "parent", "segment", "customers", "share_pct", "lapsed_pct", "split_by", "p_value"]


def requirement(released: Released) -> Requirement:
    return Requirement(METHOD, (released.fields.timestamp, released.fields.amount))  # the orders are read with it


def bonferroni_nominal(categories: int, groups: int) -> int:
    """Kass's multiplier for a nominal predictor: the ways to merge `categories` into `groups`
    (the Stirling number of the second kind)."""
    r, c = groups, categories
    signed: int = sum((1 if i % 2 == 0 else -1) * comb(r, i) * (r - i) ** c for i in range(r))
    return signed // factorial(r)


def lapsed(orders: Orders, days: int) -> tuple[np.ndarray, np.ndarray]:
    """(customers known before the window, whether each lapsed: no order in the window's `days` days)."""
    cutoff = orders.as_of - days * DAY
    known = orders.first_ts() < cutoff
    return known, orders.last_ts() < cutoff


def attributes(released: Released, orders: Orders) -> pd.DataFrame:
    """Per customer, each permitted profile attribute (as on their first order), as text."""
    columns = released.profile_columns()
    if not columns:
        raise ConsentMissing(METHOD, released.info.purpose, [DEMOGRAPHIC, LOCATION], released.info.purpose)
    frame = {}
    for name in columns:
        codes, values = released.codes_for_orders(name)
        first = codes[orders.starts]
        labels = np.array([str(v) for v in values.to_pylist()] + [NOT_GIVEN], dtype=object)
        frame[name] = labels[np.where(first < 0, len(labels) - 1, first)]
    return pd.DataFrame(frame)


@dataclass
class Node:
    node: int
    parent: int | None
    path: list[tuple[str, list[str]]]  # (attribute, the values that lead here) from the root
    split_by: str | None = None
    p_value: float | None = None  # Bonferroni-adjusted


def grow(frame: pd.DataFrame, outcome: np.ndarray, *, alpha: float, max_depth: int, min_child: int) -> list[Node]:
    """The CHAID tree of `outcome` on `frame`'s attributes, with Kass's adjusted split p-values."""
    data = frame.assign(_outcome=outcome.astype(np.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns that its optional graph packages are absent
        from CHAID import Tree

        tree = Tree.from_pandas_df(
            data,
            dict.fromkeys(frame.columns, "nominal"),
            "_outcome",
            alpha_merge=alpha,
            max_depth=max_depth,
            min_parent_node_size=2 * min_child,
            min_child_node_size=min_child,
        )
        store = tree.tree_store
    nodes: dict[int, Node] = {}
    split_column: dict[int, str] = {}  # the package's split, significant after adjustment or not
    for raw in store:
        if raw.parent is None:
            nodes[raw.node_id] = Node(raw.node_id, None, [])
        else:
            parent = nodes[raw.parent]
            values = sorted(str(v) for v in raw.choices)
            nodes[raw.node_id] = Node(raw.node_id, raw.parent, [*parent.path, (split_column[raw.parent], values)])
        if raw.split.valid():
            node, column = nodes[raw.node_id], str(raw.split.column)
            split_column[raw.node_id] = column
            rows = raw.indices
            categories = frame[column].iloc[rows].nunique()
            adjusted = min(1.0, float(raw.split.p) * bonferroni_nominal(categories, len(raw.split.splits)))
            if adjusted < alpha:
                node.split_by, node.p_value = column, adjusted
    # Keep the nodes reachable through the splits that survived the adjustment.
    kept = [n for n in nodes.values() if n.parent is None or nodes[n.parent].split_by is not None]
    reachable = {kept[0].node}
    out = [kept[0]]
    for n in kept[1:]:
        if n.parent in reachable:
            reachable.add(n.node)
            out.append(n)
    return out


def analyse(
    released: Released,
    disclosure: Disclosure,
    days: int,
    *,
    sample: int = 200_000,
    alpha: float = 0.05,
    max_depth: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    released.require(requirement(released))
    orders = released.orders
    profile = attributes(released, orders)
    known, outcome = lapsed(orders, days)
    profile, outcome = profile[known].reset_index(drop=True), outcome[known]
    n = len(outcome)
    disclosure.population(METHOD, n)
    if outcome.all() or not outcome.any():
        raise AnalyticsError(f"{METHOD}: every customer has the same outcome")
    picked = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    fraction = len(picked) / n
    # A child the sample sees with fewer than ~k customers (scaled) would be pruned anyway; 30 is the
    # package's (and the literature's) floor for a chi-square test.
    min_child = max(30, int(np.ceil(disclosure.k * fraction)))
    nodes = grow(
        profile.iloc[picked].reset_index(drop=True),
        outcome[picked],
        alpha=alpha,
        max_depth=max_depth,
        min_child=min_child,
    )
    # Count every node on all customers; a split with a child below k is not shown.
    codes = {c: profile[c].to_numpy() for c in profile.columns}
    levels = {c: sorted(set(codes[c].tolist())) for c in profile.columns}
    mask: dict[int, np.ndarray] = {}
    for node in nodes:
        if node.parent is None:
            mask[node.node] = np.ones(n, dtype=bool)
        else:
            attribute, values = node.path[-1]
            mask[node.node] = mask[node.parent] & np.isin(codes[attribute], values)
    children: dict[int, list[int]] = {}
    for node in nodes:
        if node.parent is not None:
            children.setdefault(node.parent, []).append(node.node)
    by_id = {node.node: node for node in nodes}
    visible: set[int] = set()
    rows = []
    for node in nodes:  # parents come before their children
        if node.parent is not None and (node.parent not in visible or by_id[node.parent].split_by is None):
            continue
        if any(int(mask[c].sum()) < disclosure.k for c in children.get(node.node, [])):
            node.split_by, node.p_value = None, None  # merged back: a child would describe fewer than k
        visible.add(node.node)
        size = int(mask[node.node].sum())
        rows.append(
            {
                "node": node.node,
                "parent": "" if node.parent is None else node.parent,
                "segment": name(node, levels),
                "customers": size,
                "share_pct": figure(100 * size / n, 3),
                "lapsed_pct": figure(100 * outcome[mask[node.node]].mean(), 3),
                "split_by": node.split_by or "",
                "p_value": "" if node.p_value is None else figure(node.p_value, 3),
            }
        )
    return {
        "outcome": f"lapsed: no order in the last {days} days",
        "horizon_days": days,
        "customers": n,
        "customers_fitted": len(picked),
        "attributes": list(profile.columns),
        "alpha": alpha,
        "tree": disclosure.table(COLUMNS, rows),
    }


def name(node: Node, levels: dict[str, list[str]]) -> str:
    """A node named by what defines it: its attribute values from the root down (as what it is not,
    when that is shorter: "region not Wales")."""
    if not node.path:
        return "all customers"
    parts = []
    for attribute, values in node.path:
        others = [v for v in levels[attribute] if v not in values]
        if len(others) < len(values):
            parts.append(f"{attribute} not {' or '.join(others)}")
        else:
            parts.append(f"{attribute} = {' or '.join(values)}")
    return "; ".join(parts)
