"""The bridge's own rules, with an in-memory access log: log then release, chunking, mapping and sources."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine

from crm_bridge.bridge import DID_COLUMN, Bridge, Export, ExportStats
from crm_bridge.errors import AccessRefused, MappingError, SourceError
from crm_bridge.mapping import Mapping
from crm_bridge.release import ReleaseInfo
from crm_bridge.sources import read_csv, read_source
from identity.did import DidWeb
from identity.normalize import PII, normalize_email
from identity.pseudonym import PepperRing, Pseudonymizer
from identity.types import Subject
from ledger.access import Access, AccessBatch, max_record_entries
from ledger.access.client import RECORD_SELECTOR, encode_entries
from ledger.anvil import NotDurable
from ledger.errors import TransactionFailed
from ledger.tx import MAX_TX_DATA_BYTES, Receipt
from ledger.types import ATTRIBUTE_BITS

BITS = {"user.behavior.purchase_history": 5, "user.demographic": 4}
MAPPING = Mapping.parse(
    {
        "pii": {"email": "email", "phone": "phone", "name": "name"},
        "columns": {"amount": "user.behavior.purchase_history", "age_band": "user.demographic"},
    }
)
PSEUDONYMS = Pseudonymizer(PepperRing({1: os.urandom(32)}, 1))
DIDS = DidWeb("ledger.example")


def subject(email: str) -> bytes:
    return bytes(PSEUDONYMS.subject(PII(email=normalize_email(email))))


@dataclass
class MemoryLog:
    """An access log that refuses the subjects in `refuse` and records the order of events and the
    size of each batch sent. Like geth's, Besu's and Nethermind's pools, it takes no transaction whose
    call data passes `MAX_TX_DATA_BYTES`."""

    refuse: set[bytes] = field(default_factory=set)
    fail: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)
    final: set[bytes] = field(default_factory=set)  # subjects whose entry is final
    permitted: set[bytes] = field(default_factory=set)
    entries: list[Access] = field(default_factory=list)
    _sent: dict[str, list[Access]] = field(default_factory=dict)
    _settled: dict[str, list[tuple[bytes, bool]]] = field(default_factory=dict)  # verdicts per transaction
    sizes: list[tuple[int, int]] = field(default_factory=list)  # per batch sent: (entries, call data bytes)

    def submit(self, entries: list[Access]) -> str:
        # `record`'s call data: selector, partner, purpose, request id, the array's offset and length, entries.
        data = len(RECORD_SELECTOR) + 5 * 32 + len(encode_entries(entries))
        if data > MAX_TX_DATA_BYTES:
            raise TransactionFailed(f"oversized data: transaction size {data}, limit 131072", tx_hash="0x")
        self.sizes.append((len(entries), data))
        tx = f"0x{len(self._sent):064x}"
        self._sent[tx] = entries
        self.calls.append(("submit", tx))
        return tx

    def settle(self, tx_hash: str, entries: list[Access]) -> tuple[Receipt, AccessBatch]:
        self.calls.append(("settle", tx_hash))
        if self.fail:
            raise TransactionFailed("reverted", tx_hash=tx_hash)
        refused = [i for i, e in enumerate(entries) if e.subject in self.refuse]
        denied = sum(1 << i for i in refused).to_bytes(len(entries) // 8 + 1, "little")
        batch = AccessBatch(
            first_index=len(self.entries), partner=entries[0].partner, purpose=entries[0].purpose,
            request_id=entries[0].request_id, previous_head=bytes(32), head=bytes(32),
            encoded_entries=encode_entries(entries), denied=denied,
            block_number=1, block_hash="0x" + "00" * 32, log_index=0, tx_hash=tx_hash,
        )  # fmt: skip
        self.entries.extend(entries)
        receipt = Receipt(tx_hash, 1, 10 + len(self._settled), "0x" + "00" * 32, 0, None, [])  # a block each
        self._settled[tx_hash] = [(e.subject, i not in refused) for i, e in enumerate(entries)]
        return receipt, batch

    def wait_final(self, receipt: Receipt, confirmations: int) -> None:
        self.calls.append(("final", receipt.tx_hash))
        verdicts = self._settled[receipt.tx_hash]
        self.final |= {subject for subject, _ in verdicts}
        self.permitted |= {subject for subject, permitted in verdicts if permitted}


def crm_rows(n_people: int, orders_each: int) -> pa.Table:
    rows = []
    for k in range(orders_each):
        for p in range(n_people):
            rows.append(
                {"email": f"Person{p}@Example.com", "phone": f"+44 7400 {p:06d}", "name": f"Person {p}",
                 "amount": float(p * 10 + k), "age_band": "25-34", "secret_notes": "do not release"}
            )  # fmt: skip
    return pa.Table.from_pylist(rows)


def run(
    log: MemoryLog, table: pa.Table, permissions: dict[bytes, int], chunk: int = 7
) -> tuple[list[pa.RecordBatch], ExportStats]:
    bridge = Bridge(PSEUDONYMS, DIDS, log, pipeline_depth=2)
    export = Export(
        bridge, table.to_batches(max_chunksize=chunk), MAPPING, partner="0x" + "11" * 20, purpose=bytes(32),
        purpose_key="analytics.reporting", attribute_bits=BITS, permissions=permissions,
    )  # fmt: skip
    released = []
    for batch in export:
        # Log, then release: every DID in a released batch has a final, permitted entry already.
        for did in batch.column(DID_COLUMN).to_pylist():
            s = bytes(DIDS.subject(did))
            assert s in log.final
            assert s in log.permitted
        released.append(batch)
    return released, export.stats


def test_only_permitted_rows_and_cells_are_released_after_their_entry_is_final() -> None:
    purchases, demographic = 1 << 5, 1 << 4
    permissions = {subject("person0@example.com"): purchases | demographic, subject("person1@example.com"): purchases}
    log = MemoryLog()
    released, stats = run(log, crm_rows(5, 6), permissions)
    table = pa.Table.from_batches(released)
    assert table.column_names == [DID_COLUMN, "amount", "age_band"]  # no PII, nothing unmapped
    rows = table.to_pylist()
    assert len(rows) == 12
    by_did = {DIDS.did(Subject(s)): bits for s, bits in permissions.items()}
    for row in rows:
        assert row["amount"] is not None
        assert (row["age_band"] is not None) == bool(by_did[row[DID_COLUMN]] & demographic)
    # One entry per customer per export, though each appears in several chunks.
    assert sorted(e.subject for e in log.entries) == sorted(permissions)
    assert stats.entries_recorded == 2
    assert stats.rows_not_permitted == 18
    # Pipelined: a later chunk's batch may be sent before an earlier one settles, never released before.
    kinds = [k for k, _ in log.calls]
    assert kinds.index("submit") < kinds.index("settle") < kinds.index("final")


def test_a_release_says_what_it_carries_through_to_its_parquet_file(tmp_path: Path) -> None:
    bridge = Bridge(PSEUDONYMS, DIDS, MemoryLog())
    permissions = {subject("person0@example.com"): 1 << 5}
    export = Export(
        bridge, crm_rows(3, 2).to_batches(max_chunksize=2), MAPPING, partner="0x" + "11" * 20, purpose=bytes(32),
        purpose_key="analytics.reporting", attribute_bits=BITS, permissions=permissions, partner_name="Acme Retail",
    )  # fmt: skip
    stats = export.to_parquet(tmp_path / "out.parquet")
    info = ReleaseInfo.of(pq.read_schema(tmp_path / "out.parquet"))
    assert info == ReleaseInfo(
        partner="0x" + "11" * 20,
        partner_name="Acme Retail",  # a report names the partner by it
        purpose="analytics.reporting",
        request_id=stats.request_id,
        columns={"amount": "user.behavior.purchase_history", "age_band": "user.demographic"},
    )
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 2
    # An export that releases nothing still says what it is.
    empty = Export(
        bridge, crm_rows(1, 1).to_batches(), MAPPING, partner="0x" + "11" * 20, purpose=bytes(32),
        purpose_key="analytics.reporting", attribute_bits=BITS, permissions={},
    )  # fmt: skip
    assert ReleaseInfo.of(empty.to_table().schema) == empty.release
    assert ReleaseInfo.of(pa.schema([("did", pa.string())])) is None


@dataclass
class Checkpoints:
    """Stands in for `ledger.anvil.Checkpoints.wait`: which blocks were made durable, and when."""

    log: MemoryLog
    fail: bool = False
    durable: int = -1
    waits: list[int] = field(default_factory=list)

    def wait(self, block: int) -> None:
        self.waits.append(block)
        self.log.calls.append(("durable", str(block)))
        time.sleep(0.05)  # a dump of the node
        if self.fail:
            raise NotDurable(f"no checkpoint holds block {block}")
        self.durable = max(self.durable, block)


def _durable_export(log: MemoryLog, checkpoints: Checkpoints) -> Export:
    permissions = {subject(f"person{p}@example.com"): 1 << 5 for p in range(4)}
    return Export(
        Bridge(PSEUDONYMS, DIDS, log, pipeline_depth=2, durable=checkpoints.wait),
        crm_rows(4, 3).to_batches(max_chunksize=2), MAPPING, partner="0x" + "11" * 20, purpose=bytes(32),
        purpose_key="analytics.reporting", attribute_bits=BITS, permissions=permissions,
    )  # fmt: skip


def test_a_release_waits_until_a_crash_of_the_node_cannot_lose_its_access_record(tmp_path: Path) -> None:
    # Iterating: each chunk once a checkpoint holds its record's block, and after that the record is
    # checked again (a crash before the checkpoint would have put another block at that number).
    log = MemoryLog()
    checkpoints = Checkpoints(log)
    export = _durable_export(log, checkpoints)
    for batch in export:
        for did in batch.column(DID_COLUMN).to_pylist():
            s = bytes(DIDS.subject(did))
            settled = next(tx for tx, verdicts in log._settled.items() if any(v[0] == s for v in verdicts))
            assert int(settled, 16) + 10 <= checkpoints.durable
    assert len(checkpoints.waits) == len(log._settled) == 2  # one record per chunk with new subjects
    kinds = [kind for kind, _ in log.calls]
    assert kinds.count("final") == 4
    assert "final" in kinds[kinds.index("durable") :]  # checked again after the wait
    # The file sink waits once, for the newest block, before the file appears.
    log = MemoryLog()
    checkpoints = Checkpoints(log)
    out = tmp_path / "out.parquet"
    stats = _durable_export(log, checkpoints).to_parquet(out)
    assert checkpoints.waits == [10 + len(log._settled) - 1]
    assert stats.seconds >= stats.durable_wait_seconds >= 0.05  # said apart, `bridge export` prints it
    assert stats.rows_released == 12
    assert out.exists()
    assert [kind for kind, _ in log.calls][-3:] == ["durable", "final", "final"]  # each record checked again
    # No checkpoint: nothing appears, and the export says why.
    log = MemoryLog()
    with pytest.raises(AccessRefused, match="did not become durable"):
        _durable_export(log, Checkpoints(log, fail=True)).to_parquet(out := tmp_path / "never.parquet")
    assert not out.exists()
    assert not list(tmp_path.glob("never.parquet*"))
    with pytest.raises(AccessRefused, match="no checkpoint holds"):
        list(_durable_export(log := MemoryLog(), Checkpoints(log, fail=True)))


def test_a_subject_the_chain_refuses_is_never_released_in_any_chunk() -> None:
    refused = subject("person1@example.com")
    permissions = {subject(f"person{p}@example.com"): 1 << 5 for p in range(3)}
    log = MemoryLog(refuse={refused})
    released, stats = run(log, crm_rows(3, 5), permissions, chunk=2)
    dids = {d for b in released for d in b.column(DID_COLUMN).to_pylist()}
    assert DIDS.did(Subject(refused)) not in dids
    assert len(dids) == 2
    assert stats.entries_refused == 1
    assert stats.rows_refused_on_chain == 5


def test_a_chunk_with_more_new_subjects_than_one_transaction_holds_is_recorded_in_several() -> None:
    """A chunk's entries go out in as many transactions as their call data needs, in order; its rows
    are released once all of them are final and durable, and an entry refused in a later one withholds
    its own subject's rows, not those of the subject at that position in the first."""
    people = 5_000  # one chunk; one in ten has no consent
    permissions = {subject(f"person{p}@example.com"): 1 << 5 for p in range(people) if p % 10 != 3}
    order = [subject(f"person{p}@example.com") for p in range(people) if p % 10 != 3]  # as first met
    limit = max_record_entries()
    assert len(order) > 2 * limit  # three transactions
    refused = {order[5], order[limit + 7], order[2 * limit + 1], order[-1]}  # in each part, and the last
    log = MemoryLog(refuse=refused)
    checkpoints = Checkpoints(log)
    export = Export(
        Bridge(PSEUDONYMS, DIDS, log, pipeline_depth=2, durable=checkpoints.wait),
        crm_rows(people, 1).to_batches(max_chunksize=people), MAPPING, partner="0x" + "11" * 20,
        purpose=bytes(32), purpose_key="analytics.reporting", attribute_bits=BITS, permissions=permissions,
    )  # fmt: skip
    released: list[bytes] = []
    for batch in export:
        # Only once every transaction of the chunk is final and a checkpoint holds the newest block.
        assert len(log._settled) == 3
        assert checkpoints.durable == 12
        released.extend(bytes(DIDS.subject(did)) for did in batch.column(DID_COLUMN).to_pylist())
    assert [count for count, _ in log.sizes] == [limit, limit, len(order) - 2 * limit]
    assert all(data <= MAX_TX_DATA_BYTES for _, data in log.sizes)
    assert [e.subject for e in log.entries] == order  # each subject once, in order across the parts
    assert sorted(released) == sorted(s for s in order if s not in refused)
    stats = export.stats
    assert stats.transactions == [f"0x{n:064x}" for n in range(3)]
    assert (stats.entries_recorded, stats.entries_refused) == (len(order), 4)
    assert (stats.rows_released, stats.rows_refused_on_chain) == (len(order) - 4, 4)
    assert stats.rows_not_permitted == people - len(order)
    assert stats.subjects_released == len(order) - 4
    assert checkpoints.waits == [12]  # one wait, for the chunk's newest block


