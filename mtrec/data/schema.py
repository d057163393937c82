"""The schema of a user's Parquet or CSV files, and the functions that turn its columns into model inputs.

A schema file (YAML) names the columns and their roles::

    dense:
      - {name: price, transform: log1p}        # none | log1p | standardize (mean/std of the train files)
      - {name: age, fill: 0}                   # the raw value a null (or NaN) becomes; default 0
    sparse:
      - {name: user_id, num_embeddings: 1000000}             # int or string ids, hashed
      - {name: history, num_embeddings: 200000, max_len: 50}  # a list column (CSV: a delimited string)
      - {name: country, num_embeddings: 300, vocabulary: {min_count: 5}}
      - {name: city, vocabulary: {min_count: 1}}             # num_embeddings left out: the vocabulary's size + 1
    labels:
      - {name: click, kind: binary}                # binary labels are 0 or 1
      - {name: dwell, kind: regression, on_null: skip}   # error (default) | skip the row
      - {name: rich, column: income, positive: ["50000+."], negative: ["- 50000."]}   # a text rule
      - {name: college, column: education, positive_prefix: [Bachelors, Masters]}
      - {name: ctcvr, all_of: [click, conversion]}  # 1 where every column is 1 (each must be 0 or 1)
    csv:                                           # optional: how CSV text is read (below)
      header: false                                # the files have no header line: give the columns
      columns: [age, education, income, ...]       # every field of a line, in order
      delimiter: ","                               # default ',' (tab for .tsv files)
      null_values: ["?"]                           # text that is a missing value (the empty string always is)
      strip: true                                  # strip spaces around every value first

The encoding rules, shared by the files reader (:mod:`mtrec.data.files`) and the serving-side encoder
(:class:`mtrec.data.encoding.FilesEncoding`, used by :class:`mtrec.export.RawFeatureEncoder`), so a raw row
encodes at serving time to bitwise the tensors training used:

* **Columns read**: the features and the *source* columns of the labels (a label's ``column``, by default its
  name, or its ``all_of`` columns). A label's source is never a feature; a column the schema does not name (an
  instance weight, an id) is not read.
* **Text** (a ``csv`` entry): CSV cells are read as text and converted here, so an error names the file, the
  line, the column and the value. ``strip`` and ``null_values`` apply to every text value, CSV cell, Parquet
  string or raw value served (:func:`clean_text`): stripped first, then the empty string or one of ``null_values``
  is missing (null). Without a ``csv`` entry pyarrow reads CSV columns by their types (the default null strings).
* **Derived labels** (``kind: binary``): ``positive`` / ``positive_prefix``: the value's text (an integer as its
  decimal string) is 1 when it is one of ``positive`` or starts with one of ``positive_prefix``; else 0, or, when
  ``negative`` is given, 0 only for those values and an error for any other. ``all_of``: 1 where every listed column
  is 1 (each must be 0 or 1). A missing source value is a null label (``on_null``).
* **Dense**: the raw value as float64, a null or NaN replaced by ``fill`` (a number, or ``mean``: the train mean, so
  a standardized missing value is 0); then ``log1p`` (values must be > -1)
  or ``standardize`` (``(x - mean) / std`` with the mean and population std of the non-null train values; a std
  of 0 becomes 1); then cast to float32.
* **Sparse ids, canonical key**: an integer id is its decimal string (``123`` and ``"123"`` are one id, so a CSV
  column read as text and a Parquet int64 column agree); an integral float (a pandas int column with nulls) is
  the integer; a string is itself. A null or the empty string is *missing*.
* **Hashing** (features without a vocabulary): ``id = 1 + xxh64(utf8(key), seed=HASH_SEED) % (num_embeddings -
  1)``, so hashed ids lie in ``[1, num_embeddings)`` and id 0 is reserved for a missing value (and for an
  out-of-vocabulary one). xxh64 is the 64-bit xxHash (``xxhash.xxh64_intdigest``), :data:`HASH_SEED` is fixed.
  Each chunk hashes its *distinct* keys once (``pyarrow.compute.dictionary_encode``) and gathers.
* **Vocabulary** (``vocabulary: {min_count: N}``): the keys seen at least ``N`` times in the train files, most
  frequent first (ties by key), at most ``num_embeddings - 1`` of them; id ``1 + position``, 0 for any other key.
  Without ``num_embeddings`` every such key is kept and ``num_embeddings`` is their count + 1 (at least 2), fitted
  on train (:meth:`Schema.fitted`; a run's ``features.json`` holds the fitted schema).
* **A scalar feature** (no ``max_len``) has exactly one id per row: 0 when missing. **A list feature**
  (``max_len`` given) drops missing elements, keeps the first ``max_len`` ids; a null or empty list has no id.
  In CSV a list is a string split on ``separator`` (default ``|``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from mtl.tasks import TaskSpec
from mtrec.data.batch import FeatureSpec, SparseFeature

__all__ = [
    "HASHING",
    "HASH_SEED",
    "CsvFormat",
    "DenseColumn",
    "LabelColumn",
    "Schema",
    "SparseColumn",
    "Vocabulary",
    "builtin_schema",
    "canonical_keys",
    "clean_text",
    "dense_inputs",
    "derive_label",
    "hash_keys",
    "load_schema",
    "sparse_ids",
]

#: The seed of the id hash (fixed: changing it changes every hashed id of every trained model).
HASH_SEED = 0x6D746C6962  # "mtlib"
#: How ids are hashed, as recorded in a run's ``features.json``.
HASHING = {
    "function": "xxh64",
    "seed": HASH_SEED,
    "key": "int: decimal string; integral float: the int; string: itself; UTF-8 bytes",
    "id": "1 + xxh64(key, seed) % (num_embeddings - 1); 0 = missing or out of vocabulary",
}
TRANSFORMS = ("none", "log1p", "standardize")
LABEL_KINDS = ("binary", "regression")
ON_NULL = ("error", "skip")
POOLINGS = ("sum", "mean")
_DENSE_KEYS = ("name", "transform", "fill")
_SPARSE_KEYS = ("name", "num_embeddings", "max_len", "pooling", "separator", "vocabulary")
_LABEL_KEYS = ("name", "kind", "on_null", "column", "positive", "positive_prefix", "negative", "all_of")
_VOCAB_KEYS = ("min_count",)
_CSV_KEYS = ("header", "columns", "delimiter", "null_values", "strip")
_TOP_KEYS = ("dense", "sparse", "labels", "csv")
#: The schemas shipped with the package (``mtrec/data/schemas/NAME.yaml``): :func:`builtin_schema`.
SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"


@dataclass(frozen=True)
class DenseColumn:
    name: str
    transform: str = "none"
    fill: float | str = 0.0  # a number, or "mean": the train mean


@dataclass(frozen=True)
class CsvFormat:
    """How CSV text is read (the schema's ``csv`` entry); ``strip`` and ``null_values`` apply to all text."""

    header: bool = True
    columns: tuple[str, ...] = ()  # the fields of a line, in order (required without a header)
    delimiter: str | None = None  # None: ',' (tab for .tsv files)
    null_values: tuple[str, ...] = ()
    strip: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"header": self.header, "null_values": list(self.null_values), "strip": self.strip}
        if self.columns:
            out["columns"] = list(self.columns)
        if self.delimiter is not None:
            out["delimiter"] = self.delimiter
        return out


