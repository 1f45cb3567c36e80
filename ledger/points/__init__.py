"""The loyalty points pipeline: issuers' lots and partners' signed redemptions, queued in the service
database, put on-chain in `LoyaltyPoints` batch transactions, indexed into the read model and read by
customers and partners.

Its parts, named as in `ledger.access`:

- `client`: the `LoyaltyPoints` client, the encoding of its batches, event decoding;
- `tables`: the lane's queue (requests, batches, idempotency records) and the read model's tables;
- `lane`: the relayer's points lane (`PointsRelayer`), which sends the queue in batches and settles
  each request from its batch's receipt;
- `follower`: the indexer's follower, which builds the read model from the chain's events;
- `reads`: the read model's queries (`PointsReader`);
- `completions`: the callbacks waiting for requests to finish (the API's synchronous answers), told
  by the lane and the follower.

Importing the package registers its tables on the service database's metadata.
"""

from ledger.points.client import (
    ISSUER_ROLE,
    RELAYER_ROLE,
    EventKind,
    Issuance,
    LoyaltyPointsClient,
    PointsEvent,
    SignedRedemption,
)
from ledger.points.completions import Completions
from ledger.points.follower import PointsFollower
from ledger.points.lane import ERROR_CODES, LOST_AFTER_ANSWER, PointsRelayer
from ledger.points.reads import PointsReader, Tier
from ledger.points.tables import (
    FINAL,
    IDEMPOTENCY_RECORD,
    LIVE,
    REQUEST_BY_REF,
    IdempotencyRecord,
    PointsBatch,
    PointsHistory,
    PointsLot,
    PointsRequest,
    PointsStatus,
    RedemptionCode,
    RedemptionCodeEnd,
    prune_idempotency_records,
)

__all__ = [
    "ERROR_CODES",
    "FINAL",
    "IDEMPOTENCY_RECORD",
    "ISSUER_ROLE",
    "LIVE",
    "LOST_AFTER_ANSWER",
    "RELAYER_ROLE",
    "REQUEST_BY_REF",
    "Completions",
    "EventKind",
    "IdempotencyRecord",
    "Issuance",
    "LoyaltyPointsClient",
    "PointsBatch",
    "PointsEvent",
    "PointsFollower",
    "PointsHistory",
    "PointsLot",
    "PointsReader",
    "PointsRelayer",
    "PointsRequest",
    "PointsStatus",
    "RedemptionCode",
    "RedemptionCodeEnd",
    "SignedRedemption",
    "Tier",
    "prune_idempotency_records",
]
