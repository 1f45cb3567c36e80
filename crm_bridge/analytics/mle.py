"""Maximum likelihood, shared by the purchase and spend models: the fit (scipy's L-BFGS-B on
log-parameters) and the parameters' uncertainty from the observed information."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from crm_bridge.analytics.data import figure
from crm_bridge.analytics.errors import FitFailed


@dataclass(frozen=True)
class Uncertainty:
    """Standard errors and 95 % intervals of fitted parameters, from the inverse Hessian of the
    log-likelihood at the optimum (the observed information). The Hessian is taken in the
    log-parameters the optimiser works in (central differences of the analytic gradient); the
    standard errors are carried to the parameters by the delta method (se(θ) = θ·se(log θ)) and the
    intervals are exp(log θ ± 1.96·se(log θ)), which stay positive like the parameters."""

    se: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    @classmethod
    def at(cls, nll: Any, theta: np.ndarray, n: int) -> Uncertainty:
        k, h = len(theta), 1e-4
        hessian = np.empty((k, k))
        for i in range(k):
            step = np.zeros(k)
            step[i] = h
            hessian[i] = (nll(theta + step)[1] - nll(theta - step)[1]) / (2 * h)
        hessian = n * (hessian + hessian.T) / 2  # nll is per customer
        try:
            variance = np.diag(np.linalg.inv(hessian))
        except np.linalg.LinAlgError:
            variance = np.full(k, np.nan)
        # Not positive definite (a flat or degenerate optimum): no honest interval.
        sd = np.sqrt(np.where(variance > 0, variance, np.nan))
        value = np.exp(theta)
        with np.errstate(over="ignore"):
            return cls(
                se=tuple(float(v) for v in value * sd),
                low=tuple(float(v) for v in np.exp(theta - 1.96 * sd)),
                high=tuple(float(v) for v in np.exp(theta + 1.96 * sd)),
            )

    def table(self, names: tuple[str, ...], values: tuple[float, ...]) -> list[dict[str, Any]]:
        """One row per parameter: estimate, standard error and interval (None where undefined)."""

        def shown(v: float) -> float | None:
            return figure(v) if np.isfinite(v) else None

        return [
            {"parameter": name, "estimate": figure(value), "se": shown(se), "low_95": shown(lo), "high_95": shown(hi)}
            for name, value, se, lo, hi in zip(names, values, self.se, self.low, self.high, strict=True)
        ]


NO_UNCERTAINTY = Uncertainty((), (), ())


def fit(nll: Any, x0: np.ndarray, name: str, n: int) -> tuple[np.ndarray, float, Uncertainty]:
    result = minimize(nll, x0, jac=True, method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9})
    if not np.all(np.isfinite(result.x)) or not (result.success or np.max(np.abs(result.jac)) < 1e-5):
        raise FitFailed(f"{name}: the maximum-likelihood fit did not converge ({result.message})")
    return np.exp(result.x), float(result.fun), Uncertainty.at(nll, result.x, n)
