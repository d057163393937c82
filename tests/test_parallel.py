"""mtl.parallel: a multi-task step on 2 gloo ranks, each holding a shard of the batch, updates the model exactly as
one process holding the whole batch (the reference here, run in this process), for weightings with state and
gradient methods that combine per-task gradients; every rank ends with the same weights and strategy state."""

from __future__ import annotations

import pytest
import torch
from ranks import run_ranks
from torch import nn

from mtl.gradients import build_gradient_method
from mtl.step import MultiTaskStep, StepParameters
from mtl.tasks import TaskSpec, compute_losses
from mtl.weighting import build_weighting

TASKS = [TaskSpec("a", "binary"), TaskSpec("b", "regression"), TaskSpec("c", "binary")]
STEPS = 12
GLOBAL_BATCH = 24
# (weighting, gradient method): the stateful weightings and the methods the issue names, and GradNorm's
# per-task norms at the last shared layer, with and without a method on top.
CASES = [
    ("equal", "none"),
    ("uncertainty", "none"),
    ("famo", "none"),
    ("gradnorm", "none"),
    ("dwa", "pcgrad"),
    ("equal", "pcgrad"),
    ("equal", "mgda_ub"),
    ("uncertainty", "cagrad"),
    ("famo", "nash_mtl"),
]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t.name: nn.Linear(8, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = self.body(x)
        return {t: h(z).squeeze(-1) for t, h in self.heads.items()}, z


def batch(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g)
    # losses of very different sizes: a regression target 100x the binary ones
    noise = torch.randn(GLOBAL_BATCH, generator=g)
    y = {"a": (x[:, 0] > 0).float(), "b": 100 * x[:, 1] + noise, "c": (x[:, 2] > 1).float()}
    return x, y


def train(weighting: str, gradient: str, rows: slice | None, data_parallel: bool) -> dict:
    """``STEPS`` steps on the rows ``rows`` of every global batch (None: all); returns weights and state."""
    from mtl.parallel import DataParallel

    torch.manual_seed(0)
    net = Net()
    w = build_weighting(weighting, TASKS, seed=0)
    method = build_gradient_method(gradient, seed=0)
    dp = DataParallel() if data_parallel else None
    step = MultiTaskStep([t.name for t in TASKS], weighting=w, gradient=method, data_parallel=dp)
    opt = torch.optim.Adam([*net.parameters(), *step.trainable_parameters()], lr=0.01)
    shared = list(net.body.parameters())
    params = StepParameters(shared, [*net.heads.parameters(), *step.trainable_parameters()], shared[-2:])
    for i in range(STEPS):
        x, y = batch(i)
        if rows is not None:
            x, y = x[rows], {k: v[rows] for k, v in y.items()}

        def losses(x=x, y=y):
            out, z = net(x)
            return compute_losses(TASKS, out, y), z

        values, z = losses()
        step.run(i, values, opt, params, cut=z, count=len(x), losses_after_step=lambda: losses()[0])
        if i % 4 == 3:
            step.end_epoch()
    return {
        "params": [p.detach().clone() for p in net.parameters()],
        "weighting": {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in w.state_dict().items()},
        "weights": w.current_weights(),
    }


def _ranks(rank: int, world: int, cuts: list[int]) -> dict:
    rows = slice(cuts[rank], cuts[rank + 1])
    return {case: train(*case, rows, True) for case in CASES}


def _close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        worst = max(worst, float((x - y).abs().max() / (y.abs().max() + 1e-12)))
    assert worst <= tol, worst
    return worst


@pytest.mark.parametrize("cuts", [[0, 12, 24], [0, 5, 24]], ids=["equal-shards", "5-and-19-rows"])
def test_two_ranks_on_shards_equal_one_process_on_the_global_batch(cuts: list[int]) -> None:
    ranks = run_ranks(_ranks, 2, cuts, timeout=120)
    for case in CASES:
        one = train(*case, None, False)
        r0, r1 = ranks[0][case], ranks[1][case]
        # every rank holds the same weights and strategy state, bit for bit (they applied the same update)
        for x, y in zip(r0["params"], r1["params"], strict=True):
            assert torch.equal(x, y), case
        assert r0["weights"] == r1["weights"], case
        for k, v in r0["weighting"].items():
            assert torch.equal(v, r1["weighting"][k]) if isinstance(v, torch.Tensor) else v == r1["weighting"][k]
        # ... and those of one process on the global batch, to float32 round-off over 12 Adam steps
        # (the shards' sums are added in another order)
        _close(r0["params"], one["params"], 2e-4)
        for k, v in one["weights"].items():
            assert r0["weights"][k] == pytest.approx(v, rel=2e-4, abs=1e-6), case
