"""Points requests → relayer → chain → indexer → read model, on a real anvil node and a real SQLite file,
when the chain loses blocks: after a reorganisation, or a node crash before the block was written.

A redemption the partner was answered for (on-chain, its balance) that the chain then loses is applied
again, once, in its order after the issuance that funds it; the read model follows the chain."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak
from sqlalchemy import Engine, select

from ledger import eip712
from ledger.backends import AnvilBackend
from ledger.compiler import Artifact
from ledger.consent import ConsentFollower, ConsentRegistryClient
from ledger.contracts import ledger_plan
from ledger.eip712 import Redemption
from ledger.errors import ChainError
from ledger.indexer import Indexer
from ledger.logs import hex_of
from ledger.points import (
    LOST_AFTER_ANSWER,
    EventKind,
    LoyaltyPointsClient,
    PointsBatch,
    PointsFollower,
    PointsHistory,
    PointsReader,
    PointsRelayer,
    PointsRequest,
    PointsStatus,
)
from ledger.store import sessions
from ledger.tx import TxRequest
from ledger.types import Subject
from tests.ledger.test_pipeline import start_chain

pytestmark = pytest.mark.anvil
ISSUED = 100


@dataclass
class Points:
    backend: AnvilBackend
    registry: ConsentRegistryClient
    client: LoyaltyPointsClient
    engine: Engine
    relayer: PointsRelayer
    indexer: Indexer
    reader: PointsReader
    partner: ChecksumAddress
    customer: LocalAccount
    subject: Subject

    def add(self, request: PointsRequest) -> PointsRequest:
        with sessions(self.engine).begin() as session:
            session.add(request)
        return request

    def issue(self, amount: int, lifetime: int = 3600) -> PointsRequest:
        return self.add(
            PointsRequest(
                id=str(uuid.uuid4()),
                kind="issue",
                ref=os.urandom(32),
                subject=bytes(self.subject),
                amount=amount,
                expires_at=int(time.time()) + lifetime,
                principal="issuer",
            )
        )

    def redeem(self, amount: int, sequence: int, partner: ChecksumAddress | None = None) -> PointsRequest:
        partner = partner or self.partner
        message = Redemption(
            self.subject,
            partner,
            amount,
            os.urandom(32),
            eip712.redemption_nonce(partner, sequence),
            int(time.time()) + 3600,
        )
        signature = eip712.sign(bytes(self.customer.key), self.client.domain, message)
        return self.add(
            PointsRequest(
                id=str(uuid.uuid4()),
                kind="redeem",
                ref=message.redemption_id,
                subject=bytes(self.subject),
                amount=amount,
                partner=partner,
                controller=self.customer.address,
                nonce=str(message.nonce),
                deadline=message.deadline,
                v=signature.v,
                r=signature.r,
                s=signature.s,
                principal="partner",
            )
        )

    def fund_then_lose_an_issuance(self) -> PointsRequest:
        """Issue ISSUED points (kept), then 10 more whose block the node loses, unannounced (a restart
        from older state): the relayer's local nonce is then ahead of the chain's. Returns the lost one."""
        self.settle(self.done(self.issue(ISSUED)))
        before = self.backend.rpc("evm_snapshot")
        lost = self.issue(10)
        self.settle(self.done(lost))
        assert self.backend.rpc("evm_revert", before) is True
        return lost

    def rows(self, *requests: PointsRequest) -> list[PointsRequest]:
        with sessions(self.engine)() as session:
            return [session.scalars(select(PointsRequest).where(PointsRequest.id == r.id)).one() for r in requests]

    def settle(self, until: Callable[[], bool], *, index: bool = True, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the pipeline did not settle"
            self.relayer.step()
            if index:
                self.indexer.step()
            time.sleep(0.02)

    def done(self, *requests: PointsRequest, indexed: bool = True) -> Callable[[], bool]:
        return lambda: all(r.status == PointsStatus.DONE and (r.indexed or not indexed) for r in self.rows(*requests))

    def history(self) -> list[tuple[int, bytes]]:
        with sessions(self.engine)() as session:
            return [(h.kind, h.ref) for h in session.scalars(select(PointsHistory).order_by(PointsHistory.id))]

    def applied_on_chain(self, request: PointsRequest) -> list[str]:
        """The blocks (hashes) of the chain's events applying `request` (`Issued` or `Redeemed` with its id)."""
        return [hex_of(entry["blockHash"]) for entry in self.relayer.applied_logs(request)]


