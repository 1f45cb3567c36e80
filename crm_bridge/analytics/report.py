"""The analytics report: every method that the release permits, as `report.json` (every number)
and `report.html` (the same numbers, with plots). A method the release does not permit is listed
with the consent it would need; a method that cannot run on this data (or fails) is listed with its
reason; the others still run."""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from crm_bridge.analytics import chaid, churn, clusters, clv, privacy, rfm, rules
from crm_bridge.analytics.data import Released
from crm_bridge.analytics.errors import AnalyticsError, ColumnMissing, ConsentMissing
from crm_bridge.analytics.privacy import Disclosure
from crm_bridge.analytics.settings import AnalyticsSettings

METHODS = ("rfm", "rules", "clv", "churn", "clusters", "chaid")
# Under Gamma-Gamma a customer's order values vary around their mean with a coefficient of variation
# of 1/sqrt(p); above this p that is under 10 %, far below what real spend shows (CDNOW: p = 6.25, 40 %).
# Such a fit has run to the edge of its parameter space (e.g. identical order values) rather than
# found a spend distribution.
DEGENERATE_P = 100.0

log = logging.getLogger(__name__)


def build(released: Released, settings: AnalyticsSettings, disclosure: Disclosure | None = None) -> dict[str, Any]:
    """Run every method; the report as a JSON-ready dict. (A test passes an auditing `disclosure`.)"""
    disclosure = disclosure or Disclosure(settings.k)
    released, as_of_rule = _settle_as_of(released, settings.k)
    per_customer: dict[str, np.ndarray] = {}  # CLV's values, for CHAID's high-CLV tree (never published)
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "rfm": lambda: rfm.analyse(released, disclosure),
        "rules": lambda: rules.analyse(
            released, disclosure, min_support=settings.min_support, sample=settings.rules_sample
        ),
        "clv": lambda: clv.analyse(
            released,
            disclosure,
            settings.horizon_weeks,
            margin=settings.margin,
            discount_rate=settings.discount_rate,
            values=per_customer,
        ),
        "churn": lambda: churn.analyse(
            released, disclosure, settings.churn_days, active_only=settings.churn_active_only
        ),
        # Segmentation beside RFM: clusters (k-means, k by silhouette) and CHAID trees of lapse and of
        # high CLV (runs after clv, whose values it reads).
        "clusters": lambda: clusters.analyse(released, disclosure),
        "chaid": lambda: chaid.analyse(released, disclosure, settings.churn_days, clv_value=per_customer.get("value")),
    }
    report: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "k": settings.k,
        "currency": settings.currency,
        "time_zone": released.time_zone,
        "release": released.info.model_dump(),
        "refused": [],
        "seconds": {},
    }
    for name, run in runs.items():
        started = time.perf_counter()
        try:
            report[name] = run()
        except ConsentMissing as exc:
            report["refused"].append(
                {"method": exc.method, "purpose": exc.purpose, "attributes": exc.attributes, "reason": str(exc)}
            )
        except ColumnMissing as exc:
            report["refused"].append({"method": exc.method, "purpose": None, "attributes": [], "reason": str(exc)})
        except AnalyticsError as exc:
            report["refused"].append({"method": name, "purpose": None, "attributes": [], "reason": str(exc)})
        except Exception as exc:
            log.exception("analytics method %s failed", name)
            reason = f"{name} failed: {type(exc).__name__}: {exc}"
            report["refused"].append({"method": name, "purpose": None, "attributes": [], "reason": reason})
        report["seconds"][name] = round(time.perf_counter() - started, 2)
    if any(name in report for name in METHODS):
        orders = released.orders
        report["input"] = {
            "orders": len(orders.ts),
            "customers": orders.customers,
            "as_of": _date(orders.as_of),
            "preparation": orders.preparation,
            "as_of_rule": as_of_rule,
        }
    if "clv" in report:
        report["clv"]["caveats"] = [*report["clv"].get("caveats", []), *_clv_caveats(report["clv"])]
    cleaned: dict[str, Any] = finite(report)
    return cleaned


