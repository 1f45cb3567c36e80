"""Segmentation beside RFM: CHAID trees (Kass 1980) and clusters, checked on small hand-computed
cases; each node and cluster k-floored and named by what defines it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import chi2, chi2_contingency

from crm_bridge.analytics import chaid, clusters, clv
from crm_bridge.analytics.data import DAY, DEMOGRAPHIC, LOCATION, Released
from crm_bridge.analytics.errors import ConsentMissing
from crm_bridge.analytics.privacy import Disclosure
from crm_bridge.analytics.report import build, render
from crm_bridge.analytics.settings import AnalyticsSettings
from crm_bridge.release import ReleaseInfo
from scripts import generate_crm
from tests.crm_bridge.analytics.releases import PURCHASES, released
from tests.crm_bridge.analytics.test_privacy import smallest_recoverable_group


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


def _banded_release(bands: dict[str, tuple[int, int]], *, region: bool = False) -> Released:
    """Per age band (customers, how many lapsed: one order on day 10; the others order again on day
    150), released as a demographic attribute; with `region`, a region that lapses alike."""
    rows: list[tuple[str, int, str, str]] = []
    for band, (size, lapsing) in bands.items():
        for i in range(size):
            did = f"did:{band}-{i}"
            rows.append((did, 10, band, ("north", "south")[i % 2]))
            if i >= lapsing:
                rows.append((did, 150, band, ("north", "south")[i % 2]))
    table = {
        "did": [r[0] for r in rows],
        "order_ts": [r[1] * DAY for r in rows],
        "amount": [10.0] * len(rows),
        "age_band": [r[2] for r in rows],
        "region": [r[3] for r in rows],
    }
    categories = {"age_band": DEMOGRAPHIC, **({"region": LOCATION} if region else {})}
    return released(table, categories, as_of=200 * DAY)


def _bands_of(segment: str, order: list[str]) -> list[int]:
    """The positions, in `order`, of the age bands a node's name covers ("a to c", "a or b", "a")."""
    (part,) = [p for p in segment.split("; ") if p.startswith("age_band = ")]
    text = part.removeprefix("age_band = ").replace(f" or {chaid.NOT_GIVEN}", "")
    if " to " in text:
        first, last = text.split(" to ")
        return list(range(order.index(first), order.index(last) + 1))
    return sorted(order.index(b) for b in text.split(" or "))


def test_kass_multiplier_for_an_ordinal_predictor_counts_runs_of_neighbours() -> None:
    # Four ordered bands into two runs: 3 cuts; five into three: C(4, 2) = 6; four ordered and a
    # floating "not given" into three groups: C(3, 1) + 3·C(3, 2) = 12.
    assert chaid.bonferroni_ordinal(4, 2) == 3
    assert chaid.bonferroni_ordinal(5, 3) == 6
    assert chaid.bonferroni_ordinal(5, 3, floating=True) == 12
    assert chaid.bonferroni_ordinal(6, 6) == chaid.bonferroni_ordinal(6, 1) == 1
    assert chaid.ordinal_order(["65+", "25-34", "18-24", chaid.NOT_GIVEN, "<18"]) == ["<18", "18-24", "25-34", "65+"]
    assert chaid.ordinal_order(["London", "Wales"]) is None


def test_chaid_never_merges_age_bands_that_are_not_neighbours() -> None:
    # Lapse alternates by band: 60 % of 18-24 and 35-44 lapse, 20 % of 25-34 and 45-54. As nominal
    # categories CHAID would merge {18-24, 35-44} against {25-34, 45-54}; as ordinal bands it may
    # merge only neighbours, which all differ: four children, one band each.
    bands = {"18-24": (100, 60), "25-34": (100, 20), "35-44": (100, 60), "45-54": (100, 20)}
    section = chaid.analyse(_banded_release(bands), Disclosure(10), 90)
    assert section["ordinal"] == ["age_band"]
    root, *children = section["tree"]["rows"]
    assert root["split_by"] == "age_band"
    assert {c["segment"]: c["lapsed_pct"] for c in children} == {
        "age_band = 18-24": 60.0,
        "age_band = 25-34": 20.0,
        "age_band = 35-44": 60.0,
        "age_band = 45-54": 20.0,
    }
    # Kass: four bands kept apart as four runs: one way (C(3, 3)).
    _, p, _, _ = chi2_contingency([[60, 40], [20, 80], [60, 40], [20, 80]], correction=False)
    assert root["p_value"] == pytest.approx(p, rel=5e-3, abs=0)  # shown to three digits


