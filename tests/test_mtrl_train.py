"""``mtrl-train`` / ``mtrl-eval`` / policy export on the point-mass family: short runs of every agent config,
bit-identical resume, evaluation against hand-written policies, videos, ONNX parity, and the CLIs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from mtrl_helpers import assert_same_agent_and_replay
from omegaconf import DictConfig

from mtl.checkpoint import load_checkpoint
from mtrl.config import CONFIG_DIR
from mtrl.envs import make_family
from mtrl.evaluate import EVAL_STREAM, episode_seed, evaluate, evaluate_run, format_table, record_videos
from mtrl.runs import LAST, load_run
from mtrl.train import EnvPool, _updates_due, run

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
AGENT_CONFIGS = sorted(p.stem for p in (REPO / "configs" / "agent").glob("*.yaml"))

TINY = [
    "env.max_episode_steps=20",
    "agent.hidden=[16,16]",
    "trainer.total_steps=40",
    "trainer.learning_starts=10",
    "trainer.batch_size=8",
    "trainer.replay_capacity=500",
    "trainer.eval_episodes=2",
    "trainer.eval_interval=20",
    "trainer.log_interval=10",
    "trainer.checkpoint_interval=0",
    "trainer.progress=false",
]
TINY_CARE = ["agent.expert_hidden=[8]", "agent.expert_dim=8", "agent.context_hidden=[8]", "agent.context_dim=4"]


def cfg_for(agent: str = "care", *overrides: str) -> DictConfig:
    extra = TINY_CARE if agent == "care" else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="mtrl", overrides=[f"agent={agent}", *TINY, *extra, *overrides])


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- training


def test_short_training_run_writes_checkpoint_log_config_and_eval(tmp_path: Path) -> None:
    result = run(cfg_for("care"), tmp_path)
    for name in ("config.yaml", LAST, "train_log.jsonl", "eval.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    names = ["goal-0deg", "goal-90deg", "goal-180deg", "goal-270deg"]
    assert list(saved["tasks"]) == names and saved["step"] == 40 and saved["agent"] == "care"
    assert saved["family"]["family"] == "pointmass" and saved["episodes"] == 2
    assert saved["mean_success"] == pytest.approx(np.mean([saved["tasks"][n]["success"] for n in names]))
    records = _records(tmp_path)
    assert [r["step"] for r in records if "eval/mean_success" in r] == [20, 40]
    train = [r for r in records if "transitions" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    # 4 envs per step; updates start after step 10 (one per step)
    assert train[-1]["transitions"] == 160 and train[-1]["updates"] == 30
    assert train[-1]["episodes"] == 8 and "loss/critic" in train[-1] and "alpha/goal-0deg" in train[-1]
    state = load_checkpoint(tmp_path / LAST)
    assert state["replay"]["size"].tolist() == [40, 40, 40, 40]


def test_mt_sac_learns_to_head_for_the_goals(tmp_path: Path) -> None:
    # 1,200 steps (about 4 s). Standing still returns -50 * (distance ~1) = -50 per episode; the best
    # task-blind behaviour also averages about -50 (the mean distance to the 4 goals is smallest, 1, at the
    # centre; heading for one goal and staying there averages (+14 - 65 - 65 - 88) / 4 = -51 even with the
    # success bonus). A return above -35 means the policy moves towards each task's own goal.
    cfg = cfg_for(
        "mt_sac",
        "env.max_episode_steps=50",
        "agent.hidden=[32,32]",
        "trainer.total_steps=1200",
        "trainer.learning_starts=200",
        "trainer.batch_size=32",
        "trainer.eval_interval=0",
        "trainer.eval_episodes=4",
        "sac.actor_lr=1e-3",
        "sac.critic_lr=1e-3",
        "sac.temperature_lr=1e-3",
        "sac.init_temperature=0.1",
    )
    result = run(cfg, tmp_path)
    assert result["mean_return"] > -35, result


@pytest.mark.parametrize("agent", AGENT_CONFIGS)
def test_every_agent_config_trains_a_few_steps(agent: str, tmp_path: Path) -> None:
    cfg = cfg_for(agent, "trainer.total_steps=25", "trainer.eval_interval=0")
    result = run(cfg, tmp_path)
    assert result["agent"] == agent and 0.0 <= result["mean_success"] <= 1.0
    state = load_checkpoint(tmp_path / LAST)
    assert state["agent"]["num_updates"] == 15  # steps 11..25
    loaded = load_run(tmp_path)
    assert loaded.agent.name == agent and loaded.step == 25
    for key, value in loaded.agent.state_dict().items():
        assert torch.equal(value, state["agent"]["modules"][key]), key
    assert all(math.isfinite(v) for v in result["tasks"]["goal-0deg"].values())


RESUME_CASES = [
    ("care", ["gradient=none"]),
    ("mt_sac", ["gradient=pcgrad"]),
    # FAMO's logits on the critic losses, the bandit's weights over tasks (fed by the critic losses)
    ("mt_sac", ["gradient=pcgrad", "weighting=famo", "schedule=random", "schedule.tasks_per_step=2"]),
    ("multihead_sac", ["weighting=famo", "schedule=bandit"]),
    # DWA's epochs (every 20 steps: step 30 is mid-epoch), RLW on the actor too, progress fed by episode outcomes
    ("multihead_sac", ["weighting=dwa", "trainer.epoch_steps=20", "schedule=progress"]),
    ("mt_sac", ["weighting=rlw", "weighted_losses=actor_and_critic"]),
]


@pytest.mark.parametrize(("agent", "strategies"), RESUME_CASES, ids=[" ".join(s) for _, s in RESUME_CASES])
def test_resume_continues_to_bit_identical_weights(agent: str, strategies: list[str], tmp_path: Path) -> None:
    # 60 steps straight vs 30 + resume + 30. Episodes last 20 steps, so step 30 is mid-episode: the resumed
    # run must rebuild the envs by replaying the episode's actions. Evaluations happen at different steps in
    # the two runs (and must not matter: they do not feed the scheduler).
    common = [*strategies, "trainer.total_steps=60"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(cfg_for(agent, *common, "trainer.eval_interval=25"), straight)
    run(cfg_for(agent, *common, "trainer.total_steps=30", "trainer.eval_interval=0"), split)
    first = load_checkpoint(split / LAST)
    assert first["step"] == 30 and any(len(a) == 10 for a in first["pool"]["actions"])
    run(cfg_for(agent, *common, "trainer.resume=true", "trainer.eval_interval=0"), split)
    a, b = load_checkpoint(straight / LAST), load_checkpoint(split / LAST)
    assert a["step"] == b["step"] == 60
    assert_same_agent_and_replay(a, b)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert np.array_equal(a["pool"]["obs"], b["pool"]["obs"])
    _assert_same(a["agent"]["steps"], b["agent"]["steps"])  # weightings, gradient methods, scheduler, epochs
    # The resumed run's log continues from step 30 (nothing duplicated).
    steps = [r["step"] for r in _records(split) if "transitions" in r]
    assert steps == [10, 20, 30, 40, 50, 60]


def _assert_same(a: object, b: object) -> None:
    """Nested dicts, lists and tensors equal (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b or (a != a and b != b), (a, b)


def test_weighting_schedule_and_gradient_groups_train_tiny(tmp_path: Path) -> None:
    """``mtrl-train weighting=famo schedule=bandit gradient=pcgrad``, tiny: FAMO weights the critic losses, the bandit
    picks one task per update from the critic losses, PCGrad modulates both families' gradients."""
    result = run(cfg_for("mt_sac", "weighting=famo", "schedule=bandit", "gradient=pcgrad"), tmp_path)
    assert 0.0 <= result["mean_success"] <= 1.0
    state = load_checkpoint(tmp_path / LAST)["agent"]["steps"]
    bandit = state["critic"]["scheduler"]
    assert bandit["method"] == "bandit" and any(w != 0.0 for w in bandit["log_weights"])  # it learned
    assert state["critic"]["weighting"]["logits"].shape == (4,) and state["actor"]["weighting"] is None
    record = [r for r in _records(tmp_path) if "transitions" in r][-1]
    weights = [k for k in record if k.startswith("weight/critic/")]
    assert len(weights) == 1 and record[weights[0]] == pytest.approx(1.0)  # one task per update: FAMO weight 1
    assert len([k for k in record if k.startswith("loss/critic/")]) == 1


STRATEGY_CONFIGS = [
    f"{group}={p.stem}"
    for group in ("weighting", "schedule")
    for p in sorted((REPO / "configs" / group).glob("*.yaml"))
]


@pytest.mark.parametrize("override", STRATEGY_CONFIGS)
def test_every_weighting_and_schedule_config_trains_a_sac_agent(override: str) -> None:
    """Each config of the shared groups, built by mtrl-train for the family's task names (sizes, total_steps),
    trains SAC updates: finite losses, the critic moves, DWA gets its epochs."""
    from mtrl.agents import EnvSpec, Transition, mt_sac
    from mtrl.config import build_strategies, trainer_config

    cfg = cfg_for("mt_sac", override)
    names = ["goal-0deg", "goal-90deg", "goal-180deg", "goal-270deg"]
    strategies = build_strategies(cfg, names, seed=0, tcfg=trainer_config(cfg.trainer))
    assert set(strategies) == {"actor_gradient", "critic_gradient", "critic_weighting", "scheduler"}
    torch.manual_seed(0)
    agent = mt_sac(EnvSpec(2, 2, tuple(names)), hidden=[8], **strategies)
    before = [p.clone() for p in agent.critic.parameters()]
    g, n = torch.Generator().manual_seed(0), 4 * 6
    for _ in range(4):
        b = Transition(torch.randn(n, 2, generator=g), torch.rand(n, 2, generator=g) * 2 - 1,
                       -torch.rand(n, generator=g), torch.randn(n, 2, generator=g), torch.zeros(n),
                       torch.arange(4).repeat_interleave(6))
        stats = agent.update(b, stats=True)
        agent.end_epoch()
        assert all(math.isfinite(v) for v in stats.values()), stats
    assert not all(torch.equal(p, q) for p, q in zip(agent.critic.parameters(), before))


def test_progress_schedule_learns_from_training_episode_outcomes(tmp_path: Path) -> None:
    # Episodes of 20 steps end at steps 20 and 40 in all four envs: every task's success rate reaches the scheduler.
    run(cfg_for("mt_sac", "schedule=progress", "trainer.total_steps=45", "trainer.eval_interval=0"), tmp_path)
    progress = load_checkpoint(tmp_path / LAST)["agent"]["steps"]["critic"]["scheduler"]
    assert progress["method"] == "progress"
    assert all(f is not None and 0.0 <= f <= 1.0 for f in progress["fast"]), progress


def test_unused_and_misplaced_config_keys_fail_at_start_up(tmp_path: Path) -> None:
    for override, key in (("+model=mmoe", "model"), ("+optimizer=adam", "optimizer"), ("+foo=1", "foo")):
        with pytest.raises(ValueError, match=f"config key '{key}' is not used by mtrl-train"):
            run(cfg_for("mt_sac", override), tmp_path)
    with pytest.raises(ValueError, match="weighted_losses: expected one of"):
        run(cfg_for("mt_sac", "weighted_losses=actor"), tmp_path)
    with pytest.raises(ValueError, match="config section 'weighting'.*lrr"):
        run(cfg_for("mt_sac", "weighting=famo", "+weighting.lrr=0.1"), tmp_path)
    with pytest.raises(ValueError, match="config section 'schedule'.*tau"):
        run(cfg_for("mt_sac", "schedule=bandit", "+schedule.tau=0.1"), tmp_path)
    assert not (tmp_path / LAST).exists()  # nothing started


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    run(cfg_for("mt_sac", "trainer.total_steps=15", "trainer.eval_interval=0"), tmp_path)
    with pytest.raises(ValueError, match="different agent config"):
        run(cfg_for("multihead_sac", "trainer.total_steps=20", "trainer.resume=true"), tmp_path)
    with pytest.raises(ValueError, match="seed 0, this run has seed 3"):
        run(cfg_for("mt_sac", "trainer.total_steps=20", "trainer.resume=true", "seed=3"), tmp_path)
    with pytest.raises(ValueError, match="different schedule, weighting config"):
        run(cfg_for("mt_sac", "trainer.total_steps=20", "trainer.resume=true", "weighting=famo", "schedule=bandit"),
            tmp_path)
    # A checkpoint written before the weighting and schedule groups (no such keys in its fingerprint) was trained
    # with equal weights and every task: it resumes under those defaults.
    state = load_checkpoint(tmp_path / LAST)
    for key in ("weighting", "schedule", "weighted_losses"):
        del state["fingerprint"][key]
    torch.save(state, tmp_path / LAST)
    run(cfg_for("mt_sac", "trainer.total_steps=20", "trainer.resume=true", "trainer.eval_interval=0"), tmp_path)
    assert load_checkpoint(tmp_path / LAST)["step"] == 20


def test_config_typos_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="totl_steps"):
        run(cfg_for("mt_sac", "+trainer.totl_steps=5"), tmp_path)
    with pytest.raises(ValueError, match="gama"):
        run(cfg_for("mt_sac", "+sac.gama=0.9"), tmp_path)
    with pytest.raises(ValueError, match="hiden"):
        run(cfg_for("mt_sac", "+agent.hiden=[8]"), tmp_path)
    with pytest.raises(ValueError, match="trainer.batch_size must be >= 1"):
        run(cfg_for("mt_sac", "trainer.batch_size=0"), tmp_path)


