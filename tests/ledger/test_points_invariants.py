"""LoyaltyPoints against a Python model, over random sequences of issuances, redemptions and time
(hypothesis stateful testing on the in-process chain). After every step: each subject's lots are the
model's, and sum of balances = issued - redeemed - expired."""

from __future__ import annotations

import os
from typing import Any

import pytest
from eth_account import Account
from eth_utils.crypto import keccak
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ledger import eip712
from ledger.backends import InProcessBackend
from ledger.compiler import Artifact
from ledger.eip712 import Redemption
from ledger.points import EventKind, Issuance, SignedRedemption
from ledger.settings import ChainSettings
from ledger.types import Subject
from tests.ledger.conftest import Accounts, Ledger, make_ledger

SUBJECTS = 3


class PointsMachine(RuleBasedStateMachine):
    ledger: Ledger

    def __init__(self) -> None:
        super().__init__()
        self.lots: list[dict[int, list[int]]] = []  # per subject: lot id -> [remaining, expires_at]
        self.last_lot: list[int] = []
        self.sequence: list[int] = []
        self.totals = [0, 0, 0]
        self.customers: list[Any] = []
        self.subjects: list[Subject] = []

    @initialize()
    def start(self) -> None:
        self.ledger = make_ledger(BACKEND, ARTIFACTS, ACCOUNTS)
        for _ in range(SUBJECTS):
            customer = Account.create()
            subject = Subject(keccak(customer.key))
            self.ledger.registry.bind_controller(subject, customer.address)
            self.customers.append(customer)
            self.subjects.append(subject)
            self.lots.append({})
            self.last_lot.append(0)
            self.sequence.append(0)

    def _block_time(self, block_number: int) -> int:
        return int(self.ledger.backend.w3.eth.get_block(block_number)["timestamp"])

    def _sweep(self, who: int, now: int) -> None:
        for lot_id, (remaining, expires_at) in sorted(self.lots[who].items(), key=lambda kv: (kv[1][1], kv[0])):
            if expires_at > now:
                break
            self.totals[2] += remaining
            del self.lots[who][lot_id]

    @rule(
        items=st.lists(
            st.tuples(st.integers(0, SUBJECTS - 1), st.integers(1, 100), st.sampled_from([100, 200, 300, 1000])),
            min_size=1,
            max_size=4,
        )
    )
    def issue(self, items: list[tuple[int, int, int]]) -> None:
        now = self.ledger.now()
        batch = [Issuance(self.subjects[w], amount, now + life, os.urandom(32)) for w, amount, life in items]
        receipt = self.ledger.points.issue_batch(batch)
        when = self._block_time(receipt.block_number)
        events = [e for e in self.ledger.points.logs(receipt) if e.kind is not EventKind.EXPIRED]
        assert [e.kind for e in events] == [EventKind.ISSUED] * len(batch)
        for (who, amount, _), issuance, event in zip(items, batch, events, strict=True):
            self._sweep(who, when)
            same = [i for i, (_, exp) in self.lots[who].items() if exp == issuance.expires_at]
            if same:
                lot_id = same[0]
                self.lots[who][lot_id][0] += amount
            else:
                self.last_lot[who] += 1
                lot_id = self.last_lot[who]
                self.lots[who][lot_id] = [amount, issuance.expires_at]
            assert event.lot_id == lot_id
            self.totals[0] += amount

    @rule(items=st.lists(st.tuples(st.integers(0, SUBJECTS - 1), st.integers(1, 250)), min_size=1, max_size=3))
    def redeem(self, items: list[tuple[int, int]]) -> None:
        deadline = self.ledger.now() + 3600
        planned = list(self.sequence)
        batch = []
        for who, amount in items:
            message = Redemption(
                self.subjects[who],
                self.ledger.partner,
                amount,
                os.urandom(32),
                eip712.redemption_nonce(self.ledger.partner, planned[who]),
                deadline,
            )
            signed = SignedRedemption(
                message, eip712.sign(bytes(self.customers[who].key), self.ledger.points.domain, message)
            )
            batch.append(signed)
            planned[who] += 1  # assumes success; a failure makes the later ones of this subject fail on the nonce
        receipt = self.ledger.points.redeem_batch(batch)
        when = self._block_time(receipt.block_number)
        outcomes = [e for e in self.ledger.points.logs(receipt) if e.kind is not EventKind.EXPIRED]
        assert len(outcomes) == len(batch)
        for (who, amount), signed, event in zip(items, batch, outcomes, strict=True):
            self._sweep(who, when)
            nonce_ok = signed.redemption.nonce & (2**64 - 1) == self.sequence[who]
            balance = sum(remaining for remaining, _ in self.lots[who].values())
            if nonce_ok and balance >= amount:
                assert event.kind is EventKind.REDEEMED, self.ledger.decoder.decode(event.reason)
                assert event.balance == balance - amount
                left = amount
                for lot_id, lot in sorted(self.lots[who].items(), key=lambda kv: (kv[1][1], kv[0])):
                    take = min(lot[0], left)
                    lot[0] -= take
                    left -= take
                    if lot[0] == 0:
                        del self.lots[who][lot_id]
                    if left == 0:
                        break
                self.sequence[who] += 1
                self.totals[1] += amount
            else:
                assert event.kind is EventKind.REDEEM_REJECTED
                expected = "LoyaltyPointsInsufficientBalance" if nonce_ok else "InvalidAccountNonce"
                assert self.ledger.decoder.decode(event.reason).error == expected

    @rule(seconds=st.sampled_from([1, 50, 99, 150, 400]))
    def time_passes(self, seconds: int) -> None:
        self.ledger.backend.increase_time(seconds)

    @invariant()
    def lots_match_the_model(self) -> None:
        if not self.subjects:
            return
        for who, subject in enumerate(self.subjects):
            on_chain = {lot.lot_id: [lot.remaining, lot.expires_at] for lot in self.ledger.points.lots_of(subject)}
            assert on_chain == self.lots[who]
        assert list(self.ledger.points.totals()) == self.totals

    @invariant()
    def balances_are_issued_minus_redeemed_minus_expired(self) -> None:
        if not self.subjects:
            return
        now = self.ledger.now()
        if any(abs(exp - now) <= 2 for lots in self.lots for _, exp in lots.values()):
            return  # an eth_call may run at the next block's time: too close to an expiry to say
        balances = sum(self.ledger.points.balance_of(s) for s in self.subjects)
        unswept = sum(rem for lots in self.lots for rem, exp in lots.values() if exp <= now)
        issued, redeemed, expired = self.totals
        assert balances == issued - redeemed - (expired + unswept)


ACCOUNTS: Accounts
BACKEND: InProcessBackend
ARTIFACTS: dict[str, Artifact]


@pytest.fixture(scope="module")
def chain(artifacts: dict[str, Artifact]) -> Any:
    global ACCOUNTS, BACKEND, ARTIFACTS
    ACCOUNTS = Accounts()
    ARTIFACTS = artifacts
    with InProcessBackend(ChainSettings(backend="inprocess"), ACCOUNTS.operator) as backend:
        BACKEND = backend
        yield backend


def test_points_behave_like_the_model(chain: Any) -> None:
    runner = PointsMachine.TestCase
    runner.settings = settings(
        max_examples=15,
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    runner().runTest()
