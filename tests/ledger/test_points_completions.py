"""The indexer's points follower hands the requests it finishes to waiting callers, once committed."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from eth_abi.abi import encode as abi_encode
from eth_account import Account

from ledger.contracts import RevertDecoder
from ledger.points import Completions, PointsFollower, PointsRequest, PointsStatus
from ledger.points.client import REDEEMED
from ledger.store import Base, make_engine, sessions


def _redeemed_log(subject: bytes, partner: str, ref: bytes, amount: int, balance: int) -> dict[str, object]:
    return {
        "topics": [
            REDEEMED,
            "0x" + subject.hex(),
            "0x" + bytes(12).hex() + partner[2:].lower(),
            "0x" + ref.hex(),
        ],
        "data": "0x" + abi_encode(["uint256", "uint256", "uint256"], [amount, balance, 0]).hex(),
        "blockNumber": "0x9",
        "blockHash": "0x" + os.urandom(32).hex(),
        "logIndex": "0x0",
        "transactionHash": "0x" + os.urandom(32).hex(),
    }


def test_a_request_the_indexer_finishes_reaches_its_waiter_after_the_commit(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    Base.metadata.create_all(engine)
    subject, ref, partner = os.urandom(32), os.urandom(32), Account.create().address
    request_id = str(uuid.uuid4())
    with sessions(engine).begin() as session:
        session.add(
            PointsRequest(
                id=request_id, kind="redeem", ref=ref, subject=subject, amount=30, partner=partner,
                principal="acme", status=PointsStatus.SUBMITTED,
            )
        )  # fmt: skip
    completions = Completions()
    follower = PointsFollower(Account.create().address, RevertDecoder([]), completions)
    heard: list[PointsRequest] = []
    log = _redeemed_log(subject, partner, ref, 30, 70)

    def failing_step() -> None:
        with sessions(engine).begin() as session:
            follower.apply(session, [log], {9: 1_700_000_000})
            raise RuntimeError("the indexer's transaction failed")

    # A transaction that does not commit tells nobody.
    completions.subscribe(request_id, heard.append)
    with pytest.raises(RuntimeError):
        failing_step()
    assert heard == []

    with sessions(engine).begin() as session:
        assert follower.apply(session, [log], {9: 1_700_000_000}) == 1
        assert heard == []  # not before the commit
    (row,) = heard
    assert (row.id, row.status, row.balance, row.block_number) == (request_id, PointsStatus.DONE, 70, 9)
    engine.dispose()


def test_a_caller_that_listens_after_its_request_finished_is_told_to_read_it() -> None:
    """An API worker's event loop, busy under load, may resume a request only after its batch was
    mined and settled and the supervisor's news has come and gone: without this, such a caller heard
    nothing until its polling fallback (seconds later: the loyalty benchmark's p99)."""
    completions = Completions()
    waited, late, unknown = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    heard: list[str] = []
    assert completions.subscribe(waited, lambda row: heard.append(row.id)) is False
    assert completions.finished([waited, late]) == [waited]  # news from the supervisor: one waiter here
    assert completions.subscribe(late, lambda row: heard.append(row.id)) is True  # read it, no call will come
    assert completions.subscribe(unknown, lambda row: heard.append(row.id)) is False
    # Finished in this process (one-process service): the same.
    row = PointsRequest(id=str(uuid.uuid4()), kind="redeem", ref=os.urandom(32), subject=os.urandom(32), amount=1)
    completions.notify([row])
    assert completions.subscribe(row.id, lambda row: heard.append(row.id)) is True
    assert heard == []