def test_updates_due_spreads_fractional_ratios() -> None:
    assert [_updates_due(s, 2, 1.0) for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert [_updates_due(s, 0, 0.5) for s in range(1, 7)] == [0, 1, 0, 1, 0, 1]
    assert [_updates_due(s, 0, 2.0) for s in range(1, 4)] == [2, 2, 2]
    assert sum(_updates_due(s, 0, 0.3) for s in range(1, 101)) == 30


def test_env_pool_replays_episodes_and_detects_divergence() -> None:
    family = make_family("pointmass", num_goals=4, max_episode_steps=7)
    pool = EnvPool(family, envs_per_task=2, seed=5)
    pool.reset()
    rng = np.random.default_rng(0)
    finished = []
    for _ in range(10):
        finished += pool.step(rng.uniform(-1, 1, (8, 2)).astype(np.float32))[3]
    assert len(finished) == 8 and pool.episode.tolist() == [1] * 8  # every env finished one 7-step episode
    state = pool.state_dict()
    assert all(len(a) == 3 for a in state["actions"])
    again = EnvPool(family, envs_per_task=2, seed=5)
    again.load_state_dict(state)
    assert np.array_equal(again.obs, pool.obs)
    action = rng.uniform(-1, 1, (8, 2)).astype(np.float32)
    assert np.array_equal(again.step(action)[0], pool.step(action)[0])
    state["obs"][3] += 1.0
    with pytest.raises(RuntimeError, match="did not reproduce its saved observation"):
        EnvPool(family, envs_per_task=2, seed=5).load_state_dict(state)


# ----------------------------------------------------------------------------------------- evaluation


def _goal_policy(family, chase: int | None = None):
    """Heads for the goal of each row's task (or always for task ``chase``), never overshooting."""
    goals = family.goals

    def act(obs: np.ndarray, task: np.ndarray) -> np.ndarray:
        target = goals[task] if chase is None else np.repeat(goals[chase][None], len(task), 0)
        delta = target - obs
        dist = np.linalg.norm(delta, axis=1, keepdims=True)
        return (delta / np.maximum(dist, 1e-9) * np.minimum(1.0, dist / family.max_speed)).astype(np.float32)

    return act


def test_evaluate_against_hand_written_policies() -> None:
    family = make_family("pointmass", num_goals=4)
    perfect = evaluate(_goal_policy(family), family, episodes=3, seed=1)
    assert perfect["mean_success"] == 1.0 and all(r["success"] == 1.0 for r in perfect["tasks"].values())
    # A task-blind policy that always chases goal 0 succeeds in task 0 only: 1/K.
    blind = evaluate(_goal_policy(family, chase=0), family, episodes=3, seed=1)
    assert [r["success"] for r in blind["tasks"].values()] == [1.0, 0.0, 0.0, 0.0] and blind["mean_success"] == 0.25
    # Standing still: the return is -50 * distance from the start (within start_noise of the origin) to the goal.
    still = evaluate(lambda o, t: np.zeros((len(t), 2), np.float32), family, episodes=4, seed=2, envs_per_task=3)
    assert still["mean_success"] == 0.0
    for r in still["tasks"].values():
        assert -50 * (1 + family.start_noise) <= r["return"] <= -50 * (1 - family.start_noise)
    # Episode seeds, not the number of envs side by side, decide the result.
    again = evaluate(lambda o, t: np.zeros((len(t), 2), np.float32), family, episodes=4, seed=2, envs_per_task=1)
    assert again == still
    one = evaluate(lambda o, t: np.zeros((len(t), 2), np.float32), family, episodes=1, seed=2)
    for t, name in enumerate(family.task_names):
        obs, _ = family.make_env(t).reset(seed=episode_seed(EVAL_STREAM, 2, t, 0))
        expected = -50 * np.linalg.norm(obs["obs"].astype(np.float64) - family.goals[t])
        assert one["tasks"][name]["return"] == pytest.approx(expected, rel=1e-5)
    table = format_table(perfect)
    assert "goal-270deg" in table and "mean" in table and "1.000" in table


def test_record_videos_writes_one_file_per_task(tmp_path: Path) -> None:
    family = make_family("pointmass", num_goals=2, max_episode_steps=6)
    out = record_videos(_goal_policy(family), family, tmp_path, seed=0)
    assert set(out) == set(family.task_names)
    for path in out.values():
        p = Path(path)
        assert p.is_file() and p.suffix in (".mp4", ".gif")
        if p.suffix == ".gif":
            from PIL import Image

            assert Image.open(p).n_frames == 7  # the reset frame and one per step


def test_mtrl_eval_and_policy_export_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    run_dir = tmp_path / "run"
    run(cfg_for("care", "trainer.total_steps=20", "trainer.eval_interval=0"), run_dir)
    result = evaluate_run({"run_dir": str(run_dir), "episodes": 2, "video": False})
    printed = capsys.readouterr().out
    assert "goal-180deg" in printed and "mean" in printed
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert set(saved["tasks"]) == {"goal-0deg", "goal-90deg", "goal-180deg", "goal-270deg"}
    assert saved["mean_success"] == result["mean_success"] and saved["step"] == 20
    # The training's final evaluation used the same seed and episodes: same numbers.
    final = json.loads((run_dir / "eval.json").read_text())
    assert final["tasks"] == saved["tasks"]

    from mtrl.export import export_run
    from serving.export import ParityOptions, ort_session

    res = export_run(run_dir, tmp_path / "repo", "policy", parity=ParityOptions(batch_sizes=(1, 5)))
    assert res.parity.passed and res.version == 1
    meta = json.loads((res.version_dir / "policy.json").read_text())
    assert meta["tasks"][2] == "goal-180deg" and meta["agent"] == "care"
    session = ort_session(res.model_path)
    agent = load_run(run_dir).agent
    obs = np.random.default_rng(0).uniform(-1.5, 1.5, (6, 2)).astype(np.float32)
    task = np.array([[0], [1], [2], [3], [1], [0]], dtype=np.int64)
    (ort_action,) = session.run(["action"], {"obs": obs, "task": task})
    expected = agent.act(torch.as_tensor(obs), torch.as_tensor(task[:, 0]), deterministic=True).numpy()
    np.testing.assert_allclose(ort_action, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="run_dir"):
        evaluate_run({"episodes": 2})


def test_cli_entry_points(tmp_path: Path) -> None:
    run_dir = tmp_path / "cli"
    overrides = [o for o in TINY if not o.startswith("trainer.total_steps")]
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtrl.cli.train",
            "agent=mt_sac",
            "trainer.total_steps=12",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert (run_dir / "eval.json").is_file() and (run_dir / "config.yaml").is_file()
    ev = subprocess.run(
        [sys.executable, "-m", "mtrl.cli.eval", f"run_dir={run_dir}", "episodes=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "goal-90deg" in ev.stdout and (run_dir / "evaluation.json").is_file()


def test_cli_strategy_groups_and_a_misplaced_group(tmp_path: Path) -> None:
    """``mtrl-train weighting=famo schedule=bandit gradient=pcgrad`` runs tiny; ``+model=mmoe`` (a group of
    mtrec-train) exits with status 2 and one line naming the key, no traceback."""
    overrides = [o for o in TINY if not o.startswith("trainer.total_steps")]
    base = [sys.executable, "-m", "mtrl.cli.train", "agent=mt_sac", "trainer.total_steps=15", *overrides]
    ok = subprocess.run(
        [*base, "weighting=famo", "schedule=bandit", "gradient=pcgrad", f"hydra.run.dir={tmp_path / 'ok'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((tmp_path / "ok" / "eval.json").read_text())["step"] == 15
    bad = subprocess.run(
        [*base, "+model=mmoe", f"hydra.run.dir={tmp_path / 'bad'}"], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "mtrl-train: error: config key 'model' is not used by mtrl-train" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad" / LAST).exists()
    # weighting is a group of mtrl-train now: adding it again is Hydra's composition error, also status 2
    twice = subprocess.run([*base, "+weighting=equal"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert twice.returncode == 2, twice.stderr[-3000:]
    assert "weighting appears more than once" in twice.stderr and "Traceback" not in twice.stderr


def test_sigterm_checkpoints_a_complete_step_and_the_run_resumes_exactly(tmp_path: Path) -> None:
    import signal
    import time

    killed = tmp_path / "killed"
    overrides = [o for o in TINY if not o.startswith("trainer.total_steps")]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtrl.cli.train",
            "agent=mt_sac",
            "trainer.total_steps=100000",
            f"hydra.run.dir={killed}",
            *overrides,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until it trains (past learning_starts)
            log = killed / "train_log.jsonl"
            if log.exists() and any(json.loads(x)["step"] >= 30 for x in log.read_text().splitlines() if x):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = load_checkpoint(killed / LAST)["step"]
    assert 30 <= step < 100000 and f"SIGTERM at step {step}" in out + err
    # Resume to step + 13 and compare with a straight run of step + 13 steps.
    until = f"trainer.total_steps={step + 13}"
    run(cfg_for("mt_sac", until, "trainer.resume=true", "trainer.eval_interval=0"), killed)
    run(cfg_for("mt_sac", until, "trainer.eval_interval=0"), tmp_path / "straight")
    a, b = load_checkpoint(killed / LAST), load_checkpoint(tmp_path / "straight" / LAST)
    for key, value in a["agent"]["modules"].items():
        assert torch.equal(value, b["agent"]["modules"][key]), key
