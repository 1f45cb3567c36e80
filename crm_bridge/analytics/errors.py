"""Analytics errors."""

from __future__ import annotations

from crm_bridge.errors import BridgeError


class AnalyticsError(BridgeError):
    """Root of the analytics module's errors."""


class NotAReleasedTable(AnalyticsError):
    """Raised when the input is not a table the bridge released (no release metadata, or unreadable)."""


class ConsentMissing(AnalyticsError):
    """Raised when a method needs attributes (or a purpose) that the release does not carry."""

    def __init__(self, method: str, purpose: str, attributes: list[str], released_purpose: str) -> None:
        self.method, self.purpose, self.attributes, self.released_purpose = (
            method,
            purpose,
            attributes,
            released_purpose,
        )
        needs = f"purpose {purpose!r}" + (f" with attributes {', '.join(attributes)}" if attributes else "")
        super().__init__(
            f"{method} needs consent for {needs}; the release (for {released_purpose!r}) does not carry it"
        )


class TooFewCustomers(AnalyticsError):
    """Raised when a method's population is smaller than k (its every output would describe fewer)."""


class FitFailed(AnalyticsError):
    """Raised when a model's maximum-likelihood fit does not converge."""


class ColumnMissing(AnalyticsError):
    """Raised when the release carries the category a method reads, but not the column it was told to
    read (a mapping that named it otherwise): the data's shape, not the customers' consent, is at fault."""

    def __init__(self, method: str, columns: list[str], released: list[str]) -> None:
        self.method, self.columns = method, columns
        super().__init__(
            f"{method} needs the column(s) {', '.join(map(repr, columns))}, which the released table does not"
            f" have (it has: {', '.join(released)}); name the right column with --timestamp/--amount/--basket"
        )


class UnreadableColumn(AnalyticsError):
    """Raised when a column's type or values cannot be read as what it should hold (a time, an amount)."""


class NoOrders(AnalyticsError):
    """Raised when the released table holds no usable order (an empty export, or every row withheld)."""
