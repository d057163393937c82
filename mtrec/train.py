"""Training a multi-task ranking model from the Hydra config tree (``configs/mtrec.yaml``): the library side of
``mtrec-train`` and ``mtrec-teachers`` (their command lines are :mod:`mtrec.cli.train` and :mod:`mtrec.cli.teachers`).

* :func:`run` (and :func:`train_and_evaluate`, which also gives the monitored validation score): check the config
  (:func:`check_config`, before any data loads), load the data (:func:`load_data`), build the model, strategies,
  optimiser and trainer (:func:`build_training`), train with early stopping on validation, test the best checkpoint;
  writes ``config.yaml``, ``features.json``, ``metrics.json``, ``run_info.json`` and the checkpoints.
* :func:`train_teachers`: one single-task teacher per task and the manifest ``teachers.json`` that a student's
  ``distill.teachers`` names (:mod:`mtrec.distill` reads it and builds the student's distillation).
* :func:`data_path`: the ``${data_path:x}`` resolver of the data configs.

Errors a person can act on are ``ValueError`` s naming the key, the file or the option to fix (a typo in a key, a
value out of range, a key no part of the run reads such as ``+agent=care``, a bad data file with its line and field);
the command lines print them as one line and exit with status 2 (:class:`mtl.cli.ConfigErrorExit`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.checkpoint import atomic_write_json, seed_everything
from mtl.config import build_partial, check_config_keys, check_group_keys
from mtl.optim import build_param_groups
from mtl.tasks import TaskSpec
from mtrec.data.batch import DataBundle, TabularDataset, split_by_task
from mtrec.data.errors import DataError
from mtrec.distill import FORMAT, MANIFEST, DistillConfig, build_distillation
from mtrec.distributed import DistContext, init_distributed, launch_time
from mtrec.models import build_model
from mtrec.sharding import ShardingConfig
from mtrec.trainer import Trainer, TrainerConfig, evaluate, monitor_score, parameter_groups

REPO = Path(__file__).resolve().parents[1]
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
    "sharding",
    "task_names",
    "task_split",
    "tasks",
)
#: The config groups whose keys are checked at start-up: against the ``_target_``'s signature, or the schema here.
CONFIG_GROUPS = ("data", "model", "trainer", "optimizer", "weighting", "gradient", "schedule", "distill", "sharding")
GROUP_SCHEMAS: dict[str, type] = {"trainer": TrainerConfig, "distill": DistillConfig, "sharding": ShardingConfig}
#: Keys of a group that this module consumes itself (not its target's).
COMMAND_KEYS = {"optimizer": ("shared_lr", "shared_weight_decay")}
log = logging.getLogger("mtrec")


def _checkout() -> Path | None:
    """The source checkout this package runs from (it holds ``pyproject.toml`` and ``configs/``); ``None`` when
    it is installed (a wheel has neither beside the package)."""
    return REPO if (REPO / "pyproject.toml").is_file() and (REPO / "configs").is_dir() else None


def data_root() -> tuple[Path, str]:
    """The folder ``${data_path:x}`` looks in, and which rule chose it (see :func:`data_path`)."""
    env = os.environ.get("MTLIB_DATA_DIR", "")
    if env:
        return Path(env), "$MTLIB_DATA_DIR"
    checkout = _checkout()
    if checkout is not None:
        return checkout.parent / "shared" / "data", "beside the source checkout"
    return Path.cwd() / "data", "in the working directory"


def data_path(relative: str) -> str:
    """``${data_path:x}`` in configs: ``$MTLIB_DATA_DIR/x`` when that variable is set; else, running from a source
    checkout, ``<checkout>/../shared/data/x``; else (an installed package) ``./data/x`` in the working directory."""
    return str(data_root()[0] / relative)


if not OmegaConf.has_resolver("data_path"):
    OmegaConf.register_new_resolver("data_path", data_path)
if not OmegaConf.has_resolver("launch_time"):  # the run folder's time stamp: one per torchrun job (mtrec.distributed)
    OmegaConf.register_new_resolver("launch_time", launch_time)


def check_config(cfg: DictConfig, program: str = PROGRAM) -> None:
    """Refuse, before any data loads, a top-level key no part of a run reads and a key a group does not accept
    (``+model.num_expert=4``, ``+trainer.max_step=3``: :func:`mtl.config.check_group_keys`).

    Raises:
        ValueError: naming the key and the keys that are valid there.
    """
    check_config_keys(cfg, CONFIG_KEYS, program)
    check_group_keys(cfg, CONFIG_GROUPS, program, schemas=GROUP_SCHEMAS, extra=COMMAND_KEYS)


def load_data(node: Any) -> DataBundle:
    """The data bundle of the ``data`` config node.

    Raises:
        ValueError: the reader's own error (not Hydra's wrapper): a bad file names itself with its line and field
            (:class:`~mtrec.data.errors.DataError`); a missing one in the data folder also says where
            ``${data_path:x}`` looks and how to point it elsewhere.
    """
    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__
        if not isinstance(cause, ValueError):
            raise
        root, rule = data_root()
        if isinstance(cause, DataError) and not Path(cause.path).exists() and Path(cause.path).is_relative_to(root):
            raise DataError(
                cause.path,
                f"file not found (the configs' data files, ${{data_path:x}}, are $MTLIB_DATA_DIR/x, else "
                f"../shared/data/x beside a source checkout, else ./data/x; here {root}, {rule}); "
                "set MTLIB_DATA_DIR=DIR or data.path=FILE",
            ) from None
        raise cause from None


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
    plan: Any = None  # the sharding plan of a distributed run (TorchRec's ShardingPlan)


def build_training(
    cfg: DictConfig,
    run_dir: str | Path,
    bundle: DataBundle,
    *,
    trainer_cls: type[Trainer] = Trainer,
    dist: DistContext | None = None,
    **trainer_kwargs: Any,
) -> Training:
    """Model, weighting, gradient method, scheduler, optimiser and trainer for ``cfg`` on ``bundle``, as
    ``mtrec-train`` builds them (model initialisation is seeded with ``cfg.seed``). ``trainer_cls`` and
    ``trainer_kwargs`` let a Trainer subclass (e.g. ``mtrec.grouping.AffinityTrainer``) train the same setup.
    ``dist``: a rank of a distributed job: the model's tables are sharded by DistributedModelParallel with the plan
    of ``cfg.sharding`` (:func:`mtrec.sharding.shard_model`; the model is built whole first, seeded, so its weights
    do not depend on the world size)."""
    tcfg = trainer_config(cfg.trainer)
    seed = int(cfg.seed)
    tasks = select_tasks(bundle.tasks, cfg.get("task_names"))
    tasks = apply_task_overrides(tasks, cfg.get("tasks"))
    seed_everything(seed)  # model initialisation does not depend on how much randomness data loading used
    names = [t.name for t in tasks]
    model = build_model(cfg.model, bundle.features, names)
    sharded, plan = None, None
    if dist is not None:
        from mtrec.sharding import shard_model

        sharding = _sharding_config(cfg.get("sharding"))
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # FBGEMM logs every kernel's arguments at INFO on the root logger
        try:
            sharded, plan = shard_model(
                model, sharding, device=dist.device, fused_optimizer=fused_optimizer_spec(cfg.optimizer, dist.device)
            )
        finally:
            root.setLevel(level)
        model = sharded.module
    train: TabularDataset | dict[str, TabularDataset] = bundle.train
    if cfg.get("task_split"):
        # Tasks from separate datasets: each task trains on its own disjoint share of the training rows.
        if not isinstance(bundle.train, TabularDataset):
            raise ValueError("config key task_split: needs a dataset held in memory, not one streamed from files")
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
        dist=dist,
        sharded=sharded,
        **trainer_kwargs,
    )
    return Training(trainer, train, tasks, plan)


def _sharding_config(node: Any) -> ShardingConfig:
    if node is None:
        return ShardingConfig()
    return ShardingConfig(**OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]


def fused_optimizer_spec(node: Any, device: torch.device) -> dict[str, Any]:
    """The ``optimizer`` config as the fused embedding optimiser's settings (``{"name", "lr", ...}``): the tables of
    a distributed run train with the same rule as the rest of the model, inside TorchRec's backward, where FBGEMM
    has it on ``device``; otherwise (Adam on CPU) with :data:`mtrec.sharding.DEFAULT_FUSED_OPTIMIZER`, said in
    the log."""
    from mtrec.sharding import DEFAULT_FUSED_OPTIMIZER, FUSED_OPTIMIZERS

    d = OmegaConf.to_container(node, resolve=True)
    name = str(d.get("_target_", "")).rsplit(".", 1)[-1].lower()
    if name not in FUSED_OPTIMIZERS or device.type not in FUSED_OPTIMIZERS[name][1]:
        log.warning(
            "the embedding tables train with FBGEMM's fused %s (it has no %s on %s); the rest with %s",
            DEFAULT_FUSED_OPTIMIZER, name, device.type, name,
        )  # fmt: skip
        return dict(DEFAULT_FUSED_OPTIMIZER)
    spec: dict[str, Any] = {"name": name, "lr": float(d.get("lr", 1e-3))}
    spec["weight_decay"] = float(d.get("weight_decay", 0.0))
    for key in ("eps", "betas"):
        if key in d:
            spec[key] = d[key]
    return spec


@dataclass
class RunResult:
    """What :func:`train_and_evaluate` gives: the ``metrics`` :func:`run` returns and the score early stopping
    monitored (``trainer.monitor``; :func:`mtrec.trainer.monitor_score`, larger is better: the mean validation AUC
    of the binary tasks, or minus the mean validation loss) at the best checkpoint."""

    metrics: dict[str, Any]
    monitor: str
    score: float


def train_and_evaluate(cfg: DictConfig, run_dir: str | Path) -> RunResult:
    """Train and evaluate as configured (see :func:`run`); also gives the monitored validation score, which
    ``mtrec-train`` returns to Hydra sweepers (Optuna, Ax: maximise it)."""
    check_config(cfg)
    dist = init_distributed(str(cfg.trainer.device))  # a torchrun worker: join the job (None otherwise)
    try:
        return _train_and_evaluate(cfg, Path(run_dir), dist)
    finally:
        if dist is not None:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _train_and_evaluate(cfg: DictConfig, run_dir: Path, dist: DistContext | None) -> RunResult:
    main = dist is None or dist.is_main
    if dist is not None:
        run_dir = Path(dist.broadcast(str(run_dir)))  # one run folder: rank 0's
        log.info("rank %d of %d (%s, %s): run folder %s", dist.rank, dist.world_size, dist.backend, dist.device,
                 run_dir)  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg.seed))
    data_node = cfg.data
    if not main and "progress" in data_node:  # rank 0 alone shows progress bars
        data_node = copy.deepcopy(data_node)
        data_node.progress = False
    bundle = load_data(data_node)
    training = build_training(cfg, run_dir, bundle, dist=dist)
    trainer, tasks = training.trainer, training.tasks
    if main:
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
        if training.plan is not None:
            from mtrec.sharding import describe_plan, save_plan

            log.info("sharding plan (%d ranks):\n%s", dist.world_size if dist else 1, describe_plan(training.plan))
            save_plan(training.plan, run_dir / "sharding_plan.json")
    trainer.fit(training.train, bundle.val)
    trainer.load_best()
    best_val = trainer.best_val
    test = evaluate(
        trainer.model, bundle.test, tasks, trainer.cfg.eval_batch_size, trainer.device, split="test", dist=dist
    )
    metrics = {"val": best_val, "test": test}
    if main:
        atomic_write_json(metrics, run_dir / "metrics.json")
        atomic_write_json(
            {
                "best_step": trainer.best_step,
                "steps": trainer.step,
                "epochs": trainer.epoch,
                "stop_reason": trainer.stop_reason,
                "monitor": trainer.cfg.monitor,
                "best_score": trainer.best_score,
                "world_size": dist.world_size if dist is not None else 1,
            },
            run_dir / "run_info.json",
        )
        log.info("metrics: %s", json.dumps(metrics))
    return RunResult(metrics, trainer.cfg.monitor, float(trainer.best_score))


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train and evaluate as configured; writes ``metrics.json`` and checkpoints into ``run_dir``.

    Returns ``{"val": {task: {metric: value}}, "test": {task: {metric: value}}}``: validation
    metrics of the best checkpoint (early stopping uses validation only) and test metrics of that checkpoint.
    """
    return train_and_evaluate(cfg, run_dir).metrics


