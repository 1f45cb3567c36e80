"""Our fast EIP-712 digests must equal the reference encoder's, for any values (hypothesis)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import eip712
from ledger.compiler import Artifact
from ledger.eip712 import (
    ChangeKind,
    ConsentChange,
    ControllerBinding,
    ControllerChange,
    Domain,
    Redemption,
    Signature,
)
from ledger.types import INT64_MAX, Purpose, Subject

KEY = Account.create()
addresses = st.binary(min_size=20, max_size=20).map(to_checksum_address)
bytes32 = st.binary(min_size=32, max_size=32)
uint256 = st.integers(min_value=0, max_value=2**256 - 1)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
domains = st.builds(Domain, name=st.text(max_size=40), chain_id=st.integers(1, 2**64), verifying_contract=addresses)
changes = st.builds(
    ConsentChange,
    kind=st.sampled_from(ChangeKind),
    subject=bytes32.map(Subject),
    partner=addresses,
    purpose=bytes32.map(Purpose),
    attributes=uint256,
    nonce=uint256,
    deadline=uint256,
    valid_until=uint64,
).filter(lambda c: c.kind is ChangeKind.GRANT or c.valid_until == 0)
controller_changes = st.builds(
    ControllerChange, subject=bytes32.map(Subject), new_controller=addresses, nonce=uint256, deadline=uint256
)

redemptions = st.builds(
    Redemption,
    subject=bytes32.map(Subject),
    partner=addresses,
    amount=uint256,
    redemption_id=bytes32,
    nonce=uint256,
    deadline=uint256,
)
bindings = st.builds(
    ControllerBinding, subject=bytes32.map(Subject), controller=addresses, claim=bytes32, deadline=uint256
)


@settings(max_examples=200, deadline=None)
@given(domain=domains, message=st.one_of(changes, controller_changes, redemptions, bindings))
def test_digest_matches_the_reference_encoder(domain: Domain, message: eip712.Message) -> None:
    reference = _hash_eip191_message(encode_typed_data(full_message=eip712.typed_data(domain, message)))
    assert eip712.digest(domain, message) == reference


@settings(max_examples=50, deadline=None)
@given(domain=domains, message=changes)
def test_signatures_match_a_wallets_and_recover_the_signer(domain: Domain, message: ConsentChange) -> None:
    ours = eip712.sign(bytes(KEY.key), domain, message)
    wallet = Account.sign_message(encode_typed_data(full_message=eip712.typed_data(domain, message)), KEY.key)
    assert ours.to_bytes() == bytes(wallet.signature)  # RFC 6979: deterministic, so byte-identical
    assert eip712.recover(domain, message, ours) == KEY.address
    assert eip712.recover(domain, message, Signature.from_bytes(bytes(wallet.signature))) == KEY.address


def test_recover_refuses_a_malleable_signature() -> None:
    domain = Domain("ConsentRegistry", 1, to_checksum_address(b"\x01" * 20))
    message = ControllerChange(Subject(b"\x00" * 32), KEY.address, 0, 1)
    good = eip712.sign(bytes(KEY.key), domain, message)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    high = Signature(v=55 - good.v, r=good.r, s=(n - int.from_bytes(good.s, "big")).to_bytes(32, "big"))
    with pytest.raises(ValueError, match="malleable"):
        eip712.recover(domain, message, high)
    with pytest.raises(ValueError, match="v must be"):
        eip712.recover(domain, message, Signature(v=2, r=good.r, s=good.s))
    with pytest.raises(ValueError, match="65 bytes"):
        Signature.from_bytes(b"\x00" * 64)


def test_typed_data_is_what_a_wallet_takes() -> None:
    domain = Domain("ConsentRegistry", 31337, to_checksum_address(b"\x02" * 20))
    change = ConsentChange(ChangeKind.REVOKE, Subject(b"\x03" * 32), KEY.address, Purpose(b"\x04" * 32), 5, 7, 99)
    typed = eip712.typed_data(domain, change)
    assert typed["primaryType"] == "ConsentRevoke"
    assert [f["name"] for f in typed["types"]["ConsentRevoke"]] == [
        "subject",
        "partner",
        "purpose",
        "attributes",
        "nonce",
        "deadline",
    ]
    assert typed["message"] == {
        "subject": "0x" + "03" * 32,
        "partner": KEY.address,
        "purpose": "0x" + "04" * 32,
        "attributes": 5,
        "nonce": 7,
        "deadline": 99,
    }
    assert typed["domain"] == {
        "name": "ConsentRegistry",
        "version": "1",
        "chainId": 31337,
        "verifyingContract": domain.verifying_contract,
    }


def test_purpose_ids_are_keccak_of_the_key() -> None:
    assert eip712.purpose_id("marketing.email").hex() == keccak(b"marketing.email").hex()


# What the service stores of a message is a signed 64-bit integer (amounts, unix times, consent nonces).
storable = st.integers(min_value=0, max_value=INT64_MAX)
storable_redemptions = st.builds(
    Redemption,
    subject=bytes32.map(Subject),
    partner=addresses,
    amount=storable,
    redemption_id=bytes32,
    nonce=uint256,
    deadline=storable,
)


@settings(max_examples=50, deadline=None)
@given(domain=domains, message=storable_redemptions)
def test_a_redemption_round_trips_through_its_typed_data(domain: Domain, message: Redemption) -> None:
    typed = eip712.typed_data(domain, message)
    assert eip712.parse(typed, domain, ("Redemption",)) == message
    with pytest.raises(eip712.TypedDataError, match="primaryType"):
        eip712.parse(typed, domain, ("ConsentGrant",))


def test_a_redemption_nonce_carries_the_partner_as_its_key() -> None:
    partner = to_checksum_address(b"\x05" * 20)
    nonce = eip712.redemption_nonce(partner, 3)
    assert nonce >> 64 == int(partner, 16)
    assert nonce & (2**64 - 1) == 3


@pytest.mark.parametrize(
    "message",
    [
        ConsentChange(
            ChangeKind.GRANT, Subject(bytes(32)), to_checksum_address(bytes(20)), Purpose(bytes(32)), 1, 0, 0, 2**64
        ),
        ConsentChange(
            ChangeKind.REVOKE, Subject(bytes(31)), to_checksum_address(bytes(20)), Purpose(bytes(32)), 1, 0, 0
        ),
        Redemption(Subject(bytes(32)), to_checksum_address(bytes(20)), -1, bytes(32), 0, 0),
        Redemption(Subject(bytes(32)), to_checksum_address(bytes(20)), 1, bytes(32), 2**256, 0),
        ControllerChange(Subject(bytes(32)), "0x1234", 0, 0),  # type: ignore[arg-type]
    ],
)
def test_values_outside_their_types_are_refused_not_hashed(message: eip712.Message) -> None:
    """The direct encoding checks what eth_abi checked: sizes and ranges (a wrong value must not be
    hashed into some other message's digest)."""
    with pytest.raises(ValueError, match=r"out of range|is 32 bytes|not an address"):
        message.struct_hash()


@settings(max_examples=100, deadline=None)
@given(
    domain=domains,
    message=st.builds(
        ConsentChange,
        kind=st.just(ChangeKind.GRANT),
        subject=bytes32.map(Subject),
        partner=addresses,
        purpose=bytes32.map(Purpose),
        attributes=uint256,
        nonce=storable,
        deadline=storable,
        valid_until=storable,
    ),
    field=st.sampled_from(["deadline", "validUntil", "nonce"]),
    value=st.one_of(st.integers(INT64_MAX + 1, 2**256 - 1), st.integers(max_value=-1)),
)
def test_a_consent_change_past_what_the_service_stores_is_refused(
    domain: Domain, message: ConsentChange, field: str, value: int
) -> None:
    """Every integer is checked against its Solidity type and the database's 64-bit INTEGER at parse
    time: past 2^63 the outbox could not store it (and its commit failed every request in it)."""
    typed = eip712.typed_data(domain, message)
    assert eip712.parse(typed, domain, ("ConsentGrant",)) == message
    typed["message"][field] = value
    with pytest.raises(eip712.TypedDataError, match=field):
        eip712.parse(typed, domain, ("ConsentGrant",))


@pytest.mark.parametrize("field", ["amount", "deadline"])
@pytest.mark.parametrize(
    "value", [2**63, 2**64, 2**192, 2**256, -1, True, 1.0, " 5 ", "+5", "1_0", "5 ", "", "0x", None, [5]]
)
def test_a_redemption_integer_must_be_an_integer_the_service_can_store(field: str, value: object) -> None:
    domain = Domain(name="LoyaltyPoints", chain_id=31337, verifying_contract=KEY.address)
    message = Redemption(
        subject=Subject(b"\x01" * 32), partner=KEY.address, amount=5, redemption_id=b"\x02" * 32, nonce=1, deadline=9
    )
    typed = eip712.typed_data(domain, message)
    typed["message"][field] = value
    with pytest.raises(eip712.TypedDataError, match=field):
        eip712.parse(typed, domain, ("Redemption",))
    # At the bound, and as wallets write big integers (decimal or 0x-hex strings), it parses.
    for accepted in (INT64_MAX, str(INT64_MAX), hex(INT64_MAX), "10"):
        typed["message"][field] = accepted
        parsed = eip712.parse(typed, domain, ("Redemption",))
        assert isinstance(parsed, Redemption)
        assert getattr(parsed, field) == int(str(accepted), 0)


# One specification per message (`eip712.MessageType`): the contracts must sign the same thing.
SOURCES = Path(__file__).resolve().parents[2] / "contracts"
SIGNATURE_FIELDS = [("v", "uint8"), ("r", "bytes32"), ("s", "bytes32")]


def test_every_message_the_contracts_check_is_specified_once_and_spelled_alike() -> None:
    """Each `keccak256("Type(...)")` typehash in the contracts is the type string of the message type
    of that name, and every message type but the off-chain `ControllerBinding` is one of them."""
    found = {
        match.group(2): match.group(1)
        for path in SOURCES.glob("*.sol")
        for match in re.finditer(r'keccak256\(\s*"((\w+)\([^"]*\))"\s*\)', path.read_text(encoding="utf-8"))
    }
    assert set(found) == set(eip712.MESSAGE_TYPES) - {"ControllerBinding"}
    for primary, type_string in found.items():
        assert eip712.MESSAGE_TYPES[primary].type_string == type_string
        assert eip712.MESSAGE_TYPES[primary].typehash == keccak(text=type_string)


def test_the_signed_structs_carry_the_messages_fields(artifacts: dict[str, Artifact]) -> None:
    """The structs a batch carries are the message's fields (the grant's, for the one struct of both
    kinds) between the kind and the signature, in the message's order."""

    def struct(contract: str, function: str) -> list[tuple[str, str]]:
        (abi,) = [f for f in artifacts[contract].abi if f.get("name") == function]
        return [(c["name"], c["type"]) for c in abi["inputs"][0]["components"]]

    def fields(message_type: eip712.MessageType) -> list[tuple[str, str]]:
        return [(f.name, f.type) for f in message_type.fields]

    assert struct("ConsentRegistry", "applyBatch") == [
        ("kind", "uint8"),
        *fields(eip712.CONSENT_GRANT),
        *SIGNATURE_FIELDS,
    ]
    assert fields(eip712.CONSENT_REVOKE) == [f for f in fields(eip712.CONSENT_GRANT) if f[0] != "validUntil"]
    assert struct("LoyaltyPoints", "redeemBatch") == [*fields(eip712.REDEMPTION), *SIGNATURE_FIELDS]


def test_each_message_class_names_every_field_of_its_type() -> None:
    """The dataclass and the specification agree: every field of the type is an attribute of the
    class, and every attribute but a consent change's kind is a field of one of its types."""
    classes = {
        ConsentChange: (eip712.CONSENT_GRANT, eip712.CONSENT_REVOKE),
        ControllerChange: (eip712.CONTROLLER_CHANGE,),
        eip712.RecoveryCancel: (eip712.RECOVERY_CANCEL,),
        ControllerBinding: (eip712.CONTROLLER_BINDING,),
        Redemption: (eip712.REDEMPTION,),
    }
    assert {t for types in classes.values() for t in types} == set(eip712.MESSAGE_TYPES.values())
    for cls, types in classes.items():
        attributes = {f.name for f in dataclasses.fields(cls)} - {"kind"}
        assert attributes == {f.attr for t in types for f in t.fields}


@pytest.mark.parametrize("kind", ["string", "uint7", "uint264", "bytes31", "int256"])
def test_a_field_of_a_type_no_message_has_is_refused_where_it_is_written(kind: str) -> None:
    with pytest.raises(ValueError, match="not a type"):
        eip712.Field("x", kind)
