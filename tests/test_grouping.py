"""Task grouping (Standley et al. 2020; Fifty et al. 2021): the higher-order approximation, branch and bound
against exhaustive search, TAG's lookahead affinity against hand-computed values, the orchestration of
``mtl.grouping.group_tasks`` with a fake measurer, the Trainer hook, and ``mtlib-group`` end to end."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mtl.grouping import (
    AffinityMeasurement,
    AffinityMeter,
    Candidate,
    GroupingConfig,
    Measurement,
    TagConfig,
    all_groups,
    branch_and_bound,
    cheapest_cover,
    exhaustive_search,
    group_affinity,
    group_tasks,
    grouping_config,
    higher_order_estimate,
    lookahead_affinity,
    pair_loss_affinity,
    report,
    write_result,
)
from mtrec.grouping import (
    AffinityTrainer,
    add_unrelated_task,
    network_config,
    run_grouping,
    scale_widths,
)
from mtrec.train import build_optimizer, trainer_config

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)

TINY = [
    "data.n_rows=3000",
    "data.num_users=200",
    "data.num_items=500",
    "data.num_categories=20",
    "trainer.batch_size=256",
    "trainer.max_steps=10",
    "trainer.progress=false",
    "trainer.tensorboard=false",
]


def group_cfg(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    with initialize_config_module("mtlib_configs", version_base="1.3"):
        return compose(config_name="group", overrides=list(overrides), return_hydra_config=return_hydra_config)


# ----------------------------------------------------------------------------- higher-order approximation


def test_higher_order_estimate_matches_a_hand_worked_example() -> None:
    pairs = {
        ("a", "b"): {"a": 0.4, "b": 0.6},
        ("c", "a"): {"a": 0.2, "c": 0.9},  # key order is free
        ("b", "c"): {"b": 0.5, "c": 0.7},
        ("a", "d"): {"a": 0.6, "d": 1.0},
        ("b", "d"): {"b": 0.1, "d": 2.0},
        ("c", "d"): {"c": 0.3, "d": 3.0},
    }
    # a in {a,b,c}: (L_a(ab) + L_a(ac)) / 2 = (0.4 + 0.2) / 2
    assert higher_order_estimate(("a", "b", "c"), pairs) == pytest.approx({"a": 0.3, "b": 0.55, "c": 0.8})
    # four tasks: each task averages its three pairs
    assert higher_order_estimate(("a", "b", "c", "d"), pairs) == pytest.approx(
        {"a": 0.4, "b": 0.4, "c": 1.9 / 3, "d": 2.0}
    )
    # a pair is its own measurement
    assert higher_order_estimate(("d", "b"), pairs) == pytest.approx({"d": 2.0, "b": 0.1})


def test_higher_order_estimate_errors() -> None:
    with pytest.raises(ValueError, match="two or more"):
        higher_order_estimate(("a",), {})
    with pytest.raises(KeyError, match=r"pair \(a, c\)"):
        higher_order_estimate(("a", "b", "c"), {("a", "b"): {"a": 1.0, "b": 1.0}})


def test_pair_loss_affinity() -> None:
    aff = pair_loss_affinity({"a": 0.5, "b": 2.0}, {("a", "b"): {"a": 0.4, "b": 2.5}})
    assert aff == {"a": {"b": pytest.approx(1 - 2.5 / 2.0)}, "b": {"a": pytest.approx(1 - 0.4 / 0.5)}}


# ----------------------------------------------------------------------------- selection


def _hand_instance() -> list[Candidate]:
    return [
        Candidate(("a",), {"a": 1.0}),
        Candidate(("b",), {"b": 1.0}),
        Candidate(("c",), {"c": 1.0}),
        Candidate(("a",), {"a": 1.2}, 0.5, "half"),
        Candidate(("b",), {"b": 1.1}, 0.5, "half"),
        Candidate(("c",), {"c": 1.3}, 0.5, "half"),
        Candidate(("a", "b"), {"a": 0.8, "b": 0.9}),
        Candidate(("a", "c"), {"a": 0.95, "c": 0.7}),
        Candidate(("b", "c"), {"b": 1.05, "c": 1.0}),
        Candidate(("a", "b", "c"), {"a": 0.9, "b": 0.95, "c": 1.1}),
    ]


@pytest.mark.parametrize("search", [branch_and_bound, exhaustive_search])
def test_selection_on_a_hand_worked_instance(search) -> None:
    tasks = ("a", "b", "c")
    cands = _hand_instance()
    # budget 1: only {a,b,c} covers every task alone: 0.9 + 0.95 + 1.1
    sel = search(cands, tasks, 1)
    assert [n.tasks for n in sel.networks] == [("a", "b", "c")] and sel.objective == pytest.approx(2.95)
    # budget 1.5: {a,c} serves a and c, a half-size network serves b: 0.95 + 0.7 + 1.1
    sel = search(cands, tasks, 1.5)
    assert {(n.tasks, n.kind) for n in sel.networks} == {(("a", "c"), "full"), (("b",), "half")}
    assert sel.objective == pytest.approx(2.75) and sel.cost == 1.5
    # budget 2: two overlapping networks; a is learned by both but served by {a,b} (0.8 < 0.95)
    sel = search(cands, tasks, 2)
    assert sorted(n.tasks for n in sel.networks) == [("a", "b"), ("a", "c")]
    assert {t: sel.networks[i].tasks for t, i in sel.served.items()} == {
        "a": ("a", "b"),
        "b": ("a", "b"),
        "c": ("a", "c"),
    }
    assert sel.objective == pytest.approx(0.8 + 0.9 + 0.7)


def _random_instance(rng: random.Random, k: int, half: bool, keep: float) -> tuple[tuple[str, ...], list[Candidate]]:
    tasks = tuple("abcdef"[:k])
    cands = []
    for g in all_groups(tasks):
        if len(g) > 1 and rng.random() > keep:
            continue
        cands.append(Candidate(g, {t: rng.uniform(0.2, 1.0) for t in g}))
    if half:
        cands += [Candidate((t,), {t: rng.uniform(0.3, 1.2)}, 0.5, "half") for t in tasks]
    rng.shuffle(cands)
    return tasks, cands


def _check_selection(sel, tasks, budget) -> None:
    assert sel.cost <= budget + 1e-9
    assert sel.cost == pytest.approx(sum(n.cost for n in sel.networks))
    assert set(sel.served) == set(tasks)  # every task served by exactly one network
    for t, i in sel.served.items():
        assert t in sel.networks[i].tasks
        assert sel.networks[i].scores[t] == min(n.scores.get(t, math.inf) for n in sel.networks)
    assert sel.objective == pytest.approx(sum(sel.networks[i].scores[t] for t, i in sel.served.items()))
    assert all(sel.serves(i) for i in range(len(sel.networks)))  # no network that serves nothing


# (task count, budgets, half-size networks): sizes kept so that exhaustive search runs in well under a second
RANDOM_CASES = [
    (2, (0.5, 1, 1.5, 2), True),
    (3, (1, 1.5, 2, 3), False),
    (3, (1, 1.5, 2, 2.5), True),
    (4, (1, 2, 3), False),
    (4, (1.5, 2, 2.5), True),
    (5, (1, 2, 3), False),
    (5, (1.5, 2), True),
    (6, (1, 2, 3), False),
    (6, (1.5,), True),
]


@pytest.mark.parametrize(("k", "budgets", "half"), RANDOM_CASES)
def test_branch_and_bound_equals_exhaustive_search_on_random_instances(k: int, budgets, half: bool) -> None:
    rng = random.Random(1000 * k + half)
    for trial in range(8):
        keep = 1.0 if trial == 0 else rng.uniform(0.3, 0.9)
        tasks, cands = _random_instance(rng, k, half, keep)
        for budget in budgets:
            cheapest, _ = cheapest_cover(cands, tasks)
            if cheapest > budget:
                for search in (branch_and_bound, exhaustive_search):
                    with pytest.raises(ValueError, match="cheapest cover"):
                        search(cands, tasks, budget)
                continue
            bb = branch_and_bound(cands, tasks, budget)
            ex = exhaustive_search(cands, tasks, budget)
            assert bb.objective == pytest.approx(ex.objective, rel=1e-12, abs=1e-12), (k, half, budget, trial)
            _check_selection(bb, tasks, budget)
            _check_selection(ex, tasks, budget)


def test_exhaustive_search_is_brute_force_over_every_subset() -> None:
    """Independent check of the reference itself on a tiny instance: all 2^n subsets, no size cap."""
    rng = random.Random(7)
    tasks, cands = _random_instance(rng, 3, True, 0.8)
    for budget in (1, 1.5, 2, 3):
        best = math.inf
        for r in range(1, len(cands) + 1):
            for combo in itertools.combinations(cands, r):
                if sum(c.cost for c in combo) > budget:
                    continue
                value = sum(min(c.scores.get(t, math.inf) for c in combo) for t in tasks)
                best = min(best, value)
        assert exhaustive_search(cands, tasks, budget).objective == pytest.approx(best)
        assert branch_and_bound(cands, tasks, budget).objective == pytest.approx(best)


def test_budget_below_the_cheapest_cover_is_a_clear_error() -> None:
    singles = [Candidate((t,), {t: 1.0}) for t in "abc"] + [Candidate(("a", "b"), {"a": 1.0, "b": 1.0})]
    assert cheapest_cover(singles, ("a", "b", "c"))[0] == 2.0
    with pytest.raises(ValueError, match=r"budget=1.5 is less than the cheapest cover.*at least 2.*budget >= 2"):
        branch_and_bound(singles, ("a", "b", "c"), 1.5)
    with pytest.raises(ValueError, match="no candidate network learns tasks"):
        branch_and_bound(singles[:2], ("a", "b", "c"), 5)
    with pytest.raises(ValueError, match="budget must be a positive"):
        branch_and_bound(singles, ("a", "b", "c"), 0)


def test_candidate_validation() -> None:
    with pytest.raises(ValueError, match="no score for tasks"):
        Candidate(("a", "b"), {"a": 1.0})
    with pytest.raises(ValueError, match="finite"):
        Candidate(("a",), {"a": math.nan})
    with pytest.raises(ValueError, match="cost must be > 0"):
        Candidate(("a",), {"a": 1.0}, cost=0)


# ----------------------------------------------------------------------------- orchestration (group_tasks)

# Four tasks where a and b help each other, and c and d: every single task has loss 1.0; the pairs {a, b} and
# {c, d} lower their members' losses, every other pair raises both to 1.2; alone in a half-size network c is at
# its best (0.3), the others at 1.1.
FAKE_TASKS = ("a", "b", "c", "d")
FAKE_PAIRS = {
    frozenset("ab"): {"a": 0.6, "b": 0.7},
    frozenset("cd"): {"c": 0.5, "d": 0.8},
}
FAKE_HALF = {"a": 1.1, "b": 1.1, "c": 0.3, "d": 1.1}
# TAG: a and b lift each other's loss by 0.2, c and d by 0.1; every other step raises the other's loss by 0.1
FAKE_AFFINITY = {
    i: {j: 0.05 if i == j else 0.2 if {i, j} == {"a", "b"} else 0.1 if {i, j} == {"c", "d"} else -0.1 for j in "abcd"}
    for i in "abcd"
}


class FakeMeasurer:
    """A :class:`mtl.grouping.GroupMeasurer` whose losses are the tables above; records what it is asked."""

    full_steps = 100
    scoring_steps = 20

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], str]] = []

    def measure(self, group: tuple[str, ...], kind: str) -> Measurement:
        self.calls.append((group, kind))
        if kind == "half":
            losses = {group[0]: FAKE_HALF[group[0]]}
        elif len(group) == 1:
            losses = {group[0]: 1.0}
        else:
            losses = FAKE_PAIRS.get(frozenset(group), {t: 1.2 for t in group})
        return Measurement(losses, {"tasks": list(group), "val": losses})

    def measure_affinity(self, tasks: tuple[str, ...]) -> AffinityMeasurement:
        self.calls.append((tasks, "tag"))
        return AffinityMeasurement(FAKE_AFFINITY, {"steps": self.scoring_steps})


def _networks(result: dict) -> dict[str, list[str]]:
    """``{network name: tasks it serves}`` of a result (a half-size network as ``half:t``)."""
    return {("half:" if n["kind"] == "half" else "") + "+".join(n["tasks"]): n["serves"] for n in result["networks"]}


PAIR_CALLS = [((t,), "full") for t in FAKE_TASKS] + [(p, "full") for p in itertools.combinations(FAKE_TASKS, 2)]


@pytest.mark.parametrize("method", ["pairs", "higher_order"])
def test_group_tasks_pairs_up_the_tasks_that_help_each_other(method: str, tmp_path: Path) -> None:
    # Each task's best loss in any candidate: a 0.6, b 0.7 (in {a, b}), c 0.5, d 0.8 (in {c, d}); a larger group's
    # higher-order estimate averages pair losses, so it is never below them. {a, b} + {c, d} reaches every best
    # at cost 2: the optimum, 0.6 + 0.7 + 0.5 + 0.8.
    measurer = FakeMeasurer()
    result = group_tasks(FAKE_TASKS, measurer, GroupingConfig(method=method, budget=2), settings={"note": "x"})
    assert measurer.calls == PAIR_CALLS  # every single and pair once, no half-size network, no TAG run
    assert _networks(result) == {"a+b": ["a", "b"], "c+d": ["c", "d"]}
    assert result["objective"] == pytest.approx(2.6) and result["predicted_total_loss"] == result["objective"]
    assert result["cost"] == 2
    assert {len(c["tasks"]) for c in result["candidates"]} == ({1, 2} if method == "pairs" else {1, 2, 3, 4})
    s = result["settings"]
    assert s["tasks"] == list(FAKE_TASKS) and s["note"] == "x"
    assert s["cheapest_cover"] == (2 if method == "pairs" else 1)  # two pairs, or the group of all four
    assert (s["full_steps"], s["scoring_steps"]) == (100, 20)
    assert result["trained"]["a+b"] == {"tasks": ["a", "b"], "val": {"a": 0.6, "b": 0.7}}
    assert result["affinity"]["values"]["b"]["a"] == pytest.approx(1 - 0.6 / 1.0)  # pair loss change onto a
    write_result(result, tmp_path / "g.json")
    assert json.loads((tmp_path / "g.json").read_text())["networks"] == result["networks"]
    text = report(result)
    assert "| a+b " in text and "predicted total loss 2.6000" in text and "trained for 20 of 100 steps" in text


def test_group_tasks_with_one_network_uses_the_higher_order_estimate() -> None:
    # Budget 1: only {a, b, c, d} covers every task. Its losses from the pairs, e.g. a: (0.6 + 1.2 + 1.2) / 3.
    result = group_tasks(FAKE_TASKS, FakeMeasurer(), GroupingConfig(method="higher_order", budget=1))
    (net,) = result["networks"]
    assert net["tasks"] == list(FAKE_TASKS) and net["source"] == "higher_order"
    assert net["scores"] == pytest.approx({"a": 3.0 / 3, "b": 3.1 / 3, "c": 2.9 / 3, "d": 3.2 / 3})
    assert result["objective"] == pytest.approx(12.2 / 3)


def test_group_tasks_serves_a_task_by_a_half_size_network() -> None:
    # Budget 2.5 with half-size networks: each task's best is a 0.6, b 0.7 (in {a, b}), c 0.3 (alone, half size),
    # d 0.8 (in {c, d}); {a, b} + {c, d} + half:c reaches all four at cost 2.5. c is learned by {c, d} too, but
    # served by its half-size network.
    measurer = FakeMeasurer()
    result = group_tasks(FAKE_TASKS, measurer, GroupingConfig(method="pairs", budget=2.5, half_size=True))
    assert measurer.calls == PAIR_CALLS + [((t,), "half") for t in FAKE_TASKS]
    assert _networks(result) == {"a+b": ["a", "b"], "c+d": ["d"], "half:c": ["c"]}
    assert result["objective"] == pytest.approx(0.6 + 0.7 + 0.3 + 0.8) and result["cost"] == 2.5
    assert result["served"]["c"] == ["c"] and "half:c" in result["trained"]


def test_group_tasks_by_tag_affinity() -> None:
    # A task's score is minus the mean affinity onto it from its group-mates: a's best is -0.2 (with b alone, any
    # other mate brings -0.1), b's -0.2, c's and d's -0.1 (with each other). {a, b} + {c, d} reaches all four.
    measurer = FakeMeasurer()
    result = group_tasks(FAKE_TASKS, measurer, GroupingConfig(method="tag", budget=2, tag=TagConfig(singleton=0.0)))
    assert measurer.calls == [(FAKE_TASKS, "tag")]  # one joint run, no network per group
    assert _networks(result) == {"a+b": ["a", "b"], "c+d": ["c", "d"]}
    assert result["objective"] == pytest.approx(-0.6) and result["predicted_total_loss"] is None
    assert result["trained"] == {"tag_joint": {"steps": 20}} and result["affinity"]["values"] == FAKE_AFFINITY
    assert "negated total affinity" in report(result)


def test_group_tasks_checks_the_budget_before_measuring() -> None:
    # pairs over four tasks: the cheapest cover is two pairs, cost 2
    measurer = FakeMeasurer()
    with pytest.raises(ValueError, match=r"config key budget: budget=1.5 .* at least 2"):
        group_tasks(FAKE_TASKS, measurer, GroupingConfig(method="pairs", budget=1.5))
    assert measurer.calls == []


# ----------------------------------------------------------------------------- TAG lookahead affinity


def _quadratic_problem(w0: float = 1.0):
    """One shared weight w; L1 = (w + h - 3)^2 with a task-specific h = 0, L2 = 0.5 * w^2 (float64)."""
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    h = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def losses() -> dict[str, torch.Tensor]:
        return {"t1": (w + h - 3.0) ** 2, "t2": 0.5 * w**2}

    return w, h, losses


def test_lookahead_affinity_matches_hand_computed_values() -> None:
    w, h, losses = _quadratic_problem()
    z = lookahead_affinity([w], losses, lr=0.1)
    # Before: L1 = (1 - 3)^2 = 4, L2 = 0.5. dL1/dw = 2 (w - 3) = -4, dL2/dw = w = 1.
    # Step on t1: w = 1 + 0.1 * 4 = 1.4 -> L1 = 1.6^2 = 2.56, L2 = 0.5 * 1.96 = 0.98.
    # Step on t2: w = 1 - 0.1 * 1 = 0.9 -> L1 = 2.1^2 = 4.41, L2 = 0.5 * 0.81 = 0.405.
    assert z["t1"]["t1"] == pytest.approx(1 - 2.56 / 4, rel=1e-12)
    assert z["t1"]["t2"] == pytest.approx(1 - 0.98 / 0.5, rel=1e-12)  # -0.96: t1's step hurts t2
    assert z["t2"]["t1"] == pytest.approx(1 - 4.41 / 4, rel=1e-12)  # -0.1025
    assert z["t2"]["t2"] == pytest.approx(1 - 0.405 / 0.5, rel=1e-12)  # 0.19
    # parameters restored, task-specific h never stepped, .grad untouched
    assert w.item() == 1.0 and h.item() == 0.0 and w.grad is None and h.grad is None


def test_lookahead_affinity_replays_the_rng_and_restores_it() -> None:
    """A loss that draws random numbers (like dropout) sees the same draw before and after each step."""
    w = torch.nn.Parameter(torch.tensor(1.0))

    def losses() -> dict[str, torch.Tensor]:
        noise = torch.rand(())
        return {"t": (w - 3.0 + noise) ** 2}

    torch.manual_seed(0)
    u = torch.rand(()).item()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    z = lookahead_affinity([w], losses, lr=0.1)
    assert torch.equal(torch.get_rng_state(), state)
    before = (1 - 3 + u) ** 2
    w1 = 1 - 0.1 * 2 * (1 - 3 + u)
    assert z["t"]["t"] == pytest.approx(1 - (w1 - 3 + u) ** 2 / before, rel=1e-5)


def test_lookahead_affinity_errors() -> None:
    w, _, losses = _quadratic_problem()
    with pytest.raises(ValueError, match="lr must be a positive"):
        lookahead_affinity([w], losses, lr=0.0)
    with pytest.raises(ValueError, match="no shared parameters"):
        lookahead_affinity([], losses, lr=0.1)
    with pytest.raises(ValueError, match="positive finite loss"):
        lookahead_affinity([w], lambda: {"t": 0.0 * w}, lr=0.1)


def test_affinity_meter_and_group_affinity() -> None:
    m = AffinityMeter()
    m.update(
        {"a": {"a": 0.1, "b": 0.2, "c": -0.4}, "b": {"a": 0.0, "b": 0.3, "c": 0.6}, "c": {"a": 0.3, "b": 0.1, "c": 0}}
    )
    m.update(
        {"a": {"a": 0.3, "b": 0.0, "c": -0.2}, "b": {"a": 0.2, "b": 0.1, "c": 0.2}, "c": {"a": 0.1, "b": 0.1, "c": 0}}
    )
    z = m.mean()
    assert z["a"]["b"] == pytest.approx(0.1) and z["b"]["c"] == pytest.approx(0.4) and z["c"]["a"] == pytest.approx(0.2)
    # onto a from {b, c}: (Z_b->a + Z_c->a) / 2 = (0.1 + 0.2) / 2; onto c: (-0.3 + 0.4) / 2
    assert group_affinity(("a", "b", "c"), z) == pytest.approx({"a": 0.15, "b": 0.1, "c": 0.05})
    assert group_affinity(("a",), z, singleton=-1.0) == {"a": -1.0}
    with pytest.raises(ValueError, match="expected affinities over tasks"):
        m.update({"a": {"a": 0.0}})


def _tiny_bundle():
    from mtrec.data import load_sparse_synthetic

    return load_sparse_synthetic(n_rows=1500, num_users=100, num_items=200, num_categories=10, seed=0)


def _trainer(cls, bundle, tmp_path: Path, **kwargs):

    from mtl.checkpoint import seed_everything
    from mtrec.models import build_model

    cfg = group_cfg(*TINY)
    tasks = bundle.tasks
    seed_everything(0)
    model = build_model(cfg.model, bundle.features, [t.name for t in tasks])
    opt = build_optimizer(cfg.optimizer, model, tasks)
    return cls(model, opt, tasks, trainer_config(cfg.trainer), tmp_path, seed=0, **kwargs)


def test_affinity_trainer_measures_without_changing_training(tmp_path: Path) -> None:
    bundle = _tiny_bundle()
    from mtrec.trainer import Trainer

    plain = _trainer(Trainer, bundle, tmp_path / "plain")
    hooked = _trainer(AffinityTrainer, bundle, tmp_path / "hooked", every=3)
    batches = list(bundle.train.batches(256, shuffle=True, seed=0))[:5]
    for b in batches:
        plain.train_step(b)
        hooked.train_step(b)
    assert hooked.affinity.count == 2  # before steps 0 and 3
    for (n1, p1), (n2, p2) in zip(plain.model.named_parameters(), hooked.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    z = hooked.affinity.mean()
    assert set(z) == {"click", "conversion", "dwell"} and all(set(r) == set(z) for r in z.values())
    # a step on a task's own loss lowers that loss on the same batch (small lr: first-order regime)
    assert all(z[t][t] > 0 for t in z)
    assert hooked.lookahead_lr == pytest.approx(1e-3)


def test_affinity_trainer_checkpoints_its_meter(tmp_path: Path) -> None:
    bundle = _tiny_bundle()
    first = _trainer(AffinityTrainer, bundle, tmp_path, every=1)
    for b in list(bundle.train.batches(256, shuffle=True, seed=0))[:3]:
        first.train_step(b)
    first.save_last()
    resumed = _trainer(AffinityTrainer, bundle, tmp_path, every=1)
    assert resumed.load_last()
    assert resumed.affinity.count == 3 and resumed.affinity.mean() == first.affinity.mean()


def test_affinity_trainer_needs_shared_parameters(tmp_path: Path) -> None:

    from mtrec.models import build_model

    bundle = _tiny_bundle()
    cfg = group_cfg("model=single_task", *TINY)
    model = build_model(cfg.model, bundle.features, [t.name for t in bundle.tasks])
    opt = build_optimizer(cfg.optimizer, model, bundle.tasks)
    with pytest.raises(ValueError, match="shares none"):
        AffinityTrainer(model, opt, bundle.tasks, trainer_config(cfg.trainer), tmp_path)


# ----------------------------------------------------------------------------- mtrec side


def test_scale_widths_and_network_config() -> None:
    cfg = group_cfg(*TINY, "budget=3", "model.bottom_dims=[10,7]")
    sub = network_config(cfg, ["click", "dwell"], 42, width=0.5)
    assert list(sub.task_names) == ["click", "dwell"] and sub.trainer.max_steps == 42
    assert sub.model.inputs.embedding_dim == 8
    assert list(sub.model.bottom_dims) == [5, 4] and list(sub.model.tower_dims) == [4]
    assert "budget" not in sub and "method" not in sub
    assert dict(scale_widths({"expert_dims": [1], "num_experts": 8}, 0.5)) == {"expert_dims": [1], "num_experts": 8}


def test_grouping_config_errors() -> None:
    for override, needle in [
        ("method=cluster", "config key method"),
        ("fraction=0", "config key fraction"),
        ("budget=-1", "config key budget"),
        ("search=greedy", "config key search"),
    ]:
        with pytest.raises(ValueError, match=needle):
            grouping_config(group_cfg(override))
    with pytest.raises(ValueError, match="half_size"):
        grouping_config(group_cfg("method=tag", "half_size=true"))


def test_unrelated_task_is_added_to_every_split_and_is_unrelated() -> None:
    from mtrec.data import load_sparse_synthetic

    base = load_sparse_synthetic(n_rows=20000, num_users=500, num_items=1000, num_categories=50, seed=3)
    b1 = add_unrelated_task(base, "noise", seed=3)
    b2 = add_unrelated_task(base, "noise", seed=3)
    assert [t.name for t in b1.tasks] == ["click", "conversion", "dwell", "noise"]
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(b1, split).labels["noise"], getattr(b2, split).labels["noise"])
        assert set(getattr(b1, split).labels) == {"click", "conversion", "dwell", "noise"}
    y = b1.train.labels["noise"].double()
    assert 0.3 < y.mean() < 0.7
    for other in ("click", "dwell"):
        r = torch.corrcoef(torch.stack([y, b1.train.labels[other].double()]))[0, 1]
        assert abs(r) < 0.05, (other, r)
    with pytest.raises(ValueError, match="already has a task"):
        add_unrelated_task(b1, "noise")


def _check_result(result: dict, budget: float) -> None:
    tasks = result["settings"]["tasks"]
    assert result["cost"] <= budget
    assert set(result["served"]) == set(tasks)
    served_by = {t: n for n in result["networks"] for t in n["serves"]}
    assert set(served_by) == set(tasks)
    assert result["objective"] == pytest.approx(sum(served_by[t]["scores"][t] for t in tasks))


@pytest.mark.parametrize("method", ["pairs", "higher_order", "tag"])
def test_run_grouping_end_to_end(method: str, tmp_path: Path) -> None:
    extra = ["half_size=true"] if method == "higher_order" else []
    cfg = group_cfg(
        *TINY, f"method={method}", "budget=2", "data._target_=mtrec.grouping.load_sparse_synthetic_unrelated", *extra
    )
    result = run_grouping(cfg, tmp_path)
    written = json.loads((tmp_path / "grouping.json").read_text())
    assert written["networks"] == result["networks"]
    assert written["settings"]["scoring_steps"] == 2 and written["settings"]["full_steps"] == 10
    tasks = ["click", "conversion", "dwell", "unrelated"]
    assert written["settings"]["tasks"] == tasks
    _check_result(written, 2.0)
    assert not list((tmp_path / "networks").rglob("*.pt"))  # checkpoints dropped by default
    sizes = {len(c["tasks"]) for c in written["candidates"]}
    if method == "pairs":
        assert sizes == {1, 2} and len(written["trained"]) == 10
    else:
        assert sizes == {1, 2, 3, 4}
    if method == "higher_order":
        # groups of 3+ scored from the pair networks that were actually trained (read back from the JSON)
        trained = written["trained"]
        for c in written["candidates"]:
            if len(c["tasks"]) >= 3:
                for t in c["tasks"]:
                    pair_losses = [
                        trained["+".join(p)]["val"][t]
                        for p in itertools.combinations(tasks, 2)
                        if t in p and set(p) <= set(c["tasks"])
                    ]
                    assert c["scores"][t] == pytest.approx(sum(pair_losses) / len(pair_losses))
        halves = [c for c in written["candidates"] if c["kind"] == "half"]
        assert len(halves) == 4 and all(c["cost"] == 0.5 for c in halves)
        assert written["predicted_total_loss"] == pytest.approx(written["objective"])
        assert (tmp_path / "networks" / "half_click" / "metrics.json").exists()
    if method == "tag":
        assert written["predicted_total_loss"] is None
        z = written["affinity"]["values"]
        assert set(z) == set(tasks) and written["trained"]["tag_joint"]["measurements"] == 1
        for c in written["candidates"]:
            if len(c["tasks"]) > 1:  # score = minus the mean affinity onto t from the others
                for t in c["tasks"]:
                    others = [z[i][t] for i in c["tasks"] if i != t]
                    assert c["scores"][t] == pytest.approx(-sum(others) / len(others))


def test_run_grouping_rejects_a_budget_below_the_cheapest_cover_before_training(tmp_path: Path) -> None:
    # pairs over 3 tasks: the cheapest cover is a pair plus a single, cost 2
    cfg = group_cfg(*TINY, "method=pairs", "budget=1.5")
    with pytest.raises(ValueError, match=r"config key budget: budget=1.5 .* at least 2"):
        run_grouping(cfg, tmp_path)
    assert not (tmp_path / "networks").exists()
    cfg = group_cfg(*TINY, "method=higher_order", "budget=0.5")
    with pytest.raises(ValueError, match=r"config key budget: .* at least 1"):
        run_grouping(cfg, tmp_path)


def _mtlib_group(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``mtlib-group`` console script (``python -m mtrec.cli.group`` where it is not installed)."""
    exe = Path(sys.executable).parent / "mtlib-group"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mtrec.cli.group"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("MTLIB_DEBUG", None)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_prints_the_grouping_and_writes_json(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _mtlib_group(
        f"hydra.run.dir={run_dir}", "method=higher_order", "budget=1.5", "task_names=[click,dwell]", *TINY
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted total loss" in proc.stdout and "| network" in proc.stdout
    result = json.loads((run_dir / "grouping.json").read_text())
    assert result["settings"]["tasks"] == ["click", "dwell"] and result["settings"]["budget"] == 1.5
    _check_result(result, 1.5)
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_cli_configuration_errors_exit_with_status_2(tmp_path: Path) -> None:
    for args, needle in [
        (["method=pairs", "budget=1.5"], "mtlib-group: error: config key budget: budget=1.5"),
        (["methd=pairs"], "methd"),  # Hydra's own composition error
    ]:
        proc = _mtlib_group(f"hydra.run.dir={tmp_path / 'run'}", *args, *TINY)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "networks").exists()


def test_the_hydra_task_function_returns_the_objective(tmp_path: Path) -> None:
    """What a sweeper (``--multirun`` with e.g. the Optuna sweeper) minimises: the grouping's objective."""
    from mtrec.cli.group import _hydra_main

    cfg = group_cfg(*TINY, "method=pairs", "budget=1.5", "task_names=[click,dwell]", return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    try:
        value = _hydra_main(cfg)  # a config passed in: Hydra calls the task function directly
    finally:
        HydraConfig.instance().cfg = None
    written = json.loads((tmp_path / "grouping.json").read_text())
    assert isinstance(value, float) and value == pytest.approx(written["objective"])


def test_doctest_examples_run() -> None:
    import doctest

    import mtl.grouping
    import mtrec.grouping

    for module in (mtl.grouping, mtrec.grouping):
        result = doctest.testmod(module, verbose=False)
        assert result.failed == 0 and result.attempted > 0, module.__name__
