"""`consent-ledger serve` as a process tree to start, kill and check from outside: the crash tests and the
chaos soak (`scripts/chaos.py`) share it. Its checks read the service's database and the chain itself and
return what they found wrong, in plain words (an empty list: nothing)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from sqlalchemy import func, select

from ledger.backends import create_backend
from ledger.compiler import compile_contracts
from ledger.consent import ConsentRegistryClient, ConsentRequest, ConsentState, RequestStatus
from ledger.consent.client import GRANTED, REVOKED, decode
from ledger.contracts import Deployment, RevertDecoder
from ledger.points import PointsRequest, PointsStatus
from ledger.points.client import REDEEMED
from ledger.settings import ChainSettings
from ledger.store import IndexedBlock, make_engine, sessions
from ledger.tx import TxSender
from ledger.types import Subject
from scripts.bench_api import answered

CLI = [sys.executable, "-m", "api.cli"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_")} | {
    "CONSENT_LEDGER_CHAIN_BLOCK_TIME": "0.1",
    "CONSENT_LEDGER_CHAIN_MAX_CLOCK_LEAD": "3600",  # geth: blocks every 0.1 s (see tests/api/conftest.py)
}


def q(did: str) -> str:
    """A DID in a URL path is percent-encoded (did:web DIDs contain %3A themselves)."""
    return quote(did, safe="")


class Serve:
    """One `serve` in `data_dir` on a free port, with an operator's API key; `node` is the managed node.
    `fast_chain`: the tests' chain, a block every 0.1 s whatever the clock (geth's timestamps then run ahead
    of it, a second a block: hours ahead after minutes, and signed deadlines pass early); otherwise the
    service's defaults, as it is deployed. `operator`: the name of its operator's principal."""

    def __init__(
        self, data_dir: Path, node: str = "geth", *, fast_chain: bool = True, operator: str = "op", **env: str
    ) -> None:
        from ledger.anvil import free_port

        self.data_dir = data_dir
        self.node = node
        self.port = free_port()
        base = ENV if fast_chain else {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_")}
        self.env = base | {"CONSENT_LEDGER_PORT": str(self.port), "CONSENT_LEDGER_CHAIN_BACKEND": node} | env
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        self.operator_key = self.principal("operator", operator)  # a name of its own per instance of a database

    def principal(self, role: str, name: str) -> str:
        """A new API key of `role` (for a partner, a partner of that name too)."""
        out = subprocess.run(
            [*CLI, "principals", "add", "--role", role, "--name", name, "--data-dir", str(self.data_dir)],
            env=self.env, capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        return next(line.split()[2] for line in out.splitlines() if line.startswith("api key:"))

    def start(self, timeout: float = 60) -> float:
        """Start it and wait until /health answers 200; the seconds that took."""
        started = time.monotonic()
        with (self.data_dir / "serve.log").open("ab") as log:
            self.process = subprocess.Popen(
                [*CLI, "serve", "--data-dir", str(self.data_dir)], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_healthy(started + timeout)
        return time.monotonic() - started

    def wait_healthy(self, deadline: float) -> None:
        while True:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"serve exited; see {self.data_dir / 'serve.log'}")
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/api/v1/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve did not come up; see {self.data_dir / 'serve.log'}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGINT) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=60)

    def node_pid(self) -> int:
        return int((self.data_dir / "chain" / f"{self.node}.pid").read_text().split()[0])

    def node_port(self) -> int:
        return int((self.data_dir / "chain" / f"{self.node}.pid").read_text().split()[1])

    def rpc(self, method: str, params: list[object]) -> Any:
        """A JSON-RPC call to the chain: the external node (`rpc`), else the managed one."""
        external = self.env.get("CONSENT_LEDGER_CHAIN_RPC_URL") if self.node == "rpc" else None
        answer = httpx.post(
            external or f"http://127.0.0.1:{self.node_port()}",
            json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
            timeout=30,
        )
        return answer.json()["result"]

    def kill_node_and_wait_for_its_restart(self, timeout: float = 30) -> float:
        """SIGKILL the managed node; the supervisor starts a new one (same port, same data). Waits until
        the new node answers (its pid file is written as it is started, before it listens); seconds."""
        killed = self.node_pid()
        started = time.monotonic()
        os.kill(killed, signal.SIGKILL)
        while True:
            if time.monotonic() - started > timeout:
                raise TimeoutError("the service did not restart its node")
            if self.node_pid() != killed:
                with contextlib.suppress(httpx.TransportError):
                    self.rpc("eth_blockNumber", [])
                    return time.monotonic() - started
            time.sleep(0.1)

    def close(self) -> None:
        """However the run ended: the service stopped (gracefully if it will), and no node of it left
        running (a service killed with SIGKILL leaves its node for the next start to adopt). A failed
        test had left whole services running, a core's worth of them after a few runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            pid = self.node_pid()
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            command = b""
        if self.node.encode() in command and str(self.data_dir).encode() in command:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.client.close()


