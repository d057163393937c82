"""The cut graph (mtl.split.TaskSplit): per-task gradients through it equal those of the uncut graph.

References are computed independently on the uncut graph: one ``torch.autograd.grad`` per task (the naive
Jacobian) and ``sum(losses).backward()`` for the task heads.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl import solvers
from mtl.gradients import GRADIENT_METHODS, build_gradient_method
from mtl.split import TaskSplit
from mtl.tasks import TaskSpec
from mtrec.data.batch import FeatureSpec, SparseFeature, TabularDataset
from mtrec.models import MODELS, InputArch, MultiTaskModel
from mtrec.trainer import Trainer, TrainerConfig

D64 = torch.float64
FEATURES = FeatureSpec(
    dense_names=("d0", "d1", "d2"),
    sparse=(SparseFeature("user", 20), SparseFeature("tags", 10, max_len=3, pooling="mean")),
)
TASKS = ["click", "like", "share"]
SPLITTABLE = {
    "shared_bottom": {"bottom_dims": [12, 6]},
    "omoe": {"num_experts": 3, "expert_dims": [6]},
    "mmoe": {"num_experts": 3, "expert_dims": [6, 5]},
    "cgc": {"num_shared_experts": 2, "num_task_experts": 1, "expert_dims": [6]},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(name: str, seed: int = 0, tasks: list[str] = TASKS, **overrides) -> MultiTaskModel:
    torch.manual_seed(seed)
    kwargs = {"tower_dims": [8], **SPLITTABLE.get(name, {}), **overrides}
    shared = {k: kwargs[k] for k in ("activation", "dropout") if k in kwargs}
    inputs = InputArch(FEATURES, embedding_dim=4, dense_dims=[5], **shared)
    return functools.partial(MODELS[name], **kwargs)(inputs=inputs, tasks=tasks)


def make_data(n: int, tasks: list[str], seed: int = 0, regression: bool = False) -> TabularDataset:
    g = torch.Generator().manual_seed(seed)
    ids = {f.name: torch.randint(0, f.num_embeddings, (n, f.max_len), generator=g) for f in FEATURES.sparse}
    lengths = {f.name: torch.randint(1, f.max_len + 1, (n,), generator=g) for f in FEATURES.sparse}
    if regression:
        labels = {t: torch.randn(n, generator=g) for t in tasks}
    else:
        labels = {t: torch.randint(0, 2, (n,), generator=g).float() for t in tasks}
    return TabularDataset(dense=torch.randn(n, 3, generator=g), sparse_ids=ids, sparse_lengths=lengths, labels=labels)


def losses_of(outputs: dict[str, Tensor], labels: dict[str, Tensor], tasks: list[str]) -> dict[str, Tensor]:
    # Different scales per task, so that no two task gradients are alike.
    return {t: (i + 1.0) * F.binary_cross_entropy_with_logits(outputs[t], labels[t]) for i, t in enumerate(tasks)}


def naive_jacobian(losses: list[Tensor], params: list[nn.Parameter]) -> Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------------------------
# TaskSplit on a hand-made body and heads
# --------------------------------------------------------------------------------------------------------------


class BodyHeads(nn.Module):
    """A body with two outputs that cross the cut (like MMoE's experts and gate input), k non-linear heads."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 6)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(6 + 4, 5), nn.Tanh(), nn.Linear(5, 1)) for _ in range(k))
        self.k = k

    def losses(self, x: Tensor, y: Tensor, split: TaskSplit | None = None, stacked: bool = False) -> list[Tensor]:
        """``stacked``: the first cut is fanned out as one stacked leaf (head ``i`` reads row ``i``), the second
        as one leaf per task, so both kinds of cut meet in one split."""
        z = torch.tanh(self.body(x))
        emb = x * 1.5 + self.body.bias[:4]  # a second tensor that depends on a shared parameter
        names = [f"t{i}" for i in range(self.k)]
        if split is not None and stacked:
            rows = split.fan_out_stacked(z)
            assert rows.shape == (self.k, *z.shape)
            zs = {n: rows[i] for i, n in enumerate(names)}
        else:
            zs = split.fan_out(z) if split is not None else dict.fromkeys(names, z)
        es = split.fan_out(emb) if split is not None else dict.fromkeys(names, emb)
        return [
            F.mse_loss(h(torch.cat([zs[n], es[n]], dim=-1)).squeeze(-1), y[:, i]) * (i + 1)
            for i, (n, h) in enumerate(zip(names, self.heads))
        ]


@pytest.mark.parametrize("stacked", [False, True], ids=["per-task-leaves", "stacked-leaf"])
def test_split_jacobian_and_head_gradients_equal_the_uncut_graph(stacked: bool) -> None:
    model = BodyHeads()
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    names = ["t0", "t1", "t2"]
    shared, heads = list(model.body.parameters()), list(model.heads.parameters())
    G_ref = naive_jacobian(model.losses(x, y), shared)
    head_ref = torch.autograd.grad(sum(model.losses(x, y)), heads)

    split = TaskSplit(names)
    L = torch.stack(model.losses(x, y, split, stacked))
    assert len(split.cuts) == 2
    J = split.head_backward(names, L, heads)
    G, batched = split.param_jacobian(J, shared)
    assert batched
    torch.testing.assert_close(G, G_ref)
    for p, g in zip(heads, head_ref):
        torch.testing.assert_close(p.grad, g)
    # The loop fallback gives the same rows.
    split2 = TaskSplit(names)
    L2 = torch.stack(model.losses(x, y, split2, stacked))
    G_loop, batched = split2.param_jacobian(split2.head_backward(names, L2), shared, batched=False)
    assert not batched
    torch.testing.assert_close(G_loop, G_ref)


def test_split_body_grads_of_combined_cotangents_are_weighted_loss_gradients() -> None:
    model = BodyHeads()
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    names = ["t0", "t1", "t2"]
    shared = list(model.body.parameters())
    w = torch.tensor([0.2, 0.5, 0.3], dtype=D64)
    ref = torch.autograd.grad(sum(wi * li for wi, li in zip(w.tolist(), model.losses(x, y))), shared)
    split = TaskSplit(names)
    J = split.head_backward(names, torch.stack(model.losses(x, y, split)))
    for g, r in zip(split.body_grads(split.combine(J, w), shared), ref):
        torch.testing.assert_close(g, r)


def test_stacked_cut_rows_of_a_subset_of_tasks() -> None:
    """head_backward over some tasks returns their rows of a stacked leaf, in the order asked, zero-free."""
    split = TaskSplit(["a", "b", "c"])
    x = torch.randn(5, 2)
    assert split.fan_out_stacked(x) is x and not split.cuts  # nothing crosses the cut
    w = nn.Parameter(torch.randn(2, 3))
    z = x @ w
    rows = split.fan_out_stacked(z)
    losses = {"a": (rows[0] ** 2).sum(), "b": rows[1].sum() * 3.0, "c": (rows[2] * z.detach()).sum()}
    (J,) = split.head_backward(["c", "a"], torch.stack([losses["c"], losses["a"]]))
    assert J.shape == (2, 5, 3)
    torch.testing.assert_close(J[0], z.detach())
    torch.testing.assert_close(J[1], 2 * z.detach())
    G, _ = split.param_jacobian([J], [w])
    torch.testing.assert_close(G[1], torch.autograd.grad((z**2).sum(), w, retain_graph=True)[0].reshape(-1))


def test_split_ignores_tensors_without_gradient_and_heads_of_absent_tasks() -> None:
    split = TaskSplit(["a", "b"])
    x = torch.randn(3, 2)
    assert split.fan_out(x) == {"a": x, "b": x} and not split.cuts  # nothing crosses the cut
    w = nn.Parameter(torch.randn(2, 2))
    z = x @ w
    zs = split.fan_out(z)
    only_a = (zs["a"] ** 2).sum().reshape(1)
    (J,) = split.head_backward(["a"], only_a)
    assert J.shape == (1, 3, 2)
    torch.testing.assert_close(J[0], 2 * z.detach())
    with pytest.raises(ValueError, match="unknown tasks"):
        split.head_backward(["c"], only_a)
    with pytest.raises(ValueError, match="shared body is empty"):
        TaskSplit(["a"]).head_backward(["a"], only_a)


@pytest.mark.parametrize("stacked", [False, True], ids=["per-task-leaves", "stacked-leaf"])
@pytest.mark.parametrize("name", sorted(GRADIENT_METHODS))
def test_every_method_gives_the_same_gradients_through_the_split(name: str, stacked: bool) -> None:
    """Each method on the cut graph against the same method on the uncut graph, from identical states."""
    model = BodyHeads()
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    names = ["t0", "t1", "t2"]
    shared, heads = list(model.body.parameters()), list(model.heads.parameters())
    kwargs = {"update_every": 2} if name == "nash_mtl" else {}
    ref_method, split_method = (
        build_gradient_method(name, seed=3, **kwargs),
        build_gradient_method(name, seed=3, **kwargs),
    )
    for step in range(3):  # several steps: stateful methods (GradVac, Nash-MTL's reuse of alpha, GREAT)
        x, y = torch.randn(16, 4), torch.randn(16, 3)
        model.zero_grad(set_to_none=True)
        losses = dict(zip(names, model.losses(x, y)))
        rep = None
        if ref_method.requires_representation:
            # The uncut reference needs one tensor: the two cut tensors concatenated per sample.
            z = torch.tanh(model.body(x))
            emb = x * 1.5 + model.body.bias[:4]
            rep = torch.cat([z, emb], dim=-1)
            losses = {
                n: F.mse_loss(h(rep).squeeze(-1), y[:, i]) * (i + 1) for i, (n, h) in enumerate(zip(names, model.heads))
            }
        ref_method.backward(losses, shared, others=heads, representation=rep)
        ref = [p.grad.clone() for p in [*shared, *heads]]

        model.zero_grad(set_to_none=True)
        split = TaskSplit(names)
        if split_method.requires_representation:
            z = torch.tanh(model.body(x))
            emb = x * 1.5 + model.body.bias[:4]
            rep = torch.cat([z, emb], dim=-1)
            if stacked:
                cat = dict(zip(names, split.fan_out_stacked(rep)))  # rows of the stacked leaf
            else:
                cat = split.fan_out(rep)
            losses = {
                n: F.mse_loss(h(cat[n]).squeeze(-1), y[:, i]) * (i + 1)
                for i, (n, h) in enumerate(zip(names, model.heads))
            }
        else:
            losses = dict(zip(names, model.losses(x, y, split, stacked)))
        split_method.backward(losses, shared, others=heads, representation=split)
        for p, r in zip([*shared, *heads], ref):
            torch.testing.assert_close(p.grad, r, atol=1e-6, rtol=1e-5, msg=f"{name}, step {step}")




# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPLITTABLE))
def test_model_split_gives_the_uncut_jacobian(name: str) -> None:
    model = make(name)
    assert model.can_split
    batch = make_data(24, TASKS).batch(torch.arange(24))
    groups = model.parameter_groups()
    shared = [p for p in groups["shared"] if p.requires_grad]
    owned = [p for t in TASKS for p in groups[t]]
    plain = model(batch.dense, batch.sparse)
    ref_losses = losses_of(plain, batch.labels, TASKS)
    G_ref = naive_jacobian(list(ref_losses.values()), shared)
    owned_ref = torch.autograd.grad(sum(ref_losses.values()), owned, allow_unused=True)

    outputs, split = model.forward_with_split(batch.dense, batch.sparse)
    assert model._split is None  # nothing kept after the call
    for t in TASKS:
        torch.testing.assert_close(outputs[t], plain[t])
    losses = losses_of(outputs, batch.labels, TASKS)
    J = split.head_backward(TASKS, torch.stack(list(losses.values())), owned)
    G, _ = split.param_jacobian(J, shared)
    torch.testing.assert_close(G, G_ref, atol=1e-6, rtol=1e-5)
    for p, g in zip(owned, owned_ref):
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if g is None else g)


