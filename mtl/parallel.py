"""Data parallelism for the multi-task step: each rank holds a shard of the global batch, and one step updates every
replicated parameter exactly as one process holding the whole global batch would.

Why not DistributedDataParallel: DDP all-reduces ``.grad`` during ``backward()``, so a gradient method would combine
each rank's *local* per-task gradients, and ``PCGrad(mean of shards) != mean of PCGrad(shard)``. Here the step
reduces what each strategy reads, before it reads it:

* **losses** (:meth:`DataParallel.global_losses`): the value of every task loss becomes the global-batch mean
  ``L_t = sum_r n_r L_t^r / N`` (one all-reduce of ``[n_r L_t^r ..., n_r]``), while its gradient stays that of the
  local loss scaled by ``c_r = n_r W / N``. Weightings (uncertainty, DWA, GradNorm's loss ratios, FAMO, its
  post-step losses too) and schedulers therefore see the same numbers on every rank and hold the same state.
* **per-task gradients of the shared parameters** (:func:`average`): a gradient method's Jacobian ``G [k, P]``
  (and GradNorm's rows at the last shared layer) is averaged over ranks before the method combines it, which
  gives the global batch's Jacobian: ``(1/W) sum_r c_r grad L_t^r = grad L_t``. Every rank then computes the same
  combination.
* **representation methods**: ``dL_t/dZ`` is per sample, so a rank's rows cover its own samples only. MGDA-UB's
  Gram matrix is a sum over samples, so the global one is ``(1/W^2) sum_r M_r`` (:func:`sum_gram`); its weights
  are then the global batch's, and the shared gradient of ``sum_t alpha_t L_t`` is averaged like any other.
  GREAT's discriminator reads each rank's own rows (an adversarial term per sample) and its gradients are averaged
  with the rest: the same as the global batch for equal shards, since its losses are per-sample means.
* **everything else** (:meth:`DataParallel.average_grads`): after the gradient method, every replicated
  parameter's ``.grad`` (task heads, the dense arch, a weighting's own parameters, whose gradient is already the
  same on every rank) is averaged in one flat all-reduce, before clipping and the optimiser step.

Model-parallel parameters (TorchRec's sharded embedding tables) are not touched here: their own backward brings
every rank's contribution to the owning shard, and TorchRec divides it by the world size (its default gradient
division), so with each rank's gradient scaled by ``c_r`` a table gets ``(1/W) sum_r c_r grad L^r``, the global
batch's gradient too (``mtrec.trainer`` hands the tables the plain gradient of the weighted sum; see
:mod:`mtrec.distributed`).

:class:`~mtl.step.MultiTaskStep` makes its group current (:func:`current`) for the duration of a step, so the
gradient code finds it without a new argument on every method.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DataParallel", "average", "current", "sum_gram"]

_CURRENT: contextvars.ContextVar[DataParallel | None] = contextvars.ContextVar("mtl_data_parallel", default=None)


class DataParallel:
    """The ranks of one data-parallel group (``torch.distributed``; ``group=None``: the default group).

    Args:
        group: the process group whose ranks each hold a shard of the global batch.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DataParallel needs an initialised torch.distributed process group (init_process_group)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    # ------------------------------------------------------------------------------------------------------ collectives
    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place (returned)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def average_(self, tensors: Sequence[Tensor]) -> None:
        """Average ``tensors`` over the ranks, in place, through one flat buffer (one all-reduce per dtype)."""
        if self.world_size == 1 or not tensors:
            return
        by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault((t.dtype, t.device), []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            self.all_reduce_(flat).div_(self.world_size)
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    # ------------------------------------------------------------------------------------------------------ the step
    def global_losses(self, losses: Mapping[str, Tensor], count: int | Mapping[str, int]) -> dict[str, Tensor]:
        """``{task: loss}`` whose values are the global batch's and whose gradients are the local loss's times
        ``c_r = n_r W / N`` (see the module docstring). ``count`` is ``n_r``, this rank's rows of the step (one
        number, or one per task when each task trains on its own batch)."""
        names = list(losses)
        if not names:
            return {}
        first = losses[names[0]]
        local = torch.stack([losses[k].detach().to(torch.float64) for k in names])
        n = torch.tensor(
            [float(count[k] if isinstance(count, Mapping) else count) for k in names],
            dtype=torch.float64,
            device=local.device,
        )
        packed = self.all_reduce_(torch.cat([torch.where(n > 0, local, 0.0) * n, n]))  # an empty share: NaN mean
        totals = packed[len(names) :]
        if bool((totals <= 0).any()):
            empty = [k for k, t in zip(names, totals.tolist(), strict=True) if t <= 0]
            raise ValueError(f"DataParallel.global_losses: no rank had a row for tasks {empty} in this step")
        values = (packed[: len(names)] / totals).to(first.dtype)
        scale = (n * self.world_size / totals).tolist()
        return {k: _GlobalValue.apply(losses[k], values[i], scale[i]) for i, k in enumerate(names)}

    def average_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Average the ``.grad`` of replicated parameters over the ranks (a missing one counts as zeros, so every
        rank calls the collective with the same shapes)."""
        if self.world_size == 1:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.average_(grads)

    @contextlib.contextmanager
    def active(self) -> Iterator[DataParallel]:
        """Make this group :func:`current` inside the block."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


class _GlobalValue(torch.autograd.Function):
    """``value`` forward (bit for bit the same on every rank), ``c`` times the gradient back into ``local``."""

    @staticmethod
    def forward(ctx, local: Tensor, value: Tensor, c: float) -> Tensor:  # type: ignore[override]
        ctx.c = c
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad * ctx.c if ctx.c != 1.0 else grad, None, None


def current() -> DataParallel | None:
    """The data-parallel group of the step being run (``None``: one process)."""
    return _CURRENT.get()


def average(G: Tensor) -> Tensor:
    """Per-task gradients of replicated parameters (``[k, P]``, rows from the losses of :meth:`DataParallel.
    global_losses`) averaged over the ranks of the current group: the global batch's. Unchanged in one process."""
    group = current()
    if group is None or group.world_size == 1:
        return G
    out = G.detach().clone()
    group.all_reduce_(out)
    return out.div_(group.world_size)


def sum_gram(M: Tensor) -> Tensor:
    """The global batch's Gram matrix of per-sample gradients (``dL_i/dZ``, ``Z`` local to each rank) from each
    rank's own ``M_r``: ``(1/W^2) sum_r M_r``. Unchanged in one process."""
    group = current()
    if group is None or group.world_size == 1:
        return M
    out = M.detach().clone()
    group.all_reduce_(out)
    return out.div_(group.world_size**2)
