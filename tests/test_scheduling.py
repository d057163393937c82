"""Task scheduling: samplers against hand-computed distributions, adaptive methods on synthetic feedback,
endless per-task streams, exact resume of every scheduler, and every config in configs/schedule. The bandit's
reward rescaling (Graves et al., 2017) and the learning-progress scheduler are checked against values derived by
hand."""

from __future__ import annotations

import doctest
import inspect
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import mtl.scheduling
from mtl.scheduling import (
    SCHEDULERS,
    ActiveSampling,
    AllTasks,
    Annealed,
    Exp3Bandit,
    LearningProgress,
    RandomTasks,
    RoundRobin,
    ScheduledStreams,
    TaskScheduler,
    TaskStreams,
    Temperature,
    build_scheduler,
    quantile_rescale,
)

REPO = Path(__file__).resolve().parents[1]
TASKS = ["a", "b", "c"]
SIZES = {"a": 1000, "b": 100, "c": 10}
N = 20_000


def frequencies(sched: TaskScheduler, steps: range) -> np.ndarray:
    """Share of steps at which each task was selected."""
    counts = Counter(t for step in steps for t in sched.select(step))
    return np.array([counts[t] for t in sched.tasks]) / len(steps)


def assert_frequencies(freq: np.ndarray, p: np.ndarray, n: int) -> None:
    """Each frequency within 5 binomial standard deviations of its probability."""
    tol = 5 * np.sqrt(p * (1 - p) / n) + 1e-9
    assert np.all(np.abs(freq - p) <= tol), (freq.tolist(), p.tolist(), tol.tolist())


def by_hand(sizes: list[float], exponent: float) -> np.ndarray:
    w = np.array([n**exponent for n in sizes])
    return w / w.sum()


def feedback(step: int, selected: list[str]) -> dict[str, float]:
    """Deterministic synthetic losses: task ``a`` keeps improving, the others drift."""
    return {t: (0.99**step if t == "a" else 1.0 + 0.1 * math.sin(step + i)) for i, t in enumerate(selected)}


def make(name: str, seed: int = 0, **kw: object) -> TaskScheduler:
    return build_scheduler(name, TASKS, sizes=SIZES, seed=seed, total_steps=200, **kw)


# ---------------------------------------------------------------------------------------------- fixed schedules


def test_all_selects_every_task() -> None:
    s = AllTasks(TASKS)
    assert all(s.select(step) == TASKS for step in range(10))
    assert s.probabilities(3) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_round_robin_exact_sequence() -> None:
    s = RoundRobin(TASKS)
    assert [s.select(step) for step in range(7)] == [["a"], ["b"], ["c"], ["a"], ["b"], ["c"], ["a"]]
    assert s.select(1001) == ["c"]
    assert s.probabilities(4) == {"a": 0.0, "b": 1.0, "c": 0.0}


# ---------------------------------------------------------------------------------------------- samplers


def test_random_is_uniform() -> None:
    s = RandomTasks(TASKS, seed=1)
    assert all(len(s.select(step)) == 1 for step in range(100))
    assert_frequencies(frequencies(s, range(N)), np.full(3, 1 / 3), N)


def test_random_several_tasks_per_step_without_replacement() -> None:
    s = RandomTasks(TASKS, seed=2, tasks_per_step=2)
    subsets = Counter(tuple(s.select(step)) for step in range(N))
    assert set(subsets) == {("a", "b"), ("a", "c"), ("b", "c")}  # distinct, in task order
    freq = np.array([subsets[k] for k in sorted(subsets)]) / N
    assert_frequencies(freq, np.full(3, 1 / 3), N)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1e6])
def test_temperature_matches_n_to_the_one_over_t(temperature: float) -> None:
    s = Temperature(TASKS, sizes=SIZES, seed=3, temperature=temperature)
    expected = by_hand([1000, 100, 10], 1 / temperature)
    if temperature == 1.0:
        np.testing.assert_allclose(expected, [1000 / 1110, 100 / 1110, 10 / 1110])
    if temperature == 2.0:
        root = [math.sqrt(1000), 10.0, math.sqrt(10)]
        np.testing.assert_allclose(expected, np.array(root) / sum(root))
    if temperature == 1e6:
        np.testing.assert_allclose(expected, np.full(3, 1 / 3), atol=1e-5)
    assert list(s.probabilities(0).values()) == pytest.approx(expected.tolist(), rel=1e-12)
    assert_frequencies(frequencies(s, range(N)), expected, N)


def test_temperature_infinity_is_uniform() -> None:
    s = Temperature(TASKS, sizes=SIZES, temperature=float("inf"))
    assert list(s.probabilities(0).values()) == pytest.approx([1 / 3] * 3)


