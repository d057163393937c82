"""The base class of every multi-task recommendation model, and its contract.

* ``forward(dense, sparse) -> {task: Tensor[B]}``: logits for binary tasks, predictions for regression
  (the model does not know which; each task head ends in ``Linear(..., 1)``).
* ``forward_with_gates(dense, sparse) -> (outputs, {gate_name: Tensor[B, E]})``: softmax gate weights of
  gated models (rows sum to 1), ``{}`` for the others.
* ``parameter_groups() -> {"shared": [...], task: [...]}``: every parameter in exactly one group.
  **Rule:** a parameter belongs to task ``t`` when only task ``t``'s output depends on it (so no other
  task's loss can give it a gradient), and to ``"shared"`` otherwise. Subclasses list what each task
  owns; everything else is shared. Some consequences worth knowing: the columns of a cross-stitch
  network and the task-specific experts of non-final PLE levels are *shared* (their activations reach
  every task through the cross-stitch units / the shared gate), and ESMM's CTR tower is shared (both
  ``ctr`` and ``ctcvr`` use it).
* ``regularization() -> scalar``: an extra term to add to the objective (zero unless overridden).
* ``forward_with_representation(dense, sparse) -> (outputs, Z)``: ``Z`` is the shared representation
  that every task head reads (the experts' outputs of a mixture as ``[B, E, H]``, the shared bottom's
  output, else the input vector), batch-first, for methods that work on gradients with respect to it
  (MGDA-UB, GREAT). ``None`` for models that share nothing.
* ``forward_with_split(dense, sparse) -> (outputs, TaskSplit)`` where ``can_split``: the same outputs, with
  the graph cut between the shared body and the task heads (:mod:`mtl.split`): every tensor that crosses
  the cut is fanned out to one leaf per task, so gradient methods get all per-task gradients from one head
  backward. Offered by Shared-Bottom, OMoE, MMoE and CGC (PLE with one level), and not where a task's
  output feeds another task's tower without a stop-gradient (that tower would be read by two losses).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtl.split import TaskSplit
from mtrec.models.inputs import InputArch
from mtrec.models.layers import Tower, check_dims, grouped_towers

SHARED = "shared"

Outputs = dict[str, Tensor]
Gates = dict[str, Tensor]


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Task names as a tuple: non-empty, unique strings usable as module keys."""
    if isinstance(tasks, str) or not isinstance(tasks, Iterable):
        raise TypeError(f"tasks must be a list of task names, got {tasks!r}")
    names = tuple(tasks)
    if not names:
        raise ValueError("tasks must name at least one task, got []")
    for t in names:
        if not isinstance(t, str) or not t or "." in t or t == SHARED:
            raise ValueError(f"task names must be non-empty strings without '.' and other than {SHARED!r}, got {t!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {list(names)}")
    return names


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _params(items: Iterable[nn.Module | nn.Parameter | None]) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, nn.Parameter):
            out.append(item)
        else:
            out.extend(item.parameters())
    return out


def _layout(tower: nn.Module) -> list[tuple[type, int, int]]:
    """A tower's layers as ``(type, in, out)`` (0 for layers without features): equal layouts can be grouped."""
    mods = [*tower.mlp, tower.out] if isinstance(tower, Tower) else []
    return [(type(m), getattr(m, "in_features", 0), getattr(m, "out_features", 0)) for m in mods]


