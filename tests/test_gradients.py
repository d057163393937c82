"""Gradient modulation: aggregators against hand computations and brute-force references, the backward()
contract on a tiny model against naive per-task loops, shared property tests, and every config in
configs/gradient trained for a few steps."""

from __future__ import annotations

import copy
import io
import itertools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl import gradients as gm
from mtl.gradients import (
    GRADIENT_METHODS,
    GREAT,
    MGDAUB,
    AggregatingMethod,
    GradientMethod,
    GradVac,
    NashMTL,
    aggregate_aligned_mtl,
    aggregate_cagrad,
    aggregate_gradvac,
    aggregate_imtl_g,
    aggregate_mgda,
    aggregate_nash_mtl,
    aggregate_pcgrad,
    aggregate_sum,
    build_gradient_method,
    task_gradients,
)
from mtl.solvers import cagrad_dual, min_norm_simplex, project_simplex

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "gradient"
D64 = torch.float64


def rand_g(k: int, p: int, seed: int) -> Tensor:
    return torch.randn(k, p, dtype=D64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------------------


def exact_min_norm(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha, g)``: the min-norm point ``g`` of conv{g_i} and its weights, by enumerating supports: on each
    support solve the equality-constrained QP (KKT system), keep feasible solutions, take the smallest norm."""
    M = G @ G.T
    k = M.shape[0]
    best_val, best_w = math.inf, None
    for r in range(1, k + 1):
        for S in itertools.combinations(range(k), r):
            idx = list(S)
            K = torch.zeros(r + 1, r + 1, dtype=D64)
            K[:r, :r] = M[idx][:, idx]
            K[:r, r] = 1.0
            K[r, :r] = 1.0
            rhs = torch.zeros(r + 1, dtype=D64)
            rhs[r] = 1.0
            sol = torch.linalg.lstsq(K, rhs[:, None]).solution[:r, 0]
            if (sol < -1e-12).any() or abs(float(sol.sum()) - 1.0) > 1e-9:
                continue
            w = torch.zeros(k, dtype=D64)
            w[idx] = sol.clamp_min(0.0)
            val = float(w @ M @ w)
            if val < best_val:
                best_val, best_w = val, w
    assert best_w is not None
    return best_w, best_w @ G


def simplex_grid(k: int, n: int) -> Tensor:
    pts = [list(c) + [n - sum(c)] for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    return torch.tensor(pts, dtype=D64) / n


def naive_pcgrad(G: Tensor, orders: list[list[int]]) -> Tensor:
    out = []
    for i in range(G.shape[0]):
        gi = G[i].clone()
        for j in orders[i]:
            if j != i and gi @ G[j] < 0:
                gi = gi - (gi @ G[j]) / (G[j] @ G[j]) * G[j]
        out.append(gi)
    return torch.stack(out).sum(0)


# ----------------------------------------------------------------------------------------------------------------
# Aggregators on known vectors
# ----------------------------------------------------------------------------------------------------------------


def test_pcgrad_hand_computed() -> None:
    # g1 . g2 = -1 < 0: g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1)
    g, info = aggregate_pcgrad(torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=D64))
    torch.testing.assert_close(g, torch.tensor([0.5, 1.5], dtype=D64))
    torch.testing.assert_close(info["weights"], torch.tensor([2.0, 1.5], dtype=D64))  # g1' + g2' = 2 g1 + 1.5 g2
    g, _ = aggregate_pcgrad(torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=D64))  # no conflict: plain sum
    torch.testing.assert_close(g, torch.tensor([2.0, 1.0], dtype=D64))


def test_pcgrad_matches_naive_projection_loop_in_the_same_random_orders() -> None:
    G = rand_g(4, 6, 1)
    gen = torch.Generator().manual_seed(3)
    orders = [torch.randperm(4, generator=gen).tolist() for _ in range(4)]
    g, _ = aggregate_pcgrad(G, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(g, naive_pcgrad(G, orders))
    assert not torch.allclose(g, G.sum(0))  # the instance does conflict


@pytest.mark.parametrize("k", [2, 3, 4])
def test_mgda_is_the_exact_min_norm_point(k: int) -> None:
    for seed in range(8):
        G = rand_g(k, 6, 10 * k + seed) + (0.5 if seed % 2 else 0.0)  # half of them with a common component
        g, info = aggregate_mgda(G)
        _, ref = exact_min_norm(G)
        scale = float(G.norm(dim=1).mean())
        assert float(g @ g) <= float(ref @ ref) + 1e-9 * scale**2
        torch.testing.assert_close(g, ref, atol=1e-5 * scale, rtol=0)
        w = info["weights"]
        assert float(w.min()) >= 0 and abs(float(w.sum()) - 1) < 1e-12
        if k <= 3:  # a dense grid over the simplex cannot do better either
            W = simplex_grid(k, 300 if k == 2 else 120)
            assert float(g @ g) <= float(((W @ G) ** 2).sum(1).min()) + 1e-12


def test_mgda_two_tasks_closed_form_by_hand() -> None:
    g1, g2 = torch.tensor([2.0, 0.0], dtype=D64), torch.tensor([0.0, 1.0], dtype=D64)
    # a = (g2.g2 - g1.g2) / ||g1 - g2||^2 = 1 / 5
    g, info = aggregate_mgda(torch.stack([g1, g2]))
    torch.testing.assert_close(info["weights"], torch.tensor([0.2, 0.8], dtype=D64))
    torch.testing.assert_close(g, torch.tensor([0.4, 0.8], dtype=D64))
    g, info = aggregate_mgda(torch.stack([g1, 3 * g1]))  # one dominates: the shorter one alone
    torch.testing.assert_close(g, g1)


def test_mgda_normalizations() -> None:
    G = rand_g(3, 5, 7)
    losses = torch.tensor([0.5, 2.0, 1.0], dtype=D64)
    norms = G.norm(dim=1)
    for name, n in [("l2", norms), ("loss", losses), ("loss+", losses * norms)]:
        _, info = aggregate_mgda(G, losses, normalization=name)
        alpha_ref, _ = exact_min_norm(G / n[:, None])
        torch.testing.assert_close(info["weights"], alpha_ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positive"):
        aggregate_mgda(G, torch.tensor([1.0, -1.0, 1.0]), normalization="loss")
    with pytest.raises(ValueError, match="normalization"):
        build_gradient_method("mgda", normalization="L2")


def cagrad_dual_value(M: Tensor, w: Tensor, c: float) -> Tensor:
    """F(w) = g_w . g0 + c ||g0|| ||g_w|| for rows w [n, k]."""
    b = M.mean(1)
    return w @ b + c * M.mean().sqrt() * ((w @ M) * w).sum(-1).clamp_min(0).sqrt()


@pytest.mark.parametrize("k", [2, 3])
def test_cagrad_dual_solution_beats_a_dense_grid(k: int) -> None:
    W = simplex_grid(k, 2000 if k == 2 else 150)
    for seed, c in itertools.product(range(4), [0.2, 0.5, 0.9, 2.0]):
        G = rand_g(k, 5, 100 + seed)
        M = G @ G.T
        w, _ = cagrad_dual(M, c)
        assert abs(float(w.sum()) - 1) < 1e-12 and float(w.min()) >= 0
        assert float(cagrad_dual_value(M, w, c)) <= float(cagrad_dual_value(M, W, c).min()) + 1e-10


def test_cagrad_primal_properties() -> None:
    """d maximises min_i g_i . d over the ball ||d - g0|| <= c ||g0|| (the paper's problem), lies on its
    boundary, c = 0 gives g0, and rescale divides by 1 + c^2."""
    gen = torch.Generator().manual_seed(0)
    for seed, c in itertools.product(range(3), [0.3, 0.5, 0.8]):
        G = rand_g(3, 4, 200 + seed)
        g0 = G.mean(0)
        d, _ = aggregate_cagrad(G, c=c, rescale=False)
        radius = c * float(g0.norm())
        assert abs(float((d - g0).norm()) - radius) < 1e-6 * radius
        u = torch.randn(20000, 4, dtype=D64, generator=gen)
        cand = g0 + radius * u / u.norm(dim=1, keepdim=True) * torch.rand(20000, 1, dtype=D64, generator=gen) ** 0.25
        best_sampled = float((cand @ G.T).min(1).values.max())
        assert float((G @ d).min()) >= best_sampled - 1e-9
        scaled, _ = aggregate_cagrad(G, c=c)
        torch.testing.assert_close(scaled, d / (1 + c**2))
    G = rand_g(3, 4, 9)
    g, _ = aggregate_cagrad(G, c=0.0)
    torch.testing.assert_close(g, G.mean(0))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_imtl_g_equal_projections_on_unit_gradients(k: int) -> None:
    for seed in range(5):
        G = rand_g(k, 8, 300 + seed) + 0.3
        g, info = aggregate_imtl_g(G)
        proj = (G / G.norm(dim=1, keepdim=True)) @ g
        torch.testing.assert_close(proj, proj.mean().expand(k), rtol=1e-9, atol=1e-12)
        assert abs(float(info["weights"].sum()) - 1) < 1e-9
        torch.testing.assert_close(info["weights"] @ G, g)


@pytest.mark.parametrize("normalize", [True, False])
def test_nash_mtl_bargaining_condition(normalize: bool) -> None:
    for k, seed in itertools.product([2, 3, 5], range(3)):
        G = rand_g(k, 7, 400 + seed) * 3.0
        g, info = aggregate_nash_mtl(G, normalize=normalize, max_norm=0.0)
        alpha = info["alpha"]
        M = G @ G.T
        if normalize:
            M = M / torch.linalg.matrix_norm(M)
        assert float(alpha.min()) > 0
        torch.testing.assert_close(alpha * (M @ alpha), torch.ones(k, dtype=D64), atol=1e-7, rtol=0)
        torch.testing.assert_close(g, alpha @ G)
        clipped, _ = aggregate_nash_mtl(G, normalize=normalize, max_norm=0.5)
        torch.testing.assert_close(clipped, g * min(1.0, 0.5 / float(g.norm())))


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_aligned_mtl_equal_singular_values(mode: str) -> None:
    for k, seed in itertools.product([2, 3, 4], range(3)):
        G = rand_g(k, 9, 500 + seed) + torch.linspace(0, 1, 9, dtype=D64)
        g, info = aggregate_aligned_mtl(G, scale_mode=mode)  # type: ignore[arg-type]
        aligned = info["transform"] @ G
        sv = torch.linalg.svdvals(G)  # descending
        target = {"min": sv[-1], "median": (sv**2).sort().values[(k - 1) // 2].sqrt(), "rmse": (sv**2).mean().sqrt()}
        torch.testing.assert_close(aligned @ aligned.T, target[mode] ** 2 * torch.eye(k, dtype=D64))
        torch.testing.assert_close(torch.linalg.svdvals(aligned), target[mode].expand(k))
        torch.testing.assert_close(g, aligned.sum(0))


def test_aligned_mtl_rank_deficient() -> None:
    G = rand_g(2, 6, 9)
    G = torch.cat([G, (G[0] + G[1])[None]])  # rank 2
    g, info = aggregate_aligned_mtl(G)
    assert float(info["rank"]) == 2
    aligned = info["transform"] @ G
    sv = torch.linalg.svdvals(aligned)
    torch.testing.assert_close(sv[:2], torch.linalg.svdvals(G)[1].expand(2))
    assert float(sv[2]) < 1e-6 and torch.isfinite(g).all()


def test_gradvac_ema_and_adjustment_by_hand() -> None:
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=D64)
    phi = -1 / math.sqrt(2)
    beta = 0.25
    # step 1: targets 0, so the adjustment is PCGrad's projection; targets become beta * phi
    g, info = aggregate_gradvac(G, beta=beta)
    torch.testing.assert_close(g, torch.tensor([0.5, 1.5], dtype=D64))
    T = info["targets"]
    torch.testing.assert_close(T, torch.tensor([[0.0, beta * phi], [beta * phi, 0.0]], dtype=D64))
    # step 2: phi < target = beta * phi: g_i' = g_i + a_i g_j with the paper's coefficient
    t = beta * phi
    n1, n2 = 1.0, math.sqrt(2.0)
    a1 = n1 * (t * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - t**2)) / (n2 * math.sqrt(1 - t**2))
    a2 = n2 * (t * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - t**2)) / (n1 * math.sqrt(1 - t**2))
    g1, g2 = G[0] + a1 * G[1], G[1] + a2 * G[0]
    g, info = aggregate_gradvac(G, T, beta=beta)
    torch.testing.assert_close(g, g1 + g2)
    assert F.cosine_similarity(g1, G[1], dim=0) == pytest.approx(t)  # the adjusted cosine meets the target
    t_new = (1 - beta) * t + beta * phi
    torch.testing.assert_close(info["targets"], torch.tensor([[0.0, t_new], [t_new, 0.0]], dtype=D64))
    # a pair already above its target is left alone, only the EMA moves
    g, info = aggregate_gradvac(G, torch.full((2, 2), -0.9, dtype=D64), beta=beta)
    torch.testing.assert_close(g, G.sum(0))
    assert float(info["targets"][0, 1]) == pytest.approx(0.75 * -0.9 + 0.25 * phi)


def test_project_simplex_against_a_grid() -> None:
    W = simplex_grid(3, 200)
    for seed in range(5):
        v = torch.randn(3, dtype=D64, generator=torch.Generator().manual_seed(seed)) * 2
        p = project_simplex(v)
        assert float((p - v).norm()) <= float((W - v).norm(dim=1).min()) + 1e-12


def test_min_norm_solver_stops_early_on_easy_problems() -> None:
    G = torch.eye(4, dtype=D64)
    alpha, iters = min_norm_simplex(G @ G.T)
    torch.testing.assert_close(alpha, torch.full((4,), 0.25, dtype=D64))
    assert iters <= 4  # the exact active-set solver: at most one step per vertex of the support


def _tensor_min_norm_simplex(M: Tensor, max_iter: int = 1000, tol: float = 1e-10) -> tuple[Tensor, int]:
    """The same away-step Frank-Wolfe iteration as :func:`min_norm_simplex` (k > 2), on float64 tensors."""
    k = M.shape[0]
    M = M / float(M.diagonal().mean())
    alpha = torch.full((k,), 1.0 / k, dtype=D64)
    it = 0
    while it < max_iter:
        Ma = M @ alpha
        aMa = float(alpha @ Ma)
        s_idx = int(torch.argmin(Ma))
        gap_fw = aMa - float(Ma[s_idx])
        # the relative KKT test: g . g_j >= ||g||^2 - tol ||g_j|| ||g|| less the Gram matrix's rounding
        n = M.diagonal().sqrt()
        S = float(alpha @ n)
        noise = 4.0 * k * torch.finfo(D64).eps * S * (S + n)
        if float(((aMa - Ma - noise) / (n * max(aMa, 0.0) ** 0.5)).max()) <= tol:
            break
        it += 1
        v_idx = int(torch.argmax(Ma.masked_fill(alpha <= 0, float("-inf"))))
        gap_away = float(Ma[v_idx]) - aMa
        if gap_fw >= gap_away:
            d = -alpha
            d[s_idx] += 1.0
            step_max = 1.0
        else:
            d = alpha.clone()
            d[v_idx] -= 1.0
            av = float(alpha[v_idx])
            step_max = av / (1.0 - av) if av < 1.0 else 1.0
        dMd, slope = float(d @ M @ d), float(Ma @ d)
        step = step_max if dMd <= 0.0 else min(max(-slope / dMd, 0.0), step_max)
        alpha = alpha + step * d
        if gap_fw < gap_away and step == step_max:
            alpha[v_idx] = 0.0
        alpha = alpha.clamp_min(0.0)
        alpha = alpha / alpha.sum()
    return alpha, it


def _list_cagrad_pgd(M: Tensor, c: float) -> tuple[Tensor, int]:
    """The first phase of :func:`mtl.solvers.cagrad_direction`: projected BB descent on the dual (lists)."""
    from mtl import solvers

    k = M.shape[0]
    Ml = [[x / float(M.diagonal().mean()) for x in r] for r in M.tolist()]
    b = [sum(r) / k for r in Ml]
    w, it = solvers._cagrad_pgd(Ml, b, c * (sum(b) / k) ** 0.5, 1000, 1e-9)
    return torch.tensor(w, dtype=D64), it


def _tensor_cagrad_dual(M: Tensor, c: float, max_iter: int = 1000, tol: float = 1e-9) -> tuple[Tensor, int]:
    """The same projected BB descent as :func:`mtl.solvers._cagrad_pgd` (k > 1), on float64 tensors."""
    k = M.shape[0]
    M = M / float(M.diagonal().mean())
    w = torch.full((k,), 1.0 / k, dtype=D64)
    b = M @ w
    root_phi, eps = c * float(w @ b) ** 0.5, 1e-14

    def value_grad(x: Tensor) -> tuple[float, Tensor]:
        Mx = M @ x
        norm = torch.sqrt((x @ Mx).clamp_min(0.0) + eps)
        return float(b @ x + root_phi * norm), b + root_phi * Mx / norm

    def project(v: Tensor) -> Tensor:
        u, _ = torch.sort(v, descending=True)
        css = torch.cumsum(u, 0) - 1.0
        rho = int((u - css / torch.arange(1, k + 1, dtype=D64) > 0).nonzero().max())
        return (v - css[rho] / (rho + 1)).clamp_min(0.0)

    f, grad = value_grad(w)
    step, stalled, it = 1.0, 0, 0
    while it < max_iter and stalled < 10:
        if float(grad @ w - grad.min()) < tol:
            break
        it += 1
        step = min(step, 10.0 / max(float(grad.abs().max()), 1e-30))
        while True:
            new = project(w - step * grad)
            d = new - w
            f_new, grad_new = value_grad(new)
            if f_new <= f + float(grad @ d) + float(d @ d) / (2.0 * step) + 1e-15 or step < 1e-12:
                break
            step *= 0.5
        sy = float(d @ (grad_new - grad))
        step = min(max(float(d @ d) / sy, 1e-10), 1e10) if sy > 1e-30 else min(2.0 * step, 1e10)
        stalled = stalled + 1 if f - f_new <= 1e-14 else 0
        w, f, grad = new, f_new, grad_new
    return w, it


def _list_frank_wolfe(M: Tensor) -> tuple[Tensor, int]:
    """min_norm_simplex's Frank-Wolfe fallback (it tries the exact active-set solver first)."""
    from mtl import solvers

    s = float(M.diagonal().mean())
    alpha, it = solvers._min_norm_list([[x / s for x in r] for r in M.tolist()], 1000, 1e-10)
    return torch.tensor(alpha, dtype=D64), it


@pytest.mark.parametrize("k", [3, 5, 8, 12])
def test_list_solvers_match_the_same_iterations_on_tensors(k: int) -> None:
    """The solvers iterate on Python floats; the same iterations on float64 tensors give the same answer
    on conflicting and on aligned gradients: the same iterates up to rounding (torch's dot products and sums
    add in another order), so the same iteration count and weights equal to 1e-12, except where the stopping
    test's gap lands within rounding of ``tol``: then one more or one fewer step, weights that differ at the
    level of the solver's tolerance, and the same objective value."""
    exact = 0
    for seed in range(6):
        G = rand_g(k, 40, seed) + (seed % 3) * rand_g(1, 40, 100 + seed)
        M = G @ G.T
        for (x, iters), (ref, ref_iters) in [
            (_list_frank_wolfe(M), _tensor_min_norm_simplex(M)),
            (_list_cagrad_pgd(M, 0.5), _tensor_cagrad_dual(M, 0.5)),
        ]:
            if iters == ref_iters:
                exact += 1
                torch.testing.assert_close(x, ref, rtol=0, atol=1e-12)
            else:
                assert abs(iters - ref_iters) == 1
                torch.testing.assert_close(x, ref, rtol=0, atol=1e-8)
                scale = float(M.diagonal().mean())
                assert float(x @ M @ x) == pytest.approx(float(ref @ M @ ref), abs=1e-14 * scale)
    assert exact >= 10  # of 12


# ----------------------------------------------------------------------------------------------------------------
# Shared property tests over every aggregator
# ----------------------------------------------------------------------------------------------------------------

Aggregate = Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]
AGGREGATORS: dict[str, tuple[Aggregate, bool]] = {  # name -> (aggregate, deterministic for every k)
    "sum": (aggregate_sum, True),
    "pcgrad": (lambda G: aggregate_pcgrad(G, generator=torch.Generator().manual_seed(0)), False),
    "gradvac": (lambda G: aggregate_gradvac(G, generator=torch.Generator().manual_seed(0)), False),
    "cagrad": (aggregate_cagrad, True),
    "mgda": (aggregate_mgda, True),
    "mgda_l2": (lambda G: aggregate_mgda(G, normalization="l2"), True),
    "imtl_g": (aggregate_imtl_g, True),
    "aligned_mtl": (aggregate_aligned_mtl, True),
    "nash_mtl": (aggregate_nash_mtl, True),
}


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_permutation_invariance(name: str) -> None:
    agg, deterministic = AGGREGATORS[name]
    for k in [2, 4] if deterministic else [2]:  # random orders only coincide for two tasks
        G = rand_g(k, 7, 600 + k) + 0.2
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
        g, _ = agg(G)
        g_perm, info = agg(G[perm])
        torch.testing.assert_close(g_perm, g, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(info["weights"] @ G[perm], g_perm)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_single_task_and_zero_gradients(name: str) -> None:
    agg, _ = AGGREGATORS[name]
    G = rand_g(1, 5, 7)
    g, _ = agg(G)
    torch.testing.assert_close(g, G[0])
    for G in [torch.zeros(3, 5, dtype=D64), torch.cat([torch.zeros(1, 5, dtype=D64), rand_g(2, 5, 8)])]:
        g, info = agg(G)
        assert torch.isfinite(g).all() and torch.isfinite(info["weights"]).all()
    g, _ = agg(torch.zeros(3, 5))
    assert g.dtype == torch.float32 and torch.equal(g, torch.zeros(5))
    G = rand_g(2, 5, 9)
    g, _ = agg(torch.stack([G[0], -G[0], G[1]]))  # exactly opposed gradients
    assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------------------------------------------
# backward() on a tiny model
# ----------------------------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """Shared body -> representation z -> one small MLP head per task (non-linear, so that the direction of
    dL_i/dz depends on z and GREAT has something to act on); ``log_w`` is a non-shared weighting parameter
    (uncertainty-style), so the losses handed to backward() are already weighted."""

    def __init__(self, k: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(5, 4)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)) for _ in range(k))
        self.log_w = nn.Parameter(torch.linspace(-0.2, 0.2, k))

    def forward(self, x: Tensor, y: Tensor, zero: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        z = torch.tanh(self.body(x))
        losses = {}
        for i, h in enumerate(self.heads):
            out = h(z).squeeze(-1) * (0.0 if zero else 1.0)
            losses[f"t{i}"] = torch.exp(-self.log_w[i]) * F.mse_loss(out, y[:, i]) + 0.5 * self.log_w[i]
        return z, losses

    def shared(self) -> list[nn.Parameter]:
        return list(self.body.parameters())

    def others(self) -> list[nn.Parameter]:
        return [*self.heads.parameters(), self.log_w]


def batch(k: int = 2, n: int = 24, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen)
    proj = torch.randn(5, k, generator=gen)
    proj[:, 1:] -= proj[:, :1]  # tasks that partly conflict
    return x, torch.tanh(x @ proj) + 0.1 * torch.randn(n, k, generator=gen)


def naive_jacobian(losses: dict[str, Tensor], params: list[Tensor]) -> Tensor:
    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def flat_grad(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def run_backward(method: GradientMethod, model: Tiny, x: Tensor, y: Tensor, **kw: bool) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    z, losses = model(x, y, **kw)
    return method.backward(losses, model.shared(), others=model.others(), representation=z)


def plain_grads(model: Tiny, x: Tensor, y: Tensor, params: list[nn.Parameter]) -> Tensor:
    _, losses = model(x, y)
    grads = torch.autograd.grad(sum(losses.values()), params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


METHOD_KWARGS: list[tuple[str, dict[str, object]]] = [(name, {}) for name in GRADIENT_METHODS] + [
    ("mgda", {"normalization": "loss+"}),
    ("mgda", {"normalization": "l2"}),
    ("cagrad", {"c": 0.9, "rescale": False}),
    ("aligned_mtl", {"scale_mode": "median"}),
    ("nash_mtl", {"max_norm": 0.0}),
]


@pytest.mark.parametrize(("name", "kwargs"), METHOD_KWARGS, ids=lambda v: str(v))
def test_backward_matches_naive_loops(name: str, kwargs: dict[str, object]) -> None:
    k = 3
    model, (x, y) = Tiny(k), batch(k)
    method = build_gradient_method(name, seed=5, **kwargs)
    stats = run_backward(method, model, x, y)
    assert all(math.isfinite(v) for v in stats.values())
    # non-shared parameters: the plain gradient of sum(losses)
    torch.testing.assert_close(flat_grad(model.others()), plain_grads(model, x, y, model.others()))
    shared = flat_grad(model.shared())
    if name == "none":
        torch.testing.assert_close(shared, plain_grads(model, x, y, model.shared()))
    elif isinstance(method, AggregatingMethod):
        _, losses = model(x, y)
        G = naive_jacobian(losses, model.shared())
        reference = build_gradient_method(name, seed=5, **kwargs)
        assert isinstance(reference, AggregatingMethod)
        g, info = reference.aggregate(G, torch.stack(list(losses.values())).detach())
        torch.testing.assert_close(shared, g)
        assert stats["batched"] == 1.0
        assert [stats[f"weight/t{i}"] for i in range(k)] == pytest.approx(info["weights"].tolist())
        cos = F.cosine_similarity(G[:, None], G[None], dim=-1)[tuple(torch.triu_indices(k, k, 1))]
        assert stats["cos_mean"] == pytest.approx(float(cos.mean()), abs=1e-6)
        assert stats["conflicts"] == float((cos < 0).sum())
        assert stats["norm"] == pytest.approx(float(g.norm()), rel=1e-5)


def test_batched_and_loop_jacobians_agree() -> None:
    model, (x, y) = Tiny(3), batch(3)
    _, losses = model(x, y)
    L = torch.stack(list(losses.values()))
    params = [*model.shared(), nn.Parameter(torch.ones(2))]  # one unused parameter: zero columns
    G_b, used_b = task_gradients(L, params, batched=True)
    G_l, used_l = task_gradients(L, params, batched=False)
    assert (used_b, used_l) == (True, False)
    torch.testing.assert_close(G_b, G_l, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(G_b, naive_jacobian(losses, params), rtol=1e-6, atol=1e-7)
    assert torch.equal(G_b[:, -2:], torch.zeros(3, 2))


class _NoVmap(torch.autograd.Function):
    """Identity whose backward calls .item(), which batched autograd (vmap) cannot run."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad * (1.0 if grad.abs().sum().item() >= 0 else 0.0)


def test_loop_fallback_when_batched_autograd_raises() -> None:
    model, (x, y) = Tiny(2), batch(2)
    method = build_gradient_method("pcgrad")
    model.zero_grad(set_to_none=True)
    z = torch.tanh(_NoVmap.apply(model.body(x)))
    losses = {f"t{i}": F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(model.heads)}
    with pytest.warns(UserWarning, match="batched autograd failed"):
        stats = method.backward(losses, model.shared(), others=model.others())
    assert stats["batched"] == 0.0
    z = torch.tanh(model.body(x))
    losses = {f"t{i}": F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(model.heads)}
    g, _ = aggregate_pcgrad(naive_jacobian(losses, model.shared()), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flat_grad(model.shared()), g)


def test_mgda_ub_uses_min_norm_weights_of_representation_gradients() -> None:
    k = 3
    model, (x, y) = Tiny(k), batch(k)
    stats = run_backward(MGDAUB(), model, x, y)
    z, losses = model(x, y)
    Jz = naive_jacobian(losses, [z])
    alpha, g = exact_min_norm(Jz.double())
    alpha = alpha.float()
    assert float(g.norm()) > 0
    assert [stats[f"weight/t{i}"] for i in range(k)] == pytest.approx(alpha.tolist(), abs=1e-4)
    weighted = sum(a * loss for a, loss in zip(alpha, losses.values()))
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(weighted, model.shared())])
    torch.testing.assert_close(flat_grad(model.shared()), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(flat_grad(model.others()), plain_grads(model, x, y, model.others()))


def test_nash_mtl_reuses_weights_between_updates() -> None:
    model, (x, y) = Tiny(3), batch(3)
    method = NashMTL(update_every=2)
    first = run_backward(method, model, x, y)
    assert first["updated"] == 1.0
    alpha = method.alpha
    assert alpha is not None
    x2, y2 = batch(3, seed=1)
    second = run_backward(method, model, x2, y2)
    assert second["updated"] == 0.0 and torch.equal(method.alpha, alpha)
    _, losses = model(x2, y2)
    G = naive_jacobian(losses, model.shared()).double()
    g = alpha @ G
    torch.testing.assert_close(
        flat_grad(model.shared()).double(), g * min(1.0, 1.0 / float(g.norm())), rtol=1e-5, atol=1e-7
    )
    assert run_backward(method, model, x, y)["updated"] == 1.0


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_single_task_gives_the_plain_gradient(name: str) -> None:
    model, (x, y) = Tiny(1), batch(1)
    run_backward(build_gradient_method(name), model, x, y)
    torch.testing.assert_close(flat_grad(model.shared()), plain_grads(model, x, y, model.shared()))


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_zero_task_gradients_stay_finite(name: str) -> None:
    model, (x, y) = Tiny(3), batch(3)
    stats = run_backward(build_gradient_method(name), model, x, y, zero=True)
    assert all(math.isfinite(v) for v in stats.values())
    assert torch.equal(flat_grad(model.shared()), torch.zeros(24))
    assert torch.isfinite(flat_grad(model.others())).all()


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_state_dict_round_trip_resumes_exactly(name: str) -> None:
    kwargs = {"update_every": 2} if name == "nash_mtl" else {}
    model = Tiny(3)
    a = build_gradient_method(name, seed=1, **kwargs)
    for step in range(3):
        run_backward(a, model, *batch(3, seed=step))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build_gradient_method(name, seed=99, **kwargs)  # a different seed: everything must come from the state
    b.load_state_dict(torch.load(buf, weights_only=False))
    for step in range(2):  # for Nash-MTL one step reusing the weights, one solving again
        stats_a = run_backward(a, model, *batch(3, seed=10 + step))
        grads_a = flat_grad(model.shared())
        stats_b = run_backward(b, model, *batch(3, seed=10 + step))
        torch.testing.assert_close(flat_grad(model.shared()), grads_a, rtol=0, atol=0)
        assert stats_a == stats_b
    assert set(a.state_dict()) == set(b.state_dict())


def test_registry_and_errors() -> None:
    for name, cls in GRADIENT_METHODS.items():
        assert cls.name == name
        assert isinstance(build_gradient_method(name, seed=3), cls)
    assert {n for n, c in GRADIENT_METHODS.items() if c.requires_representation} == {"mgda_ub", "great"}
    with pytest.raises(ValueError, match="unknown gradient method"):
        build_gradient_method("pcgard")
    model, (x, y) = Tiny(2), batch(2)
    _, losses = model(x, y)
    with pytest.raises(ValueError, match="representation"):
        MGDAUB().backward(losses, model.shared(), others=model.others())
    with pytest.raises(ValueError, match="scalar"):
        build_gradient_method("pcgrad").backward({"a": torch.ones(3, requires_grad=True)}, model.shared())
    with pytest.raises(ValueError, match="both"):
        build_gradient_method("pcgrad").backward(losses, model.shared(), others=model.parameters())
    with pytest.raises(ValueError, match="beta"):
        GradVac(beta=2.0)


# ----------------------------------------------------------------------------------------------------------------
# GREAT
# ----------------------------------------------------------------------------------------------------------------


def test_great_discriminator_learns_on_a_frozen_body() -> None:
    model, (x, y) = Tiny(2), batch(2, n=32)
    method = GREAT(lr=1e-2, seed=0)
    accs = [run_backward(method, model, x, y)["disc_acc"] for _ in range(80)]
    assert accs[0] < 0.8
    assert min(accs[-10:]) > 0.95


def test_great_reverses_the_adversarial_gradient_on_the_body() -> None:
    lam = 0.5
    model, (x, y) = Tiny(2), batch(2)
    method = GREAT(lam=lam, seed=0)
    run_backward(method, model, x, y)  # builds the discriminator and trains it one step
    assert method.discriminator is not None
    disc = copy.deepcopy(method.discriminator)
    run_backward(method, model, x, y)
    total = flat_grad(model.shared())
    # naive: L_disc of the row-normalised per-task gradients (loop, no reversal), differentiated w.r.t. the body
    z, losses = model(x, y)
    J = torch.stack([torch.autograd.grad(loss, z, create_graph=True)[0] for loss in losses.values()])
    R = J / J.norm(dim=-1, keepdim=True)
    labels = torch.arange(2).repeat_interleave(z.shape[0])
    disc_loss = F.cross_entropy(disc(R.reshape(-1, z.shape[1])), labels)
    naive = torch.cat([g.reshape(-1) for g in torch.autograd.grad(disc_loss, model.shared())])
    adversarial = total - plain_grads(model, x, y, model.shared())
    assert float(naive.norm()) > 1e-4
    torch.testing.assert_close(adversarial, -lam * naive, rtol=1e-3, atol=1e-6)
    # the discriminator itself descends its loss: it changed, and the heads got the plain gradient
    assert not torch.equal(disc[0].weight, method.discriminator[0].weight)
    torch.testing.assert_close(flat_grad(model.others()), plain_grads(model, x, y, model.others()))


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------


def test_every_method_has_a_config() -> None:
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(GRADIENT_METHODS)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_instantiates_and_trains(path: Path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    text = path.read_text()
    assert text.startswith("#"), "the first line names the paper"
    method = instantiate(OmegaConf.load(path))()
    assert isinstance(method, GRADIENT_METHODS[path.stem])
    assert isinstance(instantiate(OmegaConf.load(path))(seed=3), GradientMethod)
    model, (x, y) = Tiny(3), batch(3, n=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    totals = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        z, losses = model(x, y)
        totals.append(float(sum(losses.values()).detach()))
        method.backward(losses, model.shared(), others=model.others(), representation=z)
        opt.step()
    assert totals[-1] < totals[0] - 0.05, totals


def test_gradient_modules_import_torch_only() -> None:
    import ast

    for mod in (gm.__file__, gm.solvers.__file__):
        roots = set()
        for node in ast.walk(ast.parse(Path(mod).read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots.add((node.module or "").split(".")[0])
        allowed = {"__future__", "collections", "copy", "itertools", "math", "typing", "warnings", "torch", "mtl"}
        assert roots <= allowed, roots
