"""TorchJD 0.18 as an oracle: every aggregator mtlib and TorchJD both implement agrees, after the documented scale
conventions (``mtl.gradients``' table: sum vs mean, CAGrad's ``1 + c^2``, Aligned-MTL's sum of the k aligned
gradients).

TorchJD solves several problems only approximately, so each comparison runs TorchJD where it is accurate:

- MGDA: Frank-Wolfe with its step-size stop ``epsilon`` (default 1e-3): run with 1e-12 and many iterations, and
  mtlib's min-norm point is never longer than TorchJD's (mtlib solves it exactly).
- CAGrad and Nash-MTL: cvxpy (Clarabel, ECOS; Nash stops at a residual of 1e-3): compared to 1e-5 and 1e-3.
- UPGrad and DualProj: TorchJD's default projector adds a ridge of 1e-4 of the trace, which moves the answer by
  up to a few percent; they are compared with TorchJD's own projector without it (as ``tests/test_projection.py``).

The Jacobians are drawn with row norms in [0.1, 10] (where TorchJD's absolute tolerances are meaningful); the
harder families (norms 1e-3..1e3, degenerate rows) are covered by ``tests/test_gradient_properties.py``, whose
conditions do not depend on a peer's precision.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jacobians import gross, jacobian
from test_projection import torchjd_dualproj, torchjd_upgrad
from torch import Tensor

from mtl import gradients as gm

A = pytest.importorskip("torchjd.aggregation")

SETTINGS = settings(derandomize=True, max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
families = st.sampled_from(("spread", "conflict", "near_duplicate", "duplicate", "zero"))
cases = st.tuples(families, st.integers(2, 6), st.integers(0, 2**31 - 1))


def moderate(case: tuple[str, int, int]) -> Tensor:
    family, k, seed = case
    return jacobian(family, k, seed, low=-1.0, high=1.0)


def assert_agree(g: Tensor, ref: Tensor, w: Tensor, G: Tensor, rtol: float) -> None:
    err = float((g - ref).norm())
    assert err <= rtol * max(float(ref.norm()), 1e-6 * gross(w, G)), (err, float(ref.norm()))


@SETTINGS
@given(case=cases)
def test_mgda_is_torchjds_min_norm_point_solved_exactly(case: tuple[str, int, int]) -> None:
    G = moderate(case)
    g, info = gm.aggregate_mgda(G)
    ref = A.MGDA(epsilon=1e-12, max_iters=20000)(G)
    assert float(g.norm()) <= float(ref.norm()) * (1 + 1e-9) + 1e-12
    assert_agree(g, ref, info["weights"], G, 1e-2)  # Frank-Wolfe's sublinear rate: ~1e-3 after 20000 steps


@SETTINGS
@given(case=st.tuples(families, st.just(2), st.integers(0, 2**31 - 1)))
def test_pcgrad_two_tasks(case: tuple[str, int, int]) -> None:
    """With two tasks the random order plays no role: both libraries give the same sum of projections."""
    G = moderate(case)
    g, info = gm.aggregate_pcgrad(G)
    assert_agree(g, A.PCGrad()(G), info["weights"], G, 1e-12)


def test_pcgrad_without_conflicts_is_the_sum_in_both() -> None:
    G = torch.rand(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # positive entries
    g, info = gm.aggregate_pcgrad(G)
    assert_agree(g, A.PCGrad()(G), info["weights"], G, 1e-12)
    torch.testing.assert_close(g, G.sum(0))


def test_gradvac_two_tasks_over_steps() -> None:
    """Two tasks, same beta, several steps (the EMA targets evolve alike): the same sum of adjusted gradients, to
    the 1e-8 that TorchJD adds to the norms in its cosines."""
    gen = torch.Generator().manual_seed(3)
    ours, theirs = gm.GradVac(beta=0.5), A.GradVac(beta=0.5)
    for _ in range(5):
        G = torch.randn(2, 6, dtype=torch.float64, generator=gen)
        g, info = ours.aggregate(G)
        assert_agree(g, theirs(G), info["weights"], G, 1e-7)


@pytest.mark.parametrize("c", [0.2, 0.5, 0.8, 2.0])
@SETTINGS
@given(case=st.tuples(st.sampled_from(("spread", "conflict")), st.integers(2, 6), st.integers(0, 2**31 - 1)))
def test_cagrad_matches_torchjd_without_the_rescale(c: float, case: tuple[str, int, int]) -> None:
    """TorchJD's CAGrad is ``g0 + c ||g0|| g_w / ||g_w||`` (no division by ``1 + c^2``): mtlib's ``rescale=False``;
    the default divides by ``1 + c^2`` as the official code does. Clarabel's answer is good to ~1e-4; mtlib's
    exact one is never worse on the paper's objective, the worst task's ``g_i . d``."""
    G = moderate(case)
    ref = A.CAGrad(c=c, norm_eps=0.0)(G)
    g, info = gm.aggregate_cagrad(G, c=c, rescale=False)
    assert_agree(g, ref, info["weights"], G, 3e-4)
    assert float((G @ g).min()) >= float((G @ ref).min()) - 1e-12 * float(G.norm()) ** 2
    scaled, _ = gm.aggregate_cagrad(G, c=c)
    torch.testing.assert_close(scaled, g / (1 + c**2))


@SETTINGS
@given(case=st.tuples(st.sampled_from(("spread", "conflict", "duplicate", "zero")), st.integers(2, 6),
                      st.integers(0, 2**31 - 1)))
def test_imtl_g_matches_torchjd(case: tuple[str, int, int]) -> None:
    """TorchJD's ``pinv(M) ||g_i||`` normalised to sum 1, including its zero-gradient and duplicate cases.
    (Near-duplicate rows are ill-posed for equal projections from any Gram matrix; see the property tests.)"""
    G = moderate(case)
    g, info = gm.aggregate_imtl_g(G)
    assert_agree(g, A.IMTLG()(G), info["weights"], G, 1e-7)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@SETTINGS
@given(case=st.tuples(st.sampled_from(("spread", "conflict")), st.integers(2, 6), st.integers(0, 2**31 - 1)))
def test_aligned_mtl_is_k_times_torchjds(mode: str, case: tuple[str, int, int]) -> None:
    """TorchJD averages the aligned gradients (preference 1/k), mtlib sums them as the official code."""
    G = moderate(case)
    g, info = gm.aggregate_aligned_mtl(G, scale_mode=mode)  # type: ignore[arg-type]
    assert_agree(g, G.shape[0] * A.AlignedMTL(scale_mode=mode)(G), info["weights"], G, 1e-7)


def test_nash_mtl_matches_torchjds_bargaining_weights() -> None:
    """TorchJD (as the official code) divides the Gram by its Frobenius norm and multiplies alpha by it in its
    log constraint: its alpha solves ``alpha_i (M alpha)_i = 1`` for the raw ``M``, mtlib's default. Its cvxpy
    loop stops at a residual of 1e-3, and where ECOS fails it silently keeps its previous alpha (all ones on a
    first call): those cases are told apart by TorchJD's own residual, and there the paper's condition, which
    mtlib meets to 1e-8, decides."""
    compared = 0
    for family, k, seed in [(f, k, s) for f in ("spread", "conflict") for k in (2, 3, 4, 5) for s in range(4)]:
        G = jacobian(family, k, seed, low=-1.0, high=1.0)
        M = G @ G.T
        ref = A.NashMTL(n_tasks=k, max_norm=0.0, update_weights_every=1, optim_niter=100)(G)
        alpha_jd = torch.linalg.lstsq(G.T, ref[:, None]).solution[:, 0]  # G has full row rank here
        g, info = gm.aggregate_nash_mtl(G, max_norm=0.0)
        alpha = info["alpha"]
        assert float((alpha * (M @ alpha) - 1).abs().max()) < 1e-7  # (M alpha)_i cancels where tasks conflict
        if float((alpha_jd * (M @ alpha_jd) - 1).abs().max()) < 1e-2:  # TorchJD's solve succeeded
            compared += 1
            assert_agree(g, ref, info["weights"], G, 1e-2)
    assert compared >= 16, compared


@SETTINGS
@given(case=st.tuples(st.sampled_from(("spread", "conflict")), st.integers(2, 6), st.integers(0, 2**31 - 1)))
def test_con_fig_matches_torchjd(case: tuple[str, int, int]) -> None:
    G = moderate(case)
    g, info = gm.build_gradient_method("con_fig").aggregate(G)
    assert_agree(g, A.ConFIG()(G), info["weights"], G, 1e-8)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@SETTINGS
@given(case=st.tuples(st.sampled_from(("spread", "conflict")), st.integers(2, 6), st.integers(0, 2**31 - 1)))
def test_dual_cone_methods_match_torchjds_projector(name: str, case: tuple[str, int, int]) -> None:
    """The classes against TorchJD's own dual-cone projector (quadprog) without its default ridge, whose 1e-4 of
    the trace moves the answer by up to a few percent (see ``tests/test_projection.py``)."""
    G = moderate(case)
    k = G.shape[0]
    g, info = gm.build_gradient_method(name).aggregate(G)
    peer = torchjd_upgrad if name == "upgrad" else torchjd_dualproj
    assert_agree(g, peer(G, torch.full((k,), 1.0 / k, dtype=G.dtype)), info["weights"], G, 1e-6)
