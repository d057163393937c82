"""Sharding a model's embedding tables over ranks with TorchRec's ``DistributedModelParallel`` (DMP).

:func:`shard_model` plans the sharding of the input arch's ``EmbeddingBagCollection`` (one table ``t_<feature>``
per sparse feature) with ``EmbeddingShardingPlanner.collective_plan`` (rank 0 plans, every rank gets the same
plan) and wraps the model in DMP **without DDP** (``init_data_parallel=False``): the trainer all-reduces the
replicated (dense) gradients itself, after a multi-task gradient method has seen the per-task gradients.

What TorchRec 1.8 does on CPU (gloo), measured here:

* Sharding types: ``table_wise``, ``column_wise`` (and ``table_column_wise``) with the ``fused`` kernel;
  ``data_parallel`` with the ``dense`` kernel. ``row_wise`` and ``table_row_wise`` are offered only on CUDA.
  The planner refuses the ``dense`` kernel for anything but ``data_parallel`` ("DENSE kernel requires
  DATA_PARALLEL sharding"), so ``kernel="dense"`` means every table is replicated (data parallel): torchrec wraps
  those lookups in its own DDP, which averages their gradients in backward.
* Fused optimizers (FBGEMM applies the update inside backward; the tables have no ``.grad``): on CPU only
  ``sgd`` (``EXACT_SGD``), ``adagrad`` (``EXACT_ADAGRAD``) and ``rowwise_adagrad`` (``EXACT_ROWWISE_ADAGRAD``);
  FBGEMM refuses ``adam`` ("not supported in CPU mode") and the non-exact ``SGD``/``ROWWISE_ADAGRAD``.
* Weights: DMP builds new, freshly initialised tables for a module that is not on ``meta``; it does **not** copy
  the module's weights. :func:`shard_model` copies them in, so each rank's shards are exactly the slices of the
  tables of the model as built (seeded), and a run's weights do not depend on the world size.
* Output order: a sharded collection returns its pooled ``KeyedTensor`` grouped by shard (``table_wise`` with two
  tables on two ranks returned keys ``['i', 'u']`` for features ``('u', 'i')``), not in the order of the tables.
  :class:`~mtrec.models.inputs.InputArch` reads ``.values()`` by position, so :func:`shard_model` puts the
  keys back in table order (a forward hook; a no-op when the order already matches).
* Gradient semantics: a sharded table's gradient is the **mean** over ranks of each rank's contribution, not the
  sum. TorchRec's output distribution divides the pooled embeddings' gradient by the world size
  (``torchrec.distributed.global_settings.get_gradient_division()``, on by default). With each rank's loss the
  mean over its own equal share of the batch, a table gets exactly the gradient of the global mean loss, the
  same as the dense parameters after an all-reduce *average*; the test checks the fused SGD update against the
  gradient of the single-process model on the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardedModule, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from mtl.checkpoint import atomic_write_json

SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise", "data_parallel")
KERNELS = ("fused", "dense")
PLANS = ("auto",)
# The FBGEMM optimizer of each fused_optimizer name, and the devices it runs on (fbgemm-gpu-cpu 1.8, measured).
FUSED_OPTIMIZERS = {
    "sgd": ("exact_sgd", ("cpu", "cuda")),
    "adagrad": ("exact_adagrad", ("cpu", "cuda")),
    "rowwise_adagrad": ("exact_row_wise_adagrad", ("cpu", "cuda")),
    "adam": ("adam", ("cuda",)),
}
DEFAULT_FUSED_OPTIMIZER: dict[str, Any] = {"name": "adagrad", "lr": 0.01}
_DMP_PREFIX = "_dmp_wrapped_module."


@dataclass
class ShardingConfig:
    """How to shard the embedding tables (the ``sharding`` config group, ``configs/sharding/``).

    Attributes:
        plan: ``"auto"``: TorchRec's ``EmbeddingShardingPlanner`` chooses among the allowed types.
        types: ``{feature: [sharding types]}``, the types the planner may choose for that feature's table
            (``t_<feature>``; either name is accepted). A feature not named may get any type the kernel allows.
        kernel: ``"fused"``: FBGEMM's fused kernel, the optimizer applied inside backward (``fused_optimizer`` of
            :func:`shard_model`); ``"dense"``: the tables are plain parameters trained by the trainer's optimizer,
            which TorchRec 1.8 allows only for ``data_parallel`` (replicated) tables.
        column_shard_dim: the width of a ``column_wise`` shard (TorchRec's ``min_partition``; its default, 128,
            leaves a table narrower than that in one shard). ``None``: TorchRec's default.
    """

    plan: str = "auto"
    types: dict[str, list[str]] = field(default_factory=dict)
    kernel: str = "fused"
    column_shard_dim: int | None = None

    def __post_init__(self) -> None:
        if self.plan not in PLANS:
            raise ValueError(f"sharding.plan: unknown plan {self.plan!r}; valid: {', '.join(PLANS)}")
        if self.kernel not in KERNELS:
            raise ValueError(f"sharding.kernel: unknown kernel {self.kernel!r}; valid: {', '.join(KERNELS)}")
        if self.types is None:  # the config's `types: null` (so `sharding.types={f: [...]}` assigns, not merges)
            self.types = {}
        if not isinstance(self.types, Mapping):
            raise ValueError(f"sharding.types: expected {{feature: [sharding types]}}, got {self.types!r}")
        types: dict[str, list[str]] = {}
        for feature, allowed in self.types.items():
            key = f"sharding.types.{feature}"
            if isinstance(allowed, str):
                allowed = [allowed]
            allowed = list(allowed)
            if not allowed:
                raise ValueError(f"{key}: empty list; give one or more of {', '.join(SHARDING_TYPES)}")
            for t in allowed:
                if t not in SHARDING_TYPES:
                    raise ValueError(f"{key}: unknown sharding type {t!r}; valid: {', '.join(SHARDING_TYPES)}")
            if self.kernel == "dense" and allowed != ["data_parallel"]:
                raise ValueError(
                    f"{key}: {allowed} with sharding.kernel=dense; TorchRec 1.8 runs the dense kernel only for "
                    "data_parallel tables. Use data_parallel, or kernel: fused for model-parallel tables"
                )
            types[str(feature)] = allowed
        self.types = types
        if self.column_shard_dim is not None and (
            not isinstance(self.column_shard_dim, int) or self.column_shard_dim <= 0
        ):
            raise ValueError(
                f"sharding.column_shard_dim: expected a positive int or null, got {self.column_shard_dim!r}"
            )

    def table_types(self, features: Sequence[str]) -> dict[str, list[str]]:
        """``{table name: allowed types}`` for a model with sparse ``features``; every feature of ``types``
        (by feature or table name) must be one of them."""
        out: dict[str, list[str]] = {}
        for name, allowed in self.types.items():
            feature = name if name in features else name.removeprefix("t_")
            if feature not in features:
                raise ValueError(
                    f"sharding.types.{name}: the model has no sparse feature {name!r}; "
                    f"its features: {', '.join(features) or '(none)'}"
                )
            out[f"t_{feature}"] = allowed
        return out


def fused_params(fused_optimizer: Mapping[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """FBGEMM fused parameters (``optimizer``, ``learning_rate``, ...) of ``{"name", "lr", "weight_decay",
    "eps", "betas"}``; ``None`` gives :data:`DEFAULT_FUSED_OPTIMIZER`."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    spec = dict(DEFAULT_FUSED_OPTIMIZER if fused_optimizer is None else fused_optimizer)
    name = spec.pop("name", None)
    if name not in FUSED_OPTIMIZERS:
        raise ValueError(f"fused_optimizer.name: unknown optimizer {name!r}; valid: {', '.join(FUSED_OPTIMIZERS)}")
    optim, devices = FUSED_OPTIMIZERS[name]
    if device.type not in devices:
        cpu = [n for n, (_, d) in FUSED_OPTIMIZERS.items() if device.type in d]
        raise ValueError(
            f"fused_optimizer.name: FBGEMM has no {name!r} for embedding tables on {device.type}; "
            f"on {device.type}: {', '.join(cpu)}"
        )
    out: dict[str, Any] = {"optimizer": EmbOptimType(optim), "learning_rate": float(spec.pop("lr", 0.01))}
    weight_decay = float(spec.pop("weight_decay", 0.0))
    if weight_decay:
        out["weight_decay"] = weight_decay
    if "eps" in spec:
        out["eps"] = float(spec.pop("eps"))
    if "betas" in spec:
        out["beta1"], out["beta2"] = (float(b) for b in spec.pop("betas"))
    if spec:
        raise ValueError(f"fused_optimizer: unknown keys {sorted(spec)}; valid: name, lr, weight_decay, eps, betas")
    return out


