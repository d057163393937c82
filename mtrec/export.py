"""A trained ``mtrec-train`` run -> ONNX -> a Triton-layout model repository (the library of ``mtrec-export``,
whose command line is :mod:`mtrec.cli.export`).

Examples::

    mtrec-export run_dir=outputs/mtrec/2025-01-01/12-00-00 repository=models model_name=ranker
    mtrec-export run_dir=RUN repository=models model_name=ranker version=7 fp16=true
    mtrec-export run_dir=RUN repository=models model_name=ranker serving.max_batch_size=256 checkpoint=last

The recommendation side of serving (the generic side is :mod:`serving.export`):

* :class:`RecExportView` turns a :class:`~mtrec.models.base.MultiTaskModel` into an export view. A
  KeyedJaggedTensor cannot be an ONNX input and ``nn.EmbeddingBag`` exports as a slow ONNX ``Loop``
  (docs/architecture.md, "Dependency facts"), so every :class:`~mtrec.models.inputs.InputArch` of a copy of
  the model is replaced by a :class:`PaddedInputArch`: the same maths on padded ids (a gather from the copied
  TorchRec table weights, then a masked sum or mean), the same dense arch.

  Inputs: ``dense`` ``FP32 [B, D]`` (absent when ``D == 0``) and, for each sparse feature ``f``,
  ``f_ids`` ``INT64 [B, max_len]`` (row ``b``'s ids first, the rest any padding) plus ``f_lengths``
  ``INT64 [B, 1]``, the number of valid ids in the row (0: an empty bag). Lengths rather than a mask:
  one number per row instead of ``max_len``, and the layout of :class:`~mtrec.data.batch.TabularDataset`.
  ``[B, 1]`` rather than ``[B]`` because Triton requires non-empty ``dims`` for every tensor of a
  batching model (a ``[B]`` tensor would need a ``reshape`` entry, which ``config.pbtxt`` here does not
  carry).

  Outputs: one ``FP32 [B, 1]`` tensor per task, named after the task: the probability
  (``sigmoid`` of the logit) for a binary task, the prediction itself for a regression task. For ESMM
  the ``ctcvr`` output is the logit of ``pCTR * pCVR`` (:func:`~mtrec.models.esmm.product_logit`), so
  its probability is ``pCTCVR``.
* :func:`serving_features`: the repository's ``features.json``: the run's ``features.json`` (feature
  spec, tasks, reader metadata such as vocabularies and numeric mean/std) plus which ONNX input every
  feature feeds, its dtype and padding length, and what every output means.
* :class:`RawFeatureEncoder`: raw rows (dicts of raw values) -> the model's input arrays, as the
  training reader encoded them (vocabulary lookup with out-of-vocabulary id 0, standardisation with the
  stored train mean/std), by the reader's own rules (:mod:`mtrec.data.encoding`).
* :func:`export_run` (what ``mtrec-export`` runs): load a run's checkpoint and config (:func:`load_run`,
  which refuses a directory that is no ``mtrec-train`` run), build the view, and write a new version with
  :func:`serving.export.export_to_repository`.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from mtl.checkpoint import load_checkpoint
from mtrec.data.batch import FeatureSpec, build_kjt
from mtrec.data.encoding import ValueEncoding, value_encoding
from mtrec.data.errors import InputNotFoundError
from mtrec.models import build_model
from mtrec.models.base import MultiTaskModel
from mtrec.models.inputs import InputArch, table_name
from mtrec.trainer import BEST, BEST_SHARDED, LAST, LAST_SHARDED
from serving.export import (
    ExportResult,
    ParityOptions,
    ServingOptions,
    TensorSpec,
    export_to_repository,
)

__all__ = [
    "FEATURES_FILE",
    "ExportConfig",
    "PaddedInputArch",
    "RawFeatureEncoder",
    "RecExportView",
    "RunArtifacts",
    "export_run",
    "check_run_dir",
    "load_run",
    "serving_features",
]

log = logging.getLogger("mtrec.export")

FEATURES_FILE = "features.json"
DENSE_INPUT = "dense"
TASK_KINDS = ("binary", "regression")


def ids_input(feature: str) -> str:
    """The ONNX input holding a sparse feature's padded ids."""
    return f"{feature}_ids"


