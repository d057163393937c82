"""How raw feature values become model inputs, defined once for training and serving.

Export's :class:`mtrec.export.RawFeatureEncoder` encodes the raw rows a server receives by the rules of the reader
named in a run's ``features.json`` (``meta["source"]``, :func:`value_encoding`):

* ``files`` (:func:`mtrec.data.files.load_files`, and so Census-Income and AliExpress, which are schemas over it):
  :class:`FilesEncoding`, by the run's schema through the functions of :mod:`mtrec.data.schema` that built the
  training tensors (text rules, hashed ids, vocabularies, fill and transforms);
* anything else (the synthetic generators, whose values are model inputs already): :class:`ValueEncoding`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "FILES_SOURCE",
    "FilesEncoding",
    "ValueEncoding",
    "apply_vocab",
    "fit_vocab",
    "token_index",
    "value_encoding",
]

#: ``meta["source"]`` of the files data path (:func:`mtrec.data.files.load_files`).
FILES_SOURCE = "files"
#: The sources of the readers the files path replaced: their runs' encodings are no longer known.
_RETIRED_SOURCES = ("census-income", "aliexpress")


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


def token_index(vocabulary: Sequence[Any]) -> dict[str, int]:
    """``{token: id}``: id ``1 + position`` in the vocabulary (0 is out-of-vocabulary)."""
    return {str(v): i + 1 for i, v in enumerate(vocabulary)}


def _token(value: Any) -> str:
    """A string value as a vocabulary holds it: stripped (an integral float as an int, ``None`` empty)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def _token_ids(index: Mapping[str, int], values: Iterable[Any]) -> np.ndarray:
    return np.asarray([index.get(_token(v), 0) for v in values], dtype=np.int64)


# ------------------------------------------------------------------------------------- per-reader rules


class ValueEncoding:
    """The rules of one reader for turning raw values into input values, from the bundle's ``meta``.

    This base class holds the rules of readers without their own (the synthetic generators, whose values are
    model inputs already): a dense value is used as it is, standardised in float64 when ``meta`` has its mean and
    std; a sparse value goes through the feature's vocabulary when ``meta`` has one (strings by
    stripped, integer ids by :func:`apply_vocab`; missing or unseen: 0), else it is an id already,
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
            return _token_ids(self.token_vocab[name], values).tolist()
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


class FilesEncoding(ValueEncoding):
    """:func:`mtrec.data.files.load_files`: the run's schema (``meta["schema"]``), train statistics and
    vocabularies, applied by the functions that built the training tensors (:func:`mtrec.data.schema.dense_inputs`,
    :func:`mtrec.data.schema.sparse_ids` on a one-row pyarrow array), so a raw row gives bitwise the training
    tensors. A string value is cleaned by the schema's ``csv`` rules first (stripped; the empty string and
    ``null_values`` missing) and a dense one parsed by pyarrow, as a CSV cell is. A list feature keeps its first
    ``max_len`` ids; a lone string value of a list feature is split on the feature's separator (as a CSV cell is)."""

    truncates = True

    def __init__(self, meta: Mapping[str, Any] | None = None) -> None:
        from mtrec.data.schema import Schema, Vocabulary

        meta = meta or {}
        super().__init__({})
        schema = Schema.from_dict(meta.get("schema") or {})
        self.csv = schema.csv
        self.dense_columns = {d.name: d for d in schema.dense}
        self.sparse_columns = {s.name: s for s in schema.sparse}
        self.statistics: dict[str, Any] = dict(meta.get("statistics") or {})
        self.vocabularies = {k: Vocabulary(v) for k, v in (meta.get("vocabularies") or {}).items()}

    def has_vocabulary(self, name: str) -> bool:
        return name in self.vocabularies

    def _clean(self, value: Any) -> Any:
        """A string value by the schema's text rules (``None`` when missing); other values as they are."""
        if not isinstance(value, str) or self.csv is None:
            return value
        import pyarrow as pa

        from mtrec.data.schema import clean_text

        return clean_text(pa.array([value], pa.string()), self.csv)[0].as_py()

    def number(self, value: Any) -> float:
        value = self._clean(value)
        if isinstance(value, str):  # as the reader parses text: pyarrow's cast
            import pyarrow as pa

            try:
                return float(pa.scalar(value, pa.string()).cast(pa.float64()).as_py())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ValueError(f"non-numeric value {value!r}") from None
        return math.nan if value is None else float(value)

    def dense(self, name: str, values: Sequence[Any]) -> np.ndarray:
        from mtrec.data.schema import dense_inputs

        raw = np.asarray([self.number(v) for v in values], dtype=np.float64)
        return dense_inputs(self.dense_columns[name], raw, self.statistics.get(name))

    def ids(self, name: str, values: Sequence[Any], num_embeddings: int) -> list[int]:
        import pyarrow as pa

        from mtrec.data.schema import sparse_ids

        column = self.sparse_columns[name]
        values = [self._clean(v) for v in values]
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


def value_encoding(meta: Mapping[str, Any] | None) -> ValueEncoding:
    """The rules of the reader named by ``meta["source"]`` (a bundle's ``meta``, a run's ``features.json``).

    Raises:
        ValueError: the run was read by a Census-Income or AliExpress reader from before they became schemas of the
            files path (their encodings are gone: train the run again).
    """
    meta = meta or {}
    source = str(meta.get("source", ""))
    if source in _RETIRED_SOURCES:
        raise ValueError(
            f"features.json of a {source} run read by the reader that mtrec.data.files replaced; its raw-value "
            "encoding is no longer defined: train the run again (load_census / load_aliexpress now record "
            "source 'files')"
        )
    return FilesEncoding(meta) if source == FILES_SOURCE else ValueEncoding(meta)
