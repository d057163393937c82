"""What an ``mtrl-train`` config may hold, and the builders that turn it into an agent.

* :func:`check_config`: every start-up check of :func:`mtrl.train.run`, made before any env is built. Top-level
  keys (:data:`CONFIG_KEYS`); the keys of every group node against its schema (:func:`mtl.config.check_group_keys`):
  ``env`` against the settings of the family its ``name`` selects (:func:`mtrl.envs.family_settings`), ``agent``
  against its builder's settings, ``gradient`` / ``weighting`` / ``schedule`` against their targets' signatures,
  ``trainer`` against :class:`RLTrainerConfig` and ``sac`` against :class:`mtrl.agents.SACConfig` (types and
  ranges too); and ``weighted_losses``. A mistyped key (``+env.num_task=3``, ``+agent.hiden=[8]``) fails naming the
  key and the valid ones. (Without the ``+``, Hydra refuses a key the config does not have while composing.)
* :func:`build_strategies`, :func:`build_agent_from_config`: the agent of a config, with its multi-task strategies.
* :data:`CONFIG_DIR` (:data:`mtl.config.CONFIG_DIR`, re-exported): the config tree as a directory (for
  ``hydra.initialize_config_dir`` in tests, benchmarks and
  notebooks; the commands compose from :data:`mtl.config.CONFIG_PATH`).

An agent builder (``_target_`` of ``configs/agent/*.yaml``, e.g. :func:`mtrl.agents.care`) is called as
``builder(spec, sac_config, **strategies)`` with its config's other keys as keywords: its settings are its named
parameters after the first two.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtl.config import CONFIG_DIR, build_partial, check_config_keys, check_group_keys
from mtrl.agents import SAC, EnvSpec, SACConfig
from mtrl.agents.sac import Strategies
from mtrl.envs import VECTORIZATIONS, family_class, family_settings

__all__ = [
    "CONFIG_DIR",
    "CONFIG_KEYS",
    "GROUPS",
    "PROGRAM",
    "WEIGHTED_LOSSES",
    "RLTrainerConfig",
    "agent_settings",
    "build_agent_from_config",
    "build_strategies",
    "check_config",
    "resolve_device",
    "sac_config",
    "total_updates",
    "trainer_config",
]

PROGRAM = "mtrl-train"
#: The top-level keys of ``configs/mtrl.yaml`` that a run reads; any other key is an error.
CONFIG_KEYS = ("seed", "env", "agent", "gradient", "weighting", "schedule", "weighted_losses", "sac", "trainer")
#: The config nodes whose keys :func:`check_config` checks against a schema.
GROUPS = ("env", "agent", "gradient", "weighting", "schedule", "trainer", "sac")
#: ``weighted_losses``: which per-task SAC losses the ``weighting`` balances.
WEIGHTED_LOSSES = ("critic", "actor_and_critic")
_MAKE_FAMILY = "mtrl.envs.make_family"



@dataclass
class RLTrainerConfig:
    """Settings of :class:`mtrl.train.RLTrainer` (the ``trainer`` section of ``configs/mtrl.yaml``, whose values
    ``mtrl-train`` runs with; the defaults here are those of a library caller that gives none)."""

    total_steps: int = 50_000
    """Pool steps to train for in total, across resumes (each step: one action in every env)."""
    envs_per_task: int | None = None
    """Envs per task in the training pool (``K * envs_per_task`` transitions per step); ``null`` = the env config's
    ``envs_per_task`` (the family's, 1 unless configured)."""
    env_workers: int | None = None
    """Worker processes of the training pool when the env config has ``vectorization: async`` (``null`` = one per
    core less one for the learner, at least 1, at most one per env: :func:`mtrl.envs.default_env_workers`). Unused
    with ``vectorization: sync``."""
    overlap_updates: bool | None = None
    """``true``: a step's SAC updates run while the envs execute that step's actions, so they sample the replay as
    it was before the step's transitions (the order that lets async env workers overlap the learner; sync pools
    follow it too, so sync and async runs are bit-identical). ``false``: the updates follow the step's
    transitions (the order of runs written before this setting existed). ``null``: ``true`` for a new run; a
    resumed run keeps its checkpoint's order."""
    learning_starts: int = 1_000
    """Steps of uniformly random actions before the first update."""
    updates_per_step: float = 1.0
    """SAC updates per pool step after ``learning_starts`` (fractions allowed: 0.5 = every other step)."""
    batch_size: int = 128
    """Rows sampled from *each* task's replay buffer per update."""
    replay_capacity: int = 1_000_000
    """Transitions kept per task."""
    eval_interval: int = 5_000
    """Evaluate every N steps (0 = only at the end)."""
    eval_episodes: int = 10
    """Deterministic episodes per task in each evaluation."""
    eval_envs_per_task: int | None = None
    """Evaluation envs per task run side by side (``null`` = ``eval_episodes``)."""
    checkpoint_interval: int = 10_000
    """Write ``last.pt`` every N steps (0 = only at the end and on interruption)."""
    log_interval: int = 1_000
    """Write a training record every N steps."""
    epoch_steps: int = 1_000
    """Steps that make one epoch for epoch-based weightings (``dwa``): every N steps each weighting gets the mean
    per-task losses of the updates in them."""
    resume: bool = False
    """Continue from ``last.pt`` in the run directory (a fresh start when there is none)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    num_threads: int | None = None
    """torch intra-op threads (``null`` = torch's default)."""

    def __post_init__(self) -> None:
        for key in ("envs_per_task", "env_workers"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1 or null, got {getattr(self, key)}")
        for key in (
            "total_steps",
            "batch_size",
            "replay_capacity",
            "eval_episodes",
            "log_interval",
            "epoch_steps",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("learning_starts", "eval_interval", "checkpoint_interval"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        if not self.updates_per_step >= 0 or not math.isfinite(self.updates_per_step):
            raise ValueError(f"trainer.updates_per_step must be a finite number >= 0, got {self.updates_per_step}")
        if self.eval_envs_per_task is not None and self.eval_envs_per_task < 1:
            raise ValueError(f"trainer.eval_envs_per_task must be >= 1 or null, got {self.eval_envs_per_task}")


def _structured(schema: type, node: Any, section: str, *, name_section: bool = False) -> Any:
    """Validate a config node against a dataclass schema (an unknown key or a wrong type names the key).

    ``name_section``: also prefix the ``ValueError`` of the schema's own checks (its ``__post_init__``) with
    ``config section '<section>': `` (``mtrl-distill``'s sections; ``mtrl-train``'s checks name their key already).
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
    except OmegaConfBaseException as err:
        # OmegaConf's first line names the key ("Key 'x' not in 'Schema'"); the rest repeats it
        raise ValueError(f"config section {section!r}: {str(err).splitlines()[0]}") from err
    values = OmegaConf.to_container(merged, resolve=True)
    if not name_section:
        return schema(**values)
    try:
        return schema(**values)
    except ValueError as err:
        raise ValueError(f"config section {section!r}: {err}") from None


def trainer_config(node: Any) -> RLTrainerConfig:
    """The ``trainer`` node validated against :class:`RLTrainerConfig`."""
    return _structured(RLTrainerConfig, node, "trainer")


def sac_config(node: Any) -> SACConfig:
    """The ``sac`` node validated against :class:`mtrl.agents.SACConfig`."""
    return _structured(SACConfig, node, "sac")


# ------------------------------------------------------------------------------------------ start-up checks


def agent_settings(builder: Any) -> tuple[str, ...]:
    """The config keys an agent builder takes: its named parameters after ``(spec, sac_config)``, sorted."""
    params = [
        p
        for p in inspect.signature(builder).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return tuple(sorted(p.name for p in params[2:] if p.kind is not p.POSITIONAL_ONLY))


def _keys_schema(name: str, keys: Sequence[str]) -> type:
    """A dataclass whose fields are ``keys``: the schema :func:`mtl.config.check_group_keys` checks a node against."""
    return dataclasses.make_dataclass(name, [(k, Any, dataclasses.field(default=None)) for k in keys])


def _target(node: DictConfig, where: str) -> Any:
    try:
        return get_object(str(node._target_))
    except Exception as err:  # noqa: BLE001 - Hydra raises ImportError or its own InstantiationException
        raise ValueError(f"config {where}._target_: cannot import {node._target_!r} ({err})") from None


def _settings_view(cfg: DictConfig, group: str) -> tuple[DictConfig, type] | None:
    """For ``env`` nodes built by :func:`mtrl.envs.make_family` and ``agent`` nodes (whose targets take ``**kwargs``,
    so their signatures say nothing): the node's keys without ``_target_`` and the schema of the keys it may hold."""
    node = cfg.get(group)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    if group == "env" and str(node._target_) == _MAKE_FAMILY:
        name = node.get("name")
        try:
            settings = family_settings(str(name))
        except ValueError as err:
            raise ValueError(f"config key env.name: {err}") from None
        schema = _keys_schema(family_class(str(name)).__name__, ("name", *settings))
    elif group == "agent":
        target = _target(node, group)
        schema = _keys_schema(getattr(target, "__qualname__", str(node._target_)), agent_settings(target))
    else:
        return None
    keys = {str(k): None for k in node.keys() if k != "_target_"}
    return OmegaConf.create({group: keys}), schema


def check_config(cfg: DictConfig, program: str = PROGRAM) -> None:
    """Every start-up check of an ``mtrl-train`` config (see the module docstring); builds nothing.

    Raises:
        ValueError: naming the first wrong key (``section.key``), what is accepted there, and how to fix it.
    """
    check_config_keys(cfg, CONFIG_KEYS, program)
    schemas = {"trainer": RLTrainerConfig, "sac": SACConfig}
    for group in GROUPS:
        view = _settings_view(cfg, group)
        try:
            if view is None:
                check_group_keys(cfg, [group], program, schemas=schemas)
            else:
                check_group_keys(view[0], [group], program, schemas={group: view[1]})
        except ValueError as err:
            raise ValueError(f"config section {group!r}: {err}") from None
    trainer_config(cfg.get("trainer"))
    sac_config(cfg.get("sac"))
    weighted = cfg.get("weighted_losses", "critic")
    if weighted not in WEIGHTED_LOSSES:
        raise ValueError(f"config key weighted_losses: expected one of {list(WEIGHTED_LOSSES)}, got {weighted!r}")
    env = cfg.get("env")
    vectorization = env.get("vectorization") if isinstance(env, DictConfig) else None
    if vectorization is not None and vectorization not in VECTORIZATIONS:
        raise ValueError(
            f"config key env.vectorization: expected one of {list(VECTORIZATIONS)} (where mtrl-train's envs step), "
            f"got {vectorization!r}"
        )


# ------------------------------------------------------------------------------------------------ builders


def resolve_device(name: str) -> torch.device:
    """``trainer.device`` (or ``mtrl-eval``'s ``device``) as a torch device; ``auto`` = CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name!r} but CUDA is not available here; use cpu or auto")
    return device


def total_updates(tcfg: RLTrainerConfig) -> int:
    """SAC updates of a whole run (the schedulers' ``total_steps``; at least 1)."""
    return max(1, math.floor(max(0, tcfg.total_steps - tcfg.learning_starts) * tcfg.updates_per_step))


def build_strategies(cfg: DictConfig, task_names: Sequence[str], *, seed: int, tcfg: RLTrainerConfig) -> Strategies:
    """SAC's multi-task strategies from ``cfg.gradient``, ``cfg.weighting``, ``cfg.weighted_losses`` and
    ``cfg.schedule`` (each may be absent: then none), for the tasks ``task_names``.

    Gradient methods: one for the actor (``seed``), one for the critic (``seed + 1``). Weightings: one for the
    critic's losses (``seed``) and, with ``weighted_losses=actor_and_critic``, one for the actor's (``seed + 1``).
    ``sizes`` are the rows every task gives an update (``trainer.batch_size``, the same for all).

    Raises:
        ValueError: an unknown ``weighted_losses``, or a strategy's config has a key its class does not take.
    """
    names = list(task_names)
    sizes = {n: tcfg.batch_size for n in names}
    out: Strategies = {}
    if cfg.get("gradient") is not None:
        out["actor_gradient"] = build_partial("gradient", cfg.gradient, seed=seed)
        out["critic_gradient"] = build_partial("gradient", cfg.gradient, seed=seed + 1)
    weighted = cfg.get("weighted_losses", "critic")
    if weighted not in WEIGHTED_LOSSES:
        raise ValueError(f"config key weighted_losses: expected one of {list(WEIGHTED_LOSSES)}, got {weighted!r}")
    if cfg.get("weighting") is not None:
        out["critic_weighting"] = build_partial("weighting", cfg.weighting, tasks=names, sizes=sizes, seed=seed)
        if weighted == "actor_and_critic":
            out["actor_weighting"] = build_partial("weighting", cfg.weighting, tasks=names, sizes=sizes, seed=seed + 1)
    if cfg.get("schedule") is not None:
        out["scheduler"] = build_partial(
            "schedule", cfg.schedule, tasks=names, sizes=sizes, seed=seed, total_steps=total_updates(tcfg)
        )
    return out


def build_agent_from_config(cfg: DictConfig, spec: EnvSpec, *, seed: int, gradients: bool = True) -> SAC:
    """The agent of ``cfg.agent`` (a partial builder of :mod:`mtrl.agents`) with ``cfg.sac`` and, when
    ``gradients``, the multi-task strategies of :func:`build_strategies` (``False``: only the networks, e.g. to load
    a trained run's weights)."""
    kwargs: Strategies = {}
    if gradients:
        kwargs = build_strategies(cfg, spec.task_names, seed=seed, tcfg=trainer_config(cfg.get("trainer")))
    try:
        return instantiate(cfg.agent)(spec, sac_config(cfg.get("sac")), **kwargs)
    except TypeError as err:
        raise ValueError(f"config section 'agent': {err}") from err
