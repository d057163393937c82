"""The UCI KDD Census-Income data set as a multi-task problem (the MMoE paper's real-data benchmark).

File format: 42 comma-separated fields per line, no header, values with a leading space, ``?`` for
missing, gzip-compressed when the name ends in ``.gz``. Field 41 is the income label (``- 50000.`` or
``50000+.``), field 24 the instance weight (not a feature).

The field order below is the one the files actually have (checked on ``census-income.test.gz``): the
"num persons worked for employer" field is 30 (0..6), "weeks worked in year" 39 (0..52) and the year 40
(94/95); field 29 is the categorical "migration prev res in sunbelt", mostly ``?``.

The readers here and in :mod:`mtrec.data.aliexpress` share the small helpers defined here:
:func:`open_binary`, :func:`split_with_test` and :func:`make_split`. How raw values become inputs (the
vocabularies and the scaling, which export's raw-feature encoder applies too) is :mod:`mtrec.data.encoding`.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from mtl.tasks import TaskSpec
from mtrec.data.batch import DataBundle, FeatureSpec, SparseFeature, TabularDataset, split_indices
from mtrec.data.encoding import (
    CENSUS_SOURCE,
    MISSING_TOKENS,
    census_dense,
    census_ids,
    census_number,
    census_token,
    census_vocabulary,
    fit_standardiser,
    token_index,
)
from mtrec.data.errors import DataError

__all__ = [
    "CENSUS_COLUMNS",
    "CENSUS_NUMERIC_FIELDS",
    "CENSUS_TASKS",
    "CENSUS_TASK_GROUPS",
    "load_census",
    "resolve_census_tasks",
]

CENSUS_COLUMNS: tuple[str, ...] = (
    "age",  # 0
    "class_worker",  # 1
    "det_ind_code",  # 2
    "det_occ_code",  # 3
    "education",  # 4
    "wage_per_hour",  # 5
    "hs_college",  # 6
    "marital_stat",  # 7
    "major_ind_code",  # 8
    "major_occ_code",  # 9
    "race",  # 10
    "hisp_origin",  # 11
    "sex",  # 12
    "union_member",  # 13
    "unemp_reason",  # 14
    "full_or_part_emp",  # 15
    "capital_gains",  # 16
    "capital_losses",  # 17
    "stock_dividends",  # 18
    "tax_filer_stat",  # 19
    "region_prev_res",  # 20
    "state_prev_res",  # 21
    "det_hh_fam_stat",  # 22
    "det_hh_summ",  # 23
    "instance_weight",  # 24
    "mig_chg_msa",  # 25
    "mig_chg_reg",  # 26
    "mig_move_reg",  # 27
    "mig_same",  # 28
    "mig_prev_sunbelt",  # 29
    "num_emp",  # 30
    "fam_under_18",  # 31
    "country_father",  # 32
    "country_mother",  # 33
    "country_self",  # 34
    "citizenship",  # 35
    "own_or_self",  # 36
    "vet_question",  # 37
    "vet_benefits",  # 38
    "weeks_worked",  # 39
    "year",  # 40
    "income_50k",  # 41
)
NUM_FIELDS = len(CENSUS_COLUMNS)
#: age, wage per hour, capital gains, capital losses, dividends, persons worked for employer, weeks worked.
CENSUS_NUMERIC_FIELDS: tuple[int, ...] = (0, 5, 16, 17, 18, 30, 39)
INSTANCE_WEIGHT_FIELD = 24
INCOME_FIELD = 41
#: task name -> the field its label comes from (that field is then not a feature).
CENSUS_TASKS: dict[str, int] = {"income": INCOME_FIELD, "marital": 7, "education": 4}
CENSUS_TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "group1": ("income", "marital"),
    "group2": ("education", "marital"),
}
_COLLEGE_PREFIXES = (
    "Some college",
    "Associates degree",
    "Bachelors degree",
    "Masters degree",
    "Prof school degree",
    "Doctorate degree",
)
_INCOME_LOW = {"-50000.", "-50000"}
_INCOME_HIGH = {"50000+.", "50000+"}


# --------------------------------------------------------------------------------------------------
# helpers shared with mtrec.data.aliexpress
# --------------------------------------------------------------------------------------------------


def open_binary(path: str | Path) -> IO[bytes]:
    """Open ``path`` for binary reading, gunzipping when it ends in ``.gz`` or starts with the gzip magic.

    Raises :class:`DataError` naming the path when it is missing or not a regular file.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(p, "file not found")
    if not p.is_file():
        raise DataError(p, "not a regular file")
    try:
        with open(p, "rb") as f:
            magic = f.read(2)
        if p.suffix.lower() == ".gz" or magic == b"\x1f\x8b":
            return gzip.open(p, "rb")  # type: ignore[return-value]
        return open(p, "rb")
    except OSError as e:
        raise DataError(p, f"cannot open file: {e}") from e