def _collections(model: nn.Module) -> dict[str, EmbeddingBagCollection]:
    return {n: m for n, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)}


def _reorder_hook(feature_order: list[str]) -> Any:
    """A forward hook putting a sharded collection's pooled keys back in table order."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        kt = output.wait() if hasattr(output, "wait") else output
        if not isinstance(kt, KeyedTensor) or kt.keys() == feature_order:
            return kt
        d = kt.to_dict()
        return KeyedTensor(
            keys=feature_order,
            length_per_key=[d[k].shape[1] for k in feature_order],
            values=torch.cat([d[k] for k in feature_order], dim=1),
        )

    return hook


def shard_model(
    model: nn.Module,
    cfg: ShardingConfig,
    *,
    device: torch.device | str = "cpu",
    fused_optimizer: Mapping[str, Any] | None = None,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """``model`` (built as usual, seeded, on CPU) wrapped in DMP with a collective plan; returns ``(dmp, plan)``.

    Each rank's shards hold exactly the slices of ``model``'s tables; the dense parameters are ``model``'s own
    (replicated: every rank must build the same model). ``dmp.module`` is the model with its methods
    (``forward_with_split`` ...), the input distribution happening inside the sharded collection.
    ``model`` itself is modified: its collection is replaced by the sharded one.

    Raises:
        RuntimeError: no initialised process group.
        ValueError: a type or feature of ``cfg`` the model or the device does not allow, naming the key.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (torch.distributed.init_process_group)")
    device = torch.device(device)
    collections = _collections(model)
    features = [f for ebc in collections.values() for c in ebc.embedding_bag_configs() for f in c.feature_names]
    tables = {c.name: c for ebc in collections.values() for c in ebc.embedding_bag_configs()}
    table_types = cfg.table_types(features)
    sharder = EmbeddingBagCollectionSharder(fused_params=fused_params(fused_optimizer, device))
    offered = sharder.sharding_types(device.type)
    for table, allowed in table_types.items():
        missing = [t for t in allowed if t not in offered]
        if missing:
            raise ValueError(
                f"sharding.types.{table.removeprefix('t_')}: {missing} not available on {device.type} "
                f"(TorchRec offers {', '.join(offered)})"
            )
    constraints: dict[str, ParameterConstraints] = {}
    for table in tables:
        allowed = table_types.get(table) or (["data_parallel"] if cfg.kernel == "dense" else None)
        kernels = (
            ["dense"]
            if cfg.kernel == "dense"
            else ["fused"] + (["dense"] if "data_parallel" in (allowed or []) else [])
        )
        kwargs: dict[str, Any] = {"sharding_types": allowed, "compute_kernels": kernels}
        if allowed is None:
            kwargs["sharding_types"] = [t for t in offered if t != "data_parallel"]
        if cfg.column_shard_dim is not None:
            kwargs["min_partition"] = cfg.column_shard_dim
        constraints[table] = ParameterConstraints(**kwargs)

    # DMP replaces the collection by freshly initialised shards: keep the weights to copy them in.
    originals = {
        f"{path}.embedding_bags.{name}.weight": bag.weight.detach().clone()
        for path, ebc in collections.items()
        for name, bag in ebc.embedding_bags.items()
    }
    order = {
        path: [f for c in ebc.embedding_bag_configs() for f in c.feature_names] for path, ebc in collections.items()
    }
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=[sharder], init_data_parallel=False)
    _copy_in(dmp, originals)
    for path, feature_order in order.items():
        sharded = dmp.module.get_submodule(path)
        sharded.register_forward_hook(_reorder_hook(feature_order))
    return dmp, plan


