"""Small solvers on a k x k Gram matrix ``M = G G^T`` of task gradients (k = number of tasks).

Pure functions of tensors, used by :mod:`mtl.gradients`. They are meant for k of at most a few dozen:
the iterative ones copy ``M`` once into Python floats (``M.tolist()``), iterate on those (a few
microseconds per iteration, far below the per-call overhead of torch ops on k-element tensors) and return
tensors on ``M``'s device and dtype. :mod:`mtl.gradients` hands them a float64 CPU copy, so the accelerator
is synchronised once per step.

Every solver is invariant to a positive rescaling of the gradients, and its linear algebra and stopping rules
are invariant to rescaling each gradient on its own: linear systems are solved on the Jacobi-equilibrated
matrix ``D^-1 M D^-1`` (``D = diag(||g_i||)``, the cosines of the gradients, unit diagonal) and optimality is
tested per task relative to that task's own norm. So tasks whose gradients differ by many orders of magnitude
(an MSE head next to a rare-event BCE head) are solved to the same relative accuracy as equal ones, and all-zero
gradients give finite answers. A solve that does not reach its tolerance warns (:class:`SolverWarning`, with the
residual) instead of returning a silently wrong answer.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor


class SolverWarning(RuntimeWarning):
    """A small solver stopped before its optimality conditions held to its tolerance (the message gives the
    residual). The returned answer is the best iterate, usable but not exact."""


def _warn(what: str, residual: float, tol: float, iters: int) -> None:
    warnings.warn(
        f"{what} did not converge: relative residual {residual:.3g} > tolerance {tol:.3g} after {iters} iterations",
        SolverWarning,
        stacklevel=3,
    )


def _scale(M: Tensor) -> float:
    """Mean of the diagonal: the squared norm of a typical task gradient (0 if all gradients are 0)."""
    return float(M.diagonal().mean().clamp_min(0.0))


# The k x k problems are solved on Python lists of floats: for k of a few dozen, a Python loop over the
# entries is cheaper than the per-call overhead of torch ops on tiny tensors, and it needs no other module.
# Each public solver converts ``M`` once (``M.tolist()``) and returns a tensor on ``M``'s device and dtype.

Vec = list[float]
Mat = list[list[float]]


_mul = float.__mul__  # map(_mul, x, y) is the fastest product of two float lists without extra imports


def _matvec(M: Mat, x: Vec) -> Vec:
    """``[sum_j row[j] * x[j] for row in M]``, each row summed left to right."""
    return [sum(map(_mul, r, x)) for r in M]


def _dot(x: Vec, y: Vec) -> float:
    return sum(map(_mul, x, y))


def _project_simplex_list(v: Vec) -> Vec:
    """:func:`project_simplex` on a list of floats."""
    u = sorted(v, reverse=True)
    rho, total, theta_total = -1, 0.0, 0.0
    for i, ui in enumerate(u):
        total += ui
        if ui - (total - 1.0) / (i + 1) > 0:
            rho, theta_total = i, total - 1.0
    if rho < 0:  # only for non-finite input
        raise ValueError(f"project_simplex needs a finite vector, got {list(v)}")
    theta = theta_total / (rho + 1)
    return [max(x - theta, 0.0) for x in v]


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v [k]`` onto the probability simplex (Duchi et al., ICML 2008)."""
    return torch.tensor(_project_simplex_list(v.tolist()), dtype=v.dtype, device=v.device)


def min_norm_2(m11: float, m12: float, m22: float) -> float:
    """Closed form of ``argmin_{a in [0, 1]} ||a g1 + (1 - a) g2||^2`` from the Gram entries.

    ``a = clip((m22 - m12) / (m11 + m22 - 2 m12), 0, 1)``; 0.5 when ``g1 == g2`` (every ``a`` is optimal).
    Sener & Koltun's ``_min_norm_element_from2`` clips to [0.001, 0.999] instead; we return the exact optimum.
    """
    den = m11 + m22 - 2.0 * m12
    if den <= 1e-12 * max(m11 + m22, 1e-300):
        return 0.5
    return min(max((m22 - m12) / den, 0.0), 1.0)


def _solve_linear(A: Mat, b: Vec) -> Vec | None:
    """``x`` with ``A x = b`` by Gaussian elimination with partial pivoting; ``None`` if ``A`` is (nearly) singular."""
    n = len(b)
    rows = [list(r) + [v] for r, v in zip(A, b)]
    scale = max(max(abs(x) for x in r[:n]) for r in rows) or 1.0
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(rows[r][c]))
        if abs(rows[p][c]) <= 1e-13 * scale:
            return None
        rows[c], rows[p] = rows[p], rows[c]
        pivot_row = rows[c]
        inv = 1.0 / pivot_row[c]
        for r in range(c + 1, n):
            f = rows[r][c] * inv
            if f != 0.0:
                row = rows[r]
                for j in range(c, n + 1):
                    row[j] -= f * pivot_row[j]
    x = [0.0] * n
    for c in range(n - 1, -1, -1):
        row = rows[c]
        x[c] = (row[n] - sum(row[j] * x[j] for j in range(c + 1, n))) / row[c]
    return x


