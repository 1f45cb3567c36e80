"""What every contract client's log decoding reads from JSON-RPC: hex strings (or bytes, as web3 hands
them back) made into ints, bytes and hex strings, without ABI machinery per log; and `LogFetcher`,
which asks the node for logs in ranges it accepts."""

from __future__ import annotations

import logging
import re
from typing import Any

from requests.exceptions import RequestException
from web3 import EthereumTesterProvider, Web3
from web3.types import RPCEndpoint

from ledger.errors import ChainError

log = logging.getLogger(__name__)


def hex_of(value: Any) -> str:
    """A hash or topic as a 0x-prefixed hex string."""
    return value if isinstance(value, str) else "0x" + bytes(value).hex()


def int_of(value: Any) -> int:
    """A quantity (a block number, a log index), hex string or int."""
    return int(value, 16) if isinstance(value, str) else int(value)


def bytes_of(value: Any) -> bytes:
    """Data (a log's `data`), hex string or bytes."""
    return bytes.fromhex(value[2:]) if isinstance(value, str) else bytes(value)


# eth_getLogs' range per call where the node does not say: Besu's default (`--rpc-max-logs-range`).
MAX_LOGS_RANGE = 5_000

# How nodes word "that range is too large" (Besu: "Requested range exceeds maximum RPC range limit";
# others: "query returned more than 10000 results", "block range is too wide", "response size
# exceeded"). Another error of eth_getLogs (a rate limit, a node that is down) is not made better by a
# smaller range, and is raised.
_RANGE_REFUSED = re.compile(r"range|more than \d+ results|too (many|large|wide)|response size", re.IGNORECASE)


class LogFetcher:
    """eth_getLogs over any range of blocks, `max_range` blocks per call at most: permissioned nodes
    refuse wider calls (Besu: 5,000 blocks by default). A node that refuses a range as too large (it
    was set lower) is asked again with half of it, down to a single block, and that span is kept for
    the calls that follow.

    Logs come back as the node sent them (hex strings: `hex_of`, `int_of`, `bytes_of` read them), in
    chain order; web3's formatters are not run over them."""

    def __init__(self, w3: Web3, max_range: int = MAX_LOGS_RANGE) -> None:
        if max_range < 1:
            raise ValueError("max_range must be at least one block")
        self.w3 = w3
        self.span = max_range

    def head(self) -> int:
        try:
            return int(self.w3.eth.block_number)
        except (RequestException, OSError) as exc:
            raise ChainError(f"the node did not answer eth_blockNumber: {exc.__class__.__name__}") from exc

    def fetch(self, query: dict[str, Any], from_block: int, to_block: int | None = None) -> list[dict[str, Any]]:
        """The logs matching `query` (`address`, `topics`) in blocks [from_block, to_block] (None: the
        head as it is now)."""
        last = self.head() if to_block is None else to_block
        found: list[dict[str, Any]] = []
        start = from_block
        while start <= last:
            end = min(last, start + self.span - 1)
            answer = self._get_logs(query, start, end)
            error = answer.get("error")
            if error is None:
                found.extend(dict(item) for item in answer["result"])
                start = end + 1
            elif end > start and _RANGE_REFUSED.search(_message(error)):
                self.span = (end - start + 1) // 2
                log.warning(
                    "the node refused eth_getLogs over %d blocks (%s); asking for %d at a time",
                    end - start + 1,
                    _message(error),
                    self.span,
                )
            else:
                raise ChainError(f"eth_getLogs failed over blocks {start}-{end}: {error}")
        return found

    def _get_logs(self, query: dict[str, Any], start: int, end: int) -> dict[str, Any]:
        """The node's answer: a "result" or an "error"."""
        if isinstance(self.w3.provider, EthereumTesterProvider):  # it speaks Python, not JSON-RPC
            try:
                found = self.w3.eth.get_logs({**query, "fromBlock": start, "toBlock": end})  # type: ignore[typeddict-item]
            except Exception as exc:
                return {"error": {"message": str(exc)}}
            return {"result": found}
        try:
            params = [{**query, "fromBlock": hex(start), "toBlock": hex(end)}]
            return dict(self.w3.provider.make_request(RPCEndpoint("eth_getLogs"), params))
        except (RequestException, OSError) as exc:
            raise ChainError(f"the node did not answer eth_getLogs: {exc.__class__.__name__}") from exc


def _message(error: Any) -> str:
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)
