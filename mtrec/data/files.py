"""Training on the user's own Parquet or CSV files, streamed, described by a schema (:mod:`mtrec.data.schema`).

``mtrec-train data=files data.train='DIR/train/*.parquet' data.val=... data.test=... data.schema=S.yaml``:
:func:`load_files` returns a :class:`~mtrec.data.batch.DataBundle` whose splits are :class:`FileDataset` s. Nothing
is loaded into memory beyond a chunk and the shuffle buffer:

* one streaming statistics pass over the train files (progress bar) fits what the schema asks for: mean/std of
  ``standardize`` columns, vocabularies, and the row counts of CSV files (Parquet's are in the footers);
* a :class:`FileDataset` reads *units*, a Parquet row group or a whole CSV file (read in blocks with
  ``pyarrow.csv.open_csv``, plain or ``.gz``), and turns each chunk into column tensors with numpy/pyarrow ops;
* training order: each epoch shuffles the units (seeded by ``(seed, epoch)``), and rows pass through a bounded
  shuffle buffer: once it holds ``1.5 * shuffle_buffer`` rows it is permuted and all but ``shuffle_buffer`` rows go
  out as batches (memory: that plus one chunk). With ``num_workers`` DataLoader workers (and ``torch.distributed``
  ranks), shard ``rank * num_workers + worker`` reads units ``shard, shard + shards, ...``: every row once per
  epoch, none twice; each shard ends with its own partial batch. Val/test are read unshuffled (in file order with
  ``num_workers=0``; with workers, their batches interleave, labels staying with their rows);
* the order depends on ``(seed, epoch, num_workers, world size)`` only, so a resumed run that skips the first
  ``start`` batches (by reading them again, the cost of exactness) sees what an uninterrupted run saw;
* one glob split three ways (``load_files(train=GLOB, split=[0.7, 0.15, 0.15], seed=S)``, :func:`split_parts`):
  each file's rows are cut into blocks of :data:`SPLIT_BLOCK` consecutive rows, each block's rows are ranked by a
  seeded hash of (seed, the file's position in the glob, the row's index in the file), and the lowest ranked go to
  train, the next to val, the rest to test, in counts that make each file's parts exactly ``round(f * rows)``
  (cumulative). Every row is in exactly one part; a part is found while streaming, a chunk at a time, whatever
  the row groups or CSV blocks; the same seed gives the same parts. With a ``test`` glob as well, the train glob is
  split into train and val only (``split[0] : split[1]``).

Bad input is a :class:`~mtrec.data.errors.DataError` (a ``ValueError``) naming the file and what to fix: a glob
that matches nothing, a missing column, a type that does not fit its role, a corrupt Parquet file, a null label.
"""

from __future__ import annotations

import glob as globlib
import gzip
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from mtrec.data.batch import Batch, DataBundle, TabularDataset, build_kjt
from mtrec.data.encoding import FILES_SOURCE
from mtrec.data.errors import DataError, InputNotFoundError
from mtrec.data.schema import (
    HASHING,
    LabelColumn,
    LabelValueError,
    Moments,
    Schema,
    SparseColumn,
    Vocabulary,
    clean_text,
    count_keys,
    dense_inputs,
    derive_label,
    load_schema,
    sparse_ids,
)

__all__ = [
    "FILES_SOURCE",
    "SPLIT_BLOCK",
    "FileDataset",
    "Part",
    "Unit",
    "expand",
    "fit_statistics",
    "load_files",
    "one_file",
    "read_chunks",
    "read_units",
    "split_parts",
    "split_summary",
]

log = logging.getLogger("mtrec.data.files")
_PARQUET = (".parquet", ".pq")
_CSV = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
#: The text read per block of a CSV file with a ``csv`` entry (its values are converted a block at a time).
_CSV_BLOCK_BYTES = 1 << 24


#: Rows per block of a split file (:func:`split_parts`): each block's rows are shared out in the split's fractions.
SPLIT_BLOCK = 1024


