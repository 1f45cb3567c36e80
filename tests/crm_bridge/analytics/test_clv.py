"""BG/NBD and Gamma-Gamma: validated on CDNOW against Fader, Hardie and Lee (2005), and on data
simulated from the models with known parameters."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from crm_bridge.analytics import clv
from crm_bridge.analytics.data import Released
from crm_bridge.analytics.privacy import Disclosure
from crm_bridge.release import ReleaseInfo
from ledger.settings import PROJECT_ROOT

CDNOW = PROJECT_ROOT / "tests" / "data" / "cdnow" / "CDNOW_sample.txt"
PURCHASES = "user.behavior.purchase_history"


def _epoch(day: str) -> int:
    return int(datetime.strptime(day, "%Y%m%d").replace(tzinfo=UTC).timestamp())


@pytest.fixture(scope="module")
def cdnow() -> Released:
    """The CDNOW sample as a released table, observed to the end of the papers' 39-week calibration
    period (1997-09-30)."""
    rows = [line.split() for line in CDNOW.read_text().splitlines() if line.strip()]
    info = ReleaseInfo(
        partner="0x" + "00" * 20,
        purpose="analytics.reporting",
        request_id="0x" + "00" * 32,
        columns={"order_ts": PURCHASES, "amount": PURCHASES},
    )
    table = pa.table(
        {
            "did": [f"did:web:cdnow.example:{r[1]}" for r in rows],
            "order_ts": pa.array([_epoch(r[2]) for r in rows]).cast(pa.timestamp("s", tz="UTC")),
            "amount": [float(r[4]) for r in rows],
        }
    ).replace_schema_metadata(info.metadata())
    return Released(table, as_of=_epoch("19971001"))


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


def test_bgnbd_conditional_expectation_is_the_papers_worked_example() -> None:
    published = clv.BgNbd(r=0.243, alpha=4.414, a=0.793, b=2.426, log_likelihood=0.0, customers=0)
    # FHL 2005: a customer with x = 2, t_x = 30.43, T = 38.86 is expected to make 1.226 purchases in 39 weeks.
    expected = published.expected_purchases(39.0, np.array([2.0]), np.array([30.43]), np.array([38.86]))
    assert round(float(expected[0]), 3) == 1.226
    # The probability alive never exceeds 1 and is 1 for a customer with no repeat purchase.
    alive = published.p_alive(np.array([0.0, 2.0, 2.0]), np.array([0.0, 30.43, 5.0]), np.array([38.86] * 3))
    assert alive[0] == 1.0
    assert 0 < alive[2] < alive[1] < 1  # last seen long ago: less likely alive


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


def test_the_report_section_carries_the_fitted_figures(cdnow: Released) -> None:
    section = clv.analyse(cdnow, Disclosure(10), horizon_weeks=39)
    assert section["bgnbd"]["r"] == 0.2426
    assert section["gamma_gamma"]["p"] == 6.25
    assert section["customers"] == 2357
    assert sum(row["customers"] for row in section["distribution"]["rows"]) == 2357
    assert sum(row["customers"] for row in section["p_alive"]["rows"]) + 0 <= 2357
    assert all(row["customers"] >= 10 for row in section["p_alive"]["rows"])


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
