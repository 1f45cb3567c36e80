"""LoyaltyPoints behaviour, part of the chain conformance suite (run on every backend)."""

from __future__ import annotations

import os

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak

from ledger import eip712
from ledger.eip712 import Domain, Redemption, Signature
from ledger.errors import (
    InsufficientPoints,
    InvalidSignature,
    NonceMismatch,
    PointsRejected,
    SignatureExpired,
    Unauthorized,
)
from ledger.points import EventKind, Issuance, PointsEvent, SignedRedemption
from ledger.tx import TxSender
from ledger.types import Subject
from tests.ledger.conftest import Ledger


def lot_issuance(ledger: Ledger, amount: int, expires_in: int, *, subject: Subject | None = None) -> Issuance:
    return Issuance(subject or ledger.subject, amount, ledger.now() + expires_in, os.urandom(32))


def redemption(
    ledger: Ledger,
    amount: int,
    *,
    partner: ChecksumAddress | None = None,
    redemption_id: bytes | None = None,
    sequence: int | None = None,
    deadline: int | None = None,
    key: bytes | None = None,
    domain: Domain | None = None,
) -> SignedRedemption:
    partner = partner or ledger.partner
    nonce = (
        ledger.points.nonce_of(ledger.customer.address, partner)
        if sequence is None
        else eip712.redemption_nonce(partner, sequence)
    )
    message = Redemption(
        ledger.subject,
        partner,
        amount,
        redemption_id or os.urandom(32),
        nonce,
        ledger.now() + 3600 if deadline is None else deadline,
    )
    signature = eip712.sign(key or bytes(ledger.customer.key), domain or ledger.points.domain, message)
    return SignedRedemption(message, signature)


def kinds(events: list[PointsEvent]) -> list[EventKind]:
    return [e.kind for e in events]