def sign_typed(account: LocalAccount, typed: dict[str, Any]) -> str:
    return "0x" + bytes(account.sign_message(encode_typed_data(full_message=typed)).signature).hex()


def customer(serve: Serve, n: int, email: str | None = None) -> tuple[LocalAccount, str, dict[str, str]]:
    """A customer enrolled, with a key bound and signed in: (key, DID, the bearer header)."""
    account = Account.create()
    enrolled = serve.client.post(
        "/api/v1/customers",
        json={"email": email or f"crash{n}@example.com"},
        headers={"X-API-Key": serve.operator_key},
    ).json()
    did, claim = enrolled["did"], enrolled["claim_code"]
    typed = serve.client.post(
        f"/api/v1/customers/{q(did)}/controller/prepare", json={"claim_code": claim, "address": account.address}
    ).json()["typed_data"]
    body = {"claim_code": claim, "typed_data": typed, "signature": sign_typed(account, typed)}
    # Asked again while the service has not read the binding back yet (503 still_pending).
    bound = answered(serve.client, f"/api/v1/customers/{q(did)}/controller", body, patience=120)
    assert bound.status_code == 200, bound.text
    return account, did, {"Authorization": f"Bearer {sign_in(serve.client, account)}"}


def sign_in(client: httpx.Client, account: LocalAccount) -> str:
    """A bearer token for the key's customer (Sign-In with Ethereum); it lasts 15 minutes."""
    message = client.post("/api/v1/auth/siwe/challenge", json={"address": account.address}).json()["message"]
    signature = "0x" + bytes(account.sign_message(encode_defunct(text=message)).signature).hex()
    signed_in = client.post("/api/v1/auth/siwe", json={"message": message, "signature": signature})
    assert signed_in.status_code == 200, signed_in.text
    return str(signed_in.json()["access_token"])


def renewed(client: httpx.Client, account: LocalAccount, headers: dict[str, str], answer: httpx.Response) -> bool:
    """As a customer's client does when its token has expired (401 `invalid_token`): sign in again, in
    `headers` itself (every holder of them sees the new token); whether it did."""
    if answer.status_code != 401 or answer.json().get("code") != "invalid_token":
        return False
    headers["Authorization"] = f"Bearer {sign_in(client, account)}"
    return True


def service_engine(serve: Serve) -> Any:
    """The service's database: the one its environment names (PostgreSQL), else SQLite in its data dir."""
    url = serve.env.get("CONSENT_LEDGER_DATABASE_URL")
    return make_engine(url or f"sqlite:///{serve.data_dir / 'service.db'}")


def wait_confirmed(serve: Serve, acknowledged: list[str], timeout: float = 120) -> list[str]:
    """Wait until every acknowledged consent change is confirmed; what is left if that did not happen."""
    engine = service_engine(serve)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with sessions(engine)() as session:
                rows = list(session.scalars(select(ConsentRequest).where(ConsentRequest.id.in_(acknowledged))))
            statuses = Counter(r.status for r in rows)
            if statuses == Counter({RequestStatus.CONFIRMED: len(acknowledged)}) and len(rows) == len(acknowledged):
                return []
            if time.monotonic() > deadline:
                return [f"not all acknowledged changes were confirmed: {dict(statuses)} of {len(acknowledged)}"]
            time.sleep(0.2)
    finally:
        engine.dispose()


