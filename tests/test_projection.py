"""mtl.projection: UPGrad, DualProj and ConFIG on the Gram matrix.

TorchJD 0.18 is the oracle (dev extra). Its UPGrad/DualProj solve the dual-cone QP with quadprog on
``M / trace(M) + reg_eps I`` (default ``reg_eps = 1e-4``): the default objects agree with ours only to ~1e-3, and
on rows whose norms span orders of magnitude the ridge swamps the small rows' constraints (shown below). So
the tight comparisons use TorchJD's own ``QuadprogProjector`` with ``reg_eps = 1e-12`` on the *equilibrated*
problem (unit rows, which leaves the dual cone unchanged), and the scale-free properties (non-conflict, KKT)
are checked directly. ConFIG is compared with TorchJD's ``ConFIG()`` as is, except where working on the Gram
changes the rank decision (near-duplicate rows; see ``config_weights``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from mtl.projection import config_weights, dualproj_weights, project_dual_cone, upgrad_weights

aggregation = pytest.importorskip("torchjd.aggregation")
linalg = pytest.importorskip("torchjd.linalg")

F64 = torch.float64
SETTINGS = settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The matrices here are tiny: intra-op threads only add synchronisation (milliseconds per op on a busy
    machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def t(x: object) -> Tensor:
    return torch.tensor(x, dtype=F64)


# --------------------------------------------------------------------------------------------------------------
# Jacobians: random rows with norms over 1e-3 .. 1e3, and structural edits (duplicates, opposite, zero, ...)
# --------------------------------------------------------------------------------------------------------------

EDITS = ("dup", "scaled_dup", "opposite", "zero", "near_dup", "sum")


@st.composite
def jacobians(draw: st.DrawFn, *, edits: tuple[str, ...] = EDITS, full_rank: bool = False) -> Tensor:
    """``G [k, P]`` float64 with k in 1..10: Gaussian rows of norms 10^[-3, 3]. ``full_rank``: P >= k + 2 and no
    edits (full row rank almost surely); otherwise P in {2, 3, 5, 20} (so k > rank happens) and up to three edits
    of one row from another: exact duplicate, positive multiple, negative multiple, zero, a 1e-9 relative
    perturbation, or the sum of two rows."""
    k = draw(st.integers(1, 10))
    P = draw(st.integers(k + 2, k + 8)) if full_rank else draw(st.sampled_from([2, 3, 5, 20]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    G = torch.randn(k, P, generator=gen, dtype=F64)
    logs = draw(st.lists(st.floats(-3.0, 3.0), min_size=k, max_size=k))
    G = G * torch.pow(10.0, t(logs))[:, None]
    if full_rank or k == 1:
        return G
    for op, i, j in draw(
        st.lists(st.tuples(st.sampled_from(edits), st.integers(0, k - 1), st.integers(0, k - 1)), max_size=3)
    ):
        if i == j:
            continue
        if op == "dup":
            G[i] = G[j]
        elif op == "scaled_dup":
            G[i] = 10.0 * G[j]
        elif op == "opposite":
            G[i] = -0.5 * G[j]
        elif op == "zero":
            G[i] = 0.0
        elif op == "near_dup":
            G[i] = G[j] + 1e-9 * G[j].norm() * torch.randn(P, generator=gen, dtype=F64) / math.sqrt(P)
        elif op == "sum":
            G[i] = G[j] + G[(j + 1) % k]
    return G


def gram(G: Tensor) -> Tensor:
    return G @ G.T


def scale_of(G: Tensor, w: Tensor) -> float:
    """``sum_i |w_i| ||g_i||``: the size of the terms summed in ``g = w^T G``, hence the scale of its rounding
    error (``g`` can be far smaller: near-opposite rows need large weights to cancel). With ``w = pref``, a bound
    on the norm of UPGrad's and DualProj's results."""
    return float((w.abs() * G.norm(dim=1)).sum())


def close(g: Tensor, ref: Tensor, scale: float, rtol: float) -> bool:
    return float((g - ref).norm()) <= rtol * max(scale, 1e-300)


# --------------------------------------------------------------------------------------------------------------
# TorchJD oracles
# --------------------------------------------------------------------------------------------------------------


def torchjd_projection(G: Tensor, U: Tensor, reg_eps: float = 1e-12) -> Tensor:
    """Rows of ``U [m, k]`` projected with TorchJD's ``QuadprogProjector`` on the equilibrated problem: with unit
    rows ``E = D^-1 G`` (zero rows dropped; the dual cone is the same) the projection of ``u^T G = (D u)^T E``
    has weights ``v = D^-1 y`` with ``y`` TorchJD's answer for ``D u`` and ``E E^T``. Zero rows keep ``v_i = u_i``."""
    norms = G.norm(dim=1)
    nz = norms > 0
    V = U.clone()
    if bool(nz.any()):
        E = G[nz] / norms[nz, None]
        Y = linalg.QuadprogProjector(norm_eps=0.0, reg_eps=reg_eps)(U[:, nz] * norms[nz], E @ E.T)
        V[:, nz] = Y / norms[nz]
    return V


