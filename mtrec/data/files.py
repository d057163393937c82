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
  ``start`` batches (by reading them again, the cost of exactness) sees what an uninterrupted run saw.

Bad input is a :class:`~mtrec.data.errors.DataError` (a ``ValueError``) naming the file and what to fix: a glob
that matches nothing, a missing column, a type that does not fit its role, a corrupt Parquet file, a null label.
"""

from __future__ import annotations

import glob as globlib
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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
    Moments,
    Schema,
    SparseColumn,
    Vocabulary,
    count_keys,
    dense_inputs,
    load_schema,
    sparse_ids,
)

__all__ = ["FILES_SOURCE", "FileDataset", "Unit", "expand", "fit_statistics", "load_files", "read_chunks", "read_units"]

log = logging.getLogger("mtrec.data.files")
_PARQUET = (".parquet", ".pq")
_CSV = (".csv", ".csv.gz", ".tsv", ".tsv.gz")


@dataclass(frozen=True)
class Unit:
    """What one reader takes at a time: a Parquet row group, or a whole CSV file (``row_group`` None)."""

    path: str
    row_group: int | None
    num_rows: int


# ---------------------------------------------------------------------------------------------- files


def _kind(path: str) -> str:
    name = path.lower()
    if name.endswith(_PARQUET):
        return "parquet"
    if name.endswith(_CSV):
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
    for role, entries in (("dense", schema.dense), ("sparse", schema.sparse), ("labels", schema.labels)):
        for i, e in enumerate(entries):
            if e.name == name:
                return f"schema {role}[{i}]"
    return "schema"


def _check_types(path: str, arrow_schema: pa.Schema, schema: Schema) -> None:
    """Every schema column is in the file, with a type that fits its role."""
    names = set(arrow_schema.names)
    for name in schema.columns:
        if name not in names:
            raise DataError(path, f"no column {name!r} ({_role(schema, name)}); the file has {sorted(names)}")
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal, pa.types.is_null)
    for entry in (*schema.dense, *schema.labels):
        t = arrow_schema.field(entry.name).type
        if not any(f(t) for f in numeric):
            kind = "a list" if pa.types.is_list(t) or pa.types.is_large_list(t) else f"type {t}"
            raise DataError(
                path,
                f"column {entry.name!r} ({_role(schema, entry.name)}) holds {kind}; it needs numbers",
                field=entry.name,
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
    types: dict[str, pa.DataType] = {e.name: pa.float64() for e in (*schema.dense, *schema.labels)}
    types.update({s.name: pa.string() for s in schema.sparse})
    return pacsv.ConvertOptions(column_types=types, include_columns=schema.columns, strings_can_be_null=True)


def _csv_reader(path: str, schema: Schema | None) -> pacsv.CSVStreamingReader:
    parse = pacsv.ParseOptions(delimiter="\t" if ".tsv" in path.lower() else ",")
    try:
        return pacsv.open_csv(path, parse_options=parse, convert_options=_csv_options(schema) if schema else None)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(path, f"cannot read as CSV: {err}") from None


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
        if _kind(path) == "parquet":
            pf = _parquet(path)
            _check_types(path, pf.schema_arrow, schema)
            units += [Unit(path, g, pf.metadata.row_group(g).num_rows) for g in range(pf.metadata.num_row_groups)]
        else:
            header = _csv_reader(path, None).schema
            missing = [c for c in schema.columns if c not in header.names]
            if missing:
                raise DataError(
                    path, f"no column {missing[0]!r} ({_role(schema, missing[0])}); the header has {header.names}"
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
        yield table, 0
        return
    reader = _csv_reader(unit.path, schema)
    offset = 0
    while True:
        try:
            block = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as err:
            # pyarrow names the column and the row of the block; a string in a numeric column lands here
            raise DataError(unit.path, f"after data row {offset}: {err}") from None
        if offset == 0:
            _check_types(unit.path, block.schema, schema)
        yield pa.Table.from_batches([block]).select(columns), offset
        offset += block.num_rows


# --------------------------------------------------------------------------------------------- statistics


def fit_statistics(units: list[Unit], schema: Schema, progress: bool = True) -> tuple[list[Unit], dict[str, Any]]:
    """One pass over the train units: the units with their row counts, and ``{"dense": {name: {mean, std,
    count}}, "vocabularies": {name: [keys by id - 1]}}`` for the columns whose schema asks for them. Only the
    columns needed are read; a train set of Parquet files without such columns is not read at all."""
    standardize = [d for d in schema.dense if d.transform == "standardize"]
    vocab = [s for s in schema.sparse if s.min_count is not None]
    csv = any(u.row_group is None for u in units)
    moments = {d.name: Moments() for d in standardize}
    counts: dict[str, Counter[str]] = {s.name: Counter() for s in vocab}
    if standardize or vocab or csv:
        columns = [d.name for d in standardize] + [s.name for s in vocab]
        counted: list[Unit] = []
        for unit in tqdm(units, desc="train statistics", unit="chunk", disable=not progress, leave=False):
            rows = 0
            for table, _ in read_chunks(unit, schema, columns or schema.columns[:1]):
                rows += table.num_rows
                for d in standardize:
                    moments[d.name].update(_floats(table.column(d.name), unit, d.name))
                for s in vocab:
                    count_keys(table.column(s.name), s, counts[s.name])
            counted.append(Unit(unit.path, unit.row_group, rows))
        units = counted
    stats: dict[str, Any] = {
        "dense": {name: m.stats() for name, m in moments.items()},
        "vocabularies": {
            s.name: Vocabulary.fit(counts[s.name], s.min_count or 1, s.num_embeddings - 1).tokens for s in vocab
        },
    }
    for s in vocab:
        log.info(
            "vocabulary %s: %d keys of %d distinct", s.name, len(stats["vocabularies"][s.name]), len(counts[s.name])
        )
    return units, stats


def _floats(column: pa.ChunkedArray | pa.Array, unit: Unit, name: str) -> np.ndarray:
    """float64 values of a numeric column, NaN for nulls."""
    try:
        values = pc.cast(column, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise DataError(unit.path, f"column {name!r}: not numbers ({err})", field=name) from None
    return pc.fill_null(values, np.nan).to_numpy().astype(np.float64, copy=False)


# ------------------------------------------------------------------------------------------------ encoding


class Encoder:
    """Turns a chunk (a pyarrow table of the schema's columns) into column tensors, by the schema's rules."""

    def __init__(self, schema: Schema, stats: Mapping[str, Any]) -> None:
        self.schema = schema
        self.dense_stats = dict(stats.get("dense", {}))
        self.vocabularies = {k: Vocabulary(v) for k, v in (stats.get("vocabularies") or {}).items()}

    def encode(self, table: pa.Table, unit: Unit, offset: int) -> tuple[TabularDataset, int]:
        """The chunk's rows as a :class:`TabularDataset`, and how many rows a null label skipped."""
        n = table.num_rows
        keep = np.ones(n, dtype=bool)
        labels: dict[str, np.ndarray] = {}
        for label in self.schema.labels:
            y = _floats(table.column(label.name), unit, label.name)
            null = np.isnan(y)
            if null.any() and label.on_null == "error":
                row = int(np.argmax(null))
                raise DataError(unit.path, self._null_message(label.name, unit, offset + row), field=label.name)
            keep &= ~null
            if label.kind == "binary":
                bad = ~null & (y != 0) & (y != 1)
                if bad.any():
                    row = int(np.argmax(bad))
                    raise DataError(
                        unit.path,
                        f"{self._at(unit, offset + row)}: binary label {label.name!r} is {y[row]}; it must be 0 or 1",
                        field=label.name,
                    )
            labels[label.name] = y
        skipped = int(n - keep.sum())
        if skipped:
            table = table.filter(pa.array(keep))
            labels = {k: v[keep] for k, v in labels.items()}
        dense = np.empty((table.num_rows, len(self.schema.dense)), dtype=np.float32)
        for j, d in enumerate(self.schema.dense):
            try:
                dense[:, j] = dense_inputs(d, _floats(table.column(d.name), unit, d.name), self.dense_stats.get(d.name))
            except ValueError as err:
                raise DataError(unit.path, f"{self._at(unit, offset)}: {err}", field=d.name) from None
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

    def _ids(self, column: pa.ChunkedArray, s: SparseColumn, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        try:
            return sparse_ids(column.combine_chunks(), s, self.vocabularies.get(s.name))
        except (TypeError, pa.ArrowInvalid) as err:
            raise DataError(unit.path, f"column {s.name!r}: {err}", field=s.name) from None

    @staticmethod
    def _at(unit: Unit, row: int) -> str:
        return f"row group {unit.row_group}, row {row}" if unit.row_group is not None else f"data row {row + 1}"

    def _null_message(self, name: str, unit: Unit, row: int) -> str:
        return (
            f"{self._at(unit, row)}: label {name!r} is null (set on_null: skip on its schema entry to drop such rows)"
        )


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
        """This rank's rows, in file order, as column tensors (what ``load_files(in_memory=True)`` holds)."""
        mine = self.units[self.rank :: self.world_size]
        parts = []
        for unit in tqdm(mine, desc="reading", unit="chunk", disable=not progress, leave=False):
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
    schema: str | None = None,
    num_workers: int = 0,
    shuffle_buffer: int = 100_000,
    progress: bool = True,
    in_memory: bool = False,
) -> DataBundle:
    """The bundle of the ``files`` data config: train/val/test :class:`FileDataset` s over globs of Parquet or CSV
    files described by the ``schema`` YAML file; ``meta`` holds the schema, the hashing and the train statistics
    (a run's ``features.json``), so serving encodes raw rows the same way (:class:`mtrec.data.encoding.FilesEncoding`).

    ``in_memory``: read each split once, by the same rules, into a :class:`~mtrec.data.batch.TabularDataset` (column
    tensors; a uniform shuffle each epoch instead of the shuffle buffer) for data that fits in memory and trains
    for many epochs.
    """
    if not schema:
        raise ValueError("config key data.schema: give the schema file (YAML with dense, sparse, labels)")
    spec = load_schema(schema)
    globs = {"train": train, "val": val, "test": test}
    splits = {name: expand(pattern, f"config key data.{name}") for name, pattern in globs.items()}
    units = {name: read_units(paths, spec) for name, paths in splits.items()}
    units["train"], stats = fit_statistics(units["train"], spec, progress)
    for name in ("val", "test"):
        if any(u.row_group is None for u in units[name]):
            units[name] = fit_statistics(units[name], Schema(labels=spec.labels), progress=False)[0]
    opts = {"num_workers": num_workers, "shuffle_buffer": shuffle_buffer}
    datasets = {name: FileDataset(units[name], spec, stats, **opts) for name in units}
    if in_memory:
        datasets = {name: d.materialize(progress) for name, d in datasets.items()}  # type: ignore[misc]
    return DataBundle(
        train=datasets["train"],  # type: ignore[arg-type]
        val=datasets["val"],  # type: ignore[arg-type]
        test=datasets["test"],  # type: ignore[arg-type]
        features=spec.feature_spec(),
        tasks=spec.tasks(),
        meta={
            "source": FILES_SOURCE,
            "schema": spec.to_dict(),
            "hashing": dict(HASHING),
            "statistics": stats["dense"],
            "vocabularies": stats["vocabularies"],
            "files": splits,
            "rows": {name: sum(u.num_rows for u in units[name]) for name in units},
        },
    )
