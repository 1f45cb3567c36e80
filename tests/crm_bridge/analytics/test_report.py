"""The report: report.json holds every number report.html shows; nothing in either describes fewer
than k customers or names one; the command line writes both and says what it refused."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from playwright.sync_api import Browser, expect

from crm_bridge.analytics.data import Released
from crm_bridge.analytics.report import build, render
from crm_bridge.analytics.settings import AnalyticsSettings
from crm_bridge.release import ReleaseInfo
from ledger.files import write_atomically
from ledger.settings import PROJECT_ROOT
from tests.conftest import SHOTS, accessibility_violations
from tests.crm_bridge.analytics.conftest import restrict
from tests.crm_bridge.analytics.releases import purchases


@pytest.fixture(scope="module")
def written(generated: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("report")
    report = build(Released(generated), AnalyticsSettings(k=25, rules_sample=20_000))
    for name, text in render(report).items():
        write_atomically(out / name, text)
    return report, out


def _numbers(value: Any) -> set[float]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int | float):
        return {float(value)}
    if isinstance(value, dict):
        return set().union(*(_numbers(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_numbers(v) for v in value)) if value else set()
    return set()


def _tables(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        found = [value] if "suppressed_rows" in value else []
        return found + [t for v in value.values() for t in _tables(v)]
    if isinstance(value, list):
        return [t for v in value for t in _tables(v)]
    return []


def test_every_method_runs_and_the_json_is_the_report(
    written: tuple[dict[str, Any], Path], generated: pa.Table
) -> None:
    report, out = written
    assert json.loads((out / "report.json").read_text()) == report
    assert report["refused"] == []
    for method in ("rfm", "rules", "clv", "churn", "clusters", "chaid"):
        assert method in report
    # 5,000 generated customers, less the few whose every order was refunded in full (no purchase; a
    # refunded first order often ends a customer, the generator's dissatisfaction).
    assert report["input"]["customers"] == pc.count_distinct(purchases(generated).column("did")).as_py() > 4_900
    assert report["release"]["purpose"] == "analytics.reporting"
    assert report["clv"]["caveats"] == []  # the generator's spend is no degenerate Gamma-Gamma case


def test_no_output_row_describes_fewer_than_k_customers_or_names_one(
    written: tuple[dict[str, Any], Path], generated: pa.Table
) -> None:
    report, out = written
    tables = _tables(report)
    # segments, heat map, rules, CLV deciles, p(alive), holdout by frequency and tracking, churn calibration and
    # gains, clusters, CHAID trees of lapse and of high CLV
    assert len(tables) == 12
    for table in tables:
        assert all(row["customers"] >= report["k"] for row in table["rows"])
    text = (out / "report.json").read_text() + (out / "report.html").read_text()
    assert "did:" not in text
    assert not any(did in text for did in generated.column("did").unique().to_pylist()[:500])


def test_the_html_shows_the_jsons_numbers_and_its_plots(written: tuple[dict[str, Any], Path]) -> None:
    report, out = written
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 6  # segments, RFM heat map, rules, CLV, holdout check, churn
    for caption in ("Customers per RFM segment", "RFM heat map", "Top association rules", "lifetime value", "gains"):
        assert re.search(f"<figcaption>[^<]*{caption}", html), caption
    text = re.sub(r"<svg.*?</svg>", "", html, flags=re.S)
    cells = re.findall(r"<(?:td|dd|span|strong)[^>]*>([^<]*)</", text)
    numeric = [float(c) for c in cells if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", c.strip())]
    assert len(numeric) > 150
    assert set(numeric) <= _numbers(report)
    # The fitted parameters are on the page.
    assert f"<td>{json.dumps(report['clv']['bgnbd']['r'])}</td>" in text
    assert f"<strong>{json.dumps(report['churn']['roc_auc'])}</strong>" in text


@pytest.mark.slow
def test_the_report_reads_well_in_a_browser(written: tuple[dict[str, Any], Path], browser: Browser) -> None:
    _report, out = written
    for name, viewport in (("analytics-report", (1280, 900)), ("analytics-report-phone", (390, 844))):
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        page.goto((out / "report.html").as_uri())
        expect(page.get_by_role("heading", name="Customer analytics report")).to_be_visible()
        for caption in ("Customers per RFM segment", "RFM heat map", "Top association rules", "Churn gains"):
            expect(page.get_by_role("group", name=re.compile(caption))).to_be_visible()
        assert accessibility_violations(page) == []
        # Only a table scrolls sideways, in its own region, never the page (the parameters table,
        # outside such a region, made a phone's page 445 px wide for a 390 px screen).
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport[0]
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
        page.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", "analytics", "report", *args],
        capture_output=True, text=True, timeout=300, check=False, cwd=PROJECT_ROOT,
    )  # fmt: skip


def test_the_command_line_writes_the_report_and_says_what_it_refused(generated: pa.Table, tmp_path: Path) -> None:
    # The basket column released under another category than purchase history (its consent is not
    # the one rules need): everything runs but association rules.
    info = ReleaseInfo.of(generated.schema)
    assert info is not None
    columns = info.columns | {"products": "user.behavior.browsing_history"}
    partial = generated.replace_schema_metadata(info.model_copy(update={"columns": columns}).metadata())
    pq.write_table(partial, tmp_path / "released.parquet")
    done = _cli("--input", str(tmp_path / "released.parquet"), "--out", str(tmp_path / "out"), "--k", "20")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "out" / "report.html"), str(tmp_path / "out" / "report.json")]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["k"] == 20
    assert [r["method"] for r in report["refused"]] == ["association rules"]
    assert report["refused"][0]["attributes"] == ["user.behavior.purchase_history"]
    assert "association rules needs consent" in done.stderr
    assert "association rules needs consent" in (tmp_path / "out" / "report.html").read_text()
    assert {"rfm", "clv", "churn", "clusters", "chaid"} <= set(report)


def test_the_command_line_refuses_what_it_may_not_read(generated: pa.Table, tmp_path: Path) -> None:
    pq.write_table(restrict(generated, purpose="marketing.communications.email"), tmp_path / "other.parquet")
    done = _cli("--input", str(tmp_path / "other.parquet"), "--out", str(tmp_path / "out"))
    assert done.returncode == 1  # nothing ran
    assert done.stderr.count("needs consent for purpose 'analytics.reporting'") == 6
    pq.write_table(generated.replace_schema_metadata(None), tmp_path / "raw.parquet")
    raw = _cli("--input", str(tmp_path / "raw.parquet"), "--out", str(tmp_path / "raw"))
    assert raw.returncode == 2
    assert "release metadata" in raw.stderr
    assert not (tmp_path / "raw").exists()
    bad_k = _cli("--input", str(tmp_path / "other.parquet"), "--out", str(tmp_path / "k"), "--k", "1")
    assert bad_k.returncode == 2
    assert "k" in bad_k.stderr


def test_the_whole_report_runs_on_the_generators_default_data(written: tuple[dict[str, Any], Path]) -> None:
    # The default generated data holds free orders and refunds, as real exports do: every method
    # still runs on it, and the report says how they were read.
    report, out = written
    preparation = report["input"]["preparation"]
    assert preparation["returns"] > 0
    assert preparation["returns_matched"] == preparation["returns"]  # each refund carries its order's id
    assert preparation["refunded_orders"] > 0
    assert preparation["free_orders"] > 0
    assert report["refused"] == []
    assert report["clv"]["gamma_gamma"]["customers"] > 0
    html = (out / "report.html").read_text()
    assert "netted into the order they return" in html
    assert "free order(s) (amount 0) count as purchases worth 0" in html


def test_a_chart_that_cannot_be_drawn_is_a_sentence_and_the_page_goes_on(
    written: tuple[dict[str, Any], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the RFM heat map draws an image: make that fail, as a plotting library's bug would.
    from matplotlib.axes import Axes

    def broken(self: Axes, *args: Any, **kwargs: Any) -> None:
        raise ValueError("cannot convert float NaN to integer")

    monkeypatch.setattr(Axes, "imshow", broken)
    report, _ = written
    html = render(report)["report.html"]
    sentence = re.search(r'<p class="note no-chart">([^<]*)</p>', html)
    assert sentence is not None
    assert sentence.group(1).startswith("RFM heat map: mean spend by recency and frequency score: this chart could not")
    assert "cannot convert float NaN to integer" in sentence.group(1)
    # The rest of the page: the other charts, and every section after the heat map.
    assert html.count("<svg") == 5
    for heading in ("RFM segments", "Association rules", "Customer lifetime value", "Churn risk", "CHAID tree"):
        assert f">{heading}" in html
    assert html.rstrip().endswith("</html>")


def test_shuffling_the_rows_changes_no_figure_of_the_report(
    generated: pa.Table, written: tuple[dict[str, Any], Path]
) -> None:
    # Before: the seeded samples and splits over customers followed the order customers first
    # appeared in the rows: shuffled, the churn model, the clusters (k = 3 became k = 2), the rules'
    # candidate counts and the Pareto/NBD sample changed.
    report, _out = written
    shuffled = generated.take(pa.array(np.random.default_rng(1).permutation(len(generated))))
    again = build(Released(shuffled), AnalyticsSettings(k=25, rules_sample=20_000))
    for changing in ("generated_at", "seconds"):
        del again[changing]
    assert again == {name: value for name, value in report.items() if name not in ("generated_at", "seconds")}
