"""Consent-filtered release: log, then release.

For each chunk of a CRM export the bridge
1. pseudonymises every row (the subject is the keyed hash `identity` derives from the e-mail
   address, else the phone number; the DID names it);
2. keeps the rows of subjects the read model permits for (partner, purpose), and in each row only
   the columns whose attribute category that subject permits;
3. records one access entry per subject on-chain (`AccessLog` checks each against the consent
   registry in the same transaction), in as many transactions as the chunk's entries need (a node's
   pool takes no transaction over 128 KiB: `ledger.access.max_record_entries`), and
4. hands the chunk on only once all of them are final, and without the rows of any subject the
   chain refused.

"Final" includes surviving a crash of the node where the chain can lose final blocks: the managed
anvil node keeps its chain in memory between checkpoints, so a release there also waits for a
checkpoint that holds the access record's block (`Bridge.durable`, `ledger.anvil.Checkpoints`).
Otherwise a crash could leave data handed on with no record that it was permitted. The file and table
sinks wait once, at the end, before the output appears; iterating waits per chunk.

Chunks are pipelined: while one chunk's transactions are being mined the next is prepared, so the
chain's block time is paid once, not once per chunk. Two background threads talk to the node, each
in chunk order: one sends the transactions (so the accessor's nonces stay in order), one waits for
their receipts and reads the entries' verdicts. A node answers `eth_sendRawTransaction` only between
blocks, and one with a large state takes a while per block, so sending from the preparing thread
would stall the preparation of the next chunk and leave one chunk per block; and a chunk is released
as soon as its entries are final, not only when the pipeline is full, so little is left to do once
the last block is mined. Memory is bounded by `pipeline_depth` chunks.
"""

from __future__ import annotations

import os
import time
from collections import abc, deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crm_bridge.errors import AccessRefused, MappingError
from crm_bridge.mapping import Mapping
from crm_bridge.release import ReleaseInfo
from identity.did import DidWeb
from identity.errors import InvalidPII
from identity.normalize import normalize_emails, normalize_phone
from identity.pseudonym import Pseudonymizer
from identity.types import Subject
from ledger.access import Access, AccessBatch, max_record_entries
from ledger.consent import ConsentReader
from ledger.errors import LedgerError
from ledger.tx import Receipt
from ledger.types import ATTRIBUTE_BITS, AttributeMask, Purpose

DID_COLUMN = "did"
# Row masks are int64 arrays whose bits are the categories an export releases, not the registry's
# (`ATTRIBUTE_BITS` of them): a mapping of more categories than this is refused.
_MAX_CATEGORIES = 63
# Codes of identifier spellings besides subject ids (> 0):
_INVALID = 0  # an identifier that does not normalise: the row has no subject and no fallback
_BLANK = -1  # no identifier (empty or null): the row may fall back to another identifier
_UNSEEN = -2  # not met before in this export


class AccessRecorder(Protocol):
    """What the bridge needs of the access log (`ledger.access.AccessLogClient`)."""

    def submit(self, entries: list[Access]) -> str: ...

    def settle(self, tx_hash: str, entries: list[Access]) -> tuple[Receipt, AccessBatch]: ...

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
    # Of which waiting until a crash of the node could no longer lose the access records (the managed
    # node's next state dump; 0 on a chain with final blocks).
    durable_wait_seconds: float = 0.0


@dataclass
class _Chunk:
    batch: pa.RecordBatch
    ids: np.ndarray  # per row: the subject's id in this export (0: no valid identifier)
    masks: np.ndarray  # per row: permitted categories of the export, as bits (0: not permitted)
    parts: list[list[Access]]  # its entries, as sent: one list per transaction
    # Per transaction, in order: its receipt and its entries' log, once all of them are final.
    settled: Future[list[tuple[Receipt, AccessBatch]]] | None


def _ready(chunk: _Chunk) -> bool:
    """Whether a chunk can be released without waiting for the chain."""
    return chunk.settled is None or chunk.settled.done()