class MultiTaskModel(nn.Module):
    """Base class: owns the input arch and the task list; subclasses build the body and the heads.

    A model takes its input arch built (an :class:`~mtrec.models.inputs.InputArch` on the data's features, as
    TorchRec's DLRM takes a built ``EmbeddingBagCollection``): :func:`mtrec.models.build_model` builds both from a
    config. Subclasses take their own hyperparameters and pass the settings every model shares (``**common``:
    ``tower_dims``, ``dropout``, ``activation``, ``task_feeds``, ``feed_stop_gradient``) to this constructor;
    they implement :meth:`_forward` (returning outputs and gates) and :meth:`_task_owned` (the modules or
    parameters only one task uses).

    Args:
        inputs: the input arch every task reads (``self.inputs``; its ``features`` are the model's).
        tasks: the task names, one output each.
        tower_dims: hidden widths of each task's tower.
        dropout: dropout of the body's and the towers' hidden layers, in ``[0, 1)``.
        activation: their activation (:func:`~mtrec.models.layers.make_activation`).
        task_feeds: estimate-as-feature, ``{target: source}``: the source task's output is one more input of
            the target's tower.
        feed_stop_gradient: the fed estimate enters behind a stop-gradient (the target's loss does not train
            the source).
    """

    def __init__(
        self,
        inputs: InputArch,
        tasks: Sequence[str],
        *,
        tower_dims: Sequence[int] = (8,),
        dropout: float = 0.0,
        activation: str = "relu",
        task_feeds: Mapping[str, str] | None = None,
        feed_stop_gradient: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(inputs, InputArch):
            raise TypeError(
                f"inputs must be a built mtrec.models.InputArch (e.g. InputArch(features, embedding_dim=16)), got "
                f"{type(inputs).__name__}; mtrec.models.build_model builds both from a config"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.features = inputs.features
        self.tasks = check_tasks(tasks)
        self.tower_dims = check_dims("tower_dims", tower_dims)
        self.dropout = dropout
        self.activation = activation
        self.task_feeds = self._check_feeds(task_feeds or {})
        self.feed_stop_gradient = bool(feed_stop_gradient)
        self.inputs: InputArch | None = inputs
        self._capture_representation = False
        self._representation: Tensor | None = None
        self._split: TaskSplit | None = None
        self._towers_alike: tuple[tuple[int, ...], bool] | None = None  # (tower ids, same layout), see _grouped_heads

    def _check_feeds(self, feeds: Mapping[str, str]) -> dict[str, str]:
        """Validate ``task_feeds`` (``{target: source}``) and order the towers so sources run first."""
        feeds = dict(feeds)
        for target, source in feeds.items():
            for role, name in (("target", target), ("source", source)):
                if name not in self.tasks:
                    raise ValueError(f"task_feeds: {role} task {name!r} is not one of {list(self.tasks)}")
            if target == source:
                raise ValueError(f"task_feeds: task {target!r} cannot feed itself")
        order: list[str] = []
        visiting: set[str] = set()

        def visit(t: str) -> None:
            if t in order:
                return
            if t in visiting:
                raise ValueError(f"task_feeds {feeds} contain a cycle through {t!r}")
            visiting.add(t)
            if t in feeds:
                visit(feeds[t])
            visiting.discard(t)
            order.append(t)

        for t in self.tasks:
            visit(t)
        self._tower_order = tuple(order)
        return feeds

    def _build_towers(self, in_dims: int | Mapping[str, int]) -> nn.ModuleDict:
        """One tower per task; a tower that reads another task's estimate gets one more input."""
        dims = {t: in_dims if isinstance(in_dims, int) else in_dims[t] for t in self.tasks}
        return nn.ModuleDict(
            {
                t: Tower(dims[t] + (1 if t in self.task_feeds else 0), self.tower_dims, self.activation, self.dropout)
                for t in self.tasks
            }
        )

    def _grouped_heads(self) -> bool:
        """Whether the towers run as grouped layers (:func:`~mtrec.models.layers.grouped_towers`): two or more
        towers of one shape, no task feeds (a fed tower waits for its source's output) and no hooks on a tower
        (a grouped run does not call the towers, so their hooks would not fire)."""
        towers = getattr(self, "towers", None)
        if not isinstance(towers, nn.ModuleDict) or len(towers) < 2 or self.task_feeds:
            return False
        mods = list(towers.values())
        key = tuple(map(id, mods))
        if self._towers_alike is None or self._towers_alike[0] != key:
            self._towers_alike = (key, all(isinstance(t, Tower) and _layout(t) == _layout(mods[0]) for t in mods))
        return self._towers_alike[1] and not any(t._forward_hooks or t._forward_pre_hooks for t in mods)

    def _apply_towers(self, inputs: Mapping[str, Tensor] | Tensor) -> Outputs:
        """Run every task's tower on its input; a fed task also reads its source task's output.

        ``inputs`` is ``{task: [B, H]}``, or one tensor: ``[B, H]`` that every tower reads, or ``[k, B, H]`` whose
        row ``i`` is task ``i``'s input (``self.tasks`` order). Where :meth:`_grouped_heads` allows, all towers run
        as grouped layers; otherwise one by one.

        With ``feed_stop_gradient`` (the default) the estimate enters behind a stop-gradient, so the
        target task's loss never trains the source task (e.g. CTR used as a feature of CVR).
        """
        if self._grouped_heads():
            if isinstance(inputs, Tensor):
                x = inputs
            else:
                rows = [inputs[t] for t in self.tasks]
                x = rows[0] if all(r is rows[0] for r in rows) else torch.stack(rows)
            return dict(zip(self.tasks, grouped_towers(list(self.towers.values()), x).unbind(0)))
        if isinstance(inputs, Tensor):
            inputs = dict.fromkeys(self.tasks, inputs) if inputs.dim() == 2 else dict(zip(self.tasks, inputs.unbind(0)))
        out: Outputs = {}
        for t in self._tower_order:
            h = inputs[t]
            if t in self.task_feeds:
                estimate = out[self.task_feeds[t]]
                if self.feed_stop_gradient:
                    estimate = estimate.detach()
                h = torch.cat([h, estimate.unsqueeze(-1).to(h.dtype)], dim=-1)
            out[t] = self.towers[t](h)
        return {t: out[t] for t in self.tasks}

    # --- the contract ----------------------------------------------------------------------------
    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Outputs:
        """``{task: Tensor[B]}`` for inputs ``dense [B, D]`` and a KeyedJaggedTensor of ``B`` rows."""
        return self._forward(dense, sparse)[0]

    def forward_with_gates(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Gates]:
        """Outputs plus ``{gate_name: Tensor[B, E]}`` softmax gate weights (``{}`` for non-gated models)."""
        return self._forward(dense, sparse)

    def forward_with_representation(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Tensor | None]:
        """Outputs plus the shared representation every task reads (see the module docstring)."""
        self._capture_representation, self._representation = True, None
        try:
            outputs = self._forward(dense, sparse)[0]
            return outputs, self._representation
        finally:
            self._capture_representation, self._representation = False, None

    @property
    def can_split(self) -> bool:
        """Whether :meth:`forward_with_split` is offered (see the module docstring)."""
        return self._splittable() and not (self.task_feeds and not self.feed_stop_gradient)

    def forward_with_split(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, TaskSplit]:
        """Outputs (equal to :meth:`forward`'s) computed with the graph cut between shared body and task heads."""
        if not self.can_split:
            raise ValueError(
                f"{type(self).__name__} cannot cut its graph between the shared body and the task heads "
                "(see MultiTaskModel.can_split); use forward() with the full Jacobian"
            )
        split = TaskSplit(self.tasks)
        self._split = split
        try:
            return self._forward(dense, sparse)[0], split
        finally:
            self._split = None

    @torch.no_grad()
    def expert_utilisation(self, dense: Tensor, sparse: KeyedJaggedTensor) -> dict[str, Tensor]:
        """Mean gate weight per expert, ``{gate_name: Tensor[E]}`` (each sums to 1); ``{}`` if not gated.

        Runs in the model's current mode: call ``.eval()`` first to leave dropout out.
        """
        _, gates = self._forward(dense, sparse)
        return {k: g.mean(dim=0) for k, g in gates.items()}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"shared": [...], task: [...] for every task}``; every parameter in exactly one group."""
        owned = {t: _params(self._task_owned(t)) for t in self.tasks}
        if self.task_feeds and not self.feed_stop_gradient:
            # A task's whole output path also feeds its targets: what it owns is read by them too.
            for source in set(self.task_feeds.values()):
                owned[source] = []
        seen: dict[int, str] = {}
        for t, ps in owned.items():
            for p in ps:
                if id(p) in seen:
                    raise RuntimeError(f"{type(self).__name__}: a parameter is owned by both {seen[id(p)]!r} and {t!r}")
                seen[id(p)] = t
        shared = [p for p in self.parameters() if id(p) not in seen]
        return {SHARED: shared, **owned}

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the last shared layer (GradNorm measures task gradient norms on these).

        Default: the last shared parameter tensors that hold a weight matrix and its bias, in
        registration order; models with a clear last shared layer override this.
        """
        shared = self.parameter_groups()[SHARED]
        return shared[-2:] if len(shared) >= 2 else shared

    def regularization(self) -> Tensor:
        """Extra loss term to add to the objective; zero for every model but :class:`L2Sharing`."""
        p = next(self.parameters())
        return p.new_zeros(())

    # --- for subclasses ----------------------------------------------------------------------------
    def _forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Gates]:
        raise NotImplementedError

    def _task_owned(self, task: str) -> list[nn.Module | nn.Parameter | None]:
        """Modules or parameters only ``task``'s output depends on (default: none)."""
        return []

    def _splittable(self) -> bool:
        """Whether ``_forward`` fans out (:meth:`_fan_out`) every tensor that crosses from shared to task-owned
        computation, so that every parameter downstream of the cut is owned by one task (default: no)."""
        return False

    def _fan_out(self, z: Tensor, batch_dim: int = 0) -> dict[str, Tensor]:
        """``{task: z}``, or per-task leaf copies of ``z`` inside :meth:`forward_with_split`."""
        if self._split is None:
            return dict.fromkeys(self.tasks, z)
        return self._split.fan_out(z, batch_dim=batch_dim)

    def _fan_out_stacked(self, z: Tensor, batch_dim: int = 0) -> Tensor:
        """``z`` itself (it broadcasts against per-task rows), or inside :meth:`forward_with_split` one stacked
        leaf ``[k, *z.shape]`` (:meth:`mtl.split.TaskSplit.fan_out_stacked`) whose row ``i`` only task ``i``
        may read: for heads that run all tasks as grouped operations."""
        if self._split is None:
            return z
        return self._split.fan_out_stacked(z, batch_dim=batch_dim)

    def _tower_inputs(self, z: Tensor) -> Tensor | dict[str, Tensor]:
        """The towers' input when every tower reads the shared ``z [B, H]``, fanned out at the cut of a split
        forward: stacked for grouped towers, else one leaf per task."""
        return self._fan_out_stacked(z) if self._grouped_heads() else self._fan_out(z)

    def _input_vector(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Tensor:
        assert self.inputs is not None
        return self._mark_representation(self.inputs(dense, sparse))

    def _mark_representation(self, z: Tensor) -> Tensor:
        """Record ``z`` as the shared representation (the last one marked in a forward pass wins)."""
        if self._capture_representation:
            self._representation = z
        return z
