"""The access log pipeline: every access to a customer's data, permitted or denied, recorded on-chain in
`AccessLog`'s hash chain, indexed into the read model, read by auditors and customers, and verified
against the chain.

Its parts, named as in `ledger.points`:

- `client`: the `AccessLog` client, the encoding of `record`, the hash chain's step, event decoding;
- `tables`: the read model's table (`AccessEntry`);
- `follower`: the indexer's follower, which fills that table from the chain's events;
- `reads`: the read model's queries (`AccessReader`);
- `verification`: the auditor's check of the read model and the hash chain against the chain.

There is no lane: the bridge records each access request itself, synchronously, and releases data
only once that record is final (`crm_bridge.bridge`), so no queue or relayer stands between.
"""

from ledger.access.client import (
    ACCESSOR_ROLE,
    Access,
    AccessBatch,
    AccessEvent,
    AccessLogClient,
    fetch_batches,
    fetch_events,
    max_record_entries,
)
from ledger.access.follower import AccessFollower
from ledger.access.reads import AccessReader
from ledger.access.tables import AccessEntry
from ledger.access.verification import Divergence, DivergenceCode, Verification, verify

__all__ = [
    "ACCESSOR_ROLE",
    "Access",
    "AccessBatch",
    "AccessEntry",
    "AccessEvent",
    "AccessFollower",
    "AccessLogClient",
    "AccessReader",
    "Divergence",
    "DivergenceCode",
    "Verification",
    "fetch_batches",
    "fetch_events",
    "max_record_entries",
    "verify",
]
