"""``mtlib-group``: which tasks of a recommendation dataset to train together, under an inference budget.

Standley et al., "Which Tasks Should Be Learned Together in Multi-task Learning?", ICML 2020, and
Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021 (TAG).
The task-agnostic parts (higher-order approximation, lookahead affinity, branch and bound) live in
:mod:`mtl.grouping`; this module trains the networks that feed them and writes the answer.

Methods (``method=``):

* ``pairs``: every single task and every pair is trained with :func:`mtrec.train.run` for ``fraction`` of
  the full step budget (Standley's early-stopping approximation); candidates are those networks, scored by
  their per-task validation losses.
* ``higher_order``: the same trainings; every larger group is a candidate too, its per-task losses
  estimated from the pairs (Standley §3.2, :func:`mtl.grouping.higher_order_estimate`).
* ``tag``: one joint network of all tasks is trained for ``fraction`` of the budget while
  :class:`AffinityTrainer` measures the lookahead affinity every ``tag.every`` steps; every group is
  scored by the mean affinity onto each member from the others (Fifty et al. §3.3).

``half_size=true`` also trains each task alone in a network whose widths are scaled by ``half_width``
(cost 0.5). :func:`mtl.grouping.branch_and_bound` then picks the networks (``budget`` in full-network
units) and which network serves each task. The full step budget is ``trainer.max_steps`` when set, else
``trainer.max_epochs`` passes over the training rows.

Examples::

    mtlib-group                                                # higher_order, budget 2, synthetic data
    mtlib-group method=tag budget=1.5 tag.every=10
    mtlib-group data=census data.path=PATH method=pairs budget=1 half_size=true
    mtlib-group data._target_=mtrec.grouping.load_sparse_synthetic_unrelated   # a 4th, unrelated task

Writes ``grouping.json`` in the Hydra run directory (affinities, candidate scores, chosen networks, served
tasks, predicted total loss, settings) and one sub-directory per trained network under ``networks/``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.checkpoint import atomic_write_json, load_checkpoint, seed_everything
from mtl.grouping import (
    Affinity,
    AffinityMeter,
    Candidate,
    Selection,
    all_groups,
    branch_and_bound,
    cheapest_cover,
    exhaustive_search,
    group_affinity,
    group_key,
    higher_order_estimate,
    lookahead_affinity,
    pair_loss_affinity,
)
from mtl.scheduling import TaskStreams
from mtl.tasks import TaskSpec, compute_losses
from mtrec.data.batch import Batch, DataBundle, TabularDataset
from mtrec.data.synthetic import load_sparse_synthetic
from mtrec.train import CONFIG_DIR, build_training, run, select_tasks, trainer_config
from mtrec.trainer import LAST, Trainer, batch_to, evaluate

log = logging.getLogger("mtrec.grouping")

METHODS = ("pairs", "higher_order", "tag")
SEARCHES = ("branch_and_bound", "exhaustive")
Group = tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass
class TagConfig:
    """Settings of the ``tag`` method (the ``tag`` block of ``configs/group.yaml``)."""

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
    """Settings of ``mtlib-group`` (top-level keys of ``configs/group.yaml``; the rest is ``mtrec.yaml``)."""

    method: str = "higher_order"
    """``pairs`` | ``higher_order`` | ``tag`` (see the module docstring)."""
    budget: float = 2.0
    """Inference budget in full-size networks (a half-size network costs 0.5)."""
    fraction: float = 0.2
    """Share of the full step budget each scoring network trains for (early-stopping approximation)."""
    half_size: bool = False
    """Also train every task alone in a half-size network of cost 0.5 (``pairs`` / ``higher_order``)."""
    half_width: float = 0.5
    """Width factor of a half-size network: every ``*_dim`` / ``*_dims`` entry of ``model`` is scaled by it."""
    max_group_size: int | None = None
    """Largest group considered as one network (``None`` = all tasks)."""
    search: str = "branch_and_bound"
    """``branch_and_bound`` or ``exhaustive`` (small task counts only)."""
    keep_checkpoints: bool = False
    """Keep each trained network's ``best.pt`` / ``last.pt`` under ``networks/`` (they are deleted otherwise)."""
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


