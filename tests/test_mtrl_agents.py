"""SAC core, networks, encoders and replay of :mod:`mtrl`: losses against hand-computed values and naive
references, CARE's attention, per-task replay, and gradient methods on per-task SAC losses."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from mtl.gradients import GRADIENT_METHODS, PCGrad, Plain
from mtl.scheduling import SCHEDULERS
from mtl.weighting import FAMO, RLW, Static, Uncertainty
from mtrl.agents import (
    AGENTS,
    SAC,
    EnvSpec,
    SACConfig,
    SquashedGaussianActor,
    TaskHead,
    Transition,
    TwinCritic,
    care,
    mt_sac,
    multihead_sac,
    squashed_gaussian,
    task_blind_sac,
)
from mtrl.agents.sac import actor_rows, critic_rows, soft_q_target, task_losses, temperature_rows
from mtrl.encoders import CAREEncoder, EnsembleLinear, IdentityEncoder, OneHotEncoder
from mtrl.replay import TaskReplay

torch.set_num_threads(1)

NAMES = ("a", "b", "c")


def spec(obs_dim: int = 3, action_dim: int = 2, k: int = 3) -> EnvSpec:
    meta = np.random.default_rng(0).normal(size=(k, 5)).astype(np.float32)
    return EnvSpec(obs_dim, action_dim, tuple(NAMES[:k]) if k <= 3 else tuple(f"t{i}" for i in range(k)), meta)


def batch(s: EnvSpec, rows_per_task: int = 4, seed: int = 0) -> Transition:
    g = torch.Generator().manual_seed(seed)
    n = s.num_tasks * rows_per_task
    return Transition(
        obs=torch.randn(n, s.obs_dim, generator=g),
        action=torch.rand(n, s.action_dim, generator=g) * 2 - 1,
        reward=torch.randn(n, generator=g),
        next_obs=torch.randn(n, s.obs_dim, generator=g),
        terminated=(torch.rand(n, generator=g) < 0.3).float(),
        task=torch.arange(s.num_tasks).repeat_interleave(rows_per_task),
    )


# --------------------------------------------------------------------------------- pure loss functions


def test_squashed_gaussian_matches_hand_computed_value() -> None:
    # mean 0.5, std 0.5, eps 1: u = 1, a = tanh(1);
    # log pi = log N(1; 0.5, 0.5) - log(1 - tanh(1)^2) = (-0.5 - log 0.5 - 0.5 log 2pi) - log(1 - tanh(1)^2)
    a, logp = squashed_gaussian(torch.tensor([[0.5]]), torch.tensor([[math.log(0.5)]]), torch.tensor([[1.0]]))
    expected = (-0.5 - math.log(0.5) - 0.5 * math.log(2 * math.pi)) - math.log(1 - math.tanh(1.0) ** 2)
    assert a.item() == pytest.approx(math.tanh(1.0), abs=1e-7)
    assert logp.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.141770, abs=1e-6)


def test_squashed_gaussian_matches_torch_distributions_and_stays_finite() -> None:
    g = torch.Generator().manual_seed(1)
    mean, log_std, eps = (torch.randn(6, 3, generator=g) for _ in range(3))
    a, logp = squashed_gaussian(mean, log_std, eps)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean.double(), log_std.double().exp()),
        [torch.distributions.TanhTransform(cache_size=1)],
    )
    u = (mean + log_std.exp() * eps).double()
    reference = dist.log_prob(torch.tanh(u)).sum(-1)  # the inverse of tanh at these moderate u is exact enough
    torch.testing.assert_close(logp.double(), reference, atol=1e-4, rtol=0)
    # Far in the tail tanh(u) rounds to 1 and the naive log(1 - a^2) is -inf; the softplus form stays finite.
    _, tail = squashed_gaussian(torch.tensor([[30.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]]))
    assert torch.isfinite(tail).all()


def test_soft_q_target_critic_actor_temperature_rows_by_hand() -> None:
    reward, terminated = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    next_q = torch.tensor([[2.0, 5.0], [3.0, 4.0]])  # [n=2 critics, B=2]
    y = soft_q_target(reward, terminated, next_q, torch.tensor([-1.0, 0.5]), torch.tensor([0.5, 2.0]), 0.9)
    # row 0: 1 + 0.9 * (min(2, 3) - 0.5 * -1) = 3.25; row 1 terminated: 0
    torch.testing.assert_close(y, torch.tensor([3.25, 0.0]))

    q = torch.tensor([[3.0, 1.0], [4.0, -1.0]])
    # (3 - 3.25)^2 + (4 - 3.25)^2 = 0.625; (1 - 0)^2 + (-1 - 0)^2 = 2
    torch.testing.assert_close(critic_rows(q, y), torch.tensor([0.625, 2.0]))
    # 0.5 * -1 - min(3, 4) = -3.5; 2 * 0.5 - min(1, -1) = 2
    torch.testing.assert_close(
        actor_rows(q, torch.tensor([-1.0, 0.5]), torch.tensor([0.5, 2.0])), torch.tensor([-3.5, 2.0])
    )

    log_alpha = torch.tensor([math.log(0.5), math.log(2.0)], requires_grad=True)
    log_prob = torch.tensor([-1.0, 0.5], requires_grad=True)
    rows = temperature_rows(log_alpha.exp(), log_prob, -2.0)
    # -0.5 * (-1 - 2) = 1.5; -2 * (0.5 - 2) = 3; d/dlog_alpha of -alpha * c is -alpha * c (the same values)
    torch.testing.assert_close(rows.detach(), torch.tensor([1.5, 3.0]))
    rows.sum().backward()
    torch.testing.assert_close(log_alpha.grad, torch.tensor([1.5, 3.0]))
    assert log_prob.grad is None  # the entropy term is detached


def test_task_losses_are_per_task_means_divided_by_tasks_present() -> None:
    rows = torch.tensor([1.0, 2.0, 3.0, 6.0])
    losses = task_losses(rows, torch.tensor([0, 1, 1, 0]), NAMES)
    assert list(losses) == ["a", "b"]  # task c has no rows
    assert losses["a"].item() == pytest.approx((1 + 6) / 2 / 2)
    assert losses["b"].item() == pytest.approx((2 + 3) / 2 / 2)
    with pytest.raises(ValueError, match="task indices must be < 3"):
        task_losses(rows, torch.tensor([0, 1, 5, 0]), NAMES)


# ------------------------------------------------------------------------------------- networks


def test_ensemble_linear_equals_independent_linears() -> None:
    torch.manual_seed(0)
    layer = EnsembleLinear(3, 4, 5)
    x = torch.randn(7, 4)
    out = layer(x)
    for j in range(3):
        torch.testing.assert_close(out[j], x @ layer.weight[j] + layer.bias[j, 0])
    x3 = torch.randn(3, 7, 4)
    out3 = layer(x3)
    for j in range(3):
        torch.testing.assert_close(out3[j], x3[j] @ layer.weight[j] + layer.bias[j, 0])


def test_task_head_routes_each_row_to_its_task_head() -> None:
    torch.manual_seed(0)
    head = TaskHead(4, 2, num_heads=3)
    x, task = torch.randn(5, 4), torch.tensor([2, 0, 1, 2, 0])
    w, b = head.linear.weight, head.linear.bias  # [3 * 2, 4], [3 * 2]
    expected = torch.stack([x[i] @ w[2 * t : 2 * t + 2].T + b[2 * t : 2 * t + 2] for i, t in enumerate(task.tolist())])
    torch.testing.assert_close(head(x, task), expected)
    ens = TaskHead(4, 1, num_heads=3, ensemble=2)
    xe = torch.randn(2, 5, 4)
    full = ens.linear(xe)  # [2, 5, 3]
    torch.testing.assert_close(ens(xe, task), full[:, torch.arange(5), task].unsqueeze(-1))


def test_one_hot_and_identity_encoders() -> None:
    obs, task = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([2, 0])
    torch.testing.assert_close(OneHotEncoder(2, 3)(obs, task), torch.tensor([[1.0, 2.0, 0, 0, 1], [3.0, 4.0, 1, 0, 0]]))
    assert IdentityEncoder(2, 3)(obs, task) is obs
    with pytest.raises(ValueError, match=r"obs must be \[B, 3\]"):
        OneHotEncoder(3, 3)(obs, task)


def test_care_attention_sums_to_one_differs_between_tasks_and_mixes_experts() -> None:
    torch.manual_seed(0)
    meta = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    enc = CAREEncoder(3, 4, meta, num_experts=3, expert_hidden=[8], expert_dim=5, context_hidden=[8], context_dim=4)
    table = enc.attention_table()
    torch.testing.assert_close(table.sum(-1), torch.ones(4))
    assert (table > 0).all()
    assert torch.cdist(table, table)[~torch.eye(4, dtype=torch.bool)].min() > 1e-4  # every pair of tasks differs
    obs, task = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 1, 0])
    out = enc(obs, task)
    assert out.shape == (6, enc.out_dim) == (6, 5 + 4)
    # Metadata centred over tasks, rows scaled to unit norm.
    centred = meta - meta.mean(0)
    normalized = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    torch.testing.assert_close(enc.metadata, torch.as_tensor(normalized))
    raw = CAREEncoder(3, 4, meta, num_experts=3, normalize_metadata=False)
    torch.testing.assert_close(raw.metadata, torch.as_tensor(meta))
    # Naive reference: each expert as its own MLP, softmax of a linear map of the context, weighted sum.
    lin1, lin2 = enc.experts[0], enc.experts[2]
    context = enc.context(torch.as_tensor(normalized))
    for i, t in enumerate(task.tolist()):
        w = torch.softmax(enc.attention_logits(context[t]), dim=-1)
        mixed = sum(
            w[j] * (torch.relu(obs[i] @ lin1.weight[j] + lin1.bias[j, 0]) @ lin2.weight[j] + lin2.bias[j, 0])
            for j in range(3)
        )
        torch.testing.assert_close(out[i], torch.cat([mixed, context[t]]))
    torch.testing.assert_close(enc.attention(task), table[task])
    with pytest.raises(ValueError, match="metadata must be"):
        CAREEncoder(3, 5, meta)


def _naive_care(enc: CAREEncoder, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """CARE row by row, expert by expert, straight from the paper's description (no grouping, no per-task table)."""
    linears = [m for m in enc.context if isinstance(m, nn.Linear)]
    expert_layers = [m for m in enc.experts if isinstance(m, EnsembleLinear)]
    rows = []
    for b, t in enumerate(task.tolist()):
        z = enc.metadata[t]
        for i, lin in enumerate(linears):
            z = lin.weight @ z + lin.bias
            z = torch.relu(z) if i < len(linears) - 1 else z
        alpha = torch.softmax((enc.attention_logits.weight @ z + enc.attention_logits.bias) / enc.temperature, dim=0)
        mixed = torch.zeros(enc.expert_dim, dtype=obs.dtype)
        for j in range(enc.num_experts):
            h = obs[b]
            for i, layer in enumerate(expert_layers):
                h = h @ layer.weight[j] + layer.bias[j, 0]
                h = torch.relu(h) if i < len(expert_layers) - 1 else h
            mixed = mixed + alpha[j] * h
        rows.append(torch.cat([mixed, z]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("context_hidden", "expert_hidden", "temperature"),
    [([8], [8], 1.0), ([8, 6], [7, 5], 0.5), ([], [], 2.0)],
    ids=["paper-shape", "deeper", "linear"],
)
def test_care_fused_backward_equals_a_naive_per_row_reference(
    context_hidden: list[int], expert_hidden: list[int], temperature: float
) -> None:
    """The fused encoder (per-task contexts, grouped experts, one hand-written backward) against CARE computed
    row by row with autograd: outputs and the gradients of every parameter and of the observation."""
    torch.manual_seed(0)
    meta = np.random.default_rng(1).normal(size=(4, 6))
    enc = CAREEncoder(
        3, 4, meta, num_experts=3, expert_hidden=expert_hidden, expert_dim=5, context_hidden=context_hidden,
        context_dim=4, temperature=temperature,
    ).double()  # fmt: skip
    obs = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    task = torch.tensor([0, 1, 2, 3, 1, 0, 2, 2, 1])  # task 3 has one row; every task present
    cot = torch.randn(9, enc.out_dim, dtype=torch.float64)
    params = list(enc.parameters())
    out = enc(obs, task)
    assert out.grad_fn is not None and "CAREFunction" in type(out.grad_fn).__name__
    ref = _naive_care(enc, obs, task)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    got = torch.autograd.grad(out, [obs, *params], cot)
    want = torch.autograd.grad(ref, [obs, *params], cot)
    for (name, _), g, w in zip([("obs", None), *enc.named_parameters()], got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    # A batch without some tasks (their context rows get no gradient); the no-grad path gives the same values.
    sub, bias = torch.tensor([0, 0, 1]), enc.attention_logits.bias
    g_sub = torch.autograd.grad(enc(obs[:3], sub).sum(), bias)[0]
    torch.testing.assert_close(g_sub, torch.autograd.grad(_naive_care(enc, obs[:3], sub).sum(), bias)[0])
    with torch.no_grad():
        torch.testing.assert_close(enc(obs, task), ref.detach(), atol=1e-12, rtol=1e-10)


def test_care_float32_gradients_match_the_reference_and_keep_the_parameters_layout() -> None:
    torch.manual_seed(0)
    enc = CAREEncoder(2, 4, np.random.default_rng(2).normal(size=(4, 384)).astype(np.float32))  # the config's sizes
    obs, task = torch.randn(16, 2), torch.arange(16) % 4
    enc(obs, task).pow(2).sum().backward()
    fused = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    _naive_care(enc, obs, task).pow(2).sum().backward()
    for n, p in enc.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, atol=1e-6, rtol=1e-5)
        assert fused[n].stride() == p.stride(), n  # fused Adam reads gradients in the parameter's layout


def test_care_higher_order_and_batched_gradients_are_exact() -> None:
    """``create_graph`` (GREAT differentiates through gradients) and ``is_grads_batched`` (the gradient methods'
    one-call Jacobians) go through the fused node and agree with finite differences / a loop."""
    from mtrl.encoders import _CAREFunction

    torch.manual_seed(0)
    enc = CAREEncoder(3, 3, np.random.default_rng(1).normal(size=(3, 5)), num_experts=2, expert_hidden=[4],
                      expert_dim=3, context_hidden=[4], context_dim=2, temperature=0.7).double()  # fmt: skip
    task = torch.tensor([0, 2, 1, 2])
    obs = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    meta = enc.metadata.clone().requires_grad_(True)
    params = list(enc.parameters())

    def fn(o: torch.Tensor, m: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return _CAREFunction.apply(o, task, m, enc.temperature, enc._n_context, *ps)

    assert torch.autograd.gradcheck(fn, (obs, meta, *params))
    assert torch.autograd.gradgradcheck(fn, (obs, meta, *params))
    cots = torch.randn(3, 4, enc.out_dim, dtype=torch.float64)
    batched = torch.autograd.grad(enc(obs, task), params, cots, is_grads_batched=True)
    out = enc(obs, task)
    for i in range(3):
        for b, g in zip(batched, torch.autograd.grad(out, params, cots[i], retain_graph=True)):
            torch.testing.assert_close(b[i], g)


def test_care_state_dict_keys_are_unchanged() -> None:
    """Checkpoints of earlier runs keep loading: the fused forward reads the same modules."""
    enc = CAREEncoder(3, 4, np.eye(4, dtype=np.float32))
    assert list(enc.state_dict()) == [
        "metadata", "context.0.weight", "context.0.bias", "context.2.weight", "context.2.bias",
        "attention_logits.weight", "attention_logits.bias", "experts.0.weight", "experts.0.bias",
        "experts.2.weight", "experts.2.bias",
    ]  # fmt: skip


def test_param_groups_heads_are_task_specific_only_for_multihead() -> None:
    s = spec()
    mh, mt = multihead_sac(s, hidden=[8]), mt_sac(s, hidden=[8])
    assert {id(p) for p in mh.actor.task_parameters()} == {id(p) for p in mh.actor.head.parameters()}
    assert {id(p) for p in mh.critic.task_parameters()} == {id(p) for p in mh.critic.head.parameters()}
    assert mt.actor.task_parameters() == [] and mt.critic.task_parameters() == []
    n_all = sum(1 for _ in mh.actor.parameters())
    assert len(mh.actor.shared_parameters()) + len(mh.actor.task_parameters()) == n_all


# ---------------------------------------------------------------------------------- the SAC agent


def _naive_policy(actor: SquashedGaussianActor, obs: torch.Tensor, task: torch.Tensor, eps: torch.Tensor):
    """Action and log-prob with per-element Python math (an independent implementation)."""
    mean, log_std = actor(obs, task)
    actions, logps = [], []
    for i in range(obs.shape[0]):
        row_a, row_lp = [], 0.0
        for d in range(mean.shape[1]):
            m, ls, e = float(mean[i, d]), float(log_std[i, d]), float(eps[i, d])
            u = m + math.exp(ls) * e
            row_a.append(math.tanh(u))
            row_lp += -0.5 * e * e - ls - 0.5 * math.log(2 * math.pi) - math.log(1 - math.tanh(u) ** 2)
        actions.append(row_a)
        logps.append(row_lp)
    return torch.tensor(actions), torch.tensor(logps)


@pytest.mark.parametrize("builder", [mt_sac, multihead_sac, care, task_blind_sac])
def test_sac_losses_match_a_naive_reference(builder) -> None:
    s = spec()
    torch.manual_seed(0)
    agent = builder(s, SACConfig(gamma=0.9, init_temperature=0.3), hidden=[16, 16])
    with torch.no_grad():  # distinct per-task temperatures (where there are several)
        agent.log_alpha.copy_(torch.linspace(-1.5, -0.5, agent.log_alpha.numel()))
    b = batch(s, rows_per_task=3)
    k, n = s.num_tasks, b.obs.shape[0]
    alphas = agent.log_alpha.detach().exp()
    alpha_row = [float(alphas[t] if agent.per_task_temperature else alphas[0]) for t in b.task.tolist()]

    # Critic: the naive target uses the same noise as update_critic (same RNG state, same draw shape).
    torch.manual_seed(123)
    eps = torch.randn(n, s.action_dim)
    with torch.no_grad():
        next_a, next_lp = _naive_policy(agent.actor, b.next_obs, b.task, eps)
        q_next = agent.critic_target(b.next_obs, b.task, next_a)
        q = agent.critic(b.obs, b.task, b.action)
    expected_critic = {}
    for t, name in enumerate(s.task_names):
        rows = []
        for i in range(n):
            if int(b.task[i]) != t:
                continue
            y = float(b.reward[i]) + 0.9 * (1 - float(b.terminated[i])) * (
                min(float(q_next[0, i]), float(q_next[1, i])) - alpha_row[i] * float(next_lp[i])
            )
            rows.append((float(q[0, i]) - y) ** 2 + (float(q[1, i]) - y) ** 2)
        expected_critic[name] = sum(rows) / len(rows) / k
    torch.manual_seed(123)
    critic_losses, _ = agent.update_critic(b)
    for name in s.task_names:
        assert critic_losses[name].item() == pytest.approx(expected_critic[name], rel=1e-4, abs=1e-5)

    # Actor and temperature, against the weights after the critic step.
    torch.manual_seed(7)
    eps = torch.randn(n, s.action_dim)
    with torch.no_grad():
        a, lp = _naive_policy(agent.actor, b.obs, b.task, eps)
        q = agent.critic(b.obs, b.task, a)
    expected_actor = {}
    alpha_grad = torch.zeros_like(agent.log_alpha)
    for t, name in enumerate(s.task_names):
        idx = [i for i in range(n) if int(b.task[i]) == t]
        rows = [alpha_row[i] * float(lp[i]) - min(float(q[0, i]), float(q[1, i])) for i in idx]
        expected_actor[name] = sum(rows) / len(rows) / k
        # d/dlog_alpha_t of mean_t(-alpha_t (logp + H)) / k = -alpha_t mean_t(logp + H) / k
        g = -sum(alpha_row[i] * (float(lp[i]) + agent.target_entropy) for i in idx) / len(idx) / k
        alpha_grad[t if agent.per_task_temperature else 0] += g
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    torch.manual_seed(7)
    actor_losses, temp_loss, _, _ = agent.update_actor_and_temperature(b)
    for name in s.task_names:
        assert actor_losses[name].item() == pytest.approx(expected_actor[name], rel=1e-4, abs=1e-5)
    torch.testing.assert_close(agent.log_alpha.grad, alpha_grad, rtol=1e-4, atol=1e-6)
    assert agent.target_entropy == -s.action_dim
    # The actor step does not touch the critics.
    assert all(p.grad is None or torch.equal(p, c) for p, c in zip(agent.critic.parameters(), critic_before))
    assert all(torch.equal(p, c) for p, c in zip(agent.critic.parameters(), critic_before))


def test_polyak_averaging_of_the_target_critics() -> None:
    s = spec()
    torch.manual_seed(0)
    agent = mt_sac(s, SACConfig(tau=0.25), hidden=[8])
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(1.0)
    before = [p.clone() for p in agent.critic_target.parameters()]
    agent.update_target()
    for t, old, c in zip(agent.critic_target.parameters(), before, agent.critic.parameters()):
        torch.testing.assert_close(t, 0.75 * old + 0.25 * c)
    assert all(not p.requires_grad for p in agent.critic_target.parameters())


def test_update_schedule_and_stats() -> None:
    s = spec()
    torch.manual_seed(0)
    agent = mt_sac(s, SACConfig(actor_update_every=2, target_update_every=3), hidden=[8])
    b = batch(s)
    actor0 = [p.clone() for p in agent.actor.parameters()]
    target0 = [p.clone() for p in agent.critic_target.parameters()]
    stats = agent.update(b, stats=True)  # update 0: actor and target
    assert {"loss/critic", "loss/actor", "loss/temperature", "entropy", "alpha/a"} <= set(stats)
    assert not all(torch.equal(p, q) for p, q in zip(agent.actor.parameters(), actor0))
    actor1 = [p.clone() for p in agent.actor.parameters()]
    target1 = [p.clone() for p in agent.critic_target.parameters()]
    assert not all(torch.equal(p, q) for p, q in zip(target1, target0))
    stats = agent.update(b, stats=True)  # update 1: neither
    assert "loss/actor" not in stats
    assert all(torch.equal(p, q) for p, q in zip(agent.actor.parameters(), actor1))
    assert all(torch.equal(p, q) for p, q in zip(agent.critic_target.parameters(), target1))
    assert agent.update(b) == {} and agent.num_updates == 3


def test_act_is_bounded_and_deterministic_mode_is_tanh_mean() -> None:
    s = spec()
    torch.manual_seed(0)
    agent = care(s, hidden=[8])
    obs, task = torch.randn(20, 3) * 10, torch.arange(3).repeat(7)[:20]
    a = agent.act(obs, task)
    assert a.shape == (20, 2) and (a.abs() <= 1).all()
    torch.testing.assert_close(agent.act(obs, task, deterministic=True), torch.tanh(agent.actor(obs, task)[0]))


def test_training_state_round_trip() -> None:
    s = spec()
    torch.manual_seed(0)
    a1 = mt_sac(s, hidden=[8], actor_gradient=PCGrad(seed=1), critic_gradient=PCGrad(seed=2))
    a1.update(batch(s))
    torch.manual_seed(5)
    a2 = mt_sac(s, hidden=[8], actor_gradient=PCGrad(seed=1), critic_gradient=PCGrad(seed=2))
    a2.load_training_state(a1.training_state())
    for (k, v1), v2 in zip(a1.state_dict().items(), a2.state_dict().values()):
        assert torch.equal(v1, v2), k
    torch.manual_seed(9)
    a1.update(batch(s, seed=1))
    torch.manual_seed(9)
    a2.update(batch(s, seed=1))
    for v1, v2 in zip(a1.state_dict().values(), a2.state_dict().values()):
        assert torch.equal(v1, v2)
    with pytest.raises(ValueError, match="holds agent 'mt_sac'"):
        care(s, hidden=[8]).load_training_state(a1.training_state())


def test_sac_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="sac.tau"):
        SACConfig(tau=0.0)
    with pytest.raises(ValueError, match="sac.log_std_min"):
        SACConfig(log_std_min=2.0, log_std_max=1.0)


def test_care_needs_metadata() -> None:
    with pytest.raises(ValueError, match="CARE needs task metadata"):
        care(EnvSpec(3, 2, NAMES, None))


def test_agent_registry() -> None:
    assert set(AGENTS) == {"mt_sac", "multihead_sac", "care", "moore", "task_blind_sac"}
    s = spec()
    for name, builder in AGENTS.items():
        agent = builder(s, hidden=[8])
        assert isinstance(agent, SAC) and agent.name == name
    assert task_blind_sac(s, hidden=[8]).log_alpha.numel() == 1
    assert mt_sac(s, hidden=[8]).log_alpha.numel() == 3


# ----------------------------------------------------------------------------- gradient methods


def _conflicting_batch(s: EnvSpec) -> Transition:
    """Identical states and actions for every task, rewards of opposite signs: the shared critic weights get
    conflicting per-task gradients."""
    n = 8
    obs = torch.randn(1, s.obs_dim).repeat(s.num_tasks * n, 1)
    action = torch.full((s.num_tasks * n, s.action_dim), 0.3)
    reward = torch.tensor([10.0, -10.0, 10.0][: s.num_tasks]).repeat_interleave(n)
    task = torch.arange(s.num_tasks).repeat_interleave(n)
    return Transition(obs, action, reward, obs.clone(), torch.ones(s.num_tasks * n), task)


def test_pcgrad_changes_critic_gradients_when_tasks_conflict() -> None:
    s = spec(k=2)
    b = _conflicting_batch(s)
    grads = {}
    for name, method in (("none", Plain()), ("pcgrad", PCGrad(seed=0))):
        torch.manual_seed(0)
        agent = mt_sac(s, hidden=[16, 16], critic_gradient=method)
        _, stats = agent.update_critic(b)
        grads[name] = torch.cat([p.grad.flatten() for p in agent.critic.shared_parameters()])
        if name == "pcgrad":
            assert stats["conflicts"] == 1.0 and stats["cos_mean"] < 0
    assert not torch.allclose(grads["none"], grads["pcgrad"])
    # PCGrad's two-task result, by hand: g1' = g1 - (g1.g2/|g2|^2) g2, g2' likewise, summed.
    torch.manual_seed(0)
    agent = mt_sac(s, hidden=[16, 16])
    with torch.no_grad():
        next_a, next_lp = agent.actor.sample(b.next_obs, b.task)
    per_task = []
    for t in range(2):
        agent.critic.zero_grad()
        rows = b.task == t
        y = b.reward[rows]  # terminated everywhere: y = r
        q = agent.critic(b.obs[rows], b.task[rows], b.action[rows])
        (((q - y) ** 2).sum(0).mean() / 2).backward()
        per_task.append(torch.cat([p.grad.flatten() for p in agent.critic.shared_parameters()]))
    g1, g2 = per_task
    dot = g1 @ g2
    assert dot < 0
    expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
    torch.testing.assert_close(grads["pcgrad"], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads["none"], g1 + g2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", sorted(GRADIENT_METHODS))
def test_every_gradient_method_trains_mt_sac_and_multihead(method: str) -> None:
    s = spec()
    for builder in (mt_sac, multihead_sac):
        torch.manual_seed(0)
        agent = builder(
            s,
            hidden=[8, 8],
            actor_gradient=GRADIENT_METHODS[method](seed=0),
            critic_gradient=GRADIENT_METHODS[method](seed=1),
        )
        before = [p.clone() for p in agent.parameters()]
        for i in range(2):
            stats = agent.update(batch(s, seed=i), stats=True)
        assert all(math.isfinite(v) for v in stats.values())
        changed = [not torch.equal(p, q) for p, q in zip(agent.parameters(), before)]
        assert all(changed[: len(list(agent.actor.parameters()))])  # every actor tensor moved


# ------------------------------------------------------------------------- weighting and scheduling


def _critic_grads(agent: SAC) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in agent.critic.parameters()]


def _task_critic_loss(agent: SAC, b: Transition, t: int, k: int) -> torch.Tensor:
    """Task ``t``'s critic loss on a batch of terminal transitions (target = reward), as task_losses scales it
    with ``k`` tasks present."""
    rows = b.task == t
    q = agent.critic(b.obs[rows], b.task[rows], b.action[rows])
    return ((q - b.reward[rows]) ** 2).sum(0).mean() / k


def test_critic_weighting_weights_each_task_critic_gradient() -> None:
    s = spec(k=2)
    b = _conflicting_batch(s)
    torch.manual_seed(0)
    agent = multihead_sac(s, hidden=[16, 16], critic_weighting=Static(list(s.task_names), weights={"a": 3.0, "b": 0.5}))
    losses, _ = agent.update_critic(b)
    got = _critic_grads(agent)
    assert agent.critic_step.weighting.current_weights() == {"a": 3.0, "b": 0.5}
    torch.manual_seed(0)
    ref = multihead_sac(s, hidden=[16, 16])
    (3.0 * _task_critic_loss(ref, b, 0, 2) + 0.5 * _task_critic_loss(ref, b, 1, 2)).backward()
    for g, p in zip(got, ref.critic.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    assert losses["a"].item() == pytest.approx(_task_critic_loss(ref, b, 0, 2).item(), rel=1e-6)


def test_famo_on_the_critic_updates_its_logits_from_the_losses_after_the_step() -> None:
    s = spec(k=2)
    b = _conflicting_batch(s)  # terminal transitions: the target is the reward, so losses are reproducible by hand
    b = b._replace(reward=b.reward * torch.tensor([1.0, 0.1]).repeat_interleave(8))  # unequal task losses
    torch.manual_seed(0)
    agent = mt_sac(s, hidden=[16, 16], critic_weighting=FAMO(list(s.task_names), lr=0.1))
    before, _ = agent.update_critic(b)
    with torch.no_grad():
        after = {n: _task_critic_loss(agent, b, t, 2) for t, n in enumerate(s.task_names)}
    ref = FAMO(list(s.task_names), lr=0.1)
    ref.weighted({k: v.detach().clone().requires_grad_() for k, v in before.items()})
    ref.after_step(after)
    torch.testing.assert_close(agent.critic_step.weighting.logits, ref.logits)
    assert agent.critic_step.weighting.logits.abs().sum() > 0 and agent.actor_step.weighting is None


def test_scheduler_counts_only_the_selected_tasks_rows() -> None:
    s = spec()
    b = batch(s, rows_per_task=4)
    torch.manual_seed(0)
    agent = multihead_sac(s, hidden=[8], scheduler=SCHEDULERS["round_robin"](list(s.task_names)))
    torch.manual_seed(0)
    ref = multihead_sac(s, hidden=[8])
    alpha_before = agent.log_alpha.detach().clone()
    torch.manual_seed(1)
    stats = agent.update(b, stats=True)  # update 0: task "a" (rows 0..3) only
    assert {k for k in stats if k.startswith("loss/critic/")} == {"loss/critic/a"}
    assert {k for k in stats if k.startswith("loss/actor/")} == {"loss/actor/a"}
    # The same update on task a's rows alone, with nothing dropped (one task present: not divided further).
    torch.manual_seed(1)
    only_a = Transition(*(x[:4] for x in b))
    ref_stats = ref.update(only_a, stats=True)
    assert stats["loss/critic"] == pytest.approx(ref_stats["loss/critic"], rel=1e-6)
    assert stats["loss/actor"] == pytest.approx(ref_stats["loss/actor"], rel=1e-6)
    for p, q in zip(agent.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    # b's and c's temperatures did not move (nor, by the comparison above, their heads)
    assert torch.equal(agent.log_alpha[1:], alpha_before[1:]) and not torch.equal(agent.log_alpha[0], alpha_before[0])
    assert agent.critic_step.select(1) == ["b"] and agent.num_updates == 1


def test_uncertainty_log_variances_join_the_critic_optimizer() -> None:
    s = spec()
    torch.manual_seed(0)
    w = Uncertainty(list(s.task_names))
    agent = mt_sac(s, hidden=[8], critic_weighting=w)
    assert [p for g in agent.critic_optimizer.param_groups[1:] for p in g["params"]] == list(w.log_vars)
    agent.update(batch(s))
    assert all(p.detach().item() != 0.0 for p in w.log_vars)
    agent.double()  # the weightings follow the agent's dtype (and device), though they are not submodules
    assert w.log_vars[0].dtype == torch.float64 and "critic_step" not in dict(agent.named_modules())
    assert not any("log_vars" in k for k in agent.state_dict())


def test_observe_outcomes_reaches_the_scheduler() -> None:
    s = spec()
    progress = SCHEDULERS["progress"](list(s.task_names), seed=0)
    agent = mt_sac(s, hidden=[8], scheduler=progress)
    agent.observe_outcomes({"b": 1.0})
    assert progress.fast == [None, 1.0, None]
    mt_sac(s, hidden=[8]).observe_outcomes({"b": 1.0})  # no scheduler: nothing to feed


def test_training_state_round_trip_with_weightings_and_a_scheduler() -> None:
    s = spec()

    def build() -> SAC:
        names = list(s.task_names)
        return multihead_sac(
            s,
            hidden=[8],
            critic_gradient=PCGrad(seed=2),
            critic_weighting=FAMO(names, lr=0.1),
            actor_weighting=RLW(names, seed=4),
            scheduler=SCHEDULERS["random"](names, seed=1, tasks_per_step=2),
        )

    torch.manual_seed(0)
    a1 = build()
    for i in range(3):
        a1.update(batch(s, seed=i))
    torch.manual_seed(5)
    a2 = build()
    a2.load_training_state(copy.deepcopy(a1.training_state()))
    for i in range(3, 6):
        torch.manual_seed(i)
        a1.update(batch(s, seed=i))
        torch.manual_seed(i)
        a2.update(batch(s, seed=i))
    for (k, v1), v2 in zip(a1.state_dict().items(), a2.state_dict().values()):
        assert torch.equal(v1, v2), k
    assert torch.equal(a1.critic_step.weighting.logits, a2.critic_step.weighting.logits)
    assert a1.critic_step.weighting.logits.abs().sum() > 0
    assert a1.training_state()["steps"]["actor"]["scheduler"] is None  # the critic's step holds the scheduler


def test_training_state_of_the_earlier_layout_loads() -> None:
    s = spec()
    torch.manual_seed(0)
    a1 = mt_sac(s, hidden=[8], critic_gradient=PCGrad(seed=2))
    a1.update(batch(s))
    state = a1.training_state()
    steps = state.pop("steps")
    state["gradient"] = {k: v["gradient"] for k, v in steps.items()}  # written before the multi-task steps
    a2 = mt_sac(s, hidden=[8], critic_gradient=PCGrad(seed=9))
    a2.load_training_state(state)
    assert a2.critic_gradient.state_dict()["generator"].equal(a1.critic_gradient.state_dict()["generator"])


def test_care_checkpoint_of_the_earlier_code_resumes_exactly() -> None:
    """A training state written before the fused encoder and fused Adam (``foreach`` optimisers) loads into a
    new agent, which then continues exactly as the writer does (Adam keeps the checkpoint's ``foreach``)."""
    s = spec()
    torch.manual_seed(0)
    old = care(s, hidden=[8], num_experts=2, expert_hidden=[4], expert_dim=4, context_hidden=[4], context_dim=3)
    for name in ("actor", "critic", "temperature"):
        opt = getattr(old, f"{name}_optimizer")
        params = [p for g in opt.param_groups for p in g["params"]]
        setattr(old, f"{name}_optimizer", torch.optim.Adam(params, lr=opt.param_groups[0]["lr"], foreach=True))
    old.update(batch(s))
    new = care(s, hidden=[8], num_experts=2, expert_hidden=[4], expert_dim=4, context_hidden=[4], context_dim=3)
    new.load_training_state(copy.deepcopy(old.training_state()))
    assert new.critic_optimizer.param_groups[0]["foreach"] is True
    for agent in (old, new):
        torch.manual_seed(5)
        agent.update(batch(s, seed=1))
    for (name, a), b in zip(old.state_dict().items(), new.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------- replay


def test_replay_equal_rows_per_task_ring_buffer_and_state_round_trip() -> None:
    r = TaskReplay(3, 4, obs_dim=2, action_dim=1, seed=0)
    with pytest.raises(ValueError, match="no transitions yet"):
        r.sample(2)
    # Task 0 gets 6 rows (two steps of 3 envs of task 0), tasks 1, 2 one row each.
    for step in range(2):
        task = np.array([0, 0, 0, 1, 2]) if step == 0 else np.array([0, 0, 0])
        v = np.arange(len(task), dtype=np.float32) + 10 * step
        r.add(task, np.stack([v, v], 1), v[:, None], v, np.stack([v, v], 1) + 0.5, np.zeros(len(task)))
    assert r.size.tolist() == [4, 1, 1] and r.pos.tolist() == [2, 1, 1]
    # Ring of 4 for task 0: rows 0, 1, 2 then 10, 11, 12 -> slots [11, 12, 2, 10] (0 and 1 overwritten).
    assert r.data["reward"][0].tolist() == [11.0, 12.0, 2.0, 10.0]
    assert r.data["reward"][1, 0].item() == 3.0 and r.data["reward"][2, 0].item() == 4.0
    b = r.sample(50)
    assert b.task.tolist() == [0] * 50 + [1] * 50 + [2] * 50
    assert set(b.reward[:50].tolist()) == {11.0, 12.0, 2.0, 10.0}  # uniform over the 4 filled slots
    assert set(b.reward[50:100].tolist()) == {3.0}
    torch.testing.assert_close(b.next_obs, b.obs + 0.5)
    r2 = TaskReplay(3, 4, obs_dim=2, action_dim=1, seed=99)
    r2.load_state_dict(r.state_dict())
    for x, y in zip(r.sample(7), r2.sample(7)):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="capacity"):
        TaskReplay(3, 5, 2, 1).load_state_dict(r.state_dict())


def test_replay_sampling_is_uniform() -> None:
    r = TaskReplay(1, 10, obs_dim=1, action_dim=1, seed=3)
    v = np.arange(10, dtype=np.float32)
    r.add(np.zeros(10, dtype=np.int64), v[:, None], v[:, None], v, v[:, None], np.zeros(10))
    counts = np.bincount(r.sample(20_000).reward.long().numpy(), minlength=10)
    # each count ~ Binomial(20000, 0.1): mean 2000, sd 42; 6 sd either side
    assert counts.min() > 1750 and counts.max() < 2250


def test_env_spec_from_family_checks_spaces() -> None:
    gym = pytest.importorskip("gymnasium")

    class Fam:
        task_names = ("x", "y")
        metadata = np.zeros((2, 3), np.float32)

        def __init__(self, high: float) -> None:
            self.high = high

        def make_env(self, task: int) -> object:
            env = gym.make("Pendulum-v1")
            env.observation_space = gym.spaces.Dict(
                {"obs": gym.spaces.Box(-1, 1, (3,), np.float32), "task": gym.spaces.Discrete(2)}
            )
            env.action_space = gym.spaces.Box(-self.high, self.high, (1,), np.float32)
            return env

    s = EnvSpec.from_family(Fam(1.0))
    assert (s.obs_dim, s.action_dim, s.num_tasks, s.metadata.shape) == (3, 1, 2, (2, 3))
    with pytest.raises(ValueError, match=r"acts in \[-1, 1\]"):
        EnvSpec.from_family(Fam(2.0))


def test_twin_critic_representation_is_what_the_heads_read() -> None:
    torch.manual_seed(0)
    critic = TwinCritic(OneHotEncoder(3, 2), [8, 6], action_dim=2, num_heads=2)
    obs, task, act = torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), torch.rand(4, 2)
    q, z = critic.forward_with_representation(obs, task, act)
    assert q.shape == (2, 4) and z.shape == (4, 2, 6)
    (g,) = torch.autograd.grad(q.sum(), z)
    assert g.abs().sum() > 0  # Q depends on z: MGDA-UB / GREAT may use it as the representation
    torch.testing.assert_close(q, critic(obs, task, act))
    assert isinstance(critic.head.linear, nn.Module)
