"""Searched sharing structures: the weight-sharing supernet of ``mtlib-search`` and the fixed child it chooses.

The search space (:mod:`mtrec.search`, ENAS of Pham et al., ICML 2018, over multi-task sharing) is PLE-like
(Tang et al., RecSys 2020): ``num_levels`` levels, each with ``num_shared_experts`` shared experts and
``num_task_experts`` experts of each task's own, MLPs of ``expert_dims`` on the input arch. One decision per
(task, level) says which experts that task's gate at that level may read:

* ``"own"``: only the task's own experts of the level;
* a non-empty list of shared-expert indices, e.g. ``[0, 2]``: only those shared experts.

An *architecture* is ``{task: [choice of level 0, ..., choice of level L-1]}``. Task ``t``'s representation
``h_t`` starts as the input vector ``x``; at level ``l`` the experts its choice names read ``h_t`` (a shared
expert is one set of weights applied to every reader's own representation: hard sharing of that function) and
``t``'s softmax gate, reading ``h_t`` too, mixes their outputs into the next ``h_t``; the last ``h_t`` goes into
``t``'s tower. A gate over one expert is the constant 1 and is left out. The two extremes are the classic
models: every task reading all of one shared expert at every level is a Shared-Bottom whose bottom is the
experts' stack, and every task reading only its own experts is one single-task network per task on a common
input arch.

* :class:`SharingSupernet` holds every expert and every gate (each task's gate has a row per candidate expert,
  ``num_task_experts + num_shared_experts``); :attr:`SharingSupernet.architecture` (set per batch) picks the
  child that runs, and only that child's experts are computed (their stacked weights sliced).
* :class:`SearchedPLE` is one child as a model of its own (``configs/model/searched.yaml``): it holds only the
  experts some task reads and gates with one row per candidate, so it trains, exports and serves like every
  model of the zoo. :meth:`SharingSupernet.child_state_dict` gives a child its supernet weights, with which
  both compute the same outputs.

Parameter groups: a task owns its tower, its gates and its own experts; the input arch and the shared experts
are shared (a shared expert that one task alone reads is still listed as shared: it is a row of one stacked
weight tensor with the others of its level).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.models.base import Gates, MultiTaskModel, Outputs
from mtrec.models.inputs import InputArch
from mtrec.models.layers import Gate, GroupedMLP, check_dims, mix

OWN = "own"
#: One decision: ``"own"`` or a sorted tuple of shared-expert indices.
Choice = str | tuple[int, ...]
Architecture = dict[str, tuple[Choice, ...]]


def _count(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def parse_choice(value: Any, num_shared_experts: int, where: str = "choice") -> Choice:
    """One decision from its config form: ``"own"``, ``"all"`` (every shared expert) or a list of shared-expert
    indices (sorted, without repeats, in ``[0, num_shared_experts)``).

    >>> parse_choice([2, 0], 3), parse_choice("all", 2), parse_choice("own", 2)
    ((0, 2), (0, 1), 'own')
    """
    if value == OWN:
        return OWN
    if value == "all":
        return tuple(range(num_shared_experts))
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{where}: expected 'own', 'all' or a non-empty list of shared-expert indices, got {value!r}")
    idx = sorted({int(v) for v in value})
    if len(idx) != len(value) or idx[0] < 0 or idx[-1] >= num_shared_experts:
        raise ValueError(
            f"{where}: shared-expert indices must be distinct ints in [0, {num_shared_experts}), got {list(value)}"
        )
    return tuple(idx)


def check_architecture(
    architecture: Mapping[str, Sequence[Any]], tasks: Sequence[str], num_levels: int, num_shared_experts: int
) -> Architecture:
    """``{task: (choice per level)}`` validated against the tasks, the level count and the shared experts.

    Raises:
        ValueError: a task missing or unknown, a wrong number of levels, or a bad choice (naming task and level).
    """
    if not isinstance(architecture, Mapping):
        raise ValueError(f"architecture must map each task to a list of choices, got {architecture!r}")
    missing = [t for t in tasks if t not in architecture]
    extra = [t for t in architecture if t not in tasks]
    if missing or extra:
        raise ValueError(f"architecture must name exactly the tasks {list(tasks)}; missing {missing}, unknown {extra}")
    out: Architecture = {}
    for t in tasks:
        levels = architecture[t]
        if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) != num_levels:
            raise ValueError(f"architecture[{t!r}] must list one choice per level ({num_levels}), got {levels!r}")
        out[t] = tuple(parse_choice(c, num_shared_experts, f"architecture[{t!r}][{i}]") for i, c in enumerate(levels))
    return out


def architecture_to_config(architecture: Mapping[str, Sequence[Choice]]) -> dict[str, list[Any]]:
    """The config (YAML) form of an architecture: ``"own"`` or lists of ints."""
    return {t: [c if c == OWN else list(c) for c in levels] for t, levels in architecture.items()}


def all_shared(tasks: Sequence[str], num_levels: int, num_shared_experts: int) -> Architecture:
    """Every task reads every shared expert at every level (MMoE-like; with one shared expert, Shared-Bottom)."""
    return {t: (tuple(range(num_shared_experts)),) * num_levels for t in tasks}


def all_separate(tasks: Sequence[str], num_levels: int) -> Architecture:
    """Every task reads only its own experts (one single-task network per task on the common input arch)."""
    return {t: (OWN,) * num_levels for t in tasks}


def _grouped_forward(mlp: GroupedMLP, x: Tensor, index: Tensor | None) -> Tensor:
    """``mlp(x)`` for the groups ``index`` only (``None``: all): the same products on the sliced stacked weights,
    ``x [B, in] -> [n, B, out]``."""
    if index is None:
        return mlp(x)
    for layer in mlp.layers:
        w, b = layer.weight[index], layer.bias[index]  # [n, in, out], [n, out]
        n, d_in, d_out = w.shape
        if x.dim() == 2:  # as GroupedLinear: one GEMM for every group
            y = torch.addmm(b.reshape(-1), x, w.transpose(0, 1).reshape(d_in, n * d_out))
            y = y.view(x.shape[0], n, d_out).transpose(0, 1)
        else:
            y = torch.baddbmm(b.unsqueeze(1), x, w)
        x = mlp.dropout(mlp.act(y))
    return x


class _SharingBase(MultiTaskModel):
    """What the supernet and a fixed child share: the hyperparameters, the level loop and the parameter groups.

    The constructor (the one both classes have: the subclasses document its arguments) checks the hyperparameters
    and the architecture (``None``: :func:`all_shared`), then :meth:`_build_levels` fills ``self.levels`` (a
    ``ModuleList`` of ``ModuleDict`` s with ``shared`` (a :class:`GroupedMLP` or absent), ``own``
    (``{task: GroupedMLP}``) and ``gates`` (``{task: Gate}``)), and the towers are built on its output width, in
    that order (the order of parameter initialisation). Subclasses implement :meth:`_build_levels`,
    :meth:`_current`, :meth:`_shared_rows` and :meth:`_gate`.
    """

    def __init__(
        self,
        inputs: InputArch,
        tasks: Sequence[str],
        *,
        num_levels: int = 2,
        num_shared_experts: int = 2,
        num_task_experts: int = 1,
        expert_dims: Sequence[int] = (16,),
        architecture: Mapping[str, Sequence[Any]] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(inputs, tasks, **common)
        self.num_levels = _count("num_levels", num_levels, 1)
        self.num_shared_experts = _count("num_shared_experts", num_shared_experts, 1)
        self.num_task_experts = _count("num_task_experts", num_task_experts, 1)
        self.expert_dims = check_dims("expert_dims", expert_dims, allow_empty=False)
        self.levels = nn.ModuleList()
        if architecture is None:
            architecture = all_shared(self.tasks, self.num_levels, self.num_shared_experts)
        checked = check_architecture(architecture, self.tasks, self.num_levels, self.num_shared_experts)
        assert self.inputs is not None
        self.towers = self._build_towers(self._build_levels(self.inputs.out_dim, checked))

    def _build_levels(self, in_dim: int, architecture: Architecture) -> int:
        """Keep ``architecture`` (checked), append one ``ModuleDict`` per level to ``self.levels`` starting from
        ``in_dim`` features, and return the width of the last level's output (the towers' input)."""
        raise NotImplementedError

    def _experts(self, in_dim: int, groups: int) -> GroupedMLP:
        return GroupedMLP(groups, in_dim, self.expert_dims, self.activation, self.dropout)

    def _current(self) -> Architecture:
        raise NotImplementedError

    def _shared_rows(self, level: int, experts: tuple[int, ...]) -> Tensor | None:
        """Rows of the level's ``shared`` experts module holding ``experts`` (``None``: all of them, in order)."""
        raise NotImplementedError

    def _gate(self, level: int, task: str, choice: Choice, h: Tensor) -> Tensor:
        """Task ``task``'s softmax gate at ``level`` over its candidates, ``[n, B]``."""
        raise NotImplementedError

    def _forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Gates]:
        arch = self._current()
        x = self._input_vector(dense, sparse)
        h = dict.fromkeys(self.tasks, x)
        gates: Gates = {}
        for level, parts in enumerate(self.levels):
            # Shared experts run once per distinct input (level 0: the input vector, read by every task), for the
            # union of what that input's readers need.
            needs: dict[int, tuple[Tensor, set[int]]] = {}
            for t in self.tasks:
                if arch[t][level] != OWN:
                    entry = needs.setdefault(id(h[t]), (h[t], set()))
                    entry[1].update(arch[t][level])  # type: ignore[arg-type]
            computed: dict[int, tuple[tuple[int, ...], Tensor]] = {}
            for key, (inp, wanted) in needs.items():
                union = tuple(sorted(wanted))
                computed[key] = (union, _grouped_forward(parts["shared"], inp, self._shared_rows(level, union)))
            new: dict[str, Tensor] = {}
            for t in self.tasks:
                choice = arch[t][level]
                if choice == OWN:
                    candidates = parts["own"][t](h[t])
                else:
                    union, out = computed[id(h[t])]
                    pick = [union.index(e) for e in choice]  # type: ignore[union-attr]
                    candidates = out if len(pick) == len(union) else out[pick]
                if candidates.shape[0] == 1:
                    new[t] = candidates[0]
                    continue
                g = self._gate(level, t, choice, h[t])
                gates[f"{t}@level{level}"] = g.t()
                new[t] = mix(g, candidates)
            h = new
        return self._apply_towers(h), gates

    def _task_owned(self, task: str) -> list[nn.Module | nn.Parameter | None]:
        owned: list[nn.Module | nn.Parameter | None] = [self.towers[task]]
        for parts in self.levels:
            if task in parts["own"]:
                owned.append(parts["own"][task])
            if task in parts["gates"]:
                owned.append(parts["gates"][task])
        return owned


