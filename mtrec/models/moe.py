"""Mixture-of-experts models: OMoE, MMoE, CGC and PLE.

Experts of one kind are held as one :class:`~mtrec.models.layers.GroupedMLP` (stacked weights, one matrix
product for all of them) rather than a loop over small modules; gates are softmax-normalised
``Linear(in_dim, E)`` layers (:class:`~mtrec.models.layers.Gate`), and a gate mixes expert outputs
``[E, B, H]`` by broadcasting (:func:`~mtrec.models.layers.mix`). Gates are computed expert-major
``[E, B]`` and reported as ``[B, E]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.models.base import SHARED, Gates, MultiTaskModel, Outputs
from mtrec.models.inputs import InputArch
from mtrec.models.layers import Gate, GroupedMLP, grouped_gates, grouped_mix, mix


def _check_count(name: str, value: int, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class _MixtureOfExperts(MultiTaskModel):
    """Shared experts on the input vector, softmax gate(s) over them, one tower per task."""

    per_task_gates: bool = True

    def __init__(
        self,
        inputs: InputArch,
        tasks: Sequence[str],
        *,
        num_experts: int = 8,
        expert_dims: Sequence[int] = (16,),
        **common: Any,
    ) -> None:
        super().__init__(inputs, tasks, **common)
        assert self.inputs is not None
        in_dim = self.inputs.out_dim
        self.num_experts = _check_count("num_experts", num_experts, 1)
        self.experts = GroupedMLP(num_experts, in_dim, expert_dims, self.activation, self.dropout)
        gate_names = self.tasks if self.per_task_gates else (SHARED,)
        self.gates = nn.ModuleDict({g: Gate(in_dim, num_experts) for g in gate_names})
        self.towers = self._build_towers(self.experts.out_dim)

    def _forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Gates]:
        x = self._input_vector(dense, sparse)
        # The shared representation is batch-first, [B, E, H]; the experts' own layout is [E, B, H].
        experts = self._mark_representation(self.experts(x).transpose(0, 1)).transpose(0, 1)
        if self.per_task_gates:
            # The cut (forward_with_split): the experts' outputs and the gates' input are shared. All gates run
            # as one grouped product, and the k mixtures as one broadcast: [k, E, B] gates, [k, B, H] inputs.
            xs, es = self._fan_out_stacked(x), self._fan_out_stacked(experts, batch_dim=1)
            g = grouped_gates(list(self.gates.values()), xs)
            out = self._apply_towers(grouped_mix(g, es))
            gates = dict(zip(self.tasks, g.unbind(0)))  # [E, B] each
        else:
            gates = {SHARED: self.gates[SHARED](x)}
            out = self._apply_towers(self._tower_inputs(mix(gates[SHARED], experts)))
        return out, {name: g.t() for name, g in gates.items()}

    def _splittable(self) -> bool:
        return True

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The experts' last layer."""
        return list(self.experts.layers[-1].parameters())

    def _task_owned(self, task: str) -> list[nn.Module | nn.Parameter | None]:
        owned: list[nn.Module | nn.Parameter | None] = [self.towers[task]]
        if self.per_task_gates:
            owned.append(self.gates[task])
        return owned


class MMoE(_MixtureOfExperts):
    """Multi-gate Mixture-of-Experts: shared experts, one softmax gate per task.

    J. Ma, Z. Zhao, X. Yi, J. Chen, L. Hong, E. H. Chi, "Modeling Task Relationships in Multi-task
    Learning with Multi-gate Mixture-of-Experts", KDD 2018. Task ``k`` sees
    ``f_k(x) = sum_i softmax(W_k x)_i * expert_i(x)`` and its tower maps that to one output.
    Defaults are the paper's synthetic-data sizes: 8 experts of 16 units, towers of 8 units.

    Args:
        num_experts: number of experts ``E``.
        expert_dims: widths of each expert MLP.

    Gates: ``{task: [B, E]}``. Parameter groups: experts shared; a task owns its gate and its tower.

    Example::

        >>> from mtrec.data.batch import FeatureSpec
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(tuple(f"x{i}" for i in range(100)), ())
        >>> model = MMoE(InputArch(features), ["y1", "y2"])
        >>> dense, sparse = random_inputs(features, batch_size=4)
        >>> out, gates = model.forward_with_gates(dense, sparse)
        >>> tuple(out["y1"].shape), tuple(gates["y1"].shape)
        ((4,), (4, 8))
        >>> tuple(model.expert_utilisation(dense, sparse)["y2"].shape)
        (8,)
    """

    per_task_gates = True


