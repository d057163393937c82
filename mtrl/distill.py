"""Policy distillation: single-task SAC teachers into one multi-task student policy.

Rusu et al., "Policy Distillation" (ICLR 2016): each task has a teacher trained on that task alone; the
multi-task student is trained by supervised learning to match every teacher's action distribution on
states of the teacher's task. Teh et al., "Distral: Robust Multitask Reinforcement Learning" (NeurIPS 2017)
use the same KL between task policies and a shared distilled policy as their transfer term.

* **Teachers** (:func:`train_teachers`): one ``mtrl-train`` run per task of a family, on
  :class:`SingleTaskFamily` (the family restricted to that task, task index 0), recorded in
  ``OUT/teachers.json`` (task -> run dir, checkpoint, config, final evaluation).
* **Loss**: for a state ``s`` of task ``t``, ``KL(pi_teacher_t(. | s) || pi_student(. | s, t))``. SAC policies
  are tanh-squashed diagonal Gaussians; the KL is computed **in closed form on the pre-tanh Gaussians**
  (:func:`mtl.distill.gaussian_kl`), which *equals* the KL of the squashed action distributions because
  ``tanh`` is a bijection and KL is invariant under bijections (``tests/test_distill.py`` checks this
  against a Monte-Carlo estimate through the squashed log-densities). The direction is the teacher's
  expectation, as in Rusu et al. (their KL loss with the teacher's distribution as the target). The
  per-task means form ``{task: loss}``, so any :mod:`mtl.gradients` method can combine them.
* **States** (:class:`PolicyDistiller`): each collection round runs every task's env for ``rollout_steps``
  steps with either the teacher acting (the teacher's state distribution, Rusu et al.) or, with probability
  ``student_fraction``, the student acting (the student's own state distribution, which the student meets at
  test time: DAgger-style data, Ross et al. 2011). Actions are sampled from the acting policy. Visited states
  go to one ring buffer per task; every update draws ``batch_size`` states per task.

The policy interface is a module mapping ``(obs [B, D], task [B] int64) -> (mean [B, A], log_std [B, A])``:
:class:`mtrl.agents.SquashedGaussianActor` (an agent's ``.actor``) is one.

Example::

    family = make_family("pointmass", num_goals=4)
    manifest = train_teachers(cfg, "runs/teachers")                     # mtrl config, one run per task
    teachers = load_teachers("runs/teachers/teachers.json")             # {task: actor}, frozen
    student = mt_sac(EnvSpec.from_family(family))
    distiller = PolicyDistiller(family, student.actor, [teachers[n] for n in family.task_names])
    history = distiller.fit(updates=2000)                                # KL per task per logged update
    evaluate(student, family)                                            # student.act uses the distilled actor
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mtl.checkpoint import atomic_write_json
from mtl.distill import policy_distillation_loss
from mtl.gradients import GradientMethod, Plain
from mtrl.envs.base import TaskFamily
from mtrl.evaluate import episode_seed
from mtrl.runs import EVAL_FILE, LAST, load_run

__all__ = [
    "FORMAT",
    "MANIFEST",
    "FrozenTeacher",
    "PolicyDistillConfig",
    "PolicyDistiller",
    "SingleTaskFamily",
    "load_teachers",
    "single_task_family",
    "teachers_in_family_order",
    "train_teachers",
]

MANIFEST = "teachers.json"
FORMAT = "mtlib-rl-teachers/1"
DISTILL_STREAM = 2  # episode-seed stream of distillation rollouts (training 0, evaluation 1)
log = logging.getLogger("mtrl.distill")


class GaussianPolicy(Protocol):
    """``(obs [B, D], task [B]) -> (mean [B, A], log_std [B, A])`` of the pre-tanh Gaussian."""

    def __call__(self, obs: Tensor, task: Tensor) -> tuple[Tensor, Tensor]: ...


# ------------------------------------------------------------------------------------- single-task family


class _OneTaskEnv(gym.Wrapper):
    """An env of a family's task seen as task 0 of a one-task family (``obs["task"]`` and ``info["task"]`` = 0)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = spaces.Dict({"obs": env.observation_space["obs"], "task": spaces.Discrete(1)})

    @staticmethod
    def _remap(obs: dict[str, Any], info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"obs": obs["obs"], "task": 0}, {**info, "task": 0}

    def reset(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return self._remap(obs, info)

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        obs, info = self._remap(obs, info)
        return obs, reward, terminated, truncated, info


class SingleTaskFamily(TaskFamily):
    """The task ``task`` of ``family`` as a family of one task (index 0): what a single-task teacher trains on.

    Observations keep their ``obs`` part and report ``task = 0``; metadata is the task's row.

    Raises:
        ValueError / TypeError: ``task`` is not a task of ``family``.
    """

    def __init__(self, family: TaskFamily, task: int | str) -> None:
        self.base = family
        self.index = family.task_index(task)
        name = family.task_names[self.index]
        self.name = f"{family.name}[{name}]"
        self.task_names = (name,)
        self.metadata = np.asarray(family.metadata)[self.index : self.index + 1]
        self.max_episode_steps = family.max_episode_steps
        self.obs_dim, self.action_dim = family.obs_dim, family.action_dim
        self.vectorization, self.envs_per_task = family.vectorization, 1

    def make_env(self, task: int, seed: int | None = None, render_mode: str | None = None) -> gym.Env:
        self.task_index(task)  # 0 or this family's one task name; anything else is a clear error
        return _OneTaskEnv(self.base.make_env(self.index, seed=seed, render_mode=render_mode))

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "single_task": self.task_names[0], "task_index_in_family": self.index}


