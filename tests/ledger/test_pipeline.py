"""Outbox → relayer → chain → indexer → read model, on a real anvil node and a real SQLite file."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress, HexStr
from eth_utils.crypto import keccak
from sqlalchemy import Engine, Table, func, select, update
from sqlalchemy import event as sa_event

from ledger import eip712
from ledger.backends import AnvilBackend
from ledger.compiler import Artifact
from ledger.consent import (
    Bindings,
    BoundController,
    ConsentEvent,
    ConsentFollower,
    ConsentReader,
    ConsentRegistryClient,
    ConsentRequest,
    ConsentState,
    ControllerState,
    NonceConflict,
    Outbox,
    OutboxWriter,
    RelayBatch,
    Relayer,
    RequestStatus,
    SignedChange,
    signed_change,
)
from ledger.contracts import ConstructorArgs, Deployment, RevertDecoder, ensure_deployed
from ledger.eip712 import ChangeKind, ConsentChange
from ledger.errors import ChainError
from ledger.indexer import Indexer, _whole_blocks
from ledger.settings import ChainSettings
from ledger.store import Base, make_engine, sessions
from ledger.tx import TxSender
from ledger.types import Subject

pytestmark = pytest.mark.anvil
PURPOSE = eip712.purpose_id("marketing.communications.email")
EMAIL, PHONE = 1, 2


@dataclass
class Pipeline:
    backend: AnvilBackend
    registry: ConsentRegistryClient
    engine: Engine
    outbox: Outbox
    reader: ConsentReader
    relayer: Relayer
    indexer: Indexer
    partner: ChecksumAddress
    artifacts: dict[str, Artifact]
    deploy_block: int

    def customer(self) -> tuple[LocalAccount, Subject]:
        account = Account.create()
        subject = Subject(keccak(bytes(account.key)))
        self.registry.bind_controller(subject, account.address)
        return account, subject

    def accept(
        self,
        account: LocalAccount,
        subject: Subject,
        kind: ChangeKind,
        bits: int,
        *,
        key: bytes | None = None,
        lifetime: int = 3600,
    ) -> ConsentRequest:
        chain_nonce = self.registry.nonce_of(subject)
        change = ConsentChange(
            kind,
            subject,
            self.partner,
            PURPOSE,
            bits,
            nonce=self.outbox.next_nonce(subject, chain_nonce),
            deadline=int(time.time()) + lifetime,
        )
        signed = SignedChange(change, eip712.sign(key or bytes(account.key), self.registry.domain, change))
        return self.outbox.accept(signed, account.address, chain_nonce)

    def settle(self, until: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the pipeline did not settle"
            self.relayer.step()
            self.indexer.step()
            time.sleep(0.02)

    def settle_all(self, *requests: ConsentRequest, timeout: float = 30) -> None:
        """Run the pipeline until every one of `requests` is confirmed or failed."""
        live = (RequestStatus.PENDING, RequestStatus.SUBMITTED)
        self.settle(lambda: not any(status in live for status in self.statuses(*requests)), timeout)

    def statuses(self, *requests: ConsentRequest) -> list[str]:
        return [self.outbox.request(r.id).status for r in requests]  # type: ignore[union-attr]

    def events(self) -> list[ConsentEvent]:
        with sessions(self.engine)() as session:
            return list(session.scalars(select(ConsentEvent).where(ConsentEvent.kind != 2)))


@dataclass
class Chain:
    """A fresh anvil node (50 ms blocks) with contracts deployed by a new operator key, a registry
    client, one partner, and an empty service database."""

    backend: AnvilBackend
    deployment: Deployment
    decoder: RevertDecoder
    registry: ConsentRegistryClient
    partner: ChecksumAddress
    engine: Engine

    def close(self) -> None:
        self.engine.dispose()
        self.backend.stop()


def start_chain(
    tmp_path: Path, artifacts: dict[str, Artifact], plan: Callable[[str], list[tuple[str, ConstructorArgs]]]
) -> Chain:
    """`plan(operator address)` names what to deploy."""
    operator = Account.create()
    backend = AnvilBackend(ChainSettings(backend="anvil", block_time=0.05), operator, tmp_path)
    backend.start()
    sender = TxSender(backend.w3, operator)
    deployment = ensure_deployed(backend.w3, sender, artifacts, plan(operator.address), None)
    decoder = RevertDecoder(list(artifacts.values()))
    registry = ConsentRegistryClient(
        backend.w3, deployment.address("ConsentRegistry"), artifacts["ConsentRegistry"], sender, decoder
    )
    partner = Account.create().address
    registry.add_partner(partner)
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    Base.metadata.create_all(engine)
    return Chain(backend, deployment, decoder, registry, partner, engine)


@pytest.fixture
def pipeline(tmp_path: Path, artifacts: dict[str, Artifact]) -> Iterator[Pipeline]:
    chain = start_chain(tmp_path, artifacts, lambda operator: [("ConsentRegistry", lambda _d: [operator, operator])])
    engine, registry = chain.engine, chain.registry
    yield Pipeline(
        backend=chain.backend,
        registry=registry,
        engine=engine,
        outbox=Outbox(engine),
        reader=ConsentReader(engine),
        relayer=Relayer(engine, registry, linger=0),
        partner=chain.partner,
        artifacts=artifacts,
        indexer=Indexer(
            chain.backend.w3,
            engine,
            chain.deployment.deploy_block,
            followers=[ConsentFollower(registry.address, engine.dialect)],
        ),
        deploy_block=chain.deployment.deploy_block,
    )
    chain.close()


def test_accepted_changes_are_confirmed_exactly_once_in_shared_batches(pipeline: Pipeline) -> None:
    customers = [pipeline.customer() for _ in range(10)]
    requests = [
        pipeline.accept(account, subject, ChangeKind.GRANT, bit)
        for account, subject in customers
        for bit in (EMAIL, PHONE, 4)
    ]
    pipeline.settle(lambda: set(pipeline.statuses(*requests)) == {RequestStatus.CONFIRMED})
    events = pipeline.events()
    assert sorted((e.subject, e.nonce) for e in events) == sorted((r.subject, r.nonce) for r in requests)
    with sessions(pipeline.engine)() as session:
        batches = session.scalar(select(func.count()).select_from(RelayBatch))
    assert batches is not None
    assert batches < len(requests)  # group commit: many changes per transaction
    for request in requests:
        stored = pipeline.outbox.request(request.id)
        assert stored is not None
        assert stored.tx_hash is not None
        assert stored.block_number is not None
    for account, subject in customers:
        assert pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, EMAIL | PHONE | 4)
        assert pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == EMAIL | PHONE | 4
        del account


def test_a_bad_request_fails_alone_with_its_reason(pipeline: Pipeline) -> None:
    good = [pipeline.customer() for _ in range(4)]
    forged_account, forged_subject = pipeline.customer()
    first = [pipeline.accept(a, s, ChangeKind.GRANT, EMAIL) for a, s in good[:2]]
    bad = pipeline.accept(forged_account, forged_subject, ChangeKind.GRANT, EMAIL, key=bytes(Account.create().key))
    rest = [pipeline.accept(a, s, ChangeKind.GRANT, EMAIL) for a, s in good[2:]]
    pipeline.settle_all(*first, bad, *rest)
    assert pipeline.statuses(*first, *rest) == [RequestStatus.CONFIRMED] * 4
    failed = pipeline.outbox.request(bad.id)
    assert failed is not None
    assert (failed.status, failed.error_code) == (RequestStatus.FAILED, "invalid_signature")
    assert not pipeline.registry.is_permitted(forged_subject, pipeline.partner, PURPOSE, EMAIL)
    # The customer signs anew, with the next nonce: a failed change's nonce is never given again, so
    # nothing signed before (the failed change, which the operator holds) can apply after it.
    again = pipeline.accept(forged_account, forged_subject, ChangeKind.GRANT, EMAIL)
    assert again.nonce == bad.nonce + 1
    pipeline.settle(lambda: pipeline.statuses(again) == [RequestStatus.CONFIRMED])
    # The chain's event names (subject, nonce, kind): it confirms the change that holds the nonce now,
    # not the failed one that held it before.
    assert pipeline.statuses(bad) == [RequestStatus.FAILED]


def test_a_revocation_takes_effect_when_accepted_and_a_grant_when_on_chain(pipeline: Pipeline) -> None:
    account, subject = pipeline.customer()
    grant = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL | PHONE)
    assert pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == 0  # not on-chain yet
    (status,) = pipeline.reader.consents_of(subject)
    assert (status.status, status.pending_grant) == ("pending", EMAIL | PHONE)
    pipeline.settle(lambda: pipeline.statuses(grant) == [RequestStatus.CONFIRMED])
    assert pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == EMAIL | PHONE
    revoke = pipeline.accept(account, subject, ChangeKind.REVOKE, PHONE)
    assert pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == EMAIL  # deny wins while pending
    assert pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, PHONE)
    pipeline.settle(lambda: pipeline.statuses(revoke) == [RequestStatus.CONFIRMED])
    assert not pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, PHONE)
    (status,) = pipeline.reader.consents_of(subject)
    assert (status.status, status.attributes, status.on_chain) == ("active", EMAIL, EMAIL)


def test_an_accepted_revocation_takes_effect_though_an_earlier_change_failed_on_chain(pipeline: Pipeline) -> None:
    """The invariant: a revocation the service accepted takes effect on-chain, whatever happened to
    the customer's earlier changes. Here a grant accepted before it fails on-chain (its deadline
    passed while it waited: a node that was away), which left the revocation's nonce unreachable
    while nonces had to follow each other exactly."""
    account, subject = pipeline.customer()
    granted = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL | PHONE)
    pipeline.settle(lambda: pipeline.statuses(granted) == [RequestStatus.CONFIRMED])
    late = pipeline.accept(account, subject, ChangeKind.GRANT, 4, lifetime=1)
    revoke = pipeline.accept(account, subject, ChangeKind.REVOKE, EMAIL | PHONE)
    assert revoke.nonce == late.nonce + 1
    assert pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == 0  # deny wins while pending
    time.sleep(2.2)  # the grant's deadline passes before the relayer gets to it
    pipeline.settle_all(late, revoke)
    failed = pipeline.outbox.request(late.id)
    assert failed is not None
    assert (failed.status, failed.error_code) == (RequestStatus.FAILED, "signature_expired")
    assert pipeline.statuses(revoke) == [RequestStatus.CONFIRMED]
    assert not pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, EMAIL)
    assert not pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, PHONE)
    (status,) = pipeline.reader.consents_of(subject)
    assert (status.status, status.attributes, status.on_chain) == ("revoked", 0, 0)
    # The customer goes on from the chain's nonce: the failed grant's is passed for good.
    again = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
    assert again.nonce == revoke.nonce + 1
    pipeline.settle(lambda: pipeline.statuses(again) == [RequestStatus.CONFIRMED])
    assert pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == EMAIL


def test_a_subjects_later_change_waits_while_an_earlier_one_is_on_its_way(pipeline: Pipeline) -> None:
    """A change whose nonce is above the chain's applies (skipping the ones before it), so the relayer
    never lets a later change of a subject overtake an earlier one still on its way. Here the earlier
    one's batch reverts for another customer's forged change: had the later revocation been sent in
    the next batch meanwhile, it would have applied first and the customer's grant never could."""
    account, subject = pipeline.customer()
    forger, forged = pipeline.customer()
    bad = pipeline.accept(forger, forged, ChangeKind.GRANT, EMAIL, key=bytes(Account.create().key))
    grant = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL | PHONE)
    pipeline.relayer.step(poll=False)  # one batch: the forged grant and the customer's; it will revert
    assert pipeline.statuses(bad, grant) == [RequestStatus.SUBMITTED] * 2
    revoke = pipeline.accept(account, subject, ChangeKind.REVOKE, PHONE)
    pipeline.relayer.step(poll=False)
    assert pipeline.statuses(revoke) == [RequestStatus.PENDING]  # held back behind the grant
    pipeline.settle(lambda: pipeline.statuses(revoke) == [RequestStatus.CONFIRMED])
    assert pipeline.statuses(bad, grant) == [RequestStatus.FAILED, RequestStatus.CONFIRMED]
    assert pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, EMAIL)
    assert not pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, PHONE)
    assert pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == EMAIL


