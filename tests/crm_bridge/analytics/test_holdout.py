"""The calibration/holdout check (Fader, Hardie and Lee 2005) on CDNOW: 39 weeks of calibration, 39 of
holdout, the split the paper uses; every actual figure recounted here from the raw file."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from crm_bridge.analytics import clv, holdout
from crm_bridge.analytics.data import Released
from crm_bridge.analytics.privacy import Disclosure

from .test_clv import _epoch, cdnow_release


@pytest.fixture(scope="module")
def cdnow_78_weeks() -> tuple[Released, list[list[str]]]:
    return cdnow_release(as_of=_epoch("19980701"))


def test_the_holdout_check_on_cdnow_is_the_papers(cdnow_78_weeks: tuple[Released, list[list[str]]]) -> None:
    released, rows = cdnow_78_weeks
    check = holdout.validate(released.orders, Disclosure(10), 39, pareto_sample=10_000)
    assert check["holdout_weeks"] == 39
    assert check["customers"] == 2357
    # The calibration fit is the paper's (the calibration period ends 1997-09-30).
    assert check["models"]["bgnbd"]["parameters"] == {"r": 0.2426, "alpha": 4.414, "a": 0.7929, "b": 2.426}
    assert check["models"]["pareto_nbd"]["parameters"]["r"] == pytest.approx(0.553, abs=5e-4)

    # Recount from the raw file: purchase days per customer before and from 1997-10-01.
    days: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        days[r[1]].add(r[2])
    calibration = {c: sum(d < "19971001" for d in ds) - 1 for c, ds in days.items()}
    actual = {c: sum(d >= "19971001" for d in ds) for c, ds in days.items()}
    assert check["actual_total"] == sum(actual.values())
    table = {row["calibration_purchases"]: row for row in check["by_frequency"]["rows"]}
    assert check["by_frequency"]["suppressed_rows"] == 0
    for label, row in table.items():
        low = int(label.rstrip("+").split("-")[0])
        high = 10**9 if label.endswith("+") else int(label.rstrip("+").split("-")[-1])
        members = [c for c, x in calibration.items() if low <= x <= high]
        assert row["customers"] == len(members)
        assert row["actual_mean"] == pytest.approx(np.mean([actual[c] for c in members]), rel=5e-4)
    assert sum(row["customers"] for row in table.values()) == 2357

    # Cumulative repeat purchases at the last week: every repeat purchase day in the 78 weeks.
    last = check["tracking"]["rows"][-1]
    assert last["actual"] == sum(len(ds) - 1 for ds in days.values())
    # Each week's row counts the customers with a repeat purchase in it (week 1 starts 1997-01-01).
    start = _epoch("19970101") // 86_400
    for row in check["tracking"]["rows"][-5:]:
        in_week = [
            c
            for c, ds in days.items()
            if any((_epoch(d) // 86_400 - start) // 7 == row["week"] - 1 for d in sorted(ds)[1:])
        ]
        assert row["customers"] == len(in_week)
    # The paper's BG/NBD tracks the holdout closely (Figure 3: within a few per cent at week 78).
    assert last["bgnbd"] == pytest.approx(last["actual"], rel=0.05)

    # The model chosen is the one with the smaller error of each customer's holdout purchases.
    s = clv.summarise(released.orders, _epoch("19971001"))
    x = np.array([actual[c.split(":")[-1]] for c in released.orders.dids.to_pylist()], dtype=np.float64)
    bg = clv.BgNbd.fit(s.x, s.t_x, s.T)
    rmse = float(np.sqrt(np.mean((bg.expected_purchases(39.0, s.x, s.t_x, s.T) - x) ** 2)))
    assert check["models"]["bgnbd"]["rmse"] == pytest.approx(rmse, rel=5e-4)
    assert check["chosen"] == min(check["models"], key=lambda m: check["models"][m]["rmse"])


def test_frequency_groups_are_pooled_from_the_top_until_each_holds_k() -> None:
    x = np.array([0.0] * 30 + [1.0] * 12 + [2.0] * 3 + [3.0] * 5 + [9.0] * 2)
    group, labels = holdout._pooled_groups(x, 10)
    assert labels == ["0", "1", "2+"]
    assert np.bincount(group).tolist() == [30, 12, 10]
    # One fewer at the top: 2+ holds 9, so it joins 1.
    group, labels = holdout._pooled_groups(x[:-1], 10)
    assert labels == ["0", "1+"]
    assert np.bincount(group).tolist() == [30, 21]
    # The lowest group below k joins the one above it.
    assert holdout._pooled_groups(np.array([0.0] * 3 + [1.0] * 10 + [2.0] * 10), 10)[1] == ["0-1", "2+"]
    assert holdout._pooled_groups(np.array([5.0] * 4), 10)[1] == [
        "0+"
    ]  # one group, below k: the population check refuses
