"""Property tests run against every model in ``mtrec.models.MODELS``, plus model-specific checks."""

from __future__ import annotations

import doctest
import functools
import inspect
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

import mtrec.models as zoo
from mtl.config import group_option
from mtrec.data.batch import Batch, FeatureSpec, SparseFeature, TabularDataset, build_kjt
from mtrec.models import (
    ESMM,
    MODELS,
    CrossStitch,
    GroupedLinear,
    InputArch,
    L2Sharing,
    MMoE,
    MultiTaskModel,
    SharedBottom,
    build_model,
    count_parameters,
    product_logit,
    random_inputs,
)

REPO = Path(__file__).resolve().parents[1]
NAMES = sorted(MODELS)
TASKS = ["click", "like", "share"]
ESMM_TASKS = ["ctr", "ctcvr"]
B = 32

FEATURES = FeatureSpec(
    dense_names=("d0", "d1", "d2"),
    sparse=(
        SparseFeature("user", 20),
        SparseFeature("item", 30, pooling="mean"),
        SparseFeature("tags", 10, max_len=4, pooling="mean"),
    ),
)
DENSE_ONLY = FeatureSpec(dense_names=tuple(f"x{i}" for i in range(10)), sparse=())
SPARSE_ONLY = FeatureSpec(dense_names=(), sparse=FEATURES.sparse)

