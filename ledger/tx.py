"""Sending the operator's transactions: local signing, a local nonce, JSON-RPC batches.

One `TxSender` per operator key and process: it is the single writer of that key's nonce, so it
never asks the node for a nonce per transaction. Raw transactions and receipt polls go to the node
in JSON-RPC batches where the provider supports them (HTTP), one by one otherwise (eth-tester).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from requests.exceptions import RequestException
from web3 import Web3
from web3.providers.rpc import HTTPProvider
from web3.types import RPCEndpoint

from ledger.errors import ChainError, TransactionFailed

NO_OP_GAS = 21_000  # a transfer of nothing: what a transaction that only takes a nonce costs

# The largest call data a transaction may carry here. geth's, Besu's and Nethermind's pools refuse a
# transaction over 128 KiB ("oversized data"); 1 KiB is left for the rest of the signed envelope.
MAX_TX_DATA_BYTES = 128 * 1024 - 1024

# The most calls one JSON-RPC batch carries where not set (`ChainSettings.rpc_max_batch`): Besu refuses
# a longer one (`--rpc-http-max-batch-size`, 1,024 by default; geth's default is 1,000, but the managed
# geth is started with a higher limit).
MAX_RPC_BATCH = 1_024


def items_per_transaction(max_batch: int, item_bytes: int, head_bytes: int = 4 + 64) -> int:
    """How many items of `item_bytes` each fit one transaction's call data with a `head_bytes` header
    (selector, array offset and length), `max_batch` at most."""
    return max(1, min(max_batch, (MAX_TX_DATA_BYTES - head_bytes) // item_bytes))


@dataclass(frozen=True)
class TxRequest:
    to: ChecksumAddress | None
    data: bytes
    gas: int
    value: int = 0


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    status: int
    block_number: int
    block_hash: str
    gas_used: int
    contract_address: ChecksumAddress | None
    logs: list[dict[str, Any]]

    @classmethod
    def from_rpc(cls, raw: dict[str, Any]) -> Receipt:
        def num(v: Any) -> int:
            return int(v, 16) if isinstance(v, str) else int(v)

        def hexstr(v: Any) -> str:
            return v if isinstance(v, str) else "0x" + bytes(v).hex()

        address = raw.get("contractAddress")
        return cls(
            tx_hash=hexstr(raw["transactionHash"]),
            status=num(raw["status"]),
            block_number=num(raw["blockNumber"]),
            block_hash=hexstr(raw["blockHash"]),
            gas_used=num(raw["gasUsed"]),
            contract_address=Web3.to_checksum_address(address) if address else None,
            logs=list(raw.get("logs") or []),
        )


class TxSender:
    """Signs with `account`, tracks its nonce locally, and sends in batches."""

    def __init__(
        self,
        w3: Web3,
        account: LocalAccount,
        *,
        receipt_timeout: float = 60.0,
        read_only: bool = False,
        max_batch: int = MAX_RPC_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError("a JSON-RPC batch holds at least one call")
        self.w3 = w3
        self.read_only = read_only  # for processes that only read (API workers): signing is refused
        self.account = account
        self.receipt_timeout = receipt_timeout
        self.max_batch = max_batch
        self.chain_id = w3.eth.chain_id
        self._lock = threading.Lock()
        self._nonce: int = w3.eth.get_transaction_count(account.address, "pending")
        self._gas_price = self._fetch_gas_price()
        self._batching = isinstance(w3.provider, HTTPProvider)

    def _fetch_gas_price(self) -> int:
        """Where the network's base fee is 0 (a QBFT network with `zeroBaseFee`; the managed nodes), the
        least of the node's suggested price and suggested tip (a legacy transaction's whole price is its
        tip there): 0 on a free-gas network, whose accounts hold no ether to pay with. Neither suggestion
        alone says so: Besu's eth_gasPrice answers its `--min-gas-price` (1,000 wei by default) or what
        recent transactions paid, and its eth_maxPriorityFeePerGas its `--min-priority-fee` (0); anvil
        suggests a tip of 1 gwei and a price of 0; geth's development chain asks 1 wei for both.
        Elsewhere twice the node's price, which leaves room for the base fee to drift."""
        try:
            price = int(self.w3.eth.gas_price)
            if self.w3.eth.get_block("latest").get("baseFeePerGas") != 0:
                return 2 * price
            answer = self.w3.provider.make_request(RPCEndpoint("eth_maxPriorityFeePerGas"), [])
        except (RequestException, OSError) as exc:
            raise ChainError(f"the node did not answer for the gas price: {exc.__class__.__name__}") from exc
        tip = answer.get("result")
        if tip is None:  # a node without the method
            return price
        return min(price, int(tip, 16) if isinstance(tip, str) else int(tip))

    @property
    def next_nonce(self) -> int:
        """The nonce the next signed transaction gets."""
        return self._nonce

    def resync_nonce(self) -> None:
        """Take the node's pending nonce again (after a send failed or the node restarted)."""
        pending = self._pending_nonce()
        with self._lock:
            self._nonce = pending

    def _pending_nonce(self) -> int:
        try:
            return int(self.w3.eth.get_transaction_count(self.account.address, "pending"))
        except (RequestException, OSError) as exc:
            raise ChainError(f"the node did not answer eth_getTransactionCount: {exc.__class__.__name__}") from exc

    def sign(self, requests: Sequence[TxRequest]) -> list[tuple[str, bytes]]:
        """Sign `requests` with consecutive nonces; returns (tx hash, raw) pairs."""
        return [(tx_hash, raw) for tx_hash, raw, _ in self.sign_with_nonces(requests)]

    def sign_with_nonces(self, requests: Sequence[TxRequest]) -> list[tuple[str, bytes, int]]:
        """As `sign`, with the nonce each got (several threads may sign: read it here, not before)."""
        signed: list[tuple[str, bytes, int]] = []
        with self._lock:
            for req in requests:
                tx_hash, raw = self._sign_at(self._nonce, req)
                signed.append((tx_hash, raw, self._nonce))
                self._nonce += 1
        return signed

    def _sign_at(self, nonce: int, req: TxRequest) -> tuple[str, bytes]:
        """`req` signed with `nonce`: (tx hash, raw)."""
        if self.read_only:
            raise ChainError("this process does not send transactions (the supervisor holds the key's nonce)")
        tx: dict[str, Any] = {
            "chainId": self.chain_id,
            "nonce": nonce,
            "gas": req.gas,
            "gasPrice": self._gas_price,
            "data": req.data,
            "value": req.value,
        }
        if req.to is not None:
            tx["to"] = req.to
        raw = self.account.sign_transaction(tx)
        return "0x" + bytes(raw.hash).hex(), bytes(raw.raw_transaction)

    def send(self, requests: Sequence[TxRequest]) -> list[str]:
        """Sign and send; returns the transaction hashes once the node has accepted them all."""
        signed = self.sign(requests)
        try:
            self.send_raw([raw for _, raw in signed])
        except ChainError:
            self.resync_nonce()
            raise
        return [tx_hash for tx_hash, _ in signed]

    def send_raw(self, raws: Sequence[bytes]) -> None:
        """Send already signed transactions (see `sign`)."""
        responses = self.call_many([("eth_sendRawTransaction", ["0x" + raw.hex()]) for raw in raws])
        errors = [r["error"] for r in responses if "error" in r]
        if errors:
            raise ChainError(f"the node refused {len(errors)} of {len(raws)} transactions: {errors[0]}")

    def receipts(self, tx_hashes: Sequence[str]) -> list[Receipt | None]:
        """Receipts of mined transactions, None for those not mined (yet)."""
        if not tx_hashes:
            return []
        responses = self.call_many([("eth_getTransactionReceipt", [h]) for h in tx_hashes])
        return [Receipt.from_rpc(dict(r["result"])) if r.get("result") else None for r in responses]

    def known(self, tx_hash: str) -> bool:
        """Whether the node has the transaction (mined or in its pool)."""
        return self.nonce_of(tx_hash) is not None

    def nonce_of(self, tx_hash: str) -> int | None:
        """The nonce of a transaction the node has (mined or in its pool); None if it has none."""
        (response,) = self.call_many([("eth_getTransactionByHash", [tx_hash])])
        if "error" in response:
            raise ChainError(f"eth_getTransactionByHash failed: {response['error']}")
        tx = response.get("result")
        if tx is None:
            return None
        nonce = tx["nonce"]
        return int(nonce, 16) if isinstance(nonce, str) else int(nonce)  # JSON-RPC hex; eth-tester an int

    def fill_gap(self, nonce: int) -> int:
        """Make our transaction with `nonce`, waiting in the node's pool, minable; returns how many
        transactions that took.

        The node holds a transaction back while a nonce below it is missing. That happens when it
        loses transactions it had taken (a restart from older state) and we sent on with the nonces
        that followed them: then nothing of ours is mined until the gap is filled, and when there is
        no other work to send, nothing fills it. Each missing nonce gets a transaction that does
        nothing (no value, to ourselves), as relayers unstick a nonce. The node's pending nonce is
        asked before each: a transaction of ours with that nonce cannot be in its pool (it would be
        minable, and counted), so a fill never collides with one."""
        filled = 0
        nothing = TxRequest(to=self.account.address, data=b"", gas=NO_OP_GAS)
        pending = self._pending_nonce()
        for _ in range(nonce - pending):  # at most the gap seen first (fills are counted as they go in)
            _, raw = self._sign_at(pending, nothing)
            self.send_raw([raw])
            filled += 1
            pending = self._pending_nonce()
            if pending >= nonce:  # nothing missing below it any more
                break
        with self._lock:
            self._nonce = max(self._nonce, pending, nonce + 1)
        return filled

    def wait(self, tx_hashes: Sequence[str], *, poll_interval: float = 0.02) -> list[Receipt]:
        """Wait until every transaction is mined; receipts in the order of `tx_hashes`."""
        deadline = time.monotonic() + self.receipt_timeout
        receipts: dict[str, Receipt] = {}
        while True:
            missing = [h for h in tx_hashes if h not in receipts]
            if not missing:
                return [receipts[h] for h in tx_hashes]
            for tx_hash, receipt in zip(missing, self.receipts(missing), strict=True):
                if receipt is not None:
                    receipts[tx_hash] = receipt
            if len(receipts) == len(tx_hashes):
                continue
            if time.monotonic() > deadline:
                raise TransactionFailed(
                    f"{len(tx_hashes) - len(receipts)} transactions not mined within {self.receipt_timeout:g}s",
                    tx_hash=missing[0],
                )
            time.sleep(poll_interval)

    def call_many(self, calls: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
        """JSON-RPC calls in one round trip where the provider batches (one each on eth-tester's): an
        answer each, in order, holding a "result" or an "error"."""
        try:
            return self._call_many_unguarded(calls)
        except (RequestException, OSError) as exc:
            raise ChainError(f"the node did not answer: {exc.__class__.__name__}") from exc

    def _call_many_unguarded(self, calls: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
        provider = self.w3.provider
        if self._batching and len(calls) == 1:
            # Raw JSON-RPC: web3's middleware would rebuild a big receipt (thousands of logs) as AttributeDicts.
            method, params = calls[0]
            return [dict(provider.make_request(RPCEndpoint(method), params))]
        if self._batching and len(calls) > 1:
            assert isinstance(provider, HTTPProvider)
            answers: list[dict[str, Any]] = []
            for start in range(0, len(calls), self.max_batch):  # nodes cap a batch (Besu: 1,024 calls)
                part = calls[start : start + self.max_batch]
                if len(part) == 1:
                    answers.append(dict(provider.make_request(RPCEndpoint(part[0][0]), part[0][1])))
                    continue
                batch = provider.make_batch_request([(RPCEndpoint(m), p) for m, p in part])
                if not isinstance(batch, list):
                    raise ChainError(f"the node refused a JSON-RPC batch of {len(part)} calls: {batch.get('error')}")
                answers.extend(dict(r) for r in batch)
            return answers
        # eth-tester's provider speaks Python, not JSON-RPC: go through web3's formatters one by one.
        responses: list[dict[str, Any]] = []
        for method, params in calls:
            try:
                result = self.w3.manager.request_blocking(RPCEndpoint(method), params)
            except Exception as exc:
                responses.append({"error": {"message": str(exc)}})
                continue
            if isinstance(result, (bytes, HexBytes)):
                result = "0x" + bytes(result).hex()
            responses.append({"result": result})
        return responses
