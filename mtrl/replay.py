"""A replay buffer per task, sampled uniformly with the same number of rows from every task.

Multi-task SAC implementations that share one buffer let the tasks with more (or longer) episodes dominate
the updates; one ring buffer per task with equal rows per task per update (as Yu et al., "Meta-World",
CoRL 2019, and CARE's code sample their multi-task buffers) keeps every task's loss estimated on the same
number of rows, which is what per-task losses for :mod:`mtl.gradients` need.

Storage is preallocated ``[K, capacity, ...]`` tensors on one device (the agent's, so sampling on a GPU
never crosses the bus); indices come from the buffer's own CPU ``torch.Generator``, so sampling draws
from no global random stream and is restored exactly by :meth:`TaskReplay.load_state_dict`. A state dict
holds only the filled rows.

Example::

    replay = TaskReplay(num_tasks=4, capacity=100_000, obs_dim=6, action_dim=2, seed=0)
    replay.add(task, obs, action, reward, next_obs, terminated)      # arrays with one row per env
    batch = replay.sample(64)                                        # 4 * 64 rows, task-major
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtrl.agents.sac import Transition

__all__ = ["TaskReplay"]

_FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


class TaskReplay:
    """``K`` ring buffers of ``capacity`` transitions each.

    Args:
        num_tasks: ``K``.
        capacity: transitions kept per task (the oldest are overwritten).
        obs_dim, action_dim: row sizes.
        device: where the storage lives and batches are returned.
        seed: seed of the sampling generator.
    """

    def __init__(
        self,
        num_tasks: int,
        capacity: int,
        obs_dim: int,
        action_dim: int,
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if num_tasks < 1 or capacity < 1 or obs_dim < 1 or action_dim < 1:
            raise ValueError(
                f"TaskReplay needs positive sizes, got num_tasks={num_tasks}, capacity={capacity}, "
                f"obs_dim={obs_dim}, action_dim={action_dim}"
            )
        self.num_tasks, self.capacity = int(num_tasks), int(capacity)
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.device = torch.device(device)
        k, c = self.num_tasks, self.capacity
        self.data: dict[str, Tensor] = {
            "obs": torch.zeros(k, c, obs_dim, device=self.device),
            "action": torch.zeros(k, c, action_dim, device=self.device),
            "reward": torch.zeros(k, c, device=self.device),
            "next_obs": torch.zeros(k, c, obs_dim, device=self.device),
            "terminated": torch.zeros(k, c, device=self.device),
        }
        self.size = np.zeros(k, dtype=np.int64)  # rows filled per task
        self.pos = np.zeros(k, dtype=np.int64)  # next row written per task
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return int(self.size.sum())

    def add(
        self,
        task: np.ndarray,
        obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
    ) -> None:
        """Append ``N`` transitions (row ``i`` to task ``task[i]``'s buffer, in row order)."""
        task = np.asarray(task, dtype=np.int64).reshape(-1)
        n = task.shape[0]
        if n == 0:
            return
        if task.min() < 0 or task.max() >= self.num_tasks:
            raise ValueError(f"task indices must be in [0, {self.num_tasks}), got {sorted(set(task.tolist()))}")
        # Row i goes to slot pos[t] + (number of earlier rows of the same task), modulo capacity.
        order = np.argsort(task, kind="stable")
        sorted_tasks = task[order]
        starts = np.searchsorted(sorted_tasks, sorted_tasks, side="left")
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - starts
        if np.bincount(task, minlength=self.num_tasks).max() > self.capacity:
            raise ValueError(f"cannot add more than capacity={self.capacity} rows of one task at once")
        slots = (self.pos[task] + rank) % self.capacity
        flat = torch.as_tensor(task * self.capacity + slots, device=self.device)
        values = {"obs": obs, "action": action, "reward": reward, "next_obs": next_obs, "terminated": terminated}
        for key in _FIELDS:
            store = self.data[key]
            value = torch.as_tensor(np.asarray(values[key], dtype=np.float32), device=self.device)
            store.view(self.num_tasks * self.capacity, *store.shape[2:])[flat] = value.reshape(n, *store.shape[2:])
        counts = np.bincount(task, minlength=self.num_tasks)
        self.pos = (self.pos + counts) % self.capacity
        self.size = np.minimum(self.size + counts, self.capacity)

    def sample(self, batch_per_task: int) -> Transition:
        """``K * batch_per_task`` rows drawn uniformly with replacement, ``batch_per_task`` from each task's
        buffer, task-major (rows ``[t * n, (t + 1) * n)`` are task ``t``'s).

        Raises:
            ValueError: a task has no transitions yet.
        """
        if batch_per_task < 1:
            raise ValueError(f"batch_per_task must be >= 1, got {batch_per_task}")
        if (self.size == 0).any():
            empty = np.flatnonzero(self.size == 0).tolist()
            raise ValueError(f"tasks {empty} have no transitions yet; collect some before sampling")
        k, n = self.num_tasks, batch_per_task
        u = torch.rand(k, n, generator=self.generator, dtype=torch.float64)
        size = torch.as_tensor(self.size, dtype=torch.float64).unsqueeze(1)
        rows = (u * size).long().clamp_max_(size.long() - 1)
        flat = (rows + torch.arange(k).unsqueeze(1) * self.capacity).reshape(-1).to(self.device)
        out = {
            key: self.data[key].view(k * self.capacity, *self.data[key].shape[2:]).index_select(0, flat)
            for key in _FIELDS
        }
        task = torch.arange(k, device=self.device).repeat_interleave(n)
        return Transition(task=task, **out)

    def state_dict(self) -> dict[str, Any]:
        """Filled rows (CPU copies), write positions and the sampler's generator state."""
        return {
            "num_tasks": self.num_tasks,
            "capacity": self.capacity,
            "size": self.size.copy(),
            "pos": self.pos.copy(),
            "generator": self.generator.get_state(),
            "data": {
                key: [self.data[key][t, : self.size[t]].cpu().clone() for t in range(self.num_tasks)] for key in _FIELDS
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a buffer of the same ``num_tasks`` and ``capacity``."""
        if (state["num_tasks"], state["capacity"]) != (self.num_tasks, self.capacity):
            raise ValueError(
                f"replay state has num_tasks={state['num_tasks']}, capacity={state['capacity']}; this buffer has "
                f"{self.num_tasks}, {self.capacity} (resume with the same trainer.replay_capacity and env)"
            )
        self.size = np.asarray(state["size"], dtype=np.int64).copy()
        self.pos = np.asarray(state["pos"], dtype=np.int64).copy()
        self.generator.set_state(state["generator"])
        for key in _FIELDS:
            for t in range(self.num_tasks):
                self.data[key][t, : self.size[t]] = state["data"][key][t].to(self.device)
