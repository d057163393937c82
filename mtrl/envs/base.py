"""The task-family contract between multi-task environments and agents.

A :class:`TaskFamily` is an ordered set of K tasks that share one observation and one action space. Each task
is a separate ``gymnasium.Env``; its observation is a dict::

    {"obs": float32 [obs_dim], "task": int in [0, K)}

so an agent sees the task index next to the state (the multi-task setting of Yu et al., "Meta-World",
CoRL 2019, where MT-SAC gets a one-hot task id). Conditioning on the index (one-hot, learned embedding, or
CARE's metadata attention, Sodhani et al., ICML 2021, through :attr:`TaskFamily.metadata`) is the agent's
business, not the environment's.

Every env made by a family:

* has ``observation_space == Dict({"obs": Box(float32, (obs_dim,)), "task": Discrete(K)})``, identical for
  all tasks of the family (so gymnasium's vector envs accept them side by side);
* has a float32 ``Box`` action space in ``[-1, 1]``;
* puts ``info["success"]`` (bool) and ``info["task"]`` (int) into every step's info;
* truncates at :attr:`TaskFamily.max_episode_steps` (``truncated=True``; ``terminated`` only for true terminal
  states), as gymnasium's ``TimeLimit`` would, without being wrapped (``env.unwrapped is env``);
* is reproducible: ``reset(seed=s)`` fixes the episode; ``make_env(task, seed=s)`` fixes the first reset that
  gets no seed and the action space's sampler.

Families are built by name with :func:`mtrl.envs.make_family` (the registry lives in :mod:`mtrl.envs`, so this
module knows no family). Example::

    >>> from mtrl.envs import make_family
    >>> family = make_family("pointmass", num_goals=4)
    >>> envs = make_vector_env(family, envs_per_task=2)      # 8 envs, env j runs task j % 4
    >>> obs, info = envs.reset(seed=0)
    >>> x, task = flatten_obs(obs)                           # float32 [8, 2], int64 [8]
    >>> task.tolist()
    [0, 1, 2, 3, 0, 1, 2, 3]
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np

VECTORIZATIONS = ("sync", "async")
"""Accepted ``vectorization`` values: gymnasium's ``SyncVectorEnv`` and ``AsyncVectorEnv``."""