@pytest.fixture
def points(tmp_path: Path, artifacts: dict[str, Artifact]) -> Iterator[Points]:
    chain = start_chain(tmp_path, artifacts, lambda operator: ledger_plan(operator, operator, operator))
    backend, registry, decoder, engine = chain.backend, chain.registry, chain.decoder, chain.engine
    client = LoyaltyPointsClient(
        backend.w3, chain.deployment.address("LoyaltyPoints"), artifacts["LoyaltyPoints"], registry.sender, decoder
    )
    customer = Account.create()
    subject = Subject(keccak(bytes(customer.key)))
    registry.bind_controller(subject, customer.address)
    yield Points(
        backend=backend,
        registry=registry,
        client=client,
        engine=engine,
        relayer=PointsRelayer(engine, client),
        indexer=Indexer(
            backend.w3,
            engine,
            chain.deployment.deploy_block,
            followers=[ConsentFollower(registry.address, engine.dialect), PointsFollower(client.address, decoder)],
        ),
        reader=PointsReader(engine, {"member": 0}),
        partner=chain.partner,
        customer=customer,
        subject=subject,
    )
    chain.close()


def test_a_reorganisation_is_rolled_back_and_the_issuance_and_redemption_applied_again_once(points: Points) -> None:
    before = points.backend.rpc("evm_snapshot")
    issuance = points.issue(ISSUED)
    points.settle(points.done(issuance))
    redemption = points.redeem(30, 0)
    points.settle(points.done(redemption))  # the partner was answered: on-chain, balance 70
    (answered,) = points.rows(redemption)
    assert answered.balance == ISSUED - 30
    first_blocks = points.applied_on_chain(issuance) + points.applied_on_chain(redemption)
    assert len(first_blocks) == 2
    assert points.reader.balance(bytes(points.subject)) == ISSUED - 30

    # The chain drops both blocks (and its mempool): a reorganisation deeper than either.
    assert points.backend.rpc("evm_revert", before) is True
    points.relayer.sender.resync_nonce()
    points.backend.rpc("anvil_mine", hex(30))
    assert points.client.balance_of(points.subject) == 0
    assert points.indexer.step() < 0  # rolled back
    assert [r.status for r in points.rows(issuance, redemption)] == [PointsStatus.PENDING] * 2
    assert points.reader.balance(bytes(points.subject)) == 0  # the read model follows the chain
    assert points.history() == []

    # Sent again in their order: the issuance first, so the redemption it funds succeeds.
    points.settle(points.done(issuance, redemption))
    again = points.applied_on_chain(issuance) + points.applied_on_chain(redemption)
    assert len(again) == 2  # once each
    assert not set(again) & set(first_blocks)  # in blocks of the new chain
    (settled,) = points.rows(redemption)
    assert (settled.balance, settled.error_code) == (ISSUED - 30, None)
    assert points.client.balance_of(points.subject) == ISSUED - 30
    assert points.reader.balance(bytes(points.subject)) == ISSUED - 30
    assert points.history() == [(EventKind.ISSUED, issuance.ref), (EventKind.REDEEMED, redemption.ref)]


