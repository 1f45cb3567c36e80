"""Pareto/NBD (Schmittlein, Morrison and Colombo 1987), beside BG/NBD: while alive a customer buys at a
Poisson rate λ ~ Gamma(r, α) and stays alive for an exponential time of rate μ ~ Gamma(s, β), so a
customer can drop out at any time, not only just after a purchase (BG/NBD's assumption).

The likelihood is Fader and Hardie's form ("A Note on Deriving the Pareto/NBD Model and Related
Expressions", 2005, eqs. 18-22), evaluated in log space: its Gauss hypergeometric terms
2F1(r+s+x, s+1 or r+x; r+s+x+1; z) grow like (1−z)^−(r+x) for heavy buyers, so each is rewritten by
Euler's transformation 2F1(A, B; C; z) = (1−z)^(C−A−B)·2F1(C−A, C−B; C; z) into a power, taken as a
logarithm, times a 2F1 with first parameter 1 that stays below 1/(1−z). The two terms of A0 are then
subtracted as logarithms. On CDNOW the fit gives the published r 0.553, α 10.58, s 0.606, β 11.67 (LL
−9595.0; Fader, Hardie and Lee 2005, "Counting Your Customers the Easy Way", and CLVTools).

Without an analytic gradient (the parameter derivatives of 2F1 have none in scipy) each likelihood
evaluation costs two 2F1 per customer, so on large populations the fit runs on a seeded random
sample of customers (`SAMPLE`; the parameters are population parameters, which a sample of that size
pins to well within their standard errors), and predictions are then made for every customer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, gammaln, hyp2f1

from crm_bridge.analytics.errors import FitFailed
from crm_bridge.analytics.mle import NO_UNCERTAINTY, Uncertainty

SAMPLE = 10_000  # customers the likelihood is maximised on (all, when fewer)


def _log_a0(r: float, alpha: float, s: float, beta: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
    """log A0 (Fader and Hardie 2005, eq. 19/20): the part of the likelihood from dying between t_x and T."""
    rsx = r + s + x
    power: Any
    second: Any
    if alpha >= beta:
        top, gap, power = alpha, alpha - beta, s  # 2F1(rsx, s+1; rsx+1; z) = (1−z)^−s·2F1(1, r+x; rsx+1; z)
        second = r + x
    else:
        top, gap, power = beta, beta - alpha, r + x - 1  # 2F1(rsx, r+x; rsx+1; z) = (1−z)^(1−r−x)·2F1(1, s+1; …)
        second = s + 1.0

    def term(t: np.ndarray) -> np.ndarray:
        z = gap / (top + t)
        out: np.ndarray = -power * np.log1p(-z) + np.log(hyp2f1(1.0, second, rsx + 1.0, z)) - rsx * np.log(top + t)
        return out

    early, late = term(t_x), term(T)  # early ≥ late: A0 is an integral from t_x to T of a positive function
    with np.errstate(divide="ignore"):
        log_a0: np.ndarray = early + np.log1p(-np.exp(np.minimum(late - early, 0.0)))
    return log_a0


def log_likelihood(params: np.ndarray, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Each customer's log-likelihood at params (r, α, s, β)."""
    r, alpha, s, beta = (float(v) for v in params)
    survived = -(r + x) * np.log(alpha + T) - s * np.log(beta + T)
    died = np.log(s) - np.log(r + s + x) + _log_a0(r, alpha, s, beta, x, t_x, T)
    ll: np.ndarray = gammaln(r + x) - gammaln(r) + r * np.log(alpha) + s * np.log(beta) + np.logaddexp(survived, died)
    return ll


