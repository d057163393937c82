"""Loss weighting: turn the per-task loss dict into per-task weighted losses whose sum is the objective.

Every method is a small :class:`Weighting` subclass behind one interface, so a trainer never names a method.

Example::

    weighting = build_weighting("uncertainty", tasks)          # or hydra: instantiate(cfg)(tasks=tasks)
    optimizer = torch.optim.Adam([*model.parameters(), *weighting.trainable_parameters()])
    for batch in loader:
        losses = compute_losses(tasks, model(batch), batch.labels)        # {task: scalar}
        objective = weighting(losses, shared=last_shared_layer_params)    # sum(weighting.weighted(...).values())
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        if weighting.wants_losses_after_step:                             # FAMO
            with torch.no_grad():
                weighting.after_step(compute_losses(tasks, model(batch), batch.labels))
    weighting.on_epoch_end(epoch_mean_losses)                             # DWA, once per epoch

Conventions shared by every method:

* Only the tasks present in ``losses`` are weighted (a scheduler may drop tasks on a step). Methods that
  normalise their weights normalise over the tasks present: with ``k`` tasks present the weights of
  ``inverse_size``, ``dwa``, ``gradnorm`` and ``rlw`` sum to ``k``; FAMO's sum to 1 as in the paper.
* Weighted entries come back in the order of the ``tasks`` given to the constructor.
* Tasks are :class:`~mtl.tasks.TaskSpec` objects (supervised tasks: recommendation) or plain task names (tasks
  whose losses come from elsewhere, e.g. an RL agent's per-task critic losses). What a method reads from a
  ``TaskSpec`` has a meaning for a name too: ``static`` weighs a name 1 (or its entry in ``weights=``),
  ``uncertainty`` treats a name's loss as a Gaussian negative log-likelihood (the regression form) and refuses
  negative values, ``inverse_size`` takes every task's size from ``sizes=`` either way.
* Everything needed to resume lives in ``state_dict()``: learned parameters, buffers, and (through
  ``get_extra_state``) the internal optimisers of FAMO and GradNorm and RLW's random generator.
  Hyperparameters (``sizes``, ``TaskSpec.weight``, ``weights``, ``min_losses``) are constructor arguments, not state.
* Learned state that the *main* optimiser must train is returned by :meth:`Weighting.trainable_parameters`
  (uncertainty's log variances). FAMO and GradNorm update their own state with their own Adam; their
  state is held in ``requires_grad=False`` parameters (so it follows ``.to(device)``), never receives
  gradients from the objective, and is absent from ``trainable_parameters()``.
* Learned state is updated only in training mode with gradients enabled, so validation calls under
  ``torch.no_grad()`` or ``.eval()`` leave GradNorm and FAMO untouched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl import parallel
from mtl.split import TaskSplit
from mtl.tasks import TaskSpec

__all__ = [
    "DWA",
    "FAMO",
    "RLW",
    "WEIGHTINGS",
    "Equal",
    "GradNorm",
    "InverseSize",
    "Static",
    "Uncertainty",
    "TaskLike",
    "Weighting",
    "build_weighting",
    "famo_logit_grad",
    "gradnorm_weight_grad",
]

# (weights [k], extra terms [k] or None) for the k tasks present; see Weighting._compute
_Weights = tuple[Tensor, Tensor | None]
#: A task as a weighting takes it: a supervised task's spec, or just its name (e.g. an RL task).
TaskLike = TaskSpec | str


class Weighting(nn.Module):
    """Turns the per-task loss dict into per-task weighted losses; their sum is the objective.

    Subclasses implement :meth:`_compute`; the stateful ones override the hooks they need
    (:meth:`trainable_parameters`, :meth:`on_epoch_end`, :meth:`after_step`).

    Args:
        tasks: the tasks this weighting may see, in a fixed order (names must be unique): ``TaskSpec`` objects or
            task names (see the module docstring for what a name means to each method).
        sizes: training examples per task. Used by ``inverse_size``; accepted and ignored by the others so
            a trainer can pass the same keyword arguments to every method.
        seed: seed of the method's own random generator. Used by ``rlw``; accepted and ignored by the others.
    """

    name: str = ""
    #: When True the trainer recomputes the losses on the same batch after ``optimizer.step()`` (under
    #: ``torch.no_grad()``) and passes them to :meth:`after_step`.
    wants_losses_after_step: bool = False
    #: When True :meth:`weighted` differentiates the losses w.r.t. the ``shared`` parameters, so the graph
    #: must not be cut between body and heads (:class:`mtl.split.TaskSplit`).
    needs_shared_graph: bool = False
    #: When True :meth:`weighted` accepts ``split=`` (the model's :class:`mtl.split.TaskSplit` of this step)
    #: and measures per-task gradients through the cut; a trainer then cuts the graph for it.
    split_aware: bool = False

    def __init__(self, tasks: Sequence[TaskLike], *, sizes: Mapping[str, int] | None = None, seed: int = 0) -> None:
        super().__init__()
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a sequence of TaskSpecs or task names, got the string {tasks!r}")
        tasks = list(tasks)
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task (a TaskSpec or a task name), got none")
        for t in tasks:
            if not isinstance(t, (TaskSpec, str)):
                raise TypeError(f"tasks must be TaskSpec objects or task names, got {type(t).__name__}: {t!r}")
        names = [t.name if isinstance(t, TaskSpec) else t for t in tasks]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"task names must be unique; repeated: {duplicated}")
        self.tasks: tuple[TaskLike, ...] = tuple(tasks)
        self.task_names: tuple[str, ...] = tuple(names)
        #: The supervised tasks' specs by name (tasks given by name only have none).
        self.specs: dict[str, TaskSpec] = {t.name: t for t in tasks if isinstance(t, TaskSpec)}
        self._index = {n: i for i, n in enumerate(names)}
        self._last_names: list[str] = []
        self._last_weights: Tensor | None = None
        self._opt: torch.optim.Optimizer | None = None  # FAMO's and GradNorm's own optimiser

    # ----------------------------------------------------------------------------------------- interface
    def weighted(
        self, losses: Mapping[str, Tensor], *, shared: Iterable[nn.Parameter] = (), split: TaskSplit | None = None
    ) -> dict[str, Tensor]:
        """One scalar per task present in ``losses``; their sum is the full objective.

        Args:
            losses: ``{task_name: scalar loss}`` for some or all of the tasks.
            shared: the parameters of the last shared layer. GradNorm needs them; the others ignore them.
            split: where the losses come through a cut graph, its :class:`mtl.split.TaskSplit` (only for
                :attr:`split_aware` weightings, which then differentiate through it).
        """
        idx = self._present(losses)
        names = [self.task_names[i] for i in idx]
        values = [losses[n] for n in names]
        stacked = torch.stack(values)
        if split is not None and not self.split_aware:
            raise ValueError(f"{type(self).__name__} does not take a TaskSplit (split_aware is False)")
        if split is None:
            weights, extra = self._compute(idx, values, list(shared))
        else:
            weights, extra = self._compute(idx, values, list(shared), split=split)
        entries = weights.to(stacked) * stacked
        if extra is not None:
            entries = entries + extra.to(stacked)
        self._last_names = names
        self._last_weights = weights.detach()
        return dict(zip(names, entries.unbind()))

    def forward(self, losses: Mapping[str, Tensor], *, shared: Iterable[nn.Parameter] = ()) -> Tensor:
        """The objective: the sum of :meth:`weighted`."""
        return torch.stack(list(self.weighted(losses, shared=shared).values())).sum()

    def current_weights(self) -> dict[str, float]:
        """The weights multiplying each task's loss in the last call (``{}`` before the first), for logging."""
        if self._last_weights is None:
            return {}
        return dict(zip(self._last_names, self._last_weights.tolist()))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the main optimiser should train alongside the model (``[]`` for most methods)."""
        return []

    def on_epoch_end(self, epoch_mean_losses: Mapping[str, float]) -> None:  # noqa: B027 - optional hook
        """Called once per epoch with each task's mean training loss over the epoch. Default: nothing."""

    def after_step(self, new_losses: Mapping[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Called after ``optimizer.step()`` when :attr:`wants_losses_after_step`. Default: nothing."""

    # ----------------------------------------------------------------------------------------- for subclasses
    def _compute(self, idx: list[int], losses: list[Tensor], shared: list[nn.Parameter]) -> _Weights:
        """Weights (shape ``[k]``) and optional extra terms (``[k]``) for the tasks ``idx`` (ascending).

        The entry of task ``j`` is ``weights[j] * losses[j] + extra[j]``. Weights that must not be trained
        by the objective are returned detached.
        """
        raise NotImplementedError

    def _present(self, losses: Mapping[str, Tensor]) -> list[int]:
        """Indices (in constructor order) of the tasks in ``losses``, after checking names and shapes."""
        self._check_names(losses, "losses")
        for n, loss in losses.items():
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss of task {n!r} must be a Tensor, got {type(loss).__name__}")
            if loss.dim() != 0:
                raise ValueError(f"loss of task {n!r} must be a scalar tensor, got shape {tuple(loss.shape)}")
        return sorted(self._index[n] for n in losses)

    def _check_names(self, mapping: Mapping[str, Any], what: str) -> None:
        if not mapping:
            raise ValueError(f"{what} is empty; expected entries for one or more of the tasks {list(self.task_names)}")
        unknown = [n for n in mapping if n not in self._index]
        if unknown:
            raise ValueError(
                f"{what} has entries for tasks {unknown} that this {type(self).__name__} was not built with; "
                f"tasks: {list(self.task_names)}"
            )

    def _updates_state(self, losses: list[Tensor]) -> bool:
        """Whether this call is a training step (learned state may change)."""
        return self.training and torch.is_grad_enabled() and any(loss.requires_grad for loss in losses)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = super()._apply(fn, *args, **kwargs)
        if self._opt is not None:  # re-cast the internal optimiser's moments to the parameters' device/dtype
            self._opt.load_state_dict(copy.deepcopy(self._opt.state_dict()))
        return out

    def _step_own_optimizer(self, params: Sequence[nn.Parameter], grads: Tensor) -> None:
        """One step of the internal optimiser on ``params`` only (the others keep their values and moments)."""
        assert self._opt is not None
        for p, g in zip(params, grads.unbind()):
            p.grad = g.detach().to(p).clone()
        self._opt.step()
        for p in params:
            p.grad = None

    def extra_repr(self) -> str:
        return f"tasks={list(self.task_names)}"


def _scalar_params(n: int, value: float, *, requires_grad: bool) -> nn.ParameterList:
    """One 0-d parameter per task, so an optimiser skips the tasks absent on a step (their grad stays None)."""
    return nn.ParameterList(nn.Parameter(torch.tensor(float(value)), requires_grad=requires_grad) for _ in range(n))


class Equal(Weighting):
    """Every task's loss counts once: the objective is the plain sum of the task losses."""

    name = "equal"

    def _compute(self, idx: list[int], losses: list[Tensor], shared: list[nn.Parameter]) -> _Weights:
        return torch.ones(len(idx)), None


class Static(Weighting):
    """Fixed weights (not renormalised when tasks are absent): ``weights[t]`` where given, else the task's
    :attr:`TaskSpec.weight`, and 1 for a task given by name only.

    Args:
        weights: ``{task: weight >= 0}`` for some or all tasks, e.g. an RL run's per-task weights (its tasks have
            no ``TaskSpec``); ``None`` uses the ``TaskSpec`` weights.
    """

    name = "static"

    def __init__(
        self,
        tasks: Sequence[TaskLike],
        *,
        weights: Mapping[str, float] | None = None,
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed)
        weights = {str(k): float(v) for k, v in (weights or {}).items()}
        unknown = sorted(set(weights) - set(self.task_names))
        if unknown:
            raise ValueError(f"static: weights names unknown tasks {unknown}; tasks: {list(self.task_names)}")
        bad = {n: v for n, v in weights.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"static: weights must be finite and >= 0, got {bad}")
        values = [weights.get(n, self.specs[n].weight if n in self.specs else 1.0) for n in self.task_names]
        self.register_buffer("task_weight", torch.tensor(values, dtype=torch.float32), persistent=False)

    def _compute(self, idx: list[int], losses: list[Tensor], shared: list[nn.Parameter]) -> _Weights:
        return self.task_weight[idx], None


class InverseSize(Weighting):
    """Weights proportional to ``1 / n_t`` (training examples of task ``t``), summing to the tasks present.

    With ``k`` tasks present, ``w_t = k * (1/n_t) / sum_j (1/n_j)``: a task with fewer examples counts
    more per example, so each task contributes roughly equally to an epoch. A common heuristic, no paper.

    Args:
        sizes: ``{task_name: number of training examples}``, > 0 for every task (extra keys are ignored).
    """

    name = "inverse_size"

    def __init__(self, tasks: Sequence[TaskLike], *, sizes: Mapping[str, int] | None = None, seed: int = 0) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed)
        if sizes is None:
            raise ValueError(
                f"inverse_size needs sizes={{task: number of training examples}} for tasks {list(self.task_names)}"
            )
        missing = [n for n in self.task_names if n not in sizes]
        if missing:
            raise ValueError(f"inverse_size: sizes has no entry for tasks {missing}; got sizes for {sorted(sizes)}")
        bad = {n: sizes[n] for n in self.task_names if not sizes[n] > 0}
        if bad:
            raise ValueError(f"inverse_size: sizes must be > 0, got {bad}")
        self.sizes = {n: sizes[n] for n in self.task_names}
        self.register_buffer(
            "inverse_size", torch.tensor([1.0 / float(sizes[n]) for n in self.task_names]), persistent=False
        )

    def _compute(self, idx: list[int], losses: list[Tensor], shared: list[nn.Parameter]) -> _Weights:
        inv = self.inverse_size[idx]
        return inv * (len(idx) / inv.sum()), None


class Uncertainty(Weighting):
    """Homoscedastic uncertainty weighting with learned log variances ``s_t = log sigma_t^2`` (init 0).

    Kendall, Gal, Cipolla. "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics." CVPR 2018. arXiv:1705.07115.

    The entry of task ``t`` is ``c_t * exp(-s_t) * L_t + 0.5 * s_t`` with ``c_t = 0.5`` for regression
    (Gaussian likelihood: ``L / (2 sigma^2) + log sigma``) and ``c_t = 1`` for binary tasks (the paper's
    classification likelihood with temperature: ``L / sigma^2 + log sigma``). For a fixed loss the optimum
    is ``s* = log L`` (regression) and ``s* = log(2 L)`` (binary). The ``s_t`` are trained by the main
    optimiser: pass :meth:`trainable_parameters` to it. :meth:`current_weights` reports ``c_t exp(-s_t)``.

    A task given by name only (no ``TaskSpec``, e.g. an RL task) takes the Gaussian form, ``c_t = 0.5``, which fits
    squared errors such as SAC's critic losses. Its loss must be >= 0: for a negative ``L_t`` the entry falls without
    bound as ``s_t`` falls, so a training call raises a ``ValueError`` naming the task (SAC's actor losses can be
    negative). The supervised losses (BCE, MSE, MAE, Huber) are never negative and are not checked.
    """

    name = "uncertainty"

    def __init__(self, tasks: Sequence[TaskLike], *, sizes: Mapping[str, int] | None = None, seed: int = 0) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed)
        self.log_vars = _scalar_params(len(self.tasks), 0.0, requires_grad=True)
        kinds = [self.specs[n].kind if n in self.specs else "regression" for n in self.task_names]
        self.register_buffer("coef", torch.tensor([0.5 if k == "regression" else 1.0 for k in kinds]), persistent=False)
        self._by_name = frozenset(i for i, n in enumerate(self.task_names) if n not in self.specs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.log_vars)

    def _compute(self, idx: list[int], losses: list[Tensor], shared: list[nn.Parameter]) -> _Weights:
        if self._by_name and self._updates_state(losses):
            self._check_non_negative(idx, losses)
        s = torch.stack([self.log_vars[i] for i in idx])
        return self.coef[idx] * torch.exp(-s), 0.5 * s

    def _check_non_negative(self, idx: list[int], losses: list[Tensor]) -> None:
        named = [(i, loss) for i, loss in zip(idx, losses) if i in self._by_name]
        if not named:
            return
        values = torch.stack([loss.detach() for _, loss in named]).tolist()
        bad = {self.task_names[i]: v for (i, _), v in zip(named, values) if not v >= 0}  # also catches NaN
        if bad:
            raise ValueError(
                f"uncertainty: losses must be >= 0 (a Gaussian negative log-likelihood); got {bad}. A negative loss "
                "drives its log variance to -inf; weight such losses with equal, static, rlw or gradnorm instead"
            )