def test_a_batch_the_log_did_not_record_stops_the_export_unreleased() -> None:
    log = MemoryLog(fail=True)
    bridge = Bridge(PSEUDONYMS, DIDS, log)
    export = Export(
        bridge, crm_rows(2, 2).to_batches(), MAPPING, partner="0x" + "11" * 20, purpose=bytes(32),
        purpose_key="p", attribute_bits=BITS, permissions={subject("person0@example.com"): 1 << 5},
    )  # fmt: skip
    with pytest.raises(AccessRefused):
        list(export)
    assert export.stats.rows_released == 0


def test_rows_without_a_valid_identifier_are_counted_not_released() -> None:
    table = pa.Table.from_pylist(
        [{"email": "not-an-address", "phone": None, "name": "X", "amount": 1.0, "age_band": "x"},
         {"email": None, "phone": "+44 7400 000009", "name": "Y", "amount": 2.0, "age_band": "y"}]
    )  # fmt: skip
    by_phone = bytes(PSEUDONYMS.subject(PII(phone="+447400000009")))
    released, stats = run(MemoryLog(), table, {by_phone: 1 << 5})
    assert [r["amount"] for b in released for r in b.to_pylist()] == [2.0]
    assert stats.rows_unidentified == 1


def test_an_identifier_is_an_email_address_else_a_phone_number_in_every_chunk() -> None:
    """As at enrolment: a blank e-mail cell falls back to the phone; an e-mail address that does not
    normalise does not (the row has no subject). Each spelling gives the same answer in every chunk
    it appears in, looked up or first met."""
    person = {"name": "Z", "amount": 1.0, "age_band": "x"}
    rows = [
        {**person, "email": "  ", "phone": "+44 7400 000009"},  # blank: the phone decides
        {**person, "email": "not-an-address", "phone": "+44 7400 000008"},  # invalid: no fallback
        {**person, "email": " Person3@EXAMPLE.com ", "phone": "+44 7400 000007"},  # the e-mail decides
        {**person, "email": None, "phone": "+447400000009"},  # another spelling of the same number
    ]
    table = pa.Table.from_pylist(rows * 3)  # chunk=2: every spelling again in later chunks
    by_phone = {n: bytes(PSEUDONYMS.subject(PII(phone=f"+4474000000{n:02d}"))) for n in (7, 8, 9)}
    by_email = subject("person3@example.com")
    permissions = {by_phone[9]: 1 << 5, by_phone[8]: 1 << 5, by_phone[7]: 1 << 5, by_email: 1 << 5}
    released, stats = run(MemoryLog(), table, permissions, chunk=2)
    dids = [d for b in released for d in b.column(DID_COLUMN).to_pylist()]
    assert sorted(dids) == sorted([DIDS.did(Subject(by_phone[9]))] * 6 + [DIDS.did(Subject(by_email))] * 3)
    assert stats.rows_unidentified == 3


