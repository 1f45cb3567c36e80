"""A JSON-RPC proxy in front of a real node (anvil) that behaves as Hyperledger Besu does on a QBFT
network, for the `rpc` backend's tests. What it imposes, each as Besu documents it:

- eth_getLogs over more than `max_logs_range` blocks (`--rpc-max-logs-range`, 5,000 by default; Besu
  refuses when `toBlock - fromBlock` exceeds it) is refused with Besu's error (-32005, "Requested range
  exceeds maximum RPC range limit");
- a JSON-RPC batch of more than `max_batch` calls (`--rpc-http-max-batch-size`, 1,024) is refused
  whole, with one error object (-32005, "Number of requests exceeds max batch size");
- receipts carry no `revertReason` (Besu adds it only with `--revert-reason-enabled`; anvil never
  does), and a call that reverts is answered as Besu does (-32000, "Execution reverted", the revert
  data in `data`);
- blocks carry a proof-of-authority `extraData` of 97 bytes (vanity and a seal), where web3's block
  formatter allows 32;
- eth_gasPrice answers Besu's default `--min-gas-price`, 1,000 wei, though the base fee is 0 (a
  `zeroBaseFee` genesis; the anvil behind runs with `--base-fee 0`), and eth_maxPriorityFeePerGas its
  `--min-priority-fee`, 0 (anvil would suggest 1 gwei).

It runs in a thread (uvicorn serving a Starlette app), forwards everything else unchanged, and counts
what it saw (`calls`, `batches`, `log_ranges`, `refused`) for the tests to check.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ledger.anvil import free_port

MAX_LOGS_RANGE = 5_000
MAX_BATCH = 1_024
MIN_GAS_PRICE = 1_000  # wei: Besu's default --min-gas-price

RANGE_ERROR = {"code": -32005, "message": "Requested range exceeds maximum RPC range limit"}
BATCH_ERROR = {"code": -32005, "message": "Number of requests exceeds max batch size"}

# A proof-of-authority header's extraData: 32 bytes of vanity and a validator's 65-byte seal (QBFT's
# RLP list of vanity, validators, vote, round and seals is longer still, the more validators it names).
POA_EXTRA_DATA = b"qbft".ljust(32, b"\0") + b"\x11" * 65
assert len(POA_EXTRA_DATA) == 97


class BesuProxy:
    """`url` reaches the node at `upstream` through Besu's limits (`max_logs_range`, `max_batch` may be
    changed while it runs)."""

    def __init__(self, upstream: str, *, max_logs_range: int = MAX_LOGS_RANGE, max_batch: int = MAX_BATCH) -> None:
        self.upstream = upstream
        self.max_logs_range = max_logs_range
        self.max_batch = max_batch
        self.calls: Counter[str] = Counter()
        self.batches: list[int] = []  # the size of each batch asked for
        self.log_ranges: list[int] = []  # blocks spanned by each eth_getLogs answered
        self.refused: Counter[str] = Counter()  # "eth_getLogs", "batch"
        self.port = free_port()
        self._client: httpx.AsyncClient | None = None
        app = Starlette(routes=[Route("/", self._serve, methods=["POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, name="besu-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BesuProxy:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the Besu proxy did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> BesuProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # serving ---------------------------------------------------------------------------------------

    async def _serve(self, request: Request) -> Response:
        body = json.loads(await request.body())
        if not isinstance(body, list):
            return JSONResponse((await self._batch([body]))[0])
        self.batches.append(len(body))
        if len(body) > self.max_batch:
            self.refused["batch"] += 1
            return JSONResponse({"jsonrpc": "2.0", "id": None, "error": BATCH_ERROR})
        return JSONResponse(await self._batch(body))

    async def _batch(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers to `calls`, in order: those the proxy answers itself, the others from the node in one
        batch (one round trip, as the caller made it), rewritten as Besu would have them."""
        answers: list[dict[str, Any] | None] = [await self._answer_here(call) for call in calls]
        forwarded = [call for call, answer in zip(calls, answers, strict=True) if answer is None]
        from_node = iter(await self._forward_all(forwarded) if forwarded else [])
        done: list[dict[str, Any]] = []
        for call, answer in zip(calls, answers, strict=True):
            done.append(answer if answer is not None else self._as_besu(call, next(from_node)))
        return done

    async def _answer_here(self, call: dict[str, Any]) -> dict[str, Any] | None:
        method = call.get("method", "")
        self.calls[method] += 1
        if method == "eth_gasPrice":
            return {"jsonrpc": "2.0", "id": call.get("id"), "result": hex(MIN_GAS_PRICE)}
        if method == "eth_maxPriorityFeePerGas":  # Besu's `--min-priority-fee` (0) while nobody pays tips
            return {"jsonrpc": "2.0", "id": call.get("id"), "result": "0x0"}
        if method == "eth_getLogs":
            span = await self._span(call["params"][0])
            if span > self.max_logs_range:
                self.refused["eth_getLogs"] += 1
                return {"jsonrpc": "2.0", "id": call.get("id"), "error": RANGE_ERROR}
            self.log_ranges.append(span + 1)
        return None

    @staticmethod
    def _as_besu(call: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        method, result = call.get("method", ""), answer.get("result")
        if method in ("eth_getBlockByNumber", "eth_getBlockByHash") and isinstance(result, dict):
            result["extraData"] = "0x" + POA_EXTRA_DATA.hex()
        elif method == "eth_getTransactionReceipt" and isinstance(result, dict):
            result.pop("revertReason", None)
        elif method in ("eth_call", "eth_estimateGas") and "error" in answer and "data" in answer["error"]:
            answer["error"] = {"code": -32000, "message": "Execution reverted", "data": answer["error"]["data"]}
        return answer

    async def _span(self, query: dict[str, Any]) -> int:
        """`toBlock - fromBlock` of an eth_getLogs query, as Besu computes it (tags resolved to the head)."""
        head: int | None = None

        async def number(tag: Any) -> int:
            nonlocal head
            if isinstance(tag, str) and tag.startswith("0x"):
                return int(tag, 16)
            if tag == "earliest":
                return 0
            if head is None:
                head = int(
                    (await self._forward({"jsonrpc": "2.0", "id": 0, "method": "eth_blockNumber"}))["result"], 16
                )
            return head

        if "blockHash" in query:
            return 0
        return await number(query.get("toBlock", "latest")) - await number(query.get("fromBlock", "latest"))

    async def _forward(self, call: dict[str, Any]) -> dict[str, Any]:
        (answer,) = await self._forward_all([call])
        return answer

    async def _forward_all(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, timeout=60)
        numbered = [{"params": [], **call, "jsonrpc": "2.0", "id": n} for n, call in enumerate(calls)]
        response = await self._client.post(self.upstream, json=numbered)
        by_id = {answer["id"]: answer for answer in response.json()}
        return [{**by_id[n], "id": call.get("id")} for n, call in enumerate(calls)]
