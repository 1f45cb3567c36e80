"""BG/NBD and Gamma-Gamma: validated on CDNOW against Fader, Hardie and Lee (2005), and on data
simulated from the models with known parameters."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, getcontext

import numpy as np
import pyarrow as pa
import pytest
from scipy.special import gammaln

from crm_bridge.analytics import clv, pareto_nbd
from crm_bridge.analytics.data import Released
from crm_bridge.analytics.privacy import Disclosure
from ledger.settings import PROJECT_ROOT
from tests.crm_bridge.analytics.releases import released

CDNOW = PROJECT_ROOT / "tests" / "data" / "cdnow" / "CDNOW_sample.txt"


def _epoch(day: str) -> int:
    return int(datetime.strptime(day, "%Y%m%d").replace(tzinfo=UTC).timestamp())


@pytest.fixture(scope="module")
def cdnow() -> Released:
    """The CDNOW sample as a released table, observed to the end of the papers' 39-week calibration
    period (1997-09-30)."""
    return cdnow_release(as_of=_epoch("19971001"))[0]


def test_cdnow_calibration_summary_is_the_papers(cdnow: Released) -> None:
    s = clv.summarise(cdnow.orders)
    assert len(s.x) == 2357  # the cohort
    assert int((s.x > 0).sum()) == 946  # Gamma-Gamma's sample: customers with repeat purchases
    # The paper's example customer bought first on 1997-01-01: T = 38.86 weeks at the end of week 39.
    assert s.T.max() == pytest.approx(38.86, abs=0.005)


def test_bgnbd_on_cdnow_matches_fader_hardie_lee_2005(cdnow: Released) -> None:
    s = clv.summarise(cdnow.orders)
    fit = clv.BgNbd.fit(s.x, s.t_x, s.T)
    # Published (Marketing Science 24(2), 2005, p. 279): r = 0.243, α = 4.414, a = 0.793, b = 2.426, LL = -9582.4.
    assert round(fit.r, 3) == 0.243
    assert round(fit.alpha, 3) == 4.414
    assert round(fit.a, 3) == 0.793
    assert round(fit.b, 3) == 2.426
    assert round(fit.log_likelihood, 1) == -9582.4


def test_bgnbd_standard_errors_on_cdnow_are_lifetimes_published_ones(cdnow: Released) -> None:
    """The inverse Hessian at the optimum: lifetimes' documented CDNOW summary (BetaGeoFitter,
    numdifftools' Hessian) gives se 0.012557, 0.378221, 0.185719, 0.705345 for r, α, a, b."""
    s = clv.summarise(cdnow.orders)
    fit = clv.BgNbd.fit(s.x, s.t_x, s.T)
    assert fit.uncertainty.se == pytest.approx((0.012557, 0.378221, 0.185719, 0.705345), rel=2e-3)
    for value, low, high in zip(fit.params, fit.uncertainty.low, fit.uncertainty.high, strict=True):
        assert 0 < low < value < high


def test_bgnbd_conditional_expectation_is_the_papers_worked_example() -> None:
    published = clv.BgNbd(r=0.243, alpha=4.414, a=0.793, b=2.426, log_likelihood=0.0, customers=0)
    # FHL 2005: a customer with x = 2, t_x = 30.43, T = 38.86 is expected to make 1.226 purchases in 39 weeks.
    expected = published.expected_purchases(39.0, np.array([2.0]), np.array([30.43]), np.array([38.86]))
    assert round(float(expected[0]), 3) == 1.226
    # The probability alive never exceeds 1 and is 1 for a customer with no repeat purchase.
    alive = published.p_alive(np.array([0.0, 2.0, 2.0]), np.array([0.0, 30.43, 5.0]), np.array([38.86] * 3))
    assert alive[0] == 1.0
    assert 0 < alive[2] < alive[1] < 1  # last seen long ago: less likely alive


