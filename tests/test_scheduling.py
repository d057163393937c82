"""Task scheduling: samplers against hand-computed distributions, adaptive methods on synthetic feedback,
endless per-task streams, exact resume of every scheduler, and every config in configs/schedule."""

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
    RandomTasks,
    RoundRobin,
    ScheduledStreams,
    TaskScheduler,
    TaskStreams,
    Temperature,
    build_scheduler,
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
    """Linear-weight EXP3 reference: w_i *= exp(eta * r / p_i) for the chosen task."""
    gamma, eta = 0.2, 0.5
    s = Exp3Bandit(["a", "b"], gamma=gamma, eta=eta, seed=5)
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
    gamma = 0.1
    s = Exp3Bandit(TASKS, gamma=gamma, alpha=alpha, seed=6)
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
