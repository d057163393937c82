"""One multi-task training step, the same for every trainer: which tasks count, how their losses are weighted, how
the weighted losses become gradients, the optimiser step, and the feedback the strategies learn from.

:class:`MultiTaskStep` holds the three strategies of one objective (one optimiser) and runs them in this order::

    scheduler.select(step)                          # the tasks that count (every task without a scheduler)
        -> the caller's forward pass: {task: loss} of those tasks
    optimizer.zero_grad()
    weighting.weighted(losses, shared=last_shared)  # mtl.weighting (None: the losses as they are)
    gradient.backward(weighted, shared, others)     # mtl.gradients: fills .grad
    regulariser.backward()                          # an extra term outside the per-task objective, if any
    clip_grad_norm_(clipped, max_grad_norm)         # if set
    optimizer.step()
    weighting.after_step(losses_after_step())       # only for weightings that want the post-step losses (FAMO)
    scheduler.observe(step, losses)                 # only for schedulers that learn from training losses

Example (a recommendation model; ``mtrec.trainer.Trainer`` does this, as does each SAC update of ``mtrl.agents``
for its critic and its actor)::

    step = MultiTaskStep(["ctr", "cvr"], weighting=FAMO(["ctr", "cvr"]), gradient=PCGrad(), scheduler=Exp3Bandit(...))
    params = StepParameters(shared=body_params, others=head_params, last_shared=body_params[-2:])
    for i, batch in enumerate(loader):
        tasks = step.select(i)
        losses = compute_losses(tasks, model(batch), batch.labels)
        out = step.run(i, losses, optimizer, params,
                       losses_after_step=lambda: compute_losses(tasks, model(batch), batch.labels))
    step.end_epoch()                                # DWA: the epoch's mean losses

The caller keeps what differs between trainers: the forward pass (one joint batch, per-task batches, SAC's targets),
the cut (:class:`~mtl.split.TaskSplit`, or the shared representation for MGDA-UB style methods) and what the step
should recompute after the optimiser step (the callable ``losses_after_step``, called under
``torch.no_grad()`` only when the weighting asks for it, so a trainer pays the extra forward pass only then; not
``inference_mode``, which skips the autograd dispatch that FBGEMM's CPU embedding kernels are registered under).

Several steps may share one scheduler (an RL agent's actor and critic count the same tasks in an update): give
``feedback=False`` to all but one, which then alone feeds it and saves its state.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mtl.gradients import GradientMethod, Plain
from mtl.parallel import DataParallel
from mtl.scheduling import TaskScheduler
from mtl.split import TaskSplit
from mtl.weighting import Weighting

__all__ = ["MultiTaskStep", "StepParameters", "StepResult"]


@dataclass(frozen=True)
class StepParameters:
    """The parameters one objective trains, as the strategies need them apart.

    Attributes:
        shared: parameters every task's loss reaches; the gradient method *sets* their ``.grad`` (aggregated).
        others: task-owned parameters and any others the objective trains (a weighting's log variances, a loss
            hook's); they get the plain gradient of the weighted sum, *accumulated*.
        last_shared: the last shared layer's parameters, for weightings that measure task gradient norms there
            (GradNorm); ignored by the others.
        clipped: whose global gradient norm ``max_grad_norm`` clips (usually the model's parameters).
        replicated: with data parallelism, the parameters every rank holds a copy of, whose gradients the step
            averages over the ranks (``None``: ``shared`` and ``others``); leave model-parallel ones out.
    """

    shared: Sequence[nn.Parameter]
    others: Sequence[nn.Parameter] = ()
    last_shared: Sequence[nn.Parameter] = ()
    clipped: Sequence[nn.Parameter] = ()
    replicated: Sequence[nn.Parameter] | None = None


@dataclass
class StepResult:
    """What one :meth:`MultiTaskStep.run` did.

    Attributes:
        losses: ``{task: unweighted loss}`` of the tasks that counted (still in the graph of the forward pass).
        weighted: ``{task: weighted loss}`` (their sum is the objective the gradient method differentiated).
        stats: the gradient method's statistics (floats, for logging).
    """

    losses: dict[str, Tensor]
    weighted: dict[str, Tensor]
    stats: dict[str, float] = field(default_factory=dict)

    @functools.cached_property
    def loss_values(self) -> dict[str, float]:
        """The unweighted losses as floats (a device sync; computed once)."""
        return {k: float(v.item()) for k, v in self.losses.items()}

    @functools.cached_property
    def objective(self) -> float:
        """The weighted objective as a float (a device sync; computed once)."""
        return float(sum(v.item() for v in self.weighted.values()))


def _unique(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]  # type: ignore[func-returns-value]


def _overrides(obj: object, base: type, method: str) -> bool:
    """Whether ``obj``'s class replaces ``base``'s no-op ``method`` (so calling it, and syncing for it, matters)."""
    return getattr(type(obj), method) is not getattr(base, method)


class MultiTaskStep:
    """Scheduler -> weighting -> gradient method -> optimiser step -> after-step feedback, for one objective.

    Args:
        tasks: every task of the objective, in a fixed order.
        weighting: turns the per-task losses into weighted ones (:mod:`mtl.weighting`); ``None`` leaves them as they
            are (the plain sum).
        gradient: turns the weighted losses into gradients (:mod:`mtl.gradients`); ``None`` is
            :class:`~mtl.gradients.Plain` (``sum(weighted).backward()``).
        scheduler: picks the tasks that count at each step (:mod:`mtl.scheduling`); ``None``: every task.
        feedback: feed this step's unweighted losses to the scheduler (:meth:`TaskScheduler.observe`) and save its
            state. ``False`` for a step that shares another step's scheduler.
        max_grad_norm: clip the global norm of :attr:`StepParameters.clipped`'s gradients to this value before the
            optimiser step (``None``: no clipping).
        data_parallel: the ranks that each hold a shard of the global batch (:class:`mtl.parallel.DataParallel`):
            the step then updates the replicated parameters as one process with the global batch would (losses,
            per-task gradients and the final gradients reduced where each strategy reads them; see
            :mod:`mtl.parallel`). ``None``: one process.

    Raises:
        ValueError: the weighting or the scheduler was built for other tasks.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        weighting: Weighting | None = None,
        gradient: GradientMethod | None = None,
        scheduler: TaskScheduler | None = None,
        feedback: bool = True,
        max_grad_norm: float | None = None,
        data_parallel: DataParallel | None = None,
    ) -> None:
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r}; wrap it in a list")
        self.tasks: tuple[str, ...] = tuple(str(t) for t in tasks)
        if not self.tasks:
            raise ValueError("MultiTaskStep needs at least one task, got none")
        for what, names in (
            ("weighting", None if weighting is None else weighting.task_names),
            ("scheduler", None if scheduler is None else scheduler.tasks),
        ):
            if names is not None and set(names) != set(self.tasks):
                raise ValueError(
                    f"MultiTaskStep: the {what} was built for tasks {list(names)}; this step has {list(self.tasks)}"
                )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.weighting = weighting
        self.gradient = gradient if gradient is not None else Plain()
        self.scheduler = scheduler
        self.feedback = bool(feedback)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.data_parallel = data_parallel
        # Calls (and the device syncs they need) that change nothing are skipped.
        self._observes = feedback and scheduler is not None and _overrides(scheduler, TaskScheduler, "observe")
        self._epochs = weighting is not None and _overrides(weighting, Weighting, "on_epoch_end")
        self.epoch_loss_sum: dict[str, float] = {}
        self.epoch_loss_count: dict[str, int] = {}

    # --------------------------------------------------------------------------------------------- what a trainer asks
    @property
    def wants_split(self) -> bool:
        """Whether a strategy works faster through a cut graph (:class:`~mtl.split.TaskSplit`) and none forbids one:
        a trainer whose model can cut its graph then passes the split as ``cut``."""
        w = self.weighting
        wants = self.gradient.uses_split or (w is not None and w.split_aware)
        return wants and not (w is not None and w.needs_shared_graph)

    @property
    def requires_representation(self) -> bool:
        """Whether the gradient method needs the shared representation ``Z`` (or a split) as ``cut``."""
        return self.gradient.requires_representation

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the strategies that the caller's optimiser must train (uncertainty's log variances); they
        belong in :attr:`StepParameters.others`."""
        return self.weighting.trainable_parameters() if self.weighting is not None else []

    def select(self, step: int) -> list[str]:
        """The tasks whose losses count at ``step``, in the order of :attr:`tasks` (the same on repeated calls)."""
        if self.scheduler is None:
            return list(self.tasks)
        return self.scheduler.select(step)

    # ------------------------------------------------------------------------------------------------------ the step
    def run(
        self,
        step: int,
        losses: Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer,
        params: StepParameters,
        *,
        cut: Tensor | TaskSplit | None = None,
        regularizer: Tensor | None = None,
        losses_after_step: Callable[[], Mapping[str, Tensor]] | None = None,
        count: int | Mapping[str, int] | None = None,
        after_backward: Callable[[], None] | None = None,
    ) -> StepResult:
        """One optimiser step on ``losses`` (see the module docstring for the order).

        Args:
            step: the step's index (the scheduler's clock; consecutive steps from 0, the same on resume).
            losses: ``{task: scalar loss}`` of at least the tasks :meth:`select` gives for ``step``; the losses of
                other tasks do not count.
            optimizer: steps every parameter of ``params`` (and :meth:`trainable_parameters`).
            params: the parameters, as the strategies need them apart.
            cut: the model's :class:`~mtl.split.TaskSplit` of this forward pass, or its shared representation for a
                gradient method that :attr:`requires_representation`.
            regularizer: a scalar outside the per-task objective (a model's regularisation), back-propagated plainly
                after the gradient method.
            losses_after_step: the same batch's losses after the optimiser step, for weightings that want them
                (:attr:`Weighting.wants_losses_after_step`); called under ``torch.no_grad()``.
            count: with ``data_parallel``, this rank's rows of the step (one number, or one per task with per-task
                batches): the losses' global values weight each rank's mean by its rows.
            after_backward: called once every gradient is in place, before the replicated gradients are averaged,
                clipped and stepped (a model-parallel part's own backward: the embedding tables').

        Raises:
            ValueError: ``losses`` lacks a task that counts at ``step``, or the weighting wants the post-step losses and
                ``losses_after_step`` is ``None``.
        """
        counted = self._counted(step, losses)
        w = self.weighting
        if w is not None and w.wants_losses_after_step and losses_after_step is None:
            raise ValueError(
                f"{type(w).__name__} updates itself from the losses after the optimiser step: pass losses_after_step="
                "<a callable returning the same batch's {task: loss}>"
            )
        dp = self.data_parallel
        if dp is not None:
            if count is None:
                raise ValueError("MultiTaskStep with data_parallel: pass count=<this rank's rows of the step>")
            counted = dp.global_losses(counted, count)
        optimizer.zero_grad(set_to_none=True)
        with dp.active() if dp is not None else contextlib.nullcontext():
            if w is None:
                weighted = counted
            elif isinstance(cut, TaskSplit) and w.split_aware:
                weighted = w.weighted(counted, shared=params.last_shared, split=cut)
            else:
                weighted = w.weighted(counted, shared=params.last_shared)
            stats = self.gradient.backward(weighted, params.shared, others=params.others, representation=cut)
        if regularizer is not None and regularizer.requires_grad:
            regularizer.backward()
        if after_backward is not None:
            after_backward()
        if dp is not None:
            replicated = params.replicated if params.replicated is not None else [*params.shared, *params.others]
            dp.average_grads(_unique(replicated))
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params.clipped, self.max_grad_norm)
        optimizer.step()
        result = StepResult(counted, weighted, stats)
        if w is not None and w.wants_losses_after_step:
            assert losses_after_step is not None
            with torch.no_grad():
                after = losses_after_step()
                if dp is not None:
                    assert count is not None
                    after = {k: v.detach() for k, v in dp.global_losses(after, count).items()}
            w.after_step(after)
        if self._observes:
            assert self.scheduler is not None
            self.scheduler.observe(step, result.loss_values)
        if self._epochs:
            for k, v in result.loss_values.items():
                self.epoch_loss_sum[k] = self.epoch_loss_sum.get(k, 0.0) + v
                self.epoch_loss_count[k] = self.epoch_loss_count.get(k, 0) + 1
        return result

    def end_epoch(self) -> dict[str, float]:
        """Hand the mean losses of the steps since the last call to the weighting (:meth:`Weighting.on_epoch_end`,
        e.g. DWA) and start over; returns them (``{}``, and nothing is called, when no step recorded any)."""
        means = {k: self.epoch_loss_sum[k] / self.epoch_loss_count[k] for k in self.epoch_loss_sum}
        self.epoch_loss_sum, self.epoch_loss_count = {}, {}
        if means and self.weighting is not None:
            self.weighting.on_epoch_end(means)
        return means

    def _counted(self, step: int, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The losses of the tasks that count at ``step``, in the caller's order."""
        if self.scheduler is None:
            return dict(losses)
        selected = self.select(step)
        missing = [t for t in selected if t not in losses]
        if missing:
            raise ValueError(
                f"step {step} counts tasks {selected}, but losses has none for {missing} (got {list(losses)}); "
                "compute the losses of step.select(step)"
            )
        if len(losses) == len(selected):
            return dict(losses)
        chosen = set(selected)
        return {k: v for k, v in losses.items() if k in chosen}

    # ------------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the weighting's and the gradient method's state, the scheduler's (``None`` without one
        or with ``feedback=False``) and the losses of the epoch so far."""
        return {
            "weighting": self.weighting.state_dict() if self.weighting is not None else None,
            "gradient": self.gradient.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None and self.feedback else None,
            "epoch_losses": (dict(self.epoch_loss_sum), dict(self.epoch_loss_count)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a missing or ``None`` entry leaves that part as it is)."""
        if self.weighting is not None and state.get("weighting") is not None:
            self.weighting.load_state_dict(state["weighting"])
        self.gradient.load_state_dict(state.get("gradient") or {})
        if self.scheduler is not None and self.feedback and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("epoch_losses") is not None:
            self.epoch_loss_sum, self.epoch_loss_count = (dict(d) for d in state["epoch_losses"])

    def __repr__(self) -> str:
        return (
            f"MultiTaskStep(tasks={list(self.tasks)}, weighting={self.weighting!r}, gradient={self.gradient!r}, "
            f"scheduler={self.scheduler!r})"
        )
