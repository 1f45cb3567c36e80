"""The ledger package's exceptions: one root, families under it.

Errors raised by web3, eth-tester, solc or the node are translated here, once, at the boundary;
callers above `ledger` catch these classes only.
"""

from __future__ import annotations

from typing import Any


class LedgerError(Exception):
    """Raised for any failure inside the ledger package."""


class ToolchainError(LedgerError):
    """Raised when the Solidity toolchain (Node.js, solc-js, OpenZeppelin) is missing or broken."""


class CompilationError(ToolchainError):
    """Raised when solc reports errors in the contract sources."""


class ChainError(LedgerError):
    """Raised when a chain backend cannot be started, reached or used."""


class NodeNotRunning(ChainError):
    """The managed node of a data dir is not running (a tool needs `serve` to run it)."""


class NodeStartError(ChainError):
    """Raised when the managed node does not come up."""


class DeploymentError(LedgerError):
    """Raised when the contracts cannot be deployed or the deployment record does not match the chain."""


class TransactionFailed(LedgerError):
    """Raised when a transaction was mined but reverted, or was never mined in time."""

    def __init__(self, message: str, *, tx_hash: str | None = None) -> None:
        super().__init__(message)
        self.tx_hash = tx_hash


class ContractRevert(LedgerError):
    """Raised when a contract call reverts with a custom error (decoded into `error` and `args`)."""

    def __init__(self, error: str, args: dict[str, Any], *, data: bytes = b"") -> None:
        rendered = ", ".join(f"{k}={_render(v)}" for k, v in args.items())
        super().__init__(f"{error}({rendered})")
        self.error = error
        self.args_by_name = args
        self.data = data


class Unauthorized(ContractRevert):
    """Raised when the sender lacks the role a function requires (AccessControlUnauthorizedAccount)."""


class InvalidSignature(ContractRevert):
    """Raised when a signed message was not signed by the subject's controller."""


class SignatureExpired(ContractRevert):
    """Raised when a signed message's deadline has passed."""


class UnknownAttributes(LedgerError):
    """Raised when an attribute mask sets a bit no attribute has: at or above `ledger.types.ATTRIBUTE_BITS`
    (a consent cannot hold it), or one the registry does not name. `bit` is the lowest such bit."""

    def __init__(self, bit: int) -> None:
        super().__init__(f"attributes: bit {bit} is no attribute's")
        self.bit = bit


class NonceMismatch(ContractRevert):
    """Raised when a signed message's nonce is not the signer's next nonce (replayed or out of order)."""


class ConsentRejected(ContractRevert):
    """Raised when a consent change is well signed but not acceptable (unknown partner, empty attributes,
    a validity in the past, an unbound subject, a controller already bound)."""


class RecoveryRejected(ConsentRejected):
    """Raised when a key recovery cannot go on: none is pending (or not the one named), it is not due
    yet, or a recovery delay is out of range."""


class PointsRejected(ContractRevert):
    """Raised when an issuance or redemption is well formed but not acceptable (unknown partner, used
    id, zero amount, an expiry in the past, an unbound subject, a submitter that is not the partner)."""


class AccessRejected(ContractRevert):
    """Raised when the access log refuses a batch as a whole (an empty batch)."""


class InsufficientPoints(PointsRejected):
    """Raised when a redemption asks for more unexpired points than the subject has."""


class BatchItemFailed(ContractRevert):
    """Raised when one item of a batch failed; `index` names it and `cause` is that item's own error."""

    def __init__(self, index: int, cause: ContractRevert, *, data: bytes = b"") -> None:
        super().__init__("ConsentRegistryBatchItemFailed", {"index": index, "reason": cause.error}, data=data)
        self.index = index
        self.cause = cause


class UnknownRevert(ContractRevert):
    """Raised when revert data matches no error in the contracts' ABIs."""


def _render(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)
