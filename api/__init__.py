"""The service: command line, settings, the HTTP API and its runtime."""

import sys

# py_ecc (under eth-keys: web3 and eth-account import it) raises the interpreter's recursion limit to
# 100,000 when imported, and py-evm (under eth-tester) to 12,288. With such a limit the C JSON parser
# recursed into a request body nested 70,000 deep until the C stack overflowed, and the API worker
# died of SIGSEGV. Every process of the service imports this package before it serves: the two are
# imported here and the limit set back to CPython's default (which they may have replaced already,
# when imported before this package), so that a deep body raises RecursionError instead.
RECURSION_LIMIT = 1_000
import eth  # noqa: E402, F401
import py_ecc  # noqa: E402, F401

sys.setrecursionlimit(RECURSION_LIMIT)
