"""The `rpc` backend on a chain that behaves as Hyperledger Besu (QBFT) documents: a real anvil node
behind `tests/ledger/besu_proxy.py`, which refuses eth_getLogs over more than 5,000 blocks and JSON-RPC
batches of more than 1,024 calls, keeps revert reasons out of receipts, gives blocks a 97-byte
proof-of-authority `extraData` and answers a gas price of 1,000 wei on a network whose base fee is 0.

The service's contracts are deployed through the proxy by keys that hold no ether, and then more empty
blocks are mined than one eth_getLogs may span, before anything else happens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3 import Web3
from web3.exceptions import ExtraDataLengthError
from web3.types import RPCEndpoint

from ledger import eip712
from ledger.assembly import Hooks, Keys, Lanes, chain_writers, open_contracts, open_ledger
from ledger.backends import AnvilBackend, RpcBackend, http_provider
from ledger.compiler import Artifact
from ledger.consent import ConsentEvent, ConsentFollower, ConsentRegistryClient, RequestStatus, SignedChange
from ledger.consent.client import GRANTED, REVOKED, batch_gas
from ledger.contracts import Deployment, RevertDecoder, ensure_deployed
from ledger.eip712 import ChangeKind, ConsentChange
from ledger.errors import BatchItemFailed, InvalidSignature, NonceMismatch
from ledger.indexer import Indexer
from ledger.settings import ChainSettings, ToolchainSettings
from ledger.store import create_schema, make_engine, sessions
from ledger.tx import TxRequest, TxSender
from ledger.types import Subject
from tests.ledger.besu_proxy import BATCH_ERROR, MAX_LOGS_RANGE, MIN_GAS_PRICE, POA_EXTRA_DATA, RANGE_ERROR, BesuProxy

pytestmark = [pytest.mark.anvil, pytest.mark.slow]  # mining the empty blocks takes anvil about 20 s

PURPOSE = eip712.purpose_id("marketing.email")
EMAIL, PHONE = 1, 2
EMPTY_BLOCKS = MAX_LOGS_RANGE + 100


@dataclass
class Besu:
    node: AnvilBackend
    proxy: BesuProxy
    data_dir: Path
    keys: Keys
    deployment: Deployment
    bound: Subject  # a customer whose key was bound before the empty blocks

    def settings(self, **overrides: Any) -> ChainSettings:
        """The rpc backend through the proxy, final on inclusion as QBFT blocks are."""
        return ChainSettings(backend="rpc", rpc_url=self.proxy.url, confirmations=0, **overrides)

    def raw(self, method: str, *params: Any) -> dict[str, Any]:
        return dict(Web3(http_provider(self.proxy.url, 30)).provider.make_request(RPCEndpoint(method), list(params)))


@pytest.fixture(scope="module")
def besu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Besu]:
    root = tmp_path_factory.mktemp("besu")
    (root / "node").mkdir()
    (root / "service").mkdir()
    # anvil runs with a base fee of 0 (`ledger.anvil`), as a genesis with `zeroBaseFee` has it.
    node = AnvilBackend(
        ChainSettings(backend="anvil", block_time=0.05, state_interval=3600), Account.create(), root / "node"
    )
    node.start()
    try:
        with BesuProxy(node.url) as proxy:
            keys = Keys(Account.create(), Account.create())  # neither holds any ether
            settings = ChainSettings(backend="rpc", rpc_url=proxy.url)
            with open_contracts(settings, ToolchainSettings(), root / "service", keys=keys) as contracts:
                customer = Account.create()
                bound = Subject(keccak(bytes(customer.key)))
                contracts.consent.bind_controller(bound, customer.address)
                deployment = contracts.deployment
            http_provider(node.url, 300).make_request(RPCEndpoint("anvil_mine"), [hex(EMPTY_BLOCKS)])
            yield Besu(node, proxy, root / "service", keys, deployment, bound)
    finally:
        node.stop()


def test_the_proxy_refuses_what_besu_refuses(besu: Besu) -> None:
    assert besu.raw("eth_getLogs", {"fromBlock": "0x0", "toBlock": "latest"})["error"] == RANGE_ERROR
    assert "result" in besu.raw("eth_getLogs", {"fromBlock": "0x0", "toBlock": hex(MAX_LOGS_RANGE)})
    w3 = Web3(http_provider(besu.proxy.url, 30))
    assert w3.provider.make_batch_request([(RPCEndpoint("eth_blockNumber"), [])] * 1_025) == {  # type: ignore[attr-defined]
        "jsonrpc": "2.0",
        "id": None,
        "error": BATCH_ERROR,
    }
    assert len(w3.provider.make_batch_request([(RPCEndpoint("eth_blockNumber"), [])] * 1_024)) == 1_024  # type: ignore[attr-defined]
    latest = besu.raw("eth_getBlockByNumber", "latest", False)["result"]
    assert (int(latest["baseFeePerGas"], 16), int(besu.raw("eth_gasPrice")["result"], 16)) == (0, MIN_GAS_PRICE)
    assert bytes.fromhex(latest["extraData"][2:]) == POA_EXTRA_DATA
    with pytest.raises(ExtraDataLengthError):  # what web3 does with such a block, unless told it is PoA
        w3.eth.get_block("latest")


def test_blocks_with_poa_extra_data_are_read(besu: Besu) -> None:
    backend = RpcBackend(besu.settings(), Account.create())
    with backend:
        block = backend.w3.eth.get_block("latest")
    assert block["proofOfAuthorityData"] == POA_EXTRA_DATA


def test_transactions_are_free_where_the_base_fee_is_0(besu: Besu) -> None:
    """The deployment went through with keys that hold nothing: every transaction at a gas price of 0
    (at eth_gasPrice's 1,000 wei the node refused them: the upfront cost exceeds the balance)."""
    for contract in besu.deployment.contracts.values():
        assert besu.raw("eth_getTransactionByHash", contract.tx_hash)["result"]["gasPrice"] == "0x0"
    for key in (besu.keys.operator, besu.keys.accessor):
        assert besu.raw("eth_getBalance", key.address, "latest")["result"] == "0x0"


def test_the_ledger_keeps_consent_across_more_blocks_than_one_get_logs_spans(besu: Besu, tmp_path: Path) -> None:
    """The service's ledger layer on the rpc backend, started again on its deployment: the keys' roles
    read from the history, consent changes put on-chain by the relayer, and the indexer following from
    the deploy block across the empty blocks, each eth_getLogs within Besu's range."""
    refused, asked = besu.proxy.refused.copy(), len(besu.proxy.log_ranges)
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    create_schema(engine)
    chain = besu.settings()
    ledger = open_ledger(chain, ToolchainSettings(), engine, besu.data_dir, keys=besu.keys, tiers={})
    lanes = Lanes(max_batch=100, linger=0, max_in_flight=4)
    writers = chain_writers(ledger, engine, lanes, Hooks(holds=lambda *_: False, on_rollback=lambda _: None))
    try:
        w3 = ledger.w3
        partner = Account.create().address
        receipt = ledger.consent.add_partner(partner)
        ledger.access_log.wait_final(receipt, chain.confirmations)  # 0: final once in a block
        customers = [Account.create() for _ in range(3)]
        subjects = [Subject(keccak(bytes(c.key))) for c in customers]
        ledger.consent.bind_controllers(list(zip(subjects, [c.address for c in customers], strict=True)))

        def accept(customer: LocalAccount, subject: Subject, kind: ChangeKind, bits: int) -> str:
            chain_nonce = ledger.consent.nonce_of(subject)
            deadline = int(w3.eth.get_block("latest")["timestamp"]) + 3600
            change = ConsentChange(
                kind, subject, partner, PURPOSE, bits, ledger.outbox.next_nonce(subject, chain_nonce), deadline
            )
            signature = eip712.sign(bytes(customer.key), ledger.consent.domain, change)
            return ledger.outbox.accept(SignedChange(change, signature), customer.address, chain_nonce).id

        def settle(*ids: str) -> None:
            deadline = time.monotonic() + 60
            while any(ledger.outbox.request(i).status != RequestStatus.CONFIRMED for i in ids):  # type: ignore[union-attr]
                assert time.monotonic() < deadline, [ledger.outbox.request(i) for i in ids]
                writers.relayer.step()
                writers.indexer.step()
                time.sleep(0.02)

        grants = [accept(c, s, ChangeKind.GRANT, EMAIL | PHONE) for c, s in zip(customers, subjects, strict=True)]
        settle(*grants)
        revoke = accept(customers[0], subjects[0], ChangeKind.REVOKE, PHONE)
        settle(revoke)

        reader = ledger.consent_reader
        assert [reader.effective(s, partner, PURPOSE) for s in subjects] == [EMAIL, EMAIL | PHONE, EMAIL | PHONE]
        assert writers.indexer.cursor() - ledger.deployment.deploy_block > MAX_LOGS_RANGE
        with sessions(engine)() as session:  # the binding made before the empty blocks is indexed too
            assert session.query(ConsentEvent).filter(ConsentEvent.subject == besu.bound).count() == 1
        # A subject's whole history, from block 0, as the relayer reads it (a change that lost its nonce).
        history = ledger.consent.get_logs([[GRANTED, REVOKED], "0x" + subjects[0].hex()])
        assert len(history) == 2
        for request_id in (*grants, revoke):
            request = ledger.outbox.request(request_id)
            assert request is not None
            assert besu.raw("eth_getTransactionByHash", request.tx_hash)["result"]["gasPrice"] == "0x0"
        assert besu.proxy.refused == refused  # nothing was asked that Besu refuses
        assert max(besu.proxy.log_ranges[asked:]) == MAX_LOGS_RANGE
    finally:
        writers.close()
        ledger.close()
        engine.dispose()


def test_a_node_with_a_lower_logs_range_is_asked_for_half_ranges(besu: Besu, tmp_path: Path) -> None:
    """A Besu started with `--rpc-max-logs-range=1000`, the service left at 5,000: the indexer halves
    its range until the node answers, and keeps that span."""
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    create_schema(engine)
    backend = RpcBackend(besu.settings(), Account.create())
    besu.proxy.max_logs_range = 1_000
    try:
        w3 = backend.start()
        registry = besu.deployment.address("ConsentRegistry")
        indexer = Indexer(
            w3, engine, besu.deployment.deploy_block, followers=[ConsentFollower(registry, engine.dialect)]
        )
        refused, asked = besu.proxy.refused["eth_getLogs"], len(besu.proxy.log_ranges)
        head = int(w3.eth.block_number)
        while indexer.cursor() < head:
            indexer.step()
        assert besu.proxy.refused["eth_getLogs"] - refused == 3  # 5,000, 2,500 and 1,250 blocks
        assert indexer.log_fetcher.span == 625
        assert set(besu.proxy.log_ranges[asked:]) <= set(range(1, 626))
        with sessions(engine)() as session:
            assert session.query(ConsentEvent).filter(ConsentEvent.subject == besu.bound).count() == 1
    finally:
        besu.proxy.max_logs_range = MAX_LOGS_RANGE
        backend.stop()
        engine.dispose()


def test_json_rpc_batches_stay_within_the_nodes_limit(besu: Besu) -> None:
    backend = RpcBackend(besu.settings(rpc_timeout=30), Account.create())  # 1,024 transactions a call
    with backend:
        sender = TxSender(backend.w3, backend.operator)
        asked, refused = len(besu.proxy.batches), besu.proxy.refused["batch"]
        nothing = TxRequest(to=backend.operator.address, data=b"", gas=21_000)
        receipts = sender.wait(sender.send([nothing] * 1_100))  # sent and polled in batches
    assert [r.status for r in receipts] == [1] * 1_100
    assert besu.proxy.refused["batch"] == refused
    assert max(besu.proxy.batches[asked:]) == 1_024


def test_why_a_transaction_reverted_is_found_though_receipts_do_not_say(
    besu: Besu, artifacts: dict[str, Artifact]
) -> None:
    operator = Account.create()
    backend = RpcBackend(besu.settings(), operator)
    with backend:
        w3 = backend.w3
        sender = TxSender(w3, operator)
        plan: Any = [("ConsentRegistry", lambda _d: [operator.address, operator.address])]
        deployment = ensure_deployed(w3, sender, artifacts, plan, None)
        registry = ConsentRegistryClient(
            w3,
            deployment.address("ConsentRegistry"),
            artifacts["ConsentRegistry"],
            sender,
            RevertDecoder(list(artifacts.values())),
        )
        partner, customer = Account.create().address, Account.create()
        subject = Subject(keccak(bytes(customer.key)))
        registry.add_partner(partner)
        registry.bind_controller(subject, customer.address)
        deadline = int(w3.eth.get_block("latest")["timestamp"]) + 3600

        def signed(nonce: int, key: bytes) -> bytes:
            change = ConsentChange(ChangeKind.GRANT, subject, partner, PURPOSE, EMAIL, nonce, deadline)
            return registry.encode_batch([SignedChange(change, eip712.sign(key, registry.domain, change))])

        # Fails on its own: the call at the block before says why.
        forged = signed(0, bytes(Account.create().key))
        (failed,) = sender.wait(sender.send([TxRequest(registry.address, forged, batch_gas(1))]))
        assert failed.status == 0
        assert "revertReason" not in besu.raw("eth_getTransactionReceipt", failed.tx_hash)["result"]
        reason = registry.revert_reason(forged, failed)
        assert isinstance(reason, BatchItemFailed)
        assert (reason.index, type(reason.cause), reason.tx_hash) == (0, InvalidSignature, failed.tx_hash)  # type: ignore[attr-defined]

        # Fails because of the transaction before it in the same block (the same change: its nonce was
        # used). At the block before it would pass; at its own block it fails as it did.
        grant = signed(0, bytes(customer.key))
        with besu.node.node.mining_paused():
            hashes = sender.send([TxRequest(registry.address, grant, batch_gas(1))] * 2)
        applied, failed = sender.wait(hashes)
        assert (applied.status, failed.status, failed.block_number) == (1, 0, applied.block_number)
        reason = registry.revert_reason(grant, failed)
        assert isinstance(reason, BatchItemFailed)
        assert isinstance(reason.cause, NonceMismatch)
        assert reason.cause.args_by_name["currentNonce"] == 1


def test_blocks_are_final_on_inclusion() -> None:
    """QBFT blocks are final when made: Besu's guides ask for 0 confirmations, and the setting takes it
    (as 1: the block itself)."""
    assert ChainSettings(backend="rpc", confirmations=0).confirmations == 0
