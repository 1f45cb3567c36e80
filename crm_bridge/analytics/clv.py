"""Customer lifetime value: BG/NBD for repeat purchases and Gamma-Gamma for spend, by maximum likelihood.

BG/NBD (Fader, Hardie and Lee 2005, "Counting Your Customers the Easy Way", Marketing Science 24(2)):
while alive a customer buys at a Poisson rate λ ~ Gamma(r, α) and after each purchase drops out with
probability p ~ Beta(a, b). Gamma-Gamma (Fader, Hardie and Lee 2005, "RFM and CLV", JMR 42(4); Fader
and Hardie's note "The Gamma-Gamma Model of Monetary Value"): a customer's transaction values are
Gamma(p, ν) with ν ~ Gamma(q, γ).

Both are fitted with the closed-form log-likelihoods and their analytic gradients (scipy's L-BFGS-B
on log-parameters). The maintained-library route was weighed: `lifetimes` is archived (no release
since 2020; it pins pandas/numpy APIs that pandas 3 removed) and PyMC-Marketing brings PyMC and
PyTensor, a Bayesian stack far heavier than two likelihoods. Every term that depends only on a
customer's purchase count is computed once per distinct count, so a fit over a million customers
costs a few array passes per iteration. The fits are checked against the published CDNOW estimates
in the tests, and each parameter carries its standard error (`mle.Uncertainty`).

Pareto/NBD (`pareto_nbd`) is fitted beside BG/NBD, and `holdout` checks both on a calibration/holdout
split; the report's lifetime value uses the one that predicted the holdout better. Predictions are
evaluated so that they stay exact for heavy buyers (see `BgNbd._growth`), and value is discounted week
by week at the configured rate.

Time is in weeks; purchases are counted at most once per day (as in the papers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy.special import digamma, expit, gammaln, hyp2f1

from crm_bridge.analytics import holdout, pareto_nbd, privacy
from crm_bridge.analytics.data import DAY, Orders, Released, Requirement, figure, starts_of, tenths
from crm_bridge.analytics.errors import AnalyticsError, FitFailed, TooFewCustomers
from crm_bridge.analytics.mle import NO_UNCERTAINTY, Uncertainty, fit
from crm_bridge.analytics.privacy import Disclosure, Table

WEEK_DAYS = 7.0


@dataclass(frozen=True)
class Summary:
    """Per customer: repeat purchase days x, time of the last t_x and age T (weeks since the first
    purchase day), and the mean value of the repeat purchase days (0 where x = 0)."""

    x: np.ndarray
    t_x: np.ndarray
    T: np.ndarray
    monetary: np.ndarray


def summarise(orders: Orders, end: int | None = None) -> Summary:
    """Each customer's summary as of `end` (seconds; default the orders' `as_of`), from the orders
    before it; a customer without one is summarised with x = 0, T < 0 (callers keep T > 0)."""
    end_ts = orders.as_of if end is None else end
    before = orders.ts < end_ts
    c, amount = orders.customer[before], orders.amount[before]
    day = orders.ts[before] // DAY
    new_day = np.ones(len(c), dtype=bool)
    new_day[1:] = (c[1:] != c[:-1]) | (day[1:] != day[:-1])  # sorted by (customer, time)
    at = np.flatnonzero(new_day)
    day_customer, day_number = c[at], day[at]
    day_value = np.add.reduceat(amount, at) if len(at) else np.zeros(0)
    days = np.bincount(day_customer, minlength=orders.customers)
    first = np.minimum(starts_of(days), max(len(at) - 1, 0))
    last = np.maximum(first + days - 1, 0)
    end_day = end_ts // DAY - 1  # the last day of the observation window
    x = np.maximum(days - 1, 0).astype(np.float64)
    total = np.bincount(day_customer, weights=day_value, minlength=orders.customers)
    first_value = day_value[first] if len(at) else np.zeros(orders.customers)
    first_day = np.where(days > 0, day_number[first] if len(at) else 0, end_day + 1)
    last_day = np.where(days > 0, day_number[last] if len(at) else 0, end_day + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        monetary = np.where(x > 0, (total - first_value) / x, 0.0)
    return Summary(
        x=x,
        t_x=(last_day - first_day) / WEEK_DAYS,
        T=(end_day - first_day) / WEEK_DAYS,
        monetary=monetary,
    )


def _distinct_pairs(x: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (x, T) pairs and, per customer, the index of theirs (a million customers share
    some tens of thousands: purchase days and ages in whole days)."""
    if len(x) == 0:
        return x, T, np.zeros(0, np.int64)
    order = np.lexsort((T, x))
    xs, Ts = x[order], T[order]
    new = np.ones(len(x), dtype=bool)
    new[1:] = (xs[1:] != xs[:-1]) | (Ts[1:] != Ts[:-1])
    inverse = np.empty(len(x), np.int64)
    inverse[order] = np.cumsum(new) - 1
    return xs[new], Ts[new], inverse


