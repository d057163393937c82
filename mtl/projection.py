"""Gradient aggregations by projection, as pure functions of the Gram matrix ``M = G G^T`` (``G [k, P]``: one
task gradient per row): UPGrad and DualProj (projections onto the dual cone of the rows) and ConFIG (the
direction of equal cosine with every task).

Each ``<method>_weights(M, ...)`` returns ``(w, info)`` with ``w [k]`` float64 such that the aggregated gradient
is ``g = w^T G``, and ``info["weights"] = w`` plus scalar diagnostics (0-dim float64 tensors). They copy ``M``
once into Python floats and work there: for k up to a few dozen that is cheaper than torch ops on tiny tensors.

**Scale robustness.** Task gradients whose norms differ by orders of magnitude are the normal case, so every
method first *equilibrates* the Gram: with ``D = diag(||g_i||)`` it works on the cosine matrix
``C = D^-1 M D^-1`` (unit diagonal, off-diagonals clamped to ``[-1, 1]``, symmetrised), and all stopping rules
and rank decisions are relative to that matrix and to the size of the iterate, never absolute. So ``w`` is
invariant to ``G -> s G`` for any ``s != 0`` (up to rounding; ``g -> s g``), and the accuracy of a solve does not
depend on how the row norms compare (the dual cone does not depend on them at all).

**Zero rows** (``M_ii`` zero or below the smallest normal float64, ``2.2e-308``: no float64 Gram entry of
such a row is meaningful) are taken out before the solve: they add nothing to ``g`` and constrain nothing
(``x . 0 >= 0`` for every ``x``). What weight they get is stated per method; it never changes ``g``.

A non-finite ``M`` raises ``ValueError``: these functions never return a silent wrong answer. An iterative solve
that does not reach its tolerance returns its best iterate, reports ``converged = 0`` and its ``residual`` in
``info``, and emits a :class:`mtl.solvers.SolverWarning` (a ``RuntimeWarning``) with the residual.

Only ``torch``, ``math``, ``typing``, ``warnings`` and :mod:`mtl.solvers` (for its warning class) are imported
(``mtl.gradients`` builds its method classes on these functions).
"""

from __future__ import annotations

import math
import warnings
from typing import Final

import torch
from torch import Tensor

from mtl.solvers import SolverWarning

Info = dict[str, Tensor]
Vec = list[float]
Mat = list[list[float]]

_F64: Final = torch.float64
_TINY: Final = torch.finfo(torch.float64).tiny  # smallest normal float64: diagonals at or below it are zero rows
_EPS: Final = torch.finfo(torch.float64).eps
# Pivot floor of the Cholesky factorisations of the active-set solver (C has a unit diagonal, so it is relative):
# a pivot below it means the new free row is (numerically) in the span of the other free rows; the factor then
# uses the floor, which is a ridge of 1e-13 on that Schur complement only. See _box_qp.
_PIVOT_FLOOR: Final = 1e-13
# The fast path of _box_qp keeps an explicit inverse of C[F][F] while every Schur complement is above this (its
# rounding error is then below ~eps / 1e-4 = 2e-12 relative); past it, Cholesky factorisations take over.
_FAST_PIVOT: Final = 1e-4

__all__ = ["config_weights", "dualproj_weights", "project_dual_cone", "upgrad_weights"]


# --------------------------------------------------------------------------------------------------------------
# Small dense helpers on Python floats
# --------------------------------------------------------------------------------------------------------------

_mul = float.__mul__


def _dot(x: Vec, y: Vec) -> float:
    return sum(map(_mul, x, y))


def _check_gram(M: Tensor, name: str) -> Mat:
    """``M`` as nested Python floats, after checking it is a finite square matrix."""
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"{name} needs a non-empty square Gram matrix [k, k], got shape {list(M.shape)}")
    Ml: Mat = (M if M.dtype == _F64 and M.device.type == "cpu" else M.detach().to("cpu", _F64)).tolist()
    for row in Ml:
        if not all(map(math.isfinite, row)):
            raise ValueError(f"{name} needs a finite Gram matrix, got non-finite entries: {Ml}")
    return Ml


def _check_vector(x: Tensor | None, k: int, default: float, what: str, name: str) -> Vec:
    if x is None:
        return [default] * k
    if x.shape != (k,):
        raise ValueError(f"{name}: {what} must have shape [{k}] for {k} tasks, got {list(x.shape)}")
    xl: Vec = (x if x.dtype == _F64 and x.device.type == "cpu" else x.detach().to("cpu", _F64)).tolist()
    if not all(map(math.isfinite, xl)):
        raise ValueError(f"{name}: {what} must be finite, got {xl}")
    return xl