def lengths_input(feature: str) -> str:
    """The ONNX input holding a sparse feature's per-row id counts."""
    return f"{feature}_lengths"


# ----------------------------------------------------------------------------------- the export-friendly arch


class _BagGroup(nn.Module):
    """The sparse features of one padding length ``L``, pooled from one concatenated table.

    ``forward(ids [B, k, L], lengths [B, k]) -> [B, k, E]``: feature ``j`` of row ``b`` pools
    ``table_j[ids[b, j, :lengths[b, j]]]``, the sum or (``mean`` features) the sum divided by the bag size,
    which is TorchRec's SUM / MEAN pooling (``nn.EmbeddingBag``); an empty bag gives zeros for both, as
    TorchRec does.

    How, for ONNX Runtime: the ``k`` tables are stacked into one ``[sum N_j + 1, E]`` table whose last row
    is zeros, feature ``j``'s ids are shifted by its offset, and padding positions read the zero row. A
    group then costs one ``Gather`` and one ``ReduceSum`` however many features it holds (a gather per
    feature costs about 7 ONNX nodes each: ~0.25 ms instead of ~0.1 ms at batch 1 for Census-Income's 33
    features), and no mask multiply (the zero row adds exact zeros, so sums equal the masked ones).
    Lengths are clamped to ``[0, L]``; valid positions holding an id outside ``[0, N_j)`` read feature
    ``j``'s row 0, the out-of-vocabulary id of mtrec's readers (ONNX ``Gather`` would wrap a negative id
    around and fail on a too large one).
    """

    def __init__(self, names: Sequence[str], tables: Sequence[Tensor], max_len: int, poolings: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(names)
        self.max_len = int(max_len)
        sizes = [int(t.shape[0]) for t in tables]
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        zero = tables[0].new_zeros(1, tables[0].shape[1])
        self.table = nn.Parameter(torch.cat([*(t.detach() for t in tables), zero]).clone(), requires_grad=False)
        self.zero_row = sum(sizes)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.int64).view(1, -1, 1))
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64).view(1, -1, 1))
        self.has_mean = self.max_len > 1 and any(p == "mean" for p in poolings)  # a bag of <= 1 id: mean = sum
        self.register_buffer("is_mean", torch.tensor([p == "mean" for p in poolings]).view(1, -1, 1))

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        n = lengths.clamp(0, self.max_len).unsqueeze(-1)  # [B, k, 1]
        valid = torch.arange(self.max_len, device=ids.device).view(1, 1, -1) < n  # [B, k, L]
        known = torch.where((ids >= 0) & (ids < self.sizes), ids, torch.zeros_like(ids))
        rows = torch.where(valid, known + self.offsets, torch.full_like(ids, self.zero_row))
        emb = F.embedding(rows, self.table)  # [B, k, L, E]
        if self.max_len == 1:
            return emb.squeeze(2)
        pooled = emb.sum(dim=2)
        if self.has_mean:
            pooled = pooled / torch.where(self.is_mean, n.clamp(min=1), torch.ones_like(n)).to(pooled.dtype)
        return pooled


