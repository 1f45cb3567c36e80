"""Differencing attacks on every table the analytics report publishes (issue 33, item 5).

Hiding each row below k is beaten by subtraction when a total is published beside the rows. Each
test here builds data where, without complementary suppression, one small group would be exposed,
and attacks the published numbers the way an analyst with the report could:

- the report's totals minus the shown cells of each table that partitions them (`PARTITIONS`);
- a group's total (an RFM segment) minus its shown cells (the heat map, by the segment grid);
- neighbouring rows of a running sum (the churn gains curve);
- inclusion–exclusion over the association rules' itemsets: count(a) − count(ab) − count(ac) +
  count(abc) is the baskets with a but neither b nor c (`inclusion_exclusion_attack`);
- every linear combination at once: with `Disclosure(k, audit=True)` each published figure records
  which customers it sums over, and an integer program looks for any combination of figures that adds
  up to a group of 1 .. k−1 customers (`smallest_recoverable_group`).

A table added to the report must be registered in `PARTITIONS`, `RUNNING` or `ROWS_ONLY`
(`test_every_published_table_is_attacked` fails until it is).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from scipy.optimize import Bounds, LinearConstraint, milp

from crm_bridge.analytics import churn, clv, privacy, rfm, rules
from crm_bridge.analytics.data import DAY, Released
from crm_bridge.analytics.privacy import Disclosure
from crm_bridge.analytics.report import build
from crm_bridge.analytics.settings import AnalyticsSettings
from scripts import generate_crm
from tests.crm_bridge.analytics.releases import PURCHASES, released

# (section, [subsection,] table) → the figure of the section that the table's rows add up to.
PARTITIONS: dict[tuple[str, ...], str] = {
    ("rfm", "segments"): "customers",
    ("rfm", "heatmap"): "customers",
    ("clv", "distribution"): "customers",
    ("clv", "p_alive"): "customers",
    ("churn", "calibration"): "test_customers",
    ("clusters", "clusters"): "customers",  # a cluster below k is merged into others: none is hidden
}
RUNNING = {("churn", "gains")}  # cumulative rows: neighbours differ by one group
# The holdout check (nested in the CLV section): its frequency groups partition the calibration
# cohort (pooled until each holds k, none hidden); its tracking rows are cumulative repeat purchases,
# so two shown rows differ by the purchases of the weeks between them, made by at least the later
# row's buyers ("customers", k or more: a week with fewer is withheld).
PARTITIONS[("clv", "holdout", "by_frequency")] = "customers"
CUMULATIVE = {("clv", "holdout", "tracking")}
# Rows that no published figure adds up with a hidden remainder: each rule is floored at k; a CHAID
# split is shown only with every child at k or more, so a node minus its children is nothing (and the
# two CHAID trees' nodes are attacked together by the audit's integer program: "CHAID customers").
ROWS_ONLY = {("rules", "rules"), ("chaid", "tree"), ("chaid", "high_clv_tree")}


def tables(report: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every published table, by its path in the report (sections nest: the CLV section's holdout check)."""
    for name, body in report.items():
        if isinstance(body, dict):
            if "rows" in body and "columns" in body:
                if path:
                    yield (*path, name), body
            else:
                yield from tables(body, (*path, name))