@pytest.mark.parametrize("noticed_by", ["audit", "restart"])
def test_a_redemption_mined_then_lost_before_indexing_is_applied_again_once(points: Points, noticed_by: str) -> None:
    issuance = points.issue(ISSUED)
    points.settle(points.done(issuance))
    before = points.backend.rpc("evm_snapshot")
    redemption = points.redeem(30, 0)
    # The relayer settles it from its receipt (the partner's answer); the indexer has not run.
    points.settle(points.done(redemption, indexed=False), index=False)
    (answered,) = points.rows(redemption)
    assert answered.indexed is False
    assert len(points.applied_on_chain(redemption)) == 1

    # The node loses the block (a crash before its state was written); nobody indexed it.
    assert points.backend.rpc("evm_revert", before) is True
    assert points.applied_on_chain(redemption) == []
    if noticed_by == "audit":  # the periodic audit, once the request is older than `lost_after`
        points.relayer.sender.resync_nonce()
        points.relayer.lost_after = 0.2
        time.sleep(0.3)
        assert points.relayer.audit() == 1
        assert points.rows(redemption)[0].status == PointsStatus.PENDING
    else:  # told that the node restarted: the next step requeues and sends it, `lost_after` or not
        assert points.relayer.audit() == 0  # too recent for the periodic audit (10 s)
        points.relayer.node_restarted()
        points.relayer.step()  # takes the operator's nonce again (the lost block had used it) and sends
        (resent,) = points.rows(redemption)
        assert resent.status == PointsStatus.SUBMITTED
        assert resent.tx_hash is not None
        assert points.relayer.sender.known(resent.tx_hash)  # sent again (the same bytes may give the same hash)
    # Within a few blocks: not held back behind the lost nonce until a gap check (`lost_after`) fills it.
    points.settle(points.done(redemption), timeout=3)
    assert len(points.applied_on_chain(redemption)) == 1
    assert points.rows(redemption)[0].balance == ISSUED - 30
    assert points.client.balance_of(points.subject) == ISSUED - 30
    assert points.reader.balance(bytes(points.subject)) == ISSUED - 30
    assert points.history() == [(EventKind.ISSUED, issuance.ref), (EventKind.REDEEMED, redemption.ref)]


def test_a_redemption_sent_before_the_lost_one_it_follows_waits_for_it(points: Points) -> None:
    """A customer's redemptions at a partner carry consecutive nonces. After a loss, the relayer may send
    the next one before the indexer has noticed that the previous one's block is gone: the chain then
    refuses it for its nonce. It is queued again, not failed, and applies after the previous one."""
    issuance = points.issue(ISSUED)
    points.settle(points.done(issuance))
    before = points.backend.rpc("evm_snapshot")
    first = points.redeem(30, 0)
    points.settle(points.done(first))  # answered, and indexed
    assert points.backend.rpc("evm_revert", before) is True
    points.relayer.sender.resync_nonce()
    second = points.redeem(20, 1)

    def batches_mined() -> int:
        with sessions(points.engine)() as session:
            return len(list(session.scalars(select(PointsBatch).where(PointsBatch.status == "mined"))))

    mined = batches_mined()
    points.settle(lambda: batches_mined() > mined, index=False)  # the indexer has not run: `first` looks done
    (refused,) = points.rows(second)
    # Queued again (and perhaps sent again by the same step), not failed.
    assert refused.status in (PointsStatus.PENDING, PointsStatus.SUBMITTED)
    assert refused.error_code is None

    points.settle(points.done(first, second))
    assert len(points.applied_on_chain(first)) == 1
    assert len(points.applied_on_chain(second)) == 1
    assert [r.balance for r in points.rows(first, second)] == [ISSUED - 30, ISSUED - 50]
    assert points.client.balance_of(points.subject) == ISSUED - 50
    assert points.reader.balance(bytes(points.subject)) == ISSUED - 50


def test_after_a_restart_what_the_lost_blocks_held_goes_out_before_anything_newer(points: Points) -> None:
    """The customer has points for one of two redemptions. The first was answered, then lost with its
    block; the second comes after the node's restart, at another partner (its own nonce). Had the
    relayer sent the second before the indexer queued the first again, the second would take the
    points and the answered first would fail. After `node_restarted`, sends wait for the indexer's
    check of the chain, so the first applies again and the second is refused."""
    issuance = points.issue(ISSUED)
    points.settle(points.done(issuance))
    other = Account.create().address
    points.registry.add_partner(other)
    before = points.backend.rpc("evm_snapshot")
    answered = points.redeem(60, 0)
    points.settle(points.done(answered))
    assert points.backend.rpc("evm_revert", before) is True  # the node restarted from older state
    newer = points.redeem(60, 0, partner=other)
    began = time.monotonic()
    points.relayer.node_restarted(lambda: points.indexer.checked_at > began)
    for _ in range(5):
        points.relayer.step()
        time.sleep(0.05)
    assert points.rows(newer)[0].status == PointsStatus.PENDING  # held until the indexer has checked

    def final() -> bool:
        rows = points.rows(answered, newer)
        return all(r.status == PointsStatus.FAILED or (r.status == PointsStatus.DONE and r.indexed) for r in rows)

    points.settle(final)
    first, second = points.rows(answered, newer)
    assert (first.status, first.balance) == (PointsStatus.DONE, ISSUED - 60)  # its answer stands
    assert (second.status, second.error_code) == (PointsStatus.FAILED, "insufficient_points")
    assert len(points.applied_on_chain(answered)) == 1
    assert points.applied_on_chain(newer) == []
    assert points.client.balance_of(points.subject) == ISSUED - 60
    assert points.reader.balance(bytes(points.subject)) == ISSUED - 60