@dataclass(frozen=True)
class SparseColumn:
    name: str
    num_embeddings: int | None  # None: fitted, the vocabulary's size + 1 (a vocabulary is required)
    max_len: int | None = None  # None: a scalar column (one id per row)
    pooling: str = "sum"
    separator: str = "|"
    min_count: int | None = None  # a vocabulary of the keys seen at least min_count times in train

    @property
    def is_list(self) -> bool:
        return self.max_len is not None

    @property
    def length(self) -> int:
        return self.max_len if self.max_len is not None else 1


@dataclass(frozen=True)
class LabelColumn:
    name: str
    kind: str = "binary"
    on_null: str = "error"
    column: str | None = None  # the raw column (None: the label's name)
    positive: tuple[str, ...] = ()  # text rule: these values are 1
    positive_prefix: tuple[str, ...] = ()  # text rule: values starting with one of these are 1
    negative: tuple[str, ...] | None = None  # text rule: these are 0 and any other value an error (None: all others 0)
    all_of: tuple[str, ...] = ()  # 1 where every one of these 0/1 columns is 1

    @property
    def is_text_rule(self) -> bool:
        return bool(self.positive or self.positive_prefix)

    @property
    def sources(self) -> tuple[str, ...]:
        """The raw columns the label is computed from."""
        return self.all_of or (self.column or self.name,)