class TaskFamily(abc.ABC):
    """An ordered set of tasks with shared spaces; task index ``i`` is ``task_names[i]``.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`make_env` and :meth:`describe`.

    Attributes:
        name: family name, as given to :func:`mtrl.envs.make_family`.
        task_names: ordered task names.
        metadata: float32 ``[K, M]``, one metadata vector per task (CARE's context input).
        max_episode_steps: episode length; every env truncates there.
        obs_dim: width of ``obs["obs"]``.
        action_dim: width of the action.
        vectorization: default of :func:`make_vector_env` (``"sync"`` or ``"async"``).
        envs_per_task: default of :func:`make_vector_env`.
    """

    name: str
    task_names: tuple[str, ...]
    metadata: np.ndarray
    max_episode_steps: int
    obs_dim: int
    action_dim: int
    vectorization: str = "sync"
    envs_per_task: int = 1

    @property
    def num_tasks(self) -> int:
        """K, the number of tasks."""
        return len(self.task_names)

    def task_index(self, task: int | str) -> int:
        """The index of ``task`` (an index or a task name), validated.

        Raises:
            ValueError: unknown name or index out of range (the valid ones are listed).
            TypeError: neither an int nor a str.
        """
        if isinstance(task, str):
            if task not in self.task_names:
                raise ValueError(f"{self.name}: unknown task {task!r}; tasks are {list(self.task_names)}")
            return self.task_names.index(task)
        if isinstance(task, (bool, np.bool_)) or not isinstance(task, (int, np.integer)):
            raise TypeError(f"{self.name}: task must be an int index or a task name, got {type(task).__name__}")
        if not 0 <= int(task) < self.num_tasks:
            raise ValueError(f"{self.name}: task index must be in [0, {self.num_tasks}), got {task}")
        return int(task)

    @abc.abstractmethod
    def make_env(self, task: int, seed: int | None = None, render_mode: str | None = None) -> gym.Env:
        """A new env running task ``task`` (index; a task name is accepted too)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Every setting that defines the tasks, JSON-friendly; written into every result."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_tasks={self.num_tasks})"


def _validate_settings(vectorization: str, envs_per_task: int) -> None:
    if vectorization not in VECTORIZATIONS:
        raise ValueError(f"vectorization must be one of {VECTORIZATIONS}, got {vectorization!r}")
    if isinstance(envs_per_task, bool) or not isinstance(envs_per_task, int) or envs_per_task < 1:
        raise ValueError(f"envs_per_task must be an integer >= 1, got {envs_per_task!r}")


def make_vector_env(
    family: TaskFamily,
    *,
    envs_per_task: int | None = None,
    vectorization: str | None = None,
    seed: int = 0,
    autoreset_mode: str | gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
    context: str | None = None,
) -> gym.vector.VectorEnv:
    """``K * envs_per_task`` envs of a family in one gymnasium vector env; env ``j`` runs task ``j % K``.

    Args:
        family: the task family.
        envs_per_task: copies of each task; ``None`` takes ``family.envs_per_task`` (1 unless configured).
        vectorization: ``"sync"`` (``SyncVectorEnv``, one process) or ``"async"`` (``AsyncVectorEnv``, one
            worker process per env); ``None`` takes ``family.vectorization``.
        seed: env ``j`` is made with ``seed + j``, so ``envs.reset()`` without a seed is reproducible; an
            explicit ``envs.reset(seed=s)`` seeds env ``j`` with ``s + j`` (gymnasium's rule).
        autoreset_mode: gymnasium's autoreset mode; the default ``NEXT_STEP`` is gymnasium's default (the
            step after an episode ends resets that env and its action is ignored).
        context: multiprocessing start method for ``"async"`` (gymnasium's default when ``None``).

    Raises:
        ValueError: unknown vectorization or ``envs_per_task < 1``.
    """
    envs_per_task = family.envs_per_task if envs_per_task is None else envs_per_task
    vectorization = family.vectorization if vectorization is None else vectorization
    _validate_settings(vectorization, envs_per_task)
    k = family.num_tasks
    fns: list[Callable[[], gym.Env]] = [partial(family.make_env, j % k, seed + j) for j in range(k * envs_per_task)]
    if vectorization == "sync":
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=autoreset_mode)
    return gym.vector.AsyncVectorEnv(fns, autoreset_mode=autoreset_mode, context=context)


def flatten_obs(obs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Split a (batched) family observation into ``(obs float32 [N, obs_dim], task int64 [N])``.

    A single env's observation (``obs`` 1-d, ``task`` scalar) becomes a batch of one.

    Raises:
        TypeError: ``obs`` is not a mapping with keys ``"obs"`` and ``"task"``.
        ValueError: shapes that are not ``[N, obs_dim]`` and ``[N]``.
    """
    if not isinstance(obs, Mapping) or "obs" not in obs or "task" not in obs:
        got = sorted(obs) if isinstance(obs, Mapping) else type(obs).__name__
        raise TypeError(f"flatten_obs expects a dict with keys 'obs' and 'task' (a family observation), got {got}")
    x = np.asarray(obs["obs"], dtype=np.float32)
    task = np.asarray(obs["task"], dtype=np.int64)
    if x.ndim == 1 and task.ndim == 0:
        x, task = x[None], task[None]
    if x.ndim != 2 or task.ndim != 1 or x.shape[0] != task.shape[0]:
        raise ValueError(
            f"flatten_obs expects obs [N, obs_dim] and task [N] (or obs [obs_dim] and a scalar task), "
            f"got obs {x.shape} and task {task.shape}"
        )
    return x, task
