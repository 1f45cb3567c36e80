"""The access log's follower: the indexer's part for `AccessLog` (see `ledger.indexer.Follower`), which
writes each logged entry into the read model (`ledger.access.tables`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import delete, insert
from sqlalchemy.orm import Session
from web3 import Web3

from ledger.access.client import RECORDED, decode
from ledger.access.tables import AccessEntry
from ledger.metrics import count_access


class AccessFollower:
    """Indexer follower for `AccessLog` (see `ledger.indexer.Follower`)."""

    def __init__(self, address: str) -> None:
        self.address: str = Web3.to_checksum_address(address)
        self.topics = [RECORDED]

    def prepare(self, logs: Sequence[dict[str, Any]], times: dict[int, int]) -> Callable[[Session], int]:
        """Nothing is made before the write lock: `apply` decodes and writes in the range's transaction."""
        return lambda session: self.apply(session, logs, times)

    def apply(self, session: Session, logs: Sequence[dict[str, Any]], times: dict[int, int]) -> int:
        batches = [b for b in (decode(dict(item)) for item in logs) if b is not None]
        decoded = [e for batch in batches for e in batch.events()]
        if decoded:
            permitted = sum(1 for e in decoded if e.permitted)
            count_access(permitted, len(decoded) - permitted)
            session.execute(
                insert(AccessEntry),
                [
                    {
                        "index": e.index,
                        "subject": e.subject,
                        "partner": e.partner,
                        "purpose": e.purpose,
                        "attributes": str(e.attributes),
                        "request_id": e.request_id,
                        "permitted": e.permitted,
                        "head": e.head,
                        "block_number": e.block_number,
                        "block_hash": e.block_hash,
                        "log_index": e.log_index,
                        "tx_hash": e.tx_hash,
                        "block_time": times[e.block_number],
                    }
                    for e in decoded
                ],
            )
        return len(decoded)

    def rollback(self, session: Session, ancestor: int) -> None:
        session.execute(delete(AccessEntry).where(AccessEntry.block_number > ancestor))