@dataclass(frozen=True)
class Schema:
    """The columns of a dataset by role (see the module docstring)."""

    dense: tuple[DenseColumn, ...] = ()
    sparse: tuple[SparseColumn, ...] = ()
    labels: tuple[LabelColumn, ...] = ()
    csv: CsvFormat | None = None
    source: str = field(default="", compare=False)  # the schema file, for messages

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError(f"{self._where()}: 'labels' is empty; name at least one label column")
        seen: dict[str, str] = {}
        for role, entries in (("dense", self.dense), ("sparse", self.sparse), ("labels", self.labels)):
            for e in entries:
                if e.name in seen:
                    raise ValueError(f"{self._where()}: column {e.name!r} appears in {seen[e.name]} and in {role}")
                seen[e.name] = role
        text: dict[str, str] = {}  # source column -> the label that reads it as text / as numbers
        numeric: dict[str, str] = {}
        for label in self.labels:
            for col in label.sources:
                if seen.get(col) in ("dense", "sparse"):
                    raise ValueError(
                        f"{self._where()}: column {col!r} is the source of label {label.name!r} and in "
                        f"{seen[col]}; a label's source is not a feature"
                    )
                (text if label.is_text_rule else numeric)[col] = label.name
        both = sorted(set(text) & set(numeric))
        if both:
            raise ValueError(
                f"{self._where()}: column {both[0]!r} is text for label {text[both[0]]!r} (positive) and numbers "
                f"for label {numeric[both[0]]!r}"
            )
        for s in self.sparse:
            if s.num_embeddings is None and s.min_count is None:
                raise ValueError(f"{self._where()}: sparse {s.name!r}: num_embeddings is required without a vocabulary")
        if self.csv is not None and not self.csv.header:
            absent = [c for c in self.columns if c not in self.csv.columns]
            if absent:
                raise ValueError(
                    f"{self._where()}: csv.columns lacks {', '.join(map(repr, absent))}, which the schema reads"
                )

    def _where(self) -> str:
        return f"schema {self.source}" if self.source else "schema"

    @property
    def columns(self) -> list[str]:
        """The raw columns read: the features, then the labels' source columns (each once)."""
        names = [e.name for e in (*self.dense, *self.sparse)]
        return names + list(dict.fromkeys(c for label in self.labels for c in label.sources))

    @property
    def text_columns(self) -> set[str]:
        """The raw columns read as text: the sparse ids and the sources of text-rule labels."""
        return {s.name for s in self.sparse} | {label.sources[0] for label in self.labels if label.is_text_rule}

    def with_labels(self, names: Sequence[str]) -> Schema:
        """The schema with only the labels ``names``, in that order.

        Raises:
            ValueError: a name that is no label of the schema.
        """
        by_name = {label.name: label for label in self.labels}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"{self._where()}: no label {unknown[0]!r}; labels: {', '.join(by_name)}")
        return replace(self, labels=tuple(by_name[n] for n in names))

    def fitted(self, vocabularies: Mapping[str, Sequence[str]]) -> Schema:
        """The schema with each left-out ``num_embeddings`` set to its fitted vocabulary's size + 1 (at least 2)."""
        sparse = tuple(
            replace(s, num_embeddings=max(2, len(vocabularies[s.name]) + 1)) if s.num_embeddings is None else s
            for s in self.sparse
        )
        return replace(self, sparse=sparse)

    def feature_spec(self) -> FeatureSpec:
        """The model's features (every ``num_embeddings`` known: a schema :meth:`fitted` on train)."""
        unfitted = [s.name for s in self.sparse if s.num_embeddings is None]
        if unfitted:
            raise ValueError(f"{self._where()}: num_embeddings of {unfitted} is fitted on train (Schema.fitted)")
        return FeatureSpec(
            dense_names=tuple(d.name for d in self.dense),
            sparse=tuple(SparseFeature(s.name, s.num_embeddings, s.length, s.pooling) for s in self.sparse),  # type: ignore[arg-type]
        )

    def tasks(self) -> list[TaskSpec]:
        return [TaskSpec(label.name, label.kind) for label in self.labels]  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The schema file's form (:meth:`from_dict` inverts it); stored in a run's ``features.json``."""
        sparse = []
        for s in self.sparse:
            entry: dict[str, Any] = {"name": s.name, "num_embeddings": s.num_embeddings, "pooling": s.pooling}
            if s.max_len is not None:
                entry.update(max_len=s.max_len, separator=s.separator)
            if s.min_count is not None:
                entry["vocabulary"] = {"min_count": s.min_count}
            sparse.append(entry)
        out: dict[str, Any] = {
            "dense": [{"name": d.name, "transform": d.transform, "fill": d.fill} for d in self.dense],
            "sparse": sparse,
            "labels": [_label_dict(label) for label in self.labels],
        }
        if self.csv is not None:
            out["csv"] = self.csv.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str = "") -> Schema:
        """Parse and validate a schema (an unknown key or value names the entry and the valid ones).

        Raises:
            ValueError: what is wrong, where (``dense[1].transform``), and what is allowed.
        """
        where = f"schema {source}" if source else "schema"
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping with keys dense, sparse, labels; got {type(d).__name__}")
        unknown = sorted(set(d) - set(_TOP_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: dense, sparse, labels, csv")
        return cls(
            dense=tuple(_dense(e, f"{where} dense[{i}]") for i, e in enumerate(_entries(d, "dense", where))),
            sparse=tuple(_sparse(e, f"{where} sparse[{i}]") for i, e in enumerate(_entries(d, "sparse", where))),
            labels=tuple(_label(e, f"{where} labels[{i}]") for i, e in enumerate(_entries(d, "labels", where))),
            csv=_csv(d["csv"], f"{where} csv") if d.get("csv") is not None else None,
            source=source,
        )


def load_schema(path: str | Path) -> Schema:
    """The schema in a YAML file (:meth:`Schema.from_dict`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"schema file {path} not found (config key data.schema)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"schema {path}: not YAML: {err}") from None
    return Schema.from_dict(raw, source=str(path))


def builtin_schema(name: str) -> Schema:
    """A schema shipped with the package (``census``, ``aliexpress``: ``mtrec/data/schemas/NAME.yaml``)."""
    path = SCHEMAS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SCHEMAS_DIR.glob("*.yaml"))
        raise ValueError(f"no built-in schema {name!r}; built-in schemas: {', '.join(known)}")
    return load_schema(path)