def _at(report: dict[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        report = report[name]
    return report


def residual_ok(hidden: float, k: int) -> bool:
    return hidden == 0 or hidden >= k


def attack_published(report: dict[str, Any], k: int) -> list[str]:
    """The differencing attacks an analyst can make with the report's own numbers; what they expose."""
    exposed = []
    for key, table in tables(report):
        section = _at(report, key[:-1])
        rows = table["rows"]
        exposed += [f"{key}: a row of {r['customers']}" for r in rows if r["customers"] < k]
        exposed += [f"{key}: {c} is one customer's value" for c in table["columns"] if c.startswith(("min_", "max_"))]
        if key in PARTITIONS:
            hidden = section[PARTITIONS[key]] - sum(r["customers"] for r in rows)
            if not residual_ok(hidden, k):
                exposed.append(f"{key}: the total minus the shown rows is {hidden} customers")
        if key in RUNNING:
            counts = [0] + [r["customers"] for r in rows]
            for before, after in itertools.pairwise(counts):
                if not residual_ok(after - before, k):
                    exposed.append(f"{key}: neighbouring rows differ by {after - before} customers")
    if "rules" in report:  # several itemsets: baskets with one but none of the others
        exposed += [f"rules: {e}" for e in inclusion_exclusion_attack(report["rules"], k)]
    if "rules" in report:  # nested itemsets: baskets and customers with one itemset but not the other
        published = [
            (frozenset(r["antecedents"].split(" + ")) | frozenset(r["consequents"].split(" + ")), r)
            for r in report["rules"]["rules"]["rows"]
        ]
        for small, a in published:
            for large, b in published:
                for figure in ("baskets", "customers"):
                    if small < large and not residual_ok(a[figure] - b[figure], k):
                        exposed.append(
                            f"rules: {sorted(small)} but not {sorted(large)}: {a[figure] - b[figure]} {figure}"
                        )
    if "rfm" in report:  # a segment minus its shown heat-map cells
        segment_of = {(r, f): rfm._GRID[5 - r][f - 1] for r in range(1, 6) for f in range(1, 6)}
        for seg in report["rfm"]["segments"]["rows"]:
            cells = [c for c in report["rfm"]["heatmap"]["rows"] if segment_of[(c["r"], c["f"])] == seg["segment"]]
            hidden = seg["customers"] - sum(c["customers"] for c in cells)
            revenue = seg["revenue"] - sum(c["customers"] * c["mean_spend"] for c in cells)
            if not residual_ok(hidden, k):
                exposed.append(
                    f"rfm: {seg['segment']} minus its shown cells: {hidden} customers, revenue {revenue:.2f}"
                )
    return exposed


def published_itemset_counts(section: dict[str, Any]) -> dict[frozenset[str], int]:
    """The basket count of every itemset the rules publish, as a reader works them out: the rule's
    itemset from its baskets, its antecedent from the confidence, its consequent from the lift (and
    the empty itemset: all baskets)."""
    n = section["baskets"]
    counts: dict[frozenset[str], int] = {frozenset(): n}
    for r in section["rules"]["rows"]:
        lhs, rhs = frozenset(r["antecedents"].split(" + ")), frozenset(r["consequents"].split(" + "))
        both = r["baskets"]
        counts[lhs | rhs] = both
        counts[lhs] = round(both / r["confidence"])
        counts[rhs] = round(both * n / (r["lift"] * counts[lhs]))
    return counts


def inclusion_exclusion_attack(section: dict[str, Any], k: int, most: int = 4) -> list[str]:
    """Every group "baskets holding I but none of J1 .. Jm" (m ≤ `most`, each J ⊃ I) whose count the
    published counts give by inclusion–exclusion (the count of every union of J's is published), that
    holds 1 .. k−1 baskets."""
    counts = published_itemset_counts(section)
    exposed = []
    for base in counts:
        above = [j for j in counts if base < j]
        for m in range(2, most + 1):  # m = 1: nested pairs, attacked by attack_published
            for chosen in itertools.combinations(above, m):
                unions = {frozenset().union(*v) for r in range(1, m + 1) for v in itertools.combinations(chosen, r)}
                if not unions <= counts.keys():
                    continue
                group = sum(
                    (-1) ** r * counts[base.union(*v)] for r in range(m + 1) for v in itertools.combinations(chosen, r)
                )
                if 0 < group < k:
                    exposed.append(f"{sorted(base)} without any of {[sorted(j) for j in chosen]}: {group} baskets")
    return exposed


def smallest_recoverable_group(members: list[np.ndarray]) -> int:
    """The fewest customers (≥ 1) whose total any linear combination of the published figures gives.

    Customers in the same published figures are indistinguishable, so they are pooled into atoms;
    a group is recoverable when its indicator over atoms is a combination of the figures' indicators.
    An integer program (scipy's HiGHS) finds the smallest: x ∈ {0,1} per atom, x = Aᵀy, Σx ≥ 1."""
    matrix = np.array(members, dtype=np.int8)
    atoms, size = np.unique(matrix.T, axis=0, return_counts=True)
    n_atoms, n_figures = atoms.shape
    # variables: x (one per atom, binary) then y (one per figure, real)
    cost = np.concatenate([size, np.zeros(n_figures)])
    equal = np.hstack([np.eye(n_atoms), -atoms.astype(np.float64)])
    some = np.concatenate([np.ones(n_atoms), np.zeros(n_figures)])
    result = milp(
        cost,
        constraints=[LinearConstraint(equal, 0, 0), LinearConstraint(some[None, :], 1, np.inf)],
        integrality=np.concatenate([np.ones(n_atoms), np.zeros(n_figures)]),
        bounds=Bounds(np.concatenate([np.zeros(n_atoms), np.full(n_figures, -50.0)]),
                      np.concatenate([np.ones(n_atoms), np.full(n_figures, 50.0)])),
    )  # fmt: skip
    assert result.status == 0, result.message
    return round(float(result.fun))


def attack_audit(disclosure: Disclosure) -> dict[str, int]:
    """Per population, the smallest group the recorded figures recover."""
    assert disclosure.audit
    out = {}
    for population in {f.population for f in disclosure.audit}:
        figures = [f for f in disclosure.audit if f.population == population]
        for f in figures:  # the record is the published figure's own population
            assert int(f.members.sum()) == f.customers, f.table
        out[population] = smallest_recoverable_group([f.members for f in figures])
    return out


# the attacker itself ------------------------------------------------------------------------------


def test_the_attacker_finds_a_total_minus_shown_cells() -> None:
    units = np.arange(30)
    a, b = units < 12, (units >= 12) & (units < 29)  # the third cell: one customer
    # Published: the total and two of its three cells: the third (one customer) is recoverable.
    assert smallest_recoverable_group([np.ones(30, dtype=bool), a, b]) == 1
    # A 2×2 table (cells of 2, 10, 10, 8) with its row and column sums: no cell is determined, the
    # smallest recoverable group is a row or a column (12) ...
    tl, tr, bl, br = units < 2, (units >= 2) & (units < 12), (units >= 12) & (units < 22), units >= 22
    margins = [tl | tr, bl | br, tl | bl, tr | br]
    assert smallest_recoverable_group(margins) == 12
    # ... but once the bottom-right cell is shown, top − (right − bottom-right) is the 2.
    assert smallest_recoverable_group([*margins, br]) == 2
    # Only the total: the smallest recoverable group is everyone.
    assert smallest_recoverable_group([np.ones(30, dtype=bool)]) == 30
    assert smallest_recoverable_group([np.ones(30, dtype=bool), a]) == 12


def test_complementary_hides_enough_in_an_exact_small_case() -> None:
    # Segment 0 holds cells of 12, 8, 1; segment 1 holds 20 and 15; k = 5.
    sizes = np.array([12, 8, 1, 20, 15])
    shown, groups = privacy.complementary(sizes, 5, np.array([0, 0, 0, 1, 1]))
    # The 1 alone would be exposed by segment 0's total: the 8 is hidden with it (9 ≥ 5).
    assert shown.tolist() == [True, False, False, True, True]
    assert groups.tolist() == [True, True]
    # Without groups: cells of 40, 40, 3 and k = 5: the 3 is hidden with the smaller 40.
    shown, _ = privacy.complementary(np.array([40, 41, 3]), 5)
    assert shown.tolist() == [False, True, False]


# the report's tables, on data built so that one small group would be exposed ---------------------


def _generated(customers: int, seed: int) -> Released:
    """Generated customers whose purchases follow BG/NBD exactly (`textbook`): the scenarios below were
    built on that population, where they expose one customer to the unprotected tables."""
    return Released(pa.concat_tables(generate_crm.released(customers, seed=seed, textbook=True)))


def test_no_rfm_segment_minus_its_cells_exposes_a_customer() -> None:
    released, k = _generated(200, seed=1), 4
    # The premise: "can't lose them" (≥ k customers) holds a heat-map cell of one customer, so a
    # segment total beside its other cells would give that customer's revenue.
    s = rfm.scores(released)
    segment = s.segment == rfm.SEGMENTS.index("can't lose them")
    cells = np.bincount(((s.r - 1) * 5 + s.f - 1)[segment], minlength=25)
    assert segment.sum() >= k
    assert 1 in cells.tolist()
    disclosure = Disclosure(k, audit=True)
    section = rfm.analyse(released, disclosure)
    assert attack_published({"rfm": section}, k) == []
    assert attack_audit(disclosure)["customers"] >= k
    # Nothing was hidden that needed no hiding: every shown row is a real cell of its own size.
    shown = {(c["r"], c["f"]): c["customers"] for c in section["heatmap"]["rows"]}
    assert all(
        np.bincount((s.r - 1) * 5 + s.f - 1, minlength=25)[(r - 1) * 5 + f - 1] == n for (r, f), n in shown.items()
    )


def test_clv_deciles_show_no_single_value_and_no_small_remainder() -> None:
    released, k = _generated(99, seed=0), 10  # deciles of 10 and one of 9
    disclosure = Disclosure(k, audit=True)
    section = clv.analyse(released, disclosure, 52)
    assert attack_published({"clv": section}, k) == []
    assert all(minimum >= k for minimum in attack_audit(disclosure).values())
    assert section["distribution"]["columns"] == ["decile", "customers", "mean_value", "total_value"]
    # The hidden decile of 9 took a shown one with it: 19 customers' value is unexplained.
    rows = section["distribution"]["rows"]
    assert section["customers"] - sum(r["customers"] for r in rows) == 19
    assert section["expected_value_total"] - sum(r["total_value"] for r in rows) > 0


def test_churn_tables_expose_no_decile_by_difference() -> None:
    released, k = _generated(309, seed=0), 31  # risk deciles of 31 and one of 30
    disclosure = Disclosure(k, audit=True)
    section = churn.analyse(released, disclosure, 90)
    assert section["calibration"]["suppressed_rows"] > 0  # the premise: deciles below k exist
    assert attack_published({"churn": section}, k) == []
    assert attack_audit(disclosure)["test customers"] >= k
    # The gains run over the shown deciles: the last row counts exactly the calibration's customers.
    gains, calibration = section["gains"]["rows"], section["calibration"]["rows"]
    assert gains[-1]["customers"] == sum(r["customers"] for r in calibration)


def test_every_published_table_is_attacked() -> None:
    released, k = _generated(200, seed=1), 4
    disclosure = Disclosure(k, audit=True)
    report = build(released, AnalyticsSettings(k=k, rules_sample=20_000, min_support=0.05), disclosure)
    published = {key for key, _ in tables(report)}
    assert {("rfm", "segments"), ("rfm", "heatmap"), ("rules", "rules")} <= published
    assert ("clv", "holdout", "tracking") in published
    unknown = published - set(PARTITIONS) - RUNNING - ROWS_ONLY - CUMULATIVE
    assert not unknown, f"register these tables' differencing attacks in test_privacy.py: {unknown}"
    assert attack_published(report, k) == []
    # Across tables: RFM and CLV describe the same customers, so their figures are attacked together.
    assert {"customers", "test customers"} <= set(attack_audit(disclosure))
    assert all(smallest >= k for smallest in attack_audit(disclosure).values())


def _release(
    rows: list[tuple[str, int, float]], as_of: int | None = None, products: list[str] | None = None
) -> Released:
    orders = {
        "did": [r[0] for r in rows],
        "order_ts": [r[1] * DAY + 3600 for r in rows],
        "amount": [r[2] for r in rows],
        "products": products or ["tea"] * len(rows),
    }
    return released(orders, {"products": PURCHASES}, as_of=as_of)


def test_rules_expose_no_one_by_nested_itemsets() -> None:
    # Twenty customers buy bread, butter and jam; one buys bread and butter without jam. Rules on
    # {bread, butter} and {bread, butter, jam} side by side would count that one customer's basket.
    baskets = ["bread;butter;jam"] * 20 + ["bread;butter"] + ["milk;eggs"] * 20
    rows = [(f"did:{i}", 10 + i % 7, 5.0) for i in range(len(baskets))]
    released, k = _release(rows, products=baskets), 5
    section = rules.analyse(released, Disclosure(k), min_support=0.05, sample=10**6)
    published = {(r["antecedents"], r["consequents"]) for r in section["rules"]["rows"]}
    assert ("bread", "butter") in published  # the best rule is kept; the one nested in it, withheld
    assert ("milk", "eggs") in published
    assert attack_published({"rules": section}, k) == []
    assert section["rules"]["suppressed_rows"] > 0


def test_rules_expose_no_one_by_inclusion_exclusion_over_three_itemsets() -> None:
    # Bread in 37 baskets: with butter and jam (10), with butter (10), with jam (10), alone (1: the
    # target); butter and jam without bread (6); milk and eggs (20). Every two nested itemsets differ
    # by 5 or more baskets, but count(bread) − count(bread, butter) − count(bread, jam)
    # + count(bread, butter, jam) is the one basket of bread alone.
    baskets = (
        ["bread;butter;jam"] * 10
        + ["bread;butter"] * 10
        + ["bread;jam"] * 10
        + ["bread"]
        + ["butter;jam"] * 6
        + ["milk;eggs"] * 20
    )
    rows = [(f"did:{i}", 10 + i % 7, 5.0) for i in range(len(baskets))]
    released, k = _release(rows, products=baskets), 5
    section = rules.analyse(released, Disclosure(k), min_support=0.05, sample=10**6)
    assert attack_published({"rules": section}, k) == []  # no pair of nested itemsets gives it away
    assert inclusion_exclusion_attack(section, k) == []
    published = {(r["antecedents"], r["consequents"]) for r in section["rules"]["rows"]}
    assert {("milk", "eggs"), ("bread", "butter"), ("bread", "jam")} <= published  # the rest is kept
    assert section["rules"]["suppressed_rows"] > 0

    # The attacker itself: it finds the target when bread, {bread, butter}, {bread, jam} and
    # {bread, butter, jam} are all published.
    def rule(lhs: str, rhs: str, both: int, n_lhs: int, n_rhs: int) -> dict[str, Any]:
        return {"antecedents": lhs, "consequents": rhs, "baskets": both, "confidence": both / n_lhs,
                "lift": 57 * both / (n_lhs * n_rhs)}  # fmt: skip

    shown = {
        "baskets": 57,
        "rules": {
            "rows": [
                rule("bread", "butter", 20, 31, 26),
                rule("bread", "jam", 20, 31, 26),
                rule("bread", "butter + jam", 10, 31, 16),
            ]
        },
    }
    found = inclusion_exclusion_attack(shown, k)
    assert "['bread'] without any of [['bread', 'butter'], ['bread', 'jam']]: 1 baskets" in found


def test_as_of_dates_no_single_order() -> None:
    # Twelve customers order on days 10 and 50; one customer alone orders on day 80.
    rows = [(f"did:{i}", day, 10.0 + i) for i in range(12) for day in (10, 50)] + [("did:late", 80, 99.0)]
    report = build(_release(rows), AnalyticsSettings(k=5))
    assert report["input"]["as_of"] == "1970-02-21"  # the end of day 50: 1970-02-21 00:00
    assert report["rfm"]["as_of"] == 51 * DAY
    assert report["input"]["orders"] == 24  # the lone order of day 80 is after the analysis time
    assert "at least k = 5 customers" in report["input"]["as_of_rule"]
    # The analyst's own time is kept as given.
    given = build(_release(rows, as_of=90 * DAY), AnalyticsSettings(k=5))
    assert given["input"]["as_of"] == "1970-04-01"
    assert given["input"]["orders"] == 25


def test_as_of_falls_back_to_longer_periods_when_no_day_has_k_customers() -> None:
    # One customer a day on days 10 .. 21: no day has k = 5, but the 7-day period of days 14 .. 20
    # has 7; the lone customer of day 21 is left out.
    rows = [(f"did:{d}", d, 5.0 + d) for d in range(10, 22)]
    report = build(_release(rows), AnalyticsSettings(k=5))
    assert report["rfm"]["as_of"] == 21 * DAY
    assert report["input"]["orders"] == len(rows) - 1
    assert "7-day period" in report["input"]["as_of_rule"]
    assert privacy.as_of(np.array([0, 1]), np.array([5 * DAY, 400 * DAY]), 5) is None
