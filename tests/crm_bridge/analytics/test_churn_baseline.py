"""Churn risk restricted to active customers, and compared with the BG/NBD baseline: both recomputed
here from the raw release with pandas."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from sklearn.metrics import roc_auc_score

from crm_bridge.analytics import churn, clv
from crm_bridge.analytics.data import DAY, Released
from crm_bridge.analytics.privacy import Disclosure
from tests.crm_bridge.analytics.releases import purchases


def test_churn_can_be_restricted_to_active_customers_and_is_compared_with_bgnbd(generated: pa.Table) -> None:
    released = Released(generated)
    days = 90
    section = churn.analyse(released, Disclosure(10), days=days, active_only=True)
    everyone = churn.analyse(released, Disclosure(10), days=days)

    bought = purchases(generated)  # returns netted, orders refunded in full left out
    seconds = pc.cast(pc.cast(bought.column("order_ts"), pa.timestamp("s", "UTC")), pa.int64())
    frame = pa.table({"did": bought.column("did"), "ts": seconds}).to_pandas()
    cutoff = section["test_cutoff"]
    before = frame[frame["ts"] < cutoff]
    recent = before[before["ts"] >= cutoff - days * DAY]["did"].unique()
    after = frame[(frame["ts"] >= cutoff) & (frame["ts"] < cutoff + days * DAY)]["did"].unique()
    # Active: an order in the 90 days before the cutoff; everyone: any order before it.
    assert section["test_customers"] == len(recent)
    assert everyone["test_customers"] == before["did"].nunique()
    assert section["active_only"] is True
    assert section["test_churn_rate"] == pytest.approx(1 - np.isin(recent, after).mean(), abs=5e-5)

    # The baseline: BG/NBD on purchase days before the cutoff (pandas summary), scored by expected
    # purchases in the next 90 days, fewer meaning riskier.
    day = before.assign(day=before["ts"] // DAY).groupby("did")["day"]
    first, last, count = day.min(), day.max(), day.nunique()
    end_day = cutoff // DAY - 1
    x = (count - 1).to_numpy(np.float64)
    t_x = ((last - first) / 7).to_numpy()
    T = ((end_day - first) / 7).to_numpy()
    bg = clv.BgNbd.fit(x, t_x, T)
    active = count.index.isin(recent)
    churned = ~np.isin(count.index[active], after)
    score = -bg.expected_purchases(days / 7, x[active], t_x[active], T[active])
    assert section["bgnbd_roc_auc"] == pytest.approx(roc_auc_score(churned, score), abs=5e-5)
    alive = -bg.p_alive(x[active], t_x[active], T[active])
    assert section["bgnbd_p_alive_roc_auc"] == pytest.approx(roc_auc_score(churned, alive), abs=5e-5)
    # The generator's customers follow BG/NBD: the untrained baseline is a strong one.
    assert section["bgnbd_roc_auc"] > 0.7
