"""Churn risk: will a customer make no order in the next `days` days?

Time-based split, as the model would be used: features are computed at a cutoff from the orders
before it and the label from the window after it. The model is trained at cutoff
`as_of − 2·days` (label window ending where the test's features begin) and tested at
`as_of − days` (label window ending at `as_of`), so nothing from the test window reaches training.
A scikit-learn `HistGradientBoostingClassifier` is fitted on 80 % of the training customers and its
probabilities calibrated (Platt's sigmoid) on the other 20 %. Reported: ROC AUC on the test window (and
the AUC of recency alone, the rule of thumb it has to beat), the Brier score, a calibration table and
the cumulative gains by risk decile. Beside it, the untrained baseline a CRM analyst would reach for
first: BG/NBD fitted on the orders before the test cutoff, its expected purchases and P(alive) as
scores (`bgnbd_baseline`). `active_only` restricts both windows to customers with an order in the
`days` before the cutoff.

Features: recency, orders, mean spend, tenure, orders and spend in the last `days`, and the returns
(rows with a negative amount, `Orders.return_ts`) before the cutoff with the days since the last one:
a refund is dissatisfaction, which a purchase-only model such as BG/NBD cannot see. The trees are kept
small and regularised (L2, at least 80 customers a leaf, early stopping): the signal is a few smooth
effects, and the unregularised default overfitted below recency alone. Profile attributes (age band,
gender, region) are used when the release carries them, and only then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.metrics import brier_score_loss, roc_auc_score

from crm_bridge.analytics import clv, privacy
from crm_bridge.analytics.data import DAY, Orders, Released, Requirement, figure, tenths
from crm_bridge.analytics.errors import AnalyticsError
from crm_bridge.analytics.privacy import Disclosure, Table

BEHAVIOUR = [
    "recency_days",
    "orders",
    "mean_spend",
    "tenure_days",
    "recent_orders",
    "recent_spend",
    "returns",
    "days_since_return",
]
NO_RETURN_DAYS = 36_525.0  # days since the last return of a customer without one: a century


def requirement(released: Released) -> Requirement:
    return Requirement("churn risk", (released.fields.timestamp, released.fields.amount))


@dataclass
class Window:
    customers: np.ndarray  # codes of customers with an order before the cutoff
    features: np.ndarray  # float64 (customers × features)
    churned: np.ndarray  # bool


def window(orders: Orders, profile: np.ndarray, cutoff: int, days: int, *, active_only: bool = False) -> Window:
    """Features at `cutoff` and the label after it, for the customers with an order before it (only
    those with one in the `days` before it, when `active_only`: a customer already silent for the
    whole churn period has churned by the definition, and predicting it again flatters the model)."""
    horizon = days * DAY
    n = orders.customers
    before = orders.ts < cutoff
    c = orders.customer
    count = np.bincount(c[before], minlength=n)
    known = count > 0
    spend = np.bincount(c[before], weights=orders.amount[before], minlength=n)
    last = np.full(n, np.iinfo(np.int64).min)
    np.maximum.at(last, c[before], orders.ts[before])
    first = orders.first_ts()
    recent = before & (orders.ts >= cutoff - horizon)
    recent_count = np.bincount(c[recent], minlength=n)
    recent_spend = np.bincount(c[recent], weights=orders.amount[recent], minlength=n)
    # Refunds before the cutoff (a dissatisfied customer leaves): how many, and how long ago the last
    # (none: NO_RETURN_DAYS, beyond any history; not NaN, which a release without returns would give
    # every customer, and a feature with no value the trees cannot bin).
    returned = orders.return_ts < cutoff
    returns = np.bincount(orders.return_customer[returned], minlength=n)
    last_return = np.full(n, np.iinfo(np.int64).min)
    np.maximum.at(last_return, orders.return_customer[returned], orders.return_ts[returned])
    since_return = np.where(returns > 0, (cutoff - last_return) / DAY, NO_RETURN_DAYS)
    after = (orders.ts >= cutoff) & (orders.ts < cutoff + horizon)
    bought_after = np.bincount(c[after], minlength=n) > 0
    idx = np.flatnonzero(known & (recent_count > 0) if active_only else known)
    features = np.column_stack(
        [
            (cutoff - last[idx]) / DAY,
            count[idx],
            spend[idx] / count[idx],
            (cutoff - first[idx]) / DAY,
            recent_count[idx],
            recent_spend[idx],
            returns[idx],
            since_return[idx],
            *(profile[idx].T if profile.size else []),
        ]
    ).astype(np.float64)
    return Window(idx, features, ~bought_after[idx])


def _profile(released: Released, orders: Orders) -> tuple[np.ndarray, list[str]]:
    """Per customer, each released profile column as category codes (NaN: withheld or unknown)."""
    columns = released.profile_columns()
    if not columns:
        return np.zeros((orders.customers, 0)), []
    out = np.full((orders.customers, len(columns)), np.nan)
    for j, name in enumerate(columns):
        codes, _values = released.codes_for_orders(name)
        first = codes[orders.starts].astype(np.float64)  # the customer's value on their first order
        first[first < 0] = np.nan
        out[:, j] = first
    return out, columns


def bgnbd_baseline(orders: Orders, cutoff: int, days: int, customers: np.ndarray) -> dict[str, np.ndarray]:
    """The untrained baseline: BG/NBD fitted on the orders before the cutoff (no label is used), each
    customer scored by its expected purchases in the next `days` (fewer: riskier) and by 1 − P(alive)."""
    s = clv.summarise(orders, cutoff)
    known = s.T >= 0
    bg = clv.BgNbd.fit(s.x[known], s.t_x[known], s.T[known])
    x, t_x, T = s.x[customers], s.t_x[customers], s.T[customers]
    return {
        "expected_purchases": bg.expected_purchases(days / clv.WEEK_DAYS, x, t_x, T),
        "p_alive": bg.p_alive(x, t_x, T),
    }


def analyse(
    released: Released, disclosure: Disclosure, days: int, seed: int = 0, *, active_only: bool = False
) -> dict[str, Any]:
    released.require(requirement(released))
    orders = released.orders
    profile, profile_columns = _profile(released, orders)
    test_cutoff = orders.as_of - days * DAY
    train_cutoff = test_cutoff - days * DAY
    if int(orders.ts.min()) >= train_cutoff:  # not too few customers: too short a history
        raise AnalyticsError(
            f"churn risk: the release holds fewer than twice {days} = {2 * days} days of orders before the"
            f" analysis date; the model is trained on a {days}-day window and tested on the next, each"
            " after orders to learn from"
        )
    train = window(orders, profile, train_cutoff, days, active_only=active_only)
    test = window(orders, profile, test_cutoff, days, active_only=active_only)
    disclosure.population("churn risk (training window)", len(train.customers))
    disclosure.population("churn risk (test window)", len(test.customers))
    for name, w in (("training", train), ("test", test)):
        if w.churned.all() or not w.churned.any():
            raise AnalyticsError(f"churn risk: every customer in the {name} window has the same outcome")
    rng = np.random.default_rng(seed)
    fit_part = rng.random(len(train.customers)) < 0.8
    categorical = [False] * len(BEHAVIOUR) + [True] * len(profile_columns)
    model = HistGradientBoostingClassifier(
        max_iter=300,
        learning_rate=0.05,
        min_samples_leaf=80,
        max_leaf_nodes=8,
        l2_regularization=1.0,
        early_stopping=True,
        validation_fraction=0.2,
        n_iter_no_change=20,
        categorical_features=categorical,
        random_state=seed,
    )
    model.fit(train.features[fit_part], train.churned[fit_part])
    calibrated = CalibratedClassifierCV(FrozenEstimator(model), method="sigmoid")
    calibrated.fit(train.features[~fit_part], train.churned[~fit_part])
    risk = calibrated.predict_proba(test.features)[:, 1]
    # Isotonic calibration was dropped: a step function, it gave thousands of customers one risk, so
    # the risk deciles, which keep ties together, merged (3 of 10 empty on the textbook population) or,
    # cut by row order, put identical customers apart. The sigmoid keeps the model's order.
    y = test.churned
    auc = roc_auc_score(y, risk)
    recency_auc = roc_auc_score(y, test.features[:, 0])
    bgnbd_auc = p_alive_auc = None
    baseline_error = None
    try:
        baseline = bgnbd_baseline(orders, test_cutoff, days, test.customers)
        if not all(np.all(np.isfinite(score)) for score in baseline.values()):
            raise AnalyticsError("its fit is degenerate on these orders (it scores no finite value)")
        bgnbd_auc = figure(roc_auc_score(y, -baseline["expected_purchases"]))
        p_alive_auc = figure(roc_auc_score(y, -baseline["p_alive"]))
    except AnalyticsError as exc:  # the comparison is missing; the churn model stands on its own
        baseline_error = f"BG/NBD baseline: {exc}"

    calibration, gains = tables(disclosure, risk, y)
    return {
        "horizon_days": days,
        "features": BEHAVIOUR + profile_columns,
        "train_cutoff": train_cutoff,
        "test_cutoff": test_cutoff,
        "train_customers": len(train.customers),
        "test_customers": len(risk),
        "train_churn_rate": figure(train.churned.mean()),
        "test_churn_rate": figure(y.mean()),
        "roc_auc": figure(auc),
        "recency_roc_auc": figure(recency_auc),
        # The BG/NBD baseline on the same test customers: the model has to beat it to earn its keep.
        "bgnbd_roc_auc": bgnbd_auc,
        "bgnbd_p_alive_roc_auc": p_alive_auc,
        "bgnbd_baseline_error": baseline_error,
        "active_only": active_only,
        "brier": figure(brier_score_loss(y, risk)),
        "calibration": calibration,
        "gains": gains,
    }


def deciles(risk: np.ndarray) -> np.ndarray:
    """0..9 per customer, 0 the riskiest: ⌊10 · share of customers strictly riskier⌋ (the "minimum
    rank" rule, as RFM's quintiles). Equal risks share a decile whatever the row order, so a decile
    can hold more than a tenth and another none."""
    return tenths(-risk)


def tables(disclosure: Disclosure, risk: np.ndarray, y: np.ndarray) -> tuple[Table, Table]:
    """Calibration by risk decile (`deciles`: tenths by rank, ties kept together) and cumulative gains
    from the riskiest decile down.

    The deciles partition the test customers, whose count and churn rate are published, so they are
    suppressed together with that total (`privacy.complementary`). The gains are running sums, and the
    difference of two neighbours is one decile: they run over the shown deciles only (a hidden decile
    adds nothing to them), so the last row reaches 100 % only when no decile is hidden."""
    n = len(risk)
    disclosure.record("churn test population", "test customers", np.ones(n, dtype=bool), n)
    decile = deciles(risk)
    size = np.bincount(decile, minlength=10)
    predicted = np.bincount(decile, weights=risk, minlength=10)
    observed = np.bincount(decile, weights=y.astype(np.float64), minlength=10)
    shown, _ = privacy.complementary(size, disclosure.k)
    calibration = [
        (
            d,
            {
                "risk_decile": d + 1,
                "customers": int(size[d]),
                "mean_predicted": figure(predicted[d] / size[d]),
                "observed_rate": figure(observed[d] / size[d]),
            },
        )
        for d in range(10)
        if size[d]
    ]
    churners = y.sum()
    counted = np.where(shown, size, 0)
    reached = np.where(shown, observed, 0.0)
    gains: list[dict[str, Any]] = []
    for d in np.flatnonzero(shown):
        targeted = int(counted[: d + 1].sum())
        gains.append(
            {
                "top_deciles": int(d) + 1,
                "customers": targeted,
                "share_targeted_pct": figure(100 * targeted / n, 3),
                "share_of_churners_pct": figure(100 * reached[: d + 1].sum() / churners, 3),
            }
        )
        disclosure.record("churn gains", "test customers", shown[decile] & (decile <= d), targeted)
    columns = ["risk_decile", "customers", "mean_predicted", "observed_rate"]
    return (
        disclosure.cells(columns, calibration, shown, name="churn calibration", population="test customers",
                         labels=decile),
        Table(
            columns=["top_deciles", "customers", "share_targeted_pct", "share_of_churners_pct"],
            rows=gains,
            suppressed_rows=int(((size > 0) & ~shown).sum()),
        ),
    )  # fmt: skip