def test_models_without_a_clean_cut_refuse_to_split() -> None:
    for name in ("ple", "esmm", "l2_sharing", "cross_stitch", "single_task"):
        tasks = ["ctr", "ctcvr"] if name == "esmm" else TASKS
        model = make(name, tasks=tasks, **({"num_levels": 2} if name == "ple" else {}))
        assert not model.can_split, name
        with pytest.raises(ValueError, match="cannot cut"):
            model.forward_with_split(*make_data(4, tasks).batch(torch.arange(4))[:2])
    assert make("ple", num_levels=1).can_split
    # A task read by another task's tower without a stop-gradient: that tower is not one task's alone.
    assert make("mmoe", task_feeds={"like": "click"}).can_split
    assert not make("mmoe", task_feeds={"like": "click"}, feed_stop_gradient=False).can_split


def _train(name: str, gradient: str, cut_graph: bool, run_dir: Path, weighting=None, steps: int = 4) -> list[Tensor]:
    model = make(name, seed=1)
    tasks = [TaskSpec(t, "binary") for t in TASKS]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainerConfig(batch_size=16, progress=False, tensorboard=False, cut_graph=cut_graph)
    trainer = Trainer(
        model,
        opt,
        tasks,
        cfg,
        run_dir,
        seed=0,
        gradient=build_gradient_method(gradient, seed=0),
        weighting=weighting,
    )
    assert trainer._use_split == cut_graph
    data = make_data(64, TASKS, seed=2)
    for b in list(data.batches(16, shuffle=True, seed=0))[:steps]:
        trainer.train_step(b)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("name", "gradient"),
    [("mmoe", "pcgrad"), ("mmoe", "mgda_ub"), ("cgc", "cagrad"), ("shared_bottom", "great"), ("omoe", "nash_mtl")],
)
def test_trainer_with_and_without_the_split_trains_the_same_weights(name: str, gradient: str, tmp_path: Path) -> None:
    fast, slow = _train(name, gradient, True, tmp_path / "fast"), _train(name, gradient, False, tmp_path / "slow")
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _adam_steps(gradient: str, cut_graph: bool, fused: bool, run_dir: Path, weighting=None, steps: int = 3):
    """A few Trainer steps of an MMoE with Adam; returns (parameters, {name: gradient laid out like it})."""
    model = make("mmoe", seed=1)
    tasks = [TaskSpec(t, "binary") for t in TASKS]
    opt = torch.optim.Adam(model.parameters(), lr=0.01, **({"fused": True} if fused else {"foreach": False}))
    layouts: dict[str, bool] = {}
    step = opt.step

    def checked_step(*args, **kwargs):
        for n, p in model.named_parameters():
            if p.grad is not None:  # strides of dimensions of size 1 address nothing
                layouts[n] = all(a == b for a, b, d in zip(p.stride(), p.grad.stride(), p.shape) if d > 1)
        return step(*args, **kwargs)

    opt.step = checked_step  # type: ignore[method-assign]
    cfg = TrainerConfig(batch_size=16, progress=False, tensorboard=False, cut_graph=cut_graph)
    trainer = Trainer(model, opt, tasks, cfg, run_dir, seed=0, gradient=build_gradient_method(gradient, seed=0),
                      weighting=weighting)  # fmt: skip
    for b in list(make_data(64, TASKS, seed=2).batches(16, shuffle=True, seed=0))[:steps]:
        trainer.train_step(b)
    return [p.detach().clone() for p in model.parameters()], layouts