def test_a_chunk_is_released_once_its_entries_are_final_not_when_the_pipeline_fills() -> None:
    log = MemoryLog()
    permissions = {subject(f"person{p}@example.com"): 1 << 5 for p in range(8)}
    read: list[int] = []

    def source() -> Iterator[pa.RecordBatch]:
        for n, batch in enumerate(crm_rows(8, 1).to_batches(max_chunksize=2)):
            if n == 1:  # let the first chunk's batch become final before the second is read
                deadline = time.monotonic() + 30
                while subject("person1@example.com") not in log.final and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.2)
            read.append(n)
            yield batch

    bridge = Bridge(PSEUDONYMS, DIDS, log, pipeline_depth=8)  # deep enough to hold every chunk
    export = Export(
        bridge, source(), MAPPING, partner="0x" + "11" * 20, purpose=bytes(32),
        purpose_key="analytics.reporting", attribute_bits=BITS, permissions=permissions,
    )  # fmt: skip
    batches = iter(export)
    first = next(batches)
    assert read in ([0], [0, 1])  # released with at most two of four chunks read, not once all were in flight
    assert set(first.column(DID_COLUMN).to_pylist()) == {
        DIDS.did(Subject(subject(f"person{p}@example.com"))) for p in range(2)
    }
    assert sum(b.num_rows for b in batches) == 6
    assert read == [0, 1, 2, 3]