def _expected_purchases_by_the_series(
    params: tuple[float, float, float, float], t: float, x: float, t_x: float, T: float
) -> float:
    """FHL 2005 eq. 10 as printed, its 2F1 summed term by term in 60-digit decimal arithmetic (no
    overflow at e^±2000; mpmath is not installed, and the stdlib's Decimal is independent of scipy)."""
    getcontext().prec = 60
    r, alpha, a, b, t_, x_, tx, T_ = (Decimal(repr(float(v))) for v in (*params, t, x, t_x, T))
    A, B, C, z = r + x_, b + x_, a + b + x_ - 1, t_ / (alpha + T_ + t_)
    term = total = Decimal(1)
    n = 0
    while n < 10 or term > total * Decimal(10) ** -55:
        term = term * (A + n) * (B + n) / ((C + n) * (n + 1)) * z
        total += term
        n += 1
    core = 1 - ((alpha + T_) / (alpha + T_ + t_)) ** A * total
    ratio = a / (b + x_ - 1) * ((alpha + T_) / (alpha + tx)) ** (r + x_) if x > 0 else Decimal(0)
    return float((a + b + x_ - 1) / (a - 1) * core / (1 + ratio))


def test_expected_purchases_stay_exact_for_heavy_buyers() -> None:
    """Issue 33, item 7: x = 3,000 repeat purchase days, 104 weeks ahead gave 0 (the hypergeometric
    term overflowed); the series summed exactly gives 1,246.1 for a customer four years old."""
    params = (0.243, 4.414, 0.793, 2.426)
    published = clv.BgNbd(*params, log_likelihood=0.0, customers=0)
    cases = [(104.0, 3000.0, 208.0, 208.0), (104.0, 3000.0, 207.0, 208.0), (52.0, 800.0, 150.0, 156.0),
             (39.0, 2.0, 30.43, 38.86), (39.0, 0.0, 0.0, 20.0), (104.0, 40.0, 100.0, 104.0)]  # fmt: skip
    x, t_x, T = (np.array([c[i] for c in cases]) for i in (1, 2, 3))
    for t in sorted({c[0] for c in cases}):
        got = published.expected_purchases(t, x, t_x, T)
        for i, case in enumerate(cases):
            if case[0] == t:
                assert got[i] == pytest.approx(_expected_purchases_by_the_series(params, *case), rel=1e-9)
    assert published.expected_purchases(104.0, x[:1], t_x[:1], T[:1])[0] == pytest.approx(1246.126, abs=1e-3)
    # The 1,245.1 (it gave no t_x and T) is the customer whose 3,000th repeat day is today,
    # 208.2 weeks after the first.
    heavy = np.array([208.2])
    assert published.expected_purchases(104.0, x[:1], heavy, heavy)[0] == pytest.approx(1245.1, abs=0.05)


def test_discounting_at_zero_is_the_expected_purchases_and_lowers_them_otherwise() -> None:
    published = clv.BgNbd(0.243, 4.414, 0.793, 2.426, log_likelihood=0.0, customers=0)
    x, t_x, T = np.array([0.0, 2.0, 3000.0]), np.array([0.0, 30.43, 208.0]), np.array([20.0, 38.86, 208.0])
    undiscounted = published.expected_purchases(52.0, x, t_x, T)
    assert published.discounted_purchases(52, 0.0, x, t_x, T) == pytest.approx(undiscounted, rel=1e-12)
    discounted = published.discounted_purchases(52, 0.1, x, t_x, T)
    # Every week's purchases are discounted by between 1/1.1^(1/52) and 1/1.1.
    assert np.all(discounted < undiscounted * 1.1 ** (-1 / 52))
    assert np.all(discounted > undiscounted / 1.1)


def test_gamma_gamma_on_cdnow_matches_fader_hardie_lee(cdnow: Released) -> None:
    s = clv.summarise(cdnow.orders)
    repeat = s.x > 0
    fit = clv.GammaGamma.fit(s.x[repeat], s.monetary[repeat])
    # Published (Fader, Hardie and Lee 2005, JMR 42(4); Fader and Hardie, "The Gamma-Gamma Model of
    # Monetary Value", 2013): p = 6.25, q = 3.74, γ = 15.44.
    assert round(fit.p, 2) == 6.25
    assert round(fit.q, 2) == 3.74
    assert round(fit.gamma, 2) == 15.44
    assert fit.customers == 946
    assert not fit.degenerate