@pytest.mark.parametrize("read", ["permissions", "consents_of"])
def test_consent_reads_are_one_moment_though_the_indexer_commits_while_they_read(pipeline: Pipeline, read: str) -> None:
    """The bridge releases by `permissions`, the portal shows `consents_of`. Each combines the
    on-chain state with the live (accepted, unconfirmed) revocations. Here the indexer confirms a
    revocation (its request leaves the live ones as its effect enters the state) right after the read
    of the state began: read in two statements, the customer came out permitted with the old bits,
    which the database never said at any moment."""
    account, subject = pipeline.customer()
    grant = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL | PHONE)
    pipeline.settle(lambda: pipeline.statuses(grant) == [RequestStatus.CONFIRMED])
    revoke = pipeline.accept(account, subject, ChangeKind.REVOKE, PHONE)
    deadline = time.monotonic() + 30
    while pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, PHONE):  # mined, not indexed
        assert time.monotonic() < deadline
        pipeline.relayer.step()
        time.sleep(0.02)
    assert pipeline.statuses(revoke) == [RequestStatus.SUBMITTED]
    interleaved: list[str] = []

    def index_meanwhile(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if interleaved or "consent_state" not in statement:
            return
        interleaved.append(statement)  # first: the indexer's own statements come back here
        while pipeline.statuses(revoke) != [RequestStatus.CONFIRMED]:
            assert time.monotonic() < deadline
            pipeline.indexer.step()

    sa_event.listen(pipeline.engine, "after_cursor_execute", index_meanwhile)
    try:
        if read == "permissions":
            assert pipeline.reader.permissions(pipeline.partner, PURPOSE) == {bytes(subject): EMAIL}
        else:
            (status,) = pipeline.reader.consents_of(subject)
            assert status.attributes == EMAIL
    finally:
        sa_event.remove(pipeline.engine, "after_cursor_execute", index_meanwhile)
    assert interleaved  # the indexer did commit while the read was under way
    assert pipeline.reader.permissions(pipeline.partner, PURPOSE) == {bytes(subject): EMAIL}


def test_a_change_the_chain_passed_over_fails_and_is_not_taken_for_applied(pipeline: Pipeline) -> None:
    """A chain that lost an earlier change's block but kept a later change (which skips the nonce)
    refuses the earlier one for its nonce. That refusal meant "applied already" while nonces followed
    each other exactly; now it may mean "passed over": the change fails (`superseded`) rather than
    being confirmed without its event (as `history_lost`) though it never applied."""
    account, subject = pipeline.customer()
    grant = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL | PHONE)
    revoke = pipeline.accept(account, subject, ChangeKind.REVOKE, PHONE)
    stored = pipeline.outbox.request(revoke.id)
    assert stored is not None
    pipeline.registry.apply(signed_change(stored))  # the later change is on-chain; the earlier one is not
    pipeline.settle_all(grant, revoke)
    failed = pipeline.outbox.request(grant.id)
    assert failed is not None
    assert (failed.status, failed.error_code) == (RequestStatus.FAILED, "superseded")
    assert pipeline.statuses(revoke) == [RequestStatus.CONFIRMED]
    assert not pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, EMAIL)
    assert pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == 0