class LoyaltyConformance:
    # issuance ----------------------------------------------------------------------------------

    def test_only_issuers_issue(self, ledger: Ledger) -> None:
        stranger = ledger.points_client(ledger.accounts.stranger)
        with pytest.raises(Unauthorized) as refused:
            stranger.issue(lot_issuance(ledger, 10, 600))
        assert refused.value.args_by_name["neededRole"] == keccak(text="ISSUER_ROLE")
        assert ledger.points.balance_of(ledger.subject) == 0
        assert ledger.points.totals() == (0, 0, 0)

    def test_issued_lots_are_ordered_by_expiry_and_merged_on_equal_expiry(self, ledger: Ledger) -> None:
        now = ledger.now()
        ids = [os.urandom(32) for _ in range(4)]
        receipt = ledger.points.issue_batch(
            [
                Issuance(ledger.subject, 100, now + 3000, ids[0]),
                Issuance(ledger.subject, 50, now + 1000, ids[1]),
                Issuance(ledger.subject, 70, now + 2000, ids[2]),
                Issuance(ledger.subject, 5, now + 1000, ids[3]),  # same expiry: joins lot 2
            ]
        )
        events = ledger.points.logs(receipt)
        assert [(e.kind, e.ref, e.lot_id, e.amount) for e in events] == [
            (EventKind.ISSUED, ids[0], 1, 100),
            (EventKind.ISSUED, ids[1], 2, 50),
            (EventKind.ISSUED, ids[2], 3, 70),
            (EventKind.ISSUED, ids[3], 2, 5),
        ]
        assert [(lot.lot_id, lot.remaining, lot.expires_at - now) for lot in ledger.points.lots_of(ledger.subject)] == [
            (2, 55, 1000),
            (3, 70, 2000),
            (1, 100, 3000),
        ]
        assert ledger.points.balance_of(ledger.subject) == 225
        assert ledger.points.totals() == (225, 0, 0)

    def test_a_bad_issuance_in_a_batch_is_reported_and_the_rest_applies(self, ledger: Ledger) -> None:
        good = lot_issuance(ledger, 10, 600)
        used = Issuance(ledger.subject, 5, good.expires_at, good.issuance_id)
        past = Issuance(ledger.subject, 5, ledger.now() - 1, os.urandom(32))
        zero = lot_issuance(ledger, 0, 600)
        events = ledger.points.logs(ledger.points.issue_batch([good, used, past, zero]))
        assert kinds(events) == [EventKind.ISSUED] + [EventKind.ISSUE_REJECTED] * 3
        reasons = [ledger.decoder.decode(e.reason) for e in events[1:]]
        assert [r.error for r in reasons] == [
            "LoyaltyPointsIssuanceUsed",
            "LoyaltyPointsInvalidExpiry",
            "LoyaltyPointsInvalidAmount",
        ]
        assert ledger.points.balance_of(ledger.subject) == 10

    # redemption --------------------------------------------------------------------------------

    def test_a_redemption_spends_the_soonest_expiring_lots_first(self, ledger: Ledger) -> None:
        ledger.points.issue_batch(
            [lot_issuance(ledger, 100, 3000), lot_issuance(ledger, 50, 1000), lot_issuance(ledger, 70, 2000)]
        )
        signed = redemption(ledger, 80)
        receipt = ledger.points.redeem(signed)
        (event,) = ledger.points.logs(receipt)
        assert (event.kind, event.subject, event.partner, event.ref, event.amount, event.balance, event.nonce) == (
            EventKind.REDEEMED,
            ledger.subject,
            ledger.partner,
            signed.redemption.redemption_id,
            80,
            140,
            signed.redemption.nonce,
        )
        assert [(lot.lot_id, lot.remaining) for lot in ledger.points.lots_of(ledger.subject)] == [(3, 40), (1, 100)]
        assert ledger.points.totals() == (220, 80, 0)
        assert ledger.points.redemption_used(signed.redemption.redemption_id)
        assert ledger.points.nonce_of(ledger.customer.address, ledger.partner) == signed.redemption.nonce + 1

    def test_expired_points_cannot_be_spent(self, ledger: Ledger) -> None:
        ledger.points.issue_batch([lot_issuance(ledger, 50, 100), lot_issuance(ledger, 30, 5000)])
        ledger.backend.increase_time(200)
        assert ledger.points.balance_of(ledger.subject) == 30
        with pytest.raises(InsufficientPoints) as refused:
            ledger.points.redeem(redemption(ledger, 31))
        assert refused.value.args_by_name == {"subject": ledger.subject, "balance": 30, "amount": 31}
        receipt = ledger.points.redeem(redemption(ledger, 30))
        events = ledger.points.logs(receipt)
        assert [(e.kind, e.lot_id, e.amount) for e in events] == [
            (EventKind.EXPIRED, 1, 50),
            (EventKind.REDEEMED, 0, 30),
        ]
        assert ledger.points.totals() == (80, 30, 50)
        assert ledger.points.lots_of(ledger.subject) == []

    def test_a_redemption_id_works_once(self, ledger: Ledger) -> None:
        ledger.points.issue(lot_issuance(ledger, 100, 3000))
        signed = redemption(ledger, 10)
        ledger.points.redeem(signed)
        with pytest.raises(PointsRejected) as replayed:
            ledger.points.redeem(signed)
        assert replayed.value.error == "LoyaltyPointsRedemptionUsed"
        again = redemption(ledger, 10, redemption_id=signed.redemption.redemption_id)  # fresh nonce, same id
        with pytest.raises(PointsRejected, match="LoyaltyPointsRedemptionUsed"):
            ledger.points.redeem(again)
        assert ledger.points.balance_of(ledger.subject) == 90

    def test_an_authorisation_for_one_partner_cannot_be_used_by_another(self, ledger: Ledger) -> None:
        ledger.points.issue(lot_issuance(ledger, 100, 3000))
        other = Account.create()
        ledger.backend.fund(other.address)
        ledger.accounts.senders[other.address] = TxSender(ledger.backend.w3, other)
        ledger.admin.add_partner(other.address)
        signed = redemption(ledger, 10)  # made for ledger.partner
        with pytest.raises(PointsRejected) as refused:
            ledger.points_client(other).redeem(signed)
        assert refused.value.error == "LoyaltyPointsUnauthorizedSubmitter"
        # Relayed with the partner swapped: the nonce's key names the partner, and the signature covers it.
        swapped = Redemption(**{**signed.redemption.__dict__, "partner": other.address})
        with pytest.raises(NonceMismatch):
            ledger.points.redeem(SignedRedemption(swapped, signed.signature))
        renonced = Redemption(**{**swapped.__dict__, "nonce": eip712.redemption_nonce(other.address, 0)})
        with pytest.raises(InvalidSignature):
            ledger.points.redeem(SignedRedemption(renonced, signed.signature))
        # The partner itself may submit the customer's authorisation directly.
        own = redemption(ledger, 10, partner=other.address)
        ledger.points_client(other).redeem(own)
        assert ledger.points.balance_of(ledger.subject) == 90

    def test_bad_authorisations_are_refused_and_change_nothing(self, ledger: Ledger) -> None:
        ledger.points.issue(lot_issuance(ledger, 100, 3000))
        with pytest.raises(InvalidSignature):
            ledger.points.redeem(redemption(ledger, 10, key=bytes(Account.create().key)))
        with pytest.raises(SignatureExpired):
            ledger.points.redeem(redemption(ledger, 10, deadline=ledger.now() - 1))
        with pytest.raises(NonceMismatch):
            ledger.points.redeem(redemption(ledger, 10, sequence=1))
        other_chain = Domain("LoyaltyPoints", 1, ledger.points.address)
        with pytest.raises(InvalidSignature):
            ledger.points.redeem(redemption(ledger, 10, domain=other_chain))
        with pytest.raises(PointsRejected, match="LoyaltyPointsUnknownPartner"):
            ledger.points.redeem(redemption(ledger, 10, partner=Account.create().address))
        with pytest.raises(PointsRejected, match="LoyaltyPointsInvalidAmount"):
            ledger.points.redeem(redemption(ledger, 0))
        with pytest.raises(Unauthorized):
            ledger.points_client(ledger.accounts.stranger).redeem_batch([redemption(ledger, 10)])
        assert ledger.points.balance_of(ledger.subject) == 100
        assert ledger.points.nonce_of(ledger.customer.address, ledger.partner) == eip712.redemption_nonce(
            ledger.partner, 0
        )

    def test_a_wallets_own_signature_is_accepted(self, ledger: Ledger) -> None:
        ledger.points.issue(lot_issuance(ledger, 100, 3000))
        unsigned = redemption(ledger, 25).redemption
        typed = eip712.typed_data(ledger.points.domain, unsigned)
        wallet = Account.sign_message(encode_typed_data(full_message=typed), ledger.customer.key)
        ledger.points.redeem(SignedRedemption(unsigned, Signature.from_bytes(bytes(wallet.signature))))
        assert ledger.points.balance_of(ledger.subject) == 75

    def test_in_a_batch_a_failing_redemption_fails_alone(self, ledger: Ledger) -> None:
        ledger.points.issue(lot_issuance(ledger, 100, 3000))
        first = redemption(ledger, 60, sequence=0)
        too_much = redemption(ledger, 60, sequence=1)  # only 40 left after the first
        third = redemption(ledger, 40, sequence=1)  # the failed one did not use its nonce
        events = ledger.points.logs(ledger.points.redeem_batch([first, too_much, third]))
        assert kinds(events) == [EventKind.REDEEMED, EventKind.REDEEM_REJECTED, EventKind.REDEEMED]
        failure = ledger.decoder.decode(events[1].reason)
        assert isinstance(failure, InsufficientPoints)
        assert failure.args_by_name["balance"] == 40
        assert events[1].ref == too_much.redemption.redemption_id
        assert ledger.points.balance_of(ledger.subject) == 0
        assert ledger.points.totals() == (100, 100, 0)

    def test_redemptions_at_different_partners_do_not_wait_for_each_other(self, ledger: Ledger) -> None:
        ledger.points.issue(lot_issuance(ledger, 100, 3000))
        other = Account.create().address
        ledger.admin.add_partner(other)
        at_other = redemption(ledger, 10, partner=other, sequence=0)
        ledger.points.redeem(at_other)  # partner B first, though partner A's sequence 0 is unused
        ledger.points.redeem(redemption(ledger, 10, sequence=0))
        assert ledger.points.balance_of(ledger.subject) == 80

    # bounded gas -------------------------------------------------------------------------------

    def test_gas_does_not_grow_with_a_customers_history(self, ledger: Ledger) -> None:
        def cycle() -> int:
            ledger.points.issue(lot_issuance(ledger, 10, 5000))
            return ledger.points.redeem(redemption(ledger, 10)).gas_used

        first = [cycle() for _ in range(3)]
        for _ in range(25):
            cycle()
        later = [cycle() for _ in range(3)]
        assert max(later) <= max(first[1:]) + 500  # the first pays for fresh storage slots
        # Many live lots: a redemption that empties one of them costs what it costs with one lot.
        ledger.points.issue_batch([lot_issuance(ledger, 10, 5000 + i) for i in range(100)])
        crowded = ledger.points.redeem(redemption(ledger, 10)).gas_used
        assert crowded <= max(first[1:]) + 25_000  # + emptying a lot written in this batch
        assert crowded < 160_000
