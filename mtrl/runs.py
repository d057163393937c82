"""An ``mtrl-train`` run directory: what it holds, how to tell one from other directories, and how to load its agent.

A run directory, as :func:`mtrl.train.run` writes it::

    RUN/config.yaml        the resolved config (CONFIG_FILE)
    RUN/last.pt            the checkpoint: agent, replay buffers, RNG and env states (LAST)
    RUN/train_log.jsonl    training and evaluation records (LOG_FILE)
    RUN/eval.json          the final evaluation (EVAL_FILE)

:func:`check_run_dir` says what is wrong with a directory that is not such a run (missing, no config, a
recommendation run of ``mtrec-train``, no checkpoint yet) and how to fix it; :func:`load_run` rebuilds a run's
family and agent for evaluation (:func:`mtrl.evaluate.evaluate_run`), export (:func:`mtrl.export.export_run`)
and distillation (:func:`mtrl.distill.load_teachers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtl.checkpoint import load_checkpoint
from mtrl.agents import SAC, EnvSpec
from mtrl.config import build_agent_from_config, resolve_device

__all__ = ["CONFIG_FILE", "EVAL_FILE", "LAST", "LOG_FILE", "LoadedRun", "NotARunError", "check_run_dir", "load_run"]

CONFIG_FILE = "config.yaml"
LAST = "last.pt"
LOG_FILE = "train_log.jsonl"
EVAL_FILE = "eval.json"
# What only a recommendation run (mtrec-train) holds: its feature layout.
_MTREC_FEATURES = "features.json"


class NotARunError(ValueError):
    """A directory is not a (complete) ``mtrl-train`` run; the message says why and what to do instead."""


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a path, when it is an ``mtrl-train`` run with a checkpoint.

    Raises:
        NotARunError: the directory does not exist, is a recommendation run (``features.json`` and a config with a
            ``model`` node: ``mtrec-train``'s), has no ``config.yaml`` or a config without ``env`` and ``agent``,
            or has no ``last.pt`` yet; the message names the path and how to fix it.
    """
    run_dir = Path(run_dir)
    config = run_dir / CONFIG_FILE
    if not run_dir.exists():
        raise NotARunError(
            f"{run_dir}: no such directory; pass the directory an mtrl-train run wrote (its hydra.run.dir, by default "
            "outputs/mtrl/<date>/<time>)"
        )
    if not run_dir.is_dir():
        raise NotARunError(f"{run_dir}: not a directory; pass the directory an mtrl-train run wrote, not a file in it")
    saved = _read_config(config) if config.is_file() else None
    if (run_dir / _MTREC_FEATURES).is_file() or (saved is not None and "model" in saved):
        raise NotARunError(
            f"{run_dir} is a recommendation run (mtrec-train: it has {_MTREC_FEATURES} and a config with a 'model' "
            f"node), not a multi-task RL run of mtrl-train: its test metrics are in {run_dir / 'metrics.json'} and "
            "mtrec-export exports it; give mtrl-eval a directory that mtrl-train wrote"
        )
    if saved is None:
        raise NotARunError(
            f"{run_dir}: no {CONFIG_FILE}, so not an mtrl-train run directory; pass the directory an mtrl-train run "
            "wrote (its hydra.run.dir, by default outputs/mtrl/<date>/<time>)"
        )
    missing = [key for key in ("env", "agent") if key not in saved]
    if missing:
        raise NotARunError(
            f"{config} has no {' or '.join(missing)} node, so {run_dir} is not an mtrl-train run directory; pass the "
            "directory an mtrl-train run wrote"
        )
    if not (run_dir / LAST).is_file():
        raise NotARunError(
            f"{run_dir}: no {LAST} yet (the run has not written a checkpoint: it writes one every "
            f"trainer.checkpoint_interval steps and at the end); wait for it, or continue the run with mtrl-train "
            f"hydra.run.dir={run_dir} trainer.resume=true"
        )
    return run_dir


def _read_config(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as err:
        raise NotARunError(f"{path}: cannot read it as a YAML config ({err}); is it an mtrl-train run's?") from err
    if not isinstance(cfg, DictConfig):
        raise NotARunError(f"{path}: expected a mapping of config sections, got a {type(cfg).__name__}")
    return cfg


@dataclass
class LoadedRun:
    """A trained run: its resolved config, family, agent (weights of ``last.pt``) and training step."""

    cfg: DictConfig
    family: Any
    agent: SAC
    step: int


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """Rebuild an ``mtrl-train`` run's family and agent from ``RUN/config.yaml`` and ``RUN/last.pt`` (the agent in
    eval mode on ``device``).

    Raises:
        NotARunError: ``run_dir`` is not an ``mtrl-train`` run with a checkpoint (see :func:`check_run_dir`).
    """
    run_dir = check_run_dir(run_dir)
    cfg = _read_config(run_dir / CONFIG_FILE)
    family = instantiate(cfg.env)
    spec = EnvSpec.from_family(family)
    agent = build_agent_from_config(cfg, spec, seed=int(cfg.seed), gradients=False)
    state = load_checkpoint(run_dir / LAST)
    agent.load_state_dict(state["agent"]["modules"])
    agent.to(resolve_device(device)).eval()
    return LoadedRun(cfg, family, agent, int(state["step"]))
