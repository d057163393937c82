"""Training multi-task SAC agents on a task family, with exact resume: the library behind ``mtrl-train``
(:mod:`mtrl.cli.train`, Hydra over ``configs/mtrl.yaml``, which calls :func:`run`).

Examples::

    mtrl-train                                                     # CARE on the 4-goal point-mass (minutes)
    mtrl-train experiment=mtrl_pointmass_paper                     # the same at SAC-paper scale (an hour+)
    mtrl-train agent=mt_sac trainer.total_steps=20000 seed=1
    mtrl-train agent=mt_sac gradient=pcgrad                        # PCGrad on the per-task SAC losses
    mtrl-train weighting=famo schedule=bandit gradient=pcgrad      # FAMO on the critic losses, EXP3 over tasks
    mtrl-train experiment=mtrl_mt10_paper trainer.device=cuda      # CARE's MT10 set-up (needs the rl extra)
    mtrl-train hydra.run.dir=runs/a trainer.resume=true trainer.total_steps=200000   # continue a run

What one step is: every env of the pool (``K * envs_per_task`` single-task envs, env ``j`` running task
``j % K``; ``envs_per_task`` is the env config's unless ``trainer.envs_per_task`` sets it) takes one action; the
transitions go to their task's replay buffer (:mod:`mtrl.replay`); ``updates_per_step`` SAC updates
(:meth:`mtrl.agents.SAC.update`) each sample ``batch_size`` rows from every task. The first ``learning_starts``
steps act uniformly at random and do not update. With ``trainer.overlap_updates`` (the default for new runs) the
updates of a step run while its actions are being executed, on the replay as it was before the step's
transitions (on a run's first step, whose replay is empty, after them); without it, after them.

Where the envs step: the env config's ``vectorization``. ``sync``: in this process. ``async``: in
``trainer.env_workers`` worker processes (:class:`mtrl.envs.AsyncEnvRunner`; by default one per core less one for
the learner), which step while the learner updates: the actions are sent, the step's updates run, then the
observations are collected. Both run the same env code on the same inputs, so a run gives bit-identical weights
either way, and a run may be resumed with the other one. The workers ignore SIGINT and SIGTERM (the trainer
finishes its step with them, then closes them), are closed on exit, errors and interruption, and exit on their
own if the trainer dies.

Multi-task strategies (groups of the recommendation trainer too, built here for the task names):

* ``gradient``: one instance for the actor's per-task losses, one for the critic's.
* ``weighting``: one instance for the critic's per-task losses and, with ``weighted_losses=actor_and_critic``,
  one for the actor's (see :mod:`mtrl.agents.sac` for why the critic alone is the default). Every task
  contributes ``batch_size`` rows to an update, so the ``sizes`` of ``inverse_size`` (and of size-based
  schedules) are equal and those reduce to equal weights (uniform sampling).
* ``schedule``: one scheduler over the agent's updates (its clock is the update count): the tasks it selects
  are the only ones whose rows count in that update. It learns from the critic losses after each update and
  from the outcomes of the training episodes that finish (:meth:`TaskScheduler.observe_outcomes` with each
  task's success rate among the episodes that ended at a step). Evaluation results are not fed to it, so that
  evaluating or not never changes training.
* Epoch-based weightings (``dwa``) get the mean losses of every ``trainer.epoch_steps`` steps.

A config key none of this reads (a typo, a group of another command such as ``+model=mmoe``, a key a group's
schema does not have such as ``+env.num_task=3`` or ``+agent.hiden=[8]``) fails at start-up, before any env is
built (:func:`mtrl.config.check_config`): ``mtrl-train`` prints one line naming it and the valid keys and exits
with status 2, as it does for any configuration error (a ``ValueError``).

Written into the run directory: ``config.yaml`` (resolved), ``last.pt`` (every ``checkpoint_interval``
steps, at the end and on Ctrl-C; atomic, :mod:`mtl.checkpoint`), ``train_log.jsonl`` (training records
every ``log_interval`` steps, evaluation records every ``eval_interval``) and ``eval.json`` (the final
evaluation, :func:`mtrl.evaluate.evaluate`'s format). Ctrl-C or SIGTERM (a scheduler's or ``timeout``'s
stop) finishes the current step, writes ``last.pt`` and exits (status 130 / 143).

**Exact resume.** ``last.pt`` holds the agent (weights, target critics, temperatures, optimisers, the
weightings', gradient methods' and scheduler's state), every task's replay buffer with its sampler's generator, the
exploration generator, the global RNG states (Python, NumPy, torch, CUDA), and each env's position: its episode index
and the actions taken so far in the current episode (kept by :class:`EnvPool` in the trainer's process, whichever
the vectorization), and the update order (``overlap_updates``). Every episode of env ``j`` starts with
``reset(seed=<derived from (seed, j, episode)>)``, and the families' envs are deterministic given their
seed and actions, so a resumed run rebuilds each env's state by replaying the current episode's actions
(checked against the saved observation) and then continues to bit-identical weights. Evaluation runs on
its own envs and restores every RNG it might touch, so evaluating or not never changes training.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mtl.checkpoint import (
    atomic_torch_save,
    atomic_write_json,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from mtrl.agents import SAC, EnvSpec
from mtrl.config import (
    CONFIG_DIR,
    RLTrainerConfig,
    build_agent_from_config,
    build_strategies,
    check_config,
    resolve_device,
    sac_config,
    trainer_config,
)
from mtrl.envs import make_env_runner
from mtrl.evaluate import Evaluator, episode_seed
from mtrl.replay import TaskReplay
from mtrl.runs import CONFIG_FILE, EVAL_FILE, LAST, LOG_FILE, load_run

# The config schema and builders live in mtrl.config, the run-directory layout and loading in mtrl.runs; the names
# of theirs listed here stay importable from mtrl.train, where they were first.
__all__ = [
    "CONFIG_DIR",
    "EVAL_FILE",
    "LAST",
    "LOG_FILE",
    "EnvPool",
    "RLTrainer",
    "RLTrainerConfig",
    "build_agent_from_config",
    "build_strategies",
    "load_run",
    "monitored_metric",
    "pool_envs_per_task",
    "run",
    "sac_config",
    "trainer_config",
]

TRAIN_STREAM = 0  # episode-seed stream of training envs (evaluation uses mtrl.evaluate.EVAL_STREAM)
# What runs written before the weighting and schedule groups existed did (for their checkpoints' fingerprints).
_EARLIER_DEFAULTS: dict[str, Any] = {
    "weighting": {"_target_": "mtl.weighting.Equal", "_partial_": True},
    "schedule": {"_target_": "mtl.scheduling.AllTasks", "_partial_": True},
    "weighted_losses": "critic",
}
log = logging.getLogger("mtrl")


# ------------------------------------------------------------------------------------------- env pool


class EnvPool:
    """``K * envs_per_task`` single-task envs stepped in lockstep (env ``j`` runs task ``j % K``), in this process
    (``vectorization="sync"``) or in worker processes (``"async"``, :class:`mtrl.envs.AsyncEnvRunner`) that
    step while the learner updates (:meth:`step_async`, then :meth:`step_wait`).

    Each env is reset by hand when its episode ends, with ``reset(seed=episode_seed(seed, j, e))`` for its
    ``e``-th episode, and the actions of the current episode are kept here (the runner only steps), so
    :meth:`load_state_dict` can rebuild every env's state by replaying them (the families' envs are
    deterministic given seed and actions). Stepping single envs rather than a gymnasium vector env, which resets
    on its own, is what makes that per-env replay possible. Sync and async pools run the same env code on the
    same inputs and return bit-identical results; a state saved by one loads into the other.

    Args:
        family: the task family.
        envs_per_task: copies of each task.
        seed: the run's seed (episode seeds).
        vectorization: ``"sync"`` or ``"async"``; ``None`` takes ``family.vectorization``.
        workers: worker processes of an async pool (``None``: :func:`mtrl.envs.default_env_workers`).
    """

    def __init__(
        self,
        family: Any,
        envs_per_task: int,
        seed: int,
        *,
        vectorization: str | None = None,
        workers: int | None = None,
    ) -> None:
        self.family = family
        self.num_tasks = len(family.task_names)
        self.seed = int(seed)
        n = self.num_tasks * envs_per_task
        self.tasks = np.arange(n, dtype=np.int64) % self.num_tasks
        vectorization = getattr(family, "vectorization", "sync") if vectorization is None else vectorization
        self.runner = make_env_runner(family, self.tasks.tolist(), vectorization, num_workers=workers)
        self.vectorization = vectorization
        self.episode = np.zeros(n, dtype=np.int64)
        self.actions: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.obs: np.ndarray | None = None
        self.ep_return = np.zeros(n, dtype=np.float64)
        self.ep_success = np.zeros(n, dtype=bool)
        self._sent: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    def _seed(self, j: int) -> int:
        return episode_seed(TRAIN_STREAM, self.seed, j, int(self.episode[j]))

    def _start(self, js: list[int]) -> np.ndarray:
        """Reset envs ``js`` for their current episode; their observations."""
        obs = self.runner.reset([(j, self._seed(j)) for j in js])
        for j in js:
            self.actions[j] = []
            self.ep_return[j], self.ep_success[j] = 0.0, False
        return obs

    def reset(self) -> np.ndarray:
        """Start every env's current episode; returns ``obs [N, obs_dim]``."""
        self.obs = self._start(list(range(len(self))))
        return self.obs

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, float, bool]]]:
        """Step every env; returns ``(next_obs [N, D], reward [N], terminated [N], finished)``.

        ``next_obs`` is the observation the action led to (before any reset); ``finished`` lists
        ``(task, return, success)`` of the episodes that ended (success: ``info["success"]`` at any step).
        Ended envs are reset, and :attr:`obs` holds the observations the next step acts on.
        """
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: np.ndarray) -> None:
        """Start :meth:`step` (an async pool's workers step while the caller goes on); finish with :meth:`step_wait`."""
        assert self.obs is not None, "call reset() first"
        self._sent = np.array(actions, copy=True)
        self.runner.step_async(self._sent)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, float, bool]]]:
        """Finish the step :meth:`step_async` started; returns what :meth:`step` does."""
        assert self.obs is not None and self._sent is not None, "call step_async() first"
        next_obs, reward64, term, trunc, success = self.runner.step_wait()
        actions, self._sent = self._sent, None
        for j in range(len(self)):
            self.actions[j].append(actions[j])
        self.ep_return += reward64
        self.ep_success |= success
        finished: list[tuple[int, float, bool]] = []
        done = [j for j in range(len(self)) if term[j] or trunc[j]]
        for j in done:
            finished.append((int(self.tasks[j]), float(self.ep_return[j]), bool(self.ep_success[j])))
            self.episode[j] += 1
        current = next_obs.copy()
        if done:
            current[done] = self._start(done)
        self.obs = current
        return next_obs, reward64.astype(np.float32), term.astype(np.float32), finished

    def state_dict(self) -> dict[str, Any]:
        assert self.obs is not None
        return {
            "seed": self.seed,
            "episode": self.episode.copy(),
            "actions": [np.stack(a) if a else np.zeros((0,)) for a in self.actions],
            "obs": self.obs.copy(),
            "ep_return": self.ep_return.copy(),
            "ep_success": self.ep_success.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild every env's state: reset with its episode seed, replay the episode's actions (an async pool's
        workers side by side), and check the observation against the saved one.

        Raises:
            RuntimeError: an env does not reproduce its saved observation (it is not deterministic given
                seed and actions, so the run cannot resume exactly).
        """
        if len(state["episode"]) != len(self) or int(state["seed"]) != self.seed:
            raise ValueError(
                f"env pool state is for {len(state['episode'])} envs with seed {state['seed']}; this pool has "
                f"{len(self)} envs with seed {self.seed} (resume with the same env, envs_per_task and seed)"
            )
        self.episode = np.asarray(state["episode"], dtype=np.int64).copy()
        actions = [np.asarray(a) for a in state["actions"]]
        obs = self.runner.replay([(j, self._seed(j), actions[j]) for j in range(len(self))])
        for j in range(len(self)):
            self.actions[j] = [np.array(a, copy=True) for a in actions[j]]
            if not np.array_equal(obs[j], state["obs"][j]):
                raise RuntimeError(
                    f"env {j} (task {self.tasks[j]}) did not reproduce its saved observation after replaying "
                    f"{len(self.actions[j])} actions: the environment is not deterministic given its seed and "
                    "actions, so this run cannot resume exactly"
                )
        self.obs = obs.astype(np.asarray(state["obs"]).dtype)
        self.ep_return = np.asarray(state["ep_return"], dtype=np.float64).copy()
        self.ep_success = np.asarray(state["ep_success"], dtype=bool).copy()

    def close(self) -> None:
        """Close the envs (and an async pool's workers)."""
        self.runner.close()


# ---------------------------------------------------------------------------------------------- trainer


def _updates_due(step: int, learning_starts: int, ratio: float) -> int:
    """Updates after pool step ``step`` (1-based): ``floor(n r) - floor((n - 1) r)`` with ``n`` the steps
    since ``learning_starts``, a function of the step alone (so resume does not depend on history)."""
    n = step - learning_starts
    if n <= 0:
        return 0
    return math.floor(n * ratio) - math.floor((n - 1) * ratio)


class _StopSignals:
    """Defers SIGINT and SIGTERM until the current step is complete (main thread only).

    A signal sets :attr:`received`; the loop checks it between steps, writes ``last.pt`` of a consistent state
    (never one torn mid-update) and stops. A second SIGINT while waiting interrupts at once. SIGTERM is what a
    job scheduler or ``timeout`` sends before killing a command: the run then resumes from the signal's step.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Log:
    """``train_log.jsonl``: one JSON record per line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        """Drop records written after ``step`` (by an interrupted run past its last checkpoint)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)


class RLTrainer:
    """Collects experience with the agent in an :class:`EnvPool`, updates it from a :class:`TaskReplay`,
    evaluates, logs and checkpoints (see the module docstring).

    Args:
        family: the task family (:func:`mtrl.envs.make_family`).
        agent: the agent (on its device).
        config: the trainer settings.
        run_dir: where checkpoints and logs go.
        seed: the run's seed (exploration, replay sampling, env episode seeds).
        fingerprint: JSON-ready facts that must match on resume (agent, env, SAC and gradient config).
    """

    def __init__(
        self,
        family: Any,
        agent: SAC,
        config: RLTrainerConfig,
        run_dir: str | Path,
        *,
        seed: int = 0,
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        self.family, self.agent, self.cfg = family, agent, config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.seed = int(seed)
        self.fingerprint = fingerprint or {}
        self.device = agent.device
        self.task_names = tuple(family.task_names)
        spec = agent.spec
        self.replay = TaskReplay(
            spec.num_tasks, config.replay_capacity, spec.obs_dim, spec.action_dim, device=self.device, seed=self.seed
        )
        self.envs_per_task = pool_envs_per_task(config, family)
        self.overlap = True if config.overlap_updates is None else bool(config.overlap_updates)
        self.pool = EnvPool(family, self.envs_per_task, self.seed, workers=config.env_workers)
        self.explore_rng = np.random.default_rng(np.random.SeedSequence([1, self.seed]))
        self.evaluator = Evaluator(
            family,
            episodes=config.eval_episodes,
            seed=self.seed,
            envs_per_task=config.eval_envs_per_task,
        )
        self.log = _Log(self.run_dir / LOG_FILE)
        self.step = 0
        self.episodes = 0
        self.last_eval: dict[str, Any] | None = None
        self._window: list[tuple[int, float, bool]] = []  # episodes finished since the last training record
        self._last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "episodes": self.episodes,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "trainer": asdict(self.cfg),
            "agent": self.agent.training_state(),
            "replay": self.replay.state_dict(),
            "pool": self.pool.state_dict(),
            "explore_rng": self.explore_rng.bit_generator.state,
            "rng": rng_state(),
            "window": list(self._window),
            "last_eval": self.last_eval,
            "overlap_updates": self.overlap,
        }

    def save(self) -> None:
        """Write ``last.pt`` atomically."""
        atomic_torch_save(self.state_dict(), self.run_dir / LAST)

    def load(self) -> bool:
        """Restore ``last.pt``; False when there is none.

        Raises:
            ValueError: the checkpoint was written with another seed, agent, env, SAC or gradient config.
        """
        path = self.run_dir / LAST
        if not path.exists():
            return False
        state = load_checkpoint(path)
        if int(state["seed"]) != self.seed:
            raise ValueError(f"{path} was trained with seed {state['seed']}, this run has seed {self.seed}")
        saved, mine = _comparable({**_EARLIER_DEFAULTS, **state["fingerprint"]}), _comparable(self.fingerprint)
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            raise ValueError(
                f"{path} was written with a different {', '.join(diff)} config; resume with the run's own "
                f"config.yaml settings (only trainer.* may change) or start a new run directory"
            )
        overlap = bool(state.get("overlap_updates", False))  # absent: written before the setting existed
        if self.cfg.overlap_updates is not None and bool(self.cfg.overlap_updates) != overlap:
            raise ValueError(
                f"{path} was trained with trainer.overlap_updates={str(overlap).lower()}; resume with that value "
                "(or null, which keeps the checkpoint's) or start a new run directory"
            )
        self.overlap = overlap
        self.agent.load_training_state(state["agent"])
        self.replay.load_state_dict(state["replay"])
        self.pool.load_state_dict(state["pool"])
        self.explore_rng.bit_generator.state = state["explore_rng"]
        set_rng_state(state["rng"])
        self.step, self.episodes = int(state["step"]), int(state["episodes"])
        self._window = [tuple(w) for w in state["window"]]  # type: ignore[misc]
        self.last_eval = state["last_eval"]
        return True

    # ------------------------------------------------------------------ loop
    def _act(self, obs: np.ndarray) -> np.ndarray:
        if self.step < self.cfg.learning_starts:
            return self.explore_rng.uniform(-1.0, 1.0, size=(len(self.pool), self.agent.spec.action_dim)).astype(
                np.float32
            )
        obs_t = torch.as_tensor(obs, device=self.device)
        task_t = torch.as_tensor(self.pool.tasks, device=self.device)
        return self.agent.act(obs_t, task_t).cpu().numpy()

    def evaluate(self) -> dict[str, Any]:
        """Evaluate the deterministic policy (RNG states untouched) and log it."""
        state = rng_state()
        try:
            result = self.evaluator(self.agent)
        finally:
            set_rng_state(state)
        result["step"] = self.step
        self.last_eval = result
        record: dict[str, Any] = {"step": self.step, "eval/mean_success": result["mean_success"]}
        record["eval/mean_return"] = result["mean_return"]
        for name, r in result["tasks"].items():
            record[f"eval/{name}/success"] = r["success"]
            record[f"eval/{name}/return"] = r["return"]
        self.log.write(record)
        return result

    def _train_record(self, seconds: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.step,
            "transitions": self.step * len(self.pool),
            "updates": self.agent.num_updates,
            "episodes": self.episodes,
            "seconds": round(seconds, 3),
        }
        if self._window:
            record["train/return"] = float(np.mean([w[1] for w in self._window]))
            record["train/success"] = float(np.mean([w[2] for w in self._window]))
            for t, name in enumerate(self.task_names):
                mine = [w for w in self._window if w[0] == t]
                if mine:
                    record[f"train/{name}/success"] = float(np.mean([w[2] for w in mine]))
        record.update(self._last_stats)
        self._window = []
        return record

    def fit(self) -> dict[str, Any]:
        """Train up to ``total_steps`` (resuming when configured) and return the final evaluation."""
        cfg = self.cfg
        if cfg.resume and self.load():
            log.info("resumed from %s at step %d", self.run_dir / LAST, self.step)
            self.log.rewind(self.step)
        else:
            if cfg.resume:
                log.info("trainer.resume=true but there is no %s: starting at step 0", self.run_dir / LAST)
            self.log.rewind(-1)  # a fresh start: drop the log of any earlier run in this directory
            self.pool.reset()
        t0 = time.perf_counter()
        bar = tqdm(
            total=cfg.total_steps,
            initial=min(self.step, cfg.total_steps),
            desc=f"{self.agent.name}",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        with _StopSignals() as stop:
            while self.step < cfg.total_steps:
                self._train_step()
                bar.update(1)
                if self.step % cfg.log_interval == 0:
                    record = self._train_record(time.perf_counter() - t0)
                    self.log.write(record)
                    if "train/success" in record:
                        bar.set_postfix(success=f"{record['train/success']:.2f}")
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < cfg.total_steps:
                    result = self.evaluate()
                    bar.set_postfix(eval_success=f"{result['mean_success']:.2f}")
                if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0:
                    self.save()
                if stop.received is not None:
                    self.save()
                    bar.close()
                    name = signal.Signals(stop.received).name
                    log.warning("%s at step %d: wrote %s; resume with trainer.resume=true", name, self.step, LAST)
                    if stop.received == signal.SIGINT:
                        raise KeyboardInterrupt
                    raise SystemExit(128 + stop.received)
        bar.close()
        self.save()
        if self.last_eval is None or self.last_eval.get("step") != self.step:
            self.evaluate()
        assert self.last_eval is not None
        return self.last_eval

    def _train_step(self) -> None:
        """One pool step: act, step the envs, store the transitions, update (see :attr:`overlap`)."""
        cfg = self.cfg
        obs = self.pool.obs
        assert obs is not None
        actions = self._act(obs)
        step = self.step + 1
        n = _updates_due(step, cfg.learning_starts, cfg.updates_per_step)
        # Overlapped: the updates run while the envs step (in an async pool's workers), on the replay before this
        # step's transitions; not on a run's first step, whose replay is still empty.
        early = self.overlap and self.step > 0
        self.pool.step_async(actions)
        if early:
            self._update(n, step)
        next_obs, reward, terminated, finished = self.pool.step_wait()
        self.replay.add(self.pool.tasks, obs, actions, reward, next_obs, terminated)
        self.step = step
        self.episodes += len(finished)
        self._window.extend(finished)
        if finished:
            self.agent.observe_outcomes(self._success_rates(finished))
        if not early:
            self._update(n, step)
        if self.step % cfg.epoch_steps == 0:
            self.agent.end_epoch()

    def _update(self, n: int, step: int) -> None:
        """``n`` SAC updates of pool step ``step`` (the last one keeps its statistics on a logging step)."""
        for i in range(n):
            want_stats = i == n - 1 and step % self.cfg.log_interval == 0
            stats = self.agent.update(self.replay.sample(self.cfg.batch_size), stats=want_stats)
            if want_stats:
                self._last_stats = stats

    def _success_rates(self, finished: list[tuple[int, float, bool]]) -> dict[str, float]:
        """``{task: share of successes}`` among the episodes in ``finished`` (tasks without one are left out)."""
        done: dict[str, list[bool]] = {}
        for task, _, success in finished:
            done.setdefault(self.task_names[task], []).append(success)
        return {name: sum(s) / len(s) for name, s in done.items()}

    def close(self) -> None:
        self.pool.close()
        self.evaluator.close()


# ------------------------------------------------------------------------------------------------- runs


def pool_envs_per_task(config: RLTrainerConfig, family: Any) -> int:
    """Envs per task of the training pool: ``trainer.envs_per_task``, or the env config's when that is null."""
    if config.envs_per_task is not None:
        return int(config.envs_per_task)
    return int(getattr(family, "envs_per_task", 1))


def _comparable(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint without what may change on resume: the env's ``vectorization`` (sync and async pools give
    bit-identical runs) and its ``envs_per_task`` (compared as the pool's, the top-level ``envs_per_task``)."""
    out = dict(fingerprint)
    if isinstance(out.get("env"), dict):
        out["env"] = {k: v for k, v in out["env"].items() if k not in ("vectorization", "envs_per_task")}
    return out


def _fingerprint(cfg: DictConfig, tcfg: RLTrainerConfig, family: Any) -> dict[str, Any]:
    """The parts of the config a resumed run must share with the checkpoint (the pool's size as
    :func:`pool_envs_per_task` gives it)."""
    out: dict[str, Any] = {}
    for key in ("env", "agent", "sac", "gradient", "weighting", "schedule"):
        node = cfg.get(key)
        out[key] = OmegaConf.to_container(node, resolve=True) if node is not None else None
    out["weighted_losses"] = cfg.get("weighted_losses", "critic")
    out["envs_per_task"] = pool_envs_per_task(tcfg, family)
    out["replay_capacity"] = int(tcfg.replay_capacity)
    return out


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train as configured; writes ``config.yaml``, ``last.pt``, ``train_log.jsonl`` and ``eval.json`` into
    ``run_dir``.

    Returns the final evaluation: ``{"tasks": {task: {"success": s, "return": r}}, "mean_success": s,
    "mean_return": r, "episodes": n, "step": N, "family": describe(), "agent": name}`` (its
    :func:`monitored_metric` is what ``mtrl-train`` returns to a Hydra sweeper).

    Raises:
        ValueError: a configuration error (:func:`mtrl.config.check_config`: a key no part of the run reads, a
            mistyped key of a group, a value out of range), found before anything is built; or a resume whose
            checkpoint was written with another config.
    """
    check_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tcfg = trainer_config(cfg.trainer)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    seed = int(cfg.seed)
    seed_everything(seed)
    family = instantiate(cfg.env)
    spec = EnvSpec.from_family(family)
    seed_everything(seed)  # the agent's initialisation does not depend on what building the family drew
    agent = build_agent_from_config(cfg, spec, seed=seed).to(resolve_device(tcfg.device))
    OmegaConf.save(cfg, run_dir / CONFIG_FILE, resolve=True)
    trainer = RLTrainer(family, agent, tcfg, run_dir, seed=seed, fingerprint=_fingerprint(cfg, tcfg, family))
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    result = {**result, "agent": agent.name, "family": family.describe()}
    atomic_write_json(result, run_dir / EVAL_FILE)
    log.info("final mean success %.3f at step %d (%s)", result["mean_success"], result["step"], run_dir / EVAL_FILE)
    return result


def monitored_metric(result: dict[str, Any]) -> float:
    """What a run is judged by, and what ``mtrl-train`` returns to a Hydra sweeper (Optuna, Ax: maximise it): the
    final evaluation's mean success rate over tasks (:func:`run`'s result)."""
    return float(result["mean_success"])
