"""The event indexer: follows its followers' contracts (`ConsentRegistry`, `LoyaltyPoints`, `AccessLog`)
from the deploy block into the read model, every follower's part of a range in one transaction.

Each step asks the node for the range's logs of every followed contract at once (one eth_getLogs,
over no more blocks than the node answers for: `ledger.logs.LogFetcher`), in chunks of whole blocks,
and each follower makes its rows before the write lock is taken (`Follower.prepare`). The indexer
resumes from its cursor after a restart, and tolerates reorganisations up to `reorg_depth` blocks:
before going on it checks that the block it stopped at is still on the chain, and if not it rolls
every follower back to the last block both agree on and re-indexes from there (the consent follower
queues again the requests whose confirming event was rolled back).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session
from web3 import Web3
from web3.types import RPCEndpoint

from ledger.errors import ChainError, LedgerError
from ledger.logs import MAX_LOGS_RANGE, LogFetcher, hex_of, int_of
from ledger.store import IndexedBlock, IndexerCursor, sessions
from ledger.types import checksummed

log = logging.getLogger(__name__)
# The cursor's row (named when the indexer followed ConsentRegistry alone; databases hold that name).
CURSOR = "consent_registry"


class Follower(Protocol):
    """A contract's logs made into the read model. The followers of one indexer are indexed in the same
    pass (one eth_getLogs), written in the same transaction and rolled back with the same
    reorganisation."""

    address: str
    topics: list[str]

    def prepare(self, logs: Sequence[dict[str, Any]], times: dict[int, int]) -> Callable[[Session], int]:
        """Before the write lock: what to write for this contract's logs of a range (decoded, rows made);
        the indexer calls it in the range's transaction, and it returns how many events it applied."""
        ...

    def rollback(self, session: Session, ancestor: int) -> None:
        """Take back what was made from blocks after `ancestor` (in the rollback's transaction)."""
        ...


