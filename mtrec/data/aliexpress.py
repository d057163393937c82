"""The AliExpress multi-task data set (click and conversion on search impressions).

The data set is a schema of the files data path (:mod:`mtrec.data.files`), shipped as
``mtrec/data/schemas/aliexpress.yaml``: a CSV with a header naming ``search_id``, ``categorical_1..16``,
``numerical_1..63``, ``click`` and ``conversion`` (any order; other columns and ``search_id`` are not read).
Tasks ``ctr`` (click) and ``ctcvr`` (click AND conversion, as in ESMM). :func:`load_aliexpress` reads the file(s)
through :func:`mtrec.data.files.load_files` in memory; for the full data set (tens of millions of rows) stream it
instead: ``mtrec-train data=files data.schema=mtrec/data/schemas/aliexpress.yaml data.train=...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtrec.data.batch import DataBundle
from mtrec.data.files import load_files, one_file, split_summary
from mtrec.data.schema import builtin_schema

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


def load_aliexpress(
    path: str | Path,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    test_path: str | Path | None = None,
) -> DataBundle:
    """An AliExpress CSV (plain or ``.gz``) as a :class:`DataBundle` with binary tasks ``ctr`` and ``ctcvr``.

    Args:
        path: the CSV (e.g. ``train.csv`` of one country, or the 20-row sample).
        split: train/val/test fractions (:func:`mtrec.data.files.split_parts`); with ``test_path`` only
            ``split[0]:split[1]`` is used (train/val of ``path``) and ``test_path`` is the test set.
        seed: split seed.
        test_path: an optional separate test CSV in the same format.

    Features: ``categorical_1..16`` as single-id sparse features with a train-fitted vocabulary (id 0 for
    ids unseen in train) and ``numerical_1..63`` standardised with train mean/std (a constant column
    gets std 1; a missing value is the mean). ``meta`` is the files path's plus ``dataset``, ``sizes`` and
    ``class_rates``.

    Raises:
        DataError: missing/empty file, a header lacking columns, a line whose field count differs from the
            header, a non-numeric value or a label other than 0/1; the message gives ``file:line`` and the column.
    """
    bundle = load_files(
        train=one_file(path),
        test=one_file(test_path) if test_path is not None else None,
        schema=builtin_schema("aliexpress"),
        split=split,
        seed=seed,
        in_memory=True,
        progress=False,
    )
    bundle.meta.update(dataset="aliexpress", **split_summary(bundle))
    return bundle