@dataclass(frozen=True)
class ParetoNbd:
    r: float
    alpha: float
    s: float
    beta: float
    log_likelihood: float  # on the customers fitted on
    customers: int  # customers fitted on (a sample of `population` when it exceeds SAMPLE)
    population: int
    uncertainty: Uncertainty = NO_UNCERTAINTY
    names: ClassVar[tuple[str, ...]] = ("r", "alpha", "s", "beta")

    @property
    def params(self) -> tuple[float, ...]:
        return (self.r, self.alpha, self.s, self.beta)

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        t_x: np.ndarray,
        T: np.ndarray,
        *,
        sample: int = SAMPLE,
        seed: int = 0,
        start: tuple[float, ...] | None = None,
    ) -> ParetoNbd:
        """Maximum likelihood on (a seeded sample of) the customers, from `start` if given (a fit on
        a shorter period of the same customers: fewer iterations)."""
        population = len(x)
        if population > sample:
            pick = np.sort(np.random.default_rng(seed).choice(population, sample, replace=False))
            x, t_x, T = x[pick], t_x[pick], T[pick]
        n = len(x)

        def nll(theta: np.ndarray) -> float:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                value = -float(log_likelihood(np.exp(theta), x, t_x, T).sum()) / n
            return value if np.isfinite(value) else 1e10

        def nll_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            h = 1e-6
            grad = np.array([(nll(theta + e) - nll(theta - e)) / (2 * h) for e in np.eye(len(theta)) * h])
            return nll(theta), grad

        result: Any = minimize(
            nll_grad,
            np.log(start) if start else np.zeros(4),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 500, "ftol": 1e-14, "gtol": 1e-7},
        )
        if not np.all(np.isfinite(result.x)) or not (result.success or np.max(np.abs(result.jac)) < 1e-5):
            raise FitFailed(f"Pareto/NBD: the maximum-likelihood fit did not converge ({result.message})")
        r, alpha, s, beta = np.exp(result.x)
        uncertainty = Uncertainty.at(nll_grad, result.x, n)
        return cls(float(r), float(alpha), float(s), float(beta), -float(result.fun) * n, n, population, uncertainty)

    def p_alive(self, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """P(alive | x, t_x, T) (Fader and Hardie 2005, eq. 24), as a logistic of log odds."""
        r, alpha, s, beta = self.params
        log_odds_dead = (
            np.log(s)
            - np.log(r + s + x)
            + (r + x) * np.log(alpha + T)
            + s * np.log(beta + T)
            + _log_a0(r, alpha, s, beta, x, t_x, T)
        )
        alive: np.ndarray = expit(-log_odds_dead)
        return alive

    def _growth(self, t: float, x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """E[Y(t)] of a customer known alive (Fader and Hardie 2005, eq. 27 without P(alive))."""
        r, alpha, s, beta = self.params
        if abs(s - 1.0) < 1e-9:  # the limit s → 1
            growth: np.ndarray = (r + x) * (beta + T) / (alpha + T) * np.log((beta + T + t) / (beta + T))
            return growth
        return (r + x) * (beta + T) / ((alpha + T) * (s - 1)) * (1 - ((beta + T) / (beta + T + t)) ** (s - 1))

    def expected_purchases(self, t: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        expected: np.ndarray = self._growth(t, x, T) * self.p_alive(x, t_x, T)
        return expected

    def discounted_purchases(
        self, weeks: int, annual_rate: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray
    ) -> np.ndarray:
        """As `BgNbd.discounted_purchases`: each future week's expected purchases discounted to today."""
        total, previous = np.zeros(len(x)), np.zeros(len(x))
        for k in range(1, weeks + 1):
            cumulative = self._growth(float(k), x, T)
            total += (cumulative - previous) / (1.0 + annual_rate) ** (k / 52.0)
            previous = cumulative
        discounted: np.ndarray = total * self.p_alive(x, t_x, T)
        return discounted

    def expected_new_customer(self, t: np.ndarray) -> np.ndarray:
        """E[X(t)] for a customer who made their first purchase t weeks ago (eq. 17)."""
        r, alpha, s, beta = self.params
        if abs(s - 1.0) < 1e-9:
            expected: np.ndarray = r * beta / alpha * np.log((beta + t) / beta)
            return expected
        return r * beta / (alpha * (s - 1)) * (1 - (beta / (beta + t)) ** (s - 1))