def test_a_replayed_or_out_of_order_nonce_is_refused_at_acceptance(pipeline: Pipeline) -> None:
    account, subject = pipeline.customer()
    pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
    change = ConsentChange(
        ChangeKind.GRANT,
        subject,
        pipeline.partner,
        PURPOSE,
        PHONE,
        nonce=0,
        deadline=int(time.time()) + 60,
    )
    signed = SignedChange(change, eip712.sign(bytes(account.key), pipeline.registry.domain, change))
    with pytest.raises(NonceConflict, match="not the next one"):
        pipeline.outbox.accept(signed, account.address, 0)


def test_the_indexer_resumes_where_it_stopped(pipeline: Pipeline) -> None:
    account, subject = pipeline.customer()
    first = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
    pipeline.settle(lambda: pipeline.statuses(first) == [RequestStatus.CONFIRMED])
    cursor = pipeline.indexer.cursor()
    pipeline.indexer = Indexer(
        pipeline.backend.w3,
        pipeline.engine,
        pipeline.deploy_block,
        followers=[ConsentFollower(pipeline.registry.address, pipeline.engine.dialect)],
    )
    assert pipeline.indexer.cursor() == cursor
    second = pipeline.accept(account, subject, ChangeKind.GRANT, PHONE)
    pipeline.settle(lambda: pipeline.statuses(second) == [RequestStatus.CONFIRMED])
    assert sorted(e.nonce for e in pipeline.events()) == [0, 1]  # nothing indexed twice


def test_a_reorganisation_is_rolled_back_and_the_change_sent_again(pipeline: Pipeline) -> None:
    account, subject = pipeline.customer()
    before = pipeline.backend.rpc("evm_snapshot")
    request = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
    pipeline.settle(lambda: pipeline.statuses(request) == [RequestStatus.CONFIRMED])
    (first,) = pipeline.events()
    # The chain drops the block with our transaction (and its mempool): a reorganisation.
    assert pipeline.backend.rpc("evm_revert", before) is True
    pipeline.relayer.sender.resync_nonce()
    pipeline.backend.rpc("anvil_mine", hex(30))
    assert pipeline.indexer.step() < 0  # rolled back
    assert pipeline.statuses(request) == [RequestStatus.PENDING]
    assert pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == 0
    pipeline.settle(lambda: pipeline.statuses(request) == [RequestStatus.CONFIRMED])
    (again,) = pipeline.events()  # exactly once, in a block of the new chain
    assert (again.subject, again.nonce) == (subject, 0)
    assert again.block_hash != first.block_hash
    assert pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, EMAIL)