def _cholesky_solve(A: Mat, rhs: Sequence[Vec], rel_tol: float = 1e-12) -> list[Vec] | None:
    """``A^{-1} b`` for each ``b`` in ``rhs``, ``A`` symmetric positive definite, by Cholesky of the equilibrated
    ``E A E`` (``E = diag(A_ii^{-1/2})``, unit diagonal), so that the test for (numerical) singularity is relative
    to each row's own scale: a pivot below ``rel_tol`` of the unit diagonal means the rows are linearly dependent
    to that relative precision. ``None`` if ``A`` is not (numerically) positive definite."""
    n = len(A)
    if any(not A[i][i] > 0.0 for i in range(n)):
        return None
    e = [1.0 / math.sqrt(A[i][i]) for i in range(n)]
    L: Mat = [[0.0] * n for _ in range(n)]
    for i in range(n):
        Li, Ai, ei = L[i], A[i], e[i]
        for j in range(i + 1):
            Lj = L[j]
            acc = Ai[j] * ei * e[j] - sum(map(_mul, Li[:j], Lj[:j]))
            if i == j:
                if acc <= rel_tol:
                    return None
                Li[i] = math.sqrt(acc)
            else:
                Li[j] = acc / Lj[j]
    out = []
    for b in rhs:
        y = [0.0] * n
        for i in range(n):
            y[i] = (b[i] * e[i] - sum(map(_mul, L[i][:i], y[:i]))) / L[i][i]
        x = [0.0] * n
        for i in range(n - 1, -1, -1):
            x[i] = (y[i] - sum(L[j][i] * x[j] for j in range(i + 1, n))) / L[i][i]
        out.append([xi * ei for xi, ei in zip(x, e)])
    return out


def _cholesky_solve_ones(A: Mat) -> Vec | None:
    """``A^{-1} 1`` for a symmetric positive definite ``A`` (:func:`_cholesky_solve`); ``None`` if it is not."""
    sol = _cholesky_solve(A, [[1.0] * len(A)])
    return None if sol is None else sol[0]


def _affine_min_norm(A: Mat) -> Vec | None:
    """``argmin beta^T A beta`` subject to ``1^T beta = 1`` (no sign constraint): ``A^{-1} 1 / (1^T A^{-1} 1)``
    when ``A`` is positive definite, else from the bordered KKT system; ``None`` if that is singular too."""
    x = _cholesky_solve_ones(A)
    if x is not None:
        total = sum(x)
        if total > 0.0:
            return [v / total for v in x]
    n = len(A)
    # Bordered KKT system [A 1; 1^T 0] [beta; mu] = [0; 1], solved for z = beta / e on E A E (E as in
    # _cholesky_solve), with the border divided by max(e) so every entry is at most 1 in magnitude.
    if any(not A[i][i] > 0.0 for i in range(n)):
        return None
    e = [1.0 / math.sqrt(A[i][i]) for i in range(n)]
    top = max(e)
    border = [ei / top for ei in e]
    K = [[A[i][j] * e[i] * e[j] for j in range(n)] + [border[i]] for i in range(n)] + [border + [0.0]]
    sol = _solve_linear(K, [0.0] * n + [1.0 / top])
    return None if sol is None else [z * ei for z, ei in zip(sol[:n], e)]


# The optimality test of the min-norm problem, per task and relative to that task's own norm. At the min-norm
# point g = sum_i alpha_i g_i of the convex hull, KKT reads g . g_j >= ||g||^2 for every task j (with equality
# where alpha_j > 0). Its violation is measured in units of ||g_j|| ||g||, so a task whose gradient is a million
# times smaller than another's is held to the same relative accuracy. What the Gram matrix cannot resolve is
# forgiven: (M alpha)_j and alpha^T M alpha carry rounding errors of about k eps S ||g_j|| and k eps S^2 with
# S = sum_i alpha_i ||g_i||, which matters where the hull (nearly) contains 0 and ||g|| << S.
_EPS = float(torch.finfo(torch.float64).eps)