def _equilibrate(Ml: Mat) -> tuple[list[int], Vec, Mat]:
    """``(nz, d, C)``: the indices of the non-zero rows, their norms ``d_a = sqrt(M_ii)`` and the cosine matrix
    ``C_ab = (M_ij + M_ji) / (2 d_a d_b)`` among them (``i = nz[a]``, ``j = nz[b]``), clamped to ``[-1, 1]``, with
    an exact unit diagonal. ``d_a d_b`` neither underflows nor overflows: each ``d`` is in ``[1.5e-154, 1.4e154]``."""
    nz = [i for i, row in enumerate(Ml) if row[i] > _TINY]
    d = [math.sqrt(Ml[i][i]) for i in nz]
    n = len(nz)
    C: Mat = [[1.0] * n for _ in range(n)]
    for a in range(n):
        i, da, Ca = nz[a], d[a], C[a]
        row_i = Ml[i]
        for b in range(a + 1, n):
            j = nz[b]
            c = 0.5 * (row_i[j] + Ml[j][i]) / (da * d[b])
            c = 1.0 if c > 1.0 else (-1.0 if c < -1.0 else c)
            Ca[b] = c
            C[b][a] = c
    return nz, d, C


# --------------------------------------------------------------------------------------------------------------
# The box-constrained QP on the (equilibrated) Gram: an exact active-set method
# --------------------------------------------------------------------------------------------------------------


def _chol_append(L: Mat, C: Mat, free: list[int], j: int) -> None:
    """Extend the Cholesky factor ``L`` of ``C[free][free]`` by index ``j`` (appended last); a pivot below
    ``_PIVOT_FLOOR`` (row ``j`` numerically in the span of the free rows) is raised to it."""
    Cj = C[j]
    row: Vec = []
    for p, Lp in enumerate(L):
        row.append((Cj[free[p]] - _dot(row, Lp)) / Lp[p])
    piv = Cj[j] - _dot(row, row)
    row.append(math.sqrt(piv if piv > _PIVOT_FLOOR else _PIVOT_FLOOR))
    L.append(row)


def _chol_solve(L: Mat, r: Vec) -> Vec:
    """``(L L^T)^-1 r`` by forward substitution and column-oriented back substitution."""
    n = len(r)
    t: Vec = []
    for p in range(n):
        Lp = L[p]
        t.append((r[p] - _dot(t, Lp)) / Lp[p])
    z = [0.0] * n
    for q in range(n - 1, -1, -1):
        Lq = L[q]
        zq = z[q] = t[q] / Lq[q]
        if q:
            t = [tp - zq * lp for tp, lp in zip(t, Lq[:q])]
    return z


def _inv_append(H: Mat, C: Mat, free: list[int], j: int) -> tuple[Vec, float] | None:
    """Border ``H = C[free][free]^-1`` with index ``j`` in place; returns ``(h, 1/s)`` with ``h = H c``,
    ``c = C[free][j]`` and ``s = 1 - c^T h`` (the Schur complement). ``None``, with ``H`` unchanged, if
    ``s < _FAST_PIVOT``: the explicit inverse would lose more than ``eps / _FAST_PIVOT`` to rounding."""
    Cj = C[j]
    c = [Cj[f] for f in free]
    h = [_dot(Hr, c) for Hr in H]
    s = 1.0 - _dot(c, h)
    if not s >= _FAST_PIVOT:
        return None
    inv = 1.0 / s
    g = [hp * inv for hp in h]
    for Hr, gp in zip(H, g):
        Hr[:] = [x + gp * hq for x, hq in zip(Hr, h)]
        Hr.append(-gp)
    H.append([-gp for gp in g] + [inv])
    return h, inv


def _inv_remove(H: Mat, p: int) -> None:
    """Remove position ``p`` from ``H = A^-1`` in place (the inverse of ``A`` without row and column ``p``)."""
    Hp = H.pop(p)
    inv = 1.0 / Hp[p]
    del Hp[p]
    for Hr in H:
        f = Hr.pop(p) * inv
        if f != 0.0:
            Hr[:] = [x - f * hq for x, hq in zip(Hr, Hp)]


def _sym_matvec(C: Mat, y: Vec) -> Vec:
    """``C y`` for a symmetric ``C``, as a sum of the rows (= columns) ``C[l]`` with ``y_l != 0``."""
    mu = [0.0] * len(y)
    for l, yl in enumerate(y):
        if yl != 0.0:
            mu = [m + yl * c for m, c in zip(mu, C[l])]
    return mu


