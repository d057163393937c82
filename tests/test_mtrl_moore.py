"""MOORE (Hendawy et al., ICLR 2024): Gram-Schmidt, the orthogonal-experts encoder, the agent's training and
resume on point-mass, and the grouped expert product against separate linear layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl.checkpoint import load_checkpoint
from mtrl.agents import EnvSpec, Transition, moore
from mtrl.config import CONFIG_DIR
from mtrl.encoders import EnsembleLinear, MOOREEncoder, gram_schmidt, gram_schmidt_reference
from mtrl.runs import LAST
from mtrl.train import run

torch.set_num_threads(1)
NAMES = ("a", "b", "c")


@settings(derandomize=True, max_examples=40, deadline=None)
@given(k=st.integers(1, 5), extra=st.integers(0, 6), b=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_gram_schmidt_rows_are_orthonormal_and_span_the_inputs(k: int, extra: int, b: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(k, b, k + extra, generator=g, dtype=torch.float64)
    u = gram_schmidt(h)
    gram = torch.einsum("ibd,jbd->bij", u, u)
    assert torch.allclose(gram, torch.eye(k, dtype=torch.float64).expand(b, k, k), atol=1e-10)
    # u_j lies in span(h_1..h_j): projecting it on that span returns it (triangular change of basis).
    for j in range(k):
        span = h[: j + 1].permute(1, 2, 0)  # [b, D, j+1]
        coef = torch.linalg.lstsq(span, u[j].unsqueeze(-1)).solution
        assert torch.allclose(span @ coef, u[j].unsqueeze(-1), atol=1e-8)


def test_gram_schmidt_is_differentiable_and_refuses_too_many_vectors() -> None:
    h = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gram_schmidt, (h,))
    with pytest.raises(ValueError, match="cannot be orthonormal"):
        gram_schmidt(torch.randn(4, 2, 3))


def _qr_orthonormalise(h: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt's result by Householder QR (an independent algorithm): columns of Q signed so that
    ``<u_j, h_j> > 0``, which is what Gram-Schmidt gives for independent vectors."""
    q, r = torch.linalg.qr(h.permute(1, 2, 0))  # [B, D, k], [B, k, k]
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(1)).permute(2, 0, 1)