def grouping_config(cfg: DictConfig) -> GroupingConfig:
    """Validate the grouping keys of a composed ``group`` config against :class:`GroupingConfig`."""
    node = {k: cfg[k] for k in GROUPING_KEYS if k in cfg}
    merged = OmegaConf.merge(OmegaConf.structured(GroupingConfig), node)
    data = OmegaConf.to_container(merged, resolve=True)
    data["tag"] = TagConfig(**data["tag"])  # type: ignore[index,arg-type]
    return GroupingConfig(**data)  # type: ignore[arg-type]


def network_config(cfg: DictConfig, tasks: Sequence[str], max_steps: int, width: float | None = None) -> DictConfig:
    """The ``mtrec-train`` config of one network: ``tasks`` only, ``max_steps`` steps, widths scaled by ``width``."""
    node = OmegaConf.to_container(cfg, resolve=False)
    for key in GROUPING_KEYS:
        node.pop(key, None)  # type: ignore[union-attr]
    node.pop("hydra", None)  # type: ignore[union-attr]
    out = OmegaConf.create(node)
    out.task_names = list(tasks)
    out.trainer.max_steps = int(max_steps)
    if width is not None:
        out.model = scale_widths(out.model, width)
    return out


def scale_widths(model: Any, factor: float) -> DictConfig:
    """A copy of a ``model`` config node with every ``*_dim`` int and ``*_dims`` list scaled (at least 1).

    >>> dict(scale_widths({"embedding_dim": 16, "bottom_dims": [113], "num_experts": 8}, 0.5))
    {'embedding_dim': 8, 'bottom_dims': [57], 'num_experts': 8}
    """
    node = OmegaConf.to_container(model, resolve=False) if isinstance(model, DictConfig) else dict(model)

    def scale(v: Any) -> int:
        return max(1, math.ceil(int(v) * factor - 1e-9))

    for key, value in list(node.items()):  # type: ignore[union-attr]
        if key.endswith("_dim") and isinstance(value, int) and not isinstance(value, bool):
            node[key] = scale(value)  # type: ignore[index]
        elif key.endswith("_dims") and isinstance(value, list):
            node[key] = [scale(v) for v in value]  # type: ignore[index]
    return OmegaConf.create(node)


