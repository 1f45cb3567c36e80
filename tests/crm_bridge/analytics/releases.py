"""Small released tables for the analytics tests, built as `bridge export` would label them."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from crm_bridge.analytics.data import Released
from crm_bridge.release import ReleaseInfo

PURCHASES = "user.behavior.purchase_history"
DEMOGRAPHIC = "user.demographic"


def released(
    columns: dict[str, Any], categories: dict[str, str] | None = None, *, as_of: int | None = None
) -> Released:
    """`columns` (a `did` column, `order_ts` in unix seconds, and others) as a table released for
    `analytics.reporting`, each column under its attribute category (`order_ts` and `amount`: purchase
    history unless `categories` says otherwise); columns not named there are present but not released."""
    released_columns = {"order_ts": PURCHASES, "amount": PURCHASES, **(categories or {})}
    info = ReleaseInfo(
        partner="0x" + "00" * 20,
        purpose="analytics.reporting",
        request_id="0x" + "00" * 32,
        columns=released_columns,
    )
    data = {**columns, "order_ts": pa.array(columns["order_ts"], pa.int64()).cast(pa.timestamp("s", tz="UTC"))}
    return Released(pa.table(data).replace_schema_metadata(info.metadata()), as_of=as_of)


def purchases(table: pa.Table) -> pa.Table:
    """The purchase rows of a generated release, worked out independently of `Released` (pandas): a
    refund is a later row with its order's id and a negative amount; an order refunded in full is no
    purchase, a free order (0.00) is one. (The generator makes both unless told not to.)"""
    frame = table.select(["did", "order_id", "amount"]).to_pandas()
    refunded = frame[frame["amount"] < 0].groupby("order_id")["amount"].sum()
    net = frame["amount"] + frame["order_id"].map(refunded).fillna(0.0)
    keep = (frame["amount"] >= 0) & ((frame["amount"] == 0) | (net > 0))
    return table.filter(pa.array(keep.to_numpy()))