class PaddedInputArch(nn.Module):
    """:class:`~mtrec.models.inputs.InputArch` on padded ids instead of a KeyedJaggedTensor.

    ``forward(dense, sparse)`` with ``dense [B, D]`` (``None`` when ``D == 0``) and
    ``sparse = {feature: (ids [B, max_len], lengths [B, 1])}`` gives what the original arch gives for the
    same rows: the pooled embeddings in ``FeatureSpec.sparse`` order (tables copied from the
    ``EmbeddingBagCollection``, features of equal ``max_len`` pooled together by one :class:`_BagGroup`),
    then the dense arch's output (the same module).

    Example::

        >>> from mtrec.data.batch import FeatureSpec, SparseFeature
        >>> features = FeatureSpec(("age",), (SparseFeature("tags", 50, max_len=3, pooling="mean"),))
        >>> arch = PaddedInputArch(InputArch(features, embedding_dim=4))
        >>> ids, lengths = torch.tensor([[1, 2, 0], [0, 0, 0]]), torch.tensor([[2], [0]])
        >>> arch(torch.randn(2, 1), {"tags": (ids, lengths)}).shape
        torch.Size([2, 5])
    """

    def __init__(self, arch: InputArch) -> None:
        super().__init__()
        if not isinstance(arch, InputArch):
            raise TypeError(f"PaddedInputArch wraps an InputArch, got {type(arch).__name__}")
        self.features = arch.features
        self.out_dim = arch.out_dim
        tables: dict[str, Tensor] = {}
        if self.features.sparse:
            assert arch.ebc is not None
            bags = arch.ebc.embedding_bags
            for f in self.features.sparse:
                if table_name(f.name) not in bags:
                    raise ValueError(f"the EmbeddingBagCollection has no table {table_name(f.name)!r} for {f.name!r}")
                tables[f.name] = bags[table_name(f.name)].weight
        by_len: dict[int, list[Any]] = {}
        for f in self.features.sparse:
            by_len.setdefault(f.max_len, []).append(f)
        self.groups = nn.ModuleList(
            _BagGroup([f.name for f in fs], [tables[f.name] for f in fs], max_len, [f.pooling for f in fs])
            for max_len, fs in by_len.items()
        )
        grouped = [name for g in self.groups for name in g.names]
        self.order: list[int] | None = None  # position in group order of each feature, in spec order
        if grouped != list(self.features.sparse_names):
            self.order = [grouped.index(name) for name in self.features.sparse_names]
        self.dense_arch = arch.dense_arch

    def forward(self, dense: Tensor | None, sparse: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        for f in self.features.sparse:
            if f.name not in sparse:
                raise ValueError(f"sparse input lacks feature {f.name!r}; it has {sorted(sparse)}")
            ids, lengths = sparse[f.name]
            if ids.dim() != 2 or ids.shape[1] != f.max_len:
                raise ValueError(f"{ids_input(f.name)} must be [B, {f.max_len}], got {tuple(ids.shape)}")
            if lengths.dim() != 2 or lengths.shape[1] != 1:
                raise ValueError(f"{lengths_input(f.name)} must be [B, 1], got {tuple(lengths.shape)}")
        parts: list[Tensor] = []
        if len(self.groups):
            blocks = [
                group(
                    # one Concat, then [B, k * L] -> [B, k, L] (a stack would add an Unsqueeze per feature)
                    torch.cat([sparse[name][0] for name in group.names], dim=1).unflatten(1, (-1, group.max_len)),
                    torch.cat([sparse[name][1] for name in group.names], dim=1),
                )
                for group in self.groups
            ]
            pooled = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)  # [B, F, E]
            if self.order is not None:
                pooled = pooled[:, self.order]
            parts.append(pooled.flatten(1))
        if self.dense_arch is not None:
            if dense is None or dense.dim() != 2 or dense.shape[1] != self.features.dense_dim:
                got = None if dense is None else tuple(dense.shape)
                raise ValueError(f"dense must be [B, {self.features.dense_dim}], got {got}")
            parts.append(self.dense_arch(dense))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def export_copy(model: MultiTaskModel) -> MultiTaskModel:
    """A deep copy of ``model`` in eval mode with every ``InputArch`` replaced by a :class:`PaddedInputArch`
    (a model may hold several, e.g. one per task in ``SingleTask``); the copy takes ``(dense, sparse)`` with
    ``sparse = {feature: (ids, lengths)}``."""
    clone = copy.deepcopy(model).eval()
    targets = [(name, m) for name, m in clone.named_modules() if isinstance(m, InputArch)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no InputArch to replace; is it an mtrec model?")
    for name, arch in targets:
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        parent._modules[child] = PaddedInputArch(arch)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


# ------------------------------------------------------------------------------------------- the export view


class RecExportView(nn.Module):
    """The export view (:mod:`serving.export`) of a multi-task recommendation model.

    Inputs, outputs and their meaning: see the module docstring. ``reference(**inputs)`` runs the
    original model (TorchRec ``EmbeddingBagCollection``) on a KeyedJaggedTensor built from the same padded
    ids with :func:`~mtrec.data.batch.build_kjt`, which is what the parity check compares ONNX Runtime
    against. The view holds its own copy of the weights, taken at construction.

    Args:
        model: a trained :class:`~mtrec.models.base.MultiTaskModel`.
        task_kinds: ``{task: "binary" | "regression"}`` for every task of the model.

    Example::

        >>> from mtrec.data.batch import FeatureSpec, SparseFeature
        >>> from mtrec.models import InputArch, MMoE
        >>> features = FeatureSpec(("age",), (SparseFeature("city", 100),))
        >>> model = MMoE(InputArch(features), ["ctr", "dwell"])
        >>> view = RecExportView(model, {"ctr": "binary", "dwell": "regression"})
        >>> [s.name for s in view.input_specs], [s.name for s in view.output_specs]
        (['dense', 'city_ids', 'city_lengths'], ['ctr', 'dwell'])
    """

    def __init__(self, model: MultiTaskModel, task_kinds: Mapping[str, str]) -> None:
        super().__init__()
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"RecExportView needs a MultiTaskModel, got {type(model).__name__}")
        missing = [t for t in model.tasks if t not in task_kinds]
        if missing:
            raise ValueError(f"task_kinds lacks the model's tasks {missing}; got {dict(task_kinds)}")
        bad = {t: task_kinds[t] for t in model.tasks if task_kinds[t] not in TASK_KINDS}
        if bad:
            raise ValueError(f"task kinds must be 'binary' or 'regression', got {bad}")
        self.features: FeatureSpec = model.features
        self.tasks: tuple[str, ...] = tuple(model.tasks)
        self.task_kinds = {t: str(task_kinds[t]) for t in self.tasks}
        self.model = export_copy(model)
        self._original = (model,)  # a tuple keeps it out of the module tree (and out of the ONNX graph)
        specs: list[TensorSpec] = []
        if self.features.dense_dim > 0:
            specs.append(TensorSpec(DENSE_INPUT, torch.float32, (self.features.dense_dim,)))
        for f in self.features.sparse:
            specs.append(TensorSpec(ids_input(f.name), torch.int64, (f.max_len,), low=0, high=f.num_embeddings))
            specs.append(TensorSpec(lengths_input(f.name), torch.int64, (1,), low=0, high=f.max_len + 1))
        self.input_specs: tuple[TensorSpec, ...] = tuple(specs)
        self.output_specs: tuple[TensorSpec, ...] = tuple(TensorSpec(t, torch.float32, (1,)) for t in self.tasks)
        names = [s.name for s in (*self.input_specs, *self.output_specs)]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise ValueError(f"tensor names clash between features and tasks: {clashes}; rename the feature or task")

    def _split_inputs(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor | None, dict[str, tuple[Tensor, Tensor]]]:
        expected = [s.name for s in self.input_specs]
        if sorted(inputs) != sorted(expected):
            raise ValueError(f"inputs {sorted(inputs)} differ from the view's inputs {expected}")
        dense = inputs[DENSE_INPUT] if self.features.dense_dim > 0 else None
        sparse = {f.name: (inputs[ids_input(f.name)], inputs[lengths_input(f.name)]) for f in self.features.sparse}
        return dense, sparse

    def _finish(self, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        result = {}
        for t in self.tasks:
            y = out[t].unsqueeze(1)
            result[t] = torch.sigmoid(y) if self.task_kinds[t] == "binary" else y
        return result

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        dense, sparse = self._split_inputs(inputs)
        return self._finish(self.model(dense, sparse))

    def reference(self, **inputs: Tensor) -> dict[str, Tensor]:
        """The original model on the same rows (a KeyedJaggedTensor from the padded ids), in eval mode."""
        dense, sparse = self._split_inputs(inputs)
        if dense is None:
            batch = next(iter(sparse.values()))[0].shape[0]
            dense = torch.zeros(batch, 0)
        ids = {k: v[0] for k, v in sparse.items()}
        lengths = {k: v[1].reshape(-1) for k, v in sparse.items()}
        model = self._original[0]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(dense, build_kjt(ids, lengths, list(self.features.sparse_names)))
        finally:
            model.train(was_training)
        return self._finish(out)


# ---------------------------------------------------------------------------------------- features.json


def serving_features(run_features: Mapping[str, Any], view: RecExportView) -> dict[str, Any]:
    """The repository's ``features.json``: the run's ``features.json`` plus the input/output layout.

    Added keys:

    * ``inputs``: ``{feature: entry}``. Dense features: ``{"input": "dense", "column": j, "datatype":
      "FP32", "scaling": {"mean", "std"} | null}``. Sparse features: ``{"input": "<f>_ids", "lengths_input":
      "<f>_lengths", "datatype": "INT64", "padding_length": max_len, "padding_id": 0, "pooling",
      "num_embeddings", "vocabulary": bool, "oov_id": 0 | null}`` (vocabularies themselves stay in ``meta``).
    * ``outputs``: ``{output: {"task", "kind", "value": "probability" | "prediction", "datatype", "dims"}}``.
    * ``tensors``: the ONNX inputs in order with datatype and per-example dims (as in ``config.pbtxt``).
    """
    spec = FeatureSpec.from_dict(run_features["features"])
    if spec != view.features:
        raise ValueError("the run's features.json describes other features than the model was built with")
    meta = run_features.get("meta", {}) or {}
    vocabularies = meta.get("vocabularies", {}) or {}
    mean, std = meta.get("numeric_mean", {}) or {}, meta.get("numeric_std", {}) or {}
    inputs: dict[str, Any] = {}
    for j, name in enumerate(spec.dense_names):
        scaling = {"mean": mean[name], "std": std[name]} if name in mean and name in std else None
        inputs[name] = {"input": DENSE_INPUT, "column": j, "datatype": "FP32", "scaling": scaling}
    for f in spec.sparse:
        has_vocab = f.name in vocabularies
        inputs[f.name] = {
            "input": ids_input(f.name),
            "lengths_input": lengths_input(f.name),
            "datatype": "INT64",
            "padding_length": f.max_len,
            "padding_id": 0,
            "pooling": f.pooling,
            "num_embeddings": f.num_embeddings,
            "vocabulary": has_vocab,
            "oov_id": 0 if has_vocab else None,
        }
    outputs = {
        t: {
            "task": t,
            "kind": view.task_kinds[t],
            "value": "probability" if view.task_kinds[t] == "binary" else "prediction",
            "datatype": "FP32",
            "dims": [1],
        }
        for t in view.tasks
    }
    tensors = [{"name": s.name, "datatype": s.datatype, "dims": list(s.shape)} for s in view.input_specs]
    return {**dict(run_features), "inputs": inputs, "outputs": outputs, "tensors": tensors}


# ---------------------------------------------------------------------------------------- raw encoder


class RawFeatureEncoder:
    """Raw feature values -> model input arrays, exactly as the training reader encoded them.

    Built from a repository's (or a run's, plus :func:`serving_features`) ``features.json``. The values are
    encoded by the rules of the reader named by ``meta["source"]``, the very functions the reader applied to
    build the training tensors (:func:`mtrec.data.encoding.value_encoding`), with the vocabularies and
    mean/std it fitted on the train split:

    * ``files`` (:func:`mtrec.data.files.load_files`, and Census-Income and AliExpress, schemas over it):
      :class:`mtrec.data.encoding.FilesEncoding`, by the run's schema: a string is cleaned by the schema's text
      rules (census: stripped, ``?`` missing), a dense value gets its ``fill`` (census: the train mean) and
      transform, ids go through the train vocabulary (0: missing or unseen) or the hash.
    * anything else (the synthetic generators): dense values are used as they are (standardised when the
      metadata has a mean/std); sparse values are ids already and must lie in ``[0, num_embeddings)``
      (through the vocabulary instead, when the metadata has one).

    A sparse feature's value is one id or a list of up to ``padding_length`` ids; the output pads ids
    with 0 and gives the count in ``<f>_lengths``. ``None`` is a missing value: the out-of-vocabulary id 0
    where there is a vocabulary, no id (a shorter bag) where there is none. Keys of a row that are no
    feature (labels, weights) are ignored; a missing feature key is an error.

    Example::

        >>> enc = RawFeatureEncoder.from_repository("models", "census_mmoe")  # doctest: +SKIP
        >>> enc.encode([{"age": 73, "education": " High school graduate", ...}])  # doctest: +SKIP
        {'dense': array([[...]], dtype=float32), 'education_ids': array([[7]]), 'education_lengths': ...}
    """

    def __init__(self, features: Mapping[str, Any]) -> None:
        if "inputs" not in features or "features" not in features:
            raise ValueError(
                "not a repository features.json (needs 'features' and 'inputs'; "
                "build it with mtrec.export.serving_features)"
            )
        self.spec = FeatureSpec.from_dict(features["features"])
        self.layout: dict[str, Any] = dict(features["inputs"])
        meta = features.get("meta", {}) or {}
        self.source = str(meta.get("source", ""))
        self.values: ValueEncoding = value_encoding(meta)  # the reader's own rules (mtrec.data.encoding)

    @classmethod
    def from_file(cls, path: str | Path) -> RawFeatureEncoder:
        return cls(json.loads(Path(path).read_text()))

    @classmethod
    def from_repository(cls, repository: str | Path, name: str, version: int | None = None) -> RawFeatureEncoder:
        """The encoder of ``REPO/NAME/features.json`` (the latest export's) or of one version's own copy."""
        base = Path(repository) / name
        path = base / FEATURES_FILE if version is None else base / str(version) / FEATURES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no features.json (was the model exported with mtrec-export?)")
        return cls.from_file(path)

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """``{input name: array}`` for ``rows``: ``dense`` ``float32 [N, D]``, ``<f>_ids`` ``int64 [N, L]``
        (padded with 0), ``<f>_lengths`` ``int64 [N, 1]``.

        Raises:
            ValueError: a row lacks a feature, a dense value is not a number, a sparse value has more
                ids than the padding length, or (without a vocabulary) an id is out of range; the message
                names the row and the feature.
        """
        rows = list(rows)
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise TypeError(f"row {i}: expected a mapping of feature name to raw value, got {type(r).__name__}")
            missing = [n for n in (*self.spec.dense_names, *self.spec.sparse_names) if n not in r]
            if missing:
                raise ValueError(f"row {i} lacks features {missing}")
        n = len(rows)
        out: dict[str, np.ndarray] = {}
        if self.spec.dense_dim:
            dense = np.empty((n, self.spec.dense_dim), dtype=np.float32)
            for name in self.spec.dense_names:
                column = self.layout[name]["column"]
                try:
                    dense[:, column] = self.values.dense(name, [r[name] for r in rows])
                except (TypeError, ValueError) as err:
                    raise ValueError(f"dense feature {name!r}: not a number in some row ({err})") from err
            out[DENSE_INPUT] = dense
        for f in self.spec.sparse:
            entry = self.layout[f.name]
            length = int(entry["padding_length"])
            ids = np.full((n, length), int(entry.get("padding_id", 0)), dtype=np.int64)
            lengths = np.zeros((n, 1), dtype=np.int64)
            for i, r in enumerate(rows):
                value = r[f.name]
                values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
                if len(values) > length and not self.values.truncates:
                    raise ValueError(f"row {i}, feature {f.name!r}: {len(values)} ids, at most {length} allowed")
                try:
                    encoded = self.values.ids(f.name, values, f.num_embeddings)
                except ValueError as err:
                    raise ValueError(f"row {i}, feature {f.name!r}: {err}") from None
                ids[i, : len(encoded)] = encoded
                lengths[i, 0] = len(encoded)
            out[entry["input"]] = ids
            out[entry["lengths_input"]] = lengths
        return out


# --------------------------------------------------------------------------------------------- the run


@dataclass
class RunArtifacts:
    """What export needs of a ``mtrec-train`` run: the model with the chosen checkpoint's weights."""

    run_dir: Path
    model: MultiTaskModel
    features: dict[str, Any]
    config: DictConfig
    checkpoint: Path
    step: int | None

    @property
    def task_kinds(self) -> dict[str, str]:
        return {t["name"]: t["kind"] for t in self.features["tasks"]}


_RUN_HINT = "pass the directory a mtrec-train run wrote (its hydra.run.dir, by default outputs/mtrec/DATE/TIME)"


def check_run_dir(run_dir: Path) -> None:
    """Refuse a ``run_dir`` that is no ``mtrec-train`` run: missing, a directory without a run's files (a Hydra
    multirun or ``mtrec-teachers`` folder names the runs it holds), or a ``mtrl-train`` run.

    Raises:
        InputNotFoundError: missing, or not a run (a ``ValueError`` too: ``mtrec-export`` exits with status 2).
        ValueError: a ``mtrl-train`` run (its ``config.yaml`` has ``agent`` and ``env`` nodes).
    """
    if not run_dir.is_dir():
        raise InputNotFoundError(f"run_dir {run_dir}: no such directory (expected the directory of a mtrec-train run)")
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        cfg = OmegaConf.load(config_path)
        if isinstance(cfg, DictConfig) and "agent" in cfg and "env" in cfg:
            raise ValueError(
                f"run_dir {run_dir}: a mtrl-train run (its config.yaml has 'agent' and 'env' nodes), which "
                "mtrec-export cannot export; export a policy with mtrl.export.export_run(run_dir, repository, name)"
            )
    if not any((run_dir / f).is_file() for f in ("config.yaml", FEATURES_FILE, BEST, LAST)):
        runs = sorted(p.name for p in run_dir.iterdir() if (p / FEATURES_FILE).is_file())
        holds = f" (it holds the runs {', '.join(runs)})" if runs else ""
        raise InputNotFoundError(
            f"run_dir {run_dir}: not a mtrec-train run, it has no config.yaml, {FEATURES_FILE} or checkpoint"
            f"{holds}; {_RUN_HINT}"
        )


def load_run(run_dir: str | Path, checkpoint: str = "best") -> RunArtifacts:
    """Rebuild a run's model from ``config.yaml`` and ``features.json`` and load ``best.pt`` / ``last.pt``.

    Raises:
        InputNotFoundError: (a ``FileNotFoundError``) the run directory, its ``config.yaml``, ``features.json``
            or the checkpoint is missing (the message says which and why it is needed), or the directory is no
            run at all (:func:`check_run_dir`).
        ValueError: ``checkpoint`` is not ``best`` or ``last``, a ``mtrl-train`` run, or the files do not fit
            together.
    """
    run_dir = Path(run_dir)
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    check_run_dir(run_dir)
    config_path, features_path = run_dir / "config.yaml", run_dir / FEATURES_FILE
    ckpt_path = run_dir / (BEST if checkpoint == "best" else LAST)
    # a distributed run's checkpoints are sharded (torch.distributed.checkpoint): gathered here into one state dict
    sharded = run_dir / (BEST_SHARDED if checkpoint == "best" else LAST_SHARDED)
    if not ckpt_path.is_file() and (sharded / "last.json").is_file():
        ckpt_path = sharded
    for path, why in (
        (config_path, "the resolved config mtrec-train writes (it names the model and its hyperparameters)"),
        (features_path, "the feature spec and reader metadata mtrec-train writes (re-train with this mtlib)"),
        (ckpt_path, f"the {checkpoint} checkpoint (a run writes best.pt at its first validation)"),
    ):
        if not path.exists():
            raise InputNotFoundError(f"{path}: missing; it is {why}")
    cfg = OmegaConf.load(config_path)
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        raise ValueError(f"{config_path}: not a mtrec-train config (no 'model' node)")
    features = json.loads(features_path.read_text())
    spec = FeatureSpec.from_dict(features["features"])
    tasks = [t["name"] for t in features["tasks"]]
    model = build_model(cfg.model, spec, tasks)
    if ckpt_path.is_dir():
        from mtrec import dist_checkpoint

        pointer = json.loads((ckpt_path / "last.json").read_text())
        state = {"model": dist_checkpoint.to_full_state_dict(ckpt_path), "step": pointer.get("step")}
    else:
        state = load_checkpoint(ckpt_path)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"{ckpt_path}: weights do not fit the model of {config_path}: {err}") from err
    model.eval()
    return RunArtifacts(run_dir, model, features, cfg, ckpt_path, state.get("step"))