def _residual_from(mu: Vec, y: Vec, is_free: list[bool]) -> float:
    """Relative KKT residual of a feasible ``y`` for ``min y^T C y s.t. y >= b``, from ``mu = C y``:
    ``max(max_free |mu_f|, max_active (-mu_a)_+) / ||y||_1`` (0 for ``y = 0``). ``||y||_1`` bounds the rounding
    error of ``mu`` (``|C_ij| <= 1``), so this is the scale-free measure of optimality."""
    s = sum(map(abs, y))
    if s == 0.0:
        return 0.0
    worst = max(abs(m) if f else -m for m, f in zip(mu, is_free))
    return max(worst, 0.0) / s


def _rhs(C: Mat, b_nz: list[tuple[int, float]], is_free: list[bool], free: list[int]) -> Vec:
    """``-C[free][active] b[active]`` (the right-hand side of the equality problem on the free set)."""
    rhs = [0.0] * len(free)
    for l, bl in b_nz:
        if not is_free[l]:
            Cl = C[l]
            rhs = [r - bl * Cl[f] for r, f in zip(rhs, free)]
    return rhs


def _step_to(y: Vec, b: Vec, free: list[int], z: Vec) -> tuple[float, int]:
    """The Lawson-Hanson step from the feasible ``y`` towards ``z`` (values on ``free``): ``(alpha, position)``
    of the first bound hit, or ``(1.0, -1)`` if ``z`` is strictly inside the box."""
    alpha, blocking = 1.0, -1
    for p, f in enumerate(free):
        zp, bf = z[p], b[f]
        if zp <= bf:
            gap = y[f] - bf
            step = gap / (gap - (zp - bf)) if gap > 0.0 else 0.0
            if step < alpha or blocking < 0:
                alpha, blocking = step, p
    return alpha, blocking


def _box_qp(C: Mat, b: Vec, tol: float, max_iter: int) -> tuple[Vec, int, float]:
    """``argmin_y y^T C y`` subject to ``y >= b`` (elementwise) for a PSD ``C`` with unit diagonal.

    A primal active-set method in the manner of Lawson & Hanson's NNLS ("Solving Least Squares Problems", 1974,
    ch. 23), on the Gram instead of the factor. KKT conditions (``y`` is optimal iff): ``y >= b``, ``mu = C y >= 0``
    and ``mu_i (y_i - b_i) = 0``. Start from ``y = b`` with every index active (at its bound). Each outer step frees
    the active index with the most negative ``mu_j`` if ``mu_j < -tol ||y||_1`` (else ``y`` is optimal: the
    stopping rule is relative to the iterate, whose ``||y||_1`` bounds the rounding error of ``mu``); the
    equality problem on the free set ``F`` (``(C y)_F = 0``, ``y_A = b_A``) then gives the next point and, if that
    leaves the box, the method moves to the boundary and re-activates the index that reached its bound, until
    the solution of the free set is strictly inside. Each step lowers the objective, so it ends after finitely
    many steps (usually about as many as the solution has free indices). In exact arithmetic the free rows stay
    linearly independent (an index whose row is in the span of the free rows has ``mu_j = 0``).

    Warm start: if several indices violate ``mu_j >= 0`` at ``y = b``, all of them are freed at once (one
    Cholesky solve); if that solution is strictly inside the box it is the starting point (for nearly orthogonal
    gradients, as in high dimension, it is usually optimal already: 90% of UPGrad's QPs for 8 Gaussian gradients
    in R^1000), and :func:`_box_qp_chol` continues from it when it is not; otherwise the start is ``y = b``.

    Fast path: ``C[F][F]^-1`` kept explicitly, bordered when an index is freed (``O(|F|^2)``) and downdated
    when one is re-activated. The result is then checked afresh (``mu = C y`` recomputed, :func:`_residual_from`);
    if that misses ``tol`` (ill-conditioned free rows: an explicit inverse is not backward stable), or a freed
    index cannot move (rounding), :func:`_box_qp_chol` continues from the current point with Cholesky
    factorisations (backward stable). Pivots below ``_PIVOT_FLOOR`` are raised to it, a ridge of ``1e-13`` on
    that pivot only. Returns ``(y, outer steps, relative KKT residual)``; after ``max_iter`` steps the current
    iterate (feasible, the best so far).
    """
    n = len(b)
    y = list(b)
    is_free = [False] * n
    free: list[int] = []
    H: Mat = []
    b_nz = [(l, bl) for l, bl in enumerate(b) if bl != 0.0]
    inf = math.inf
    iters = 0
    mu = _sym_matvec(C, y)
    thr = -tol * sum(map(abs, y))
    guess = [i for i, m in enumerate(mu) if m < thr]
    if len(guess) > 1 and max_iter > 1:
        # Warm start: free every violated index at once. For nearly orthogonal gradients (high dimension) this is
        # usually the optimal free set, found with one Cholesky solve; if its solution is inside the box the
        # Cholesky variant continues from there, else the method starts from scratch.
        for f in guess:
            is_free[f] = True
        L: Mat = []
        for f in guess:
            _chol_append(L, C, guess, f)
        z = _chol_solve(L, _rhs(C, b_nz, is_free, guess))
        if all(zp > b[f] for zp, f in zip(z, guess)):
            for f, zp in zip(guess, z):
                y[f] = zp
            mu = _sym_matvec(C, y)
            if min(inf if f else m for m, f in zip(mu, is_free)) >= -tol * sum(map(abs, y)):
                res = _residual_from(mu, y, is_free)
                if res <= tol:
                    return y, 1, res
            return _box_qp_chol(C, b, tol, max_iter, y, guess, 1)
        for f in guess:
            is_free[f] = False
    while True:
        act = [inf if f else m for m, f in zip(mu, is_free)]
        best = min(act)
        if not best < -tol * sum(map(abs, y)) or iters >= max_iter:
            break
        j = act.index(best)
        bordered = _inv_append(H, C, free, j)
        if bordered is None:  # ill-conditioned free rows: continue with Cholesky factorisations
            return _box_qp_chol(C, b, tol, max_iter, y, free, iters)
        iters += 1
        h, inv = bordered
        # the new equality solution in closed form: y_F - t h, y_j = b_j + t with t = -mu_j / s
        t = -best * inv
        z = [y[f] - t * hp for f, hp in zip(free, h)]
        z.append(b[j] + t)
        free.append(j)
        is_free[j] = True
        fresh = True
        while True:
            alpha, blocking = _step_to(y, b, free, z)
            if blocking < 0:
                for f, zp in zip(free, z):
                    y[f] = zp
                break
            if fresh and free[blocking] == j:  # the freed index cannot move off its bound (rounding)
                _inv_remove(H, len(free) - 1)
                free.pop()
                is_free[j] = False
                return _box_qp_chol(C, b, tol, max_iter, y, free, iters)
            fresh = False
            for f, zp in zip(free, z):
                y[f] += alpha * (zp - y[f])
            hit = free[blocking]
            for p in range(len(free) - 1, -1, -1):
                f = free[p]
                if f == hit or y[f] <= b[f]:
                    y[f] = b[f]
                    is_free[f] = False
                    del free[p]
                    _inv_remove(H, p)
            if not free:
                break
            rhs = _rhs(C, b_nz, is_free, free)
            z = [_dot(Hr, rhs) for Hr in H]
        mu = _sym_matvec(C, y)
    res = _residual_from(mu, y, is_free)
    if not res <= tol:
        return _box_qp_chol(C, b, tol, max_iter, y, free, iters)
    return y, iters, res


