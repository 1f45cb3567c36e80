"""The PII vault: personal data encrypted off-chain, one data key per subject, erasable.

- Each subject's PII fields are encrypted with AES-256-GCM under the subject's own data key. The
  associated data binds a ciphertext to its subject and field, so a ciphertext copied to another
  row (or field) fails to decrypt.
- The data key is stored only wrapped by a master key (`KeyProvider`), bound to its subject the
  same way. Rotating the master key re-wraps data keys without touching the PII ciphertexts.
- Blind indexes find a subject by e-mail or phone without decrypting anything.
- Erasure (GDPR art. 17) destroys the data key (crypto-shredding) and deletes the ciphertexts,
  blind-index entries and pepper-rotation links; the subject stays as a tombstone so its DID
  resolves as deactivated. On SQLite, `secure_delete` overwrites the freed pages.

SQLAlchemy 2; SQLite by default, PostgreSQL by URL (`postgresql+psycopg://…`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from identity.did import SubjectRecord
from identity.errors import SubjectErased, TamperedCiphertext, UnknownSubject, VaultError
from identity.keys import KeyProvider
from identity.normalize import PII
from identity.pseudonym import Pseudonymizer
from identity.types import Subject

_PII_TAG = b"consent-ledger/pii/v1\x00"
_DEK_TAG = b"consent-ledger/data-key/v1\x00"
FIELDS = ("email", "phone", "name")
INDEXED = ("email", "phone")


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class SubjectRow(Base):
    __tablename__ = "identity_subjects"

    subject: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    pepper_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    superseded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    controller: Mapped[str | None] = mapped_column(String(42), default=None)
    chain_id: Mapped[int | None] = mapped_column(Integer, default=None)


class DataKeyRow(Base):
    __tablename__ = "identity_data_keys"

    subject: Mapped[bytes] = mapped_column(ForeignKey("identity_subjects.subject"), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64), index=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)


class PiiRow(Base):
    __tablename__ = "identity_pii"

    subject: Mapped[bytes] = mapped_column(ForeignKey("identity_subjects.subject"), primary_key=True)
    field: Mapped[str] = mapped_column(String(16), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)


class BlindIndexRow(Base):
    __tablename__ = "identity_blind_index"

    digest: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    pepper_version: Mapped[int] = mapped_column(Integer)
    subject: Mapped[bytes] = mapped_column(ForeignKey("identity_subjects.subject"), index=True)


class SubjectLinkRow(Base):
    """old → new subject after a pepper rotation: for the data owner only, never published."""

    __tablename__ = "identity_subject_links"

    old_subject: Mapped[bytes] = mapped_column(ForeignKey("identity_subjects.subject"), primary_key=True)
    new_subject: Mapped[bytes] = mapped_column(ForeignKey("identity_subjects.subject"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def make_engine(url: str) -> Engine:
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA secure_delete = ON")  # erased rows are overwritten, not just unlinked
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA busy_timeout = 5000")
            cursor.close()

    return engine


class Vault:
    def __init__(self, engine: Engine, keys: KeyProvider, pseudonymizer: Pseudonymizer) -> None:
        self.engine = engine
        self.keys = keys
        self.pseudonymizer = pseudonymizer
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # crypto ------------------------------------------------------------------------------------

    @staticmethod
    def _aad(subject: bytes, field: str) -> bytes:
        return _PII_TAG + subject + b"\x00" + field.encode()

    def _data_key(self, session: Session, subject: bytes) -> bytes:
        row = session.get(DataKeyRow, subject)
        if row is None:
            record = session.get(SubjectRow, subject)
            if record is None:
                raise UnknownSubject("no such subject")
            raise SubjectErased("the subject's data key is gone (erased)")
        return self.keys.unwrap(row.key_id, row.wrapped, _DEK_TAG + subject)

    def _store_fields(self, session: Session, subject: bytes, data_key: bytes, pii: PII) -> None:
        aead = AESGCM(data_key)
        session.execute(delete(PiiRow).where(PiiRow.subject == subject))
        for field, value in pii.fields().items():
            nonce = os.urandom(12)
            ciphertext = nonce + aead.encrypt(nonce, value.encode("utf-8"), self._aad(subject, field))
            session.add(PiiRow(subject=subject, field=field, ciphertext=ciphertext))

    def _store_index(self, session: Session, subject: bytes, pii: PII) -> None:
        session.execute(delete(BlindIndexRow).where(BlindIndexRow.subject == subject))
        version = self.pseudonymizer.ring.current
        for kind in INDEXED:
            value = getattr(pii, kind)
            if value is not None:
                digest = self.pseudonymizer.blind_index(kind, value)
                session.execute(delete(BlindIndexRow).where(BlindIndexRow.digest == digest))
                session.add(BlindIndexRow(digest=digest, kind=kind, pepper_version=version, subject=subject))

    def _new_subject(self, session: Session, subject: bytes, pii: PII) -> None:
        now = _now()
        session.add(
            SubjectRow(subject=subject, pepper_version=self.pseudonymizer.ring.current, created_at=now, updated_at=now)
        )
        session.flush()  # the subject row first: the rows below refer to it
        data_key = AESGCM.generate_key(bit_length=256)
        key_id = self.keys.current_key_id
        session.add(
            DataKeyRow(subject=subject, key_id=key_id, wrapped=self.keys.wrap(key_id, data_key, _DEK_TAG + subject))
        )
        session.flush()
        self._store_fields(session, subject, data_key, pii)
        self._store_index(session, subject, pii)

    # operations --------------------------------------------------------------------------------

    def enrol(self, pii: PII) -> tuple[Subject, bool]:
        """Store `pii` encrypted; returns (subject, created). Enrolling the same person again updates their PII.

        Raises SubjectErased for a person whose data was erased: their pseudonym is unchanged, and
        re-using it would bring back what is recorded on-chain for it.
        """
        subject = self.pseudonymizer.subject(pii)
        with self._session() as session:
            row = session.get(SubjectRow, subject)
            if row is None:
                self._new_subject(session, subject, pii)
                return Subject(subject), True
            if row.erased_at is not None:
                raise SubjectErased("this person's data was erased; enrolling them again needs a new pepper")
            self._store_fields(session, subject, self._data_key(session, subject), pii)
            self._store_index(session, subject, pii)
            row.updated_at = _now()
            return Subject(subject), False

    def pii(self, subject: Subject) -> PII:
        """Decrypt a subject's PII (following a pepper-rotation link to its current subject)."""
        with self._session() as session:
            return self._decrypt(session, self._follow(session, subject))

    def find(self, *, email: str | None = None, phone: str | None = None) -> Subject | None:
        """The subject with this normalised e-mail or phone, by blind index; nothing is decrypted."""
        kind, value = ("email", email) if email is not None else ("phone", phone)
        if value is None:
            raise VaultError("give an e-mail address or a phone number")
        digest = self.pseudonymizer.blind_index(kind, value)
        with self._session() as session:
            row = session.get(BlindIndexRow, digest)
            return Subject(row.subject) if row is not None and row.kind == kind else None

    def erase(self, subject: Subject) -> datetime:
        """Crypto-shred a subject: its data key, ciphertexts, index entries and links are destroyed.
        Returns when it was erased; erasing again changes nothing."""
        with self._session() as session:
            row = session.get(SubjectRow, subject)
            if row is None:
                raise UnknownSubject("no such subject")
            if row.erased_at is not None:
                return _utc(row.erased_at)
            successors = list(
                session.scalars(select(SubjectLinkRow.new_subject).where(SubjectLinkRow.old_subject == subject))
            )
            for target in [subject, *successors]:
                session.execute(
                    delete(SubjectLinkRow).where(
                        or_(SubjectLinkRow.old_subject == target, SubjectLinkRow.new_subject == target)
                    )
                )
                session.execute(delete(PiiRow).where(PiiRow.subject == target))
                session.execute(delete(DataKeyRow).where(DataKeyRow.subject == target))
                session.execute(delete(BlindIndexRow).where(BlindIndexRow.subject == target))
                target_row = session.get(SubjectRow, target)
                if target_row is not None:
                    target_row.erased_at = target_row.updated_at = _now()
            assert row.erased_at is not None
            return _utc(row.erased_at)

    def erased(self) -> set[Subject]:
        """Every subject erased."""
        with self._session() as session:
            return {
                Subject(s) for s in session.scalars(select(SubjectRow.subject).where(SubjectRow.erased_at.is_not(None)))
            }

    def rotate_master_key(self, *, batch: int = 1_000) -> int:
        """Re-wrap every data key under the provider's current master key; returns how many changed.
        In transactions of at most `batch` keys, so that enrolments beside it wait for one batch only;
        a key another writer wraps meanwhile under an older master key is left for the next run
        (`key_usage` shows it)."""
        current = self.keys.current_key_id
        changed = 0
        while True:
            with self._session() as session:
                rows = session.scalars(
                    select(DataKeyRow).where(DataKeyRow.key_id != current).order_by(DataKeyRow.subject).limit(batch)
                ).all()
                for row in rows:
                    data_key = self.keys.unwrap(row.key_id, row.wrapped, _DEK_TAG + row.subject)
                    row.wrapped = self.keys.wrap(current, data_key, _DEK_TAG + row.subject)
                    row.key_id = current
            changed += len(rows)
            if len(rows) < batch:
                return changed

    def key_usage(self) -> dict[str, int]:
        """How many data keys each master key wraps: one no longer listed can be retired."""
        with self._session() as session:
            return {
                str(key_id): int(count)
                for key_id, count in session.execute(
                    select(DataKeyRow.key_id, func.count()).group_by(DataKeyRow.key_id).order_by(DataKeyRow.key_id)
                )
            }

    def rotate_pepper(self) -> dict[Subject, Subject]:
        """Move every live subject made under an older pepper to its subject under the current one.

        The PII is re-encrypted under the new subject (with a new data key), the old subject's PII,
        key and index entries are destroyed, and the old→new link is kept here. Returns the links made.
        """
        current = self.pseudonymizer.ring.current
        links: dict[Subject, Subject] = {}
        with self._session() as session:
            old_rows = list(
                session.scalars(
                    select(SubjectRow).where(
                        SubjectRow.pepper_version != current,
                        SubjectRow.erased_at.is_(None),
                        SubjectRow.superseded_at.is_(None),
                    )
                )
            )
            for old in old_rows:
                pii = self._decrypt(session, old.subject)
                new_subject = self.pseudonymizer.subject(pii)
                if session.get(SubjectRow, new_subject) is None:
                    self._new_subject(session, new_subject, pii)
                session.execute(delete(PiiRow).where(PiiRow.subject == old.subject))
                session.execute(delete(DataKeyRow).where(DataKeyRow.subject == old.subject))
                session.execute(delete(BlindIndexRow).where(BlindIndexRow.subject == old.subject))
                session.add(SubjectLinkRow(old_subject=old.subject, new_subject=new_subject, created_at=_now()))
                old.superseded_at = old.updated_at = _now()
                links[Subject(old.subject)] = Subject(new_subject)
        return links

    def successor(self, subject: Subject) -> Subject | None:
        with self._session() as session:
            link = session.get(SubjectLinkRow, subject)
            return Subject(link.new_subject) if link is not None else None

    def _follow(self, session: Session, subject: bytes) -> bytes:
        for _ in range(16):  # one link per pepper rotation
            link = session.get(SubjectLinkRow, subject)
            if link is None:
                return subject
            subject = link.new_subject
        raise VaultError("pepper-rotation links form a chain longer than 16")

    def _decrypt(self, session: Session, subject: bytes) -> PII:
        aead = AESGCM(self._data_key(session, subject))
        values: dict[str, str] = {}
        for row in session.scalars(select(PiiRow).where(PiiRow.subject == subject)):
            try:
                plain = aead.decrypt(row.ciphertext[:12], row.ciphertext[12:], self._aad(subject, row.field))
            except InvalidTag as exc:
                raise TamperedCiphertext(f"the {row.field} ciphertext failed authentication") from exc
            values[row.field] = plain.decode("utf-8")
        return PII(**values)

    def set_controller(self, subject: Subject, controller: str, chain_id: int) -> None:
        with self._session() as session:
            row = session.get(SubjectRow, subject)
            if row is None:
                raise UnknownSubject("no such subject")
            row.controller, row.chain_id, row.updated_at = controller, chain_id, _now()

    def erased_of(self, subjects: Sequence[Subject]) -> dict[Subject, bool]:
        """Which of `subjects` the vault holds, each with whether it was erased: one query for many
        (a points issuance names up to a thousand customers)."""
        if not subjects:
            return {}
        with self._session() as session:
            rows = session.execute(
                select(SubjectRow.subject, SubjectRow.erased_at).where(SubjectRow.subject.in_(set(subjects)))
            )
            return {Subject(bytes(subject)): erased_at is not None for subject, erased_at in rows}

    def record(self, subject: Subject) -> SubjectRecord | None:
        with self._session() as session:
            row = session.get(SubjectRow, subject)
            if row is None:
                return None
            return SubjectRecord(
                subject=Subject(row.subject),
                created_at=_utc(row.created_at),
                updated_at=_utc(row.updated_at),
                erased_at=_utc(row.erased_at) if row.erased_at else None,
                controller=row.controller,
                chain_id=row.chain_id,
            )


def _utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored here is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