# ------------------------------------------------------------------------------------------- the command


@dataclass
class ServingSection:
    """``serving`` node of ``configs/export.yaml``: what goes into ``config.pbtxt``."""

    max_batch_size: int = 1024
    """Largest batch the server's dynamic batcher forms."""
    max_queue_delay_microseconds: int = 100
    """How long the batcher may hold a request to batch it with others."""
    preferred_batch_size: list[int] = field(default_factory=list)
    """Batch sizes the batcher aims for (empty: none)."""
    instance_count: int = 1
    """Model instances (ONNX Runtime sessions) run in parallel."""
    instance_kind: str = "KIND_CPU"
    """KIND_CPU, KIND_GPU or KIND_AUTO."""


@dataclass
class ParitySection:
    """``parity`` node of ``configs/export.yaml`` (see :class:`serving.export.ParityOptions`)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 64, 1024])
    """Batch sizes compared, torch vs ONNX Runtime."""
    atol: float = 1e-5
    """FP32 export: max |onnxruntime - torch| allowed."""
    fp16_atol: float = 2e-3
    """Half-precision export: absolute part of the tolerance (against the FP32 torch model)."""
    fp16_rtol: float = 1e-2
    """Half-precision export: relative part of the tolerance."""
    seed: int = 0
    """Seed of the random parity inputs."""
    threads: int = 1
    """ONNX Runtime intra-op threads during the check."""


@dataclass
class ExportConfig:
    """Schema of ``configs/export.yaml`` (``mtrec-export``); an unknown or mistyped key fails at start-up."""

    run_dir: str = MISSING
    """Directory of a mtrec-train run (config.yaml, features.json, best.pt)."""
    repository: str = MISSING
    """Model repository root (Triton layout); created when missing."""
    model_name: str = MISSING
    """The model's name in the repository."""
    version: int | None = None
    """Version number to write; null = one more than the highest present."""
    checkpoint: str = "best"
    """best (best validation score) or last."""
    fp16: bool = False
    """Export the half-precision variant (FP32 inputs/outputs, FP16 inside)."""
    opset: int | None = None
    """ONNX opset; null = the exporter's default."""
    serving: ServingSection = field(default_factory=ServingSection)
    parity: ParitySection = field(default_factory=ParitySection)


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def export_config(cfg: Any) -> ExportConfig:
    """Validate a config (DictConfig, dict or :class:`ExportConfig`) against :class:`ExportConfig`.

    Raises:
        ValueError: an unknown key, a value of the wrong type or a missing required key, naming it.
    """
    if isinstance(cfg, ExportConfig):
        return cfg
    try:
        node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
        out = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExportConfig), node))
    except OmegaConfBaseException as err:
        raise ValueError(f"export config (schema mtrec.export.ExportConfig): {err}") from err
    assert isinstance(out, ExportConfig)
    return out