def _box_qp_chol(
    C: Mat, b: Vec, tol: float, max_iter: int, y: Vec, free: list[int], iters: int
) -> tuple[Vec, int, float]:
    """:func:`_box_qp` with Cholesky factorisations, continued from the feasible ``y`` with free set ``free``
    after ``iters`` outer steps: first the equality problem on ``free`` (reached by Lawson-Hanson steps from
    ``y``), then outer steps up to ``max_iter`` in all."""
    n = len(b)
    y = list(y)
    free = list(free)
    is_free = [False] * n
    for f in free:
        is_free[f] = True
    b_nz = [(l, bl) for l, bl in enumerate(b) if bl != 0.0]
    inf = math.inf
    j = -1  # the index freed last (-1: none yet)
    while True:
        L: Mat = []
        for f in free:
            _chol_append(L, C, free, f)
        fresh = True
        while free:
            z = _chol_solve(L, _rhs(C, b_nz, is_free, free))
            alpha, blocking = _step_to(y, b, free, z)
            if blocking < 0:
                for f, zp in zip(free, z):
                    y[f] = zp
                break
            if fresh and free[blocking] == j:  # the freed index cannot move off its bound (rounding): stop
                free.pop()
                is_free[j] = False
                return y, iters, _residual_from(_sym_matvec(C, y), y, is_free)
            fresh = False
            for f, zp in zip(free, z):
                y[f] += alpha * (zp - y[f])
            hit = free[blocking]
            for f in free:
                if f == hit or y[f] <= b[f]:
                    y[f] = b[f]
                    is_free[f] = False
            free = [f for f in free if is_free[f]]
            L = []
            for f in free:
                _chol_append(L, C, free, f)
        mu = _sym_matvec(C, y)
        act = [inf if f else m for m, f in zip(mu, is_free)]
        best = min(act)
        if not best < -tol * sum(map(abs, y)) or iters >= max_iter:
            return y, iters, _residual_from(mu, y, is_free)
        j = act.index(best)
        iters += 1
        free.append(j)
        is_free[j] = True