def consent_findings(serve: Serve, acknowledged: list[str], *, node_crashed: bool = False) -> list[str]:
    """Every acknowledged change applied on-chain exactly once: no change is logged twice, each is logged
    once unless the node itself crashed and lost the block (then the request says so); only changes the
    service accepted are on-chain, each subject's with consecutive nonces up to its on-chain nonce (at
    or past its highest acknowledged one); and the read model equals the contract's state. Waits for the
    acknowledged changes to be confirmed, then stops the service (gracefully) and reads the chain itself."""
    found = wait_confirmed(serve, acknowledged)
    if found:
        return found
    engine = service_engine(serve)
    with sessions(engine)() as session:
        rows = list(session.scalars(select(ConsentRequest).where(ConsentRequest.id.in_(acknowledged))))
    serve.stop()  # graceful: the node writes its state; now read the chain itself
    settings = ChainSettings(
        backend=serve.node,  # type: ignore[arg-type]
        block_time=0.1,
        rpc_url=serve.env.get("CONSENT_LEDGER_CHAIN_RPC_URL"),
    )
    backend = create_backend(settings, Account.create(), serve.data_dir)
    w3 = backend.start()
    try:
        deployment = Deployment.load(serve.data_dir / "deployment.json")
        registry_address = deployment.address("ConsentRegistry")
        logs = w3.eth.get_logs(
            {
                "address": registry_address,
                "fromBlock": deployment.deploy_block,
                "toBlock": "latest",
                "topics": [[GRANTED, REVOKED]],
            }
        )
        on_chain: Counter[tuple[bytes, int]] = Counter()
        for log in logs:
            event = decode(dict(log))
            if event is None:
                found.append(f"a registry log the service cannot read: {log!r}")
                continue
            on_chain[(event.subject, event.nonce)] += 1
        artifacts = compile_contracts()
        registry = ConsentRegistryClient(
            w3,
            registry_address,
            artifacts["ConsentRegistry"],
            TxSender(w3, Account.create()),
            RevertDecoder(list(artifacts.values())),
        )
        highest: dict[bytes, int] = {}
        for row in rows:
            highest[row.subject] = max(highest.get(row.subject, -1), row.nonce)
            logged = on_chain[(row.subject, row.nonce)]
            if logged > 1:
                found.append(f"change {row.id} is on-chain {logged} times")
            if row.error_code == "history_lost":
                if not node_crashed or serve.node != "anvil":
                    found.append(f"change {row.id} says its block was lost, on {serve.node} (writes each block)")
            elif logged == 0:
                found.append(f"acknowledged change {row.id} is not on-chain")
        with sessions(engine)() as session:
            accepted = {
                (subject, nonce)
                for subject, nonce in session.execute(
                    select(ConsentRequest.subject, ConsentRequest.nonce).where(
                        ConsentRequest.status != RequestStatus.FAILED
                    )
                )
            }
        if unaccepted := set(on_chain) - accepted:
            found.append(f"{len(unaccepted)} changes on-chain that the service did not accept")
        for subject, nonce in highest.items():
            # Its changes on-chain: each nonce once, none skipped, up to its highest acknowledged one or
            # past it (a change stored and then applied whose answer a kill of the service cut off).
            applied = sorted(n for s, n in on_chain if s == subject)
            if applied != list(range(len(applied))):
                found.append(f"subject {subject.hex()[:8]}…: nonces on-chain skip: {applied}")
            on_chain_nonce = registry.nonce_of(Subject(subject))
            if not on_chain_nonce == len(applied) > nonce:
                found.append(
                    f"subject {subject.hex()[:8]}…: nonce {on_chain_nonce} on-chain, {len(applied)} applied, "
                    f"{nonce} the highest acknowledged"
                )
        with sessions(engine)() as session:
            for state in session.scalars(select(ConsentState)):
                consent = registry.consent_of(state.subject, state.partner, state.purpose)  # type: ignore[arg-type]
                if (consent.attributes, consent.valid_until) != (int(state.attributes), state.valid_until):
                    found.append(f"the read model's consent of {state.subject.hex()[:8]}… is not the chain's")
    finally:
        backend.stop()
        engine.dispose()
    return found