def test_no_chaid_tree_merges_non_adjacent_bands_on_generated_data(generated: pa.Table) -> None:
    released_ = Released(generated)
    values: dict[str, Any] = {}
    clv.analyse(released_, Disclosure(10), 52, values=values)
    section = chaid.analyse(released_, Disclosure(10), 180, clv_value=values["value"])
    order = chaid.ordinal_order(generate_crm.AGE_BANDS)
    assert order == generate_crm.AGE_BANDS
    assert section["ordinal"] == ["age_band"]
    checked = 0
    for tree in (section["tree"], section["high_clv_tree"]):
        assert tree["rows"][0]["split_by"] == "age_band"  # age matters, for lapse and for value
        for row in tree["rows"]:
            if "age_band = " in row["segment"]:
                positions = _bands_of(row["segment"], order)
                assert positions == list(range(positions[0], positions[-1] + 1)), row["segment"]
                checked += 1
    assert checked >= 4


def test_chaid_grows_a_tree_of_high_clv_beside_the_lapse_tree(generated: pa.Table) -> None:
    report = build(Released(generated), AnalyticsSettings(k=25, rules_sample=20_000))
    section = report["chaid"]
    assert section["high_clv_error"] is None
    assert "top fifth of predicted customer lifetime value" in section["high_clv_outcome"]
    rows = section["high_clv_tree"]["rows"]
    assert rows[0]["segment"] == "all customers"
    assert rows[0]["customers"] == section["customers"]
    assert 19.0 <= rows[0]["high_clv_pct"] <= 21.0  # the top fifth (ties kept together)
    assert len(rows) > 1
    assert all(r["customers"] >= 25 for r in rows)
    assert len({r["segment"] for r in rows}) == len(rows)  # each node named by what defines it
    # High value depends on age and region (spend, purchase rate and lapse): the tree shows it.
    by_segment = {r["segment"]: r["high_clv_pct"] for r in rows}
    assert max(by_segment.values()) > 1.3 * rows[0]["high_clv_pct"]
    html = render(report)["report.html"]
    assert "CHAID tree of high CLV" in html


def test_the_two_chaid_trees_cannot_be_differenced_into_a_small_group() -> None:
    # Lapse: 18-24 and 25-34 lapse alike (60 %), 35-44 and 45-54 too (20 %); the lapse tree merges
    # 25-34 (5 customers) with 18-24. High CLV: half of 18-24 (the top fifth of all), so the CLV tree
    # would merge 25-34 with 35-44: then "18-24 or 25-34" (lapse tree) minus "18-24" (CLV tree) is the
    # 5 customers of 25-34.
    bands = {"18-24": (100, 60), "25-34": (5, 3), "35-44": (100, 20), "45-54": (100, 20)}
    released_ = _banded_release(bands)
    dids = released_.orders.dids.to_pylist()
    value = np.array(
        [100.0 if d.startswith("did:18-24") and int(d[10:]) % 2 else 10.0 + i % 7 for i, d in enumerate(dids)]
    )
    k = 10
    disclosure = Disclosure(k, audit=True)
    section = chaid.analyse(released_, disclosure, 90, clv_value=value)
    lapse = {r["segment"]: r["customers"] for r in section["tree"]["rows"]}
    assert lapse["age_band = 18-24 or 25-34"] == 105  # the premise: the lapse tree shows this node
    high = {r["segment"]: r["customers"] for r in section["high_clv_tree"]["rows"]}
    for a, count_a in lapse.items():
        for b, count_b in high.items():
            assert not 0 < abs(count_a - count_b) < k, (a, b)
    figures = [f for f in disclosure.audit or [] if f.population == chaid.POPULATION]
    assert smallest_recoverable_group([f.members for f in figures]) >= k
