"""Soft parameter sharing: one bottom column per task, tied by an L2 penalty or by cross-stitch units."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.models.base import Gates, MultiTaskModel, Outputs
from mtrec.models.inputs import InputArch
from mtrec.models.layers import MLP, GroupedLinear, check_dims, make_activation


class L2Sharing(MultiTaskModel):
    """L2-constrained soft parameter sharing: one bottom MLP per task, pulled together by an L2 penalty.

    L. Duong, T. Cohn, S. Bird, P. Cook, "Low Resource Dependency Parsing: Cross-lingual Parameter Sharing
    in a Neural Network Parser", ACL 2015. The embeddings and dense arch are shared; every task has its
    own bottom (``bottom_dims``, identical shapes) and tower.

    :meth:`regularization` returns

        ``l2_weight * sum_{i < j} sum_{layers, weights and biases} ||theta_i - theta_j||^2``

    over unordered pairs of tasks ``(i, j)`` and every parameter tensor of the bottoms (weights *and*
    biases; towers and embeddings are not penalised). With one task it is 0. Add it to the objective.

    Args:
        bottom_dims: widths of each task's bottom MLP (non-empty).
        l2_weight: the penalty's coefficient (``>= 0``).

    Parameter groups: inputs shared; a task owns its bottom and its tower.

    Example::

        >>> from mtrec.data.batch import FeatureSpec
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(tuple(f"x{i}" for i in range(10)), ())
        >>> model = L2Sharing(InputArch(features), ["y1", "y2"], bottom_dims=[16], l2_weight=0.01)
        >>> out = model(*random_inputs(features, 4))
        >>> tuple(out["y1"].shape), tuple(model.regularization().shape)
        ((4,), ())
    """

    def __init__(
        self,
        inputs: InputArch,
        tasks: Sequence[str],
        *,
        bottom_dims: Sequence[int] = (113,),
        l2_weight: float = 1e-3,
        **common: Any,
    ) -> None:
        super().__init__(inputs, tasks, **common)
        if l2_weight < 0:
            raise ValueError(f"l2_weight must be >= 0, got {l2_weight}")
        self.l2_weight = float(l2_weight)
        assert self.inputs is not None
        dims = check_dims("bottom_dims", bottom_dims, allow_empty=False)
        in_dim = self.inputs.out_dim
        self.bottoms = nn.ModuleDict({t: MLP(in_dim, dims, self.activation, self.dropout) for t in self.tasks})
        out_dim = dims[-1]
        self.towers = self._build_towers(out_dim)

    def _forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Gates]:
        x = self._input_vector(dense, sparse)
        return self._apply_towers({t: self.bottoms[t](x) for t in self.tasks}), {}

    def regularization(self) -> Tensor:
        columns = [list(self.bottoms[t].parameters()) for t in self.tasks]
        total = columns[0][0].new_zeros(())
        for same in zip(*columns):  # one parameter tensor, as it is in every task's bottom
            s = torch.stack([p.reshape(-1) for p in same])  # [k, n]
            total = total + (s.unsqueeze(0) - s.unsqueeze(1)).pow(2).sum() / 2  # ordered pairs / 2
        return self.l2_weight * total

    def _task_owned(self, task: str) -> list[nn.Module | nn.Parameter | None]:
        return [self.bottoms[task], self.towers[task]]


class CrossStitch(MultiTaskModel):
    """Cross-stitch network: one MLP column per task, mixed after every hidden layer.

    I. Misra, A. Shrivastava, A. Gupta, M. Hebert, "Cross-stitch Networks for Multi-task Learning",
    CVPR 2016. After hidden layer ``l`` each column ``u`` continues with
    ``h'_u = sum_v alpha[l, u, v] * h_v``; the ``k x k`` matrices ``alpha`` (``stitch``, shape
    ``[len(bottom_dims), k, k]``) are learnt and start at ``alpha_self`` on the diagonal and
    ``(1 - alpha_self) / (k - 1)`` off it (rows sum to 1; with one task the matrix is ``[[1]]``).
    Task ``t``'s tower reads column ``t``. The ``k`` columns are one stacked
    :class:`~mtrec.models.layers.GroupedLinear` per layer.

    Args:
        bottom_dims: widths of each column's hidden layers (non-empty).
        alpha_self: initial diagonal of the cross-stitch matrices, in ``[0, 1]``.

    Parameter groups: a task owns only its tower. The columns are shared: through the cross-stitch
    units every column's activations reach every task's output (and every task's loss reaches every
    column), and so are the cross-stitch matrices and the inputs.

    Example::

        >>> from mtrec.data.batch import FeatureSpec, SparseFeature
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(("age",), (SparseFeature("city", 100),))
        >>> model = CrossStitch(InputArch(features), ["ctr", "cvr", "like"], bottom_dims=[32, 16])
        >>> out = model(*random_inputs(features, 4))
        >>> {k: tuple(v.shape) for k, v in out.items()}, tuple(model.stitch.shape)
        ({'ctr': (4,), 'cvr': (4,), 'like': (4,)}, (2, 3, 3))
    """

    def __init__(
        self,
        inputs: InputArch,
        tasks: Sequence[str],
        *,
        bottom_dims: Sequence[int] = (64, 32),
        alpha_self: float = 0.9,
        **common: Any,
    ) -> None:
        super().__init__(inputs, tasks, **common)
        if not 0.0 <= alpha_self <= 1.0:
            raise ValueError(f"alpha_self must be in [0, 1], got {alpha_self}")
        dims = check_dims("bottom_dims", bottom_dims, allow_empty=False)
        k = len(self.tasks)
        assert self.inputs is not None
        self.columns = nn.ModuleList()
        d = self.inputs.out_dim
        for h in dims:
            self.columns.append(GroupedLinear(k, d, h))
            d = h
        self.act = make_activation(self.activation)
        self.drop = nn.Dropout(self.dropout) if self.dropout > 0 else nn.Identity()
        if k == 1:
            init = torch.ones(1, 1)
        else:
            init = torch.full((k, k), (1.0 - alpha_self) / (k - 1))
            init.fill_diagonal_(alpha_self)
        self.stitch = nn.Parameter(init.expand(len(dims), k, k).clone())
        self.towers = self._build_towers(d)

    def _forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Gates]:
        h = self._input_vector(dense, sparse)  # [B, D], the same input for every column
        for layer, alpha in zip(self.columns, self.stitch):
            y = self.drop(self.act(layer(h)))  # [k, B, H], column-major
            h = (alpha @ y.reshape(len(self.tasks), -1)).view(y.shape)  # h'[u] = sum_v alpha[u, v] y[v]
        return self._apply_towers({t: h[i] for i, t in enumerate(self.tasks)}), {}

    def _task_owned(self, task: str) -> list[nn.Module | nn.Parameter | None]:
        return [self.towers[task]]