# ------------------------------------------------------------------------------------------------ teachers


def train_teachers(cfg: DictConfig, out_dir: str | Path, program: str = "mtrec-teachers") -> dict[str, Any]:
    """Train one single-task model per task (``cfg.task_names``, ``null`` = all of the dataset's) and write
    the manifest ``out_dir/teachers.json`` (format: :mod:`mtrec.distill`); returns it.

    Each teacher is ``run(cfg with task_names=[task], out_dir/task)``: same data, model, trainer and optimiser
    config, so any ``mtrec-train`` override applies to every teacher. Distillation is switched off for teachers,
    and with ``trainer.monitor=auc`` a regression teacher early-stops on its validation loss; each entry records
    its ``monitor`` and monitored validation ``score``. A task whose teacher run already finished
    (``metrics.json`` present) with the same resolved config is reused, so an interrupted command continues where
    it stopped (other settings there are an error).
    """
    check_config(cfg, program)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = cfg.get("task_names")
    tasks = select_tasks(load_data(cfg.data).tasks, list(names) if names is not None else None)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    manifest: dict[str, Any] = {"format": FORMAT, "seed": int(cfg.seed), "data": data, "teachers": {}}
    for spec in tasks:
        task = spec.name
        sub = copy.deepcopy(cfg)
        with _writable(sub):
            sub.task_names = [task]
            if "distill" in sub:
                sub.distill = None
            if spec.kind != "binary" and sub.trainer.get("monitor") == "auc":
                sub.trainer.monitor = "loss"  # a regression teacher has no AUC: early-stop on its validation loss
        run_dir = out_dir / task
        if (run_dir / "metrics.json").exists() and (run_dir / "best.pt").exists():
            if OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")) != OmegaConf.to_container(
                sub, resolve=True
            ):
                raise ValueError(
                    f"{run_dir} holds a finished teacher trained with other settings; train into a new folder "
                    "(hydra.run.dir=...) or delete it"
                )
            log.info("teacher %s: reusing %s", task, run_dir)
            metrics = json.loads((run_dir / "metrics.json").read_text())
        else:
            log.info("teacher %s: training into %s", task, run_dir)
            metrics = run(sub, run_dir)
        monitor = str(sub.trainer.monitor)
        manifest["teachers"][task] = {
            "task": task,
            "kind": spec.kind,
            "run_dir": task,
            "checkpoint": f"{task}/best.pt",
            "config": f"{task}/config.yaml",
            "model": str(sub.model.get("_target_", "")),
            "val": metrics["val"][task],
            "test": metrics["test"][task],
            "monitor": monitor,
            "score": monitor_score(metrics["val"], [spec], monitor),
        }
        atomic_write_json(manifest, out_dir / MANIFEST)  # after every teacher: a partial manifest is usable
    return manifest


def teachers_score(manifest: dict[str, Any]) -> float:
    """The mean monitored validation score of a manifest's teachers (what ``mtrec-teachers`` returns to Hydra)."""
    scores = [float(entry["score"]) for entry in manifest["teachers"].values()]
    return sum(scores) / len(scores)


class _writable:
    """Context manager lifting OmegaConf's struct flag (to set keys the schema lacks)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg, self.flag = cfg, OmegaConf.is_struct(cfg)

    def __enter__(self) -> DictConfig:
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc: Any) -> None:
        OmegaConf.set_struct(self.cfg, self.flag)
