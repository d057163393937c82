"""Property tests (hypothesis) run against every loss weighting of :mod:`mtl.weighting`, on training whose task
losses differ by orders of magnitude (scales 1e-3..1e3, k from 1 to 8), as an MSE head next to a rare-event BCE
head does: the weights stay finite and positive through several steps (FAMO's post-step update and DWA's epoch
ends included), they follow the tasks and not the order the tasks were given in, and the loss-agnostic
weightings are homogeneous in the losses.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtl.weighting import WEIGHTINGS, build_weighting

SETTINGS = settings(derandomize=True, max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
cases = st.tuples(st.integers(1, 8), st.integers(0, 2**31 - 1))
DETERMINISTIC = [n for n in WEIGHTINGS if n != "rlw"]  # RLW draws its weights in task order, by design
HOMOGENEOUS = ["equal", "static", "inverse_size"]  # weights that do not read the losses


class Problem:
    """A shared linear body and one linear head per task; task ``i``'s loss is ``scale_i`` times an MSE."""

    def __init__(self, k: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tasks = [f"t{i}" for i in range(k)]
        self.scales = {t: 10.0 ** float(torch.empty(()).uniform_(-3, 3, generator=gen)) for t in self.tasks}
        self.x = torch.randn(32, 6, generator=gen)
        self.y = {t: torch.randn(32, generator=gen) for t in self.tasks}
        torch.manual_seed(seed)
        self.body = nn.Linear(6, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in self.tasks})

    def losses(self) -> dict[str, Tensor]:
        z = torch.relu(self.body(self.x))
        return {t: self.scales[t] * (self.heads[t](z).squeeze(-1) - self.y[t]).pow(2).mean() for t in self.tasks}

    def parameters(self) -> list[nn.Parameter]:
        return [*self.body.parameters(), *self.heads.parameters()]


def train(name: str, problem: Problem, order: list[str], steps: int = 5) -> list[dict[str, float]]:
    """Weighted losses per task at each step, training with the weighting built for tasks in ``order``."""
    weighting = build_weighting(name, order, sizes={t: 100 * (i + 1) for i, t in enumerate(problem.tasks)}, seed=0)
    opt = torch.optim.SGD([*problem.parameters(), *weighting.trainable_parameters()], lr=1e-4)
    shared = list(problem.body.parameters())
    out = []
    for step in range(steps):
        losses = problem.losses()
        weighted = weighting.weighted(losses, shared=shared)
        out.append({t: float(v) for t, v in weighted.items()})
        opt.zero_grad()
        torch.stack(list(weighted.values())).sum().backward()
        opt.step()
        if weighting.wants_losses_after_step:
            with torch.no_grad():
                weighting.after_step(problem.losses())
        if step % 2 == 1:
            weighting.on_epoch_end({t: float(v) for t, v in losses.items()})
        weights = weighting.current_weights()
        assert all(math.isfinite(w) and w > 0 for w in weights.values()), (name, weights)
    return out


@pytest.mark.parametrize("name", WEIGHTINGS)
@SETTINGS
@given(case=cases)
def test_finite_positive_weights_at_disparate_loss_scales(name: str, case: tuple[int, int]) -> None:
    k, seed = case
    problem = Problem(k, seed)
    for record in train(name, problem, problem.tasks):
        assert set(record) == set(problem.tasks)
        assert all(math.isfinite(v) for v in record.values()), (name, record)


@pytest.mark.parametrize("name", DETERMINISTIC)
@SETTINGS
@given(case=cases, perm_seed=st.integers(0, 1000))
def test_weights_follow_the_tasks_not_their_order(name: str, case: tuple[int, int], perm_seed: int) -> None:
    k, seed = case
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    first = train(name, Problem(k, seed), Problem(k, seed).tasks)
    problem = Problem(k, seed)
    second = train(name, problem, [problem.tasks[i] for i in perm])
    for a, b in zip(first, second):
        for t in a:
            assert b[t] == pytest.approx(a[t], rel=1e-5, abs=1e-12), (name, t, a, b)


@pytest.mark.parametrize("name", HOMOGENEOUS)
@SETTINGS
@given(case=cases, log_s=st.sampled_from([-3.0, 3.0]))
def test_loss_agnostic_weightings_are_homogeneous(name: str, case: tuple[int, int], log_s: float) -> None:
    k, seed = case
    s = 10.0**log_s
    problem = Problem(k, seed)
    weighting = build_weighting(name, problem.tasks, sizes={t: 10 * (i + 1) for i, t in enumerate(problem.tasks)})
    losses = {t: v.detach() for t, v in problem.losses().items()}
    base = weighting.weighted(losses)
    scaled = weighting.weighted({t: s * v for t, v in losses.items()})
    for t in problem.tasks:
        assert float(scaled[t]) == pytest.approx(s * float(base[t]), rel=1e-6)
