"""Knowledge distillation from single-task teachers into a multi-task ranking model.

Two steps::

    mtrec-teachers data=census model=single_task hydra.run.dir=runs/teachers          # 1. one teacher per task
    mtrec-train data=census model=mmoe distill=soft distill.teachers=runs/teachers/teachers.json   # 2. student

1. ``mtrec-teachers`` (:mod:`mtrec.cli.teachers`, config ``configs/teachers.yaml`` = ``configs/mtrec.yaml``
   with ``model=single_task``; every ``mtrec-train`` override works) trains one single-task model per task of
   ``task_names`` (``null`` = every task of the dataset) with :func:`mtrec.train.run` and ``task_names=[t]``,
   each in ``RUN/<task>/``, and writes the manifest ``RUN/teachers.json`` (:func:`mtrec.train.train_teachers`:
   teachers are trained by the training side, which builds a student's distillation from this module)::

       {"format": "mtlib-teachers/1", "seed": 0, "data": {resolved data config},
        "teachers": {task: {"task", "kind", "run_dir", "checkpoint", "config", "model",
                            "val": {metric: value}, "test": {metric: value},
                            "monitor": "loss" | "auc", "score": monitored validation score}}}

   Paths are relative to the manifest's folder (absolute paths are accepted too). This module reads the
   manifest (:func:`read_manifest`, :func:`load_teachers`); its format is :data:`FORMAT`.
2. ``mtrec-train ... distill=soft distill.teachers=PATH`` (the ``distill/`` config group, schema
   :class:`DistillConfig`) trains the student with the usual :class:`~mtrec.trainer.Trainer`: its per-task
   losses become ``L_t = (1 - alpha) ell_t + alpha D_t + beta F_t`` (:mod:`mtl.distill` has the exact formula:
   soft targets at temperature ``T`` after Hinton et al. 2015, teacher annealing after Clark et al. 2019, a
   feature term through per-task adapters), and weighting and gradient methods act on those per-task losses.
   Teachers are frozen (eval mode, ``requires_grad=False``, outputs under ``torch.no_grad`` on the same
   batch), so gradients reach only the student and the adapters. Adapters and their optimiser state are saved
   in ``last.pt`` (exact resume); ``best.pt`` holds the student alone, which is what export and serving use.

Teachers must have been trained on the same data split: the manifest's resolved ``data`` config (which holds
the split seed) must equal the student's, else the teachers would have seen the student's validation and test
rows; a mismatch is an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mtl.checkpoint import load_checkpoint
from mtl.distill import Distiller
from mtl.tasks import TaskSpec
from mtrec.data.batch import Batch, DataBundle, FeatureSpec
from mtrec.data.errors import InputNotFoundError
from mtrec.models import build_model

__all__ = [
    "FORMAT",
    "MANIFEST",
    "DistillConfig",
    "StudentDistillation",
    "TeacherSet",
    "build_distillation",
    "distill_config",
    "load_teachers",
    "probe_feature_dims",
    "read_manifest",
]

MANIFEST = "teachers.json"
FORMAT = "mtlib-teachers/1"


# ------------------------------------------------------------------------------------------------ config


@dataclass
class DistillConfig:
    """The ``distill`` config node (``configs/distill/``); unknown keys are errors at start-up."""

    teachers: str | None = None
    """Manifest written by ``mtrec-teachers`` (``RUN/teachers.json``, or the folder holding it)."""
    alpha: float = 0.0
    """Weight of the distillation term in ``[0, 1]``: ``L = (1 - alpha) task loss + alpha distillation``."""
    temperature: float = 1.0
    """Softmax temperature ``T`` of binary tasks (logits divided by ``T``, term scaled by ``T^2``)."""
    anneal: bool = False
    """Teacher annealing (Clark et al. 2019): the target moves linearly from teacher to gold label."""
    total_steps: int | None = None
    """Steps the annealing spreads over (``null`` = the run's planned length, ``max_steps`` or
    ``max_epochs * batches``)."""
    feature_weight: float = 0.0
    """``beta``, weight of the feature term (per-task adapter, L2-normalised MSE to the teacher's representation)."""

    @property
    def enabled(self) -> bool:
        """Whether any teacher term has a non-zero weight (``distill=none`` has none)."""
        return self.alpha > 0 or self.feature_weight > 0


def distill_config(node: Any) -> DistillConfig:
    """Validate the ``distill`` node against :class:`DistillConfig` (an unknown key or a wrong type names the key)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(DistillConfig), node if node is not None else {})
    except OmegaConfBaseException as err:
        raise ValueError(f"config section 'distill': {err}") from err
    values = OmegaConf.to_container(merged, resolve=True)
    assert isinstance(values, dict)
    if OmegaConf.is_missing(merged, "teachers"):
        values["teachers"] = None  # `???` in distill/soft.yaml etc.: build_distillation says what to pass
    return DistillConfig(**values)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# ------------------------------------------------------------------------------------------------ teachers


def _manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a teachers manifest (a file or the folder that holds ``teachers.json``).

    Raises:
        InputNotFoundError: (a ``FileNotFoundError``) no manifest there.
        ValueError: not a manifest of this format.
    """
    file = _manifest_path(path)
    if not file.is_file():
        raise InputNotFoundError(
            f"{file}: no teachers manifest; train teachers first with "
            "`mtrec-teachers hydra.run.dir=DIR ...` and pass distill.teachers=DIR/teachers.json"
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("teachers"), dict):
        raise ValueError(
            f"{file}: not a teachers manifest (expected format {FORMAT!r}, got {manifest.get('format')!r})"
        )
    for task, entry in manifest["teachers"].items():
        missing = {"task", "kind", "checkpoint", "config"} - set(entry)
        if missing:
            raise ValueError(f"{file}: teacher {task!r} lacks {sorted(missing)}")
    return manifest


def _resolve(base: Path, relative: str) -> Path:
    p = Path(relative)
    return p if p.is_absolute() else base / p


def _diff(a: Any, b: Any, prefix: str = "data") -> list[str]:
    """Keys (dotted) where two JSON-like values differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [f"{prefix} ({a!r} vs {b!r})"]


def load_teachers(
    path: str | Path,
    tasks: Sequence[TaskSpec],
    *,
    features: FeatureSpec | None = None,
    data_cfg: Any = None,
) -> dict[str, nn.Module]:
    """The frozen teacher model of each task in ``tasks``, from a manifest (best-validation weights).

    ``features`` and ``data_cfg`` (the student's) are checked against the teachers': same feature spec, same
    resolved data config (hence the same split).

    Raises:
        ValueError: a task has no teacher, a teacher's task kind differs, or the data differ.
    """
    file = _manifest_path(path)
    manifest = read_manifest(file)
    base = file.parent
    names = [t.name for t in tasks]
    missing = [n for n in names if n not in manifest["teachers"]]
    if missing:
        raise ValueError(
            f"{file}: no teacher for tasks {missing} (teachers: {sorted(manifest['teachers'])}); train them with "
            f"mtrec-teachers task_names=[...] or pick the student's tasks with task_names"
        )
    if data_cfg is not None and manifest.get("data") is not None:
        diff = _diff(manifest["data"], _container(data_cfg))
        if diff:
            raise ValueError(
                f"{file}: the teachers were trained on other data than this student ({'; '.join(diff[:4])}); "
                "teachers must see the same split (same data config and seed), or they would have trained on the "
                "student's validation and test rows"
            )
    teachers: dict[str, nn.Module] = {}
    for t in tasks:
        entry = manifest["teachers"][t.name]
        if entry["kind"] != t.kind:
            raise ValueError(f"{file}: teacher of {t.name!r} is a {entry['kind']} task, the student's is {t.kind}")
        config_path = _resolve(base, entry["config"])
        run_dir = config_path.parent
        teacher_cfg = OmegaConf.load(config_path)
        saved = json.loads((run_dir / "features.json").read_text())
        spec = FeatureSpec.from_dict(saved["features"])
        if features is not None and spec != features:
            raise ValueError(f"{run_dir}: the teacher of {t.name!r} reads other features than the student")
        teacher_tasks = [x["name"] for x in saved["tasks"]]
        model = build_model(teacher_cfg.model, spec, teacher_tasks)
        model.load_state_dict(load_checkpoint(_resolve(base, entry["checkpoint"]))["model"])
        model.eval().requires_grad_(False)
        teachers[t.name] = model
    return teachers


class TeacherSet:
    """Frozen teachers, one per task: outputs (and representations) on a batch, without gradients.

    A teacher's representation for task ``t`` is the input of its tower ``towers[t]`` (its last hidden
    features, read by a forward pre-hook: for a single-task model, everything it computed before the head);
    models without towers fall back to ``forward_with_representation``.
    """

    def __init__(self, teachers: Mapping[str, nn.Module]) -> None:
        self.teachers = dict(teachers)
        for m in self.teachers.values():
            m.eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> TeacherSet:
        for m in self.teachers.values():
            m.to(device)
        return self

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.teachers.values() for p in m.parameters()]

    @torch.no_grad()
    def __call__(
        self, dense: Tensor, sparse: Any, tasks: Sequence[str], representations: bool = False
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({task: output [B]}, {task: representation [B, ...]})`` (the second empty unless asked for)."""
        outputs: dict[str, Tensor] = {}
        reps: dict[str, Tensor] = {}
        for t in tasks:
            model = self.teachers[t]
            if not representations:
                outputs[t] = model(dense, sparse)[t]
                continue
            towers = getattr(model, "towers", None)
            if isinstance(towers, nn.ModuleDict) and t in towers:
                seen: list[Tensor] = []

                def capture(_module: nn.Module, args: tuple[Tensor, ...], store: list[Tensor] = seen) -> None:
                    store.append(args[0])

                handle = towers[t].register_forward_pre_hook(capture)
                try:
                    outputs[t] = model(dense, sparse)[t]
                finally:
                    handle.remove()
                reps[t] = seen[-1]
            else:
                out, rep = model.forward_with_representation(dense, sparse)
                if rep is None:
                    raise ValueError(f"feature distillation: the teacher of {t!r} exposes no representation")
                outputs[t], reps[t] = out[t], rep
        return outputs, reps


class StudentDistillation(nn.Module):
    """The :class:`~mtrec.trainer.LossHook` of a distilled run: frozen teachers + :class:`mtl.distill.Distiller`.

    Only the distiller's feature adapters are parameters of this module (and so in its ``state_dict`` and in
    the optimiser); the teachers are held outside the module tree, frozen.
    """

    def __init__(self, teachers: TeacherSet, distiller: Distiller) -> None:
        super().__init__()
        self.teacher_set = teachers
        self.distiller = distiller

    @property
    def needs_representation(self) -> bool:
        return self.distiller.uses_features

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def _apply(self, fn: Any, recurse: bool = True) -> StudentDistillation:
        for m in self.teacher_set.teachers.values():
            m._apply(fn)
        return super()._apply(fn, recurse)

    def losses(
        self,
        tasks: Sequence[TaskSpec],
        outputs: Mapping[str, Tensor],
        batch: Batch,
        representation: Tensor | None,
        step: int,
    ) -> dict[str, Tensor]:
        names = [t.name for t in tasks]
        teacher_out, teacher_rep = self.teacher_set(batch.dense, batch.sparse, names, self.needs_representation)
        if self.needs_representation and representation is None:
            raise ValueError(
                "feature distillation needs the student's shared representation (forward_with_representation)"
            )
        return self.distiller.losses(
            outputs,
            batch.labels,
            teacher_out,
            step=step,
            representation=representation,
            teacher_representations=teacher_rep,
            tasks=tasks,
        )


def build_distillation(
    node: Any,
    *,
    tasks: Sequence[TaskSpec],
    bundle: DataBundle,
    model: nn.Module,
    data_cfg: Any,
    total_steps: int,
) -> StudentDistillation | None:
    """The student's distillation hook from the ``distill`` config node; ``None`` when it is off.

    Raises:
        ValueError: bad settings, no ``teachers`` manifest given, or teachers that do not fit the student.
    """
    cfg = distill_config(node)
    if not cfg.enabled:
        return None
    if cfg.teachers is None:
        raise ValueError(
            "config key distill.teachers: distillation needs the teachers manifest, e.g. "
            "distill.teachers=runs/teachers/teachers.json (written by mtrec-teachers)"
        )
    if cfg.total_steps is not None and cfg.total_steps <= 0:
        raise ValueError(f"config key distill.total_steps must be > 0 or null, got {cfg.total_steps}")
    teachers = TeacherSet(load_teachers(cfg.teachers, tasks, features=bundle.features, data_cfg=data_cfg))
    feature_dims = None
    if cfg.feature_weight > 0:
        feature_dims = probe_feature_dims(model, teachers, bundle, [t.name for t in tasks])
    distiller = Distiller(
        tasks,
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        anneal=cfg.anneal,
        total_steps=cfg.total_steps or total_steps,
        feature_weight=cfg.feature_weight,
        feature_dims=feature_dims,
    )
    return StudentDistillation(teachers, distiller)


@torch.no_grad()
def probe_feature_dims(
    model: nn.Module, teachers: TeacherSet, bundle: DataBundle, names: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """``{task: (student representation size, teacher representation size)}`` from a 2-row probe batch."""
    if not hasattr(model, "forward_with_representation"):
        raise ValueError(f"feature distillation: {type(model).__name__} has no forward_with_representation")
    probe = next(iter(bundle.train.batches(2)))  # any batch source (in memory or streamed files): its first rows
    was_training = model.training
    model.eval()
    try:
        _, rep = model.forward_with_representation(probe.dense, probe.sparse)
    finally:
        model.train(was_training)
    if rep is None:
        raise ValueError(
            f"feature distillation needs a student with a shared representation; {type(model).__name__} shares "
            "none (use e.g. model=mmoe or shared_bottom, or distill.feature_weight=0)"
        )
    _, teacher_reps = teachers(probe.dense, probe.sparse, names, representations=True)
    return {t: (rep.flatten(1).shape[1], teacher_reps[t].flatten(1).shape[1]) for t in names}