@dataclass(frozen=True)
class BgNbd:
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    customers: int
    uncertainty: Uncertainty = NO_UNCERTAINTY
    names: ClassVar[tuple[str, ...]] = ("r", "alpha", "a", "b")

    @property
    def params(self) -> tuple[float, ...]:
        return (self.r, self.alpha, self.a, self.b)

    @classmethod
    def fit(cls, x: np.ndarray, t_x: np.ndarray, T: np.ndarray, *, start: tuple[float, ...] | None = None) -> BgNbd:
        """Maximum likelihood, from `start` if given (a fit of the same customers over another period:
        fewer iterations on a million customers)."""
        n = len(x)
        ux, cnt = np.unique(x, return_counts=True)
        repeat = x > 0
        bx1_safe = np.where(repeat, x - 1, 0.0)

        def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
            r, alpha, a, b = np.exp(theta)
            l_T, l_t = np.log(alpha + T), np.log(alpha + t_x)
            rx = r + x
            ln_a3 = -rx * l_T
            ln_a4 = np.where(repeat, np.log(a) - np.log(b + bx1_safe) - rx * l_t, -np.inf)
            d = np.logaddexp(ln_a3, ln_a4)
            w4 = np.exp(ln_a4 - d)
            w3 = 1.0 - w4
            ll = (
                cnt @ (gammaln(r + ux) + gammaln(b + ux) - gammaln(a + b + ux))
                + n * (gammaln(a + b) - gammaln(r) - gammaln(b) + r * np.log(alpha))
                + d.sum()
            )
            d_r = cnt @ digamma(r + ux) - n * digamma(r) + n * np.log(alpha) - (w3 @ l_T + w4 @ l_t)
            d_alpha = n * r / alpha - rx @ (w3 / (alpha + T) + w4 / (alpha + t_x))
            d_a = n * digamma(a + b) - cnt @ digamma(a + b + ux) + w4.sum() / a
            d_b = (
                n * (digamma(a + b) - digamma(b))
                + cnt @ (digamma(b + ux) - digamma(a + b + ux))
                - (w4 / (b + bx1_safe)) @ repeat
            )
            grad = np.array([d_r, d_alpha, d_a, d_b]) * np.array([r, alpha, a, b])
            return -ll / n, -grad / n

        (r, alpha, a, b), f, uncertainty = fit(nll, np.log(start) if start else np.zeros(4), "BG/NBD", n)
        return cls(float(r), float(alpha), float(a), float(b), -f * n, n, uncertainty)

    def _log_ratio(self, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """log(a/(b+x−1)·((α+T)/(α+t_x))^(r+x)): the log odds that the customer has dropped out
        (−∞ where x = 0: a customer without a repeat purchase has not had the chance)."""
        log_ratio: np.ndarray = np.where(
            x > 0,
            np.log(self.a)
            - np.log(self.b + np.maximum(x - 1, 0))
            + (self.r + x) * (np.log(self.alpha + T) - np.log(self.alpha + t_x)),
            -np.inf,
        )
        return log_ratio

    def p_alive(self, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        alive: np.ndarray = expit(-self._log_ratio(x, t_x, T))
        return alive

    def _growth(self, t: float, x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """E[Y(t) | x, t_x, T] / P(alive): the purchases expected in t weeks of a customer known alive.

        The paper's form (FHL 2005, eq. 10) multiplies ((α+T)/(α+T+t))^(r+x), which underflows for a
        heavy buyer, by 2F1(r+x, b+x; a+b+x−1; z), which overflows (x = 3,000, t = 104: e^±1900), and
        gave 0 for the best customers. Euler's transformation 2F1(A, B; C; z) =
        (1−z)^(C−A−B)·2F1(C−A, C−B; C; z), with 1−z = (α+T)/(α+T+t), cancels the two exactly: the
        product is (1−z)^(a−1)·2F1(a+b−1−r, a−1; a+b+x−1; z), whose numerator parameters are small, so
        the series converges in a few terms for every x.
        """
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        z = t / (alpha + T + t)
        core = 1.0 - (1.0 - z) ** (a - 1.0) * hyp2f1(a + b - 1.0 - r, a - 1.0, a + b + x - 1.0, z)
        growth: np.ndarray = (a + b + x - 1.0) / (a - 1.0) * core
        return growth

    def expected_purchases(self, t: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """E[Y(t) | x, t_x, T]: expected purchases in the next t weeks (FHL 2005, eq. 10), exact for
        any x (see `_growth`), its hypergeometric term computed once per distinct (x, T)."""
        ux, uT, inverse = _distinct_pairs(x, T)
        expected: np.ndarray = self._growth(t, ux, uT)[inverse] * self.p_alive(x, t_x, T)
        return expected

    def discounted_purchases(
        self, weeks: int, annual_rate: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray
    ) -> np.ndarray:
        """Σ_k (E[Y(k)] − E[Y(k−1)]) / (1+d)^(k/52) over weeks k = 1..`weeks`: the purchases expected in
        each future week, discounted to today at the annual rate d (end-of-week convention). Linear in
        the per-(x, T) growth, so the weeks are summed over distinct pairs, not over customers."""
        ux, uT, inverse = _distinct_pairs(x, T)
        total, previous = np.zeros(len(ux)), np.zeros(len(ux))
        for k in range(1, weeks + 1):
            cumulative = self._growth(float(k), ux, uT)
            total += (cumulative - previous) / (1.0 + annual_rate) ** (k / 52.0)
            previous = cumulative
        discounted: np.ndarray = total[inverse] * self.p_alive(x, t_x, T)
        return discounted

    def expected_new_customer(self, t: np.ndarray) -> np.ndarray:
        """E[X(t)] for a customer who made their first purchase t weeks ago (FHL 2005, eq. 7)."""
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        z = t / (alpha + t)
        expected: np.ndarray = (a + b - 1) / (a - 1) * (1 - (alpha / (alpha + t)) ** r * hyp2f1(r, b, a + b - 1, z))
        return expected


@dataclass(frozen=True)
class GammaGamma:
    p: float
    q: float
    gamma: float
    log_likelihood: float
    customers: int
    uncertainty: Uncertainty = NO_UNCERTAINTY
    excluded: int = 0  # repeat customers left out: mean repeat value zero or negative (refunds, free orders)
    names: ClassVar[tuple[str, ...]] = ("p", "q", "gamma")
    # Past this, p or q says the data carried no information on it (a customer's spend would vary by
    # under 1 %: CV = 1/√p); the fitted spend model is then not to be trusted.
    DEGENERATE = 1e4

    @property
    def params(self) -> tuple[float, ...]:
        return (self.p, self.q, self.gamma)

    @property
    def degenerate(self) -> bool:
        """Whether the fit ran off to the edge of the parameter space (p or q beyond `DEGENERATE`, as a
        p of 952,300 did), or has no finite mean spend (q ≤ 1) or no finite standard errors."""
        return (
            max(self.p, self.q) > self.DEGENERATE
            or self.q <= 1
            or not all(np.isfinite(self.uncertainty.se or (np.nan,)))
        )

    @classmethod
    def fit(cls, x: np.ndarray, m: np.ndarray) -> GammaGamma:
        """Fit on customers with at least one repeat purchase (x > 0) and a positive mean repeat value
        m, as the model requires (Gamma-distributed values are positive). Repeat customers whose
        repeat orders net to zero or less (free orders, refunds) are left out of the fit and counted
        in `excluded`; customers without a repeat purchase carry no information on spend variation."""
        keep = (x > 0) & np.isfinite(m) & (m > 0)
        excluded = int(((x > 0) & ~keep).sum())
        x, m = x[keep], m[keep]
        n = len(x)
        if n < 2:
            raise TooFewCustomers(f"Gamma-Gamma spend model: {n} customers with a positive repeat value")
        ux, cnt = np.unique(x, return_counts=True)
        ln_m, sum_x_ln_xm = np.log(m), x @ (np.log(x) + np.log(m))
        sum_ln_m = ln_m.sum()

        def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
            p, q, g = np.exp(theta)
            ln_gmx = np.log(g + m * x)
            pux = p * ux
            ll = (
                cnt @ (gammaln(pux + q) - gammaln(pux))
                - n * gammaln(q)
                + n * q * np.log(g)
                + p * sum_x_ln_xm
                - sum_ln_m
                - (p * x + q) @ ln_gmx
            )
            d_p = cnt @ (ux * (digamma(pux + q) - digamma(pux))) + sum_x_ln_xm - x @ ln_gmx
            d_q = cnt @ digamma(pux + q) - n * digamma(q) + n * np.log(g) - ln_gmx.sum()
            d_g = n * q / g - ((p * x + q) / (g + m * x)).sum()
            grad = np.array([d_p, d_q, d_g]) * np.array([p, q, g])
            return -ll / n, -grad / n

        (p, q, g), f, uncertainty = fit(nll, np.zeros(3), "Gamma-Gamma", n)
        return cls(float(p), float(q), float(g), -f * n, n, uncertainty, excluded)

    def mean_spend(self) -> float:
        """E[M] for a customer with no repeat purchase yet (the population mean)."""
        return self.p * self.gamma / (self.q - 1) if self.q > 1 else float("nan")

    def expected_spend(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        """E[M | x, m]: a customer's expected transaction value (the population mean where x = 0)."""
        # A customer whose repeat orders net to zero or less gets the estimate of one whose mean is 0:
        # the population mean shrunk by their x purchases' evidence of low spend.
        m = np.maximum(np.nan_to_num(m, nan=0.0), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            conditional = self.p * (self.gamma + m * x) / (self.p * x + self.q - 1)
        spend: np.ndarray = np.where(x > 0, conditional, self.mean_spend())
        return spend


def requirement(released: Released) -> Requirement:
    return Requirement("customer lifetime value", (released.fields.timestamp, released.fields.amount))


def analyse(
    released: Released,
    disclosure: Disclosure,
    horizon_weeks: int,
    *,
    margin: float = 1.0,
    discount_rate: float = 0.0,
    pareto_sample: int = pareto_nbd.SAMPLE,
    values: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Lifetime value over `horizon_weeks`: margin × expected spend × each week's expected purchases
    discounted at the annual `discount_rate`. The purchase model is BG/NBD or Pareto/NBD, whichever
    predicted the calibration/holdout split better (`holdout.validate`); both are shown. `values`, if
    given, receives each customer's value (by customer code, under "value"; never published: CHAID's
    high-CLV tree reads it)."""
    released.require(requirement(released))
    orders = released.orders
    s = summarise(orders)
    n = len(s.x)
    disclosure.population("customer lifetime value", n)
    if not np.any(s.x > 0):  # say what is the case, not "0 customers" for the spend model
        raise TooFewCustomers(
            f"customer lifetime value: all {n} customers made their purchases on one purchase day only;"
            " BG/NBD and Gamma-Gamma are fitted on repeat purchases"
        )
    bg = BgNbd.fit(s.x, s.t_x, s.T)
    try:
        validation: dict[str, Any] = holdout.validate(
            orders, disclosure, horizon_weeks, pareto_sample=pareto_sample, start=bg.params
        )
    except AnalyticsError as exc:  # too short a history or too few customers: BG/NBD, unvalidated
        validation = {"error": str(exc), "chosen": "bgnbd"}
    purchase_models: dict[str, BgNbd | pareto_nbd.ParetoNbd] = {"bgnbd": bg}
    pareto_error = None
    try:
        calibrated = validation.get("models", {}).get("pareto_nbd", {}).get("parameters")
        purchase_models["pareto_nbd"] = pareto_nbd.ParetoNbd.fit(
            s.x, s.t_x, s.T, sample=pareto_sample, start=tuple(calibrated.values()) if calibrated else None
        )
    except AnalyticsError as exc:
        pareto_error = str(exc)
    chosen = validation["chosen"] if validation["chosen"] in purchase_models else "bgnbd"
    model = purchase_models[chosen]
    repeat = s.x > 0
    disclosure.population("Gamma-Gamma spend model", int(repeat.sum()))
    gg = GammaGamma.fit(s.x, s.monetary)
    disclosure.population("Gamma-Gamma spend model", gg.customers)
    purchases = model.expected_purchases(float(horizon_weeks), s.x, s.t_x, s.T)
    discounted = model.discounted_purchases(horizon_weeks, discount_rate, s.x, s.t_x, s.T)
    alive = model.p_alive(s.x, s.t_x, s.T)
    value = margin * discounted * gg.expected_spend(s.x, s.monetary)
    if not (np.all(np.isfinite(purchases)) and np.all(np.isfinite(value))):
        raise FitFailed(
            f"customer lifetime value: the {chosen} fit is degenerate ({model.params}): it predicts no finite "
            "purchases or value (purchase histories without drop-out, or a spend model with q <= 1)"
        )

    distribution, p_alive = tables(disclosure, value, purchases, alive)
    if values is not None:
        values["value"] = value
    parameters = [
        {"model": label, **row}
        for label, fitted in (
            ("BG/NBD", bg),
            *((("Pareto/NBD", m) for k, m in purchase_models.items() if k != "bgnbd")),
            ("Gamma-Gamma", gg),
        )
        for row in fitted.uncertainty.table(fitted.names, fitted.params)
    ]
    return {
        "customers": n,
        "repeat_customers": int(repeat.sum()),
        "horizon_weeks": horizon_weeks,
        "margin": margin,
        "discount_rate": discount_rate,
        "purchase_model": chosen,
        "bgnbd": {
            "r": figure(bg.r),
            "alpha": figure(bg.alpha),
            "a": figure(bg.a),
            "b": figure(bg.b),
            "log_likelihood": round(bg.log_likelihood, 1),
        },
        "pareto_nbd": {
            "r": figure(pn.r),
            "alpha": figure(pn.alpha),
            "s": figure(pn.s),
            "beta": figure(pn.beta),
            "log_likelihood": round(pn.log_likelihood, 1),
            "fitted_on_customers": pn.customers,
        }
        if (pn := purchase_models.get("pareto_nbd")) is not None and isinstance(pn, pareto_nbd.ParetoNbd)
        else {"error": pareto_error},
        "gamma_gamma": {
            "p": figure(gg.p),
            "q": figure(gg.q),
            "gamma": figure(gg.gamma),
            "log_likelihood": round(gg.log_likelihood, 1),
            "customers": gg.customers,
            # Left out of the fit, as the model requires (state it): repeat customers whose repeat
            # orders net to zero or less (free orders, refunds).
            "excluded_customers": gg.excluded,
            "degenerate": gg.degenerate,
            # The model assumes spend does not depend on frequency; this says how far that holds.
            "spend_frequency_correlation": figure(float(np.corrcoef(s.x[repeat], s.monetary[repeat])[0, 1]), 3)
            if repeat.sum() > 2
            else 0.0,
        },
        "parameters": parameters,
        "holdout": validation,
        "expected_purchases_total": round(float(purchases.sum()), 1),
        "expected_value_total": round(float(value.sum()), 2),
        "expected_value_mean": round(float(value.mean()), 2),
        "mean_p_alive": figure(float(alive.mean())),
        "distribution": distribution,
        "p_alive": p_alive,
    }


def tables(disclosure: Disclosure, value: np.ndarray, purchases: np.ndarray, alive: np.ndarray) -> tuple[Table, Table]:
    """The published per-group tables: value by decile and expected purchases by P(alive) band.

    Both partition the customers whose totals are published beside them, so their cells are
    suppressed together with the population (`privacy.complementary`). No minimum or maximum is shown:
    each is one customer's value."""
    n = len(value)
    disclosure.record("CLV population", "customers", np.ones(n, dtype=bool), n)
    deciles = tenths(value)  # equal values share a decile: the row order changes none
    size = np.bincount(deciles, minlength=10)
    total = np.bincount(deciles, weights=value, minlength=10)
    distribution = [
        (
            d,
            {
                "decile": d + 1,
                "customers": int(size[d]),
                "mean_value": round(float(total[d] / size[d]), 2),
                "total_value": round(float(total[d]), 2),
            },
        )
        for d in range(10)
        if size[d]
    ]
    shown, _ = privacy.complementary(size, disclosure.k)
    band = np.minimum((alive * 10).astype(np.int64), 9)
    band_size = np.bincount(band, minlength=10)
    band_purchases = np.bincount(band, weights=purchases, minlength=10)
    alive_rows = [
        (
            i,
            {
                "p_alive_from": figure(i / 10),
                "p_alive_to": figure((i + 1) / 10),
                "customers": int(band_size[i]),
                "mean_expected_purchases": figure(band_purchases[i] / band_size[i]),
            },
        )
        for i in range(10)
        if band_size[i]
    ]
    band_shown, _ = privacy.complementary(band_size, disclosure.k)
    return (
        disclosure.cells(
            ["decile", "customers", "mean_value", "total_value"], distribution, shown,
            name="CLV by decile", population="customers", labels=deciles,
        ),
        disclosure.cells(
            ["p_alive_from", "p_alive_to", "customers", "mean_expected_purchases"], alive_rows, band_shown,
            name="CLV by P(alive)", population="customers", labels=band,
        ),
    )  # fmt: skip
