"""The chain roles of the service's two keys, checked at every start, and moved when a key is rotated.

The operator key (relayer, issuer, and admin of the three contracts) and the accessor key (the
bridge's access records) come from settings. A start with keys the contracts do not know would fail
every request it accepted; so the supervisor checks first (`check_keys`):
- an operator key without the operator's roles: if `previous` (the old operator key, from
  `CONSENT_LEDGER_CHAIN_PREVIOUS_OPERATOR_KEY`) holds them, it grants each to the new key and then
  renounces its own (grants first: stopped in between, both hold them and the next start finishes);
  else the start is refused;
- an accessor key without ACCESSOR_ROLE: the operator (the access log's admin) revokes it from every
  other account that has it (found by the RoleGranted events), then grants it: one accessor at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak
from web3 import Web3

from ledger.access.client import ACCESSOR_ROLE
from ledger.consent.client import DEFAULT_ADMIN_ROLE, OPERATOR_ROLE
from ledger.contracts import ContractClient
from ledger.errors import LedgerError
from ledger.logs import bytes_of
from ledger.points.client import ISSUER_ROLE, RELAYER_ROLE
from ledger.tx import TxSender

log = logging.getLogger(__name__)

# What the operator holds, per contract (`ledger_plan` makes it the admin too).
OPERATOR_ROLES: Mapping[str, tuple[bytes, ...]] = {
    "ConsentRegistry": (DEFAULT_ADMIN_ROLE, OPERATOR_ROLE),
    "LoyaltyPoints": (DEFAULT_ADMIN_ROLE, ISSUER_ROLE, RELAYER_ROLE),
    "AccessLog": (DEFAULT_ADMIN_ROLE,),
}
ROLE_GRANTED = keccak(text="RoleGranted(bytes32,address,address)")
PENDING_WAIT = 60.0  # seconds for the old operator key's last transactions to be mined


class KeyNotAuthorised(LedgerError):
    """The configured key holds none of its roles on the contracts, and no previous key can hand them over."""


def _missing(clients: Mapping[str, ContractClient], roles: Mapping[str, tuple[bytes, ...]], account: str) -> bool:
    holder = Web3.to_checksum_address(account)
    return any(not clients[name].call("hasRole", role, holder) for name, held in roles.items() for role in held)


def check_keys(
    operator: Mapping[str, ContractClient],
    accessor: ChecksumAddress,
    previous: Mapping[str, ContractClient] | None,
    *,
    from_block: int = 0,
) -> list[str]:
    """Make the configured keys the ones the contracts authorise (see the module); returns what was done.

    `operator`: the three contracts' clients sending with the configured operator key; `previous`: the
    same with the previous operator key, if one is configured; `from_block`: where the access log's
    events start (its deployment)."""
    done: list[str] = []
    new = operator["ConsentRegistry"].sender.account.address
    if previous is not None and previous["ConsentRegistry"].sender.account.address != new:  # the same: no rotation
        done += _hand_over(previous, new)
    if _missing(operator, OPERATOR_ROLES, new):
        raise KeyNotAuthorised(
            f"the operator key in the settings ({new}) does not hold the operator's roles on the contracts: "
            "to rotate it, set CONSENT_LEDGER_CHAIN_PREVIOUS_OPERATOR_KEY to the old key for one start"
        )
    access_log = operator["AccessLog"]
    if not access_log.call("hasRole", ACCESSOR_ROLE, accessor):  # a new accessor key: the others first lose it
        for holder in _holders(access_log, ACCESSOR_ROLE, from_block):
            if holder != accessor and access_log.call("hasRole", ACCESSOR_ROLE, holder):
                access_log.transact(access_log.encode("revokeRole", ACCESSOR_ROLE, holder))
                done.append(f"AccessLog: ACCESSOR_ROLE revoked from {holder}")
        access_log.transact(access_log.encode("grantRole", ACCESSOR_ROLE, accessor))
        done.append(f"AccessLog: ACCESSOR_ROLE granted to {accessor}")
    for line in done:
        log.warning("chain keys: %s", line)
    return done


def _hand_over(previous: Mapping[str, ContractClient], new: ChecksumAddress) -> list[str]:
    """Grant `new` each operator role it lacks, then renounce each the previous key still holds (also
    what a start stopped half-way left)."""
    sender: TxSender = previous["ConsentRegistry"].sender
    old = sender.account.address
    grants = [(n, r) for n, roles in OPERATOR_ROLES.items() for r in roles if not previous[n].call("hasRole", r, new)]
    renounce = [
        (n, r)
        for n, roles in OPERATOR_ROLES.items()
        for r in sorted(roles, key=lambda role: role == DEFAULT_ADMIN_ROLE)  # the admin role last
        if previous[n].call("hasRole", r, old)
    ]
    if grants or renounce:
        _wait_for_pending(sender)
    done: list[str] = []
    for name, role in grants:  # every grant before any renouncement
        previous[name].transact(previous[name].encode("grantRole", role, new))
        done.append(f"{name}: role {role.hex()[:8]} granted to {new}")
    for name, role in renounce:
        previous[name].transact(previous[name].encode("renounceRole", role, old))
        done.append(f"{name}: role {role.hex()[:8]} renounced by {old}")
    return done


def _wait_for_pending(sender: TxSender) -> None:
    """Until the old key's transactions sent before this start are mined (they need its roles)."""
    w3, old = sender.w3, sender.account.address
    deadline = time.monotonic() + PENDING_WAIT
    while w3.eth.get_transaction_count(old, "pending") > w3.eth.get_transaction_count(old, "latest"):
        if time.monotonic() > deadline:
            raise KeyNotAuthorised(f"the previous operator key {old} still has transactions pending; start again")
        time.sleep(0.2)


def _holders(client: ContractClient, role: bytes, from_block: int) -> set[ChecksumAddress]:
    """Every account ever granted `role` on the contract (its RoleGranted events), read in ranges the
    node accepts (`ContractClient.get_logs`: Besu answers 5,000 blocks per eth_getLogs by default)."""
    topics: list[Any] = ["0x" + ROLE_GRANTED.hex(), "0x" + role.hex()]
    return {
        Web3.to_checksum_address(bytes_of(entry["topics"][2])[-20:]) for entry in client.get_logs(topics, from_block)
    }
