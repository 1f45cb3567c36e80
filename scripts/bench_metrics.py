"""Benchmark: what Prometheus metrics cost a consent change (`CONSENT_LEDGER_METRICS` on against off).

    python scripts/bench_metrics.py             # 3 rounds of 20,000 changes each way
    python scripts/bench_metrics.py --quick     # one small round (CI)

Runs `bench_api`'s batched run (signed changes over HTTP to `serve` with its managed node) with
metrics on and off in alternate order, round after round, so that whatever else the machine does
falls on both alike. Reports per setting the median over rounds of the acknowledged rate and of the
CPU per change in the API workers and in the whole service, and the overhead of metrics as ratios
(on / off - 1). Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_api import run

FIGURES = ("accepted_per_s", "confirmed_per_s", "cpu_ms_api_workers", "cpu_ms_total")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--lanes", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.customers = 1, 1_000, 20
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for round_ in range(args.rounds):
        for setting in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
            figures = run(
                f"metrics-{setting}",
                args.requests,
                args.customers,
                1,
                args.lanes,
                CONSENT_LEDGER_METRICS="true" if setting == "on" else "false",
            )
            if figures["rejected"] or figures["confirmed"] != figures["requests"]:
                raise SystemExit(f"metrics {setting}: not every change was accepted and confirmed: {figures}")
            runs[setting].append(figures)
    result: dict[str, Any] = {"rounds": args.rounds, "requests": args.requests}
    for setting, measured in runs.items():
        for name in FIGURES:
            result[f"{setting}_{name}"] = round(statistics.median(f[name] for f in measured), 3)
    for name in FIGURES:
        result[f"overhead_{name}"] = round(result[f"on_{name}"] / result[f"off_{name}"] - 1, 3)
    print(
        f"metrics on vs off, median of {args.rounds} rounds of {args.requests} changes: acknowledged "
        f"{result['on_accepted_per_s']:,}/s vs {result['off_accepted_per_s']:,}/s; API-worker CPU per change "
        f"{result['on_cpu_ms_api_workers']} vs {result['off_cpu_ms_api_workers']} ms "
        f"({100 * result['overhead_cpu_ms_api_workers']:+.1f} %); whole service "
        f"{result['on_cpu_ms_total']} vs {result['off_cpu_ms_total']} ms "
        f"({100 * result['overhead_cpu_ms_total']:+.1f} %)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
