"""The AliExpress multi-task data set (click and conversion on search impressions).

CSV with a header naming ``search_id``, ``categorical_1..16``, ``numerical_1..63``, ``click`` and
``conversion`` (any order); every value is numeric (categorical values are integer ids). Files can have
tens of millions of rows, so they are parsed in blocks of lines by numpy's C reader; only when a block
fails is it re-scanned in Python to report the exact line and field. The vocabularies and the scaling
(fitted on the train split, applied by export's raw-feature encoder too) are :mod:`mtrec.data.encoding`'s.
"""

from __future__ import annotations

import re
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtl.tasks import TaskSpec
from mtrec.data.batch import DataBundle, FeatureSpec, SparseFeature
from mtrec.data.census import make_split, open_binary, split_with_test
from mtrec.data.encoding import ALIEXPRESS_SOURCE, aliexpress_dense, aliexpress_standardiser, apply_vocab, fit_vocab
from mtrec.data.errors import DataError

__all__ = [
    "ALIEXPRESS_CATEGORICAL",
    "ALIEXPRESS_COLUMNS",
    "ALIEXPRESS_NUMERICAL",
    "load_aliexpress",
]

ALIEXPRESS_CATEGORICAL: tuple[str, ...] = tuple(f"categorical_{i}" for i in range(1, 17))
ALIEXPRESS_NUMERICAL: tuple[str, ...] = tuple(f"numerical_{i}" for i in range(1, 64))
ALIEXPRESS_COLUMNS: tuple[str, ...] = (
    "search_id",
    *ALIEXPRESS_CATEGORICAL,
    *ALIEXPRESS_NUMERICAL,
    "click",
    "conversion",
)

_BLOCK_BYTES = 1 << 24
_MAX_EXACT_INT = float(2**53)
# What numpy's loadtxt accepts as a float (used only to locate an error after loadtxt has failed).
_FLOAT = re.compile(
    r"\s*[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)\s*", re.IGNORECASE
)


@dataclass
class _Columns:
    """Parsed rows of one file: raw categorical ids, raw numericals and 0/1 labels."""

    cat: list[np.ndarray] = field(default_factory=list)  # int64 [m, 16] per block
    num: list[np.ndarray] = field(default_factory=list)  # float32 [m, 63] per block
    click: list[np.ndarray] = field(default_factory=list)  # bool [m]
    conversion: list[np.ndarray] = field(default_factory=list)  # bool [m]
    rows: int = 0


def _read_header(path: Path, first: bytes) -> list[str]:
    if not first.strip():
        raise DataError(
            path, "file is empty (expected a CSV header)" if not first else "header line is blank", line=1
        )
    try:
        text = first.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise DataError(path, f"header is not UTF-8 text ({e.reason})", line=1) from e
    names = [c.strip() for c in text.split(",")]
    missing = [c for c in ALIEXPRESS_COLUMNS if c not in names]
    unexpected = [c for c in names if c not in ALIEXPRESS_COLUMNS]
    dupes = sorted({c for c in names if names.count(c) > 1})
    problems = []
    if missing:
        problems.append(f"missing columns: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected columns: {', '.join(repr(c) for c in unexpected)}")
    if dupes:
        problems.append(f"duplicated columns: {', '.join(dupes)}")
    if problems:
        raise DataError(
            path,
            "bad header; " + "; ".join(problems) + f" (expected the {len(ALIEXPRESS_COLUMNS)} columns "
            "search_id, categorical_1..16, numerical_1..63, click, conversion in any order)",
            line=1,
        )
    return names


def _locate_error(path: Path, lines: list[str], first_line: int, header: list[str], cause: str) -> DataError:
    """The first bad line/field in a block that numpy refused (``cause`` is numpy's message)."""
    for k, s in enumerate(lines):
        if s.endswith("\r"):
            s = s[:-1]
        if not s:
            continue
        parts = s.split(",")
        if len(parts) != len(header):
            return DataError(
                path,
                f"expected {len(header)} comma-separated fields (as in the header), found {len(parts)}",
                line=first_line + k,
            )
        for j, v in enumerate(parts):
            if not _FLOAT.fullmatch(v):
                return DataError(
                    path, f"non-numeric value {v!r} (column {j + 1})", line=first_line + k, field=header[j]
                )
    end = first_line + len(lines) - 1
    return DataError(path, f"could not parse lines {first_line}-{end}: {cause}", line=first_line)