@torch.no_grad()
def _copy_in(dmp: DistributedModelParallel, originals: Mapping[str, torch.Tensor]) -> None:
    state = dmp.state_dict()
    for key, full in originals.items():
        value = state[_strip(key)] if _strip(key) in state else state[key]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                r, c = shard.metadata.shard_offsets
                h, w = shard.metadata.shard_sizes
                shard.tensor.copy_(full[r : r + h, c : c + w])
        elif hasattr(value, "to_local"):  # a DTensor
            raise NotImplementedError(f"{key}: DTensor table state is not handled")
        else:
            value.copy_(full)


def _strip(key: str) -> str:
    return key.replace(_DMP_PREFIX, "")


def model_parallel_parameters(dmp: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters TorchRec owns (every parameter of a sharded collection): each rank holds its own shard of a
    model-parallel table, and torchrec's DDP already averages the gradients of ``data_parallel`` tables, so the
    trainer must not all-reduce them (fused tables have no ``.grad`` at all). Names are ``dmp.module``'s."""
    root = dmp.module if isinstance(dmp, DistributedModelParallel) else dmp
    out: list[tuple[str, nn.Parameter]] = []
    for path, module in root.named_modules():
        if isinstance(module, ShardedModule):
            out += [(f"{path}.{n}" if path else n, p) for n, p in module.named_parameters()]
    return out


def replicated_parameters(dmp: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every other parameter (the dense ones, equal on every rank): the trainer all-reduces their gradients and
    steps them with its own optimizer."""
    root = dmp.module if isinstance(dmp, DistributedModelParallel) else dmp
    owned = {id(p) for _, p in model_parallel_parameters(root)}
    return [(n, p) for n, p in root.named_parameters() if id(p) not in owned]


def plan_dict(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """``{module: {table: {sharding_type, compute_kernel, ranks, shards: [{rank, offsets, sizes}]}}}``."""
    out: dict[str, dict[str, Any]] = {}
    for module, tables in plan.plan.items():
        out[module] = {}
        for table, ps in tables.items():  # type: ignore[union-attr]
            shards = getattr(ps.sharding_spec, "shards", None) or []
            out[module][table] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks) if ps.ranks is not None else None,
                "shards": [
                    {
                        "rank": s.placement.rank() if s.placement else None,
                        "offsets": list(s.shard_offsets),
                        "sizes": list(s.shard_sizes),
                    }
                    for s in shards
                ],  # fmt: skip
            }
    return out


def describe_plan(plan: ShardingPlan) -> str:
    """One line per table: module, table, sharding type, kernel and each shard's rank and size."""
    lines = []
    for module, tables in plan_dict(plan).items():
        for table, p in tables.items():
            shards = ", ".join(f"rank {s['rank']}: {'x'.join(map(str, s['sizes']))}" for s in p["shards"])
            where = shards or f"ranks {p['ranks']}"  # data_parallel: no shards, every rank
            lines.append(f"{module}.{table}: {p['sharding_type']}, {p['compute_kernel']} kernel, {where}")
    return "\n".join(lines)


def save_plan(plan: ShardingPlan, path: str | Path) -> None:
    """:func:`plan_dict` as JSON, written atomically."""
    atomic_write_json(plan_dict(plan), path)


def full_state_dict(dmp: DistributedModelParallel, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """The unsharded model's ``state_dict`` (its own key names, tables gathered) on rank ``dst``; ``None`` on the
    other ranks. A collective: every rank must call it. Loads into a freshly built unsharded model with
    ``load_state_dict(strict=True)``."""
    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        key = _strip(key)
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=full)
            if rank == dst:
                out[key] = full  # type: ignore[assignment]
        elif rank == dst:
            out[key] = value.detach().clone()
    return out if rank == dst else None
