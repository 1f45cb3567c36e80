"""The chain conformance suite: every chain behaviour, run against every backend.

Subclasses provide class-scoped `backend` and `accounts` fixtures (see test_backend_*.py).
"""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3 import Web3

from ledger import eip712
from ledger.consent import PARTNER_ROLE, SignedChange, batch_gas, max_changes_per_batch
from ledger.consent.client import Recovery
from ledger.contracts import ensure_deployed, missing_functions
from ledger.eip712 import ChangeKind, ControllerChange, Domain, RecoveryCancel, Signature
from ledger.errors import (
    BatchItemFailed,
    ConsentRejected,
    DeploymentError,
    InvalidSignature,
    NonceMismatch,
    RecoveryRejected,
    SignatureExpired,
    Unauthorized,
)
from ledger.tx import MAX_TX_DATA_BYTES, Receipt
from ledger.types import ATTRIBUTE_BITS, Purpose, Subject, checksummed
from tests.ledger.conftest import Accounts, Ledger, registry_plan

RECOVERY_DELAY = 72 * 3600  # `ConsentRegistry.DEFAULT_RECOVERY_DELAY`

EMAIL, PHONE, NAME = 1 << 0, 1 << 1, 1 << 2


class ChainConformance:
    """Subclasses add a class-scoped `backend` fixture started with `accounts.operator`."""

    @pytest.fixture(scope="class")
    @classmethod
    def accounts(cls) -> Accounts:
        return Accounts()

    # roles -------------------------------------------------------------------------------------

    def test_only_the_operator_relays_changes(self, ledger: Ledger) -> None:
        stranger = ledger.client(ledger.accounts.stranger)
        with pytest.raises(Unauthorized) as refused:
            stranger.apply(ledger.grant(EMAIL))
        assert refused.value.args_by_name["account"] == ledger.accounts.stranger.address
        assert refused.value.args_by_name["neededRole"] == keccak(text="OPERATOR_ROLE")
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)

    def test_the_chain_itself_refuses_a_wrong_sender(self, ledger: Ledger) -> None:
        # No pre-flight: the transaction is mined and reverts on-chain.
        stranger = ledger.client(ledger.accounts.stranger)
        with pytest.raises(Unauthorized):
            stranger.apply_batch([ledger.grant(EMAIL)], preflight=False)
        assert ledger.registry.nonce_of(ledger.subject) == 0

    def test_only_the_operator_binds_controllers(self, ledger: Ledger) -> None:
        with pytest.raises(Unauthorized):
            ledger.client(ledger.accounts.stranger).bind_controller(
                Subject(keccak(b"someone")), ledger.accounts.stranger.address
            )
        assert ledger.registry.controller_of(Subject(keccak(b"someone"))) is None

    def test_only_the_admin_manages_partners(self, ledger: Ledger) -> None:
        newcomer = Account.create().address
        with pytest.raises(Unauthorized):
            ledger.registry.add_partner(newcomer)  # the operator is not the admin
        assert not ledger.registry.has_role(PARTNER_ROLE, newcomer)
        ledger.admin.add_partner(newcomer)
        assert ledger.registry.has_role(PARTNER_ROLE, newcomer)

    # signatures --------------------------------------------------------------------------------

    def test_a_grant_signed_by_the_controller_is_recorded(self, ledger: Ledger) -> None:
        signed = ledger.grant(EMAIL | NAME)
        receipt = ledger.registry.apply(signed)
        assert ledger.registry.events(receipt, "ConsentGranted") == [
            {
                "subject": ledger.subject,
                "partner": ledger.partner,
                "purpose": ledger.purpose,
                "granted": EMAIL | NAME,
                "attributes": EMAIL | NAME,
                "validUntil": 0,
                "nonce": 0,
            }
        ]
        assert ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL | NAME)
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL | PHONE)
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, eip712.purpose_id("x"), EMAIL)
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, 0)
        assert ledger.registry.nonce_of(ledger.subject) == 1

    def test_a_wallet_signature_of_the_typed_data_is_accepted(self, ledger: Ledger) -> None:
        # What a customer's wallet does with eth_signTypedData_v4: sign the JSON unchanged.
        change = ledger.change(ChangeKind.GRANT, PHONE)
        typed = eip712.typed_data(ledger.registry.domain, change)
        signed = Account.sign_message(encode_typed_data(full_message=typed), ledger.customer.key)
        ledger.registry.apply(SignedChange(change, Signature.from_bytes(bytes(signed.signature))))
        assert ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, PHONE)

    def test_a_forged_signature_is_refused(self, ledger: Ledger) -> None:
        forger = Account.create()
        change = ledger.change(ChangeKind.GRANT, EMAIL)
        with pytest.raises(InvalidSignature) as refused:
            ledger.registry.apply(ledger.sign(change, key=bytes(forger.key)))
        assert refused.value.args_by_name == {"signer": forger.address, "expected": ledger.customer.address}
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)

    def test_a_malleated_signature_is_refused(self, ledger: Ledger) -> None:
        signed = ledger.grant(EMAIL)
        n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
        high_s = (n - int.from_bytes(signed.signature.s, "big")).to_bytes(32, "big")
        flipped = Signature(v=55 - signed.signature.v, r=signed.signature.r, s=high_s)
        with pytest.raises(InvalidSignature):
            ledger.registry.apply(SignedChange(signed.change, flipped))

    def test_a_replayed_signature_is_refused(self, ledger: Ledger) -> None:
        signed = ledger.grant(EMAIL)
        ledger.registry.apply(signed)
        ledger.registry.apply(ledger.revoke(EMAIL))
        with pytest.raises(NonceMismatch) as refused:
            ledger.registry.apply(signed)
        assert refused.value.args_by_name == {"account": ledger.customer.address, "currentNonce": 2}
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)

    def test_a_change_applies_though_an_earlier_one_failed_and_the_earlier_one_never_does(self, ledger: Ledger) -> None:
        ledger.registry.apply(ledger.grant(EMAIL | PHONE, nonce=0))
        expired = ledger.grant(NAME, nonce=1, deadline=ledger.now() - 1)  # failed: its deadline passed
        with pytest.raises(SignatureExpired):
            ledger.registry.apply(expired)
        # The customer's revocation, signed after it (nonce 2), takes effect all the same ...
        ledger.registry.apply(ledger.revoke(EMAIL | PHONE, nonce=2))
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)
        assert ledger.registry.nonce_of(ledger.subject) == 3
        # ... and nothing signed before it can apply after it: the order the customer signed in holds.
        for earlier in (ledger.grant(EMAIL, nonce=1), ledger.grant(EMAIL, nonce=2)):
            with pytest.raises(NonceMismatch) as refused:
                ledger.registry.apply(earlier)
            assert refused.value.args_by_name["currentNonce"] == 3
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)
        ledger.registry.apply(ledger.grant(PHONE, nonce=7))  # a later grant skips the unused 3 to 6 too
        assert ledger.registry.nonce_of(ledger.subject) == 8

    def test_a_nonce_past_the_slots_96_bits_is_refused(self, ledger: Ledger) -> None:
        # The next nonce is stored in 96 bits: applying 2^96 - 1 would wrap it to 0 and let every old
        # signature apply again.
        for nonce in (2**96 - 1, 2**96, 2**256 - 1):
            with pytest.raises(NonceMismatch):
                ledger.registry.apply(ledger.revoke(EMAIL, nonce=nonce))
        assert ledger.registry.nonce_of(ledger.subject) == 0
        ledger.registry.apply(ledger.revoke(EMAIL, nonce=2**96 - 2))  # the highest a change can carry
        assert ledger.registry.nonce_of(ledger.subject) == 2**96 - 1

    def test_an_expired_deadline_is_refused(self, ledger: Ledger) -> None:
        deadline = ledger.now() - 1
        with pytest.raises(SignatureExpired) as refused:
            ledger.registry.apply(ledger.grant(EMAIL, deadline=deadline))
        assert refused.value.args_by_name == {"deadline": deadline}

    def test_a_signature_for_another_chain_is_refused(self, ledger: Ledger) -> None:
        domain = ledger.registry.domain
        other_chain = Domain(domain.name, domain.chain_id + 1, domain.verifying_contract)
        with pytest.raises(InvalidSignature):
            ledger.registry.apply(ledger.sign(ledger.change(ChangeKind.GRANT, EMAIL), domain=other_chain))

    def test_a_signature_for_another_contract_is_refused(self, ledger: Ledger) -> None:
        # A second real registry on the same chain: its signatures must not work here.
        other = ensure_deployed(
            ledger.backend.w3,
            ledger.accounts.senders[ledger.accounts.operator.address],
            ledger.artifacts,
            registry_plan(ledger.accounts),
            record=None,
        ).address("ConsentRegistry")
        domain = Domain(ledger.registry.domain.name, ledger.registry.domain.chain_id, other)
        with pytest.raises(InvalidSignature):
            ledger.registry.apply(ledger.sign(ledger.change(ChangeKind.GRANT, EMAIL), domain=domain))

    # consent semantics -------------------------------------------------------------------------

    def test_revoke_wins_over_an_earlier_grant(self, ledger: Ledger) -> None:
        ledger.registry.apply(ledger.grant(EMAIL | PHONE | NAME))
        receipt = ledger.registry.apply(ledger.revoke(PHONE))
        assert ledger.registry.events(receipt, "ConsentRevoked") == [
            {
                "subject": ledger.subject,
                "partner": ledger.partner,
                "purpose": ledger.purpose,
                "revoked": PHONE,
                "attributes": EMAIL | NAME,
                "nonce": 1,
            }
        ]
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, PHONE)
        assert ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL | NAME)

    def test_grant_then_revoke_in_one_batch_ends_revoked(self, ledger: Ledger) -> None:
        grant = ledger.grant(EMAIL, nonce=0)
        revoke = ledger.sign(ledger.change(ChangeKind.REVOKE, EMAIL, nonce=1))
        ledger.registry.apply_batch([grant, revoke])
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)

    def test_expiry_is_honoured(self, ledger: Ledger) -> None:
        valid_until = ledger.now() + 600
        ledger.registry.apply(ledger.grant(EMAIL | PHONE, valid_until=valid_until))
        assert ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)
        ledger.backend.increase_time(1200)
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)
        assert ledger.registry.consent_of(ledger.subject, ledger.partner, ledger.purpose).valid_until == valid_until
        # A new grant after the lapse starts from nothing: PHONE does not come back.
        ledger.registry.apply(ledger.grant(NAME))
        assert ledger.registry.consent_of(ledger.subject, ledger.partner, ledger.purpose).attributes == NAME

    def test_a_validity_in_the_past_is_refused(self, ledger: Ledger) -> None:
        past = ledger.now() - 10
        with pytest.raises(ConsentRejected) as refused:
            ledger.registry.apply(ledger.grant(EMAIL, valid_until=past))
        assert refused.value.error == "ConsentRegistryInvalidValidity"

    def test_the_highest_attribute_bit_is_granted_and_one_above_is_refused(self, ledger: Ledger) -> None:
        top = 1 << (ATTRIBUTE_BITS - 1)
        with pytest.raises(ConsentRejected) as refused:
            ledger.registry.apply(ledger.grant(EMAIL | top << 1))
        assert refused.value.error == "ConsentRegistryAttributesOutOfRange"
        assert ledger.registry.nonce_of(ledger.subject) == 0  # nothing applied, no nonce used
        ledger.registry.apply(ledger.grant(EMAIL | top))
        assert ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL | top)
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, top << 1)

    def test_revoking_bits_above_the_range_is_recorded_and_changes_nothing_else(self, ledger: Ledger) -> None:
        ledger.registry.apply(ledger.grant(EMAIL | PHONE))
        high = 1 << ATTRIBUTE_BITS
        receipt = ledger.registry.apply(ledger.revoke(PHONE | high))
        (event,) = ledger.registry.events(receipt, "ConsentRevoked")
        assert (event["revoked"], event["attributes"]) == (PHONE | high, EMAIL)
        assert ledger.registry.consent_of(ledger.subject, ledger.partner, ledger.purpose).attributes == EMAIL

    def test_a_customer_takes_two_storage_slots(self, ledger: Ledger) -> None:
        # Every slot of the world state costs a node on every block (anvil hashes and copies them
        # all), so a subject's key and nonce share one, and a consent's bits and validity another.
        # Layout: AccessControl 0, EIP712 1-2, then `_controllers` (3) and `_consents` (4).
        def slot(key: bytes, base: bytes) -> bytes:
            return keccak(key.rjust(32, b"\0") + base)

        def word(position: bytes) -> int:
            return int.from_bytes(ledger.backend.w3.eth.get_storage_at(registry, int.from_bytes(position)))

        registry = ledger.deployment.address("ConsentRegistry")
        key = int(ledger.customer.address, 16)
        controller = slot(ledger.subject, (3).to_bytes(32))
        assert word(controller) == key  # layout as above; nonce 0
        valid_until = ledger.now() + 3600
        ledger.registry.apply(ledger.grant(EMAIL | NAME, valid_until=valid_until))
        assert word(controller) == 1 << 160 | key  # the nonce moved on, in the key's slot
        position = slot(ledger.purpose, slot(bytes.fromhex(ledger.partner[2:]), slot(ledger.subject, (4).to_bytes(32))))
        assert word(position) == valid_until << 192 | EMAIL | NAME
        assert word((int.from_bytes(position) + 1).to_bytes(32)) == 0

    def test_an_unknown_partner_cannot_be_granted(self, ledger: Ledger) -> None:
        stranger = Account.create().address
        with pytest.raises(ConsentRejected) as refused:
            ledger.registry.apply(ledger.grant(EMAIL, partner=stranger))
        assert refused.value.args_by_name == {"partner": stranger}

    def test_a_removed_partner_loses_access(self, ledger: Ledger) -> None:
        ledger.registry.apply(ledger.grant(EMAIL))
        ledger.admin.remove_partner(ledger.partner)
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)

    def test_empty_attributes_are_refused(self, ledger: Ledger) -> None:
        with pytest.raises(ConsentRejected) as refused:
            ledger.registry.apply(ledger.revoke(0))
        assert refused.value.error == "ConsentRegistryEmptyAttributes"

    def test_an_unbound_subject_cannot_consent(self, ledger: Ledger) -> None:
        unbound = keccak(b"nobody")
        with pytest.raises(ConsentRejected) as refused:
            ledger.registry.apply(ledger.grant(EMAIL, subject=unbound, nonce=0))
        assert refused.value.args_by_name == {"subject": unbound}

    # controllers -------------------------------------------------------------------------------

    def test_a_controller_is_bound_once(self, ledger: Ledger) -> None:
        with pytest.raises(ConsentRejected) as refused:
            ledger.registry.bind_controller(ledger.subject, Account.create().address)
        assert refused.value.args_by_name == {
            "subject": ledger.subject,
            "controller": ledger.customer.address,
        }

    def test_rebinding_needs_the_current_controllers_signature(self, ledger: Ledger) -> None:
        new_key = Account.create()
        change = ControllerChange(ledger.subject, new_key.address, nonce=0, deadline=ledger.now() + 600)
        with pytest.raises(InvalidSignature):
            ledger.registry.rebind_controller(change, eip712.sign(bytes(new_key.key), ledger.registry.domain, change))
        receipt = ledger.registry.rebind_controller(
            change, eip712.sign(bytes(ledger.customer.key), ledger.registry.domain, change)
        )
        assert ledger.registry.events(receipt, "ControllerBound") == [
            {"subject": ledger.subject, "previous": ledger.customer.address, "controller": new_key.address}
        ]
        assert ledger.registry.controller_of(ledger.subject) == new_key.address
        # Nonces belong to the subject: they count on across the change of key, so the old key's
        # signed messages cannot be replayed under the new one.
        assert ledger.registry.nonce_of(ledger.subject) == 1
        with pytest.raises(NonceMismatch):
            ledger.registry.rebind_controller(change, eip712.sign(bytes(new_key.key), ledger.registry.domain, change))
        # The old key no longer speaks for the subject; the new one does.
        with pytest.raises(InvalidSignature):
            ledger.registry.apply(ledger.grant(EMAIL))
        ledger.registry.apply(ledger.sign(ledger.change(ChangeKind.GRANT, EMAIL), key=bytes(new_key.key)))
        assert ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)
        assert ledger.registry.nonce_of(ledger.subject) == 2

    # recovery of a lost key ---------------------------------------------------------------------

    @staticmethod
    def _block_time(ledger: Ledger, receipt: Receipt) -> int:
        return int(ledger.backend.w3.eth.get_block(receipt.block_number)["timestamp"])

    @staticmethod
    def _until(ledger: Ledger, moment: int) -> None:
        """Move the chain's clock to `moment` at least (a node whose blocks run ahead of its clock, as
        the managed geth's do, moves less than asked at first)."""
        for _ in range(10):
            if ledger.now() >= moment:
                return
            ledger.backend.increase_time(moment - ledger.now())
        raise AssertionError(f"the chain's clock did not reach {moment}")

    def _start_recovery(self, ledger: Ledger) -> tuple[LocalAccount, int]:
        new_key = Account.create()
        receipt = ledger.registry.start_recovery(ledger.subject, new_key.address)
        effective_at = self._block_time(ledger, receipt) + RECOVERY_DELAY
        assert ledger.registry.events(receipt, "ControllerRecoveryStarted") == [
            {
                "subject": ledger.subject,
                "controller": ledger.customer.address,
                "newController": new_key.address,
                "effectiveAt": effective_at,
            }
        ]
        assert ledger.registry.recovery_of(ledger.subject) == Recovery(new_key.address, effective_at)
        return new_key, effective_at

    def _veto(self, ledger: Ledger, new_key: str, effective_at: int, *, key: bytes | None = None) -> Receipt:
        cancel = RecoveryCancel(ledger.subject, checksummed(new_key), effective_at, deadline=ledger.now() + 600)
        signature = eip712.sign(key or bytes(ledger.customer.key), ledger.registry.domain, cancel)
        return ledger.registry.cancel_recovery(cancel, signature)

    def test_a_recovery_waits_the_delay_then_hands_the_subject_to_the_new_key(self, ledger: Ledger) -> None:
        ledger.registry.apply(ledger.grant(EMAIL))
        assert ledger.registry.recovery_delay() == RECOVERY_DELAY  # 72 hours on a new deployment
        new_key, effective_at = self._start_recovery(ledger)
        # Until it takes effect the old key still controls the subject, and the operator cannot hurry it.
        assert ledger.registry.controller_of(ledger.subject) == ledger.customer.address
        with pytest.raises(RecoveryRejected) as refused:
            ledger.registry.complete_recovery(ledger.subject)
        assert refused.value.error == "ConsentRegistryRecoveryNotDue"
        assert refused.value.args_by_name == {"subject": ledger.subject, "effectiveAt": effective_at}
        ledger.backend.increase_time(RECOVERY_DELAY - 600)
        with pytest.raises(RecoveryRejected):
            ledger.registry.complete_recovery(ledger.subject)
        assert ledger.registry.controller_of(ledger.subject) == ledger.customer.address
        self._until(ledger, effective_at)
        receipt = ledger.registry.complete_recovery(ledger.subject)
        assert ledger.registry.events(receipt, "ControllerBound") == [
            {"subject": ledger.subject, "previous": ledger.customer.address, "controller": new_key.address}
        ]
        assert ledger.registry.controller_of(ledger.subject) == new_key.address
        assert ledger.registry.recovery_of(ledger.subject) is None
        assert ledger.registry.nonce_of(ledger.subject) == 1  # kept: the service's next nonce stays the chain's
        # The old key's signatures are refused from now on; the new key's apply; consents are kept.
        with pytest.raises(InvalidSignature) as old:
            ledger.registry.apply(ledger.revoke(EMAIL))
        assert old.value.args_by_name == {"signer": ledger.customer.address, "expected": new_key.address}
        assert ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)
        ledger.registry.apply(ledger.sign(ledger.change(ChangeKind.REVOKE, EMAIL), key=bytes(new_key.key)))
        assert not ledger.registry.is_permitted(ledger.subject, ledger.partner, ledger.purpose, EMAIL)
        with pytest.raises(RecoveryRejected) as again:  # completed once
            ledger.registry.complete_recovery(ledger.subject)
        assert again.value.args_by_name == {"subject": ledger.subject}

    def test_the_old_key_vetoes_a_recovery(self, ledger: Ledger) -> None:
        new_key, effective_at = self._start_recovery(ledger)
        with pytest.raises(InvalidSignature) as forged:  # the operator (or the new key) cannot veto for it
            self._veto(ledger, new_key.address, effective_at, key=bytes(new_key.key))
        assert forged.value.args_by_name == {"signer": new_key.address, "expected": ledger.customer.address}
        with pytest.raises(RecoveryRejected):  # a veto names the recovery it stops
            self._veto(ledger, new_key.address, effective_at + 1)
        receipt = self._veto(ledger, new_key.address, effective_at)
        assert ledger.registry.events(receipt, "ControllerRecoveryCancelled") == [
            {"subject": ledger.subject, "controller": ledger.customer.address, "newController": new_key.address}
        ]
        assert ledger.registry.recovery_of(ledger.subject) is None
        assert ledger.registry.nonce_of(ledger.subject) == 0  # the veto uses no nonce
        ledger.backend.increase_time(RECOVERY_DELAY)
        with pytest.raises(RecoveryRejected):
            ledger.registry.complete_recovery(ledger.subject)
        assert ledger.registry.controller_of(ledger.subject) == ledger.customer.address
        with pytest.raises(RecoveryRejected):  # replayed: nothing to cancel
            self._veto(ledger, new_key.address, effective_at)

    def test_anyone_can_send_a_veto_the_old_key_signed(self, ledger: Ledger) -> None:
        # The customer does not depend on the operator to relay it: an account with no role sends it.
        stranger = ledger.client(ledger.accounts.stranger)
        new_key, effective_at = self._start_recovery(ledger)
        cancel = RecoveryCancel(ledger.subject, new_key.address, effective_at, deadline=ledger.now() + 600)
        forged = eip712.sign(bytes(new_key.key), ledger.registry.domain, cancel)
        with pytest.raises(InvalidSignature) as refused:
            stranger.cancel_recovery(cancel, forged)
        assert refused.value.args_by_name == {"signer": new_key.address, "expected": ledger.customer.address}
        assert ledger.registry.recovery_of(ledger.subject) == Recovery(new_key.address, effective_at)
        receipt = stranger.cancel_recovery(
            cancel, eip712.sign(bytes(ledger.customer.key), ledger.registry.domain, cancel)
        )
        assert ledger.registry.events(receipt, "ControllerRecoveryCancelled") == [
            {"subject": ledger.subject, "controller": ledger.customer.address, "newController": new_key.address}
        ]
        assert ledger.registry.recovery_of(ledger.subject) is None
        self._until(ledger, effective_at)
        with pytest.raises(RecoveryRejected):
            ledger.registry.complete_recovery(ledger.subject)
        assert ledger.registry.controller_of(ledger.subject) == ledger.customer.address

    def test_only_the_operator_recovers_and_only_the_admin_sets_the_delay(self, ledger: Ledger) -> None:
        stranger = ledger.client(ledger.accounts.stranger)
        with pytest.raises(Unauthorized):
            stranger.start_recovery(ledger.subject, ledger.accounts.stranger.address)
        assert ledger.registry.recovery_of(ledger.subject) is None
        new_key, effective_at = self._start_recovery(ledger)
        ledger.backend.increase_time(RECOVERY_DELAY)
        with pytest.raises(Unauthorized):
            stranger.complete_recovery(ledger.subject)
        with pytest.raises(Unauthorized) as not_admin:  # the operator cannot shorten the wait
            ledger.registry.set_recovery_delay(3600)
        assert not_admin.value.args_by_name["neededRole"] == b"\x00" * 32
        assert ledger.registry.controller_of(ledger.subject) == ledger.customer.address
        assert ledger.registry.recovery_of(ledger.subject) == Recovery(new_key.address, effective_at)

    def test_the_admin_sets_the_delay_within_bounds(self, ledger: Ledger) -> None:
        with pytest.raises(RecoveryRejected) as short:
            ledger.admin.set_recovery_delay(3599)
        assert short.value.args_by_name == {"delay": 3599, "minimum": 3600}
        receipt = ledger.admin.set_recovery_delay(3600)
        assert ledger.registry.events(receipt, "RecoveryDelaySet") == [{"previous": RECOVERY_DELAY, "delay": 3600}]
        new_key = Account.create()
        started = ledger.registry.start_recovery(ledger.subject, new_key.address)
        self._until(ledger, self._block_time(ledger, started) + 3600)
        ledger.registry.complete_recovery(ledger.subject)
        assert ledger.registry.controller_of(ledger.subject) == new_key.address

    def test_a_recovery_needs_a_bound_subject_and_a_new_key(self, ledger: Ledger) -> None:
        unbound = Subject(keccak(b"never bound"))
        with pytest.raises(ConsentRejected) as refused:
            ledger.registry.start_recovery(unbound, Account.create().address)
        assert refused.value.args_by_name == {"subject": unbound}
        for key in (ledger.customer.address, checksummed("0x" + "00" * 20)):
            with pytest.raises(ConsentRejected) as same:
                ledger.registry.start_recovery(ledger.subject, key)
            assert same.value.args_by_name == {"controller": key}
        assert ledger.registry.recovery_of(ledger.subject) is None

    def test_starting_again_replaces_the_recovery_and_restarts_its_wait(self, ledger: Ledger) -> None:
        first, _ = self._start_recovery(ledger)
        ledger.backend.increase_time(RECOVERY_DELAY - 60)
        second, effective_at = self._start_recovery(ledger)
        ledger.backend.increase_time(120)
        with pytest.raises(RecoveryRejected):
            ledger.registry.complete_recovery(ledger.subject)
        with pytest.raises(RecoveryRejected):  # the first one's veto no longer names a pending recovery
            self._veto(ledger, first.address, effective_at)
        assert ledger.registry.recovery_of(ledger.subject) == Recovery(second.address, effective_at)

    def test_starting_again_announces_the_replaced_recovery_and_never_shortens_the_wait(self, ledger: Ledger) -> None:
        first, first_at = self._start_recovery(ledger)  # waits the 72 hours
        ledger.admin.set_recovery_delay(3600)  # the admin shortens the delay; the pending one keeps its time
        second = Account.create()
        receipt = ledger.registry.start_recovery(ledger.subject, second.address)
        controller = ledger.customer.address
        assert ledger.registry.events(receipt, "ControllerRecoveryCancelled") == [
            {"subject": ledger.subject, "controller": controller, "newController": first.address}
        ]
        assert ledger.registry.events(receipt, "ControllerRecoveryStarted") == [
            {
                "subject": ledger.subject,
                "controller": controller,
                "newController": second.address,
                "effectiveAt": first_at,
            }
        ]
        assert ledger.registry.recovery_of(ledger.subject) == Recovery(second.address, first_at)
        self._until(ledger, self._block_time(ledger, receipt) + 3600)
        with pytest.raises(RecoveryRejected) as early:  # not an hour after the restart: the first's time
            ledger.registry.complete_recovery(ledger.subject)
        assert early.value.error == "ConsentRegistryRecoveryNotDue"
        self._until(ledger, first_at)
        ledger.registry.complete_recovery(ledger.subject)
        assert ledger.registry.controller_of(ledger.subject) == second.address

    def test_a_key_change_the_key_signed_drops_a_pending_recovery(self, ledger: Ledger) -> None:
        recovering, _ = self._start_recovery(ledger)
        chosen = Account.create()
        change = ControllerChange(ledger.subject, chosen.address, nonce=0, deadline=ledger.now() + 600)
        receipt = ledger.registry.rebind_controller(
            change, eip712.sign(bytes(ledger.customer.key), ledger.registry.domain, change)
        )
        assert ledger.registry.events(receipt, "ControllerRecoveryCancelled") == [
            {"subject": ledger.subject, "controller": ledger.customer.address, "newController": recovering.address}
        ]
        assert ledger.registry.recovery_of(ledger.subject) is None
        ledger.backend.increase_time(RECOVERY_DELAY)
        with pytest.raises(RecoveryRejected):
            ledger.registry.complete_recovery(ledger.subject)
        assert ledger.registry.controller_of(ledger.subject) == chosen.address

    def test_recovery_gas(self, ledger: Ledger) -> None:
        """What a recovery costs (README, "Recovering a lost key"): one new storage slot, written by the
        start and cleared by the completion or the veto (a refund). Bounds over measured values."""
        new_key = Account.create()
        started = ledger.registry.start_recovery(ledger.subject, new_key.address)
        vetoed = self._veto(ledger, new_key.address, self._block_time(ledger, started) + RECOVERY_DELAY)
        again = ledger.registry.start_recovery(ledger.subject, new_key.address)
        self._until(ledger, self._block_time(ledger, again) + RECOVERY_DELAY)
        completed = ledger.registry.complete_recovery(ledger.subject)
        print(f"recovery gas: start {started.gas_used}, veto {vetoed.gas_used}, complete {completed.gas_used}")
        assert started.gas_used < 60_000
        assert vetoed.gas_used < 45_000
        assert completed.gas_used < 40_000

    def test_many_subjects_nonces_and_keys_are_read_in_one_go(self, ledger: Ledger) -> None:
        ledger.registry.apply(ledger.grant(EMAIL))
        ledger.registry.apply(ledger.revoke(EMAIL))
        unbound = Subject(keccak(b"a subject never bound"))
        assert ledger.registry.nonces_of([ledger.subject, unbound]) == {bytes(ledger.subject): 2, bytes(unbound): 0}
        assert ledger.registry.nonces_of([]) == {}
        assert ledger.registry.controllers_of([ledger.subject, unbound]) == {
            bytes(ledger.subject): ledger.customer.address,
            bytes(unbound): None,
        }
        assert ledger.registry.controllers_of([]) == {}

    def test_nonces_belong_to_the_subject_not_to_its_key(self, ledger: Ledger) -> None:
        # One key bound to two subjects: each subject counts its own messages.
        other = Subject(keccak(b"second subject of the same key"))
        ledger.registry.bind_controller(other, ledger.customer.address)
        ledger.registry.apply(ledger.grant(EMAIL))
        ledger.registry.apply(ledger.grant(EMAIL, subject=other))
        assert (ledger.registry.nonce_of(ledger.subject), ledger.registry.nonce_of(other)) == (1, 1)
        with pytest.raises(NonceMismatch) as refused:  # a message for one subject is no use for the other
            ledger.registry.apply(ledger.grant(PHONE, subject=other, nonce=0))
        assert refused.value.args_by_name == {"account": ledger.customer.address, "currentNonce": 1}
        assert ledger.registry.nonce_of(Subject(keccak(b"never bound"))) == 0

    # batches -----------------------------------------------------------------------------------

    def test_the_relayers_largest_batch_fits_one_transaction(self, ledger: Ledger) -> None:
        """The relayer's largest batch (500 changes, or fewer where 500 would pass the 128 KiB that
        geth's, Besu's and Nethermind's pools accept: `max_changes_per_batch`) is one transaction
        every node takes, within the block's gas."""
        count = max_changes_per_batch(500)
        purposes = [Purpose(eip712.purpose_id(f"analytics.p{i}")) for i in range(count + 1)]
        batch = [ledger.grant(EMAIL, purpose=p, nonce=i) for i, p in enumerate(purposes)]
        assert len(ledger.registry.encode_batch(batch)) > MAX_TX_DATA_BYTES  # one more would not fit
        batch, purposes = batch[:count], purposes[:count]
        receipt = ledger.registry.apply_batch(batch, preflight=False)
        assert receipt.status == 1
        events = ledger.registry.events(receipt, "ConsentGranted")
        assert [e["purpose"] for e in events] == purposes
        assert receipt.gas_used <= batch_gas(count)
        block_gas_limit = ledger.backend.w3.eth.get_block(receipt.block_number)["gasLimit"]
        assert receipt.gas_used < block_gas_limit
        assert ledger.registry.nonce_of(ledger.subject) == count
        assert all(ledger.registry.is_permitted(ledger.subject, ledger.partner, p, EMAIL) for p in purposes[::97])

    def test_a_bad_item_fails_the_batch_and_names_its_index(self, ledger: Ledger) -> None:
        forger = Account.create()
        batch = [ledger.grant(1 << i, nonce=i) for i in range(5)]
        batch[3] = ledger.sign(batch[3].change, key=bytes(forger.key))
        with pytest.raises(BatchItemFailed) as refused:
            ledger.registry.apply_batch(batch)
        assert refused.value.index == 3
        assert isinstance(refused.value.cause, InvalidSignature)
        assert refused.value.cause.args_by_name["signer"] == forger.address
        # All or nothing: not even the items before it were applied.
        assert ledger.registry.nonce_of(ledger.subject) == 0
        assert ledger.registry.consent_of(ledger.subject, ledger.partner, ledger.purpose).attributes == 0

    def test_a_batch_failing_on_chain_is_decoded_too(self, ledger: Ledger) -> None:
        batch = [ledger.grant(EMAIL, nonce=0), ledger.grant(PHONE, nonce=0)]
        with pytest.raises(BatchItemFailed) as refused:
            ledger.registry.apply_batch(batch, preflight=False)
        assert refused.value.index == 1
        assert isinstance(refused.value.cause, NonceMismatch)

    # deployment --------------------------------------------------------------------------------

    def test_a_deployment_record_is_reused_and_checked(self, ledger: Ledger, tmp_path: object) -> None:
        from pathlib import Path

        record = Path(str(tmp_path)) / "deployment.json"
        sender = ledger.accounts.senders[ledger.accounts.operator.address]
        w3 = ledger.backend.w3
        first = ensure_deployed(w3, sender, ledger.artifacts, registry_plan(ledger.accounts), record)
        again = ensure_deployed(w3, sender, ledger.artifacts, registry_plan(ledger.accounts), record)
        assert again.contracts == first.contracts
        assert first.deploy_block > 0
        # A record pointing at an address without that code is refused, not silently redeployed.
        text = record.read_text().replace(first.contracts["ConsentRegistry"].address, Account.create().address)
        record.write_text(text)
        with pytest.raises(DeploymentError, match="state was lost or replaced"):
            ensure_deployed(w3, sender, ledger.artifacts, registry_plan(ledger.accounts), record)

    def test_contracts_deployed_by_an_older_version_are_refused(self, ledger: Ledger, tmp_path: object) -> None:
        from dataclasses import replace
        from pathlib import Path

        record = Path(str(tmp_path)) / "deployment.json"
        sender = ledger.accounts.senders[ledger.accounts.operator.address]
        w3 = ledger.backend.w3
        ensure_deployed(w3, sender, ledger.artifacts, registry_plan(ledger.accounts), record)
        # This version's code has every function of its ABI; a newer ABI with one more does not match it.
        registry = ledger.artifacts["ConsentRegistry"]
        assert missing_functions(bytes(w3.eth.get_code(ledger.deployment.address("ConsentRegistry"))), registry) == []
        newer = dict(ledger.artifacts)
        extra = {"type": "function", "name": "nonceOfAll", "inputs": [{"type": "bytes32[]"}], "outputs": []}
        newer["ConsentRegistry"] = replace(registry, abi=[*registry.abi, extra])
        with pytest.raises(DeploymentError, match="deployed by an older version of this service: it has no nonceOfAll"):
            ensure_deployed(w3, sender, newer, registry_plan(ledger.accounts), record)

    def test_the_domain_matches_the_contract(self, ledger: Ledger) -> None:
        separator = ledger.registry.call("DOMAIN_SEPARATOR")
        assert bytes(separator) == ledger.registry.domain.separator()
        fields = ledger.registry.call("eip712Domain")
        assert list(fields[1:4]) == ["ConsentRegistry", "1", ledger.registry.domain.chain_id]
        assert Web3.to_checksum_address(fields[4]) == ledger.deployment.address("ConsentRegistry")