def _clv_caveats(clv_report: dict[str, Any]) -> list[str]:
    """What a reader must know before trusting the fitted spend model."""
    caveats = []
    gg = clv_report.get("gamma_gamma", {})
    p, q = gg.get("p"), gg.get("q")
    if isinstance(p, int | float) and p > DEGENERATE_P:
        caveats.append(
            f"The Gamma-Gamma fit is degenerate (p = {p:g}): it has a customer's order values vary by"
            f" {100 / math.sqrt(p):.1g} % around their mean, so it adds nothing to the observed mean spend;"
            " read its values as those means."
        )
    if isinstance(q, int | float) and q <= 1:
        caveats.append(
            f"The Gamma-Gamma fit has q = {q:g} <= 1: the population's mean spend is undefined, so values"
            " for customers without a repeat purchase are not meaningful."
        )
    return caveats


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None: JSON has no NaN, and a report with a
    bare NaN is not JSON (strict parsers, browsers' JSON.parse, refuse it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _settle_as_of(released: Released, k: int) -> tuple[Released, str]:
    """The release as of a time that dates no single order, and the rule that set it: the analyst's,
    or the end of the last day (else longer period) in which at least k customers ordered."""
    if released.as_of_given:
        return released, "given by the analyst"
    try:
        orders = released.orders
    except Exception:  # each method reports why it cannot read the orders
        return released, "the last order's day"
    found = privacy.as_of(orders.customer, orders.ts, k)
    if found is None:
        return released, "the last order's day (no period has k customers)"
    safe, days = found
    period = "day" if days == 1 else f"{days}-day period (counted from 1970-01-01)"
    rule = f"the end of the last {period} in which at least k = {k} customers ordered; later orders left out"
    return (released if safe >= orders.as_of else released.at(safe)), rule


def render(report: dict[str, Any]) -> dict[str, str]:
    """The report's files: `report.json` (every number) and `report.html` (the same, with plots).
    Writing them is the caller's (the command line writes each atomically)."""
    report = finite(report)
    text = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False)
    return {"report.json": text + "\n", "report.html": render_html(report)}


def _date(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).date().isoformat()


def _number(value: Any) -> str:
    """A number exactly as report.json prints it (so the HTML shows the JSON's figures)."""
    return json.dumps(finite(value), allow_nan=False)


def render_html(report: dict[str, Any]) -> str:
    env = Environment(loader=PackageLoader("crm_bridge.analytics"), autoescape=select_autoescape(["html", "j2"]))
    env.filters["num"] = _number
    env.filters["date"] = _date
    failed: dict[str, str] = {}
    drawn = plots(report, failed)
    return env.get_template("report.html.j2").render(report=report, plots=drawn, failed=failed)


# plots -------------------------------------------------------------------------------------------

# Each chart is drawn by its own function from the report's own (k-anonymous) tables; it returns the
# figure, or None when there is nothing to draw. A table whose every row was withheld (fewer than k
# customers each) gets no chart: the template says so in a sentence instead of drawing empty axes.
Chart = Callable[[dict[str, Any], Any], Any]


def _segments_chart(report: dict[str, Any], plt: Any) -> Any:
    if "rfm" not in report or not report["rfm"]["segments"]["rows"]:
        return None
    rows = report["rfm"]["segments"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh([r["segment"] for r in rows][::-1], [r["customers"] for r in rows][::-1], color="#2b6cb0")
    ax.set_xlabel("customers")
    ax.set_title("Customers per RFM segment")
    return fig


def _heatmap_chart(report: dict[str, Any], plt: Any) -> Any:
    if "rfm" not in report or not report["rfm"]["heatmap"]["rows"]:
        return None
    grid = np.full((5, 5), np.nan)
    for cell in report["rfm"]["heatmap"]["rows"]:
        grid[5 - cell["r"], cell["f"] - 1] = cell["mean_spend"]
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    image = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(5), [str(f) for f in range(1, 6)])
    ax.set_yticks(range(5), [str(r) for r in range(5, 0, -1)])
    ax.set_xlabel("frequency score")
    ax.set_ylabel("recency score")
    ax.set_title("Mean spend by R and F score")
    fig.colorbar(image, ax=ax, label="mean spend")
    return fig


def _rules_chart(report: dict[str, Any], plt: Any) -> Any:
    if "rules" not in report or not report["rules"]["rules"]["rows"]:
        return None
    rows = report["rules"]["rules"]["rows"][:12]
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(rows) + 1))
    labels = [f"{r['antecedents']} → {r['consequents']}" for r in rows][::-1]
    ax.barh(labels, [r["lift"] for r in rows][::-1], color="#2f855a")
    ax.axvline(1.0, color="#444", linewidth=0.8)
    ax.set_xlabel("lift")
    ax.set_title("Top association rules by lift")
    return fig


