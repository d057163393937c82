"""The cut between a multi-task network's shared body and its task heads, for cheap per-task gradients.

Gradient methods need the per-task gradients ``dL_i/dtheta`` of the shared parameters, or ``dL_i/dZ`` of
the shared representation. Asking autograd for them with ``k`` batched cotangents (``is_grads_batched``)
over the whole graph pushes ``k`` rows through *every* head although only task ``i``'s head gives row
``i`` anything: ``k^2`` head work. A :class:`TaskSplit` cuts the graph where the shared body ends: the
model hands each task head its own leaf copy of every tensor that crosses the cut (:meth:`TaskSplit.fan_out`),
so

1. one ordinary backward of ``sum_i L_i`` (:meth:`TaskSplit.head_backward`) gives every ``dL_i/dZ`` exactly
   (task ``i``'s leaf receives only task ``i``'s gradient) and the task heads' plain gradients, at the cost
   of a single head backward;
2. the shared parameters then need only the body: ``G = J_Z^T dZ/dtheta`` by one batched VJP through the
   body (:meth:`TaskSplit.param_jacobian`), or one plain VJP of a combined cotangent
   ``sum_i w_i dL_i/dZ`` (:meth:`TaskSplit.body_grads`) for methods that weight the representation
   gradients (MGDA-UB).

The model is responsible for the cut being a cut: every path from a shared parameter to a loss passes
through a fanned-out tensor, and every parameter downstream of the cut belongs to one task. Models that
cannot promise this do not offer a split, and gradient methods fall back to the batched Jacobian of the
whole graph.

Example (a shared body and two heads)::

    split = TaskSplit(["a", "b"])
    z = body(x)
    zs = split.fan_out(z)                                   # {"a": leaf, "b": leaf}
    losses = torch.stack([loss_a(head_a(zs["a"])), loss_b(head_b(zs["b"]))])
    J = split.head_backward(["a", "b"], losses, heads.parameters())   # [[2, *z.shape]]
    G, _ = split.param_jacobian(J, list(body.parameters()))           # [2, P]
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


def as_param_grad(p: Tensor, g: Tensor) -> Tensor:
    """``g`` detached, in ``p``'s dtype and laid out like ``p`` (the same strides), to assign to ``p.grad``.

    ``Tensor.backward`` keeps this layout contract, but gradients from ``torch.autograd.grad`` may come back with
    other strides (a weight used through a transpose or a reshape, as grouped layers use theirs). torch's fused
    Adam reads a gradient as if it had its parameter's strides: on CPU it silently updates with the wrong
    elements (pytorch/pytorch#106951 reports the CUDA error), so every gradient this library assigns goes
    through here.
    """
    g = g.detach()
    if g.dtype != p.dtype:
        g = g.to(p.dtype)
    if g.stride() != p.stride() and not same_layout(p, g):
        g = torch.empty_like(p).copy_(g)
    return g


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one shape have the same strides on every dimension longer than 1 (the stride of a
    dimension of size 1 is never used to address an element)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


class TaskSplit:
    """Per-task leaf copies of the tensors that cross from the shared body to the task heads.

    Args:
        tasks: every task the model has (heads of tasks absent from a step's losses are ignored).
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        self.cuts: list[Tensor] = []  # the body's outputs, still in the body's graph
        # per cut: {task: leaf copy that only that task reads}, or one stacked leaf [len(tasks), *z.shape]
        # whose row i only task i reads (fan_out_stacked)
        self.leaves: list[dict[str, Tensor] | Tensor] = []
        self.batch_dims: list[int] = []
        self._index = {t: i for i, t in enumerate(self.tasks)}

    def fan_out(self, z: Tensor, *, batch_dim: int = 0) -> dict[str, Tensor]:
        """``{task: leaf}``: one detached copy of ``z`` per task (sharing storage), recorded as a cut.

        A tensor that does not require gradients carries no shared gradient: every task gets ``z`` itself
        and nothing is recorded. ``batch_dim`` is where the batch lies in ``z`` (for per-sample rows).
        """
        if not z.requires_grad:
            return {t: z for t in self.tasks}
        leaves = {t: z.detach().requires_grad_() for t in self.tasks}
        self.cuts.append(z)
        self.leaves.append(leaves)
        self.batch_dims.append(batch_dim)
        return leaves

    def fan_out_stacked(self, z: Tensor, *, batch_dim: int = 0) -> Tensor:
        """One leaf ``[len(tasks), *z.shape]`` (a broadcast view of ``z``, no copy) whose row ``i`` is task ``i``'s
        copy, recorded as a cut: for heads that run all tasks as grouped (batched) operations. The head of task
        ``i`` must read only row ``i``. A ``z`` that does not require gradients is returned as it is (it
        broadcasts against the stacked rows) and nothing is recorded.
        """
        if not z.requires_grad:
            return z
        leaf = z.detach().expand(len(self.tasks), *z.shape).requires_grad_()
        self.cuts.append(z)
        self.leaves.append(leaf)
        self.batch_dims.append(batch_dim)
        return leaf

    def leaf_inputs(self, names: Sequence[str]) -> list[Tensor]:
        """The leaves that carry the tasks ``names``' gradients, to differentiate with respect to (per cut: one
        leaf per task, or the stacked leaf); :meth:`summed_per_cut` adds their gradients up per cut."""
        out: list[Tensor] = []
        for leaves in self.leaves:
            if isinstance(leaves, Tensor):
                out.append(leaves)
            else:
                out.extend(leaves[n] for n in names)
        return out

    def summed_per_cut(self, grads: Sequence[Tensor | None], names: Sequence[str]) -> list[Tensor | None]:
        """Gradients with respect to :meth:`leaf_inputs` summed over the tasks ``names``, one per cut (``None`` where
        no task's head reads the cut)."""
        out: list[Tensor | None] = []
        pos = 0
        for z, leaves in zip(self.cuts, self.leaves):
            if isinstance(leaves, Tensor):
                g = grads[pos]
                pos += 1
                out.append(None if g is None else self._stacked_rows(g, z, names).sum(0))
            else:
                present = [g for g in grads[pos : pos + len(names)] if g is not None]
                pos += len(names)
                out.append(torch.stack(present).sum(0) if present else None)
        return out

    def _stacked_rows(self, g: Tensor | None, z: Tensor, names: Sequence[str]) -> Tensor:
        """Rows ``names`` of a stacked leaf's gradient ``g [len(tasks), *z.shape]``, as ``[k, *z.shape]``."""
        if g is None:
            return z.new_zeros(len(names), *z.shape)
        if tuple(names) == self.tasks:
            return g
        return g[[self._index[n] for n in names]]

    def _check(self, names: Sequence[str]) -> None:
        if not self.cuts:
            raise ValueError("TaskSplit: no tensor that requires gradients was fanned out; the shared body is empty")
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise ValueError(f"TaskSplit: losses of unknown tasks {unknown}; the split has {list(self.tasks)}")

    def head_backward(
        self,
        names: Sequence[str],
        losses: Tensor,
        others: Iterable[nn.Parameter] = (),
        *,
        create_graph: bool = False,
        retain_graph: bool = False,
        workspace: dict[int, Tensor] | None = None,
    ) -> list[Tensor]:
        """One backward of ``losses.sum()`` (``losses [k]`` in the order of ``names``) through the task heads.

        Returns, per cut, ``J [k, *z.shape]`` with row ``i`` = ``dL_i/dz`` (zero where task ``i`` does not read
        ``z``); the parameters in ``others`` get their plain gradient of ``sum_i L_i`` *accumulated* into
        ``.grad``, as ``Tensor.backward`` does. With ``create_graph`` the rows stay differentiable (w.r.t. the
        leaves and head parameters; the returned ``others`` gradients are detached either way). ``retain_graph``
        keeps the heads' graph for another backward (a weighting that measures the task gradients first).

        ``workspace`` (a dict the caller keeps between steps) lends the memory of the stacked rows: the
        returned tensors are overwritten by the next call with the same workspace, which saves allocating
        (and, for large cuts, page-faulting) a fresh ``k`` times ``z``-sized block every step. A stacked cut
        (:meth:`fan_out_stacked`) needs none: autograd hands back its rows as one block.
        """
        self._check(names)
        others = list(others)
        inputs = self.leaf_inputs(names)
        if create_graph:
            grads = torch.autograd.grad(
                losses.sum(), inputs + others, allow_unused=True, create_graph=True, retain_graph=True
            )
            for p, g in zip(others, grads[len(inputs) :]):
                if g is not None:
                    p.grad = as_param_grad(p, g if p.grad is None else p.grad + g.detach())
        else:
            # autograd accumulates into .grad itself (leaves are fresh, so theirs is exactly dL/dleaf)
            torch.autograd.backward(losses.sum(), inputs=inputs + others, retain_graph=retain_graph)
            grads = [x.grad for x in inputs]
            for x in inputs:
                x.grad = None
        k = len(names)
        out = []
        pos = 0
        for c, (z, leaves) in enumerate(zip(self.cuts, self.leaves)):
            if isinstance(leaves, Tensor):
                # autograd already wrote every task's row into one [len(tasks), *z.shape] block
                out.append(self._stacked_rows(grads[pos], z, names))
                pos += 1
                continue
            rows = [torch.zeros_like(z) if g is None else g for g in grads[pos : pos + k]]
            pos += k
            buf = None if workspace is None or create_graph else workspace.get(c)
            if buf is not None and buf.shape == (k, *z.shape) and buf.dtype == z.dtype and buf.device == z.device:
                out.append(torch.stack(rows, out=buf))
            else:
                out.append(torch.stack(rows))
                if workspace is not None and not create_graph:
                    workspace[c] = out[-1]
        return out

    def flat(self, J: Sequence[Tensor]) -> Tensor:
        """``[k, D]``: every cut's rows flattened and concatenated (``D`` = total size of the cut tensors)."""
        k = J[0].shape[0]
        return torch.cat([j.reshape(k, -1) for j in J], dim=1) if len(J) > 1 else J[0].reshape(k, -1)

    def rows(self, J: Sequence[Tensor]) -> Tensor:
        """``[k, B, D]``: per task and sample, the gradient features of all cuts (batch dimension first)."""
        k = J[0].shape[0]
        parts = []
        for j, bd in zip(J, self.batch_dims):
            j = j.movedim(bd + 1, 1)
            parts.append(j.reshape(k, j.shape[1], -1))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def param_jacobian(
        self, J: Sequence[Tensor], params: Sequence[nn.Parameter], *, batched: bool = True
    ) -> tuple[Tensor, bool]:
        """``G [k, P]``: the per-task gradients of ``params`` (flattened, concatenated), ``J`` pulled back
        through the body, in one batched VJP (``is_grads_batched``) or, where that fails, a loop over tasks.
        Returns ``(G, whether the batched call ran)``."""
        params = list(params)
        k = J[0].shape[0]
        if batched:
            try:
                grads = torch.autograd.grad(
                    self.cuts,
                    params,
                    grad_outputs=list(J),
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                )
                return _flat(grads, params, (k,)), True
            except (RuntimeError, NotImplementedError) as err:
                warnings.warn(
                    f"batched autograd through the shared body failed ({err}); computing per-task gradients in a loop",
                    stacklevel=2,
                )
        rows = []
        for i in range(k):
            grads = torch.autograd.grad(
                self.cuts, params, grad_outputs=[j[i] for j in J], retain_graph=True, allow_unused=True
            )
            rows.append(_flat(grads, params, ()))
        return torch.stack(rows), False

    def body_grads(self, cotangents: Sequence[Tensor], params: Sequence[nn.Parameter]) -> list[Tensor]:
        """Gradients of ``params`` for the cotangents ``[dz per cut]`` (one plain VJP); zeros where unused."""
        params = list(params)
        grads = torch.autograd.grad(self.cuts, params, grad_outputs=list(cotangents), allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def combine(self, J: Sequence[Tensor], w: Tensor) -> list[Tensor]:
        """``sum_i w_i J_i`` per cut (the cotangent of ``sum_i w_i L_i`` at the cut)."""
        w = w.to(J[0].device, J[0].dtype)
        return [torch.tensordot(w, j.detach(), dims=1) for j in J]


def _flat(grads: Sequence[Tensor | None], inputs: Sequence[Tensor], lead: tuple[int, ...]) -> Tensor:
    """Gradients flattened over ``inputs`` and concatenated: ``[*lead, sum numel]`` (zeros for ``None``)."""
    parts = []
    for g, x in zip(grads, inputs):
        if g is None:
            parts.append(torch.zeros(*lead, x.numel(), dtype=x.dtype, device=x.device))
        else:
            parts.append((g.to_dense() if g.is_sparse else g).reshape(*lead, x.numel()))
    return torch.cat(parts, dim=-1)
