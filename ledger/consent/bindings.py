"""Customers' key bindings: recorded when acknowledged, and put back when the chain loses them.

A binding is a synchronous transaction of the operator (`bindController`), not an outbox request: the
API answers once it is mined and indexed. A node that dies before its state is written loses its last
blocks, and with them a binding made in that window. The relayers send the outbox again after such a
loss, but every consent change and redemption of that customer would then fail as `unbound_subject`.

So each binding is recorded in the service database (durably, before the API acknowledges it), and
`Bindings.restore` binds again every recorded binding that the chain no longer holds. It runs when a
loss is possible: at start, after the indexer rolled the read model back, and when a relayer meets an
`unbound_subject` rejection for a customer recorded here. Until then the relayers hold such a request
back (`holds`) rather than fail it: it is waiting for its binding, not refused.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import Engine, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from ledger.consent.client import ConsentRegistryClient
from ledger.consent.tables import BoundController, ControllerState
from ledger.eip712 import RecoveryCancel, Signature
from ledger.store import sessions
from ledger.tx import Receipt
from ledger.types import Subject, checksummed

log = logging.getLogger(__name__)

# The rejections, by either contract, of a request whose subject has no key on-chain.
UNBOUND = frozenset({"ConsentRegistryUnboundSubject", "LoyaltyPointsUnboundSubject"})
# ... and of one naming a partner without the partner role.
UNKNOWN_PARTNER = frozenset({"ConsentRegistryUnknownPartner", "LoyaltyPointsUnknownPartner"})


# A subject's key: the chain's as the read model has it, else the one the service bound. After the node
# lost blocks, the read model has rolled back the lost binding events until the service binds again and
# the indexer sees it (about a second); meanwhile the service's own record says whose key it is, and a
# request it allows is held back by the relayer until the chain has the key again (`Bindings.holds`).
# Without it, valid redemptions in that window were refused as `unbound_subject` (found by
# `scripts/chaos_points.py`).
CONTROLLER_OF = select(
    func.coalesce(
        select(ControllerState.controller).where(ControllerState.subject == bindparam("subject")).scalar_subquery(),
        select(BoundController.controller).where(BoundController.subject == bindparam("subject")).scalar_subquery(),
    )
)


def record_binding(session: Session, subject: bytes, controller: str, tx_hash: str, block_number: int) -> None:
    """Record a binding the service acknowledges (in the caller's write transaction)."""
    session.merge(
        BoundController(
            subject=bytes(subject), controller=checksummed(controller), tx_hash=tx_hash, block_number=block_number
        )
    )


class Bindings:
    def __init__(self, engine: Engine, registry: ConsentRegistryClient) -> None:
        self.registry = registry
        self._sessions = sessions(engine)
        self.check = threading.Event()  # set: a binding may have been lost; `restore` should look
        self.check.set()  # at start, the node may have restarted from an older state meanwhile
        self._suspects: set[bytes] = set()  # subjects a relayer found unbound on-chain
        self._lock = threading.Lock()

    def bind(self, subject: Subject, controller: str) -> Receipt:
        """Bind `subject`'s key on-chain and record it; raises ConsentRejected or LedgerError."""
        receipt = self.registry.bind_controller(subject, checksummed(controller))
        with self._sessions.begin() as session:
            record_binding(session, subject, controller, receipt.tx_hash, receipt.block_number)
        return receipt

    def recovery(self, action: str, subject: Subject, *args: Any) -> Receipt:
        """A step of a key recovery (`start` new_key; `complete`; `cancel` new_key, effective_at, deadline,
        signature): raises its ContractRevert or LedgerError. A completed one is recorded as the
        subject's binding, so that `restore` puts back the new key, not the lost one."""
        if action == "start":
            (new_controller,) = args
            return self.registry.start_recovery(subject, checksummed(new_controller))
        if action == "cancel":
            new_controller, effective_at, deadline, signature = args
            cancel = RecoveryCancel(subject, checksummed(new_controller), int(effective_at), int(deadline))
            return self.registry.cancel_recovery(cancel, Signature.from_bytes(bytes(signature)))
        if action != "complete":
            raise ValueError(f"no recovery step {action!r}")
        pending = self.registry.recovery_of(subject)
        receipt = self.registry.complete_recovery(subject)
        if pending is not None:  # else the call above raised: nothing is pending
            with self._sessions.begin() as session:
                record_binding(session, subject, pending.new_controller, receipt.tx_hash, receipt.block_number)
        return receipt

    def adopt_indexed(self) -> int:
        """Record the bindings the read model holds and this table does not (a database from before the
        table existed); returns how many."""
        with self._sessions.begin() as session:
            missing = (
                select(ControllerState.subject, ControllerState.controller, ControllerState.block_number)
                .outerjoin(BoundController, BoundController.subject == ControllerState.subject)
                .where(BoundController.subject.is_(None))
            )
            rows = session.execute(missing).all()
            if rows:
                session.execute(
                    insert(BoundController),
                    [{"subject": s, "controller": c, "tx_hash": "", "block_number": b} for s, c, b in rows],
                )
        return len(rows)

    def recorded(self, subject: bytes) -> bool:
        with self._sessions() as session:
            return session.get(BoundController, bytes(subject)) is not None

    def holds(self, error: str, subject: bytes) -> bool:
        """Whether a request rejected with `error` waits for its binding to be put back (the binding is
        recorded here, so the chain lost it): queue it again rather than fail it. Asks for a `restore`."""
        if error not in UNBOUND or not self.recorded(subject):
            return False
        with self._lock:
            self._suspects.add(bytes(subject))
        self.check.set()
        return True

    def restore(self) -> int:
        """Bind again each recorded binding that the chain does not hold, of those the read model lacks
        (the indexer rolled them back) and those a relayer found unbound (`holds`; the indexer may not
        have rolled back yet); returns how many. A binding the chain holds is left alone: the indexer
        has not reached it yet."""
        self.check.clear()
        with self._lock:
            suspects, self._suspects = self._suspects, set()
        try:
            return self._restore(suspects)
        except BaseException:
            with self._lock:
                self._suspects |= suspects
            self.check.set()  # look again next time
            raise

    def _restore(self, suspects: set[bytes]) -> int:
        columns = select(BoundController.subject, BoundController.controller)
        with self._sessions() as session:
            unindexed = columns.outerjoin(ControllerState, ControllerState.subject == BoundController.subject)
            rows = list(session.execute(unindexed.where(ControllerState.subject.is_(None))))
            if suspects:
                rows.extend(session.execute(columns.where(BoundController.subject.in_(suspects))))
        candidates: dict[bytes, str] = dict(rows)
        held = self.registry.controllers_of(list(candidates))  # one round trip, however many
        lost = [
            (Subject(subject), checksummed(controller))
            for subject, controller in candidates.items()
            if held[subject] is None
        ]
        # All sent at once: a crash can lose every binding since the last checkpoint, and one at a time,
        # a block each, held their customers' changes back for as many blocks.
        receipts = self.registry.bind_controllers(lost)
        restored = [(subject, receipt) for (subject, _), receipt in zip(lost, receipts, strict=True) if receipt.status]
        if restored:
            with self._sessions.begin() as session:
                for subject, receipt in restored:
                    session.execute(
                        update(BoundController)
                        .where(BoundController.subject == bytes(subject))
                        .values(tx_hash=receipt.tx_hash, block_number=receipt.block_number)
                    )
            log.warning("the chain had lost %d key bindings; bound them again", len(restored))
        if len(restored) < len(lost):  # bound meanwhile by another way, or refused: look again next time
            log.warning("%d key bindings could not be bound again", len(lost) - len(restored))
            self.check.set()
        return len(restored)
