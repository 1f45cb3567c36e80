"""Inputs as real CRM exports have them (issue 33, items 1, 2, 3 and 8): any temporal type or ISO
string, a business time zone, zero, negative and missing amounts, empty exports; and a report that
loses no method to another's failure and is always valid JSON."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crm_bridge.analytics import churn, clv, report, rfm
from crm_bridge.analytics.data import DAY, Released, dictionary_codes
from crm_bridge.analytics.errors import ColumnMissing, NoOrders, UnreadableColumn
from crm_bridge.analytics.report import build, render
from crm_bridge.analytics.settings import AnalyticsSettings
from crm_bridge.release import ReleaseInfo
from tests.crm_bridge.analytics.test_report import _cli

PURCHASES = "user.behavior.purchase_history"
COLUMNS = {"order_id": PURCHASES, "order_ts": PURCHASES, "amount": PURCHASES, "products": PURCHASES}


def _release(columns: dict[str, pa.Array], *, partner_name: str | None = None) -> pa.Table:
    categories = {c: COLUMNS.get(c, PURCHASES) for c in columns if c != "did"}
    info = ReleaseInfo(
        partner="0x" + "00" * 19 + "01",
        partner_name=partner_name,
        purpose="analytics.reporting",
        request_id="0x" + "00" * 32,
        columns=categories,
    )
    return pa.table(columns).replace_schema_metadata(info.metadata())


def _strict(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as JSON (RFC 8259) and browsers do."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _epoch(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp())


# times ------------------------------------------------------------------------------------------

INSTANTS = ["2022-01-03T10:00:00", "2022-01-05T23:30:00.123", "2022-02-01T00:00:00.999999"]


@pytest.mark.parametrize(
    "column",
    [
        pa.array(np.array(INSTANTS, "datetime64[ns]")),
        pa.array(np.array(INSTANTS, "datetime64[ms]")),
        pa.array(np.array(INSTANTS, "datetime64[us]")).cast(pa.timestamp("us", "UTC")),
        pa.array(np.array(INSTANTS, "datetime64[ns]")).cast(pa.timestamp("ns", "UTC")),
        pa.array(INSTANTS),
        pa.array([t + "Z" for t in INSTANTS]),
        pa.array(["2022-01-03T12:00:00+02:00", "2022-01-06T01:30:00.123+02:00", "2022-01-31T22:00:00.999999-02:00"]),
    ],
    ids=["ns", "ms", "us-utc", "ns-utc", "iso", "iso-z", "iso-offsets"],
)
def test_every_timestamp_type_gives_the_same_seconds(column: pa.Array) -> None:
    # Before: ms/ns refused the whole report ("would lose data"); strings raised a traceback.
    table = _release({"did": pa.array(["a", "a", "a"]), "order_ts": column, "amount": pa.array([1.0, 2.0, 3.0])})
    orders = Released(table).orders
    expected = [_epoch(t[:19]) for t in INSTANTS]
    assert orders.ts.tolist() == expected
    assert orders.as_of == _epoch("2022-02-02")


@pytest.mark.parametrize("kind", [pa.date32(), pa.date64()])
def test_a_date_only_column_is_days_not_seconds(kind: pa.DataType) -> None:
    # Before: date32 was read as seconds since 1970: as_of 1970-01-02, recencies of 0.77 days.
    days = [date(2022, 1, 3), date(2022, 1, 10), date(2022, 1, 3)]
    table = _release(
        {"did": pa.array(["a", "a", "b"]), "order_ts": pa.array(days, kind), "amount": pa.array([5.0, 6.0, 7.0])}
    )
    released = Released(table)
    assert released.orders.as_of == _epoch("2022-01-11")
    scores = rfm.scores(released)
    assert scores.recency_days.tolist() == [1.0, 8.0]  # a: last bought on the 10th; b: on the 3rd


def test_purchase_days_are_counted_in_the_business_time_zone() -> None:
    # 23:30 UTC on 3 January is already 4 January in Berlin, still 3 January in New York.
    ts = pa.array(
        [datetime(2022, 1, 3, 23, 30, tzinfo=UTC), datetime(2022, 1, 1, 12, tzinfo=UTC)], pa.timestamp("s", "UTC")
    )
    table = _release({"did": pa.array(["a", "a"]), "order_ts": ts, "amount": pa.array([1.0, 1.0])})
    assert Released(table).orders.as_of == _epoch("2022-01-04")
    berlin = Released(table, time_zone="Europe/Berlin").orders
    assert berlin.as_of == _epoch("2022-01-05")
    assert (berlin.ts // DAY).tolist() == [_epoch("2022-01-01") // DAY, _epoch("2022-01-04") // DAY]
    new_york = Released(table, time_zone="America/New_York").orders
    assert new_york.as_of == _epoch("2022-01-04")
    assert new_york.ts.tolist()[1] == _epoch("2022-01-03") + 18 * 3600 + 30 * 60  # 18:30 wall clock
    with pytest.raises(ValueError, match="time zone"):
        AnalyticsSettings(time_zone="Mars/Olympus")


def test_text_that_is_no_time_is_refused_with_its_reason() -> None:
    table = _release({"did": pa.array(["a"]), "order_ts": pa.array(["yesterday"]), "amount": pa.array([1.0])})
    with pytest.raises(UnreadableColumn, match=r"'order_ts'.*ISO 8601"):
        _ = Released(table).orders


# empty exports ----------------------------------------------------------------------------------


def test_an_empty_typed_table_and_the_bridges_empty_export_are_refused_plainly(tmp_path: Any) -> None:
    typed = _release(
        {
            "did": pa.array([], pa.string()),
            "order_ts": pa.array([], pa.timestamp("ns")),
            "amount": pa.array([], pa.float64()),
        }
    )
    with pytest.raises(NoOrders, match="no order"):
        _ = Released(typed).orders
    # What `Export._empty_schema` writes when no customer consented: every mapped column typed null.
    info = ReleaseInfo.of(typed.schema)
    assert info is not None
    schema = pa.schema(
        [pa.field("did", pa.string()), *(pa.field(c, pa.null()) for c in ("order_ts", "amount", "products"))],
        metadata=info.model_copy(update={"columns": dict(COLUMNS) | {"order_id": PURCHASES}}).metadata(),
    )
    pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
    done = _cli("--input", str(tmp_path / "empty.parquet"), "--out", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr  # nothing could run: documented exit 1, not 2
    assert "Traceback" not in done.stderr
    assert "Invalid null value" not in done.stderr
    written = _strict((tmp_path / "out" / "report.json").read_text())
    assert [r["method"] for r in written["refused"]] == ["rfm", "rules", "clv", "churn", "clusters", "chaid"]
    for refusal in written["refused"]:
        assert "holds no order" in refusal["reason"], refusal


# amounts ----------------------------------------------------------------------------------------


def test_returns_are_netted_into_their_order_and_free_orders_kept() -> None:
    day = _epoch("2022-03-01")
    table = _release(
        {
            "did": pa.array(["a", "a", "a", "b", "b", "c", "c"]),
            "order_id": pa.array([1, 2, 2, 3, 4, 5, 9]),
            "order_ts": pa.array([day, day + DAY, day + 3 * DAY, day, day + DAY, day, day + DAY], pa.int64()),
            # a: 20, 30 and 30 returned; b: 20 then a free order; c: 50 then a return of an order not released
            "amount": pa.array([20.0, 30.0, -30.0, 20.0, 0.0, 50.0, -10.0]),
        }
    )
    orders = Released(table).orders
    assert orders.counts.tolist() == [1, 2, 1]
    assert orders.amount.tolist() == [20.0, 20.0, 0.0, 50.0]
    assert orders.preparation == {
        "rows": 7,
        "missing_time": 0,
        "missing_amount": 0,
        "returns": 2,
        "returns_matched": 1,  # a's return of order 2
        "returns_unmatched": 1,  # c's return of order 9, which is not in the release
        "refunded_orders": 1,
        "free_orders": 1,
        "orders": 4,
    }
    # The returns are kept as behaviour too (churn reads them): customer and time, matched or not.
    assert orders.return_customer.tolist() == [0, 2]
    assert orders.return_ts.tolist() == [day + 3 * DAY, day + DAY]
    window = churn.window(orders, np.zeros((3, 0)), day + 2 * DAY, 90)
    returns = churn.BEHAVIOUR.index("returns")
    assert window.features[:, returns].tolist() == [0, 0, 1]  # a's return is after the cutoff: unseen
    assert window.features[2, returns + 1] == 1.0  # c's, a day before it
    assert window.features[0, returns + 1] == churn.NO_RETURN_DAYS  # none seen
    # Without an order id a return is netted into the customer's latest earlier paid order.
    no_ids = Released(_release({c: table.column(c) for c in ("did", "order_ts", "amount")})).orders
    assert no_ids.amount.tolist() == [20.0, 20.0, 0.0, 40.0]  # a's 30 is refunded, c's 50 nets 40
    assert no_ids.counts.tolist() == [1, 2, 1]


def test_orders_of_the_same_second_are_read_alike_in_any_row_order() -> None:
    # A purchase and its return in the same second (no order id): whichever row comes first, the
    # return nets into the purchase. Before, the rows' order decided: return first was unmatched.
    day = _epoch("2022-03-01")
    rows: dict[str, list[Any]] = {
        "did": ["a", "a", "b", "b"],
        "order_ts": [day, day, day, day + DAY],
        "amount": [30.0, -30.0, 5.0, 7.0],
    }
    read: list[tuple[list[Any], list[float], dict[str, int]]] = []
    for order in ([0, 1, 2, 3], [1, 0, 3, 2]):
        columns = {c: pa.array([v[i] for i in order]) for c, v in rows.items()}
        orders = Released(_release(columns)).orders
        read.append((orders.dids.to_pylist(), orders.amount.tolist(), orders.preparation))
    assert read[0] == read[1]
    assert read[0][0] == ["b"]  # a's order was returned in full
    assert read[0][2]["returns_matched"] == 1


def test_missing_amounts_are_left_out_and_counted_and_the_json_stays_json() -> None:
    # Before: a NaN amount made the customer's total NaN, ranked highest (M = 5), and wrote a bare NaN.
    rng = np.random.default_rng(3)
    n = 60
    did = [f"c{i}" for i in range(n) for _ in range(3)]
    ts = [_epoch("2022-01-01") + (i % 50) * DAY + j * 7 * DAY for i in range(n) for j in range(3)]
    amount = rng.uniform(10, 100, 3 * n).round(2)
    amount[[0, 1]] = np.nan  # customer c0's first two orders have no amount: only the third counts
    amount[2] = 1.0  # ... and it is the smallest of all
    table = _release({"did": pa.array(did), "order_ts": pa.array(ts, pa.int64()), "amount": pa.array(amount)})
    released = Released(table)
    scores = rfm.scores(released)
    assert scores.monetary[0] == 1.0
    assert scores.m[0] == 1
    assert scores.frequency[0] == 1.0
    assert released.orders.preparation["missing_amount"] == 2
    built = build(released, AnalyticsSettings(k=5))
    text = render(built)["report.json"]
    assert _strict(text) == built
    assert built["input"]["preparation"]["missing_amount"] == 2
    assert "2 order(s) without an amount" in render(built)["report.html"]


def test_a_report_holding_nan_is_written_as_valid_json() -> None:
    nan_report = {"k": 10, "figure": float("nan"), "rows": [{"x": float("inf")}], "release": {}}
    assert _strict(json.dumps(report.finite(nan_report), allow_nan=False)) == {
        "k": 10,
        "figure": None,
        "rows": [{"x": None}],
        "release": {},
    }


def test_a_missing_amount_column_is_reported_as_missing_not_as_missing_consent(generated: pa.Table) -> None:
    info = ReleaseInfo.of(generated.schema)
    assert info is not None
    columns = {("total" if c == "amount" else c): k for c, k in info.columns.items()}  # the mapping said "total"
    renamed = generated.rename_columns(["total" if c == "amount" else c for c in generated.column_names])
    released = Released(renamed.replace_schema_metadata(info.model_copy(update={"columns": columns}).metadata()))
    with pytest.raises(ColumnMissing, match="'amount'") as missing:
        rfm.scores(released)
    assert "consent" not in str(missing.value)
    assert "total" in str(missing.value)
    built = build(released, AnalyticsSettings(k=25, rules_sample=20_000))
    assert [r["method"] for r in built["refused"]] == [
        "RFM segmentation", "association rules", "customer lifetime value", "churn risk", "cluster analysis",
        "CHAID segmentation",
    ]  # fmt: skip
    assert all("'amount'" in r["reason"] and "consent" not in r["reason"] for r in built["refused"]), built["refused"]


# one method's failure ---------------------------------------------------------------------------


def _repeat_release(second: list[float], customers: int = 300) -> Released:
    """Customers over two years (seeded), each with a first order, a second worth
    `second[i % len(second)]` and, for a third of them, later orders worth the first; and a basket."""
    rng = np.random.default_rng(7)
    start = _epoch("2021-01-01")
    rows = []
    for i in range(customers):
        first = start + int(rng.integers(0, 500)) * DAY
        value = float(20 + i % 37)
        rows.append((f"c{i}", first, value))
        rows.append((f"c{i}", first + int(rng.integers(5, 120)) * DAY, second[i % len(second)]))
        for _ in range(int(rng.integers(0, 6)) if i % 3 == 0 else 0):
            rows.append((f"c{i}", first + int(rng.integers(10, 720)) * DAY, value))
    did, ts, amount = zip(*rows, strict=True)
    return Released(
        _release(
            {
                "did": pa.array(did),
                "order_id": pa.array(range(len(rows))),
                "order_ts": pa.array(ts, pa.int64()),
                "amount": pa.array(amount),
                "products": pa.array(["p1;p2" if j % 2 else "p1" for j in range(len(rows))]),
            }
        )
    )


def test_a_zero_value_or_refunded_repeat_order_costs_no_other_method(generated: pa.Table) -> None:
    # The cases: one customer's repeat order is 0.00 (20.00 then 0.00); another buys 30 more
    # and returns it (20, 30, -30). Before: GammaGamma.fit raised ValueError, which build() did not
    # catch: exit 2, RFM, rules and churn lost with it.
    codes = dictionary_codes(generated.column("did"))[0]
    amount = generated.column("amount").to_numpy().copy()
    # Customers with one or two paid orders, none free or refunded (the generator makes some of both).
    counts = np.bincount(codes) * (np.bincount(codes, weights=amount <= 0) == 0)
    twice, once = np.flatnonzero(counts == 2)[0], np.flatnonzero(counts == 1)[0]
    ts = generated.column("order_ts").cast(pa.int64()).to_numpy()
    rows = np.flatnonzero(codes == twice)
    amount[rows[np.argmax(ts[rows])]] = 0.0
    table = generated.set_column(generated.schema.get_field_index("amount"), "amount", pa.array(amount))
    row = int(np.flatnonzero(codes == once)[0])
    bought = table.slice(row, 1).to_pydict() | {"order_id": [10**9], "amount": [30.0]}
    returned = bought | {"amount": [-30.0]}
    extra = pa.Table.from_pydict(bought | {}, schema=table.schema)
    table = pa.concat_tables([table, extra, pa.Table.from_pydict(returned, schema=table.schema)])
    released = Released(table)
    before = Released(generated).orders.preparation
    assert released.orders.preparation["refunded_orders"] == before["refunded_orders"] + 1
    assert released.orders.preparation["free_orders"] == before["free_orders"] + 1
    built = build(released, AnalyticsSettings(k=25, rules_sample=20_000))
    assert {"rfm", "rules", "churn", "clusters"} <= set(built)
    if "clv" not in built:  # how Gamma-Gamma treats a zero mean spend is the model's to decide
        (refusal,) = built["refused"]
        assert "Gamma-Gamma" in refusal["reason"]


def test_any_failure_of_one_method_is_reported_and_the_others_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any, **_settings: Any) -> dict[str, Any]:
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(clv, "analyse", broken)
    built = build(_repeat_release([25.0, 30.0]), AnalyticsSettings(k=5, rules_sample=1_000))
    # (CHAID is refused too: this release carries no demographic or location column.)
    assert [r for r in built["refused"] if r["method"] != "CHAID segmentation"] == [
        {
            "method": "clv",
            "purpose": None,
            "attributes": [],
            "reason": "clv failed: ZeroDivisionError: float division by zero",
        }
    ]
    assert {"rfm", "rules", "churn", "clusters"} <= set(built)


def test_all_customers_with_one_order_is_said_as_such() -> None:
    day = _epoch("2022-01-01")
    table = _release(
        {
            "did": pa.array([f"c{i}" for i in range(30)]),
            "order_ts": pa.array([day + i * DAY for i in range(30)], pa.int64()),
            "amount": pa.array([10.0 + i for i in range(30)]),
        }
    )
    built = build(Released(table), AnalyticsSettings(k=5))
    (refusal,) = [r for r in built["refused"] if r["method"] == "clv"]
    assert not re.search(r"\b0 customers", refusal["reason"])
    # All the customers analysed (the analysis date dates no single order, so the last days' few are
    # left out: see privacy.as_of), not "0 customers, fewer than k".
    assert f"all {built['input']['customers']} customers" in refusal["reason"]
    assert built["input"]["customers"] >= 25
    assert "one purchase day" in refusal["reason"]
    assert "rfm" in built


def test_a_history_shorter_than_the_churn_windows_is_said_as_such() -> None:
    # 60 customers, two orders each, all within 60 days: churn needs a training and a test window of
    # 90 days each before the analysis date, CHAID customers known 90 days before it. Before: both
    # said "0 customers, fewer than k = 5", as if the customers were too few.
    day = _epoch("2022-01-01")
    table = _release(
        {
            "did": pa.array([f"c{i}" for i in range(60) for _ in range(2)]),
            "order_ts": pa.array([day + (i % 30 + 30 * j) * DAY for i in range(60) for j in range(2)], pa.int64()),
            "amount": pa.array([10.0 + i % 7 for i in range(120)]),
            "age_band": pa.array(["18-24" if i % 3 else "65+" for i in range(120)]),
        }
    )
    info = ReleaseInfo.of(table.schema)
    assert info is not None
    columns = info.columns | {"age_band": "user.demographic"}
    table = table.replace_schema_metadata(info.model_copy(update={"columns": columns}).metadata())
    built = build(Released(table), AnalyticsSettings(k=5, churn_days=90))
    reasons = {r["method"]: r["reason"] for r in built["refused"]}
    assert "0 customers" not in reasons["churn"], reasons
    assert "0 customers" not in reasons["chaid"], reasons
    # (A bound, not the span: the first order's day is one customer's.)
    assert "fewer than twice 90 = 180 days of orders before the analysis date" in reasons["churn"]
    assert "fewer than 90 days of orders before the analysis date" in reasons["chaid"]
    assert "rfm" in built


def test_a_degenerate_gamma_gamma_fit_is_shown_with_a_caveat(generated: pa.Table) -> None:
    # Every order is worth the same: no spread around any mean, p runs off (the case: p = 952,300
    # shown without a caveat).
    same = generated.set_column(
        generated.schema.get_field_index("amount"), "amount", pa.array(np.full(len(generated), 20.0))
    )
    built = build(Released(same), AnalyticsSettings(k=25, rules_sample=20_000))
    assert "clv" in built, built["refused"]
    assert built["clv"]["gamma_gamma"]["p"] > report.DEGENERATE_P
    (caveat,) = built["clv"]["caveats"]
    assert "degenerate" in caveat
    assert re.search(r'class="caveat">The Gamma-Gamma fit is degenerate', render(built)["report.html"])


# the page ---------------------------------------------------------------------------------------


def test_the_report_names_the_partner_the_currency_and_the_time_zone() -> None:
    base = _repeat_release([25.0, 30.0])
    table = _release({c: base._column(c).combine_chunks() for c in base.schema.names}, partner_name="Acme Retail")
    html = render(build(Released(table, time_zone="Europe/Berlin"), AnalyticsSettings(k=5, currency="CHF")))[
        "report.html"
    ]
    assert re.search(r"<dt>Released to</dt><dd>Acme Retail\s", html)
    assert "in CHF; days counted in the Europe/Berlin time zone" in html
    unnamed = render(build(base, AnalyticsSettings(k=5)))["report.html"]
    assert re.search(r"<dt>Released to</dt><dd><code>0x0+1</code>", unnamed)


def test_a_chart_whose_every_cell_is_withheld_is_a_sentence(generated: pa.Table) -> None:
    built = build(Released(generated), AnalyticsSettings(k=600, rules_sample=20_000))
    assert built["rfm"]["heatmap"]["rows"] == []
    assert built["rfm"]["heatmap"]["suppressed_rows"] > 0
    html = render(built)["report.html"]
    assert "RFM heat map: mean spend by recency and frequency score: no chart" in html
    assert 'aria-label="RFM heat map' not in html
    assert 'aria-label="Customers per RFM segment' in html  # its segments table kept rows: drawn