def torchjd_upgrad(G: Tensor, pref: Tensor) -> Tensor:
    return torchjd_projection(G, torch.diag(pref)).sum(0) @ G


def torchjd_dualproj(G: Tensor, pref: Tensor) -> Tensor:
    return torchjd_projection(G, pref[None])[0] @ G


def uniform(k: int) -> Tensor:
    return torch.full((k,), 1.0 / k, dtype=F64)


# --------------------------------------------------------------------------------------------------------------
# Hand-derived cases
# --------------------------------------------------------------------------------------------------------------


def test_orthogonal_gradients_are_not_changed() -> None:
    G = t([[1.0, 0.0], [0.0, 2.0]])
    for fn in (upgrad_weights, dualproj_weights):
        w, info = fn(gram(G))
        assert w.tolist() == [0.5, 0.5]  # no conflict: exactly the mean
        assert info["converged"] == 1.0 and info["iters"] == 0.0
    # ConFIG: x = pinv(U) 1 = (1, 1), x_hat = (1, 1) / sqrt(2), length (1 + 2) / sqrt(2):
    # g = (1.5, 1.5) = 1.5 g1 + 0.75 g2
    w, info = config_weights(gram(G))
    torch.testing.assert_close(w, t([1.5, 0.75]), rtol=1e-14, atol=0)
    assert info["rank"] == 2.0 and float(info["residual"]) < 1e-15