class OMoE(_MixtureOfExperts):
    """One-gate Mixture-of-Experts: shared experts and ONE softmax gate shared by all tasks.

    The OMoE baseline of J. Ma et al., "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD 2018: every task's tower reads the same gated mixture.

    Args:
        num_experts: number of experts ``E``.
        expert_dims: widths of each expert MLP.

    Gates: ``{"shared": [B, E]}``. Parameter groups: experts and gate shared; a task owns its tower.

    Example::

        >>> from mtrec.data.batch import FeatureSpec
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(tuple(f"x{i}" for i in range(100)), ())
        >>> out, gates = OMoE(InputArch(features), ["y1", "y2"]).forward_with_gates(*random_inputs(features, 4))
        >>> tuple(out["y2"].shape), list(gates), tuple(gates["shared"].shape)
        ((4,), ['shared'], (4, 8))
    """

    per_task_gates = False


class _ExtractionLevel(nn.Module):
    """One CGC / PLE level: per-task experts, shared experts, one gate per task, optionally a shared gate.

    Task ``t``'s gate reads task ``t``'s input and mixes ``[t's experts, shared experts]``; the shared gate
    (intermediate PLE levels only) reads the shared input and mixes ``[task 0's experts, ..., task
    k-1's experts, shared experts]``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        in_dim: int,
        expert_dims: Sequence[int],
        num_task_experts: int,
        num_shared_experts: int,
        with_shared_gate: bool,
        activation: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.num_task_experts = num_task_experts
        self.shared_experts = GroupedMLP(num_shared_experts, in_dim, expert_dims, activation, dropout)
        self.task_experts = nn.ModuleDict(
            {t: GroupedMLP(num_task_experts, in_dim, expert_dims, activation, dropout) for t in self.tasks}
            if num_task_experts > 0
            else {}
        )
        self.task_gates = nn.ModuleDict({t: Gate(in_dim, num_task_experts + num_shared_experts) for t in self.tasks})
        self.shared_gate: Gate | None = None
        if with_shared_gate:
            self.shared_gate = Gate(in_dim, len(self.tasks) * num_task_experts + num_shared_experts)
        self.out_dim = self.shared_experts.out_dim

    def forward(
        self,
        task_inputs: Sequence[Tensor],
        shared_input: Tensor,
        fan_out: Callable[[Tensor, int], dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], Tensor | None, dict[str, Tensor]]:
        """``fan_out`` (``MultiTaskModel._fan_out``) hands each task gate its own copy of the shared experts'
        output: the cut of a single-level model's split forward."""
        shared = self.shared_experts(shared_input)  # [S, B, H]
        shared_for = fan_out(shared, 1) if fan_out is not None else dict.fromkeys(self.tasks, shared)
        own = [self.task_experts[t](x) for t, x in zip(self.tasks, task_inputs)] if self.task_experts else []
        gates: dict[str, Tensor] = {}
        task_out: list[Tensor] = []
        for i, (t, x) in enumerate(zip(self.tasks, task_inputs)):
            candidates = torch.cat([own[i], shared_for[t]], dim=0) if own else shared_for[t]
            gates[t] = self.task_gates[t](x)
            task_out.append(mix(gates[t], candidates))
        shared_out: Tensor | None = None
        if self.shared_gate is not None:
            gates[SHARED] = self.shared_gate(shared_input)
            shared_out = mix(gates[SHARED], torch.cat([*own, shared], dim=0))
        return task_out, shared_out, gates