def _check_values(
    path: Path, lines: list[str], first_line: int, header: list[str], arr: np.ndarray, cols: dict[str, int]
) -> None:
    """Raise on the first non-integer categorical id, non-finite number or label other than 0/1."""
    cat = arr[:, [cols[c] for c in ALIEXPRESS_CATEGORICAL]]
    num = arr[:, [cols[c] for c in ALIEXPRESS_NUMERICAL]]
    lab = arr[:, [cols["click"], cols["conversion"]]]
    bad_cat = ~(np.isfinite(cat) & (np.abs(cat) <= _MAX_EXACT_INT)) | (np.floor(cat) != cat)
    bad_num = ~np.isfinite(num)
    bad_lab = (lab != 0) & (lab != 1)
    if not (bad_cat.any() or bad_num.any() or bad_lab.any()):
        return
    # rows of arr -> line numbers (numpy skips empty lines)
    line_of_row = [first_line + k for k, s in enumerate(lines) if s and s != "\r"]
    found = []
    for bad, names, what in (
        (bad_cat, ALIEXPRESS_CATEGORICAL, "categorical value {v!r} is not an integer id"),
        (bad_num, ALIEXPRESS_NUMERICAL, "non-finite value {v!r} in a numerical field"),
        (bad_lab, ("click", "conversion"), "label value {v!r} not recognised (expected 0 or 1)"),
    ):
        r, c = np.nonzero(bad)
        if r.size:
            i = int(np.argmin(r * len(header) + np.array([cols[n] for n in names])[c]))
            found.append((int(r[i]), cols[names[c[i]]], names[c[i]], what))
    row, j, name, what = min(found)
    raw = lines[line_of_row[row] - first_line].rstrip("\r").split(",")[j].strip()
    raise DataError(path, what.format(v=raw) + f" (column {j + 1})", line=line_of_row[row], field=name)


def _parse_block(
    path: Path, block: bytes, first_line: int, header: list[str], cols: dict[str, int], out: _Columns
) -> None:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            path, f"not UTF-8 text ({e.reason})", line=first_line + block.count(b"\n", 0, e.start)
        ) from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data" for blank blocks
            arr = np.loadtxt(lines, delimiter=",", dtype=np.float64, comments=None, ndmin=2, quotechar=None)
    except ValueError as e:
        raise _locate_error(path, lines, first_line, header, str(e)) from None
    if arr.shape[0] == 0:
        return
    if arr.shape[1] != len(header):
        raise _locate_error(path, lines, first_line, header, f"{arr.shape[1]} columns")
    _check_values(path, lines, first_line, header, arr, cols)
    out.cat.append(arr[:, [cols[c] for c in ALIEXPRESS_CATEGORICAL]].astype(np.int64))
    out.num.append(arr[:, [cols[c] for c in ALIEXPRESS_NUMERICAL]].astype(np.float32))
    out.click.append(arr[:, cols["click"]] == 1)
    out.conversion.append(arr[:, cols["conversion"]] == 1)
    out.rows += arr.shape[0]


def _read_file(path: Path, max_rows: int | None) -> _Columns:
    out = _Columns()
    try:
        with open_binary(path) as f:
            header = _read_header(path, f.readline())
            cols = {c: j for j, c in enumerate(header)}
            line, rem = 2, b""
            while max_rows is None or out.rows < max_rows:
                buf = f.read(_BLOCK_BYTES)
                data = rem + buf
                cut = data.rfind(b"\n") + 1 if buf else len(data)
                block, rem = data[:cut], data[cut:]
                if block:
                    _parse_block(path, block, line, header, cols, out)
                    line += block.count(b"\n")
                if not buf and not rem:
                    break
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(path, f"cannot read file: {e}") from e
    if out.rows == 0:
        raise DataError(path, "no data rows after the header", line=2)
    return out