class DWA(Weighting):
    """Dynamic Weight Average.

    Liu, Johns, Davison. "End-to-End Multi-Task Learning with Attention." CVPR 2019. arXiv:1803.10704.

    ``w_t = k * exp(r_t / T) / sum_j exp(r_j / T)`` over the ``k`` tasks present, with
    ``r_t = L_t(e-1) / L_t(e-2)`` the ratio of the task's last two epoch-mean losses given to
    :meth:`on_epoch_end`. Before two epochs have been recorded every ``r_t = 1``, so all weights are 1 (the
    paper's first two epochs). A task present now but without two recorded epochs gets ``r_t = 1``; a task
    absent from an epoch's means keeps its previous two.

    Args:
        temperature: ``T`` (> 0); larger is softer. Paper: 2.
    """

    name = "dwa"

    def __init__(
        self,
        tasks: Sequence[TaskLike],
        *,
        temperature: float = 2.0,
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed)
        if not temperature > 0:
            raise ValueError(f"dwa: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        nan = torch.full((len(self.tasks),), math.nan)
        self.register_buffer("last_epoch_losses", nan.clone())  # L(e-1)
        self.register_buffer("prev_epoch_losses", nan.clone())  # L(e-2)

    def on_epoch_end(self, epoch_mean_losses: Mapping[str, float]) -> None:
        self._check_names(epoch_mean_losses, "epoch_mean_losses")
        values = {n: float(v) for n, v in epoch_mean_losses.items()}
        bad = {n: v for n, v in values.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"dwa: epoch mean losses must be finite and > 0 (their ratios are used), got {bad}")
        for n, v in values.items():
            i = self._index[n]
            self.prev_epoch_losses[i] = self.last_epoch_losses[i]
            self.last_epoch_losses[i] = v

    def _compute(self, idx: list[int], losses: list[Tensor], shared: list[nn.Parameter]) -> _Weights:
        r = self.last_epoch_losses[idx] / self.prev_epoch_losses[idx]
        r = torch.where(torch.isnan(r), torch.ones_like(r), r)
        return len(idx) * torch.softmax(r / self.temperature, dim=0), None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


def gradnorm_weight_grad(weights: Tensor, grad_norms: Tensor, loss_ratios: Tensor, alpha: float) -> Tensor:
    """Gradient w.r.t. ``weights`` of GradNorm's loss, in closed form.

    GradNorm's loss is ``L_grad = sum_t |G_t - mean(G) * r_t**alpha|`` with ``G_t = ||grad_W (w_t L_t)||
    = |w_t| * g_t`` (``g_t = ||grad_W L_t||``) and the target ``mean(G) * r_t**alpha`` held constant, as the paper
    prescribes. Hence ``dL_grad/dw_t = sign(G_t - target_t) * sign(w_t) * g_t``: no second-order graph.

    Args:
        weights: ``w`` (shape ``[k]``).
        grad_norms: ``g_t = ||grad_W L_t||`` of the *unweighted* losses (``[k]``).
        loss_ratios: relative inverse training rates ``r_t`` (``[k]``).
        alpha: asymmetry.
    """
    g = weights.abs() * grad_norms
    target = g.mean() * loss_ratios.pow(alpha)
    return torch.sign(g - target) * torch.sign(weights) * grad_norms


class GradNorm(Weighting):
    """GradNorm: learned weights that balance the task gradient norms at the last shared layer.

    Chen, Badrinarayanan, Lee, Rabinovich. "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
    Deep Multitask Networks." ICML 2018. arXiv:1711.02257.

    Each training call, over the ``k`` tasks present, with ``W`` = ``shared`` (the last shared layer):

    1. ``w_t`` = the stored weights of the present tasks, rescaled to sum to ``k`` (all stored weights start
       at 1 and sum to ``K``, so with every task present this is the stored weights themselves).
    2. ``g_t = ||grad_W L_t||`` by ``torch.autograd.grad(L_t, W, retain_graph=True)`` (first order only);
       ``G_t = w_t * g_t``.
    3. ``r_t = (L_t / L_t(0)) / mean_j(L_j / L_j(0))``, ``L_t(0)`` the first loss this weighting saw for the
       task in a training call.
    4. ``dL_grad/dw_t = sign(G_t - mean(G) r_t^alpha) * g_t`` (:func:`gradnorm_weight_grad`; exact because
       ``G_t`` is linear in ``w_t`` and the target is a constant), one Adam step on the present tasks'
       weights, clamp at ``1e-4`` (keeps a weight from changing sign), and rescale them to their previous
       sum (``K`` when every task is present: the paper's renormalisation).
    5. The returned entries are ``w_t.detach() * L_t`` with the weights of step 1, i.e. *before* this
       update, as in the paper's Algorithm 1 (the network step uses ``w(t)``; the update gives ``w(t+1)``).

    Outside training (``.eval()`` or ``torch.no_grad()``) no update happens and ``shared`` is not needed.

    Args:
        alpha: asymmetry (>= 0); larger pulls harder towards equal training rates, 0 towards equal
            gradient norms.
        lr: learning rate of the weights' own Adam.
    """

    name = "gradnorm"
    split_aware = True
    _MIN_WEIGHT = 1e-4

    def __init__(
        self,
        tasks: Sequence[TaskLike],
        *,
        alpha: float = 1.5,
        lr: float = 0.025,
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed)
        if not alpha >= 0:
            raise ValueError(f"gradnorm: alpha must be >= 0, got {alpha}")
        if not lr > 0:
            raise ValueError(f"gradnorm: lr must be > 0, got {lr}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.task_weights = _scalar_params(len(self.tasks), 1.0, requires_grad=False)
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), math.nan))
        self._opt = torch.optim.Adam(list(self.task_weights), lr=self.lr)

    def _compute(
        self, idx: list[int], losses: list[Tensor], shared: list[nn.Parameter], split: TaskSplit | None = None
    ) -> _Weights:
        stored = torch.stack([self.task_weights[i] for i in idx]).detach()
        w = stored * (len(idx) / stored.sum())
        if self._updates_state(losses):
            self._update(idx, losses, w, stored.sum(), shared, split)
        return w, None

    def _update(
        self,
        idx: list[int],
        losses: list[Tensor],
        w: Tensor,
        old_sum: Tensor,
        shared: list[nn.Parameter],
        split: TaskSplit | None = None,
    ) -> None:
        if not shared:
            raise ValueError(
                "gradnorm needs shared=<the parameters of the last shared layer> to measure task gradient norms; "
                "got none. Pass e.g. shared=list(model.shared_bottom[-1].parameters())"
            )
        if split is not None:
            # One backward through the heads for every dL_i/dZ, then the body down to `shared`, batched.
            J = split.head_backward([self.task_names[i] for i in idx], torch.stack(losses), retain_graph=True)
            g = parallel.average(split.param_jacobian(J, shared)[0].detach()).norm(dim=1).to(w)
        else:
            g = _task_grad_norms(losses, shared).to(w)
        current = torch.stack(losses).detach().to(w)
        with torch.no_grad():
            l0 = self.initial_losses[idx]
            l0 = torch.where(torch.isnan(l0), current.to(l0), l0)
            self.initial_losses[idx] = l0
            ratio = current / l0.to(w).clamp_min(torch.finfo(w.dtype).tiny)
            r = ratio / ratio.mean()
            params = [self.task_weights[i] for i in idx]
            self._step_own_optimizer(params, gradnorm_weight_grad(w, g, r, self.alpha))
            target_sum = float(len(self.tasks)) if len(idx) == len(self.tasks) else old_sum
            new = torch.stack(params).clamp_min(self._MIN_WEIGHT)
            new = new * (target_sum / new.sum())
            for p, v in zip(params, new.unbind()):
                p.copy_(v)

    def get_extra_state(self) -> dict[str, Any]:
        assert self._opt is not None
        return {"optimizer": copy.deepcopy(self._opt.state_dict())}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        assert self._opt is not None
        self._opt.load_state_dict(copy.deepcopy(state["optimizer"]))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, lr={self.lr}"


