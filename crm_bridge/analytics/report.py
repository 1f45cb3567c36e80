"""The analytics report: every method that the release permits, as `report.json` (every number)
and `report.html` (the same numbers, with plots). A method the release does not permit is listed
with the consent it would need; the others still run."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from crm_bridge.analytics import chaid, churn, clusters, clv, rfm, rules
from crm_bridge.analytics.data import Released
from crm_bridge.analytics.errors import AnalyticsError, ConsentMissing
from crm_bridge.analytics.privacy import Disclosure
from crm_bridge.analytics.settings import AnalyticsSettings

METHODS = ("rfm", "rules", "clv", "churn", "clusters", "chaid")


def build(released: Released, settings: AnalyticsSettings) -> dict[str, Any]:
    """Run every method; the report as a JSON-ready dict."""
    disclosure = Disclosure(settings.k)
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "rfm": lambda: rfm.analyse(released, disclosure),
        "rules": lambda: rules.analyse(
            released, disclosure, min_support=settings.min_support, sample=settings.rules_sample
        ),
        "clv": lambda: clv.analyse(released, disclosure, settings.horizon_weeks),
        "churn": lambda: churn.analyse(released, disclosure, settings.churn_days),
        # Segmentation beside RFM: clusters (k-means, k by silhouette) and a CHAID tree of lapse.
        "clusters": lambda: clusters.analyse(released, disclosure),
        "chaid": lambda: chaid.analyse(released, disclosure, settings.churn_days),
    }
    report: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "k": settings.k,
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
        except AnalyticsError as exc:
            report["refused"].append({"method": name, "purpose": None, "attributes": [], "reason": str(exc)})
        report["seconds"][name] = round(time.perf_counter() - started, 2)
    if any(name in report for name in METHODS):
        orders = released.orders
        report["input"] = {"orders": len(orders.ts), "customers": orders.customers, "as_of": _date(orders.as_of)}
    return report


def render(report: dict[str, Any]) -> dict[str, str]:
    """The report's files: `report.json` (every number) and `report.html` (the same, with plots).
    Writing them is the caller's (the command line writes each atomically)."""
    return {"report.json": json.dumps(report, indent=2, ensure_ascii=False) + "\n", "report.html": render_html(report)}


def _date(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).date().isoformat()


def _number(value: Any) -> str:
    """A number exactly as report.json prints it (so the HTML shows the JSON's figures)."""
    return json.dumps(value)


def render_html(report: dict[str, Any]) -> str:
    env = Environment(loader=PackageLoader("crm_bridge.analytics"), autoescape=select_autoescape(["html", "j2"]))
    env.filters["num"] = _number
    env.filters["date"] = _date
    return env.get_template("report.html.j2").render(report=report, plots=plots(report))


# plots -------------------------------------------------------------------------------------------


def plots(report: dict[str, Any]) -> dict[str, str]:
    """Inline SVG plots (matplotlib, no network), from the report's own (k-anonymous) tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "consent-ledger", "font.size": 9})
    out: dict[str, str] = {}

    def svg(fig: Any) -> str:
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        text = buf.getvalue()
        return text[text.index("<svg") :]

    if "rfm" in report:
        rows = report["rfm"]["segments"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.barh([r["segment"] for r in rows][::-1], [r["customers"] for r in rows][::-1], color="#2b6cb0")
        ax.set_xlabel("customers")
        ax.set_title("Customers per RFM segment")
        out["segments"] = svg(fig)

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
        out["heatmap"] = svg(fig)

    if "rules" in report and report["rules"]["rules"]["rows"]:
        rows = report["rules"]["rules"]["rows"][:12]
        fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(rows) + 1))
        labels = [f"{r['antecedents']} → {r['consequents']}" for r in rows][::-1]
        ax.barh(labels, [r["lift"] for r in rows][::-1], color="#2f855a")
        ax.axvline(1.0, color="#444", linewidth=0.8)
        ax.set_xlabel("lift")
        ax.set_title("Top association rules by lift")
        out["rules"] = svg(fig)

    if "clv" in report:
        rows = report["clv"]["distribution"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([str(r["decile"]) for r in rows], [r["mean_value"] for r in rows], color="#805ad5")
        ax.set_xlabel("CLV decile (1 = lowest)")
        ax.set_ylabel(f"mean value, next {report['clv']['horizon_weeks']} weeks")
        ax.set_title("Customer lifetime value by decile")
        out["clv"] = svg(fig)

    if "churn" in report:
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
        out["churn"] = svg(fig)
    return out