@pytest.mark.parametrize("cut_graph", [True, False], ids=["cut", "uncut"])
@pytest.mark.parametrize("gradient", sorted(GRADIENT_METHODS))
def test_every_method_leaves_gradients_in_the_parameters_layout(gradient: str, cut_graph: bool, tmp_path: Path) -> None:
    """The experts' grouped weight reaches autograd through a transpose, so its raw gradient has other strides;
    fused Adam would read such a gradient as if it had the parameter's (silently wrong on CPU). Every method must
    assign gradients laid out like their parameters, and fused Adam must then train exactly as the loop does."""
    fused, layouts = _adam_steps(gradient, cut_graph, True, tmp_path / "fused")
    assert "experts.layers.0.weight" in layouts
    assert [name for name, ok in layouts.items() if not ok] == []
    loop, _ = _adam_steps(gradient, cut_graph, False, tmp_path / "loop")
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gradnorm_with_plain_backward_through_the_split_keeps_the_layout(tmp_path: Path) -> None:
    from mtl.weighting import GradNorm

    runs = {}
    for fused in (True, False):
        weighting = GradNorm([TaskSpec(t, "binary") for t in TASKS])
        runs[fused], layouts = _adam_steps("none", True, fused, tmp_path / str(fused), weighting=weighting)
        assert layouts and all(layouts.values())
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "gradient"), [("mmoe", "none"), ("mmoe", "pcgrad"), ("shared_bottom", "none")])
def test_gradnorm_measures_task_gradients_through_the_split(name: str, gradient: str, tmp_path: Path) -> None:
    """GradNorm's norms through the cut (and plain backward through it): the same training as on the uncut graph."""
    from mtl.weighting import GradNorm

    runs = {}
    for cut in (True, False):
        weighting = GradNorm([TaskSpec(t, "binary") for t in TASKS], lr=0.5)
        runs[cut] = _train(name, gradient, cut, tmp_path / str(cut), weighting=weighting, steps=4)
        runs[cut].append(torch.stack([p.detach() for p in weighting.task_weights]))
    assert not torch.allclose(runs[True][-1], torch.ones(3))  # the task weights did move
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# The exact min-norm solver
# --------------------------------------------------------------------------------------------------------------


