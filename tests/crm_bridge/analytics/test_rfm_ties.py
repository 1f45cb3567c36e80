"""RFM scores respect ties (issue 33, item 4): identical customers score alike and the order of the
released rows changes nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_bridge.analytics import rfm
from crm_bridge.analytics.data import DAY, Released
from scripts import generate_crm
from tests.crm_bridge.analytics.releases import purchases, released


def _release(rows: list[tuple[str, int, float]], as_of_day: int) -> Released:
    orders = {"did": [r[0] for r in rows], "order_ts": [r[1] * DAY for r in rows], "amount": [r[2] for r in rows]}
    return released(orders, as_of=as_of_day * DAY)


def test_ten_identical_customers_land_in_one_segment() -> None:
    # Ten customers with the same three orders (10.10 + 20.20 + 30.30: a float sum that depends on
    # the order of addition), between fifteen customers who all differ.
    rows = [(f"did:same{i}", day, amount) for i in range(10) for day, amount in ((5, 10.1), (40, 20.2), (70, 30.3))]
    rows += [(f"did:other{j}", day, 3.0 + j) for j in range(15) for day in range(60 - 3 * j, 100 - 2 * j, 9 + j)]
    released = _release(rows, as_of_day=100)
    s = rfm.scores(released)
    dids = released.orders.dids.to_pylist()
    same = [dids.index(f"did:same{i}") for i in range(10)]
    for score in (s.r, s.f, s.m, s.segment):
        assert len(set(score[same].tolist())) == 1
    # The shared scores are those of the stated rule: 1 + ⌊5 · share of customers strictly worse⌋.
    n = len(s.r)
    first = same[0]
    assert s.f[first] == 1 + 5 * int((s.frequency < 3).sum()) // n
    assert s.m[first] == 1 + 5 * int((np.round(s.monetary, 2) < 60.6).sum()) // n
    assert s.r[first] == 1 + 5 * int((s.recency_days > 30).sum()) // n


def test_quintiles_follow_the_minimum_rank_rule() -> None:
    rng = np.random.default_rng(3)
    values = rng.integers(0, 12, 997).astype(np.float64)  # many ties
    expected = 1 + (pd.Series(values).rank(method="min").to_numpy().astype(np.int64) - 1) * 5 // len(values)
    assert (rfm.quintile(values) == expected).all()
    distinct = rng.permutation(1000).astype(np.float64)  # no ties: each score holds a fifth
    assert (np.bincount(rfm.quintile(distinct))[1:] == 200).all()


def test_shuffling_the_rows_changes_no_score() -> None:
    table = pa.concat_tables(generate_crm.released(2_000, seed=11))
    shuffled = table.take(np.random.default_rng(1).permutation(len(table)))
    results = []
    for t in (table, shuffled):
        released = Released(t)
        s = rfm.scores(released)
        frame = pd.DataFrame(
            {"r": s.r, "f": s.f, "m": s.m, "segment": s.segment}, index=released.orders.dids.to_pylist()
        )
        results.append(frame.sort_index())
    assert len(results[0]) == pc.count_distinct(purchases(table).column("did")).as_py() > 1_950
    pd.testing.assert_frame_equal(results[0], results[1])
