"""How the readers turn raw feature values into model inputs, defined once for training and serving.

The Census-Income and AliExpress readers fit their encodings on the train split (vocabularies, mean and std),
apply them to build the training tensors, and store what they fitted in the bundle's ``meta`` (so in a run's
``features.json``). Export's :class:`mtrec.export.RawFeatureEncoder` applies the same functions, through
:func:`value_encoding`, to the raw rows a server receives: one definition, so training and serving cannot drift
apart.

The functions come in pairs, one fitting on train values and one applying:

* integer-id vocabularies (AliExpress categoricals): :func:`fit_vocab` / :func:`apply_vocab`, id ``1 + position``
  in the sorted distinct train ids, 0 (out of vocabulary) for an id unseen in train;
* Census categoricals: :func:`census_token` (a raw value as the reader compares it), :func:`census_vocabulary` /
  :func:`census_ids`, id ``1 + position`` in the sorted train tokens, 0 for ``?``, empty or unseen;
* Census numerics: :func:`census_number`, :func:`fit_standardiser` / :func:`census_dense`, standardised in
  float64 and cast to float32, a missing value becoming 0 (the train mean);
* AliExpress numericals: :func:`aliexpress_standardiser` / :func:`aliexpress_dense`, standardised in float32
  arithmetic;
* the user's files (:func:`mtrec.data.files.load_files`): :class:`FilesEncoding`, by the run's schema through the
  functions of :mod:`mtrec.data.schema` that built the training tensors (hashed ids, vocabularies, fill and
  transforms).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ALIEXPRESS_SOURCE",
    "CENSUS_SOURCE",
    "FILES_SOURCE",
    "MISSING_TOKENS",
    "AliExpressEncoding",
    "CensusEncoding",
    "FilesEncoding",
    "ValueEncoding",
    "aliexpress_dense",
    "aliexpress_standardiser",
    "apply_vocab",
    "census_dense",
    "census_ids",
    "census_number",
    "census_token",
    "census_vocabulary",
    "fit_standardiser",
    "fit_vocab",
    "token_index",
    "value_encoding",
]

#: ``meta["source"]`` of the readers whose encodings are defined here.
CENSUS_SOURCE = "census-income"
ALIEXPRESS_SOURCE = "aliexpress"
FILES_SOURCE = "files"
#: Census values that mean "missing" (after stripping): no category (id 0), no number (the train mean).
MISSING_TOKENS = frozenset({"?", ""})
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


# ------------------------------------------------------------------------------------------ integer ids


def fit_vocab(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values: id ``k + 1`` is ``vocab[k]``, id 0 is out-of-vocabulary."""
    return np.unique(values)


def apply_vocab(vocab: np.ndarray, values: np.ndarray) -> np.ndarray:
    """int64 ids: ``1 + position`` of each value in the sorted ``vocab``, 0 for values not in it."""
    if vocab.size == 0:
        return np.zeros(values.shape, dtype=np.int64)
    pos = np.searchsorted(vocab, values)
    pos_c = np.minimum(pos, vocab.size - 1)
    return np.where(vocab[pos_c] == values, pos_c + 1, 0).astype(np.int64)


# ----------------------------------------------------------------------------------------------- census


def census_token(value: Any) -> str:
    """A categorical value as the census reader compares it: the stripped string (an integral float is written
    as an int, ``None`` is empty, i.e. missing)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def census_vocabulary(tokens: Iterable[str]) -> list[str]:
    """The sorted distinct train tokens, missing ones (:data:`MISSING_TOKENS`) left out."""
    return sorted(set(tokens) - MISSING_TOKENS)


def token_index(vocabulary: Sequence[Any]) -> dict[str, int]:
    """``{token: id}``: id ``1 + position`` in the vocabulary (0 is out-of-vocabulary)."""
    return {str(v): i + 1 for i, v in enumerate(vocabulary)}


def census_ids(index: Mapping[str, int], values: Iterable[Any]) -> np.ndarray:
    """int64 ids of raw values through a :func:`token_index`: 0 for missing or unseen tokens."""
    return np.asarray([index.get(census_token(v), 0) for v in values], dtype=np.int64)


def census_number(value: Any) -> float:
    """A numeric field's value: NaN when missing (``?``, empty or ``None``), else the number (strings stripped).

    Raises:
        ValueError: a string that is not a decimal number (``nan`` and ``inf`` are not numbers of the format).
    """
    if value is None:
        return math.nan
    if not isinstance(value, str):
        return float(value)
    s = value.strip()
    if s in MISSING_TOKENS:
        return math.nan
    if not _NUMBER.fullmatch(s):
        raise ValueError(f"non-numeric value {s!r}")
    return float(s)


def fit_standardiser(train_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and population std (``ddof=0``) over non-NaN train values.

    A column with no train values gets mean 0; a std of 0 (or undefined) becomes 1.
    """
    n_ok = np.sum(~np.isnan(train_values), axis=0)
    safe = np.where(np.isnan(train_values), 0.0, train_values)
    mean = safe.sum(axis=0) / np.maximum(n_ok, 1)
    var = np.where(np.isnan(train_values), 0.0, (train_values - mean) ** 2).sum(axis=0) / np.maximum(n_ok, 1)
    std = np.sqrt(var)
    std = np.where((std > 0) & np.isfinite(std), std, 1.0)
    return mean, std


