"""mtlib's task-agnostic multi-task learning core.

Imports torch only; never ``mtrec``, ``mtrl`` or ``serving``.
"""

from mtl.gradients import GRADIENT_METHODS, GradientMethod, build_gradient_method
from mtl.metrics import auc, log_loss, mae, mse
from mtl.optim import build_param_groups
from mtl.scheduling import SCHEDULERS, TaskScheduler, TaskStreams, build_scheduler
from mtl.step import MultiTaskStep, StepParameters, StepResult
from mtl.tasks import TaskSpec, compute_losses, total_loss
from mtl.weighting import WEIGHTINGS, Weighting, build_weighting

__all__ = [
    "GRADIENT_METHODS",
    "SCHEDULERS",
    "WEIGHTINGS",
    "GradientMethod",
    "MultiTaskStep",
    "StepParameters",
    "StepResult",
    "TaskScheduler",
    "TaskSpec",
    "TaskStreams",
    "Weighting",
    "build_gradient_method",
    "build_scheduler",
    "build_weighting",
    "auc",
    "build_param_groups",
    "compute_losses",
    "log_loss",
    "mae",
    "mse",
    "total_loss",
]
