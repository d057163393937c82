"""Gradient modulation for multi-task learning: one interface, one class per method, each citing its paper.

A :class:`GradientMethod` replaces ``sum(losses).backward()`` in a training step::

    method = build_gradient_method("pcgrad", seed=0)
    stats = method.backward(losses, shared=body.parameters(), others=[*heads.parameters()])
    optimizer.step()

``losses`` are the (already weighted) per-task scalar losses of one step. Afterwards every shared parameter's
``.grad`` is *set* to the method's aggregated gradient, and every parameter in ``others`` (task towers,
weighting parameters) has the plain gradient of ``sum(losses)`` *accumulated* into its ``.grad``, as
``Tensor.backward`` does (zero gradients before the step as usual). Parameters in neither list get nothing.
:class:`Plain` (``"none"``) is literally ``sum(losses).backward()``.

All methods but :class:`Plain`, :class:`MGDAUB` and :class:`GREAT` aggregate the Jacobian ``G [k, P]`` (row
``i``: the gradient of task ``i`` over the flattened shared parameters), computed in one batched autograd
call (``is_grads_batched=True``); if that raises, a loop over tasks is used from then on (stat ``batched``).
Each of them only depends on the Gram matrix ``M = G G^T`` and returns ``g = w^T G`` for task weights ``w``:
the pure functions ``<method>_weights(M, ...) -> (w, info)`` and ``aggregate_<method>(G, ...) -> (g, info)``
are what the classes call, and what the tests check on known vectors. ``M`` is moved to the CPU in float64
once per step; the small solvers of :mod:`mtl.solvers` run there.

Scale of the aggregated gradient (``none`` gives ``sum_i g_i``), and the TorchJD 0.18 aggregator it equals
(``tests/test_gradient_oracle.py`` checks every pair):

===============  ====================================================================  =========================
``pcgrad``       ``sum_i g_i^PC`` (sum, as the paper and its official code)             ``PCGrad()``
``gradvac``      ``sum_i g_i'`` (sum)                                                   ``GradVac(beta)``
``cagrad``       ``(g0 + lambda g_w) / (1 + c^2)``, ``g0`` the *mean* (official)        ``CAGrad(c)`` x 1/(1+c^2)
``mgda``         ``sum_i alpha_i g_i``, ``alpha`` on the simplex (not multiplied by k)   ``MGDA()`` (exact here)
``mgda_ub``      gradient of ``sum_i alpha_i L_i``, ``alpha`` on the simplex             --
``imtl_g``       ``sum_i alpha_i g_i`` with ``sum_i alpha_i = 1``                       ``IMTLG()``
``aligned_mtl``  sum of the k aligned gradients, each of norm ``sigma_min(G)``          ``AlignedMTL()`` x k
``nash_mtl``     ``sum_i alpha_i g_i``, ``alpha_i (M alpha)_i = 1``, clipped to ``max_norm``  ``NashMTL`` (solver)
``upgrad``       mean of the projections of ``g_i`` onto the dual cone                  ``UPGrad()``
``dualproj``     projection of the mean gradient onto the dual cone                     ``DualProj()``
``con_fig``      equal-cosine direction, length ``sum_i g_i . u`` (sum)                 ``ConFIG()``
``great``        ``sum_i g_i`` plus the reversed adversarial gradient ``-lam * grad L_disc``   --
===============  ====================================================================  =========================

**Accuracy.** Every method is exact for any finite Jacobian, to a tolerance relative to each task's own
gradient norm: the solvers (:mod:`mtl.solvers`, :mod:`mtl.projection`) work on the Jacobi-equilibrated Gram
matrix and stop on per-task relative optimality conditions, so tasks whose gradients differ by orders of
magnitude (an MSE head next to a rare-event BCE head) get the paper's answer, not one biased towards the
largest gradient. A solve that misses its tolerance warns (:class:`mtl.solvers.SolverWarning` or
``RuntimeWarning``) with its residual. Where a paper leaves a case open (zero rows, duplicate or opposite rows,
rank deficiency) each ``<method>_weights`` docstring states mtlib's rule and why.

**Fast path.** When ``backward`` gets a :class:`~mtl.split.TaskSplit` as ``representation`` (the model cut
its graph between the shared body and the task heads, see :mod:`mtl.split`), every method uses it: one plain
backward through the heads gives all ``dL_i/dZ`` and the heads' gradients, and only the shared body is
back-propagated per task (batched) or once with combined cotangents (MGDA-UB). The results are the same as
on the uncut graph (the tests check it); only the cost differs: the batched Jacobian of the whole graph
pushes ``k`` rows through every head, ``k^2`` head work. MGDA-UB and GREAT then use every cut tensor as
the representation ``Z``.

Every method returns ``g_1`` for a single task and finite values for zero gradients. Stats returned by
``backward`` (floats, for logging): ``batched`` (1 if the batched Jacobian ran, 0 if the loop), ``cos_mean``
(mean pairwise cosine of the task gradients) and ``conflicts`` (number of pairs with a negative inner
product) for k > 1, ``norm`` (of the aggregated shared gradient), ``weight/<task>`` (``w_i``), and a few
method-specific ones.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl import parallel, projection, solvers
from mtl.split import TaskSplit, _flat, as_param_grad

Info = dict[str, Tensor]
Normalization = Literal["none", "l2", "loss", "loss+"]
ScaleMode = Literal["min", "median", "rmse"]

_F64 = torch.float64
_CPU = torch.device("cpu")
_F32_EPS = float(torch.finfo(torch.float32).eps)  # the official Aligned-MTL rank rule uses float32's eps


def _rank_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the dtype a Jacobian was computed in, at most float32's (the Gram matrix is computed
    in at least float32): the resolution of its Gram matrix's eigenvalues."""
    return float(torch.finfo(torch.promote_types(dtype, torch.float32)).eps)


# --------------------------------------------------------------------------------------------------------------
# Per-task gradients
# --------------------------------------------------------------------------------------------------------------


