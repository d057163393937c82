"""Small solvers on a k x k Gram matrix ``M = G G^T`` of task gradients (k = number of tasks).

Pure functions of tensors, used by :mod:`mtl.gradients`. They are meant for k of at most a few dozen:
the iterative ones copy ``M`` once into Python floats (``M.tolist()``), iterate on those (a few
microseconds per iteration, far below the per-call overhead of torch ops on k-element tensors) and return
tensors on ``M``'s device and dtype. :mod:`mtl.gradients` hands them a float64 CPU copy, so the accelerator
is synchronised once per step.

Every solver is invariant to a positive rescaling of the gradients (it normalises ``M`` internally), so
gradients of any magnitude, including all-zero ones, give finite answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


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


def _cholesky_solve_ones(A: Mat) -> Vec | None:
    """``A^{-1} 1`` for a symmetric positive definite ``A`` (Cholesky); ``None`` if it is not (numerically)."""
    n = len(A)
    scale = max(A[i][i] for i in range(n))
    if not scale > 0.0:
        return None
    L: Mat = [[0.0] * n for _ in range(n)]
    for i in range(n):
        Li, Ai = L[i], A[i]
        for j in range(i + 1):
            Lj = L[j]
            acc = Ai[j] - sum(map(_mul, Li[:j], Lj[:j]))
            if i == j:
                if acc <= 1e-12 * scale:
                    return None
                Li[i] = math.sqrt(acc)
            else:
                Li[j] = acc / Lj[j]
    y = [0.0] * n
    for i in range(n):
        y[i] = (1.0 - sum(map(_mul, L[i][:i], y[:i]))) / L[i][i]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        x[i] = (y[i] - sum(L[j][i] * x[j] for j in range(i + 1, n))) / L[i][i]
    return x


def _affine_min_norm(A: Mat) -> Vec | None:
    """``argmin beta^T A beta`` subject to ``1^T beta = 1`` (no sign constraint): ``A^{-1} 1 / (1^T A^{-1} 1)``
    when ``A`` is positive definite, else from the bordered KKT system; ``None`` if that is singular too."""
    x = _cholesky_solve_ones(A)
    if x is not None:
        total = sum(x)
        if total > 0.0:
            return [v / total for v in x]
    n = len(A)
    sol = _solve_linear([list(r) + [1.0] for r in A] + [[1.0] * n + [0.0]], [0.0] * n + [1.0])
    return None if sol is None else sol[:n]


def _min_norm_active_set(M: Mat, tol: float, start: Sequence[int] | None = None) -> tuple[Vec, int] | None:
    """Wolfe's min-norm-point algorithm (Wolfe, Math. Programming 1976) on the weights: exact in finitely
    many steps (about one per vertex in the solution's support), for a normalised ``M`` given as lists.

    Keeps a support ``S`` and weights on it. Each major step adds the vertex ``j`` minimising ``(M alpha)_j``
    unless the Frank-Wolfe gap ``alpha^T M alpha - (M alpha)_j`` is at most ``tol`` (then ``alpha`` is optimal);
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
            Ma = _matvec(M, alpha)
            aMa = _dot(alpha, Ma)
            m_j = min(Ma)
            if aMa - m_j <= tol:
                return alpha, it
            j = Ma.index(m_j)
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
        if gap_fw < tol:
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
    (:func:`_min_norm_active_set`, a few linear solves of size at most k + 1), and where that meets a
    numerically singular system, Frank-Wolfe with exact line search started from the
    uniform point, as in Algorithm 2 of Sener & Koltun (NeurIPS 2018), with away steps (Lacoste-Julien &
    Jaggi, NeurIPS 2015) so that it converges linearly instead of as ``O(1/t)``: each step either moves
    towards the vertex ``e_s`` minimising ``(M alpha)_s`` or away from the used vertex maximising it, whichever
    direction is steeper, with the optimal step in closed form. Stops when the Frank-Wolfe duality gap
    ``alpha^T M alpha - min_s (M alpha)_s`` (an upper bound on the excess of ``alpha^T M alpha`` over the
    optimum, for ``M`` normalised to unit mean diagonal) is below ``tol``, or after ``max_iter`` steps.
    (Plain Frank-Wolfe with the official stopping rule, an L1 change of ``alpha`` below 1e-5, left excesses
    of up to 4e-3 of the typical squared norm on random instances.)

    Returns ``(alpha, iterations)``.
    """
    k = M.shape[0]
    if k == 1:
        return torch.ones(1, dtype=M.dtype, device=M.device), 0
    Ml = M.tolist()
    s = max(sum(Ml[i][i] for i in range(k)) / k, 0.0)  # _scale(M), without tensor ops
    if s == 0.0:
        return torch.full((k,), 1.0 / k, dtype=M.dtype, device=M.device), 0
    Ml = [[x / s for x in row] for row in Ml]
    if k == 2:
        a = min_norm_2(Ml[0][0], Ml[0][1], Ml[1][1])
        return torch.tensor([a, 1.0 - a], dtype=M.dtype, device=M.device), 0
    exact = _min_norm_active_set(Ml, tol, start) if start else None
    if exact is None:
        exact = _min_norm_active_set(Ml, tol)
    alpha, it = exact if exact is not None else _min_norm_list(Ml, max_iter, tol)
    return torch.tensor(alpha, dtype=M.dtype, device=M.device), it


def cagrad_dual(M: Tensor, c: float, *, max_iter: int = 1000, tol: float = 1e-9) -> tuple[Tensor, int]:
    """Weights ``w`` on the simplex minimising CAGrad's dual objective (Liu et al., NeurIPS 2021, official code)

    ``F(w) = g_w . g0 + sqrt(phi) ||g_w||``  with ``g_w = sum_i w_i g_i``, ``g0 = mean_i g_i``,
    ``sqrt(phi) = c ||g0||``;  in Gram form ``F(w) = w^T M 1/k + c sqrt(1^T M 1 / k^2) sqrt(w^T M w)``.

    ``F`` is convex. It is minimised by projected gradient descent with Barzilai-Borwein step sizes and
    Armijo backtracking (monotone), from the uniform point, until the Frank-Wolfe duality gap
    ``grad F(w) . w - min_i grad F(w)_i`` (an upper bound on ``F(w) - min F`` for ``M`` normalised to unit mean
    diagonal) is below ``tol``, after ten consecutive steps that lower ``F`` by less than 1e-14, or after
    ``max_iter`` steps. ``||g_w||`` is smoothed as ``sqrt(w^T M w + 1e-14)`` (normalised units) so ``F`` is
    differentiable where ``g_w = 0``. For ``c >= 1``, ``F >= 0``, so when zero lies in the convex hull of the
    gradients (a Pareto-stationary point) the min-norm weights (``F = 0``, the kink of ``F``) are returned
    directly; the descent would crawl there.

    Returns ``(w, iterations)``.
    """
    k = M.shape[0]
    s = _scale(M)
    if k == 1 or s == 0.0:
        return torch.full((k,), 1.0 / k, dtype=M.dtype, device=M.device), 0
    Ml = [[x / s for x in row] for row in M.tolist()]
    w, it = _cagrad_dual_list(Ml, c, max_iter, tol)
    return torch.tensor(w, dtype=M.dtype, device=M.device), it


def _cagrad_dual_list(M: Mat, c: float, max_iter: int, tol: float) -> tuple[Vec, int]:
    """:func:`cagrad_dual` for ``k > 1`` on a normalised matrix given as lists."""
    k = len(M)
    uniform = [1.0 / k] * k
    b = _matvec(M, uniform)
    ub = _dot(uniform, b)
    root_phi = c * ub**0.5 if ub > 0 else 0.0
    eps = 1e-14
    if c >= 1.0:
        # F(w) >= (c - 1) ||g0|| ||g_w|| >= 0, so a w with g_w = 0 (if any) is optimal
        if k == 2:
            a = min_norm_2(M[0][0], M[0][1], M[1][1])
            alpha = [a, 1.0 - a]
        else:
            alpha, _ = _min_norm_list(M, 1000, 1e-10)
        if _dot(alpha, _matvec(M, alpha)) <= eps:
            return alpha, 0

    def value_grad(w: Vec) -> tuple[float, Vec]:
        Mw = _matvec(M, w)
        norm = math.sqrt(max(_dot(w, Mw), 0.0) + eps)
        return _dot(b, w) + root_phi * norm, [bi + root_phi * mi / norm for bi, mi in zip(b, Mw)]

    w = uniform
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


def nash_bargaining(
    M: Tensor, *, alpha0: Tensor | None = None, max_iter: int = 100, tol: float = 1e-10, ridge: float = 1e-10
) -> tuple[Tensor, int]:
    """The Nash bargaining weights of Nash-MTL (Navon et al., ICML 2022, Claim 3.1): ``alpha > 0`` with
    ``(M alpha)_i = 1 / alpha_i`` for every task ``i``.

    This is the stationarity condition of the strictly convex problem
    ``min_{alpha > 0} f(alpha) = 1/2 alpha^T M alpha - sum_i log alpha_i``, which we solve by damped Newton:
    direction ``-(M + diag(1/alpha^2))^{-1} (M alpha - 1/alpha)``, step shortened to stay 1% inside
    ``alpha > 0`` and then halved until ``f`` decreases sufficiently (Armijo), until
    ``max_i |alpha_i (M alpha)_i - 1| < tol`` or ``max_iter`` steps. ``M`` is regularised as
    ``M + ridge * mean(diag M) * I`` so a solution exists when the gradients are linearly dependent with a
    non-negative null combination (e.g. ``g1 = -g2``, or a zero gradient): the affected weights then become
    large (about ``1 / sqrt(ridge)`` times the typical scale) instead of infinite. Started from ``alpha0``
    (the previous solution) if it is usable, else from ``1 / sqrt(diag M)``.

    Unlike the official code (a sequence of cvxpy problems, 20 iterations), this solves the condition to
    ``tol``; the solution is unique when ``M`` is positive definite, so both aim at the same point.
    Returns ``(alpha, iterations)`` for the matrix as given (not normalised).
    """
    k = M.shape[0]
    s = _scale(M)
    if s == 0.0:
        return torch.ones(k, dtype=M.dtype, device=M.device), 0
    A = M / s + ridge * torch.eye(k, dtype=M.dtype, device=M.device)
    if alpha0 is not None and alpha0.shape == (k,) and bool((alpha0 > 0).all()) and bool(alpha0.isfinite().all()):
        a = alpha0.to(M) * s**0.5  # solution for M / s is sqrt(s) times the solution for M
    else:
        a = A.diagonal().rsqrt()

    def value(x: Tensor) -> float:
        return float(0.5 * x @ A @ x - torch.log(x).sum())

    it = 0
    while it < max_iter:
        Aa = A @ a
        if float((a * Aa - 1.0).abs().max()) < tol:
            break
        it += 1
        grad = Aa - 1.0 / a
        d = -torch.linalg.solve(A + torch.diag(1.0 / a**2), grad)
        t = 1.0
        neg = d < 0
        if bool(neg.any()):
            t = min(1.0, 0.99 * float((-a[neg] / d[neg]).min()))
        f0, slope = value(a), float(grad @ d)
        while value(a + t * d) > f0 + 1e-4 * t * slope and t > 1e-12:
            t *= 0.5
        a = a + t * d
    return a / s**0.5, it