def _warn_unconverged(name: str, residual: float, tol: float, max_iter: int) -> None:
    warnings.warn(
        f"{name}: the dual-cone QP did not reach tol={tol:.1e} (relative KKT residual {residual:.2e}, "
        f"max_iter={max_iter}); returning the best iterate",
        SolverWarning,
        stacklevel=3,
    )


def _scalar(x: float) -> Tensor:
    return torch.scalar_tensor(float(x), dtype=_F64)  # a third of torch.tensor(x)'s overhead


def _check_solver_args(max_iter: int, tol: float, name: str) -> None:
    if max_iter < 1:
        raise ValueError(f"{name}: max_iter must be >= 1, got {max_iter}")
    if not tol > 0.0:
        raise ValueError(f"{name}: tol must be > 0, got {tol}")


# --------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------


def project_dual_cone(M: Tensor, u: Tensor, *, max_iter: int = 100, tol: float = 1e-12) -> tuple[Tensor, Info]:
    """Weights ``v`` of the projection of ``u^T G`` onto the dual cone ``{x : G x >= 0}`` of the rows of ``G``.

    By Proposition 1 of Quinton & Rey ("Jacobian Descent for Multi-Objective Optimization", 2024) the projection
    is ``v^T G`` with ``v = argmin_{v >= u} v^T M v`` (elementwise ``v >= u``; ``M = G G^T``), and ``v`` is optimal
    iff (KKT) ``v >= u``, ``mu = M v >= 0`` (i.e. ``g_i . (v^T G) >= 0``: the result lies in the dual cone) and
    ``mu_i (v_i - u_i) = 0``. Solved exactly by an active-set method (:func:`_box_qp`) in equilibrated coordinates
    ``y = D v`` (``D = diag(||g_i||)``), where the Gram becomes the cosine matrix ``C`` and the box stays a box
    ``y >= D u``. Stops when every ``(C y)_a`` of an index at its bound is ``>= -tol ||y||_1``.

    Degenerate cases (mtlib's rules): a zero row keeps ``v_i = u_i`` (the objective does not depend on it; this
    is the least change; TorchJD's ridge gives ``max(u_i, 0)``, the same for ``u_i >= 0``). Duplicate and
    linearly dependent rows make ``v`` non-unique; ``v^T G`` is unique and is what the tolerance controls (the
    active-set method frees only rows independent of the free ones, pivot floor ``1e-13`` where rounding says
    otherwise). Positively homogeneous: ``v(c u) = c v(u)`` for ``c >= 0``.

    Returns ``(v [k] float64, info)`` with ``info`` keys ``weights`` (= ``v``), ``iters`` (active-set steps),
    ``residual`` (relative KKT residual in equilibrated coordinates, see :func:`_residual_from`) and ``converged``
    (1.0 if ``residual <= tol``, else 0.0 and a ``SolverWarning``).
    """
    Ml = _check_gram(M, "project_dual_cone")
    k = len(Ml)
    _check_solver_args(max_iter, tol, "project_dual_cone")
    ul = _check_vector(u, k, 0.0, "u", "project_dual_cone")
    v, iters, res = _project_list(Ml, ul, max_iter, tol)
    if not res <= tol:
        _warn_unconverged("project_dual_cone", res, tol, max_iter)
    w = torch.as_tensor(v, dtype=_F64)
    return w, {"weights": w, "iters": _scalar(iters), "residual": _scalar(res), "converged": _scalar(res <= tol)}


def _project_list(Ml: Mat, u: Vec, max_iter: int, tol: float) -> tuple[Vec, int, float]:
    nz, d, C = _equilibrate(Ml)
    v = list(u)
    if not nz:
        return v, 0, 0.0
    b = [da * u[i] for i, da in zip(nz, d)]
    y, iters, res = _box_qp(C, b, tol, max_iter)
    for i, da, ya, ba in zip(nz, d, y, b):
        if ya != ba:  # at its bound, v_i = u_i exactly
            v[i] = ya / da
    return v, iters, res