def task_gradients(
    losses: Tensor, inputs: Sequence[Tensor], *, batched: bool = True, create_graph: bool = False
) -> tuple[Tensor, bool]:
    """The Jacobian ``G [k, P]`` of the ``k`` scalar ``losses`` w.r.t. ``inputs`` (flattened and concatenated).

    With ``batched=True`` one call of ``torch.autograd.grad(losses, inputs, grad_outputs=eye(k),
    is_grads_batched=True)``; if that raises ``RuntimeError``/``NotImplementedError`` (an op without a
    batching rule), a loop of ``k`` calls. Inputs a loss does not reach get zero rows. The graph is kept
    (``retain_graph=True``). Returns ``(G, whether the batched call ran)``.
    """
    k = losses.shape[0]
    inputs = list(inputs)
    if batched:
        eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
        try:
            grads = torch.autograd.grad(
                losses,
                inputs,
                grad_outputs=eye,
                is_grads_batched=True,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
            return _flat(grads, inputs, (k,)), True
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(f"batched autograd failed ({err}); computing per-task gradients in a loop", stacklevel=2)
    rows = [
        _flat(
            torch.autograd.grad(losses[i], inputs, retain_graph=True, create_graph=create_graph, allow_unused=True),
            inputs,
            (),
        )
        for i in range(k)
    ]
    return torch.stack(rows), False


def gram(G: Tensor) -> Tensor:
    """``G G^T`` as a float64 CPU tensor (computed on ``G``'s device in its dtype, at least float32)."""
    G = G.detach().to(torch.promote_types(G.dtype, torch.float32))
    return (G @ G.T).to(_CPU, _F64)


def combine(G: Tensor, w: Tensor) -> Tensor:
    """``sum_i w_i G_i`` in ``G``'s dtype and device."""
    return w.to(G.device, G.dtype) @ G.detach()


def _single(M: Tensor) -> tuple[Tensor, Info] | None:
    """The answer for one task (``g = g_1``), or ``None`` for more."""
    if M.shape[0] == 1:
        return torch.ones(1, dtype=M.dtype), {"weights": torch.ones(1, dtype=M.dtype)}
    return None


# --------------------------------------------------------------------------------------------------------------
# Weightings on the Gram matrix and aggregators of G (pure functions)
# --------------------------------------------------------------------------------------------------------------


def sum_weights(M: Tensor) -> tuple[Tensor, Info]:
    """``w = 1``: the plain sum of task gradients."""
    w = torch.ones(M.shape[0], dtype=M.dtype)
    return w, {"weights": w}


def pcgrad_weights(M: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Info]:
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1).

    For each task ``i``: ``g_i' = g_i``; for every other task ``j`` in a random order (``torch.randperm``
    with ``generator``, drawn anew for each ``i``): if ``g_i' . g_j < 0``, ``g_i' -= (g_i' . g_j) / ||g_j||^2
    g_j`` (projection of the *current* ``g_i'`` onto the normal plane of the *original* ``g_j``). The result
    is ``sum_i g_i'``. Computed on coefficients (``g_i' = sum_m C_im g_m``, dot products from ``M``), so
    ``w = 1^T C``. Like the paper, ``j`` skips ``i`` (the official code includes it, a no-op in practice).
    """
    k = M.shape[0]
    cols = M.T.tolist()  # cols[j] = M[:, j]; the k x k loop runs on Python floats (cheaper than tiny tensors)
    diag = [cols[j][j] for j in range(k)]
    w_list = [0.0] * k
    for i in range(k):
        row = [0.0] * k  # C[i]
        row[i] = 1.0
        for j in torch.randperm(k, generator=generator).tolist():
            if j == i or diag[j] <= 0:
                continue
            dot = sum(c * m for c, m in zip(row, cols[j]))
            if dot < 0:
                row[j] -= dot / diag[j]
        w_list = [a + c for a, c in zip(w_list, row)]
    w = torch.tensor(w_list, dtype=M.dtype)
    return w, {"weights": w}


def gradvac_weights(
    M: Tensor, targets: Tensor | None = None, *, beta: float = 0.01, generator: torch.Generator | None = None
) -> tuple[Tensor, Info]:
    """Gradient Vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", ICLR 2021, Algorithm 1), on the whole shared parameter vector.

    For each task ``i``: ``g_i' = g_i``; for every other task ``j`` in a random order: ``phi = cos(g_i', g_j)``;
    if ``phi < phi_hat_ij`` (the target),
    ``g_i' += ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2)) g_j``
    (which makes ``cos(g_i', g_j) = phi_hat``); then ``phi_hat_ij = (1 - beta) phi_hat_ij + beta phi`` (EMA of
    the cosine before the adjustment). Result ``sum_i g_i'``. ``targets`` (``[k, k]``, zeros at the start, as
    in the paper) are returned updated in ``info["targets"]``. Pairs involving a zero gradient are skipped.
    With zero targets the update is exactly PCGrad's projection.
    """
    k = M.shape[0]
    T = torch.zeros(k, k, dtype=M.dtype) if targets is None else targets.to(_CPU, M.dtype).clone()
    if T.shape != (k, k):
        raise ValueError(f"GradVac targets must be [{k}, {k}] for {k} tasks, got {list(T.shape)}")
    C = torch.eye(k, dtype=M.dtype)
    for i in range(k):
        for j in torch.randperm(k, generator=generator).tolist():
            if j == i:
                continue
            ni2, nj2 = float(C[i] @ M @ C[i]), float(M[j, j])
            if ni2 <= 0.0 or nj2 <= 0.0:
                continue
            ni, nj = math.sqrt(ni2), math.sqrt(nj2)
            phi = min(max(float(C[i] @ M[:, j]) / (ni * nj), -1.0), 1.0)
            target = float(T[i, j])
            if phi < target:
                root_t = math.sqrt(max(1.0 - target**2, 1e-12))
                C[i, j] += ni * (target * math.sqrt(1.0 - phi**2) - phi * root_t) / (nj * root_t)
            T[i, j] = (1.0 - beta) * target + beta * phi
    w = C.sum(0)
    return w, {"weights": w, "targets": T}


def cagrad_weights(
    M: Tensor, *, c: float = 0.5, rescale: bool = True, max_iter: int = 1000, tol: float = 1e-9
) -> tuple[Tensor, Info]:
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021).

    ``d = argmax_{||d - g0|| <= c ||g0||} min_i g_i . d`` with ``g0 = mean_i g_i``, solved exactly on the Gram
    matrix (:func:`mtl.solvers.cagrad_direction`): ``d = g0 + c ||g0|| g_w / ||g_w||`` with ``w`` the dual
    weights, every task in their support at the same (worst) ``g_i . d``. With ``rescale=True`` the result is
    divided by ``1 + c^2``, the official code's default (``rescale=1``); the official third option, ``1 + c``, is
    not offered. TorchJD's ``CAGrad(c)`` is ``rescale=False``. ``c = 0`` gives ``g0``.

    With ``c >= 1`` the ball contains the origin, so the optimum never conflicts with a task (``g_i . d >= 0``).
    Where the paper leaves the answer open, mtlib's rules: a task with an exactly zero gradient is left out of
    the worst-task ``min`` (no direction can change its loss to first order); and when the optimum is attained
    at ``g_w = 0`` (0 in the convex hull of the gradients, a Pareto-stationary point, where ``g_w / ||g_w||`` is
    undefined and every ``d`` in the ball with ``g_i . d >= 0`` is optimal) ``d`` is the optimal point nearest
    ``g0``: the projection of ``g0`` onto the dual cone ``{d : g_i . d >= 0}``, i.e. DualProj of the mean
    (:func:`mtl.projection.project_dual_cone`). TorchJD returns 0 there; the projection keeps improving the tasks
    that are not part of the stationary combination. Both choices are unique, hence permutation invariant.

    ``info``: ``dual_weights`` (``w``), ``value`` (the worst-task ``g_i . d``, before rescaling), ``iters``,
    ``residual``, ``converged`` and ``stationary``.
    """
    if (one := _single(M)) is not None:
        return one
    k = M.shape[0]
    coef, w_dual, sol = solvers.cagrad_direction(M, c, max_iter=max_iter, tol=tol)
    if sol["stationary"]:
        coef, proj = projection.project_dual_cone(M, torch.full((k,), 1.0 / k, dtype=M.dtype))
        sol["residual"] = float(proj.get("residual", torch.tensor(0.0)))
    scale = 1.0 + c**2 if rescale else 1.0
    w = coef / scale
    info: Info = {"weights": w, "dual_weights": w_dual}
    info.update({key: torch.tensor(float(v)) for key, v in sol.items()})
    return w, info


def _normalizers(M: Tensor, losses: Tensor | None, normalization: str) -> Tensor:
    """Sener & Koltun's ``gradient_normalizers``: ``g_i`` is divided by ``n_i`` before the min-norm solve."""
    k = M.shape[0]
    norms = M.diagonal().clamp_min(0.0).sqrt()
    if normalization == "none":
        return torch.ones(k, dtype=M.dtype)
    if normalization == "l2":
        return norms
    if losses is None:
        raise ValueError(f"normalization={normalization!r} needs the loss values; pass losses=")
    losses = losses.detach().to(_CPU, M.dtype).reshape(k)
    if bool((losses <= 0).any()):
        raise ValueError(
            f"normalization={normalization!r} divides gradients by the losses, which must be positive; "
            f"got {losses.tolist()}. Use 'none' or 'l2' for losses that can be zero or negative."
        )
    if normalization == "loss":
        return losses
    if normalization == "loss+":
        return losses * norms
    raise ValueError(f"normalization must be one of 'none', 'l2', 'loss', 'loss+'; got {normalization!r}")


def mgda_weights(
    M: Tensor,
    losses: Tensor | None = None,
    *,
    normalization: Normalization = "none",
    max_iter: int = 1000,
    tol: float = 1e-10,
    start: Sequence[int] | None = None,
) -> tuple[Tensor, Info]:
    """MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018; Desideri 2012).

    ``alpha = argmin_{alpha in simplex} ||sum_i alpha_i g_i / n_i||^2`` (closed form for two tasks,
    Frank-Wolfe for more: :func:`mtl.solvers.min_norm_simplex`), with the official code's optional
    normalisers ``n_i``: ``"none"`` 1, ``"l2"`` ``||g_i||``, ``"loss"`` ``L_i``, ``"loss+"`` ``L_i ||g_i||``.
    The result is ``sum_i alpha_i g_i`` with the *unnormalised* gradients (the official code back-propagates
    ``sum_i alpha_i L_i``; LibMTL combines the normalised ones instead); ``alpha`` sums to one, it is not
    multiplied by k. Zero normalisers leave the task out of the min-norm problem. ``start``: a support to warm
    start the exact solver from (the classes pass the previous step's); the answer does not depend on it.
    ``info``: ``iters``, ``residual`` (the largest relative KKT violation, :func:`mtl.solvers.min_norm_residual`)
    and ``converged``.
    """
    if (one := _single(M)) is not None:
        return one
    if normalization != "none":
        n = _normalizers(M, losses, normalization)
        inv = torch.where(n > 0, 1.0 / n.clamp_min(1e-300), torch.zeros_like(n))
        M = M * inv[:, None] * inv[None, :]
    alpha, iters = solvers.min_norm_simplex(M, max_iter=max_iter, tol=tol, start=start)
    residual = solvers.min_norm_residual(M, alpha)
    return alpha, {
        "weights": alpha,
        "iters": torch.tensor(float(iters)),
        "residual": torch.tensor(residual),
        "converged": torch.tensor(float(residual <= max(tol, 1e-9))),
    }


