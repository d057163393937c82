"""Config checks and builders every command's library entry point shares (``mtrec.train.run``, ``mtrl.train.run``):
refusing config keys a command does not read (top-level keys, and keys a config group's target does not take),
building ``_partial_`` strategy configs with errors that name their section, and where the config tree is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig

# Where every Hydra main finds the config tree: the repository's configs/, shipped inside the distribution as the
# package ``mtlib_configs`` (setup.py maps it onto configs/), so an installed wheel composes from any directory.
CONFIG_PATH = "pkg://mtlib_configs"


def _config_dir() -> str:
    spec = importlib.util.find_spec(CONFIG_PATH.removeprefix("pkg://"))  # the installed configs/ tree (setup.py)
    if spec is not None and spec.origin is not None:
        return str(Path(spec.origin).parent)
    return str(Path(__file__).resolve().parents[1] / "configs")  # a source checkout that is not installed


#: The same tree as a directory, for ``hydra.initialize_config_dir`` (tests, benchmarks).
CONFIG_DIR = _config_dir()

_HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


def check_config_keys(cfg: DictConfig, known: Sequence[str], program: str) -> None:
    """Refuse top-level config keys ``program`` does not read (a typo, or a group of another command added with
    ``+group=...``), which would otherwise be ignored silently.

    Raises:
        ValueError: naming the first unknown key and the keys ``program`` reads.
    """
    unknown = [k for k in cfg if k not in known]
    if unknown:
        raise ValueError(
            f"config key {unknown[0]!r} is not used by {program} (it reads {', '.join(known)}); remove it, or check "
            "the spelling (a group of another command added with +group=...?)"
        )


def check_group_keys(
    cfg: DictConfig,
    groups: Sequence[str],
    program: str,
    schemas: Mapping[str, type] | None = None,
    extra: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Refuse keys a config group's node does not accept, at start-up (before any data loads): a mistyped key added
    with ``+model.num_expert=4`` would otherwise fail late, or be ignored.

    The schema of a node with a ``_target_`` is its target's signature (a class's ``__init__``, a function's
    parameters; a target that takes ``**kwargs`` accepts any key), checked recursively for nested ``_target_``
    nodes; ``schemas`` gives a dataclass for a group without a target (e.g. ``{"trainer": TrainerConfig}``). A
    missing or ``null`` group is skipped. ``extra`` names keys a group may carry beyond its target's (those the
    command itself consumes, e.g. ``{"optimizer": ["shared_lr"]}``).

    Raises:
        ValueError: naming ``group.key``, the group's option and the keys it accepts.
    """
    schemas, extra = dict(schemas or {}), dict(extra or {})
    for group in groups:
        node = cfg._get_node(group) if group in cfg else None
        if not isinstance(node, DictConfig):
            continue
        _check_node(node, group, schemas.get(group), program, frozenset(extra.get(group, ())))


def _accepted(target: Any) -> tuple[set[str] | None, str]:
    """The keyword names ``target`` accepts (``None``: any) and a name for it. A class whose ``__init__`` passes
    ``**kwargs`` on to its base (a model's ``**common``) accepts its bases' keywords too, up to the first
    ``__init__`` without ``**kwargs``."""
    if dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target)}, target.__name__
    if inspect.isclass(target):
        names: set[str] = set()
        for cls in target.__mro__:
            init = cls.__dict__.get("__init__")
            if init is None or cls is object:
                continue
            try:
                params = list(inspect.signature(init).parameters.values())[1:]  # less self
            except (TypeError, ValueError):
                return None, target.__qualname__
            names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                return names, target.__qualname__
        return None, target.__qualname__
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None, getattr(target, "__name__", str(target))
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None, getattr(target, "__qualname__", str(target))
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, getattr(target, "__qualname__", str(target))


def _check_node(
    node: DictConfig, where: str, schema: type | None, program: str, extra: frozenset[str] = frozenset()
) -> None:
    target_name = node.get("_target_") if "_target_" in node else None
    if target_name is not None:
        try:
            target = get_object(str(target_name))
        except Exception as err:  # noqa: BLE001 - Hydra raises ImportError or its own InstantiationException
            raise ValueError(f"config {where}._target_: cannot import {target_name!r} ({err})") from None
    elif schema is not None:
        target = schema
    else:
        return
    accepted, name = _accepted(target)
    keys = [str(k) for k in node.keys()]
    if accepted is not None:
        unknown = [k for k in keys if k not in accepted and k not in _HYDRA_KEYS and k not in extra]
        if unknown:
            valid = ", ".join(sorted(accepted | extra)) or "(none)"
            raise ValueError(
                f"config key {where}.{unknown[0]} is not a parameter of {name} (the {where} config of {program}); "
                f"valid keys: {valid}"
            )
    for k, child in node.items_ex(resolve=False):
        if isinstance(child, DictConfig) and "_target_" in child:
            _check_node(child, f"{where}.{k}", None, program)


def build_partial(section: str, node: Any, **kwargs: Any) -> Any:
    """``instantiate(node)(**kwargs)`` for a ``_partial_`` strategy config; a wrong keyword names the section."""
    try:
        return instantiate(node)(**kwargs)
    except TypeError as err:
        raise ValueError(f"config section {section!r}: {err}") from err


def group_option(group: str, name: str) -> DictConfig:
    """The composed node of option ``name`` of config group ``group`` (its own defaults list applied: e.g.
    ``weighting/famo_next`` extends ``weighting/famo``), from the installed config tree (:data:`CONFIG_PATH`).

    Raises:
        ValueError: the group has no such option.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    def _compose() -> DictConfig:
        try:
            return compose(config_name=f"{group}/{name}")[group]
        except MissingConfigException as err:
            raise ValueError(f"config group {group!r} has no option {name!r}") from err

    if GlobalHydra.instance().is_initialized():  # inside a Hydra main: its search path has the tree
        return _compose()
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        return _compose()