def _min_norm_violations(M: Mat, alpha: Vec, Ma: Vec | None = None) -> tuple[Vec, float]:
    """Per-task relative KKT violations ``(||g||^2 - g . g_j - rounding_j) / (||g_j|| ||g||)`` of the min-norm
    problem at ``alpha`` (``<= 0`` means satisfied), and ``||g||^2``."""
    if Ma is None:
        Ma = _matvec(M, alpha)
    k = len(M)
    aMa = max(_dot(alpha, Ma), 0.0)
    n = [math.sqrt(max(M[j][j], 0.0)) for j in range(k)]
    S = sum(a * x for a, x in zip(alpha, n))
    ref = max(math.sqrt(aMa), 1e-300)
    noise = 4.0 * k * _EPS * S
    return [(aMa - m - noise * (S + nj)) / (nj * ref) if nj > 0.0 else 0.0 for m, nj in zip(Ma, n)], aMa


def min_norm_residual(M: Tensor, alpha: Tensor) -> float:
    """The largest relative KKT violation of ``alpha`` for the min-norm problem on ``M`` (0 at the optimum):
    ``max_j (||g||^2 - g . g_j) / (||g_j|| ||g||)`` with ``g = sum_i alpha_i g_i``, less what rounding of ``M``
    cannot resolve, plus the simplex violation ``|1^T alpha - 1| + max(-alpha)``."""
    Ml, al = M.tolist(), alpha.tolist()
    viol, _ = _min_norm_violations(Ml, al)
    return max(max(viol), 0.0) + abs(sum(al) - 1.0) + max(-min(al), 0.0)


def _min_norm_active_set(M: Mat, tol: float, start: Sequence[int] | None = None) -> tuple[Vec, int] | None:
    """Wolfe's min-norm-point algorithm (Wolfe, Math. Programming 1976) on the weights: exact in finitely
    many steps (about one per vertex in the solution's support), for a normalised ``M`` given as lists.

    Keeps a support ``S`` and weights on it. Each major step adds the vertex ``j`` whose relative KKT violation
    (:func:`_min_norm_violations`) is largest, unless none exceeds ``tol`` (then ``alpha`` is optimal);
    minor steps solve the affine problem ``min beta^T M_SS beta, 1^T beta = 1`` (its KKT system) and, where
    ``beta`` leaves the simplex, move to the boundary and drop the vertex that reached zero. Returns ``None``
    when a KKT system is numerically singular or the steps do not settle; the caller then falls back to
    Frank-Wolfe. ``start``: a support to begin from (e.g. the previous step's, whose weights change little
    from step to step): minor steps from its uniform point, usually a single linear solve in all.
    """
    k = len(M)
    if start:
        support = sorted({i for i in start if 0 <= i < k})
    else:
        diag = [M[i][i] for i in range(k)]
        support = [diag.index(min(diag))]
    alpha = [0.0] * k
    for i in support:
        alpha[i] = 1.0 / len(support)
    warm = len(support) > 1  # a warm start begins with minor steps from the uniform point of its support
    for it in range(4 * k + 8):
        if not warm:
            viol, _ = _min_norm_violations(M, alpha)
            worst = max(viol)
            if worst <= tol:
                return alpha, it
            j = viol.index(worst)
            if j in support:
                return None
            support.append(j)
        warm = False
        for _ in range(len(support)):  # minor steps: each drops a vertex or ends the loop
            n = len(support)
            beta = _affine_min_norm([[M[a][b] for b in support] for a in support])
            if beta is None:
                return None
            if min(beta) > 0.0:
                alpha = [0.0] * k
                for i, b in zip(support, beta):
                    alpha[i] = b
                break
            cur = [alpha[i] for i in support]
            theta = min(c / (c - b) for c, b in zip(cur, beta) if b <= 0.0)
            new = [c + theta * (b - c) for c, b in zip(cur, beta)]
            drop = min(range(n), key=new.__getitem__)
            alpha = [0.0] * k
            kept = []
            for pos, (i, v) in enumerate(zip(support, new)):
                if pos != drop and v > 0.0:
                    alpha[i] = v
                    kept.append(i)
            if not kept:
                return None
            total = sum(alpha)
            alpha = [a / total for a in alpha]
            support = kept
        else:
            return None
    return None