def points_settled(serve: Serve, timeout: float = 90) -> list[str]:
    """Wait until the read model follows the chain as it is now (its newest indexed block is the node's
    block of that number), every redemption is final, and every one done is indexed. After a node crash,
    those in the lost blocks go back to the relayer (by the indexer's rollback, or the relayer's check of
    requests settled but never indexed) and are applied again; until the service has noticed the crash,
    its rows still show the lost chain. What is left if that did not happen."""
    engine = service_engine(serve)
    unsettled = (PointsRequest.status.not_in([PointsStatus.DONE, PointsStatus.FAILED])) | (
        (PointsRequest.status == PointsStatus.DONE) & PointsRequest.indexed.is_(False)
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            with sessions(engine)() as session:
                left = session.scalar(select(func.count()).select_from(PointsRequest).where(unsettled))
                newest = session.execute(
                    select(IndexedBlock.number, IndexedBlock.hash).order_by(IndexedBlock.number.desc()).limit(1)
                ).first()
            if not left and newest is not None and node_block_hash(serve, newest.number) == newest.hash:
                return []
            if time.monotonic() > deadline:
                return [f"{left} points requests did not settle"]
            time.sleep(0.2)
    finally:
        engine.dispose()


def node_block_hash(serve: Serve, number: int) -> str | None:
    """The hash of the node's block `number`; None if it has none, or is down."""
    try:
        block = serve.rpc("eth_getBlockByNumber", [hex(number), False])
    except (httpx.TransportError, OSError, ValueError):
        return None
    return block["hash"] if block else None


def balance_on_chain(serve: Serve, did: str) -> int:
    address = Deployment.load(serve.data_dir / "deployment.json").address("LoyaltyPoints")
    data = "0x" + keccak(text="balanceOf(bytes32)")[:4].hex() + did.rsplit(":", 1)[1]
    return int(str(serve.rpc("eth_call", [{"to": address, "data": data}, "latest"])), 16)


def redemption_findings(
    serve: Serve, finals: dict[str, httpx.Response], spent: dict[str, int], start: dict[str, int]
) -> list[str]:
    """On-chain, each redemption applied at most once and exactly the ones answered 200; every customer's
    balance is `start` less what its redemptions answered 200 spent (`spent`: points per key's DID is in
    the answers), and the read model's balance is the chain's; each answer names the transaction that
    holds its redemption on the chain as it is now. `finals`: each key's final answer."""
    found: list[str] = []
    address = Deployment.load(serve.data_dir / "deployment.json").address("LoyaltyPoints")
    logs = serve.rpc(
        "eth_getLogs", [{"address": address, "fromBlock": "0x0", "toBlock": "latest", "topics": [REDEEMED]}]
    )
    ids = Counter(entry["topics"][3] for entry in logs)
    if twice := [i for i, n in ids.items() if n > 1]:
        found.append(f"{len(twice)} redemptions applied more than once")
    done = {k: r.json() for k, r in finals.items() if r.status_code == 200}
    if set(ids) != {answer["redemption_id"] for answer in done.values()}:
        found.append("the redemptions on-chain are not the ones answered 200")
    for did, balance in start.items():
        expected = balance - spent.get(did, 0)
        chain = balance_on_chain(serve, did)
        if chain != expected:
            found.append(f"a customer holds {chain} points on-chain, {expected} by the answers")
    for key, answer in done.items():
        receipt = serve.rpc("eth_getTransactionReceipt", [answer["tx_hash"]])
        if receipt is None or int(receipt["blockNumber"], 16) != answer["block_number"]:
            found.append(f"redemption {key}: answered with a transaction the chain does not hold there")
    return found


def read_model_balance_findings(serve: Serve, customers: list[tuple[LocalAccount, str, dict[str, str]]]) -> list[str]:
    """Each customer's balance as the API reads it (the read model) is the chain's."""
    found = []
    for _account, did, headers in customers:
        points = serve.client.get(f"/api/v1/customers/{q(did)}/points", headers=headers)
        chain = balance_on_chain(serve, did)
        if points.status_code != 200 or points.json()["balance"] != chain:
            found.append(f"the API says {points.text[:80]} for a balance of {chain} on-chain")
    return found
