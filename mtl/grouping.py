"""Which tasks to train together: task affinity estimates and the choice of networks under an inference budget.

Two families of estimates score a *candidate network* (a group of tasks trained together) by a per-task
number where lower is better:

* **Losses of trained networks** (Standley et al., "Which Tasks Should Be Learned Together in Multi-task
  Learning?", ICML 2020). Every single task and every pair is trained for a fraction of the full budget
  (their "early stopping approximation", §3.2) and each network's per-task validation loss is recorded.
  Larger groups are scored from their pairs by the **higher-order approximation** (§3.2):
  :func:`higher_order_estimate`, ``L_i(G) ~ mean_{j in G, j != i} L_i({i, j})``.
* **Lookahead task affinity** (Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task
  Learning", NeurIPS 2021; TAG). In one joint run, :func:`lookahead_affinity` takes an SGD step of the
  shared parameters on task ``i``'s loss alone and measures the relative change of task ``j``'s loss on
  the same batch, ``Z_{i->j} = 1 - L_j(theta_s^{t+1|i}) / L_j(theta_s^t)``; :class:`AffinityMeter`
  averages it over training, and :func:`group_affinity` scores a group by the mean affinity onto each
  member from the others. Higher affinity is better, so its negation is the score to minimise.

Selection (Standley et al. §3.3): choose networks whose total cost fits the budget (a full network costs
1, a half-size single-task network 0.5) such that every task is served by exactly one chosen network,
the one with its lowest score among them, and the sum of the served scores (the predicted total loss) is
smallest. :func:`branch_and_bound` solves it exactly with pruning; :func:`exhaustive_search` enumerates
every affordable set for small task counts (the tests check that both agree).

Example::

    >>> pairs = {("a", "b"): {"a": 0.4, "b": 0.6}, ("a", "c"): {"a": 0.2, "c": 0.9},
    ...          ("b", "c"): {"b": 0.5, "c": 0.7}}
    >>> {t: round(v, 3) for t, v in higher_order_estimate(("a", "b", "c"), pairs).items()}
    {'a': 0.3, 'b': 0.55, 'c': 0.8}
    >>> cands = [Candidate(("a",), {"a": 0.5}), Candidate(("b",), {"b": 0.6}), Candidate(("c",), {"c": 0.9}),
    ...          Candidate(("a", "b", "c"), {"a": 0.3, "b": 0.55, "c": 0.8})]
    >>> sel = branch_and_bound(cands, ("a", "b", "c"), budget=2)
    >>> [n.tasks for n in sel.networks], sel.served, round(sel.objective, 3)
    ([('a', 'b', 'c')], {'a': 0, 'b': 0, 'c': 0}, 1.65)

A grouping run (:func:`group_tasks`): check the budget against the cheapest cover of the configured candidates,
have a :class:`GroupMeasurer` train the scoring networks (every single task and pair, or one joint TAG run),
build the candidates (:func:`loss_candidates`, :func:`tag_candidates`), :func:`select` the networks, and return
a JSON-ready result (:func:`write_result`, :func:`report`). The measurer is the only domain-specific part:
``mtrec.grouping.RecMeasurer`` trains recommendation networks; another domain supplies its own.

Imports numpy, torch and omegaconf only (task-agnostic: it never sees a model, a dataset or a trainer).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from mtl.checkpoint import atomic_write_json

__all__ = [
    "GROUPING_KEYS",
    "KINDS",
    "METHODS",
    "SEARCHES",
    "AffinityMeasurement",
    "AffinityMeter",
    "Candidate",
    "GroupMeasurer",
    "GroupingConfig",
    "Measurement",
    "Selection",
    "TagConfig",
    "all_groups",
    "branch_and_bound",
    "candidate_groups",
    "cheapest_cover",
    "check_budget",
    "exhaustive_search",
    "group_affinity",
    "group_key",
    "group_name",
    "group_tasks",
    "grouping_config",
    "higher_order_estimate",
    "lookahead_affinity",
    "loss_candidates",
    "pair_loss_affinity",
    "report",
    "scoring_steps",
    "select",
    "tag_candidates",
    "write_result",
]

Group = tuple[str, ...]
Affinity = dict[str, dict[str, float]]
"""``affinity[i][j]``: affinity of source task ``i`` onto target task ``j``."""

_EPS = 1e-9  # tolerance on budget sums (costs such as 0.5 add exactly, but user budgets may not)


def group_key(group: Iterable[str]) -> frozenset[str]:
    """The order-free identity of a group of tasks (``("b", "a")`` and ``("a", "b")`` are one group)."""
    return frozenset(group)


def all_groups(tasks: Sequence[str], max_size: int | None = None, min_size: int = 1) -> list[Group]:
    """Every group of ``min_size .. max_size`` tasks (``None``: all ``len(tasks)``), by size, in task order.

    >>> all_groups(("a", "b", "c"), max_size=2)
    [('a',), ('b',), ('c',), ('a', 'b'), ('a', 'c'), ('b', 'c')]
    """
    names = _check_tasks(tasks)
    top = len(names) if max_size is None else max_size
    if top < 1 or min_size < 1:
        raise ValueError(f"group sizes must be >= 1, got min_size={min_size}, max_size={max_size}")
    return [g for r in range(min_size, min(top, len(names)) + 1) for g in itertools.combinations(names, r)]


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r}")
    names = tuple(tasks)
    if not names:
        raise ValueError("tasks must name at least one task, got []")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {list(names)}")
    return names


# --------------------------------------------------------------------------------------------------
# Standley et al. 2020: scores from trained networks
# --------------------------------------------------------------------------------------------------


def higher_order_estimate(
    group: Sequence[str], pair_losses: Mapping[Sequence[str], Mapping[str, float]]
) -> dict[str, float]:
    """Standley et al. (ICML 2020) §3.2 higher-order approximation of a group's per-task losses.

    Task ``i``'s loss in a group ``G`` of two or more tasks is estimated as the average of its losses in
    the networks trained on the pairs ``{i, j}``, ``j`` in ``G \\ {i}``::

        L_i(G) ~ 1 / (|G| - 1) * sum_{j in G, j != i} L_i({i, j})

    (for a pair this is the pair's own measured loss).

    Args:
        group: the tasks of the group (two or more).
        pair_losses: ``{(i, j): {i: loss, j: loss}}`` for the pairs of the group (key order is free).

    Returns:
        ``{task: estimated loss}`` in the order of ``group``.
    """
    names = _check_tasks(group)
    if len(names) < 2:
        raise ValueError(
            f"the higher-order approximation scores groups of two or more tasks from their pairs, got {list(names)}; "
            "a single task's loss must be measured by training it alone"
        )
    by_key = {group_key(k): v for k, v in pair_losses.items()}
    out: dict[str, float] = {}
    for i in names:
        values = []
        for j in names:
            if j == i:
                continue
            pair = by_key.get(group_key((i, j)))
            if pair is None or i not in pair:
                raise KeyError(f"higher-order estimate of {list(names)} needs the loss of {i!r} in the pair ({i}, {j})")
            values.append(float(pair[i]))
        out[i] = sum(values) / len(values)
    return out


def pair_loss_affinity(
    single_losses: Mapping[str, float], pair_losses: Mapping[Sequence[str], Mapping[str, float]]
) -> Affinity:
    """A loss-based counterpart of TAG's affinity from trained networks: ``1 - L_j({i, j}) / L_j({j})``.

    ``affinity[i][j] > 0`` when training task ``j`` together with ``i`` lowered ``j``'s loss compared with
    training it alone (a report of what the pair networks measured; selection uses the losses themselves).
    """
    out: Affinity = {}
    for key, losses in pair_losses.items():
        a, b = tuple(key)
        for i, j in ((a, b), (b, a)):
            alone = float(single_losses[j])
            out.setdefault(i, {})[j] = 1.0 - float(losses[j]) / alone if alone > 0 else float("nan")
    return out


# --------------------------------------------------------------------------------------------------
# Fifty et al. 2021: lookahead task affinity (TAG)
# --------------------------------------------------------------------------------------------------


def lookahead_affinity(
    shared: Iterable[torch.nn.Parameter],
    losses_fn: Callable[[], Mapping[str, Tensor]],
    lr: float,
) -> Affinity:
    """Lookahead inter-task affinity on one batch (Fifty et al., NeurIPS 2021, eq. 1-2 of TAG).

    For every source task ``i``, the shared parameters take one SGD step on ``L_i`` alone,
    ``theta_s^{t+1|i} = theta_s^t - lr * grad_{theta_s} L_i``, and every target task ``j`` is scored by the
    relative change of its loss on the same batch::

        Z_{i->j} = 1 - L_j(theta_s^{t+1|i}) / L_j(theta_s^t)

    ``Z > 0``: a step for ``i`` lowers ``j``'s loss (the tasks help each other); ``Z < 0``: it raises it.
    Task-specific parameters are not stepped (only ``shared`` moves).

    The step is taken in place under ``torch.no_grad()`` and undone by copying the saved values back, so
    on return the parameters hold exactly their old values, ``.grad`` is untouched, and torch's random
    number generators are back at their state on entry. Every call of ``losses_fn`` starts from that same
    RNG state, so dropout masks agree between the losses before and after the lookahead.

    Args:
        shared: the model's shared parameters (those every task's loss depends on).
        losses_fn: computes ``{task: scalar loss}`` on one fixed batch with the current parameters (called
            ``1 + k`` times: once with autograd, then once per source task under ``no_grad``).
        lr: the lookahead step size (the optimiser's learning rate of the shared parameters).

    Returns:
        ``affinity[i][j] = Z_{i->j}`` for every pair of tasks, the diagonal (self-affinity) included.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lookahead_affinity: lr must be a positive finite number, got {lr!r}")
    params = [p for p in shared if p.requires_grad]
    if not params:
        raise ValueError(
            "lookahead_affinity: no shared parameters that require grad; TAG measures how a step of the shared "
            "parameters on one task's loss moves the others, so the model must share parameters"
        )
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # restores every RNG on exit
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def replay_rng() -> None:
            torch.set_rng_state(cpu_state)
            for d, s in zip(devices, cuda_states):
                torch.cuda.set_rng_state(s, d)

        with torch.enable_grad():
            losses = dict(losses_fn())
        names = list(losses)
        if not names:
            raise ValueError("lookahead_affinity: losses_fn returned no losses")
        before = {j: _positive_loss(j, losses[j], "before") for j in names}
        grads: dict[str, list[Tensor]] = {}
        for n, name in enumerate(names):
            loss = losses[name]
            if not loss.requires_grad:
                grads[name] = [torch.zeros_like(p) for p in params]
                continue
            g = torch.autograd.grad(loss, params, retain_graph=n < len(names) - 1, allow_unused=True)
            grads[name] = [torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(params, g)]
        del losses
        saved = [p.detach().clone() for p in params]
        affinity: Affinity = {}
        try:
            with torch.no_grad():
                for i in names:
                    for p, g in zip(params, grads[i]):
                        p.add_(g, alpha=-lr)
                    replay_rng()
                    after = losses_fn()
                    for p, s in zip(params, saved):
                        p.copy_(s)
                    missing = [j for j in names if j not in after]
                    if missing:
                        raise KeyError(f"lookahead_affinity: losses_fn returned no loss for {missing} after the step")
                    affinity[i] = {j: 1.0 - _positive_loss(j, after[j], "after") / before[j] for j in names}
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
    return affinity


def _positive_loss(name: str, value: Tensor | float, when: str) -> float:
    v = float(value.detach()) if isinstance(value, Tensor) else float(value)
    if not math.isfinite(v) or (when == "before" and v <= 0):
        raise ValueError(
            f"lookahead affinity is a relative loss change and needs a positive finite loss; task {name!r} had "
            f"{v} {when} the lookahead step"
        )
    return v


class AffinityMeter:
    """Running mean of :func:`lookahead_affinity` measurements over training (TAG averages over all steps).

    Example::

        >>> m = AffinityMeter()
        >>> m.update({"a": {"a": 0.2, "b": -0.1}, "b": {"a": 0.0, "b": 0.3}})
        >>> m.update({"a": {"a": 0.4, "b": 0.1}, "b": {"a": 0.2, "b": 0.1}})
        >>> m.count, m.mean()["a"]["b"], m.mean()["b"]["a"]
        (2, 0.0, 0.1)
    """

    def __init__(self) -> None:
        self._sum: Affinity = {}
        self.count = 0

    def update(self, affinity: Mapping[str, Mapping[str, float]]) -> None:
        """Add one measurement (it must cover the same tasks as the previous ones)."""
        if self.count and ({i: set(row) for i, row in affinity.items()} != {i: set(r) for i, r in self._sum.items()}):
            raise ValueError(
                f"AffinityMeter.update: expected affinities over tasks {sorted(self._sum)}, got {sorted(affinity)}"
            )
        for i, row in affinity.items():
            acc = self._sum.setdefault(i, {})
            for j, v in row.items():
                acc[j] = acc.get(j, 0.0) + float(v)
        self.count += 1

    def mean(self) -> Affinity:
        """``{i: {j: mean Z_{i->j}}}`` over every update so far."""
        if not self.count:
            raise ValueError("AffinityMeter.mean: no measurement yet (was the affinity hook ever called?)")
        return {i: {j: v / self.count for j, v in row.items()} for i, row in self._sum.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sum": {i: dict(r) for i, r in self._sum.items()}, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._sum = {i: dict(r) for i, r in state["sum"].items()}
        self.count = int(state["count"])


def group_affinity(
    group: Sequence[str], affinity: Mapping[str, Mapping[str, float]], singleton: float = 0.0
) -> dict[str, float]:
    """TAG's score of a group: for each member ``j``, the mean affinity onto ``j`` from the others.

    ``score_j(G) = 1 / (|G| - 1) * sum_{i in G, i != j} Z_{i->j}`` (Fifty et al. 2021, §3.3). A task alone
    receives no inter-task transfer: its score is ``singleton`` (default 0, i.e. isolating a task is better
    than grouping it with tasks whose steps raise its loss, and worse than grouping it with tasks that help).
    Higher is better.
    """
    names = _check_tasks(group)
    if len(names) == 1:
        return {names[0]: float(singleton)}
    out: dict[str, float] = {}
    for j in names:
        try:
            out[j] = sum(float(affinity[i][j]) for i in names if i != j) / (len(names) - 1)
        except KeyError as err:
            raise KeyError(f"group_affinity of {list(names)}: no affinity for source/target {err}") from err
    return out


# --------------------------------------------------------------------------------------------------
# Network selection under an inference budget
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A network that could be trained: the tasks it learns, its cost, and its per-task scores.

    Attributes:
        tasks: the tasks the network is trained on.
        scores: ``{task: score}`` for every task of the network, lower is better (an estimated loss,
            or a negated affinity).
        cost: inference cost in units of one full-size network (Standley et al.: 1, or 0.5 for a half-size
            single-task network).
        kind: a free label carried into reports (e.g. ``"full"``, ``"half"``).
        source: how the scores were obtained (e.g. ``"measured"``, ``"higher_order"``, ``"tag"``).
    """

    tasks: Group
    scores: Mapping[str, float]
    cost: float = 1.0
    kind: str = "full"
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", _check_tasks(self.tasks))
        missing = [t for t in self.tasks if t not in self.scores]
        if missing:
            raise ValueError(f"candidate {list(self.tasks)}: no score for tasks {missing}; scores: {dict(self.scores)}")
        bad = {t: self.scores[t] for t in self.tasks if not math.isfinite(float(self.scores[t]))}
        if bad:
            raise ValueError(f"candidate {list(self.tasks)}: scores must be finite, got {bad}")
        if not (math.isfinite(self.cost) and self.cost > 0):
            raise ValueError(f"candidate {list(self.tasks)}: cost must be > 0, got {self.cost}")
        object.__setattr__(self, "scores", {t: float(self.scores[t]) for t in self.tasks})

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "cost": self.cost,
            "kind": self.kind,
            "source": self.source,
            "scores": dict(self.scores),
            "total": sum(self.scores.values()),
        }


@dataclass(frozen=True)
class Selection:
    """The networks to train and which of them serves each task.

    Attributes:
        networks: the chosen candidates.
        served: ``{task: index into networks}``; each task is served by the chosen network with its lowest
            score (ties: the first such network).
        objective: the sum over tasks of the served scores (the predicted total loss for loss scores).
        cost: total cost of the chosen networks (at most the budget).
        budget: the budget the search ran under.
        nodes: search nodes visited (branch and bound) or sets evaluated (exhaustive).
    """

    networks: tuple[Candidate, ...]
    served: dict[str, int]
    objective: float
    cost: float
    budget: float
    nodes: int = 0
    method: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def serves(self, index: int) -> list[str]:
        """The tasks network ``index`` serves."""
        return [t for t, i in self.served.items() if i == index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "networks": [{**n.to_dict(), "serves": self.serves(i)} for i, n in enumerate(self.networks)],
            "served": {t: list(self.networks[i].tasks) for t, i in self.served.items()},
            "objective": self.objective,
            "cost": self.cost,
            "budget": self.budget,
            "search": {"method": self.method, "nodes": self.nodes},
        }


class _Problem:
    """Candidates as index arrays: ``score[c][t]`` (``inf`` where ``c`` does not learn ``t``) and ``cost[c]``."""

    def __init__(self, candidates: Sequence[Candidate], tasks: Sequence[str], budget: float) -> None:
        self.tasks = _check_tasks(tasks)
        if not candidates:
            raise ValueError("network selection needs at least one candidate network, got none")
        if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget must be a positive number of full-size networks, got {budget!r}")
        known = set(self.tasks)
        for c in candidates:
            extra = [t for t in c.tasks if t not in known]
            if extra:
                raise ValueError(
                    f"candidate {list(c.tasks)} learns tasks {extra} that are not among {list(self.tasks)}"
                )
        self.candidates = list(candidates)
        self.budget = float(budget)
        self.score = [[c.scores.get(t, math.inf) for t in self.tasks] for c in self.candidates]
        self.cost = [float(c.cost) for c in self.candidates]
        cheapest, cover = cheapest_cover(self.candidates, self.tasks)
        if cheapest is None:
            uncovered = [t for t in self.tasks if not any(t in c.tasks for c in self.candidates)]
            raise ValueError(f"no candidate network learns tasks {uncovered}; every task needs at least one")
        if cheapest > self.budget + _EPS:
            raise ValueError(
                f"budget={budget:g} is less than the cheapest cover of the {len(self.tasks)} tasks: serving every task "
                f"costs at least {cheapest:g} (e.g. networks {[list(c.tasks) for c in cover]}); "
                f"set budget >= {cheapest:g}"
            )

    def selection(self, chosen: Sequence[int], nodes: int, method: str) -> Selection:
        """A :class:`Selection` of candidate indices ``chosen``, dropping networks that serve no task."""
        served_idx: dict[str, int] = {}
        for t_i, t in enumerate(self.tasks):
            served_idx[t] = min(chosen, key=lambda c: (self.score[c][t_i], chosen.index(c)))
        used = [c for c in chosen if c in served_idx.values()]
        networks = tuple(self.candidates[c] for c in used)
        served = {t: used.index(c) for t, c in served_idx.items()}
        objective = sum(self.score[served_idx[t]][t_i] for t_i, t in enumerate(self.tasks))
        return Selection(networks, served, objective, sum(self.cost[c] for c in used), self.budget, nodes, method)


def cheapest_cover(candidates: Sequence[Candidate], tasks: Sequence[str]) -> tuple[float | None, list[Candidate]]:
    """The least total cost of candidates that together learn every task, and one such set.

    Dynamic programming over subsets of tasks (``2^k`` states). Returns ``(None, [])`` when some task is
    learned by no candidate.
    """
    names = _check_tasks(tasks)
    bit = {t: 1 << i for i, t in enumerate(names)}
    full = (1 << len(names)) - 1
    masks = [(sum(bit[t] for t in c.tasks if t in bit), c) for c in candidates]
    best: list[float] = [math.inf] * (full + 1)
    back: list[tuple[int, int] | None] = [None] * (full + 1)
    best[0] = 0.0
    for state in range(full + 1):  # every transition goes to a superset, i.e. a larger integer
        if best[state] == math.inf:
            continue
        for c_i, (m, c) in enumerate(masks):
            nxt = state | m
            if nxt != state and best[state] + c.cost < best[nxt]:
                best[nxt], back[nxt] = best[state] + c.cost, (state, c_i)
    if best[full] == math.inf:
        return None, []
    cover: list[Candidate] = []
    state = full
    while state:
        prev, c_i = back[state]  # type: ignore[misc]
        cover.append(masks[c_i][1])
        state = prev
    return best[full], cover[::-1]


def branch_and_bound(candidates: Sequence[Candidate], tasks: Sequence[str], budget: float) -> Selection:
    """The set of networks within ``budget`` that minimises the total served score (exact).

    Standley et al. (ICML 2020) §3.3 select networks with a branch-and-bound search. Here: a depth-first
    search over sets of candidates, each taken or skipped in a fixed order (larger groups first, so that a
    good incumbent is found early). A candidate that lowers no task's current score is never taken (it could
    only add cost). A node is pruned when some task can no longer be served, or when the larger of two lower
    bounds on every completion of it is no better than the incumbent:

    1. each task served at its best score among the chosen and the remaining affordable candidates;
    2. the current scores (an uncovered task at its worst score) minus the largest improvement the remaining
       budget can buy: a set's improvement is at most the sum of its members' single improvements (the
       served score, a minimum over networks, is submodular), and that sum is at most the fractional
       knapsack of the single improvements under the remaining budget.

    Returns the same objective value as :func:`exhaustive_search` (checked on random instances in the tests).

    Raises:
        ValueError: if the budget is below the cheapest cover of the tasks (the message gives that cost).
    """
    prob = _Problem(candidates, tasks, budget)
    n, k = len(prob.candidates), len(prob.tasks)
    order = sorted(
        range(n), key=lambda c: (-len(prob.candidates[c].tasks), prob.cost[c], sum(prob.candidates[c].scores.values()))
    )
    score = np.array([prob.score[c] for c in order], dtype=np.float64)  # [n, k], inf where c does not learn t
    cost = np.array([prob.cost[c] for c in order], dtype=np.float64)
    index = np.arange(n)
    limit = prob.budget + _EPS
    # the worst finite score of each task: an uncovered task will be served at no more than this
    worst = np.where(np.isfinite(score), score, -np.inf).max(axis=0)
    best_value = math.inf
    best_set: list[int] = []
    nodes = 0

    def bound(affordable: np.ndarray, current: np.ndarray, room: float) -> float:
        """A lower bound on the objective of every completion of a node (``inf``: none is feasible)."""
        rest = score[affordable]
        per_task = np.minimum(current, rest.min(axis=0)) if len(rest) else current
        if not np.isfinite(per_task).all():
            return math.inf
        cur = np.where(np.isfinite(current), current, worst)
        gains = np.clip(cur - rest, 0.0, None).sum(axis=1) if len(rest) else np.zeros(0)
        keep = gains > 0
        gains, costs = gains[keep], cost[affordable][keep]
        ratio_order = np.argsort(-gains / costs, kind="stable")
        gains, costs = gains[ratio_order], costs[ratio_order]
        spent = np.cumsum(costs)
        whole = spent <= room
        total_gain = float(gains[whole].sum())
        m = int(whole.sum())
        if m < len(gains):  # a fraction of the first candidate that no longer fits whole
            total_gain += float(gains[m]) * (room - (float(spent[m - 1]) if m else 0.0)) / float(costs[m])
        return max(float(per_task.sum()), float(cur.sum()) - total_gain)

    def visit(start: int, chosen: list[int], current: np.ndarray, spent: float) -> None:
        nonlocal best_value, best_set, nodes
        nodes += 1
        if chosen and np.isfinite(current).all():
            value = float(current.sum())
            if value < best_value:
                best_value, best_set = value, list(chosen)
        room = limit - spent
        affordable = index[start:][cost[start:] <= room]
        if bound(affordable, current, room) >= best_value:
            return
        improves = (score[affordable] < current).any(axis=1)
        for c in affordable[improves]:
            chosen.append(int(c))
            visit(int(c) + 1, chosen, np.minimum(current, score[c]), spent + float(cost[c]))
            chosen.pop()

    visit(0, [], np.full(k, math.inf), 0.0)
    return prob.selection([order[c] for c in best_set], nodes, "branch_and_bound")


def exhaustive_search(
    candidates: Sequence[Candidate], tasks: Sequence[str], budget: float, max_sets: int = 5_000_000
) -> Selection:
    """Every affordable set of up to ``len(tasks)`` candidates, scored one by one (for small task counts).

    No optimal solution needs more networks than tasks (each network in it serves at least one task), so
    sets are enumerated by size ``1 .. min(k, budget / cheapest candidate)``. Raises ``ValueError`` when that
    would mean more than ``max_sets`` sets; use :func:`branch_and_bound` then.
    """
    prob = _Problem(candidates, tasks, budget)
    n, k = len(prob.candidates), len(prob.tasks)
    limit = prob.budget + _EPS
    largest = min(k, n, int(limit / min(prob.cost)))
    total = sum(math.comb(n, r) for r in range(1, largest + 1))
    if total > max_sets:
        raise ValueError(
            f"exhaustive search over {n} candidates for {k} tasks at budget {budget:g} would score {total} sets "
            f"(more than max_sets={max_sets}); use branch_and_bound"
        )
    best_value, best_set, evaluated = math.inf, (), 0
    for r in range(1, largest + 1):
        for combo in itertools.combinations(range(n), r):
            if sum(prob.cost[c] for c in combo) > limit:
                continue
            evaluated += 1
            value = 0.0
            for t in range(k):
                value += min(prob.score[c][t] for c in combo)
            if value < best_value:
                best_value, best_set = value, combo
    return prob.selection(list(best_set), evaluated, "exhaustive")


# --------------------------------------------------------------------------------------------------
# A grouping run: settings, the measurer, candidates, selection and the report
# --------------------------------------------------------------------------------------------------

METHODS = ("pairs", "higher_order", "tag")
SEARCHES = ("branch_and_bound", "exhaustive")
KINDS = ("full", "half")
"""Network sizes a measurer trains: ``full`` (cost 1) and ``half`` (a single-task network of scaled width, cost 0.5)."""


@dataclass
class TagConfig:
    """Settings of the ``tag`` method (the ``tag`` block of a grouping config)."""

    every: int = 5
    """Measure the lookahead affinity every N training steps (before the step, on its batch)."""
    lr: float | None = None
    """Lookahead SGD step size; ``None`` = the optimiser's learning rate of the shared parameters. For small steps
    ``Z`` is about proportional to it, so the grouping hardly depends on it; a larger step lifts tiny affinities
    further above float32 rounding of the losses (about 1e-7 relative)."""
    singleton: float = 0.0
    """Score of a task alone in its network (it receives no inter-task affinity)."""


@dataclass
class GroupingConfig:
    """Settings of a grouping run (the top-level grouping keys of ``configs/group.yaml``).

    :func:`group_tasks` reads ``method``, ``budget``, ``half_size``, ``max_group_size``, ``search`` and
    ``tag.singleton``; a :class:`GroupMeasurer` reads ``fraction``, ``half_width``, ``keep_checkpoints``,
    ``tag.every`` and ``tag.lr``; the command writes the result to ``output``.
    """

    method: str = "higher_order"
    """``pairs`` | ``higher_order`` | ``tag`` (see :func:`group_tasks`)."""
    budget: float = 2.0
    """Inference budget in full-size networks (a half-size network costs 0.5)."""
    fraction: float = 0.2
    """Share of the full step budget each scoring network trains for (early-stopping approximation)."""
    half_size: bool = False
    """Also train every task alone in a half-size network of cost 0.5 (``pairs`` / ``higher_order``)."""
    half_width: float = 0.5
    """Width factor of a half-size network."""
    max_group_size: int | None = None
    """Largest group considered as one network (``None`` = all tasks)."""
    search: str = "branch_and_bound"
    """``branch_and_bound`` or ``exhaustive`` (small task counts only)."""
    keep_checkpoints: bool = False
    """Keep each trained network's checkpoints (they are deleted otherwise)."""
    output: str = "grouping.json"
    """File name of the result, written in the run directory."""
    tag: TagConfig = field(default_factory=TagConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"config key method: expected one of {list(METHODS)}, got {self.method!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"config key search: expected one of {list(SEARCHES)}, got {self.search!r}")
        if not (math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"config key budget: expected a positive number of full-size networks, got {self.budget}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"config key fraction: expected a share of the step budget in (0, 1], got {self.fraction}")
        if not 0 < self.half_width < 1:
            raise ValueError(f"config key half_width: expected a width factor in (0, 1), got {self.half_width}")
        if self.max_group_size is not None and self.max_group_size < 1:
            raise ValueError(f"config key max_group_size: expected >= 1 or null, got {self.max_group_size}")
        if self.tag.every < 1:
            raise ValueError(f"config key tag.every: expected >= 1, got {self.tag.every}")
        if self.tag.lr is not None and not self.tag.lr > 0:
            raise ValueError(f"config key tag.lr: expected > 0 or null, got {self.tag.lr}")
        if self.half_size and self.method == "tag":
            raise ValueError(
                "config key half_size: half-size networks are scored by their measured losses, which method=tag "
                "does not train; use method=pairs or method=higher_order, or half_size=false"
            )


GROUPING_KEYS = tuple(f.name for f in fields(GroupingConfig))
"""The top-level keys of a grouping config that :class:`GroupingConfig` holds (the rest configures the networks)."""


def grouping_config(cfg: Mapping[str, Any]) -> GroupingConfig:
    """Validate the grouping keys of a composed config (a ``DictConfig``) against :class:`GroupingConfig`."""
    node = {k: cfg[k] for k in GROUPING_KEYS if k in cfg}
    merged = OmegaConf.merge(OmegaConf.structured(GroupingConfig), node)
    data = OmegaConf.to_container(merged, resolve=True)
    data["tag"] = TagConfig(**data["tag"])  # type: ignore[index,arg-type]
    return GroupingConfig(**data)  # type: ignore[arg-type]


def scoring_steps(full_steps: int, fraction: float) -> int:
    """Steps of one scoring network: ``fraction`` of the full budget, rounded, at least 1 (Standley et al.'s
    early-stopping approximation).

    >>> scoring_steps(6000, 0.2), scoring_steps(3, 0.1)
    (1200, 1)
    """
    return max(1, int(round(fraction * full_steps)))


def group_name(group: Sequence[str], kind: str = "full") -> str:
    """``"click+dwell"``; a half-size network gets a ``half:`` prefix (the keys of a result's ``trained``)."""
    return ("half:" if kind == "half" else "") + "+".join(group)


@dataclass(frozen=True)
class Measurement:
    """What a :class:`GroupMeasurer` reports of one trained network.

    Attributes:
        losses: ``{task: validation loss}`` for every task of the network (lower is better; the scores that
            selection compares, so they must be comparable across networks).
        record: what the result keeps of the training under ``trained`` (e.g. test losses, steps, seconds).
    """

    losses: Mapping[str, float]
    record: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AffinityMeasurement:
    """What a :class:`GroupMeasurer` reports of the one joint TAG run.

    Attributes:
        affinity: ``{i: {j: mean Z_{i->j}}}`` over every task pair (:class:`AffinityMeter`'s mean).
        record: what the result keeps of the run under ``trained.tag_joint``.
    """

    affinity: Affinity
    record: Mapping[str, Any] = field(default_factory=dict)


class GroupMeasurer(Protocol):
    """Trains the networks that score candidate groups, for one domain (e.g. ``mtrec.grouping.RecMeasurer``).

    :func:`group_tasks` calls :meth:`measure` for every single task and pair (and every task in a half-size
    network with ``half_size``) for methods ``pairs`` / ``higher_order``, or :meth:`measure_affinity` once for
    ``tag``; it never sees a model or a dataset.
    """

    full_steps: int
    """The full training budget of one network, in steps (recorded in the result)."""
    scoring_steps: int
    """Steps each scoring network trains for (:func:`scoring_steps` of ``full_steps``)."""

    def measure(self, group: Group, kind: str) -> Measurement:
        """Train one network on ``group`` (``kind``: ``"full"``, or ``"half"`` for a single task in a half-size
        network) for :attr:`scoring_steps`; its per-task validation losses."""
        ...

    def measure_affinity(self, tasks: Group) -> AffinityMeasurement:
        """Train one network on all ``tasks`` for :attr:`scoring_steps`, averaging :func:`lookahead_affinity`."""
        ...


def loss_candidates(
    tasks: Sequence[str],
    measured: Mapping[Sequence[str], Mapping[str, float]],
    *,
    higher_order: bool,
    max_group_size: int | None = None,
    half: Mapping[str, float] | None = None,
) -> list[Candidate]:
    """Candidates scored by validation losses (Standley et al. 2020).

    ``measured`` holds ``{group: {task: loss}}`` for every single task and pair; with ``higher_order``,
    groups of three or more tasks (up to ``max_group_size``) are added with losses from
    :func:`higher_order_estimate`. ``half`` adds half-size single-task networks of cost 0.5.
    """
    by_key = {group_key(g): (tuple(g), v) for g, v in measured.items()}
    top = len(tasks) if higher_order else 2
    if max_group_size is not None:
        top = min(top, max_group_size)
    pairs = {g: v for g, v in (by_key[k] for k in by_key) if len(g) == 2}
    out: list[Candidate] = []
    for g in all_groups(tasks, top):
        if len(g) <= 2:
            if group_key(g) not in by_key:
                raise KeyError(f"no measured losses for the network {list(g)}")
            out.append(Candidate(g, dict(by_key[group_key(g)][1]), 1.0, "full", "measured"))
        else:
            out.append(Candidate(g, higher_order_estimate(g, pairs), 1.0, "full", "higher_order"))
    for t, loss in (half or {}).items():
        out.append(Candidate((t,), {t: float(loss)}, 0.5, "half", "measured"))
    return out


def tag_candidates(
    tasks: Sequence[str], affinity: Affinity, *, max_group_size: int | None = None, singleton: float = 0.0
) -> list[Candidate]:
    """Every group scored by TAG: ``score_t = -(mean affinity onto t from the group's other tasks)``."""
    return [
        Candidate(g, {t: -v for t, v in group_affinity(g, affinity, singleton).items()}, 1.0, "full", "tag")
        for g in all_groups(tasks, max_group_size)
    ]


def candidate_groups(tasks: Sequence[str], config: GroupingConfig) -> list[tuple[Group, float]]:
    """``(group, cost)`` of every candidate network the configured method will score."""
    top = 2 if config.method == "pairs" else len(tasks)
    if config.max_group_size is not None:
        top = min(top, config.max_group_size)
    out = [(g, 1.0) for g in all_groups(tasks, top)]
    if config.half_size:
        out += [((t,), 0.5) for t in tasks]
    return out


def check_budget(tasks: Sequence[str], config: GroupingConfig) -> float:
    """The cheapest cover of ``tasks`` by the configured candidates; ``ValueError`` if ``budget`` is below it.

    :func:`group_tasks` runs it before any measurement, so a bad budget fails at start-up rather than after the
    scoring runs.
    """
    planned = [Candidate(g, {t: 0.0 for t in g}, cost) for g, cost in candidate_groups(tasks, config)]
    cheapest, cover = cheapest_cover(planned, tasks)
    assert cheapest is not None  # every task has its single-task candidate
    if cheapest > config.budget + _EPS:
        raise ValueError(
            f"config key budget: budget={config.budget:g} is less than the cheapest cover of the {len(tasks)} tasks "
            f"{list(tasks)}: with method={config.method}, max_group_size={config.max_group_size} and "
            f"half_size={config.half_size}, serving every task costs at least {cheapest:g} "
            f"(e.g. networks {[list(c.tasks) for c in cover]}); set budget >= {cheapest:g}"
        )
    return cheapest


def select(candidates: Sequence[Candidate], tasks: Sequence[str], budget: float, search: str) -> Selection:
    """Run the configured search (``branch_and_bound`` | ``exhaustive``); budget errors name the ``budget`` key."""
    fn = branch_and_bound if search == "branch_and_bound" else exhaustive_search
    try:
        return fn(candidates, tasks, budget)
    except ValueError as err:
        if "cheapest cover" in str(err):
            raise ValueError(f"config key budget: {err}") from err
        raise


def group_tasks(
    tasks: Sequence[str],
    measurer: GroupMeasurer,
    config: GroupingConfig,
    *,
    settings: Mapping[str, Any] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Which of ``tasks`` to train together under ``config.budget``: measure, score the candidates, select.

    Methods (``config.method``):

    * ``pairs``: :meth:`GroupMeasurer.measure` trains every single task and every pair; the candidates are those
      networks, scored by their per-task validation losses (Standley et al. 2020).
    * ``higher_order``: the same measurements; every larger group is a candidate too, its per-task losses
      estimated from the pairs (Standley §3.2, :func:`higher_order_estimate`).
    * ``tag``: :meth:`GroupMeasurer.measure_affinity` trains one joint network; every group is scored by minus
      the mean affinity onto each member from the others (Fifty et al. 2021, :func:`tag_candidates`).

    ``config.half_size`` also measures each task alone in a half-size network (cost 0.5). The budget is checked
    against the cheapest cover (:func:`check_budget`) before anything is measured; :func:`select` then picks the
    networks and which network serves each task.

    Args:
        tasks: the task names, in order.
        measurer: trains the scoring networks.
        config: the grouping settings.
        settings: more entries of the result's ``settings`` (what configured the measurer, e.g. data and model).
        started: ``time.perf_counter()`` at the start of the run (default: on entry), for the result's ``seconds``.

    Returns:
        ``{"settings", "affinity", "trained", "candidates", "networks", "served", "objective", "objective_kind",
        "predicted_total_loss" (``None`` for ``tag``), "cost", "search", "seconds"}``, JSON-ready through
        :func:`write_result`; :func:`report` renders it as a table.
    """
    started = time.perf_counter() if started is None else started
    tasks = list(_check_tasks(tasks))
    cheapest = check_budget(tasks, config)
    result: dict[str, Any] = {
        "settings": {
            **asdict(config),
            "tasks": tasks,
            "cheapest_cover": cheapest,
            "full_steps": measurer.full_steps,
            "scoring_steps": measurer.scoring_steps,
            **(settings or {}),
        }
    }
    if config.method == "tag":
        joint = measurer.measure_affinity(tuple(tasks))
        candidates = tag_candidates(
            tasks, joint.affinity, max_group_size=config.max_group_size, singleton=config.tag.singleton
        )
        result["affinity"] = {
            "kind": "lookahead: Z[i][j] = 1 - L_j(theta_s - lr * grad L_i) / L_j(theta_s), mean over training "
            "(Fifty et al. 2021)",
            "values": joint.affinity,
        }
        result["trained"] = {"tag_joint": dict(joint.record)}
    else:
        measured = {g: measurer.measure(g, "full") for g in all_groups(tasks, 2)}
        halves = {t: measurer.measure((t,), "half") for t in tasks} if config.half_size else {}
        val = {g: m.losses for g, m in measured.items()}
        candidates = loss_candidates(
            tasks,
            val,
            higher_order=config.method == "higher_order",
            max_group_size=config.max_group_size,
            half={t: m.losses[t] for t, m in halves.items()},
        )
        singles = {g[0]: v[g[0]] for g, v in val.items() if len(g) == 1}
        pairs = {g: v for g, v in val.items() if len(g) == 2}
        result["affinity"] = {
            "kind": "pair loss change: A[i][j] = 1 - L_j({i,j}) / L_j({j}) (validation losses)",
            "values": pair_loss_affinity(singles, pairs),
        }
        result["trained"] = {group_name(g): dict(m.record) for g, m in measured.items()}
        result["trained"].update({group_name((t,), "half"): dict(m.record) for t, m in halves.items()})

    t0 = time.perf_counter()
    selection = select(candidates, tasks, config.budget, config.search)
    search_seconds = time.perf_counter() - t0
    chosen = selection.to_dict()
    chosen["search"]["seconds"] = round(search_seconds, 4)
    losses = config.method != "tag"
    result.update(
        {
            "candidates": [c.to_dict() for c in candidates],
            "networks": chosen["networks"],
            "served": chosen["served"],
            "objective": selection.objective,
            "objective_kind": "sum of served validation losses"
            if losses
            else "minus the sum over tasks of the mean affinity onto the task in its serving network",
            "predicted_total_loss": selection.objective if losses else None,
            "cost": selection.cost,
            "search": chosen["search"],
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
    return result


def write_result(result: Mapping[str, Any], path: str | Path) -> None:
    """Write a :func:`group_tasks` result as JSON, atomically (arrays and tensors as lists, other objects as text)."""
    atomic_write_json(json.loads(json.dumps(result, default=_json_default)), path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def report(result: Mapping[str, Any]) -> str:
    """The chosen grouping of a :func:`group_tasks` result as a small table (what ``mtlib-group`` prints)."""
    s = result["settings"]
    fmt = ".4f" if s["method"] != "tag" else ".3g"
    rows = [
        [
            "+".join(n["tasks"]),
            n["kind"],
            f"{n['cost']:g}",
            ", ".join(n["serves"]),
            ", ".join(f"{t}={n['scores'][t]:{fmt}}" for t in n["serves"]),
        ]
        for n in result["networks"]
    ]
    score = "predicted loss" if s["method"] != "tag" else "score (-affinity)"
    lines = [
        f"method={s['method']} budget={s['budget']:g} tasks={s['tasks']} scoring networks trained for "
        f"{s['scoring_steps']} of {s['full_steps']} steps",
        _table(["network", "size", "cost", "serves", score], rows),
        f"cost {result['cost']:g} of budget {s['budget']:g}; "
        + (
            f"predicted total loss {result['predicted_total_loss']:.4f}"
            if result["predicted_total_loss"] is not None
            else f"objective {result['objective']:.4g} (negated total affinity)"
        ),
    ]
    return "\n".join(lines)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
