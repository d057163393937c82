"""The multi-task training loop: per-task validation each epoch, early stopping on validation,
atomic checkpoints, exact resume, JSONL (and TensorBoard) logs, test on the best checkpoint.

A metric a split cannot define (AUC where every label is one class) is reported as NaN with an
:class:`UndefinedMetricWarning` that names the split, the task and the label counts.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtl.checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state
from mtl.gradients import GradientMethod, Plain
from mtl.scheduling import TaskScheduler, TaskStreams
from mtl.split import TaskSplit
from mtl.step import MultiTaskStep, StepParameters
from mtl.tasks import TaskSpec, compute_losses
from mtl.weighting import Static, Weighting
from mtrec.data.batch import Batch, TabularDataset
from mtrec.distributed import DistContext, RankShard, filler_batch, gather_rows, lockstep, over_ranks, padded
from mtrec.models.inputs import InputArch

LAST = "last.pt"
BEST = "best.pt"
LAST_SHARDED = "checkpoints"  # a sharded run's (torch.distributed.checkpoint) last and best checkpoints
BEST_SHARDED = "best"
log = logging.getLogger("mtrec.trainer")


class UndefinedMetricWarning(RuntimeWarning):
    """A metric without a value on a split (AUC where every label is one class), reported as NaN."""


@dataclass
class TrainerConfig:
    """Settings of :class:`Trainer` (the ``trainer/`` config group)."""

    max_epochs: int = 10
    """Upper bound on passes over the training set."""
    max_steps: int | None = None
    """Stop after this many optimiser steps in total (across resumes); ``None`` = no cap."""
    batch_size: int = 1024
    """Training mini-batch size."""
    eval_batch_size: int = 8192
    """Mini-batch size for validation and test passes."""
    monitor: str = "loss"
    """Early-stopping score on validation: ``loss`` (mean task loss, lower is better) or ``auc``
    (mean AUC over binary tasks, higher is better)."""
    patience: int = 3
    """Stop after this many validations without improvement."""
    min_delta: float = 0.0
    """Smallest change of the monitored score that counts as improvement."""
    checkpoint_every_steps: int = 0
    """Also write ``last.pt`` every N steps (0 = only at the end of each epoch and at stop)."""
    resume: bool = False
    """Continue from ``last.pt`` in the run directory."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value."""
    log_every_steps: int = 50
    """Write a training record to ``train_log.jsonl`` every N steps."""
    progress: bool = True
    """Show tqdm progress bars."""
    tensorboard: bool = True
    """Also log to TensorBoard when it is installed."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    num_threads: int | None = None
    """torch intra-op threads (``None`` = torch's default)."""
    nproc_per_node: int = 1
    """Training processes on this machine: ``N > 1`` launches ``N`` through ``torch.distributed.run`` (each a rank
    of a DistributedModelParallel job; :mod:`mtrec.distributed`). Under ``torchrun`` it is torchrun's to set."""
    max_restarts: int = 0
    """With ``nproc_per_node > 1``: restart the workers this many times after a failure (they resume from the last
    checkpoint by themselves)."""
    cut_graph: bool = True
    """Let gradient methods (and GradNorm) cut the model's graph between shared body and task heads
    (``MultiTaskModel.forward_with_split``, :mod:`mtl.split`) where the model, the weighting and the data
    allow it: the same gradients, computed with one head backward instead of ``k``. ``false`` forces the
    batched Jacobian of the whole graph (for comparison)."""

    def __post_init__(self) -> None:
        if self.monitor not in ("loss", "auc"):
            raise ValueError(f"trainer.monitor must be 'loss' or 'auc', got {self.monitor!r}")
        for key in ("max_epochs", "batch_size", "eval_batch_size", "patience", "log_every_steps", "nproc_per_node"):
            if getattr(self, key) <= 0:
                raise ValueError(f"trainer.{key} must be > 0, got {getattr(self, key)}")
        if self.max_restarts < 0:
            raise ValueError(f"trainer.max_restarts must be >= 0, got {self.max_restarts}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"trainer.max_steps must be > 0 or null, got {self.max_steps}")


class LossHook(Protocol):
    """An extra objective the trainer computes instead of the plain task losses (e.g. knowledge distillation,
    :class:`mtrec.distill.StudentDistillation`).

    ``losses`` returns one scalar per task, so weighting and gradient methods apply to it unchanged.
    ``needs_representation``: the hook reads the model's shared representation (``forward_with_representation``),
    which also turns off the cut graph (``TrainerConfig.cut_graph``). Its ``trainable_parameters()`` join the
    task-owned parameters given to gradient methods (the optimiser must hold them too); its ``state_dict`` is
    saved in ``last.pt``.
    """

    needs_representation: bool

    def losses(
        self,
        tasks: Sequence[TaskSpec],
        outputs: Mapping[str, Tensor],
        batch: Batch,
        representation: Tensor | None,
        step: int,
    ) -> dict[str, Tensor]: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...

    def to(self, device: torch.device) -> Any: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    return Batch(
        dense=batch.dense.to(device, non_blocking=True),
        sparse=batch.sparse.to(device, non_blocking=True),
        labels={k: v.to(device, non_blocking=True) for k, v in batch.labels.items()},
    )


class BatchSource(Protocol):
    """What the trainer draws batches from: a :class:`TabularDataset`, or a dataset streamed from files
    (:class:`mtrec.data.files.FileDataset`) with the same three members."""

    def __len__(self) -> int: ...

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int: ...

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, start: int = 0
    ) -> Iterator[Batch]: ...


def input_arches(model: nn.Module) -> list[InputArch]:
    """The model's input arches (the modules holding embedding tables)."""
    return [m for m in model.modules() if isinstance(m, InputArch)]


@torch.no_grad()
def _outputs_and_labels(
    model: nn.Module,
    data: BatchSource,
    batch_size: int,
    device: torch.device | None,
    dist: DistContext | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Model outputs over a whole dataset, in row order, on CPU, and the labels of the same batches (for the
    model's outputs). With ``dist``: every rank's rows (a dataset in memory is cut into one block per rank, a file
    stream reads each rank's own units), gathered in rank order on every rank (:mod:`mtrec.distributed`)."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    chunks: dict[str, list[Tensor]] = {}
    labels: dict[str, list[Tensor]] = {}
    batches: Iterable[tuple[Batch, bool]]
    if dist is not None:
        if isinstance(data, TabularDataset):
            data = data.subset(torch.tensor_split(torch.arange(len(data)), dist.world_size)[dist.rank])
        arches = input_arches(model)
        filler = filler_batch(arches[0].features, ()) if arches else None
        batches = padded(data.batches(batch_size), dist, filler)
    else:
        batches = ((b, True) for b in data.batches(batch_size))
    for batch, real in batches:
        out = model(*batch_to(batch, device)[:2])
        for k, v in out.items():
            chunks.setdefault(k, [])
            labels.setdefault(k, [])
            if real:
                chunks[k].append(v.float().cpu())
                if k in batch.labels:
                    labels[k].append(batch.labels[k])
    model.train(was_training)
    outputs = {k: torch.cat(v) if v else torch.zeros(0) for k, v in chunks.items()}
    targets = {k: torch.cat(v) if v else torch.zeros(0) for k, v in labels.items() if v or dist is not None}
    if dist is not None:
        outputs, targets = gather_rows(outputs, dist), gather_rows(targets, dist)
    return outputs, targets


def predict(
    model: nn.Module,
    data: BatchSource,
    batch_size: int = 8192,
    device: torch.device | None = None,
    dist: DistContext | None = None,
) -> dict[str, Tensor]:
    """Model outputs over a whole dataset, in row order, on CPU."""
    return _outputs_and_labels(model, data, batch_size, device, dist)[0]


def evaluate(
    model: nn.Module,
    data: BatchSource,
    tasks: Sequence[TaskSpec],
    batch_size: int = 8192,
    device: torch.device | None = None,
    split: str | None = None,
    dist: DistContext | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value, "loss": value}}`` over a whole dataset (``split``: its name in warnings; ``dist``:
    over every rank's rows, the same numbers on every rank).

    An AUC the labels leave undefined (one class only) is NaN, with an :class:`UndefinedMetricWarning`.
    """
    outputs, labels = _outputs_and_labels(model, data, batch_size, device, dist)  # labels as read (a stream too)
    result: dict[str, dict[str, float]] = {}
    for t in tasks:
        out, lab = outputs[t.name], labels[t.name]
        metrics = t.evaluate(out, lab)
        metrics["loss"] = float(t.loss_fn(out, lab.float()).item())
        if math.isnan(metrics.get("auc", 0.0)):
            positives = int((lab > 0.5).sum())
            where = f"{split}/{t.name}" if split else t.name
            warnings.warn(
                f"{where}: AUC undefined: all {lab.numel()} labels are {1 if positives else 0} (reported as NaN)",
                UndefinedMetricWarning,
                stacklevel=2,
            )
        result[t.name] = metrics
    return result


def monitor_score(metrics: dict[str, dict[str, float]], tasks: Sequence[TaskSpec], monitor: str) -> float:
    """A single number to early-stop on, oriented so that larger is better.

    Raises:
        ValueError: ``monitor="auc"`` without a binary task with the AUC metric, or with an AUC the
            validation labels leave undefined (no checkpoint could ever be the best).
    """
    if monitor == "loss":
        return -sum(metrics[t.name]["loss"] for t in tasks) / len(tasks)
    aucs = {t.name: metrics[t.name]["auc"] for t in tasks if t.kind == "binary" and "auc" in metrics[t.name]}
    if not aucs:
        raise ValueError("trainer.monitor='auc' needs at least one binary task with the auc metric")
    undefined = [name for name, value in aucs.items() if math.isnan(value)]
    if undefined:
        raise ValueError(
            f"trainer.monitor='auc': the validation AUC of {undefined} is undefined (one class only in the "
            "validation split); monitor the loss (trainer.monitor=loss) or give the validation split more rows"
        )
    return sum(aucs.values()) / len(aucs)


class _Logger:
    """JSONL log in the run directory, mirrored to TensorBoard when available."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True) -> None:
        self.path = run_dir / "train_log.jsonl"
        self.writer = None
        self.enabled = enabled  # rank 0 alone writes the run's log
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(prefix: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{prefix}/{t}/{m}": v for t, d in metrics.items() for m, v in d.items()}


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's ``{"shared": ..., task: ...}`` split; a model without one is all shared."""
    if hasattr(model, "parameter_groups"):
        return model.parameter_groups()
    return {"shared": list(model.parameters())}


def _task_pass(data: TabularDataset, batch_size: int, seed: int, pass_index: int) -> Iterator[Batch]:
    """One shuffled pass over a task's own dataset (the ``pass_index``-th; seeded)."""
    return data.batches(batch_size, shuffle=True, seed=seed, epoch=pass_index)


class Trainer:
    """Trains a multi-task model on a :class:`TabularDataset`.

    One step is :class:`mtl.step.MultiTaskStep`'s: the scheduler (``mtl.scheduling``, default: every task) picks
    the tasks that count; the per-task loss dict (``mtl.compute_losses``) goes through the weighting
    (``mtl.weighting``, default: each TaskSpec's static weight) and the gradient method (``mtl.gradients``,
    default: plain backward of the sum), which leaves the gradients in ``.grad``; ``model.regularization()`` is
    added when the model has one; then the optimiser steps and the strategies get their feedback. This class
    supplies the forward passes (one joint batch or per-task batches, through the model's cut graph where that
    helps) and the loop around. Stateful strategies are checkpointed with the rest.

    Checkpoints: ``last.pt`` (everything needed to continue: model, optimiser, RNG states, position in
    the epoch, early-stopping state) and ``best.pt`` (weights at the best validation score). Batches
    are ordered by ``(seed, epoch)`` only, so a resumed run replays exactly the steps an uninterrupted
    run would have taken.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        tasks: Sequence[TaskSpec],
        config: TrainerConfig,
        run_dir: str | Path,
        *,
        seed: int = 0,
        weighting: Weighting | None = None,
        gradient: GradientMethod | None = None,
        scheduler: TaskScheduler | None = None,
        loss_hook: LossHook | None = None,
        dist: DistContext | None = None,
        sharded: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.dist = dist
        self.sharded = sharded  # the DistributedModelParallel whose inner module is `model` (checkpoints)
        self.optimizer = optimizer
        self.tasks = list(tasks)
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.device = dist.device if dist is not None else resolve_device(config.device)
        if sharded is None:
            self.model.to(self.device)
        self.weighting = (weighting if weighting is not None else Static(self.tasks)).to(self.device)
        self.gradient = gradient if gradient is not None else Plain()
        self.scheduler = scheduler
        self.mt = MultiTaskStep(
            [t.name for t in self.tasks],
            weighting=self.weighting,
            gradient=self.gradient,
            scheduler=scheduler,
            max_grad_norm=config.grad_clip,
            data_parallel=dist.data_parallel if dist is not None else None,
        )
        self.loss_hook = loss_hook.to(self.device) if loss_hook is not None else None
        self.shared_params = [p for p in parameter_groups(model).get("shared", []) if p.requires_grad]
        shared_ids = {id(p) for p in self.shared_params}
        self.other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]
        self.other_params += [p for p in self.mt.trainable_parameters() if id(p) not in shared_ids]
        if self.loss_hook is not None:
            self.other_params += [p for p in self.loss_hook.trainable_parameters() if id(p) not in shared_ids]
        last_shared = getattr(model, "last_shared_parameters", None)
        self.last_shared = list(last_shared()) if last_shared is not None else self.shared_params[-2:]
        # Model parallelism: the sharded tables' parameters are each rank's own. They leave the per-task gradient
        # methods' parameters and the averaged ones; the pooled embeddings enter the model as leaves whose plain
        # gradient of the weighted sum goes back into the tables (InputArch.backward_embeddings).
        self._arches = input_arches(model) if sharded is not None else []
        sharded_ids = {id(p) for a in self._arches if a.ebc is not None for p in a.ebc.parameters()}
        for a in self._arches:
            a.embedding_cut = True
        self.shared_params = [p for p in self.shared_params if id(p) not in sharded_ids]
        self.other_params = [p for p in self.other_params if id(p) not in sharded_ids]
        self.last_shared = [p for p in self.last_shared if id(p) not in sharded_ids] or self.shared_params[-2:]
        replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in sharded_ids]
        self.params = StepParameters(
            self.shared_params,
            self.other_params,
            self.last_shared,
            clipped=replicated if dist is not None else list(model.parameters()),
            replicated=[*replicated, *self.other_params] if dist is not None else None,  # the step drops repeats
        )
        # Per-task gradients through a cut graph (joint batches only; see TrainerConfig.cut_graph). Not with sharded
        # tables: the embedding leaves sit below the cut.
        self._use_split = bool(
            self.cfg.cut_graph
            and self.mt.wants_split
            and getattr(model, "can_split", False)
            and not (self.loss_hook is not None and self.loss_hook.needs_representation)
            and sharded is None
        )
        self.streams: TaskStreams[Batch] | None = None  # per-task datasets (see fit)
        # Training position and early-stopping state (all saved in last.pt).
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.best_score = -math.inf
        self.best_step = -1
        self.best_val: dict[str, dict[str, float]] = {}
        self.bad_evals = 0
        self.stop_reason: str | None = None

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "best_val": self.best_val,
            "bad_evals": self.bad_evals,
            "stop_reason": self.stop_reason,
            "seed": self.seed,
            **self.mt.state_dict(),  # weighting, gradient, scheduler, epoch_losses
            "streams": self.streams.state_dict() if self.streams is not None else None,
            "trainer": asdict(self.cfg),
            "loss_hook": self.loss_hook.state_dict() if self.loss_hook is not None else None,
        }

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0, or the only process)."""
        return self.dist is None or self.dist.is_main

    def _optimizers(self) -> dict[str, Any]:
        optimizers: dict[str, Any] = {"optimizer": self.optimizer}
        fused = getattr(self.sharded, "fused_optimizer", None)  # the tables' (FBGEMM's, applied in backward)
        if fused is not None:
            optimizers["fused"] = fused
        return optimizers

    def save_last(self) -> None:
        if self.sharded is not None:
            from mtrec import dist_checkpoint

            state = self.state_dict()
            for key in ("model", "optimizer"):
                state.pop(key)
            dist_checkpoint.save(self.run_dir / LAST_SHARDED, model=self.sharded, optimizers=self._optimizers(),
                                 extra=state, step=self.step)  # fmt: skip
            return
        atomic_torch_save(self.state_dict(), self.run_dir / LAST)

    def load_last(self) -> bool:
        """Restore from ``last.pt`` (a sharded run: the last checkpoint under ``checkpoints/``); returns False when
        there is none."""
        path = self.run_dir / LAST
        if self.sharded is not None:
            from mtrec import dist_checkpoint

            path = self.run_dir / LAST_SHARDED
            loaded = dist_checkpoint.load(path, model=self.sharded, optimizers=self._optimizers())
            if loaded is None:
                return False
            state = {**loaded, "model": None, "optimizer": None}
        elif not path.exists():
            return False
        else:
            state = load_checkpoint(path)
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"{path}: checkpoint was trained with seed {state['seed']}, this run has seed {self.seed}; "
                "resume with the same seed or start a new run directory"
            )
        if state["model"] is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        for key in ("epoch", "batch_in_epoch", "step", "best_score", "best_step", "best_val", "bad_evals"):
            setattr(self, key, state[key])
        self.stop_reason = state["stop_reason"]
        self.mt.load_state_dict(state)
        if self.streams is not None and state.get("streams") is not None:
            self.streams.load_state_dict(state["streams"])
        if self.loss_hook is not None:
            if state.get("loss_hook") is None:
                raise ValueError(f"{path}: checkpoint was written without the configured extra loss (distillation)")
            self.loss_hook.load_state_dict(state["loss_hook"])
        return True

    # ----------------------------------------------------------------- training
    def active_tasks(self) -> list[TaskSpec]:
        """The tasks whose losses count at the current step."""
        if self.scheduler is None:
            return self.tasks
        chosen = set(self.mt.select(self.step))
        return [t for t in self.tasks if t.name in chosen]

    def _task_batches(self, tasks: list[TaskSpec], streams: TaskStreams[Batch]) -> dict[str, Batch]:
        """The next batch of each task's own dataset."""
        if self.gradient.requires_representation:
            raise ValueError(
                f"gradient method {type(self.gradient).__name__} needs one shared representation per step, but "
                "with per-task datasets every task sees a different batch; use a parameter-space method"
            )
        return {t.name: batch_to(streams.next(t.name), self.device) for t in tasks}

    def _losses(
        self, tasks: list[TaskSpec], batches: Batch | dict[str, Batch]
    ) -> tuple[dict[str, Tensor], Tensor | TaskSplit | None]:
        """Per-task losses (and the shared representation or the model's TaskSplit when the gradient method
        uses it).

        A joint batch takes one forward pass for every task; per-task batches take one pass per task.
        """
        if isinstance(batches, dict):
            return self._plain_losses(tasks, batches), None
        if self._use_split:
            outputs, split = self.model.forward_with_split(batches.dense, batches.sparse)
            return self._objective(tasks, outputs, batches, None), split
        if self.gradient.requires_representation:
            outputs, representation = self.model.forward_with_representation(batches.dense, batches.sparse)
            if representation is None:
                raise ValueError(
                    f"gradient method {type(self.gradient).__name__} works on the shared representation, but "
                    f"{type(self.model).__name__} shares none; pick a model with shared layers"
                )
            return self._objective(tasks, outputs, batches, representation), representation
        return self._hooked_losses(tasks, batches), None

    def _objective(
        self, tasks: list[TaskSpec], outputs: dict[str, Tensor], batch: Batch, representation: Tensor | None
    ) -> dict[str, Tensor]:
        """The per-task losses: the tasks' own, or the loss hook's (distillation) when one is set."""
        if self.loss_hook is None:
            return compute_losses(tasks, outputs, batch.labels)
        return self.loss_hook.losses(tasks, outputs, batch, representation, self.step)

    def _hooked_losses(self, tasks: list[TaskSpec], batch: Batch) -> dict[str, Tensor]:
        """Per-task losses of one plain forward pass (with the representation when the loss hook reads it)."""
        if self.loss_hook is not None and self.loss_hook.needs_representation:
            outputs, representation = self.model.forward_with_representation(batch.dense, batch.sparse)
            return self._objective(tasks, outputs, batch, representation)
        return self._objective(tasks, self.model(batch.dense, batch.sparse), batch, None)

    def _plain_losses(self, tasks: list[TaskSpec], batches: Batch | dict[str, Batch]) -> dict[str, Tensor]:
        """Per-task losses from plain forward passes (no representation, no split)."""
        if isinstance(batches, dict):
            losses: dict[str, Tensor] = {}
            for t in tasks:
                losses.update(self._hooked_losses([t], batches[t.name]))
            return losses
        return self._hooked_losses(tasks, batches)

    def train_step(self, batch: Batch | TaskStreams[Batch]) -> dict[str, float]:
        """One optimiser step on a joint batch (every label present) or on per-task ``TaskStreams``.

        Scheduler picks tasks -> losses -> :meth:`mtl.step.MultiTaskStep.run` (weighting -> gradient method ->
        regulariser -> clipping -> optimiser step -> FAMO-style post-step losses -> scheduler feedback).
        """
        if not self.model.training:  # evaluation left it in eval mode; Module.train() walks every submodule
            self.model.train()
        tasks = self.active_tasks()
        batches = self._task_batches(tasks, batch) if isinstance(batch, TaskStreams) else batch_to(batch, self.device)
        for arch in self._arches:
            arch.embedding_cuts.clear()
        losses, cut = self._losses(tasks, batches)
        reg = self.model.regularization() if hasattr(self.model, "regularization") else None
        params, count, after_backward = self.params, None, None
        if self.dist is not None:
            count = {k: b.batch_size for k, b in batches.items()} if isinstance(batches, dict) else batches.batch_size
        if self._arches:
            leaves = [leaf for arch in self._arches for leaf in arch.embedding_leaves()]
            params = replace(params, others=[*params.others, *leaves])
            after_backward = self._backward_embeddings
        out = self.mt.run(
            self.step,
            losses,
            self.optimizer,
            params,
            cut=cut,
            regularizer=reg,
            losses_after_step=lambda: self._plain_losses(tasks, batches),
            count=count,
            after_backward=after_backward,
        )
        plain = out.loss_values
        self.step += 1
        total = out.objective + (reg.item() if reg is not None else 0.0)
        record = {f"train/{k}/loss": v for k, v in plain.items()}
        record.update({f"train/{k}/weight": v for k, v in self.weighting.current_weights().items()})
        record.update({f"grad/{k}": float(v) for k, v in out.stats.items() if isinstance(v, (int, float))})
        record["train/loss"] = total
        if not math.isfinite(total):
            raise FloatingPointError(
                f"training loss became {total} at step {self.step}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in plain.items())
                + " (lower the learning rate or set trainer.grad_clip)"
            )
        return record

    def _backward_embeddings(self) -> None:
        # Each rank's leaf gradient is c_r times its shard's (mtl.parallel); TorchRec's output distribution divides
        # the pooled embeddings' gradient by the world size, so a table gets the mean over ranks: the global one.
        for arch in self._arches:
            arch.backward_embeddings()

    def end_epoch(self) -> None:
        """Hand the epoch's mean task losses to the weighting (DWA) and start a new epoch."""
        self.mt.end_epoch()
        self.epoch += 1
        self.batch_in_epoch = 0

    def _validate(self, val: BatchSource, logger: _Logger) -> bool:
        """Evaluate on validation; update best; returns True when early stopping triggers."""
        metrics = evaluate(
            self.model, val, self.tasks, self.cfg.eval_batch_size, self.device, split="val", dist=self.dist
        )
        score = monitor_score(metrics, self.tasks, self.cfg.monitor)
        improved = score > self.best_score + self.cfg.min_delta
        if improved:
            self.best_score, self.best_step, self.best_val = score, self.step, metrics
            self.bad_evals = 0
            info = {"step": self.step, "epoch": self.epoch, "val": metrics}
            if self.sharded is not None:
                from mtrec import dist_checkpoint

                dist_checkpoint.save(self.run_dir / BEST_SHARDED, model=self.sharded, optimizers={}, extra=info,
                                     step=self.step)  # fmt: skip
            else:
                atomic_torch_save({"model": self.model.state_dict(), **info}, self.run_dir / BEST)
        else:
            self.bad_evals += 1
        logger.log({"step": self.step, "epoch": self.epoch, "val/score": score, **_flatten("val", metrics)})
        return self.bad_evals >= self.cfg.patience

    def fit(self, train: BatchSource | Mapping[str, TabularDataset], val: BatchSource) -> dict[str, dict[str, float]]:
        """Train until early stopping, ``max_epochs`` or ``max_steps``; returns the best validation metrics.

        ``train`` is one dataset whose batches carry every task's label (in memory, or streamed from files), or
        ``{task: dataset}`` when tasks come from separate datasets (of any sizes): then each step draws the next
        batch of every scheduled task from its own never-ending stream (a new shuffled pass starts when one ends),
        and an epoch is ``sum of sizes / batch_size`` steps.
        """
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        dist = self.dist
        if dist is not None:  # data in memory: each rank takes its part of every global batch
            if isinstance(train, Mapping):
                train = {k: RankShard(v, dist.rank, dist.world_size) for k, v in train.items()}
            elif isinstance(train, TabularDataset):
                train = RankShard(train, dist.rank, dist.world_size)
        if isinstance(train, Mapping):
            missing = [t.name for t in self.tasks if t.name not in train]
            if missing:
                raise ValueError(f"per-task training data has no dataset for tasks {missing}; got {sorted(train)}")
            self.streams = TaskStreams(
                {
                    t.name: functools.partial(_task_pass, train[t.name], cfg.batch_size, self.seed * 1009 + i)
                    for i, t in enumerate(self.tasks)
                }
            )
            n_batches = -(-sum(len(train[t.name]) for t in self.tasks) // cfg.batch_size)
        else:
            n_batches = train.num_batches(cfg.batch_size)
        if dist is not None and dist.world_size > 1:
            fewest, most = over_ranks(n_batches, dist, "min"), over_ranks(n_batches, dist, "max")
            if fewest == 0:
                units = len(getattr(train, "units", ()))
                raise ValueError(
                    f"a rank of {dist.world_size} has no training batch: the train split has {units or 'too few'} "
                    "units (Parquet row groups or CSV files) for the ranks x data.num_workers readers; write the "
                    "files with smaller row groups (mtrec-data synthetic --row-group-size), or set data.in_memory=true"
                )
            if most > fewest and self.is_main:
                log.info("ranks have %d to %d batches an epoch; each epoch takes %d steps", fewest, most, fewest)
        # torchrun restarted this worker after a failure: continue from the last checkpoint (no flag needed)
        resume = cfg.resume or (dist is not None and dist.restarted)
        if resume and self.load_last():
            log.info("resumed from %s at step %d", self.run_dir / (LAST_SHARDED if self.sharded else LAST), self.step)
            if self.stop_reason == "max_steps" and (cfg.max_steps is None or self.step < cfg.max_steps):
                self.stop_reason = None  # a capped run continues under a larger cap
            if self.stop_reason is not None:
                log.info("the run had stopped (%s); nothing left to train", self.stop_reason)
                return self.best_val
        elif resume:
            last = self.run_dir / (LAST_SHARDED if self.sharded else LAST)
            log.info("trainer.resume: no %s yet, starting at step 0", last)
        logger = _Logger(self.run_dir, cfg.tensorboard, enabled=self.is_main)
        t0 = time.perf_counter()
        try:
            while self.stop_reason is None:
                if self.epoch >= cfg.max_epochs:
                    self.stop_reason = "max_epochs"
                    break
                bar = tqdm(
                    total=n_batches,
                    initial=self.batch_in_epoch,
                    desc=f"epoch {self.epoch}",
                    disable=not (cfg.progress and self.is_main),
                    leave=False,
                    dynamic_ncols=True,
                )
                if self.streams is not None:
                    batches: Iterable[Batch | TaskStreams[Batch]] = itertools.repeat(
                        self.streams, n_batches - self.batch_in_epoch
                    )
                else:
                    batches = lockstep(  # every rank steps while every rank has a batch
                        train.batches(  # type: ignore[union-attr]
                            cfg.batch_size, shuffle=True, seed=self.seed, epoch=self.epoch, start=self.batch_in_epoch
                        ),
                        dist,
                    )
                for batch in batches:
                    record = self.train_step(batch)
                    self.batch_in_epoch += 1
                    bar.update(1)
                    if self.step % cfg.log_every_steps == 0:
                        bar.set_postfix(loss=f"{record['train/loss']:.4f}")
                        logger.log({"step": self.step, "epoch": self.epoch, **record})
                    if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                        self.save_last()
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        self.stop_reason = "max_steps"
                        break
                bar.close()
                if self.stop_reason is None:  # a full epoch
                    self.end_epoch()
                if self._validate(val, logger) and self.stop_reason is None:
                    self.stop_reason = "early_stopping"
                self.save_last()
        except KeyboardInterrupt:
            self.save_last()
            logger.close()
            raise
        logger.log(
            {
                "step": self.step,
                "epoch": self.epoch,
                "stop_reason": self.stop_reason,
                "best_step": self.best_step,
                "seconds": time.perf_counter() - t0,
            }
        )
        logger.close()
        return self.best_val

    def load_best(self) -> None:
        """Load the weights of the best validation score into the model."""
        if self.sharded is not None:
            from mtrec import dist_checkpoint

            path = self.run_dir / BEST_SHARDED
            if dist_checkpoint.load(path, model=self.sharded, optimizers={}) is None:
                raise FileNotFoundError(f"{path}: no best checkpoint (did training run a validation?)")
            return
        path = self.run_dir / BEST
        if not path.exists():
            raise FileNotFoundError(f"{path}: no best checkpoint (did training run a validation?)")
        self.model.load_state_dict(load_checkpoint(path)["model"])
