"""The auditor's verification of the access log: recompute the hash chain from the chain's own events,
compare it with the contract's head and count, and the read model entry by entry with the events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Engine, select
from web3 import Web3

from ledger.access.client import ZERO_HEAD, AccessEvent, AccessLogClient, fetch_batches
from ledger.access.tables import AccessEntry
from ledger.store import IndexerCursor, sessions

DivergenceCode = Literal[
    "chain_link", "chain_head", "chain_count", "missing_in_read_model", "field_mismatch", "extra_in_read_model"
]


@dataclass(frozen=True)
class Divergence:
    index: int
    what: DivergenceCode
    detail: str


@dataclass(frozen=True)
class Verification:
    ok: bool
    block_number: int  # the chain block the check was made at
    chain_count: int
    chain_head: str
    recomputed_head: str
    read_model_count: int
    divergence: Divergence | None


_FIELDS = ("subject", "partner", "purpose", "attributes", "request_id", "permitted", "head", "tx_hash", "block_number")


def _first_field_mismatch(chain: AccessEvent, stored: AccessEvent) -> str | None:
    for name in _FIELDS:
        if getattr(chain, name) != getattr(stored, name):
            return name
    return None


def verify(
    w3: Web3,
    client: AccessLogClient,
    engine: Engine,
    deploy_block: int,
    *,
    indexer_cursor: str = "consent_registry",
) -> Verification:
    """Recompute the hash chain from the chain's events, compare it with the contract's head and
    count, and compare the read model entry by entry; report the first divergence.

    Entries mined after the indexer's cursor are not yet expected in the read model; every entry up
    to it must be there exactly as the chain has it, and nothing more.
    """
    block = int(w3.eth.block_number)
    chain_head, chain_count = client.head(block), client.count(block)
    with sessions(engine)() as session:
        cursor_row = session.get(IndexerCursor, indexer_cursor)
        cursor = cursor_row.block_number if cursor_row else deploy_block - 1
        stored_rows: Iterable[AccessEntry] = session.scalars(select(AccessEntry).order_by(AccessEntry.index))
        stored = iter([row.event() for row in stored_rows])

    head, expected = ZERO_HEAD, 0
    found: list[Divergence] = []  # only the first is reported; later ones follow from it
    read_model_count = 0
    pending = next(stored, None)
    for batch in fetch_batches(w3, client.address, deploy_block, block, logs=client.log_fetcher):
        if found:
            break
        if batch.first_index != expected:
            found.append(Divergence(expected, "chain_link", f"the chain's entry {expected} is missing"))
        elif batch.previous_head != head:
            found.append(
                Divergence(batch.first_index, "chain_link", "the batch's previous head is not the recomputed one")
            )
        events = batch.events()  # each entry's head computed from the batch's previous head
        if not found and (not events or events[-1].head != batch.head):
            found.append(
                Divergence(batch.first_index, "chain_link", "the batch's head is not the one recomputed over it")
            )
        if found:
            break
        head, expected = batch.head, batch.first_index + len(events)
        if batch.block_number > cursor:
            continue  # not indexed yet
        for event in events:
            while pending is not None and pending.index < event.index:
                found.append(
                    Divergence(pending.index, "extra_in_read_model", "the read model has an entry the chain lacks")
                )
                pending = next(stored, None)
            if pending is None or pending.index != event.index:
                found.append(Divergence(event.index, "missing_in_read_model", "the read model lacks this entry"))
                break
            read_model_count += 1
            mismatch = _first_field_mismatch(event, pending)
            if mismatch is not None:
                found.append(Divergence(event.index, "field_mismatch", f"{mismatch} differs from the chain"))
                break
            pending = next(stored, None)
    if pending is not None:
        found.append(Divergence(pending.index, "extra_in_read_model", "the read model has an entry the chain lacks"))
    divergence = found[0] if found else None
    if divergence is None and expected != chain_count:
        divergence = Divergence(
            expected, "chain_count", f"the contract counts {chain_count} entries, the logs {expected}"
        )
    if divergence is None and head != chain_head:
        divergence = Divergence(expected, "chain_head", "the recomputed head is not the contract's head")
    return Verification(
        ok=divergence is None,
        block_number=block,
        chain_count=chain_count,
        chain_head="0x" + chain_head.hex(),
        recomputed_head="0x" + head.hex(),
        read_model_count=read_model_count,
        divergence=divergence,
    )