def _min_norm_list(M: Mat, max_iter: int, tol: float) -> tuple[Vec, int]:
    """:func:`min_norm_simplex` for ``k > 2`` on a normalised matrix given as lists (of floats)."""
    k = len(M)
    cols = [list(c) for c in zip(*M)]  # cols[j] = M[:, j]
    alpha = [1.0 / k] * k
    it = 0
    while it < max_iter:
        Ma = _matvec(M, alpha)
        aMa = _dot(alpha, Ma)
        m_s = min(Ma)
        s_idx = Ma.index(m_s)
        gap_fw = aMa - m_s
        if max(_min_norm_violations(M, alpha, Ma)[0]) <= tol:
            break
        it += 1
        v_idx = max((i for i in range(k) if alpha[i] > 0), key=Ma.__getitem__)
        gap_away = Ma[v_idx] - aMa
        if gap_fw >= gap_away:  # towards e_s
            d = [-a for a in alpha]
            d[s_idx] += 1.0
            step_max = 1.0
        else:  # away from e_v
            d = list(alpha)
            d[v_idx] -= 1.0
            av = alpha[v_idx]
            step_max = av / (1.0 - av) if av < 1.0 else 1.0
        dMd, slope = _dot(_matvec(cols, d), d), _dot(Ma, d)  # (d^T M) d, in torch's order
        step = step_max if dMd <= 0.0 else min(max(-slope / dMd, 0.0), step_max)
        alpha = [a + step * di for a, di in zip(alpha, d)]
        if gap_fw < gap_away and step == step_max:
            alpha[v_idx] = 0.0  # drop the vertex exactly
        alpha = [a if a > 0.0 else 0.0 for a in alpha]
        total = sum(alpha)
        alpha = [a / total for a in alpha]
    return alpha, it


def min_norm_simplex(
    M: Tensor, *, max_iter: int = 1000, tol: float = 1e-10, start: Sequence[int] | None = None
) -> tuple[Tensor, int]:
    """Weights ``alpha`` on the simplex minimising ``alpha^T M alpha`` (the min-norm point of the convex hull).

    k = 1: ``[1]``; k = 2: :func:`min_norm_2`; k > 2: Wolfe's exact active-set algorithm
    (:func:`_min_norm_active_set`, a few linear solves of size at most k + 1, on the equilibrated matrix), and
    where that meets a numerically singular system, Frank-Wolfe with exact line search started from the
    uniform point, as in Algorithm 2 of Sener & Koltun (NeurIPS 2018), with away steps (Lacoste-Julien &
    Jaggi, NeurIPS 2015) so that it converges linearly instead of as ``O(1/t)``: each step either moves
    towards the vertex ``e_s`` minimising ``(M alpha)_s`` or away from the used vertex maximising it, whichever
    direction is steeper, with the optimal step in closed form.

    Both stop when the KKT conditions hold to ``tol`` *relative to each task's norm*: ``g . g_j >= ||g||^2 -
    tol ||g_j|| ||g||`` for every task ``j`` (:func:`min_norm_residual`). An absolute test (the duality gap of
    the matrix normalised to unit mean diagonal, mtlib < 0.2) stops far from the answer when the min-norm
    point is tiny next to the largest gradient, as it is when one task's gradient is 1e6 times smaller than
    another's; the relative test also guarantees that the returned direction conflicts with no task
    (``g . g_j >= (1 - tol) ||g||^2 > 0``). If the Frank-Wolfe fallback runs out of ``max_iter`` steps first it
    warns (:class:`SolverWarning`) with the residual.

    Degenerate rows, mtlib's rule: a task whose gradient is exactly zero puts 0 in the hull, so the min-norm
    point is 0 (MGDA's Pareto-stationary answer: no direction improves every task); its weight is spread
    uniformly over the zero rows so that the weights stay permutation-equivariant. Duplicate rows are
    interchangeable, and the solver returns one optimal split of their weight (the combination is unique).

    Returns ``(alpha, iterations)``.
    """
    k = M.shape[0]
    if k == 1:
        return torch.ones(1, dtype=M.dtype, device=M.device), 0
    Ml = M.tolist()
    s = max(sum(Ml[i][i] for i in range(k)) / k, 0.0)  # _scale(M), without tensor ops
    if s == 0.0:
        return torch.full((k,), 1.0 / k, dtype=M.dtype, device=M.device), 0
    zero = [i for i in range(k) if not Ml[i][i] > 0.0]
    if zero:
        alpha = [1.0 / len(zero) if i in zero else 0.0 for i in range(k)]
        return torch.tensor(alpha, dtype=M.dtype, device=M.device), 0
    Ml = [[x / s for x in row] for row in Ml]
    if k == 2:
        a = min_norm_2(Ml[0][0], Ml[0][1], Ml[1][1])
        return torch.tensor([a, 1.0 - a], dtype=M.dtype, device=M.device), 0
    exact = _min_norm_active_set(Ml, tol, start) if start else None
    if exact is None:
        exact = _min_norm_active_set(Ml, tol)
    if exact is not None:
        alpha, it = exact
    else:
        alpha, it = _min_norm_list(Ml, max_iter, tol)
        residual = max(max(_min_norm_violations(Ml, alpha)[0]), 0.0)
        if residual > tol:
            _warn("min_norm_simplex (Frank-Wolfe)", residual, tol, it)
    return torch.tensor(alpha, dtype=M.dtype, device=M.device), it