class Indexer:
    def __init__(
        self,
        w3: Web3,
        engine: Engine,
        deploy_block: int,
        *,
        followers: Sequence[Follower],
        reorg_depth: int = 64,
        chunk: int = MAX_LOGS_RANGE,
        max_events: int = 1_000,
        on_change: Callable[[], None] | None = None,
        on_rollback: Callable[[int], None] | None = None,
    ) -> None:
        if not followers:
            raise ValueError("the indexer needs a contract to follow")  # eth_getLogs of no address: every log
        self.w3 = w3
        self.followers = list(followers)
        self.deploy_block = deploy_block
        self.reorg_depth = reorg_depth
        # Blocks per step: eth_getLogs' range per call (`ChainSettings.max_logs_range`: Besu refuses more
        # than 5,000 by default), halved where the node refuses a range as too large.
        self.log_fetcher = LogFetcher(w3, chunk)
        # Logs applied in one transaction at most (whole blocks; a bigger block alone). Catching up after
        # a pause in one transaction held the write lock, which every request's commit waits on, for
        # a hundred milliseconds and more.
        self.max_events = max_events
        self.on_change = on_change
        self.on_rollback = on_rollback  # told the block rolled back to, after the rollback
        # When the newest step that compared the read model with the chain began (monotonic clock): the
        # relayers wait for one that began after a restart of the node (`BatchLane.node_restarted`).
        self.checked_at = -math.inf
        self._sessions = sessions(engine)
        self.wake = threading.Event()

    # chain access --------------------------------------------------------------------------------

    def _rpc(self, method: str, params: list[Any]) -> Any:
        response = self.w3.provider.make_request(RPCEndpoint(method), params)
        if "error" in response:
            raise ChainError(f"{method}: {response['error']}")
        return response["result"]

    def _block(self, number: int) -> dict[str, Any] | None:
        block = self._rpc("eth_getBlockByNumber", [hex(number), False])
        return dict(block) if block else None

    def _timestamp(self, number: int) -> int:
        block = self._block(number)
        if block is None:
            raise ChainError(f"block {number} vanished while indexing it")
        return int_of(block["timestamp"])

    def _times(self, logs: Sequence[dict[str, Any]]) -> dict[int, int]:
        """The timestamp of each block the logs are from: from the logs themselves where the node
        says (`blockTimestamp`: anvil, geth 1.14+), else asked block by block."""
        times: dict[int, int] = {}
        unstamped: set[int] = set()
        for item in logs:
            number, stamp = int_of(item["blockNumber"]), item.get("blockTimestamp")
            if stamp is None:
                unstamped.add(number)
            else:
                times[number] = int_of(stamp)
        for number in unstamped - times.keys():
            times[number] = self._timestamp(number)
        return times

    def _hash_of(self, number: int) -> str | None:
        block = self._block(number)
        return hex_of(block["hash"]) if block else None

    # state ---------------------------------------------------------------------------------------

    def cursor(self) -> int:
        with self._sessions() as session:
            row = session.get(IndexerCursor, CURSOR)
            return row.block_number if row else self.deploy_block - 1

    def step(self) -> int:
        """Index what is new; returns how many events were applied (negative after a rollback)."""
        began = time.monotonic()
        cursor = self.cursor()
        rolled_back = self._check_reorg(cursor)
        self.checked_at = began  # what is indexed agrees with the chain as it was then (rolled back if not)
        if rolled_back is not None:
            return -rolled_back
        head = int(self._rpc("eth_blockNumber", []), 16)
        if head <= cursor:
            return 0
        to = min(head, cursor + self.log_fetcher.span)  # one eth_getLogs, unless the node refuses so many
        addresses = [Web3.to_checksum_address(f.address) for f in self.followers]
        topics = [t for f in self.followers for t in f.topics]
        logs = self.log_fetcher.fetch({"address": addresses, "topics": [topics]}, cursor + 1, to)
        if len(logs) > self.max_events:
            logs, to = _whole_blocks(logs, self.max_events)
        by_address: dict[str, list[dict[str, Any]]] = {}
        for item in logs:
            by_address.setdefault(checksummed(item["address"]), []).append(dict(item))
        times = self._times(logs)
        to_hash = self._hash_of(to)
        if to_hash is None:
            return 0  # the head moved back under us; the next step sees the reorg
        # Each follower decodes its logs and makes its rows before the write lock; then all write in one transaction.
        writes = [f.prepare(by_address.get(checksummed(f.address), []), times) for f in self.followers]
        try:
            with self._sessions.begin() as session:
                self._still_at(session, cursor)
                applied = sum(write(session) for write in writes)
                self._set_cursor(session, to, to_hash)
        except _CursorMoved as moved:
            log.warning("%s: not indexed again", moved)
            return 0
        if applied and self.on_change is not None:
            self.on_change()
        return applied

    def _still_at(self, session: Session, cursor: int) -> None:
        """Raise _CursorMoved unless the cursor is where this step read it, and hold its row (PostgreSQL:
        FOR UPDATE) until the step commits. One indexer runs at a time, but an instance that has just lost
        the leader lock may finish a step while the next leader's indexer begins (`ledger.leader`):
        the second to write finds the cursor moved and writes nothing, so no event is recorded twice."""
        at = session.scalar(select(IndexerCursor.block_number).where(IndexerCursor.name == CURSOR).with_for_update())
        if at is not None and at != cursor:
            raise _CursorMoved(f"the indexer's cursor moved from {cursor} to {at} under this step")

    def _set_cursor(self, session: Session, number: int, block_hash: str) -> None:
        session.merge(IndexerCursor(name=CURSOR, block_number=number))
        session.merge(IndexedBlock(number=number, hash=block_hash))
        session.execute(delete(IndexedBlock).where(IndexedBlock.number < number - self.reorg_depth))

    # reorganisations ----------------------------------------------------------------------------

    def _check_reorg(self, cursor: int) -> int | None:
        """None when the cursor block is still canonical; else roll back and return the depth."""
        if cursor < self.deploy_block:
            return None
        with self._sessions() as session:
            latest = session.scalar(select(IndexedBlock).order_by(IndexedBlock.number.desc()).limit(1))
        if latest is None or latest.number != cursor:
            return None
        if self._hash_of(cursor) == latest.hash:
            return None  # the common case: one row read, one block asked for
        with self._sessions() as session:
            known = list(session.scalars(select(IndexedBlock).order_by(IndexedBlock.number.desc())))
        ancestor = self.deploy_block - 1
        for block in known[1:]:
            if self._hash_of(block.number) == block.hash:
                ancestor = block.number
                break
        else:
            ancestor = max(self.deploy_block - 1, cursor - self.reorg_depth)
        log.warning("chain reorganised below block %s: rolling the read model back to %s", cursor, ancestor)
        self.rollback(ancestor)
        return cursor - ancestor

    def rollback(self, ancestor: int) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(IndexedBlock).where(IndexedBlock.number > ancestor))
            session.merge(IndexerCursor(name=CURSOR, block_number=ancestor))
            for follower in self.followers:
                follower.rollback(session, ancestor)
        if self.on_rollback is not None:
            self.on_rollback(ancestor)
        if self.on_change is not None:
            self.on_change()

    # running -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, interval: float = 0.05) -> None:
        while not stop.is_set():
            try:
                while self.step() != 0 and not stop.is_set():
                    pass
            except Exception:  # a node hiccup must not kill the indexer; it resumes from its cursor
                log.exception("indexer step failed; retrying")
                stop.wait(1.0)
            self.wake.wait(interval)
            self.wake.clear()


class _CursorMoved(LedgerError):
    """Another indexer moved the cursor while this one read the chain (see `Indexer._still_at`)."""


def _whole_blocks(logs: Sequence[dict[str, Any]], most: int) -> tuple[list[dict[str, Any]], int]:
    """The first blocks' logs, `most` at most unless the first block alone has more, and the last of
    those blocks. `logs` are in chain order, as eth_getLogs returns them."""
    numbers = [int_of(item["blockNumber"]) for item in logs]
    first_left_out = numbers[most]
    last = first_left_out - 1 if first_left_out > numbers[0] else numbers[0]
    return [item for item, number in zip(logs, numbers, strict=True) if number <= last], last