def test_annealed_formula_at_start_middle_end() -> None:
    s = Annealed(TASKS, sizes=SIZES, total_steps=11)  # alpha = 1 - 0.8 * step / 10
    for step, alpha in [(0, 1.0), (5, 0.6), (10, 0.2), (50, 0.2)]:
        assert s.alpha(step) == pytest.approx(alpha)
        assert list(s.probabilities(step).values()) == pytest.approx(by_hand([1000, 100, 10], alpha).tolist())
    s = Annealed(TASKS, sizes=SIZES, total_steps=11, alpha_start=0.5, alpha_end=0.0)
    assert s.alpha(0) == 0.5 and s.alpha(5) == pytest.approx(0.25)
    assert list(s.probabilities(10).values()) == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_annealed_sampling_frequencies(where: str) -> None:
    total = 10**9  # alpha moves by 0.8 * N / total = 2e-5 across a window of N steps: constant for sampling
    first = {"start": 0, "middle": total // 2, "end": total}[where]
    alpha = max(1 - 0.8 * first / (total - 1), 0.2)
    s = Annealed(TASKS, sizes=SIZES, seed=4, total_steps=total)
    assert_frequencies(frequencies(s, range(first, first + N)), by_hand([1000, 100, 10], alpha), N)


# ---------------------------------------------------------------------------------------------- bandit


def test_bandit_matches_exp3_by_hand() -> None:
    """Linear-weight EXP3 reference: w_i *= exp(eta * r / p_i) for the chosen task (the fixed [0, 1] reward)."""
    gamma, eta = 0.2, 0.5
    s = Exp3Bandit(["a", "b"], gamma=gamma, eta=eta, seed=5, reward_scaling="fixed")
    w = np.ones(2)
    last: dict[str, float] = {}
    losses = {"a": iter([2.0, 1.0, 0.5, 0.1, 0.3, 0.3] * 5), "b": iter([1.0, 1.5, 1.0, 4.0, 1.0, 1.0] * 5)}
    updates = 0
    for step in range(20):
        p = (1 - gamma) * w / w.sum() + gamma / 2
        assert list(s.probabilities(step).values()) == pytest.approx(p.tolist(), rel=1e-9)
        (task,) = s.select(step)
        loss = next(losses[task])
        s.observe(step, {task: loss})
        if task in last:
            progress = min(max((last[task] - loss) / last[task], -1.0), 1.0)
            w[["a", "b"].index(task)] *= math.exp(eta * (progress + 1) / 2 / p[["a", "b"].index(task)])
            updates += 1
        last[task] = loss
    assert updates >= 10


@pytest.mark.parametrize("alpha", [0.0, 1e-3])
def test_bandit_prefers_the_task_that_keeps_learning(alpha: float) -> None:
    """The fixed [0, 1] reward: slow at first even with 20% progress (the rescaled reward is fast, see below)."""
    gamma = 0.1
    s = Exp3Bandit(TASKS, gamma=gamma, alpha=alpha, seed=6, reward_scaling="fixed")
    loss = {"a": 1.0, "b": 1.0, "c": 1.0}
    chosen = []
    for step in range(3000):
        p = s.probabilities(step)
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-12)
        assert min(p.values()) >= gamma / 3 - 1e-12  # exploration floor
        (task,) = s.select(step)
        s.observe(step, {task: loss[task]})
        if task == "a":
            loss["a"] *= 0.8  # 20% progress each time it is trained; b and c are flat
        chosen.append(task)
    assert Counter(chosen[:300])["a"] / 300 < 0.5  # starts near uniform...
    assert Counter(chosen[-500:])["a"] / 500 > 0.6  # ...and learns to favour the learning task
    assert s.probabilities(3000)["a"] > 0.6


def test_bandit_weight_sharing_keeps_a_floor() -> None:
    """Exp3.S: after mixing, every weight share is >= alpha / k, so p_t >= gamma / k + (1 - gamma) alpha / k."""
    gamma, alpha = 0.1, 0.2
    floor = gamma / 3 + (1 - gamma) * alpha / 3
    lowest = {}
    for a in (0.0, alpha):
        s = Exp3Bandit(TASKS, gamma=gamma, alpha=a, eta=0.5, seed=10)
        loss = {"a": 1.0, "b": 1.0, "c": 1.0}
        lowest[a] = 1.0
        for step in range(500):
            lowest[a] = min(lowest[a], *s.probabilities(step).values())
            (task,) = s.select(step)
            s.observe(step, {task: loss[task]})
            loss[task] *= 0.5 if task == "a" else 1.1
    assert lowest[alpha] >= floor - 1e-12
    assert lowest[0.0] < floor  # without sharing the bound does not hold