def _cagrad_pgd(M: Mat, b: Vec, root_phi: float, max_iter: int, tol: float) -> tuple[Vec, int]:
    """Projected gradient descent (Barzilai-Borwein steps, Armijo backtracking, monotone) on CAGrad's dual
    ``F(w) = b . w + root_phi sqrt(w^T M w)`` over the simplex, from the uniform point, for ``M`` normalised to
    unit mean diagonal. Stops when the Frank-Wolfe gap ``grad F . w - min_i grad F_i`` is below ``tol``, after ten
    steps that lower ``F`` by less than 1e-14, or after ``max_iter`` steps. ``||g_w||`` is smoothed as
    ``sqrt(w^T M w + 1e-14)`` so ``F`` is differentiable where ``g_w = 0``. Its answer is only as good as an
    absolute tolerance allows; :func:`cagrad_direction` uses it to find the support, then solves exactly."""
    k = len(M)
    eps = 1e-14

    def value_grad(w: Vec) -> tuple[float, Vec]:
        Mw = _matvec(M, w)
        norm = math.sqrt(max(_dot(w, Mw), 0.0) + eps)
        return _dot(b, w) + root_phi * norm, [bi + root_phi * mi / norm for bi, mi in zip(b, Mw)]

    w = [1.0 / k] * k
    f, grad = value_grad(w)
    step, stalled = 1.0, 0
    it = 0
    while it < max_iter and stalled < 10:
        if _dot(grad, w) - min(grad) < tol:
            break
        it += 1
        step = min(step, 10.0 / max(max(abs(g) for g in grad), 1e-30))  # a longer step only projects further
        while True:
            new = _project_simplex_list([wi - step * gi for wi, gi in zip(w, grad)])
            d = [ni - wi for ni, wi in zip(new, w)]
            f_new, grad_new = value_grad(new)
            dd = _dot(d, d)
            if f_new <= f + _dot(grad, d) + dd / (2.0 * step) + 1e-15 or step < 1e-12:
                break
            step *= 0.5
        y = [gn - g for gn, g in zip(grad_new, grad)]
        sy = _dot(d, y)
        step = min(max(dd / sy, 1e-10), 1e10) if sy > 1e-30 else min(2.0 * step, 1e10)
        stalled = stalled + 1 if f - f_new <= 1e-14 else 0
        w, f, grad = new, f_new, grad_new
    return w, it


def _cagrad_on_support(M: Mat, b: Vec, r: float, S: Sequence[int]) -> tuple[float, Vec] | None:
    """CAGrad's optimum if its active tasks are exactly ``S``: ``(lambda, y)`` with ``d = g0 + sum_{i in S} y_i
    g_i``, every ``g_i . d = lambda`` on ``S`` and ``||d - g0|| = r``; ``None`` if no such point exists (``M_SS``
    singular to relative precision, or the ball does not reach the equal-value set).

    With ``p = M_SS^-1 1`` and ``q = M_SS^-1 b_S``: ``y = lambda p - q`` and ``y^T M_SS y = r^2`` give
    ``A lambda^2 - 2 B lambda + (b.q - r^2) = 0`` (``A = 1.p``, ``B = 1.q``); the larger root is the maximum
    (the smaller one minimises the worst task), and the dual weights ``y / 1^T y`` are positive only there."""
    MS = [[M[i][j] for j in S] for i in S]
    bS = [b[i] for i in S]
    sol = _cholesky_solve(MS, [[1.0] * len(S), bS])
    if sol is None:
        return None
    p, q = sol
    A, B, bq = sum(p), sum(q), _dot(bS, q)
    if not A > 0.0:
        return None
    const = bq - r * r
    disc = B * B - A * const
    if disc < 0.0:
        return None
    root = math.sqrt(disc)
    lam = (B + root) / A if B >= 0.0 else const / (B - root)  # the larger root, without cancellation
    return lam, [lam * pi - qi for pi, qi in zip(p, q)]


