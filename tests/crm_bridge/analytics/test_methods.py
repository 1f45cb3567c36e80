"""RFM, association rules, churn and the input discipline, on generated releases (no chain: the
bridge that makes them is tested on one)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from mlxtend.frequent_patterns import association_rules, fpgrowth

from crm_bridge.analytics import churn, clv, rfm, rules
from crm_bridge.analytics.data import DAY, Released
from crm_bridge.analytics.errors import ConsentMissing, NotAReleasedTable, TooFewCustomers
from crm_bridge.analytics.privacy import Disclosure
from crm_bridge.release import ReleaseInfo
from tests.crm_bridge.analytics.conftest import restrict
from tests.crm_bridge.analytics.releases import purchases

PURCHASES = "user.behavior.purchase_history"


def test_a_table_without_release_metadata_is_refused(generated: pa.Table) -> None:
    with pytest.raises(NotAReleasedTable, match="bridge export"):
        Released(generated.replace_schema_metadata(None))
    with pytest.raises(NotAReleasedTable, match="'did'"):
        Released(generated.drop_columns(["did"]))


@pytest.mark.parametrize(
    "method", [rfm.scores, lambda r: rules.analyse(r, Disclosure(2), min_support=0.01, sample=10_000),
               lambda r: clv.analyse(r, Disclosure(2), 52), lambda r: churn.analyse(r, Disclosure(2), 90)],
    ids=["rfm", "rules", "clv", "churn"],
)  # fmt: skip
def test_each_method_refuses_without_its_consent_and_names_it(
    generated: pa.Table, method: Callable[[Released], object]
) -> None:
    # Purchase history withheld (only demographics and location released): which attributes are missing.
    without = Released(restrict(generated, drop=("order_ts", "amount", "products", "order_id", "channel")))
    with pytest.raises(ConsentMissing) as missing:
        method(without)
    assert missing.value.attributes == [PURCHASES]
    assert missing.value.purpose == "analytics.reporting"
    assert PURCHASES in str(missing.value)
    # Released for another purpose: the purpose is what is missing.
    elsewhere = Released(restrict(generated, purpose="marketing.communications.email"))
    with pytest.raises(ConsentMissing) as wrong_purpose:
        method(elsewhere)
    assert wrong_purpose.value.purpose == "analytics.reporting"
    assert wrong_purpose.value.attributes == []
    assert "marketing.communications.email" in str(wrong_purpose.value)


def test_a_column_present_but_not_in_the_release_metadata_is_not_used(generated: pa.Table) -> None:
    info = ReleaseInfo.of(generated.schema)
    assert info is not None
    columns = {c: k for c, k in info.columns.items() if c != "amount"}  # the data is there; the consent is not
    table = generated.replace_schema_metadata(info.model_copy(update={"columns": columns}).metadata())
    with pytest.raises(ConsentMissing):
        rfm.scores(Released(table))


def _small_release() -> Released:
    """Three customers with hand-checkable histories."""
    info = ReleaseInfo(
        partner="0x" + "00" * 20,
        purpose="analytics.reporting",
        request_id="0x" + "00" * 32,
        columns={"order_ts": PURCHASES, "amount": PURCHASES},
    )
    day = 86_400
    rows = [("did:a", 10, 5.0), ("did:a", 90, 7.0), ("did:a", 99, 8.0), ("did:b", 1, 100.0), ("did:c", 50, 1.0)]
    table = pa.table(
        {
            "did": [r[0] for r in rows],
            "order_ts": pa.array([r[1] * day for r in rows]).cast(pa.timestamp("s", tz="UTC")),
            "amount": [r[2] for r in rows],
        }
    ).replace_schema_metadata(info.metadata())
    return Released(table, as_of=100 * day)


def test_rfm_scores_are_the_customers_own() -> None:
    released = _small_release()
    s = rfm.scores(released)
    dids = released.orders.dids.to_pylist()
    a, b, c = dids.index("did:a"), dids.index("did:b"), dids.index("did:c")
    assert s.recency_days[a] == 1  # last order on day 99, as of day 100
    assert s.frequency[a] == 3
    assert s.monetary[a] == 20.0
    assert s.recency_days[b] == 99
    assert s.monetary[b] == 100.0
    assert s.r[a] > s.r[c] > s.r[b]  # the most recent scores best
    assert s.m[b] > s.m[a] > s.m[c]


def test_rfm_quintiles_and_segments(generated: pa.Table) -> None:
    released = Released(generated)
    s = rfm.scores(released)
    n = len(s.r)
    for score, worse in ((s.r, s.recency_days > s.recency_days[:, None]), (s.f, s.frequency < s.frequency[:, None])):
        # the stated rule, counted pairwise: 1 + ⌊5 · share of customers strictly worse⌋
        assert (score == 1 + worse.sum(axis=1) * 5 // n).all()
    champions = s.segment == rfm.SEGMENTS.index("champions")
    assert (s.r[champions] == 5).all()
    assert (s.f[champions] >= 4).all()
    lost = s.segment == rfm.SEGMENTS.index("lost")
    assert ((s.r[lost] == 1) & (s.f[lost] == 1)).all()
    section = rfm.analyse(released, Disclosure(10))
    rows = section["segments"]["rows"]
    assert {r["segment"] for r in rows} <= set(rfm.SEGMENTS)
    sizes = np.bincount(s.segment)
    assert {r["segment"]: r["customers"] for r in rows} == {
        rfm.SEGMENTS[i]: int(size) for i, size in enumerate(sizes) if size >= 10
    }
    assert section["segments"]["suppressed_rows"] == int(((sizes > 0) & (sizes < 10)).sum())
    shown = np.isin(s.segment, [rfm.SEGMENTS.index(r["segment"]) for r in rows])
    assert sum(r["revenue"] for r in rows) == pytest.approx(s.monetary[shown].sum(), abs=0.5)
    # Champions buy more and more recently than the lost.
    by = {r["segment"]: r for r in rows}
    assert by["champions"]["mean_spend"] > by["lost"]["mean_spend"]
    assert by["champions"]["mean_recency_days"] < by["lost"]["mean_recency_days"]
    assert sum(c["customers"] for c in section["heatmap"]["rows"]) <= n


def test_rules_are_mlxtends_and_find_the_generators_themes(generated: pa.Table) -> None:
    released = Released(generated)
    section = rules.analyse(released, Disclosure(10), min_support=0.02, sample=10**9, top=200)
    # No sampling: every purchase's basket is mined (refunds are no baskets; see `purchases`).
    assert section["baskets_mined"] == section["baskets"] == len(purchases(generated)) < len(generated)
    # The same rules, support, confidence and lift as mlxtend's own on the same baskets.
    found = rules.baskets(released)
    frame = pd.DataFrame(found.matrix(), columns=found.products)
    theirs = association_rules(fpgrowth(frame, min_support=0.02, use_colnames=True, max_len=4), min_threshold=0.1)
    expected = {
        (" + ".join(sorted(a)), " + ".join(sorted(c))): (s, conf, lift)
        for a, c, s, conf, lift in zip(
            theirs["antecedents"], theirs["consequents"], theirs["support"], theirs["confidence"], theirs["lift"],
            strict=True,
        )
    }  # fmt: skip
    ours = section["rules"]["rows"]
    assert ours
    for row in ours:
        support, confidence, lift = expected[(row["antecedents"], row["consequents"])]
        assert row["support"] == pytest.approx(support, rel=1e-3)
        assert row["confidence"] == pytest.approx(confidence, rel=1e-3)
        assert row["lift"] == pytest.approx(lift, rel=1e-3)
        assert row["customers"] <= row["baskets"]
        assert row["customers"] >= 10
    # Products of one theme go together: the strongest rule stays within a theme.
    top = ours[0]
    items = set(top["antecedents"].split(" + ")) | set(top["consequents"].split(" + "))
    from scripts.generate_crm import THEMES

    assert any(items <= set(theme) for theme in THEMES.values())
    assert top["lift"] > 3


def test_sampled_mining_reports_exact_counts(generated: pa.Table) -> None:
    released = Released(generated)
    full = rules.analyse(released, Disclosure(10), min_support=0.02, sample=10**9)
    sampled = rules.analyse(released, Disclosure(10), min_support=0.02, sample=5_000)
    assert sampled["baskets_mined"] == 5_000
    both = {(r["antecedents"], r["consequents"]): r for r in full["rules"]["rows"]}
    shared = [r for r in sampled["rules"]["rows"] if (r["antecedents"], r["consequents"]) in both]
    assert len(shared) >= len(sampled["rules"]["rows"]) // 2
    for row in shared:  # the sample only chose the candidates; the figures are counted on all baskets
        assert row == both[(row["antecedents"], row["consequents"])]


def test_churn_uses_a_time_split_and_is_calibrated(generated: pa.Table) -> None:
    released = Released(generated)
    section = churn.analyse(released, Disclosure(10), days=90)
    as_of = released.orders.as_of
    assert section["test_cutoff"] == as_of - 90 * DAY
    assert section["train_cutoff"] == as_of - 180 * DAY
    assert section["roc_auc"] > 0.7
    assert section["roc_auc"] >= section["recency_roc_auc"] - 0.02
    rows = section["calibration"]["rows"]
    assert sum(r["customers"] for r in rows) == section["test_customers"]
    # Calibrated: riskier deciles churn more, and the predicted rate tracks the observed one.
    observed = [r["observed_rate"] for r in rows]
    assert observed[0] > observed[-1]
    # The generator is seasonal and growing: a model calibrated on the quarter before the test one
    # (summer against the December peak) over-predicts churn a little; a decile is off by up to ~0.15.
    for r in rows:
        assert r["mean_predicted"] == pytest.approx(r["observed_rate"], abs=0.17)
    gains = section["gains"]["rows"]
    assert gains[-1]["share_of_churners_pct"] == pytest.approx(100.0)
    assert gains[2]["share_of_churners_pct"] > 30  # the riskiest 30 % hold more than 30 % of churners
    assert section["features"][-3:] == ["age_band", "gender", "region"]


def test_churn_is_calibrated_within_012_where_behaviour_does_not_drift(textbook: pa.Table) -> None:
    """The calibration bound the churn model was held to on stationary data (the generator before it
    became seasonal): a model trained a window earlier predicts each risk decile's churn rate within
    0.12. On the seasonal data above, the drift between windows is real and the bound looser."""
    section = churn.analyse(Released(textbook), Disclosure(10), days=90)
    rows = section["calibration"]["rows"]
    assert len(rows) == 10
    for r in rows:
        assert r["mean_predicted"] == pytest.approx(r["observed_rate"], abs=0.12)


def test_churn_uses_profile_attributes_only_when_released(generated: pa.Table) -> None:
    released = Released(restrict(generated, drop=("age_band", "gender", "region")))
    section = churn.analyse(released, Disclosure(10), days=90)
    assert section["features"] == churn.BEHAVIOUR


def test_k_anonymity_withholds_small_rows_and_small_populations(generated: pa.Table) -> None:
    released = Released(generated)
    big_k = 400
    section = rfm.analyse(released, Disclosure(big_k))
    assert all(r["customers"] >= big_k for r in section["segments"]["rows"])
    assert all(c["customers"] >= big_k for c in section["heatmap"]["rows"])
    assert section["heatmap"]["suppressed_rows"] > 0
    assert len(section["heatmap"]["rows"]) + section["heatmap"]["suppressed_rows"] == 25
    with pytest.raises(TooFewCustomers, match="fewer than k"):
        rfm.analyse(_small_release(), Disclosure(4))


def test_disclosure_guards_its_tables() -> None:
    d = Disclosure(3)
    table = d.table(["x", "customers"], [{"x": 1, "customers": 3}, {"x": 2, "customers": 2}])
    assert table == {"columns": ["x", "customers"], "rows": [{"x": 1, "customers": 3}], "suppressed_rows": 1}
    with pytest.raises(ValueError, match="customers"):
        d.table(["x"], [{"x": 1}])
    with pytest.raises(ValueError, match="differ"):
        d.table(["x", "customers"], [{"x": 1, "customers": 5, "did": "did:a"}])
    with pytest.raises(ValueError, match="at least 2"):
        Disclosure(1)