def test_active_set_min_norm_matches_a_converged_frank_wolfe_and_the_kkt_conditions() -> None:
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        k, P = rng.choice([3, 4, 6, 9]), rng.choice([2, 3, 10, 50])
        G = torch.randn(k, P, generator=gen, dtype=D64)
        if trial % 4 == 0:
            G[1] = G[0]  # duplicates
        if trial % 5 == 0:
            G[2] = 0.0  # a zero gradient: the min norm is 0
        if trial % 6 == 0:
            G[1] = -G[0]  # opposite gradients
        M = G @ G.T
        alpha, _ = solvers.min_norm_simplex(M)
        assert abs(float(alpha.sum()) - 1.0) < 1e-12 and bool((alpha >= 0).all())
        s = float(M.diagonal().mean())
        fw, _ = solvers._min_norm_list([[x / s for x in r] for r in M.tolist()], 200000, 1e-14)
        fw_t = torch.tensor(fw, dtype=D64)
        assert float(alpha @ M @ alpha) <= float(fw_t @ M @ fw_t) + 1e-9 * s
        # KKT: (M alpha)_i >= alpha^T M alpha for every i, with equality on the support.
        Ma, aMa = M @ alpha, float(alpha @ M @ alpha)
        assert float(Ma.min()) >= aMa - 1e-8 * s
        assert float((Ma[alpha > 1e-9] - aMa).abs().max()) <= 1e-8 * s


