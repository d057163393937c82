"""``mtrec-train``: train a multi-task ranking model from the Hydra config tree (``configs/mtrec.yaml``).

Examples::

    mtrec-train                                            # MMoE on synthetic sparse data
    mtrec-train data=census data.path=PATH model=mmoe      # MMoE on Census-Income
    mtrec-train model=ple trainer.max_steps=500 tasks.income.lr=0.01
    mtrec-train hydra.run.dir=runs/a trainer.resume=true   # continue an interrupted run

A configuration error (a ``ValueError``: a typo in a key, a value out of range, a key no part of the run reads
such as ``+agent=care``, a group of ``mtrl-train``) prints one line naming the key and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.checkpoint import atomic_write_json, seed_everything
from mtl.cli import ConfigErrorExit
from mtl.config import build_partial, check_config_keys
from mtl.optim import build_param_groups
from mtl.tasks import TaskSpec
from mtrec.data.batch import DataBundle, TabularDataset, split_by_task
from mtrec.trainer import Trainer, TrainerConfig, evaluate, parameter_groups

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "configs")
PROGRAM = "mtrec-train"
#: The top-level keys of ``configs/mtrec.yaml`` that a run reads; any other key is an error.
CONFIG_KEYS = (
    "seed",
    "data",
    "model",
    "trainer",
    "optimizer",
    "weighting",
    "gradient",
    "schedule",
    "distill",
    "task_names",
    "task_split",
    "tasks",
)
log = logging.getLogger("mtrec")


def data_path(relative: str) -> str:
    """``${data_path:x}`` in configs: ``$MTLIB_DATA_DIR/x``, else ``<repo>/../shared/data/x``."""
    root = os.environ.get("MTLIB_DATA_DIR", str(REPO.parent / "shared" / "data"))
    return str(Path(root) / relative)


if not OmegaConf.has_resolver("data_path"):
    OmegaConf.register_new_resolver("data_path", data_path)


def trainer_config(node: Any) -> TrainerConfig:
    """Validate the ``trainer`` config node against :class:`TrainerConfig` (an unknown key or a wrong type is a
    ``ValueError`` naming the key)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainerConfig), node)
    except OmegaConfBaseException as err:
        # OmegaConf's first line names the key ("Key 'x' not in 'TrainerConfig'"); the rest repeats it
        raise ValueError(f"config section 'trainer': {str(err).splitlines()[0]}") from err
    return TrainerConfig(**OmegaConf.to_container(merged, resolve=True))  # type: ignore[arg-type]


def apply_task_overrides(tasks: list[TaskSpec], overrides: Any) -> list[TaskSpec]:
    """Apply ``tasks.<name>.<field>`` overrides (weight, lr, weight_decay, loss, metrics)."""
    overrides = OmegaConf.to_container(overrides, resolve=True) if overrides is not None else {}
    names = [t.name for t in tasks]
    unknown = set(overrides) - set(names)
    if unknown:
        raise ValueError(f"config key tasks.{sorted(unknown)[0]}: no such task; this dataset has tasks {names}")
    return [t.with_overrides(**overrides[t.name]) if t.name in overrides else t for t in tasks]


def select_tasks(tasks: list[TaskSpec], names: Any) -> list[TaskSpec]:
    """Keep only the tasks named in ``task_names`` (in that order); ``null`` keeps all."""
    if names is None:
        return tasks
    by_name = {t.name: t for t in tasks}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"config key task_names: {missing} not in this dataset's tasks {list(by_name)}")
    if not names:
        raise ValueError("config key task_names: empty list; name at least one task or use null for all")
    return [by_name[n] for n in names]


def build_optimizer(
    node: Any,
    model: torch.nn.Module,
    tasks: list[TaskSpec],
    extra: dict[str, list[torch.nn.Parameter]] | None = None,
) -> torch.optim.Optimizer:
    """The optimiser with one param group for shared parameters and one per task.

    ``optimizer.shared_lr`` / ``shared_weight_decay`` set the shared group; ``tasks.<name>.lr`` /
    ``weight_decay`` set a task's group; everything else falls back to ``optimizer.lr`` / ``weight_decay``.
    ``extra`` adds named groups at the default settings (e.g. a weighting's learnable log-variances).
    """
    node = OmegaConf.to_container(node, resolve=True)
    shared_lr = node.pop("shared_lr", None)
    shared_wd = node.pop("shared_weight_decay", None)
    lr = node.get("lr", 1e-3)
    wd = node.get("weight_decay", 0.0)
    named = parameter_groups(model)
    groups = build_param_groups(
        named, tasks, lr=lr, weight_decay=wd, shared_lr=shared_lr, shared_weight_decay=shared_wd
    )
    for name, params in (extra or {}).items():
        if params:
            groups.append({"params": list(params), "lr": lr, "weight_decay": 0.0, "name": name})
    return instantiate(node)(groups)


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays, tensors and paths in dataset metadata, as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@dataclass
class Training:
    """What :func:`build_training` assembles from a config: the trainer, its training data (one dataset, or
    one per task with ``task_split``) and the tasks."""

    trainer: Trainer
    train: TabularDataset | dict[str, TabularDataset]
    tasks: list[TaskSpec]


