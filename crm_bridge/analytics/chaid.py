"""CHAID decision trees (Kass 1980): which released profile attributes split customers by an
outcome. Two trees, over the same customers (those whose first order came before the churn window):
- lapse: no order in the last `days` days;
- high CLV: in the top fifth of predicted customer lifetime value (the CLV section's values; ties kept
  together by the minimum-rank rule, as RFM's quintiles), when that method ran.

Each tree is grown by the `CHAID` package (PyPI) on a seeded sample of at most `sample` customers:
at each node every permitted attribute's categories are merged while the chi-square test cannot tell
two groups apart (p > `alpha`), and the node is split on the attribute whose merged groups differ
most. An attribute whose values are numeric bands ("18-24", "25-34", ..., "65+") is ORDINAL: only
neighbouring bands may be merged (a node is never "18-24 or 45-54"), and a withheld value ("not
given") floats, joining whichever group it is nearest (Kass's floating category); any other attribute
is nominal, a withheld value its own category. Kass's Bonferroni adjustment, which the package does
not apply, is applied here: a split's p-value is multiplied by the number of ways its attribute's c
categories could have been merged into its r groups (nominal: the Stirling number S(c, r); ordinal:
C(c − 1, r − 1); ordinal with a floating category: C(c − 2, r − 2) + r·C(c − 2, r − 1)), and a split
whose adjusted p-value is not below `alpha` is pruned.

Privacy: each node's size and outcome rate are counted on ALL customers (one vectorised mask per
node, not the sample's counts); a split any of whose children holds fewer than k customers is not
shown (its node stays a leaf), so no node, and no parent minus its shown children, describes fewer
than k. The second tree's nodes could be differenced against the first's (a node of one minus a node
of the other it contains): a split of the second tree is shown only if every cell of the two trees'
leaves crossed holds none or at least k customers, and any combination of the two trees' node counts
is a union of such cells. Only columns the release carries as demographic or location attributes are
used.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from math import comb, factorial
from typing import Any

import numpy as np
import pandas as pd

from crm_bridge.analytics import rfm
from crm_bridge.analytics.data import DAY, DEMOGRAPHIC, LOCATION, Orders, Released, Requirement, figure
from crm_bridge.analytics.errors import AnalyticsError, ConsentMissing
from crm_bridge.analytics.privacy import Disclosure

METHOD = "CHAID segmentation"
NOT_GIVEN = "not given"
POPULATION = "CHAID customers"
HIGH_CLV_QUINTILE = 5  # the top fifth
# A numeric band: "18-24", "18 to 24", "65+", "3"; or an open lower band: "<18", "under 18".
_BAND = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:(?:-|\u2013|to)\s*\d+(?:\.\d+)?|\+)?\s*$")
_BELOW = re.compile(r"^\s*(?:<|under\s+)(\d+(?:\.\d+)?)\s*$", re.IGNORECASE)


def columns(rate: str) -> list[str]:
    return ["node", "parent", "segment", "customers", "share_pct", rate, "split_by", "p_value"]


COLUMNS = columns("lapsed_pct")
HIGH_CLV_COLUMNS = columns("high_clv_pct")


def requirement(released: Released) -> Requirement:
    return Requirement(METHOD, (released.fields.timestamp, released.fields.amount))  # the orders are read with it


def bonferroni_nominal(categories: int, groups: int) -> int:
    """Kass's multiplier for a nominal predictor: the ways to merge `categories` into `groups`
    (the Stirling number of the second kind)."""
    r, c = groups, categories
    signed: int = sum((1 if i % 2 == 0 else -1) * comb(r, i) * (r - i) ** c for i in range(r))
    return signed // factorial(r)


def _comb(n: int, r: int) -> int:
    return comb(n, r) if 0 <= r <= n else 0


def bonferroni_ordinal(categories: int, groups: int, *, floating: bool = False) -> int:
    """Kass's multiplier for an ordinal predictor: the ways to cut `categories` ordered ones into
    `groups` runs of neighbours, C(c − 1, r − 1); with a floating category (a withheld value, counted
    in `categories`) that may stand alone or join any run: C(c − 2, r − 2) + r·C(c − 2, r − 1)."""
    c, r = categories, groups
    if not floating:
        return _comb(c - 1, r - 1)
    return _comb(c - 2, r - 2) + r * _comb(c - 2, r - 1)


def ordinal_order(values: Collection[str]) -> list[str] | None:
    """`values` (withheld ones aside) in their order if every one is a numeric band ("18-24", "65+",
    "<18", "3"): an ordinal attribute. None if any is not (a region), or there are fewer than two."""
    start: dict[str, float] = {}
    for value in values:
        if value == NOT_GIVEN:
            continue
        band, below = _BAND.match(value), _BELOW.match(value)
        if band:
            start[value] = float(band.group(1))
        elif below:
            start[value] = float(below.group(1)) - 0.5  # "<18" comes before "18-24"
        else:
            return None
    if len(start) < 2 or len(set(start.values())) < len(start):
        return None
    return sorted(start, key=start.__getitem__)


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


def grow(
    frame: pd.DataFrame,
    outcome: np.ndarray,
    *,
    alpha: float,
    max_depth: int,
    min_child: int,
    ordinal: dict[str, list[str]] | None = None,
) -> list[Node]:
    """The CHAID tree of `outcome` on `frame`'s attributes, with Kass's adjusted split p-values.
    `ordinal`: the attributes whose values are ordered (each with its values in order)."""
    ordinal = ordinal or {}
    data = frame.assign(_outcome=outcome.astype(np.int64))
    for column, order in ordinal.items():  # the package takes an ordinal attribute as numbers, NaN floating
        rank = {value: float(i) for i, value in enumerate(order)}
        data[column] = np.array([rank.get(v, np.nan) for v in frame[column].tolist()], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns that its optional graph packages are absent
        from CHAID import Tree

        tree = Tree.from_pandas_df(
            data,
            {c: "ordinal" if c in ordinal else "nominal" for c in frame.columns},
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
            column = split_column[raw.parent]
            if column in ordinal:
                order = ordinal[column]
                ranks = sorted(int(v) for v in raw.choices if isinstance(v, int | float) and v == v)
                values = [order[i] for i in ranks] + [NOT_GIVEN] * (len(ranks) < len(raw.choices))
            else:
                values = sorted(str(v) for v in raw.choices)
            nodes[raw.node_id] = Node(raw.node_id, raw.parent, [*parent.path, (column, values)])
        if raw.split.valid():
            node, column = nodes[raw.node_id], str(raw.split.column)
            split_column[raw.node_id] = column
            present = frame[column].iloc[raw.indices]
            categories, groups = present.nunique(), len(raw.split.splits)
            multiplier = (
                bonferroni_ordinal(categories, groups, floating=bool((present == NOT_GIVEN).any()))
                if column in ordinal
                else bonferroni_nominal(categories, groups)
            )
            adjusted = min(1.0, float(raw.split.p) * multiplier)
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
    clv_value: np.ndarray | None = None,
    sample: int = 200_000,
    alpha: float = 0.05,
    max_depth: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """The lapse tree and, given each customer's predicted lifetime value (`clv_value`, by customer
    code), the high-CLV tree, over the customers known before the churn window."""
    released.require(requirement(released))
    orders = released.orders
    profile = attributes(released, orders)
    known, outcome = lapsed(orders, days)
    if not known.any():  # not too few customers: too short a history
        raise AnalyticsError(
            f"{METHOD}: the release holds fewer than {days} days of orders before the analysis date;"
            f" whether a customer lapsed (no order in the last {days} days) is known only for customers"
            " who ordered before that"
        )
    profile, outcome = profile[known].reset_index(drop=True), outcome[known]
    n = len(outcome)
    disclosure.population(METHOD, n)
    if outcome.all() or not outcome.any():
        raise AnalyticsError(f"{METHOD}: every customer has the same outcome")
    picked = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    ordinal = {c: order for c in profile.columns if (order := ordinal_order(set(profile[c].tolist()))) is not None}
    grower = Grower(profile, picked, disclosure, ordinal=ordinal, alpha=alpha, max_depth=max_depth)
    disclosure.record("CHAID population", POPULATION, np.ones(n, dtype=bool), n)
    lapse_tree, lapse_leaves = grower.tree(outcome, COLUMNS, "CHAID lapse tree")
    section: dict[str, Any] = {
        "outcome": f"lapsed: no order in the last {days} days",
        "horizon_days": days,
        "customers": n,
        "customers_fitted": len(picked),
        "attributes": list(profile.columns),
        "ordinal": list(ordinal),
        "alpha": alpha,
        "tree": lapse_tree,
        "high_clv_outcome": "high CLV: in the top fifth of predicted customer lifetime value (the CLV section's)",
        "high_clv_error": None,
    }
    if clv_value is None:
        section["high_clv_error"] = "not grown: it needs the customer lifetime values, and that method did not run"
        return section
    high = rfm.quintile(np.round(clv_value[known], 2)) == HIGH_CLV_QUINTILE
    if high.all() or not high.any():
        section["high_clv_error"] = "not grown: equal predicted lifetime values leave no top fifth to tell apart"
        return section
    section["high_clv_tree"], _ = grower.tree(high, HIGH_CLV_COLUMNS, "CHAID high-CLV tree", beside=lapse_leaves)
    return section


class Grower:
    """Grows trees of several outcomes over the same customers and attributes, and shows their nodes."""

    def __init__(
        self,
        profile: pd.DataFrame,
        picked: np.ndarray,
        disclosure: Disclosure,
        *,
        ordinal: dict[str, list[str]],
        alpha: float,
        max_depth: int,
    ) -> None:
        self.profile, self.picked, self.disclosure = profile, picked, disclosure
        self.ordinal, self.alpha, self.max_depth = ordinal, alpha, max_depth
        self.n = len(profile)
        self.codes = {c: profile[c].to_numpy() for c in profile.columns}
        self.levels = {c: sorted(set(self.codes[c].tolist())) for c in profile.columns}
        # A child the sample sees with fewer than ~k customers (scaled) would be pruned anyway; 30 is
        # the package's (and the literature's) floor for a chi-square test.
        self.min_child = max(30, int(np.ceil(disclosure.k * len(picked) / self.n)))

    def tree(
        self, outcome: np.ndarray, table_columns: list[str], name_: str, *, beside: np.ndarray | None = None
    ) -> tuple[dict[str, Any], np.ndarray]:
        """The tree's shown nodes as a table (parents before children), and each customer's leaf.
        `beside`: each customer's leaf in a tree already shown: a split is shown only if no cell of
        the two trees' leaves crossed holds 1 .. k − 1 customers."""
        n = self.n
        nodes = grow(
            self.profile.iloc[self.picked].reset_index(drop=True),
            outcome[self.picked],
            alpha=self.alpha,
            max_depth=self.max_depth,
            min_child=self.min_child,
            ordinal=self.ordinal,
        )
        mask: dict[int, np.ndarray] = {}
        for node in nodes:
            if node.parent is None:
                mask[node.node] = np.ones(n, dtype=bool)
            else:
                attribute, values = node.path[-1]
                mask[node.node] = mask[node.parent] & np.isin(self.codes[attribute], values)
        children: dict[int, list[int]] = {}
        for node in nodes:
            if node.parent is not None:
                children.setdefault(node.parent, []).append(node.node)
        by_id = {node.node: node for node in nodes}
        leaf = np.full(n, nodes[0].node, np.int64)
        visible: set[int] = set()
        rows = []
        for node in nodes:  # parents come before their children
            if node.parent is not None and (node.parent not in visible or by_id[node.parent].split_by is None):
                continue
            below = children.get(node.node, [])
            if node.split_by is not None and not self._showable(mask, node.node, below, leaf, beside):
                node.split_by, node.p_value = None, None  # merged back: a child or a cell below k
            if node.split_by is not None:
                for child in below:
                    leaf[mask[child]] = child
            visible.add(node.node)
            size = int(mask[node.node].sum())
            self.disclosure.record(name_, POPULATION, mask[node.node], size)
            rows.append(
                {
                    "node": node.node,
                    "parent": "" if node.parent is None else node.parent,
                    "segment": name(node, self.levels, self.ordinal),
                    "customers": size,
                    "share_pct": figure(100 * size / n, 3),
                    table_columns[5]: figure(100 * outcome[mask[node.node]].mean(), 3),
                    "split_by": node.split_by or "",
                    "p_value": "" if node.p_value is None else figure(node.p_value, 3),
                }
            )
        return dict(self.disclosure.table(table_columns, rows)), leaf

    def _showable(
        self,
        mask: dict[int, np.ndarray],
        node: int,
        below: list[int],
        leaf: np.ndarray,
        beside: np.ndarray | None,
    ) -> bool:
        k = self.disclosure.k
        if any(int(mask[c].sum()) < k for c in below):
            return False
        if beside is None:
            return True
        inside = mask[node]
        split = leaf[inside].copy()
        for child in below:
            split[mask[child][inside]] = child
        cells = np.bincount(beside[inside] * (int(split.max()) + 1) + split)
        return bool(np.all((cells == 0) | (cells >= k)))


def name(node: Node, levels: dict[str, list[str]], ordinal: dict[str, list[str]] | None = None) -> str:
    """A node named by what defines it: its attribute values from the root down (as what it is not,
    when that is shorter: "region not Wales"; an ordinal attribute's run of bands from its first to
    its last: "age_band = 25-34 to 45-54")."""
    if not node.path:
        return "all customers"
    parts = []
    for attribute, values in node.path:
        order = (ordinal or {}).get(attribute)
        if order is not None:
            bands = [v for v in order if v in values]
            run = f"{bands[0]} to {bands[-1]}" if len(bands) > 2 else " or ".join(bands)
            parts.append(f"{attribute} = {run}" + (f" or {NOT_GIVEN}" if NOT_GIVEN in values else ""))
            continue
        others = [v for v in levels[attribute] if v not in values]
        if len(others) < len(values):
            parts.append(f"{attribute} not {' or '.join(others)}")
        else:
            parts.append(f"{attribute} = {' or '.join(values)}")
    return "; ".join(parts)
