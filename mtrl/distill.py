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

* **The command** ``mtrl-distill`` (:mod:`mtrl.cli.distill`, ``configs/mtrl_distill.yaml``, :func:`distill_run`):
  a teachers manifest (:func:`read_teacher_manifest`: :func:`train_teachers`' ``teachers.json``, or a JSON/YAML file
  ``teachers: {task: run_dir}`` whose runs may be single-task runs or multi-task runs serving each task they
  trained), validated with errors naming the file, task and key (:func:`load_manifest_teachers`); the student is an
  :mod:`mtrl.agents` agent (``agent=``) whose actor :class:`PolicyDistiller` trains, checkpointed atomically and
  resumable bit-identically (:meth:`PolicyDistiller.state_dict`: every env replays its current episode's actions);
  the run ends with the student and every teacher evaluated on the same deterministic episodes
  (``distill_eval.json``, :func:`mtrl.evaluate.evaluate`'s format for each side).

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
import time
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
    "COMPARISON_FILE",
    "FORMAT",
    "MANIFEST",
    "DistillTrainerConfig",
    "FrozenTeacher",
    "PolicyDistillConfig",
    "PolicyDistiller",
    "SingleTaskFamily",
    "TeacherEntry",
    "TeacherManifestError",
    "check_distill_config",
    "check_manifest_env",
    "compare",
    "distill_run",
    "load_manifest_teachers",
    "load_teachers",
    "read_teacher_manifest",
    "single_task_family",
    "teacher_policy",
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


def train_teachers(
    cfg: DictConfig, out_dir: str | Path, tasks: Sequence[str] | None = None, program: str = "mtrl-teachers"
) -> dict[str, Any]:
    """One single-task SAC teacher per task (``mtrl.train.run`` on :class:`SingleTaskFamily`) and the manifest
    ``out_dir/teachers.json``; returns it. The library behind ``mtrl-teachers`` (:mod:`mtrl.cli.teachers`).

    ``cfg`` is an ``mtrl-train`` config (``configs/mtrl_teachers.yaml``, or ``configs/mtrl.yaml``): agent, SAC and
    trainer settings apply to every teacher; teacher ``name`` trains in ``out_dir/name/`` on the env node
    ``{_target_: mtrl.distill.single_task_family, family: <cfg.env>, task: name}``. The teachers are those of
    ``tasks``, else of ``cfg.tasks`` (the one key beyond ``mtrl-train``'s a config may hold; ``null`` or absent =
    every task of ``cfg.env``'s family), in that order. Every name and every key is checked before the first
    teacher trains (:func:`mtrl.config.check_config`, messages prefixed with ``program``).

    Re-running into the same ``out_dir`` continues where it stopped:

    * a **finished** teacher (``eval.json`` and ``last.pt`` present) whose ``config.yaml`` equals the requested one
      (runner settings such as ``trainer.progress``, ``trainer.device``, ``trainer.num_threads`` and
      ``env.vectorization`` aside) is reused without training;
    * an **interrupted** teacher (a ``last.pt`` but no ``eval.json``: Ctrl-C, SIGTERM or a kill after a checkpoint),
      or a finished one asked for other ``trainer.*`` settings (e.g. a larger ``trainer.total_steps``), continues from
      its ``last.pt`` with ``trainer.resume=true`` (exact resume, :mod:`mtrl.train`): the same weights as one
      uninterrupted run;
    * a teacher with no ``last.pt`` trains from step 0.

    A teacher folder holding a run with other env, agent, SAC or strategy settings is an error (delete it or train
    into another ``out_dir``), and so is a finished teacher that trained more steps than ``trainer.total_steps``.
    The manifest is rewritten after every teacher (a partial manifest is usable); entries of an earlier manifest
    in ``out_dir`` for tasks not trained now are kept when it records the same env and seed (so ``tasks=[a]`` then
    ``tasks=[b]`` into one folder lists both), and an earlier manifest of another env or seed is an error.
    Progress: one log line per teacher as it starts (``teacher i/n name: training | resuming | reusing``) and ends
    (success, return, seconds), and each run's own progress bar (``trainer.progress``).

    Raises:
        ValueError: a configuration error (an unknown key, a value out of range, an unknown or repeated task name),
            or a teacher folder or manifest in ``out_dir`` from other settings; each before any teacher trains.
    """
    from hydra.utils import instantiate

    from mtl.config import check_config_keys
    from mtrl.config import CONFIG_KEYS, check_config
    from mtrl.runs import CONFIG_FILE
    from mtrl.train import run as rl_run

    # Keys that say how a teacher's run is executed or shown, not what it trains (left out when a teacher's saved
    # config.yaml is compared with the requested one).
    runner_keys = frozenset({"resume", "progress", "num_threads", "env_workers", "device", "vectorization"})

    def config_diff(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
        """Dotted keys where two resolved configs differ (runner keys left out)."""
        if isinstance(saved, Mapping) and isinstance(wanted, Mapping):
            keys = sorted((set(saved) | set(wanted)) - runner_keys, key=str)
            return [d for k in keys for d in config_diff(saved.get(k), wanted.get(k), f"{prefix}{k}.")]
        return [] if saved == wanted else [prefix.rstrip(".")]

    check_config_keys(cfg, (*CONFIG_KEYS, "tasks"), program)
    base = copy.deepcopy(cfg)
    OmegaConf.set_struct(base, False)
    base.pop("tasks", None)
    check_config(base, program)
    if tasks is None and cfg.get("tasks") is not None:
        node = cfg.tasks
        tasks = [node] if isinstance(node, str) else list(node)
    family = instantiate(cfg.env)
    names = list(tasks) if tasks is not None else list(family.task_names)
    if not names:
        raise ValueError(f"config key tasks: empty; name some of {list(family.task_names)} or pass tasks=null for all")
    for name in names:
        if not isinstance(name, str):
            raise ValueError(
                f"config key tasks: expected task names, got {name!r}; tasks are {list(family.task_names)}"
            )
        try:
            family.task_index(name)
        except ValueError as err:
            raise ValueError(f"config key tasks: {err}") from None
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"config key tasks: {repeated[0]!r} is named twice; name each task once")
    out_dir = Path(out_dir)
    env_node = OmegaConf.to_container(cfg.env, resolve=True)
    manifest: dict[str, Any] = {"format": FORMAT, "seed": int(cfg.seed), "env": env_node, "teachers": {}}
    if (out_dir / MANIFEST).is_file():
        earlier = json.loads((out_dir / MANIFEST).read_text())
        diff = config_diff(earlier.get("env"), env_node, "env.")
        if earlier.get("format") != FORMAT or diff or earlier.get("seed") != manifest["seed"]:
            what = ", ".join(diff[:3]) if diff else f"seed {earlier.get('seed')!r}"
            raise ValueError(
                f"{out_dir / MANIFEST} lists teachers of other settings ({what}); train into a new folder "
                "(hydra.run.dir=...) or delete it"
            )
        manifest["teachers"] = {k: v for k, v in earlier["teachers"].items() if k not in names}
    subs: dict[str, DictConfig] = {}
    plans: dict[str, str] = {}
    for name in names:  # every folder checked before the first teacher trains
        sub = copy.deepcopy(base)
        sub.env = {"_target_": "mtrl.distill.single_task_family", "family": env_node, "task": name}
        run_dir = out_dir / name
        plan = "training"
        if (run_dir / LAST).exists() and (run_dir / CONFIG_FILE).exists():
            saved = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE), resolve=True)
            wanted = OmegaConf.to_container(sub, resolve=True)
            assert isinstance(saved, dict) and isinstance(wanted, dict)
            diff = config_diff(saved, wanted)
            other = [d for d in diff if not d.startswith("trainer.")]
            if other:
                raise ValueError(
                    f"{run_dir} holds a teacher trained with other settings ({', '.join(other[:3])}); train into a "
                    "new folder (hydra.run.dir=...) or delete it"
                )
            finished = (run_dir / EVAL_FILE).exists()
            if finished and not diff:
                plan = "reusing"
            else:
                plan = "resuming"
                sub.trainer.resume = True
            if finished:
                step = int(json.loads((run_dir / EVAL_FILE).read_text())["step"])
                if step > int(sub.trainer.total_steps):
                    raise ValueError(
                        f"{run_dir} holds a teacher trained for {step} steps, more than trainer.total_steps="
                        f"{sub.trainer.total_steps}; ask for at least {step} or train into a new folder"
                    )
        subs[name], plans[name] = sub, plan
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names, 1):
        run_dir = out_dir / name
        where = f"teacher {i}/{len(names)} {name}"
        t0 = time.perf_counter()
        if plans[name] == "reusing":
            log.info("%s: reusing the finished run %s", where, run_dir)
            result = json.loads((run_dir / EVAL_FILE).read_text())
        else:
            how = "training into" if plans[name] == "training" else "resuming from the last.pt of"
            log.info("%s: %s %s (to step %d)", where, how, run_dir, int(subs[name].trainer.total_steps))
            result = rl_run(subs[name], run_dir)
        task_result = result["tasks"][name]
        log.info("%s: success %.3f, return %.2f at step %d (%.1f s)", where, task_result["success"],
                 task_result["return"], int(result["step"]), time.perf_counter() - t0)  # fmt: skip
        manifest["teachers"][name] = {
            "task": name,
            "run_dir": name,
            "checkpoint": f"{name}/{LAST}",
            "config": f"{name}/{CONFIG_FILE}",
            "agent": result.get("agent"),
            "success": task_result["success"],
            "return": task_result["return"],
        }
        atomic_write_json(manifest, out_dir / MANIFEST)  # after every teacher: a partial manifest is usable
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
        self.actions: list[list[np.ndarray]] = [[] for _ in range(k)]  # of each env's current episode (resume)
        self.obs: list[np.ndarray] = [self._reset(t) for t in range(k)]
        self.updates = 0

    # ------------------------------------------------------------------ data
    def _reset(self, t: int) -> np.ndarray:
        obs, _ = self.envs[t].reset(seed=episode_seed(DISTILL_STREAM, self.seed, t, int(self.episode[t])))
        self.actions[t] = []
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
                    action = self._sample_action(policy, self.obs[t], t)
                    obs, _, terminated, truncated, _ = self.envs[t].step(action)
                    self.actions[t].append(np.array(action, copy=True))
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

    def step(self) -> dict[str, float]:
        """One iteration of :meth:`fit`: a collection round when the update count is a multiple of ``collect_every``
        (a function of the count alone, so a resumed run collects where an uninterrupted one does), then
        :meth:`update`; returns the per-task KL before the step."""
        if self.updates % self.cfg.collect_every == 0:
            self.collect()
        return self.update()

    def fit(self, updates: int, log_every: int = 100) -> list[dict[str, Any]]:
        """``updates`` steps with a collection round every ``collect_every``; returns a record per
        ``log_every`` updates: ``{"update", "kl": {task: value}, "states": {task: n}}``."""
        if updates < 1:
            raise ValueError(f"updates must be >= 1, got {updates}")
        history: list[dict[str, Any]] = []
        for i in range(updates):
            kl = self.step()
            if self.updates % log_every == 0 or i == updates - 1:
                history.append(
                    {"update": self.updates, "kl": kl, "states": dict(zip(self.task_names, self.size.tolist()))}
                )
        return history

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue bit-identically: the student's weights, the optimiser,
        the gradient method's state, the stored states (the filled part of each task's ring), the generators, and each
        env's position (episode index and the actions of its current episode)."""
        gradient_state = self.gradient.state_dict() if hasattr(self.gradient, "state_dict") else {}
        return {
            "updates": self.updates,
            "seed": self.seed,
            "task_names": list(self.task_names),
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "gradient": gradient_state,
            "states": [self.states[t, : int(self.size[t])].clone() for t in range(len(self.task_names))],
            "size": self.size.copy(),
            "pos": self.pos.copy(),
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
            "episode": self.episode.copy(),
            "actions": [np.stack(a) if a else np.zeros((0, self.family.action_dim), np.float32) for a in self.actions],
            "obs": np.stack(self.obs),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: every env is reset with its episode seed and replays its current episode's
        actions, and must reproduce the saved observation.

        Raises:
            ValueError: the state is of other tasks or another seed.
            RuntimeError: an env does not reproduce its saved observation (not deterministic given seed and
                actions, so the run cannot resume exactly).
        """
        if list(state["task_names"]) != list(self.task_names) or int(state["seed"]) != self.seed:
            raise ValueError(
                f"distiller state is for tasks {list(state['task_names'])} with seed {state['seed']}; this distiller "
                f"has tasks {list(self.task_names)} and seed {self.seed} (resume with the run's own config)"
            )
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if hasattr(self.gradient, "load_state_dict") and state.get("gradient"):
            self.gradient.load_state_dict(state["gradient"])
        self.states.zero_()
        for t, rows in enumerate(state["states"]):
            self.states[t, : len(rows)] = rows
        self.size = np.asarray(state["size"], dtype=np.int64).copy()
        self.pos = np.asarray(state["pos"], dtype=np.int64).copy()
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])
        self.episode = np.asarray(state["episode"], dtype=np.int64).copy()
        for t, env in enumerate(self.envs):
            obs = self._reset(t)
            for action in state["actions"][t]:
                o, *_ = env.step(action)
                obs = np.asarray(o["obs"], dtype=np.float32)
                self.actions[t].append(np.array(action, copy=True))
            if not np.array_equal(obs, state["obs"][t]):
                raise RuntimeError(
                    f"the env of task {self.task_names[t]!r} did not reproduce its saved observation after replaying "
                    f"{len(self.actions[t])} actions: it is not deterministic given its seed and actions, so this "
                    "distillation cannot resume exactly"
                )
            self.obs[t] = obs
        self.updates = int(state["updates"])

    def close(self) -> None:
        for env in self.envs:
            env.close()


def teachers_in_family_order(teachers: Mapping[str, GaussianPolicy], family: TaskFamily) -> list[GaussianPolicy]:
    """``[teachers[name] for name in family.task_names]`` with a clear error for a missing teacher."""
    missing = [n for n in family.task_names if n not in teachers]
    if missing:
        raise ValueError(f"no teacher for tasks {missing}; teachers: {sorted(teachers)}")
    return [teachers[n] for n in family.task_names]


# ------------------------------------------------------------------------------------------ teacher manifests

#: The keys an entry of a teachers manifest may hold (those :func:`train_teachers` writes; ``run_dir`` is required).
TEACHER_KEYS = ("run_dir", "task", "checkpoint", "config", "agent", "success", "return")
#: The top-level keys of a teachers manifest (``teachers`` is required).
MANIFEST_KEYS = ("format", "seed", "env", "teachers")


class TeacherManifestError(ValueError):
    """A teachers manifest is missing, unreadable or wrong; the message names the file, the task and the key."""


@dataclass(frozen=True)
class TeacherEntry:
    """One task's teacher in a manifest: the ``mtrl-train`` run directory (absolute) and the name of the task in that
    run's family (the same name unless the entry says ``task: <name in the run>``)."""

    task: str
    run_dir: Path
    task_in_run: str


def read_teacher_manifest(path: str | Path) -> tuple[Path, dict[str, TeacherEntry]]:
    """Read and validate a teachers manifest: the file, or a folder holding ``teachers.json``.

    The manifest is JSON or YAML: :func:`train_teachers`' ``teachers.json`` (format :data:`FORMAT`), or a file a user
    writes naming each task's teacher run::

        teachers:
          goal-0deg: runs/teacher-0                  # an mtrl-train run trained on that task alone
          goal-90deg: {run_dir: runs/mt, task: goal-90deg}   # or a task of a multi-task run

    Relative run directories are relative to the manifest's folder. Only the layout is checked here (the runs
    themselves by :func:`load_manifest_teachers`).

    Returns:
        ``(manifest file, {task: TeacherEntry})``.

    Raises:
        TeacherManifestError: (a ``ValueError``) no manifest there, not JSON/YAML, not a mapping with a ``teachers``
            mapping, another ``format``, an unknown key, or an entry without a ``run_dir``; naming the key.
    """
    import yaml

    file = Path(path)
    file = file / MANIFEST if file.is_dir() else file
    if not file.is_file():
        raise TeacherManifestError(
            f"teachers={path}: no teachers manifest there; pass a JSON/YAML file naming each task's mtrl-train run "
            "(teachers: {task: run_dir}) or the teachers.json of mtrl.distill.train_teachers"
        )
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TeacherManifestError(f"{file}: cannot read it as JSON or YAML ({first})") from None
    if not isinstance(data, dict) or not isinstance(data.get("teachers"), dict) or not data["teachers"]:
        raise TeacherManifestError(
            f"{file}: expected a mapping with a non-empty 'teachers' mapping of task -> run directory, got "
            f"{type(data.get('teachers') if isinstance(data, dict) else data).__name__}"
        )
    unknown = sorted(str(k) for k in data if k not in MANIFEST_KEYS)
    if unknown:
        raise TeacherManifestError(f"{file}: unknown key {unknown[0]!r} (a manifest holds {', '.join(MANIFEST_KEYS)})")
    if "format" in data and data["format"] != FORMAT:
        raise TeacherManifestError(f"{file}: format {data['format']!r} is not an RL teachers manifest ({FORMAT!r})")
    entries: dict[str, TeacherEntry] = {}
    for task, entry in data["teachers"].items():
        where = f"{file}: teachers.{task}"
        if isinstance(entry, str):
            entry = {"run_dir": entry}
        if not isinstance(entry, dict):
            raise TeacherManifestError(f"{where}: expected a run directory or a mapping with run_dir, got {entry!r}")
        bad = sorted(str(k) for k in entry if k not in TEACHER_KEYS)
        if bad:
            raise TeacherManifestError(f"{where}: unknown key {bad[0]!r} (an entry holds {', '.join(TEACHER_KEYS)})")
        run_dir = entry.get("run_dir")
        if not isinstance(run_dir, str) or not run_dir:
            raise TeacherManifestError(f"{where}.run_dir: missing; name the mtrl-train run directory of the teacher")
        task_in_run = entry.get("task", task)
        if not isinstance(task_in_run, str):
            raise TeacherManifestError(f"{where}.task: expected a task name, got {task_in_run!r}")
        resolved = Path(run_dir) if Path(run_dir).is_absolute() else file.parent / run_dir
        entries[str(task)] = TeacherEntry(str(task), resolved, task_in_run)
    return file, entries


#: Env settings that say how envs are stepped, not what the tasks are (ignored when teachers' and student's envs
#: are compared).
_RUNNER_KEYS = frozenset({"vectorization", "envs_per_task"})


def _env_diff(a: Any, b: Any, prefix: str = "env") -> list[str]:
    """Dotted keys where two resolved env nodes differ (runner settings left out)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = sorted((set(a) | set(b)) - _RUNNER_KEYS)
        return [d for k in keys for d in _env_diff(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [f"{prefix} ({a!r} vs the student's {b!r})"]


def check_manifest_env(path: str | Path, env: Mapping[str, Any]) -> None:
    """When the manifest records the env its teachers trained on (``env``, as :func:`train_teachers` writes it), it
    must be the student's ``env`` node (resolved; runner settings aside): else the teachers acted in other tasks.

    Raises:
        TeacherManifestError: naming the first differing keys.
    """
    import yaml

    file, _ = read_teacher_manifest(path)
    recorded = yaml.safe_load(file.read_text()).get("env")
    if recorded is None:
        return
    diff = _env_diff(recorded, dict(env))
    if diff:
        raise TeacherManifestError(
            f"{file}: the teachers were trained on another env than the student's ({'; '.join(diff[:3])}); give the "
            "student the teachers' env settings (the manifest's 'env'), or train teachers on the student's env"
        )


def load_manifest_teachers(
    path: str | Path, family: TaskFamily, device: str = "cpu"
) -> tuple[dict[str, FrozenTeacher], dict[str, TeacherEntry]]:
    """The frozen teacher of every task of ``family`` (the student's), from a manifest (:func:`read_teacher_manifest`).

    A single-task teacher (an ``mtrl-train`` run on :class:`SingleTaskFamily`, or any run whose family holds the
    task) is queried at the task's index in its own run; a multi-task run serves every task it names.

    Raises:
        TeacherManifestError: a task of ``family`` has no teacher; a teacher's run directory is not an ``mtrl-train``
            run with a checkpoint; its family has no task of that name; or its observation / action sizes differ from
            the student's family.
    """
    from mtrl.runs import NotARunError

    file, entries = read_teacher_manifest(path)
    missing = [n for n in family.task_names if n not in entries]
    if missing:
        raise TeacherManifestError(
            f"{file}: no teacher for tasks {missing} of the student's env (teachers: {sorted(entries)}); add them to "
            "the manifest or pick a student env with only those tasks"
        )
    runs: dict[Path, Any] = {}
    out: dict[str, FrozenTeacher] = {}
    for name in family.task_names:
        entry = entries[name]
        key = entry.run_dir.resolve()
        if key not in runs:
            try:
                runs[key] = load_run(entry.run_dir, device=device)
            except NotARunError as err:
                raise TeacherManifestError(f"{file}: teachers.{name}.run_dir: {err}") from None
        run = runs[key]
        names = list(run.family.task_names)
        if entry.task_in_run not in names:
            raise TeacherManifestError(
                f"{file}: teachers.{name}: the run {entry.run_dir} trained tasks {names}, not {entry.task_in_run!r}; "
                f"set teachers.{name}.task to the name that run gives the task"
            )
        dims = (run.family.obs_dim, run.family.action_dim)
        if dims != (family.obs_dim, family.action_dim):
            raise TeacherManifestError(
                f"{file}: teachers.{name}: the run {entry.run_dir} has observation / action sizes {dims}, the "
                f"student's env {(family.obs_dim, family.action_dim)}; a teacher must act in the student's env"
            )
        out[name] = FrozenTeacher(run.agent.actor, names.index(entry.task_in_run))
    return out, entries


# -------------------------------------------------------------------------------------------- mtrl-distill

PROGRAM = "mtrl-distill"
#: The top-level keys of ``configs/mtrl_distill.yaml``; any other key is an error.
DISTILL_CONFIG_KEYS = ("seed", "teachers", "env", "agent", "gradient", "sac", "distill", "trainer")
COMPARISON_FILE = "distill_eval.json"
COMPARISON_FORMAT = "mtlib-rl-distill-eval/1"


@dataclass
class DistillTrainerConfig:
    """The ``trainer`` section of ``configs/mtrl_distill.yaml`` (the student's distillation run)."""

    updates: int = 2000
    """Student updates in total, across resumes (each: ``distill.batch_size`` states of every task)."""
    log_interval: int = 100
    """Write a record of the per-task KL every N updates."""
    eval_interval: int = 0
    """Evaluate the student every N updates (0 = only at the end)."""
    eval_episodes: int = 10
    """Deterministic episodes per task of each evaluation (student and teachers alike)."""
    checkpoint_interval: int = 500
    """Write ``last.pt`` every N updates (0 = only at the end and on Ctrl-C)."""
    resume: bool = False
    """Continue from ``last.pt`` in the run directory (a fresh start when there is none)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    num_threads: int | None = 1
    """torch intra-op threads (``null`` = torch's default)."""

    def __post_init__(self) -> None:
        for key in ("updates", "log_interval", "eval_episodes"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key trainer.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_interval", "checkpoint_interval"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key trainer.{key} must be >= 0, got {getattr(self, key)}")


def check_distill_config(cfg: DictConfig) -> tuple[DistillTrainerConfig, PolicyDistillConfig]:
    """Every start-up check of an ``mtrl-distill`` config, before any env or teacher is loaded: top-level keys
    (:data:`DISTILL_CONFIG_KEYS`), the ``env``, ``agent``, ``gradient`` and ``sac`` nodes as ``mtrl-train`` checks them
    (:func:`mtrl.config.check_config`), ``distill`` against :class:`PolicyDistillConfig`, ``trainer`` against
    :class:`DistillTrainerConfig`, and that ``teachers`` is given. (The distiller, its rollouts and its state buffers
    run on the CPU, as :class:`PolicyDistiller` does; small policies distil fastest there.)

    Raises:
        ValueError: naming the first wrong key and what is accepted.
    """
    from mtl.config import check_config_keys
    from mtrl.config import _structured, check_config

    check_config_keys(cfg, DISTILL_CONFIG_KEYS, PROGRAM)
    view = OmegaConf.create({k: cfg._get_node(k) for k in ("seed", "env", "agent", "gradient", "sac") if k in cfg})
    check_config(view, PROGRAM)
    if "teachers" not in cfg or OmegaConf.is_missing(cfg, "teachers") or not cfg.teachers:
        raise ValueError(
            "config key teachers: missing; pass the teachers manifest, e.g. mtrl-distill teachers=runs/t/teachers.json"
        )
    return (
        _structured(DistillTrainerConfig, cfg.get("trainer"), "trainer", name_section=True),
        _structured(PolicyDistillConfig, cfg.get("distill"), "distill", name_section=True),
    )


def teacher_policy(teachers: Sequence[GaussianPolicy]) -> Any:
    """``(obs [N, D], task [N]) -> actions [N, A]``: each row acted on by its task's teacher, deterministically
    (``tanh(mean)``, as :func:`mtrl.evaluate.evaluate` acts with an agent)."""

    @torch.no_grad()
    def act(obs: np.ndarray, task: np.ndarray) -> np.ndarray:
        o, t = torch.as_tensor(obs), torch.as_tensor(task)
        out = np.zeros((len(obs), 0), dtype=np.float32)
        for k in np.unique(task):
            rows = (t == int(k)).nonzero().flatten()
            mean, _ = teachers[int(k)](o[rows], t[rows])
            if out.shape[1] == 0:
                out = np.zeros((len(obs), mean.shape[1]), dtype=np.float32)
            out[rows.numpy()] = torch.tanh(mean).cpu().numpy()
        return out

    return act


def compare(student: dict[str, Any], teachers: dict[str, Any]) -> dict[str, Any]:
    """``{task: {"teacher": {success, return}, "student": {success, return}, "success_gap", "return_gap"}}`` of two
    :func:`mtrl.evaluate.evaluate` results (gaps: student minus teacher)."""
    out: dict[str, Any] = {}
    for name, s in student["tasks"].items():
        t = teachers["tasks"][name]
        out[name] = {
            "teacher": dict(t),
            "student": dict(s),
            "success_gap": s["success"] - t["success"],
            "return_gap": s["return"] - t["return"],
        }
    return out


def _fingerprint(cfg: DictConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("env", "agent", "gradient", "sac", "distill"):
        node = cfg.get(key)
        out[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    out["teachers"] = str(cfg.teachers)
    return out


def distill_run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """``mtrl-distill``: distil the manifest's teachers into one multi-task student agent (``cfg.agent``) on
    ``cfg.env``'s family, evaluate it against each teacher on each task, and write the run directory.

    Written into ``run_dir``: ``config.yaml`` (resolved); ``last.pt`` (atomic, every ``trainer.checkpoint_interval``
    updates, at the end and on Ctrl-C; ``trainer.resume=true`` continues bit-identically: the distiller's full state,
    :meth:`PolicyDistiller.state_dict`); ``train_log.jsonl`` (per-task KL every ``trainer.log_interval`` updates,
    student evaluations every ``trainer.eval_interval``); ``eval.json`` (the student's final evaluation in
    :func:`mtrl.evaluate.evaluate`'s format); ``distill_eval.json`` (student and teachers on the same episodes:
    ``{"format", "update", "episodes", "seed", "student": <evaluate result>, "teachers": <evaluate result>,
    "tasks": {task: {"teacher", "student", "success_gap", "return_gap"}}, "mean_success": {"teacher", "student"},
    "mean_return": {...}, "kl": {task: KL on held-out states}, "teachers_manifest", "teacher_runs"}``).
    Teachers are evaluated on the student's episodes (episode seeds from each task's index in the student's
    family), so their numbers can differ from their own runs' ``eval.json``, which used their runs' task indices.
    The directory is also an ``mtrl-train``-style run (``config.yaml`` with ``env`` and ``agent``, ``last.pt`` with
    the agent's weights), so ``mtrl-eval run_dir=...`` and ``mtrl-export`` take the student as they take any agent.

    Returns:
        the content of ``distill_eval.json``.

    Raises:
        ValueError: a configuration error (:func:`check_distill_config`), a bad manifest or teacher
            (:class:`TeacherManifestError`), or a resume whose checkpoint was written with another config.
    """
    from hydra.utils import instantiate
    from tqdm.auto import tqdm

    from mtl.checkpoint import atomic_torch_save, load_checkpoint, seed_everything
    from mtl.config import build_partial
    from mtrl.agents import EnvSpec
    from mtrl.config import build_agent_from_config
    from mtrl.evaluate import evaluate
    from mtrl.runs import CONFIG_FILE, LOG_FILE

    tcfg, dcfg = check_distill_config(cfg)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.seed)
    seed_everything(seed)
    check_manifest_env(cfg.teachers, OmegaConf.to_container(cfg.env, resolve=True))  # type: ignore[arg-type]
    family = instantiate(cfg.env)
    teachers, entries = load_manifest_teachers(cfg.teachers, family)  # on the CPU, where the distiller runs
    teacher_list = [teachers[n] for n in family.task_names]
    seed_everything(seed)
    agent = build_agent_from_config(cfg, EnvSpec.from_family(family), seed=seed, gradients=False)
    gradient = build_partial("gradient", cfg.gradient, seed=seed) if cfg.get("gradient") is not None else None
    OmegaConf.save(cfg, run_dir / CONFIG_FILE, resolve=True)
    distiller = PolicyDistiller(family, agent.actor, teacher_list, dcfg, gradient=gradient, seed=seed)
    fingerprint = _fingerprint(cfg)
    log_path = run_dir / LOG_FILE

    def save() -> None:
        state = {
            "step": distiller.updates,
            "seed": seed,
            "fingerprint": fingerprint,
            "agent": {"name": agent.name, "modules": agent.state_dict()},
            "distiller": distiller.state_dict(),
        }
        atomic_torch_save(state, run_dir / LAST)

    def write(record: dict[str, Any]) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def rewind(update: int) -> None:
        if log_path.exists():
            keep = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["update"] <= update]
            log_path.write_text("".join(ln + "\n" for ln in keep))

    resumed = False
    if tcfg.resume and (run_dir / LAST).exists():
        state = load_checkpoint(run_dir / LAST)
        if int(state["seed"]) != seed or state["fingerprint"] != fingerprint:
            diff = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
            raise ValueError(
                f"{run_dir / LAST} was written with a different {', '.join(diff) or 'seed'} config; resume with the "
                "run's own config.yaml settings (only trainer.* may change) or start a new run directory"
            )
        distiller.load_state_dict(state["distiller"])
        resumed = True
        rewind(distiller.updates)
        log.info("resumed from %s at update %d", run_dir / LAST, distiller.updates)
    else:
        rewind(-1)

    def evaluate_student() -> dict[str, Any]:
        result = evaluate(agent, family, episodes=tcfg.eval_episodes, seed=seed)
        return {**result, "step": distiller.updates, "agent": agent.name, "family": family.describe()}

    t0 = time.perf_counter()
    bar = tqdm(total=tcfg.updates, initial=min(distiller.updates, tcfg.updates), desc=f"distil {agent.name}",
               disable=not tcfg.progress, dynamic_ncols=True)  # fmt: skip
    try:
        while distiller.updates < tcfg.updates:
            kl = distiller.step()
            bar.update(1)
            u = distiller.updates
            if u % tcfg.log_interval == 0:
                mean_kl = float(np.mean(list(kl.values())))
                write({"update": u, "kl": kl, "kl/mean": mean_kl, "seconds": round(time.perf_counter() - t0, 3),
                       "states": dict(zip(distiller.task_names, distiller.size.tolist()))})  # fmt: skip
                bar.set_postfix(kl=f"{mean_kl:.3g}")
            if tcfg.eval_interval and u % tcfg.eval_interval == 0 and u < tcfg.updates:
                r = evaluate_student()
                write({"update": u, "eval/mean_success": r["mean_success"], "eval/mean_return": r["mean_return"],
                       **{f"eval/{n}/success": v["success"] for n, v in r["tasks"].items()}})  # fmt: skip
            if tcfg.checkpoint_interval and u % tcfg.checkpoint_interval == 0:
                save()
    except KeyboardInterrupt:
        save()
        bar.close()
        log.warning("interrupted at update %d: wrote %s; resume with trainer.resume=true", distiller.updates, LAST)
        distiller.close()
        raise
    bar.close()
    save()
    held_out = distiller.sample()  # states of every task's buffer (its own generator: after the last checkpoint)
    kl_held = distiller.evaluate_kl(*held_out)
    distiller.close()
    student = evaluate_student()
    atomic_write_json(student, run_dir / EVAL_FILE)
    teacher_result = evaluate(teacher_policy(teacher_list), family, episodes=tcfg.eval_episodes, seed=seed)
    result = {
        "format": COMPARISON_FORMAT,
        "update": distiller.updates,
        "resumed": resumed,
        "episodes": tcfg.eval_episodes,
        "seed": seed,
        "agent": agent.name,
        "student": student,
        "teachers": teacher_result,
        "tasks": compare(student, teacher_result),
        "mean_success": {"teacher": teacher_result["mean_success"], "student": student["mean_success"]},
        "mean_return": {"teacher": teacher_result["mean_return"], "student": student["mean_return"]},
        "kl": kl_held,
        "teachers_manifest": str(Path(str(cfg.teachers)).resolve()),
        "teacher_runs": {
            n: {"run_dir": str(e.run_dir), "task": e.task_in_run} for n, e in entries.items() if n in family.task_names
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(result, run_dir / COMPARISON_FILE)
    return result