def _entries(d: Mapping[str, Any], role: str, where: str) -> list[Mapping[str, Any]]:
    entries = d.get(role) or []
    if not isinstance(entries, list):
        raise ValueError(f"{where}: {role!r} must be a list of entries, got {type(entries).__name__}")
    return entries


def _check_entry(e: Any, where: str, keys: Sequence[str]) -> None:
    if not isinstance(e, Mapping) or "name" not in e:
        raise ValueError(f"{where}: expected a mapping with at least 'name', got {e!r}")
    unknown = sorted(set(e) - set(keys))
    if unknown:
        raise ValueError(f"{where} ({e['name']!r}): unknown key {unknown[0]!r}; valid keys: {', '.join(keys)}")


def _choice(e: Mapping[str, Any], key: str, valid: Sequence[str], default: str, where: str) -> str:
    value = e.get(key, default)
    if value not in valid:
        raise ValueError(f"{where} ({e['name']!r}): {key} {value!r} is not one of {', '.join(valid)}")
    return str(value)


def _positive_int(e: Mapping[str, Any], key: str, where: str, minimum: int = 1) -> int:
    value = e[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} ({e['name']!r}): {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _dense(e: Any, where: str) -> DenseColumn:
    _check_entry(e, where, _DENSE_KEYS)
    fill = e.get("fill", 0.0)
    if fill != "mean" and (isinstance(fill, bool) or not isinstance(fill, (int, float)) or not np.isfinite(fill)):
        raise ValueError(f"{where} ({e['name']!r}): fill must be a finite number or 'mean', got {fill!r}")
    return DenseColumn(
        str(e["name"]), _choice(e, "transform", TRANSFORMS, "none", where), "mean" if fill == "mean" else float(fill)
    )


def _sparse(e: Any, where: str) -> SparseColumn:
    _check_entry(e, where, _SPARSE_KEYS)
    if e.get("num_embeddings") is None and e.get("vocabulary") is None:
        raise ValueError(
            f"{where} ({e['name']!r}): num_embeddings is required (the size of the id space; only a feature with a "
            "vocabulary may leave it out, to have the vocabulary's size + 1)"
        )
    min_count = None
    if e.get("vocabulary") is not None:
        vocab = e["vocabulary"]
        if not isinstance(vocab, Mapping) or "min_count" not in vocab:
            raise ValueError(f"{where} ({e['name']!r}): vocabulary must be {{min_count: N}}, got {vocab!r}")
        bad = sorted(set(vocab) - set(_VOCAB_KEYS))
        if bad:
            raise ValueError(f"{where} ({e['name']!r}): unknown vocabulary key {bad[0]!r}; valid keys: min_count")
        min_count = _positive_int({"name": e["name"], **vocab}, "min_count", where)
    separator = e.get("separator", "|")
    if not isinstance(separator, str) or not separator:
        raise ValueError(f"{where} ({e['name']!r}): separator must be a non-empty string, got {separator!r}")
    return SparseColumn(
        name=str(e["name"]),
        num_embeddings=None if e.get("num_embeddings") is None else _positive_int(e, "num_embeddings", where, 2),
        max_len=_positive_int(e, "max_len", where) if e.get("max_len") is not None else None,
        pooling=_choice(e, "pooling", POOLINGS, "sum", where),
        separator=separator,
        min_count=min_count,
    )


def _strings(e: Mapping[str, Any], key: str, where: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    value = e.get(key)
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where} ({e['name']!r}): {key} must be a list of strings, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{where} ({e['name']!r}): {key} is empty")
    return tuple(str(v) for v in value)


def _label(e: Any, where: str) -> LabelColumn:
    _check_entry(e, where, _LABEL_KEYS)
    kind = _choice(e, "kind", LABEL_KINDS, "binary", where)
    name = str(e["name"])
    rules = [k for k in ("positive", "positive_prefix", "negative", "all_of") if e.get(k) is not None]
    if rules and kind != "binary":
        raise ValueError(f"{where} ({name!r}): {rules[0]} makes a binary label; kind is {kind!r}")
    if e.get("negative") is not None and e.get("positive") is None and e.get("positive_prefix") is None:
        raise ValueError(f"{where} ({name!r}): negative needs positive or positive_prefix")
    if e.get("all_of") is not None and (e.get("column") is not None or len(rules) > 1):
        raise ValueError(f"{where} ({name!r}): all_of names the label's columns; it takes no column or text rule")
    column = e.get("column")
    if column is not None and (not isinstance(column, str) or not column):
        raise ValueError(f"{where} ({name!r}): column must be a column name, got {column!r}")
    return LabelColumn(
        name,
        kind,
        _choice(e, "on_null", ON_NULL, "error", where),
        column=column,
        positive=_strings(e, "positive", where, allow_empty=True) if e.get("positive") is not None else (),
        positive_prefix=_strings(e, "positive_prefix", where) if e.get("positive_prefix") is not None else (),
        negative=_strings(e, "negative", where) if e.get("negative") is not None else None,
        all_of=_strings(e, "all_of", where) if e.get("all_of") is not None else (),
    )


def _label_dict(label: LabelColumn) -> dict[str, Any]:
    out: dict[str, Any] = {"name": label.name, "kind": label.kind, "on_null": label.on_null}
    if label.column is not None:
        out["column"] = label.column
    for key in ("positive", "positive_prefix", "all_of"):
        if getattr(label, key):
            out[key] = list(getattr(label, key))
    if label.negative is not None:
        out["negative"] = list(label.negative)
    return out


def _csv(e: Any, where: str) -> CsvFormat:
    if not isinstance(e, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(_CSV_KEYS)}, got {e!r}")
    unknown = sorted(set(e) - set(_CSV_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_CSV_KEYS)}")
    for key in ("header", "strip"):
        if key in e and not isinstance(e[key], bool):
            raise ValueError(f"{where}: {key} must be true or false, got {e[key]!r}")
    header = e.get("header", True)
    named = {"name": "csv", **e}
    columns = _strings(named, "columns", where) if e.get("columns") is not None else ()
    if not header and not columns:
        raise ValueError(f"{where}: header: false needs columns, the names of a line's fields in order")
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise ValueError(f"{where}: columns lists {dupes[0]!r} twice")
    delimiter = e.get("delimiter")
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1):
        raise ValueError(f"{where}: delimiter must be one character, got {delimiter!r}")
    nulls = _strings(named, "null_values", where, allow_empty=True) if e.get("null_values") is not None else ()
    return CsvFormat(header, columns, delimiter, nulls, bool(e.get("strip", False)))


