"""The input arch shared by every model: sparse features through one TorchRec ``EmbeddingBagCollection``,
dense features through an MLP, both concatenated into one input vector per example."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.data.batch import FeatureSpec, build_kjt
from mtrec.models.layers import MLP

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_name(feature: str) -> str:
    """The embedding table name of a sparse feature (``t_<feature>``)."""
    return f"t_{feature}"


class InputArch(nn.Module):
    """Sparse arch + dense arch: ``(dense [B, D], sparse KJT) -> [B, out_dim]``.

    * Sparse: one :class:`~torchrec.EmbeddingBagCollection` with one table ``t_<feature>`` per sparse
      feature (``num_embeddings`` and ``pooling`` from its :class:`~mtrec.data.batch.SparseFeature`,
      width ``embedding_dim``). With no sparse features there is no collection and the (key-less)
      KeyedJaggedTensor passed in is ignored.
    * Dense: :class:`~mtrec.models.layers.MLP` over ``dense_dims`` (empty: the raw dense features).
      With no dense features the dense part is empty whatever ``dense_dims`` says.

    ``out_dim = len(sparse) * embedding_dim + dense output width``; the pooled embeddings come first, in
    ``FeatureSpec.sparse`` order.

    Example::

        >>> from mtrec.data.batch import FeatureSpec, SparseFeature
        >>> sparse_features = (SparseFeature("city", 100), SparseFeature("tags", 50, max_len=5))
        >>> features = FeatureSpec(("age", "income"), sparse_features)
        >>> arch = InputArch(features, embedding_dim=8, dense_dims=[4])
        >>> dense, sparse = random_inputs(features, batch_size=3)
        >>> arch(dense, sparse).shape, arch.out_dim
        (torch.Size([3, 20]), 20)
    """

    def __init__(
        self,
        features: FeatureSpec,
        embedding_dim: int = 16,
        dense_dims: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(features, FeatureSpec):
            raise TypeError(f"features must be a FeatureSpec, got {type(features).__name__}")
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be > 0, got {embedding_dim}")
        self.features = features
        self.settings = {"embedding_dim": embedding_dim, "dense_dims": tuple(dense_dims), "activation": activation,
                         "dropout": dropout}  # fmt: skip
        self.sparse_names = features.sparse_names
        self.ebc: EmbeddingBagCollection | None = None
        if features.sparse:
            tables = []
            for f in features.sparse:
                if f.pooling not in _POOLING:
                    raise ValueError(f"sparse feature {f.name!r}: pooling must be 'sum' or 'mean', got {f.pooling!r}")
                tables.append(
                    EmbeddingBagConfig(
                        num_embeddings=f.num_embeddings,
                        embedding_dim=embedding_dim,
                        name=table_name(f.name),
                        feature_names=[f.name],
                        pooling=_POOLING[f.pooling],
                    )
                )
            self.ebc = EmbeddingBagCollection(tables=tables)
        self.dense_arch: MLP | None = None
        dense_out = 0
        if features.dense_dim > 0:
            self.dense_arch = MLP(features.dense_dim, dense_dims, activation, dropout)
            dense_out = self.dense_arch.out_dim
        self.out_dim = len(features.sparse) * embedding_dim + dense_out
        if self.out_dim == 0:
            raise ValueError("the FeatureSpec has no dense and no sparse features; a model needs some")
        # Model parallelism (mtrec.distributed): the pooled embeddings enter the rest of the model as leaves, so the
        # multi-task step treats the tables apart (see backward_embeddings).
        self.embedding_cut = False
        self.embedding_cuts: list[tuple[Tensor, Tensor]] = []

    def embedding_leaves(self) -> list[Tensor]:
        """The pooled embeddings of the forward passes since the last :meth:`backward_embeddings`, as the leaves the
        rest of the model read (with ``embedding_cut``; their ``.grad`` is what the tables should get)."""
        return [cut for _, cut in self.embedding_cuts]

    def backward_embeddings(self, scale: float = 1.0) -> None:
        """Back-propagate ``scale`` times each leaf's gradient into the tables (through TorchRec's sharded backward:
        the embedding all-to-all, a fused optimiser's update) and forget the leaves."""
        cuts, self.embedding_cuts = self.embedding_cuts, []
        pairs = [(pooled, cut.grad) for pooled, cut in cuts if cut.grad is not None]
        if pairs:
            torch.autograd.backward([p for p, _ in pairs], [g * scale if scale != 1.0 else g for _, g in pairs])

    def fresh_copy(self) -> InputArch:
        """A new input arch on the same features with the same settings and its own weights, initialised as
        construction initialises them (the same random draws, in the same order)."""
        return InputArch(self.features, **self.settings)

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Tensor:
        if dense.dim() != 2 or dense.shape[1] != self.features.dense_dim:
            raise ValueError(
                f"dense must be [B, {self.features.dense_dim}] (features {list(self.features.dense_names)}), "
                f"got shape {tuple(dense.shape)}"
            )
        parts: list[Tensor] = []
        if self.ebc is not None:
            missing = [k for k in self.sparse_names if k not in sparse.keys()]
            if missing:
                raise ValueError(f"sparse input lacks features {missing}; it has keys {sparse.keys()}")
            pooled = self.ebc(sparse).values()
            if pooled.shape[0] != dense.shape[0]:
                raise ValueError(f"sparse input has batch size {pooled.shape[0]} but dense has {dense.shape[0]}")
            if self.embedding_cut and pooled.requires_grad and torch.is_grad_enabled():
                cut = pooled.detach().requires_grad_()
                self.embedding_cuts.append((pooled, cut))
                pooled = cut
            parts.append(pooled)
        if self.dense_arch is not None:
            parts.append(self.dense_arch(dense))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def random_inputs(features: FeatureSpec, batch_size: int, *, seed: int = 0) -> tuple[Tensor, KeyedJaggedTensor]:
    """A random ``(dense, sparse)`` pair matching ``features`` (for examples, smoke tests, tracing).

    Each sparse feature gets between 0 and ``max_len`` ids per row (exactly 1 when ``max_len == 1``).
    """
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch_size, features.dense_dim, generator=g)
    ids: dict[str, Tensor] = {}
    lengths: dict[str, Tensor] = {}
    for f in features.sparse:
        ids[f.name] = torch.randint(0, f.num_embeddings, (batch_size, f.max_len), generator=g)
        if f.max_len == 1:
            lengths[f.name] = torch.ones(batch_size, dtype=torch.long)
        else:
            lengths[f.name] = torch.randint(0, f.max_len + 1, (batch_size,), generator=g)
    return dense, build_kjt(ids, lengths, features.sparse_names)
