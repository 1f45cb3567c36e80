"""k-anonymity of outputs: no aggregate row that describes fewer than k customers leaves the module.

Every table a method outputs is built through `Disclosure.table`, which drops each row whose
`customers` count is below k and says how many rows it dropped (never how many customers they held:
a small sum would itself describe fewer than k). A whole method whose population is below k refuses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypedDict

from crm_bridge.analytics.errors import TooFewCustomers

COUNT = "customers"


class Table(TypedDict):
    columns: list[str]
    rows: list[dict[str, Any]]
    suppressed_rows: int


class Disclosure:
    def __init__(self, k: int) -> None:
        if k < 2:
            raise ValueError("k must be at least 2")
        self.k = k

    def table(self, columns: list[str], rows: Iterable[dict[str, Any]]) -> Table:
        """The rows with at least k customers (each row must say how many it describes)."""
        if COUNT not in columns:
            raise ValueError(f"an aggregate table must count its {COUNT!r}")
        kept, dropped = [], 0
        for row in rows:
            if set(row) != set(columns):
                raise ValueError(f"row keys {sorted(row)} differ from the columns {columns}")
            if int(row[COUNT]) >= self.k:
                kept.append(row)
            else:
                dropped += 1
        return Table(columns=columns, rows=kept, suppressed_rows=dropped)

    def population(self, method: str, customers: int) -> None:
        if customers < self.k:
            raise TooFewCustomers(f"{method}: {customers} customers, fewer than k = {self.k}")