# ----------------------------------------------------------------------------------------------- text


def clean_text(values: pa.Array, csv: CsvFormat | None) -> pa.Array:
    """Text values by the schema's ``csv`` rules: stripped (``strip``), then the empty string and ``null_values``
    null. Other types (and any column of a schema without a ``csv`` entry) are returned as they are."""
    if csv is None:
        return values
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return values
    if csv.strip:
        values = pc.utf8_trim_whitespace(values)
    missing = pc.equal(values, "")
    if csv.null_values:
        missing = pc.or_(missing, pc.is_in(values, value_set=pa.array(csv.null_values, values.type)))
    return pc.if_else(missing, pa.scalar(None, values.type), values)


class LabelValueError(ValueError):
    """A value a label rule refuses: its row in the chunk and its column (the reader adds the file and line)."""

    def __init__(self, row: int, column: str, message: str) -> None:
        super().__init__(message)
        self.row, self.column = row, column


def derive_label(label: LabelColumn, columns: Mapping[str, pa.Array | np.ndarray]) -> np.ndarray:
    """float64 values of a label (NaN: null) from its source columns: text (:func:`clean_text` applied) for a
    text rule, float64 arrays (NaN: null) otherwise; a plain label is its column.

    Raises:
        LabelValueError: a binary value other than 0 or 1, or (with ``negative``) a value neither positive nor
            negative.
    """
    if label.is_text_rule:
        col = label.sources[0]
        keys = canonical_keys(columns[col])  # type: ignore[arg-type]
        null = keys.is_null().to_numpy(zero_copy_only=False)
        hit = pc.is_in(keys, value_set=pa.array(label.positive, pa.string()))
        for prefix in label.positive_prefix:
            hit = pc.or_(hit, pc.starts_with(keys, prefix))
        y = pc.fill_null(hit, False).to_numpy(zero_copy_only=False).astype(np.float64)
        if label.negative is not None:
            neg = pc.fill_null(pc.is_in(keys, value_set=pa.array(label.negative, pa.string())), False)
            bad = ~null & (y == 0) & ~neg.to_numpy(zero_copy_only=False)
            if bad.any():
                row = int(np.argmax(bad))
                allowed = [*label.positive, *(f"{p}..." for p in label.positive_prefix), *label.negative]
                raise LabelValueError(
                    row,
                    col,
                    f"label {label.name!r}: value {keys[row].as_py()!r} not recognised (expected one of "
                    f"{', '.join(map(repr, allowed))})",
                )
        y[null] = np.nan
        return y
    values = [np.asarray(columns[c], dtype=np.float64) for c in label.sources]
    if label.kind == "binary":
        for c, v in zip(label.sources, values):
            bad = ~np.isnan(v) & (v != 0) & (v != 1)
            if bad.any():
                row = int(np.argmax(bad))
                raise LabelValueError(
                    row, c, f"binary label {label.name!r}: value {v[row]:g} of column {c!r} is not 0 or 1"
                )
    return np.minimum.reduce(values) if len(values) > 1 else values[0]


