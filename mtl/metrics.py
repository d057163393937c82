"""Per-task evaluation metrics as pure functions of tensors.

Binary tasks take *logits* (not probabilities) so that log loss is computed stably.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(name: str, scores: Tensor, labels: Tensor) -> None:
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ValueError(
            f"{name}: expected 1-d scores and labels of equal shape, got scores {tuple(scores.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    if scores.numel() == 0:
        raise ValueError(f"{name}: got empty tensors")


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties counted as one half.

    Returns ``nan`` when only one class is present.
    """
    _check("auc", scores, labels)
    scores = scores.detach().double().flatten()
    labels = labels.detach().flatten() > 0.5
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average ranks (1-based) with ties sharing the mean rank of their run.
    sorted_scores, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank_of_run = ends - (counts.double() - 1.0) / 2.0
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank_of_run[inverse]
    rank_sum = ranks[labels].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(logits: Tensor, labels: Tensor) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against 0/1 labels."""
    _check("log_loss", logits, labels)
    return F.binary_cross_entropy_with_logits(logits.detach().double(), labels.detach().double()).item()


def mse(pred: Tensor, target: Tensor) -> float:
    _check("mse", pred, target)
    return torch.mean((pred.detach().double() - target.detach().double()) ** 2).item()


def mae(pred: Tensor, target: Tensor) -> float:
    _check("mae", pred, target)
    return torch.mean(torch.abs(pred.detach().double() - target.detach().double())).item()


METRICS = {"auc": auc, "logloss": log_loss, "mse": mse, "mae": mae}
