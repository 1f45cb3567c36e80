"""What every contract client's log decoding reads from JSON-RPC: hex strings (or bytes, as web3 hands
them back) made into ints, bytes and hex strings, without ABI machinery per log."""

from __future__ import annotations

from typing import Any


def hex_of(value: Any) -> str:
    """A hash or topic as a 0x-prefixed hex string."""
    return value if isinstance(value, str) else "0x" + bytes(value).hex()


def int_of(value: Any) -> int:
    """A quantity (a block number, a log index), hex string or int."""
    return int(value, 16) if isinstance(value, str) else int(value)


def bytes_of(value: Any) -> bytes:
    """Data (a log's `data`), hex string or bytes."""
    return bytes.fromhex(value[2:]) if isinstance(value, str) else bytes(value)