def _gamma_gamma_log_likelihood(theta: np.ndarray, x: np.ndarray, m: np.ndarray) -> float:
    """Fader and Hardie's ("The Gamma-Gamma Model of Monetary Value", 2013, eq. 5), written out."""
    p, q, g = theta
    return float(
        np.sum(
            gammaln(p * x + q) - gammaln(p * x) - gammaln(q) + q * np.log(g)
            + (p * x - 1) * np.log(m) + p * x * np.log(x) - (p * x + q) * np.log(g + m * x)
        )
    )  # fmt: skip


def test_gamma_gamma_standard_errors_are_the_observed_informations(cdnow: Released) -> None:
    # The BG/NBD and Pareto/NBD errors are pinned to lifetimes' and CLVTools' published ones; the
    # spend model's are checked against the inverse Hessian of the textbook likelihood, by
    # central differences here.
    s = clv.summarise(cdnow.orders)
    repeat = s.x > 0
    x, m = s.x[repeat], s.monetary[repeat]
    fit = clv.GammaGamma.fit(x, m)
    theta = np.array(fit.params)
    step = 1e-4 * theta
    hessian = np.empty((3, 3))
    for i in range(3):
        for j in range(3):
            ei, ej = np.eye(3)[i] * step[i], np.eye(3)[j] * step[j]
            ll = [
                _gamma_gamma_log_likelihood(theta + a * ei + b * ej, x, m)
                for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1))
            ]
            hessian[i, j] = (ll[0] - ll[1] - ll[2] + ll[3]) / (4 * step[i] * step[j])
    expected = np.sqrt(np.diag(np.linalg.inv(-hessian)))
    assert fit.uncertainty.se == pytest.approx(tuple(expected), rel=1e-2)
    for value, low, high in zip(fit.params, fit.uncertainty.low, fit.uncertainty.high, strict=True):
        assert low < value < high


def test_every_fitted_parameter_in_the_report_has_a_standard_error_and_an_interval(cdnow: Released) -> None:
    section = clv.analyse(cdnow, Disclosure(10), horizon_weeks=39)
    named = {(row["model"], row["parameter"]) for row in section["parameters"]}
    assert named == {
        *(("BG/NBD", p) for p in ("r", "alpha", "a", "b")),
        *(("Pareto/NBD", p) for p in ("r", "alpha", "s", "beta")),
        *(("Gamma-Gamma", p) for p in ("p", "q", "gamma")),
    }
    for row in section["parameters"]:
        assert row["se"] > 0, row
        assert row["low_95"] < row["estimate"] < row["high_95"], row


def test_the_report_section_carries_the_fitted_figures(cdnow: Released) -> None:
    section = clv.analyse(cdnow, Disclosure(10), horizon_weeks=39)
    assert section["bgnbd"]["r"] == 0.2426
    assert section["gamma_gamma"]["p"] == 6.25
    assert section["customers"] == 2357
    assert sum(row["customers"] for row in section["distribution"]["rows"]) == 2357
    assert sum(row["customers"] for row in section["p_alive"]["rows"]) + 0 <= 2357
    assert all(row["customers"] >= 10 for row in section["p_alive"]["rows"])


def _release(rows: list[tuple[str, int, float]]) -> Released:
    """(customer, day, amount) orders as a released table."""
    return released(
        {"did": [r[0] for r in rows], "order_ts": [r[1] * 86_400 for r in rows], "amount": [r[2] for r in rows]}
    )


def cdnow_release(as_of: int) -> tuple[Released, list[list[str]]]:
    """The CDNOW sample as a released table observed to `as_of`, and its rows."""
    rows = [line.split() for line in CDNOW.read_text().splitlines() if line.strip()]
    table = {
        "did": [f"did:web:cdnow.example:{r[1]}" for r in rows],
        "order_ts": [_epoch(r[2]) for r in rows],
        "amount": [float(r[4]) for r in rows],
    }
    return released(table, as_of=as_of), rows


