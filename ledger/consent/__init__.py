"""The consent pipeline: customers' signed grants and revocations, accepted into the outbox in the
service database, put on-chain in `ConsentRegistry` batch transactions, indexed into the read model
and read by customers and the bridge.

Its parts, named as in `ledger.points` and `ledger.access`:

- `client`: the `ConsentRegistry` client, the encoding of its batches, its roles, event decoding;
- `tables`: the outbox (requests, batches), the read model's tables (events, consents, bound keys)
  and the bindings the service made;
- `lane`: the relayer's consent lane (`Relayer`), which sends the outbox in batches; a request is
  confirmed by the follower, from the chain's own event;
- `follower`: the indexer's follower, which builds the read model from the chain's events, confirms
  the requests they applied, and queues again those a reorganisation took back;
- `reads`: consent status and permissions (`ConsentReader`): the read model with the live requests;
- `outbox`: accepting signed changes durably, each with its subject's next nonce (`Outbox`, and
  `OutboxWriter`'s group commit);
- `bindings`: customers' key bindings, recorded when acknowledged and put back when the chain loses
  them (`Bindings`).

Importing the package registers its tables on the service database's metadata.
"""

from ledger.consent.bindings import CONTROLLER_OF, UNBOUND, UNKNOWN_PARTNER, Bindings, record_binding
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
from ledger.consent.follower import ConsentFollower
from ledger.consent.lane import ERROR_CODES, Relayer, signed_change
from ledger.consent.outbox import NonceConflict, Outbox, OutboxWriter
from ledger.consent.reads import ConsentReader, ConsentStatus
from ledger.consent.tables import (
    LIVE,
    BoundController,
    ConsentEvent,
    ConsentRequest,
    ConsentState,
    ControllerState,
    RelayBatch,
    RequestStatus,
    latest_binding,
)

__all__ = [
    "CONTROLLER_OF",
    "DEFAULT_ADMIN_ROLE",
    "ERROR_CODES",
    "LIVE",
    "OPERATOR_ROLE",
    "PARTNER_ROLE",
    "UNBOUND",
    "UNKNOWN_PARTNER",
    "Bindings",
    "BoundController",
    "ConsentEvent",
    "ConsentFollower",
    "ConsentReader",
    "ConsentRegistryClient",
    "ConsentRequest",
    "ConsentState",
    "ConsentStatus",
    "ControllerState",
    "NonceConflict",
    "Outbox",
    "OutboxWriter",
    "RegistryEvent",
    "RelayBatch",
    "Relayer",
    "RequestStatus",
    "SignedChange",
    "batch_gas",
    "latest_binding",
    "max_changes_per_batch",
    "record_binding",
    "signed_change",
]
