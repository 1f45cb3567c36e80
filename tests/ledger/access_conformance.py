"""AccessLog behaviour, part of the chain conformance suite (run on every backend)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from ledger import eip712
from ledger.access import ACCESSOR_ROLE, Access, fetch_events
from ledger.access.client import GAS_PER_ENTRY, ZERO_HEAD, link
from ledger.errors import AccessRejected, Unauthorized
from ledger.types import Purpose, Subject
from tests.ledger.conftest import Ledger

ANALYTICS = eip712.purpose_id("analytics.reporting")
PURCHASES, DEMOGRAPHICS, LOCATION = 1 << 5, 1 << 4, 1 << 7


REQUEST = os.urandom(32)


def access(ledger: Ledger, attributes: int, *, subject: bytes | None = None, purpose: bytes | None = None) -> Access:
    return Access(subject or ledger.subject, ledger.partner, Purpose(purpose or ledger.purpose), attributes, REQUEST)


class AccessLogConformance:
    def test_only_the_accessor_records(self, ledger: Ledger) -> None:
        assert ledger.access_log.has_role(ACCESSOR_ROLE, ledger.accounts.accessor.address)
        for account in (ledger.accounts.operator, ledger.accounts.stranger):
            with pytest.raises(Unauthorized):
                ledger.access_client(account).record([access(ledger, PURCHASES)])
        assert ledger.access_log.count() == 0
        with pytest.raises(AccessRejected):
            ledger.access_log.record([])

    def test_each_entry_is_checked_against_consent_in_the_same_transaction(self, ledger: Ledger) -> None:
        ledger.registry.apply(ledger.grant(PURCHASES | DEMOGRAPHICS))
        stranger = Subject(os.urandom(32))
        entries = [
            access(ledger, PURCHASES),  # granted
            access(ledger, PURCHASES | DEMOGRAPHICS),  # granted, both
            access(ledger, PURCHASES | LOCATION),  # one bit not granted
            access(ledger, PURCHASES, subject=stranger),  # nobody's consent
            access(ledger, 0),  # nothing asked is nothing permitted
        ]
        recorded = ledger.access_log.record(entries)
        assert [e.permitted for e in recorded] == [True, True, False, False, False]
        assert [e.index for e in recorded] == list(range(5))
        assert [e.access for e in recorded] == entries
        (other,) = ledger.access_log.record([access(ledger, PURCHASES, purpose=ANALYTICS)])  # another purpose
        assert (other.index, other.permitted) == (5, False)
        assert ledger.access_log.count() == 6
        with pytest.raises(ValueError, match="one access request"):
            ledger.access_log.submit([access(ledger, PURCHASES), access(ledger, PURCHASES, purpose=ANALYTICS)])

        ledger.registry.apply(ledger.revoke(DEMOGRAPHICS))
        (after,) = ledger.access_log.record([access(ledger, DEMOGRAPHICS)])
        assert after.permitted is False  # the very next access after a revocation is refused
        (still,) = ledger.access_log.record([access(ledger, PURCHASES)])
        assert still.permitted is True

    def test_a_partner_that_lost_its_role_is_refused(self, ledger: Ledger) -> None:
        ledger.registry.apply(ledger.grant(PURCHASES))
        ledger.admin.remove_partner(ledger.partner)
        (entry,) = ledger.access_log.record([access(ledger, PURCHASES)])
        assert entry.permitted is False

    def test_an_expired_consent_is_refused(self, ledger: Ledger) -> None:
        ledger.registry.apply(ledger.grant(PURCHASES, valid_until=ledger.now() + 100))
        (before,) = ledger.access_log.record([access(ledger, PURCHASES)])
        ledger.backend.increase_time(200)
        (after,) = ledger.access_log.record([access(ledger, PURCHASES)])
        assert (before.permitted, after.permitted) == (True, False)

    def test_the_hash_chain_over_all_entries_matches_the_contract(self, ledger: Ledger) -> None:
        ledger.registry.apply(ledger.grant(PURCHASES))
        batches = [[access(ledger, PURCHASES), access(ledger, LOCATION)], [access(ledger, PURCHASES)] * 3]
        events = [e for batch in batches for e in ledger.access_log.record(batch)]
        head = ZERO_HEAD
        for event in events:
            head = link(head, event.index, event.access, event.permitted)
            assert head == event.head
        assert head == ledger.access_log.head()
        assert ledger.access_log.count() == 5
        # The same events fetched from the node's logs (what an auditor does).
        fetched = list(
            fetch_events(
                ledger.backend.w3, ledger.access_log.address, ledger.deployment.deploy_block, events[-1].block_number
            )
        )
        assert fetched == events
        # Any altered field, a dropped entry or a swapped order no longer reaches the head.
        altered = [*(e.access for e in events[:2]), replace(events[2].access, attributes=LOCATION)]
        recomputed = ZERO_HEAD
        for i, entry in enumerate(altered):
            recomputed = link(recomputed, i, entry, events[i].permitted)
        assert recomputed != events[2].head

    def test_a_batch_of_many_entries_has_bounded_gas(self, ledger: Ledger) -> None:
        """Gas per entry does not grow with the batch (no memory kept per entry: memory costs grow
        with the square of its size), and stays under the bound `record_gas` sends with."""
        ledger.registry.apply(ledger.grant(PURCHASES))
        per_entry = []
        for size in (200, 2_000):
            entries = [access(ledger, PURCHASES, subject=os.urandom(32)) for _ in range(size - 1)]
            entries.append(access(ledger, PURCHASES))
            sent = ledger.access_log.submit(entries)
            receipt, batch = ledger.access_log.settle(sent, entries)
            assert batch.count == size
            assert batch.refused() == list(range(size - 1))  # all but the last: nobody's consent
            assert batch.head == ledger.access_log.head()
            per_entry.append(receipt.gas_used / size)
        small, large = per_entry
        assert large < small * 1.05, per_entry
        assert large < GAS_PER_ENTRY * 0.75, per_entry