def dualproj_weights(
    M: Tensor, pref: Tensor | None = None, *, max_iter: int = 100, tol: float = 1e-12
) -> tuple[Tensor, Info]:
    """DualProj: the preference-weighted *mean* gradient projected onto the dual cone of the task gradients.

    ``w = argmin_{w >= pref} w^T M w`` (:func:`project_dual_cone` with ``u = pref``), so ``g = w^T G`` is the
    projection of ``pref^T G`` onto ``{x : g_i . x >= 0 for all i}``: it conflicts with no task. One of the
    aggregators of Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization" (2024); the projection is
    Eq. 11 of Lopez-Paz & Ranzato (GEM, NeurIPS 2017), applied to the mean gradient.

    Scale: ``pref`` defaults to ``1/k`` (TorchJD's ``DualProj()`` default, ``MeanWeighting``), so with no conflict
    ``g`` is the *mean* of the task gradients (not their sum). Any finite ``pref`` is accepted, as in TorchJD.

    Versus TorchJD 0.18 (``DualProj``/``DualProjWeighting`` with its default ``QuadprogProjector``): same problem,
    but TorchJD divides ``M`` by its trace, adds ``1e-4 I`` and calls quadprog. That ridge is an error of about
    ``1e-4`` of the trace: ~1e-3 of the result for similar norms and well-posed cones (more where the answer
    needs large weights), but it swamps the constraints of rows whose squared norm is below ~1e-4 of the trace
    (TorchJD's result can then conflict with small gradients), and for ``trace(M) < 1e-4`` TorchJD returns
    ``pref`` itself (an absolute threshold). Here the solve is exact and scale-free. Zero rows: ``w_i = pref_i``
    (TorchJD's ridge gives ``max(pref_i, 0)``).

    ``info``: ``weights``, ``iters``, ``residual``, ``converged`` as in :func:`project_dual_cone`.
    """
    Ml = _check_gram(M, "dualproj_weights")
    k = len(Ml)
    _check_solver_args(max_iter, tol, "dualproj_weights")
    pl = _check_vector(pref, k, 1.0 / k, "pref", "dualproj_weights")
    v, iters, res = _project_list(Ml, pl, max_iter, tol)
    if not res <= tol:
        _warn_unconverged("dualproj_weights", res, tol, max_iter)
    w = torch.as_tensor(v, dtype=_F64)
    return w, {"weights": w, "iters": _scalar(iters), "residual": _scalar(res), "converged": _scalar(res <= tol)}