def load_aliexpress(
    path: str | Path,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    test_path: str | Path | None = None,
    max_rows: int | None = None,
) -> DataBundle:
    """An AliExpress CSV (plain or ``.gz``) as a :class:`DataBundle` with binary tasks ``ctr`` and ``ctcvr``.

    Args:
        path: the CSV (e.g. ``train.csv`` of one country, or the 20-row sample).
        split: train/val/test fractions; with ``test_path`` only ``split[0]:split[1]`` is used (train/val
            of ``path``) and ``test_path`` is the test set.
        seed: split seed.
        test_path: an optional separate test CSV in the same format.
        max_rows: read at most this many data rows of each file (``None``: all).

    Features: ``categorical_1..16`` as single-id sparse features with a train-fitted vocabulary (id 0 for
    ids unseen in train) and ``numerical_1..63`` standardised with train mean/std (a constant column
    gets std 1). ``search_id`` is not a feature. Labels: ``ctr = click``, ``ctcvr = click AND conversion``.

    Raises:
        DataError: missing/empty file, a header lacking columns (all are listed), a line whose field
            count differs from the header, a non-numeric or non-finite value, a non-integer categorical id
            or a label other than 0/1; the message gives ``file:line`` and the column name.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    paths = [Path(path)] + ([Path(test_path)] if test_path is not None else [])
    parts = [_read_file(p, max_rows) for p in paths]
    rows_per_file = [p.rows if max_rows is None else min(p.rows, max_rows) for p in parts]

    def gather(attr: str) -> np.ndarray:
        arrays = []
        for p, keep in zip(parts, rows_per_file):
            a = np.concatenate(getattr(p, attr))
            arrays.append(a[:keep])
            getattr(p, attr).clear()
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]

    cat, num, click, conversion = (gather(a) for a in ("cat", "num", "click", "conversion"))
    n = len(cat)
    idx = split_with_test(rows_per_file[0], None if test_path is None else rows_per_file[1], split, seed)
    train = idx[0].numpy()
    if train.size == 0:
        raise ValueError(f"{path}: the train split is empty ({rows_per_file[0]} rows, split {list(split)})")

    # categorical: train vocabulary, id 0 for unseen (in place: cat becomes the id matrix)
    vocab_sizes: dict[str, int] = {}
    vocabularies: dict[str, list[int]] = {}
    for j, name in enumerate(ALIEXPRESS_CATEGORICAL):
        vocab = fit_vocab(cat[train, j])
        cat[:, j] = apply_vocab(vocab, cat[:, j])
        vocab_sizes[name] = int(vocab.size) + 1
        vocabularies[name] = vocab.tolist()

    # numerical: standardise with train statistics, column by column (float64 statistics)
    means, stds = {}, {}
    for j, name in enumerate(ALIEXPRESS_NUMERICAL):
        means[name], stds[name] = aliexpress_standardiser(num[train, j])
        num[:, j] = aliexpress_dense(num[:, j], means[name], stds[name])

    labels = {"ctr": click.astype(np.float32), "ctcvr": (click & conversion).astype(np.float32)}
    splits = [make_split(ix.numpy(), num, cat, ALIEXPRESS_CATEGORICAL, labels) for ix in idx]
    names = ("train", "val", "test")
    meta: dict[str, object] = {
        "source": ALIEXPRESS_SOURCE,
        "files": [str(p) for p in paths],
        "rows_per_file": rows_per_file,
        "seed": int(seed),
        "split": [float(f) for f in split],
        "max_rows": max_rows,
        "sizes": {nm: len(s) for nm, s in zip(names, splits)},
        "vocab_sizes": vocab_sizes,
        "vocabularies": vocabularies,
        "numeric_mean": means,
        "numeric_std": stds,
        "conversion_without_click": int(np.sum(conversion & ~click)),
        "class_rates": {
            nm: {t: (float(s.labels[t].mean()) if len(s) else float("nan")) for t in ("ctr", "ctcvr")}
            for nm, s in zip(names, splits)
        },
        "n_rows": n,
    }
    return DataBundle(
        train=splits[0],
        val=splits[1],
        test=splits[2],
        features=FeatureSpec(
            dense_names=ALIEXPRESS_NUMERICAL,
            sparse=tuple(SparseFeature(c, vocab_sizes[c]) for c in ALIEXPRESS_CATEGORICAL),
        ),
        tasks=[TaskSpec("ctr", "binary"), TaskSpec("ctcvr", "binary")],
        meta=meta,
    )
