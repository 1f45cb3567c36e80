"""Benchmarks run in CI as --quick: they must work end to end and end with one line of JSON.

No speed is asserted here (speed is measured by the scripts, not by timed tests); the script itself
asserts that every grant it relayed was confirmed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from ledger.settings import PROJECT_ROOT


def quick_figures(script: str, timeout: int) -> dict[str, Any]:
    """Run a benchmark with --quick from the project root; its figures are the JSON on its last line."""
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=PROJECT_ROOT,
    )
    # A failure shows what the script said: the exit status alone names no cause.
    assert result.returncode == 0, (
        f"{script} --quick exited {result.returncode}\n--- stdout (end)\n{result.stdout[-3000:]}"
        f"\n--- stderr (end)\n{result.stderr[-6000:]}"
    )
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def check_cpu_figures(figures: dict[str, Any], mode: str) -> None:
    """Every process of the service, and the load generator, used CPU for the requests; the total and
    the bound they give are those parts' sum and what the cores carry at it."""
    parts = {k: v for k, v in figures.items() if k.startswith(f"{mode}_cpu_ms_") and not k.endswith("_total")}
    for role in ("api_workers", "supervisor", "node", "load_generator"):
        assert parts[f"{mode}_cpu_ms_{role}"] > 0
    assert figures[f"{mode}_cpu_ms_total"] == pytest.approx(sum(parts.values()), abs=0.001 * len(parts))
    cores = len(os.sched_getaffinity(0))
    assert figures[f"{mode}_cpu_bound_per_s"] == pytest.approx(cores * 1000 / figures[f"{mode}_cpu_ms_total"], rel=0.01)


