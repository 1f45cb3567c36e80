"""Consent-filtered release: log, then release.

For each chunk of a CRM export the bridge
1. pseudonymises every row (the subject is the keyed hash `identity` derives from the e-mail
   address, else the phone number; the DID names it);
2. keeps the rows of subjects the read model permits for (partner, purpose), and in each row only
   the columns whose attribute category that subject permits;
3. records one access entry per subject on-chain (`AccessLog` checks each against the consent
   registry in the same transaction), and
4. hands the chunk on only once that transaction is final, and without the rows of any subject
   the chain refused.

Chunks are pipelined: while one chunk's transaction is being mined the next is prepared, so the
chain's block time is paid once, not once per chunk. Memory is bounded by a few chunks.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crm_bridge.errors import AccessRefused, MappingError
from crm_bridge.mapping import Mapping
from identity.did import DidWeb
from identity.errors import InvalidPII
from identity.normalize import PII, normalize_email, normalize_phone
from identity.pseudonym import Pseudonymizer
from ledger.access import Access, AccessEvent
from ledger.errors import LedgerError
from ledger.tx import Receipt

DID_COLUMN = "did"
_MAX_ATTRIBUTE_BIT = 62  # row masks are int64 arrays
_CACHE_LIMIT = 1_000_000  # identities remembered across chunks (about 200 MB at most)


class AccessRecorder(Protocol):
    """What the bridge needs of the access log (`ledger.access.AccessLogClient`)."""

    def submit(self, entries: list[Access]) -> str: ...

    def settle(self, tx_hash: str, entries: list[Access]) -> tuple[Receipt, list[AccessEvent]]: ...

    def wait_final(self, receipt: Receipt, confirmations: int) -> None: ...


@dataclass
class ExportStats:
    request_id: str
    partner: str
    purpose: str
    rows_read: int = 0
    rows_released: int = 0
    rows_unidentified: int = 0  # no valid e-mail or phone: no subject, never released
    rows_not_permitted: int = 0  # the read model has no consent for them
    rows_refused_on_chain: int = 0  # the read model said yes, the chain said no
    subjects_released: int = 0
    entries_recorded: int = 0
    entries_refused: int = 0
    transactions: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Chunk:
    batch: pa.RecordBatch
    dids: list[str | None]
    subjects: list[bytes | None]
    masks: np.ndarray  # permitted attribute bits per row (0: not permitted)
    entries: list[Access]
    tx_hash: str | None


class Bridge:
    def __init__(
        self,
        pseudonymizer: Pseudonymizer,
        dids: DidWeb,
        access_log: AccessRecorder,
        *,
        confirmations: int = 1,
        pipeline_depth: int = 2,
    ) -> None:
        self.pseudonymizer = pseudonymizer
        self.dids = dids
        self.access_log = access_log
        self.confirmations = confirmations
        self.pipeline_depth = pipeline_depth
        self._identities: dict[tuple[str | None, str | None], tuple[bytes, str] | None] = {}

    # identity ----------------------------------------------------------------------------------

    def _identify(self, email: str | None, phone: str | None, region: str | None) -> tuple[bytes, str] | None:
        # Only the identifier the subject derives from is normalised (the e-mail address, else the phone).
        try:
            if email and email.strip():
                pii = PII(email=normalize_email(email))
            elif phone and phone.strip():
                pii = PII(phone=normalize_phone(phone, region))
            else:
                return None
        except InvalidPII:
            return None
        subject = self.pseudonymizer.subject(pii)
        return bytes(subject), self.dids.did(subject)

    def _subjects(self, batch: pa.RecordBatch, mapping: Mapping) -> tuple[list[bytes | None], list[str | None]]:
        columns = mapping.pii.columns()
        n = batch.num_rows
        emails = _texts(batch, columns.get("email"), n)
        phones = _texts(batch, columns.get("phone"), n)
        if len(self._identities) > _CACHE_LIMIT:
            self._identities.clear()
        cache, region = self._identities, mapping.default_region
        subjects: list[bytes | None] = []
        dids: list[str | None] = []
        for key in zip(emails, phones, strict=True):
            if key in cache:
                found = cache[key]
            else:
                found = cache[key] = self._identify(key[0], key[1], region)
            if found is None:
                subjects.append(None)
                dids.append(None)
            else:
                subjects.append(found[0])
                dids.append(found[1])
        return subjects, dids

    # the export --------------------------------------------------------------------------------

    def export(
        self,
        batches: Iterable[pa.RecordBatch],
        mapping: Mapping,
        *,
        partner: str,
        purpose: bytes,
        purpose_key: str,
        attribute_bits: dict[str, int],
        permissions: dict[bytes, int],
    ) -> Export:
        """Start an export; iterate the result for the released batches (each after its access
        record is final), then read its `stats`."""
        return Export(self, batches, mapping, partner, purpose, purpose_key, attribute_bits, permissions)


class Export:
    """One export run: iterate for released batches (`did` + permitted columns, never PII)."""

    def __init__(
        self,
        bridge: Bridge,
        batches: Iterable[pa.RecordBatch],
        mapping: Mapping,
        partner: str,
        purpose: bytes,
        purpose_key: str,
        attribute_bits: dict[str, int],
        permissions: dict[bytes, int],
    ) -> None:
        unknown = sorted(mapping.categories() - set(attribute_bits))
        if unknown:
            raise MappingError(f"not attribute categories of the registry: {', '.join(unknown)}")
        self.bits = {column: attribute_bits[category] for column, category in mapping.columns.items()}
        if any(bit > _MAX_ATTRIBUTE_BIT for bit in self.bits.values()):
            raise MappingError(f"attribute bits above {_MAX_ATTRIBUTE_BIT} are not supported by the bridge")
        self.requested = sum({1 << bit for bit in self.bits.values()})
        self.bridge, self.batches, self.mapping = bridge, batches, mapping
        self.partner, self.purpose, self.permissions = partner, purpose, permissions
        self.request_id = os.urandom(32)
        self.stats = ExportStats(request_id="0x" + self.request_id.hex(), partner=partner, purpose=purpose_key)
        self.stats.columns = [DID_COLUMN, *mapping.columns]
        self._logged: dict[bytes, int] = {}  # subject → attributes recorded in this export
        self._refused: set[bytes] = set()
        self._released_subjects: set[bytes] = set()

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        started = time.perf_counter()
        in_flight: deque[_Chunk] = deque()
        checked = False
        for batch in self.batches:
            if not checked:
                self.mapping.check_columns(batch.schema.names)
                checked = True
            in_flight.append(self._prepare(batch))
            while len(in_flight) > self.bridge.pipeline_depth:
                yield from self._release(in_flight.popleft())
        while in_flight:
            yield from self._release(in_flight.popleft())
        self.stats.subjects_released = len(self._released_subjects)
        self.stats.seconds = time.perf_counter() - started

    def _prepare(self, batch: pa.RecordBatch) -> _Chunk:
        subjects, dids = self.bridge._subjects(batch, self.mapping)
        permissions, requested = self.permissions, self.requested
        masks = np.fromiter(
            (permissions.get(s, 0) & requested if s is not None else 0 for s in subjects),
            dtype=np.int64,
            count=len(subjects),
        )
        self.stats.rows_read += batch.num_rows
        self.stats.rows_unidentified += sum(s is None for s in subjects)
        self.stats.rows_not_permitted += int(np.count_nonzero(masks == 0)) - sum(s is None for s in subjects)
        entries: list[Access] = []
        logged = self._logged
        for subject, mask in zip(subjects, masks.tolist(), strict=True):
            if mask and subject is not None and subject not in logged:
                logged[subject] = mask
                entries.append(Access(subject, self.partner, self.purpose, mask, self.request_id))
        tx_hash = self.bridge.access_log.submit(entries) if entries else None
        if tx_hash is not None:
            self.stats.transactions.append(tx_hash)
        return _Chunk(batch, dids, subjects, masks, entries, tx_hash)

    def _release(self, chunk: _Chunk) -> Iterator[pa.RecordBatch]:
        if chunk.tx_hash is not None:
            try:
                receipt, events = self.bridge.access_log.settle(chunk.tx_hash, chunk.entries)
                self.bridge.access_log.wait_final(receipt, self.bridge.confirmations)
            except LedgerError as exc:
                raise AccessRefused(f"the access log did not record batch {chunk.tx_hash}: {exc}") from exc
            self.stats.entries_recorded += len(events)
            for event in events:
                if not event.permitted:
                    self._refused.add(event.subject)
                    self.stats.entries_refused += 1
        refused = self._refused
        keep = np.fromiter(
            (s is not None and s not in refused for s in chunk.subjects), dtype=bool, count=len(chunk.subjects)
        ) & (chunk.masks != 0)
        self.stats.rows_refused_on_chain += int(np.count_nonzero((chunk.masks != 0) & ~keep))
        if not keep.any():
            return
        self._released_subjects.update(s for s, k in zip(chunk.subjects, keep.tolist(), strict=True) if k and s)
        arrays = [pa.array(chunk.dids, pa.string())]
        for column, bit in self.bits.items():
            values = chunk.batch.column(column)
            allowed = pa.array((chunk.masks >> bit) & 1 == 1)
            arrays.append(pc.if_else(allowed, values, pa.nulls(len(values), values.type)))
        released = pa.RecordBatch.from_arrays(arrays, names=self.stats.columns).filter(pa.array(keep))
        self.stats.rows_released += released.num_rows
        yield released

    # sinks -------------------------------------------------------------------------------------

    def to_table(self) -> pa.Table:
        """Run the export and collect what it releases (small exports; use `to_parquet` for big ones)."""
        batches = list(self)
        if not batches:
            return self._empty_schema().empty_table()
        return pa.Table.from_batches(batches)

    def to_parquet(self, path: Path) -> ExportStats:
        """Run the export, streaming what it releases into a Parquet file (written atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        writer: pq.ParquetWriter | None = None
        try:
            for batch in self:
                if writer is None:
                    writer = pq.ParquetWriter(partial, batch.schema, compression="zstd")
                writer.write_batch(batch)
            if writer is None:
                writer = pq.ParquetWriter(partial, self._empty_schema(), compression="zstd")
            writer.close()
            writer = None
            partial.replace(path)
        finally:
            if writer is not None:
                writer.close()
            partial.unlink(missing_ok=True)
        return self.stats

    def _empty_schema(self) -> pa.Schema:
        return pa.schema([pa.field(DID_COLUMN, pa.string()), *(pa.field(c, pa.null()) for c in self.mapping.columns)])


def _texts(batch: pa.RecordBatch, column: str | None, n: int) -> list[str | None]:
    if column is None:
        return [None] * n
    values = batch.column(column)
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        values = pc.cast(values, pa.string())
    return list(values.to_pylist())