# ---------------------------------------------------------------------------------------------- dense


def dense_inputs(column: DenseColumn, raw: np.ndarray, stats: Mapping[str, float] | None = None) -> np.ndarray:
    """float32 inputs of a dense column from its float64 raw values (NaN: null).

    Raises:
        ValueError: ``log1p`` of a value <= -1, or ``standardize`` without statistics.
    """
    fill = column.fill
    if fill == "mean":
        if stats is None:
            raise ValueError(f"dense {column.name!r}: fill 'mean' needs the train mean")
        fill = float(stats["mean"])
    x = np.where(np.isnan(raw), fill, raw)
    if column.transform == "log1p":
        if (x <= -1).any():
            raise ValueError(f"dense {column.name!r}: log1p needs values > -1, got {float(x[x <= -1][0])}")
        x = np.log1p(x)
    elif column.transform == "standardize":
        if stats is None:
            raise ValueError(f"dense {column.name!r}: standardize needs the train mean and std")
        x = (x - float(stats["mean"])) / float(stats["std"])
    return np.ascontiguousarray(x, dtype=np.float64).astype(np.float32)


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of a stream of values (Chan et al.'s parallel update)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: np.ndarray) -> None:
        values = values[~np.isnan(values)]
        n = int(values.size)
        if n == 0:
            return
        mean = float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def stats(self) -> dict[str, float]:
        std = float(np.sqrt(self.m2 / self.count)) if self.count else 0.0
        return {"mean": self.mean, "std": std if std > 0 and np.isfinite(std) else 1.0, "count": self.count}


# --------------------------------------------------------------------------------------------- sparse


def canonical_keys(values: pa.Array) -> pa.Array:
    """The canonical string keys of an id column (see the module docstring); missing values are null.

    Raises:
        TypeError: a column of another type (bool, a non-integral float, a nested type).
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if pa.types.is_dictionary(t):
        values = values.dictionary_decode()
        t = values.type
    if pa.types.is_floating(t):
        ok = pc.fill_null(pc.equal(pc.floor(values), values), True)
        if not pc.all(ok).as_py():
            raise TypeError(f"an id column of {t} with non-integral values")
        values = pc.cast(values, pa.int64())
        t = values.type
    if pa.types.is_integer(t):
        return pc.cast(values, pa.string())
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        values = pc.cast(values, pa.string())
    elif pa.types.is_null(t):
        return pa.nulls(len(values), pa.string())
    elif not pa.types.is_string(t):
        raise TypeError(f"ids must be integers or strings, got {t}")
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)


def hash_keys(keys: Iterable[str], num_embeddings: int) -> np.ndarray:
    """int64 ids ``1 + xxh64(key, HASH_SEED) % (num_embeddings - 1)`` of canonical keys (one Python hash each)."""
    h = np.fromiter((xxhash.xxh64_intdigest(k.encode(), HASH_SEED) for k in keys), dtype=np.uint64)
    return (h % np.uint64(num_embeddings - 1)).astype(np.int64) + 1


class Vocabulary:
    """Keys by id (id ``1 + position``; 0: any other key)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)
        self._array = pa.array(self.tokens, pa.string())

    @classmethod
    def fit(cls, counts: Mapping[str, int], min_count: int, size: int | None) -> Vocabulary:
        """The keys counted at least ``min_count`` times, most frequent first (ties by key), at most ``size``."""
        kept = sorted((k for k, c in counts.items() if c >= min_count), key=lambda k: (-counts[k], k))
        return cls(kept[:size])

    def ids(self, keys: pa.Array) -> np.ndarray:
        index = pc.index_in(keys, value_set=self._array)
        return pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1