class SharingSupernet(_SharingBase):
    """Every expert and gate of the search space; :attr:`architecture` picks the child a forward pass runs.

    Per level: ``num_shared_experts`` shared experts, ``num_task_experts`` own experts per task, and one gate per
    task with ``num_task_experts + num_shared_experts`` rows (own experts first, then the shared ones). A child's
    gate is the softmax over the rows of its candidates, and only its experts are computed, so one training step
    through a child trains exactly that child's weights (Pham et al.'s parameter sharing).

    Args:
        num_levels: levels ``L``.
        num_shared_experts: shared experts per level ``E``.
        num_task_experts: own experts per task per level (>= 1).
        expert_dims: widths of each expert MLP.
        architecture: the child to run until another is set (default: :func:`all_shared`).

    Example::

        >>> from mtrec.data.batch import FeatureSpec
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(("a", "b"), ())
        >>> net = SharingSupernet(InputArch(features), ["y1", "y2"], num_levels=2, num_shared_experts=2)
        >>> net.architecture = {"y1": ["own", [0, 1]], "y2": [[1], "all"]}
        >>> out, gates = net.forward_with_gates(*random_inputs(features, 4))
        >>> sorted(gates), tuple(out["y1"].shape)
        (['y1@level1', 'y2@level1'], (4,))
    """

    def _build_levels(self, in_dim: int, architecture: Architecture) -> int:
        self._architecture = architecture
        for _ in range(self.num_levels):
            parts = nn.ModuleDict(
                {
                    "shared": self._experts(in_dim, self.num_shared_experts),
                    "own": nn.ModuleDict({t: self._experts(in_dim, self.num_task_experts) for t in self.tasks}),
                    "gates": nn.ModuleDict(
                        {t: Gate(in_dim, self.num_task_experts + self.num_shared_experts) for t in self.tasks}
                    ),
                }
            )
            self.levels.append(parts)
            in_dim = parts["shared"].out_dim
        return in_dim

    @property
    def architecture(self) -> Architecture:
        """The child that runs (setting it validates it: :func:`check_architecture`)."""
        return self._architecture

    @architecture.setter
    def architecture(self, value: Mapping[str, Sequence[Any]]) -> None:
        self._architecture = check_architecture(value, self.tasks, self.num_levels, self.num_shared_experts)

    def _current(self) -> Architecture:
        return self._architecture

    def _shared_rows(self, level: int, experts: tuple[int, ...]) -> Tensor | None:
        if len(experts) == self.num_shared_experts:
            return None
        return torch.tensor(experts, dtype=torch.long, device=self.levels[level]["shared"].layers[0].weight.device)

    def _candidate_rows(self, choice: Choice) -> list[int]:
        if choice == OWN:
            return list(range(self.num_task_experts))
        return [self.num_task_experts + e for e in choice]  # type: ignore[union-attr]

    def _gate(self, level: int, task: str, choice: Choice, h: Tensor) -> Tensor:
        gate: Gate = self.levels[level]["gates"][task]
        rows = self._candidate_rows(choice)
        w, b = gate.weight[rows], gate.bias[rows]
        return torch.softmax(torch.addmm(b.unsqueeze(1), w, h.t()), dim=0)

    def child_config(self) -> dict[str, Any]:
        """The keyword arguments of the :class:`SearchedPLE` of the current architecture (less inputs and tasks)."""
        return {
            "num_levels": self.num_levels,
            "num_shared_experts": self.num_shared_experts,
            "num_task_experts": self.num_task_experts,
            "expert_dims": list(self.expert_dims),
            "architecture": architecture_to_config(self._architecture),
            "tower_dims": list(self.tower_dims),
            "dropout": self.dropout,
            "activation": self.activation,
            "task_feeds": dict(self.task_feeds) or None,
            "feed_stop_gradient": self.feed_stop_gradient,
        }

    def child_state_dict(self, child: SearchedPLE) -> dict[str, Tensor]:
        """The supernet's weights in the layout of ``child`` (a :class:`SearchedPLE` of the same search space):
        loaded into it, the child computes what the supernet computes with ``architecture = child.architecture``.
        """
        if (child.num_levels, child.num_shared_experts, child.num_task_experts) != (
            self.num_levels,
            self.num_shared_experts,
            self.num_task_experts,
        ) or child.expert_dims != self.expert_dims:
            raise ValueError(
                "child_state_dict: the child's levels, experts or expert widths differ from the supernet's"
            )
        own = self.state_dict()
        out: dict[str, Tensor] = {}
        for key in child.state_dict():
            parts = key.split(".")
            if parts[0] != "levels":
                out[key] = own[key].clone()
                continue
            level, kind = int(parts[1]), parts[2]
            if kind == "shared":  # levels.L.shared.layers.i.{weight,bias}: rows of the used experts
                rows = torch.tensor(child.used_shared[level], dtype=torch.long)
                out[key] = own[key][rows].clone()
            elif kind == "gates":  # levels.L.gates.T.{weight,bias}: rows of the task's candidates
                task = parts[3]
                rows = torch.tensor(self._candidate_rows(child.architecture[task][level]), dtype=torch.long)
                out[key] = own[key][rows].clone()
            else:
                out[key] = own[key].clone()
        return out