def read_text(path: str | Path) -> str:
    """The whole (possibly gzipped) file as UTF-8 text; bad bytes raise :class:`DataError` with their line."""
    try:
        with open_binary(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(path, f"cannot read file: {e}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e.reason})", line=raw.count(b"\n", 0, e.start) + 1) from e


def split_with_test(n_main: int, n_test: int | None, split: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Row positions of train/val/test.

    Without a test file (``n_test is None``) ``range(n_main)`` is split by ``split``. With one, the main
    rows are split into train/val by ``split[0] : split[1]`` (renormalised) and the test rows
    ``n_main .. n_main + n_test - 1`` are the test split.
    """
    fr = [float(f) for f in split]
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {fr}")
    if n_test is None:
        return split_indices(n_main, fr, seed)
    tv = fr[0] + fr[1]
    if tv <= 0:
        raise ValueError(f"split {fr}: train and val fractions are both 0, nothing to train on")
    train, val, _ = split_indices(n_main, (fr[0] / tv, fr[1] / tv, 0.0), seed)
    return [train, val, torch.arange(n_main, n_main + n_test)]


# --------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------


@dataclass
class _Column:
    codes: np.ndarray  # int64 [N]: index into ``uniques``
    uniques: list[str]  # distinct raw values, first-seen order


@dataclass
class _Parsed:
    columns: list[_Column]
    files: list[Path]
    row_file: np.ndarray  # int64 [N]: which file a row came from
    row_line: np.ndarray  # int64 [N]: its 1-based line number

    def where(self, row: int) -> tuple[Path, int]:
        return self.files[int(self.row_file[row])], int(self.row_line[row])


def _read_census_lines(path: Path) -> tuple[list[str], np.ndarray]:
    """Non-blank lines and their 1-based line numbers, after checking each has 42 fields."""
    text = read_text(path)
    lines = text.split("\n")
    if "\r" in text:
        lines = [s[:-1] if s.endswith("\r") else s for s in lines]
    line_no = [i for i, s in enumerate(lines, 1) if s and not s.isspace()]
    if not line_no:
        raise DataError(path, "file is empty (expected 42 comma-separated fields per line)", line=1)
    data = [lines[i - 1] for i in line_no]
    for i, s in enumerate(data):
        if s.count(",") != NUM_FIELDS - 1:
            raise DataError(
                path,
                f"expected {NUM_FIELDS} comma-separated fields, found {s.count(',') + 1}",
                line=line_no[i],
            )
    return data, np.asarray(line_no, dtype=np.int64)


def _parse_files(paths: Sequence[Path]) -> _Parsed:
    lines: list[str] = []
    row_file, row_line = [], []
    for k, p in enumerate(paths):
        data, line_no = _read_census_lines(p)
        lines.extend(data)
        row_file.append(np.full(len(data), k, dtype=np.int64))
        row_line.append(line_no)
    flat = ",".join(lines).split(",")
    del lines
    columns = []
    for j in range(NUM_FIELDS):
        if j == INSTANCE_WEIGHT_FIELD:  # not used: skip hashing its ~65k distinct values
            columns.append(_Column(np.zeros(len(flat) // NUM_FIELDS, dtype=np.int64), [""]))
            continue
        col = flat[j::NUM_FIELDS]
        index = dict.fromkeys(col)
        for i, v in enumerate(index):
            index[v] = i
        codes = np.fromiter(map(index.__getitem__, col), dtype=np.int64, count=len(col))
        columns.append(_Column(codes, list(index)))
    return _Parsed(columns, list(paths), np.concatenate(row_file), np.concatenate(row_line))


class _Errors:
    """Collects per-column problems and raises the one on the earliest (file, line), then lowest field."""

    def __init__(self, parsed: _Parsed) -> None:
        self.parsed = parsed
        self.found: list[tuple[int, int, int, str]] = []  # (row, field, -, message)

    def check(self, field: int, bad_unique: Sequence[int], message: str) -> None:
        """``bad_unique``: indices into the field's uniques that are invalid; message has ``{value!r}``."""
        if not bad_unique:
            return
        col = self.parsed.columns[field]
        rows = np.flatnonzero(np.isin(col.codes, np.asarray(bad_unique, dtype=np.int64)))
        row = int(rows[0])
        value = col.uniques[int(col.codes[row])]
        self.found.append((row, field, 0, message.format(value=value.strip())))

    def raise_first(self) -> None:
        if not self.found:
            return
        row, field, _, message = min(self.found)
        path, line = self.parsed.where(row)
        raise DataError(path, f"({CENSUS_COLUMNS[field]}) {message}", line=line, field=field)


def resolve_census_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a list of names and/or the group names ``group1`` / ``group2`` (or one such string)."""
    items = [tasks] if isinstance(tasks, str) else [str(t) for t in tasks]
    names: list[str] = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            names.extend(CENSUS_TASK_GROUPS.get(part, (part,)))
    unknown = [t for t in names if t not in CENSUS_TASKS]
    if unknown or not names:
        raise ValueError(
            f"unknown census task(s) {unknown or names}; known tasks: {sorted(CENSUS_TASKS)}, "
            f"groups: {sorted(CENSUS_TASK_GROUPS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"census tasks listed twice: {names}")
    return names


def make_split(
    rows: np.ndarray, dense: np.ndarray, ids: np.ndarray, names: Sequence[str], labels: dict[str, np.ndarray]
) -> TabularDataset:
    """The rows ``rows`` as a :class:`TabularDataset` of single-id features (column ``j`` of ``ids`` is
    feature ``names[j]``); one gather per array instead of one per feature."""
    sub = torch.from_numpy(ids[rows])
    ones = torch.ones(len(rows), dtype=torch.int64)
    return TabularDataset(
        dense=torch.from_numpy(dense[rows]),
        sparse_ids={k: sub[:, j : j + 1] for j, k in enumerate(names)},
        sparse_lengths={k: ones for k in names},
        labels={t: torch.from_numpy(v[rows]) for t, v in labels.items()},
    )


# --------------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------------


def load_census(
    path: str | Path,
    tasks: str | Sequence[str] = ("income", "marital"),
    split: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    test_path: str | Path | None = None,
) -> DataBundle:
    """Census-Income as a multi-task :class:`DataBundle`.

    Args:
        path: a census-income file (``.gz`` or plain), e.g. ``census-income.test.gz`` or ``.data.gz``.
        tasks: task names among ``income`` (> 50K), ``marital`` (never married) and ``education``
            (some college or more), or ``"group1"`` (income, marital) / ``"group2"`` (education, marital).
        split: train/val/test fractions. Without ``test_path`` the rows of ``path`` are split seeded by
            them; with ``test_path`` the rows of ``path`` are split into train/val by ``split[0]:split[1]``
            and ``test_path`` is the test set.
        seed: split seed.
        test_path: an optional separate test file.

    Features: the numeric fields (age, wage per hour, capital gains/losses, dividends, persons worked for
    employer, weeks worked) standardised with train mean/std (``?`` becomes the train mean, i.e. 0), and
    every other field except the instance weight, the income label and the label sources of the chosen
    tasks as a single-id categorical feature with a train-fitted vocabulary (id 0: ``?`` or unseen).

    Raises:
        DataError: the file is missing, empty, has a line without 42 fields, a non-numeric value in a
            numeric field, an unrecognised income label or a missing task label; the message gives
            ``file:line``, the field index and its name.
        ValueError: unknown task names or a bad ``split``.
    """
    task_names = resolve_census_tasks(tasks)
    paths = [Path(path)] + ([Path(test_path)] if test_path is not None else [])
    parsed = _parse_files(paths)
    n_main = int(np.sum(parsed.row_file == 0))
    n = len(parsed.row_file)
    idx = split_with_test(n_main, None if test_path is None else n - n_main, split, seed)
    if len(idx[0]) == 0:
        raise ValueError(f"{path}: the train split is empty ({n_main} rows, split {list(split)})")
    train_rows = idx[0].numpy()
    errors = _Errors(parsed)

    # numeric fields -> float64 with NaN for '?' (census_number)
    numeric = np.empty((n, len(CENSUS_NUMERIC_FIELDS)), dtype=np.float64)
    for c, j in enumerate(CENSUS_NUMERIC_FIELDS):
        col = parsed.columns[j]
        lut = np.empty(len(col.uniques), dtype=np.float64)
        bad = []
        for k, raw in enumerate(col.uniques):
            try:
                lut[k] = census_number(raw)
            except ValueError:
                bad.append(k)
        errors.check(j, bad, "non-numeric value {value!r} in a numeric field")
        numeric[:, c] = lut[col.codes]

    # labels
    sources = {INCOME_FIELD} | {CENSUS_TASKS[t] for t in task_names}
    label_of_field: dict[int, np.ndarray] = {}
    for j in sorted(sources):
        col = parsed.columns[j]
        lut = np.zeros(len(col.uniques), dtype=np.float32)
        bad = []
        for k, raw in enumerate(col.uniques):
            s = raw.strip()
            if j == INCOME_FIELD:
                compact = s.replace(" ", "")
                if compact in _INCOME_LOW:
                    lut[k] = 0.0
                elif compact in _INCOME_HIGH:
                    lut[k] = 1.0
                else:
                    bad.append(k)
            elif s in MISSING_TOKENS:
                bad.append(k)
            elif j == CENSUS_TASKS["marital"]:
                lut[k] = float(s == "Never married")
            else:  # education
                lut[k] = float(s.startswith(_COLLEGE_PREFIXES))
        if j == INCOME_FIELD:
            msg = "income label {value!r} not recognised (expected '- 50000.' or '50000+.')"
        else:
            msg = "missing value {value!r} in a field used as a task label"
        errors.check(j, bad, msg)
        label_of_field[j] = lut[col.codes]
    errors.raise_first()

    # standardise numeric with train statistics; missing -> mean -> 0
    mean, std = fit_standardiser(numeric[train_rows])
    dense32 = census_dense(numeric, mean, std)
    del numeric

    # categorical fields: vocabulary of stripped values seen in train (missing excluded), id 0 = OOV
    excluded = set(CENSUS_NUMERIC_FIELDS) | {INSTANCE_WEIGHT_FIELD} | sources
    cat_fields = [j for j in range(NUM_FIELDS) if j not in excluded]
    ids = np.empty((n, len(cat_fields)), dtype=np.int64)
    vocabularies: dict[str, list[str]] = {}
    for c, j in enumerate(cat_fields):
        col = parsed.columns[j]
        in_train = np.unique(col.codes[train_rows])
        vocab = census_vocabulary(census_token(col.uniques[k]) for k in in_train)
        ids[:, c] = census_ids(token_index(vocab), col.uniques)[col.codes]
        vocabularies[CENSUS_COLUMNS[j]] = vocab

    labels = {t: label_of_field[CENSUS_TASKS[t]] for t in task_names}
    splits = [make_split(ix.numpy(), dense32, ids, list(vocabularies), labels) for ix in idx]
    dense_names = tuple(CENSUS_COLUMNS[j] for j in CENSUS_NUMERIC_FIELDS)
    features = FeatureSpec(
        dense_names=dense_names,
        sparse=tuple(SparseFeature(k, len(v) + 1) for k, v in vocabularies.items()),
    )
    names = ("train", "val", "test")
    meta: dict[str, object] = {
        "source": CENSUS_SOURCE,
        "files": [str(p) for p in paths],
        "rows_per_file": [int(np.sum(parsed.row_file == k)) for k in range(len(paths))],
        "tasks": task_names,
        "seed": int(seed),
        "split": [float(f) for f in split],
        "sizes": {nm: len(s) for nm, s in zip(names, splits)},
        "vocab_sizes": {k: len(v) + 1 for k, v in vocabularies.items()},
        "vocabularies": vocabularies,
        "categorical_fields": {CENSUS_COLUMNS[j]: j for j in cat_fields},
        "numeric_fields": {CENSUS_COLUMNS[j]: j for j in CENSUS_NUMERIC_FIELDS},
        "numeric_mean": dict(zip(dense_names, map(float, mean))),
        "numeric_std": dict(zip(dense_names, map(float, std))),
        "class_rates": {
            nm: {t: (float(s.labels[t].mean()) if len(s) else float("nan")) for t in task_names}
            for nm, s in zip(names, splits)
        },
    }
    return DataBundle(
        train=splits[0],
        val=splits[1],
        test=splits[2],
        features=features,
        tasks=[TaskSpec(t, "binary") for t in task_names],
        meta=meta,
    )