def key_ids(keys: pa.Array, column: SparseColumn, vocabulary: Vocabulary | None) -> np.ndarray:
    """int64 ids of canonical keys (null: 0), through the vocabulary or the hash of each distinct key."""
    if vocabulary is not None:
        return vocabulary.ids(keys)
    encoded = pc.dictionary_encode(keys)
    hashed = np.concatenate([[0], hash_keys(encoded.dictionary.to_pylist(), column.num_embeddings)])
    index = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return hashed[index + 1]


def count_keys(values: pa.Array, column: SparseColumn, counts: Counter[str]) -> None:
    """Add the occurrences of the non-missing keys of a column chunk to ``counts`` (vocabulary fitting)."""
    keys = _element_keys(values, column)[0]
    vc = pc.value_counts(pc.drop_null(keys))
    counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)))


def _element_keys(values: pa.Array, column: SparseColumn) -> tuple[pa.Array, np.ndarray | None]:
    """The canonical keys of every element, and (list columns) the row of each element."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if column.is_list and (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = pc.split_pattern(values, column.separator)
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        return canonical_keys(values), None
    lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(values)
    return canonical_keys(flat), np.repeat(np.arange(len(values)), lengths)


def sparse_ids(
    values: pa.Array, column: SparseColumn, vocabulary: Vocabulary | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Padded ids ``int64 [N, length]`` (0 after the valid ones) and lengths ``int64 [N]`` of a column chunk.

    Raises:
        TypeError: a list column for a scalar feature (no ``max_len``), or a type ids cannot have.
    """
    n = len(values)
    if not column.is_list and (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        raise TypeError(f"a list column ({values.type}) where a scalar is expected; give max_len for a list feature")
    keys, rows = _element_keys(values, column)
    ids = key_ids(keys, column, vocabulary)
    padded = np.zeros((n, column.length), dtype=np.int64)
    if rows is None:  # a scalar per row: exactly one id (0 when missing)
        padded[:, 0] = ids
        return padded, np.ones(n, dtype=np.int64)
    present = keys.is_valid().to_numpy(zero_copy_only=False)
    rows, ids = rows[present], ids[present]
    counts = np.bincount(rows, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(rows.size) - starts[rows]
    keep = pos < column.length
    padded[rows[keep], pos[keep]] = ids[keep]
    return padded, np.minimum(counts, column.length).astype(np.int64)