def test_a_batch_the_node_would_not_take_stops_the_export_with_its_own_error() -> None:
    class Refusing(MemoryLog):
        def submit(self, entries: list[Access]) -> str:
            raise TransactionFailed("the node refused the transaction", tx_hash="0x")

    bridge = Bridge(PSEUDONYMS, DIDS, Refusing())
    export = Export(
        bridge, crm_rows(2, 2).to_batches(), MAPPING, partner="0x" + "11" * 20, purpose=bytes(32),
        purpose_key="p", attribute_bits=BITS, permissions={subject("person0@example.com"): 1 << 5},
    )  # fmt: skip
    with pytest.raises(TransactionFailed, match="refused the transaction"):
        list(export)
    assert export.stats.rows_released == 0


def test_attributes_anywhere_in_the_registrys_bits_are_released() -> None:
    """The bridge takes every attribute bit a consent can hold (ATTRIBUTE_BITS, as the API does), not
    only the 63 of an int64: a category registered late has a high bit."""
    high = {"user.behavior.purchase_history": ATTRIBUTE_BITS - 1, "user.demographic": 100}
    purchases, demographic = 1 << (ATTRIBUTE_BITS - 1), 1 << 100
    permissions = {
        subject("person0@example.com"): purchases | demographic | 1 << 7,  # and a bit the export does not ask for
        subject("person1@example.com"): purchases,
    }
    log = MemoryLog()
    bridge = Bridge(PSEUDONYMS, DIDS, log, pipeline_depth=2)
    export = Export(
        bridge, crm_rows(3, 2).to_batches(max_chunksize=4), MAPPING, partner="0x" + "11" * 20, purpose=bytes(32),
        purpose_key="analytics.reporting", attribute_bits=high, permissions=permissions,
    )  # fmt: skip
    rows = pa.Table.from_batches(list(export)).to_pylist()
    assert len(rows) == 4
    person0, person1 = (DIDS.did(Subject(s)) for s in permissions)
    assert {r[DID_COLUMN] for r in rows if r["age_band"] is not None} == {person0}
    assert {r[DID_COLUMN] for r in rows if r["amount"] is not None} == {person0, person1}
    # The log records what was released, as registry bits.
    assert {e.subject: e.attributes for e in log.entries} == {
        subject("person0@example.com"): purchases | demographic,
        subject("person1@example.com"): purchases,
    }


