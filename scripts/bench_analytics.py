"""Benchmark: the full analytics report (RFM, association rules, BG/NBD + Gamma-Gamma lifetime value,
churn model, HTML + JSON) on released data of 100,000 and 1,000,000 customers.

For each size the generator's customers (about ten orders each, four years, with free orders and
refunds: the generator's defaults) are written as the bridge would release them
(`generate_crm.released`: every customer consenting; the bridge itself is measured by
bench_bridge.py), then `consent-ledger analytics report` runs in a fresh process:
its wall time (imports included) and peak memory (VmHWM) are the figures. Target: 1,000,000
customers in at most 120 s and 4 GB.

Baseline, in the same run on the smaller size: the lifetime-value fit done the textbook way (pandas
group-by for the per-customer summary, then Nelder-Mead on the per-customer likelihood), against
ours (array passes over the sorted orders, L-BFGS-B with the analytic gradient over distinct
purchase counts); both reach the same parameters.

Usage: python scripts/bench_analytics.py [--quick] [--customers N,N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy.optimize import minimize
from scipy.special import betaln, gammaln

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crm_bridge.analytics import clv
from crm_bridge.analytics.data import Released
from scripts import generate_crm

PROJECT = Path(__file__).resolve().parent.parent


def write_release(customers: int, path: Path) -> int:
    writer: pq.ParquetWriter | None = None
    rows = 0
    try:
        for block in generate_crm.released(customers, seed=7):
            if writer is None:
                writer = pq.ParquetWriter(path, block.schema, compression="zstd")
            writer.write_table(block)
            rows += block.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


CHILD = """
import json, sys, time
started = time.perf_counter()
from api.cli import main
code = main(["analytics", "report", "--input", sys.argv[1], "--out", sys.argv[2]])
seconds = time.perf_counter() - started
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({"code": code, "seconds": seconds, "peak_rss_mb": peak}))
"""


def run_report(release: Path, out: Path) -> dict[str, float]:
    """The report command in a fresh process (its peak memory is the report's alone)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(release), str(out)],
        capture_output=True, text=True, check=True, cwd=PROJECT, timeout=3600,
    )  # fmt: skip
    wall = time.perf_counter() - started
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    if figures["code"] != 0:
        raise SystemExit(f"the report failed: {done.stderr}")
    figures["wall_seconds"] = wall
    return figures


def baseline_clv(release: Path) -> tuple[float, tuple[float, ...]]:
    """Per-customer summary with pandas group-by, and Nelder-Mead on the per-customer likelihood.
    Returns are netted into their order first, as ours does (a refund is a later row with the order's
    id and a negative amount; an order refunded in full is no purchase, a free order is one)."""
    frame = pq.read_table(release, columns=["did", "order_id", "order_ts", "amount"]).to_pandas()
    started = time.perf_counter()
    refunds = frame[frame["amount"] < 0].groupby("order_id")["amount"].sum()
    frame = frame[frame["amount"] >= 0]
    net = frame["amount"] + frame["order_id"].map(refunds).fillna(0.0)
    frame = frame[(frame["amount"] == 0) | (net > 0)]
    frame["day"] = frame["order_ts"].dt.floor("D")
    daily = frame.groupby(["did", "day"], as_index=False)["amount"].sum()
    per = daily.groupby("did")["day"].agg(["min", "max", "size"])
    end = daily["day"].max()
    x = (per["size"] - 1).to_numpy(np.float64)
    t_x = ((per["max"] - per["min"]).dt.days / 7).to_numpy()
    age = ((end - per["min"]).dt.days / 7).to_numpy()

    def nll(theta: np.ndarray) -> float:
        r, alpha, a, b = np.exp(theta)
        a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
        a2 = betaln(a, b + x) - betaln(a, b)
        a3 = -(r + x) * np.log(alpha + age)
        with np.errstate(divide="ignore", invalid="ignore"):
            a4 = np.where(x > 0, np.log(a) - np.log(b + x - 1) - (r + x) * np.log(alpha + t_x), -np.inf)
        return float(-(a1 + a2 + np.logaddexp(a3, a4)).sum() / len(x))

    result = minimize(nll, np.zeros(4), method="Nelder-Mead", options={"maxiter": 4000, "xatol": 1e-6, "fatol": 1e-10})
    return time.perf_counter() - started, tuple(float(v) for v in np.exp(result.x))


def ours_clv(release: Path) -> tuple[float, tuple[float, ...]]:
    released = Released(release)
    started = time.perf_counter()
    s = clv.summarise(released.orders)
    fit = clv.BgNbd.fit(s.x, s.t_x, s.T)
    return time.perf_counter() - started, (fit.r, fit.alpha, fit.a, fit.b)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run (CI): 20,000 customers")
    parser.add_argument("--customers", help="comma-separated sizes (default 100000,1000000)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.customers or ("20000" if args.quick else "100000,1000000")).split(",")]
    figures: dict[str, float | int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-analytics-") as tmp:
        for customers in sizes:
            release = Path(tmp) / f"released-{customers}.parquet"
            started = time.perf_counter()
            orders = write_release(customers, release)
            print(f"{customers:,} customers: {orders:,} orders generated in {time.perf_counter() - started:.0f} s")
            report = run_report(release, Path(tmp) / f"report-{customers}")
            payload = json.loads((Path(tmp) / f"report-{customers}" / "report.json").read_text())
            print(
                f"  report: {report['wall_seconds']:.1f} s wall ({report['seconds']:.1f} s in the command), "
                f"peak {report['peak_rss_mb']:,.0f} MB; stages {payload['seconds']}; refused {payload['refused']}"
            )
            key = f"{customers // 1000}k"
            figures[f"orders_{key}"] = orders
            figures[f"report_seconds_{key}"] = round(report["wall_seconds"], 2)  # 0.1 s steps: 1.2 % of a 4 s run
            figures[f"peak_rss_mb_{key}"] = round(report["peak_rss_mb"])
            figures[f"customers_per_s_{key}"] = round(customers / report["wall_seconds"])
            if customers == sizes[0]:
                base_s, base_fit = baseline_clv(release)
                our_s, our_fit = ours_clv(release)
                print(
                    f"  CLV summary + BG/NBD fit: ours {our_s:.2f} s {np.round(our_fit, 3).tolist()}, "
                    f"baseline (pandas group-by + Nelder-Mead) {base_s:.2f} s {np.round(base_fit, 3).tolist()}"
                )
                if not np.allclose(our_fit, base_fit, rtol=0.02):
                    raise SystemExit("the baseline and ours disagree on the fit")
                figures["clv_fit_seconds"] = round(our_s, 2)
                figures["baseline_clv_fit_seconds"] = round(base_s, 2)
                figures["clv_fit_ratio"] = round(base_s / our_s, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