class Bridge:
    def __init__(
        self,
        pseudonymizer: Pseudonymizer,
        dids: DidWeb,
        access_log: AccessRecorder,
        *,
        confirmations: int = 1,
        pipeline_depth: int = 8,
        durable: Callable[[int], None] | None = None,
    ) -> None:
        self.pseudonymizer = pseudonymizer
        self.dids = dids
        self.access_log = access_log
        self.confirmations = confirmations
        # Returns once a crash of the node can no longer lose block number N (raises LedgerError if
        # none comes to hold it); None where final blocks stay (`Checkpoints.wait` for the managed node).
        self.durable = durable
        self.pipeline_depth = pipeline_depth

    def subjects_of(self, kind: str, raws: list[str], region: str | None) -> list[bytes | None]:
        """The subject each e-mail address or phone number (as the CRM spells it) derives, or None
        where it is not valid."""
        if kind == "email":
            normalised = normalize_emails(raws)
        else:
            normalised = []
            for raw in raws:
                try:
                    normalised.append(normalize_phone(raw, region))
                except InvalidPII:
                    normalised.append(None)
        derived = iter(self.pseudonymizer.subjects(kind, [n for n in normalised if n is not None]))
        return [None if n is None else bytes(next(derived)) for n in normalised]


Permissions = abc.Mapping[bytes, int]
"""Each subject's attributes a release may use (an `AttributeMask`; plain ints are taken too, read-only)."""


def _categories(permitted: int, categories: dict[int, int]) -> int:
    """The categories (bits of a row mask) of `permitted` registry bits that an export asks for."""
    return sum(1 << i for bit, i in categories.items() if permitted >> bit & 1)


