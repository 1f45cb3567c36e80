"""RFM: recency, frequency and monetary scores (quintiles, 5 = best) and named segments.

Scores are quintiles that respect ties: a customer's score is 1 + ⌊5 · s⌋, where s is the share of
customers strictly worse than them on that measure (recency: fewer days since the last order is
better). Equal values get equal scores, so identical customers land in one segment and the order of
the rows changes nothing; without ties each score holds a fifth of the customers, with ties a score
can hold more (most customers with one order all score F = 1) and another none. Spend is compared in
whole cents, so float summation order cannot split two equal totals. Segments follow the usual grid
over the recency and frequency scores:

    R\\F  1               2               3               4          5
    5    new customers   potential loyal potential loyal champions  champions
    4    promising       potential loyal potential loyal loyal      loyal
    3    about to sleep  about to sleep  need attention  loyal      loyal
    2    hibernating     hibernating     at risk         at risk    can't lose them
    1    lost            hibernating     at risk         at risk    can't lose them
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from crm_bridge.analytics import privacy
from crm_bridge.analytics.data import DAY, Released, Requirement, figure
from crm_bridge.analytics.privacy import Disclosure

_GRID = [  # row: R score 5 → 1; column: F score 1 → 5
    ["new customers", "potential loyalists", "potential loyalists", "champions", "champions"],
    ["promising", "potential loyalists", "potential loyalists", "loyal customers", "loyal customers"],
    ["about to sleep", "about to sleep", "need attention", "loyal customers", "loyal customers"],
    ["hibernating", "hibernating", "at risk", "at risk", "can't lose them"],
    ["lost", "hibernating", "at risk", "at risk", "can't lose them"],
]
SEGMENTS = list(dict.fromkeys(name for row in _GRID for name in row))
_SEGMENT_COLUMNS = [
    "segment", "customers", "share_pct", "revenue", "revenue_share_pct", "mean_recency_days", "mean_orders",
    "mean_spend",
]  # fmt: skip
_SEGMENT_OF = np.array([[SEGMENTS.index(_GRID[5 - r][f - 1]) for f in range(1, 6)] for r in range(1, 6)])


def requirement(released: Released) -> Requirement:
    return Requirement("RFM segmentation", (released.fields.timestamp, released.fields.amount))


def quintile(values: np.ndarray) -> np.ndarray:
    """1..5 (5: the highest values): 1 + ⌊5 · share of values strictly below⌋, so equal values get
    equal scores whatever their order (the "minimum rank" rule; one sort and a binary search)."""
    n = len(values)
    below = np.searchsorted(np.sort(values), values, side="left")
    return (below * 5 // max(n, 1) + 1).astype(np.int8)


@dataclass
class Scores:
    recency_days: np.ndarray
    frequency: np.ndarray
    monetary: np.ndarray
    r: np.ndarray
    f: np.ndarray
    m: np.ndarray
    segment: np.ndarray  # index into SEGMENTS


def scores(released: Released) -> Scores:
    released.require(requirement(released))
    orders = released.orders
    recency = (orders.as_of - orders.last_ts()) / DAY
    frequency = orders.counts.astype(np.float64)
    monetary = orders.total()
    r = quintile(-recency)  # recent is good
    f, m = quintile(frequency), quintile(np.round(monetary, 2))
    return Scores(recency, frequency, monetary, r, f, m, _SEGMENT_OF[r - 1, f - 1])


def analyse(released: Released, disclosure: Disclosure) -> dict[str, Any]:
    """Segments and the R × F heat map. The heat map's cells make up the segments (the grid above),
    which make up the population, and all three publish totals: cells and segments are suppressed
    together (`privacy.complementary`), so no total minus what is shown under it describes fewer than k."""
    s = scores(released)
    n = len(s.r)
    disclosure.population("RFM segmentation", n)
    revenue = float(s.monetary.sum())
    cell = (s.r.astype(np.int64) - 1) * 5 + (s.f - 1)
    cell_size = np.bincount(cell, minlength=25)
    cell_spend = np.bincount(cell, weights=s.monetary, minlength=25)
    shown_cells, shown_segments = privacy.complementary(cell_size, disclosure.k, _SEGMENT_OF.reshape(-1))
    disclosure.record("RFM population", "customers", np.ones(n, dtype=bool), n)
    size = np.bincount(s.segment, minlength=len(SEGMENTS))
    seg_revenue = np.bincount(s.segment, weights=s.monetary, minlength=len(SEGMENTS))
    seg_recency = np.bincount(s.segment, weights=s.recency_days, minlength=len(SEGMENTS))
    seg_frequency = np.bincount(s.segment, weights=s.frequency, minlength=len(SEGMENTS))
    rows = [
        (
            i,
            {
                "segment": name,
                "customers": int(size[i]),
                "share_pct": figure(100 * size[i] / n, 3),
                "revenue": round(float(seg_revenue[i]), 2),
                "revenue_share_pct": figure(100 * seg_revenue[i] / revenue, 3) if revenue else 0.0,
                "mean_recency_days": figure(seg_recency[i] / size[i]),
                "mean_orders": figure(seg_frequency[i] / size[i]),
                "mean_spend": round(float(seg_revenue[i] / size[i]), 2),
            },
        )
        for i, name in enumerate(SEGMENTS)
        if size[i]
    ]
    segments = disclosure.cells(
        _SEGMENT_COLUMNS, rows, shown_segments, name="RFM segments", population="customers", labels=s.segment
    )
    heat = [
        (
            c,
            {
                "r": c // 5 + 1,
                "f": c % 5 + 1,
                "customers": int(cell_size[c]),
                "mean_spend": round(float(cell_spend[c] / cell_size[c]), 2),
            },
        )
        for c in ((r - 1) * 5 + f - 1 for r in range(5, 0, -1) for f in range(1, 6))
        if cell_size[c]
    ]
    return {
        "customers": n,
        "as_of": released.orders.as_of,
        "revenue": round(revenue, 2),
        "segments": segments,
        "heatmap": disclosure.cells(
            ["r", "f", "customers", "mean_spend"], heat, shown_cells, name="RFM heat map", population="customers",
            labels=cell,
        ),
    }  # fmt: skip
