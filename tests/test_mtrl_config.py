"""``mtrl-train``'s start-up checks (:func:`mtrl.config.check_config`): a mistyped key of any group fails before an
env is built, naming the key and the valid ones, in the ``key=`` form (Hydra refuses it while composing) and the
``+key=`` form (the group's schema refuses it), with exit status 2 and no traceback; the Hydra mains return their
metric; the presets of ``configs/experiment/mtrl_*.yaml`` compose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import mtrl.train
from mtrl.config import CONFIG_DIR, agent_settings, check_config
from mtrl.envs import family_settings
from mtrl.runs import LAST

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "agent=mt_sac",
    "env.max_episode_steps=20",
    "agent.hidden=[16,16]",
    "trainer.total_steps=12",
    "trainer.learning_starts=4",
    "trainer.batch_size=8",
    "trainer.replay_capacity=100",
    "trainer.eval_episodes=1",
    "trainer.eval_interval=0",
    "trainer.log_interval=4",
    "trainer.checkpoint_interval=0",
    "trainer.progress=false",
]


def cfg_for(*overrides: str, hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="mtrl", overrides=[*TINY, *overrides], return_hydra_config=hydra)


@pytest.fixture
def no_env_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if :func:`mtrl.train.run` gets as far as building the family."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("run() built something before refusing the config")

    monkeypatch.setattr(mtrl.train, "instantiate", refuse)


@pytest.mark.parametrize(
    ("override", "key", "valid"),
    [
        ("+env.num_task=3", "env.num_task", "num_goals"),
        ("+agent.hiden=4", "agent.hiden", "hidden"),
        ("+trainer.totl_steps=5", "trainer.totl_steps", "total_steps"),
        ("+sac.gama=0.9", "sac.gama", "gamma"),
        ("+gradient.seeed=1", "gradient.seeed", "seed"),
    ],
)
def test_a_mistyped_group_key_fails_before_any_env_is_built(
    override: str, key: str, valid: str, tmp_path: Path, no_env_built: None
) -> None:
    with pytest.raises(ValueError, match=rf"config key {key} is not a parameter of .*; valid keys: .*\b{valid}\b"):
        mtrl.train.run(cfg_for(override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_group_schemas_are_the_families_and_builders_settings(no_env_built: None) -> None:
    assert "num_goals" in family_settings("pointmass") and "goal_seed" in family_settings("mt10")
    assert "name" not in family_settings("mt10") and "benchmark" not in family_settings("mt10")
    from mtrl.agents import care, mt_sac

    assert agent_settings(mt_sac) == ("hidden",)
    assert {"hidden", "num_experts", "context_dim"} <= set(agent_settings(care))
    with pytest.raises(ValueError, match=r"config key env.name: unknown task family 'pointmas'"):
        check_config(cfg_for("env.name=pointmas"))
    with pytest.raises(ValueError, match=r"config key env.goal_variations is not a parameter of PointMassFamily"):
        check_config(cfg_for("+env.goal_variations=50"))  # a Meta-World setting on the point-mass
    with pytest.raises(ValueError, match=r"config key agent.num_experts is not a parameter of mt_sac"):
        check_config(cfg_for("+agent.num_experts=4"))  # a CARE setting on MT-SAC
    with pytest.raises(ValueError, match=r"trainer.total_steps must be >= 1"):
        check_config(cfg_for("trainer.total_steps=0"))
    check_config(cfg_for("env=mt10"))  # the other families' configs pass (nothing is built: no metaworld needed)
    check_config(cfg_for("agent=care", "weighting=famo", "schedule=bandit", "gradient=pcgrad"))


def _cli(*args: str, debug: bool = False, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MTLIB_DEBUG"}
    if debug:
        env["MTLIB_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_cli_refuses_mistyped_keys_in_both_forms_with_status_2(tmp_path: Path) -> None:
    base = ["mtrl.cli.train", *TINY, f"hydra.run.dir={tmp_path / 'run'}"]
    # key=: Hydra refuses a key the composed (struct) config does not have, while composing
    plain = _cli(*base, "env.num_task=3")
    assert plain.returncode == 2, plain.stderr[-3000:]
    assert "num_task" in plain.stderr and "Traceback" not in plain.stderr
    # +key=: Hydra adds it; the group's schema refuses it before anything is built, in one line
    for override, line in (
        ("+env.num_task=3", "mtrl-train: error: config section 'env': config key env.num_task is not a parameter of "
                            "PointMassFamily (the env config of mtrl-train); valid keys: "),
        ("+agent.hiden=4", "mtrl-train: error: config section 'agent': config key agent.hiden is not a parameter of "
                           "mt_sac (the agent config of mtrl-train); valid keys: hidden"),
    ):  # fmt: skip
        proc = _cli(*base, override)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert line in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not (tmp_path / "run" / LAST).exists()
    debug = _cli(*base, "+agent.hiden=4", debug=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "agent.hiden" in debug.stderr


def test_the_hydra_mains_return_their_metric(tmp_path: Path) -> None:
    """What a sweeper (Optuna, Ax) optimises: the decorated mains return the final mean success rate."""
    from mtrl.cli.eval import evaluate as eval_main
    from mtrl.cli.train import train as train_main

    full = cfg_for(hydra=True)
    with open_dict(full):
        full.hydra.runtime.output_dir = str(tmp_path)
        cfg = full.copy()
        del cfg["hydra"]
    HydraConfig.instance().set_config(full)  # what Hydra sets before calling the task function
    value = train_main(cfg)  # a config passed to a Hydra main runs its task function on it
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert isinstance(value, float) and value == saved["mean_success"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        ev = compose(config_name="mtrl_eval", overrides=[f"run_dir={tmp_path}", "episodes=1"])
    score = eval_main(ev)
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert score == json.loads((tmp_path / "evaluation.json").read_text())["mean_success"]


def test_experiment_presets_compose_and_pass_the_checks() -> None:
    presets = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("mtrl_*.yaml"))
    assert {"mtrl_pointmass_paper", "mtrl_mt10_paper"} <= set(presets)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        default = compose(config_name="mtrl")
        paper = compose(config_name="mtrl", overrides=["experiment=mtrl_pointmass_paper"])
        mt10 = compose(config_name="mtrl", overrides=["experiment=mtrl_mt10_paper", "agent=mt_sac"])
        over = compose(config_name="mtrl", overrides=["experiment=mtrl_pointmass_paper", "trainer.batch_size=8"])
    assert paper.agent.hidden == [256, 256] and paper.sac.actor_lr == 3e-4 and paper.sac.init_temperature == 1.0
    assert paper.trainer.total_steps == 50000 and paper.trainer.num_threads is None
    assert paper.env == default.env and paper.agent._target_ == "mtrl.agents.care"
    assert over.trainer.batch_size == 8  # command-line overrides win over the preset
    assert mt10.env.name == "mt10" and mt10.env.max_episode_steps == 150 and mt10.agent.hidden == [400, 400, 400]
    assert mt10.agent._target_ == "mtrl.agents.mt_sac"
    for name in presets:
        check_config(cfg_for(f"experiment={name}"))


def test_plain_defaults_are_the_quick_start() -> None:
    """``mtrl-train`` with no overrides: CARE on the 4-goal point-mass at the settings of benchmarks/rl_pointmass.py
    (which solve it in about 3.5k steps), 4k steps, one torch thread."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="mtrl")
    assert cfg.env.name == "pointmass" and cfg.env.num_goals == 4 and cfg.agent._target_ == "mtrl.agents.care"
    assert cfg.agent.hidden == [64, 64] and cfg.sac.actor_lr == 1e-3 and cfg.sac.init_temperature == 0.1
    assert cfg.trainer.total_steps == 4000 and cfg.trainer.num_threads == 1
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from rl_pointmass import SETTINGS
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        bench = compose(config_name="mtrl", overrides=SETTINGS)
    for section in ("env", "agent", "sac"):
        assert cfg[section] == bench[section], section
    differ = {k for k in cfg.trainer if cfg.trainer[k] != bench.trainer[k]}
    assert differ <= {"checkpoint_interval", "progress"}, differ