@pytest.mark.anvil
def test_bench_consent_quick_reports_its_figures() -> None:
    figures = quick_figures("bench_consent.py", timeout=600)
    assert figures["grants"] == 2000
    assert figures["grants_per_s"] > 0
    assert figures["baseline_grants_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["grants_per_s"] / figures["baseline_grants_per_s"], rel=0.01)
    assert 30_000 < figures["gas_per_grant"] < 90_000


@pytest.mark.anvil
@pytest.mark.slow
def test_bench_api_quick_reports_its_figures() -> None:
    figures = quick_figures("bench_api.py", timeout=900)
    # The timed runs are driven by wrk (C), which `make setup` installs: the Python client cost 3-4x the CPU.
    assert figures["load_generator"] == "wrk"
    for mode in ("batched", "baseline", "batch_route"):
        assert figures[f"{mode}_accepted"] == figures[f"{mode}_requests"]  # every signed change was accepted
        assert figures[f"{mode}_confirmed"] == figures[f"{mode}_accepted"]  # and confirmed on-chain
        assert figures[f"{mode}_rejected"] == 0
        assert figures[f"{mode}_ack_p50_ms"] <= figures[f"{mode}_ack_p99_ms"]
        check_cpu_figures(figures, mode)
    # The ratio is printed to one decimal and computed before its inputs were rounded: allow that rounding.
    assert figures["ratio_confirmed"] == pytest.approx(
        figures["batched_confirmed_per_s"] / figures["baseline_confirmed_per_s"], abs=0.06
    )
    # The HTTP stack alone answers faster than the service, which does real work per request.
    assert figures["http_ceiling_per_s"] > figures["batched_accepted_per_s"]
    # The batch route carries `batch_size` changes per request (the last of a connection's may hold fewer).
    assert figures["batch_route_http_requests"] * figures["batch_size"] >= figures["batch_route_requests"]
    assert figures["batch_route_http_requests"] < figures["batch_route_requests"] / 10
    assert figures["share_of_http_ceiling"] == pytest.approx(
        figures["batched_accepted_per_s"] / figures["http_ceiling_per_s"], abs=0.001
    )


@pytest.mark.anvil
@pytest.mark.slow
def test_bench_loyalty_quick_reports_its_figures() -> None:
    figures = quick_figures("bench_loyalty.py", timeout=900)
    for mode in ("batched", "baseline"):
        assert figures[f"{mode}_redeemed"] == figures[f"{mode}_redemptions"]  # every authorisation was redeemed
        assert figures[f"{mode}_errors"] == 0
        assert figures[f"{mode}_p50_ms"] <= figures[f"{mode}_p99_ms"]
        check_cpu_figures(figures, mode)
    assert figures["ratio"] == pytest.approx(figures["batched_per_s"] / figures["baseline_per_s"], abs=0.06)


@pytest.mark.anvil
@pytest.mark.slow
def test_bench_bridge_quick_reports_its_figures() -> None:
    figures = quick_figures("bench_bridge.py", timeout=900)
    assert figures["rows"] == 40_000
    assert 0 < figures["rows_released"] < figures["rows"]  # the generator's customers do not all consent
    assert figures["access_entries_in_export"] > 0
    assert figures["access_entries_refused"] == 0  # the read model and the chain agree on every consent
    assert figures["peak_rss_mb"] > 0
    assert figures["node_block_ms"] > 0
    assert figures["bridge_runs_seconds"] == [figures["bridge_seconds"]]  # --quick times one run
    # On geth (the default node) each block is on disk once made: the release waits for the last block at
    # most, not for a dump of the whole chain (`--backend anvil`'s wait, which grows with the chain).
    assert figures["backend"] == "geth"
    assert 0 <= figures["checkpoint_wait_s"] < 2
    assert figures["durable_rows_per_s"] == pytest.approx(
        figures["rows"] / (figures["bridge_seconds"] + figures["checkpoint_wait_s"]), rel=0.02
    )
    assert figures["durable_rows_per_s"] <= figures["bridge_rows_per_s"]
    assert figures["rows_ratio"] == pytest.approx(
        figures["bridge_rows_per_s"] / figures["baseline_rows_per_s"], abs=0.06
    )
    assert figures["entries_ratio"] == pytest.approx(
        figures["entries_per_s"] / figures["baseline_entries_per_s"], rel=0.01
    )


@pytest.mark.slow
def test_bench_analytics_quick_reports_its_figures() -> None:
    figures = quick_figures("bench_analytics.py", timeout=900)
    assert figures["orders_20k"] > 100_000
    assert figures["report_seconds_20k"] > 0
    assert figures["peak_rss_mb_20k"] > 0
    assert figures["customers_per_s_20k"] == pytest.approx(20_000 / figures["report_seconds_20k"], rel=0.01)
    assert figures["clv_fit_ratio"] == pytest.approx(
        figures["baseline_clv_fit_seconds"] / figures["clv_fit_seconds"], rel=0.05
    )


@pytest.mark.anvil
@pytest.mark.slow
def test_chaos_points_quick_finds_every_answered_redemption_on_chain_once() -> None:
    """Not a benchmark: `chaos_points.py` kills the managed node under load and checks the chain. A
    smoke check at load; the races it found are pinned by `tests/ledger/test_points_pipeline.py`."""
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "chaos_points.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["node_kills"] == figures["node_restarts"] == 3
    assert figures["redemptions"] == 2400
    assert figures["answered"] + figures["still_pending_answers"] == 2400  # each got an answer
    # ... at once: none waited the 30 s after which a partner is told "still pending". A batch held
    # back behind a nonce the lost blocks had used once stalled every till that long (1 run in 7).
    assert figures["still_pending_answers"] == 0
    for wrong in ("refused", "answered_not_on_chain_once", "applied_twice", "on_chain_not_done"):
        assert figures[wrong] == 0, wrong  # every one valid, so every one applied, once
    assert figures["balance_mismatches"] == 0  # chain, read model and answers agree for every customer


@pytest.mark.geth
@pytest.mark.anvil
@pytest.mark.slow
def test_bench_scale_quick_reports_its_figures() -> None:
    figures = quick_figures("bench_scale.py", timeout=1200)
    assert figures["slots_per_customer"] >= 2  # a binding and a consent, measured with prestateTracer
    for node in ("geth", "anvil"):
        (at_10k,) = figures[node]
        assert at_10k["customers"] == 10_000
        assert at_10k["empty_block_cpu_ms"] > 0
        assert at_10k["empty_block_resolution_ms"] == round(1000 / os.sysconf("SC_CLK_TCK") / 10, 3)  # 10 blocks
        assert at_10k["grants_per_s"] > 0
        assert at_10k["sigkill_acknowledged_txs"] > 0
        # through `serve` on the same chain: every change posted was accepted and confirmed
        assert at_10k["api_changes"] == 400
        assert at_10k["api_rejected"] == 0
        assert at_10k["api_confirmed_per_s"] > 0
    # geth writes each block as it makes it: a SIGKILL right after the receipts loses none of them, and
    # an export's access records are durable when mined; anvil loses what came after its last dump.
    assert figures["geth"][0]["sigkill_lost_txs"] == 0
    assert figures["geth"][0]["durable_wait_s"] < figures["anvil"][0]["durable_wait_s"]
    assert figures["geth_chain_length"]["blocks"] == 2_000
    assert figures["geth_chain_length"]["ratio"] > 0
    assert [at for at, _ in figures["geth_chain_length"]["curve"]] == [0, 1_000]


@pytest.mark.geth
@pytest.mark.slow
def test_soak_quick_reports_its_figures() -> None:
    figures = quick_figures("soak.py", timeout=900)
    assert figures["backend"] == "geth"
    assert figures["rejected"] == 0
    assert figures["first_blocks"] > 0
    assert figures["last_blocks"] > 0
    assert figures["max_clock_lead_s"] <= 2 + 1  # the default lead, and the second a timestamp rounds down


@pytest.mark.geth
@pytest.mark.slow
def test_chaos_quick_kills_the_service_and_the_node_under_load_and_finds_nothing_lost() -> None:
    figures = quick_figures("chaos.py", timeout=1200)
    assert figures["findings"] == []  # the script exits 1 with findings: this names them if it did not
    # Both kinds of fault happened under a load that was acknowledged throughout.
    assert figures["faults_service"] >= 1
    assert figures["faults_node"] >= 1
    assert figures["consents_acknowledged"] > 100
    assert figures["redemptions_acknowledged"] > 100
    assert figures["redemptions_final_200"] >= figures["redemptions_acknowledged"]
    assert figures["exports_done"] >= 1
    assert figures["reads"]["2xx"] > 0
    assert set(figures["flat"]) == {"service_rss_mb", "service_files", "node_rss_mb", "node_files"}


def test_bench_metrics_quick_reports_its_figures() -> None:
    figures = quick_figures("bench_metrics.py", timeout=600)
    for name in ("accepted_per_s", "confirmed_per_s", "cpu_ms_api_workers", "cpu_ms_total"):
        assert figures[f"on_{name}"] > 0
        assert figures[f"off_{name}"] > 0
        # Rounded to 3 decimals from unrounded medians: allow that rounding.
        expected = figures[f"on_{name}"] / figures[f"off_{name}"] - 1
        assert figures[f"overhead_{name}"] == pytest.approx(expected, abs=0.01)