def _cdnow_rows() -> list[tuple[str, int, float]]:
    """CDNOW's orders as (customer, day, amount): a purchase history BG/NBD describes well."""
    rows = [line.split() for line in CDNOW.read_text().splitlines() if line.strip()]
    return [(f"did:{r[1]}", _epoch(r[2]) // 86_400, float(r[4])) for r in rows]


def test_zero_and_refunded_repeat_orders_are_left_out_of_the_spend_fit_and_counted() -> None:
    """Issue 33, item 1: 20.00 then 0.00, or 20, 30, −30, made GammaGamma.fit raise. They are now left
    out of the fit (a Gamma-distributed value is positive), counted and said so."""
    rows = _cdnow_rows()
    rows += [("did:free", 9900, 20.0), ("did:free", 9940, 0.0)]
    rows += [("did:refund", 9900, 20.0), ("did:refund", 9940, 30.0), ("did:refund", 9941, -30.0)]
    released = _release(rows)
    section = clv.analyse(released, Disclosure(10), horizon_weeks=52)
    s = clv.summarise(released.orders)
    positive = (s.x > 0) & (s.monetary > 0)
    # The free order counts as a purchase worth 0 (mean repeat spend 0: left out of the fit); the refund
    # is netted into the order it returns, which then is no purchase (data preparation): that customer
    # has no repeat purchase left to fit.
    assert section["gamma_gamma"]["excluded_customers"] == 1
    assert section["gamma_gamma"]["customers"] == int(positive.sum())
    # The fit is the one on the customers with a positive mean alone.
    alone = clv.GammaGamma.fit(s.x[positive], s.monetary[positive])
    assert section["gamma_gamma"]["p"] == round(alone.p, 4 - len(str(int(alone.p))))
    # The free-order customer's spend is the model's for a mean of 0: positive, below the population
    # mean; the refunded one has no repeat purchase left, and gets the population mean.
    dids = released.orders.dids.to_pylist()
    free, refund = dids.index("did:free"), dids.index("did:refund")
    gg = clv.GammaGamma.fit(s.x, s.monetary)
    assert 0 < gg.expected_spend(s.x[free : free + 1], s.monetary[free : free + 1])[0] < gg.mean_spend()
    assert s.x[refund] == 0
    assert gg.expected_spend(s.x[refund : refund + 1], s.monetary[refund : refund + 1])[0] == gg.mean_spend()


def test_a_gamma_gamma_fit_without_spend_variation_is_flagged_degenerate() -> None:
    """Issue 33, item 8: spend that hardly varies within customers sends p to the hundreds of
    thousands (952,300 in the issue); the fit says so instead of being shown as a model."""
    rng = np.random.default_rng(4)
    x = rng.integers(1, 6, 2_000).astype(np.float64)
    m = np.full(2_000, 25.0) * rng.choice([1.0, 1.0001], 2_000)  # everyone spends the same per order
    fit = clv.GammaGamma.fit(x, m)
    assert fit.degenerate
    assert max(fit.p, fit.q) > clv.GammaGamma.DEGENERATE
    healthy = clv.GammaGamma.fit(np.array([1.0, 2.0, 3.0] * 200), rng.gamma(4.0, 10.0, 600))
    assert not healthy.degenerate


def _simulate_bgnbd(n: int, r: float, alpha: float, a: float, b: float, seed: int) -> tuple[np.ndarray, ...]:
    """Customers from the BG/NBD story, each observed for T weeks after the first purchase."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(r, 1 / alpha, n)
    drop = rng.beta(a, b, n)
    T = rng.uniform(20, 80, n)
    x, t_x = np.zeros(n), np.zeros(n)
    alive, t = np.ones(n, dtype=bool), np.zeros(n)  # alive at the first purchase; may leave after each repeat
    while alive.any():
        idx = np.flatnonzero(alive)
        t[idx] += rng.exponential(1 / rate[idx])
        bought = t[idx] < T[idx]
        hit = idx[bought]
        x[hit] += 1
        t_x[hit] = t[hit]
        alive[idx[~bought]] = False
        alive[hit] = rng.random(len(hit)) >= drop[hit]
    return x, t_x, T


def test_bgnbd_recovers_known_parameters() -> None:
    x, t_x, T = _simulate_bgnbd(60_000, r=0.8, alpha=5.0, a=1.2, b=4.0, seed=1)
    fit = clv.BgNbd.fit(x, t_x, T)
    assert fit.r == pytest.approx(0.8, rel=0.08)
    assert fit.alpha == pytest.approx(5.0, rel=0.1)
    assert fit.a == pytest.approx(1.2, rel=0.15)
    assert fit.b == pytest.approx(4.0, rel=0.2)


def test_gamma_gamma_recovers_known_parameters() -> None:
    rng = np.random.default_rng(2)
    n, p, q, gamma = 200_000, 5.0, 4.0, 20.0
    x = rng.integers(1, 12, n).astype(np.float64)
    nu = rng.gamma(q, 1 / gamma, n)
    # The mean of x Gamma(p, ν) values is Gamma(p·x, ν·x).
    m = rng.gamma(p * x, 1 / (nu * x))
    fit = clv.GammaGamma.fit(x, m)
    # p trades off against q and γ (the mean spend pγ/(q−1) is pinned far more tightly than each).
    assert fit.p == pytest.approx(p, rel=0.1)
    assert fit.q == pytest.approx(q, rel=0.1)
    assert fit.gamma == pytest.approx(gamma, rel=0.12)
    assert fit.mean_spend() == pytest.approx(p * gamma / (q - 1), rel=0.02)


def test_the_generators_customers_give_back_the_generators_parameters(textbook: pa.Table) -> None:
    """scripts/generate_crm.py's textbook population draws purchase rates from Gamma(1.5, rate 1/0.12)
    and drop-out probabilities from Beta(0.9, 9): the fit on its release finds them again."""
    s = clv.summarise(Released(textbook).orders)
    fit = clv.BgNbd.fit(s.x, s.t_x, s.T)
    assert fit.r == pytest.approx(1.5, rel=0.2)
    assert fit.alpha == pytest.approx(1 / 0.12, rel=0.2)
    assert fit.a == pytest.approx(0.9, rel=0.25)
    assert fit.b == pytest.approx(9.0, rel=0.3)


def test_lifetime_value_takes_the_margin_and_the_discount_rate(cdnow: Released) -> None:
    released = cdnow
    revenue = clv.analyse(released, Disclosure(10), 52, margin=1.0, discount_rate=0.0)
    profit = clv.analyse(released, Disclosure(10), 52, margin=0.25, discount_rate=0.0)
    discounted = clv.analyse(released, Disclosure(10), 52, margin=1.0, discount_rate=0.2)
    assert (profit["margin"], discounted["discount_rate"]) == (0.25, 0.2)
    assert profit["expected_value_total"] == pytest.approx(0.25 * revenue["expected_value_total"], abs=0.02)
    # Undiscounted, the value is expected purchases × expected spend, customer by customer.
    s = clv.summarise(released.orders)
    model: clv.BgNbd | pareto_nbd.ParetoNbd = clv.BgNbd.fit(s.x, s.t_x, s.T)
    if revenue["purchase_model"] == "pareto_nbd":
        start = tuple(revenue["holdout"]["models"]["pareto_nbd"]["parameters"].values())
        model = pareto_nbd.ParetoNbd.fit(s.x, s.t_x, s.T, start=start)
    spend = clv.GammaGamma.fit(s.x, s.monetary).expected_spend(s.x, s.monetary)
    by_hand = float((model.expected_purchases(52.0, s.x, s.t_x, s.T) * spend).sum())
    assert revenue["expected_value_total"] == pytest.approx(by_hand, rel=1e-4)
    # A year's purchases discounted at 20 %: worth between 1/1.2 and 1/1.2^(1/52) of their face value.
    ratio = discounted["expected_value_total"] / revenue["expected_value_total"]
    assert 1 / 1.2 < ratio < 1.2 ** (-1 / 52)
