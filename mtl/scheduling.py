"""Task scheduling: which tasks' losses count at each training step, and per-task data streams.

One interface, :class:`TaskScheduler`, with eight methods (registry :data:`SCHEDULERS`):

- ``all``: every task every step.
- ``round_robin``: task ``step mod k``.
- ``random``: ``tasks_per_step`` tasks drawn uniformly without replacement.
- ``temperature``: one task, ``p_t ∝ n_t^(1/T)`` (T=1 size-proportional, T→∞ uniform).
- ``annealed``: one task, ``p_t ∝ n_t^alpha(step)``, alpha linear from 1 to 0.2 (Stickland & Murray, ICML 2019).
- ``bandit``: one task, EXP3 (Auer et al., 2002) rewarded by learning progress, the rewards rescaled to ``[-1, 1]``
  by quantiles of their history (Graves et al., ICML 2017).
- ``active``: one task, ``p_t ∝ exp(gap_t / tau)`` over the gap to a target loss (Sharma et al., 2017).
- ``progress``: ``tasks_per_step`` tasks by recent learning progress (|fast - slow EMA| of the success rate;
  Kanitscheider et al., 2021; Matiisen et al., 2017) or by how far each task is from solved, from episode outcomes.

Randomness is counter-based: the draw at ``step`` comes from a Philox generator keyed by ``seed`` with ``step``
in its counter. ``select(step)`` is therefore a function of ``(seed, step, observations so far)`` only: calling it
twice at one step gives the same tasks, skipping steps changes nothing else, and a resumed run needs no generator
state beyond the seed. Adaptive methods learn from feedback, and their state travels in
:meth:`TaskScheduler.state_dict`: ``bandit`` and ``active`` from training losses (:meth:`TaskScheduler.observe`, which
the recommendation trainer calls after every step), ``progress`` from episode outcomes
(:meth:`TaskScheduler.observe_outcomes`, which an RL trainer calls at episode ends or evaluations).

Two data regimes:

1. Every batch carries every label: the trainer counts the losses of ``scheduler.select(step)`` only.
2. One dataset per task (e.g. AliExpress countries): :class:`TaskStreams` draws from each task's data without
   ever stalling (a finished pass starts the next), and :class:`ScheduledStreams` pairs it with a scheduler::

       streams = TaskStreams({t: (lambda p, t=t: data[t].batches(256, shuffle=True, epoch=p)) for t in data})
       loader = ScheduledStreams(Temperature(list(data), sizes={t: len(d) for t, d in data.items()}), streams)
       for step in range(total_steps):
           batches = loader.next(step)  # {task: batch} for the tasks selected at this step

Imports numpy only; nothing here knows about recommendation or RL.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

T = TypeVar("T")
_END: Any = object()  # sentinel of an exhausted iterator

__all__ = [
    "SCHEDULERS",
    "ActiveSampling",
    "AllTasks",
    "Annealed",
    "Exp3Bandit",
    "LearningProgress",
    "RandomTasks",
    "RoundRobin",
    "ScheduledStreams",
    "TaskScheduler",
    "TaskStreams",
    "Temperature",
    "build_scheduler",
    "quantile_rescale",
]


def _index(step: int) -> int:
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int, got {type(step).__name__}") from None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


def _positive(name: str, value: float, *, allow_inf: bool = False) -> float:
    value = float(value)
    if not value > 0 or (math.isinf(value) and not allow_inf) or math.isnan(value):
        raise ValueError(f"{name} must be a positive{'' if allow_inf else ' finite'} number, got {value}")
    return value


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


class TaskScheduler:
    """Chooses which tasks count at each training step.

    Args:
        tasks: task names; selections are returned in this order.
        sizes: examples (or batches) per task; needed by size-based methods, ignored by the others. Keys
            beyond ``tasks`` are ignored.
        seed: non-negative seed of the method's random draws.
        total_steps: length of the run; needed by annealed methods, ignored by the others.

    Subclasses set :attr:`name`, implement :meth:`_probs` and, where they do not draw one task from it,
    :meth:`_select`; adaptive ones override :meth:`observe`, :meth:`_method_state` and :meth:`_load_method_state`.

    Example::

        >>> s = RoundRobin(["ctr", "cvr", "dwell"])
        >>> [s.select(step) for step in range(4)]
        [['ctr'], ['cvr'], ['dwell'], ['ctr']]
        >>> s.probabilities(1)
        {'ctr': 0.0, 'cvr': 1.0, 'dwell': 0.0}
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
        total_steps: int | None = None,
    ) -> None:
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r}; wrap it in a list")
        names = [str(t) for t in tasks]
        if not names:
            raise ValueError("tasks must name at least one task, got an empty sequence")
        dupes = sorted({t for t in names if names.count(t) > 1})
        if dupes:
            raise ValueError(f"task names must be unique, got duplicates {dupes} in {names}")
        self.tasks: list[str] = names
        self.sizes: dict[str, int] | None = None if sizes is None else {str(k): int(v) for k, v in sizes.items()}
        self.total_steps = None if total_steps is None else int(total_steps)
        self._set_seed(seed)
        self._last: tuple[int, list[int]] | None = None

    def _set_seed(self, seed: int) -> None:
        seed = operator.index(seed)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = seed
        self._key = np.random.SeedSequence(seed).generate_state(2, np.uint64)

    def _require_sizes(self) -> np.ndarray:
        if self.sizes is None:
            raise ValueError(f"scheduler {self.name!r} needs sizes={{task: number of examples}} for tasks {self.tasks}")
        missing = [t for t in self.tasks if t not in self.sizes]
        if missing:
            raise ValueError(f"scheduler {self.name!r}: sizes has no entry for tasks {missing}; got {self.sizes}")
        bad = {t: self.sizes[t] for t in self.tasks if self.sizes[t] <= 0}
        if bad:
            raise ValueError(f"scheduler {self.name!r}: sizes must be > 0, got {bad}; drop tasks without data")
        return np.array([self.sizes[t] for t in self.tasks], dtype=np.float64)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _rng(self, step: int, stream: int = 0) -> np.random.Generator:
        """The generator of ``step``'s draws: Philox keyed by the seed, ``step`` in the counter.

        ``stream`` (the counter's last word) keeps other draws of a method (e.g. the bandit's reservoir) apart
        from the task draws: a generator advances only the counter's first word, so streams never meet.
        """
        return np.random.Generator(np.random.Philox(key=self._key, counter=[0, 0, _index(step), stream]))

    def _probs(self, step: int) -> np.ndarray:
        raise NotImplementedError

    def _select(self, step: int) -> list[int]:
        """Default: one task drawn from :meth:`_probs` by inverting its CDF."""
        cdf = np.cumsum(self._probs(step))
        u = self._rng(step).random() * cdf[-1]
        return [min(int(np.searchsorted(cdf, u, side="right")), self.num_tasks - 1)]

    def probabilities(self, step: int) -> dict[str, float]:
        """The distribution the tasks of ``step`` are drawn from (degenerate for deterministic schedules)."""
        p = self._probs(_index(step))
        return dict(zip(self.tasks, (p / p.sum()).tolist()))

    def select(self, step: int) -> list[str]:
        """The tasks whose losses count at ``step``: non-empty, in the order of ``tasks``.

        Repeated calls at one step return the same tasks, even after :meth:`observe` of that step.
        """
        step = _index(step)
        if self._last is None or self._last[0] != step:
            self._last = (step, sorted(self._select(step)))
        return [self.tasks[i] for i in self._last[1]]

    def observe(self, step: int, losses: Mapping[str, float]) -> None:
        """Feedback after ``step``: that step's (unweighted) losses of some or all tasks. No-op by default."""

    def observe_outcomes(self, step: int, outcomes: Mapping[str, float]) -> None:
        """Episode feedback at ``step``: ``{task: recent success rate in [0, 1]}`` (or a return normalised to
        ``[0, 1]``) for some or all tasks, e.g. from an RL trainer at episode ends or evaluations. No-op by default;
        :class:`LearningProgress` samples from it."""

    def _check_losses(self, losses: Mapping[str, float]) -> dict[str, float]:
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise ValueError(f"scheduler {self.name!r}: losses for unknown tasks {unknown}; tasks are {self.tasks}")
        out = {t: float(v) for t, v in losses.items()}
        bad = {t: v for t, v in out.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"scheduler {self.name!r}: non-finite losses {bad}; observe only finite losses")
        return out

    def _method_state(self) -> dict[str, Any]:
        return {}

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Seed, last selection and method state (plain Python values), enough to resume exactly."""
        return {
            "method": self.name,
            "tasks": list(self.tasks),
            "seed": self.seed,
            "last": None if self._last is None else [self._last[0], list(self._last[1])],
            **self._method_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"state is of scheduler {state.get('method')!r}, this scheduler is {self.name!r}")
        if list(state["tasks"]) != self.tasks:
            raise ValueError(f"state is for tasks {list(state['tasks'])}, this scheduler has tasks {self.tasks}")
        self._set_seed(state["seed"])
        last = state["last"]
        self._last = None if last is None else (int(last[0]), [int(i) for i in last[1]])
        self._load_method_state(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={self.tasks}, seed={self.seed})"


class AllTasks(TaskScheduler):
    """Every task every step (plain multi-task training). :meth:`probabilities` is uniform."""

    name = "all"

    def _probs(self, step: int) -> np.ndarray:
        return np.full(self.num_tasks, 1.0 / self.num_tasks)

    def _select(self, step: int) -> list[int]:
        return list(range(self.num_tasks))


class RoundRobin(TaskScheduler):
    """Task ``step mod k``: each task in turn. :meth:`probabilities` is one-hot on that task."""

    name = "round_robin"

    def _probs(self, step: int) -> np.ndarray:
        p = np.zeros(self.num_tasks)
        p[step % self.num_tasks] = 1.0
        return p

    def _select(self, step: int) -> list[int]:
        return [step % self.num_tasks]


class RandomTasks(TaskScheduler):
    """``tasks_per_step`` tasks per step, uniformly at random without replacement.

    Args:
        tasks_per_step: how many tasks count at each step, 1 to ``len(tasks)``.
    """

    name = "random"

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        tasks_per_step: int = 1,
    ) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed, total_steps=total_steps)
        if not 1 <= tasks_per_step <= self.num_tasks:
            raise ValueError(
                f"tasks_per_step must be in [1, {self.num_tasks}] (the number of tasks), got {tasks_per_step}"
            )
        self.tasks_per_step = int(tasks_per_step)

    def _probs(self, step: int) -> np.ndarray:
        return np.full(self.num_tasks, 1.0 / self.num_tasks)

    def _select(self, step: int) -> list[int]:
        return self._rng(step).choice(self.num_tasks, size=self.tasks_per_step, replace=False).tolist()


class Temperature(TaskScheduler):
    """Temperature sampling: one task per step with ``p_t ∝ n_t^(1/T)``, ``n_t`` the task's size.

    ``T = 1`` samples in proportion to size, ``T = inf`` uniformly; in between it up-samples small tasks
    (as in multilingual translation and T5 mixing, e.g. Arivazhagan et al., 2019).

    Args:
        temperature: ``T > 0`` (``float("inf")`` allowed).
    """

    name = "temperature"

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        temperature: float = 2.0,
    ) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed, total_steps=total_steps)
        self.temperature = _positive("temperature", temperature, allow_inf=True)
        self._log_sizes = np.log(self._require_sizes())

    def _probs(self, step: int) -> np.ndarray:
        return _softmax(self._log_sizes / self.temperature)


class Annealed(TaskScheduler):
    """Annealed sampling (Stickland & Murray, "BERT and PALs", ICML 2019): ``p_t ∝ n_t^alpha``.

    ``alpha`` goes linearly from ``alpha_start`` (1: size-proportional) at step 0 to ``alpha_end`` (the paper's
    0.2; 0 would be uniform) at step ``total_steps - 1`` and stays there::

        alpha(step) = alpha_start + (alpha_end - alpha_start) * min(step / (total_steps - 1), 1)

    The paper anneals per epoch, ``alpha = 1 - 0.8 (e - 1) / (E - 1)``; this is the same schedule per step.

    Args:
        alpha_start: exponent at step 0.
        alpha_end: exponent from step ``total_steps - 1`` on.
    """

    name = "annealed"

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        alpha_start: float = 1.0,
        alpha_end: float = 0.2,
    ) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed, total_steps=total_steps)
        if self.total_steps is None or self.total_steps < 1:
            raise ValueError(f"scheduler 'annealed' needs total_steps >= 1 (the run's length), got {total_steps}")
        for key, value in (("alpha_start", alpha_start), ("alpha_end", alpha_end)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value}")
        self.alpha_start = float(alpha_start)
        self.alpha_end = float(alpha_end)
        self._log_sizes = np.log(self._require_sizes())

    def alpha(self, step: int) -> float:
        """The exponent at ``step``."""
        assert self.total_steps is not None
        frac = min(_index(step) / max(self.total_steps - 1, 1), 1.0)
        return self.alpha_start + (self.alpha_end - self.alpha_start) * frac

    def _probs(self, step: int) -> np.ndarray:
        return _softmax(self.alpha(step) * self._log_sizes)


def quantile_rescale(value: float, history: Sequence[float], q_lo: float = 0.2, q_hi: float = 0.8) -> float:
    """Graves et al.'s (ICML 2017) adaptive reward scaling: ``value`` mapped to ``[-1, 1]`` by the
    ``q_lo`` and ``q_hi`` quantiles of ``history`` (the earlier, unscaled rewards)::

        lo, hi = quantile(history, q_lo), quantile(history, q_hi)
        r = -1                              if value < lo
        r = +1                              if value > hi
        r = 2 (value - lo) / (hi - lo) - 1  otherwise

    Quantiles interpolate linearly between order statistics (``numpy.quantile``'s default): for a sorted history
    ``x_0 <= ... <= x_{n-1}`` the ``q`` quantile is ``x_j + f (x_{j+1} - x_j)`` with ``j + f = q (n - 1)``. Two
    cases the formula leaves open: an empty history gives 0 (nothing to compare with), and ``lo == hi`` gives -1,
    0 or +1 by the sign of ``value - lo``.

    Example::

        >>> history = [3.0, 0.0, 5.0, 1.0, 4.0, 2.0]  # 20th percentile 1.0, 80th 4.0
        >>> [quantile_rescale(v, history) for v in (0.5, 1.0, 2.5, 4.0, 9.0)]
        [-1.0, -1.0, 0.0, 1.0, 1.0]
    """
    if len(history) == 0:
        return 0.0
    lo, hi = (float(q) for q in np.quantile(np.asarray(history, dtype=np.float64), [q_lo, q_hi]))
    if value < lo:
        return -1.0
    if value > hi:
        return 1.0
    if hi == lo:
        return 0.0
    return min(max(2.0 * (value - lo) / (hi - lo) - 1.0, -1.0), 1.0)


class Exp3Bandit(TaskScheduler):
    """EXP3 (Auer et al., 2002) over tasks, rewarded by learning progress as in Graves et al., "Automated
    Curriculum Learning for Neural Networks" (ICML 2017).

    One task per step, drawn from ``p = (1 - gamma) softmax(w) + gamma / k``. After the step, :meth:`observe`
    needs the chosen task's loss ``L_now``; with ``L_prev`` its loss when it was last chosen, the learning progress
    is ``v = (L_prev - L_now) / |L_prev|`` (the sign of the change when ``L_prev = 0``). A task's first observation
    only records ``L_prev``; other tasks' losses in the same call are ignored. With ``loss_smoothing = d > 0``,
    ``L`` is instead an exponential moving average of the task's observed losses, ``L <- d L + (1 - d) loss``
    (initialised to its first loss): a batch's loss is noisy (relative noise of 10-30% per batch is common, against
    progress of about 1e-3 per step) and the average keeps the progress signal while shrinking the noise in ``v``
    by about ``1 - d``. The reward ``r`` is:

    - ``reward_scaling="quantile"`` (default; Graves et al.'s reward scaling): ``v`` rescaled to ``[-1, 1]`` by the
      ``q_lo`` and ``q_hi`` quantiles (the paper's 20th and 80th percentiles) of the unscaled progress values seen
      before it (:func:`quantile_rescale`). The history is a reservoir sample (Vitter's algorithm R) of at most
      ``history_size`` values over all tasks; which slot the ``n``-th value replaces is drawn from the seed and
      ``n`` (counter-based, like the task draws), and the reservoir travels in :meth:`state_dict`, so a resumed
      run rescales exactly as an uninterrupted one. Relative progress per step is about ``1e-3``; unscaled it
      moves every weight by about the same amount and the distribution stays near uniform, rescaled the task
      whose loss falls fastest gets rewards near +1 and the others near -1.
    - ``reward_scaling="fixed"`` (this class before the rescaling): ``(clip(v, -1, 1) + 1) / 2`` in ``[0, 1]``.

    The importance-weighted update is ``w_chosen += eta * r / p_chosen``.

    Which algorithm: with ``alpha = 0`` (default) this is Exp3 itself, Auer et al.'s exploration mixture
    ``gamma / k`` included, with the step size ``eta`` freed from ``gamma`` (``eta=None`` is Auer et al.'s
    ``gamma / k``; Graves et al. call the same mixture ``epsilon``). With ``alpha > 0`` it is the Exp3.S update of
    Graves et al. with their ``beta = 0`` (no reward bonus ``beta / p``): after every update the weight shares are
    mixed, ``s <- (1 - alpha) s + alpha / k``, so that the bandit can follow progress that changes during training.
    Graves et al. write the mixing as ``(1 - a) s_i + a / (k - 1) sum_{j != i} s_j``, which is this one with
    ``alpha = a k / (k - 1)``. Not taken from the paper: its step size and exploration rate (tuned for its long
    runs; the defaults here move the distribution within a few hundred steps), and its other progress signals
    (prediction gain on the same batch before and after the update, complexity gains), which need the trainer's
    help.

    Args:
        gamma: exploration, in ``(0, 1]``; every task keeps probability at least ``gamma / k``.
        eta: step size of the log-weights; ``None`` is EXP3's ``gamma / k``.
        alpha: Exp3.S weight sharing in ``[0, 1)``.
        reward_scaling: ``"quantile"`` (Graves et al.) or ``"fixed"`` (see above).
        q_lo: lower quantile of the reward history, in ``[0, q_hi)``; progress below it is rewarded -1.
        q_hi: upper quantile, in ``(q_lo, 1]``; progress above it is rewarded +1.
        history_size: most unscaled rewards kept in the reservoir, ``>= 1``.
        loss_smoothing: decay ``d`` in ``[0, 1)`` of the per-task loss average progress is measured on; 0 (default,
            as Graves et al. and this class before) uses each observed loss as it is.
    """

    name = "bandit"
    REWARD_SCALINGS: ClassVar[tuple[str, ...]] = ("quantile", "fixed")

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        gamma: float = 0.1,
        eta: float | None = None,
        alpha: float = 0.0,
        reward_scaling: str = "quantile",
        q_lo: float = 0.2,
        q_hi: float = 0.8,
        history_size: int = 1000,
        loss_smoothing: float = 0.0,
    ) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed, total_steps=total_steps)
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma (exploration) must be in (0, 1], got {gamma}")
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha (Exp3.S weight sharing) must be in [0, 1), got {alpha}")
        if reward_scaling not in self.REWARD_SCALINGS:
            raise ValueError(f"reward_scaling must be one of {list(self.REWARD_SCALINGS)}, got {reward_scaling!r}")
        if not 0 <= q_lo < q_hi <= 1:
            raise ValueError(f"quantiles must satisfy 0 <= q_lo < q_hi <= 1, got q_lo={q_lo}, q_hi={q_hi}")
        if operator.index(history_size) < 1:
            raise ValueError(f"history_size (reservoir of past rewards) must be >= 1, got {history_size}")
        if not 0 <= loss_smoothing < 1:
            raise ValueError(f"loss_smoothing (decay of the loss average) must be in [0, 1), got {loss_smoothing}")
        self.gamma = float(gamma)
        self.eta = self.gamma / self.num_tasks if eta is None else _positive("eta", eta)
        self.alpha = float(alpha)
        self.reward_scaling = str(reward_scaling)
        self.q_lo, self.q_hi = float(q_lo), float(q_hi)
        self.history_size = operator.index(history_size)
        self.loss_smoothing = float(loss_smoothing)
        self.log_weights = np.zeros(self.num_tasks)
        self.last_loss: list[float | None] = [None] * self.num_tasks  # (smoothed) loss when last chosen
        self.history: list[float] = []  # reservoir of unscaled rewards (quantile scaling)
        self.rewards_seen = 0  # unscaled rewards offered to the reservoir so far
        self.last_reward: tuple[float, float] | None = None  # (unscaled, scaled) reward of the latest update
        self._pending: tuple[int, int, float] | None = None  # (step, chosen task, its probability)

    def _probs(self, step: int) -> np.ndarray:
        return (1.0 - self.gamma) * _softmax(self.log_weights) + self.gamma / self.num_tasks

    def _select(self, step: int) -> list[int]:
        (i,) = super()._select(step)
        self._pending = (step, i, float(self._probs(step)[i]))
        return [i]

    @staticmethod
    def progress(prev_loss: float, loss: float) -> float:
        """Relative learning progress ``(prev - now) / |prev|``; the sign of the change when ``prev == 0``."""
        if prev_loss == 0:  # no relative change defined: only the sign of the change counts
            return 0.0 if loss == 0 else math.copysign(1.0, -loss)
        return (prev_loss - loss) / abs(prev_loss)

    @staticmethod
    def reward(prev_loss: float, loss: float) -> float:
        """The ``"fixed"`` reward: learning progress clipped to ``[-1, 1]`` and mapped to ``[0, 1]``."""
        return (min(max(Exp3Bandit.progress(prev_loss, loss), -1.0), 1.0) + 1.0) / 2.0

    def scaled_reward(self, progress: float) -> float:
        """``progress`` rescaled by the quantiles of the current reward history (:func:`quantile_rescale`);
        reads the history only."""
        return quantile_rescale(progress, self.history, self.q_lo, self.q_hi)

    def _remember(self, progress: float) -> None:
        """Offer an unscaled reward to the reservoir (algorithm R): kept while there is room, afterwards the
        ``n``-th value (0-based) replaces a uniformly drawn slot with probability ``history_size / (n + 1)``."""
        n = self.rewards_seen
        if n < self.history_size:
            self.history.append(progress)
        else:
            j = int(self._rng(n, stream=1).integers(0, n + 1))
            if j < self.history_size:
                self.history[j] = progress
        self.rewards_seen = n + 1

    def observe(self, step: int, losses: Mapping[str, float]) -> None:
        step = _index(step)
        values = self._check_losses(losses)
        if self._pending is None or self._pending[0] != step:
            raise ValueError(
                f"scheduler 'bandit': observe(step={step}) without select(step={step}) first; "
                "call select at a step before reporting its losses"
            )
        _, i, p = self._pending
        task = self.tasks[i]
        if task not in values:
            raise ValueError(
                f"scheduler 'bandit': step {step} chose task {task!r} but losses has only "
                f"{sorted(values)}; pass at least the chosen task's loss"
            )
        self._pending = None
        prev = self.last_loss[i]
        d = self.loss_smoothing
        loss = values[task] if prev is None or d == 0 else d * prev + (1.0 - d) * values[task]
        self.last_loss[i] = loss
        if prev is None:
            return
        v = self.progress(prev, loss)
        if self.reward_scaling == "quantile":
            r = self.scaled_reward(v)  # against the rewards before this one (the paper's R_t = {r_1..r_{t-1}})
            self._remember(v)
        else:
            r = self.reward(prev, loss)
        self.last_reward = (v, r)
        self.log_weights[i] += self.eta * r / p
        if self.alpha > 0:
            w = _softmax(self.log_weights)
            self.log_weights = np.log((1.0 - self.alpha) * w + self.alpha / self.num_tasks)
        self.log_weights -= self.log_weights.max()  # softmax-invariant; keeps the numbers small

    def _method_state(self) -> dict[str, Any]:
        return {
            "log_weights": self.log_weights.tolist(),
            "last_loss": list(self.last_loss),
            "pending": None if self._pending is None else list(self._pending),
            "history": list(self.history),
            "rewards_seen": self.rewards_seen,
            "last_reward": None if self.last_reward is None else list(self.last_reward),
        }

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        self.log_weights = np.array(state["log_weights"], dtype=np.float64)
        self.last_loss = [None if v is None else float(v) for v in state["last_loss"]]
        pending = state["pending"]
        self._pending = None if pending is None else (int(pending[0]), int(pending[1]), float(pending[2]))
        # States written before the rescaling have no history: they resume with an empty reservoir.
        self.history = [float(v) for v in state.get("history", [])]
        self.rewards_seen = int(state.get("rewards_seen", len(self.history)))
        if len(self.history) > self.history_size:
            raise ValueError(
                f"scheduler 'bandit': state holds {len(self.history)} past rewards, this scheduler keeps at most "
                f"history_size={self.history_size}; resume with the history_size the run was started with"
            )
        last = state.get("last_reward")
        self.last_reward = None if last is None else (float(last[0]), float(last[1]))


class ActiveSampling(TaskScheduler):
    """Active sampling (Sharma et al., "Learning to Multi-Task by Active Sampling", ICLR 2018 / arXiv 2017).

    One task per step from ``p_t ∝ exp(gap_t / tau)``, where ``gap_t = (ema_t - target_t) / |target_t|`` is how
    far the task's recent loss (an exponential moving average of its observed losses) is above its target.
    Tasks far from their target are trained more. Unobserved tasks have gap 0.

    Args:
        targets: ``{task: target loss}``, e.g. single-task baselines' losses. A task without one uses the
            lowest EMA loss seen so far for it (gap >= 0: the task is sampled more when it regresses).
        tau: temperature of the softmax, ``> 0``.
        ema_decay: ``ema <- ema_decay * ema + (1 - ema_decay) * loss``; the first loss initialises the EMA.
    """

    name = "active"

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        targets: Mapping[str, float] | None = None,
        tau: float = 0.1,
        ema_decay: float = 0.9,
    ) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed, total_steps=total_steps)
        self.targets = {} if targets is None else {str(t): float(v) for t, v in targets.items()}
        unknown = sorted(set(self.targets) - set(self.tasks))
        if unknown:
            raise ValueError(f"scheduler 'active': targets for unknown tasks {unknown}; tasks are {self.tasks}")
        bad = {t: v for t, v in self.targets.items() if not math.isfinite(v) or v == 0}
        if bad:
            raise ValueError(f"scheduler 'active': targets must be finite and non-zero, got {bad}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.tau = _positive("tau", tau)
        self.ema_decay = float(ema_decay)
        self.ema: list[float | None] = [None] * self.num_tasks
        self.best: list[float | None] = [None] * self.num_tasks

    def gaps(self) -> dict[str, float]:
        """``(ema - target) / |target|`` per task (0 before its first observation)."""
        out: dict[str, float] = {}
        for i, t in enumerate(self.tasks):
            ema = self.ema[i]
            target = self.targets.get(t, self.best[i])
            out[t] = 0.0 if ema is None or target is None else (ema - target) / max(abs(target), 1e-12)
        return out

    def _probs(self, step: int) -> np.ndarray:
        return _softmax(np.array(list(self.gaps().values())) / self.tau)

    def observe(self, step: int, losses: Mapping[str, float]) -> None:
        _index(step)
        for t, loss in self._check_losses(losses).items():
            i = self.tasks.index(t)
            prev = self.ema[i]
            ema = loss if prev is None else self.ema_decay * prev + (1.0 - self.ema_decay) * loss
            self.ema[i] = ema
            best = self.best[i]
            self.best[i] = ema if best is None else min(best, ema)

    def _method_state(self) -> dict[str, Any]:
        return {"ema": list(self.ema), "best": list(self.best)}

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        self.ema = [None if v is None else float(v) for v in state["ema"]]
        self.best = [None if v is None else float(v) for v in state["best"]]


class LearningProgress(TaskScheduler):
    """Tasks sampled by learning progress or by how far they are from solved, from episode outcomes (RL).

    :meth:`observe_outcomes` takes ``{task: outcome}``, a recent episode success rate in ``[0, 1]`` (or a return
    normalised to ``[0, 1]``), for some or all tasks. Each task keeps two exponential moving averages of its
    outcomes, both initialised to its first outcome::

        fast <- fast_decay * fast + (1 - fast_decay) * outcome
        slow <- slow_decay * slow + (1 - slow_decay) * outcome      (slow_decay > fast_decay)

    and a score by ``signal``:

    - ``"progress"``: absolute learning progress ``|fast - slow|``, the gap between a fast and a slow average of
      the success rate (Kanitscheider et al., "Multi-task curriculum learning in a complex, visual,
      hard-exploration domain: Minecraft", 2021; the absolute slope of the learning curve, so that tasks being
      forgotten are trained too, as in Matiisen et al., "Teacher-Student Curriculum Learning", 2017). Tasks
      already solved and tasks still out of reach both score 0; the ones being learned are sampled. Kanitscheider
      et al. further reshape the progress before sampling; this class samples in proportion to it as it is. A task
      that has not started to succeed keeps only ``epsilon / k`` while others progress (in the point-mass runs of
      benchmarks/scheduling.py one goal sat at that floor for most of the run and stayed unsolved): raise
      ``epsilon``, or use ``"success"``, when tasks start at zero success and need training to begin to succeed.
    - ``"success"``: ``1 - fast``, how far the recent success rate is from solved: unsolved tasks are sampled more.

    The sampling distribution mixes the normalised scores with ``epsilon`` of uniform, so that no task starves::

        p = (1 - epsilon) * score / sum(score) + epsilon / k

    Before any outcome arrives (and whenever every score is 0) ``p`` is uniform. A task without an outcome yet
    while others have one gets the highest score of the observed tasks, so it is tried soon. ``tasks_per_step``
    tasks are drawn from ``p`` without replacement (successive draws, renormalised after each); with one task per
    step :meth:`probabilities` is each task's chance of being chosen, with more it is the first draw's
    distribution. :meth:`observe` (training losses) is ignored.

    Args:
        tasks_per_step: how many tasks are selected at each step, 1 to ``len(tasks)``.
        signal: ``"progress"`` or ``"success"`` (see above).
        epsilon: share of uniform sampling, in ``(0, 1]``; every task keeps probability at least ``epsilon / k``.
        fast_decay: decay of the fast average, in ``[0, slow_decay)``.
        slow_decay: decay of the slow average, in ``(fast_decay, 1)``.
    """

    name = "progress"
    SIGNALS: ClassVar[tuple[str, ...]] = ("progress", "success")

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        sizes: Mapping[str, int] | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        tasks_per_step: int = 1,
        signal: str = "progress",
        epsilon: float = 0.1,
        fast_decay: float = 0.9,
        slow_decay: float = 0.98,
    ) -> None:
        super().__init__(tasks, sizes=sizes, seed=seed, total_steps=total_steps)
        if not 1 <= tasks_per_step <= self.num_tasks:
            raise ValueError(
                f"tasks_per_step must be in [1, {self.num_tasks}] (the number of tasks), got {tasks_per_step}"
            )
        if signal not in self.SIGNALS:
            raise ValueError(f"signal must be one of {list(self.SIGNALS)}, got {signal!r}")
        if not 0 < epsilon <= 1:
            raise ValueError(f"epsilon (share of uniform sampling) must be in (0, 1], got {epsilon}")
        if not 0 <= fast_decay < slow_decay < 1:
            raise ValueError(
                f"decays must satisfy 0 <= fast_decay < slow_decay < 1, got fast_decay={fast_decay}, "
                f"slow_decay={slow_decay}"
            )
        self.tasks_per_step = int(tasks_per_step)
        self.signal = str(signal)
        self.epsilon = float(epsilon)
        self.fast_decay, self.slow_decay = float(fast_decay), float(slow_decay)
        self.fast: list[float | None] = [None] * self.num_tasks
        self.slow: list[float | None] = [None] * self.num_tasks

    def scores(self) -> dict[str, float]:
        """Each task's score by ``signal`` (unobserved tasks: the highest observed score; 0 when none is)."""
        raw: list[float | None] = []
        for fast, slow in zip(self.fast, self.slow):
            if fast is None or slow is None:
                raw.append(None)
            elif self.signal == "progress":
                raw.append(abs(fast - slow))
            else:
                raw.append(1.0 - fast)
        observed = [v for v in raw if v is not None]
        top = max(observed, default=0.0)
        return {t: top if v is None else v for t, v in zip(self.tasks, raw)}

    def _probs(self, step: int) -> np.ndarray:
        score = np.array(list(self.scores().values()))
        total = score.sum()
        if not total > 0:
            return np.full(self.num_tasks, 1.0 / self.num_tasks)
        return (1.0 - self.epsilon) * score / total + self.epsilon / self.num_tasks

    def _select(self, step: int) -> list[int]:
        """Successive sampling: each draw inverts the CDF of ``p`` over the tasks not drawn yet."""
        if self.tasks_per_step == 1:
            return super()._select(step)
        p = self._probs(step).copy()
        chosen: list[int] = []
        for u in self._rng(step).random(self.tasks_per_step):
            cdf = np.cumsum(p)
            i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
            if i >= self.num_tasks or p[i] == 0:  # u * total rounded up to the total: the last task left
                i = int(np.flatnonzero(p)[-1])
            chosen.append(i)
            p[i] = 0.0
        return chosen

    def observe_outcomes(self, step: int, outcomes: Mapping[str, float]) -> None:
        _index(step)
        unknown = sorted(set(outcomes) - set(self.tasks))
        if unknown:
            raise ValueError(f"scheduler 'progress': outcomes for unknown tasks {unknown}; tasks are {self.tasks}")
        values = {str(t): float(v) for t, v in outcomes.items()}
        bad = {t: v for t, v in values.items() if not 0.0 <= v <= 1.0}  # also catches NaN
        if bad:
            raise ValueError(
                f"scheduler 'progress': outcomes must be success rates (or normalised returns) in [0, 1], got {bad}; "
                "normalise returns first, e.g. (R - R_min) / (R_max - R_min)"
            )
        for t, x in values.items():
            i = self.tasks.index(t)
            fast, slow = self.fast[i], self.slow[i]
            self.fast[i] = x if fast is None else self.fast_decay * fast + (1.0 - self.fast_decay) * x
            self.slow[i] = x if slow is None else self.slow_decay * slow + (1.0 - self.slow_decay) * x

    def _method_state(self) -> dict[str, Any]:
        return {"fast": list(self.fast), "slow": list(self.slow)}

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        self.fast = [None if v is None else float(v) for v in state["fast"]]
        self.slow = [None if v is None else float(v) for v in state["slow"]]


SCHEDULERS: dict[str, type[TaskScheduler]] = {
    cls.name: cls
    for cls in (
        AllTasks,
        RoundRobin,
        RandomTasks,
        Temperature,
        Annealed,
        Exp3Bandit,
        ActiveSampling,
        LearningProgress,
    )
}


def build_scheduler(name: str, tasks: Sequence[str], **kwargs: Any) -> TaskScheduler:
    """``SCHEDULERS[name](tasks, **kwargs)``, e.g. ``build_scheduler("temperature", tasks, sizes=n, temperature=5)``."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](tasks, **kwargs)


class TaskStreams(Generic[T]):
    """Endless per-task streams over separate datasets: a finished pass over a task's data starts the next.

    Args:
        factories: ``{task: factory}``; ``factory(pass_index)`` returns a fresh iterable over the task's data for
            that pass (e.g. ``lambda p: dataset.batches(bs, shuffle=True, seed=s, epoch=p)``). It must give the
            same items for the same pass index, so that a resumed run sees the same data.

    Iterators are created lazily, so ``passes[t] == ceil(consumed[t] / items_per_pass)``.

    Example::

        >>> s = TaskStreams({"a": lambda p: iter([f"a{p}.0", f"a{p}.1"]), "b": lambda p: iter([f"b{p}"])})
        >>> [s.next("a") for _ in range(3)], [s.next("b") for _ in range(2)]
        (['a0.0', 'a0.1', 'a1.0'], ['b0', 'b1'])
        >>> s.passes, s.consumed
        ({'a': 2, 'b': 2}, {'a': 3, 'b': 2})
    """

    def __init__(self, factories: Mapping[str, Callable[[int], Iterable[T]]]) -> None:
        if not factories:
            raise ValueError("TaskStreams needs at least one task factory, got none")
        not_callable = sorted(t for t, f in factories.items() if not callable(f))
        if not_callable:
            raise TypeError(f"factories must be callables pass_index -> iterator; not callable for {not_callable}")
        self._factories = dict(factories)
        self._pass = {t: -1 for t in self._factories}  # index of the current pass; -1 before the first
        self._pos = {t: 0 for t in self._factories}  # items drawn in the current pass
        self._consumed = {t: 0 for t in self._factories}
        self._iters: dict[str, Iterator[T]] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self._factories)

    @property
    def passes(self) -> dict[str, int]:
        """Passes started per task."""
        return {t: p + 1 for t, p in self._pass.items()}

    @property
    def consumed(self) -> dict[str, int]:
        """Items drawn per task, over all passes."""
        return dict(self._consumed)

    def _open(self, task: str, pass_index: int) -> Iterator[T]:
        data = self._factories[task](pass_index)
        try:
            return iter(data)
        except TypeError:
            raise TypeError(
                f"task {task!r}: factory({pass_index}) returned {type(data).__name__}, "
                "expected an iterable over the task's data"
            ) from None

    def _resume(self, task: str) -> Iterator[T]:
        """The iterator of the current pass, re-created after :meth:`load_state_dict` by skipping drawn items."""
        p, pos = self._pass[task], self._pos[task]
        it = self._open(task, p)
        for drawn in range(pos):
            if next(it, _END) is _END:
                raise ValueError(
                    f"task {task!r}: cannot resume pass {p} at item {pos}: it has only {drawn} items "
                    "now; the task's data changed since the state was saved"
                )
        return it

    def next(self, task: str) -> T:
        """The task's next item; starts the next pass when the current one is exhausted."""
        if task not in self._factories:
            raise ValueError(f"unknown task {task!r}; streams exist for {self.tasks}")
        it = self._iters.get(task)
        if it is None and self._pass[task] >= 0:
            it = self._iters[task] = self._resume(task)
        empty_in_a_row = 0
        while True:
            if it is not None:
                item = next(it, _END)
                if item is not _END:
                    self._pos[task] += 1
                    self._consumed[task] += 1
                    return item  # type: ignore[return-value]
                if self._pass[task] >= 0 and self._pos[task] == 0:
                    empty_in_a_row += 1
                    if empty_in_a_row == 2:
                        p = self._pass[task]
                        raise ValueError(
                            f"task {task!r}: its factory gave no items for passes {p - 1} and {p} in a row; the "
                            "task's dataset is empty (or smaller than one batch with drop_last=True); give it "
                            "data or drop the task"
                        )
            self._pass[task] += 1
            self._pos[task] = 0
            it = self._iters[task] = self._open(task, self._pass[task])

    def state_dict(self) -> dict[str, Any]:
        """Per task: current pass index, items drawn in it, items drawn in all."""
        return {
            "tasks": {
                t: {"pass": self._pass[t], "position": self._pos[t], "consumed": self._consumed[t]}
                for t in self._factories
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore positions; each task's iterator is re-created (and its drawn items skipped) at its next draw."""
        saved = state["tasks"]
        if set(saved) != set(self._factories):
            raise ValueError(f"state is for tasks {sorted(saved)}, these streams have tasks {sorted(self._factories)}")
        for t, s in saved.items():
            self._pass[t], self._pos[t], self._consumed[t] = int(s["pass"]), int(s["position"]), int(s["consumed"])
        self._iters.clear()


class ScheduledStreams(Generic[T]):
    """A :class:`TaskScheduler` drawing from :class:`TaskStreams`: ``next(step)`` is ``{task: item}`` for the tasks
    selected at ``step``, in the scheduler's task order."""

    def __init__(self, scheduler: TaskScheduler, streams: TaskStreams[T]) -> None:
        missing = [t for t in scheduler.tasks if t not in streams.tasks]
        if missing:
            raise ValueError(f"scheduler tasks {missing} have no stream; streams exist for {streams.tasks}")
        self.scheduler = scheduler
        self.streams = streams

    def next(self, step: int) -> dict[str, T]:
        return {t: self.streams.next(t) for t in self.scheduler.select(step)}

    def observe(self, step: int, losses: Mapping[str, float]) -> None:
        """Pass a step's losses to the scheduler."""
        self.scheduler.observe(step, losses)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "streams": self.streams.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.streams.load_state_dict(state["streams"])
