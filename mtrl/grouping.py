"""Task grouping for multi-task RL: which tasks of a family to train together under a budget, behind ``mtrl-group``.

Standley et al., "Which Tasks Should Be Learned Together in Multi-task Learning?", ICML 2020. The run itself (the
budget check, candidate groups, the higher-order approximation, branch and bound, the report) is the task-agnostic
:func:`mtl.grouping.group_tasks`, shared with recommendation (:mod:`mtrec.grouping`). This module supplies what it
measures with: :class:`RLMeasurer` trains one ``mtrl-train`` agent (:func:`mtrl.train.run`) per scoring network on
the family restricted to the network's tasks (:class:`TaskSubsetFamily`), for ``fraction`` of the full step budget
``trainer.total_steps`` (Standley's early-stopping approximation), and scores each task of the network by its final
deterministic evaluation.

The per-task **loss** (lower is better, comparable across networks because every network is evaluated on the same
episodes of the task: :func:`mtrl.evaluate.evaluate` seeds episode ``e`` of a task from the run's seed, the task's
index in its network and ``e``; see ``score``):

* ``score=return``: minus the mean evaluation return of the task (the default: dense, so it separates networks that
  all fail or all succeed);
* ``score=success``: ``1 - success rate``.

Methods (``method=``): ``pairs`` (every single task and pair is trained; the candidates are those networks) and
``higher_order`` (the same trainings, larger groups scored from their pairs, Standley §3.2). ``tag`` (Fifty et al.
2021) needs a lookahead step inside the SAC update on one shared batch, which :mod:`mtrl.train` has no hook for; it
is refused at start-up. ``half_size=true`` also trains every task alone in an agent whose widths (``hidden``,
``*_hidden``, ``*_dim`` of ``agent``) are scaled by ``half_width`` (cost 0.5).

A known answer on the point-mass (``configs/mtrl_group.yaml``'s defaults): goals on a circle of 8
(:class:`mtrl.envs.pointmass.PointMassFamily` with ``num_goals=8``), tasks ``goal-0deg`` and ``goal-45deg`` near
each other and ``goal-180deg`` opposite. A network whose policy cannot tell its tasks apart (``agent=task_blind_sac``)
takes one path for all of them: in the near pair it can reach one goal and stay ``0.77`` from the other, while in a
pair with the opposite goal reaching one goal leaves the other ``1.85``-``2.0`` away (and waiting between them leaves
both about ``1`` away, with no success bonus). With a budget of two networks
the right answer is ``{goal-0deg, goal-45deg}`` and ``{goal-180deg}`` alone (``tests/test_mtrl_grouping.py``).

Examples (the command line is :mod:`mtrl.cli.group`)::

    mtrl-group                                           # the point-mass set above, higher_order, budget 2
    mtrl-group agent=mt_sac budget=2 trainer.total_steps=20000
    mtrl-group env=mt10 '~env.num_goals' 'task_names=[reach-v3,push-v3,drawer-close-v3]' agent=mt_sac
    mtrl-group env=mt10 '~env.num_goals' task_names=null method=pairs budget=3   # all of MT10: 55 agents (days here)

(``~env.num_goals`` drops the point-mass setting ``configs/mtrl_group.yaml`` adds to ``env``, which another family
does not take.)

Writes ``grouping.json`` in the Hydra run directory (the measured per-task losses, successes and returns of every
trained network, candidate scores, chosen networks, served tasks, predicted total loss, settings) and one
``mtrl-train`` run directory per trained network under ``networks/``.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.grouping import (
    GROUPING_KEYS,
    KINDS,
    AffinityMeasurement,
    GroupingConfig,
    Measurement,
    group_name,
    group_tasks,
    grouping_config,
    report,
    scoring_steps,
    write_result,
)
from mtrl.config import check_config, trainer_config
from mtrl.envs.base import TaskFamily

__all__ = [
    "PROGRAM",
    "RL_GROUPING_KEYS",
    "SCORES",
    "RLMeasurer",
    "TaskSubsetFamily",
    "network_config",
    "run_rl_grouping",
    "scale_agent_widths",
    "task_loss",
    "task_subset_family",
]

PROGRAM = "mtrl-group"
#: ``score``: what a network's per-task loss is made of (see the module docstring).
SCORES = ("return", "success")
#: The top-level keys of ``configs/mtrl_group.yaml`` beyond those of ``mtrl-train`` and the grouping settings.
RL_GROUPING_KEYS = ("task_names", "score")
log = logging.getLogger("mtrl.grouping")

Group = tuple[str, ...]


# ------------------------------------------------------------------------------------------- task subsets


class _SubsetEnv(gym.Wrapper):
    """An env of a family's task seen as task ``index`` of a subset family (``obs["task"]``, ``info["task"]``)."""

    def __init__(self, env: gym.Env, index: int, num_tasks: int) -> None:
        super().__init__(env)
        self.index = int(index)
        self.observation_space = spaces.Dict({"obs": env.observation_space["obs"], "task": spaces.Discrete(num_tasks)})

    def reset(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return {"obs": obs["obs"], "task": self.index}, {**info, "task": self.index}

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return {"obs": obs["obs"], "task": self.index}, reward, terminated, truncated, {**info, "task": self.index}


class TaskSubsetFamily(TaskFamily):
    """The tasks ``tasks`` of ``family`` (names or indices, in that order) as a family of their own, indexed from 0:
    what one scoring network trains on. Metadata are the tasks' rows.

    Raises:
        ValueError: an unknown or repeated task, or no task.
    """

    def __init__(self, family: TaskFamily, tasks: Sequence[int | str]) -> None:
        if isinstance(tasks, str) or not len(tasks):
            raise ValueError(f"a task subset needs a list of one or more tasks of {family.name}, got {tasks!r}")
        self.base = family
        self.indices = tuple(family.task_index(t) for t in tasks)
        if len(set(self.indices)) != len(self.indices):
            raise ValueError(f"a task subset names each task once, got {list(tasks)}")
        self.task_names = tuple(family.task_names[i] for i in self.indices)
        self.name = f"{family.name}[{'+'.join(self.task_names)}]"
        self.metadata = np.asarray(family.metadata)[list(self.indices)]
        self.max_episode_steps = family.max_episode_steps
        self.obs_dim, self.action_dim = family.obs_dim, family.action_dim
        self.vectorization, self.envs_per_task = family.vectorization, family.envs_per_task

    def make_env(self, task: int, seed: int | None = None, render_mode: str | None = None) -> gym.Env:
        index = self.task_index(task)
        env = self.base.make_env(self.indices[index], seed=seed, render_mode=render_mode)
        return _SubsetEnv(env, index, len(self.indices))

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "subset": list(self.task_names), "task_indices_in_family": list(self.indices)}