def _clv_chart(report: dict[str, Any], plt: Any) -> Any:
    if "clv" not in report or not report["clv"]["distribution"]["rows"]:
        return None
    rows = report["clv"]["distribution"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar([str(r["decile"]) for r in rows], [r["mean_value"] for r in rows], color="#805ad5")
    ax.set_xlabel("CLV decile (1 = lowest)")
    ax.set_ylabel(f"mean value, next {report['clv']['horizon_weeks']} weeks")
    ax.set_title("Customer lifetime value by decile")
    return fig


def _holdout_chart(report: dict[str, Any], plt: Any) -> Any:
    holdout = report.get("clv", {}).get("holdout", {})
    if not holdout.get("by_frequency", {}).get("rows"):
        return None
    rows, tracking = holdout["by_frequency"]["rows"], holdout["tracking"]["rows"]
    names = {"bgnbd": "BG/NBD", "pareto_nbd": "Pareto/NBD"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4))
    groups = [r["calibration_purchases"] for r in rows]
    left.plot(groups, [r["actual_mean"] for r in rows], marker="o", color="#1a202c", label="actual")
    for name in holdout["models"]:
        left.plot(groups, [r[f"{name}_mean"] for r in rows], marker=".", linestyle="--", label=names[name])
    left.set_xlabel("purchases in the calibration period")
    left.set_ylabel(f"mean purchases, next {holdout['holdout_weeks']} weeks")
    left.set_title("Holdout: actual and expected")
    left.legend()
    weeks = [t["week"] for t in tracking]
    right.plot(weeks, [t["actual"] for t in tracking], color="#1a202c", label="actual")
    for name in holdout["models"]:
        right.plot(weeks, [t[name] for t in tracking], linestyle="--", label=names[name])
    right.axvline(holdout["calibration_end_week"], color="#666", linewidth=0.8)
    right.set_xlabel("week")
    right.set_ylabel("cumulative repeat purchases")
    right.set_title("Tracking (line: end of calibration)")
    right.legend()
    return fig


def _churn_chart(report: dict[str, Any], plt: Any) -> Any:
    if "churn" not in report or not report["churn"]["gains"]["rows"]:
        return None
    gains = report["churn"]["gains"]["rows"]
    calibration = report["churn"]["calibration"]["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4))
    left.plot(
        [0] + [g["share_targeted_pct"] for g in gains],
        [0] + [g["share_of_churners_pct"] for g in gains],
        marker="o",
        color="#c53030",
        label="model",
    )
    left.plot([0, 100], [0, 100], linestyle="--", color="#666", label="random")
    left.set_xlabel("% of customers targeted (riskiest first)")
    left.set_ylabel("% of churners reached")
    left.set_title("Churn gains curve")
    left.legend()
    right.plot([c["mean_predicted"] for c in calibration], [c["observed_rate"] for c in calibration], marker="o")
    right.plot([0, 1], [0, 1], linestyle="--", color="#666")
    right.set_xlabel("predicted churn probability")
    right.set_ylabel("observed churn rate")
    right.set_title("Calibration (test window)")
    return fig


CHARTS: dict[str, Chart] = {
    "segments": _segments_chart,
    "heatmap": _heatmap_chart,
    "rules": _rules_chart,
    "clv": _clv_chart,
    "holdout": _holdout_chart,
    "churn": _churn_chart,
}


def plots(report: dict[str, Any], failed: dict[str, str] | None = None) -> dict[str, str]:
    """Inline SVG plots (matplotlib, no network), by chart name. A chart that fails to draw is left
    out and its reason, in words, put in `failed`: the page shows that sentence and everything else."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "consent-ledger", "font.size": 9})
    out: dict[str, str] = {}
    for name, chart in CHARTS.items():
        try:
            fig = chart(report, plt)
            if fig is None:
                continue
            buf = io.StringIO()
            fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
            text = buf.getvalue()
            out[name] = text[text.index("<svg") :]
        except Exception as exc:
            log.exception("the %s chart could not be drawn", name)
            if failed is not None:
                failed[name] = _chart_failure(exc)
        finally:
            plt.close("all")  # the chart's figure, drawn or half drawn
    return out


def _chart_failure(exc: Exception) -> str:
    """Why a chart could not be drawn, for a reader: what failed, with the plotting library's words."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"the plotting library stopped with an error while drawing it ({detail})"