class _WarmSupport:
    """Keeps the support of the last min-norm solution, to warm-start the next solve (and in the state)."""

    _support: list[int] | None = None

    def _solve_min_norm(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        start = self._support if self._support is not None and len(self._support) <= M.shape[0] else None
        alpha, info = mgda_weights(
            M, losses, normalization=self.normalization, max_iter=self.max_iter, tol=self.tol, start=start
        )
        self._support = [i for i, a in enumerate(alpha.tolist()) if a > 0.0]
        return alpha, info

    def state_dict(self) -> dict[str, Any]:
        return {"support": None if self._support is None else list(self._support)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        support = state.get("support")
        self._support = None if support is None else [int(i) for i in support]


def imtl_g_weights(M: Tensor) -> tuple[Tensor, Info]:
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Section 3.2).

    The combination ``g = sum_i alpha_i g_i`` with ``sum_i alpha_i = 1`` whose projections ``g . u_i`` onto
    the unit gradients ``u_i = g_i / ||g_i||`` are all equal. The paper's closed form (``alpha_{2..k} = g_1 U^T
    (D U^T)^{-1}``, differences against task 1) is the same as ``alpha = M^-1 n / (1^T M^-1 n)`` with ``n_i =
    ||g_i||`` (``M alpha = t n`` says exactly that every ``g . u_i = t``), which is how it is computed here: on
    the cosine matrix ``C = D^-1 M D^-1`` (``M^-1 n = D^-1 C^-1 1``), by an equilibrated Cholesky solve, so
    gradients whose norms differ by orders of magnitude are solved as accurately as equal ones.

    Degenerate cases, mtlib's rules (as TorchJD's ``IMTLG``, the generalisation of Quinton & Rey 2024):

    - A task whose gradient is exactly zero has no direction to be impartial to and gets ``alpha_i = 0``; the
      others are solved among themselves. (Imposing ``g . u_i`` equal for ``u_i = 0`` would force every
      projection to 0, so one silent task would stop every update.)
    - Linearly dependent gradients (duplicates, ``k`` above the rank): ``M^+ n`` with the pseudo-inverse.
    - If ``1^T M^+ n`` vanishes (below 1e-12 of ``sum_i |(M^+ n)_i|``, e.g. ``g_2 = -g_1``) no combination with
      equal positive projections exists: ``alpha = 0``.

    The common projection ``t = 1 / (1^T M^-1 n)`` can be negative (IMTL-G does not guarantee non-conflict).
    ``alpha`` is invariant under ``G -> s G`` for ``s > 0``. ``info["projection"]`` is ``t``.
    """
    if (one := _single(M)) is not None:
        return one
    k = M.shape[0]
    Ml = M.tolist()
    nz = [i for i in range(k) if Ml[i][i] > 0.0]
    alpha = [0.0] * k
    if nz:
        n = [math.sqrt(Ml[i][i]) for i in nz]
        sol = solvers._cholesky_solve([[Ml[a][b] for b in nz] for a in nz], [n])
        if sol is not None:
            v = sol[0]
        else:  # linearly dependent rows: the pseudo-inverse (graded, accurate for disparate norms)
            Mz = M[nz][:, nz]
            v = (_graded_pinv(Mz, float(torch.finfo(M.dtype).eps)) @ torch.tensor(n, dtype=M.dtype)).tolist()
        total, gross = sum(v), sum(abs(x) for x in v)
        if gross > 0.0 and abs(total) > 1e-12 * gross:
            for i, x in zip(nz, v):
                alpha[i] = x / total
    w = torch.tensor(alpha, dtype=M.dtype)
    t = float(w @ M[:, nz[0]]) / math.sqrt(Ml[nz[0]][nz[0]]) if nz else 0.0
    return w, {"weights": w, "projection": torch.tensor(t)}


def _graded_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the Gram matrix ``M``, accurate *relative to each eigenvalue*
    when the gradients' norms differ by orders of magnitude.

    ``torch.linalg.eigh(M)`` is accurate to about ``eps * lambda_max``: with norms spanning 1e-3..1e3 the small
    eigenvalues (1e-6 next to 1e6) come out with relative errors of 1e-6 and worse, and Aligned-MTL and the
    pseudo-inverse divide by them. Instead ``M = D C D`` (``D = diag(||g_i||)``, ``C`` the cosines, well scaled)
    is factored as ``B B^T`` with ``B = D F`` and ``C = F F^T`` (Cholesky, or ``Q_r Lambda_r^{1/2}`` from
    ``eigh(C)`` keeping the eigenvalues above ``k eps`` where ``C`` is singular: zero, duplicate or dependent
    rows), and the SVD of ``B`` with its rows sorted by decreasing norm gives ``M``'s eigenpairs to about
    ``eps`` relative accuracy (graded matrices; Demmel & Veselic, SIAM J. Matrix Anal. Appl. 1992). The
    eigenvalues of the dropped directions are returned as 0."""
    k = M.shape[0]
    n = M.diagonal().clamp_min(0.0).sqrt()
    nz = (n > 0).nonzero().flatten()
    lam_all = torch.zeros(k, dtype=M.dtype)
    if nz.numel() == 0:
        return lam_all, torch.eye(k, dtype=M.dtype)
    nn = n[nz]
    C = M[nz][:, nz] / nn[:, None] / nn[None, :]
    F, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        lc, Q = torch.linalg.eigh(C)
        keep = lc > k * float(torch.finfo(M.dtype).eps) * float(lc.max())
        F = Q[:, keep] * lc[keep].sqrt()
    order = torch.argsort(nn, descending=True)
    U, S, _ = torch.linalg.svd(nn[order, None] * F[order], full_matrices=False)
    r = S.shape[0]
    V = torch.zeros(k, k, dtype=M.dtype)
    V[nz[order], :r] = U
    lam_all[:r] = S**2
    if r < k:  # an orthonormal basis of the rest (the null space of M), from the complement of V's columns
        P = torch.eye(k, dtype=M.dtype) - V[:, :r] @ V[:, :r].T
        _, Qn = torch.linalg.eigh(P)
        V[:, r:] = Qn[:, k - (k - r) :] if k - r > 0 else Qn[:, :0]
    asc = torch.argsort(lam_all, stable=True)
    return lam_all[asc], V[:, asc]


def _graded_pinv(M: Tensor, rank_eps: float) -> Tensor:
    """Pseudo-inverse of the Gram matrix from :func:`_graded_eigh`, keeping eigenvalues above ``lambda_max k
    rank_eps`` (accurate for gradients of very different norms, where ``torch.linalg.pinv`` is not)."""
    lam, V = _graded_eigh(M)
    keep = lam > float(lam.max()) * M.shape[0] * rank_eps
    Vr = V[:, keep]
    return (Vr / lam[keep]) @ Vr.T