def test_a_relayer_that_dies_before_sending_loses_nothing(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    account, subject = pipeline.customer()
    request = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)

    def crash(_raws: object) -> None:
        raise KeyboardInterrupt  # the process dies between recording the batch and sending it

    monkeypatch.setattr(pipeline.relayer.sender, "send_raw", crash)
    with pytest.raises(KeyboardInterrupt):
        pipeline.relayer.step()
    monkeypatch.undo()
    assert pipeline.statuses(request) == [RequestStatus.SUBMITTED]
    pipeline.relayer = Relayer(pipeline.engine, pipeline.registry, linger=0)
    pipeline.relayer.recover()
    pipeline.settle(lambda: pipeline.statuses(request) == [RequestStatus.CONFIRMED])
    assert [(e.subject, e.nonce) for e in pipeline.events()] == [(subject, 0)]


def test_a_relayer_that_dies_after_sending_settles_the_batch_on_restart(pipeline: Pipeline) -> None:
    account, subject = pipeline.customer()
    request = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
    assert pipeline.relayer.step() == 1  # sent, never polled: the process is gone
    pipeline.relayer = Relayer(pipeline.engine, pipeline.registry, linger=0)
    pipeline.relayer.recover()

    def batches() -> list[str]:
        with sessions(pipeline.engine)() as session:
            return [b.status for b in session.scalars(select(RelayBatch))]

    # The indexer may confirm the request before the relayer polls the receipt: wait for both.
    pipeline.settle(lambda: pipeline.statuses(request) == [RequestStatus.CONFIRMED] and batches() != ["sent"])
    assert [(e.subject, e.nonce) for e in pipeline.events()] == [(subject, 0)]
    assert batches() == ["mined"]


@pytest.mark.parametrize("noticed_by", ["audit", "restart"])
def test_a_batch_mined_then_lost_before_indexing_is_sent_again(pipeline: Pipeline, noticed_by: str) -> None:
    account, subject = pipeline.customer()
    before = pipeline.backend.rpc("evm_snapshot")
    request = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
    deadline = time.monotonic() + 30
    with sessions(pipeline.engine)() as session:
        while session.scalar(select(func.count()).select_from(RelayBatch).where(RelayBatch.status == "mined")) != 1:
            assert time.monotonic() < deadline
            pipeline.relayer.step()  # mined, but the indexer has not run: nothing confirmed yet
            time.sleep(0.02)
            session.expire_all()
    assert pipeline.statuses(request) == [RequestStatus.SUBMITTED]
    # The node loses the block (a crash before its state was written); the indexer never saw it.
    assert pipeline.backend.rpc("evm_revert", before) is True
    if noticed_by == "audit":  # the periodic audit, once the request is older than `lost_after`
        pipeline.relayer.sender.resync_nonce()
        pipeline.relayer.lost_after = 0.2
        time.sleep(0.3)
        assert pipeline.relayer.audit_submitted() == 1
        assert pipeline.statuses(request) == [RequestStatus.PENDING]
    else:  # told that the node restarted: the next step requeues and sends it, `lost_after` or not
        assert pipeline.relayer.audit_submitted() == 0  # too recent for the periodic audit (10 s)
        pipeline.relayer.node_restarted()
        pipeline.relayer.step()  # takes the operator's nonce again (the lost block had used it) and sends
        resent = pipeline.outbox.request(request.id)
        assert resent is not None
        assert resent.status == RequestStatus.SUBMITTED
        assert resent.tx_hash is not None
        assert pipeline.relayer.sender.known(resent.tx_hash)  # sent again (the same bytes may give the same hash)
    # Within a few blocks: not held back behind the lost nonce until a gap check (`lost_after`) fills it.
    pipeline.settle(lambda: pipeline.statuses(request) == [RequestStatus.CONFIRMED], timeout=3)
    assert [(e.subject, e.nonce) for e in pipeline.events()] == [(subject, 0)]
    assert pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, EMAIL)


def test_the_indexer_takes_block_times_from_the_logs_and_asks_only_where_they_lack_them(pipeline: Pipeline) -> None:
    customers = [pipeline.customer() for _ in range(3)]
    requests = []
    for account, subject in customers:  # one relayer batch each: logs in several blocks
        requests.append(pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL))
        deadline = time.monotonic() + 30
        pipeline.relayer.step()
        while pipeline.relayer.busy:  # until its batch is mined (the indexer has not run yet)
            assert time.monotonic() < deadline
            time.sleep(0.02)
            pipeline.relayer.step()
    calls: list[str] = []
    rpc = pipeline.indexer._rpc

    def counted(method: str, params: list[object]) -> object:
        calls.append(method)
        return rpc(method, params)

    fetch = pipeline.indexer.log_fetcher._get_logs

    def counted_logs(query: dict[str, Any], start: int, end: int) -> dict[str, Any]:
        calls.append("eth_getLogs")
        return fetch(query, start, end)

    pipeline.indexer._rpc = counted  # type: ignore[method-assign]
    pipeline.indexer.log_fetcher._get_logs = counted_logs  # type: ignore[method-assign]
    while pipeline.indexer.step() > 0:
        pass
    w3 = pipeline.backend.w3
    events = pipeline.events()
    assert len({e.block_number for e in events}) >= 2
    for event in events:
        assert event.block_time == w3.eth.get_block(event.block_number)["timestamp"]
    # Per step: the cursor block's hash and the new cursor's (and the last step's check), never one call
    # per block with logs.
    assert calls.count("eth_getBlockByNumber") <= 2 * calls.count("eth_getLogs") + 1
    # A node that does not put timestamps in its logs is asked block by block (same answers).
    logs = w3.provider.make_request("eth_getLogs", [{"fromBlock": "0x0", "toBlock": "latest"}])["result"]  # type: ignore[arg-type]
    stripped = [{k: v for k, v in log.items() if k != "blockTimestamp"} for log in logs]
    assert "blockTimestamp" in logs[0]
    assert pipeline.indexer._times(stripped) == pipeline.indexer._times(logs)