def task_subset_family(family: TaskFamily, tasks: Sequence[int | str]) -> TaskSubsetFamily:
    """Hydra target of a scoring network's ``env`` node: ``{_target_: mtrl.grouping.task_subset_family, family: <env>,
    tasks: [names]}``."""
    return TaskSubsetFamily(family, list(tasks))


# ---------------------------------------------------------------------------------------- network configs


def scale_agent_widths(agent: Any, factor: float) -> DictConfig:
    """A copy of an ``agent`` node with every width scaled by ``factor`` (rounded up, at least 1): ``hidden`` and
    ``*_hidden`` lists, ``*_dim`` ints (CARE's ``expert_dim``, ``context_dim``).

    >>> dict(scale_agent_widths({"hidden": [64, 64], "expert_dim": 64, "num_experts": 4}, 0.5))
    {'hidden': [32, 32], 'expert_dim': 32, 'num_experts': 4}
    """
    node = OmegaConf.to_container(agent, resolve=True) if isinstance(agent, DictConfig) else copy.deepcopy(dict(agent))
    assert isinstance(node, dict)

    def scale(v: Any) -> int:
        return max(1, math.ceil(int(v) * factor - 1e-9))

    for key, value in list(node.items()):
        key = str(key)
        if (key == "hidden" or key.endswith("_hidden")) and isinstance(value, list):
            node[key] = [scale(v) for v in value]
        elif key.endswith("_dim") and isinstance(value, int) and not isinstance(value, bool):
            node[key] = scale(value)
    return OmegaConf.create(node)


