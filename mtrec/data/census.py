"""The UCI KDD Census-Income data set as a multi-task problem (the MMoE paper's real-data benchmark).

The data set is a schema of the files data path (:mod:`mtrec.data.files`), shipped as
``mtrec/data/schemas/census.yaml``: 42 comma-separated fields per line, no header, values with a leading space,
``?`` for missing, gzip-compressed when the name ends in ``.gz``; field 24 (the instance weight) is not read. The
field order is the one the files actually have (checked on ``census-income.test.gz``): the "num persons worked for
employer" field is 30 (0..6), "weeks worked in year" 39 (0..52) and the year 40 (94/95); field 29 is the
categorical "migration prev res in sunbelt", mostly ``?``.

:func:`load_census` only picks the tasks: it keeps their labels in the schema, gives the source field of a task
not chosen back to the features, and reads the file(s) through :func:`mtrec.data.files.load_files` in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from mtrec.data.batch import DataBundle
from mtrec.data.files import load_files, one_file, split_summary
from mtrec.data.schema import Schema, SparseColumn, builtin_schema

__all__ = [
    "CENSUS_COLUMNS",
    "CENSUS_NUMERIC_FIELDS",
    "CENSUS_TASKS",
    "CENSUS_TASK_GROUPS",
    "census_schema",
    "load_census",
    "resolve_census_tasks",
]

_SCHEMA = builtin_schema("census")
assert _SCHEMA.csv is not None
#: The 42 fields of a line, in order (the built-in schema's ``csv.columns``).
CENSUS_COLUMNS: tuple[str, ...] = _SCHEMA.csv.columns
#: age, wage per hour, capital gains, capital losses, dividends, persons worked for employer, weeks worked.
CENSUS_NUMERIC_FIELDS: tuple[int, ...] = tuple(CENSUS_COLUMNS.index(d.name) for d in _SCHEMA.dense)
#: task name -> the field its label comes from (that field is then not a feature).
CENSUS_TASKS: dict[str, int] = {label.name: CENSUS_COLUMNS.index(label.sources[0]) for label in _SCHEMA.labels}
CENSUS_TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "group1": ("income", "marital"),
    "group2": ("education", "marital"),
}
#: The label sources that are categorical features when their task is not chosen (the income label never is one).
_FEATURE_UNLESS_LABEL = ("marital_stat", "education")


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


def census_schema(tasks: str | Sequence[str] = ("income", "marital")) -> Schema:
    """The built-in census schema with the labels of ``tasks`` only; the source fields of the other tasks (marital
    status, education) are categorical features like the other fields, in field order."""
    schema = _SCHEMA.with_labels(resolve_census_tasks(tasks))
    sources = {c for label in schema.labels for c in label.sources}
    freed = [SparseColumn(c, None, min_count=1) for c in _FEATURE_UNLESS_LABEL if c not in sources]
    sparse = sorted((*schema.sparse, *freed), key=lambda s: CENSUS_COLUMNS.index(s.name))
    return replace(schema, sparse=tuple(sparse))


def load_census(
    path: str | Path,
    tasks: str | Sequence[str] = ("income", "marital"),
    split: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    test_path: str | Path | None = None,
) -> DataBundle:
    """Census-Income as a multi-task :class:`DataBundle` of in-memory splits (:func:`census_schema` read by
    :func:`mtrec.data.files.load_files`).

    Args:
        path: a census-income file (``.gz`` or plain), e.g. ``census-income.test.gz`` or ``.data.gz``.
        tasks: task names among ``income`` (> 50K), ``marital`` (never married) and ``education``
            (some college or more), or ``"group1"`` (income, marital) / ``"group2"`` (education, marital).
        split: train/val/test fractions. Without ``test_path`` the rows of ``path`` are split seeded by
            them (:func:`mtrec.data.files.split_parts`); with ``test_path`` the rows of ``path`` are split into
            train/val by ``split[0]:split[1]`` and ``test_path`` is the test set.
        seed: split seed.
        test_path: an optional separate test file.

    Features: the numeric fields (age, wage per hour, capital gains/losses, dividends, persons worked for
    employer, weeks worked) standardised with train mean/std (``?`` becomes the train mean, i.e. 0), and
    every other field except the instance weight, the income label and the label sources of the chosen
    tasks as a single-id categorical feature with a train-fitted vocabulary (id 0: ``?`` or unseen). ``meta``
    is the files path's (``source: files``; serving encodes raw rows by it), plus ``dataset``, ``tasks``,
    ``sizes`` and the ``class_rates`` of each split.

    Raises:
        DataError: the file is missing, empty, has a line without 42 fields, a non-numeric value in a
            numeric field, an unrecognised income label or a missing task label; the message gives
            ``file:line`` and the field's name.
        ValueError: unknown task names or a bad ``split``.
    """
    schema = census_schema(tasks)
    bundle = load_files(
        train=one_file(path),
        test=one_file(test_path) if test_path is not None else None,
        schema=schema,
        split=split,
        seed=seed,
        in_memory=True,
        progress=False,
    )
    bundle.meta.update(dataset="census-income", tasks=[t.name for t in bundle.tasks], **split_summary(bundle))
    return bundle