@dataclass(frozen=True)
class Part:
    """One part (0 train, 1 val, 2 test) of a seeded split of a file's rows (:func:`split_parts`)."""

    which: int
    bounds: tuple[float, float]  # the cumulative fractions: train below the first, val below the second
    seed: int
    file_index: int  # the file's position in the glob
    file_rows: int
    start: int  # the unit's first row in the file

    def mask(self, offset: int, n: int) -> np.ndarray:
        """Which of the unit's rows ``offset .. offset + n - 1`` are in this part."""
        a = self.start + offset
        return split_parts(self.seed, self.file_index, self.file_rows, self.bounds, a, a + n) == self.which

    def count(self, n: int) -> int:
        """The rows of a unit of ``n`` rows in this part (whole blocks by their counts, only the edges hashed)."""
        a, b = self.start, self.start + n
        first, last = -(-a // SPLIT_BLOCK), b // SPLIT_BLOCK  # the blocks that lie inside [a, b)
        if b == self.file_rows:
            last = -(-b // SPLIT_BLOCK)
        if first >= last:
            return int(self.mask(0, n).sum())
        starts = np.arange(first, last, dtype=np.int64) * SPLIT_BLOCK
        ends = np.minimum(starts + SPLIT_BLOCK, self.file_rows)
        inside = int(_part_sizes(starts, ends, self.bounds)[self.which].sum())
        head = int(self.mask(0, first * SPLIT_BLOCK - a).sum())
        tail_start = int(ends[-1])
        tail = int(self.mask(tail_start - a, b - tail_start).sum()) if b > tail_start else 0
        return inside + head + tail


@dataclass(frozen=True)
class Unit:
    """What one reader takes at a time: a Parquet row group, or a whole CSV file (``row_group`` None); with
    ``part``, only the unit's rows in that part of a split (``num_rows`` counts those)."""

    path: str
    row_group: int | None
    num_rows: int
    part: Part | None = None


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 values (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _part_sizes(starts: np.ndarray, ends: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """``[3, blocks]``: the rows of each block ``[start, end)`` in train, val and test, from the cumulative counts
    ``round(bound * row)``, so the blocks of a file add up to exactly ``round(bound * rows)``."""

    def cum(bound: float, x: np.ndarray) -> np.ndarray:
        return np.floor(bound * x + 0.5).astype(np.int64)

    train = cum(bounds[0], ends) - cum(bounds[0], starts)
    train_val = cum(bounds[1], ends) - cum(bounds[1], starts)
    return np.stack([train, train_val - train, (ends - starts) - train_val])


def split_parts(
    seed: int, file_index: int, file_rows: int, bounds: tuple[float, float], start: int, stop: int
) -> np.ndarray:
    """int8 part (0 train, 1 val, 2 test) of the rows ``start .. stop - 1`` of a file of ``file_rows`` rows.

    The rows of each block of :data:`SPLIT_BLOCK` are ranked by ``splitmix64(row + splitmix64(seed, file_index))``;
    the lowest ``n_train`` go to train, the next ``n_val`` to val (:func:`_part_sizes`). Computed from the block(s)
    covering the rows only, so a chunk is split without reading the rest of its file.
    """
    lo = start // SPLIT_BLOCK * SPLIT_BLOCK
    hi = min(-(-stop // SPLIT_BLOCK) * SPLIT_BLOCK, file_rows)
    if stop <= start:
        return np.zeros(0, dtype=np.int8)
    rows = np.arange(lo, hi, dtype=np.uint64)
    salt = _mix(np.array([(seed & (2**64 - 1)) ^ (file_index * 0x9E3779B97F4A7C15 % 2**64)], dtype=np.uint64))
    key = _mix(rows + salt)
    block = (rows // np.uint64(SPLIT_BLOCK)).astype(np.int64)
    order = np.lexsort((key, block))
    first = block * SPLIT_BLOCK - lo  # where each row's block begins among these rows
    rank = np.empty(len(rows), dtype=np.int64)
    rank[order] = np.arange(len(rows)) - first[order]
    blocks = np.arange(block[0], block[-1] + 1, dtype=np.int64)
    sizes = _part_sizes(blocks * SPLIT_BLOCK, np.minimum((blocks + 1) * SPLIT_BLOCK, file_rows), bounds)
    n_train, n_val = sizes[0][block - block[0]], sizes[1][block - block[0]]
    part = (rank >= n_train).astype(np.int8) + (rank >= n_train + n_val).astype(np.int8)
    return part[start - lo : stop - lo]


# ---------------------------------------------------------------------------------------------- files


def _kind(path: str, schema: Schema | None = None) -> str:
    """``parquet`` or ``csv`` by the name; with the schema's ``csv`` entry any file not named Parquet is CSV."""
    name = path.lower()
    if name.endswith(_PARQUET):
        return "parquet"
    if name.endswith(_CSV) or (schema is not None and schema.csv is not None):
        return "csv"
    raise DataError(path, f"not a Parquet ({', '.join(_PARQUET)}) or CSV ({', '.join(_CSV)}) file")


def expand(pattern: str | Sequence[str] | None, where: str) -> list[str]:
    """The sorted files a glob (or a list of globs) names.

    Raises:
        InputNotFoundError: no glob given, or one matches nothing (naming the glob and ``where`` it was given:
            ``config key data.train``).
    """
    if not pattern:
        raise InputNotFoundError(f"{where}: give a glob of Parquet or CSV files (e.g. 'DIR/*.parquet')")
    patterns = [pattern] if isinstance(pattern, str) else [str(p) for p in pattern]
    paths: list[str] = []
    for p in patterns:
        found = sorted(globlib.glob(str(Path(p).expanduser()), recursive=True))
        found = [f for f in found if Path(f).is_file()]
        if not found:
            raise InputNotFoundError(f"{where}: the glob {p!r} matches no file")
        paths += found
    return paths


def _role(schema: Schema, name: str) -> str:
    for role, entries in (("dense", schema.dense), ("sparse", schema.sparse)):
        for i, e in enumerate(entries):
            if e.name == name:
                return f"schema {role}[{i}]"
    for i, label in enumerate(schema.labels):
        if name in label.sources:
            return f"schema labels[{i}]" if name == label.name else f"schema labels[{i}], label {label.name!r}"
    return "schema"


def _check_types(path: str, arrow_schema: pa.Schema, schema: Schema) -> None:
    """Every schema column is in the file, with a type that fits its role."""
    names = set(arrow_schema.names)
    for name in schema.columns:
        if name not in names:
            raise DataError(path, f"no column {name!r} ({_role(schema, name)}); the file has {sorted(names)}")
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal, pa.types.is_null)
    text = schema.text_columns
    for name in schema.columns:
        if name in text:
            continue
        t = arrow_schema.field(name).type
        if not any(f(t) for f in numeric):
            kind = "a list" if pa.types.is_list(t) or pa.types.is_large_list(t) else f"type {t}"
            raise DataError(path, f"column {name!r} ({_role(schema, name)}) holds {kind}; it needs numbers", field=name)
    for label in schema.labels:
        if label.is_text_rule:
            t = arrow_schema.field(label.sources[0]).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
                raise DataError(
                    path,
                    f"column {label.sources[0]!r} ({_role(schema, label.sources[0])}) has type {t}; a positive rule "
                    "compares text (strings or integers)",
                    field=label.sources[0],
                )
    for s in schema.sparse:
        t = arrow_schema.field(s.name).type
        is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
        if is_list and not s.is_list:
            raise DataError(
                path,
                f"column {s.name!r} ({_role(schema, s.name)}) holds a list where a scalar id is expected; "
                "give the entry max_len to read it as a list feature",
                field=s.name,
            )
        value = t.value_type if is_list else t
        if pa.types.is_dictionary(value):
            value = value.value_type
        ok = (pa.types.is_integer, pa.types.is_floating, pa.types.is_string, pa.types.is_large_string)
        if not any(f(value) for f in (*ok, pa.types.is_null)):
            raise DataError(
                path, f"column {s.name!r} ({_role(schema, s.name)}) has type {t}; ids are ints or strings", field=s.name
            )


def _csv_options(schema: Schema) -> pacsv.ConvertOptions:
    if schema.csv is not None:  # every column as text, converted by the schema's rules (clean_text, _floats)
        types = {name: pa.string() for name in schema.columns}
        return pacsv.ConvertOptions(
            column_types=types, include_columns=schema.columns, strings_can_be_null=False, null_values=[]
        )
    text = schema.text_columns
    types = {name: pa.string() if name in text else pa.float64() for name in schema.columns}
    return pacsv.ConvertOptions(column_types=types, include_columns=schema.columns, strings_can_be_null=True)


class _BadRows:
    """pyarrow's handler of a line with the wrong number of fields: it notes the first (then the read fails)."""

    def __init__(self) -> None:
        self.first: Any = None

    def __call__(self, row: Any) -> str:
        if self.first is None:
            self.first = row
        return "error"


def _delimiter(path: str, schema: Schema | None) -> str:
    if schema is not None and schema.csv is not None and schema.csv.delimiter is not None:
        return schema.csv.delimiter
    return "\t" if ".tsv" in path.lower() else ","


def _csv_reader(
    path: str, schema: Schema | None, *, header_only: bool = False, bad: _BadRows | None = None
) -> pacsv.CSVStreamingReader:
    """A streaming reader of a CSV file (``header_only``: by inferred types, to look at the column names); with
    a ``csv`` entry, ``bad`` notes a line with the wrong number of fields."""
    fmt = schema.csv if schema is not None else None
    bad = bad or _BadRows()
    parse = pacsv.ParseOptions(delimiter=_delimiter(path, schema), invalid_row_handler=bad if fmt else None)
    read = pacsv.ReadOptions(
        column_names=list(fmt.columns) if fmt is not None and not fmt.header else None,
        use_threads=fmt is None,  # one thread: pyarrow then numbers a bad line
        block_size=_CSV_BLOCK_BYTES if fmt is not None else None,
    )
    convert = _csv_options(schema) if schema is not None and not header_only else None
    try:
        return pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, OSError) as err:
        raise _csv_error(path, schema, bad, err, "cannot read as CSV") from None


def _csv_error(path: str, schema: Schema | None, bad: _BadRows, err: Exception, what: str) -> DataError:
    """The error of a CSV read: a line with the wrong number of fields by its line, else pyarrow's message."""
    row = bad.first
    if row is not None and row.number is not None:
        sep = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}.get(_delimiter(path, schema))
        fields = f"{sep}-separated fields" if sep else f"fields separated by {_delimiter(path, schema)!r}"
        return DataError(
            path, f"expected {row.expected_columns} {fields}, found {row.actual_columns}", line=_line(path, row.number)
        )
    if "Empty CSV file" in str(err):
        return DataError(path, "file is empty", line=1)
    return DataError(path, f"{what}: {err}")


def _line(path: str, k: int) -> int:
    """The line number of the ``k``-th non-blank line of a CSV file (how pyarrow numbers rows; found on an
    error only, by reading the file again)."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    seen = 0
    with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.rstrip(b"\r\n"):
                seen += 1
                if seen == k:
                    return number
    return k


def _data_line(unit: Unit, schema: Schema, row: int) -> int:
    """The line of a CSV file's data row ``row`` (0-based, after the header)."""
    header = schema.csv is None or schema.csv.header
    return _line(unit.path, row + 1 + int(header))


def _parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(path, f"not a readable Parquet file (corrupt or truncated?): {err}") from None


def read_units(paths: Sequence[str], schema: Schema) -> list[Unit]:
    """The units of the files, after checking that each has the schema's columns with fitting types (Parquet:
    from the footer; CSV: from the header). A CSV file's ``num_rows`` is 0 until :func:`fit_statistics` counts it.
    """
    units: list[Unit] = []
    for path in paths:
        if _kind(path, schema) == "parquet":
            pf = _parquet(path)
            _check_types(path, pf.schema_arrow, schema)
            units += [Unit(path, g, pf.metadata.row_group(g).num_rows) for g in range(pf.metadata.num_row_groups)]
        else:
            if schema.csv is None or schema.csv.header:
                names = _csv_reader(path, schema, header_only=True).schema.names
                missing = [c for c in schema.columns if c not in names]
                if missing:
                    more = f" (nor {', '.join(map(repr, missing[1:]))})" if missing[1:] else ""
                    raise DataError(
                        path,
                        f"no column {missing[0]!r} ({_role(schema, missing[0])}){more}; the header has {names}",
                        line=1 if schema.csv is not None else None,
                    )
            units.append(Unit(path, None, 0))
    return units


def read_chunks(unit: Unit, schema: Schema, columns: Sequence[str] | None = None) -> Iterator[tuple[pa.Table, int]]:
    """The unit's tables (a row group, or a CSV file's blocks) and the row offset of each in its unit."""
    columns = list(columns if columns is not None else schema.columns)
    if unit.row_group is not None:
        try:
            table = _parquet(unit.path).read_row_group(unit.row_group, columns=columns)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(unit.path, f"row group {unit.row_group}: cannot read (corrupt?): {err}") from None
        yield _clean(table, schema), 0
        return
    bad = _BadRows()
    reader = _csv_reader(unit.path, schema, bad=bad)
    offset = 0
    while True:
        try:
            block = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as err:
            # pyarrow names the column and the row of the block; a string in a numeric column lands here
            raise _csv_error(unit.path, schema, bad, err, f"after data row {offset}") from None
        if offset == 0 and schema.csv is None:
            _check_types(unit.path, block.schema, schema)
        yield _clean(pa.Table.from_batches([block]).select(columns), schema), offset
        offset += block.num_rows


def _clean(table: pa.Table, schema: Schema) -> pa.Table:
    """The text columns by the schema's ``csv`` rules (:func:`mtrec.data.schema.clean_text`)."""
    if schema.csv is None:
        return table
    for j, f in enumerate(table.schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            table = table.set_column(j, f.name, clean_text(table.column(j), schema.csv))
    return table


# --------------------------------------------------------------------------------------------- statistics


def fit_statistics(units: list[Unit], schema: Schema, progress: bool = True) -> tuple[list[Unit], dict[str, Any]]:
    """One pass over the train units: the units with their row counts, and ``{"dense": {name: {mean, std,
    count}}, "vocabularies": {name: [keys by id - 1]}}`` for the columns whose schema asks for them. Only the
    columns needed are read (of a unit with a ``part``, only its rows); a train set of Parquet files without such
    columns is not read at all."""
    moment_columns = [d for d in schema.dense if d.transform == "standardize" or d.fill == "mean"]
    vocab = [s for s in schema.sparse if s.min_count is not None]
    csv = any(u.row_group is None and u.part is None for u in units)
    moments = {d.name: Moments() for d in moment_columns}
    counts: dict[str, Counter[str]] = {s.name: Counter() for s in vocab}
    if moment_columns or vocab or csv:
        columns = [d.name for d in moment_columns] + [s.name for s in vocab]
        counted: list[Unit] = []
        for unit in tqdm(units, desc="train statistics", unit="chunk", disable=not progress, leave=False):
            rows = 0
            for table, offset in read_chunks(unit, schema, columns or schema.columns[:1]):
                mask = unit.part.mask(offset, table.num_rows) if unit.part is not None else None
                floats = _numbers(table, [d.name for d in moment_columns], unit, schema, offset)
                if mask is not None:
                    table = table.filter(pa.array(mask))
                    floats = {k: v[mask] for k, v in floats.items()}
                rows += table.num_rows
                for name, values in floats.items():
                    moments[name].update(values)
                for s in vocab:
                    count_keys(table.column(s.name), s, counts[s.name])
            counted.append(replace(unit, num_rows=rows))
        units = counted
    stats: dict[str, Any] = {
        "dense": {name: m.stats() for name, m in moments.items()},
        "vocabularies": {
            s.name: Vocabulary.fit(
                counts[s.name], s.min_count or 1, s.num_embeddings - 1 if s.num_embeddings is not None else None
            ).tokens
            for s in vocab
        },
    }
    for s in vocab:
        log.info(
            "vocabulary %s: %d keys of %d distinct", s.name, len(stats["vocabularies"][s.name]), len(counts[s.name])
        )
    return units, stats


def _floats(
    column: pa.ChunkedArray | pa.Array, unit: Unit, name: str, schema: Schema | None = None, offset: int = 0
) -> np.ndarray:
    """float64 values of a numeric column (text: parsed by pyarrow), NaN for nulls.

    Raises:
        DataError: text that is no number, by its line and column (a CSV file) or its row.
    """
    try:
        values = pc.cast(column, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        t = column.type
        if schema is None or not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(unit.path, f"column {name!r}: not numbers ({err})", field=name) from None
        raise _not_a_number(column, unit, name, schema, offset) from None
    return pc.fill_null(values, np.nan).to_numpy().astype(np.float64, copy=False)


def _numbers(table: pa.Table, names: Sequence[str], unit: Unit, schema: Schema, offset: int) -> dict[str, np.ndarray]:
    """:func:`_floats` of several columns; of their errors, the one on the earliest row is raised."""
    out, errors = {}, []
    for name in names:
        try:
            out[name] = _floats(table.column(name), unit, name, schema, offset)
        except DataError as err:
            errors.append(err)
    if errors:
        raise min(errors, key=lambda e: getattr(e, "row", offset))
    return out


def _not_a_number(column: pa.ChunkedArray | pa.Array, unit: Unit, name: str, schema: Schema, offset: int) -> DataError:
    """The error of the first value of a text column pyarrow cannot read as a number (an error path only)."""
    bad = []
    for value in pc.unique(column).to_pylist():
        try:
            pa.scalar(value, pa.string()).cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad.append(value)
    row = int(np.argmax(pc.is_in(column, value_set=pa.array(bad, pa.string())).to_numpy(zero_copy_only=False)))
    raw = column[row].as_py() if bad else None
    position = ""
    if unit.row_group is None:
        names = list(schema.csv.columns) if schema.csv is not None and not schema.csv.header else None
        if names is None:
            names = _csv_reader(unit.path, schema, header_only=True).schema.names
        position = f" (column {names.index(name) + 1})"
    return _located(unit, schema, offset + row, f"non-numeric value {raw!r}{position}", name)


def _located(unit: Unit, schema: Schema, row: int, message: str, field: str) -> DataError:
    """The error of the unit's row ``row`` (its ``row`` attribute): by its line in a CSV file, by its row group
    and row in a Parquet file."""
    if unit.row_group is not None:
        err = DataError(unit.path, f"row group {unit.row_group}, row {row}: {message}", field=field)
    else:
        err = DataError(unit.path, message, line=_data_line(unit, schema, row), field=field)
    err.row = row  # type: ignore[attr-defined]
    return err


# ------------------------------------------------------------------------------------------------ encoding


class Encoder:
    """Turns a chunk (a pyarrow table of the schema's columns) into column tensors, by the schema's rules."""

    def __init__(self, schema: Schema, stats: Mapping[str, Any]) -> None:
        self.schema = schema
        self.dense_stats = dict(stats.get("dense", {}))
        self.vocabularies = {k: Vocabulary(v) for k, v in (stats.get("vocabularies") or {}).items()}

    def encode(self, table: pa.Table, unit: Unit, offset: int) -> tuple[TabularDataset, int]:
        """The chunk's rows (of the unit's ``part``) as a :class:`TabularDataset`, and how many rows a null label
        skipped. Every row of the chunk is checked, whichever part it is in: a bad row is found by the first
        split read."""
        n = table.num_rows
        part = unit.part.mask(offset, n) if unit.part is not None else np.ones(n, dtype=bool)
        keep = part.copy()
        numbers: dict[str, np.ndarray] = {}
        labels: dict[str, np.ndarray] = {}
        errors: list[DataError] = []  # of every column: the one on the earliest row is raised
        for label in self.schema.labels:
            try:
                y = self._label(table, label, unit, offset, numbers)
            except DataError as err:
                errors.append(err)
                continue
            null = np.isnan(y)
            if null.any() and label.on_null == "error":
                message = f"label {label.name!r} is null (set on_null: skip on its schema entry to drop such rows)"
                source = label.sources[0] if len(label.sources) == 1 else label.name
                errors.append(_located(unit, self.schema, offset + int(np.argmax(null)), message, source))
            keep &= ~null
            labels[label.name] = y
        dense = np.empty((n, len(self.schema.dense)), dtype=np.float32)
        for j, d in enumerate(self.schema.dense):
            try:
                raw = numbers.get(d.name)
                if raw is None:
                    raw = _floats(table.column(d.name), unit, d.name, self.schema, offset)
                dense[:, j] = dense_inputs(d, raw, self.dense_stats.get(d.name))
            except DataError as err:
                errors.append(err)
            except ValueError as err:
                errors.append(_located(unit, self.schema, offset, str(err), d.name))
        if errors:
            raise min(errors, key=lambda e: getattr(e, "row", offset))
        skipped = int(part.sum() - keep.sum())
        if not keep.all():
            table = table.filter(pa.array(keep))
            labels = {k: v[keep] for k, v in labels.items()}
            dense = dense[keep]
        ids: dict[str, torch.Tensor] = {}
        lengths: dict[str, torch.Tensor] = {}
        for s in self.schema.sparse:
            i, n_ids = self._ids(table.column(s.name), s, unit)
            ids[s.name], lengths[s.name] = torch.from_numpy(i), torch.from_numpy(n_ids)
        data = TabularDataset(
            dense=torch.from_numpy(dense),
            sparse_ids=ids,
            sparse_lengths=lengths,
            labels={k: torch.from_numpy(v.astype(np.float32)) for k, v in labels.items()},
        )
        return data, skipped

    def _label(
        self, table: pa.Table, label: LabelColumn, unit: Unit, offset: int, numbers: dict[str, np.ndarray]
    ) -> np.ndarray:
        """float64 values of a label (NaN: null) by its rule (:func:`mtrec.data.schema.derive_label`)."""
        sources: dict[str, Any] = {}
        for c in label.sources:
            if label.is_text_rule:
                sources[c] = table.column(c).combine_chunks()
            else:
                if c not in numbers:
                    numbers[c] = _floats(table.column(c), unit, c, self.schema, offset)
                sources[c] = numbers[c]
        try:
            return derive_label(label, sources)
        except LabelValueError as err:
            raise _located(unit, self.schema, offset + err.row, str(err), err.column) from None

    def _ids(self, column: pa.ChunkedArray, s: SparseColumn, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        try:
            return sparse_ids(column.combine_chunks(), s, self.vocabularies.get(s.name))
        except (TypeError, pa.ArrowInvalid) as err:
            raise DataError(unit.path, f"column {s.name!r}: {err}", field=s.name) from None


def concat(parts: Sequence[TabularDataset]) -> TabularDataset:
    """The rows of several datasets with the same columns, one after the other."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return TabularDataset(
        dense=torch.cat([p.dense for p in parts]),
        sparse_ids={k: torch.cat([p.sparse_ids[k] for p in parts]) for k in first.sparse_ids},
        sparse_lengths={k: torch.cat([p.sparse_lengths[k] for p in parts]) for k in first.sparse_lengths},
        labels={k: torch.cat([p.labels[k] for p in parts]) for k in first.labels},
    )


def _empty(schema: Schema) -> TabularDataset:
    """No rows, with the schema's columns (a rank with no unit of a small split)."""
    return TabularDataset(
        dense=torch.zeros(0, len(schema.dense)),
        sparse_ids={s.name: torch.zeros(0, s.length, dtype=torch.int64) for s in schema.sparse},
        sparse_lengths={s.name: torch.zeros(0, dtype=torch.int64) for s in schema.sparse},
        labels={label.name: torch.zeros(0) for label in schema.labels},
    )


# -------------------------------------------------------------------------------------------------- stream


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _epoch_units(units: Sequence[Unit], shuffle: bool, seed: int, epoch: int) -> list[Unit]:
    if not shuffle:
        return list(units)
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    return [units[i] for i in order]


class _Stream(IterableDataset):
    """The batches of one epoch, for one ``torch.distributed`` rank; a DataLoader worker reads its own share."""

    def __init__(
        self,
        units: list[Unit],
        encoder: Encoder,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        shuffle_buffer: int,
        drop_last: bool,
        rank: int,
        world_size: int,
    ) -> None:
        self.units, self.encoder, self.batch_size = units, encoder, batch_size
        self.shuffle, self.seed, self.epoch, self.shuffle_buffer = shuffle, seed, epoch, shuffle_buffer
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._batches()
        except DataError as err:
            if get_worker_info() is None:
                raise
            yield err  # from a worker: the DataLoader would turn it into a RuntimeError holding its traceback

    def _batches(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, shards = self.rank * workers + worker, self.world_size * workers
        mine = self.units[shard::shards]
        state = np.random.SeedSequence([self.seed, self.epoch, shard]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(state))
        pending: list[TabularDataset] = []
        rows = 0
        skipped = 0
        bs = self.batch_size
        for unit in mine:
            for table, offset in read_chunks(unit, self.encoder.schema):
                part, n_skipped = self.encoder.encode(table, unit, offset)
                skipped += n_skipped
                pending.append(part)
                rows += len(part)
                # shuffled: once the buffer holds half as much again, mix it and send what is above its size
                limit = self.shuffle_buffer if self.shuffle else 0
                if rows - limit >= max(bs, limit // 2):
                    buffer = concat(pending)
                    if self.shuffle:
                        buffer = buffer.subset(torch.randperm(len(buffer), generator=gen))
                    n_out = (rows - limit) // bs * bs
                    yield from _split(buffer.subset(torch.arange(n_out)), bs)
                    rest = buffer.subset(torch.arange(n_out, len(buffer)))
                    pending, rows = ([rest] if len(rest) else []), len(rest)
        if skipped:
            log.info("shard %d/%d: skipped %d rows with a null label (on_null: skip)", shard, shards, skipped)
        if rows:
            buffer = concat(pending)
            if self.shuffle:
                buffer = buffer.subset(torch.randperm(len(buffer), generator=gen))
            if self.drop_last:
                buffer = buffer.subset(torch.arange(len(buffer) // bs * bs))
            yield from _split(buffer, bs)


def _split(data: TabularDataset, batch_size: int) -> Iterator[tuple[Any, ...]]:
    """numpy arrays per batch: a DataLoader worker sends them pickled through its pipe, cheaper for arrays of a
    batch than torch's shared memory (a segment per tensor); the KeyedJaggedTensor is built in the trainer's
    process."""
    for start in range(0, len(data), batch_size):
        part = data.subset(torch.arange(start, min(start + batch_size, len(data))))
        yield (
            part.dense.numpy(),
            {k: v.numpy() for k, v in part.sparse_ids.items()},
            {k: v.numpy() for k, v in part.sparse_lengths.items()},
            {k: v.numpy() for k, v in part.labels.items()},
        )


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _as_is(item: Any) -> Any:
    return item


class FileDataset:
    """A split read from files, with the interface the trainer draws batches through (``len``, ``num_batches``,
    ``batches``); see the module docstring for the order."""

    def __init__(
        self,
        units: list[Unit],
        schema: Schema,
        stats: Mapping[str, Any],
        *,
        num_workers: int = 0,
        shuffle_buffer: int = 100_000,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(
                f"data.num_workers and data.shuffle_buffer must be >= 0, got {num_workers}, {shuffle_buffer}"
            )
        self.units, self.schema, self.stats = units, schema, dict(stats)
        self.encoder = Encoder(schema, stats)
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        default_rank, default_world = _rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size

    def __len__(self) -> int:
        """Rows per rank (the rows of the files over the world size; before any row a null label skips)."""
        return -(-sum(u.num_rows for u in self.units) // self.world_size)

    def materialize(self, progress: bool = False) -> TabularDataset:
        """Every row of the split, in file order, as column tensors (what ``load_files(in_memory=True)`` holds; with
        several ranks each holds them all and takes its part of every global batch, ``mtrec.distributed.RankShard``).
        """
        parts = []
        for unit in tqdm(self.units, desc="reading", unit="chunk", disable=not progress, leave=False):
            for table, offset in read_chunks(unit, self.schema):
                parts.append(self.encoder.encode(table, unit, offset)[0])
        return concat(parts) if parts else _empty(self.schema)

    def num_batches(self, batch_size: int, drop_last: bool = False, *, epoch: int = 0, seed: int = 0) -> int:
        """Batches of one epoch of this rank (every shard ends with its own partial batch)."""
        units = _epoch_units(self.units, True, seed, epoch)
        workers = max(1, self.num_workers)
        shards = self.world_size * workers
        total = 0
        for w in range(workers):
            rows = sum(u.num_rows for u in units[self.rank * workers + w :: shards])
            total += rows // batch_size if drop_last else -(-rows // batch_size)
        return total

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """The batches of one epoch (``shuffle``: in the ``(seed, epoch)`` order), from the ``start``-th."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        stream = _Stream(
            _epoch_units(self.units, shuffle, seed, epoch),
            self.encoder,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            shuffle_buffer=self.shuffle_buffer,
            drop_last=drop_last,
            rank=self.rank,
            world_size=self.world_size,
        )
        # its own generator: a DataLoader draws its workers' base seed, which must not move the global RNG (resume)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_as_is,
            generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
        )
        keys = [s.name for s in self.schema.sparse]
        for i, item in enumerate(loader):
            if isinstance(item, DataError):
                raise item
            dense, ids, lengths, labels = item
            if i >= start:
                yield Batch(
                    torch.from_numpy(dense),
                    build_kjt(_tensors(ids), _tensors(lengths), keys),
                    _tensors(labels),
                )


# ---------------------------------------------------------------------------------------------- the bundle


def load_files(
    train: str | Sequence[str] | None = None,
    val: str | Sequence[str] | None = None,
    test: str | Sequence[str] | None = None,
    schema: str | Path | Schema | None = None,
    num_workers: int = 0,
    shuffle_buffer: int = 100_000,
    progress: bool = True,
    in_memory: bool = False,
    split: Sequence[float] | None = None,
    seed: int = 0,
) -> DataBundle:
    """The bundle of the ``files`` data config: train/val/test :class:`FileDataset` s over globs of Parquet or CSV
    files described by the ``schema`` YAML file (or a :class:`~mtrec.data.schema.Schema`); ``meta`` holds the schema
    (its fitted form), the hashing and the train statistics (a run's ``features.json``), so serving encodes raw rows
    the same way (:class:`mtrec.data.encoding.FilesEncoding`).

    ``in_memory``: read each split once, by the same rules, into a :class:`~mtrec.data.batch.TabularDataset` (column
    tensors; a uniform shuffle each epoch instead of the shuffle buffer) for data that fits in memory and trains
    for many epochs.

    ``split``: train/val/test fractions of the ``train`` glob's rows, parted by ``seed`` (:func:`split_parts`;
    ``val`` and ``test`` not given); with a ``test`` glob, the train glob is split into train and val by
    ``split[0] : split[1]`` and ``test`` is the test set.

    Raises:
        ValueError: a bad schema or ``split``; :class:`~mtrec.data.errors.DataError`: a bad file, by file, line (or
            row) and column.
    """
    if schema is None or (isinstance(schema, str) and not schema):
        raise ValueError("config key data.schema: give the schema file (YAML with dense, sparse, labels)")
    spec = schema if isinstance(schema, Schema) else load_schema(schema)
    globs = {"train": train, "val": val, "test": test}
    if split is not None:
        splits, units = _split_units(spec, train, val, test, split, seed)
    else:
        splits = {name: expand(pattern, f"config key data.{name}") for name, pattern in globs.items()}
        units = {name: read_units(paths, spec) for name, paths in splits.items()}
    units["train"], stats = fit_statistics(units["train"], spec, progress)
    for name in ("val", "test"):
        if any(u.row_group is None and u.part is None for u in units[name]):
            units[name] = fit_statistics(units[name], _labels_only(spec), progress=False)[0]
    rows = {name: sum(u.num_rows for u in units[name]) for name in units}
    if split is not None and rows["train"] == 0:
        if not any(u.part.file_rows for u in units["train"] if u.part is not None):
            header = spec.csv is None or spec.csv.header
            what = "no data rows after the header" if header else "file is empty"
            raise DataError(splits["train"][0], what, line=2 if header else 1)
        raise DataError(splits["train"][0], f"no data rows in the train split ({rows} rows, split {list(split)})")
    spec = spec.fitted(stats["vocabularies"])
    opts = {"num_workers": num_workers, "shuffle_buffer": shuffle_buffer}
    datasets = {name: FileDataset(units[name], spec, stats, **opts) for name in units}
    if in_memory:
        datasets = {name: d.materialize(progress) for name, d in datasets.items()}  # type: ignore[misc]
    meta: dict[str, Any] = {
        "source": FILES_SOURCE,
        "schema": spec.to_dict(),
        "hashing": dict(HASHING),
        "statistics": stats["dense"],
        "vocabularies": stats["vocabularies"],
        "files": splits,
        "rows": rows,
    }
    if split is not None:
        meta["split"] = {"fractions": [float(f) for f in split], "seed": int(seed), "block": SPLIT_BLOCK}
    return DataBundle(
        train=datasets["train"],  # type: ignore[arg-type]
        val=datasets["val"],  # type: ignore[arg-type]
        test=datasets["test"],  # type: ignore[arg-type]
        features=spec.feature_spec(),
        tasks=spec.tasks(),
        meta=meta,
    )


def one_file(path: str | Path) -> str:
    """A glob matching just the file ``path`` (its special characters escaped), after checking that it is one.

    Raises:
        DataError: ``path`` is missing or not a regular file.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(p, "file not found")
    if not p.is_file():
        raise DataError(p, "not a regular file")
    return globlib.escape(str(p))


def split_summary(bundle: DataBundle) -> dict[str, Any]:
    """``sizes`` and ``class_rates`` (the mean of each label) of the in-memory splits of a bundle."""
    splits = {"train": bundle.train, "val": bundle.val, "test": bundle.test}
    return {
        "sizes": {name: len(d) for name, d in splits.items()},
        "class_rates": {
            name: {t: float(d.labels[t].mean()) if len(d) else float("nan") for t in d.labels}  # type: ignore[union-attr]
            for name, d in splits.items()
        },
    }


def _labels_only(schema: Schema) -> Schema:
    """The schema reading only the label columns (to count the rows of CSV files)."""
    return replace(schema, dense=(), sparse=())


def _split_units(
    schema: Schema,
    train: str | Sequence[str] | None,
    val: str | Sequence[str] | None,
    test: str | Sequence[str] | None,
    split: Sequence[float],
    seed: int,
) -> tuple[dict[str, list[str]], dict[str, list[Unit]]]:
    """The files and units of the three splits when the train glob is split (see :func:`load_files`)."""
    fractions = [float(f) for f in split]
    if len(fractions) != 3 or any(not f >= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"config key data.split: three non-negative fractions summing to 1, got {list(split)}")
    if val is not None:
        raise ValueError(
            "config key data.split splits data.train into train/val/test: give no data.val (and data.test only for "
            "a test set of its own; data.train is then split into train and val)"
        )
    paths = expand(train, "config key data.train")
    units = read_units(paths, schema)
    if any(u.row_group is None for u in units):  # CSV files: count their rows
        units = fit_statistics(units, _labels_only(schema), progress=False)[0]
    if test is not None:
        tv = fractions[0] + fractions[1]
        if tv <= 0:
            raise ValueError(f"config key data.split: {fractions}: train and val are both 0, nothing to train on")
        bounds, names = (fractions[0] / tv, 1.0), ("train", "val")
    else:
        bounds, names = (fractions[0], fractions[0] + fractions[1]), ("train", "val", "test")
    file_rows = Counter[str]()
    starts: list[int] = []
    for u in units:
        starts.append(file_rows[u.path])
        file_rows[u.path] += u.num_rows
    index = {p: i for i, p in enumerate(paths)}
    out: dict[str, list[Unit]] = {}
    for which, name in enumerate(names):
        out[name] = []
        for u, first in zip(units, starts):
            part = Part(which, bounds, int(seed), index[u.path], file_rows[u.path], first)
            out[name].append(Unit(u.path, u.row_group, part.count(u.num_rows), part))
    files = {name: list(paths) for name in names}
    if test is not None:
        files["test"] = expand(test, "config key data.test")
        out["test"] = read_units(files["test"], schema)
    return files, out