def census_dense(values: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """float32 standardised values, computed in float64; a missing value (NaN) becomes 0, the train mean."""
    z = (np.asarray(values, dtype=np.float64) - mean) / std
    z[np.isnan(z)] = 0.0
    return z.astype(np.float32)


# ------------------------------------------------------------------------------------------- aliexpress


def aliexpress_standardiser(train_column: np.ndarray) -> tuple[float, float]:
    """Mean and population std of one float32 train column, in float64; a std of 0 (or undefined) becomes 1."""
    x = train_column.astype(np.float64)
    mean, std = float(x.mean()), float(x.std())
    if not (std > 0 and np.isfinite(std)):
        std = 1.0
    return mean, std


def aliexpress_dense(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    """float32 standardised values in float32 arithmetic (the values are cast to float32 first)."""
    return ((np.asarray(values).astype(np.float32, copy=False) - mean) / std).astype(np.float32)


# ------------------------------------------------------------------------------------- per-reader rules


class ValueEncoding:
    """The rules of one reader for turning raw values into input values, from the bundle's ``meta``.

    This base class holds the rules of readers without their own (the synthetic generators, whose values are
    model inputs already): a dense value is used as it is, standardised in float64 when ``meta`` has its mean and
    std; a sparse value goes through the feature's vocabulary when ``meta`` has one (strings by
    :func:`census_token`, integer ids by :func:`apply_vocab`; missing or unseen: 0), else it is an id already,
    in ``[0, num_embeddings)``, and ``None`` is no id.
    """

    #: Whether every vocabulary holds string tokens (else: integer ids unless it holds a string).
    string_vocabularies = False
    #: Whether :meth:`ids` keeps the first ``max_len`` ids of a longer list (else a longer list is an error).
    truncates = False

    def __init__(self, meta: Mapping[str, Any] | None = None) -> None:
        meta = meta or {}
        self.token_vocab: dict[str, dict[str, int]] = {}
        self.id_vocab: dict[str, np.ndarray] = {}
        for name, vocab in (meta.get("vocabularies") or {}).items():
            vocab = list(vocab)
            if self.string_vocabularies or any(isinstance(v, str) for v in vocab):
                self.token_vocab[name] = token_index(vocab)
            else:
                self.id_vocab[name] = np.asarray(vocab, dtype=np.int64)
        mean, std = meta.get("numeric_mean") or {}, meta.get("numeric_std") or {}
        self.scaling = {n: (float(mean[n]), float(std[n])) for n in mean if n in std}

    def has_vocabulary(self, name: str) -> bool:
        return name in self.token_vocab or name in self.id_vocab

    def number(self, value: Any) -> float:
        """One raw dense value as a float (``None``: NaN)."""
        return math.nan if value is None else float(value)

    def scale(self, name: str, values: np.ndarray) -> np.ndarray:
        """float32 input values of a dense feature from its float64 raw values."""
        if name not in self.scaling:
            return values.astype(np.float32)
        mean, std = self.scaling[name]
        return ((values - mean) / std).astype(np.float32)

    def dense(self, name: str, values: Sequence[Any]) -> np.ndarray:
        """float32 ``[N]`` input values of dense feature ``name`` from its raw values.

        Raises:
            ValueError / TypeError: a value is not a number.
        """
        return self.scale(name, np.asarray([self.number(v) for v in values], dtype=np.float64))

    def ids(self, name: str, values: Sequence[Any], num_embeddings: int) -> list[int]:
        """The ids of one row's raw values of sparse feature ``name``.

        Raises:
            ValueError: an id that is not an integer, or (without a vocabulary) outside ``[0, num_embeddings)``.
        """
        if name in self.token_vocab:
            return census_ids(self.token_vocab[name], values).tolist()
        ints: list[int | None] = []
        for v in values:
            try:
                i = None if v is None else int(v)
                if i is not None and float(v) != i:
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(f"ids must be integers, got {list(values)}") from None
            ints.append(i)
        if name in self.id_vocab:  # None and unseen ids: the out-of-vocabulary id 0
            known = [i is not None for i in ints]
            ids = apply_vocab(self.id_vocab[name], np.asarray([0 if i is None else i for i in ints], dtype=np.int64))
            return np.where(known, ids, 0).tolist()
        present = [i for i in ints if i is not None]  # no vocabulary: a missing id is no id
        bad = [i for i in present if not 0 <= i < num_embeddings]
        if bad:
            raise ValueError(f"ids {bad} outside [0, {num_embeddings})")
        return present


class CensusEncoding(ValueEncoding):
    """:func:`mtrec.data.census.load_census`: numbers by :func:`census_number` and :func:`census_dense` (a missing
    value is 0), categories by :func:`census_ids` through the train vocabulary of tokens."""

    string_vocabularies = True

    def number(self, value: Any) -> float:
        return census_number(value)

    def scale(self, name: str, values: np.ndarray) -> np.ndarray:
        return census_dense(values, *self.scaling.get(name, (0.0, 1.0)))


class AliExpressEncoding(ValueEncoding):
    """:func:`mtrec.data.aliexpress.load_aliexpress`: numericals by :func:`aliexpress_dense` (float32
    arithmetic), categorical ids by :func:`apply_vocab` through the train vocabulary of ids."""

    def scale(self, name: str, values: np.ndarray) -> np.ndarray:
        return aliexpress_dense(values, *self.scaling.get(name, (0.0, 1.0)))


class FilesEncoding(ValueEncoding):
    """:func:`mtrec.data.files.load_files`: the run's schema (``meta["schema"]``), train statistics and
    vocabularies, applied by the functions that built the training tensors (:func:`mtrec.data.schema.dense_inputs`,
    :func:`mtrec.data.schema.sparse_ids` on a one-row pyarrow array), so a raw row gives bitwise the training
    tensors. A list feature keeps its first ``max_len`` ids; a lone string value of a list feature is split on the
    feature's separator (as a CSV cell is)."""

    truncates = True

    def __init__(self, meta: Mapping[str, Any] | None = None) -> None:
        from mtrec.data.schema import Schema, Vocabulary

        meta = meta or {}
        super().__init__({})
        schema = Schema.from_dict(meta.get("schema") or {})
        self.dense_columns = {d.name: d for d in schema.dense}
        self.sparse_columns = {s.name: s for s in schema.sparse}
        self.statistics: dict[str, Any] = dict(meta.get("statistics") or {})
        self.vocabularies = {k: Vocabulary(v) for k, v in (meta.get("vocabularies") or {}).items()}

    def has_vocabulary(self, name: str) -> bool:
        return name in self.vocabularies

    def dense(self, name: str, values: Sequence[Any]) -> np.ndarray:
        from mtrec.data.schema import dense_inputs

        raw = np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)
        return dense_inputs(self.dense_columns[name], raw, self.statistics.get(name))

    def ids(self, name: str, values: Sequence[Any], num_embeddings: int) -> list[int]:
        import pyarrow as pa

        from mtrec.data.schema import sparse_ids

        column = self.sparse_columns[name]
        values = list(values)
        if not column.is_list and len(values) != 1:
            raise ValueError(f"one id expected, got {values}")
        try:
            if column.is_list and not (len(values) == 1 and isinstance(values[0], str)):
                array = pa.array([values])
            else:
                array = pa.array(values)
            ids, lengths = sparse_ids(array, column, self.vocabularies.get(name))
        except (TypeError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ValueError(f"ids must be integers or strings, got {values} ({err})") from None
        return ids[0, : lengths[0]].tolist()


_ENCODINGS: dict[str, type[ValueEncoding]] = {
    CENSUS_SOURCE: CensusEncoding,
    ALIEXPRESS_SOURCE: AliExpressEncoding,
    FILES_SOURCE: FilesEncoding,
}


def value_encoding(meta: Mapping[str, Any] | None) -> ValueEncoding:
    """The rules of the reader named by ``meta["source"]`` (a bundle's ``meta``, a run's ``features.json``)."""
    meta = meta or {}
    return _ENCODINGS.get(str(meta.get("source", "")), ValueEncoding)(meta)
