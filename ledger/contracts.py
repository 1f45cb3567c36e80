"""Deploying contracts, decoding reverts into our exceptions, and the deployment record."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eth_abi.abi import decode as abi_decode
from eth_tester.exceptions import TransactionFailed as TesterTransactionFailed
from eth_typing import ChecksumAddress
from eth_utils.abi import function_abi_to_4byte_selector
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from requests.exceptions import RequestException
from web3 import Web3
from web3.exceptions import ContractLogicError
from web3.types import TxParams

from ledger import errors
from ledger.compiler import Artifact
from ledger.errors import ChainError, ContractRevert, DeploymentError, TransactionFailed
from ledger.files import write_atomically
from ledger.logs import MAX_LOGS_RANGE, LogFetcher
from ledger.tx import Receipt, TxRequest, TxSender

# web3 raises ContractLogicError (revert data in `.data`); eth-tester, the in-process backend, its own class.
_REVERTS = (ContractLogicError, TesterTransactionFailed)

_PANIC = keccak(text="Panic(uint256)")[:4]
_ERROR_STRING = keccak(text="Error(string)")[:4]

_ERROR_CLASSES: dict[str, type[ContractRevert]] = {
    "AccessControlUnauthorizedAccount": errors.Unauthorized,
    "ConsentRegistryInvalidSigner": errors.InvalidSignature,
    "ECDSAInvalidSignature": errors.InvalidSignature,
    "ECDSAInvalidSignatureS": errors.InvalidSignature,
    "ECDSAInvalidSignatureLength": errors.InvalidSignature,
    "ConsentRegistryExpiredSignature": errors.SignatureExpired,
    "InvalidAccountNonce": errors.NonceMismatch,
    "ConsentRegistryUnboundSubject": errors.ConsentRejected,
    "ConsentRegistryControllerAlreadyBound": errors.ConsentRejected,
    "ConsentRegistryInvalidController": errors.ConsentRejected,
    "ConsentRegistryUnknownPartner": errors.ConsentRejected,
    "ConsentRegistryEmptyAttributes": errors.ConsentRejected,
    "ConsentRegistryAttributesOutOfRange": errors.ConsentRejected,
    "ConsentRegistryInvalidValidity": errors.ConsentRejected,
    "ConsentRegistryNoRecovery": errors.RecoveryRejected,
    "ConsentRegistryRecoveryNotDue": errors.RecoveryRejected,
    "ConsentRegistryInvalidRecoveryDelay": errors.RecoveryRejected,
    "LoyaltyPointsInvalidSigner": errors.InvalidSignature,
    "LoyaltyPointsExpiredSignature": errors.SignatureExpired,
    "LoyaltyPointsInsufficientBalance": errors.InsufficientPoints,
    "LoyaltyPointsInvalidAmount": errors.PointsRejected,
    "LoyaltyPointsInvalidExpiry": errors.PointsRejected,
    "LoyaltyPointsIssuanceUsed": errors.PointsRejected,
    "LoyaltyPointsRedemptionUsed": errors.PointsRejected,
    "LoyaltyPointsUnboundSubject": errors.PointsRejected,
    "LoyaltyPointsUnknownPartner": errors.PointsRejected,
    "LoyaltyPointsUnauthorizedSubmitter": errors.PointsRejected,
    "AccessLogEmptyBatch": errors.AccessRejected,
}


def _abi_type(param: dict[str, Any]) -> str:
    if param["type"].startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in param["components"])
        return f"({inner}){param['type'][5:]}"
    return str(param["type"])


def revert_of(error: str, args: dict[str, Any]) -> ContractRevert:
    """The exception of a decoded custom error by its name (as `RevertDecoder` raises it): how a refusal
    told across a process boundary (`api.workers`) is raised again."""
    return _ERROR_CLASSES.get(error, ContractRevert)(error, args)


class RevertDecoder:
    """Turns revert data into the matching `ContractRevert` subclass, using every known error ABI."""

    def __init__(self, artifacts: Sequence[Artifact]) -> None:
        self._errors: dict[bytes, tuple[str, list[str], list[str]]] = {}
        for artifact in artifacts:
            for entry in artifact.abi:
                if entry["type"] != "error":
                    continue
                types = [_abi_type(p) for p in entry["inputs"]]
                selector = keccak(text=f"{entry['name']}({','.join(types)})")[:4]
                self._errors[selector] = (entry["name"], [p["name"] for p in entry["inputs"]], types)

    def decode(self, data: bytes) -> ContractRevert:
        selector, body = data[:4], data[4:]
        if selector == _ERROR_STRING:
            return errors.UnknownRevert("Error", {"message": abi_decode(["string"], body)[0]}, data=data)
        if selector == _PANIC:
            return errors.UnknownRevert("Panic", {"code": abi_decode(["uint256"], body)[0]}, data=data)
        known = self._errors.get(selector)
        if known is None:
            return errors.UnknownRevert("UnknownError", {"data": data}, data=data)
        name, names, types = known
        values: dict[str, Any] = {
            n: Web3.to_checksum_address(v) if t == "address" else v
            for n, t, v in zip(names, types, abi_decode(types, body), strict=True)
        }
        if name == "ConsentRegistryBatchItemFailed":
            return errors.BatchItemFailed(int(values["index"]), self.decode(values["reason"]), data=data)
        return _ERROR_CLASSES.get(name, ContractRevert)(name, values, data=data)

    def from_exception(self, exc: BaseException) -> ContractRevert | None:
        """Decode the revert data a failed call carries: web3 puts it in `.data`; eth-tester in the
        bytes argument of an exception further down the chain."""
        pending: list[BaseException] = [exc]
        visited: set[int] = set()
        while pending:
            seen = pending.pop(0)
            if id(seen) in visited:
                continue
            visited.add(id(seen))
            data = getattr(seen, "data", None)
            if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
                return self.decode(bytes.fromhex(data[2:]))
            if isinstance(data, (bytes, bytearray)) and len(data) >= 4:
                return self.decode(bytes(data))
            first = seen.args[0] if seen.args else None
            if isinstance(first, str):
                first = _bytes_in_message(first)
            if isinstance(first, (bytes, bytearray)) and len(first) >= 4:
                return self.decode(bytes(first))
            pending.extend(e for e in (first, seen.__cause__, seen.__context__) if isinstance(e, BaseException))
        return None


def _bytes_in_message(message: str) -> bytes | None:
    """eth-tester sometimes keeps revert data only as the repr in its message: `execution reverted: b'...'`."""
    match = re.fullmatch(r"execution reverted: (b'.*'|b\".*\")", message, flags=re.DOTALL)
    if match is None:
        return None
    value = ast.literal_eval(match.group(1))
    return value if isinstance(value, bytes) else None


class ContractClient:
    """Base of the typed clients: encodes calls, pre-flights them, sends, and decodes failures."""

    def __init__(
        self,
        w3: Web3,
        address: ChecksumAddress,
        artifact: Artifact,
        sender: TxSender,
        decoder: RevertDecoder,
        *,
        logs_range: int = MAX_LOGS_RANGE,
    ) -> None:
        self.w3 = w3
        self.address = address
        self.sender = sender
        self.decoder = decoder
        self.contract = w3.eth.contract(address=address, abi=artifact.abi)
        self.log_fetcher = LogFetcher(w3, logs_range)

    def get_logs(self, topics: list[Any], from_block: int = 0, to_block: int | None = None) -> list[dict[str, Any]]:
        """This contract's logs matching `topics` in [from_block, to_block] (None: the head), as the node
        sends them, in ranges the node accepts (`ledger.logs.LogFetcher`)."""
        return self.log_fetcher.fetch({"address": self.address, "topics": topics}, from_block, to_block)

    def encode(self, function: str, *args: Any) -> bytes:
        return bytes.fromhex(self.contract.encode_abi(function, args=list(args))[2:])

    def call(self, function: str, *args: Any) -> Any:
        try:
            return getattr(self.contract.functions, function)(*args).call()
        except _REVERTS as exc:
            raise self._translate(exc) from exc
        except (RequestException, OSError) as exc:
            raise ChainError(f"the node did not answer {function}: {exc.__class__.__name__}") from exc

    def has_role(self, role: bytes, account: ChecksumAddress) -> bool:
        """Whether `account` holds `role` (every contract of ours is an OpenZeppelin AccessControl)."""
        return bool(self.call("hasRole", role, account))

    def estimate(self, data: bytes) -> int:
        """Gas for `data` from the operator; raises the decoded revert if it would fail."""
        try:
            return int(
                self.w3.eth.estimate_gas({"from": self.sender.account.address, "to": self.address, "data": data})
            )
        except _REVERTS as exc:
            raise self._translate(exc) from exc
        except (RequestException, OSError) as exc:
            raise ChainError(f"the node did not answer eth_estimateGas: {exc.__class__.__name__}") from exc

    def transact(self, data: bytes, *, gas: int | None = None) -> Receipt:
        """Send one call and wait for it. Without `gas`, pre-flight it first (a revert is raised unsent)."""
        if gas is None:
            gas = self.estimate(data) * 5 // 4 + 10_000
        (tx_hash,) = self.sender.send([TxRequest(to=self.address, data=data, gas=gas)])
        (receipt,) = self.sender.wait([tx_hash])
        if receipt.status != 1:
            raise self.revert_reason(data, receipt)
        return receipt

    def revert_reason(self, data: bytes, receipt: Receipt) -> Exception:
        """Why a mined transaction reverted, by calling it again (`eth_call`): receipts do not say (Besu
        puts a `revertReason` in them only with `--revert-reason-enabled`; geth and anvil never do).

        First against the state before its block. A transaction that failed only because of one before
        it in the same block (a nonce that one used) passes there; then against the state after its
        block, where that earlier one has applied (the failed one changed nothing)."""
        call: TxParams = {
            "from": self.sender.account.address,
            "to": self.address,
            "data": HexBytes(data),
            "gas": receipt.gas_used * 2 + 100_000,
        }
        for block in (receipt.block_number - 1, receipt.block_number):
            try:
                self.w3.eth.call(call, block_identifier=block)
            except _REVERTS as exc:
                decoded = self._translate(exc)
                decoded.tx_hash = receipt.tx_hash  # type: ignore[attr-defined]
                return decoded
            except (RequestException, OSError) as exc:
                raise ChainError(f"the node did not answer eth_call: {exc.__class__.__name__}") from exc
        return TransactionFailed(f"transaction {receipt.tx_hash} reverted", tx_hash=receipt.tx_hash)

    def _translate(self, exc: BaseException) -> Exception:
        decoded = self.decoder.from_exception(exc)
        return decoded if decoded is not None else TransactionFailed(str(exc))

    def events(self, receipt: Receipt, event: str) -> list[dict[str, Any]]:
        """The `event` logs of this contract in `receipt`, decoded (args by name)."""
        handler = getattr(self.contract.events, event)()
        topic = "0x" + bytes(handler.topic).hex() if not isinstance(handler.topic, str) else handler.topic
        decoded = []
        for log in receipt.logs:
            topics = [t if isinstance(t, str) else "0x" + bytes(t).hex() for t in log["topics"]]
            if (
                topics
                and topics[0].lower() == topic.lower()
                and Web3.to_checksum_address(log["address"]) == self.address
            ):
                decoded.append(dict(handler.process_log(_normalise_log(log))["args"]))
        return decoded


def _normalise_log(log: dict[str, Any]) -> dict[str, Any]:
    from hexbytes import HexBytes

    out = dict(log)
    out["topics"] = [HexBytes(t) for t in log["topics"]]
    out["data"] = HexBytes(log["data"])
    for key in ("blockHash", "transactionHash"):
        if key in out and out[key] is not None:
            out[key] = HexBytes(out[key])
    for key in ("logIndex", "transactionIndex", "blockNumber"):
        if isinstance(out.get(key), str):
            out[key] = int(out[key], 16)
    return out


@dataclass
class DeployedContract:
    address: str
    block_number: int
    tx_hash: str
    code_hash: str
    input_hash: str


@dataclass
class Deployment:
    """What is deployed where: written to `data_dir/deployment.json`, reused on restart."""

    chain_id: int
    operator: str
    contracts: dict[str, DeployedContract] = field(default_factory=dict)

    @property
    def deploy_block(self) -> int:
        return min((c.block_number for c in self.contracts.values()), default=0)

    def address(self, name: str) -> ChecksumAddress:
        return Web3.to_checksum_address(self.contracts[name].address)

    def save(self, path: Path) -> None:
        write_atomically(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Deployment:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            chain_id=raw["chain_id"],
            operator=raw["operator"],
            contracts={n: DeployedContract(**c) for n, c in raw["contracts"].items()},
        )


ConstructorArgs = Callable[[Deployment], list[Any]]


def ledger_plan(admin: str, operator: str, accessor: str) -> list[tuple[str, ConstructorArgs]]:
    """The project's contracts in deployment order: the registry first (the points contract reads
    controllers and partners from it, the access log checks consent against it). A deployment that
    lacks a later contract gets it on the next start.

    `accessor` records data accesses (the CRM bridge). It is its own key, not the operator's: the
    bridge runs as its own process, and the operator key has one writer (the relayer) with a local nonce."""
    return [
        ("ConsentRegistry", lambda _d: [admin, operator]),
        ("LoyaltyPoints", lambda d: [admin, operator, d.address("ConsentRegistry")]),
        ("AccessLog", lambda d: [admin, accessor, d.address("ConsentRegistry")]),
    ]


def deploy_contract(w3: Web3, sender: TxSender, artifact: Artifact, args: list[Any]) -> DeployedContract:
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    data = bytes.fromhex(factory.constructor(*args).data_in_transaction[2:])
    gas = int(w3.eth.estimate_gas({"from": sender.account.address, "data": data})) * 5 // 4
    (tx_hash,) = sender.send([TxRequest(to=None, data=data, gas=gas)])
    (receipt,) = sender.wait([tx_hash])
    if receipt.status != 1 or receipt.contract_address is None:
        raise DeploymentError(f"deploying {artifact.name} failed in {tx_hash}")
    code = bytes(w3.eth.get_code(receipt.contract_address))
    return DeployedContract(
        address=receipt.contract_address,
        block_number=receipt.block_number,
        tx_hash=tx_hash,
        code_hash="0x" + keccak(code).hex(),
        input_hash=artifact.input_hash,
    )


def missing_functions(code: bytes, artifact: Artifact) -> list[str]:
    """The functions of `artifact`'s ABI that deployed `code` does not dispatch: each external function's
    4-byte selector is pushed by the contract's dispatcher, so it appears in the code (without its
    leading zero bytes: the compiler pushes 0x00abcdef as a 3-byte constant)."""
    functions: list[Any] = [entry for entry in artifact.abi if entry["type"] == "function"]
    return [f["name"] for f in functions if bytes(function_abi_to_4byte_selector(f)).lstrip(b"\0") not in code]


def ensure_deployed(
    w3: Web3,
    sender: TxSender,
    artifacts: dict[str, Artifact],
    plan: Sequence[tuple[str, ConstructorArgs]],
    record: Path | None,
) -> Deployment:
    """Deploy what `plan` names (in order) unless `record` shows it deployed on this chain already.

    A record whose contracts have no code on the chain means the chain lost its state (or this is
    another chain): that is refused rather than silently deploying afresh, which would orphan every
    consent recorded so far.
    """
    chain_id = w3.eth.chain_id
    if record is not None and record.is_file():
        deployment = Deployment.load(record)
        if deployment.chain_id != chain_id:
            raise DeploymentError(f"{record} is for chain {deployment.chain_id}, but the node is chain {chain_id}")
        for name, contract in deployment.contracts.items():
            code = bytes(w3.eth.get_code(Web3.to_checksum_address(contract.address)))
            if "0x" + keccak(code).hex() != contract.code_hash:
                raise DeploymentError(
                    f"{record} says {name} is at {contract.address}, but the chain has "
                    f"{'no' if not code else 'other'} code there: the chain's state was lost or replaced. "
                    f"Restore the chain state, or move {record} away to deploy afresh."
                )
            missing = missing_functions(code, artifacts[name]) if name in artifacts else []
            if missing:
                raise DeploymentError(
                    f"{name} at {contract.address} was deployed by an older version of this service: it has no "
                    f"{', '.join(missing)}. Its data cannot be carried over automatically; start from a new "
                    f"data dir (or node), or run the version that deployed it."
                )
    else:
        deployment = Deployment(chain_id=chain_id, operator=sender.account.address)
    for name, args in plan:
        if name not in deployment.contracts:
            deployment.contracts[name] = deploy_contract(w3, sender, artifacts[name], args(deployment))
            if record is not None:
                deployment.save(record)
    return deployment