def _task_grad_norms(losses: list[Tensor], params: list[nn.Parameter]) -> Tensor:
    """``[k]``: the norm of each loss's gradient with respect to ``params`` (0 for a loss without a graph), from one
    batched backward pass (``is_grads_batched``; where that fails, one pass per task)."""
    live = [i for i, loss in enumerate(losses) if loss.requires_grad]
    norms = torch.zeros(len(losses), device=losses[0].device)
    if not live:
        return norms
    stacked = torch.stack([losses[i] for i in live])
    try:
        eye = torch.eye(len(live), dtype=stacked.dtype, device=stacked.device)
        grads = torch.autograd.grad(
            stacked, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        if parallel.current() is not None:  # data parallelism: the norms of the global batch's gradients
            flat = [g.detach().reshape(len(live), -1) for g in grads if g is not None]
            sq = [parallel.average(torch.cat(flat, dim=1)).pow(2).sum(1)] if flat else []
        else:
            sq = [g.detach().reshape(len(live), -1).pow(2).sum(1) for g in grads if g is not None]
        rows = torch.stack(sq).sum(0).sqrt() if sq else torch.zeros(len(live), device=stacked.device)
    except (RuntimeError, NotImplementedError):
        per_task = []
        for i in live:
            grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            flat = [g.detach().reshape(-1) for g in grads if g is not None]
            row = parallel.average(torch.cat(flat)[None])[0] if flat else torch.zeros(1, device=stacked.device)
            per_task.append(row.norm())
        rows = torch.stack(per_task)
    norms[live] = rows.to(norms)
    return norms


class RLW(Weighting):
    """Random Loss Weighting: fresh random weights every call.

    Lin, Ye, Zhang, Tsang. "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning." TMLR 2022. arXiv:2111.10603.

    ``w = k * softmax(eps)``, ``eps ~ N(0, I_k)`` over the ``k`` tasks present, detached. The paper's
    weights sum to 1; here they sum to ``k`` so the expected weight of each task is 1, as with ``equal``.
    The normal draws come from this module's own ``torch.Generator`` (CPU), seeded with ``seed`` and saved in
    the state dict, so a resumed run draws the same weights; the global RNG is not touched.
    """

    name = "rlw"

    def __init__(self, tasks: Sequence[TaskLike], *, sizes: Mapping[str, int] | None = None, seed: int = 0) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed)
        self.seed = int(seed)
        self._generator = torch.Generator()
        self._generator.manual_seed(self.seed)

    def _compute(self, idx: list[int], losses: list[Tensor], shared: list[nn.Parameter]) -> _Weights:
        eps = torch.randn(len(idx), generator=self._generator)
        return len(idx) * torch.softmax(eps, dim=0), None

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"].clone())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"