def test_mapping_errors_are_clear() -> None:
    with pytest.raises(MappingError, match="PII columns cannot be released: email"):
        Mapping.parse({"pii": {"email": "email"}, "columns": {"email": "user.contact.email"}})
    with pytest.raises(MappingError, match="email or a phone"):
        Mapping.parse({"pii": {"name": "name"}, "columns": {}})
    with pytest.raises(MappingError, match="colums: Extra inputs are not permitted"):
        Mapping.parse({"pii": {"email": "e"}, "columns": {}, "colums": {}})
    bridge = Bridge(PSEUDONYMS, DIDS, MemoryLog())
    with pytest.raises(MappingError, match=r"not attribute categories of the registry: user\.nope"):
        Export(bridge, [], Mapping.parse({"pii": {"email": "e"}, "columns": {"a": "user.nope"}}), partner="0x",
                      purpose=bytes(32), purpose_key="p", attribute_bits=BITS, permissions={})  # fmt: skip
    export = Export(
        bridge, crm_rows(1, 1).drop_columns(["age_band"]).to_batches(), MAPPING, partner="0x", purpose=bytes(32),
        purpose_key="p", attribute_bits=BITS, permissions={},
    )  # fmt: skip
    with pytest.raises(MappingError, match="the input has no column age_band"):
        list(export)


