"""The PII vault on a real SQLite file and a real PostgreSQL server: encryption, tamper detection,
key and pepper rotation, blind index, erasure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from identity.errors import KeyMaterialError, SubjectErased, TamperedCiphertext, UnknownSubject
from identity.keys import FileKeyProvider, StaticKeyProvider
from identity.normalize import PII
from identity.pseudonym import PepperRing, Pseudonymizer
from identity.types import Subject
from identity.vault import BlindIndexRow, DataKeyRow, PiiRow, SubjectRow, Vault

ANN = PII(email="ann.lee@example.com", phone="+442079460958", name="ann lee")
BOB = PII(email="bob.stone@example.org", phone="+14155552671", name="bob stone")


def _rows(vault: Vault, model: type, subject: bytes | None = None) -> list[Any]:
    with vault._session() as session:
        query: Any = select(model)
        if subject is not None:
            query = query.where(model.subject == subject)  # type: ignore[attr-defined]
        return list(session.scalars(query))


def test_enrol_encrypts_and_decrypts(vault: Vault) -> None:
    subject, created = vault.enrol(ANN)
    assert created
    assert subject == vault.pseudonymizer.subject(ANN)
    assert vault.pii(subject) == ANN
    stored = b"".join(row.ciphertext for row in _rows(vault, PiiRow, subject))
    for value in (ANN.email, ANN.phone, ANN.name):
        assert value is not None
        assert value.encode() not in stored


def test_enrolling_again_updates_and_keeps_the_subject(vault: Vault) -> None:
    subject, _ = vault.enrol(ANN)
    moved = PII(email=ANN.email, phone="+14155550100", name="ann lee-smith")
    again, created = vault.enrol(moved)
    assert (again, created) == (subject, False)
    assert vault.pii(subject) == moved
    assert vault.find(phone="+14155550100") == subject
    assert vault.find(phone=ANN.phone) is None  # the old number no longer leads here


def test_blind_index_finds_by_email_or_phone_without_decrypting(vault: Vault) -> None:
    ann, _ = vault.enrol(ANN)
    bob, _ = vault.enrol(BOB)

    class NoUnwrap(StaticKeyProvider):
        def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
            raise AssertionError("find must not decrypt anything")

    blind = Vault(vault.engine, NoUnwrap({"k1": os.urandom(32)}, "k1"), vault.pseudonymizer)
    assert blind.find(email=ANN.email) == ann
    assert blind.find(phone=BOB.phone) == bob
    assert blind.find(email="nobody@example.com") is None
    assert blind.find(email=ANN.phone) is None  # an index entry answers only for its own kind


def test_a_flipped_byte_is_refused(vault: Vault) -> None:
    subject, _ = vault.enrol(ANN)
    with vault._session() as session:
        row = session.get(PiiRow, (subject, "email"))
        assert row is not None
        row.ciphertext = row.ciphertext[:-1] + bytes([row.ciphertext[-1] ^ 1])
    with pytest.raises(TamperedCiphertext, match="email"):
        vault.pii(subject)


def test_a_ciphertext_swapped_between_subjects_or_fields_is_refused(vault: Vault) -> None:
    ann, _ = vault.enrol(ANN)
    bob, _ = vault.enrol(BOB)
    with vault._session() as session:
        bobs = session.get(PiiRow, (bob, "email"))
        assert bobs is not None
        session.execute(
            update(PiiRow).where(PiiRow.subject == ann, PiiRow.field == "email").values(ciphertext=bobs.ciphertext)
        )
    with pytest.raises(TamperedCiphertext):
        vault.pii(ann)
    with vault._session() as session:
        name = session.get(PiiRow, (bob, "name"))
        assert name is not None
        session.execute(
            update(PiiRow).where(PiiRow.subject == bob, PiiRow.field == "phone").values(ciphertext=name.ciphertext)
        )
    with pytest.raises(TamperedCiphertext):
        vault.pii(bob)


def test_a_wrapped_key_swapped_between_subjects_is_refused(vault: Vault) -> None:
    ann, _ = vault.enrol(ANN)
    bob, _ = vault.enrol(BOB)
    with vault._session() as session:
        bobs = session.get(DataKeyRow, bob)
        assert bobs is not None
        session.execute(update(DataKeyRow).where(DataKeyRow.subject == ann).values(wrapped=bobs.wrapped))
    with pytest.raises(TamperedCiphertext, match="wrapped data key"):
        vault.pii(ann)


def test_master_key_rotation_rewraps_without_reencrypting(vault: Vault) -> None:
    raw_k1, raw_k2 = os.urandom(32), os.urandom(32)
    before_rotation = Vault(vault.engine, StaticKeyProvider({"k1": raw_k1}, "k1"), vault.pseudonymizer)
    ann, _ = before_rotation.enrol(ANN)
    before_rotation.enrol(BOB)
    ciphertexts = {(r.subject, r.field): r.ciphertext for r in _rows(vault, PiiRow)}

    rotating = Vault(vault.engine, StaticKeyProvider({"k1": raw_k1, "k2": raw_k2}, "k2"), vault.pseudonymizer)
    assert rotating.key_usage() == {"k1": 2}
    assert rotating.rotate_master_key(batch=1) == 2  # one key per transaction
    assert rotating.rotate_master_key() == 0  # idempotent
    assert rotating.key_usage() == {"k2": 2}
    assert {r.key_id for r in _rows(vault, DataKeyRow)} == {"k2"}
    assert {(r.subject, r.field): r.ciphertext for r in _rows(vault, PiiRow)} == ciphertexts  # data untouched

    only_k2 = Vault(vault.engine, StaticKeyProvider({"k2": raw_k2}, "k2"), vault.pseudonymizer)
    assert only_k2.pii(ann) == ANN  # the retired key is no longer needed
    with pytest.raises(KeyMaterialError, match="'k2' is not configured"):
        before_rotation.pii(ann)


def test_pepper_rotation_moves_subjects_and_keeps_the_link_privately(vault: Vault, ring: PepperRing) -> None:
    old_ann, _ = vault.enrol(ANN)
    old_bob, _ = vault.enrol(BOB)
    rotated = Vault(vault.engine, vault.keys, Pseudonymizer(PepperRing({**ring.peppers, 2: os.urandom(32)}, 2)))
    links = rotated.rotate_pepper()
    assert set(links) == {old_ann, old_bob}
    new_ann = links[old_ann]
    assert new_ann == rotated.pseudonymizer.subject(ANN) != old_ann
    assert rotated.successor(old_ann) == new_ann
    assert rotated.pii(new_ann) == ANN
    assert rotated.pii(old_ann) == ANN  # the data owner follows the link
    assert rotated.find(email=ANN.email) == new_ann
    assert _rows(vault, PiiRow, old_ann) == []
    assert _rows(vault, DataKeyRow, old_ann) == []
    assert rotated.rotate_pepper() == {}  # idempotent


def test_erasure_crypto_shreds_and_deactivates(vault: Vault) -> None:
    ann, _ = vault.enrol(ANN)
    bob, _ = vault.enrol(BOB)
    wrapped = _rows(vault, DataKeyRow, ann)[0].wrapped
    assert vault.erased() == set()
    erased_at = vault.erase(ann)
    assert vault.erased() == {ann}
    with pytest.raises(SubjectErased):
        vault.pii(ann)
    assert vault.find(email=ANN.email) is None
    assert vault.find(phone=ANN.phone) is None
    for model in (PiiRow, DataKeyRow, BlindIndexRow):
        assert _rows(vault, model, ann) == []
    assert all(r.wrapped != wrapped for r in _rows(vault, DataKeyRow))
    record = vault.record(ann)
    assert record is not None
    assert record.erased_at == erased_at
    assert vault.erase(ann) == erased_at  # again: nothing changes
    assert vault.pii(bob) == BOB  # others untouched
    with pytest.raises(SubjectErased):
        vault.enrol(ANN)
    with pytest.raises(UnknownSubject):
        vault.erase(Subject(b"\x00" * 32))


def test_erasure_after_pepper_rotation_reaches_every_version(vault: Vault, ring: PepperRing) -> None:
    old, _ = vault.enrol(ANN)
    rotated = Vault(vault.engine, vault.keys, Pseudonymizer(PepperRing({**ring.peppers, 2: os.urandom(32)}, 2)))
    new = rotated.rotate_pepper()[old]
    rotated.erase(old)
    assert rotated.successor(old) is None
    with pytest.raises(SubjectErased):
        rotated.pii(new)
    assert rotated.find(email=ANN.email) is None


def test_the_sqlite_file_holds_no_pii_and_nothing_of_an_erased_person(
    tmp_path: Path, keys: StaticKeyProvider, pseudonymizer: Pseudonymizer
) -> None:
    from identity.vault import make_engine

    path = tmp_path / "vault.db"
    vault = Vault(make_engine(f"sqlite:///{path}"), keys, pseudonymizer)
    vault.create_schema()
    ann, _ = vault.enrol(ANN)
    vault.enrol(BOB)
    raw = path.read_bytes().lower()
    for pii in (ANN, BOB):
        for value in pii.fields().values():
            assert value.lower().encode() not in raw
    secrets_of_ann = [r.ciphertext for r in _rows(vault, PiiRow, ann)] + [
        r.wrapped for r in _rows(vault, DataKeyRow, ann)
    ]
    digests = [r.digest for r in _rows(vault, BlindIndexRow, ann)]
    assert all(s in path.read_bytes() for s in secrets_of_ann)
    vault.erase(ann)
    vault.engine.dispose()
    after = path.read_bytes()
    for leftover in secrets_of_ann + digests:
        assert leftover not in after, "erased bytes must be overwritten (secure_delete), not just unlinked"


def test_file_key_provider_creates_rotates_and_refuses_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    provider = FileKeyProvider.create(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    wrapped = provider.wrap("k1", b"d" * 32, b"ctx")
    provider.add_key("k2")
    assert provider.current_key_id == "k2"
    assert FileKeyProvider(path).unwrap("k1", wrapped, b"ctx") == b"d" * 32
    with pytest.raises(TamperedCiphertext):
        provider.unwrap("k1", wrapped, b"other context")
    path.write_text("{not json")
    with pytest.raises(KeyMaterialError, match="cannot read master keys"):
        FileKeyProvider(path)


def test_subject_records_for_the_resolver(vault: Vault) -> None:
    ann, _ = vault.enrol(ANN)
    vault.set_controller(ann, "0x" + "ab" * 20, 31337)
    record = vault.record(ann)
    assert record is not None
    assert (record.controller, record.chain_id, record.erased_at) == ("0x" + "ab" * 20, 31337, None)
    assert record.created_at.tzinfo is not None
    assert vault.record(Subject(b"\x01" * 32)) is None
    rows = _rows(vault, SubjectRow, ann)
    assert rows[0].pepper_version == 1