def single_task_family(family: TaskFamily, task: int | str) -> SingleTaskFamily:
    """Hydra target of a teacher's ``env`` node: ``{_target_: mtrl.distill.single_task_family, family: <env>,
    task: name}``."""
    return SingleTaskFamily(family, task)


# ------------------------------------------------------------------------------------------------ teachers


def train_teachers(cfg: DictConfig, out_dir: str | Path, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """One single-task SAC teacher per task (``mtrl.train.run`` on :class:`SingleTaskFamily`) and the manifest
    ``out_dir/teachers.json``; returns it. ``cfg`` is an ``mtrl-train`` config (agent, SAC, trainer settings
    apply to every teacher); ``tasks`` defaults to every task of ``cfg.env``'s family. A teacher whose run
    finished (``eval.json`` present) is reused."""
    from hydra.utils import instantiate

    from mtrl.train import run as rl_run

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = instantiate(cfg.env)
    names = list(tasks) if tasks is not None else list(family.task_names)
    env_node = OmegaConf.to_container(cfg.env, resolve=True)
    manifest: dict[str, Any] = {"format": FORMAT, "seed": int(cfg.seed), "env": env_node, "teachers": {}}
    for name in names:
        family.task_index(name)  # a clear error for an unknown task
        sub = copy.deepcopy(cfg)
        OmegaConf.set_struct(sub, False)
        sub.env = {"_target_": "mtrl.distill.single_task_family", "family": env_node, "task": name}
        run_dir = out_dir / name
        if (run_dir / EVAL_FILE).exists() and (run_dir / LAST).exists():
            result = json.loads((run_dir / EVAL_FILE).read_text())
        else:
            log.info("teacher %s: training into %s", name, run_dir)
            result = rl_run(sub, run_dir)
        manifest["teachers"][name] = {
            "task": name,
            "run_dir": name,
            "checkpoint": f"{name}/{LAST}",
            "config": f"{name}/config.yaml",
            "agent": result.get("agent"),
            "success": result["tasks"][name]["success"],
            "return": result["tasks"][name]["return"],
        }
        atomic_write_json(manifest, out_dir / MANIFEST)
    return manifest


class FrozenTeacher(nn.Module):
    """A teacher actor frozen (eval, no grad) and queried at its own task index (0 for a single-task teacher),
    whatever task index the student uses for that task."""

    def __init__(self, actor: nn.Module, task_index: int = 0) -> None:
        super().__init__()
        self.actor = actor.eval().requires_grad_(False)
        self.task_index = int(task_index)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return self  # stays in eval mode

    @torch.no_grad()
    def forward(self, obs: Tensor, task: Tensor) -> tuple[Tensor, Tensor]:
        return self.actor(obs, torch.full_like(task, self.task_index))


def load_teachers(path: str | Path, device: str = "cpu") -> dict[str, FrozenTeacher]:
    """``{task: FrozenTeacher}`` from a manifest written by :func:`train_teachers` (file or its folder)."""
    file = Path(path)
    file = file / MANIFEST if file.is_dir() else file
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no RL teachers manifest; write one with mtrl.distill.train_teachers")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not an RL teachers manifest (expected {FORMAT!r}, got {manifest.get('format')!r})")
    out: dict[str, FrozenTeacher] = {}
    for name, entry in manifest["teachers"].items():
        run_dir = Path(entry["run_dir"])
        run_dir = run_dir if run_dir.is_absolute() else file.parent / run_dir
        out[name] = FrozenTeacher(load_run(run_dir, device=device).agent.actor, 0)
    return out


# ------------------------------------------------------------------------------------------------ distiller