def test_conflicting_pair_by_hand() -> None:
    """g1 = (1, 0), g2 = (-1, 1) (135 degrees). Dual cone: x1 >= 0, x2 >= x1. pi(g1) = (1/2, 1/2) = g1 + g2 / 2,
    pi(g2) = (0, 1) = g1 + g2, so UPGrad = ((1/2, 1/2) + (0, 1)) / 2 = (1/4, 3/4), w = (1, 3/4). The mean (0, 1/2)
    is in the cone: DualProj = mean. ConFIG: U x = 1 gives x = (1, 1 + sqrt 2) and g = x / (2 sqrt 2)."""
    G = t([[1.0, 0.0], [-1.0, 1.0]])
    M = gram(G)
    w, _ = upgrad_weights(M)
    torch.testing.assert_close(w, t([1.0, 0.75]), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(w @ G, t([0.25, 0.75]), rtol=1e-14, atol=1e-15)
    v, _ = project_dual_cone(M, t([1.0, 0.0]))
    torch.testing.assert_close(v, t([1.0, 0.5]), rtol=1e-14, atol=1e-15)
    w, _ = dualproj_weights(M)
    assert w.tolist() == [0.5, 0.5]
    w, _ = config_weights(M)
    torch.testing.assert_close(w @ G, t([1.0, 1.0 + math.sqrt(2.0)]) / (2.0 * math.sqrt(2.0)), rtol=1e-14, atol=0)
    torch.testing.assert_close(w @ G, aggregation.ConFIG()(G), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("c", [1.0, 0.5, 1e-6])
def test_opposite_gradients(c: float) -> None:
    """g2 = -c g1: the dual cone is the hyperplane g1 . x = 0, both projections (and the mean's) are 0, and ConFIG
    has no direction (pinv(U) 1 = 0), so every method gives g = 0."""
    G = t([[3.0, 1.0, 0.0], [-3.0 * c, -1.0 * c, 0.0]])
    M = gram(G)
    for fn in (upgrad_weights, dualproj_weights):
        w, info = fn(M)
        assert float((w @ G).norm()) <= 1e-14 * float(G.norm(dim=1).sum())
        assert info["converged"] == 1.0
    w, _ = config_weights(M)
    assert w.tolist() == [0.0, 0.0]


def test_zero_rows() -> None:
    """Zero rows add nothing to g and constrain nothing. UPGrad and DualProj give them w_i = pref_i (their own
    projection is pref_i e_i; with no conflict w = pref exactly), ConFIG gives them 0 (as pinv of a zero unit row)."""
    G = t([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    M = gram(G)
    assert upgrad_weights(M)[0].tolist() == [1 / 3] * 3
    assert dualproj_weights(M)[0].tolist() == [1 / 3] * 3
    torch.testing.assert_close(config_weights(M)[0], t([1.0, 0.0, 1.0]), rtol=1e-14, atol=0)
    # with a conflict: the zero row's weight is still pref_i, the others are the two-row answer
    G = t([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    w, _ = upgrad_weights(gram(G))
    torch.testing.assert_close(w, t([2 / 3, 1 / 3, 1 / 2]), rtol=1e-14, atol=1e-15)
    # all zero
    M = torch.zeros(3, 3, dtype=F64)
    pref = t([0.2, 0.3, 0.5])
    assert upgrad_weights(M, pref)[0].tolist() == pref.tolist()
    assert dualproj_weights(M, pref)[0].tolist() == pref.tolist()
    w, info = config_weights(M)
    assert w.tolist() == [0.0] * 3 and info["rank"] == 0.0


def test_single_task() -> None:
    for g in ([[2.0, -1.0]], [[0.0, 0.0]]):
        M = gram(t(g))
        assert upgrad_weights(M)[0].tolist() == [1.0]
        assert dualproj_weights(M)[0].tolist() == [1.0]
    assert config_weights(gram(t([[2.0, -1.0]])))[0].tolist() == pytest.approx([1.0], rel=1e-15)
    # a negative preference is projected as given (TorchJD does the same): -g1 onto {g1 . x >= 0} is 0
    assert upgrad_weights(gram(t([[2.0, -1.0]])), t([-1.0]))[0].tolist() == [0.0]


def test_duplicates_give_the_deduplicated_cone() -> None:
    """A duplicated row is the same constraint twice: DualProj's g equals the projection with the duplicate's
    preference moved to its twin."""
    G = t([[1.0, 0.2, 0.0], [1.0, 0.2, 0.0], [-1.0, 1.0, 0.5], [0.0, -1.0, 1.0]])
    g, _ = dualproj_weights(gram(G), t([0.25, 0.25, 0.25, 0.25]))
    g2, _ = dualproj_weights(gram(G[1:]), t([0.5, 0.25, 0.25]))
    torch.testing.assert_close(g @ G, g2 @ G[1:], rtol=1e-13, atol=1e-15)
    w, _ = upgrad_weights(gram(G))
    assert bool((G @ (w @ G) >= -1e-15).all())


# --------------------------------------------------------------------------------------------------------------
# Against TorchJD
# --------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(G=jacobians())
def test_upgrad_and_dualproj_match_torchjd_projector(G: Tensor) -> None:
    """Every family (norms 1e-3..1e3, duplicates, opposite, zero, near-duplicate, dependent rows, k > rank)."""
    k = G.shape[0]
    M = gram(G)
    pref = uniform(k)
    w, info = upgrad_weights(M)
    assert info["converged"] == 1.0
    assert close(w @ G, torchjd_upgrad(G, pref), scale_of(G, w), 1e-7)
    w, info = dualproj_weights(M)
    assert info["converged"] == 1.0
    assert close(w @ G, torchjd_dualproj(G, pref), scale_of(G, w), 1e-7)


@SETTINGS
@given(G=jacobians(edits=("dup", "scaled_dup", "opposite", "zero")), data=st.data())
def test_preference_vector_matches_torchjd(G: Tensor, data: st.DataObject) -> None:
    k = G.shape[0]
    # quadprog's absolute tolerances make TorchJD unreliable for tiny preferences: 0 or >= 1e-3 here
    pref = t(data.draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 2.0)), min_size=k, max_size=k)))
    w, _ = upgrad_weights(gram(G), pref)
    assert close(w @ G, torchjd_upgrad(G, pref), scale_of(G, w), 1e-7)
    w, _ = dualproj_weights(gram(G), pref)
    assert close(w @ G, torchjd_dualproj(G, pref), scale_of(G, w), 1e-7)


@SETTINGS
@given(G=jacobians(full_rank=True), data=st.data())
def test_default_torchjd_aggregators_agree_on_similar_norms(G: Tensor, data: st.DataObject) -> None:
    """The plain ``UPGrad()`` / ``DualProj()`` (mean scale, quadprog on the trace-normalised Gram plus 1e-4 I):
    same definition and scale; their ridge limits the agreement to ~1e-3 of the typical norm, on well-posed
    problems only: full row rank, norms within a factor 3 and ``trace(M) >= 1e-4`` (below it TorchJD returns the
    mean). Where the answer needs large weights (rows that positively span a subspace: ``g`` ~ 0), the ridge's
    error grows with them."""
    k = G.shape[0]
    norms = G.norm(dim=1)
    factors = t(data.draw(st.lists(st.floats(1.0, 3.0), min_size=k, max_size=k)))
    G = torch.where(norms[:, None] > 0, G / norms.clamp_min(1e-300)[:, None] * factors[:, None], G)
    w, _ = upgrad_weights(gram(G))
    assert close(w @ G, aggregation.UPGrad()(G), scale_of(G, w), 1e-2)
    w, _ = dualproj_weights(gram(G))
    assert close(w @ G, aggregation.DualProj()(G), scale_of(G, w), 1e-2)


def test_torchjd_default_ridge_misses_small_gradients() -> None:
    """Why the tight oracle works on unit rows: with norms 1 and 1.4e-3 the default ridge (1e-4 of the trace)
    outweighs the small row's Gram entries, and TorchJD's UPGrad conflicts with it (cosine -0.7); ours does not."""
    G = t([[1.0, 0.0], [-1e-3, 1e-3]])
    g_ref = aggregation.UPGrad()(G)
    w, _ = upgrad_weights(gram(G))
    g = w @ G
    assert float(G[1] @ g_ref / (G[1].norm() * g_ref.norm())) < -0.5
    assert float(G[1] @ g) >= 0.0
    assert close(g, torchjd_upgrad(G, uniform(2)), scale_of(G, w), 1e-9)


@SETTINGS
@given(G=jacobians(edits=("dup", "scaled_dup", "opposite", "zero", "sum")))
def test_config_matches_torchjd(G: Tensor) -> None:
    """Norms 1e-3..1e3, exact/parallel/opposite duplicates, zero rows, dependent rows and k > rank (P in {2, 3})."""
    w, info = config_weights(gram(G))
    assert close(w @ G, aggregation.ConFIG()(G), float(G.norm(dim=1).sum()), 1e-8)


@SETTINGS
@given(G=jacobians(full_rank=True), data=st.data())
def test_config_preference_matches_torchjd(G: Tensor, data: st.DataObject) -> None:
    k = G.shape[0]
    pref = t(data.draw(st.lists(st.floats(0.1, 2.0), min_size=k, max_size=k)))
    w, _ = config_weights(gram(G), pref)
    assert close(w @ G, aggregation.ConFIG(pref)(G), float(G.norm(dim=1).sum()), 1e-8)


def test_config_near_duplicates() -> None:
    """ConFIG is discontinuous at duplicates: g2 = g1 + delta forces x . delta = 0 however small delta is.
    Resolved above ``rank_tol`` (matches TorchJD); below it, the exact-duplicate answer (TorchJD, working on G,
    still resolves a 1e-9 perturbation and gives a different vector)."""
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(4, 6, generator=gen, dtype=F64)
    for eps, rtol in ((1e-3, 1e-9), (1e-2, 1e-11)):
        Gn = G.clone()
        Gn[3] = G[0] + eps * torch.randn(6, generator=gen, dtype=F64)
        w, info = config_weights(gram(Gn))
        assert info["rank"] == 4.0
        assert close(w @ Gn, aggregation.ConFIG()(Gn), float(Gn.norm(dim=1).sum()), rtol)
    Gn = G.clone()
    Gn[3] = G[0] + 1e-9 * torch.randn(6, generator=gen, dtype=F64)
    Gd = G.clone()
    Gd[3] = G[0]
    w, info = config_weights(gram(Gn))
    assert info["rank"] == 3.0
    assert close(w @ Gn, aggregation.ConFIG()(Gd), float(G.norm(dim=1).sum()), 1e-8)


@pytest.mark.parametrize("seed", range(6))
def test_nearly_flat_cone_kkt(seed: int) -> None:
    """Rows all around a circle in a plane plus 1e-6 noise in 18 other dimensions: the dual cone is a thin
    sliver, the projections need weights ~1e6 and the free rows' Schur complements are ~1e-12 (the solver leaves
    its explicit-inverse fast path for Cholesky factorisations). TorchJD's ridge (1e-12 on the trace-normalised
    Gram) is as large as those Schur complements here, so it differs by ~3e-7 of ``sum |w_i| ||g_i||``; checked
    by KKT and non-conflict instead."""
    gen = torch.Generator().manual_seed(seed)
    k = 10
    th = torch.rand(k, generator=gen, dtype=F64) * 2 * math.pi
    G = torch.zeros(k, 20, dtype=F64)
    G[:, 0], G[:, 1] = th.cos(), th.sin()
    G = G + 1e-6 * torch.randn(k, 20, generator=gen, dtype=F64)
    M = gram(G)
    norms = G.norm(dim=1)
    for fn in (upgrad_weights, dualproj_weights):
        w, info = fn(M)
        assert info["converged"] == 1.0
        s = float((norms * w).abs().sum())
        assert float(((G @ (w @ G)) / norms).min()) >= -1e-11 * s
    for i in range(k):
        u = torch.zeros(k, dtype=F64)
        u[i] = 1.0
        v, info = project_dual_cone(M, u)
        y, b = norms * v, norms * u
        mu = (M @ v) / norms
        s = float(y.abs().sum())
        assert info["converged"] == 1.0 and bool((v >= u).all())
        assert float(mu.min()) >= -1e-11 * s
        assert float((mu * (y - b)).abs().max()) <= 1e-11 * s * (s + 1.0)


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(G=jacobians())
def test_non_conflict(G: Tensor) -> None:
    """g . g_i >= 0 for every task (the defining property), relative to the equilibrated scale ``||D w||_1``
    (which bounds the rounding of ``g . g_i / ||g_i||``; for ``pref >= 0`` every ``y >= 0``)."""
    M = gram(G)
    norms = G.norm(dim=1)
    for fn in (upgrad_weights, dualproj_weights):
        w, _ = fn(M)
        g = w @ G
        s = float((norms * w).abs().sum())
        cos_scaled = (G @ g) / norms.clamp_min(1e-300)
        assert float(cos_scaled.min()) >= -1e-11 * s


@SETTINGS
@given(G=jacobians(), data=st.data())
def test_box_qp_kkt(G: Tensor, data: st.DataObject) -> None:
    """``v = argmin_{v >= u} v^T M v``. KKT (Lagrangian v^T M v - 2 mu^T (v - u)): stationarity ``M v = mu``,
    dual feasibility ``mu >= 0`` (i.e. ``v^T G`` is in the dual cone), primal ``v >= u``, complementarity
    ``mu_i (v_i - u_i) = 0``. Checked in equilibrated coordinates (``y = D v``, ``b = D u``, ``C = D^-1 M D^-1``):
    ``mu = C y >= -tol ||y||_1`` (``||y||_1`` bounds the rounding of ``mu``) and ``|mu_i| (y_i - b_i) <= tol ||y||_1
    (||y||_1 + ||b||_1)``; zero rows must keep ``v_i = u_i``. ``u`` of any sign."""
    k = G.shape[0]
    u = t(data.draw(st.lists(st.floats(-1.0, 1.0), min_size=k, max_size=k)))
    M = gram(G)
    v, info = project_dual_cone(M, u)
    assert info["converged"] == 1.0 and float(info["residual"]) <= 1e-12
    assert bool((v >= u).all())  # exactly: indices at their bound get u_i itself
    d = M.diagonal().sqrt()
    nz = M.diagonal() > 0
    assert v[~nz].tolist() == u[~nz].tolist()
    dn = d[nz]
    C = M[nz][:, nz] / dn[:, None] / dn[None, :]
    y, b = dn * v[nz], dn * u[nz]
    if not bool(nz.any()):
        return
    mu = C @ y
    s = float(y.abs().sum())
    assert float(mu.min()) >= -1e-11 * s
    assert float((mu * (y - b)).abs().max()) <= 1e-11 * s * (s + float(b.abs().sum()))


@SETTINGS
@given(G=jacobians(), data=st.data())
def test_permutation(G: Tensor, data: st.DataObject) -> None:
    """Permuting the tasks permutes ``w`` (when it is unique: full row rank) and leaves ``g`` unchanged."""
    k = G.shape[0]
    perm = torch.tensor(data.draw(st.permutations(list(range(k)))))
    Gp = G[perm]
    for fn, scale in (
        (upgrad_weights, scale_of(G, uniform(k))),
        (dualproj_weights, scale_of(G, uniform(k))),
        (config_weights, float(G.norm(dim=1).sum())),
    ):
        w, _ = fn(gram(G))
        wp, _ = fn(gram(Gp))
        assert close(wp @ Gp, w @ G, scale, 1e-9)


@SETTINGS
@given(G=jacobians(full_rank=True), data=st.data())
def test_permutation_of_weights(G: Tensor, data: st.DataObject) -> None:
    k = G.shape[0]
    perm = torch.tensor(data.draw(st.permutations(list(range(k)))))
    for fn in (upgrad_weights, dualproj_weights, config_weights):
        w, _ = fn(gram(G))
        wp, _ = fn(gram(G[perm]))
        torch.testing.assert_close(wp, w[perm], rtol=1e-8, atol=1e-12 * float(w.abs().max()))


@SETTINGS
@given(G=jacobians(), s=st.sampled_from([1e-6, 0.37, 1e4, -1.0, -2e3]))
def test_rescaling(G: Tensor, s: float) -> None:
    """``G -> s G`` (any ``s != 0``): ``M -> s^2 M``, the cone of ``-G`` is minus the cone, ``pinv(-U) = -pinv(U)``;
    so ``w`` is invariant for all three methods and ``g -> s g``. Compared on ``g`` (``w`` is not unique when
    ``k > rank``)."""
    k = G.shape[0]
    for fn, scale in (
        (upgrad_weights, scale_of(G, uniform(k))),
        (dualproj_weights, scale_of(G, uniform(k))),
        (config_weights, float(G.norm(dim=1).sum())),
    ):
        w, _ = fn(gram(G))
        ws, _ = fn(gram(s * G))
        assert close(ws @ (s * G) / s, w @ G, scale, 1e-9)


@SETTINGS
@given(G=jacobians(full_rank=True), s=st.sampled_from([1e-6, 1e4, -3.0]))
def test_rescaling_weights_invariant(G: Tensor, s: float) -> None:
    for fn in (upgrad_weights, dualproj_weights, config_weights):
        w, _ = fn(gram(G))
        torch.testing.assert_close(fn(gram(s * G))[0], w, rtol=1e-8, atol=1e-12 * float(w.abs().max()))


@SETTINGS
@given(G=jacobians(full_rank=True), data=st.data())
def test_config_equal_cosines(G: Tensor, data: st.DataObject) -> None:
    """Full row rank: ``cos(g, g_i)`` is the same for every task (proportional to ``pref_i`` with a preference),
    and ``g`` has the length of the sum of the projections of the ``g_i`` on its direction."""
    k = G.shape[0]
    w, info = config_weights(gram(G))
    g = w @ G
    cos = (G @ g) / (G.norm(dim=1) * g.norm())
    torch.testing.assert_close(cos, cos.mean().expand(k), rtol=1e-9, atol=0)
    torch.testing.assert_close(g.norm(), (G @ g).sum() / g.norm(), rtol=1e-10, atol=0)
    assert float(info["residual"]) < 1e-10 and info["rank"] == float(k)
    pref = t(data.draw(st.lists(st.floats(0.1, 2.0), min_size=k, max_size=k)))
    w, _ = config_weights(gram(G), pref)
    g = w @ G
    cos = (G @ g) / (G.norm(dim=1) * g.norm())
    torch.testing.assert_close(cos / pref, (cos / pref).mean().expand(k), rtol=1e-9, atol=0)


@SETTINGS
@given(G=jacobians(edits=("dup", "scaled_dup", "zero")))
def test_no_conflict_gives_pref(G: Tensor) -> None:
    """Rows with pairwise non-negative inner products: the projections are the identity, ``w = pref`` exactly."""
    G = G.abs()
    k = G.shape[0]
    for fn in (upgrad_weights, dualproj_weights):
        w, info = fn(gram(G))
        assert w.tolist() == uniform(k).tolist() and info["iters"] == 0.0


# --------------------------------------------------------------------------------------------------------------
# Errors, warnings, info
# --------------------------------------------------------------------------------------------------------------


def test_unconverged_solve_warns_and_reports() -> None:
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(8, 4, generator=gen, dtype=F64)
    M = gram(G)
    w_full, _ = dualproj_weights(M)
    with pytest.warns(RuntimeWarning, match="relative KKT residual"):
        w, info = dualproj_weights(M, t([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]), max_iter=1)
    assert info["converged"] == 0.0 and float(info["residual"]) > 1e-12
    with pytest.warns(RuntimeWarning, match="upgrad_weights"):
        _, info = upgrad_weights(M, max_iter=1)
    assert info["converged"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = upgrad_weights(M)
    assert info["converged"] == 1.0 and set(info) == {"weights", "iters", "residual", "converged"}
    assert all(v.dtype == F64 and v.ndim == 0 for key, v in info.items() if key != "weights")


def test_invalid_inputs() -> None:
    M = gram(t([[1.0, 0.0], [0.0, 1.0]]))
    for fn in (upgrad_weights, dualproj_weights, config_weights):
        with pytest.raises(ValueError, match="finite"):
            fn(t([[1.0, float("nan")], [float("nan"), 1.0]]))
        with pytest.raises(ValueError, match="square"):
            fn(torch.ones(2, 3, dtype=F64))
        with pytest.raises(ValueError, match="pref"):
            fn(M, t([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="max_iter"):
        upgrad_weights(M, max_iter=0)
    with pytest.raises(ValueError, match="rank_tol"):
        config_weights(M, rank_tol=0.0)
    w, info = config_weights(M)
    assert set(info) == {"weights", "rank", "residual"} and w.dtype == F64


def test_float32_input_is_accepted() -> None:
    G = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    M = G @ G.T
    for fn in (upgrad_weights, dualproj_weights, config_weights):
        w, _ = fn(M)
        assert w.dtype == F64
        torch.testing.assert_close(w, fn(M.double())[0])
