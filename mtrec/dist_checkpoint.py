"""Sharded checkpoints of a :func:`~mtrec.sharding.shard_model` run with ``torch.distributed.checkpoint`` (DCP).

Layout of a checkpoint directory ``dir``::

    dir/last.json          {"checkpoint": "ckpt-<step>", "step": <step>, "world_size": N, "format": ...}
    dir/ckpt-<step>/       DCP files: the model's state dict (tables as sharded tensors, each rank writing its
                           own shards; replicated tensors written once) and each fused optimizer's state
                           (sharded like its tables); replicated.pt: the trainer's own (dense, replicated)
                           optimizers keyed by parameter name, and ``extra``, written by rank 0
    dir/ckpt-<step>.tmp/   a save in progress

A save writes into ``ckpt-<step>.tmp``; after every rank has written (DCP gathers the ranks' results and raises on
all of them if one failed) and a barrier, rank 0 renames the directory to ``ckpt-<step>`` and then atomically
replaces ``last.json``. The pointer is the commit: until it moves, the previous checkpoint is the one
:func:`load` reads, and a crash at any point before leaves it intact. The last :data:`KEEP` checkpoints are kept.

:func:`load` reads into the *current* sharding, whatever the world size of the run that saved (DCP reshards:
each rank reads the slices of the saved shards its own shards cover). :func:`to_full_state_dict` reads a
checkpoint without a process group (for ``mtrec-export``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import KeyedOptimizer

from mtl.checkpoint import atomic_torch_save, atomic_write_json

POINTER = "last.json"
KEEP = 2
FORMAT = "mtrec-dcp-1"
_REPLICATED = "replicated.pt"
_CKPT = re.compile(r"^ckpt-(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _root(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _dense_state(opt: torch.optim.Optimizer, names: Mapping[int, str]) -> dict[str, Any]:
    """A torch optimizer's state dict keyed by parameter name instead of position."""
    sd = opt.state_dict()
    groups, by_index = [], {}
    index = 0
    for group, saved in zip(opt.param_groups, sd["param_groups"]):
        params = []
        for p in group["params"]:
            params.append(names[id(p)])
            by_index[index] = names[id(p)]
            index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": params})
    return {"param_groups": groups, "state": {by_index[i]: s for i, s in sd["state"].items()}}


def _load_dense_state(opt: torch.optim.Optimizer, saved: Mapping[str, Any], names: Mapping[int, str], key: str) -> None:
    groups, state = [], {}
    index = 0
    if len(saved["param_groups"]) != len(opt.param_groups):
        raise ValueError(f"optimizers.{key}: the checkpoint has {len(saved['param_groups'])} parameter groups, "
                         f"the optimizer {len(opt.param_groups)}")  # fmt: skip
    for group, sgroup in zip(opt.param_groups, saved["param_groups"]):
        mine = [names[id(p)] for p in group["params"]]
        if mine != list(sgroup["params"]):
            raise ValueError(f"optimizers.{key}: its parameters {mine} differ from the checkpoint's {sgroup['params']}")
        for name in mine:
            if name in saved["state"]:
                state[index] = saved["state"][name]
            index += 1
        groups.append({**sgroup, "params": list(range(index - len(mine), index))})
    opt.load_state_dict({"param_groups": groups, "state": state})


def _split(optimizers: Mapping[str, Any]) -> tuple[dict[str, KeyedOptimizer], dict[str, torch.optim.Optimizer]]:
    keyed = {k: o for k, o in optimizers.items() if isinstance(o, KeyedOptimizer)}
    dense = {k: o for k, o in optimizers.items() if not isinstance(o, KeyedOptimizer)}
    return keyed, dense


def _dcp_state(model: nn.Module, keyed: Mapping[str, KeyedOptimizer]) -> dict[str, Any]:
    state: dict[str, Any] = {"model": model.state_dict()}
    for k, o in keyed.items():
        state[f"optim.{k}"] = o.state_dict()
    return state