@dataclass
class PolicyDistillConfig:
    """Settings of :class:`PolicyDistiller`."""

    batch_size: int = 128
    """States per task per update."""
    rollout_steps: int = 50
    """Env steps per task in each collection round."""
    collect_every: int = 50
    """Updates between collection rounds (a round also runs before the first update)."""
    student_fraction: float = 0.5
    """Probability that the student (not the teacher) acts in a task's collection round."""
    capacity: int = 100_000
    """States kept per task."""
    lr: float = 1e-3
    """Adam learning rate of the student."""
    grad_clip: float | None = None
    """Clip the student's gradient norm (``None`` = off)."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "rollout_steps", "collect_every", "capacity"):
            if getattr(self, key) < 1:
                raise ValueError(f"policy distillation: {key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.student_fraction <= 1.0:
            raise ValueError(f"policy distillation: student_fraction must be in [0, 1], got {self.student_fraction}")
        if not self.lr > 0:
            raise ValueError(f"policy distillation: lr must be > 0, got {self.lr}")


def _params(module: nn.Module, which: str) -> list[nn.Parameter]:
    fn = getattr(module, which, None)
    if fn is not None:
        return list(fn())
    return list(module.parameters()) if which == "shared_parameters" else []


class PolicyDistiller:
    """Distils ``teachers[t]`` (task ``t`` of ``family``) into ``student`` (see the module docstring).

    Args:
        family: the multi-task family; the student sees task ``t`` as index ``t``.
        student: the multi-task policy ``(obs, task) -> (mean, log_std)`` (e.g. ``agent.actor``); updated in place.
        teachers: one frozen policy per task of ``family`` (in its order), each ``(obs, task) -> (mean, log_std)``
            (:class:`FrozenTeacher` queries a single-task teacher at index 0).
        config: the settings.
        gradient: how the per-task KL losses become gradients (default: their plain sum).
        seed: seeds rollouts (episode seeds, action noise, who acts) and batch sampling.
    """

    def __init__(
        self,
        family: TaskFamily,
        student: nn.Module,
        teachers: Sequence[GaussianPolicy],
        config: PolicyDistillConfig | None = None,
        *,
        gradient: GradientMethod | None = None,
        seed: int = 0,
    ) -> None:
        self.family, self.student = family, student
        self.cfg = config = config if config is not None else PolicyDistillConfig()
        self.task_names = tuple(family.task_names)
        if len(teachers) != len(self.task_names):
            raise ValueError(f"need one teacher per task {list(self.task_names)}, got {len(teachers)} teachers")
        self.teachers = list(teachers)
        teacher_params = {id(p) for t in self.teachers if isinstance(t, nn.Module) for p in t.parameters()}
        if teacher_params & {id(p) for p in student.parameters()}:
            raise ValueError("the student shares parameters with a teacher; distil into a separate network")
        self.gradient = gradient if gradient is not None else Plain()
        self.shared = [p for p in _params(student, "shared_parameters") if p.requires_grad]
        shared_ids = {id(p) for p in self.shared}
        self.others = [p for p in student.parameters() if p.requires_grad and id(p) not in shared_ids]
        self.optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=config.lr)
        k, d = len(self.task_names), family.obs_dim
        self.states = torch.zeros(k, config.capacity, d)
        self.size = np.zeros(k, dtype=np.int64)
        self.pos = np.zeros(k, dtype=np.int64)
        self.rng = np.random.default_rng(np.random.SeedSequence([DISTILL_STREAM, seed]))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.seed = int(seed)
        self.envs = [family.make_env(t) for t in range(k)]
        self.episode = np.zeros(k, dtype=np.int64)
        self.obs: list[np.ndarray] = [self._reset(t) for t in range(k)]
        self.updates = 0

    # ------------------------------------------------------------------ data
    def _reset(self, t: int) -> np.ndarray:
        obs, _ = self.envs[t].reset(seed=episode_seed(DISTILL_STREAM, self.seed, t, int(self.episode[t])))
        return np.asarray(obs["obs"], dtype=np.float32)

    def _store(self, t: int, obs: np.ndarray) -> None:
        n = len(obs)
        idx = (self.pos[t] + np.arange(n)) % self.cfg.capacity
        self.states[t, torch.as_tensor(idx)] = torch.as_tensor(obs)
        self.pos[t] = (self.pos[t] + n) % self.cfg.capacity
        self.size[t] = min(self.size[t] + n, self.cfg.capacity)

    @torch.no_grad()
    def _sample_action(self, policy: GaussianPolicy, obs: np.ndarray, t: int) -> np.ndarray:
        o = torch.as_tensor(obs).unsqueeze(0)
        mean, log_std = policy(o, torch.tensor([t]))
        eps = torch.as_tensor(self.rng.standard_normal(mean.shape), dtype=mean.dtype)
        return torch.tanh(mean + log_std.exp() * eps)[0].numpy()

    def collect(self) -> dict[str, str]:
        """One round: ``rollout_steps`` steps in every task's env, the teacher or the student acting; returns
        who acted per task."""
        was_training = self.student.training
        self.student.eval()
        acted: dict[str, str] = {}
        try:
            for t, name in enumerate(self.task_names):
                use_student = self.rng.random() < self.cfg.student_fraction
                policy = self.student if use_student else self.teachers[t]
                acted[name] = "student" if use_student else "teacher"
                visited = []
                for _ in range(self.cfg.rollout_steps):
                    visited.append(self.obs[t])
                    obs, _, terminated, truncated, _ = self.envs[t].step(self._sample_action(policy, self.obs[t], t))
                    if terminated or truncated:
                        self.episode[t] += 1
                        self.obs[t] = self._reset(t)
                    else:
                        self.obs[t] = np.asarray(obs["obs"], dtype=np.float32)
                self._store(t, np.stack(visited))
        finally:
            self.student.train(was_training)
        return acted

    def sample(self) -> tuple[Tensor, Tensor]:
        """``(obs [K * batch_size, D], task [K * batch_size])``: ``batch_size`` stored states of every task."""
        b, k = self.cfg.batch_size, len(self.task_names)
        if (self.size == 0).any():
            raise RuntimeError("no states collected yet for some task: call collect() first")
        idx = (torch.rand(k, b, generator=self.generator) * torch.as_tensor(self.size).unsqueeze(1)).long()
        obs = self.states[torch.arange(k).unsqueeze(1), idx].reshape(k * b, -1)
        return obs, torch.arange(k).repeat_interleave(b)

    # ------------------------------------------------------------------ loss
    def kl_rows(self, obs: Tensor, task: Tensor) -> Tensor:
        """``[B]``: ``KL(teacher_task || student)`` of each state (gradients reach the student only)."""
        t_mean: Tensor | None = None
        t_log_std: Tensor | None = None
        with torch.no_grad():
            for t in range(len(self.task_names)):
                rows = (task == t).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                m, s = self.teachers[t](obs[rows], task[rows])
                if t_mean is None or t_log_std is None:
                    t_mean, t_log_std = m.new_zeros(obs.shape[0], m.shape[1]), m.new_zeros(obs.shape[0], m.shape[1])
                t_mean[rows], t_log_std[rows] = m, s
        if t_mean is None or t_log_std is None or not bool(((task >= 0) & (task < len(self.teachers))).all()):
            raise ValueError(f"task indices must be in [0, {len(self.teachers)}), got {task.unique().tolist()}")
        s_mean, s_log_std = self.student(obs, task)
        return policy_distillation_loss(t_mean, t_log_std, s_mean, s_log_std)

    def losses(self, obs: Tensor, task: Tensor) -> dict[str, Tensor]:
        """``{task: mean KL over its rows}`` for every task present."""
        rows = self.kl_rows(obs, task)
        return {name: rows[task == t].mean() for t, name in enumerate(self.task_names) if bool((task == t).any())}

    @torch.no_grad()
    def evaluate_kl(self, obs: Tensor, task: Tensor) -> dict[str, float]:
        """Per-task mean KL on given states (no update)."""
        return {k: float(v) for k, v in self.losses(obs, task).items()}

    def update(self) -> dict[str, float]:
        """One gradient step on a fresh batch; returns the per-task KL before the step."""
        obs, task = self.sample()
        losses = self.losses(obs, task)
        self.optimizer.zero_grad(set_to_none=True)
        self.gradient.backward(losses, self.shared, others=self.others)
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.updates += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    def fit(self, updates: int, log_every: int = 100) -> list[dict[str, Any]]:
        """``updates`` steps with a collection round every ``collect_every``; returns a record per
        ``log_every`` updates: ``{"update", "kl": {task: value}, "states": {task: n}}``."""
        if updates < 1:
            raise ValueError(f"updates must be >= 1, got {updates}")
        history: list[dict[str, Any]] = []
        for i in range(updates):
            if self.updates % self.cfg.collect_every == 0:
                self.collect()
            kl = self.update()
            if self.updates % log_every == 0 or i == updates - 1:
                history.append(
                    {"update": self.updates, "kl": kl, "states": dict(zip(self.task_names, self.size.tolist()))}
                )
        return history

    def close(self) -> None:
        for env in self.envs:
            env.close()


def teachers_in_family_order(teachers: Mapping[str, GaussianPolicy], family: TaskFamily) -> list[GaussianPolicy]:
    """``[teachers[name] for name in family.task_names]`` with a clear error for a missing teacher."""
    missing = [n for n in family.task_names if n not in teachers]
    if missing:
        raise ValueError(f"no teacher for tasks {missing}; teachers: {sorted(teachers)}")
    return [teachers[n] for n in family.task_names]
