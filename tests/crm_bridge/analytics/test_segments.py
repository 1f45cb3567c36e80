"""Segmentation beside RFM: CHAID trees (Kass 1980) and clusters, checked on small hand-computed
cases; each node and cluster k-floored and named by what defines it."""

from __future__ import annotations

import pyarrow as pa
import pytest
from scipy.stats import chi2, chi2_contingency

from crm_bridge.analytics import chaid, clusters
from crm_bridge.analytics.data import DAY, DEMOGRAPHIC, LOCATION, Released
from crm_bridge.analytics.errors import ConsentMissing
from crm_bridge.analytics.privacy import Disclosure
from crm_bridge.release import ReleaseInfo
from tests.crm_bridge.analytics.releases import PURCHASES, released


def _lapse_release(*, with_gender_consent: bool = False) -> Released:
    """400 customers, 100 per age band a..d; 60 % of bands a and b lapsed (one order on day 10),
    20 % of c and d (the others order again on day 150); regions lapse alike; gender alone would
    predict the lapse perfectly, but is released only if `with_gender_consent`."""
    rows: list[tuple[str, int, str, str, str]] = []
    for band, lapsing in (("a", 60), ("b", 60), ("c", 20), ("d", 20)):
        for i in range(100):
            did, lapsed = f"did:{band}{i}", i < lapsing
            region, gender = ("north", "south")[i % 2], "x" if lapsed else "y"
            rows.append((did, 10, band, region, gender))
            if not lapsed:
                rows.append((did, 150, band, region, gender))
    columns = {"order_ts": PURCHASES, "amount": PURCHASES, "age_band": DEMOGRAPHIC, "region": LOCATION}
    if with_gender_consent:
        columns["gender"] = DEMOGRAPHIC
    info = ReleaseInfo(
        partner="0x" + "00" * 20, purpose="analytics.reporting", request_id="0x" + "00" * 32, columns=columns
    )
    table = pa.table(
        {
            "did": [r[0] for r in rows],
            "order_ts": pa.array([r[1] * DAY for r in rows]).cast(pa.timestamp("s", tz="UTC")),
            "amount": [10.0] * len(rows),
            "age_band": [r[2] for r in rows],
            "region": [r[3] for r in rows],
            "gender": [r[4] for r in rows],
        }
    ).replace_schema_metadata(info.metadata())
    return Released(table, as_of=200 * DAY)


def test_kass_bonferroni_multiplier_is_the_number_of_ways_to_merge() -> None:
    # S(c, r): {abcd} into two groups: 7 ways; five into three: 25; any number into one or itself: 1.
    assert chaid.bonferroni_nominal(4, 2) == 7
    assert chaid.bonferroni_nominal(5, 3) == 25
    assert chaid.bonferroni_nominal(6, 1) == chaid.bonferroni_nominal(3, 3) == 1


def test_chaid_splits_by_the_attribute_that_matters_with_kass_adjusted_p() -> None:
    section = chaid.analyse(_lapse_release(), Disclosure(10), 90)
    rows = section["tree"]["rows"]
    assert section["attributes"] == ["age_band", "region"]  # gender is present but not released
    root, *children = rows
    assert root["segment"] == "all customers"
    assert root["customers"] == 400
    assert root["lapsed_pct"] == 40.0
    assert root["split_by"] == "age_band"
    # Bands merged by lapse rate, {a, b} against {c, d}; the chi-square of that 2×2 table by hand:
    # expected 80 lapsed / 120 not per group: 2·(40²/80 + 40²/120) = 66.67, one degree of freedom.
    statistic, p, dof, _ = chi2_contingency([[120, 80], [40, 160]], correction=False)
    assert statistic == pytest.approx(200 / 3)
    assert dof == 1
    assert root["p_value"] == pytest.approx(7 * chi2.sf(200 / 3, 1), rel=1e-3, abs=0)  # S(4, 2) = 7 ways to merge
    assert p == pytest.approx(chi2.sf(200 / 3, 1), abs=0)
    by_name = {c["segment"]: c for c in children}
    assert set(by_name) == {"age_band = a or b", "age_band = c or d"}
    assert by_name["age_band = a or b"]["customers"] == 200
    assert by_name["age_band = a or b"]["lapsed_pct"] == 60.0
    assert by_name["age_band = c or d"]["lapsed_pct"] == 20.0
    assert all(c["split_by"] == "" for c in children)  # regions lapse alike: no further split


def test_a_chaid_node_is_named_by_what_it_is_or_shorter_what_it_is_not() -> None:
    levels = {"region": ["London", "Wales", "Yorkshire"], "age_band": ["a", "b", "c", "d"]}
    node = chaid.Node(3, 1, [("age_band", ["a", "b"]), ("region", ["London", "Yorkshire"])])
    assert chaid.name(node, levels) == "age_band = a or b; region not Wales"
    assert chaid.name(chaid.Node(0, None, []), levels) == "all customers"