def upgrad_weights(
    M: Tensor, pref: Tensor | None = None, *, max_iter: int = 100, tol: float = 1e-12
) -> tuple[Tensor, Info]:
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024): project every
    task gradient onto the dual cone of all of them and combine the projections with the preference weights.

    ``w = sum_i v^(i)`` with ``v^(i) = argmin_{v >= pref_i e_i} v^T M v`` (:func:`project_dual_cone` of
    ``pref_i g_i``), so ``g = w^T G = sum_i pi(pref_i g_i)``, which equals ``sum_i pref_i pi(g_i)`` for
    ``pref >= 0`` (the projection is positively homogeneous). Each projection lies in the dual cone, hence so does
    ``g``: ``g . g_i >= 0`` for every task. Exactly as TorchJD's ``UPGradWeighting`` (which projects the rows of
    ``diag(pref)``).

    Scale: ``pref`` defaults to ``1/k`` (TorchJD's default), so with no conflict ``g`` is the *mean* gradient and
    ``w = pref`` exactly. Any finite ``pref`` is accepted, as in TorchJD.

    Versus TorchJD 0.18: same definition; TorchJD's default projector solves each QP by quadprog on
    ``M / trace(M) + 1e-4 I`` (see :func:`dualproj_weights` for what that ridge does to small gradients). Here
    each of the ``k`` QPs is solved exactly by the active-set method in equilibrated coordinates (for
    ``u = pref_i e_i``: ``y >= sign(pref_i) e_i``, rescaled by ``|pref_i| ||g_i||``), which also makes every
    projection independent of the norms of the *other* rows.

    Degenerate cases (mtlib's rules): a zero row ``i`` gets ``w_i = pref_i`` (its own projection is
    ``pref_i e_i``, a zero vector, and it is no constraint for the others; with no conflicts ``w = pref`` still
    holds exactly). Duplicate, opposite or linearly dependent rows (``k > rank G``) make the ``v^(i)``
    non-unique; ``g`` is unique and is what the tolerance controls. Opposite rows ``g_2 = -g_1`` pin the cone to
    the hyperplane ``g_1 . x = 0``: their projections are zero.

    ``info``: ``weights``; ``iters`` (active-set steps over the ``k`` QPs), ``residual`` (the largest relative KKT
    residual), ``converged`` (1.0 if all reached ``tol``; else 0.0 and a ``SolverWarning``).
    """
    Ml = _check_gram(M, "upgrad_weights")
    k = len(Ml)
    _check_solver_args(max_iter, tol, "upgrad_weights")
    pl = _check_vector(pref, k, 1.0 / k, "pref", "upgrad_weights")
    nz, d, C = _equilibrate(Ml)
    n = len(nz)
    is_nz = [False] * k
    for i in nz:
        is_nz[i] = True
    wl = [pl[i] if not is_nz[i] else 0.0 for i in range(k)]
    inv_d = [1.0 / da for da in d]
    total_iters, worst = 0, 0.0
    for a, i in enumerate(nz):
        p = pl[i]
        if p == 0.0:
            continue
        if p > 0.0 and min(C[a]) >= -tol:  # g_i conflicts with no task: its projection is itself
            wl[i] += p
            continue
        b = [0.0] * n
        b[a] = 1.0 if p > 0.0 else -1.0
        y, iters, res = _box_qp(C, b, tol, max_iter)
        total_iters += iters
        worst = res if not res <= worst else worst  # NaN-safe max
        s = abs(p) * d[a]
        for c, j in enumerate(nz):
            yc = y[c]
            if yc == b[c]:  # at its bound: contributes pref_i e_i exactly (0 off the diagonal)
                if c == a:
                    wl[j] += p
            else:
                wl[j] += s * yc * inv_d[c]
    if not worst <= tol:
        _warn_unconverged("upgrad_weights", worst, tol, max_iter)
    w = torch.as_tensor(wl, dtype=_F64)
    info = {"weights": w, "iters": _scalar(total_iters), "residual": _scalar(worst), "converged": _scalar(worst <= tol)}
    return w, info


# --------------------------------------------------------------------------------------------------------------
# ConFIG
# --------------------------------------------------------------------------------------------------------------


def _pivoted_cholesky(C: Mat, tau: float) -> tuple[list[int], Mat]:
    """Diagonally pivoted Cholesky ``C ~ B B^T`` of a PSD matrix with unit diagonal, stopped when the largest
    remaining Schur-complement diagonal is ``<= tau``. Returns ``(pivots, cols)``: ``B[:, q] = cols[q]`` (length
    ``n``, zero at the earlier pivots: ``B`` is lower triangular in pivot order). The remaining diagonal entry of
    index ``i`` is the squared distance of the unit row ``u_i`` from the span of the pivot rows, so the rule is
    geometric: rows within ``sqrt(tau)`` of that span count as dependent. ``||C - B B^T||_2 <= n tau``."""
    n = len(C)
    diag = [1.0] * n
    used = [False] * n
    piv: list[int] = []
    cols: Mat = []
    for _ in range(n):
        j, dj = -1, tau
        for i in range(n):
            if not used[i] and diag[i] > dj:
                j, dj = i, diag[i]
        if j < 0:
            break
        col = list(C[j])
        for cq in cols:
            f = cq[j]
            if f != 0.0:
                col = [c - f * x for c, x in zip(col, cq)]
        inv = 1.0 / math.sqrt(dj)
        col = [0.0 if used[i] else c * inv for i, c in enumerate(col)]
        col[j] = math.sqrt(dj)
        used[j] = True
        for i in range(n):
            if not used[i]:
                diag[i] -= col[i] * col[i]
        piv.append(j)
        cols.append(col)
    return piv, cols


def _least_squares(cols: Mat, p: Vec) -> Vec:
    """``argmin_z ||B z - p||`` for ``B`` with the (linearly independent) columns ``cols``: modified Gram-Schmidt
    on the augmented matrix ``[B | p]`` (backward stable for least squares, Björck 1967), then ``R z = Q^T p``."""
    r = len(cols)
    Q: Mat = []
    R: Mat = [[0.0] * r for _ in range(r)]
    for q in range(r):
        v = list(cols[q])
        for s in range(q):
            R[s][q] = rsq = _dot(Q[s], v)
            v = [a - rsq * b for a, b in zip(v, Q[s])]
        R[q][q] = nrm = math.sqrt(_dot(v, v))
        Q.append([a / nrm for a in v])
    rhs = list(p)
    qp: Vec = []
    for q in range(r):
        c = _dot(Q[q], rhs)
        qp.append(c)
        rhs = [a - c * b for a, b in zip(rhs, Q[q])]
    z = [0.0] * r
    for q in range(r - 1, -1, -1):
        z[q] = (qp[q] - sum(R[q][s] * z[s] for s in range(q + 1, r))) / R[q][q]
    return z


def config_weights(M: Tensor, pref: Tensor | None = None, *, rank_tol: float = 1e-5) -> tuple[Tensor, Info]:
    """ConFIG (Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", 2024,
    Eq. 2): the direction with equal cosine to every task gradient, with the length of the sum of projections.

    With unit rows ``u_i = g_i / ||g_i||`` (matrix ``U``): ``x = pinv(U) pref`` (``pref`` defaults to ones: the
    least-norm ``x`` with ``U x = 1``, i.e. ``cos(x, g_i)`` equal for all ``i``), ``x_hat = x / ||x||`` and
    ``g = (sum_i g_i . x_hat) x_hat``. In Gram form, with ``D = diag(||g_i||)`` and the cosine matrix
    ``C = U U^T = D^-1 M D^-1``: ``x = w_u^T G`` with ``w_u = D^-1 C^+ pref``, and
    ``w = w_u (1^T M w_u) / (w_u^T M w_u)``. ``C^+ pref`` comes from a diagonally pivoted Cholesky ``C ~ B B^T``
    (rank ``r``): ``z = argmin ||B z - pref||`` (the exact solve when ``r = k``), ``x = U^T y`` with
    ``B^T y = z`` and ``||x|| = ||z||``.

    Scale: the *sum* of the projections, as the paper's Eq. 2 and TorchJD's ``ConFIG()`` (adapted from the
    official code; default weights ``SumWeighting``): two orthogonal gradients of equal norm give their sum.
    ``pref`` only changes the direction (``cos(x, g_i)`` proportional to ``pref_i``, TorchJD's ``pref_vector``);
    the length is always the unweighted sum of projections, as in TorchJD.

    Versus TorchJD 0.18 (``torch.linalg.pinv`` of ``U`` itself): the same vector when ``U`` has a clear rank.
    Working on the Gram squares the conditioning, so the rank decision is coarser: a unit row within
    ``rank_tol`` (Euclidean distance) of the span of the unit rows kept before it (greedily, the farthest row
    first) counts as dependent (TorchJD keeps singular values down to ``max(k, P) eps sigma_max``). ConFIG is
    discontinuous there: near-duplicate rows ``g_2 = g_1 + delta`` force ``x . delta = 0`` however small
    ``delta`` is, exact duplicates do not; here rows closer than ``rank_tol`` (in unit direction) give the
    exact-duplicate answer. The default ``1e-5`` keeps the Gram-level error of the resolved directions below
    ~``eps / rank_tol^2 = 2e-6``; for a Gram computed in float32 (``mtl.gradients.gram`` of float32 gradients),
    ``rank_tol ~ 1e-3`` is the matching choice.

    Degenerate cases (mtlib's rules, which agree with TorchJD's ``nan_to_num`` of zero unit rows): a zero row gets
    ``w_i = 0`` and does not enter ``U``. With ``k > rank`` (e.g. 10 rows in R^3) ``U x = pref`` may have no
    solution: ``x`` is the least-squares one, as with ``pinv``. When ``pref`` is orthogonal to the range of ``C``
    (e.g. ``g_2 = -g_1``) ``x = 0``, and ``w = 0`` (TorchJD normalises a zero vector to zero too).

    ``info``: ``weights``; ``rank`` (``r``, of the non-zero rows); ``residual``: ``||U x - pref|| / ||pref||`` over
    the non-zero rows (~1e-16 when every task gets its target cosine; positive when ``U x = pref`` has no
    solution, 1 when ``x = 0``).
    """
    Ml = _check_gram(M, "config_weights")
    k = len(Ml)
    if not 0.0 < rank_tol < 1.0:
        raise ValueError(f"config_weights: rank_tol must be in (0, 1), got {rank_tol}")
    pl = _check_vector(pref, k, 1.0, "pref", "config_weights")
    nz, d, C = _equilibrate(Ml)
    p = [pl[i] for i in nz]
    wl = [0.0] * k
    p_norm = math.sqrt(_dot(p, p))
    piv, cols = _pivoted_cholesky(C, rank_tol * rank_tol) if nz else ([], [])
    r = len(piv)
    res = 1.0 if p_norm > 0.0 else 0.0
    if r and p_norm > 0.0:
        n = len(nz)
        rows = [[cq[a] for cq in cols] for a in range(n)]  # B [n, r]
        Lp = [rows[j] for j in piv]  # B in pivot order: lower triangular r x r on top
        if r == n:  # B is square: B z = p exactly, by forward substitution
            z: Vec = []
            for q, Lq in enumerate(Lp):
                z.append((p[piv[q]] - _dot(Lq, z)) / Lq[q])
        else:
            z = _least_squares(cols, p)
        fit = [_dot(row, z) for row in rows]  # B z = C y = U x
        res = math.sqrt(sum((f - pa) ** 2 for f, pa in zip(fit, p))) / p_norm
        zz = _dot(z, z)  # ||x||^2 = w_u^T M w_u
        if math.sqrt(_dot(fit, fit)) > 64.0 * _EPS * n * p_norm and zz > 0.0:
            # B^T y = z with y on the pivots: back substitution with the top block (column-oriented)
            y = [0.0] * n
            t = list(z)
            for q in range(r - 1, -1, -1):
                Lq = Lp[q]
                yq = y[piv[q]] = t[q] / Lq[q]
                if q:
                    t = [tp - yq * lp for tp, lp in zip(t, Lq[:q])]
            length_x = _dot(d, fit)  # 1^T M w_u = sum_i ||g_i|| (U x)_i
            scale = length_x / zz
            for a, i in enumerate(nz):
                wl[i] = scale * y[a] / d[a]
    w = torch.as_tensor(wl, dtype=_F64)
    return w, {"weights": w, "rank": _scalar(r), "residual": _scalar(res)}
