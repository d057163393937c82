"""``mtlib-search`` (ENAS over sharing structures): the controller against a hand computation and a naive LSTM,
REINFORCE on a toy reward, the search space's extremes against Shared-Bottom and single-task networks, the fixed
child against the supernet with the same weights, MTL methods inside the search, and the command end to end
(outputs, retraining with ``mtrec-train``, ONNX export with parity, identical resume, one-line errors)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_train import run_main

from mtl.checkpoint import load_checkpoint
from mtl.config import CONFIG_PATH
from mtrec.cli.search import main as search_main
from mtrec.data.batch import FeatureSpec, SparseFeature
from mtrec.models import InputArch, SearchedPLE, SharedBottom, SharingSupernet, random_inputs
from mtrec.models.searched import OWN, all_separate, all_shared, check_architecture, parse_choice
from mtrec.search import Controller, Reinforce, SearchSpace, choice_label, run_search
from mtrec.train import run

torch.set_num_threads(1)

FEATURES = FeatureSpec(("d0", "d1", "d2"), (SparseFeature("user", 20), SparseFeature("tags", 10, max_len=3)))
TASKS = ["a", "b", "c"]

TINY = [
    "data.n_rows=2000",
    "data.num_users=100",
    "data.num_items=200",
    "data.num_categories=10",
    "data.history_len=5",
    "trainer.batch_size=128",
    "trainer.max_steps=20",
    "trainer.progress=false",
    "trainer.num_threads=1",
    "model.inputs.embedding_dim=4",
    "model.expert_dims=[6]",
    "model.tower_dims=[4]",
    "search.epochs=2",
    "search.steps_per_epoch=6",
    "search.controller_steps=4",
    "search.controller_batch_size=64",
    "search.final_samples=3",
    "search.final_batches=2",
    "search.policy_samples=8",
]


def compose_search(*overrides: str):
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        return compose(config_name="search", overrides=[*TINY, *overrides])


def compose_train(*overrides: str):
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        return compose(config_name="mtrec", overrides=list(overrides))


# --------------------------------------------------------------------------------------------- the space


def test_space_choices_decode_encode_and_errors() -> None:
    space = SearchSpace(TASKS, levels=2, experts=3)
    assert [choice_label(c) for c in space.choices] == ["own", "0", "1", "2", "0+1", "0+2", "1+2", "0+1+2"]
    assert space.size == 8**6 and len(space.decisions) == 6
    assert space.decisions[:3] == (("a", 0), ("b", 0), ("c", 0))  # levels outer, tasks inner
    actions = [0, 7, 3, 1, 4, 0]
    arch = space.decode(actions)
    assert arch == {"a": (OWN, (0,)), "b": ((0, 1, 2), (0, 1)), "c": ((2,), OWN)}
    assert space.encode(arch) == actions
    small = SearchSpace(["a", "b"], 1, 2, choices=["own", "all"])
    assert small.size == 4 and len(list(small.enumerate())) == 4
    assert parse_choice([1, 0], 2) == (0, 1)
    for bad in ([], [2], [0, 0], "some", [[0]]):
        with pytest.raises((ValueError, TypeError)):
            parse_choice(bad, 2)
    with pytest.raises(ValueError, match="exactly the tasks"):
        check_architecture({"a": ["own"]}, ["a", "b"], 1, 2)
    with pytest.raises(ValueError, match="one choice per level"):
        check_architecture({"a": ["own"]}, ["a"], 2, 2)
    with pytest.raises(ValueError, match="twice"):
        SearchSpace(["a"], 1, 2, choices=["all", [0, 1]])


# --------------------------------------------------------------------------------------------- the controller


def naive_lstm_step(cell: torch.nn.LSTMCell, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """The LSTM cell's equations written out (PyTorch's gate order i, f, g, o)."""
    z = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    i, f, g, o = z.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_controller_log_prob_and_entropy_match_a_naive_reference() -> None:
    torch.manual_seed(0)
    ctrl = Controller([3, 4, 2], hidden=7, tanh_constant=2.0, temperature=1.5)
    actions = [2, 0, 1]
    s = ctrl.sample(actions)
    with torch.no_grad():
        x, h, c = ctrl.start, torch.zeros(1, 7), torch.zeros(1, 7)
        log_prob, entropy = 0.0, 0.0
        for i, a in enumerate(actions):
            h, c = naive_lstm_step(ctrl.lstm, x, h, c)
            z = (h @ ctrl.heads[i].weight.T + ctrl.heads[i].bias)[0] / 1.5
            logits = 2.0 * torch.tanh(z)
            p = torch.exp(logits) / torch.exp(logits).sum()
            log_prob += math.log(float(p[a]))
            entropy += -float((p * p.log()).sum())
            assert torch.allclose(s.probs[i], p, atol=1e-6)
            x = ctrl.embeddings[i].weight[a : a + 1]
    assert s.actions == actions
    assert float(s.log_prob.detach()) == pytest.approx(log_prob, abs=1e-5)
    assert float(s.entropy.detach()) == pytest.approx(entropy, abs=1e-5)
    # the log-probability carries gradients to every part of the controller that step 0..2 used
    s.log_prob.backward()
    assert ctrl.start.grad is not None and ctrl.lstm.weight_hh.grad.abs().sum() > 0
    assert ctrl.embeddings[0].weight.grad[2].abs().sum() > 0 and ctrl.embeddings[0].weight.grad[0].abs().sum() == 0


def test_controller_samples_from_its_softmax_hand_computed() -> None:
    """Zero LSTM and head weights: h = 0 at every step (c = 0.5 * tanh(0) = 0), so each step's logits are
    c * tanh(bias / T), whatever came before; the sampled frequencies must match those softmaxes."""
    ctrl = Controller([3, 2], hidden=5, tanh_constant=1.0, temperature=1.0)
    with torch.no_grad():
        for p in ctrl.parameters():
            p.zero_()
        ctrl.heads[0].bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
        ctrl.heads[1].bias.copy_(torch.tensor([0.5, -0.5]))
    e = [math.exp(math.tanh(v)) for v in (0.0, 1.0, 2.0)]
    p0 = [v / sum(e) for v in e]
    p1 = [1 / (1 + math.exp(math.tanh(-0.5) - math.tanh(0.5))), 0.0]
    p1[1] = 1 - p1[0]
    s = ctrl.sample([1, 0])
    assert float(s.log_prob.detach()) == pytest.approx(math.log(p0[1]) + math.log(p1[0]), abs=1e-6)
    hand_entropy = -sum(p * math.log(p) for p in p0) - sum(p * math.log(p) for p in p1)
    assert float(s.entropy.detach()) == pytest.approx(hand_entropy, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    n = 3000
    counts0, counts1 = [0, 0, 0], [0, 0]
    with torch.no_grad():
        for _ in range(n):
            a = ctrl.sample(generator=g).actions
            counts0[a[0]] += 1
            counts1[a[1]] += 1
    for counts, probs in ((counts0, p0), (counts1, p1)):
        for k, p in zip(counts, probs):
            assert abs(k / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert ctrl.greedy() == [2, 0]


def test_reinforce_moves_probability_to_the_rewarded_choice() -> None:
    torch.manual_seed(0)
    ctrl = Controller([4, 3], hidden=16, tanh_constant=None)  # ENAS's c * tanh(z) would cap p(target) at 0.79
    learner = Reinforce(ctrl, lr=0.05, baseline_decay=0.8, entropy_weight=0.0)
    g = torch.Generator().manual_seed(0)

    def prob_of_target() -> float:
        with torch.no_grad():
            return float(ctrl.sample([2, 1]).log_prob.exp())

    before = prob_of_target()
    rewards = []
    for _ in range(150):
        out = learner.step(lambda a: float(a[0] == 2) + 0.5 * float(a[1] == 1), g)
        rewards.append(out["reward"])
    after = prob_of_target()
    assert before < 0.15 and after > 0.8, (before, after)
    assert ctrl.greedy() == [2, 1]
    assert sum(rewards[-30:]) / 30 > sum(rewards[:30]) / 30
    # the baseline is the EMA of the rewards: replay it by hand
    b = rewards[0]
    for r in rewards:
        b = 0.8 * b + 0.2 * r
    assert learner.baseline == pytest.approx(b)


def test_entropy_bonus_alone_flattens_the_policy() -> None:
    torch.manual_seed(0)
    ctrl = Controller([5], hidden=8)
    with torch.no_grad():
        ctrl.heads[0].bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0]))
    learner = Reinforce(ctrl, lr=0.05, entropy_weight=1.0)
    g = torch.Generator().manual_seed(0)
    h0 = float(ctrl.sample([0]).entropy.detach())
    for _ in range(60):
        learner.step(lambda a: 1.0, g)  # a constant reward: the advantage is 0, only the entropy term acts
    assert (
        float(ctrl.sample([0]).entropy.detach()) > h0 + 0.2
        and float(ctrl.sample([0]).entropy.detach()) <= math.log(5) + 1e-6
    )


# --------------------------------------------------------------------------------------------- the models


def test_all_shared_child_with_one_expert_is_shared_bottom() -> None:
    torch.manual_seed(0)
    arch = all_shared(TASKS, 1, 1)
    child = SearchedPLE(InputArch(FEATURES, embedding_dim=4), TASKS, num_levels=1, num_shared_experts=1,
                        expert_dims=[6, 5], architecture=arch, tower_dims=[4])  # fmt: skip
    sb = SharedBottom(InputArch(FEATURES, embedding_dim=4), TASKS, bottom_dims=[6, 5], tower_dims=[4])
    assert sum(p.numel() for p in child.parameters()) == sum(p.numel() for p in sb.parameters())
    # copy: the one expert's stacked layers are the bottom's Linear layers
    state = sb.state_dict()
    cs = child.state_dict()
    linears = [k for k in state if k.startswith("bottom") and k.endswith("weight")]
    for i, key in enumerate(linears):
        state[key] = cs[f"levels.0.shared.layers.{i}.weight"][0].T.clone()
        state[key.replace("weight", "bias")] = cs[f"levels.0.shared.layers.{i}.bias"][0].clone()
    for k in cs:
        if k.startswith(("towers", "inputs")):
            state[k] = cs[k]
    sb.load_state_dict(state)
    dense, sparse = random_inputs(FEATURES, 9)
    a, b = child(dense, sparse), sb(dense, sparse)
    assert all(torch.allclose(a[t], b[t], atol=1e-6) for t in TASKS)
    groups = child.parameter_groups()
    assert {id(p) for p in groups["shared"]} == {id(p) for m in (child.inputs, child.levels) for p in m.parameters()}
    assert child.forward_with_gates(dense, sparse)[1] == {}  # one candidate: no gate


def test_all_separate_child_is_one_single_task_network_per_task() -> None:
    torch.manual_seed(0)
    child = SearchedPLE(InputArch(FEATURES, embedding_dim=4), TASKS, num_levels=2, num_shared_experts=3,
                        num_task_experts=1, expert_dims=[6], architecture=all_separate(TASKS, 2))  # fmt: skip
    assert all("shared" not in parts for parts in child.levels)  # no shared expert is read: none is built
    groups = child.parameter_groups()
    assert {id(p) for p in groups["shared"]} == {id(p) for p in child.inputs.parameters()}
    dense, sparse = random_inputs(FEATURES, 6)
    out = child(dense, sparse)
    x = child.inputs(dense, sparse)
    for t in TASKS:
        h = x
        for parts in child.levels:
            h = parts["own"][t](h)[0]
        assert torch.allclose(out[t], child.towers[t](h), atol=1e-6)
        # task t's output reaches only its own parameters and the input arch
        child.zero_grad()
        out = child(dense, sparse)
        out[t].sum().backward()
        for u in TASKS:
            touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[u])
            assert touched == (u == t)


ARCHS = [
    {"a": ["own", [0, 2]], "b": [[1], "all"], "c": [[0, 1], "own"]},
    {"a": ["all", "all"], "b": ["all", [2]], "c": [[2], [0]]},
    {"a": ["own", "own"], "b": [[0], "own"], "c": ["own", [1, 2]]},
]


@pytest.mark.parametrize("arch", ARCHS, ids=range(len(ARCHS)))
def test_fixed_child_equals_the_supernet_with_the_same_weights(arch: dict) -> None:
    torch.manual_seed(1)
    net = SharingSupernet(InputArch(FEATURES, embedding_dim=4), TASKS, num_levels=2, num_shared_experts=3,
                          num_task_experts=2, expert_dims=[6, 5], tower_dims=[4])  # fmt: skip
    net.architecture = arch
    child = SearchedPLE(InputArch(FEATURES, embedding_dim=4), TASKS, **net.child_config())
    child.load_state_dict(net.child_state_dict(child))
    dense, sparse = random_inputs(FEATURES, 11)
    (a, ga), (b, gb) = net.forward_with_gates(dense, sparse), child.forward_with_gates(dense, sparse)
    for t in TASKS:
        assert torch.allclose(a[t], b[t], atol=1e-6)
    assert ga.keys() == gb.keys() and all(torch.allclose(ga[k], gb[k], atol=1e-6) for k in ga)
    assert sum(p.numel() for p in child.parameters()) < sum(p.numel() for p in net.parameters())
    # a training step through the supernet's child moves only that child's weights
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sum(v.sum() for v in net(dense, sparse).values()).backward()
    opt.step()
    moved = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    for level in range(2):
        for t in TASKS:
            assert (f"levels.{level}.own.{t}.layers.0.weight" in moved) == (net.architecture[t][level] == OWN)
        if all(net.architecture[t][level] == OWN for t in TASKS):
            assert f"levels.{level}.shared.layers.0.weight" not in moved


# --------------------------------------------------------------------------------------------- the command


def run_cli(
    argv: Sequence[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """``mtlib-search argv...`` in-process: its exit status and stderr."""
    return run_main(search_main, argv, monkeypatch, capsys, prog="mtlib-search")


@pytest.mark.parametrize(
    "override, message",
    [
        ("+search.epoch=3", "search"),
        ("search.reward=accuracy", "search.reward"),
        ("model=mmoe", "model=searched"),
        ("search.choices=[own,[5]]", "search.choices"),
        ("+model.num_expert=2", "model.num_expert"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    override: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli([*TINY, override, f"hydra.run.dir={tmp_path}"], monkeypatch, capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "supernet").exists()


@pytest.mark.parametrize("methods", [("uncertainty", "pcgrad"), ("dwa", "mgda_ub"), ("gradnorm", "cagrad")])
def test_mtl_methods_train_inside_the_search(methods: tuple[str, str], tmp_path: Path) -> None:
    weighting, gradient = methods
    cfg = compose_search(f"weighting={weighting}", f"gradient={gradient}", "search.epochs=1", "search.retrain=false")
    result = run_search(cfg, tmp_path)
    assert result["train_steps"] == 6 and result["controller_steps"] == 4
    assert all(math.isfinite(c["reward"]) for c in result["candidates"])
    log = load_checkpoint(tmp_path / "supernet" / "last.pt")
    assert log["step"] == 6 and log["weighting"] is not None


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("search")
    run_search(compose_search(), out)
    return out


def test_search_writes_its_outputs(searched: Path) -> None:
    for name in ("policy.jsonl", "samples.jsonl", "architecture.yaml", "search.json", "policy.png",
                 "retrained_metrics.json", "supernet/last.pt", "retrain/metrics.json"):  # fmt: skip
        assert (searched / name).is_file(), name
    policy = [json.loads(line) for line in (searched / "policy.jsonl").read_text().splitlines()]
    assert [p["epoch"] for p in policy] == [0, 1]
    for p in policy:
        assert len(p["probabilities"]) == 3 * 2  # click, conversion, dwell x 2 levels
        assert all(sum(d.values()) == pytest.approx(1.0, abs=1e-4) for d in p["probabilities"].values())
    samples = [json.loads(line) for line in (searched / "samples.jsonl").read_text().splitlines()]
    assert sum(s["phase"] == "controller" for s in samples) == 8
    result = json.loads((searched / "search.json").read_text())
    finals = [s for s in samples if s["phase"] == "final"]
    assert result["reward"] == max(s["reward"] for s in finals) and result["key"] == finals[0]["key"]
    assert result["search_steps"] == 12 + 8 + 2 * len(finals)
    retrained = json.loads((searched / "retrained_metrics.json").read_text())
    assert set(retrained["test"]) == {"click", "conversion", "dwell"}


def test_architecture_trains_with_mtrec_train_and_exports_with_parity(searched: Path, tmp_path: Path) -> None:
    from mtrec.export import export_run

    node = yaml.safe_load((searched / "architecture.yaml").read_text())
    arch = json.dumps(node["architecture"]).replace(" ", "").replace('"', "")
    # the command the file's header gives
    header = (searched / "architecture.yaml").read_text().splitlines()[2]
    assert f"'model.architecture={arch}'" in header
    # the search's own retraining is a mtrec-train run (retrain/); the file's model trains the same way
    assert OmegaConf.load(searched / "retrain" / "config.yaml").model._target_ == "mtrec.models.SearchedPLE"
    cfg = compose_train(
        *[o for o in TINY if not o.startswith("search.")],
        "model=searched",
        f"model.num_levels={node['num_levels']}",
        f"model.num_shared_experts={node['num_shared_experts']}",
        f"model.architecture={arch}",
    )
    run_dir = tmp_path / "run"
    metrics = run(cfg, run_dir)
    assert set(metrics["test"]) == {"click", "conversion", "dwell"}
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.model._target_ == "mtrec.models.SearchedPLE"
    assert OmegaConf.to_container(saved.model.architecture) == node["architecture"]
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        overrides = [f"run_dir={run_dir}", f"repository={tmp_path / 'repo'}", "model_name=searched"]
        ecfg = compose(config_name="export", overrides=[*overrides, "parity.batch_sizes=[1,33]"])
    result = export_run(ecfg)
    assert result.parity.passed  # ONNX Runtime against the torch model, every parity batch size
    # and the server loads it: the repository's config checked against the model's inputs and outputs, warmed up
    from serving.metrics import InferenceStats
    from serving.models import load_version
    from serving.options import ServerOptions
    from serving.repository import read_config

    repo = tmp_path / "repo"
    served = load_version(
        repo, read_config(repo, "searched"), 1, ServerOptions(model_repository=repo), InferenceStats()
    )
    assert served.sessions and served.version == 1


def test_resume_gives_identical_results(searched: Path, tmp_path: Path) -> None:
    run_search(compose_search("search.epochs=1", "search.retrain=false"), tmp_path)
    run_search(compose_search("search.resume=true"), tmp_path)
    for name in ("policy.jsonl", "samples.jsonl", "architecture.yaml"):
        assert (tmp_path / name).read_text() == (searched / name).read_text(), name
    a = load_checkpoint(tmp_path / "supernet" / "last.pt")
    b = load_checkpoint(searched / "supernet" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["search"]["reinforce"]["baseline"] == b["search"]["reinforce"]["baseline"]
    ra = json.loads((tmp_path / "retrained_metrics.json").read_text())
    rb = json.loads((searched / "retrained_metrics.json").read_text())
    assert ra["test"] == rb["test"]


def test_warmup_epochs_leave_the_controller_untouched(tmp_path: Path) -> None:
    result = run_search(compose_search("search.warmup_epochs=1", "search.retrain=false"), tmp_path)
    assert result["train_steps"] == 12 and result["controller_steps"] == 4  # epoch 0 trains the shared weights only
    policy = [json.loads(line) for line in (tmp_path / "policy.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {s["epoch"] for s in samples if s["phase"] == "controller"} == {1}
    assert policy[0]["mean_reward"] is None and policy[1]["mean_reward"] is not None