def test_chaid_uses_gender_only_when_the_release_carries_it() -> None:
    rows = chaid.analyse(_lapse_release(with_gender_consent=True), Disclosure(10), 90)["tree"]["rows"]
    assert rows[0]["split_by"] == "gender"
    assert {r["segment"]: r["lapsed_pct"] for r in rows[1:]} == {"gender = x": 100.0, "gender = y": 0.0}


def test_chaid_shows_no_node_below_k_and_no_split_with_a_child_below_k() -> None:
    rows = chaid.analyse(_lapse_release(), Disclosure(201), 90)["tree"]["rows"]
    assert [(r["segment"], r["customers"], r["split_by"]) for r in rows] == [("all customers", 400, "")]


def test_chaid_needs_a_released_profile_attribute() -> None:
    released = _lapse_release()
    info = released.info.model_copy(update={"columns": {"order_ts": PURCHASES, "amount": PURCHASES}})
    table = released._table
    assert table is not None
    bare = Released(table.replace_schema_metadata(info.metadata()), as_of=200 * DAY)
    with pytest.raises(ConsentMissing) as missing:
        chaid.analyse(bare, Disclosure(10), 90)
    assert missing.value.attributes == [DEMOGRAPHIC, LOCATION]


def _three_groups(sizes: tuple[int, int, int] = (40, 60, 80)) -> Released:
    """Three kinds of customer, alike within a kind: one 10.00 order 600 days ago (age band 65+);
    twenty 100.00 orders, the last a day ago (18-24); five 40.00 orders, the last 100 days ago
    (35-44). Gender (present, not released) differs by kind too."""
    rows: list[tuple[str, int, float, str, str]] = []
    kinds = [(1, 600, 10.0, "65+", "x"), (20, 1, 100.0, "18-24", "y"), (5, 100, 40.0, "35-44", "z")]
    for kind, (size, (orders, last_ago, amount, band, gender)) in enumerate(zip(sizes, kinds, strict=True)):
        for i in range(size):
            for o in range(orders):
                rows.append((f"did:{kind}-{i}", 700 - last_ago - 10 * o, amount, band, gender))
    table = {
        "did": [r[0] for r in rows],
        "order_ts": [r[1] * DAY for r in rows],
        "amount": [r[2] for r in rows],
        "age_band": [r[3] for r in rows],
        "gender": [r[4] for r in rows],
    }
    return released(table, {"age_band": DEMOGRAPHIC}, as_of=700 * DAY)


def test_clusters_find_the_kinds_of_customer_and_describe_them_by_their_centres() -> None:
    section = clusters.analyse(_three_groups(), Disclosure(10))
    assert section["features"] == ["recency_days", "orders", "mean_order_value", "age_band"]  # not gender
    assert section["criterion"] == "silhouette"
    assert section["k"] == 3
    assert section["silhouette"] == 1.0  # customers alike within a kind: a perfect clustering
    assert max(t["silhouette"] for t in section["tried"]) == 1.0
    rows = {r["customers"]: r for r in section["clusters"]["rows"]}
    assert sorted(rows) == [40, 60, 80]
    assert (rows[40]["recency_days"], rows[40]["orders"], rows[40]["mean_order_value"]) == (600, 1, 10)
    assert (rows[60]["recency_days"], rows[60]["orders"], rows[60]["mean_order_value"]) == (1, 20, 100)
    assert (rows[80]["recency_days"], rows[80]["orders"], rows[80]["mean_order_value"]) == (100, 5, 40)
    assert rows[40]["age_band"] == "65+ (100 %)"
    # Named by what sets each apart.
    assert "lapsing" in rows[40]["cluster"]
    assert "age band 65+" in rows[40]["cluster"]
    assert "frequent" in rows[60]["cluster"]
    assert "big baskets" in rows[60]["cluster"]
    assert len({r["cluster"] for r in rows.values()}) == 3


def test_clusters_are_never_smaller_than_k() -> None:
    # k = 50: three clusters would show the 40 customers of the first kind: they are merged into
    # their nearest (the 80 five-order customers: 1 order of 10.00 is nearer 5 of 40.00 than 20 of 100.00).
    section = clusters.analyse(_three_groups(), Disclosure(50))
    assert section["k"] == 2
    assert [t["merged_below_k"] for t in section["tried"] if t["k"] == 3] == [1]
    assert sorted(r["customers"] for r in section["clusters"]["rows"]) == [60, 120]
    assert all(r["customers"] >= 50 for r in section["clusters"]["rows"])
    assert sum(r["customers"] for r in section["clusters"]["rows"]) == 180
    assert section["clusters"]["suppressed_rows"] == 0
