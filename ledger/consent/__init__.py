"""The consent pipeline (being gathered into this package)."""

from ledger.consent.client import (
    DEFAULT_ADMIN_ROLE,
    OPERATOR_ROLE,
    PARTNER_ROLE,
    ConsentRegistryClient,
    RegistryEvent,
    SignedChange,
    batch_gas,
    max_changes_per_batch,
)

__all__ = [
    "DEFAULT_ADMIN_ROLE",
    "OPERATOR_ROLE",
    "PARTNER_ROLE",
    "ConsentRegistryClient",
    "RegistryEvent",
    "SignedChange",
    "batch_gas",
    "max_changes_per_batch",
]
