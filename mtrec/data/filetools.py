"""Tools around the files reader (:mod:`mtrec.data.files`), the library side of ``mtrec-data``:

* :func:`write_synthetic`: a synthetic click log as Parquet train/val/test files plus its schema file, written one
  row group at a time (memory: the entity tables and one row group, whatever ``rows`` is);
* :func:`inspect_files`: what a schema sees in a set of files (files, row groups, rows, per column its type,
  nulls, and for dense columns the range and mean), after the reader's own checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from mtrec.data.files import expand, read_chunks, read_units
from mtrec.data.schema import load_schema
from mtrec.data.synthetic import _sample_cdf, _sigmoid, _zipf_cdf

__all__ = ["SYNTHETIC_SCHEMA", "inspect_files", "write_synthetic"]

#: The schema of :func:`write_synthetic`'s files (``num_embeddings`` filled in from its arguments).
SYNTHETIC_SCHEMA: dict[str, Any] = {
    "dense": [{"name": "price", "transform": "log1p"}, {"name": "hour", "transform": "standardize"}],
    "sparse": [
        {"name": "user_id"},
        {"name": "item_id"},
        {"name": "category", "vocabulary": {"min_count": 1}},
        {"name": "history", "max_len": 20, "pooling": "mean"},
    ],
    "labels": [
        {"name": "click", "kind": "binary"},
        {"name": "conversion", "kind": "binary"},
        {"name": "dwell", "kind": "regression"},
    ],
}


def write_synthetic(
    out: str | Path,
    rows: int,
    *,
    num_users: int = 100_000,
    num_items: int = 50_000,
    num_categories: int = 200,
    history_len: int = 20,
    rows_per_file: int = 1_000_000,
    row_group_size: int = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``rows`` train rows (and a tenth as many val and test rows) of a synthetic click log under ``out``:
    ``train/part-*.parquet``, ``val/``, ``test/`` and ``schema.yaml``. String user ids (``u<n>``), integer item
    ids, string categories, a list column of recently seen items; ``click = Bernoulli(sigmoid(user . item + biases
    + price and hour effects))``, ``conversion`` a subset of clicks, ``dwell`` the log seconds of a click (0
    without one). Row group ``g`` of the log is drawn from its own seeded generator. Returns a summary (globs,
    rows, files)."""
    for name, v in (("rows", rows), ("num_users", num_users), ("num_items", num_items),
                    ("num_categories", num_categories), ("rows_per_file", rows_per_file),
                    ("row_group_size", row_group_size)):  # fmt: skip
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; write the synthetic files into a new folder")
    rng = np.random.default_rng([seed, 0])
    k = 4
    tables = {
        "user_vec": rng.standard_normal((num_users, k)) / math.sqrt(k),
        "item_vec": rng.standard_normal((num_items, k)) / math.sqrt(k),
        "user_bias": 0.5 * rng.standard_normal(num_users),
        "item_bias": 0.5 * rng.standard_normal(num_items),
        "category": rng.integers(0, num_categories, num_items),
        "user_cdf": _zipf_cdf(num_users, 1.1),
        "item_cdf": _zipf_cdf(num_items, 1.1),
    }
    schema = {
        **SYNTHETIC_SCHEMA,
        "sparse": [
            {**SYNTHETIC_SCHEMA["sparse"][0], "num_embeddings": max(2, 2 * num_users)},
            {**SYNTHETIC_SCHEMA["sparse"][1], "num_embeddings": max(2, 2 * num_items)},
            {**SYNTHETIC_SCHEMA["sparse"][2], "num_embeddings": num_categories + 1},
            {**SYNTHETIC_SCHEMA["sparse"][3], "num_embeddings": max(2, 2 * num_items), "max_len": history_len},
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    summary: dict[str, Any] = {"schema": str(out / "schema.yaml"), "rows": {}, "files": {}}
    group = 0
    for split, n in (("train", rows), ("val", max(1, rows // 10)), ("test", max(1, rows // 10))):
        (out / split).mkdir()
        files = 0
        for f_start in range(0, n, rows_per_file):
            f_rows = min(rows_per_file, n - f_start)
            with pq.ParquetWriter(out / split / f"part-{files:05d}.parquet", _arrow_schema()) as writer:
                for g_start in range(0, f_rows, row_group_size):
                    g_rows = min(row_group_size, f_rows - g_start)
                    writer.write_table(_row_group(tables, g_rows, history_len, seed, group), row_group_size=g_rows)
                    group += 1
            files += 1
        summary["rows"][split] = n
        summary["files"][split] = files
        summary[split] = str(out / split / "*.parquet")
    return summary


def _arrow_schema() -> pa.Schema:
    return pa.schema(
        [
            ("user_id", pa.string()),
            ("item_id", pa.int64()),
            ("category", pa.string()),
            ("history", pa.list_(pa.int64())),
            ("price", pa.float64()),
            ("hour", pa.int32()),
            ("click", pa.int8()),
            ("conversion", pa.int8()),
            ("dwell", pa.float32()),
        ]
    )


def _row_group(tables: dict[str, np.ndarray], n: int, history_len: int, seed: int, group: int) -> pa.Table:
    rng = np.random.default_rng([seed, 1, group])
    u = _sample_cdf(rng, tables["user_cdf"], n)
    i = _sample_cdf(rng, tables["item_cdf"], n)
    lengths = rng.integers(0, history_len + 1, n)
    flat = _sample_cdf(rng, tables["item_cdf"], int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    price = rng.lognormal(3.0, 1.0, n)
    hour = rng.integers(0, 24, n)
    z = (
        np.einsum("nk,nk->n", tables["user_vec"][u], tables["item_vec"][i]) * 3.0
        + tables["user_bias"][u]
        + tables["item_bias"][i]
        - 0.3 * (np.log1p(price) - 3.0)
        + 0.4 * np.cos(hour / 24.0 * 2 * math.pi)
        - 2.0
    )
    click = rng.random(n) < _sigmoid(z)
    conversion = click & (rng.random(n) < _sigmoid(z - 1.0))
    dwell = np.where(click, np.log1p(rng.lognormal(3.0 + 0.3 * z, 0.5)), 0.0)
    return pa.table(
        {
            "user_id": pc.binary_join_element_wise("u", pc.cast(pa.array(u), pa.string()), ""),
            "item_id": pa.array(i, pa.int64()),
            "category": pc.binary_join_element_wise("c", pc.cast(pa.array(tables["category"][i]), pa.string()), ""),
            "history": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int64())),
            "price": pa.array(price),
            "hour": pa.array(hour, pa.int32()),
            "click": pa.array(click.astype(np.int8)),
            "conversion": pa.array(conversion.astype(np.int8)),
            "dwell": pa.array(dwell.astype(np.float32)),
        },
        schema=_arrow_schema(),
    )


def inspect_files(schema: str | Path, patterns: Sequence[str]) -> dict[str, Any]:
    """What the ``schema`` sees in the files the globs name: files, units (row groups, CSV files), rows, and per
    schema column its role, type (of the first file), nulls, and for dense and label columns min/mean/max.

    Raises:
        ValueError: the reader's own checks (a glob matching nothing, a missing column, a type unfit for its role,
            a corrupt file; :class:`mtrec.data.errors.DataError`).
    """
    spec = load_schema(schema)
    paths = expand(list(patterns), "argument GLOB")
    units = read_units(paths, spec)
    roles = {e.name: role for role, es in (("dense", spec.dense), ("sparse", spec.sparse), ("label", spec.labels))
             for e in es}  # fmt: skip
    columns: dict[str, dict[str, Any]] = {name: {"role": roles[name], "type": None, "nulls": 0} for name in roles}
    sums = {name: [0, 0.0, math.inf, -math.inf] for name in roles if roles[name] != "sparse"}
    rows = 0
    for unit in units:
        for table, _ in read_chunks(unit, spec):
            rows += table.num_rows
            for name in roles:
                column = table.column(name)
                columns[name]["type"] = columns[name]["type"] or str(column.type)
                columns[name]["nulls"] += column.null_count
                if name in sums and column.length() > column.null_count:
                    values = pc.cast(column, pa.float64())
                    s = sums[name]
                    s[0] += len(values) - values.null_count
                    s[1] += pc.sum(values).as_py()
                    s[2] = min(s[2], pc.min(values).as_py())
                    s[3] = max(s[3], pc.max(values).as_py())
    for name, (count, total, lo, hi) in sums.items():
        none = {"min": None, "mean": None, "max": None}
        columns[name].update({"min": lo, "mean": total / count, "max": hi} if count else none)
    return {"files": len(paths), "units": len(units), "rows": rows, "columns": columns}
