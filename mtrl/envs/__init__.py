"""Multi-task RL environments: task families (point-mass, Meta-World MT10/MT50), their vector envs, and the family
registry that builds a family by name (:func:`make_family`, the ``_target_`` of ``configs/env/*.yaml``).

See :mod:`mtrl.envs.base` for the contract every family and env follows. Meta-World needs the ``rl`` extra
and is imported only when an ``mt10``/``mt50`` family is built.

Adding a family: subclass :class:`TaskFamily` (its settings as keyword-only ``__init__`` parameters), add it to
:data:`FAMILIES` and write ``configs/env/<name>.yaml``; ``mtrl-train`` then refuses any key of that file (or of an
override) that the ``__init__`` does not take, before building anything (:func:`family_settings`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from mtrl.envs.base import (
    VECTORIZATIONS,
    AsyncEnvRunner,
    EnvGroup,
    SyncEnvRunner,
    TaskFamily,
    default_env_workers,
    flatten_obs,
    make_env_runner,
    make_vector_env,
)
from mtrl.envs.metaworld import MetaWorldFamily, MetaWorldTaskEnv
from mtrl.envs.pointmass import PointMassEnv, PointMassFamily
from mtrl.tasks import MT10_TASKS, MT50_TASKS

__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "MT10_TASKS",
    "MT50_TASKS",
    "VECTORIZATIONS",
    "AsyncEnvRunner",
    "EnvGroup",
    "MetaWorldFamily",
    "MetaWorldTaskEnv",
    "PointMassEnv",
    "PointMassFamily",
    "SyncEnvRunner",
    "TaskFamily",
    "default_env_workers",
    "family_class",
    "family_settings",
    "flatten_obs",
    "make_env_runner",
    "make_family",
    "make_vector_env",
]

FAMILIES: dict[str, Callable[..., TaskFamily]] = {
    "pointmass": PointMassFamily,
    "mt10": partial(MetaWorldFamily, "mt10"),
    "mt50": partial(MetaWorldFamily, "mt50"),
}
"""Family name -> builder taking the family's settings as keywords (what :func:`make_family` calls)."""

FAMILY_NAMES = tuple(FAMILIES)
"""Names accepted by :func:`make_family`."""


def family_class(name: str) -> type[TaskFamily]:
    """The :class:`TaskFamily` subclass that family ``name`` builds.

    Raises:
        ValueError: unknown family name (the known ones are listed).
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; expected one of {FAMILY_NAMES}")
    builder = FAMILIES[name]
    return builder.func if isinstance(builder, partial) else builder  # type: ignore[return-value]


def family_settings(name: str) -> tuple[str, ...]:
    """The settings family ``name`` takes (its class's keyword-only ``__init__`` parameters), sorted: the keys
    ``configs/env/<name>.yaml`` may hold besides ``_target_`` and ``name``.

    Raises:
        ValueError: unknown family name.
    """
    params = inspect.signature(family_class(name)).parameters
    return tuple(sorted(p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY))


def make_family(name: str, **kwargs: Any) -> TaskFamily:
    """Build a task family by name; ``kwargs`` are the keys of ``configs/env/<name>.yaml``.

    ``"pointmass"``: :class:`~mtrl.envs.pointmass.PointMassFamily`; ``"mt10"``, ``"mt50"``:
    :class:`~mtrl.envs.metaworld.MetaWorldFamily` (needs the ``rl`` extra).

    Raises:
        ValueError: unknown family name.
        TypeError: a keyword the family does not take (the accepted ones are listed).
    """
    accepted = family_settings(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"task family {name!r} got unknown setting(s) {unknown}; accepted: {sorted(accepted)}")
    return FAMILIES[name](**kwargs)