def test_sources_stream_csv_and_database_tables_in_chunks(tmp_path: Path) -> None:
    table = crm_rows(50, 40)  # 2,000 rows
    pacsv.write_csv(table, tmp_path / "crm.csv")
    batches = list(read_csv(tmp_path / "crm.csv", chunk_rows=300, block_bytes=4_096, text_columns=("phone",)))
    assert len(batches) == 7  # streamed, not read whole: 6 of at least 300 rows, and the rest
    assert all(b.num_rows >= 300 for b in batches[:-1])
    assert sum(b.num_rows for b in batches) == 2_000
    assert batches[0].schema.field("phone").type == pa.string()
    engine = create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    table.to_pandas().to_sql("orders", engine, index=False)
    engine.dispose()
    from_db = list(read_source(f"sqlite:///{tmp_path / 'crm.db'}", table="orders"))
    assert sum(b.num_rows for b in from_db) == 2_000
    assert from_db[0].column("email")[0].as_py() == "Person0@Example.com"
    with pytest.raises(SourceError, match="no readable table 'nope'"):
        list(read_source(f"sqlite:///{tmp_path / 'crm.db'}", table="nope"))
    with pytest.raises(SourceError, match="needs the table"):
        read_source(f"sqlite:///{tmp_path / 'crm.db'}")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3\n", encoding="utf-8")
    with pytest.raises(SourceError, match="does not parse"):
        list(read_csv(tmp_path / "bad.csv"))


