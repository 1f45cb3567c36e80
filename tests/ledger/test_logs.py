"""`LogFetcher` against a node that limits eth_getLogs' range: which refusals it halves for, which it raises."""

from __future__ import annotations

from typing import Any

import pytest
from web3 import Web3
from web3.providers.base import BaseProvider
from web3.types import RPCEndpoint, RPCResponse

from ledger.errors import ChainError
from ledger.logs import LogFetcher


class LimitedNode(BaseProvider):
    """Answers eth_getLogs over at most `limit` blocks with one log per block, else `message`."""

    def __init__(self, limit: int, message: str) -> None:
        super().__init__()
        self.limit, self.message = limit, message
        self.asked: list[tuple[int, int]] = []

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        assert method == "eth_getLogs"
        start, end = int(params[0]["fromBlock"], 16), int(params[0]["toBlock"], 16)
        self.asked.append((start, end))
        if end - start + 1 > self.limit:
            return {"jsonrpc": "2.0", "id": 1, "error": {"code": -32005, "message": self.message}}
        return {"jsonrpc": "2.0", "id": 1, "result": [{"blockNumber": hex(n)} for n in range(start, end + 1)]}


@pytest.mark.parametrize(
    "message",
    [
        "Requested range exceeds maximum RPC range limit",  # Besu
        "query returned more than 10000 results",
        "block range is too wide",
        "Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range",
    ],
)
def test_a_range_refused_as_too_large_is_asked_in_halves_and_the_span_kept(message: str) -> None:
    node = LimitedNode(1_000, message)
    fetcher = LogFetcher(Web3(node), 5_000)
    logs = fetcher.fetch({"address": "0x" + "11" * 20}, 10, 5_009)
    assert [int(item["blockNumber"], 16) for item in logs] == list(range(10, 5_010))
    assert node.asked[:3] == [(10, 5_009), (10, 2_509), (10, 1_259)]  # refused: 5,000, 2,500, 1,250 blocks
    assert fetcher.span == 625
    assert len(node.asked) == 3 + 8
    node.asked.clear()
    fetcher.fetch({}, 0, 1_249)
    assert node.asked == [(0, 624), (625, 1_249)]  # the next call starts at the span that worked


def test_other_refusals_are_raised_not_halved() -> None:
    node = LimitedNode(10, "rate limit exceeded, try again later")
    with pytest.raises(ChainError, match="rate limit exceeded"):
        LogFetcher(Web3(node), 5_000).fetch({}, 0, 99)
    assert node.asked == [(0, 99)]


def test_a_single_block_refused_is_raised() -> None:
    node = LimitedNode(0, "Requested range exceeds maximum RPC range limit")
    with pytest.raises(ChainError, match="blocks 0-0"):
        LogFetcher(Web3(node), 4).fetch({}, 0, 9)
    assert node.asked == [(0, 3), (0, 1), (0, 0)]