def test_outbox_writers_in_several_processes_share_each_subjects_nonces(pipeline: Pipeline) -> None:
    # Each API worker process has its own writer, each caching a subject's next nonce. A cache made
    # stale by the other writer must neither lose nor fail a valid change, and a nonce taken by the
    # other writer must be refused alone, as one writer refuses it.
    account, subject = pipeline.customer()
    first, second = OutboxWriter(pipeline.engine), OutboxWriter(pipeline.engine)

    def signed(nonce: int, bits: int) -> SignedChange:
        change = ConsentChange(
            ChangeKind.GRANT, subject, pipeline.partner, PURPOSE, bits, nonce=nonce, deadline=int(time.time()) + 600
        )
        return SignedChange(change, eip712.sign(bytes(account.key), pipeline.registry.domain, change))

    def chain_nonce() -> int:
        return pipeline.registry.nonce_of(subject)

    try:
        assert first.accept(signed(0, EMAIL), account.address, chain_nonce).result(10).nonce == 0
        assert second.accept(signed(1, PHONE), account.address, chain_nonce).result(10).nonce == 1
        # `first` still expects nonce 1 for this subject; the change it gets carries 2.
        assert first.accept(signed(2, EMAIL), account.address, chain_nonce).result(10).nonce == 2
        # `second` expects 2, which `first` has stored: its insert meets the unique index, and the
        # batch is written again with the nonces read afresh: the replay is refused, and the valid
        # change sent with it (most likely in the same batch) is kept.
        replay = second.accept(signed(2, PHONE), account.address, chain_nonce)
        valid = second.accept(signed(3, PHONE), account.address, chain_nonce)
        with pytest.raises(NonceConflict, match="not the next one"):
            replay.result(10)
        assert valid.result(10).nonce == 3
        # A customer's consecutive changes sent together (most likely one batch, none stored before the
        # insert): each is checked against the one before it.
        together = [first.accept(signed(n, EMAIL), account.address, chain_nonce) for n in (4, 5, 6)]
        assert [f.result(10).nonce for f in together] == [4, 5, 6]
    finally:
        first.close()
        second.close()
    with sessions(pipeline.engine)() as session:
        stored = session.scalars(select(ConsentRequest.nonce).where(ConsentRequest.subject == subject)).all()
    assert sorted(stored) == [0, 1, 2, 3, 4, 5, 6]


def test_the_outbox_writer_asks_the_chain_for_nonces_outside_the_write_lock(pipeline: Pipeline) -> None:
    """A subject's first change needs its on-chain nonce: a round trip to the node, which must not
    hold up every process's writers. A failure there is still that request's answer alone."""
    (account, subject), (_, broken) = pipeline.customer(), pipeline.customer()
    lock = sessions(pipeline.engine)._lock
    assert lock is not None
    asked: list[bytes] = []

    def chain_nonce(of: bytes) -> int:
        asked.append(of)
        assert not lock._thread_lock._is_owned(), "the chain was asked under the write lock"  # type: ignore[attr-defined]
        if of == broken:
            raise ChainError("the node is away")
        return pipeline.registry.nonce_of(Subject(of))

    def signed(of: bytes, nonce: int) -> SignedChange:
        change = ConsentChange(
            ChangeKind.GRANT,
            Subject(of),
            pipeline.partner,
            PURPOSE,
            EMAIL,
            nonce=nonce,
            deadline=int(time.time()) + 600,
        )
        return SignedChange(change, eip712.sign(bytes(account.key), pipeline.registry.domain, change))

    writer = OutboxWriter(pipeline.engine, linger=0.05)  # both in one batch
    try:
        good = writer.accept(signed(subject, 0), account.address, lambda: chain_nonce(subject))
        bad = writer.accept(signed(broken, 0), account.address, lambda: chain_nonce(broken))
        assert good.result(10).nonce == 0
        with pytest.raises(ChainError, match="away"):
            bad.result(10)
    finally:
        writer.close()
    assert subject in asked
    assert broken in asked


def test_a_change_the_database_cannot_store_fails_alone_in_its_shared_commit(pipeline: Pipeline) -> None:
    """Changes that arrive together share one commit. One whose value the database cannot hold (a
    deadline past SQLite's signed 64-bit INTEGER) made the whole commit fail, and every other
    customer's change in it answered 500 with it."""
    customers = [pipeline.customer() for _ in range(12)]

    def signed(account: LocalAccount, subject: Subject, deadline: int) -> SignedChange:
        change = ConsentChange(ChangeKind.GRANT, subject, pipeline.partner, PURPOSE, EMAIL, nonce=0, deadline=deadline)
        return SignedChange(change, eip712.sign(bytes(account.key), pipeline.registry.domain, change))

    writer = OutboxWriter(pipeline.engine, linger=0.2)  # all in one batch
    try:
        pending = [
            writer.accept(
                signed(account, subject, 2**63 if at == 5 else int(time.time()) + 600),
                account.address,
                lambda: 0,
            )
            for at, (account, subject) in enumerate(customers)
        ]
        with pytest.raises(OverflowError):
            pending[5].result(10)
        stored = [future.result(10) for at, future in enumerate(pending) if at != 5]
    finally:
        writer.close()
    assert [r.subject for r in stored] == [bytes(s) for at, (_, s) in enumerate(customers) if at != 5]
    for request in stored:
        assert pipeline.outbox.request(request.id) is not None
    assert pipeline.outbox.next_nonce(customers[5][1], 0) == 0  # nothing of the bad one was kept


def test_a_caller_that_gave_up_does_not_stop_the_outbox_writer(pipeline: Pipeline) -> None:
    """A request waits 30 s for its commit (`asyncio.wait_for`), and giving up cancels the future it
    waits on. The writer then set a result on a cancelled future: InvalidStateError killed its thread,
    and every later consent change waited for ever. A caller that gave up before its change was taken
    is not stored; one taken already is (its future can no longer be cancelled)."""
    (account, taken_subject), (other, dropped_subject), (third, later_subject) = (
        pipeline.customer(),
        pipeline.customer(),
        pipeline.customer(),
    )
    lock = sessions(pipeline.engine)._lock
    assert lock is not None
    writer = OutboxWriter(pipeline.engine, linger=0)

    def accept(who: LocalAccount, of: Subject) -> Future[ConsentRequest]:
        change = ConsentChange(
            ChangeKind.GRANT, of, pipeline.partner, PURPOSE, EMAIL, nonce=0, deadline=int(time.time()) + 600
        )
        signed = SignedChange(change, eip712.sign(bytes(who.key), pipeline.registry.domain, change))
        return writer.accept(signed, who.address, lambda: 0)

    try:
        with lock:  # another writer holds the lock: the writer waits for it with the first change taken
            taken = accept(account, taken_subject)
            deadline = time.monotonic() + 10
            while writer._queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            gave_up = taken.cancel()  # what a 30 s timeout does to the future it waits on
            dropped = accept(other, dropped_subject)
            assert dropped.cancel()  # still queued: its caller gave up before the writer took it
        assert not gave_up
        assert taken.result(10).nonce == 0
        assert accept(third, later_subject).result(10).nonce == 0  # the writer lives on
    finally:
        writer.close()
    assert pipeline.outbox.next_nonce(dropped_subject, 0) == 0  # nothing of the abandoned change was kept
    assert pipeline.outbox.next_nonce(taken_subject, 0) == 1