def test_bandit_observe_needs_its_selection() -> None:
    s = Exp3Bandit(TASKS)
    with pytest.raises(ValueError, match="select"):
        s.observe(0, {"a": 1.0})
    (task,) = s.select(0)
    other = next(t for t in TASKS if t != task)
    with pytest.raises(ValueError, match=f"chose task '{task}'"):
        s.observe(0, {other: 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        s.observe(0, {task: float("nan")})
    with pytest.raises(ValueError, match="unknown tasks"):
        s.observe(0, {"z": 1.0})
    s.observe(0, {task: 1.0})


# ---------------------------------------------------------------------------------------------- bandit: reward scaling


def percentile_by_hand(history: list[float], q: float) -> float:
    """Linear interpolation between order statistics: position q (n - 1) in the sorted history."""
    xs = sorted(history)
    pos = q * (len(xs) - 1)
    j = math.floor(pos)
    return xs[j] if j + 1 >= len(xs) else xs[j] + (pos - j) * (xs[j + 1] - xs[j])


def test_quantile_rescale_by_hand() -> None:
    history = [30.0, 0.0, 20.0, 10.0]  # sorted 0, 10, 20, 30: 20th percentile at 0.6 -> 6, 80th at 2.4 -> 24
    assert percentile_by_hand(history, 0.2) == pytest.approx(6.0)
    assert percentile_by_hand(history, 0.8) == pytest.approx(24.0)
    cases = {
        5.0: -1.0,  # below q_lo: clipped
        6.0: -1.0,  # at q_lo
        9.0: 2 * 3 / 18 - 1,  # linear in between: 2 (v - 6) / (24 - 6) - 1
        15.0: 0.0,  # the midpoint
        21.0: 2 * 15 / 18 - 1,
        24.0: 1.0,  # at q_hi
        1e9: 1.0,  # above q_hi: clipped
        -1e9: -1.0,
    }
    for value, expected in cases.items():
        assert quantile_rescale(value, history) == pytest.approx(expected, abs=1e-12), value
    # other quantiles: median 15 and maximum 30
    assert quantile_rescale(20.0, history, q_lo=0.5, q_hi=1.0) == pytest.approx(2 * 5 / 15 - 1)
    assert quantile_rescale(31.0, history, q_lo=0.5, q_hi=1.0) == 1.0
    # the cases the paper's formula leaves open
    assert quantile_rescale(3.0, []) == 0.0  # no history yet
    assert [quantile_rescale(v, [2.0, 2.0, 2.0]) for v in (1.0, 2.0, 3.0)] == [-1.0, 0.0, 1.0]  # q_lo == q_hi
    # scale-free: rewards of 1e-3 map like rewards of 1
    small = [v * 1e-3 for v in history]
    assert quantile_rescale(9e-3, small) == pytest.approx(quantile_rescale(9.0, history), abs=1e-9)


def test_bandit_rescaled_rewards_match_graves_by_hand() -> None:
    """Reference: r = rescale(progress, earlier progress values); log w_i += eta r / p_i; no reservoir replacement."""
    gamma, eta, k = 0.2, 0.3, 3
    s = Exp3Bandit(TASKS, gamma=gamma, eta=eta, seed=12, history_size=1000)
    w = np.zeros(k)
    last: dict[str, float] = {}
    history: list[float] = []
    rng = np.random.default_rng(0)
    updates = 0
    for step in range(150):
        z = np.exp(w - w.max())
        p = (1 - gamma) * z / z.sum() + gamma / k
        assert list(s.probabilities(step).values()) == pytest.approx(p.tolist(), rel=1e-9)
        (task,) = s.select(step)
        loss = float(rng.uniform(0.5, 1.5))
        s.observe(step, {task: loss})
        i = TASKS.index(task)
        if task in last:
            progress = (last[task] - loss) / last[task]
            if not history:
                r = 0.0
            else:
                lo, hi = percentile_by_hand(history, 0.2), percentile_by_hand(history, 0.8)
                r = -1.0 if progress < lo else 1.0 if progress > hi else 2 * (progress - lo) / (hi - lo) - 1
            assert s.last_reward == pytest.approx((progress, r), abs=1e-12)
            w[i] += eta * r / p[i]
            history.append(progress)
            updates += 1
        last[task] = loss
    assert updates > 100
    assert s.history == pytest.approx(history) and s.rewards_seen == updates


def learning_run(scaling: str, seed: int, steps: int = 300, noise: float = 0.0, **kw: float) -> float:
    """p(a) after ``steps`` steps: each time a task is trained its loss falls by 0.2% (task a) or 0.05% (b, c), so
    relative progress is about 1e-3 per step; ``noise`` is the relative noise of each observed loss."""
    rates = {"a": 2e-3, "b": 5e-4, "c": 5e-4}
    s = Exp3Bandit(TASKS, seed=seed, reward_scaling=scaling, **kw)
    loss = dict.fromkeys(TASKS, 1.0)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        (task,) = s.select(step)
        s.observe(step, {task: loss[task] * (1 + noise * rng.standard_normal())})
        loss[task] *= 1 - rates[task]
    return s.probabilities(steps)["a"]


@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_rescaled_bandit_finds_the_faster_task_where_the_fixed_reward_stays_near_uniform(noise: float) -> None:
    """1e-3-sized progress: rescaled, task a's rewards sit at +1 and the others' at -1, and within 300 steps p(a)
    reaches its ceiling 1 - gamma + gamma / k = 0.933; the fixed reward (progress + 1) / 2 is about 0.5 for every
    task, so p(a) only wanders around 1/3 with the importance-weighting noise."""
    seeds = range(12)
    rescaled = np.array([learning_run("quantile", seed, noise=noise) for seed in seeds])
    fixed = np.array([learning_run("fixed", seed, noise=noise) for seed in seeds])
    assert rescaled.min() > 0.9, rescaled.round(3).tolist()
    assert abs(fixed.mean() - 1 / 3) < 0.1, fixed.round(3).tolist()
    assert np.median(fixed) < 0.45 and fixed.max() < 0.7, fixed.round(3).tolist()


def test_bandit_loss_smoothing_by_hand_and_under_batch_noise() -> None:
    """Progress between exponential averages of the chosen task's losses (d = 0.5 by hand); with 10% noise per
    observed loss the averaged losses still find the faster task, the raw ones do not."""
    s = Exp3Bandit(["a"], loss_smoothing=0.5, reward_scaling="fixed")
    ema = None
    for step, loss in enumerate([2.0, 1.0, 1.5, 0.5]):
        s.select(step)
        s.observe(step, {"a": loss})
        prev, ema = ema, loss if ema is None else 0.5 * ema + 0.5 * loss  # 2, 1.5, 1.5, 1.0
        if prev is not None:
            assert s.last_reward is not None
            assert s.last_reward[0] == pytest.approx((prev - ema) / prev)
    assert s.last_loss == [pytest.approx(1.0)]
    seeds = range(8)
    smoothed = np.mean([learning_run("quantile", seed, 800, noise=0.1, loss_smoothing=0.9) for seed in seeds])
    raw = np.mean([learning_run("quantile", seed, 800, noise=0.1) for seed in seeds])
    assert smoothed > 0.6 and raw < 0.45, (smoothed, raw)


def test_bandit_reservoir_is_a_uniform_sample_and_seeded() -> None:
    """Algorithm R: after n offers, each of them is in the reservoir with probability size / n."""
    n, size, runs = 20, 5, 2000
    counts = np.zeros(n)
    for seed in range(runs):
        s = Exp3Bandit(TASKS, seed=seed, history_size=size)
        for v in range(n):
            s._remember(float(v))
        assert len(s.history) == size and s.rewards_seen == n and len(set(s.history)) == size
        counts[[int(v) for v in s.history]] += 1
    assert_frequencies(counts / runs, np.full(n, size / n), runs)

    def filled(seed: int) -> list[float]:
        s = Exp3Bandit(TASKS, seed=seed, history_size=size)
        for v in range(n):
            s._remember(float(v))
        return s.history

    assert filled(3) == filled(3)
    assert len({tuple(filled(seed)) for seed in range(10)}) > 1


def test_bandit_state_dict_resumes_the_reservoir_exactly() -> None:
    """A small reservoir (replacements happen) saved mid-run, also between select and observe: the resumed run
    gives the same rewards, weights, selections and history."""

    def make_bandit(seed: int) -> Exp3Bandit:
        return Exp3Bandit(TASKS, seed=seed, history_size=8, eta=0.5)

    def go(s: Exp3Bandit, steps: range) -> list[tuple[list[str], tuple[float, float] | None]]:
        out = []
        for step in steps:
            selected = s.select(step)
            s.observe(step, {t: 1.0 + 0.3 * math.sin(0.7 * step + TASKS.index(t)) for t in selected})
            out.append((selected, s.last_reward))
        return out

    a = make_bandit(21)
    go(a, range(100))
    assert a.rewards_seen > 8 * 5  # the reservoir has been replacing values for a while
    state = json.loads(json.dumps(a.state_dict()))
    p100 = a.probabilities(100)
    assert len(state["history"]) == 8 and state["rewards_seen"] == a.rewards_seen
    b = make_bandit(0)
    b.load_state_dict(state)
    assert b.history == a.history and b.probabilities(100) == a.probabilities(100)
    assert go(b, range(100, 200)) == go(a, range(100, 200))
    assert b.history == a.history and b.log_weights.tolist() == a.log_weights.tolist()
    a.select(200)
    c = make_bandit(0)
    c.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert go(c, range(200, 260)) == go(a, range(200, 260))
    with pytest.raises(ValueError, match="history_size"):
        Exp3Bandit(TASKS, history_size=4).load_state_dict(state)
    # a state written before the rescaling (no history) still loads, with an empty reservoir
    old = {k: v for k, v in state.items() if k not in ("history", "rewards_seen", "last_reward")}
    d = make_bandit(0)
    d.load_state_dict(old)
    assert d.history == [] and d.rewards_seen == 0 and d.probabilities(100) == p100


def test_bandit_is_deterministic_under_the_seed() -> None:
    def trace(seed: int) -> list[list[str]]:
        s = Exp3Bandit(TASKS, seed=seed, history_size=10)
        return run(s, range(200))

    assert trace(4) == trace(4)
    assert trace(4) != trace(5)


# ---------------------------------------------------------------------------------------------- active sampling


def test_active_formula_by_hand() -> None:
    s = ActiveSampling(TASKS, targets={"a": 0.5, "b": 0.2, "c": 1.0}, tau=0.5, ema_decay=0.5)
    assert list(s.probabilities(0).values()) == pytest.approx([1 / 3] * 3)  # nothing observed yet
    s.observe(0, {"a": 1.0, "b": 0.3, "c": 1.0})  # gaps 1.0, 0.5, 0.0
    z = np.exp(np.array([1.0, 0.5, 0.0]) / 0.5)
    assert list(s.probabilities(1).values()) == pytest.approx((z / z.sum()).tolist())
    assert max(s.probabilities(1), key=s.probabilities(1).get) == "a"
    s.observe(1, {"a": 0.5, "b": 0.5, "c": 0.5})  # EMAs 0.75, 0.4, 0.75 -> gaps 0.5, 1.0, -0.25
    assert s.gaps() == pytest.approx({"a": 0.5, "b": 1.0, "c": -0.25})
    z = np.exp(np.array([0.5, 1.0, -0.25]) / 0.5)
    p = s.probabilities(2)
    assert list(p.values()) == pytest.approx((z / z.sum()).tolist())
    assert max(p, key=p.get) == "b"  # now furthest above its target


def test_active_default_target_is_lowest_ema_seen() -> None:
    s = ActiveSampling(TASKS, tau=0.2, ema_decay=0.0)  # EMA = last loss
    for step, loss in enumerate([1.0, 0.5, 0.8]):
        s.observe(step, {"a": loss})
    s.observe(3, {"b": 1.0})
    s.observe(4, {"b": 0.9})
    assert s.gaps() == pytest.approx({"a": (0.8 - 0.5) / 0.5, "b": 0.0, "c": 0.0})
    z = np.exp(np.array([0.6, 0.0, 0.0]) / 0.2)
    expected = z / z.sum()
    assert list(s.probabilities(5).values()) == pytest.approx(expected.tolist())
    assert_frequencies(frequencies(s, range(5, 5 + N)), expected, N)


# ---------------------------------------------------------------------------------------------- every scheduler


def run(sched: TaskScheduler, steps: range) -> list[list[str]]:
    out = []
    for step in steps:
        selected = sched.select(step)
        sched.observe(step, feedback(step, selected))
        out.append(selected)
    return out


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_state_dict_round_trip_reproduces_next_selections(name: str) -> None:
    a = make(name, seed=7)
    run(a, range(30))
    state = json.loads(json.dumps(a.state_dict()))  # plain Python values: storable anywhere
    b = make(name, seed=123)  # another seed and no history: everything must come from the state
    b.load_state_dict(state)
    assert b.probabilities(30) == a.probabilities(30)
    assert b.select(29) == a.select(29)  # the last step keeps its tasks, although its feedback moved the weights
    assert run(b, range(30, 80)) == run(a, range(30, 80))
    # checkpoint between select and observe of one step
    a.select(80)
    c = make(name, seed=123)
    c.load_state_dict(a.state_dict())
    assert run(c, range(80, 130)) == run(a, range(80, 130))


@pytest.mark.parametrize("name,kw", [("bandit", {"eta": 2.0}), ("active", {"tau": 0.01})])
def test_resumed_scheduler_keeps_the_selection_of_an_observed_step(name: str, kw: dict[str, float]) -> None:
    """Feedback moves the distribution a lot here; a step's tasks must not change after it, resumed or not."""
    a = make(name, seed=11, **kw)
    for step in range(50):
        selected = a.select(step)
        losses = {t: 1.0 + 0.5 * math.sin(1.7 * step * (i + 1)) for i, t in enumerate(TASKS)}
        a.observe(step, {t: losses[t] for t in (selected if name == "bandit" else TASKS)})
        b = make(name, seed=11, **kw)
        b.load_state_dict(a.state_dict())
        assert a.select(step) == b.select(step) == selected


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_contract(name: str) -> None:
    s = make(name, seed=8)
    for step in range(60):
        p = s.probabilities(step)
        assert list(p) == TASKS and sum(p.values()) == pytest.approx(1.0, abs=1e-12)
        assert min(p.values()) >= 0
        selected = s.select(step)
        assert selected and selected == [t for t in TASKS if t in selected]
        assert s.select(step) == selected  # same step, same tasks
        s.observe(step, feedback(step, selected))
        assert s.select(step) == selected  # ...even after its feedback
    assert run(make(name, seed=8), range(60)) == run(make(name, seed=8), range(60))


@pytest.mark.parametrize("name", ["random", "temperature", "annealed", "bandit", "active"])
def test_seed_changes_the_draws(name: str) -> None:
    kw = {"temperature": 1e6} if name == "temperature" else {}  # near uniform, so draws differ visibly
    assert run(make(name, seed=0, **kw), range(100)) != run(make(name, seed=1, **kw), range(100))


def test_load_state_dict_rejects_another_scheduler_or_task_list() -> None:
    state = make("random").state_dict()
    with pytest.raises(ValueError, match="'random'.*'temperature'"):
        make("temperature").load_state_dict(state)
    with pytest.raises(ValueError, match="tasks"):
        RandomTasks(["a", "b"]).load_state_dict(state)


def test_validation_messages() -> None:
    with pytest.raises(ValueError, match="needs sizes"):
        Temperature(TASKS)
    with pytest.raises(ValueError, match=r"no entry for tasks \['c'\]"):
        Annealed(TASKS, sizes={"a": 1, "b": 2}, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        Annealed(TASKS, sizes=SIZES)
    with pytest.raises(ValueError, match="tasks_per_step"):
        RandomTasks(TASKS, tasks_per_step=4)
    with pytest.raises(ValueError, match="duplicates"):
        AllTasks(["a", "a"])
    with pytest.raises(ValueError, match="temperature"):
        Temperature(TASKS, sizes=SIZES, temperature=0)
    with pytest.raises(ValueError, match="gamma"):
        Exp3Bandit(TASKS, gamma=0)
    with pytest.raises(ValueError, match=r"unknown tasks \['z'\]"):
        ActiveSampling(TASKS, targets={"z": 1.0})
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        build_scheduler("nope", TASKS)
    with pytest.raises(ValueError, match="step"):
        AllTasks(TASKS).select(-1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_scheduler("temperature", TASKS, sizes=SIZES, temprature=3)
    assert isinstance(build_scheduler("temperature", TASKS, sizes=SIZES, temperature=3.0), Temperature)


# ---------------------------------------------------------------------------------------------- learning progress (RL)


def test_progress_probabilities_from_hand_derived_emas() -> None:
    fast_decay, slow_decay, eps = 0.5, 0.75, 0.2
    s = LearningProgress(TASKS, fast_decay=fast_decay, slow_decay=slow_decay, epsilon=eps, seed=1)
    assert list(s.probabilities(0).values()) == pytest.approx([1 / 3] * 3)  # no outcome yet: uniform
    s.observe_outcomes(0, {"a": 0.0, "b": 0.5})  # first outcomes initialise both averages: no progress yet
    assert s.scores() == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert list(s.probabilities(1).values()) == pytest.approx([1 / 3] * 3)
    s.observe_outcomes(1, {"a": 1.0, "b": 0.5})
    # a: fast 0.5 * 0 + 0.5 * 1 = 0.5, slow 0.75 * 0 + 0.25 * 1 = 0.25 -> |0.5 - 0.25| = 0.25; b flat -> 0;
    # c has no outcome yet -> the highest observed score, 0.25
    assert s.fast[0] == pytest.approx(0.5) and s.slow[0] == pytest.approx(0.25)
    assert s.scores() == pytest.approx({"a": 0.25, "b": 0.0, "c": 0.25})
    expected = (1 - eps) * np.array([0.25, 0.0, 0.25]) / 0.5 + eps / 3  # 0.4667, 0.0667, 0.4667
    assert list(s.probabilities(2).values()) == pytest.approx(expected.tolist())
    s.observe_outcomes(2, {"a": 1.0, "c": 0.0})
    # a: fast 0.5 * 0.5 + 0.5 = 0.75, slow 0.75 * 0.25 + 0.25 = 0.4375 -> 0.3125; c: first outcome -> 0
    assert s.scores() == pytest.approx({"a": 0.3125, "b": 0.0, "c": 0.0})
    expected = np.array([1 - eps + eps / 3, eps / 3, eps / 3])  # all progress on a: 0.8667, 0.0667, 0.0667
    assert list(s.probabilities(3).values()) == pytest.approx(expected.tolist())
    n = N // 2
    assert_frequencies(frequencies(s, range(3, 3 + n)), expected, n)
    # forgetting counts too: a's success falls, |fast - slow| grows again
    s.observe_outcomes(3, {"a": 0.0, "b": 0.5, "c": 0.0})
    fa, sa = 0.5 * 0.75, 0.75 * 0.4375  # 0.375, 0.328125
    assert s.scores()["a"] == pytest.approx(abs(fa - sa))


def test_success_signal_samples_unsolved_tasks() -> None:
    eps = 0.2
    s = LearningProgress(TASKS, signal="success", fast_decay=0.5, slow_decay=0.75, epsilon=eps)
    assert list(s.probabilities(0).values()) == pytest.approx([1 / 3] * 3)
    s.observe_outcomes(0, {"a": 1.0, "b": 0.5})
    s.observe_outcomes(1, {"a": 0.5, "b": 0.5})  # a: fast 0.75 -> 0.25 to go; b 0.5; c unobserved -> top 0.5
    assert s.scores() == pytest.approx({"a": 0.25, "b": 0.5, "c": 0.5})
    expected = (1 - eps) * np.array([0.25, 0.5, 0.5]) / 1.25 + eps / 3
    assert list(s.probabilities(2).values()) == pytest.approx(expected.tolist())
    s.observe_outcomes(2, {"a": 1.0, "b": 1.0, "c": 1.0})  # c solved at once; a 0.875, b 0.75
    s.observe_outcomes(3, {t: 1.0 for t in TASKS})  # a 0.9375, b 0.875, c 1.0
    assert s.scores() == pytest.approx({"a": 0.0625, "b": 0.125, "c": 0.0})
    p = s.probabilities(4)
    assert p["c"] == pytest.approx(eps / 3) and p["b"] == pytest.approx((1 - eps) * 2 / 3 + eps / 3)
    solved = LearningProgress(TASKS, signal="success")
    solved.observe_outcomes(0, {t: 1.0 for t in TASKS})
    assert list(solved.probabilities(1).values()) == pytest.approx([1 / 3] * 3)  # nothing left: uniform


def test_progress_several_tasks_per_step() -> None:
    """Two tasks per step, drawn successively: P({i, j}) = p_i p_j (1 / (1 - p_i) + 1 / (1 - p_j))."""
    s = LearningProgress(TASKS, tasks_per_step=2, fast_decay=0.5, slow_decay=0.75, epsilon=0.2, seed=3)
    s.observe_outcomes(0, {"a": 0.0, "b": 0.0, "c": 0.0})
    s.observe_outcomes(1, {"a": 1.0, "b": 0.5, "c": 0.0})  # progress 0.25, 0.125, 0
    p = np.array(list(s.probabilities(2).values()))
    assert p.tolist() == pytest.approx(((0.8 * np.array([2, 1, 0]) / 3) + 0.2 / 3).tolist())
    n = N // 2
    subsets = Counter(tuple(s.select(step)) for step in range(2, 2 + n))
    assert set(subsets) <= {("a", "b"), ("a", "c"), ("b", "c")}  # distinct, in task order
    pairs = [("a", "b"), ("a", "c"), ("b", "c")]
    expected = []
    for x, y in pairs:
        i, j = TASKS.index(x), TASKS.index(y)
        expected.append(p[i] * p[j] * (1 / (1 - p[i]) + 1 / (1 - p[j])))
    assert sum(expected) == pytest.approx(1.0)
    assert_frequencies(np.array([subsets[k] for k in pairs]) / n, np.array(expected), n)


def progress_run(s: TaskScheduler, steps: range) -> list[list[str]]:
    """Select every step; every 5th step report success rates that rise for a, hover for b and c."""
    out = []
    for step in steps:
        out.append(s.select(step))
        if step % 5 == 4:
            s.observe_outcomes(
                step,
                {"a": min(1.0, step / 200), "b": 0.5 + 0.4 * math.sin(step), "c": 0.1 * (step % 3)},
            )
    return out


def test_progress_state_dict_round_trip_and_seed() -> None:
    def make_lp(seed: int) -> LearningProgress:
        return LearningProgress(TASKS, seed=seed, tasks_per_step=2)

    a = make_lp(7)
    progress_run(a, range(53))  # the last step (52) selected but not yet reported
    state = json.loads(json.dumps(a.state_dict()))
    b = make_lp(99)
    b.load_state_dict(state)
    assert b.probabilities(53) == a.probabilities(53) and b.select(52) == a.select(52)
    assert progress_run(b, range(53, 200)) == progress_run(a, range(53, 200))
    assert b.state_dict() == a.state_dict()
    assert progress_run(make_lp(7), range(200)) == progress_run(make_lp(7), range(200))
    assert progress_run(make_lp(7), range(200)) != progress_run(make_lp(8), range(200))
    learned = make_lp(7)
    progress_run(learned, range(200))
    assert max(learned.probabilities(200), key=learned.probabilities(200).get) == "a"  # a is the one improving


def test_observe_outcomes_is_a_no_op_elsewhere() -> None:
    for name in sorted(set(SCHEDULERS) - {"progress"}):
        s = make(name, seed=2)
        run(s, range(10))
        before = json.dumps(s.state_dict())
        s.observe_outcomes(10, {"a": 1.0})
        assert json.dumps(s.state_dict()) == before, name


def test_progress_validation_messages() -> None:
    with pytest.raises(ValueError, match="signal must be one of"):
        LearningProgress(TASKS, signal="reward")
    with pytest.raises(ValueError, match="epsilon"):
        LearningProgress(TASKS, epsilon=0.0)
    with pytest.raises(ValueError, match="fast_decay < slow_decay"):
        LearningProgress(TASKS, fast_decay=0.99, slow_decay=0.9)
    with pytest.raises(ValueError, match="tasks_per_step"):
        LearningProgress(TASKS, tasks_per_step=0)
    s = LearningProgress(TASKS)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got \{'a': 1.5\}"):
        s.observe_outcomes(0, {"a": 1.5})
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        s.observe_outcomes(0, {"a": float("nan")})
    with pytest.raises(ValueError, match=r"unknown tasks \['z'\]"):
        s.observe_outcomes(0, {"z": 0.5})
    with pytest.raises(ValueError, match="step"):
        s.observe_outcomes(-1, {"a": 0.5})
    with pytest.raises(ValueError, match="reward_scaling"):
        Exp3Bandit(TASKS, reward_scaling="raw")
    with pytest.raises(ValueError, match="q_lo < q_hi"):
        Exp3Bandit(TASKS, q_lo=0.8, q_hi=0.2)
    with pytest.raises(ValueError, match="history_size"):
        Exp3Bandit(TASKS, history_size=0)
    with pytest.raises(ValueError, match="loss_smoothing"):
        Exp3Bandit(TASKS, loss_smoothing=1.0)


# ---------------------------------------------------------------------------------------------- streams


def toy(task: str, size: int) -> Callable[[int], Iterator[tuple[str, int, int]]]:
    """Items (task, pass, element), each pass a seeded permutation of range(size)."""
    return lambda p: ((task, p, int(i)) for i in np.random.default_rng(p).permutation(size))


def test_task_streams_never_stall_and_count_passes() -> None:
    sizes = {"small": 3, "big": 10}
    streams = TaskStreams({t: toy(t, n) for t, n in sizes.items()})
    drawn: dict[str, list[tuple[str, int, int]]] = {t: [] for t in sizes}
    for _ in range(100):
        for t in sizes:
            drawn[t].append(streams.next(t))
            assert streams.passes[t] == math.ceil(streams.consumed[t] / sizes[t])
    assert streams.consumed == {"small": 100, "big": 100}
    assert streams.passes == {"small": 34, "big": 10}
    for t, n in sizes.items():
        for p in range(streams.passes[t]):
            items = [e for (_, q, e) in drawn[t] if q == p]
            full = [int(i) for i in np.random.default_rng(p).permutation(n)]
            assert items == full[: len(items)]  # the pass's own order
            assert len(items) == n or p == streams.passes[t] - 1
            if len(items) == n:
                assert sorted(items) == list(range(n))
        assert [q for (_, q, _) in drawn[t]] == sorted(q for (_, q, _) in drawn[t])  # passes in order


def test_task_streams_resume_mid_pass() -> None:
    factories = {"small": toy("small", 3), "big": toy("big", 10)}
    a = TaskStreams(factories)
    for _ in range(7):
        a.next("small")  # pass 2, one item in
    for _ in range(15):
        a.next("big")  # pass 1, five items in
    state = json.loads(json.dumps(a.state_dict()))
    b = TaskStreams(factories)
    b.load_state_dict(state)
    assert (b.passes, b.consumed) == (a.passes, a.consumed)
    order = ["small", "big", "big"] * 7
    assert [b.next(t) for t in order[:20]] == [a.next(t) for t in order[:20]]
    assert (b.passes, b.consumed) == (a.passes, a.consumed)


def test_task_streams_resume_at_the_end_of_a_pass() -> None:
    a = TaskStreams({"x": toy("x", 4)})
    for _ in range(8):
        a.next("x")
    b = TaskStreams({"x": toy("x", 4)})
    b.load_state_dict(a.state_dict())
    assert [b.next("x") for _ in range(6)] == [a.next("x") for _ in range(6)]


def test_task_streams_errors() -> None:
    streams = TaskStreams({"ok": toy("ok", 2), "empty": lambda p: iter([])})
    with pytest.raises(ValueError, match="task 'empty'.*empty"):
        streams.next("empty")
    assert streams.next("ok")[0] == "ok"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        streams.next("nope")
    # one empty pass is tolerated; only two in a row mean an empty dataset
    flaky = TaskStreams({"f": lambda p: iter([] if p == 1 else [p * 10, p * 10 + 1])})
    assert [flaky.next("f") for _ in range(5)] == [0, 1, 20, 21, 30]
    # data that shrank since the checkpoint
    a = TaskStreams({"x": toy("x", 5)})
    for _ in range(4):
        a.next("x")
    b = TaskStreams({"x": toy("x", 2)})
    b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="changed since"):
        b.next("x")


def test_scheduled_streams() -> None:
    factories = {t: toy(t, n) for t, n in SIZES.items()}
    rr = ScheduledStreams(RoundRobin(TASKS), TaskStreams(factories))
    got = [rr.next(step) for step in range(6)]
    assert [list(g) for g in got] == [["a"], ["b"], ["c"], ["a"], ["b"], ["c"]]
    assert got[3]["a"] == list(factories["a"](0))[1]  # a's second draw: second item of its pass 0
    both = ScheduledStreams(AllTasks(TASKS), TaskStreams(factories))
    assert list(both.next(0)) == TASKS

    def fresh() -> ScheduledStreams[tuple[str, int, int]]:
        return ScheduledStreams(Exp3Bandit(TASKS, seed=9), TaskStreams(factories))

    a = fresh()
    for step in range(40):
        batch = a.next(step)
        a.observe(step, {t: 1.0 / (step + 1) for t in batch})
    b = fresh()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for step in range(40, 60):
        got_a, got_b = a.next(step), b.next(step)
        assert got_a == got_b
        for s in (a, b):
            s.observe(step, {t: 1.0 / (step + 1) for t in got_a})
    with pytest.raises(ValueError, match=r"\['c'\] have no stream"):
        ScheduledStreams(AllTasks(TASKS), TaskStreams({"a": toy("a", 1), "b": toy("b", 1)}))


# ---------------------------------------------------------------------------------------------- configs


CONFIGS = sorted((REPO / "configs" / "schedule").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_schedule_configs_instantiate(path: Path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    tasks = OmegaConf.create(TASKS)  # as a trainer passes them, straight from its config
    sched = instantiate(cfg)(tasks=tasks, sizes=OmegaConf.create(SIZES), seed=0, total_steps=100)
    assert isinstance(sched, SCHEDULERS[path.stem])
    for step in range(100):
        selected = sched.select(step)
        assert selected and set(selected) <= set(TASKS)
        sched.observe(step, feedback(step, selected))
    # the config's hyperparameters are the class defaults
    params = inspect.signature(type(sched)).parameters
    for key, value in cfg.items():
        if key not in ("_target_", "_partial_"):
            assert params[str(key)].default == value, key


def test_every_scheduler_has_a_config() -> None:
    assert sorted(p.stem for p in CONFIGS) == sorted(SCHEDULERS)


def test_doctest_examples_run() -> None:
    result = doctest.testmod(mtl.scheduling, verbose=False)
    assert result.failed == 0 and result.attempted >= 4