def test_min_norm_falls_back_to_frank_wolfe_when_the_active_set_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]], dtype=D64)
    exact, _ = solvers.min_norm_simplex(G @ G.T)
    monkeypatch.setattr(solvers, "_affine_min_norm", lambda A: None)
    approx, iters = solvers.min_norm_simplex(G @ G.T)
    assert iters > 0
    torch.testing.assert_close(approx, exact, atol=1e-4, rtol=0)


def test_warm_started_min_norm_equals_the_cold_start() -> None:
    """MGDA keeps the previous support to warm-start the next solve: same answer, and the support is state."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(100):
        k = 3 + trial % 6
        G = torch.randn(k, 20, generator=gen, dtype=D64) + (trial % 3) * torch.randn(1, 20, generator=gen, dtype=D64)
        M = G @ G.T
        cold, _ = solvers.min_norm_simplex(M)
        for start in ([0], list(range(k)), [k - 1, 0], [i for i in range(k) if i % 2]):
            warm, _ = solvers.min_norm_simplex(M, start=start)
            assert float(warm @ M @ warm) <= float(cold @ M @ cold) * (1 + 1e-9) + 1e-12
            torch.testing.assert_close(warm, cold, atol=1e-7, rtol=0)
    method = build_gradient_method("mgda")
    G = torch.randn(4, 30, generator=gen, dtype=D64)
    method.weights(G @ G.T, None)
    state = method.state_dict()
    assert state["support"] and all(0 <= i < 4 for i in state["support"])
    other = build_gradient_method("mgda")
    other.load_state_dict(state)
    G2 = G + 0.1 * torch.randn(4, 30, generator=gen, dtype=D64)
    torch.testing.assert_close(other.weights(G2 @ G2.T, None)[0], method.weights(G2 @ G2.T, None)[0], rtol=0, atol=0)