def cagrad_direction(
    M: Tensor, c: float, *, max_iter: int = 1000, tol: float = 1e-9
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """CAGrad's update direction (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, eq. (4)): ``d = argmax_{||d - g0|| <= c ||g0||} min_i g_i . d`` with ``g0 = mean_i g_i``, as
    coefficients on the gradients (``d = coef^T G``), solved exactly.

    At the optimum ``d = g0 + c ||g0|| g_w / ||g_w||`` where ``w`` minimises the dual ``g_w . g0 + c ||g0||
    ||g_w||`` over the simplex, and every task in the support of ``w`` has the same ``g_i . d = lambda`` (the
    optimal value); the others have ``g_j . d >= lambda``. Given that support the problem is a quadratic
    equation (:func:`_cagrad_on_support`), so it is solved exactly: projected gradient descent on the dual
    (:func:`_cagrad_pgd`) proposes a support, which is then repaired (drop a task with a negative dual weight,
    add the task that violates ``g_j . d >= lambda`` most) until the KKT conditions hold to ``tol`` relative
    to each task's norm, ``g_j . d >= lambda - tol ||g_j|| ||d||``; for up to 12 tasks an exhaustive search over
    supports backs this up. Linear systems are solved on equilibrated matrices, so gradients whose norms
    differ by orders of magnitude are solved to the same relative accuracy.

    Degenerate cases, mtlib's rules:

    - ``c = 0`` or ``g0 = 0``: ``d = g0``.
    - A task whose gradient is exactly zero is left out of the ``min``: no direction changes its loss to first
      order, and keeping it would pin the worst-task value at 0 for every ``d``.
    - When no support satisfies the conditions with ``g_w != 0``, the optimum is attained at ``g_w = 0`` (0 in the
      convex hull of the gradients: a Pareto-stationary point with ``c >= 1``, the case where the paper's
      recovery ``g_w / ||g_w||`` is undefined). Every ``d`` in the ball with ``g_i . d >= 0`` for all tasks is then
      optimal; ``info["stationary"] = 1`` and the caller picks the one nearest ``g0``: the projection of ``g0``
      onto the dual cone (see :func:`mtl.gradients.cagrad_weights`). ``coef`` is then ``1/k`` (``d = g0``).

    Returns ``(coef, w, info)`` with the dual weights ``w`` (on the simplex) and ``info`` keys ``value``
    (``lambda``), ``iters``, ``residual`` (largest relative KKT violation), ``converged`` and ``stationary``.
    """
    k = M.shape[0]
    dtype, device = M.dtype, M.device
    uniform = [1.0 / k] * k

    def out(coef: Vec, w: Vec, **info: float) -> tuple[Tensor, Tensor, dict[str, float]]:
        base = {"value": 0.0, "iters": 0.0, "residual": 0.0, "converged": 1.0, "stationary": 0.0}
        base.update(info)
        return torch.tensor(coef, dtype=dtype, device=device), torch.tensor(w, dtype=dtype, device=device), base

    s = _scale(M)
    if k == 1 or s == 0.0 or c == 0.0:
        return out(uniform, uniform)
    Ml = [[x / s for x in row] for row in M.tolist()]
    b = _matvec(Ml, uniform)  # b_i = g_i . g0
    g0_sq = _dot(uniform, b)
    if not g0_sq > 0.0:
        return out(uniform, uniform)
    r = c * math.sqrt(g0_sq)
    nz = [i for i in range(k) if Ml[i][i] > 0.0]
    Mz = [[Ml[i][j] for j in nz] for i in nz]
    bz = [b[i] for i in nz]
    n = [math.sqrt(Mz[i][i]) for i in range(len(nz))]
    m = len(nz)

    def check(S: Sequence[int]) -> tuple[float, Vec, float, int, int] | None:
        """(lambda, y, worst relative violation, index to drop (-1), index to add (-1)) for support S."""
        sol = _cagrad_on_support(Mz, bz, r, S)
        if sol is None:
            return None
        lam, y = sol
        ymax = max(abs(v) for v in y)
        neg = min(range(len(S)), key=y.__getitem__)
        if y[neg] < -1e-12 * ymax:
            return lam, y, math.inf, S[neg], -1
        coef = [0.0] * m
        for i, v in zip(S, y):
            coef[i] = v
        vals = [bj + sum(Mz[j][i] * ci for i, ci in zip(S, y)) for j, bj in enumerate(bz)]  # g_j . d
        d_sq = g0_sq + 2.0 * sum(bz[i] * ci for i, ci in zip(S, y)) + sum(
            ci * sum(Mz[i][jj] * cj for jj, cj in zip(S, y)) for i, ci in zip(S, y)
        )
        d_norm = math.sqrt(max(d_sq, 0.0)) or 1e-300
        viol = [(lam - v) / (n[j] * d_norm) for j, v in enumerate(vals)]
        inside = set(S)
        outside = [j for j in range(m) if j not in inside]
        if not outside:
            return lam, y, 0.0, -1, -1
        worst = max(outside, key=viol.__getitem__)
        return lam, y, max(viol[worst], 0.0), -1, worst

    def finish(S: Sequence[int], lam: float, y: Vec, resid: float, iters: int) -> tuple[Tensor, Tensor, dict]:
        coef = list(uniform)
        total = sum(y)
        w = [0.0] * k
        for i, v in zip(S, y):
            coef[nz[i]] += v
            w[nz[i]] = v / total
        return out(coef, w, value=lam * s, iters=float(iters), residual=resid)

    def stationary() -> Vec | None:
        """The min-norm weights if 0 is in the convex hull of the (non-zero) gradients, else None."""
        if not m:
            return None
        alpha, _ = min_norm_simplex(torch.tensor(Mz, dtype=torch.float64))
        al = alpha.tolist()
        _, aMa = _min_norm_violations(Mz, al)
        gross = sum(a * x for a, x in zip(al, n))
        if aMa > 64.0 * m * _EPS * gross * gross:  # ||g*||^2 above the rounding of the Gram matrix
            return None
        w = [0.0] * k
        for i, a in zip(nz, al):
            w[i] = a
        return w

    if c >= 1.0 and (stat := stationary()) is not None:  # value 0, attained at g_w = 0 (and maybe elsewhere)
        return out(uniform, stat, stationary=1.0)
    w0, iters = _cagrad_pgd(Mz, bz, r, max_iter, tol)
    top = max(w0)
    S = [i for i, v in enumerate(w0) if v > 1e-9 * top]
    seen: set[tuple[int, ...]] = set()
    for _ in range(4 * m + 8):
        key = tuple(sorted(S))
        if key in seen:
            break
        seen.add(key)
        res = check(S)
        if res is None:
            break
        lam, y, resid, drop, add = res
        if drop < 0 and resid <= tol:
            return finish(S, lam, y, resid, iters)
        if drop >= 0:
            S = [i for i in S if i != drop]
            if not S:
                break
        else:
            S = sorted([*S, add])
    if m <= 12:
        for size in range(1, m + 1):
            for S_t in itertools.combinations(range(m), size):
                res = check(list(S_t))
                if res is not None and res[3] < 0 and res[2] <= tol:
                    return finish(list(S_t), res[0], res[1], res[2], iters)
    # No support with g_w != 0 meets the conditions: the optimum is at g_w = 0 if 0 is in the hull.
    if (stat := stationary()) is not None:
        return out(uniform, stat, iters=float(iters), stationary=1.0)
    # Fall back on the dual solution of projected gradient descent, and say so.
    g_w = math.sqrt(max(_dot(w0, _matvec(Mz, w0)), 0.0))
    coef, w = list(uniform), [0.0] * k
    for i, v in zip(nz, w0):
        coef[i] += (r / g_w if g_w > 0 else 0.0) * v
        w[i] = v
    _warn("cagrad_direction", math.inf, tol, iters)
    return out(coef, w, iters=float(iters), residual=math.inf, converged=0.0)


def cagrad_dual(M: Tensor, c: float, *, max_iter: int = 1000, tol: float = 1e-9) -> tuple[Tensor, int]:
    """The dual weights ``w`` of CAGrad (on the simplex, minimising ``g_w . g0 + c ||g0|| ||g_w||``) from the
    exact solve of :func:`cagrad_direction`, and the iterations of its first phase."""
    _, w, info = cagrad_direction(M, c, max_iter=max_iter, tol=tol)
    return w, int(info["iters"])


def nash_bargaining(
    M: Tensor, *, alpha0: Tensor | None = None, max_iter: int = 100, tol: float = 1e-10, ridge: float = 1e-9
) -> tuple[Tensor, int]:
    """The Nash bargaining weights of Nash-MTL (Navon et al., ICML 2022, Claim 3.1): ``alpha > 0`` with
    ``(M alpha)_i = 1 / alpha_i`` for every task ``i``, for the matrix as given.

    The condition is invariant to rescaling single gradients: with ``D = diag(||g_i||)`` and the cosine matrix
    ``C = D^-1 M D^-1``, ``alpha`` solves it for ``M`` exactly when ``beta = D alpha`` solves ``beta_i (C
    beta)_i = 1``. So it is solved for ``C``, whose unit diagonal makes the solve equally accurate for
    gradients of any relative size, and ``alpha = beta / ||g_i||``: the weights scale as ``1 / ||g||``, ``alpha(s
    M) = alpha(M) / sqrt(s)``, and ``alpha^T M alpha = k`` at the solution.

    ``beta`` is the minimiser of the strictly convex ``f(beta) = 1/2 beta^T C beta - sum_i log beta_i`` (its
    stationarity condition), found by damped Newton: direction ``-(C + diag(1/beta^2))^{-1} (C beta - 1/beta)``,
    step shortened to stay 1% inside ``beta > 0`` and then halved until ``f`` decreases sufficiently (Armijo),
    until ``max_i |beta_i (C beta)_i - 1| < tol`` or ``max_iter`` steps (then a :class:`SolverWarning` with the
    residual). Started from ``alpha0`` (the previous solution) if it is usable, else from ``beta = 1``.

    Degenerate cases, mtlib's rules: a task whose gradient is exactly zero gets ``alpha_i = 0`` (the condition
    has no solution for it, and its weight does not change the update); where the gradients are linearly
    dependent with a non-negative null combination (``g1 = -g2``; 0 in their convex hull) no solution exists
    either, and ``C`` is regularised as ``C + ridge I`` (a relative ridge: the same for every row whatever its
    norm), so the affected weights become large, about ``1 / sqrt(ridge)`` in the units of ``beta``, instead of
    infinite; rounding then bounds the residual (about 1e-7), and no warning is given. Elsewhere the ridge moves
    the solution by a relative ``O(ridge)``.

    Unlike the official code (a sequence of cvxpy problems, 20 iterations), this solves the condition to
    ``tol``; the solution is unique when ``M`` is positive definite, so both aim at the same point.
    Returns ``(alpha, iterations)``.
    """
    Ml = M.tolist()
    alpha, iters, residual = _nash_list(Ml, None if alpha0 is None else alpha0.tolist(), max_iter, tol, ridge)
    # Where the ridge holds the solution (no exact one exists) rounding bounds the residual: by design, no warning.
    ridge_bound = any(a * math.sqrt(max(Ml[i][i], 0.0)) > 0.01 / math.sqrt(ridge) for i, a in enumerate(alpha))
    if residual >= tol and not ridge_bound:
        _warn("nash_bargaining", residual, tol, iters)
    return torch.tensor(alpha, dtype=M.dtype, device=M.device), iters


def nash_residual(M: Tensor, alpha: Tensor) -> float:
    """``max_i |alpha_i (M alpha)_i - 1|`` over the tasks with a non-zero gradient (0 at the bargaining point)."""
    Ml, al = M.tolist(), alpha.tolist()
    Ma = _matvec(Ml, al)
    return max((abs(a * m - 1.0) for i, (a, m) in enumerate(zip(al, Ma)) if Ml[i][i] > 0.0), default=0.0)


def _nash_list(M: Mat, alpha0: Vec | None, max_iter: int, tol: float, ridge: float) -> tuple[Vec, int, float]:
    """:func:`nash_bargaining` on lists: ``(alpha, iterations, residual of the regularised condition)``."""
    k = len(M)
    nz = [i for i in range(k) if M[i][i] > 0.0]
    alpha = [0.0] * k
    if not nz:
        return alpha, 0, 0.0
    n = [math.sqrt(M[i][i]) for i in nz]
    m = len(nz)
    C = [[M[a][b] / (n[x] * n[y]) + (ridge if x == y else 0.0) for y, b in enumerate(nz)] for x, a in enumerate(nz)]
    beta = [1.0] * m
    if alpha0 is not None and len(alpha0) == k:
        warm = [alpha0[i] * n[x] for x, i in enumerate(nz)]
        if all(math.isfinite(b) and b > 0.0 for b in warm):
            beta = warm

    def value(x: Vec) -> float:
        return 0.5 * _dot(x, _matvec(C, x)) - sum(math.log(v) for v in x)

    it, residual = 0, math.inf
    while True:
        Cb = _matvec(C, beta)
        residual = max(abs(b * cb - 1.0) for b, cb in zip(beta, Cb))
        if residual < tol or it >= max_iter:
            break
        it += 1
        grad = [cb - 1.0 / b for b, cb in zip(beta, Cb)]
        H = [[C[i][j] + (1.0 / (beta[i] * beta[i]) if i == j else 0.0) for j in range(m)] for i in range(m)]
        sol = _cholesky_solve(H, [grad], rel_tol=0.0) or [_solve_linear(H, grad) or grad]
        d = [-x for x in sol[0]]
        t = 1.0
        ratios = [-b / di for b, di in zip(beta, d) if di < 0.0]
        if ratios:
            t = min(1.0, 0.99 * min(ratios))
        f0, slope = value(beta), _dot(grad, d)
        while t > 1e-12:
            trial = [b + t * di for b, di in zip(beta, d)]
            if value(trial) <= f0 + 1e-4 * t * slope:
                break
            # near the solution f changes below its own rounding: accept a step that shrinks the residual
            Ct = _matvec(C, trial)
            if max(abs(b * cb - 1.0) for b, cb in zip(trial, Ct)) < residual:
                break
            t *= 0.5
        beta = [b + t * di for b, di in zip(beta, d)]
    for x, i in enumerate(nz):
        alpha[i] = beta[x] / n[x]
    return alpha, it, residual