def test_the_wait_after_a_restart_ends_after_lost_after_if_the_indexer_never_checks(points: Points) -> None:
    issuance = points.issue(ISSUED)
    points.relayer.lost_after = 0.3
    points.relayer.node_restarted(lambda: False)  # an indexer that is stuck
    points.relayer.step()
    assert points.rows(issuance)[0].status == PointsStatus.PENDING
    time.sleep(0.35)
    points.relayer.step()  # sent anyway (and a warning logged): a stuck indexer must not stop the relayer
    assert points.rows(issuance)[0].status == PointsStatus.SUBMITTED
    points.settle(points.done(issuance))


def test_the_wait_after_a_restart_counts_from_the_node_answering(
    points: Points, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`node_restarted` comes before the node answers (a large state file takes a while to load): the
    steps fail until it does, sending nothing, and the wait for the indexer starts only then."""
    issuance = points.issue(ISSUED)
    points.relayer.lost_after = 0.3
    sender = points.relayer.sender
    resync = sender.resync_nonce
    up_at = time.monotonic() + 0.6  # longer than lost_after

    def resync_once_up() -> None:
        if time.monotonic() < up_at:
            raise ChainError("the node did not answer eth_getTransactionCount: ConnectionError")
        resync()

    monkeypatch.setattr(sender, "resync_nonce", resync_once_up)
    points.relayer.node_restarted(lambda: False)  # an indexer that never checks: only the wait ends it
    while time.monotonic() < up_at:
        with pytest.raises(ChainError):
            points.relayer.step()
        time.sleep(0.05)
    assert points.rows(issuance)[0].status == PointsStatus.PENDING
    points.relayer.step()  # the node answers: checked, and the wait begins
    assert points.rows(issuance)[0].status == PointsStatus.PENDING
    time.sleep(0.35)
    points.relayer.step()
    assert points.rows(issuance)[0].status == PointsStatus.SUBMITTED
    points.settle(points.done(issuance))


def test_an_answered_redemption_that_cannot_be_applied_again_says_so(points: Points) -> None:
    """The node stays down past the authorisation's deadline (an hour here): the redemption the partner
    was answered for cannot be applied again. It fails with its own code, not as an ordinary refusal."""
    issuance = points.issue(ISSUED, lifetime=10 * 86400)
    points.settle(points.done(issuance))
    before = points.backend.rpc("evm_snapshot")
    answered = points.redeem(30, 0)
    points.settle(points.done(answered))
    assert points.backend.rpc("evm_revert", before) is True
    points.relayer.sender.resync_nonce()
    points.backend.rpc("evm_increaseTime", 2 * 3600)  # the chain's clock: back two hours later

    def failed() -> bool:
        return points.rows(answered)[0].status == PointsStatus.FAILED

    points.settle(failed)
    (row,) = points.rows(answered)
    assert row.error_code == LOST_AFTER_ANSWER
    assert row.error_detail is not None
    assert "LoyaltyPointsExpiredSignature" in row.error_detail
    assert points.applied_on_chain(answered) == []
    assert points.client.balance_of(points.subject) == ISSUED  # nothing spent
    assert points.reader.balance(bytes(points.subject)) == ISSUED


def test_a_batch_sent_as_the_node_restarts_waits_and_goes_out_with_the_nonce_taken_again(
    points: Points, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor says the node is restarting (`node_restarted`, before it answers) while the relayer
    is between signing a batch and sending it: the nonce it signed with may be one the lost blocks used,
    and the node would hold the batch back behind the gap. It is not sent; the next step takes the nonce
    again and sends it."""
    lost = points.fund_then_lose_an_issuance()
    sender = points.relayer.sender
    stale = sender.next_nonce
    signed = sender.sign_with_nonces

    def sign_then_restart(requests: Sequence[TxRequest]) -> list[tuple[str, bytes, int]]:
        monkeypatch.setattr(sender, "sign_with_nonces", signed)
        result = signed(requests)
        points.relayer.node_restarted()  # the supervisor thread, now
        return result

    monkeypatch.setattr(sender, "sign_with_nonces", sign_then_restart)
    redemption = points.redeem(30, 0)
    points.relayer.step()
    (held,) = points.rows(redemption)
    assert held.status == PointsStatus.PENDING  # dropped before the send, queued again
    assert points.backend.rpc("txpool_status") == {"pending": "0x0", "queued": "0x0"}
    points.relayer.step()
    assert sender.next_nonce < stale + 1  # taken again from the node, below the stale one
    points.settle(points.done(lost, redemption), timeout=5)
    assert points.client.balance_of(points.subject) == ISSUED + 10 - 30
    assert points.reader.balance(bytes(points.subject)) == ISSUED + 10 - 30


def test_a_batch_held_back_behind_nonces_the_node_lost_is_unstuck(
    points: Points, caplog: pytest.LogCaptureFixture
) -> None:
    """The node loses a block and nobody tells the relayer (no restart signal: a node that restarted on
    its own, or a reorganisation). Its local nonce is then ahead of the chain's; the batches it sends
    wait in the node's pool behind the missing nonce, and nothing of ours is mined however long it
    waits. After `lost_after` the relayer fills the gap with a transaction that does nothing."""
    lost = points.fund_then_lose_an_issuance()
    points.relayer.lost_after = 0.5
    redemption = points.redeem(30, 0)
    operator = points.relayer.sender.account.address
    chain_nonce = points.backend.w3.eth.get_transaction_count(operator)
    with caplog.at_level("WARNING", logger="ledger.lanes"):
        points.settle(points.done(lost, redemption), timeout=10)
    assert "operator nonces the node had lost; filled them" in caplog.text
    assert len(points.applied_on_chain(lost)) == 1
    assert len(points.applied_on_chain(redemption)) == 1
    by_nonce = {
        int(tx["nonce"], 16): tx
        for number in range(points.backend.w3.eth.get_block_number(), 0, -1)
        for tx in points.backend.rpc("eth_getBlockByNumber", hex(number), True)["transactions"]
        if tx["from"] == operator.lower()
    }
    filler = by_nonce[chain_nonce]  # the nonce the lost block had used: a transaction that does nothing
    assert filler["to"] == operator.lower()
    assert filler["input"] == "0x"
    assert int(filler["value"], 16) == 0
    assert points.client.balance_of(points.subject) == ISSUED + 10 - 30
    assert points.reader.balance(bytes(points.subject)) == ISSUED + 10 - 30


def test_a_gap_check_the_node_refuses_does_not_stop_the_relayer(
    points: Points, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gap check is best effort (a node could refuse the filler): its failure is logged, and the
    relayer's step goes on polling and sending."""
    lost = points.fund_then_lose_an_issuance()
    points.relayer.lost_after = 0.2
    refused: list[int] = []

    def refuse(nonce: int) -> int:
        refused.append(nonce)
        raise ChainError("the node refused 1 of 1 transactions")

    monkeypatch.setattr(points.relayer.sender, "fill_gap", refuse)
    redemption = points.redeem(30, 0)
    deadline = time.monotonic() + 10
    while not refused:
        assert time.monotonic() < deadline, "no gap check"
        points.relayer.step()  # raises if the failure escapes
        points.indexer.step()
        time.sleep(0.05)
    monkeypatch.undo()
    points.settle(points.done(lost, redemption), timeout=10)
    assert points.client.balance_of(points.subject) == ISSUED + 10 - 30
