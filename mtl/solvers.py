"""Small solvers on a k x k Gram matrix ``M = G G^T`` of task gradients (k = number of tasks).

Pure functions of tensors, used by :mod:`mtl.gradients`. They are meant for k of at most a few dozen and
run on whatever device ``M`` lives on; :mod:`mtl.gradients` hands them a float64 CPU copy, so each
iteration costs microseconds and the accelerator is synchronised once per step.

Every solver is invariant to a positive rescaling of the gradients (it normalises ``M`` internally), so
gradients of any magnitude, including all-zero ones, give finite answers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _scale(M: Tensor) -> float:
    """Mean of the diagonal: the squared norm of a typical task gradient (0 if all gradients are 0)."""
    return float(M.diagonal().mean().clamp_min(0.0))


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v [k]`` onto the probability simplex (Duchi et al., ICML 2008)."""
    k = v.shape[0]
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    ind = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    positive = (u - css / ind > 0).nonzero()
    if positive.numel() == 0:  # only for non-finite input
        raise ValueError(f"project_simplex needs a finite vector, got {v.tolist()}")
    rho = int(positive.max())
    theta = css[rho] / (rho + 1)
    return (v - theta).clamp_min(0.0)


def min_norm_2(m11: float, m12: float, m22: float) -> float:
    """Closed form of ``argmin_{a in [0, 1]} ||a g1 + (1 - a) g2||^2`` from the Gram entries.

    ``a = clip((m22 - m12) / (m11 + m22 - 2 m12), 0, 1)``; 0.5 when ``g1 == g2`` (every ``a`` is optimal).
    Sener & Koltun's ``_min_norm_element_from2`` clips to [0.001, 0.999] instead; we return the exact optimum.
    """
    den = m11 + m22 - 2.0 * m12
    if den <= 1e-12 * max(m11 + m22, 1e-300):
        return 0.5
    return min(max((m22 - m12) / den, 0.0), 1.0)


def min_norm_simplex(M: Tensor, *, max_iter: int = 1000, tol: float = 1e-10) -> tuple[Tensor, int]:
    """Weights ``alpha`` on the simplex minimising ``alpha^T M alpha`` (the min-norm point of the convex hull).

    k = 1: ``[1]``; k = 2: :func:`min_norm_2`; k > 2: Frank-Wolfe with exact line search started from the
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
    s = _scale(M)
    if s == 0.0:
        return torch.full((k,), 1.0 / k, dtype=M.dtype, device=M.device), 0
    M = M / s
    if k == 2:
        a = min_norm_2(float(M[0, 0]), float(M[0, 1]), float(M[1, 1]))
        return torch.tensor([a, 1.0 - a], dtype=M.dtype, device=M.device), 0
    alpha = torch.full((k,), 1.0 / k, dtype=M.dtype, device=M.device)
    it = 0
    while it < max_iter:
        Ma = M @ alpha
        aMa = float(alpha @ Ma)
        s_idx = int(torch.argmin(Ma))
        gap_fw = aMa - float(Ma[s_idx])
        if gap_fw < tol:
            break
        it += 1
        v_idx = int(torch.argmax(Ma.masked_fill(alpha <= 0, float("-inf"))))
        gap_away = float(Ma[v_idx]) - aMa
        if gap_fw >= gap_away:  # towards e_s
            d = -alpha
            d[s_idx] += 1.0
            step_max = 1.0
        else:  # away from e_v
            d = alpha.clone()
            d[v_idx] -= 1.0
            av = float(alpha[v_idx])
            step_max = av / (1.0 - av) if av < 1.0 else 1.0
        dMd, slope = float(d @ M @ d), float(Ma @ d)
        step = step_max if dMd <= 0.0 else min(max(-slope / dMd, 0.0), step_max)
        alpha = alpha + step * d
        if gap_fw < gap_away and step == step_max:
            alpha[v_idx] = 0.0  # drop the vertex exactly
        alpha = alpha.clamp_min(0.0)
        alpha = alpha / alpha.sum()
    return alpha, it


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
    uniform = torch.full((k,), 1.0 / k, dtype=M.dtype, device=M.device)
    s = _scale(M)
    if k == 1 or s == 0.0:
        return uniform, 0
    M = M / s
    b = M @ uniform
    root_phi = c * float(uniform @ b) ** 0.5 if float(uniform @ b) > 0 else 0.0
    eps = 1e-14
    if c >= 1.0:
        # F(w) >= (c - 1) ||g0|| ||g_w|| >= 0, so a w with g_w = 0 (if any) is optimal
        alpha, _ = min_norm_simplex(M)
        if float(alpha @ M @ alpha) <= eps:
            return alpha, 0

    def value_grad(w: Tensor) -> tuple[float, Tensor]:
        Mw = M @ w
        norm = torch.sqrt((w @ Mw).clamp_min(0.0) + eps)
        return float(b @ w + root_phi * norm), b + root_phi * Mw / norm

    w = uniform
    f, grad = value_grad(w)
    step, stalled = 1.0, 0
    it = 0
    while it < max_iter and stalled < 10:
        if float(grad @ w - grad.min()) < tol:
            break
        it += 1
        step = min(step, 10.0 / max(float(grad.abs().max()), 1e-30))  # a longer step only projects further
        while True:
            new = project_simplex(w - step * grad)
            d = new - w
            f_new, grad_new = value_grad(new)
            if f_new <= f + float(grad @ d) + float(d @ d) / (2.0 * step) + 1e-15 or step < 1e-12:
                break
            step *= 0.5
        y = grad_new - grad
        sy = float(d @ y)
        step = min(max(float(d @ d) / sy, 1e-10), 1e10) if sy > 1e-30 else min(2.0 * step, 1e10)
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