def aligned_mtl_weights(M: Tensor, *, scale_mode: ScaleMode = "min", rank_eps: float = _F32_EPS) -> tuple[Tensor, Info]:
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023).

    Eigendecomposition ``M = V diag(lambda) V^T`` (``lambda = sigma^2``, the squared singular values of
    ``G``), keeping the ``r`` eigenvalues above ``lambda_max * k * rank_eps`` (the official code's rank
    rule, with ``rank_eps`` the epsilon of the dtype the Jacobian was computed in: float32's in training, as the
    official code; float64's for a float64 ``G``, as TorchJD). The aligned gradients are the rows of ``W G``
    with ``W = V_r diag(sqrt(s / lambda_r)) V_r^T`` and
    ``s = lambda_min`` (``scale_mode="min"``, the paper's choice), ``median(lambda)`` (lower median, as
    ``torch.median``) or ``mean(lambda)`` (``"rmse"``). For full rank ``(W G)(W G)^T = s I``: orthogonal
    rows of equal norm ``sqrt(s)`` (all singular values equal to ``sqrt(s)``), the condition number is one.
    The update is the sum of the aligned gradients, ``g = (W 1)^T G``. ``info["transform"]`` is ``W``.
    """
    if (one := _single(M)) is not None:
        return one
    k = M.shape[0]
    lam, V = _graded_eigh(M)
    keep = lam > lam.max() * k * rank_eps
    if not bool(keep.any()):
        w = torch.zeros(k, dtype=M.dtype)
        return w, {"weights": w, "transform": torch.zeros(k, k, dtype=M.dtype), "rank": torch.tensor(0.0)}
    lam_r, V_r = lam[keep], V[:, keep]
    if scale_mode == "min":
        s = lam_r.min()
    elif scale_mode == "median":
        s = lam_r.median()
    elif scale_mode == "rmse":
        s = lam_r.mean()
    else:
        raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse'; got {scale_mode!r}")
    W = V_r @ torch.diag(torch.sqrt(s / lam_r)) @ V_r.T
    w = W.sum(1)
    return w, {"weights": w, "transform": W, "rank": torch.tensor(float(keep.sum()))}


def nash_mtl_weights(
    M: Tensor,
    alpha0: Tensor | None = None,
    *,
    normalize: bool = False,
    max_norm: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[Tensor, Info]:
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Claim 3.1).

    ``alpha > 0`` with ``alpha_i (M alpha)_i = 1`` on the Gram matrix as it is (:func:`mtl.solvers.nash_bargaining`,
    warm-started from ``alpha0``), and ``g = sum_i alpha_i g_i``, scaled down to norm ``max_norm`` if longer (the
    official code clips the shared gradient norm at 1.0; ``max_norm=0`` disables). The official code divides the
    Gram matrix by its Frobenius norm for its solver but multiplies ``alpha`` by that norm inside its log
    constraint, so its ``alpha`` is this one; so is TorchJD's ``NashMTL``. ``g`` then scales as ``sqrt(s)`` under
    ``G -> s G`` (``||g||^2 = k``: the product of the tasks' improvements is fixed by the bargaining condition).

    ``normalize=True`` uses ``alpha`` solved for ``M / ||M||_F`` instead, ``sqrt(||M||_F)`` times the paper's (what
    mtlib < 0.2 did by default, kept only to reproduce those runs; the clip hid the difference only when the
    gradient was long). Zero rows get weight 0; see :func:`mtl.solvers.nash_bargaining` for linearly dependent
    rows. ``info``: ``alpha`` (unclipped), ``iters``, ``residual`` (``max_i |alpha_i (M alpha)_i - 1|`` over
    non-zero rows) and ``converged``.
    """
    if (one := _single(M)) is not None:
        return one
    fro = float(torch.linalg.matrix_norm(M))
    factor = math.sqrt(fro) if normalize and fro > 0 else 1.0  # alpha for M / ||M||_F is sqrt(||M||_F) alpha(M)
    a0 = None if alpha0 is None else alpha0.to(_CPU, M.dtype) / factor
    alpha, iters = solvers.nash_bargaining(M, alpha0=a0, max_iter=max_iter, tol=tol)
    residual = solvers.nash_residual(M, alpha)
    alpha = alpha * factor
    w = alpha
    if max_norm > 0:
        norm = math.sqrt(max(float(alpha @ M @ alpha), 0.0))
        if norm > max_norm:
            w = alpha * (max_norm / norm)
    return w, {
        "weights": w,
        "alpha": alpha,
        "iters": torch.tensor(float(iters)),
        "residual": torch.tensor(residual),
        "converged": torch.tensor(float(residual < max(tol, 1e-8))),
    }


def aggregate_sum(G: Tensor) -> tuple[Tensor, Info]:
    """``sum_i g_i``: what ``sum(losses).backward()`` gives the shared parameters."""
    w, info = sum_weights(gram(G))
    return combine(G, w), info


def aggregate_pcgrad(G: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Info]:
    """PCGrad of the task gradients ``G [k, P]``; see :func:`pcgrad_weights`."""
    w, info = pcgrad_weights(gram(G), generator=generator)
    return combine(G, w), info


def aggregate_gradvac(
    G: Tensor, targets: Tensor | None = None, *, beta: float = 0.01, generator: torch.Generator | None = None
) -> tuple[Tensor, Info]:
    """GradVac of ``G [k, P]``; see :func:`gradvac_weights` (new targets in ``info["targets"]``)."""
    w, info = gradvac_weights(gram(G), targets, beta=beta, generator=generator)
    return combine(G, w), info


def aggregate_cagrad(
    G: Tensor, *, c: float = 0.5, rescale: bool = True, max_iter: int = 1000, tol: float = 1e-9
) -> tuple[Tensor, Info]:
    """CAGrad of ``G [k, P]``; see :func:`cagrad_weights`."""
    w, info = cagrad_weights(gram(G), c=c, rescale=rescale, max_iter=max_iter, tol=tol)
    return combine(G, w), info


def aggregate_mgda(
    G: Tensor,
    losses: Tensor | None = None,
    *,
    normalization: Normalization = "none",
    max_iter: int = 1000,
    tol: float = 1e-10,
) -> tuple[Tensor, Info]:
    """MGDA's min-norm combination of ``G [k, P]``; see :func:`mgda_weights`."""
    w, info = mgda_weights(gram(G), losses, normalization=normalization, max_iter=max_iter, tol=tol)
    return combine(G, w), info


def aggregate_imtl_g(G: Tensor) -> tuple[Tensor, Info]:
    """IMTL-G of ``G [k, P]``; see :func:`imtl_g_weights`."""
    w, info = imtl_g_weights(gram(G))
    return combine(G, w), info


def aggregate_aligned_mtl(
    G: Tensor, *, scale_mode: ScaleMode = "min", rank_eps: float | None = None
) -> tuple[Tensor, Info]:
    """Aligned-MTL of ``G [k, P]``; see :func:`aligned_mtl_weights` (``rank_eps``: default the epsilon of
    ``G``'s dtype, at most float32's)."""
    eps = _rank_eps(G.dtype) if rank_eps is None else rank_eps
    w, info = aligned_mtl_weights(gram(G), scale_mode=scale_mode, rank_eps=eps)
    return combine(G, w), info


def aggregate_nash_mtl(
    G: Tensor,
    alpha0: Tensor | None = None,
    *,
    normalize: bool = False,
    max_norm: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[Tensor, Info]:
    """Nash-MTL of ``G [k, P]``; see :func:`nash_mtl_weights`."""
    w, info = nash_mtl_weights(gram(G), alpha0, normalize=normalize, max_norm=max_norm, max_iter=max_iter, tol=tol)
    return combine(G, w), info


def aggregate_upgrad(G: Tensor, pref: Tensor | None = None) -> tuple[Tensor, Info]:
    """UPGrad of ``G [k, P]``; see :func:`mtl.projection.upgrad_weights`."""
    w, info = projection.upgrad_weights(gram(G), pref)
    return combine(G, w), info


def aggregate_dualproj(G: Tensor, pref: Tensor | None = None) -> tuple[Tensor, Info]:
    """DualProj of ``G [k, P]``; see :func:`mtl.projection.dualproj_weights`."""
    w, info = projection.dualproj_weights(gram(G), pref)
    return combine(G, w), info


def aggregate_con_fig(G: Tensor, pref: Tensor | None = None, *, rank_tol: float | None = None) -> tuple[Tensor, Info]:
    """ConFIG of ``G [k, P]``; see :func:`mtl.projection.config_weights` (``rank_tol`` from ``G``'s dtype)."""
    tol = (1e-5 if G.dtype == torch.float64 else 1e-3) if rank_tol is None else rank_tol
    w, info = projection.config_weights(gram(G), pref, rank_tol=tol)
    return combine(G, w), info


# --------------------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------------------


def _stack_losses(losses: Mapping[str, Tensor]) -> tuple[list[str], Tensor]:
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(f"losses must be a non-empty mapping {{task: scalar loss}}, got {losses!r}")
    names = list(losses)
    for name in names:
        loss = losses[name]
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"the loss of task {name!r} must be a scalar tensor, got {shape}")
    return names, torch.stack([losses[n].reshape(()) for n in names])


def _split_params(
    shared: Iterable[nn.Parameter], others: Iterable[nn.Parameter]
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    def unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        out: dict[int, nn.Parameter] = {}
        for p in params:
            if p.requires_grad:
                out.setdefault(id(p), p)
        return list(out.values())

    shared_l, others_l = unique(shared), unique(others)
    if not shared_l:
        raise ValueError("no trainable shared parameters were given; pass the parameters every task uses")
    both = {id(p) for p in shared_l} & {id(p) for p in others_l}
    if both:
        raise ValueError(f"{len(both)} parameter(s) appear in both `shared` and `others`; each belongs to one")
    return shared_l, others_l


def _set_grads(params: Sequence[nn.Parameter], g: Tensor) -> None:
    """Set (not accumulate) each parameter's ``.grad`` to its slice of the flat vector ``g``."""
    for p, chunk in zip(params, torch.split(g.detach(), [p.numel() for p in params])):
        p.grad = as_param_grad(p, chunk.view(p.shape))


def _set_grad_list(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
    """Set (not accumulate) each parameter's ``.grad``, in the parameter's layout (:func:`mtl.split.as_param_grad`)."""
    for p, g in zip(params, grads):
        p.grad = torch.zeros_like(p) if g is None else as_param_grad(p, g)


def _grad_norm(params: Sequence[nn.Parameter]) -> float:
    return float(
        torch.stack([p.grad.detach().double().pow(2).sum() for p in params if p.grad is not None]).sum().sqrt()
    )


def _backward_others(total: Tensor, others: Sequence[nn.Parameter]) -> None:
    if others:
        torch.autograd.backward(total, inputs=list(others))


def _pair_stats(M: Tensor) -> dict[str, float]:
    k = M.shape[0]
    if k < 2:
        return {}
    Ml = M.tolist()  # k x k floats: a Python loop is cheaper than a dozen ops on tiny tensors
    n = [math.sqrt(max(Ml[i][i], 0.0)) for i in range(k)]
    cos_sum, conflicts = 0.0, 0
    for i in range(k - 1):
        row, ni = Ml[i], n[i]
        for j in range(i + 1, k):
            den = ni * n[j]
            if den > 0:
                cos_sum += row[j] / max(den, 1e-300)
            if row[j] < 0:
                conflicts += 1
    return {"cos_mean": cos_sum / (k * (k - 1) // 2), "conflicts": float(conflicts)}


def _stats(names: Sequence[str], M: Tensor, w: Tensor, info: Info, batched: bool) -> dict[str, float]:
    wl, Ml = w.tolist(), M.tolist()
    wMw = sum(wi * sum(m * x for m, x in zip(row, wl)) for wi, row in zip(wl, Ml))
    out = {"batched": float(batched), **_pair_stats(M), "norm": math.sqrt(max(wMw, 0.0))}
    out.update({f"weight/{n}": float(wi) for n, wi in zip(names, wl)})
    out.update({key: float(v) for key, v in info.items() if v.numel() == 1 and key != "weights"})
    return out


class StepGradients:
    """One step's per-task gradients for a gradient method: the one place that chooses between the cut graph (a
    :class:`~mtl.split.TaskSplit` given as ``representation``: one head backward, then the body alone) and the whole
    graph (batched autograd through everything), so every ``backward`` asks for what it needs and gets it either way.

    The task-owned parameters (``others``) get the plain gradient of ``sum_i L_i`` exactly once per step, accumulated:
    through a split the head backward gives it; on the whole graph a backward restricted to them runs after the
    shared gradients (the graph is kept until then).

    Args:
        method: the gradient method (its ``_batched`` flag and head-row workspace are used and updated).
        losses: ``{task: scalar loss}``.
        shared, others: the parameters (:meth:`GradientMethod.backward`).
        representation: ``None``, the shared representation ``Z`` or a ``TaskSplit``.
        requires_representation: refuse a missing ``representation`` (methods that work on ``dL_i/dZ``).
    """

    def __init__(
        self,
        method: GradientMethod,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter],
        others: Iterable[nn.Parameter],
        representation: Tensor | TaskSplit | None,
        *,
        requires_representation: bool = False,
    ) -> None:
        self.names, self.L = _stack_losses(losses)
        self.shared, self.others = _split_params(shared, others)
        self.representation = method._representation(representation) if requires_representation else representation
        self.split = self.representation if isinstance(self.representation, TaskSplit) else None
        self._method = method
        self._rows: list[Tensor] | None = None
        self._others_pending = True

    def cut_rows(self, *, create_graph: bool = False) -> list[Tensor]:
        """Through the split: per cut, ``[k, *z.shape]`` with row ``i`` = ``dL_i/dz`` (one head backward, which also
        gives ``others`` their gradient; with ``create_graph`` the rows stay differentiable)."""
        assert self.split is not None, "cut_rows needs a TaskSplit"
        if self._rows is None:
            workspace = None if create_graph else self._method._workspace
            self._rows = self.split.head_backward(
                self.names, self.L, self.others, create_graph=create_graph, workspace=workspace
            )
            self._others_pending = False
        return self._rows

    def shared_jacobian(self) -> tuple[Tensor, bool]:
        """``G [k, P]`` over the shared parameters (averaged over the ranks under data parallelism: the global
        batch's), and whether batched autograd ran."""
        method = self._method
        if self.split is not None:
            G, batched = self.split.param_jacobian(self.cut_rows(), self.shared, batched=method._batched)
        else:
            G, batched = task_gradients(self.L, self.shared, batched=method._batched)
            self._backward_others()
        method._batched = batched
        return parallel.average(G), batched  # data parallelism: the global batch's rows (mtl.parallel)

    def representation_jacobian(self, *, create_graph: bool = False) -> tuple[Tensor, bool]:
        """``[k, D]``: row ``i`` = ``dL_i/dZ`` flattened (every cut's, through a split), and whether batched autograd
        ran."""
        if self.split is not None:
            return self.split.flat(self.cut_rows(create_graph=create_graph)), True
        assert isinstance(self.representation, Tensor)
        return self._method._jacobian(self.L, [self.representation], create_graph=create_graph)

    def combined(self, w: Tensor | None) -> list[Tensor | None]:
        """The shared parameters' gradients of ``sum_i w_i L_i`` (``w = None``: the plain sum), by one backward
        (through a split: of the combined cut rows, through the body alone)."""
        if self.split is not None:
            rows = self.cut_rows()
            cotangents = [j.sum(0) for j in rows] if w is None else self.split.combine(rows, w)
            return self.split.body_grads(cotangents, self.shared)
        total = self.L.sum() if w is None else (w.to(self.L.device, self.L.dtype) * self.L).sum()
        keep = bool(self.others) and self._others_pending
        grads = list(torch.autograd.grad(total, self.shared, retain_graph=keep, allow_unused=True))
        self._backward_others()
        return grads

    def _backward_others(self) -> None:
        if self._others_pending:
            self._others_pending = False
            _backward_others(self.L.sum(), self.others)


class GradientMethod:
    """How one step's per-task losses become gradients (see the module docstring for the contract).

    Subclasses set ``requires_representation`` when they need the shared representation tensor ``Z``
    (``[B, ...]``, the output of the shared body that every task head reads) and implement ``backward``;
    stateful ones override ``state_dict``/``load_state_dict``. Every class takes ``seed`` (used by the
    randomised ones) so a trainer can build any of them as ``cls(seed=...)``.
    """

    name: ClassVar[str] = ""
    requires_representation: ClassVar[bool] = False
    uses_split: ClassVar[bool] = True  # takes a TaskSplit as `representation` (everything but Plain)

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        self._batched = True  # becomes False after batched autograd failed once
        self._workspace: dict[int, Tensor] = {}  # memory for the stacked per-task rows (TaskSplit.head_backward)

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter],
        *,
        others: Iterable[nn.Parameter] = (),
        representation: Tensor | TaskSplit | None = None,
    ) -> dict[str, float]:
        """Put the method's gradients in ``.grad``: aggregated for ``shared`` (set), plain for ``others``
        (accumulated). ``representation``: the shared representation ``Z`` (methods with
        ``requires_representation``) or a :class:`~mtl.split.TaskSplit` (any method but :class:`Plain`; the
        fast path). Returns statistics for logging."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State needed to resume exactly (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def _jacobian(self, losses: Tensor, inputs: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, bool]:
        G, batched = task_gradients(losses, inputs, batched=self._batched, create_graph=create_graph)
        self._batched = batched
        return G, batched

    def _representation(self, representation: Tensor | TaskSplit | None) -> Tensor | TaskSplit:
        if isinstance(representation, TaskSplit):
            return representation
        if representation is None:
            raise ValueError(
                f"{type(self).__name__} needs the shared representation: call backward(..., representation=Z) "
                "with Z [B, ...] the shared body's output that the task heads read"
            )
        if not representation.requires_grad:
            raise ValueError(f"{type(self).__name__}: the representation must be part of the graph (requires_grad)")
        return representation

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


class Plain(GradientMethod):
    """No modulation: ``sum(losses).backward()`` (every leaf accumulates its plain gradient).

    It does not ask for a cut graph (``uses_split = False``), but trains through one when the trainer cut the
    graph for the weighting's sake (GradNorm): one backward through the heads, one through the body with the
    summed cotangent; the same gradients.
    """

    name = "none"
    uses_split = False

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter],
        *,
        others: Iterable[nn.Parameter] = (),
        representation: Tensor | TaskSplit | None = None,
    ) -> dict[str, float]:
        if isinstance(representation, TaskSplit):
            src = StepGradients(self, losses, shared, others, representation)
            _set_grad_list(src.shared, src.combined(None))
            return {}
        _stack_losses(losses)[1].sum().backward()
        return {}


class AggregatingMethod(GradientMethod):
    """A method that aggregates the Jacobian ``G [k, P]`` over the shared parameters through task weights
    computed from ``G G^T``: subclasses implement :meth:`weights`."""

    _jacobian_dtype: torch.dtype = torch.float32  # dtype of the last Jacobian (the resolution of its Gram matrix)

    def weights(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        """Task weights ``w`` (``g = w^T G``) from the float64 CPU Gram matrix; may update the state."""
        raise NotImplementedError

    def aggregate(self, G: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Info]:
        """``g [P]`` for the task gradients ``G [k, P]`` (and the loss values, for loss normalisations)."""
        self._jacobian_dtype = G.dtype
        w, info = self.weights(gram(G), None if losses is None else losses.detach().to(_CPU, _F64))
        return combine(G, w), info

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter],
        *,
        others: Iterable[nn.Parameter] = (),
        representation: Tensor | TaskSplit | None = None,
    ) -> dict[str, float]:
        src = StepGradients(self, losses, shared, others, representation)
        G, batched = src.shared_jacobian()
        self._jacobian_dtype = G.dtype
        M = gram(G)
        w, info = self.weights(M, src.L.detach().to(_CPU, _F64))
        _set_grads(src.shared, combine(G, w))
        return _stats(src.names, M, w, info, batched)


def _generator_state(gen: torch.Generator) -> Tensor:
    return gen.get_state().clone()


class PCGrad(AggregatingMethod):
    """PCGrad (Yu et al., NeurIPS 2020): project each task gradient onto the normal plane of every gradient it
    conflicts with, in a random order, and sum (:func:`pcgrad_weights`).

    Args:
        seed: seed of the generator of the random orders (its state is in ``state_dict``).
    """

    name = "pcgrad"

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self._generator = torch.Generator().manual_seed(seed)

    def weights(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        return pcgrad_weights(M, generator=self._generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": _generator_state(self._generator)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._generator.set_state(state["generator"])


class GradVac(AggregatingMethod):
    """Gradient Vaccine (Wang et al., ICLR 2021): raise each pairwise cosine to an EMA target (:func:`gradvac_weights`).

    Args:
        beta: EMA rate of the cosine targets (paper: 0.01, 0.001 or 0.0001 depending on the setting).
        seed: seed of the random orders.
    """

    name = "gradvac"

    def __init__(self, *, beta: float = 0.01, seed: int = 0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac beta must be in [0, 1], got {beta}")
        super().__init__(seed=seed)
        self.beta = beta
        self._generator = torch.Generator().manual_seed(seed)
        self.targets: Tensor | None = None

    def weights(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        w, info = gradvac_weights(M, self.targets, beta=self.beta, generator=self._generator)
        self.targets = info["targets"]
        return w, info

    def state_dict(self) -> dict[str, Any]:
        targets = None if self.targets is None else self.targets.clone()
        return {"targets": targets, "generator": _generator_state(self._generator)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.targets = None if state["targets"] is None else state["targets"].to(_CPU, _F64).clone()
        self._generator.set_state(state["generator"])


class CAGrad(AggregatingMethod):
    """CAGrad (Liu et al., NeurIPS 2021): the best worst-task improvement within ``c ||g0||`` of the mean
    gradient ``g0`` (:func:`cagrad_weights`).

    Args:
        c: radius factor (official default 0.5; 0 gives the mean gradient).
        rescale: divide by ``1 + c^2`` as the official code does by default.
        max_iter, tol: of the dual solver.
    """

    name = "cagrad"

    def __init__(
        self, *, c: float = 0.5, rescale: bool = True, max_iter: int = 1000, tol: float = 1e-9, seed: int = 0
    ) -> None:
        if c < 0:
            raise ValueError(f"CAGrad c must be >= 0, got {c}")
        super().__init__(seed=seed)
        self.c, self.rescale, self.max_iter, self.tol = c, rescale, max_iter, tol

    def weights(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        return cagrad_weights(M, c=self.c, rescale=self.rescale, max_iter=self.max_iter, tol=self.tol)


_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _check_normalization(normalization: str) -> None:
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")


class MGDA(_WarmSupport, AggregatingMethod):
    """MGDA (Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull of the task gradients
    (:func:`mgda_weights`).

    Args:
        normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"`` (official code's options).
        max_iter, tol: of the Frank-Wolfe solver (k > 2).
    """

    name = "mgda"

    def __init__(
        self, *, normalization: Normalization = "none", max_iter: int = 1000, tol: float = 1e-10, seed: int = 0
    ) -> None:
        _check_normalization(normalization)
        super().__init__(seed=seed)
        self.normalization, self.max_iter, self.tol = normalization, max_iter, tol

    def weights(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        return self._solve_min_norm(M, losses)


class MGDAUB(_WarmSupport, GradientMethod):
    """MGDA-UB (Sener & Koltun, NeurIPS 2018, Section 3.3): MGDA's weights from the gradients w.r.t. the shared
    representation ``Z`` (an upper bound of the shared-parameter problem), so only the task heads are
    back-propagated k times.

    ``alpha = mgda_weights(J J^T)`` with ``J [k, Z.numel()]`` the batched Jacobian of the losses w.r.t. ``Z``;
    the shared parameters get ``grad sum_i alpha_i L_i`` (one backward), ``others`` the plain gradient of
    ``sum_i L_i`` (a second backward restricted to them; the official code gives the heads the
    ``alpha``-weighted gradient too). Assumes what MGDA-UB assumes: the shared parameters reach the losses
    through ``Z`` only; the backward itself is exact regardless.
    """

    name = "mgda_ub"
    requires_representation = True

    def __init__(
        self, *, normalization: Normalization = "none", max_iter: int = 1000, tol: float = 1e-10, seed: int = 0
    ) -> None:
        _check_normalization(normalization)
        super().__init__(seed=seed)
        self.normalization, self.max_iter, self.tol = normalization, max_iter, tol

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter],
        *,
        others: Iterable[nn.Parameter] = (),
        representation: Tensor | TaskSplit | None = None,
    ) -> dict[str, float]:
        src = StepGradients(self, losses, shared, others, representation, requires_representation=True)
        # Through a split: one head backward for every dL_i/dZ (and the heads' plain gradients), one body backward.
        J, batched = src.representation_jacobian()
        M = parallel.sum_gram(gram(J))  # data parallelism: the global batch's Gram matrix (mtl.parallel)
        alpha, info = self._solve_min_norm(M, src.L.detach().to(_CPU, _F64))
        _set_grad_list(src.shared, src.combined(alpha))
        stats = _stats(src.names, M, alpha, info, batched)
        if src.split is None:  # through a split its "norm" stays that of the combined gradient w.r.t. Z
            stats["norm"] = _grad_norm(src.shared)
        return stats


class IMTLG(AggregatingMethod):
    """IMTL-G (Liu et al., ICLR 2021): the combination with equal projections onto every unit task gradient
    (:func:`imtl_g_weights`)."""

    name = "imtl_g"

    def weights(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        return imtl_g_weights(M)


class AlignedMTL(AggregatingMethod):
    """Aligned-MTL (Senushkin et al., CVPR 2023): make the task gradients orthogonal with equal norms (condition
    number one) by a Procrustes-type transform, then sum (:func:`aligned_mtl_weights`).

    Args:
        scale_mode: ``"min"`` (paper: the smallest singular value), ``"median"`` or ``"rmse"``.
    """

    name = "aligned_mtl"

    def __init__(self, *, scale_mode: ScaleMode = "min", seed: int = 0) -> None:
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse'; got {scale_mode!r}")
        super().__init__(seed=seed)
        self.scale_mode = scale_mode

    def weights(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        return aligned_mtl_weights(M, scale_mode=self.scale_mode, rank_eps=_rank_eps(self._jacobian_dtype))


def _pref(pref: Sequence[float] | Tensor | None, k: int, name: str) -> Tensor | None:
    """A preference vector from a config list (or tensor) as float64, checked against the number of tasks."""
    if pref is None:
        return None
    t = torch.as_tensor(pref, dtype=_F64).reshape(-1)
    if t.shape[0] != k:
        raise ValueError(f"{name}: pref has {t.shape[0]} entries but this step has {k} tasks; give one per task")
    return t


class _DualConeMethod(AggregatingMethod):
    """UPGrad and DualProj: weights from a pure function ``(M, pref, max_iter, tol) -> (w, info)`` of
    :mod:`mtl.projection` (``_weights``), with a preference vector and the box-QP solver's settings."""

    _weights: ClassVar[Any]

    def __init__(
        self, *, pref: Sequence[float] | None = None, max_iter: int = 100, tol: float = 1e-12, seed: int = 0
    ) -> None:
        super().__init__(seed=seed)
        self.pref = None if pref is None else [float(x) for x in pref]
        self.max_iter, self.tol = max_iter, tol

    def weights(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        pref = _pref(self.pref, M.shape[0], type(self).__name__)
        return type(self)._weights(M, pref, max_iter=self.max_iter, tol=self.tol)


class UPGrad(_DualConeMethod):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024): every task gradient,
    weighted by ``pref`` (default ``1/k``), projected onto the dual cone ``{x : G x >= 0}`` and summed, so the
    result conflicts with no task; the mean gradient when no two tasks conflict
    (:func:`mtl.projection.upgrad_weights`, the same scale as TorchJD's ``UPGrad``).

    Args:
        pref: preference weights, one per task (default uniform ``1/k``).
        max_iter, tol: of the exact active-set solver of each box QP.
    """

    name = "upgrad"
    _weights = staticmethod(projection.upgrad_weights)


class DualProj(_DualConeMethod):
    """DualProj (Quinton & Rey, 2024): the ``pref``-weighted combination of the task gradients (default the
    mean) projected onto the dual cone ``{x : G x >= 0}`` (:func:`mtl.projection.dualproj_weights`, the same
    scale as TorchJD's ``DualProj``).

    Args:
        pref: preference weights, one per task (default uniform ``1/k``).
        max_iter, tol: of the exact active-set solver of the box QP.
    """

    name = "dualproj"
    _weights = staticmethod(projection.dualproj_weights)


class ConFIG(AggregatingMethod):
    """ConFIG (Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", 2024):
    the direction with equal cosine to every task gradient (``pref`` sets unequal target cosines), with the
    length of the sum of the task gradients' projections onto it (:func:`mtl.projection.config_weights`; sum
    scale, as TorchJD's ``ConFIG``).

    Args:
        pref: target cosines up to scale, one per task (default all equal).
        rank_tol: rank decision on the unit gradients; ``None`` picks it from the Jacobian's dtype (1e-5 for
            float64, 1e-3 for float32, whose Gram matrix resolves cosines only to about that).
    """

    name = "con_fig"

    def __init__(self, *, pref: Sequence[float] | None = None, rank_tol: float | None = None, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.pref = None if pref is None else [float(x) for x in pref]
        self.rank_tol = rank_tol

    def weights(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        pref = _pref(self.pref, M.shape[0], "ConFIG")
        tol = self.rank_tol
        if tol is None:
            tol = 1e-5 if self._jacobian_dtype == torch.float64 else 1e-3
        return projection.config_weights(M, pref, rank_tol=tol)


class NashMTL(AggregatingMethod):
    """Nash-MTL (Navon et al., ICML 2022): weights of the Nash bargaining solution, ``(G G^T alpha)_i = 1 /
    alpha_i`` (:func:`nash_mtl_weights`), recomputed every ``update_every`` steps; in between the previous
    ``alpha`` weights the losses (one backward, no per-task gradients), as in the official code.

    Args:
        update_every: steps between solves (official ``update_weights_every``, default 1).
        max_norm: clip of the shared gradient's norm (official default 1.0; 0 disables).
        normalize: use the weights solved for ``G G^T / ||G G^T||_F`` (``sqrt(||G G^T||_F)`` times the paper's;
            mtlib < 0.2's default, kept to reproduce those runs). Default: the paper's (and the official code's).
        max_iter, tol: of the Newton solver.
    """

    name = "nash_mtl"

    def __init__(
        self,
        *,
        update_every: int = 1,
        max_norm: float = 1.0,
        normalize: bool = False,
        max_iter: int = 100,
        tol: float = 1e-10,
        seed: int = 0,
    ) -> None:
        if update_every < 1:
            raise ValueError(f"NashMTL update_every must be >= 1, got {update_every}")
        if max_norm < 0:
            raise ValueError(f"NashMTL max_norm must be >= 0 (0 disables clipping), got {max_norm}")
        super().__init__(seed=seed)
        self.update_every, self.max_norm, self.normalize = update_every, max_norm, normalize
        self.max_iter, self.tol = max_iter, tol
        self.step = 0
        self.alpha: Tensor | None = None

    def weights(self, M: Tensor, losses: Tensor | None) -> tuple[Tensor, Info]:
        w, info = nash_mtl_weights(
            M, self.alpha, normalize=self.normalize, max_norm=self.max_norm, max_iter=self.max_iter, tol=self.tol
        )
        self.alpha = info.get("alpha", w).clone()
        return w, info

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter],
        *,
        others: Iterable[nn.Parameter] = (),
        representation: Tensor | TaskSplit | None = None,
    ) -> dict[str, float]:
        k = len(losses) if isinstance(losses, Mapping) else 0  # (not a mapping: super().backward says so)
        update = self.alpha is None or self.alpha.shape[0] != k or self.step % self.update_every == 0
        self.step += 1
        if update:
            return {**super().backward(losses, shared, others=others, representation=representation), "updated": 1.0}
        assert self.alpha is not None
        src = StepGradients(self, losses, shared, others, representation)
        shared_l = src.shared
        g = parallel.average(_flat(src.combined(self.alpha), shared_l, ())[None])[0]  # the global batch's
        norm = float(g.norm())
        if self.max_norm > 0 and norm > self.max_norm:
            g = g * (self.max_norm / norm)
        _set_grads(shared_l, g)
        scale = min(1.0, self.max_norm / norm) if self.max_norm > 0 and norm > 0 else 1.0
        out = {"updated": 0.0, "norm": float(g.norm())}
        out.update({f"weight/{n}": float(a) * scale for n, a in zip(src.names, self.alpha)})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "alpha": None if self.alpha is None else self.alpha.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.alpha = None if state["alpha"] is None else state["alpha"].to(_CPU, _F64).clone()


class _ReverseGrad(torch.autograd.Function):
    """Gradient reversal layer (Ganin & Lempitsky, 2015): identity forward, ``-scale * grad`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def unit_rows(J: Tensor) -> Tensor:
    """Rows of ``J [..., D]`` scaled to unit norm: ``j / sqrt(||j||^2 + delta)`` with
    ``delta = max(1e-12 * mean ||j||^2, 1e-20)`` (constant w.r.t. autograd), so zero rows stay zero and the
    derivative stays finite. Computed in at least float32."""
    J = J.to(torch.promote_types(J.dtype, torch.float32))
    sq = J.pow(2).sum(-1, keepdim=True)
    delta = (sq.detach().mean() * 1e-12).clamp_min(1e-20)
    return J * torch.rsqrt(sq + delta)


class GREAT(GradientMethod):
    """GREAT for multi-task learning (Sinha et al., "Gradient Adversarial Training of Neural Networks", 2018,
    arXiv:1806.08028, Section 3.3 "gradient alignment"): an auxiliary network learns to tell from a gradient
    tensor which task produced it, and the shared body is trained, through gradient reversal, to make the
    task gradients indistinguishable.

    Construction, for one step with losses ``L_1..L_k`` and representation ``Z [B, ...]`` (rows flattened to
    ``D`` features):

    1. ``J_i = dL_i/dZ`` for all tasks in one batched autograd call with ``create_graph=True`` (so ``J``
       depends differentiably on the parameters); each of the ``k * B`` rows ``J_i[b]`` is normalised to unit
       length (:func:`unit_rows`) so only its direction carries information; label: ``i``.
    2. The discriminator ``D_phi`` (``Linear(D, hidden) - ReLU - Linear(hidden, k)``, built on the first call
       with ``seed``) gives ``L_disc = cross_entropy(D_phi(GRL_lam(R)), labels)`` (mean over rows), where
       ``GRL_lam`` is the identity forward and multiplies the gradient by ``-lam`` backward.
    3. One ``autograd.grad(sum_i L_i + L_disc, shared + phi)``: the shared parameters get
       ``grad sum_i L_i - lam * grad L_disc`` (the reversal: the body *ascends* the discriminator's loss);
       ``phi`` gets ``grad L_disc`` (the discriminator descends it), applied by its own Adam (``lr``) at once.
    4. ``others`` get the plain gradient of ``sum_i L_i`` (the adversarial term would also reach the task
       heads through ``J``; it is applied to the shared parameters only).

    Stats: ``disc_loss`` and ``disc_acc`` (before this step's update), and the pair stats of ``J``.
    ``state_dict`` holds the discriminator and its optimiser.

    Args:
        lam: weight of the reversed adversarial term (default 0.01).
        lr: Adam learning rate of the discriminator (default 1e-3).
        hidden: hidden width of the discriminator (default 64).
        seed: seed of the discriminator's initialisation.
    """

    name = "great"
    requires_representation = True

    def __init__(self, *, lam: float = 0.01, lr: float = 1e-3, hidden: int = 64, seed: int = 0) -> None:
        if lam < 0 or lr <= 0 or hidden < 1:
            raise ValueError(f"GREAT needs lam >= 0, lr > 0, hidden >= 1; got lam={lam}, lr={lr}, hidden={hidden}")
        super().__init__(seed=seed)
        self.lam, self.lr, self.hidden = lam, lr, hidden
        self.discriminator: nn.Sequential | None = None
        self._optimizer: torch.optim.Adam | None = None
        self._shape: tuple[int, int] | None = None  # (in_features, num_tasks)
        self._pending: dict[str, Any] | None = None

    def _build(self, in_features: int, k: int, device: torch.device, dtype: torch.dtype) -> nn.Sequential:
        if self.discriminator is not None:
            if self._shape != (in_features, k):
                raise ValueError(
                    f"GREAT's discriminator was built for (features, tasks) = {self._shape}, got {(in_features, k)}"
                )
            return self.discriminator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            disc = nn.Sequential(nn.Linear(in_features, self.hidden), nn.ReLU(), nn.Linear(self.hidden, k))
        disc = disc.to(device=device, dtype=dtype)
        opt = torch.optim.Adam(disc.parameters(), lr=self.lr)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if tuple(pending["shape"]) != (in_features, k):
                raise ValueError(
                    f"GREAT state is for (features, tasks) = {tuple(pending['shape'])}, got {(in_features, k)}"
                )
            disc.load_state_dict(pending["discriminator"])
            opt.load_state_dict(pending["optimizer"])
        self.discriminator, self._optimizer, self._shape = disc, opt, (in_features, k)
        return disc

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter],
        *,
        others: Iterable[nn.Parameter] = (),
        representation: Tensor | TaskSplit | None = None,
    ) -> dict[str, float]:
        src = StepGradients(self, losses, shared, others, representation, requires_representation=True)
        names, L, shared_l, others_l, split = src.names, src.L, src.shared, src.others, src.split
        k = len(names)
        if k == 1:  # nothing to tell apart
            _set_grad_list(shared_l, src.combined(None))
            return {}
        if split is not None:
            J_cuts = src.cut_rows(create_graph=True)
            rows, batched = split.rows(J_cuts), True
            J = rows.reshape(k, -1)
        else:
            Z = src.representation
            assert isinstance(Z, Tensor)
            J, batched = src.representation_jacobian(create_graph=True)
            rows = J.reshape(k, Z.shape[0], -1)
        B = rows.shape[1]
        R = unit_rows(rows)
        disc = self._build(R.shape[-1], k, R.device, R.dtype)
        labels = torch.arange(k, device=R.device).repeat_interleave(B)
        logits = disc(_ReverseGrad.apply(R, self.lam).reshape(k * B, -1))
        disc_loss = F.cross_entropy(logits, labels)
        phi = list(disc.parameters())
        if split is not None:
            # The reversed adversarial gradient reaches the body through the leaves J was computed at:
            # each cut's cotangent is sum_i (dL_i/dz + d(-lam L_disc)/d leaf_i).
            leaves = split.leaf_inputs(names)
            adv = torch.autograd.grad(disc_loss, [*leaves, *phi], allow_unused=True)
            cot = []
            for j, adv_sum in zip(J_cuts, split.summed_per_cut(adv[: len(leaves)], names)):
                total = j.detach().sum(0)
                cot.append(total if adv_sum is None else total + adv_sum)
            _set_grad_list(shared_l, split.body_grads(cot, shared_l))
            phi_grads = adv[len(leaves) :]
        else:
            grads = torch.autograd.grad(
                L.sum() + disc_loss, [*shared_l, *phi], retain_graph=bool(others_l), allow_unused=True
            )
            _set_grad_list(shared_l, grads[: len(shared_l)])
            _backward_others(L.sum(), others_l)
            phi_grads = grads[len(shared_l) :]
        assert self._optimizer is not None
        for p, g in zip(phi, phi_grads):
            p.grad = None if g is None else as_param_grad(p, g)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        acc = float((logits.detach().argmax(-1) == labels).float().mean())
        out = {
            "batched": float(batched),
            **_pair_stats(gram(J)),
            "disc_loss": float(disc_loss.detach()),
            "disc_acc": acc,
        }
        out["norm"] = _grad_norm(shared_l)
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.discriminator is None:
            return {} if self._pending is None else copy.deepcopy(self._pending)
        assert self._optimizer is not None and self._shape is not None
        return {
            "shape": list(self._shape),
            "discriminator": copy.deepcopy(self.discriminator.state_dict()),
            "optimizer": copy.deepcopy(self._optimizer.state_dict()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self._pending = dict(state)
        if self.discriminator is not None:  # rebuild on the next call, on the device of that call
            self.discriminator, self._optimizer, self._shape = None, None, None


GRADIENT_METHODS: dict[str, type[GradientMethod]] = {
    "none": Plain,
    "pcgrad": PCGrad,
    "gradvac": GradVac,
    "cagrad": CAGrad,
    "mgda": MGDA,
    "mgda_ub": MGDAUB,
    "imtl_g": IMTLG,
    "aligned_mtl": AlignedMTL,
    "nash_mtl": NashMTL,
    "upgrad": UPGrad,
    "dualproj": DualProj,
    "con_fig": ConFIG,
    "great": GREAT,
}


def build_gradient_method(name: str, **kwargs: Any) -> GradientMethod:
    """An instance of ``GRADIENT_METHODS[name]`` built with ``kwargs`` (e.g. ``seed=0``)."""
    if name not in GRADIENT_METHODS:
        raise ValueError(f"unknown gradient method {name!r}; known: {sorted(GRADIENT_METHODS)}")
    return GRADIENT_METHODS[name](**kwargs)
