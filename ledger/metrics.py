"""Counters of the ledger's domain events, counted where they happen (Prometheus, `prometheus_client`).

Events happen in different processes of `serve`: a consent change is accepted by whichever API worker
served it, confirmed by the supervisor's indexer, failed by its relayer. Each process counts its own;
with `PROMETHEUS_MULTIPROC_DIR` set before the process creates a metric (`api.observability`
arranges it for `serve`), each process's values live in files there and `/metrics` sums them over every
process, living or dead. Without it (tests in one process, tools) they are counted in memory.

A count is made after the statement that changed the rows, inside the transaction: a transaction that
then rolls back (an error, retried) would have counted its rows once more. Rare, and a counter that
errs by a few is still the rate an operator watches; exact figures are in the database.

What is a state rather than an event (backlogs, liabilities, lag) is not counted here: `/metrics`
reads it from the database and the node when it is scraped.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from prometheus_client import Counter

CONSENT_CHANGES = Counter(
    "consent_ledger_consent_changes",
    "Consent changes by outcome: accepted (202, stored durably), confirmed (its event indexed), failed "
    "(the chain refused it)",
    ["outcome"],
)
ACCESS_ENTRIES = Counter(
    "consent_ledger_access_entries",
    "Data accesses recorded on-chain (AccessLog), by decision: permitted or denied",
    ["decision"],
)


@cache  # made when first counted, not at import: `serve` sets the multiprocess directory before that
def _consent(outcome: str) -> Any:
    return CONSENT_CHANGES.labels(outcome=outcome)


def count_consent(outcome: str, n: int = 1) -> None:
    if n > 0:
        _consent(outcome).inc(n)


def count_access(permitted: int, denied: int) -> None:
    if permitted:
        ACCESS_ENTRIES.labels(decision="permitted").inc(permitted)
    if denied:
        ACCESS_ENTRIES.labels(decision="denied").inc(denied)