def build_training(
    cfg: DictConfig,
    run_dir: str | Path,
    bundle: DataBundle,
    *,
    trainer_cls: type[Trainer] = Trainer,
    **trainer_kwargs: Any,
) -> Training:
    """Model, weighting, gradient method, scheduler, optimiser and trainer for ``cfg`` on ``bundle``, as
    ``mtrec-train`` builds them (model initialisation is seeded with ``cfg.seed``). ``trainer_cls`` and
    ``trainer_kwargs`` let a Trainer subclass (e.g. ``mtrec.grouping.AffinityTrainer``) train the same setup."""
    tcfg = trainer_config(cfg.trainer)
    seed = int(cfg.seed)
    tasks = select_tasks(bundle.tasks, cfg.get("task_names"))
    tasks = apply_task_overrides(tasks, cfg.get("tasks"))
    seed_everything(seed)  # model initialisation does not depend on how much randomness data loading used
    names = [t.name for t in tasks]
    model = instantiate(cfg.model)(features=bundle.features, tasks=names)
    train: TabularDataset | dict[str, TabularDataset] = bundle.train
    if cfg.get("task_split"):
        # Tasks from separate datasets: each task trains on its own disjoint share of the training rows.
        split = OmegaConf.to_container(cfg.task_split, resolve=True)
        if set(split) != set(names):
            raise ValueError(f"config key task_split: give a fraction for each of the tasks {names}, got {split}")
        train = split_by_task(bundle.train, split, seed=seed)
        sizes = {t: len(train[t]) for t in names}
        rows_per_epoch = sum(sizes.values())
    else:
        # Every label column is dense, so each task trains on every training row.
        sizes = {t: len(bundle.train) for t in names}
        rows_per_epoch = len(bundle.train)
    weighting = build_partial("weighting", cfg.weighting, tasks=tasks, sizes=sizes, seed=seed)
    gradient = build_partial("gradient", cfg.gradient, seed=seed)
    total_steps = tcfg.max_steps or tcfg.max_epochs * -(-rows_per_epoch // tcfg.batch_size)
    scheduler = build_partial("schedule", cfg.schedule, tasks=names, sizes=sizes, seed=seed, total_steps=total_steps)
    distill = None
    if cfg.get("distill") is not None:
        # Knowledge distillation from single-task teachers (configs/distill, mtrec-teachers); None when off.
        from mtrec.distill import build_distillation  # mtrec.distill imports this module

        distill = build_distillation(
            cfg.distill, tasks=tasks, bundle=bundle, model=model, data_cfg=cfg.data, total_steps=total_steps
        )
    extra = {"weighting": weighting.trainable_parameters()}
    if distill is not None:
        extra["distill"] = distill.trainable_parameters()
    optimizer = build_optimizer(cfg.optimizer, model, tasks, extra=extra)
    trainer = trainer_cls(
        model,
        optimizer,
        tasks,
        tcfg,
        run_dir,
        seed=seed,
        weighting=weighting,
        gradient=gradient,
        scheduler=scheduler,
        loss_hook=distill,
        **trainer_kwargs,
    )
    return Training(trainer, train, tasks)


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train and evaluate as configured; writes ``metrics.json`` and checkpoints into ``run_dir``.

    Returns ``{"val": {task: {metric: value}}, "test": {task: {metric: value}}}``: validation
    metrics of the best checkpoint (early stopping uses validation only) and test metrics of that checkpoint.
    """
    check_config_keys(cfg, CONFIG_KEYS, PROGRAM)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg.seed))
    bundle = instantiate(cfg.data)
    training = build_training(cfg, run_dir, bundle)
    trainer, tasks = training.trainer, training.tasks
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    # What export and serving need to turn raw feature values into model inputs (vocabularies, scaling).
    atomic_write_json(
        {
            "features": bundle.features.to_dict(),
            "tasks": [{"name": t.name, "kind": t.kind} for t in tasks],
            "meta": json.loads(json.dumps(bundle.meta, default=_json_default)),
        },
        run_dir / "features.json",
    )
    trainer.fit(training.train, bundle.val)
    trainer.load_best()
    best_val = trainer.best_val
    test = evaluate(trainer.model, bundle.test, tasks, trainer.cfg.eval_batch_size, trainer.device)
    metrics = {"val": best_val, "test": test}
    atomic_write_json(metrics, run_dir / "metrics.json")
    atomic_write_json(
        {
            "best_step": trainer.best_step,
            "steps": trainer.step,
            "epochs": trainer.epoch,
            "stop_reason": trainer.stop_reason,
        },
        run_dir / "run_info.json",
    )
    log.info("metrics: %s", json.dumps(metrics))
    return metrics


_EXIT = ConfigErrorExit(PROGRAM)


@hydra.main(config_path=CONFIG_DIR, config_name="mtrec", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    _EXIT.run(run, cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """``mtrec-train``. Configuration errors exit with status 2 (:class:`mtl.cli.ConfigErrorExit`)."""
    _EXIT.main(_hydra_main)


if __name__ == "__main__":
    main()
