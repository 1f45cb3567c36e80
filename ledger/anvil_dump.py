"""A checkpoint of the managed anvil node, written by a process of its own.

`python -m ledger.anvil_dump` fetches `anvil_dumpState` from a node, checks that it is one consistent
moment of the chain (`dump_problem`) and writes it, decompressed as anvil loads it, to a file; it
answers with a JSON object: `problem` (None, or why the dump is not consistent), `bytes`, and `head`
(the number of the newest block the dump holds, or None if unreadable).

It runs at a low CPU priority, in a process of its own: a dump grows with the chain (a few hundred MB
at a hundred thousand consent changes), and decoding, decompressing, checking and writing it took
seconds of CPU, some of it holding the interpreter lock of the supervisor, where the relayer and the
interval miner run. It stays up between checkpoints (see `serve` for the protocol), so that a
checkpoint costs no interpreter start; the caller (`AnvilNode.checkpoint`) pauses mining from when it
asks for a dump until shortly after "sent".

Only the standard library: the process starts in tens of milliseconds.
"""

from __future__ import annotations

import binascii
import http.client
import json
import os
import re
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

NICENESS = 10
TIMEOUT = 600.0


# A block header's number, in the "blocks" list of a dump (the only "number" key there; a node started
# from a dump also holds the genesis block it made itself, so 0 can occur more than once: `dump_problem`).
_BLOCK_NUMBER = re.compile(rb'"number":"0x([0-9a-f]+)"')


def _head(data: bytes) -> tuple[int, int, int]:
    """Where the head number and the blocks start in a dump, and the head number (ValueError if absent)."""
    at_head = data.index(b',"best_block_number":')
    at_blocks = data.index(b',"blocks":[', at_head)
    return at_head, at_blocks, int(data[at_head + len(b',"best_block_number":') : at_blocks])


def dump_head(data: bytes) -> int | None:
    """The number of the newest block a dump holds, or None if it cannot be read."""
    try:
        return _head(data)[2]
    except ValueError:
        return None