def test_changes_that_arrive_while_the_outbox_writer_waits_for_the_lock_join_its_transaction(
    pipeline: Pipeline,
) -> None:
    """Group commit across the wait for the write lock: what arrives meanwhile is stored with the batch
    (one transaction), not in a batch of its own after another wait. A subject new to the writer needs
    its nonce from the chain, never asked under the lock: it and what follows it go to the next batch."""
    (account, known), (other, new) = pipeline.customer(), pipeline.customer()
    lock = sessions(pipeline.engine)._lock
    assert lock is not None
    commits: list[str] = []
    writer = OutboxWriter(pipeline.engine, linger=0)

    def signed(who: LocalAccount, of: Subject, nonce: int) -> SignedChange:
        change = ConsentChange(
            ChangeKind.GRANT, of, pipeline.partner, PURPOSE, EMAIL, nonce=nonce, deadline=int(time.time()) + 600
        )
        return SignedChange(change, eip712.sign(bytes(who.key), pipeline.registry.domain, change))

    def chain_nonce(of: Subject) -> int:
        assert not lock._thread_lock._is_owned(), "the chain was asked under the write lock"  # type: ignore[attr-defined]
        return pipeline.registry.nonce_of(of)

    def accept(who: LocalAccount, of: Subject, nonce: int) -> Future[ConsentRequest]:
        return writer.accept(signed(who, of, nonce), who.address, lambda: chain_nonce(of))

    try:
        assert accept(account, known, 0).result(10).nonce == 0  # the writer knows this subject now
        sa_event.listen(pipeline.engine, "commit", lambda _c: commits.append(threading.current_thread().name))
        with lock:  # another writer holds the lock
            waiting = accept(account, known, 1)
            deadline = time.monotonic() + 10
            while writer._queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)  # taken from the queue: the writer waits for the lock
            arrived = [accept(account, known, 2), accept(account, known, 3), accept(other, new, 0)]
            after = accept(account, known, 4)
        stored = [f.result(10) for f in (waiting, *arrived, after)]
    finally:
        writer.close()
    assert [r.nonce for r in stored] == [1, 2, 3, 0, 4]
    assert commits.count("outbox-writer") == 2
    # One transaction (one time of acceptance) for the batch and what joined it, one for the rest.
    assert len({r.created_at for r in stored[:3]}) == 1
    assert len({r.created_at for r in stored[3:]}) == 1
    assert stored[0].created_at != stored[3].created_at


def test_the_outbox_writer_asks_the_chain_for_many_new_subjects_nonces_in_one_go(pipeline: Pipeline) -> None:
    customers = [pipeline.customer() for _ in range(3)]
    account, subject = customers[0]
    first = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
    pipeline.settle(lambda: pipeline.statuses(first) == [RequestStatus.CONFIRMED])
    batches: list[list[bytes]] = []

    def chain_nonces(subjects: Sequence[bytes]) -> dict[bytes, int]:
        batches.append(list(subjects))
        return pipeline.registry.nonces_of(subjects)

    def one_by_one() -> int:
        raise AssertionError("asked alone although the batch could be asked together")

    def signed(account: LocalAccount, of: Subject, nonce: int) -> SignedChange:
        change = ConsentChange(
            ChangeKind.GRANT, of, pipeline.partner, PURPOSE, EMAIL, nonce=nonce, deadline=int(time.time()) + 600
        )
        return SignedChange(change, eip712.sign(bytes(account.key), pipeline.registry.domain, change))

    writer = OutboxWriter(pipeline.engine, linger=0.05, chain_nonces=chain_nonces)  # all in one batch
    try:
        # The first customer's next nonce (1) is on the chain but not in this writer: the others have none.
        futures = [writer.accept(signed(a, s, 1 if s == subject else 0), a.address, one_by_one) for a, s in customers]
        assert [f.result(10).nonce for f in futures] == [1, 0, 0]
    finally:
        writer.close()
    # The outbox knew the first customer's nonce; the chain was asked for the two others, together.
    assert batches == [[customers[1][1], customers[2][1]]]


