"""Task grouping for recommendation: the networks that score candidate groups, behind ``mtlib-group``.

Standley et al., "Which Tasks Should Be Learned Together in Multi-task Learning?", ICML 2020, and
Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021 (TAG).
The run itself (the budget check, candidate groups, higher-order approximation, branch and bound, the
report) is task-agnostic: :func:`mtl.grouping.group_tasks`. This module supplies what it measures with:
:class:`RecMeasurer` trains every scoring network with :func:`mtrec.train.run` (widths scaled by
``half_width`` for a half-size network, :func:`scale_widths`), or the joint TAG network with
:class:`AffinityTrainer`; :func:`run_grouping` loads the data, runs the grouping and writes the answer.

Methods (``method=``, see :func:`mtl.grouping.group_tasks`):

* ``pairs``: every single task and every pair is trained for ``fraction`` of the full step budget
  (Standley's early-stopping approximation); candidates are those networks, scored by their per-task
  validation losses.
* ``higher_order``: the same trainings; every larger group is a candidate too, its per-task losses
  estimated from the pairs (Standley §3.2, :func:`mtl.grouping.higher_order_estimate`).
* ``tag``: one joint network of all tasks is trained for ``fraction`` of the budget while
  :class:`AffinityTrainer` measures the lookahead affinity every ``tag.every`` steps; every group is
  scored by the mean affinity onto each member from the others (Fifty et al. §3.3).

``half_size=true`` also trains each task alone in a network whose widths are scaled by ``half_width``
(cost 0.5). The full step budget is ``trainer.max_steps`` when set, else ``trainer.max_epochs`` passes
over the training rows.

Examples (the command line is :mod:`mtrec.cli.group`)::

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.checkpoint import load_checkpoint, seed_everything
from mtl.grouping import (
    GROUPING_KEYS,
    KINDS,
    Affinity,
    AffinityMeasurement,
    AffinityMeter,
    GroupingConfig,
    Measurement,
    group_name,
    group_tasks,
    grouping_config,
    lookahead_affinity,
    report,
    scoring_steps,
    write_result,
)
from mtl.scheduling import TaskStreams
from mtl.tasks import TaskSpec, compute_losses
from mtrec.data.batch import Batch, DataBundle, TabularDataset
from mtrec.data.synthetic import load_sparse_synthetic
from mtrec.train import build_training, run, select_tasks, trainer_config
from mtrec.trainer import LAST, Trainer, batch_to, evaluate

log = logging.getLogger("mtrec.grouping")

Group = tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Network configs
# --------------------------------------------------------------------------------------------------


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
    """A copy of a ``model`` config node with every ``*_dim`` int and ``*_dims`` list scaled (at least 1), in
    nested nodes too (the input arch's ``inputs``).

    >>> dict(scale_widths({"bottom_dims": [113], "num_experts": 8, "inputs": {"embedding_dim": 16}}, 0.5))
    {'bottom_dims': [57], 'num_experts': 8, 'inputs': {'embedding_dim': 8}}
    """
    node = OmegaConf.to_container(model, resolve=False) if isinstance(model, DictConfig) else dict(model)

    def scale(v: Any) -> int:
        return max(1, math.ceil(int(v) * factor - 1e-9))

    def walk(d: dict[str, Any]) -> None:
        for key, value in list(d.items()):
            if key.endswith("_dim") and isinstance(value, int) and not isinstance(value, bool):
                d[key] = scale(value)
            elif key.endswith("_dims") and isinstance(value, list):
                d[key] = [scale(v) for v in value]
            elif isinstance(value, dict):
                walk(value)

    walk(node)  # type: ignore[arg-type]
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


class RecMeasurer:
    """The :class:`mtl.grouping.GroupMeasurer` of recommendation: trains each scoring network with
    :func:`mtrec.train.run` (methods ``pairs`` / ``higher_order``), or the joint TAG network with
    :class:`AffinityTrainer` on ``bundle``, under ``root/<network name>``.

    Args:
        cfg: the composed ``group`` config (the ``mtrec-train`` keys configure every network).
        bundle: the loaded data (the TAG run trains on it; :func:`mtrec.train.run` loads ``cfg.data`` itself).
        config: the grouping settings (``fraction``, ``half_width``, ``keep_checkpoints``, ``tag.every``,
            ``tag.lr``).
        root: where the networks' run directories go.
    """

    def __init__(self, cfg: DictConfig, bundle: DataBundle, config: GroupingConfig, root: str | Path) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.config = config
        self.root = Path(root)
        self.full_steps = full_step_budget(cfg, len(bundle.train))
        self.scoring_steps = scoring_steps(self.full_steps, config.fraction)

    def measure(self, group: Group, kind: str) -> Measurement:
        """Train one network on ``group`` (:func:`train_network`); ``kind="half"``: widths x ``half_width``."""
        if kind not in KINDS:
            raise ValueError(f"RecMeasurer.measure: kind must be one of {list(KINDS)}, got {kind!r}")
        name = group_name(group, kind)
        width = self.config.half_width if kind == "half" else None
        run_dir = self.root / name.replace(":", "_")
        result = train_network(self.cfg, group, self.scoring_steps, run_dir, width, self.config.keep_checkpoints)
        log.info("trained %s for %d steps: val %s", name, self.scoring_steps, json.dumps(result["val"]))
        return Measurement(result["val"], {k: result[k] for k in ("tasks", "val", "test", "steps", "seconds")})

    def measure_affinity(self, tasks: Group) -> AffinityMeasurement:
        """Train the joint network of ``tasks`` while measuring lookahead affinity (:func:`train_with_affinity`)."""
        joint_dir = self.root / "tag_joint"
        joint_cfg = network_config(self.cfg, tasks, self.scoring_steps)
        tag = train_with_affinity(joint_cfg, self.bundle, joint_dir, self.config.tag.every, self.config.tag.lr)
        if not self.config.keep_checkpoints:
            _drop_checkpoints(joint_dir)
        keys = ("val", "test", "steps", "measurements", "lookahead_lr", "seconds", "affinity_seconds")
        return AffinityMeasurement(tag["affinity"], {k: tag[k] for k in keys})


# --------------------------------------------------------------------------------------------------
# The library entry point of mtlib-group
# --------------------------------------------------------------------------------------------------


def run_grouping(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Load the data, choose the networks under the budget (:func:`mtl.grouping.group_tasks` with a
    :class:`RecMeasurer`), print them and write the JSON result.

    Returns the dict written to ``out_dir/<output>`` (see the module docstring).
    """
    gcfg = grouping_config(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seed_everything(int(cfg.seed))
    bundle: DataBundle = instantiate(cfg.data)
    tasks = [t.name for t in select_tasks(bundle.tasks, cfg.get("task_names"))]
    measurer = RecMeasurer(cfg, bundle, gcfg, out_dir / "networks")
    settings = {
        key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("data", "model", "trainer", "optimizer")
    }
    result = group_tasks(tasks, measurer, gcfg, settings={**settings, "seed": int(cfg.seed)}, started=started)
    write_result(result, out_dir / gcfg.output)
    print(report(result))
    print(f"wrote {out_dir / gcfg.output}")
    return result
