"""``mtrl-group``: task subsets as families, scoring networks trained with mtrl-train, the selection checked against a
brute force over the measured losses, configuration errors, and (slow) the known answer on the conflicting
point-mass goal set."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf
from test_train import run_main

from mtl.config import CONFIG_PATH
from mtrl.cli.group import main as group_main
from mtrl.config import check_config
from mtrl.envs import make_family
from mtrl.grouping import TaskSubsetFamily, network_config, scale_agent_widths

TASKS = ["goal-0deg", "goal-45deg", "goal-180deg"]
TINY = [
    "env.max_episode_steps=10",
    "agent.hidden=[8]",
    "trainer.total_steps=40",
    "trainer.learning_starts=5",
    "trainer.batch_size=8",
    "trainer.replay_capacity=100",
    "trainer.eval_episodes=2",
    "trainer.log_interval=10",
]


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        return compose(config_name="mtrl_group", overrides=list(overrides))


def group(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    return run_main(group_main, argv, monkeypatch, capsys)


def test_a_task_subset_is_a_family_of_its_own_indexed_from_zero() -> None:
    base = make_family("pointmass", num_goals=8, metadata_source="random")
    sub = TaskSubsetFamily(base, ["goal-180deg", "goal-45deg"])
    assert sub.task_names == ("goal-180deg", "goal-45deg") and sub.indices == (4, 1)
    np.testing.assert_array_equal(sub.metadata, np.asarray(base.metadata)[[4, 1]])
    env, ref = sub.make_env(1), base.make_env(1)
    assert env.observation_space["task"].n == 2
    obs, info = env.reset(seed=7)
    ref_obs, _ = ref.reset(seed=7)
    assert obs["task"] == 1 and info["task"] == 1 and np.array_equal(obs["obs"], ref_obs["obs"])
    for _ in range(3):
        obs, r, *_, info = env.step(np.array([0.3, 0.9], np.float32))
        ref_obs, ref_r, *_ = ref.step(np.array([0.3, 0.9], np.float32))
        assert np.array_equal(obs["obs"], ref_obs["obs"]) and r == ref_r and info["task"] == 1
    with pytest.raises(ValueError, match="unknown task"):
        TaskSubsetFamily(base, ["goal-1deg"])
    with pytest.raises(ValueError, match="each task once"):
        TaskSubsetFamily(base, ["goal-0deg", "goal-0deg"])


def test_agent_widths_scale_and_other_settings_stay() -> None:
    node = {"_target_": "mtrl.agents.care", "hidden": [64, 63], "expert_hidden": [5], "expert_dim": 64,
            "context_dim": 3, "num_experts": 4, "attention_temperature": 1.0}  # fmt: skip
    out = OmegaConf.to_container(scale_agent_widths(node, 0.5))
    assert out == {**node, "hidden": [32, 32], "expert_hidden": [3], "expert_dim": 32, "context_dim": 2}


def test_a_network_config_is_an_mtrl_train_config_of_the_group() -> None:
    cfg = compose_cfg("trainer.total_steps=1000")
    net = network_config(cfg, ("goal-0deg", "goal-180deg"), 300, width=0.5)
    check_config(net)  # nothing of the grouping is left in it
    assert net.trainer.total_steps == 300 and list(net.agent.hidden) == [32, 32]
    assert net.env._target_ == "mtrl.grouping.task_subset_family"
    assert list(net.env.tasks) == ["goal-0deg", "goal-180deg"]
    assert net.env.family.num_goals == 8 and "budget" not in net and "task_names" not in net


def test_another_env_family_drops_the_point_mass_setting() -> None:
    from mtl.grouping import GROUPING_KEYS
    from mtrl.grouping import RL_GROUPING_KEYS, run_rl_grouping

    def mtrl_part(cfg: DictConfig) -> DictConfig:  # what run_rl_grouping checks as mtrl-train would
        return OmegaConf.create({k: cfg[k] for k in cfg if k not in (*GROUPING_KEYS, *RL_GROUPING_KEYS)})

    check_config(mtrl_part(compose_cfg("env=mt10", "~env.num_goals", "task_names=[reach-v3,push-v3]")))
    with pytest.raises(ValueError, match="env.num_goals"):
        run_rl_grouping(compose_cfg("env=mt10", "task_names=[reach-v3,push-v3]"), "/nonexistent/never-written")


def brute_force(losses: dict[tuple[str, ...], dict[str, float]], budget: float) -> tuple[float, set[tuple[str, ...]]]:
    """Every set of networks (each costs 1) within the budget that serves every task; the least sum of served
    losses (each task served by its best network in the set)."""
    best: tuple[float, set[tuple[str, ...]]] = (float("inf"), set())
    nets = list(losses)
    for r in range(1, int(budget) + 1):
        for chosen in itertools.combinations(nets, r):
            if set().union(*map(set, chosen)) != set(TASKS):
                continue
            total = sum(min(losses[n][t] for n in chosen if t in n) for t in TASKS)
            if total < best[0] - 1e-12:
                best = (total, set(chosen))
    return best


def test_the_selection_is_the_best_cover_of_the_measured_networks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "g"
    code, err = group([f"hydra.run.dir={out}", "method=pairs", "budget=2", *TINY], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads((out / "grouping.json").read_text())
    assert result["settings"]["scoring_steps"] == 20 and result["settings"]["full_steps"] == 40
    # each network's losses are minus the mean returns of its own mtrl-train run's final evaluation
    losses: dict[tuple[str, ...], dict[str, float]] = {}
    for r in range(1, 3):
        for g in itertools.combinations(TASKS, r):
            run_dir = out / "networks" / "+".join(g)
            ev = json.loads((run_dir / "eval.json").read_text())
            assert list(ev["tasks"]) == list(g) and ev["step"] == 20
            assert not (run_dir / "last.pt").exists()  # keep_checkpoints=false
            losses[g] = {t: -ev["tasks"][t]["return"] for t in g}
            assert result["trained"]["+".join(g)]["val"] == pytest.approx(losses[g], rel=1e-12)
    objective, chosen = brute_force(losses, 2.0)
    assert result["objective"] == pytest.approx(objective, rel=1e-9)
    assert {tuple(n["tasks"]) for n in result["networks"]} == chosen
    assert sorted(result["served"]) == sorted(TASKS)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method=tag", "config key method: method=tag"),
        ("task_names=[goal-0deg,goal-7deg]", "config key task_names: ['goal-7deg'] not in the env's tasks"),
        ("+model=mmoe", "config key 'model' is not used by mtrl-group"),
        ("+agent.hiden=[8]", "hiden"),
        ("budget=0.5", "config key budget: budget=0.5 is less than the cheapest cover"),
        ("fraction=0.1", "config key fraction: scoring networks train for"),
        ("score=reward", "config key score: expected one of ['return', 'success']"),
        ("+tag.every2=1", "every2"),
    ],
)
def test_config_mistakes_exit_2_in_one_line_before_training(
    override: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "g"
    code, err = group([f"hydra.run.dir={out}", *TINY, override], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("mtrl-group: error: ") and expected in err, err
    assert not (out / "networks").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MTLIB_SLOW") != "1", reason="real RL training of 6 agents (minutes); MTLIB_SLOW=1")
def test_grouping_finds_the_known_answer_on_the_conflicting_point_mass_goals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Goals at 0 and 45 degrees are near each other, 180 opposite: task-blind networks (one path for all their
    tasks) must pair the near ones and leave the opposite one alone (see mtrl.grouping's docstring). The smallest
    setting found reliable here: 25-step episodes at twice the default speed, 600 steps per scoring network."""
    out = tmp_path / "g"
    argv = [f"hydra.run.dir={out}", "env.max_episode_steps=25", "env.max_speed=0.08", "trainer.total_steps=1200",
            "trainer.learning_starts=100", "trainer.batch_size=32", "agent.hidden=[32,32]", "trainer.eval_episodes=5",
            "trainer.log_interval=100"]  # fmt: skip
    code, err = group(argv, monkeypatch, capsys)
    assert code == 0, err
    result = json.loads((out / "grouping.json").read_text())
    assert {tuple(n["tasks"]) for n in result["networks"]} == {("goal-0deg", "goal-45deg"), ("goal-180deg",)}
    near = result["trained"]["goal-0deg+goal-45deg"]["val"]
    for far in ("goal-0deg+goal-180deg", "goal-45deg+goal-180deg"):  # each opposite pair costs more in total
        assert sum(result["trained"][far]["val"].values()) > sum(near.values())