def dump_problem(data: bytes, nonce_at: Callable[[str, int], int]) -> str | None:
    """Why a state dump is not one consistent moment of the chain, or None if it is.

    anvil writes `{"block", "accounts", "best_block_number", "blocks", "transactions", ...}` from
    copies taken one after another: the block env, the head number, the blocks, the transactions,
    and the accounts last. A block mined between two copies shows as: an env or a block past the head
    (an empty block leaves no other trace), a transaction past the head, or an account whose nonce
    is past its nonce at the head (every change of state is a transaction, which bumps its sender's
    nonce). Blocks are told by number, not counted: a node started from a dump keeps the genesis
    block it made itself beside the loaded ones (one more block 0 with every restart, graceful or
    not), and counting them failed every checkpoint after a restart. Anything this cannot read
    counts as a problem (the dump is then taken with mining paused). All values in the dump are hex
    strings or numbers, so the keys searched for cannot occur in data.
    """
    try:
        at_head, at_blocks, head = _head(data)
        # The top-level list is the last "transactions" key (each block has its own list before it).
        at_transactions = data.rindex(b'"transactions":[')
        prefix = json.loads(data[:at_head] + b"}")
        env_number = int(prefix["block"]["number"], 16)
        accounts: dict[str, dict[str, Any]] = prefix["accounts"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable dump: {exc!r}"
    if env_number != head:
        return f"block env {env_number}, head {head}"
    found = _BLOCK_NUMBER.findall(data, at_blocks, at_transactions)
    if len(found) != data.count(b'{"header":', at_blocks, at_transactions):
        return "unreadable dump: a block without its number"
    numbers = {int(number, 16) for number in found}
    if max(numbers, default=-1) > head:
        return f"block {max(numbers)} past head {head}"
    if len(numbers) != head + 1:  # none is past the head: so some are missing
        return f"{head + 1 - len(numbers)} of the blocks up to head {head} missing"
    transactions = data.count(b'"block_hash":', at_transactions)
    sent = 0
    for address, account in accounts.items():
        if account.get("code") not in (None, "", "0x"):
            continue  # a contract's nonce counts its creations, not transactions
        nonce = int(account.get("nonce", 0))
        try:
            expected = nonce_at(address, head)
        except Exception as exc:  # the node cannot say: not provably consistent
            return f"no nonce for {address} at {head}: {exc}"
        if nonce != expected:
            return f"{address} has nonce {nonce}, {expected} at head {head}"
        sent += nonce
    if transactions != sent:
        return f"{transactions} transactions, {sent} sent up to head {head}"
    return None


def _request(connection: http.client.HTTPConnection, method: str, params: list[Any]) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    connection.request("POST", "/", body, {"Content-Type": "application/json"})


def _result(raw: bytes, method: str) -> bytes:
    """The hex string a JSON-RPC answer carries, decoded, without parsing the whole answer as JSON
    (hundreds of MB of hex for a large dump)."""
    marker = b'"result":"0x'
    at = raw.find(marker)
    if at < 0:
        raise RuntimeError(f"{method}: {raw[:500]!r}")
    end = raw.index(b'"', at + len(marker))
    return binascii.unhexlify(memoryview(raw)[at + len(marker) : end])


# anvil encodes a dump inside one of its async tasks: seconds of one runtime thread at a hundred
# thousand changes. If its other threads were parked on their condition variable when that began (one
# of them was polling the network when the request came in, and went on to run it), nobody polls the
# network until the dump is done, and every RPC waits: mining, receipts and logs stalled for 1.3 to 6 s
# in 100,000-change benchmarks, and a probe alone saw it in 10 of 10 dumps of a 350 MB chain. A task
# that anvil runs on its blocking pool (an `eth_call`) wakes a parked thread when it ends, which then
# polls again. So a large dump is preceded by such a call that ends after the dump began: EVM code that
# loops until its gas runs out (it fails with OutOfGas; ~0.5 ms per million gas here). With it, the
# probe saw no stall in 20 dumps, 10 of them with the CPUs busy.
WAKE_CODE = "0x5b600056"  # JUMPDEST, PUSH1 0, JUMP: a loop until the gas runs out
WAKE_GAS = 100_000_000
WAKE_LEAD = 0.002  # seconds between that call and the dump request
WAKE_ABOVE = 10_000_000  # bytes of the previous dump above which the call is made (small ones are quick)


def dump(
    url: str,
    path: str,
    sent: Callable[[], None],
    *,
    wake: bool = True,
    connection: http.client.HTTPConnection | None = None,
) -> dict[str, Any]:
    """Fetch, check and (if consistent) write one dump; `sent` is called once the request is out.
    `wake`: make the call that keeps the node answering meanwhile (see `WAKE_CODE`). `connection`: one
    to the node to ask it on (closed here all the same), instead of a new one."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    connection = connection or http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    waker = http.client.HTTPConnection(host, port, timeout=TIMEOUT) if wake else None
    try:
        if waker is not None:
            _request(waker, "eth_call", [{"data": WAKE_CODE, "gas": hex(WAKE_GAS)}, "latest"])
            time.sleep(WAKE_LEAD)
        _request(connection, "anvil_dumpState", [])
        sent()
        raw = connection.getresponse().read()
        if waker is not None:
            waker.getresponse().read()  # its outcome does not matter (OutOfGas)
        data = zlib.decompress(_result(raw, "anvil_dumpState"), wbits=31)
        del raw

        def nonce_at(address: str, block: int) -> int:
            _request(connection, "eth_getTransactionCount", [address, hex(block)])
            return int(json.loads(connection.getresponse().read())["result"], 16)

        problem = dump_problem(data, nonce_at)
    finally:
        connection.close()
        if waker is not None:
            waker.close()
    if problem is None:
        with open(path, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    return {"problem": problem, "bytes": len(data), "head": dump_head(data)}


def serve() -> None:
    """One dump per line on stdin (`[url, path]` in JSON), until stdin ends: "sent" once the request is
    out, then the outcome (or `{"error": ...}`) as one line of JSON."""
    os.nice(NICENESS)
    print("ready", flush=True)
    last_bytes = 0
    for line in sys.stdin:
        url, path = json.loads(line)
        announced = False

        def sent() -> None:
            nonlocal announced
            announced = True
            print("sent", flush=True)

        try:
            outcome = dump(url, path, sent, wake=last_bytes > WAKE_ABOVE)
            last_bytes = outcome["bytes"]
        except Exception as exc:  # the caller hears it; the next dump may well work
            if not announced:
                sent()
            outcome = {"error": f"{exc.__class__.__name__}: {exc}"}
        print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    serve()