@settings(derandomize=True, max_examples=25, deadline=None)
@given(k=st.integers(1, 5), extra=st.integers(0, 4), b=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_gram_schmidt_fused_backward_equals_qr_and_the_autograd_loop(k: int, extra: int, b: int, seed: int) -> None:
    """The one-node Gram-Schmidt (hand-written backward) against autograd through the loop and through
    Householder QR: values and gradients for independent vectors."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(k, b, k + extra, generator=g, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(k, b, k + extra, generator=g, dtype=torch.float64)
    u = gram_schmidt(h)
    assert "GramSchmidt" in type(u.grad_fn).__name__
    got = torch.autograd.grad(u, h, cot)[0]
    torch.testing.assert_close(torch.autograd.grad(gram_schmidt_reference(h), h, cot)[0], got)
    qr = _qr_orthonormalise(h)
    torch.testing.assert_close(u, qr, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(got, torch.autograd.grad(qr, h, cot)[0], atol=1e-7, rtol=1e-7)


def test_gram_schmidt_fused_backward_on_dependent_vectors_batched_and_second_order() -> None:
    torch.manual_seed(0)
    h = torch.randn(3, 4, 5, dtype=torch.float64)
    h[2, 0] = h[0, 0]  # in the span of an earlier vector: residual below eps, clamped norm
    h[1, 1] = 0.0  # a zero vector
    h.requires_grad_(True)
    cots = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    fused = torch.autograd.grad(gram_schmidt(h), h, cots, is_grads_batched=True)[0]
    for i in range(2):
        loop = torch.autograd.grad(gram_schmidt_reference(h), h, cots[i])[0]
        torch.testing.assert_close(fused[i], loop, rtol=1e-10, atol=1e-10 * float(loop.abs().max()))
    small = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(gram_schmidt, (small,))


def test_grouped_expert_product_equals_separate_linear_layers() -> None:
    torch.manual_seed(0)
    layer = EnsembleLinear(4, 6, 5)
    x = torch.randn(7, 6)
    separate = []
    for j in range(4):
        lin = torch.nn.Linear(6, 5)
        with torch.no_grad():
            lin.weight.copy_(layer.weight[j].T)
            lin.bias.copy_(layer.bias[j, 0])
        separate.append(lin(x))
    assert torch.allclose(layer(x), torch.stack(separate), atol=1e-6)
    xs = torch.randn(4, 7, 6)
    per_member = torch.stack([xs[j] @ layer.weight[j] + layer.bias[j] for j in range(4)])
    assert torch.allclose(layer(xs), per_member, atol=1e-6)


def test_moore_encoder_mixes_orthonormal_experts_with_per_task_weights() -> None:
    torch.manual_seed(0)
    enc = MOOREEncoder(obs_dim=3, num_tasks=3, num_experts=3, expert_hidden=[8], expert_dim=6)
    obs, task = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    out = enc(obs, task)
    assert out.shape == (5, enc.out_dim) == (5, 6)
    # independent recomputation: experts one by one, Gram-Schmidt by projection, weights = columns of W
    hs = [enc.experts(obs)[j] for j in range(3)]
    q, _ = torch.linalg.qr(torch.stack(hs, dim=-1))  # [5, 6, 3], orthonormal columns (up to sign)
    signs = torch.sign(torch.einsum("bdk,kbd->bk", q, torch.stack(hs)))
    u = (q * signs.unsqueeze(1)).permute(2, 0, 1)  # [k, B, D] with <u_j, h_j> > 0 as Gram-Schmidt gives
    w = enc.task_weights.weight.T[task]  # [B, k]
    assert torch.allclose(out, torch.einsum("bk,kbd->bd", w, u), atol=1e-5)
    with pytest.raises(ValueError, match="expert_dim >= num_experts"):
        MOOREEncoder(3, 3, num_experts=5, expert_dim=4)


def test_moore_agent_updates_every_network() -> None:
    torch.manual_seed(0)
    agent = moore(EnvSpec(3, 2, NAMES), hidden=[8], expert_hidden=[8], expert_dim=8)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    b = 12
    batch = Transition(
        torch.randn(b, 3),
        torch.rand(b, 2) * 2 - 1,
        torch.randn(b),
        torch.randn(b, 3),
        torch.zeros(b),
        torch.arange(b) % 3,
    )
    stats = agent.update(batch, stats=True)
    assert np.isfinite(stats["loss/critic"]) and np.isfinite(stats["loss/actor"])
    changed = {k for k, v in agent.state_dict().items() if not torch.equal(v, before[k])}
    for name in (
        "actor.encoder.experts.0.weight",
        "actor.encoder.task_weights.weight",
        "critic.encoder.experts.0.weight",
        "critic.encoder.task_weights.weight",
        "log_alpha",
    ):
        assert name in changed, name


TINY = [
    "agent=moore",
    "env.max_episode_steps=20",
    "agent.hidden=[16,16]",
    "agent.expert_hidden=[8]",
    "agent.expert_dim=8",
    "trainer.learning_starts=10",
    "trainer.batch_size=8",
    "trainer.replay_capacity=500",
    "trainer.eval_episodes=2",
    "trainer.log_interval=10",
    "trainer.checkpoint_interval=0",
    "trainer.progress=false",
]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="mtrl", overrides=[*TINY, *overrides])


def test_moore_trains_on_pointmass_and_resumes_bit_identically(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = run(_cfg("trainer.total_steps=40", "trainer.eval_interval=40"), straight)
    assert result["agent"] == "moore" and 0.0 <= result["mean_success"] <= 1.0
    run(_cfg("trainer.total_steps=20", "trainer.eval_interval=0"), split)
    run(_cfg("trainer.total_steps=40", "trainer.eval_interval=0", "trainer.resume=true"), split)
    a, b = load_checkpoint(straight / LAST), load_checkpoint(split / LAST)
    assert a["step"] == b["step"] == 40 and a["agent"]["name"] == "moore"
    for key, value in a["agent"]["modules"].items():
        assert torch.equal(value, b["agent"]["modules"][key]), key