class PLE(MultiTaskModel):
    """Progressive Layered Extraction: ``num_levels`` stacked extraction levels (CGC modules).

    H. Tang, J. Liu, M. Zhao, X. Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
    (MTL) Model for Personalized Recommendations", RecSys 2020. Every level has ``num_task_experts``
    experts per task and ``num_shared_experts`` shared experts (MLPs ``expert_dims``). Task ``t``'s gate
    at level ``l`` reads task ``t``'s output of level ``l-1`` and mixes ``[t's experts, shared experts]``;
    intermediate levels also have a shared gate over all experts of the level, whose output feeds the
    next level's shared experts and shared gate. The last level has task gates only. Level 0 reads the
    input vector everywhere.

    Args:
        num_levels: number of extraction levels (1 is CGC).
        num_shared_experts: shared experts per level (>= 1).
        num_task_experts: experts per task per level (>= 0).
        expert_dims: widths of each expert MLP (the same at every level).

    Gates: ``"<task>@level<l>"`` with ``num_task_experts + num_shared_experts`` columns, and
    ``"shared@level<l>"`` for ``l < num_levels - 1`` with ``k * num_task_experts + num_shared_experts``.

    Parameter groups (a task owns what only its output depends on): task ``t`` owns its tower, its
    experts and gate at the last level, and its gate at the level before the last. Task experts of the
    other levels feed the shared gate, and so every task: they are shared, as are all shared experts and
    shared gates and the task gates below the second-to-last level.

    Example::

        >>> from mtrec.data.batch import FeatureSpec, SparseFeature
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(("age",), (SparseFeature("city", 100),))
        >>> model = PLE(InputArch(features), ["ctr", "cvr"], num_levels=2, num_shared_experts=2, num_task_experts=1)
        >>> out, gates = model.forward_with_gates(*random_inputs(features, 4))
        >>> for name, g in gates.items():
        ...     print(name, tuple(g.shape))
        ctr@level0 (4, 3)
        cvr@level0 (4, 3)
        shared@level0 (4, 4)
        ctr@level1 (4, 3)
        cvr@level1 (4, 3)
    """

    def __init__(
        self,
        inputs: InputArch,
        tasks: Sequence[str],
        *,
        num_levels: int = 2,
        num_shared_experts: int = 4,
        num_task_experts: int = 2,
        expert_dims: Sequence[int] = (16,),
        **common: Any,
    ) -> None:
        super().__init__(inputs, tasks, **common)
        assert self.inputs is not None
        self.num_levels = _check_count("num_levels", num_levels, 1)
        self.num_shared_experts = _check_count("num_shared_experts", num_shared_experts, 1)
        self.num_task_experts = _check_count("num_task_experts", num_task_experts, 0)
        self.levels = nn.ModuleList()
        in_dim = self.inputs.out_dim
        for level in range(num_levels):
            extraction = _ExtractionLevel(
                self.tasks,
                in_dim,
                expert_dims,
                num_task_experts,
                num_shared_experts,
                with_shared_gate=level < num_levels - 1,
                activation=self.activation,
                dropout=self.dropout,
            )
            self.levels.append(extraction)
            in_dim = extraction.out_dim
        self.towers = self._build_towers(in_dim)

    def _gate_name(self, name: str, level: int) -> str:
        return f"{name}@level{level}"

    def _forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Gates]:
        x = self._input_vector(dense, sparse)
        single = self.num_levels == 1  # then the cut of a split forward lies inside the one level
        task_inputs: list[Tensor] = list(self._fan_out(x).values()) if single else [x] * len(self.tasks)
        shared_input: Tensor | None = x
        gates: Gates = {}
        for level, extraction in enumerate(self.levels):
            assert shared_input is not None
            fan_out = self._fan_out if single else None
            task_inputs, shared_input, level_gates = extraction(task_inputs, shared_input, fan_out)
            gates.update({self._gate_name(k, level): g.t() for k, g in level_gates.items()})
        return self._apply_towers(dict(zip(self.tasks, task_inputs))), gates

    def _splittable(self) -> bool:
        # With more levels, a task's gate below the last level is task-owned but sits upstream of the
        # shared experts of the last level: no cut separates shared from task-owned parameters.
        return self.num_levels == 1

    def _task_owned(self, task: str) -> list[nn.Module | nn.Parameter | None]:
        last = self.levels[-1]
        owned: list[nn.Module | nn.Parameter | None] = [self.towers[task], last.task_gates[task]]
        if self.num_task_experts:
            owned.append(last.task_experts[task])
        if self.num_levels >= 2:
            # Its output is task-`task`'s input of the last level, which has no shared gate.
            owned.append(self.levels[-2].task_gates[task])
        return owned


class CGC(PLE):
    """Customized Gate Control: one extraction level of PLE (task-specific plus shared experts).

    H. Tang, J. Liu, M. Zhao, X. Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
    (MTL) Model for Personalized Recommendations", RecSys 2020, section 4.2. Task ``t``'s softmax gate
    reads the input vector and mixes ``[t's num_task_experts experts, num_shared_experts shared experts]``.
    The defaults give 8 experts for two tasks, like :class:`MMoE`.

    Args:
        num_shared_experts: shared experts (>= 1).
        num_task_experts: experts per task (>= 0).
        expert_dims: widths of each expert MLP.

    Gates: ``{task: [B, num_task_experts + num_shared_experts]}``. Parameter groups: shared experts shared;
    a task owns its experts, its gate and its tower.

    Example::

        >>> from mtrec.data.batch import FeatureSpec, SparseFeature
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(("age",), (SparseFeature("city", 100),))
        >>> out, gates = CGC(InputArch(features), ["ctr", "cvr"]).forward_with_gates(*random_inputs(features, 4))
        >>> {k: tuple(v.shape) for k, v in gates.items()}
        {'ctr': (4, 6), 'cvr': (4, 6)}
    """

    def __init__(
        self,
        inputs: InputArch,
        tasks: Sequence[str],
        *,
        num_shared_experts: int = 4,
        num_task_experts: int = 2,
        expert_dims: Sequence[int] = (16,),
        **common: Any,
    ) -> None:
        super().__init__(
            inputs,
            tasks,
            num_levels=1,
            num_shared_experts=num_shared_experts,
            num_task_experts=num_task_experts,
            expert_dims=expert_dims,
            **common,
        )

    def _gate_name(self, name: str, level: int) -> str:
        return name