def network_config(cfg: DictConfig, tasks: Sequence[str], total_steps: int, width: float | None = None) -> DictConfig:
    """The ``mtrl-train`` config of one scoring network: the family restricted to ``tasks``, ``total_steps`` steps,
    the agent's widths scaled by ``width`` (a half-size network), no resume, no intermediate checkpoints."""
    node = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(node, dict)
    for key in (*GROUPING_KEYS, *RL_GROUPING_KEYS, "hydra"):
        node.pop(key, None)
    out = OmegaConf.create(node)
    out.env = {"_target_": "mtrl.grouping.task_subset_family", "family": node["env"], "tasks": list(tasks)}
    out.trainer.total_steps = int(total_steps)
    out.trainer.resume = False
    if width is not None:
        out.agent = scale_agent_widths(out.agent, width)
    return out


def task_loss(result: dict[str, Any], task: str, score: str) -> float:
    """A task's loss in a network from its evaluation (``score``: ``return`` -> minus the mean return, ``success``
    -> one minus the success rate)."""
    r = result["tasks"][task]
    return -float(r["return"]) if score == "return" else 1.0 - float(r["success"])


# --------------------------------------------------------------------------------------------- the measurer


class RLMeasurer:
    """The :class:`mtl.grouping.GroupMeasurer` of multi-task RL: trains each scoring network with
    :func:`mtrl.train.run` on :class:`TaskSubsetFamily` under ``root/<network name>``.

    Args:
        cfg: the composed ``mtrl_group`` config (its ``mtrl-train`` keys configure every network).
        config: the grouping settings (``fraction``, ``half_width``, ``keep_checkpoints``).
        root: where the networks' run directories go.
        score: ``return`` or ``success`` (see :func:`task_loss`).
    """

    def __init__(self, cfg: DictConfig, config: GroupingConfig, root: str | Path, score: str = "return") -> None:
        if score not in SCORES:
            raise ValueError(f"config key score: expected one of {list(SCORES)}, got {score!r}")
        self.cfg, self.config, self.root, self.score = cfg, config, Path(root), score
        self.full_steps = int(trainer_config(cfg.trainer).total_steps)
        self.scoring_steps = scoring_steps(self.full_steps, config.fraction)

    def measure(self, group: Group, kind: str) -> Measurement:
        """Train one agent on ``group`` for :attr:`scoring_steps`; ``kind="half"``: widths x ``half_width``."""
        from mtrl.train import run

        if kind not in KINDS:
            raise ValueError(f"RLMeasurer.measure: kind must be one of {list(KINDS)}, got {kind!r}")
        name = group_name(group, kind)
        run_dir = self.root / name.replace(":", "_")
        width = self.config.half_width if kind == "half" else None
        start = time.perf_counter()
        result = run(network_config(self.cfg, group, self.scoring_steps, width), run_dir)
        if not self.config.keep_checkpoints:
            for path in run_dir.glob("*.pt"):
                path.unlink()
        losses = {t: task_loss(result, t, self.score) for t in group}
        record = {
            "tasks": list(group),
            "val": losses,
            "success": {t: float(result["tasks"][t]["success"]) for t in group},
            "return": {t: float(result["tasks"][t]["return"]) for t in group},
            "steps": int(result["step"]),
            "seconds": round(time.perf_counter() - start, 3),
        }
        log.info("trained %s for %d steps: success %s, return %s", name, result["step"], record["success"],
                 {t: round(v, 2) for t, v in record["return"].items()})  # fmt: skip
        return Measurement(losses, record)

    def measure_affinity(self, tasks: Group) -> AffinityMeasurement:
        """Not available for RL (see the module docstring); :func:`run_rl_grouping` refuses ``method=tag`` first."""
        raise ValueError(_TAG_REFUSED)


