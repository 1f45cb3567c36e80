"""Reading a CRM export in chunks: CSV files (Arrow's streaming CSV reader) and any table SQLAlchemy
can reach (server-side cursor where the driver has one). Memory is bounded by the chunk, not the export."""

from __future__ import annotations

import csv
from collections.abc import Collection, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
from sqlalchemy import MetaData, Table, create_engine, select
from sqlalchemy.exc import SQLAlchemyError

from crm_bridge.errors import SourceError

DEFAULT_CHUNK_ROWS = 65_536


def is_database_url(value: str) -> bool:
    return "://" in value


def read_csv(
    path: Path,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    block_bytes: int = 1 << 20,
    text_columns: tuple[str, ...] = (),
    columns: Collection[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Batches of about `chunk_rows` rows of a CSV file (header row first). `text_columns` are read as
    text whatever they look like (phone numbers must keep their leading zeros and plus signs). With
    `columns`, only those of them that the file has are parsed (in the file's order); the caller
    checks that none it needs is missing.

    Arrow's streaming reader parses a fixed number of blocks ahead of the consumer, so memory is
    bounded by `block_bytes` (small) rather than by the file; blocks are joined into batches of
    `chunk_rows` because each batch the bridge processes costs a round of transactions."""
    try:
        include = [] if columns is None else [c for c in _header(path) if c in columns]
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=block_bytes),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(text_columns, pa.string()), include_columns=include
            ),
        )
    except pa.ArrowInvalid as exc:  # its message quotes the row, which may be PII
        raise SourceError(f"{path}: a row does not parse as CSV") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from exc
    if columns is not None and not include:  # (an empty list would make Arrow read every column)
        yield pa.RecordBatch.from_pydict({})  # so that the caller's check names what is missing
        return
    pending: list[pa.RecordBatch] = []
    rows = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as exc:
            raise SourceError(f"{path}: a row does not parse as CSV (or its type changed mid-file)") from exc
        pending.append(batch)
        rows += batch.num_rows
        if rows >= chunk_rows:
            yield _joined(pending)
            pending, rows = [], 0
    if rows:
        yield _joined(pending)


def _header(path: Path) -> list[str]:
    """The column names of a CSV file (its first record, with Arrow's default CSV dialect)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        try:
            return next(csv.reader(handle))
        except StopIteration:
            return []
        except (csv.Error, UnicodeDecodeError) as exc:
            raise pa.ArrowInvalid("the header row does not parse") from exc


def _joined(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def read_table(
    url: str, table: str, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, columns: Collection[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Batches of a database table, streamed with a server-side cursor where the driver has one; with
    `columns`, only those of them that the table has are selected."""
    try:
        engine = create_engine(url)
    except (SQLAlchemyError, ValueError) as exc:
        raise SourceError(f"not a database URL SQLAlchemy can use: {exc.__class__.__name__}") from exc
    try:
        with engine.connect() as connection:
            try:
                source = Table(table, MetaData(), autoload_with=connection)
            except SQLAlchemyError as exc:
                raise SourceError(f"the database has no readable table {table!r}") from exc
            selected = [c for c in source.columns if columns is None or c.name in columns]
            if not selected:
                yield pa.RecordBatch.from_pydict({})  # the caller's check names what is missing
                return
            result = connection.execution_options(stream_results=True, yield_per=chunk_rows).execute(select(*selected))
            names = list(result.keys())
            for rows in result.partitions(chunk_rows):
                values = list(zip(*rows, strict=True)) if rows else [() for _ in names]
                yield pa.RecordBatch.from_arrays([pa.array(list(v)) for v in values], names=names)
    except SQLAlchemyError as exc:
        raise SourceError(f"reading table {table!r} failed: {exc.__class__.__name__}") from exc
    finally:
        engine.dispose()


def read_source(
    source: str | Path,
    *,
    table: str | None = None,
    text_columns: tuple[str, ...] = (),
    columns: Collection[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """A CSV path or a database URL (with `table`)."""
    if isinstance(source, str) and is_database_url(source):
        if not table:
            raise SourceError("a database input needs the table to read (--table)")
        return read_table(source, table, columns=columns)
    return read_csv(Path(source), text_columns=text_columns, columns=columns)
