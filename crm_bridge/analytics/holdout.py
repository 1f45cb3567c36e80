"""Calibration/holdout validation of the purchase models, as Fader, Hardie and Lee (2005) check BG/NBD:
fit on the orders before a calibration end, predict the holdout weeks after it, and compare with what
the customers did. Two checks: expected against actual holdout purchases by calibration frequency (the
conditional expectation, customer by customer), and cumulative repeat purchases week by week (the
unconditional expectation, for the cohort as it was acquired). The model with the smaller
root-mean-square error of each customer's holdout purchases is the one the report uses.

Only customers whose first purchase is before the calibration end (the calibration cohort) are
checked. Frequencies are pooled from the top (7+, then downwards) until every group holds at least k
customers, so no group is withheld and no withheld group can be recovered by subtraction; a week of
the tracking table is withheld when fewer than k customers made a repeat purchase in it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crm_bridge.analytics import clv  # clv's report section calls this module: attributes at call time
from crm_bridge.analytics.data import DAY, Orders, figure
from crm_bridge.analytics.errors import AnalyticsError
from crm_bridge.analytics.pareto_nbd import ParetoNbd
from crm_bridge.analytics.privacy import Disclosure

TOP_FREQUENCY = 7  # calibration frequencies 7 and above are one group, as in FHL 2005 (Figure 4)


def _new_customer(model: clv.BgNbd | ParetoNbd, t: np.ndarray) -> np.ndarray:
    """E[X(t)] of customers t weeks after their first purchase (0 before it)."""
    return np.where(t > 0, model.expected_new_customer(np.maximum(t, 0.0)), 0.0)


def _pooled_groups(x: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]:
    """Per customer, a frequency group; groups 0..6 and 7+, pooled downwards until each has ≥ k."""
    capped = np.minimum(x, TOP_FREQUENCY).astype(np.int64)
    sizes = np.bincount(capped, minlength=TOP_FREQUENCY + 1)
    bounds: list[tuple[int, int]] = []  # (low, high) frequency of each group, from the top down
    low = high = TOP_FREQUENCY
    size = 0
    for f in range(TOP_FREQUENCY, -1, -1):
        size += int(sizes[f])
        low = f
        if size >= k:
            bounds.append((low, high))
            high, size = f - 1, 0
    if size and bounds:  # the lowest frequencies, still below k: into the group above them
        bounds[-1] = (low, bounds[-1][1])
    elif size:
        bounds.append((low, high))
    bounds.reverse()
    group_of = np.zeros(TOP_FREQUENCY + 1, np.int64)
    labels = []
    for g, (lo, hi) in enumerate(bounds):
        group_of[lo : hi + 1] = g
        labels.append(f"{lo}+" if hi == TOP_FREQUENCY else str(lo) if lo == hi else f"{lo}-{hi}")
    return group_of[capped], labels


def holdout_weeks_for(orders: Orders, weeks: int) -> int:
    """The holdout: `weeks`, or half the observed span when the data are shorter than twice that."""
    span_weeks = int((orders.as_of - int(orders.ts.min())) // DAY / clv.WEEK_DAYS) if len(orders.ts) else 0
    return max(1, min(weeks, span_weeks // 2))


def validate(
    orders: Orders,
    disclosure: Disclosure,
    weeks: int,
    *,
    pareto_sample: int,
    start: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Fit both models on the calibration period and check them on the holdout (see the module); BG/NBD
    from `start` if given (the full period's fit: near the calibration optimum)."""
    weeks = holdout_weeks_for(orders, weeks)
    end = orders.as_of - int(weeks * clv.WEEK_DAYS) * DAY
    full = clv.summarise(orders, end)
    cohort = full.T > 0  # first purchase before the last calibration day
    n = int(cohort.sum())
    disclosure.population("calibration/holdout check", n)
    cal = clv.Summary(full.x[cohort], full.t_x[cohort], full.T[cohort], full.monetary[cohort])
    # Actual holdout purchases: purchase days in [end, as_of), per cohort customer.
    day = orders.ts // DAY
    new_day = np.ones(len(day), dtype=bool)
    new_day[1:] = (orders.customer[1:] != orders.customer[:-1]) | (day[1:] != day[:-1])
    in_holdout = new_day & (orders.ts >= end)
    actual = np.bincount(orders.customer[in_holdout], minlength=orders.customers)[cohort].astype(np.float64)

    models: dict[str, clv.BgNbd | ParetoNbd] = {"bgnbd": clv.BgNbd.fit(cal.x, cal.t_x, cal.T, start=start)}
    failures: dict[str, str] = {}
    try:
        models["pareto_nbd"] = ParetoNbd.fit(cal.x, cal.t_x, cal.T, sample=pareto_sample)
    except AnalyticsError as exc:
        failures["pareto_nbd"] = str(exc)
    expected = {name: m.expected_purchases(float(weeks), cal.x, cal.t_x, cal.T) for name, m in models.items()}
    rmse = {name: float(np.sqrt(np.mean((e - actual) ** 2))) for name, e in expected.items()}
    # A model whose predictions are not finite (a fit run off to the edge of its parameter space) is
    # not chosen; BG/NBD is the default when neither is usable.
    usable = {name: e for name, e in rmse.items() if np.isfinite(e)}
    chosen = min(usable, key=lambda name: usable[name]) if usable else "bgnbd"

    group, labels = _pooled_groups(cal.x, disclosure.k)
    size = np.bincount(group, minlength=len(labels))
    by_frequency = [
        {
            "calibration_purchases": label,
            "customers": int(size[g]),
            "actual_mean": figure(np.bincount(group, weights=actual, minlength=len(labels))[g] / size[g]),
            **{
                f"{name}_mean": figure(np.bincount(group, weights=e, minlength=len(labels))[g] / size[g])
                for name, e in expected.items()
            },
        }
        for g, label in enumerate(labels)
    ]

    # Cumulative repeat purchases, week by week from the first first purchase to as_of.
    first_day = orders.ts[orders.starts] // DAY
    start_day = int(first_day[cohort].min())
    last_week = int(np.ceil((orders.as_of // DAY - start_day) / clv.WEEK_DAYS))
    repeat = new_day.copy()
    repeat[orders.starts] = False  # the first purchase day is not a repeat purchase
    in_cohort = cohort[orders.customer] & repeat
    week_of = (day[in_cohort] - start_day) // int(clv.WEEK_DAYS)
    weekly = np.bincount(week_of, minlength=last_week)[:last_week]
    # Distinct repeat buyers per week (how many customers each week's figure describes): orders are
    # sorted by (customer, time), so a buyer's week starts where the customer or the week changes.
    buyer = orders.customer[in_cohort]
    starts = np.ones(len(buyer), dtype=bool)
    starts[1:] = (buyer[1:] != buyer[:-1]) | (week_of[1:] != week_of[:-1])
    buyers = np.bincount(week_of[starts], minlength=last_week)[:last_week]
    first_days, first_counts = np.unique(first_day[cohort], return_counts=True)
    tracking = []
    cumulative_actual = np.cumsum(weekly)
    for w in range(last_week):
        week_end = start_day + (w + 1) * clv.WEEK_DAYS
        age = (week_end - first_days - 1) / clv.WEEK_DAYS  # weeks since each first purchase day
        tracking.append(
            {
                "week": w + 1,
                "customers": int(buyers[w]),
                "actual": int(cumulative_actual[w]),
                **{name: figure(float(first_counts @ _new_customer(m, age)), 5) for name, m in models.items()},
            }
        )
    calibration_end_week = int(np.ceil((end // DAY - start_day) / clv.WEEK_DAYS))
    model_columns = list(models)
    return {
        "calibration_end": end,
        "holdout_weeks": weeks,
        "customers": n,
        "actual_total": int(actual.sum()),
        "models": {
            name: {
                "expected_total": figure(float(expected[name].sum()), 5),
                "rmse": figure(rmse[name]),
                "log_likelihood": round(models[name].log_likelihood, 1),
                "parameters": {p: figure(v) for p, v in zip(models[name].names, models[name].params, strict=True)},
            }
            for name in models
        },
        "failed": failures,
        "chosen": chosen,
        "calibration_end_week": calibration_end_week,
        "by_frequency": disclosure.table(
            ["calibration_purchases", "customers", "actual_mean", *(f"{m}_mean" for m in model_columns)], by_frequency
        ),
        "tracking": disclosure.table(["week", "customers", "actual", *model_columns], tracking),
    }