_TAG_REFUSED = (
    "config key method: method=tag measures lookahead affinity inside the update on one shared batch, which the SAC "
    "trainer has no hook for; use method=pairs or method=higher_order"
)


# ---------------------------------------------------------------------------------------- the entry point


def _tasks(cfg: DictConfig, family: TaskFamily) -> list[str]:
    names = cfg.get("task_names")
    if names is None:
        return list(family.task_names)
    if isinstance(names, str) or not OmegaConf.is_list(names) or not len(names):
        raise ValueError(f"config key task_names: expected a list of task names or null, got {names!r}")
    unknown = [str(n) for n in names if str(n) not in family.task_names]
    if unknown:
        raise ValueError(f"config key task_names: {unknown} not in the env's tasks {list(family.task_names)}")
    if len(set(map(str, names))) != len(names):
        raise ValueError(f"config key task_names: each task once, got {list(names)}")
    return [str(n) for n in names]


def run_rl_grouping(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Check the config, choose the networks under the budget (:func:`mtl.grouping.group_tasks` with an
    :class:`RLMeasurer`), print them and write the JSON result; returns it.

    Raises:
        ValueError: a configuration error, found before any network trains: a key neither ``mtrl-train`` nor the
            grouping reads (checked as ``mtrl-train`` checks its config, :func:`mtrl.config.check_config`), a
            grouping setting out of range, ``method=tag``, unknown ``task_names``, a budget below the cheapest cover,
            or scoring networks too short to update (``fraction * trainer.total_steps <= trainer.learning_starts``).
    """
    started = time.perf_counter()
    known = (*GROUPING_KEYS, *RL_GROUPING_KEYS, "hydra")
    check_config(OmegaConf.create({k: cfg._get_node(k) for k in cfg if k not in known}), PROGRAM)
    try:
        gcfg = grouping_config(cfg)
    except Exception as err:  # OmegaConf's validation errors name the key on their first line
        raise ValueError(f"grouping settings: {str(err).splitlines()[0]}") from None
    if gcfg.method == "tag":
        raise ValueError(_TAG_REFUSED)
    score = str(cfg.get("score", "return"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = instantiate(cfg.env)
    tasks = _tasks(cfg, family)
    measurer = RLMeasurer(cfg, gcfg, out_dir / "networks", score)
    tcfg = trainer_config(cfg.trainer)
    if measurer.scoring_steps <= tcfg.learning_starts:
        raise ValueError(
            f"config key fraction: scoring networks train for fraction * trainer.total_steps = "
            f"{measurer.scoring_steps} steps, not more than trainer.learning_starts = {tcfg.learning_starts}, so they "
            "would never update; raise fraction or trainer.total_steps, or lower trainer.learning_starts"
        )
    if not gcfg.keep_checkpoints:
        shutil.rmtree(out_dir / "networks", ignore_errors=True)  # a rerun into the same directory starts afresh
    settings = {
        "score": score,
        "loss": "minus the mean evaluation return" if score == "return" else "1 - evaluation success rate",
        "env": family.describe(),
        "agent": OmegaConf.to_container(cfg.agent, resolve=True),
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
        "sac": OmegaConf.to_container(cfg.sac, resolve=True) if cfg.get("sac") is not None else None,
        "seed": int(cfg.seed),
    }
    result = group_tasks(tasks, measurer, gcfg, settings=settings, started=started)
    write_result(result, out_dir / gcfg.output)
    print(report(result))
    print(f"wrote {out_dir / gcfg.output}")
    return result