class SearchedPLE(_SharingBase):
    """A multi-task model of the searched sharing structure: each task's gate at each level reads the experts its
    ``architecture`` names (see the module docstring); it holds only experts some task reads.

    Written by ``mtlib-search`` as ``architecture.yaml`` (``configs/model/searched.yaml`` is its template) and
    trained, exported and served like any model of the zoo.

    Args:
        num_levels: levels ``L``.
        num_shared_experts: shared experts per level of the search space (indices of ``architecture``).
        num_task_experts: own experts per task per level.
        expert_dims: widths of each expert MLP.
        architecture: ``{task: [choice per level]}``, a choice ``"own"``, ``"all"`` or a list of shared-expert
            indices (``None``: :func:`all_shared`).

    Gates: ``"<task>@level<l>"`` ``[B, n]`` for every (task, level) with ``n >= 2`` candidates.

    Example::

        >>> from mtrec.data.batch import FeatureSpec
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(("a", "b"), ())
        >>> arch = {"y1": ["own", [0, 1]], "y2": [[1], "all"]}
        >>> model = SearchedPLE(InputArch(features), ["y1", "y2"], num_levels=2, num_shared_experts=2,
        ...                     architecture=arch)
        >>> model.used_shared  # level 0: only expert 1 is read; level 1: both
        [(1,), (0, 1)]
        >>> tuple(model(*random_inputs(features, 4))["y2"].shape)
        (4,)
    """

    def _build_levels(self, in_dim: int, architecture: Architecture) -> int:
        self.architecture = architecture
        #: per level, the shared experts some task reads (search-space indices, sorted)
        self.used_shared: list[tuple[int, ...]] = []
        for level in range(self.num_levels):
            used = sorted(
                {e for t in self.tasks if self.architecture[t][level] != OWN for e in self.architecture[t][level]}
            )
            self.used_shared.append(tuple(used))  # type: ignore[arg-type]
            parts = nn.ModuleDict(
                {
                    "own": nn.ModuleDict(
                        {
                            t: self._experts(in_dim, self.num_task_experts)
                            for t in self.tasks
                            if self.architecture[t][level] == OWN
                        }
                    ),
                    "gates": nn.ModuleDict(
                        {
                            t: Gate(in_dim, self._candidates(self.architecture[t][level]))
                            for t in self.tasks
                            if self._candidates(self.architecture[t][level]) > 1
                        }
                    ),
                }
            )
            if used:
                parts["shared"] = self._experts(in_dim, len(used))
            self.levels.append(parts)
            in_dim = self.expert_dims[-1]
        return in_dim

    def _candidates(self, choice: Choice) -> int:
        return self.num_task_experts if choice == OWN else len(choice)

    def _current(self) -> Architecture:
        return self.architecture

    def _shared_rows(self, level: int, experts: tuple[int, ...]) -> Tensor | None:
        used = self.used_shared[level]
        if experts == used:
            return None
        return torch.tensor(
            [used.index(e) for e in experts], dtype=torch.long, device=self.towers[self.tasks[0]].out.weight.device
        )

    def _gate(self, level: int, task: str, choice: Choice, h: Tensor) -> Tensor:
        return self.levels[level]["gates"][task](h)