class _Subjects:
    """The subjects met in one export, numbered densely from 1 (0: a row with no valid identifier),
    with per-subject arrays, so that per-row work is numpy indexing rather than Python loops.

    Each distinct spelling of an identifier is normalised and hashed once per export."""

    def __init__(
        self, bridge: Bridge, permissions: Permissions, categories: dict[int, int], region: str | None
    ) -> None:
        self.bridge, self.permissions, self.categories, self.region = bridge, permissions, categories, region
        self.ids: dict[bytes, int] = {}
        self.subjects: list[bytes] = [b""]
        self.dids: list[str] = [""]
        self.masks = np.zeros(1, dtype=np.int64)  # permitted categories asked for, per id
        self.logged = np.zeros(1, dtype=bool)  # has an entry in this export
        self.refused = np.zeros(1, dtype=bool)  # the chain refused its entry
        self.released = np.zeros(1, dtype=bool)  # some of its rows were released
        # Per kind of identifier: spelling -> its id (> 0), or _INVALID, or _BLANK (no identifier).
        self._spellings: dict[str, dict[str, int]] = {"email": {}, "phone": {}}

    def _codes(self, kind: str, raws: list[str]) -> list[int]:
        """The codes of spellings met for the first time: each normalised and hashed once per export."""
        present = [raw for raw in raws if raw.strip()]
        derived = iter(self.bridge.subjects_of(kind, present, self.region))
        ids, subjects, did = self.ids, self.subjects, self.bridge.dids.did
        codes = []
        for raw in raws:
            if not raw.strip():
                codes.append(_BLANK)
                continue
            subject = next(derived)
            if subject is None:
                codes.append(_INVALID)
                continue
            found = ids.get(subject, 0)
            if not found:
                found = ids[subject] = len(subjects)
                subjects.append(subject)
                self.dids.append(did(Subject(subject)))
            codes.append(found)
        return codes

    def _grow(self) -> None:
        have, need = len(self.masks), len(self.subjects)
        if need == have:
            return
        permissions, categories = self.permissions, self.categories
        fresh = np.fromiter(
            (_categories(permissions.get(s, 0), categories) for s in self.subjects[have:need]),
            dtype=np.int64,
            count=need - have,
        )
        self.masks = np.concatenate([self.masks, fresh])
        self.logged = np.concatenate([self.logged, np.zeros(need - have, dtype=bool)])
        self.refused = np.concatenate([self.refused, np.zeros(need - have, dtype=bool)])
        self.released = np.concatenate([self.released, np.zeros(need - have, dtype=bool)])

    def _ids(self, values: pa.Array, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Per value: the id its `kind` identifier gives, and whether there is one at all. Each
        distinct spelling in a chunk is looked up once (dictionary encoding), and only spellings not
        met before in this export run Python code; the lookup of the others is one C-level pass."""
        if not pa.types.is_string(values.type):
            values = pc.cast(values, pa.string())
        encoded = values.dictionary_encode()
        spellings = encoded.dictionary.to_pylist()
        known = self._spellings[kind]
        codes = np.fromiter(map(known.get, spellings, repeat(_UNSEEN)), dtype=np.int64, count=len(spellings))
        unseen = np.flatnonzero(codes == _UNSEEN).tolist()
        if unseen:
            fresh = [spellings[i] for i in unseen]
            codes[unseen] = new_codes = self._codes(kind, fresh)
            known.update(zip(fresh, new_codes, strict=True))
        # A null cell points past the dictionary: no identifier.
        index = encoded.indices.fill_null(pa.scalar(len(spellings), encoded.indices.type)).to_numpy()
        codes = np.append(codes, _BLANK)[index]
        return np.maximum(codes, 0), codes != _BLANK

    def rows(self, batch: pa.RecordBatch, mapping: Mapping) -> np.ndarray:
        """Each row's subject id: from the e-mail address when the row has one, else from the phone
        (as at enrolment); 0 when that identifier is not valid. Phones are read only where needed."""
        columns = mapping.pii.columns()
        n = batch.num_rows
        ids = np.zeros(n, dtype=np.int64)
        has_email = np.zeros(n, dtype=bool)
        if "email" in columns:
            ids, has_email = self._ids(batch.column(columns["email"]), "email")
        if "phone" in columns and not has_email.all():
            rest = np.flatnonzero(~has_email)
            ids[rest] = self._ids(batch.column(columns["phone"]).take(pa.array(rest)), "phone")[0]
        self._grow()
        return ids


def permitted(
    consents: ConsentReader, partner: str, purpose: bytes, erased: Collection[bytes] = ()
) -> dict[bytes, AttributeMask]:
    """The consent filter of a release to `partner` for `purpose`: each customer's attributes it may use
    now (`ConsentReader.permissions`: what the chain holds, less what a pending revocation takes away), without
    the customers in `erased` (their personal data was erased: their consent stays on-chain, but the
    company no longer uses their data). `Export` releases by it."""
    return {
        subject: attributes
        for subject, attributes in consents.permissions(partner, purpose).items()
        if subject not in erased
    }


class Export:
    """One export run through `bridge`: iterate for the released batches (`did` + permitted columns,
    never PII), each after its access record is final; then read `stats`."""

    def __init__(
        self,
        bridge: Bridge,
        batches: Iterable[pa.RecordBatch],
        mapping: Mapping,
        *,
        partner: str,
        purpose: bytes,
        purpose_key: str,
        attribute_bits: dict[str, int],
        permissions: Permissions,
        partner_name: str | None = None,
    ) -> None:
        unknown = sorted(mapping.categories() - set(attribute_bits))
        if unknown:
            raise MappingError(f"not attribute categories of the registry: {', '.join(unknown)}")
        self.bits = {column: attribute_bits[category] for column, category in mapping.columns.items()}
        if any(not 0 <= bit < ATTRIBUTE_BITS for bit in self.bits.values()):
            raise MappingError(f"attribute bits are 0 to {ATTRIBUTE_BITS - 1}")
        registry_bits = sorted(set(self.bits.values()))
        if len(registry_bits) > _MAX_CATEGORIES:
            raise MappingError(f"an export releases at most {_MAX_CATEGORIES} attribute categories")
        self.categories = {bit: i for i, bit in enumerate(registry_bits)}  # registry bit -> bit in a row's mask
        self.bridge, self.batches, self.mapping = bridge, batches, mapping
        self.partner, self.purpose = partner, Purpose(purpose)
        self.subjects = _Subjects(bridge, permissions, self.categories, mapping.default_region)
        self.request_id = os.urandom(32)
        self.stats = ExportStats(request_id="0x" + self.request_id.hex(), partner=partner, purpose=purpose_key)
        self.stats.columns = [DID_COLUMN, *mapping.columns]
        self.release = ReleaseInfo(
            partner=partner,
            partner_name=partner_name,
            purpose=purpose_key,
            request_id=self.stats.request_id,
            columns=dict(mapping.columns),
        )
        self._metadata = self.release.metadata()
        self._receipts: list[Receipt] = []  # of the access records released on

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        """The released batches, each once its access record is final and durable (one chunk at a
        time: the sinks below wait for durability once, for all of them)."""
        return self._run(durable_each=True)

    def _run(self, *, durable_each: bool) -> Iterator[pa.RecordBatch]:
        started = time.perf_counter()
        in_flight: deque[_Chunk] = deque()
        checked = False
        sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="access-log-sender")
        settler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="access-log-settler")
        try:
            for batch in self.batches:
                if not checked:
                    self.mapping.check_columns(batch.schema.names)
                    checked = True
                in_flight.append(self._prepare(batch, sender, settler, durable_each))
                while in_flight and (len(in_flight) > self.bridge.pipeline_depth or _ready(in_flight[0])):
                    yield from self._release(in_flight.popleft())
            while in_flight:
                yield from self._release(in_flight.popleft())
        finally:
            # An export stopped early sends nothing more (what was sent stays recorded, unreleased).
            sender.shutdown(cancel_futures=True)
            settler.shutdown(cancel_futures=True)
        self.stats.subjects_released = int(np.count_nonzero(self.subjects.released))
        self.stats.seconds = time.perf_counter() - started

    def _prepare(
        self, batch: pa.RecordBatch, sender: ThreadPoolExecutor, settler: ThreadPoolExecutor, durable: bool
    ) -> _Chunk:
        subjects = self.subjects
        ids = subjects.rows(batch, self.mapping)
        masks = subjects.masks[ids]
        unidentified = int(np.count_nonzero(ids == 0))
        self.stats.rows_read += batch.num_rows
        self.stats.rows_unidentified += unidentified
        self.stats.rows_not_permitted += int(np.count_nonzero(masks == 0)) - unidentified
        # One entry per subject per export, in the chunk where the subject first appears.
        new = np.unique(ids[masks != 0])
        new = new[~subjects.logged[new]]
        subjects.logged[new] = True
        known, partner, purpose, request_id = subjects.subjects, self.partner, self.purpose, self.request_id
        registry = self._registry_mask
        entries = [
            Access(known[i], partner, purpose, registry(mask), request_id)
            for i, mask in zip(new.tolist(), subjects.masks[new].tolist(), strict=True)
        ]
        if not entries:
            return _Chunk(batch, ids, masks, [], None)
        # As many transactions as the entries need, sent in order by the one sending thread (so the
        # accessor's nonces stay in order); each part is a batch of the same access request.
        size = max_record_entries()
        parts = [entries[i : i + size] for i in range(0, len(entries), size)]
        sent = [sender.submit(self.bridge.access_log.submit, part) for part in parts]
        return _Chunk(batch, ids, masks, parts, settler.submit(self._settle, sent, parts, durable))

    def _registry_mask(self, mask: int) -> AttributeMask:
        """A row mask's categories as the registry's attribute bits (what the access log records)."""
        return AttributeMask(sum(1 << bit for bit, i in self.categories.items() if mask >> i & 1))

    def _settle(
        self, sent: list[Future[str]], parts: list[list[Access]], durable: bool
    ) -> list[tuple[Receipt, AccessBatch]]:
        """(In the settling thread.) Wait until the entries of every one of a chunk's batches are final
        (and durable, if asked); each batch's receipt and log, in order."""
        settled = []
        for sending, entries in zip(sent, parts, strict=True):
            tx_hash = sending.result()  # a send that failed raises its own error, as it would have unthreaded
            try:
                receipt, recorded = self.bridge.access_log.settle(tx_hash, entries)
                self.bridge.access_log.wait_final(receipt, self.bridge.confirmations)
            except LedgerError as exc:
                raise AccessRefused(f"the access log did not record batch {tx_hash}: {exc}") from exc
            settled.append((receipt, recorded))
        if durable:
            try:
                self._make_durable([receipt for receipt, _ in settled])
            except LedgerError as exc:
                which = "batch " if len(settled) == 1 else "batches "
                which += ", ".join(receipt.tx_hash for receipt, _ in settled)
                raise AccessRefused(f"the access log did not record {which}: {exc}") from exc
        return settled

    def _make_durable(self, receipts: list[Receipt]) -> None:
        """Wait until a crash of the node cannot lose these receipts' blocks, then check that they
        are still the chain's: a crash before that replaces them with other blocks of their numbers."""
        if self.bridge.durable is None or not receipts:
            return
        began = time.perf_counter()
        self.bridge.durable(max(receipt.block_number for receipt in receipts))
        self.stats.durable_wait_seconds += time.perf_counter() - began
        for receipt in receipts:
            self.bridge.access_log.wait_final(receipt, self.bridge.confirmations)

    def _finish(self) -> None:
        """(Sinks, before anything they wrote appears.) Every access record released on is durable."""
        began = time.perf_counter()
        try:
            self._make_durable(self._receipts)
        except LedgerError as exc:
            raise AccessRefused(f"the access records of this export did not become durable: {exc}") from exc
        self.stats.seconds += time.perf_counter() - began

    def _release(self, chunk: _Chunk) -> Iterator[pa.RecordBatch]:
        subjects = self.subjects
        if chunk.settled is not None:
            for (receipt, recorded), entries in zip(chunk.settled.result(), chunk.parts, strict=True):
                self._receipts.append(receipt)
                self.stats.transactions.append(receipt.tx_hash)
                self.stats.entries_recorded += recorded.count
                # `settle` checked that the log holds exactly the entries sent, in order: a refused
                # position is one within this transaction's entries.
                refused = [subjects.ids[entries[i].subject] for i in recorded.refused()]
                subjects.refused[refused] = True
                self.stats.entries_refused += len(refused)
        # Entries of earlier chunks were settled before this one's (chunks settle in order), so every
        # subject in this chunk has a final entry by now.
        permitted = chunk.masks != 0
        keep = permitted & ~subjects.refused[chunk.ids]
        self.stats.rows_refused_on_chain += int(np.count_nonzero(permitted & ~keep))
        if not keep.any():
            return
        ids = chunk.ids[keep]
        subjects.released[ids] = True
        kept = pa.array(keep)
        # The DID column: each distinct subject's DID once, then taken per row.
        distinct, per_row = np.unique(ids, return_inverse=True)
        arrays = [pc.take(pa.array([subjects.dids[i] for i in distinct.tolist()], pa.string()), pa.array(per_row))]
        masks = chunk.masks[keep]
        for column, bit in self.bits.items():
            values = chunk.batch.column(column).filter(kept)
            allowed = pa.array((masks >> self.categories[bit]) & 1 == 1)
            arrays.append(pc.if_else(allowed, values, pa.nulls(len(values), values.type)))
        released = pa.RecordBatch.from_arrays(arrays, names=self.stats.columns).replace_schema_metadata(self._metadata)
        self.stats.rows_released += released.num_rows
        yield released

    # sinks -------------------------------------------------------------------------------------

    def to_table(self) -> pa.Table:
        """Run the export and collect what it releases (small exports; use `to_parquet` for big ones)."""
        batches = list(self._run(durable_each=False))
        self._finish()
        if not batches:
            return self._empty_schema().empty_table()
        return pa.Table.from_batches(batches)

    def to_parquet(self, path: Path) -> ExportStats:
        """Run the export, streaming what it releases into a Parquet file (written atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        writer: pq.ParquetWriter | None = None
        try:
            for batch in self._run(durable_each=False):
                if writer is None:
                    writer = pq.ParquetWriter(partial, batch.schema, compression="zstd", **_encodings(batch))
                writer.write_batch(batch)
            if writer is None:
                writer = pq.ParquetWriter(partial, self._empty_schema(), compression="zstd")
            writer.close()
            writer = None
            self._finish()
            partial.replace(path)
        finally:
            if writer is not None:
                writer.close()
            partial.unlink(missing_ok=True)
        return self.stats

    def _empty_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(DID_COLUMN, pa.string()), *(pa.field(c, pa.null()) for c in self.mapping.columns)],
            metadata=self._metadata,
        )


def _encodings(first: pa.RecordBatch) -> dict[str, list[str]]:
    """Parquet options for a released table, judged on its first batch: dictionary encoding for the
    DID column (a customer's rows repeat it) and for columns with few distinct values; min/max
    statistics (for readers that skip row groups) for all but text columns, where they cost time and
    prune nothing. Arrow would otherwise build a dictionary for every column and drop it when it
    grows too big: a quarter of the writing time for a smaller file."""
    few = [
        f.name
        for f in first.schema
        if f.name != DID_COLUMN and pc.count_distinct(first.column(f.name)).as_py() * 4 <= first.num_rows
    ]
    texts = {f.name for f in first.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)}
    return {"use_dictionary": [DID_COLUMN, *few], "write_statistics": [c for c in first.schema.names if c not in texts]}
