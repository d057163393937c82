"""The contract between data and model: ``Batch(dense, sparse, labels)``.

Datasets are held column-wise as tensors (``TabularDataset``) and batched by indexing, never as
one Python object per row.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtl.tasks import TaskSpec


class Batch(NamedTuple):
    """One mini-batch.

    Attributes:
        dense: ``float32 [B, D]`` dense features (``D`` may be 0).
        sparse: ``KeyedJaggedTensor`` with one key per sparse feature, ``B`` rows each.
        labels: ``{task_name: float32 [B]}``.
    """

    dense: Tensor
    sparse: KeyedJaggedTensor
    labels: dict[str, Tensor]

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature: ids in ``[0, num_embeddings)``, up to ``max_len`` ids per row."""

    name: str
    num_embeddings: int
    max_len: int = 1
    pooling: str = "sum"  # "sum" or "mean"


@dataclass(frozen=True)
class FeatureSpec:
    """What a model needs to know about its inputs."""

    dense_names: tuple[str, ...]
    sparse: tuple[SparseFeature, ...]

    @property
    def dense_dim(self) -> int:
        return len(self.dense_names)

    @property
    def sparse_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.sparse)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (``features.json`` of a run, the export's metadata); :meth:`from_dict` inverts it."""
        return {
            "dense_names": list(self.dense_names),
            "sparse": [
                {"name": f.name, "num_embeddings": f.num_embeddings, "max_len": f.max_len, "pooling": f.pooling}
                for f in self.sparse
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> FeatureSpec:
        try:
            dense = tuple(str(n) for n in d["dense_names"])  # type: ignore[union-attr]
            sparse = tuple(
                SparseFeature(
                    str(f["name"]), int(f["num_embeddings"]), int(f.get("max_len", 1)), str(f.get("pooling", "sum"))
                )
                for f in d["sparse"]  # type: ignore[union-attr]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a feature spec (need dense_names and sparse[name, num_embeddings]): {err}") from err
        return cls(dense, sparse)


def build_kjt(ids: Mapping[str, Tensor], lengths: Mapping[str, Tensor], keys: Sequence[str]) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor from padded per-feature ids ``[B, L]`` and lengths ``[B]``.

    Row ``b`` of feature ``k`` holds ``ids[k][b, :lengths[k][b]]``. Vectorised: one boolean mask per feature.
    """
    values: list[Tensor] = []
    lens: list[Tensor] = []
    for k in keys:
        x, n = ids[k], lengths[k]
        mask = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < n.unsqueeze(1)
        values.append(x[mask])
        lens.append(n)
    if not keys:
        return KeyedJaggedTensor.from_lengths_sync(
            keys=[], values=torch.empty(0, dtype=torch.long), lengths=torch.empty(0, dtype=torch.int32)
        )
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys), values=torch.cat(values), lengths=torch.cat(lens).to(torch.int32)
    )


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> Tensor:
    """The row order of an epoch over ``n`` rows held in memory: a permutation seeded by ``(seed, epoch)`` only
    (the same on resume, and for every rank of a distributed run), or ``0..n-1`` unshuffled."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@dataclass
class TabularDataset:
    """A dataset held as column tensors.

    Attributes:
        dense: ``float32 [N, D]``.
        sparse_ids: ``{feature: int64 [N, L_f]}`` padded ids (padding value is irrelevant; see lengths).
        sparse_lengths: ``{feature: int64 [N]}`` number of valid ids per row (0 allowed).
        labels: ``{task: float32 [N]}``.
    """

    dense: Tensor
    sparse_ids: dict[str, Tensor] = field(default_factory=dict)
    sparse_lengths: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.dense.shape[0]
        if self.dense.dim() != 2:
            raise ValueError(f"dense must be [N, D], got shape {tuple(self.dense.shape)}")
        for k, v in self.sparse_ids.items():
            if v.dim() != 2 or v.shape[0] != n:
                raise ValueError(f"sparse_ids[{k!r}] must be [{n}, L], got {tuple(v.shape)}")
            if k not in self.sparse_lengths:
                raise ValueError(f"sparse feature {k!r} has ids but no lengths")
            if self.sparse_lengths[k].shape != (n,):
                raise ValueError(f"sparse_lengths[{k!r}] must be [{n}], got {tuple(self.sparse_lengths[k].shape)}")
        for k, v in self.labels.items():
            if v.shape != (n,):
                raise ValueError(f"labels[{k!r}] must be [{n}], got {tuple(v.shape)}")

    def __len__(self) -> int:
        return self.dense.shape[0]

    @property
    def sparse_keys(self) -> list[str]:
        return list(self.sparse_ids)

    def subset(self, index: Tensor) -> TabularDataset:
        """Rows ``index`` (an int64 tensor or a slice-like tensor of positions) as a new dataset."""
        return TabularDataset(
            dense=self.dense[index],
            sparse_ids={k: v[index] for k, v in self.sparse_ids.items()},
            sparse_lengths={k: v[index] for k, v in self.sparse_lengths.items()},
            labels={k: v[index] for k, v in self.labels.items()},
        )

    def batch(self, index: Tensor) -> Batch:
        """The rows ``index`` as a :class:`Batch`."""
        ids = {k: v[index] for k, v in self.sparse_ids.items()}
        lengths = {k: v[index] for k, v in self.sparse_lengths.items()}
        return Batch(
            dense=self.dense[index],
            sparse=build_kjt(ids, lengths, self.sparse_keys),
            labels={k: v[index] for k, v in self.labels.items()},
        )

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
        """Mini-batches in a seeded order.

        The order depends only on ``(seed, epoch)``, so a resumed run that skips the first ``start``
        batches of an epoch sees exactly the batches an uninterrupted run would have seen.
        """
        n = len(self)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        order = epoch_order(n, shuffle, seed, epoch)
        for b in range(start, self.num_batches(batch_size, drop_last)):
            yield self.batch(order[b * batch_size : (b + 1) * batch_size])

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else (n + batch_size - 1) // batch_size


@dataclass
class DataBundle:
    """Train/val/test splits plus what a model and a trainer need to know about them."""

    train: TabularDataset
    val: TabularDataset
    test: TabularDataset
    features: FeatureSpec
    tasks: list[TaskSpec]
    meta: dict[str, object] = field(default_factory=dict)


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """A seeded random partition of ``range(n)`` into parts of the given fractions (which sum to 1)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {list(fractions)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return [perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]]


def split_by_task(
    data: TabularDataset, fractions: Mapping[str, float], seed: int = 0
) -> dict[str, TabularDataset]:
    """Disjoint random subsets of ``data``, one per task, of the given fractions of its rows.

    Simulates tasks that come from separate datasets of different sizes (each subset still carries
    every label column, but a trainer uses only its own task's).
    """
    if not fractions:
        raise ValueError("split_by_task: fractions is empty; give {task: fraction}")
    bad = {t: f for t, f in fractions.items() if not 0 < f <= 1}
    if bad or sum(fractions.values()) > 1 + 1e-9:
        raise ValueError(f"split_by_task: fractions must be in (0, 1] and sum to at most 1, got {dict(fractions)}")
    missing = [t for t in fractions if t not in data.labels]
    if missing:
        raise ValueError(f"split_by_task: no label column for tasks {missing}; labels: {sorted(data.labels)}")
    n = len(data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out: dict[str, TabularDataset] = {}
    start = 0
    for task, f in fractions.items():
        size = max(1, int(round(f * n)))
        out[task] = data.subset(perm[start : start + size])
        start += size
    return out
