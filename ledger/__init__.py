"""The chain side: contracts, their clients, the relayer, the indexer and the read model."""

import os

# Keccak-256 runs a dozen times per signed request (EIP-712 hashing, checksummed addresses, recovery).
# eth-hash picks pycryptodome first when both are installed (3.5 us a hash here, through ctypes);
# pysha3 is a C extension (0.5 us). The choice is made at the first hash, so this must come first.
os.environ.setdefault("ETH_HASH_BACKEND", "pysha3")