def full_step_budget(cfg: DictConfig, n_train: int) -> int:
    """``trainer.max_steps`` when set, else ``trainer.max_epochs`` passes of ``trainer.batch_size`` rows."""
    tcfg = trainer_config(cfg.trainer)
    if tcfg.max_steps is not None:
        return int(tcfg.max_steps)
    return int(tcfg.max_epochs * -(-n_train // tcfg.batch_size))


# --------------------------------------------------------------------------------------------------
# A dataset with a deliberately unrelated task
# --------------------------------------------------------------------------------------------------


def add_unrelated_task(
    bundle: DataBundle, name: str = "unrelated", seed: int = 0, dense_pair: tuple[int, int] = (0, 1)
) -> DataBundle:
    """``bundle`` with one more binary task whose labels depend on the features through a function unrelated
    to every other task.

    ``z = 1.5 * dense[a] * dense[b] + e[category]`` with ``e ~ N(0, 1)`` drawn per category from its own
    generator (independent of the generator of the other labels), and ``label ~ Bernoulli(sigmoid(z))``.
    The other tasks of the sparse synthetic log depend on users' and items' latent factors, biases and
    *linear* dense effects, so this task shares inputs with them but no signal: the kind of task grouping
    should keep out of the others' networks when capacity is scarce. Without a ``category`` feature, or with
    fewer dense features than needed, the missing term is left out.
    """
    if name in {t.name for t in bundle.tasks}:
        raise ValueError(f"add_unrelated_task: the bundle already has a task named {name!r}")
    rng = np.random.default_rng([int(seed), 0x6F7570])
    ncat = next((f.num_embeddings for f in bundle.features.sparse if f.name == "category"), 0)
    cat_effect = rng.standard_normal(max(ncat, 1))
    a, b = dense_pair

    def labels(data: TabularDataset) -> torch.Tensor:
        z = np.zeros(len(data))
        dense = data.dense.numpy()
        if dense.shape[1] > max(a, b):
            z += 1.5 * dense[:, a] * dense[:, b]
        if ncat:
            z += cat_effect[data.sparse_ids["category"][:, 0].numpy()]
        p = 1.0 / (1.0 + np.exp(-z))
        return torch.from_numpy((rng.random(len(data)) < p).astype(np.float32))

    splits = {}
    for split in ("train", "val", "test"):
        data: TabularDataset = getattr(bundle, split)
        splits[split] = TabularDataset(
            dense=data.dense,
            sparse_ids=data.sparse_ids,
            sparse_lengths=data.sparse_lengths,
            labels={**data.labels, name: labels(data)},
        )
    meta = dict(bundle.meta)
    meta["unrelated_task"] = {
        "name": name,
        "function": f"Bernoulli(sigmoid(1.5 * d{a} * d{b} + e[category])), e ~ N(0, 1) per category",
        "rate_train": float(splits["train"].labels[name].mean()) if len(splits["train"]) else float("nan"),
    }
    return DataBundle(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        features=bundle.features,
        tasks=[*bundle.tasks, TaskSpec(name, "binary")],
        meta=meta,
    )


def load_sparse_synthetic_unrelated(unrelated_task: str = "unrelated", **kwargs: Any) -> DataBundle:
    """:func:`mtrec.data.load_sparse_synthetic` (tasks click, conversion, dwell) plus :func:`add_unrelated_task`.

    Takes every keyword of ``load_sparse_synthetic``, so ``data._target_=mtrec.grouping.
    load_sparse_synthetic_unrelated`` turns the ``synthetic`` data config into a four-task dataset.
    """
    bundle = load_sparse_synthetic(**kwargs)
    return add_unrelated_task(bundle, unrelated_task, seed=int(kwargs.get("seed", 0)))


# --------------------------------------------------------------------------------------------------
# TAG: the lookahead affinity hook inside the mtrec Trainer
# --------------------------------------------------------------------------------------------------


def shared_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the optimiser's ``shared`` parameter group (else of its first group)."""
    for group in optimizer.param_groups:
        if group.get("name") == "shared":
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


class AffinityTrainer(Trainer):
    """A :class:`~mtrec.trainer.Trainer` that measures TAG's lookahead affinity every ``every`` steps.

    Before every ``every``-th optimiser step, :func:`mtl.grouping.lookahead_affinity` steps the shared
    parameters on each task's loss of that step's batch and measures every task's relative loss change
    (Fifty et al., NeurIPS 2021); :attr:`affinity` averages the measurements. The measurement restores the
    parameters and the RNG state, so training itself is exactly that of a plain :class:`Trainer`.

    Args:
        every: measure before steps ``0, every, 2 * every, ...``.
        lookahead_lr: the lookahead step size; ``None`` = the learning rate of the optimiser's shared group.
        *args, **kwargs: as for :class:`Trainer`.
    """

    def __init__(self, *args: Any, every: int = 5, lookahead_lr: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if every < 1:
            raise ValueError(f"AffinityTrainer: every must be >= 1, got {every}")
        if not self.shared_params:
            raise ValueError(
                f"TAG needs shared parameters, but {type(self.model).__name__} shares none; "
                "use a model with a shared body (e.g. model=shared_bottom or model=mmoe)"
            )
        self.every = int(every)
        self.lookahead_lr = float(lookahead_lr) if lookahead_lr is not None else shared_lr(self.optimizer)
        self.affinity = AffinityMeter()
        self.affinity_seconds = 0.0

    def measure_affinity(self, batch: Batch) -> Affinity:
        """One lookahead measurement on ``batch`` (every task's loss, the model in training mode)."""
        batch = batch_to(batch, self.device)
        self.model.train()

        def losses() -> dict[str, torch.Tensor]:
            return compute_losses(self.tasks, self.model(batch.dense, batch.sparse), batch.labels)

        start = time.perf_counter()
        z = lookahead_affinity(self.shared_params, losses, self.lookahead_lr)
        self.affinity_seconds += time.perf_counter() - start
        self.affinity.update(z)
        return z

    def state_dict(self) -> dict[str, Any]:
        """The trainer's state plus the affinity meter, so a resumed run keeps averaging where it stopped."""
        return {**super().state_dict(), "affinity": self.affinity.state_dict()}

    def load_last(self) -> bool:
        if not super().load_last():
            return False
        state = load_checkpoint(self.run_dir / LAST)
        if "affinity" in state:
            self.affinity.load_state_dict(state["affinity"])
        return True

    def train_step(self, batch: Batch | TaskStreams[Batch]) -> dict[str, float]:
        if isinstance(batch, TaskStreams):
            raise ValueError(
                "TAG measures every task's loss on one shared batch, but this run draws a separate batch per task "
                "(config key task_split); set task_split=null for method=tag"
            )
        if self.step % self.every == 0:
            self.measure_affinity(batch)
        return super().train_step(batch)


def _distillation_configured(node: Any) -> bool:
    """Whether the ``distill`` node of ``mtrec.yaml`` turns distillation on (``distill=none`` has no teachers)."""
    if node is None:
        return False
    if not isinstance(node, DictConfig) or "teachers" not in node:
        return True
    return OmegaConf.is_missing(node, "teachers") or node.teachers is not None


def train_with_affinity(
    cfg: DictConfig, bundle: DataBundle, run_dir: str | Path, every: int, lookahead_lr: float | None = None
) -> dict[str, Any]:
    """Train the joint network of ``cfg`` (as :func:`mtrec.train.run` does) while measuring lookahead affinity.

    Returns ``{"affinity": {i: {j: mean Z_{i->j}}}, "measurements": n, "val": ..., "test": ..., "steps": s,
    "lookahead_lr": lr, "seconds": s, "affinity_seconds": s}``.
    """
    run_dir = Path(run_dir)
    if _distillation_configured(cfg.get("distill")):
        raise ValueError(
            "config key distill: the TAG measuring run trains on the plain task losses; drop distill for method=tag"
        )
    if cfg.get("task_split"):
        raise ValueError(
            "config key task_split: TAG measures every task's loss on one shared batch; set task_split=null"
        )
    start = time.perf_counter()
    training = build_training(cfg, run_dir, bundle, trainer_cls=AffinityTrainer, every=every, lookahead_lr=lookahead_lr)
    trainer = training.trainer
    assert isinstance(trainer, AffinityTrainer)
    trainer.fit(training.train, bundle.val)
    trainer.load_best()
    test = evaluate(trainer.model, bundle.test, training.tasks, trainer.cfg.eval_batch_size, trainer.device)
    return {
        "affinity": trainer.affinity.mean(),
        "measurements": trainer.affinity.count,
        "lookahead_lr": trainer.lookahead_lr,
        "val": trainer.best_val,
        "test": test,
        "steps": trainer.step,
        "seconds": round(time.perf_counter() - start, 3),
        "affinity_seconds": round(trainer.affinity_seconds, 3),
    }


# --------------------------------------------------------------------------------------------------
# Training the scoring networks
# --------------------------------------------------------------------------------------------------


def group_name(group: Sequence[str], kind: str = "full") -> str:
    """``"click+dwell"``; a half-size network gets a ``half:`` prefix."""
    return ("half:" if kind == "half" else "") + "+".join(group)


def train_network(
    cfg: DictConfig,
    tasks: Sequence[str],
    max_steps: int,
    run_dir: str | Path,
    width: float | None = None,
    keep_checkpoints: bool = False,
) -> dict[str, Any]:
    """Train one network on ``tasks`` with :func:`mtrec.train.run`; per-task losses of its best checkpoint.

    Returns ``{"tasks": [...], "val": {task: loss}, "test": {task: loss}, "metrics": run's metrics,
    "steps": max_steps, "seconds": s}``.
    """
    run_dir = Path(run_dir)
    start = time.perf_counter()
    metrics = run(network_config(cfg, tasks, max_steps, width), run_dir)
    if not keep_checkpoints:
        _drop_checkpoints(run_dir)
    return {
        "tasks": list(tasks),
        "val": {t: float(metrics["val"][t]["loss"]) for t in tasks},
        "test": {t: float(metrics["test"][t]["loss"]) for t in tasks},
        "metrics": metrics,
        "steps": int(max_steps),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _drop_checkpoints(run_dir: Path) -> None:
    """Delete a finished network's ``*.pt`` files and TensorBoard logs (metrics and logs stay)."""
    for path in run_dir.glob("*.pt"):
        path.unlink()
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


def measure_groups(
    cfg: DictConfig,
    groups: Sequence[Group],
    max_steps: int,
    root: str | Path,
    *,
    width: float | None = None,
    keep_checkpoints: bool = False,
) -> dict[Group, dict[str, Any]]:
    """Train one network per group (see :func:`train_network`) under ``root/<group name>``."""
    kind = "half" if width is not None else "full"
    out: dict[Group, dict[str, Any]] = {}
    for g in groups:
        name = group_name(g, kind)
        result = train_network(cfg, g, max_steps, Path(root) / name.replace(":", "_"), width, keep_checkpoints)
        log.info("trained %s for %d steps: val %s", name, max_steps, json.dumps(result["val"]))
        out[tuple(g)] = result
    return out


# --------------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------------


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
    :func:`mtl.grouping.higher_order_estimate`. ``half`` adds half-size single-task networks of cost 0.5.
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


def candidate_groups(tasks: Sequence[str], gcfg: GroupingConfig) -> list[tuple[Group, float]]:
    """``(group, cost)`` of every candidate network the configured method will score."""
    top = 2 if gcfg.method == "pairs" else len(tasks)
    if gcfg.max_group_size is not None:
        top = min(top, gcfg.max_group_size)
    out = [(g, 1.0) for g in all_groups(tasks, top)]
    if gcfg.half_size:
        out += [((t,), 0.5) for t in tasks]
    return out


def check_budget(tasks: Sequence[str], gcfg: GroupingConfig) -> float:
    """The cheapest cover of ``tasks`` by the configured candidates; ``ValueError`` if ``budget`` is below it.

    Runs before any training, so a bad budget fails at start-up rather than after the scoring runs.
    """
    planned = [Candidate(g, {t: 0.0 for t in g}, cost) for g, cost in candidate_groups(tasks, gcfg)]
    cheapest, cover = cheapest_cover(planned, tasks)
    assert cheapest is not None  # every task has its single-task candidate
    if cheapest > gcfg.budget + 1e-9:
        raise ValueError(
            f"config key budget: budget={gcfg.budget:g} is less than the cheapest cover of the {len(tasks)} tasks "
            f"{list(tasks)}: with method={gcfg.method}, max_group_size={gcfg.max_group_size} and "
            f"half_size={gcfg.half_size}, serving every task costs at least {cheapest:g} "
            f"(e.g. networks {[list(c.tasks) for c in cover]}); set budget >= {cheapest:g}"
        )
    return cheapest


def select(candidates: Sequence[Candidate], tasks: Sequence[str], budget: float, search: str) -> Selection:
    """Run the configured search; budget errors name the ``budget`` config key."""
    fn = branch_and_bound if search == "branch_and_bound" else exhaustive_search
    try:
        return fn(candidates, tasks, budget)
    except ValueError as err:
        if "cheapest cover" in str(err):
            raise ValueError(f"config key budget: {err}") from err
        raise


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------


def run_grouping(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Estimate task affinities, choose the networks under the budget, print them and write the JSON result.

    Returns the dict written to ``out_dir/<output>`` (see the module docstring).
    """
    gcfg = grouping_config(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seed_everything(int(cfg.seed))
    bundle: DataBundle = instantiate(cfg.data)
    tasks = [t.name for t in select_tasks(bundle.tasks, cfg.get("task_names"))]
    cheapest = check_budget(tasks, gcfg)
    full_steps = full_step_budget(cfg, len(bundle.train))
    steps = max(1, int(round(gcfg.fraction * full_steps)))
    settings: dict[str, Any] = {
        **asdict(gcfg),
        "tasks": tasks,
        "cheapest_cover": cheapest,
        "full_steps": full_steps,
        "scoring_steps": steps,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "seed": int(cfg.seed),
    }
    result: dict[str, Any] = {"settings": settings}

    if gcfg.method == "tag":
        joint_cfg = network_config(cfg, tasks, steps)
        joint_dir = out_dir / "networks" / "tag_joint"
        tag = train_with_affinity(joint_cfg, bundle, joint_dir, gcfg.tag.every, gcfg.tag.lr)
        if not gcfg.keep_checkpoints:
            _drop_checkpoints(joint_dir)
        affinity = tag["affinity"]
        candidates = tag_candidates(tasks, affinity, max_group_size=gcfg.max_group_size, singleton=gcfg.tag.singleton)
        result["affinity"] = {
            "kind": "lookahead: Z[i][j] = 1 - L_j(theta_s - lr * grad L_i) / L_j(theta_s), mean over training "
            "(Fifty et al. 2021)",
            "values": affinity,
        }
        result["trained"] = {
            "tag_joint": {k: tag[k] for k in ("val", "test", "steps", "measurements", "lookahead_lr", "seconds")}
        }
        result["trained"]["tag_joint"]["affinity_seconds"] = tag["affinity_seconds"]
    else:
        groups = all_groups(tasks, 2)
        measured = measure_groups(cfg, groups, steps, out_dir / "networks", keep_checkpoints=gcfg.keep_checkpoints)
        half: dict[str, float] | None = None
        trained = {group_name(g): _summary(r) for g, r in measured.items()}
        if gcfg.half_size:
            halves = measure_groups(
                cfg,
                [(t,) for t in tasks],
                steps,
                out_dir / "networks",
                width=gcfg.half_width,
                keep_checkpoints=gcfg.keep_checkpoints,
            )
            half = {g[0]: r["val"][g[0]] for g, r in halves.items()}
            trained.update({group_name(g, "half"): _summary(r) for g, r in halves.items()})
        val = {g: r["val"] for g, r in measured.items()}
        candidates = loss_candidates(
            tasks, val, higher_order=gcfg.method == "higher_order", max_group_size=gcfg.max_group_size, half=half
        )
        singles = {g[0]: v[g[0]] for g, v in val.items() if len(g) == 1}
        pairs = {g: v for g, v in val.items() if len(g) == 2}
        result["affinity"] = {
            "kind": "pair loss change: A[i][j] = 1 - L_j({i,j}) / L_j({j}) (validation losses)",
            "values": pair_loss_affinity(singles, pairs),
        }
        result["trained"] = trained

    t0 = time.perf_counter()
    selection = select(candidates, tasks, gcfg.budget, gcfg.search)
    search_seconds = time.perf_counter() - t0
    chosen = selection.to_dict()
    chosen["search"]["seconds"] = round(search_seconds, 4)
    predicted = selection.objective if gcfg.method != "tag" else None
    result.update(
        {
            "candidates": [c.to_dict() for c in candidates],
            "networks": chosen["networks"],
            "served": chosen["served"],
            "objective": selection.objective,
            "objective_kind": "sum of served validation losses"
            if gcfg.method != "tag"
            else "minus the sum over tasks of the mean affinity onto the task in its serving network",
            "predicted_total_loss": predicted,
            "cost": selection.cost,
            "search": chosen["search"],
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
    atomic_write_json(json.loads(json.dumps(result, default=_json_default)), out_dir / gcfg.output)
    print(report(result))
    print(f"wrote {out_dir / gcfg.output}")
    return result


def _summary(r: Mapping[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("tasks", "val", "test", "steps", "seconds")}


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def report(result: Mapping[str, Any]) -> str:
    """The chosen grouping as a small table (what ``mtlib-group`` prints)."""
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


@hydra.main(config_path=CONFIG_DIR, config_name="group", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_grouping(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
