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

Env runners (what ``mtrl-train``'s pool, :class:`mtrl.train.EnvPool`, steps its envs with): a family's envs
reset with an explicit seed each, stepped in lockstep, and rebuilt by replaying a list of actions, either in
this process (:class:`SyncEnvRunner`, ``vectorization: sync``) or in worker processes (:class:`AsyncEnvRunner`,
``vectorization: async``) that step while the caller does other work (``step_async`` ... ``step_wait``). Both
run the same :class:`EnvGroup` code, and observations and rewards cross the pipe as exact float32/float64
arrays, so the two give bit-identical results. Unlike gymnasium's vector envs they never reset on their own:
the caller decides each episode's seed, which is what per-env exact replay needs (:mod:`mtrl.train`).
"""

from __future__ import annotations

import abc
import multiprocessing as mp
import multiprocessing.util
import os
import signal
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
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


# ------------------------------------------------------------------------------------------------- env runners

StepResult = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""One lockstep step of ``n`` envs: ``(obs float32 [n, obs_dim], reward float64 [n], terminated bool [n],
truncated bool [n], success bool [n])``; ``obs`` is what the action led to (nothing is reset)."""


class EnvGroup:
    """Envs of a family made and stepped in this process; env ``i`` runs task ``tasks[i]``.

    The unit both runners are made of: the whole pool of a :class:`SyncEnvRunner`, one worker's share of an
    :class:`AsyncEnvRunner`. Indices are local (``0 .. len(tasks) - 1``).
    """

    def __init__(self, family: TaskFamily, tasks: Sequence[int]) -> None:
        self.tasks = [int(t) for t in tasks]
        self.envs: list[gym.Env] = []
        for t in self.tasks:
            self.envs.append(family.make_env(t))

    def _reset_one(self, i: int, seed: int) -> np.ndarray:
        obs, _ = self.envs[i].reset(seed=int(seed))
        if int(obs["task"]) != self.tasks[i]:
            raise ValueError(f"an env made for task {self.tasks[i]} observes task {obs['task']}")
        return np.asarray(obs["obs"], dtype=np.float32)

    def reset(self, items: Sequence[tuple[int, int]]) -> np.ndarray:
        """Reset env ``i`` with ``reset(seed=s)`` for each ``(i, s)``; returns their observations ``[len, D]``."""
        return np.stack([self._reset_one(i, s) for i, s in items]) if items else np.zeros((0, 0), np.float32)

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every env with its row of ``actions`` (see :data:`StepResult`)."""
        n = len(self.envs)
        if len(actions) != n:
            raise ValueError(f"expected {n} actions (one per env), got {len(actions)}")
        obs: list[np.ndarray] = []
        reward = np.empty(n, dtype=np.float64)
        terminated, truncated, success = (np.zeros(n, dtype=bool) for _ in range(3))
        for i, env in enumerate(self.envs):
            o, r, term, trunc, info = env.step(actions[i])
            obs.append(np.asarray(o["obs"], dtype=np.float32))
            reward[i], terminated[i], truncated[i] = float(r), bool(term), bool(trunc)
            success[i] = bool(info.get("success", False))
        return np.stack(obs), reward, terminated, truncated, success

    def replay(self, items: Sequence[tuple[int, int, np.ndarray]]) -> np.ndarray:
        """For each ``(i, seed, actions)``: reset env ``i`` with ``seed``, take ``actions [m, A]`` (``m`` may be
        0) and return the last observation; ``[len, D]``."""
        out = []
        for i, seed, actions in items:
            obs = self._reset_one(i, seed)
            for action in actions:
                obs = np.asarray(self.envs[i].step(action)[0]["obs"], dtype=np.float32)
            out.append(obs)
        return np.stack(out) if out else np.zeros((0, 0), np.float32)

    def close(self) -> None:
        for env in self.envs:
            env.close()


class SyncEnvRunner:
    """All envs in this process (``vectorization: sync``): :meth:`step_async` steps them at once, so
    :meth:`step_wait` only hands the result back."""

    vectorization = "sync"

    def __init__(self, family: TaskFamily, tasks: Sequence[int]) -> None:
        self.num_envs = len(tasks)
        self.num_workers = 0
        self._group = EnvGroup(family, tasks)
        self._pending: StepResult | None = None

    def reset(self, items: Sequence[tuple[int, int]]) -> np.ndarray:
        """``reset(seed=s)`` env ``j`` for each ``(j, s)`` (global indices); their observations ``[len, D]``."""
        return self._group.reset(items)

    def step_async(self, actions: np.ndarray) -> None:
        if self._pending is not None:
            raise RuntimeError("step_async() called twice without step_wait()")
        self._pending = self._group.step(actions)

    def step_wait(self) -> StepResult:
        if self._pending is None:
            raise RuntimeError("step_wait() without step_async()")
        result, self._pending = self._pending, None
        return result

    def replay(self, items: Sequence[tuple[int, int, np.ndarray]]) -> np.ndarray:
        """:meth:`EnvGroup.replay` over global indices."""
        return self._group.replay(items)

    def close(self) -> None:
        self._group.close()


def default_env_workers(num_envs: int) -> int:
    """Worker processes of an async runner when none is configured: one per core this process may use, less
    one for the learner, at least one and at most one per env."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, min(num_envs, cores - 1))


def _worker_main(conn: Any, family: TaskFamily, tasks: list[int], parent_pid: int) -> None:
    """An :class:`AsyncEnvRunner` worker: builds an :class:`EnvGroup` and serves ``(method, argument)`` requests
    until ``("close", None)``, its pipe closing or its parent dying (polled every second).

    SIGINT and SIGTERM are ignored: Ctrl-C and ``timeout`` signal the whole process group, and the trainer
    answers them by finishing the current step (which needs its workers) and then closing them itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    group: EnvGroup | None = None
    try:
        group = EnvGroup(family, tasks)
        conn.send(("ok", None))
        while True:
            while not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
            method, arg = conn.recv()
            if method == "close":
                return
            try:
                conn.send(("ok", getattr(group, method)(arg)))
            except Exception as exc:  # noqa: BLE001 - any env error goes back to the caller, which raises it
                _send_error(conn, exc)
    except (EOFError, OSError, KeyboardInterrupt):
        return
    except Exception as exc:  # noqa: BLE001 - building the envs failed
        _send_error(conn, exc)
    finally:
        if group is not None:
            group.close()


def _send_error(conn: Any, exc: BaseException) -> None:
    text = traceback.format_exc()
    try:
        conn.send(("error", exc, text))
    except Exception:  # noqa: BLE001 - the exception does not pickle
        conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), text))


def _shutdown(procs: list[Any], conns: list[Any], timeout: float = 5.0) -> None:
    """Ask every worker to close, wait up to ``timeout`` seconds in all, then SIGKILL what is left (the workers
    ignore SIGTERM, see :func:`_worker_main`)."""
    for conn in conns:
        try:
            conn.send(("close", None))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for conn in conns:
        conn.close()
    procs.clear()
    conns.clear()


class AsyncEnvRunner:
    """The envs in ``num_workers`` worker processes (``vectorization: async``), each holding a contiguous slice
    of them; :meth:`step_async` sends the actions and returns at once, :meth:`step_wait` collects the result.

    Workers are started with ``context`` (``"spawn"`` by default: fresh interpreters that inherit no threads, locks
    or pipes of the trainer; they import the main module, as spawn does, and the family's). They are shut down by
    :meth:`close`, by garbage collection and at interpreter exit (``multiprocessing.util.Finalize``), and they
    exit on their own when this process dies. With ``"spawn"``, a script that builds a runner needs the
    ``if __name__ == "__main__":`` guard (the workers import the main module). An error in a worker is raised
    here with the worker's traceback as a note; a worker that dies raises :class:`RuntimeError`.

    Args:
        family: the task family (pickled to the workers).
        tasks: env ``j`` runs task ``tasks[j]``.
        num_workers: worker processes (``None``: :func:`default_env_workers`); at most one per env.
        context: multiprocessing start method.
    """

    vectorization = "async"

    def __init__(
        self, family: TaskFamily, tasks: Sequence[int], num_workers: int | None = None, context: str = "spawn"
    ) -> None:
        n = len(tasks)
        workers = default_env_workers(n) if num_workers is None else int(num_workers)
        if workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        workers = min(workers, n)
        self.num_envs, self.num_workers = n, workers
        bounds = np.linspace(0, n, workers + 1).round().astype(int)
        self._slices = [(int(bounds[k]), int(bounds[k + 1])) for k in range(workers)]
        self._owner = np.repeat(np.arange(workers), np.diff(bounds))
        ctx = mp.get_context(context)
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        # multiprocessing's own finaliser: it runs when this object is collected and, at interpreter exit, before
        # multiprocessing terminates and joins daemonic children (which would wait forever on workers that ignore
        # SIGTERM); weakref.finalize's exit hook may run after that one.
        self._finalizer = mp.util.Finalize(self, _shutdown, args=(self._procs, self._conns), exitpriority=10)
        self._pending = False
        try:
            for k, (lo, hi) in enumerate(self._slices):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    args=(child, family, [int(t) for t in tasks[lo:hi]], os.getpid()),
                    name=f"mtrl-env-worker-{k}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            self._recv_all(range(workers))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (empty once closed)."""
        return [int(p.pid) for p in self._procs]

    def _recv(self, k: int) -> Any:
        """Worker ``k``'s answer; raises its error (with the worker's traceback as a note) or its death."""
        conn, proc = self._conns[k], self._procs[k]
        while not conn.poll(0.5):
            if not proc.is_alive():
                raise RuntimeError(f"env worker {k} (pid {proc.pid}) exited with code {proc.exitcode}")
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            proc.join(1.0)
            raise RuntimeError(f"env worker {k} (pid {proc.pid}) exited with code {proc.exitcode}") from None
        if msg[0] == "error":
            exc = msg[1]
            exc.add_note(f"in env worker {k} (pid {proc.pid}):\n{msg[2]}")
            raise exc
        return msg[1]

    def _recv_all(self, ks: Sequence[int]) -> dict[int, Any]:
        """The answers of workers ``ks``, every one read (so none is left in a pipe) before the first error of
        them is raised."""
        out: dict[int, Any] = {}
        error: BaseException | None = None
        for k in ks:
            try:
                out[k] = self._recv(k)
            except Exception as exc:  # noqa: BLE001 - raised below, once every answer is in
                error = error or exc
        if error is not None:
            raise error
        return out

    def _call(self, method: str, per_worker: list[list[Any]]) -> list[Any]:
        ks = [k for k in range(self.num_workers) if per_worker[k]]
        for k in ks:
            self._conns[k].send((method, per_worker[k]))
        out = self._recv_all(ks)
        return [out.get(k) for k in range(self.num_workers)]

    def _scatter(self, items: Sequence[tuple[Any, ...]]) -> tuple[list[list[Any]], list[list[int]]]:
        per_worker: list[list[Any]] = [[] for _ in range(self.num_workers)]
        where: list[list[int]] = [[] for _ in range(self.num_workers)]
        for pos, (j, *rest) in enumerate(items):
            k = int(self._owner[j])
            per_worker[k].append((int(j) - self._slices[k][0], *rest))
            where[k].append(pos)
        return per_worker, where

    def _gather(self, method: str, items: Sequence[tuple[Any, ...]]) -> np.ndarray:
        if self._pending:
            raise RuntimeError(f"{method}() while a step is pending: call step_wait() first")
        if not items:
            return np.zeros((0, 0), np.float32)
        per_worker, where = self._scatter(items)
        results = self._call(method, per_worker)
        rows: list[np.ndarray] = [np.empty(0)] * len(items)
        for k, res in enumerate(results):
            for pos, row in zip(where[k], res if res is not None else []):
                rows[pos] = row
        return np.stack(rows)

    def reset(self, items: Sequence[tuple[int, int]]) -> np.ndarray:
        """``reset(seed=s)`` env ``j`` for each ``(j, s)`` (global indices); their observations ``[len, D]``."""
        return self._gather("reset", items)

    def replay(self, items: Sequence[tuple[int, int, np.ndarray]]) -> np.ndarray:
        """:meth:`EnvGroup.replay` over global indices, the workers replaying side by side."""
        return self._gather("replay", items)

    def step_async(self, actions: np.ndarray) -> None:
        """Send every worker its envs' actions and return at once."""
        if self._pending:
            raise RuntimeError("step_async() called twice without step_wait()")
        if len(actions) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions (one per env), got {len(actions)}")
        for k, (lo, hi) in enumerate(self._slices):
            self._conns[k].send(("step", np.ascontiguousarray(actions[lo:hi])))
        self._pending = True

    def step_wait(self) -> StepResult:
        """The result of the pending :meth:`step_async` (see :data:`StepResult`)."""
        if not self._pending:
            raise RuntimeError("step_wait() without step_async()")
        self._pending = False
        out = self._recv_all(range(self.num_workers))
        parts = [out[k] for k in range(self.num_workers)]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(5))  # type: ignore[return-value]

    def close(self) -> None:
        """Shut the workers down (idempotent)."""
        self._pending = False
        if self._finalizer.still_active():
            self._finalizer()


def make_env_runner(
    family: TaskFamily, tasks: Sequence[int], vectorization: str, *, num_workers: int | None = None
) -> SyncEnvRunner | AsyncEnvRunner:
    """A :class:`SyncEnvRunner` or an :class:`AsyncEnvRunner` (``num_workers`` processes) for ``tasks``.

    Raises:
        ValueError: unknown vectorization.
    """
    if vectorization not in VECTORIZATIONS:
        raise ValueError(f"vectorization must be one of {VECTORIZATIONS}, got {vectorization!r}")
    if vectorization == "sync":
        return SyncEnvRunner(family, tasks)
    return AsyncEnvRunner(family, tasks, num_workers)
