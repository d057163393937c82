"""mtlib's task-agnostic multi-task learning core.

Imports torch only; never ``mtrec``, ``mtrl`` or ``serving``.
"""

from mtl.metrics import auc, log_loss, mae, mse
from mtl.optim import build_param_groups
from mtl.tasks import TaskSpec, compute_losses, total_loss

__all__ = [
    "TaskSpec",
    "auc",
    "build_param_groups",
    "compute_losses",
    "log_loss",
    "mae",
    "mse",
    "total_loss",
]