def _softmax(x: list[float]) -> list[float]:
    top = max(x)
    e = [math.exp(v - top) for v in x]
    total = sum(e)
    return [v / total for v in e]


def famo_logit_grad(logits: Tensor, delta: Tensor) -> Tensor:
    """``J_softmax(logits)^T delta``: FAMO's gradient of the task logits.

    Computed in closed form, ``z * (delta - <z, delta>)`` with ``z = softmax(logits)`` (what
    ``torch.autograd.grad(softmax(xi), xi, grad_outputs=delta)`` gives, without building a graph).
    """
    z = torch.softmax(logits.detach(), dim=0)
    delta = delta.detach().to(z)
    return z * (delta - (z * delta).sum())


class FAMO(Weighting):
    """Fast Adaptive Multitask Optimization: weights that equalise the tasks' rates of log-loss decrease.

    Liu, Feng, Stone, Liu. "FAMO: Fast Adaptive Multitask Optimization." NeurIPS 2023. arXiv:2306.03792.
    Official implementation: github.com/Cranial-XIX/FAMO (``famo.py``).

    Over the ``k`` tasks present, with task logits ``xi`` (init 0), ``z = softmax(xi)`` and
    ``D_t = L_t - min_t + eps``:

    * :meth:`weighted` returns ``w_t.detach() * L_t`` with ``w_t = c * z_t / D_t``,
      ``c = 1 / sum_j (z_j / D_j)`` (so the weights sum to 1). Its gradient is
      ``sum_t c z_t grad L_t / D_t``, the gradient of the paper's objective ``sum_t c z_t log D_t`` with
      ``c`` held constant (the official ``get_weighted_loss``); only the value differs.
    * :meth:`after_step` (``wants_losses_after_step = True``) receives the losses of the same batch after
      the model's step and computes ``delta_t = log D_t(old) - log D_t(new)``, the logits' gradient
      ``d = J_softmax(xi)^T delta = z * (delta - <z, delta>)`` (closed form,
      :func:`famo_logit_grad`), and takes one step of its own ``Adam(lr, weight_decay=gamma)`` on the
      present tasks' logits: the L2 term ``gamma * xi`` is FAMO's regulariser, as in the official code
      (the paper's Algorithm 1 writes a plain gradient step ``xi -= beta * (d + gamma * xi)``). A task whose
      loss fell less than the others gains weight.

    ``update="next_batch"`` drops the extra forward pass: the logits' update for step ``t`` uses the losses
    the next training call brings (at the new parameters, but on the *next* batch) in place of the same
    batch's post-step losses, just before that call's weights are computed. It costs nothing beyond
    ``equal`` and adds the batch-to-batch loss noise to ``delta``; the default ``"same_batch"`` is the
    paper's and the official code's update.

    State: the buffers ``logits [k]`` and ``adam [3, k]`` (per task: the logits' Adam step count, first and second
    moment), and the pending call's losses. The arithmetic, on k numbers, runs on Python floats.

    The official code's clipping of the model's gradient norm (``max_norm``) is the trainer's business and
    is not done here. Losses must exceed ``min_losses`` (a ``ValueError`` says which task did not): for
    losses that can be negative (e.g. RL), pass lower bounds.

    Args:
        lr: learning rate of the logits' Adam (official default: 0.025).
        gamma: weight decay of the logits (official default 0.01; 0.001 here).
        eps: added to ``L_t - min_t`` (official: 1e-8).
        min_losses: ``{task: lower bound of its loss}``; tasks not listed use 0.
        update: ``"same_batch"`` (after the step, on the same batch: one more forward pass) or
            ``"next_batch"`` (with the next training call's losses: no extra pass).
    """

    name = "famo"
    wants_losses_after_step = True

    def __init__(
        self,
        tasks: Sequence[TaskLike],
        *,
        lr: float = 0.025,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        min_losses: Mapping[str, float] | None = None,
        update: str = "same_batch",
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed)
        if update not in ("same_batch", "next_batch"):
            raise ValueError(f"famo: update must be 'same_batch' or 'next_batch', got {update!r}")
        self.update = update
        self.wants_losses_after_step = update == "same_batch"
        if not lr > 0:
            raise ValueError(f"famo: lr must be > 0, got {lr}")
        if not gamma >= 0:
            raise ValueError(f"famo: gamma must be >= 0, got {gamma}")
        if not eps > 0:
            raise ValueError(f"famo: eps must be > 0, got {eps}")
        min_losses = dict(min_losses or {})
        unknown = sorted(set(min_losses) - set(self.task_names))
        if unknown:
            raise ValueError(f"famo: min_losses names unknown tasks {unknown}; tasks: {list(self.task_names)}")
        self.lr, self.gamma, self.eps = float(lr), float(gamma), float(eps)
        self.betas, self.adam_eps = (0.9, 0.999), 1e-8  # the logits' Adam: torch.optim.Adam's defaults, as official
        self._mins = [float(min_losses.get(n, 0.0)) for n in self.task_names]
        k = len(self.tasks)
        # The task logits xi, and their Adam state per task: step count, first and second moment (rows).
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("adam", torch.zeros(3, k))
        self._prev: tuple[list[int], list[float]] | None = None  # (tasks, losses) of the last training call

    # The arithmetic is on a handful of numbers (k logits, k losses): it runs on Python floats, reading the state
    # buffers once (tolist) and writing them once per update, where the same arithmetic as k-element tensor
    # operations costs dozens of operator calls per step.

    def _shifted(self, idx: list[int], losses: list[float]) -> list[float]:
        """``L_t - min_t + eps`` of the tasks ``idx``; a ``ValueError`` names the tasks where that is not > 0."""
        d = [v - self._mins[i] + self.eps for i, v in zip(idx, losses)]
        if not all(x > 0 for x in d):  # also catches NaN
            bad = {self.task_names[i]: (v, self._mins[i]) for i, v, x in zip(idx, losses, d) if not x > 0}
            raise ValueError(
                f"famo: every loss must exceed its lower bound (FAMO takes log(L - min)); got (loss, min) {bad}. "
                "Pass min_losses={task: lower bound} for losses that can reach or go below 0"
            )
        return d

    def _compute(self, idx: list[int], losses: list[Tensor], shared: list[nn.Parameter]) -> _Weights:
        current = torch.stack(losses).detach().tolist()
        updating = self._updates_state(losses)
        if self.update == "next_batch" and self._prev is not None and updating:
            # The previous step's update, with this call's losses as its "after" losses.
            self._update(idx, current)
        d = self._shifted(idx, current)
        xi = self.logits.tolist()
        z = _softmax([xi[i] for i in idx])
        w = [zj / dj for zj, dj in zip(z, d)]
        total = sum(w)
        if updating:
            self._prev = (list(idx), current)
        return torch.tensor([x / total for x in w]), None

    def after_step(self, new_losses: Mapping[str, Tensor]) -> None:
        if self._prev is None:
            raise RuntimeError(
                "famo: after_step() needs a preceding training call of weighted()/forward() (training mode, "
                "gradients enabled) on the same batch; none is pending"
            )
        self._check_names(new_losses, "new_losses")
        idx = [i for i in self._prev[0] if self.task_names[i] in new_losses]
        values = [torch.as_tensor(new_losses[self.task_names[i]]).detach() for i in idx]
        self._update(idx, torch.stack(values).tolist() if values else [])

    def _update(self, idx: list[int], new: list[float]) -> None:
        """The logits' step for the tasks ``idx`` of the pending call, with their losses ``new`` (tasks the pending
        call did not have are ignored): ``delta``, the softmax VJP (:func:`famo_logit_grad`) and one Adam step
        (with weight decay ``gamma``) of the logits of those tasks, each at its own step count, with
        ``torch.optim.Adam``'s formulas."""
        assert self._prev is not None
        prev_idx, prev = self._prev
        self._prev = None
        at = {i: j for j, i in enumerate(prev_idx)}
        if any(i not in at for i in idx):
            new = [v for i, v in zip(idx, new) if i in at]
            idx = [i for i in idx if i in at]
        if not idx:
            return
        old = [prev[at[i]] for i in idx]
        d_old, d_new = self._shifted(idx, old), self._shifted(idx, new)
        delta = [math.log(a) - math.log(b) for a, b in zip(d_old, d_new)]
        xi = self.logits.tolist()
        steps, m, v = self.adam.tolist()
        z = _softmax([xi[i] for i in idx])
        dot = sum(a * b for a, b in zip(z, delta))
        beta1, beta2 = self.betas
        for i, zj, dj in zip(idx, z, delta):
            g = zj * (dj - dot) + self.gamma * xi[i]  # famo_logit_grad, plus the L2 term (Adam's weight_decay)
            t = steps[i] = steps[i] + 1.0
            m[i] += (g - m[i]) * (1 - beta1)
            v[i] = v[i] * beta2 + (1 - beta2) * g * g
            denom = math.sqrt(v[i]) / math.sqrt(1 - beta2**t) + self.adam_eps
            xi[i] -= self.lr / (1 - beta1**t) * m[i] / denom
        with torch.no_grad():
            self.logits.copy_(torch.tensor(xi))
            self.adam.copy_(torch.tensor([steps, m, v]))

    def get_extra_state(self) -> dict[str, Any]:
        prev = None if self._prev is None else (list(self._prev[0]), torch.tensor(self._prev[1]))
        return {"pending": prev}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pending = state.get("pending")
        self._prev = None if pending is None else (list(pending[0]), torch.as_tensor(pending[1]).tolist())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints of the earlier layout (one 0-d parameter per task, ``logits.<i>``, and the state of a
        # torch.optim.Adam over them in the extra state) load into the buffers.
        old = [f"{prefix}logits.{i}" for i in range(len(self.tasks))]
        if old[0] in state_dict and f"{prefix}logits" not in state_dict:
            state_dict[f"{prefix}logits"] = torch.stack([torch.as_tensor(state_dict.pop(key)) for key in old])
            extra = state_dict.get(f"{prefix}_extra_state") or {}
            adam = torch.zeros(3, len(self.tasks))
            for i, st in (extra.get("optimizer") or {}).get("state", {}).items():
                moments = [torch.as_tensor(st[key]).float() for key in ("step", "exp_avg", "exp_avg_sq")]
                adam[:, int(i)] = torch.stack(moments)
            state_dict[f"{prefix}adam"] = adam
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lr={self.lr}, gamma={self.gamma}, eps={self.eps}"


WEIGHTINGS: dict[str, type[Weighting]] = {
    cls.name: cls for cls in (Equal, Static, InverseSize, Uncertainty, DWA, GradNorm, RLW, FAMO)
}


def build_weighting(name: str, tasks: Sequence[TaskLike], **kwargs: Any) -> Weighting:
    """Build the weighting registered as ``name`` in :data:`WEIGHTINGS` (e.g. ``"famo"``) for ``tasks`` (TaskSpecs or
    task names)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](tasks, **kwargs)