def test_an_export_reads_only_the_identifiers_and_the_columns_it_may_release(tmp_path: Path) -> None:
    assert MAPPING.read_columns() == ("email", "phone", "amount", "age_band")  # never the name
    table = crm_rows(5, 2)
    pacsv.write_csv(table, tmp_path / "crm.csv")
    engine = create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    table.to_pandas().to_sql("orders", engine, index=False)
    engine.dispose()
    wanted = {*MAPPING.read_columns(), "not_in_the_file"}
    for source, table_name in ((str(tmp_path / "crm.csv"), None), (f"sqlite:///{tmp_path / 'crm.db'}", "orders")):
        batches = list(read_source(source, table=table_name, text_columns=("phone",), columns=wanted))
        # In the source's order; the name and the notes are never parsed, an unknown name is skipped.
        assert [b.schema.names for b in batches] == [["email", "phone", "amount", "age_band"]]
        assert batches[0].num_rows == 10
    # A source with none of them still reaches the mapping check, which names what is missing
    # (an empty column list would make Arrow read every column).
    (tmp_path / "other.csv").write_text("x,y\n1,2\n", encoding="utf-8")
    export = Export(
        Bridge(PSEUDONYMS, DIDS, MemoryLog()), read_csv(tmp_path / "other.csv", columns=MAPPING.read_columns()),
        MAPPING, partner="0x", purpose=bytes(32), purpose_key="p", attribute_bits=BITS, permissions={},
    )  # fmt: skip
    with pytest.raises(MappingError, match="the input has no column age_band, amount, email, phone"):
        list(export)
    # A CRM export without the name column is complete for the bridge.
    permissions = {subject("person1@example.com"): 1 << 5}
    _, stats = run(MemoryLog(), table.drop_columns(["name"]), permissions)
    assert stats.rows_released == 2


def test_the_parquet_file_encodes_the_did_as_a_dictionary_and_keeps_statistics_of_non_text_columns(
    tmp_path: Path,
) -> None:
    table = crm_rows(40, 5).append_column("note", pa.array([f"free text {i}" for i in range(200)]))
    mapping = Mapping.parse(
        {
            "pii": {"email": "email"},
            "columns": {"amount": "user.behavior.purchase_history", "age_band": "user.demographic",
                        "note": "user.behavior.purchase_history"},
        }
    )  # fmt: skip
    permissions = {subject(f"person{p}@example.com"): 1 << 5 | 1 << 4 for p in range(40)}
    export = Export(
        Bridge(PSEUDONYMS, DIDS, MemoryLog()), table.to_batches(max_chunksize=100), mapping, partner="0x",
        purpose=bytes(32), purpose_key="p", attribute_bits=BITS, permissions=permissions,
    )  # fmt: skip
    export.to_parquet(tmp_path / "out.parquet")
    meta = pq.ParquetFile(tmp_path / "out.parquet").metadata
    chunks = {meta.schema.column(i).name: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    dictionary = {name for name, c in chunks.items() if "RLE_DICTIONARY" in c.encodings}
    assert dictionary == {"did", "age_band"}  # a customer's rows repeat the DID; "note" is all distinct
    assert {name for name, c in chunks.items() if c.is_stats_set} == {"amount"}
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 200


def test_a_registry_bit_past_what_a_consent_holds_is_refused() -> None:
    """The bridge's mapping is bound by the one limit (`ledger.types.ATTRIBUTE_BITS`), as the API is."""
    bridge = Bridge(PSEUDONYMS, DIDS, MemoryLog())
    for bit in (ATTRIBUTE_BITS, -1):
        with pytest.raises(MappingError, match=f"attribute bits are 0 to {ATTRIBUTE_BITS - 1}"):
            Export(bridge, [], MAPPING, partner="0x", purpose=bytes(32), purpose_key="p",
                   attribute_bits={**BITS, "user.demographic": bit}, permissions={})  # fmt: skip
