"""The conformance suite on a real geth node managed by our code (the default for `serve`), plus what
only it promises: blocks on disk when made, so a restart or a SIGKILL keeps every one of them."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_typing import HexStr

from ledger.backends import ChainBackend, GethBackend
from ledger.contracts import ensure_deployed
from ledger.settings import ChainSettings
from ledger.tx import TxRequest, TxSender
from tests.ledger.access_conformance import AccessLogConformance
from tests.ledger.conformance import EMAIL, ChainConformance
from tests.ledger.conftest import Accounts, Ledger, make_ledger, registry_plan
from tests.ledger.loyalty_conformance import LoyaltyConformance


def geth_settings(**overrides: object) -> ChainSettings:
    """Blocks every 50 ms, the chain's clock let run ahead (tests send one transaction after another; at
    the default lead of 2 s they would get one block a second, see `test_blocks_come_only_for_work…`)."""
    settings: dict[str, object] = {"block_time": 0.05, "max_clock_lead": 3600, **overrides}
    return ChainSettings(backend="geth", **settings)  # type: ignore[arg-type]


@pytest.mark.geth
class TestGeth(ChainConformance, LoyaltyConformance, AccessLogConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, accounts: Accounts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChainBackend]:
        with GethBackend(geth_settings(), accounts.operator, tmp_path_factory.mktemp("geth")) as backend:
            yield backend


def _reconnect(backend: GethBackend, accounts: Accounts) -> None:
    for account in (accounts.admin, accounts.operator, accounts.stranger, accounts.accessor):
        accounts.senders[account.address] = TxSender(backend.w3, account, receipt_timeout=60)


@pytest.mark.geth
@pytest.mark.parametrize("how", ["stop", "sigkill"])
def test_every_mined_block_survives_a_restart_or_a_sigkill(
    how: str, tmp_path: Path, artifacts: dict[str, object]
) -> None:
    """A block is on disk when it is made: after a graceful stop, and after a SIGKILL of the node right
    after a block, the chain is the same to the last block (head, hashes, receipts, logs, state)."""
    accounts = Accounts()
    backend = GethBackend(geth_settings(), accounts.operator, tmp_path)
    backend.start()
    try:
        ledger = make_ledger(backend, artifacts, accounts)  # type: ignore[arg-type]
        record = tmp_path / "deployment.json"
        ledger.deployment.save(record)
        receipts = [ledger.registry.apply(ledger.grant(EMAIL))]
        receipts.append(ledger.registry.apply(ledger.revoke(EMAIL)))
        receipts.append(ledger.registry.apply(ledger.grant(EMAIL)))
        head = backend.w3.eth.block_number
        hashes = [bytes(backend.w3.eth.get_block(n)["hash"]) for n in range(head + 1)]
        assert backend.node.checkpoints.durable_block() == head  # what a waiting export reads: no dump
        if how == "stop":
            backend.stop()
        else:
            pid = backend.node.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # the process only: what it had written is the kernel's
            backend.kill()
    except BaseException:
        backend.stop()
        raise

    backend.start()
    try:
        w3 = backend.w3
        assert w3.eth.block_number >= head
        assert [bytes(w3.eth.get_block(n)["hash"]) for n in range(head + 1)] == hashes
        for receipt in receipts:
            assert w3.eth.get_transaction_receipt(HexStr(receipt.tx_hash))["blockNumber"] == receipt.block_number
        _reconnect(backend, accounts)
        operator = accounts.senders[accounts.operator.address]
        again = ensure_deployed(w3, operator, ledger.artifacts, registry_plan(accounts), record)
        assert again.contracts == ledger.deployment.contracts  # reused, not redeployed
        assert ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)
        logs = w3.eth.get_logs(
            {"address": ledger.deployment.address("ConsentRegistry"), "fromBlock": 0, "toBlock": "latest"}
        )
        assert {r.tx_hash for r in receipts} <= {"0x" + bytes(log["transactionHash"]).hex() for log in logs}
        # and it goes on: a new change is mined after the restart
        assert ledger.registry.apply(ledger.revoke(EMAIL)).block_number > head
    finally:
        backend.stop()


@pytest.fixture
def ledger_on_geth(tmp_path: Path, artifacts: dict[str, object]) -> Iterator[Ledger]:
    accounts = Accounts()
    with GethBackend(geth_settings(max_clock_lead=LEAD), accounts.operator, tmp_path) as backend:
        yield make_ledger(backend, artifacts, accounts)  # type: ignore[arg-type]


LEAD = ChainSettings().max_clock_lead  # the default


@pytest.mark.geth
def test_blocks_come_only_for_work_and_never_run_ahead_of_the_clock(ledger_on_geth: Ledger) -> None:
    """No empty blocks; under sustained load about one block a second, so that a block's timestamp is
    never more than LEAD seconds ahead of the clock (timestamps are whole seconds and strictly
    increase: blocks every 50 ms would each move the chain's clock a second on)."""
    w3 = ledger_on_geth.backend.w3
    start = w3.eth.block_number
    time.sleep(1.0)
    assert w3.eth.block_number == start  # idle: nothing mined
    sender = ledger_on_geth.accounts.senders[ledger_on_geth.accounts.stranger.address]
    hashes: list[str] = []
    began = time.time()
    while time.time() - began < 6:  # a transaction every 50 ms for 6 s
        hashes += sender.send([TxRequest(to=ledger_on_geth.accounts.stranger.address, data=b"", gas=21_000)])
        time.sleep(0.05)
    receipts = sender.wait(hashes)
    assert all(r.status == 1 for r in receipts)
    blocks = [w3.eth.get_block(n) for n in range(start + 1, w3.eth.block_number + 1)]
    stamps = [int(b["timestamp"]) for b in blocks]
    assert stamps == sorted(set(stamps))
    assert max(stamps) <= int(time.time()) + LEAD
    assert 3 <= len(blocks) <= int(time.time() - began) + 1 + LEAD


@pytest.mark.geth
def test_the_geth_make_setup_builds_is_the_one_the_code_expects() -> None:
    import re
    import subprocess

    from ledger.geth import GETH_VERSION, find_geth
    from ledger.settings import ToolchainSettings

    makefile = (ToolchainSettings().project_root / "Makefile").read_text()
    assert re.search(r"^GETH_VERSION := (\S+)$", makefile, re.M)[1] == GETH_VERSION  # type: ignore[index]
    printed = subprocess.run([str(find_geth()), "version"], capture_output=True, text=True, check=True).stdout
    assert f"Version: {GETH_VERSION.removeprefix('v')}-stable" in printed


@pytest.mark.geth
def test_a_block_as_full_as_the_setting_allows_leaves_the_base_fee_at_zero(ledger_on_geth: Ledger) -> None:
    """EIP-1559 raises the base fee after a block above half the gas limit, and at a few wei it never
    comes down again (the 1/8 decrease rounds to 0): transactions priced before (the relayer's sender
    prices once) would never be mined. A bulk load filled blocks so (bench_scale stalled on it)."""
    from scripts.bench_scale import FILLER_INIT

    ledger = ledger_on_geth
    w3 = ledger.backend.w3
    sender = ledger.accounts.senders[ledger.accounts.stranger.address]
    (deployed,) = sender.wait(sender.send([TxRequest(to=None, data=FILLER_INIT, gas=200_000)]))
    assert deployed.contract_address is not None
    setting = ChainSettings().gas_limit
    slots = int(setting * 0.6) // 22_200  # 60 % of the setting's gas: over half of it
    data = (1 << 128).to_bytes(32, "big") + slots.to_bytes(32, "big")
    (full,) = sender.wait(sender.send([TxRequest(to=deployed.contract_address, data=data, gas=int(setting * 0.65))]))
    assert full.status == 1
    assert full.gas_used > setting // 2
    (after,) = sender.wait(sender.send([TxRequest(to=ledger.accounts.stranger.address, data=b"", gas=21_000)]))
    for number in (full.block_number + 1, after.block_number):
        assert w3.eth.get_block(number)["baseFeePerGas"] == 0


@pytest.mark.geth
def test_the_miner_survives_a_failure_it_did_not_expect(
    ledger_on_geth: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any error while making a block is logged and the miner goes on (it must never die quietly: the
    node would look running and no block would come again)."""
    node = ledger_on_geth.backend.node  # type: ignore[attr-defined]
    real = node._pending
    calls = {"n": 0}

    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("pending")  # not an OSError: it killed the miner thread before
        return int(real())

    monkeypatch.setattr(node, "_pending", flaky)
    assert ledger_on_geth.registry.apply(ledger_on_geth.grant(EMAIL)).status == 1
    assert calls["n"] > 1


@pytest.mark.geth
def test_a_clock_stepped_back_slows_the_chain_but_does_not_stop_it(ledger_on_geth: Ledger) -> None:
    """The host's clock goes back 30 s (NTP, a resumed VM): the newest block is now 30 s ahead, past the
    lead. Blocks still come (one every two seconds), and the lead shrinks."""
    node = ledger_on_geth.backend.node  # type: ignore[attr-defined]
    node.offset -= 30
    started = time.monotonic()
    receipt = ledger_on_geth.registry.apply(ledger_on_geth.grant(EMAIL))
    assert receipt.status == 1
    assert time.monotonic() - started < 10


@pytest.mark.geth
def test_a_data_dir_of_another_chain_id_is_refused_in_plain_words(tmp_path: Path) -> None:
    from ledger.errors import NodeStartError

    first = GethBackend(geth_settings(), Accounts().operator, tmp_path)
    first.start()  # the chain, id 31337
    first.stop()
    started = time.monotonic()
    with pytest.raises(NodeStartError, match="has chain id 31337; CONSENT_LEDGER_CHAIN_CHAIN_ID is 7"):
        GethBackend(geth_settings(chain_id=7), Accounts().operator, tmp_path).start()
    assert time.monotonic() - started < 20  # said at once, not after waiting out the start timeout


@pytest.mark.geth
def test_calls_that_rewind_the_chain_or_make_blocks_are_not_served_on_its_http_port(tmp_path: Path) -> None:
    """Any local user reaches the loopback HTTP port: `debug_setHead` there would throw away mined
    blocks, `testing_commitBlockV1` make blocks past the service's clock, `debug_writeMemProfile`
    write files as the node's user. Those are served on the IPC socket, readable by its owner alone."""
    import stat

    with GethBackend(geth_settings(), Accounts().operator, tmp_path) as backend:
        node = backend.node
        for method, params in (
            ("debug_setHead", ["0x0"]),
            ("testing_commitBlockV1", [{}, [], None]),
            ("debug_writeMemProfile", [str(tmp_path / "profile")]),
        ):
            answer = backend.w3.provider.make_request(method, params)  # type: ignore[arg-type]
            assert "does not exist" in answer["error"]["message"], (method, answer)
        assert not (tmp_path / "profile").exists()
        assert stat.S_IMODE(node.ipc_path.stat().st_mode) == 0o600
        head = backend.w3.eth.block_number
        node.commit(node.last_time + 1, [])  # the miner's call, over the socket
        assert backend.w3.eth.block_number == head + 1


@pytest.mark.geth
def test_a_state_dir_too_deep_for_a_socket_path_gets_its_socket_in_a_private_dir(tmp_path: Path) -> None:
    """A Unix socket's path has at most 107 bytes: a deep data dir's socket goes elsewhere, found again
    from the data dir's path by whichever process looks (a restarted service adopting the node)."""
    import stat

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with GethBackend(geth_settings(), Accounts().operator, deep) as backend:
        node = backend.node
        assert not node.ipc_path.is_relative_to(deep)
        private = node.ipc_path.parent
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        assert GethBackend(geth_settings(), Accounts().operator, deep).node.ipc_path == node.ipc_path
        head = backend.w3.eth.block_number
        node.commit(node.last_time + 1, [])
        assert backend.w3.eth.block_number == head + 1


@pytest.mark.geth
def test_the_node_builds_no_state_snapshot(tmp_path: Path) -> None:
    """geth's state snapshot is built in the background and, with millions of customers' state, was
    regenerated around every block: 0.8-0.95 of a core on an idle node (README, "The embedded chain and
    how far it serves"). The node must not build one; geth says in its log (at the start-up verbosity) when
    it does."""
    with GethBackend(geth_settings(), Accounts().operator, tmp_path) as backend:
        node = backend.node
        for _ in range(3):
            node.commit(node.last_time + 1, [])
        log = node.log_file.read_text()
    assert "Chain head was updated" in log or "Imported new potential chain segment" in log, log[-2000:]
    assert "snapshot" not in log.lower(), [line for line in log.splitlines() if "snapshot" in line.lower()]
