"""No sharing (independent single-task models) and hard parameter sharing (Shared-Bottom)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.models.base import Gates, MultiTaskModel, Outputs
from mtrec.models.inputs import InputArch
from mtrec.models.layers import MLP


class SingleTask(MultiTaskModel):
    """``k`` independent single-task models trained jointly: nothing is shared.

    Each task has its own input arch (the one given for the first task, a newly initialised copy of it for each
    other: its own ``EmbeddingBagCollection`` and dense arch), its own bottom
    MLP (``bottom_dims``) and its own tower, so the ``"shared"`` parameter group is empty. The baseline
    that every multi-task model should beat.

    Args:
        bottom_dims: widths of each task's bottom MLP (default: the MMoE paper's 113-unit bottom).

    Example::

        >>> from mtrec.data.batch import FeatureSpec, SparseFeature
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(("age", "income"), (SparseFeature("city", 100),))
        >>> model = SingleTask(InputArch(features), ["ctr", "cvr"], bottom_dims=[32])
        >>> dense, sparse = random_inputs(features, batch_size=4)
        >>> {k: tuple(v.shape) for k, v in model(dense, sparse).items()}
        {'ctr': (4,), 'cvr': (4,)}
        >>> len(model.parameter_groups()["shared"])
        0
    """

    def __init__(
        self,
        inputs: InputArch,
        tasks: Sequence[str],
        *,
        bottom_dims: Sequence[int] = (113,),
        **common: Any,
    ) -> None:
        super().__init__(inputs, tasks, **common)
        # The first task reads the input arch given; every other task gets its own, built like it and newly
        # initialised (in task order, as if each had been built for its task).
        first, self.inputs = inputs, None
        self.task_inputs = nn.ModuleDict({t: first if i == 0 else first.fresh_copy() for i, t in enumerate(self.tasks)})
        in_dim = self.task_inputs[self.tasks[0]].out_dim
        self.bottoms = nn.ModuleDict({t: MLP(in_dim, bottom_dims, self.activation, self.dropout) for t in self.tasks})
        out_dim = self.bottoms[self.tasks[0]].out_dim
        self.towers = self._build_towers(out_dim)

    def _forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Gates]:
        out = self._apply_towers({t: self.bottoms[t](self.task_inputs[t](dense, sparse)) for t in self.tasks})
        return out, {}

    def _task_owned(self, task: str) -> list[nn.Module | nn.Parameter | None]:
        return [self.task_inputs[task], self.bottoms[task], self.towers[task]]


class SharedBottom(MultiTaskModel):
    """Shared-Bottom: one bottom MLP shared by all tasks, one tower per task (hard parameter sharing).

    R. Caruana, "Multitask Learning", Machine Learning 28, 1997; the baseline of Ma et al., "Modeling
    Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018.

    Args:
        bottom_dims: widths of the shared bottom MLP (default ``(113,)``, the MMoE paper's size).

    Example::

        >>> from mtrec.data.batch import FeatureSpec
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(tuple(f"x{i}" for i in range(100)), ())
        >>> model = SharedBottom(InputArch(features), ["y1", "y2"])
        >>> dense, sparse = random_inputs(features, batch_size=4)
        >>> {k: tuple(v.shape) for k, v in model(dense, sparse).items()}
        {'y1': (4,), 'y2': (4,)}
    """

    def __init__(
        self,
        inputs: InputArch,
        tasks: Sequence[str],
        *,
        bottom_dims: Sequence[int] = (113,),
        **common: Any,
    ) -> None:
        super().__init__(inputs, tasks, **common)
        assert self.inputs is not None
        self.bottom = MLP(self.inputs.out_dim, bottom_dims, self.activation, self.dropout)
        self.towers = self._build_towers(self.bottom.out_dim)

    def _forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Gates]:
        h = self._mark_representation(self.bottom(self._input_vector(dense, sparse)))
        return self._apply_towers(self._tower_inputs(h)), {}

    def _splittable(self) -> bool:
        return True

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The shared bottom's last Linear layer."""
        linears = [m for m in self.bottom.modules() if isinstance(m, nn.Linear)]
        return list(linears[-1].parameters()) if linears else super().last_shared_parameters()

    def _task_owned(self, task: str) -> list[nn.Module | nn.Parameter | None]:
        return [self.towers[task]]