def test_a_batch_one_of_whose_requests_left_the_queue_after_it_was_read_is_not_claimed_or_sent(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relayer claims a batch by its requests' seqs among pending requests, checked by count: a
    request that left the queue between reading the batch and claiming it makes it claim nothing and
    send nothing (the batch is read again next step)."""
    first, middle, last = (pipeline.accept(*pipeline.customer(), ChangeKind.GRANT, EMAIL) for _ in range(3))
    sent = _change_between_read_and_claim(pipeline, monkeypatch, middle, RequestStatus.FAILED)
    assert pipeline.relayer.step() == 0
    monkeypatch.undo()
    assert sent == []
    with sessions(pipeline.engine)() as session:
        assert session.scalar(select(func.count()).select_from(RelayBatch)) == 0
    assert pipeline.statuses(first, middle, last) == [
        RequestStatus.PENDING,
        RequestStatus.FAILED,
        RequestStatus.PENDING,
    ]
    # Read again, the batch is what is pending now, and goes on-chain once.
    pipeline.settle(lambda: set(pipeline.statuses(first, last)) == {RequestStatus.CONFIRMED})
    assert sorted(e.subject for e in pipeline.events()) == sorted(r.subject for r in (first, last))


def test_a_request_that_became_pending_after_the_batch_was_read_is_not_swept_into_it(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request between the batch's own (by seq) that became pending after the batch was read is not
    claimed with it: the batch is claimed by its requests' seqs, not by their range; the newcomer
    goes in a later batch, and every request reaches the chain once."""
    first, middle, last = (pipeline.accept(*pipeline.customer(), ChangeKind.GRANT, EMAIL) for _ in range(3))
    table = cast(Table, ConsentRequest.__table__)
    with sessions(pipeline.engine).begin() as session:  # not pending when the batch is read: first and last only
        session.execute(update(table).where(table.c.id == middle.id).values(status=RequestStatus.SUBMITTED))
    sent = _change_between_read_and_claim(pipeline, monkeypatch, middle, RequestStatus.PENDING)
    assert pipeline.relayer.step(poll=False) == 2
    monkeypatch.undo()
    assert len(sent) == 1
    with sessions(pipeline.engine)() as session:
        claimed = session.scalars(select(ConsentRequest.id).where(ConsentRequest.status == RequestStatus.SUBMITTED))
        assert sorted(claimed) == sorted([first.id, last.id])
    assert pipeline.statuses(middle) == [RequestStatus.PENDING]


def _change_between_read_and_claim(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, request: ConsentRequest, status: RequestStatus
) -> list[object]:
    """Set `request`'s status between the relayer's reading of a batch and its claim; sends nothing.
    Returns the list the relayer's sends are put in."""
    table = cast(Table, ConsentRequest.__table__)
    sign = pipeline.relayer.sender.sign_with_nonces
    sent: list[object] = []

    def sign_then_change(requests: object) -> object:
        signed = sign(requests)  # type: ignore[arg-type]
        with sessions(pipeline.engine).begin() as session:
            session.execute(update(table).where(table.c.id == request.id).values(status=status))
        return signed

    monkeypatch.setattr(pipeline.relayer.sender, "sign_with_nonces", sign_then_change)
    monkeypatch.setattr(pipeline.relayer.sender, "send_raw", sent.append)
    return sent


def test_a_binding_the_chain_lost_is_bound_again_and_its_changes_wait_for_it(pipeline: Pipeline) -> None:
    bindings = Bindings(pipeline.engine, pipeline.registry)
    pipeline.relayer = Relayer(
        pipeline.engine,
        pipeline.registry,
        linger=0,
        holds=lambda error, subject, _partner: bindings.holds(error, subject),
    )
    pipeline.indexer.on_rollback = lambda _ancestor: bindings.check.set()
    before = pipeline.backend.rpc("evm_snapshot")
    account, stranger = Account.create(), Account.create()
    subject, unbound = Subject(keccak(bytes(account.key))), Subject(keccak(bytes(stranger.key)))
    first = bindings.bind(subject, account.address)
    quiet = Account.create()  # bound too, with no change of its own
    bindings.bind(Subject(keccak(bytes(quiet.key))), quiet.address)
    request = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
    pipeline.settle(lambda: pipeline.statuses(request) == [RequestStatus.CONFIRMED])
    assert bindings.restore() == 0  # the chain holds it: nothing to do
    # The node loses the blocks of the binding and of the change (a crash before its state was written).
    assert pipeline.backend.rpc("evm_revert", before) is True
    pipeline.relayer.sender.resync_nonce()
    pipeline.backend.rpc("anvil_mine", hex(30))
    bindings.check.clear()
    assert pipeline.indexer.step() < 0  # rolled back: the binding may be gone, so look
    assert bindings.check.is_set()
    assert pipeline.registry.controller_of(subject) is None
    assert pipeline.statuses(request) == [RequestStatus.PENDING]
    # Re-sent before its binding is back, the change is rejected as unbound: it waits, held out of the
    # batches meanwhile, while a change of a subject the service never bound fails for that reason as before.
    stray = pipeline.accept(stranger, unbound, ChangeKind.GRANT, EMAIL)

    def reverted() -> bool:
        with sessions(pipeline.engine)() as session:
            return session.scalar(select(func.count()).where(RelayBatch.status == "reverted")) > 0  # type: ignore[operator]

    pipeline.settle(lambda: reverted() and pipeline.statuses(stray) == [RequestStatus.FAILED])
    assert pipeline.outbox.request(stray.id).error_code == "unbound_subject"  # type: ignore[union-attr]
    assert pipeline.statuses(request) == [RequestStatus.PENDING]
    assert bindings.restore() == 2  # both, sent together
    assert pipeline.registry.controller_of(subject) == account.address
    assert pipeline.registry.controller_of(Subject(keccak(bytes(quiet.key)))) == quiet.address
    pipeline.settle(lambda: pipeline.statuses(request) == [RequestStatus.CONFIRMED])
    assert [(e.subject, e.nonce) for e in pipeline.events()] == [(subject, 0)]
    assert pipeline.registry.is_permitted(subject, pipeline.partner, PURPOSE, EMAIL)
    with sessions(pipeline.engine)() as session:
        record = session.get(BoundController, bytes(subject))
        assert record is not None
        assert record.tx_hash != first.tx_hash  # the new binding's transaction
    assert bindings.restore() == 0  # bound once more, not twice


def test_bindings_made_before_they_were_recorded_are_adopted_from_the_read_model(pipeline: Pipeline) -> None:
    _account, subject = pipeline.customer()  # bound straight on the registry, as before the record existed
    pipeline.settle(lambda: pipeline.indexer.step() == 0 and len(_controllers(pipeline)) == 1)
    bindings = Bindings(pipeline.engine, pipeline.registry)
    assert bindings.adopt_indexed() == 1
    assert bindings.recorded(subject)
    assert bindings.adopt_indexed() == 0


def _controllers(pipeline: Pipeline) -> list[bytes]:
    with sessions(pipeline.engine)() as session:
        return list(session.scalars(select(ControllerState.subject)))


def test_the_indexer_catches_up_in_transactions_of_whole_blocks_and_bounded_size(pipeline: Pipeline) -> None:
    """A long pause's backlog in one transaction held the write lock, which every request waits on, for
    hundreds of milliseconds: the indexer applies at most `max_events` logs at a time, in whole blocks."""
    customers = [pipeline.customer() for _ in range(2)]
    pipeline.settle(lambda: pipeline.indexer.step() == 0 and pipeline.indexer.cursor() >= pipeline.deploy_block)
    blocks: list[int] = []
    for account, subject in customers:  # two changes, each in a block of its own
        request = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
        pipeline.relayer.step()
        deadline = time.monotonic() + 30
        while pipeline.relayer.busy:
            assert time.monotonic() < deadline
            pipeline.relayer.step()
            time.sleep(0.02)
        sent = pipeline.outbox.request(request.id)
        assert sent is not None
        assert sent.tx_hash is not None
        blocks.append(pipeline.registry.w3.eth.get_transaction_receipt(HexStr(sent.tx_hash))["blockNumber"])
    pipeline.indexer.max_events = 1
    start = pipeline.indexer.cursor()
    assert pipeline.indexer.step() == 1
    assert blocks[0] <= pipeline.indexer.cursor() < blocks[1]  # up to the first block, not to the head
    assert pipeline.indexer.step() == 1  # the rest: no more than the limit, so up to the head
    assert pipeline.indexer.cursor() >= blocks[1]
    assert start < blocks[0] < blocks[1]


def test_whole_blocks_take_a_block_too_big_alone_and_never_split_one() -> None:
    logs = [{"blockNumber": hex(n)} for n in (5, 5, 5, 6, 7, 7)]
    assert _whole_blocks(logs, 2) == (logs[:3], 5)  # the first block alone has more
    assert _whole_blocks(logs, 4) == (logs[:4], 6)
    assert _whole_blocks(logs, 5) == (logs[:4], 6)  # not half of block 7


def test_an_indexer_whose_cursor_moved_under_it_records_nothing_twice(pipeline: Pipeline) -> None:
    # A leader that lost its lock may finish an indexer step after the next leader's indexer has moved on.
    account, subject = pipeline.customer()
    stale = Indexer(
        pipeline.backend.w3,
        pipeline.engine,
        pipeline.deploy_block,
        followers=[ConsentFollower(pipeline.registry.address, pipeline.engine.dialect)],
    )
    read_before = stale.cursor()
    request = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
    pipeline.settle(lambda: pipeline.statuses(request) == [RequestStatus.CONFIRMED])
    assert len(pipeline.events()) == 1
    stale.cursor = lambda: read_before  # type: ignore[method-assign]  # read before the other's step
    assert stale.step() == 0
    assert len(pipeline.events()) == 1  # not recorded again
    assert pipeline.indexer.cursor() > read_before


def test_a_recovery_is_indexed_as_key_history_and_rolled_back_with_its_blocks(pipeline: Pipeline) -> None:
    """Recovery events are kept in the history and move the bound key, never a consent; a
    reorganisation that drops the completion puts the old key back in the read model."""
    account, subject = pipeline.customer()
    request = pipeline.accept(account, subject, ChangeKind.GRANT, EMAIL)
    pipeline.settle(lambda: pipeline.statuses(request) == [RequestStatus.CONFIRMED])
    new_key = Account.create()
    pipeline.registry.start_recovery(subject, new_key.address)
    before = pipeline.backend.rpc("evm_snapshot")
    pipeline.backend.increase_time(72 * 3600)
    pipeline.registry.complete_recovery(subject)

    def controller() -> str | None:
        with sessions(pipeline.engine)() as session:
            state = session.get(ControllerState, bytes(subject))
            return None if state is None else state.controller

    def kinds() -> list[int]:
        with sessions(pipeline.engine)() as session:
            rows = session.scalars(
                select(ConsentEvent.kind)
                .where(ConsentEvent.subject == bytes(subject))
                .order_by(ConsentEvent.block_number, ConsentEvent.log_index)
            )
            return list(rows)

    pipeline.settle(lambda: controller() == new_key.address)
    assert kinds() == [2, 0, 3, 2]  # bound, granted, recovery started, bound (the new key)
    with sessions(pipeline.engine)() as session:  # one consent, as before: the recovery changed none
        assert (
            session.scalar(select(func.count()).select_from(ConsentState).where(ConsentState.subject == subject)) == 1
        )
    assert pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == EMAIL
    assert pipeline.backend.rpc("evm_revert", before) is True
    pipeline.backend.rpc("anvil_mine", hex(30))
    assert pipeline.indexer.step() < 0  # rolled back
    assert controller() == account.address
    assert kinds() == [2, 0, 3]


def test_a_batch_takes_whole_customers_so_that_the_next_batch_of_the_block_carries_others(pipeline: Pipeline) -> None:
    """Four customers with two changes each, accepted in turn (a1 b1 c1 d1 a2 b2 c2 d2), and batches of
    four: the first batch takes a and b whole, the second c and d, both sent at once. Taking the four
    oldest changes (a1 b1 c1 d1) put every customer in the first batch, and left the rest waiting for it
    to be confirmed: one transaction per block however much was pending."""
    pipeline.relayer = Relayer(pipeline.engine, pipeline.registry, linger=0, max_batch=4)
    customers = [pipeline.customer() for _ in range(4)]
    requests = [
        pipeline.accept(account, subject, kind, EMAIL)
        for kind in (ChangeKind.GRANT, ChangeKind.REVOKE)
        for account, subject in customers
    ]
    assert pipeline.relayer.step(poll=False) == 8  # all eight on their way, in two transactions
    with sessions(pipeline.engine)() as session:
        rows = session.execute(select(ConsentRequest.subject, ConsentRequest.batch_id, ConsentRequest.nonce)).all()
    batches: dict[int, set[bytes]] = {}
    for subject, batch_id, _nonce in rows:
        assert batch_id is not None
        batches.setdefault(batch_id, set()).add(subject)
    assert len(batches) == 2
    first, second = (batches[batch_id] for batch_id in sorted(batches))
    assert first == {bytes(customers[0][1]), bytes(customers[1][1])}  # the oldest customers first
    assert second == {bytes(customers[2][1]), bytes(customers[3][1])}
    pipeline.settle_all(*requests)
    assert pipeline.statuses(*requests) == [RequestStatus.CONFIRMED] * 8
    assert all(pipeline.reader.effective(subject, pipeline.partner, PURPOSE) == 0 for _, subject in customers)
