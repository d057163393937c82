"""Task specifications and assembly of the per-task loss dict.

A model returns ``dict[task_name, Tensor[B]]`` (logits for binary tasks, predictions for regression);
each task's :class:`TaskSpec` says how to turn that into a loss and into metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.metrics import METRICS

Kind = Literal["binary", "regression"]

_DEFAULT_LOSS: dict[str, str] = {"binary": "bce", "regression": "mse"}
_DEFAULT_METRICS: dict[str, tuple[str, ...]] = {"binary": ("auc", "logloss"), "regression": ("mse", "mae")}
_LOSSES_FOR_KIND: dict[str, tuple[str, ...]] = {"binary": ("bce",), "regression": ("mse", "mae", "huber")}
_ELEMENTWISE = frozenset({"bce", "mse", "mae", "huber"})  # losses that are the mean of an elementwise term


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task problem.

    Attributes:
        name: task name; the key of the model output and of the label dict.
        kind: ``"binary"`` (model emits logits) or ``"regression"`` (model emits predictions).
        loss: ``"bce"`` for binary; ``"mse"``, ``"mae"`` or ``"huber"`` for regression. Defaults by kind.
        metrics: metric names from :data:`mtl.metrics.METRICS`. Defaults: AUC and log loss for binary,
            MSE and MAE for regression.
        weight: static loss weight (used by the ``static`` weighting and by :func:`total_loss`).
        lr: learning rate for this task's own parameters; ``None`` uses the optimiser's default.
        weight_decay: weight decay for this task's own parameters; ``None`` uses the default.

    Example::

        >>> t = TaskSpec("ctr", "binary")
        >>> t.loss, t.metrics
        ('bce', ('auc', 'logloss'))
    """

    name: str
    kind: Kind = "binary"
    loss: str = ""
    metrics: tuple[str, ...] = field(default_factory=tuple)
    weight: float = 1.0
    lr: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _DEFAULT_LOSS:
            raise ValueError(f"task {self.name!r}: kind must be 'binary' or 'regression', got {self.kind!r}")
        if not self.loss:
            object.__setattr__(self, "loss", _DEFAULT_LOSS[self.kind])
        if self.loss not in _LOSSES_FOR_KIND[self.kind]:
            raise ValueError(
                f"task {self.name!r}: loss {self.loss!r} is not valid for kind {self.kind!r}; "
                f"choose one of {_LOSSES_FOR_KIND[self.kind]}"
            )
        metrics = tuple(self.metrics) or _DEFAULT_METRICS[self.kind]
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"task {self.name!r}: unknown metrics {unknown}; known: {sorted(METRICS)}")
        object.__setattr__(self, "metrics", metrics)
        if self.weight < 0:
            raise ValueError(f"task {self.name!r}: weight must be >= 0, got {self.weight}")

    def with_overrides(self, **overrides: object) -> TaskSpec:
        """A copy with some fields replaced (e.g. from a config's ``tasks.<name>`` block)."""
        unknown = set(overrides) - {"kind", "loss", "metrics", "weight", "lr", "weight_decay"}
        if unknown:
            raise ValueError(f"task {self.name!r}: unknown override keys {sorted(unknown)}")
        if "metrics" in overrides and overrides["metrics"] is not None:
            overrides["metrics"] = tuple(overrides["metrics"])  # type: ignore[arg-type]
        return replace(self, **overrides)  # type: ignore[arg-type]

    def loss_fn(self, output: Tensor, label: Tensor, reduction: str = "mean") -> Tensor:
        """The task's loss of one output tensor against its labels."""
        label = label.to(output.dtype)
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(output, label, reduction=reduction)
        if self.loss == "mse":
            return F.mse_loss(output, label, reduction=reduction)
        if self.loss == "mae":
            return F.l1_loss(output, label, reduction=reduction)
        return F.huber_loss(output, label, reduction=reduction)

    def evaluate(self, output: Tensor, label: Tensor) -> dict[str, float]:
        """All of this task's metrics on one set of outputs and labels."""
        return {m: METRICS[m](output, label.to(output.dtype)) for m in self.metrics}


def compute_losses(
    tasks: Sequence[TaskSpec], outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The multi-task objective: ``{task_name: scalar loss}``, one entry per task, unweighted.

    Tasks with the same loss whose outputs and labels agree in shape, dtype and device are computed together:
    one stacked elementwise loss and one mean per task (a few operations instead of a few per task, forward
    and backward); the values are each task's :meth:`TaskSpec.loss_fn` up to float rounding.
    """
    groups: dict[tuple[object, ...], list[TaskSpec]] = {}
    for t in tasks:
        if t.name not in outputs:
            raise KeyError(f"model produced no output for task {t.name!r}; outputs: {sorted(outputs)}")
        if t.name not in labels:
            raise KeyError(f"batch has no label for task {t.name!r}; labels: {sorted(labels)}")
        out, lab = outputs[t.name], labels[t.name]
        if out.shape != lab.shape:
            raise ValueError(
                f"task {t.name!r}: output shape {tuple(out.shape)} does not match label shape {tuple(lab.shape)}"
            )
        groups.setdefault((t.loss, out.shape, out.dtype, lab.dtype, out.device, lab.device), []).append(t)
    losses: dict[str, Tensor] = {}
    for group in groups.values():
        if len(group) == 1 or group[0].loss not in _ELEMENTWISE or outputs[group[0].name].numel() == 0:
            losses.update((t.name, t.loss_fn(outputs[t.name], labels[t.name])) for t in group)
            continue
        out = torch.stack([outputs[t.name] for t in group])
        lab = torch.stack([labels[t.name] for t in group])
        per = group[0].loss_fn(out, lab, reduction="none")
        losses.update(zip((t.name for t in group), per.reshape(len(group), -1).mean(dim=1).unbind()))
    return {t.name: losses[t.name] for t in tasks}


def total_loss(tasks: Sequence[TaskSpec], losses: Mapping[str, Tensor]) -> Tensor:
    """Sum of ``weight * loss`` over tasks (the ``static`` weighting)."""
    return torch.stack([t.weight * losses[t.name] for t in tasks]).sum()