def export_run(cfg: Any) -> ExportResult:
    """Export a ``mtrec-train`` run as a new version in a model repository (what ``mtrec-export`` runs).

    ``cfg``: an :class:`ExportConfig` or anything :func:`export_config` accepts. Prints the parity table.

    Raises:
        ValueError / FileNotFoundError: a bad config or run directory (:func:`load_run`).
        serving.export.ParityError: ONNX Runtime disagrees with torch beyond the tolerance (nothing written).
        serving.export.ExportRequestError: the version exists, a bad name (a ``ValueError``: ``mtrec-export`` exits 2).
        serving.export.ExportError: the model's config declares other tensors, ...
    """
    c = export_config(cfg)
    run = load_run(c.run_dir, c.checkpoint)
    view = RecExportView(run.model, run.task_kinds)
    serving = ServingOptions(
        max_batch_size=c.serving.max_batch_size,
        max_queue_delay_microseconds=c.serving.max_queue_delay_microseconds,
        preferred_batch_size=tuple(c.serving.preferred_batch_size),
        instance_count=c.serving.instance_count,
        instance_kind=c.serving.instance_kind,
    )
    parity = ParityOptions(
        batch_sizes=tuple(c.parity.batch_sizes),
        atol=c.parity.atol,
        fp16_atol=c.parity.fp16_atol,
        fp16_rtol=c.parity.fp16_rtol,
        seed=c.parity.seed,
        threads=c.parity.threads,
    )
    source: dict[str, Any] = {
        "run_dir": str(run.run_dir.resolve()),
        "checkpoint": str(run.checkpoint.resolve()),
        "step": run.step,
        "model": OmegaConf.to_container(run.config.model, resolve=True),
        "data_source": run.features.get("meta", {}).get("source"),
        "tasks": run.features["tasks"],
    }
    metrics_path = run.run_dir / "metrics.json"
    if metrics_path.is_file():
        source["metrics"] = json.loads(metrics_path.read_text())
    result = export_to_repository(
        view,
        c.repository,
        c.model_name,
        version=c.version,
        fp16=c.fp16,
        serving=serving,
        parity=parity,
        opset=c.opset,
        metadata={FEATURES_FILE: serving_features(run.features, view)},
        source=source,
    )
    print(result.parity.summary())
    info = result.info
    print(f"wrote {result.model_path} (version {result.version}, {info['precision']}, opset {info['opset']})")
    return result