# Small but non-trivial sizes (several experts, several levels) so every code path runs.
KWARGS: dict[str, dict] = {
    "single_task": {"bottom_dims": [12]},
    "shared_bottom": {"bottom_dims": [12, 6]},
    "omoe": {"num_experts": 3, "expert_dims": [6]},
    "mmoe": {"num_experts": 3, "expert_dims": [6, 5]},
    "cgc": {"num_shared_experts": 2, "num_task_experts": 1, "expert_dims": [6]},
    "ple": {"num_levels": 3, "num_shared_experts": 2, "num_task_experts": 1, "expert_dims": [6]},
    "esmm": {"tower_dims": [8, 4]},
    "l2_sharing": {"bottom_dims": [12, 6], "l2_weight": 0.01},
    "cross_stitch": {"bottom_dims": [12, 6], "alpha_self": 0.8},
    "searched": {"num_levels": 2, "num_shared_experts": 2, "num_task_experts": 1, "expert_dims": [6],
                 "architecture": {"click": ["own", [0, 1]], "like": [[0], "all"], "share": [[1], "own"]}},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads that
    wait for each other made single ops ~100x slower (seen here: 50 s instead of 0.3 s for one test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tasks_for(name: str) -> list[str]:
    return list(ESMM_TASKS if name == "esmm" else TASKS)


def make(name: str, features: FeatureSpec = FEATURES, seed: int = 0, **overrides) -> MultiTaskModel:
    """Build like Hydra does (mtrec.models.build_model): the input arch on the features, then a partial with the
    hyperparameters called with it and the tasks."""
    torch.manual_seed(seed)
    kwargs = {"tower_dims": [8], **KWARGS[name], **overrides}
    shared = {k: kwargs[k] for k in ("activation", "dropout") if k in kwargs}
    inputs = InputArch(features, embedding_dim=4, dense_dims=[5], **shared)
    return functools.partial(MODELS[name], **kwargs)(inputs=inputs, tasks=tasks_for(name))


def make_data(features: FeatureSpec, n: int, tasks: list[str], seed: int = 0) -> TabularDataset:
    g = torch.Generator().manual_seed(seed)
    ids, lengths = {}, {}
    for f in features.sparse:
        ids[f.name] = torch.randint(0, f.num_embeddings, (n, f.max_len), generator=g)
        low = 0 if f.max_len > 1 else 1
        lengths[f.name] = torch.randint(low, f.max_len + 1, (n,), generator=g)
        if f.max_len > 1:
            lengths[f.name][:3] = torch.tensor([0, f.max_len, 1])  # an empty bag and a full one for sure
    labels = {t: torch.randint(0, 2, (n,), generator=g).float() for t in tasks}
    return TabularDataset(
        dense=torch.randn(n, features.dense_dim, generator=g),
        sparse_ids=ids,
        sparse_lengths=lengths,
        labels=labels,
    )


def make_batch(features: FeatureSpec, tasks: list[str], n: int = B, seed: int = 0) -> Batch:
    return make_data(features, n, tasks, seed).batch(torch.arange(n))


def losses_of(model: MultiTaskModel, batch: Batch) -> dict[str, torch.Tensor]:
    out = model(batch.dense, batch.sparse)
    return {t: F.binary_cross_entropy_with_logits(out[t], batch.labels[t]) for t in model.tasks}


def expected_gate_widths(name: str, tasks: list[str]) -> dict[str, int]:
    kw, k = KWARGS[name], len(tasks)
    if name == "mmoe":
        return {t: kw["num_experts"] for t in tasks}
    if name == "searched":  # a gate over one expert is dropped: only the gates that read two shared experts stay
        return {"click@level1": 2, "like@level1": 2}
    if name == "omoe":
        return {"shared": kw["num_experts"]}
    own = kw.get("num_task_experts", 0) + kw.get("num_shared_experts", 0)
    if name == "cgc":
        return {t: own for t in tasks}
    if name == "ple":
        levels = kw["num_levels"]
        widths = {f"{t}@level{l}": own for t in tasks for l in range(levels)}
        shared_width = k * kw["num_task_experts"] + kw["num_shared_experts"]
        widths.update({f"shared@level{l}": shared_width for l in range(levels - 1)})
        return widths
    return {}


def grad_or_zero(p: nn.Parameter) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


# --------------------------------------------------------------------------------------------------
# The contract, for every model
# --------------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(MODELS) == {
        "single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "esmm", "l2_sharing", "cross_stitch",
        "searched",
    }  # fmt: skip
    assert all(issubclass(cls, MultiTaskModel) for cls in MODELS.values())


@pytest.mark.parametrize("name", NAMES)
def test_constructor_is_hydra_friendly(name: str) -> None:
    """``Model(inputs, tasks, *, own hyperparameters, **common)``: a built input arch, the tasks, every
    hyperparameter a keyword with a plain default; the settings every model shares are MultiTaskModel's, passed
    on through ``**common`` (and mtl.config's start-up check accepts them as the model's)."""
    from mtl.config import _accepted

    params = list(inspect.signature(MODELS[name]).parameters.values())
    assert [p.name for p in params[:2]] == ["inputs", "tasks"]
    assert params[-1].kind is inspect.Parameter.VAR_KEYWORD
    base = {p.name: p for p in list(inspect.signature(MultiTaskModel).parameters.values())[2:]}
    common = {"tower_dims": (8,), "dropout": 0.0, "activation": "relu", "task_feeds": None, "feed_stop_gradient": True}
    assert {k: p.default for k, p in base.items()} == common
    own = {p.name: p for p in params[2:-1]}
    assert not set(own) & set(common), "a model repeats a setting every model shares"
    for p in [*own.values(), *base.values()]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
        assert p.default is not inspect.Parameter.empty, p.name
        d = p.default
        int_tuple = isinstance(d, tuple) and all(isinstance(x, int) for x in d)
        assert d is None or isinstance(d, (int, float, str)) or int_tuple, (p.name, d)
    accepted, _ = _accepted(MODELS[name])
    assert accepted is not None and {"inputs", "tasks", *own, *common} <= accepted  # (CGC: also its base PLE's)
    assert MODELS[name].__doc__ and "Example::" in MODELS[name].__doc__


@pytest.mark.parametrize("name", NAMES)
def test_instantiate_with_hydra_partial(name: str) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cls = MODELS[name]
    target = f"{cls.__module__}.{cls.__name__}"
    inputs = {"_target_": "mtrec.models.InputArch", "_partial_": True, "embedding_dim": 4}
    cfg = OmegaConf.create({"_target_": target, "_partial_": True, "inputs": inputs, **KWARGS[name]})
    model = build_model(cfg, FEATURES, OmegaConf.create(tasks_for(name)))
    batch = make_batch(FEATURES, tasks_for(name))
    assert set(model(batch.dense, batch.sparse)) == set(tasks_for(name))
    assert isinstance(model, cls) and model.features is FEATURES
    # a run config of mtlib 0.1 (the input arch's settings on the model node) builds the same model
    flat = OmegaConf.create({"_target_": target, "_partial_": True, "embedding_dim": 4, **KWARGS[name]})
    torch.manual_seed(0)
    a = build_model(cfg, FEATURES, tasks_for(name))
    torch.manual_seed(0)
    b = build_model(flat, FEATURES, tasks_for(name))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert instantiate  # (Hydra builds the partial inside build_model)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_one_1d_tensor_per_task(name: str) -> None:
    model = make(name)
    batch = make_batch(FEATURES, tasks_for(name))
    out = model(batch.dense, batch.sparse)
    assert list(out) == tasks_for(name)
    for t, y in out.items():
        assert y.shape == (B,), t
        assert y.dtype == torch.float32
        assert torch.isfinite(y).all()
    # Outputs depend on the example: rows differ.
    assert all(y.std() > 0 for y in out.values())


@pytest.mark.parametrize("name", NAMES)
def test_sum_of_losses_reaches_every_parameter(name: str) -> None:
    model = make(name)
    batch = make_batch(FEATURES, tasks_for(name))
    (sum(losses_of(model, batch).values()) + model.regularization()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_parameter_groups_partition_parameters(name: str) -> None:
    model = make(name)
    groups = model.parameter_groups()
    assert set(groups) == {"shared", *tasks_for(name)}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(isinstance(p, nn.Parameter) for ps in groups.values() for p in ps)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_groups_follow_gradients(name: str) -> None:
    """A task's loss never touches another task's group; each shared parameter serves >= 2 tasks."""
    model = make(name)
    batch = make_batch(FEATURES, tasks_for(name))
    groups = model.parameter_groups()
    grads: dict[str, dict[int, torch.Tensor]] = {}
    for t in model.tasks:
        model.zero_grad(set_to_none=True)
        losses_of(model, batch)[t].backward()
        grads[t] = {id(p): grad_or_zero(p) for p in model.parameters()}
    for t in model.tasks:
        for u in model.tasks:
            for p in groups[u]:
                touched = bool(grads[t][id(p)].abs().sum() > 0)
                assert touched == (t == u), f"task {t!r}'s loss vs a parameter of group {u!r}: touched={touched}"
    for p in groups["shared"]:
        users = [t for t in model.tasks if grads[t][id(p)].abs().sum() > 0]
        assert len(users) >= 2, f"a shared parameter of shape {tuple(p.shape)} serves only {users}"


@pytest.mark.parametrize("name", NAMES)
def test_gates(name: str) -> None:
    model = make(name)
    batch = make_batch(FEATURES, tasks_for(name))
    out, gates = model.forward_with_gates(batch.dense, batch.sparse)
    torch.testing.assert_close(out, model(batch.dense, batch.sparse))
    widths = expected_gate_widths(name, tasks_for(name))
    assert {k: tuple(g.shape) for k, g in gates.items()} == {k: (B, w) for k, w in widths.items()}
    for k, g in gates.items():
        assert (g >= 0).all(), k
        torch.testing.assert_close(g.sum(1), torch.ones(B))
    use = model.expert_utilisation(batch.dense, batch.sparse)
    assert set(use) == set(widths)
    for k, u in use.items():
        assert u.shape == (widths[k],) and not u.requires_grad
        torch.testing.assert_close(u, gates[k].mean(0).detach())
        torch.testing.assert_close(u.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("name", NAMES)
def test_dense_only_features(name: str) -> None:
    """The MMoE synthetic case: no sparse features, and a KeyedJaggedTensor with no keys."""
    model = make(name, DENSE_ONLY)
    assert not any(isinstance(m, EmbeddingBagCollection) for m in model.modules())
    batch = make_batch(DENSE_ONLY, tasks_for(name))
    assert batch.sparse.keys() == []
    losses = losses_of(model, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_sparse_only_features(name: str) -> None:
    model = make(name, SPARSE_ONLY)
    batch = make_batch(SPARSE_ONLY, tasks_for(name))
    assert batch.dense.shape == (B, 0)
    out = model(batch.dense, batch.sparse)
    assert all(y.shape == (B,) for y in out.values())


@pytest.mark.parametrize("name", NAMES)
def test_embeddings_live_in_one_embedding_bag_collection(name: str) -> None:
    model = make(name)
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    assert len(ebcs) == (len(model.tasks) if name == "single_task" else 1)
    for ebc in ebcs:
        configs = ebc.embedding_bag_configs()
        assert [c.name for c in configs] == ["t_user", "t_item", "t_tags"]
        assert [c.num_embeddings for c in configs] == [20, 30, 10]
        assert [c.pooling for c in configs] == [PoolingType.SUM, PoolingType.MEAN, PoolingType.MEAN]
        assert all(c.embedding_dim == 4 for c in configs)


@pytest.mark.parametrize("name", NAMES)
def test_dropout_only_in_training(name: str) -> None:
    model = make(name, dropout=0.5)
    batch = make_batch(FEATURES, tasks_for(name))
    model.eval()
    a, b = model(batch.dense, batch.sparse), model(batch.dense, batch.sparse)
    torch.testing.assert_close(a, b)
    model.train()
    c = model(batch.dense, batch.sparse)
    assert any(not torch.allclose(a[t], c[t]) for t in model.tasks)


@pytest.mark.parametrize("name", NAMES)
def test_training_reduces_loss(name: str) -> None:
    """~100 Adam steps on a small learnable problem (labels are functions of dense and sparse inputs)."""
    tasks = tasks_for(name)
    data = make_data(FEATURES, 256, tasks, seed=1)
    g = torch.Generator().manual_seed(2)
    user_effect = torch.randn(20, len(tasks), generator=g) * 2
    score = data.dense @ torch.randn(3, len(tasks), generator=g) + user_effect[data.sparse_ids["user"][:, 0]]
    labels = {t: (score[:, i] > 0).float() for i, t in enumerate(tasks)}
    if name == "esmm":  # a conversion needs a click
        labels["ctcvr"] = labels["ctcvr"] * labels["ctr"]
    data.labels = labels
    batch = data.batch(torch.arange(len(data)))
    model = make(name, tower_dims=[8])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    history = []
    for _ in range(100):
        loss = sum(losses_of(model, batch).values()) + model.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.6 * history[0], (history[0], history[-1])


# --------------------------------------------------------------------------------------------------
# Input arch and layers
# --------------------------------------------------------------------------------------------------


def test_input_arch_pools_embeddings_by_hand() -> None:
    arch = InputArch(FEATURES, embedding_dim=4, dense_dims=[])
    ids = {
        "user": torch.tensor([[3], [7]]),
        "item": torch.tensor([[1], [2]]),
        "tags": torch.tensor([[1, 2, 9, 0], [5, 5, 5, 5]]),
    }
    lengths = {"user": torch.tensor([1, 1]), "item": torch.tensor([1, 1]), "tags": torch.tensor([3, 0])}
    dense = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    x = arch(dense, build_kjt(ids, lengths, ["user", "item", "tags"]))
    w = {k: arch.ebc.embedding_bags[f"t_{k}"].weight for k in ("user", "item", "tags")}
    expected = torch.stack(
        [
            torch.cat([w["user"][3], w["item"][1], w["tags"][[1, 2, 9]].mean(0), dense[0]]),
            torch.cat([w["user"][7], w["item"][2], torch.zeros(4), dense[1]]),  # empty bag pools to 0
        ]
    )
    torch.testing.assert_close(x, expected)
    # Keys in another order give the same vector.
    x2 = arch(dense, build_kjt(ids, lengths, ["tags", "user", "item"]))
    torch.testing.assert_close(x2, expected)


def test_input_arch_validates_inputs() -> None:
    arch = InputArch(FEATURES, embedding_dim=4, dense_dims=[6])
    batch = make_batch(FEATURES, [])
    with pytest.raises(ValueError, match=r"dense must be \[B, 3\]"):
        arch(batch.dense[:, :2], batch.sparse)
    partial = build_kjt({"user": torch.zeros(B, 1, dtype=torch.long)}, {"user": torch.ones(B)}, ["user"])
    with pytest.raises(ValueError, match="lacks features"):
        arch(batch.dense, partial)
    with pytest.raises(ValueError, match="pooling"):
        InputArch(FeatureSpec((), (SparseFeature("a", 3, pooling="max"),)))
    with pytest.raises(ValueError, match="no dense and no sparse"):
        InputArch(FeatureSpec((), ()))


@pytest.mark.parametrize("batched_input", [False, True])
def test_grouped_linear_equals_separate_linears(batched_input: bool) -> None:
    torch.manual_seed(0)
    layer = GroupedLinear(5, 7, 3)
    x = torch.randn(5, 4, 7) if batched_input else torch.randn(4, 7)
    y = layer(x)
    assert y.shape == (5, 4, 3)
    for g in range(5):
        xg = x[g] if batched_input else x
        torch.testing.assert_close(y[g], xg @ layer.weight[g] + layer.bias[g])
    bound = 1 / math.sqrt(7)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound


@pytest.mark.parametrize("per_task_input", [False, True])
def test_grouped_towers_and_gates_equal_each_module_run_alone(per_task_input: bool) -> None:
    """grouped_towers / grouped_gates / grouped_mix against calling every Tower and Gate, values and gradients."""
    from mtrec.models.layers import Gate, Tower, grouped_gates, grouped_mix, grouped_towers, mix

    torch.manual_seed(0)
    k, b, d, e = 3, 6, 5, 4
    towers = [Tower(d, [7, 4]) for _ in range(k)]
    gates = [Gate(d, e) for _ in range(k)]
    x = torch.randn(k, b, d) if per_task_input else torch.randn(b, d)
    experts = torch.randn(e, b, d)
    params = [p for m in [*towers, *gates] for p in m.parameters()]
    rows = [x[i] if per_task_input else x for i in range(k)]
    ref_t = torch.stack([t(r) for t, r in zip(towers, rows)])
    ref_g = torch.stack([g(r) for g, r in zip(gates, rows)])
    ref_m = torch.stack([mix(ref_g[i], experts) for i in range(k)])
    ref_grads = torch.autograd.grad((ref_t**2).sum() + (ref_m**3).sum(), params)
    got_t, got_g = grouped_towers(towers, x), grouped_gates(gates, x)
    got_m = grouped_mix(got_g, experts)
    assert got_t.shape == (k, b) and got_g.shape == (k, e, b) and got_m.shape == (k, b, d)
    torch.testing.assert_close(got_t, ref_t)
    torch.testing.assert_close(got_g, ref_g)
    torch.testing.assert_close(got_m, ref_m)
    for g, r in zip(torch.autograd.grad((got_t**2).sum() + (got_m**3).sum(), params), ref_grads):
        torch.testing.assert_close(g, r)


def test_towers_run_one_by_one_where_grouping_would_skip_a_hook() -> None:
    """A hook on a tower (feature distillation captures tower inputs that way) must fire: no grouped run then."""
    model = zoo.MMoE(InputArch(FEATURES), TASKS)
    dense, sparse = random_inputs(FEATURES, B)
    grouped = model(dense, sparse)
    assert model._grouped_heads()
    seen: list[tuple[int, ...]] = []
    handle = model.towers["like"].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    assert not model._grouped_heads()
    one_by_one = model(dense, sparse)
    handle.remove()
    assert seen == [(B, model.experts.out_dim)]
    torch.testing.assert_close(one_by_one, grouped)
    fed = zoo.MMoE(InputArch(FEATURES), TASKS, task_feeds={"like": "click"})
    assert not fed._grouped_heads()  # a fed tower waits for its source's output


def test_common_validation_errors() -> None:
    with pytest.raises(ValueError, match="unknown activation"):
        MMoE(InputArch(FEATURES), TASKS, activation="swishy")
    with pytest.raises(ValueError, match="at least one task"):
        MMoE(InputArch(FEATURES), [])
    with pytest.raises(ValueError, match="unique"):
        MMoE(InputArch(FEATURES), ["a", "a"])
    with pytest.raises(TypeError, match="list of task names"):
        MMoE(InputArch(FEATURES), "click")
    with pytest.raises(ValueError, match="num_experts"):
        MMoE(InputArch(FEATURES), TASKS, num_experts=0)
    with pytest.raises(ValueError, match="tower_dims"):
        SharedBottom(InputArch(FEATURES), TASKS, tower_dims=[0])


# --------------------------------------------------------------------------------------------------
# Model-specific checks
# --------------------------------------------------------------------------------------------------


def test_parameter_counts_at_mmoe_paper_sizes() -> None:
    d = 100
    features = FeatureSpec(tuple(f"x{i}" for i in range(d)), ())
    mmoe = MMoE(InputArch(features), ["y1", "y2"])
    experts = 8 * (d * 16 + 16)
    gates = 2 * (d * 8 + 8)
    towers = 2 * ((16 * 8 + 8) + (8 + 1))
    assert count_parameters(mmoe) == experts + gates + towers == 14834
    sb = SharedBottom(InputArch(features), ["y1", "y2"])
    assert count_parameters(sb) == (d * 113 + 113) + 2 * ((113 * 8 + 8) + (8 + 1)) == 13255


def test_mmoe_with_one_expert_is_a_shared_bottom() -> None:
    torch.manual_seed(0)
    mmoe = MMoE(InputArch(FEATURES, embedding_dim=4), TASKS, num_experts=1, expert_dims=[10])
    sb = SharedBottom(InputArch(FEATURES, embedding_dim=4), TASKS, bottom_dims=[10])
    sb.inputs.load_state_dict(mmoe.inputs.state_dict())
    sb.towers.load_state_dict(mmoe.towers.state_dict())
    with torch.no_grad():
        sb.bottom[0].weight.copy_(mmoe.experts.layers[0].weight[0].T)
        sb.bottom[0].bias.copy_(mmoe.experts.layers[0].bias[0])
    batch = make_batch(FEATURES, TASKS)
    out, gates = mmoe.forward_with_gates(batch.dense, batch.sparse)
    assert all(torch.equal(g, torch.ones(B, 1)) for g in gates.values())
    torch.testing.assert_close(out, sb(batch.dense, batch.sparse))


def test_omoe_towers_read_one_mixture() -> None:
    model = make("omoe")
    batch = make_batch(FEATURES, TASKS)
    out, gates = model.forward_with_gates(batch.dense, batch.sparse)
    x = model.inputs(batch.dense, batch.sparse)
    experts = torch.stack([torch.relu(x @ model.experts.layers[0].weight[e] + model.experts.layers[0].bias[e])
                           for e in range(3)], dim=1)  # fmt: skip
    h = (gates["shared"].unsqueeze(-1) * experts).sum(1)
    torch.testing.assert_close(out, {t: model.towers[t](h) for t in TASKS})


def test_esmm_ctcvr_is_product_of_probabilities_at_extreme_logits() -> None:
    values = torch.tensor([-100.0, -30.0, -10.0, -1.0, 0.0, 1.0, 10.0, 30.0, 100.0])
    a, b = torch.cartesian_prod(values, values).unbind(1)
    a.requires_grad_(True)
    b.requires_grad_(True)
    logit = product_logit(a, b)
    assert torch.isfinite(logit).all()
    torch.testing.assert_close(torch.sigmoid(logit), torch.sigmoid(a) * torch.sigmoid(b), atol=1e-6, rtol=0)
    # The logit itself, against a float64 reference where one exists in float64.
    a64, b64 = a.detach().double(), b.detach().double()
    log_p = F.logsigmoid(a64) + F.logsigmoid(b64)
    ref = log_p - torch.log(-torch.expm1(log_p))
    ok = torch.isfinite(ref)
    torch.testing.assert_close(logit.detach().double()[ok], ref[ok], atol=1e-4, rtol=1e-5)
    F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit)).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_esmm_outputs_and_cvr() -> None:
    model = make("esmm")
    batch = make_batch(FEATURES, ESMM_TASKS)
    out = model(batch.dense, batch.sparse)
    cvr = model.predict_cvr(batch.dense, batch.sparse)
    assert cvr.shape == (B,)
    expected = torch.sigmoid(out["ctr"]) * torch.sigmoid(cvr)
    torch.testing.assert_close(torch.sigmoid(out["ctcvr"]), expected, atol=1e-6, rtol=0)
    with torch.no_grad():  # saturate both towers
        model.ctr_tower.out.bias.fill_(30.0)
        model.cvr_tower.out.bias.fill_(-30.0)
    out = model(batch.dense, batch.sparse)
    assert torch.isfinite(out["ctcvr"]).all()
    expected = torch.sigmoid(out["ctr"]) * torch.sigmoid(model.predict_cvr(batch.dense, batch.sparse))
    torch.testing.assert_close(torch.sigmoid(out["ctcvr"]), expected, atol=1e-6, rtol=0)


def test_esmm_task_names() -> None:
    for bad in (["ctr", "cvr"], ["ctr"], ["ctr", "ctcvr", "extra"]):
        with pytest.raises(ValueError, match="ctcvr_task"):
            ESMM(InputArch(FEATURES), bad)
    model = ESMM(InputArch(FEATURES), ["conversion", "click"], ctr_task="click", ctcvr_task="conversion")
    assert list(model(*make_batch(FEATURES, [])[:2])) == ["conversion", "click"]


def naive_l2(model: L2Sharing) -> torch.Tensor:
    states = [model.bottoms[t].state_dict() for t in model.tasks]
    total = torch.tensor(0.0)
    for si, sj in itertools.combinations(states, 2):
        for key in si:
            total = total + ((si[key] - sj[key]) ** 2).sum()
    return model.l2_weight * total


def test_l2_regularization_matches_a_naive_loop() -> None:
    model = make("l2_sharing")
    reg = model.regularization()
    assert reg > 0
    torch.testing.assert_close(reg, naive_l2(model))
    reg.backward()
    for t in model.tasks:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.bottoms[t].parameters())
    for t in model.tasks[1:]:
        model.bottoms[t].load_state_dict(model.bottoms[model.tasks[0]].state_dict())
    assert model.regularization().item() == 0.0
    single = L2Sharing(InputArch(FEATURES), ["only"], bottom_dims=[4])
    assert single.regularization().item() == 0.0
    for name in NAMES:
        if name != "l2_sharing":
            assert make(name).regularization().item() == 0.0


def test_cross_stitch_initial_matrix() -> None:
    model = make("cross_stitch")
    expected = torch.full((3, 3), 0.1)
    expected.fill_diagonal_(0.8)
    for alpha in model.stitch:
        torch.testing.assert_close(alpha.detach(), expected)
    one = CrossStitch(InputArch(FEATURES), ["only"], bottom_dims=[4])
    torch.testing.assert_close(one.stitch.detach(), torch.ones(1, 1, 1))


def test_cross_stitch_with_identity_is_independent_columns() -> None:
    model = make("cross_stitch")
    batch = make_batch(FEATURES, TASKS)
    stitched = model(batch.dense, batch.sparse)
    with torch.no_grad():
        model.stitch.copy_(torch.eye(3).expand_as(model.stitch))
    out = model(batch.dense, batch.sparse)
    x = model.inputs(batch.dense, batch.sparse)
    for i, t in enumerate(TASKS):
        h = x
        for layer in model.columns:  # column i alone
            h = torch.relu(F.linear(h, layer.weight[i].T, layer.bias[i]))
        alone = model.towers[t](h)
        torch.testing.assert_close(out[t], alone)
        assert not torch.allclose(stitched[t], alone)  # the initial units do mix the columns


def test_cross_stitch_mixes_columns_by_rows() -> None:
    """h'_u = sum_v alpha[u, v] h_v, with an asymmetric matrix."""
    model = make("cross_stitch")
    batch = make_batch(FEATURES, TASKS)
    torch.manual_seed(1)
    with torch.no_grad():
        model.stitch.copy_(torch.rand_like(model.stitch))
    out = model(batch.dense, batch.sparse)
    columns = [model.inputs(batch.dense, batch.sparse)] * 3
    for layer, alpha in zip(model.columns, model.stitch):
        h = [torch.relu(F.linear(columns[v], layer.weight[v].T, layer.bias[v])) for v in range(3)]
        columns = [sum(alpha[u, v] * h[v] for v in range(3)) for u in range(3)]
    torch.testing.assert_close(out, {t: model.towers[t](columns[i]) for i, t in enumerate(TASKS)})


def _expert_loop(grouped: zoo.GroupedMLP, x: torch.Tensor) -> list[torch.Tensor]:
    """Each expert of a GroupedMLP run on its own, layer by layer."""
    outs = []
    for e in range(grouped.groups):
        h = x
        for layer in grouped.layers:
            h = torch.relu(h @ layer.weight[e] + layer.bias[e])
        outs.append(h)
    return outs


def test_ple_matches_a_loop_reference() -> None:
    """PLE written out with a loop over experts, following Tang et al. (2020), eqs. 2-6."""
    model = make("ple")  # 3 levels, 1 expert per task, 2 shared experts
    batch = make_batch(FEATURES, TASKS)
    out, gates = model.forward_with_gates(batch.dense, batch.sparse)
    x = model.inputs(batch.dense, batch.sparse)
    task_in, shared_in = {t: x for t in TASKS}, x
    for level, ext in enumerate(model.levels):
        own = {t: _expert_loop(ext.task_experts[t], task_in[t]) for t in TASKS}
        shared = _expert_loop(ext.shared_experts, shared_in)
        new_in = {}
        for t in TASKS:
            g = torch.softmax(task_in[t] @ ext.task_gates[t].weight.T + ext.task_gates[t].bias, dim=-1)
            torch.testing.assert_close(gates[f"{t}@level{level}"], g)
            new_in[t] = sum(g[:, i : i + 1] * e for i, e in enumerate(own[t] + shared))
        if level < len(model.levels) - 1:
            g = torch.softmax(shared_in @ ext.shared_gate.weight.T + ext.shared_gate.bias, dim=-1)
            every = [e for t in TASKS for e in own[t]] + shared
            shared_in = sum(g[:, i : i + 1] * e for i, e in enumerate(every))
        else:
            assert ext.shared_gate is None
        task_in = new_in
    torch.testing.assert_close(out, {t: model.towers[t](task_in[t]) for t in TASKS})


def test_doctest_examples_run() -> None:
    modules = [zoo.layers, zoo.inputs, zoo.base, zoo.hard_sharing, zoo.moe, zoo.esmm, zoo.soft_sharing]
    for module in modules:
        result = doctest.testmod(module, extraglobs={"torch": torch}, verbose=False)
        assert result.failed == 0, module.__name__
    assert sum(doctest.testmod(m, verbose=False).attempted for m in modules) >= 15


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_instantiate(path: Path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = group_option("model", path.stem)  # composed: the inputs node from configs/model/inputs/
    tasks = [cfg.ctr_task, cfg.ctcvr_task] if "ctr_task" in cfg else TASKS
    model = build_model(cfg, FEATURES, tasks)
    assert isinstance(model, MODELS[path.stem]) and isinstance(model.inputs or model.task_inputs, nn.Module)
    assert instantiate and OmegaConf
    out = model(*make_batch(FEATURES, [])[:2])
    assert set(out) == set(tasks)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shared_representation_carries_every_shared_gradient_path(name: str) -> None:
    """The representation is a tensor every task's output depends on; outputs equal plain forward."""
    features = FeatureSpec(("d0", "d1", "d2"), (SparseFeature("item", 50, max_len=1),))
    tasks = ["ctr", "ctcvr"] if name == "esmm" else ["a", "b"]
    model = MODELS[name](InputArch(features), tasks)
    model.eval()
    dense, sparse = random_inputs(features, batch_size=6)
    outputs, rep = model.forward_with_representation(dense, sparse)
    for t, v in model(dense, sparse).items():
        torch.testing.assert_close(outputs[t], v)
    if name == "single_task":
        assert rep is None  # nothing is shared
        return
    assert rep is not None and rep.requires_grad
    assert rep.shape[0] == 6  # batch-first
    for t in tasks:
        (g,) = torch.autograd.grad(outputs[t].sum(), rep, retain_graph=True)
        assert g.abs().sum() > 0, f"task {t} does not read the representation"
    if name in ("mmoe", "omoe"):
        assert rep.shape[:2] == (6, model.num_experts)  # [B, E, H]: the experts' outputs, batch-first
    assert model._representation is None  # nothing kept after the call


@pytest.mark.parametrize("name", sorted(MODELS))
def test_last_shared_parameters_are_shared_and_read_by_every_task(name: str) -> None:
    features = FeatureSpec(("d0", "d1", "d2"), (SparseFeature("item", 50, max_len=1),))
    tasks = ["ctr", "ctcvr"] if name == "esmm" else ["a", "b"]
    model = MODELS[name](InputArch(features), tasks)
    last = model.last_shared_parameters()
    shared_ids = {id(p) for p in model.parameter_groups()["shared"]}
    assert all(id(p) in shared_ids for p in last)
    if name == "single_task":
        assert last == []
        return
    assert last
    dense, sparse = random_inputs(features, batch_size=6)
    out = model(dense, sparse)
    for t in tasks:
        grads = torch.autograd.grad(out[t].sum(), last, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), t


FEED_MODELS = sorted(n for n in MODELS if n != "esmm")


@pytest.mark.parametrize("stop_gradient", [True, False])
@pytest.mark.parametrize("name", FEED_MODELS)
def test_task_feeds_estimate_as_feature(name: str, stop_gradient: bool) -> None:
    features = FeatureSpec(("d0", "d1", "d2"), (SparseFeature("item", 50, max_len=1),))
    feeds = {"task_feeds": {"cvr": "ctr"}, "feed_stop_gradient": stop_gradient}
    model = MODELS[name](InputArch(features), ["cvr", "ctr"], **feeds)
    dense, sparse = random_inputs(features, batch_size=8)
    out = model(dense, sparse)
    source_tower = list(model.towers["ctr"].parameters())
    grads = torch.autograd.grad(out["cvr"].sum(), source_tower, allow_unused=True)
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached is (not stop_gradient)
    groups = model.parameter_groups()
    owned_by_ctr = {id(p) for p in groups["ctr"]}
    assert all((id(p) in owned_by_ctr) is stop_gradient for p in source_tower)
    # The target really reads the estimate: changing the source tower's output bias changes cvr's output.
    with torch.no_grad():
        before = model(dense, sparse)["cvr"].clone()
        model.towers["ctr"].out.bias.add_(5.0)
        after = model(dense, sparse)
    assert not torch.allclose(before, after["cvr"])
    assert model.towers["cvr"].mlp[0].in_features == model.towers["ctr"].mlp[0].in_features + 1


def test_task_feeds_validation() -> None:
    features = FeatureSpec(("d0",), ())
    with pytest.raises(ValueError, match="cycle"):
        MMoE(InputArch(features), ["a", "b"], task_feeds={"a": "b", "b": "a"})
    with pytest.raises(ValueError, match="'c' is not one of"):
        MMoE(InputArch(features), ["a", "b"], task_feeds={"a": "c"})
    with pytest.raises(ValueError, match="itself"):
        MMoE(InputArch(features), ["a", "b"], task_feeds={"a": "a"})