def save(
    dir: str | Path,
    *,
    model: nn.Module,
    optimizers: Mapping[str, Any],
    extra: Mapping[str, Any],
    step: int | None = None,
) -> Path:
    """Write a sharded checkpoint of ``model`` (the DMP), ``optimizers`` (torch optimizers of the replicated
    parameters, and ``dmp.fused_optimizer``) and ``extra`` (picklable trainer state) as ``dir/ckpt-<step>``
    (``step`` defaults to ``extra["step"]``); a collective. Returns the checkpoint's path."""
    if step is None:
        if "step" not in extra:
            raise ValueError("save: give step=... or an extra['step']")
        step = int(extra["step"])
    dir = Path(dir)
    final, tmp = dir / f"ckpt-{step}", dir / f"ckpt-{step}.tmp"
    rank = _rank()
    if rank == 0:
        dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before
        tmp.mkdir()
    _barrier()
    keyed, dense = _split(optimizers)
    dcp.save(_dcp_state(model, keyed), checkpoint_id=tmp)
    if rank == 0:
        names = {id(p): n for n, p in _root(model).named_parameters()}
        replicated = {"optimizers": {k: _dense_state(o, names) for k, o in dense.items()}, "extra": dict(extra)}
        atomic_torch_save(replicated, tmp / _REPLICATED)
    _barrier()
    if rank == 0:
        if final.exists():  # the same step saved again: the pointer may name it; move it last
            shutil.rmtree(final)
        os.replace(tmp, final)
        world = dist.get_world_size() if dist.is_initialized() else 1
        atomic_write_json({"checkpoint": final.name, "step": step, "world_size": world, "format": FORMAT},
                          dir / POINTER)  # fmt: skip
        _prune(dir)
    _barrier()
    return final


def _prune(dir: Path) -> None:
    steps = sorted((int(m.group(1)), p) for p in dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir())
    for _, p in steps[:-KEEP]:
        shutil.rmtree(p, ignore_errors=True)
    for p in dir.glob("ckpt-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def latest(dir: str | Path) -> Path | None:
    """The checkpoint ``dir/last.json`` points to (or ``dir`` itself when it is one); ``None`` when there is none."""
    dir = Path(dir)
    if (dir / ".metadata").exists():
        return dir
    pointer = dir / POINTER
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{pointer}: not an mtrec distributed checkpoint (format {info.get('format')!r})")
    path = dir / info["checkpoint"]
    if not path.is_dir():
        raise ValueError(f"{pointer} names {info['checkpoint']}, which is not in {dir}")
    return path


def load(dir: str | Path, *, model: nn.Module, optimizers: Mapping[str, Any]) -> dict[str, Any] | None:
    """Load the checkpoint ``dir/last.json`` points to into ``model`` (the DMP, in its current sharding, any
    world size) and ``optimizers`` (the same names as at save); returns its ``extra``, or ``None`` (nothing
    loaded) when ``dir`` has no checkpoint. A collective."""
    path = latest(dir)
    if path is None:
        return None
    keyed, dense = _split(optimizers)
    state = _dcp_state(model, keyed)
    dcp.load(state, checkpoint_id=path)  # in place: the state dict's tensors are the model's (shards included)
    model.load_state_dict(state["model"])
    for k, o in keyed.items():
        o.load_state_dict(state[f"optim.{k}"])
    replicated = torch.load(path / _REPLICATED, weights_only=False)
    names = {id(p): n for n, p in _root(model).named_parameters()}
    missing = [k for k in dense if k not in replicated["optimizers"]]
    if missing:
        raise ValueError(
            f"optimizers: {missing} not in the checkpoint {path} (it has {sorted(replicated['optimizers'])})"
        )
    for k, o in dense.items():
        _load_dense_state(o, replicated["optimizers"][k], names, k)
    return replicated["extra"]


def to_full_state_dict(dir: str | Path) -> dict[str, torch.Tensor]:
    """The unsharded model's ``state_dict`` from the checkpoint ``dir`` points to (or the checkpoint ``dir``), with
    no process group; loads into a freshly built model with ``load_state_dict(strict=True)``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = latest(dir)
    if path is None:
        raise ValueError(f"{dir}: no distributed checkpoint (no {POINTER}, no .metadata)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(path, out)
        state = torch.load(out, weights_only=False)
    return {k: v for k, v in state["model"].items()}
