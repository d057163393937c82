"""mtrec.sharding and mtrec.dist_checkpoint on 2 gloo ranks (spawned processes on loopback, each launch bounded).

The distributed runs are checked against values derived without them: the seeded unsharded model, and the same
model trained in this process on the whole batch with plain torch optimizers (SGD / Adagrad for the tables as
FBGEMM's fused exact SGD / Adagrad, Adam for the dense parameters).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtrec import dist_checkpoint
from mtrec.data.batch import FeatureSpec, SparseFeature
from mtrec.models import InputArch, MMoE, random_inputs
from mtrec.sharding import (
    ShardingConfig,
    describe_plan,
    full_state_dict,
    fused_params,
    model_parallel_parameters,
    replicated_parameters,
    save_plan,
    shard_model,
)

FEATURES = FeatureSpec(("a", "b"), (SparseFeature("u", 10), SparseFeature("i", 12, max_len=3)))
TABLES = ("inputs.ebc.embedding_bags.t_u.weight", "inputs.ebc.embedding_bags.t_i.weight")
STEPS, HALF, DENSE_LR = 3, 4, 0.01
OPTIMIZERS = {"sgd": {"name": "sgd", "lr": 0.5}, "adagrad": {"name": "adagrad", "lr": 0.1, "eps": 1e-8}}
LAUNCH_TIMEOUT = 90.0


def build(seed: int = 0) -> MMoE:
    torch.manual_seed(seed)
    return MMoE(InputArch(FEATURES, embedding_dim=8), ["x", "y"], num_experts=2, expert_dims=(4,))


def half_batch(step: int, rank: int) -> tuple[torch.Tensor, Any]:
    """Rank ``rank``'s half of the global batch of ``step``."""
    return random_inputs(FEATURES, HALF, seed=100 * step + rank)


def loss_of(out: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(((v - 0.5) ** 2).mean() for v in out.values())  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Any, world: int, port: int, args: tuple, done: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
        dist.barrier()  # every rank's outputs are written
        (done / f"rank{rank}").touch()
    finally:
        dist.destroy_process_group()
    # The rank's work is on disk: it ends here, without interpreter teardown, where a library's C++ destructor
    # occasionally aborts these spawned ranks (SIGABRT, "terminate called without an active exception"; seen
    # in CI about once in a few runs on a loaded 2-core machine, never before the work was done).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn: Any, world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; fail (never hang) past LAUNCH_TIMEOUT, and fail
    when a rank fails, except for a rank killed by SIGABRT after every rank had finished its work (the
    teardown abort described in :func:`_entry`, reported as a warning)."""
    done = Path(tempfile.mkdtemp(prefix="ranks-done-"))
    ctx = mp.start_processes(_entry, args=(fn, world, _free_port(), args, done), nprocs=world, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"{fn.__name__} on {world} ranks ran past {LAUNCH_TIMEOUT} s")
    except mp.ProcessExitedException as err:
        finished = all((done / f"rank{r}").exists() for r in range(world))
        if not (finished and err.signal_name == "SIGABRT"):
            raise
        warnings.warn(f"{fn.__name__}: a rank aborted at exit after all ranks had finished ({err})", stacklevel=2)
    finally:
        shutil.rmtree(done, ignore_errors=True)


def _gather_fused(dmp: Any) -> dict[str, torch.Tensor] | None:
    """The fused optimizer's states, each assembled whole on rank 0 (``{param/state key: tensor}``); every rank
    sends its local shards (ranks hold different keys under table_wise)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    local = []
    for param, states in dmp.fused_optimizer.state_dict()["state"].items():
        for key, v in states.items():
            if isinstance(v, ShardedTensor):
                shards = [(s.metadata.shard_offsets, s.tensor.clone()) for s in v.local_shards()]
                local.append((f"{param}/{key}", list(v.size()), shards))
    everything: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    if dist.get_rank() != 0:
        return None
    out: dict[str, torch.Tensor] = {}
    for name, size, shards in (item for part in everything for item in part):
        full = out.setdefault(name, torch.full(size, float("nan")))
        for offsets, t in shards:
            full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    assert all(not v.isnan().any() for v in out.values()), "a state's shards do not cover it"
    return out


def _dense_optimizer(dmp: Any) -> torch.optim.Adam:
    return torch.optim.Adam([p for _, p in replicated_parameters(dmp)], lr=DENSE_LR)


def _adam_state(dmp: Any, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in dmp.module.named_parameters()}
    return {f"{names[id(p)]}/{k}": v.clone() for p, s in opt.state.items() for k, v in s.items()}


# ---------------------------------------------------------------------------------------------- workers


def _train_worker(rank: int, world: int, out: Path, sharding_type: str, optim: str, reload_as: str = "") -> None:
    cfg = ShardingConfig(types={"u": [sharding_type], "t_i": [sharding_type]}, column_shard_dim=4)
    dmp, plan = shard_model(build(), cfg, device="cpu", fused_optimizer=OPTIMIZERS[optim])
    assert [n for n, _ in model_parallel_parameters(dmp)] == list(TABLES)
    full = full_state_dict(dmp)
    if rank == 0:
        save_plan(plan, out / "plan.json")
        (out / "plan.txt").write_text(describe_plan(plan))
        torch.save(full, out / "initial.pt")
    adam = _dense_optimizer(dmp)
    for step in range(STEPS):
        dense, sparse = half_batch(step, rank)
        out_, split = dmp.module.forward_with_split(dense, sparse)  # the inner model's own methods work
        loss = loss_of(dmp.module(dense, sparse))
        loss.backward()
        for _, p in replicated_parameters(dmp):
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        adam.step()
        adam.zero_grad()
        full = full_state_dict(dmp)
        if rank == 0:
            torch.save(full, out / f"step{step + 1}.pt")
    fused = _gather_fused(dmp)
    if rank == 0:
        torch.save({"fused": fused, "adam": _adam_state(dmp, adam)}, out / "optim.pt")
    optimizers = {"dense": adam, "fused": dmp.fused_optimizer}
    dist_checkpoint.save(out / "ckpt", model=dmp, optimizers=optimizers, extra={"step": STEPS, "rng": [1, 2]})

    if reload_as:  # the same 2 ranks load the checkpoint into another sharding
        _load_worker(rank, world, out, reload_as, optim, str(world))
        return

    # A save that fails on rank 1 while writing: both ranks raise, the pointer stays on the previous checkpoint.
    from torch.distributed.checkpoint import filesystem

    if rank == 1:

        def broken(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            raise OSError("disk full (simulated)")

        filesystem.FileSystemWriter.write_data = broken  # type: ignore[method-assign]
    try:
        dist_checkpoint.save(out / "ckpt", model=dmp, optimizers=optimizers, extra={"step": STEPS + 1})
    except BaseException as err:  # noqa: B036 (DCP raises CheckpointException, a BaseException)
        (out / f"crash{rank}.txt").write_text(repr(err))


def _load_worker(rank: int, world: int, out: Path, sharding_type: str, optim: str, tag: str) -> None:
    cfg = ShardingConfig(types={"u": [sharding_type], "i": [sharding_type]}, column_shard_dim=4)
    dmp, _ = shard_model(build(seed=123), cfg, fused_optimizer=OPTIMIZERS[optim])  # other weights: load must set
    adam = _dense_optimizer(dmp)
    extra = dist_checkpoint.load(out / "ckpt", model=dmp, optimizers={"dense": adam, "fused": dmp.fused_optimizer})
    full = full_state_dict(dmp)
    fused = _gather_fused(dmp)
    if rank == 0:
        torch.save({"extra": extra, "model": full, "fused": fused, "adam": _adam_state(dmp, adam)},
                   out / f"loaded_{tag}.pt")  # fmt: skip


# ---------------------------------------------------------------------------------------------- reference


def reference_run(optim: str) -> list[dict[str, torch.Tensor]]:
    """The same training in one process on the whole batch: the model's state after each step."""
    model = build()
    tables = [p for n, p in model.named_parameters() if n in TABLES]
    dense = [p for n, p in model.named_parameters() if n not in TABLES]
    spec = OPTIMIZERS[optim]
    table_opt: torch.optim.Optimizer = (
        torch.optim.SGD(tables, lr=spec["lr"])
        if optim == "sgd"
        else torch.optim.Adagrad(tables, lr=spec["lr"], eps=spec["eps"])
    )
    adam = torch.optim.Adam(dense, lr=DENSE_LR)
    states = []
    for step in range(STEPS):
        loss = sum(loss_of(model(*half_batch(step, r))) for r in range(2)) / 2  # the mean over the whole batch
        loss.backward()  # type: ignore[union-attr]
        table_opt.step()
        adam.step()
        table_opt.zero_grad()
        adam.zero_grad()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------- tests


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"sharding.types.user_id: unknown sharding type 'rowwise'; valid: table_wise"):
        ShardingConfig(types={"user_id": ["rowwise"]})
    with pytest.raises(ValueError, match=r"sharding.kernel: unknown kernel 'sparse'"):
        ShardingConfig(kernel="sparse")
    with pytest.raises(ValueError, match=r"sharding.types.u: \['table_wise'\] with sharding.kernel=dense"):
        ShardingConfig(types={"u": ["table_wise"]}, kernel="dense")
    with pytest.raises(
        ValueError, match=r"sharding.types.city: the model has no sparse feature 'city'; its features: u, i"
    ):
        ShardingConfig(types={"city": ["table_wise"]}).table_types(["u", "i"])
    assert ShardingConfig(types={"t_u": "column_wise"}).table_types(["u", "i"]) == {"t_u": ["column_wise"]}
    with pytest.raises(
        ValueError, match=r"no 'adam' for embedding tables on cpu; on cpu: sgd, adagrad, rowwise_adagrad"
    ):
        fused_params({"name": "adam", "lr": 0.1}, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"fused_optimizer: unknown keys \['momentum'\]"):
        fused_params({"name": "sgd", "momentum": 0.9}, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="initialised process group"):
        shard_model(build(), ShardingConfig())


def test_table_wise_training_equals_single_process_and_failed_save(tmp_path: Path) -> None:
    launch(_train_worker, 2, tmp_path, "table_wise", "sgd")
    plan = json.loads((tmp_path / "plan.json").read_text())["inputs.ebc"]
    assert {t: p["sharding_type"] for t, p in plan.items()} == {"t_u": "table_wise", "t_i": "table_wise"}
    assert sorted(p["shards"][0]["rank"] for p in plan.values()) == [0, 1]  # one table on each rank
    assert plan["t_u"]["shards"][0]["sizes"] == [10, 8] and plan["t_i"]["shards"][0]["sizes"] == [12, 8]
    assert "t_u: table_wise, fused kernel, rank" in (tmp_path / "plan.txt").read_text()

    # The shards are the seeded model's tables (DMP alone would have re-initialised them).
    seeded = build().state_dict()
    initial = torch.load(tmp_path / "initial.pt")
    assert sorted(initial) == sorted(seeded) and all(torch.equal(initial[k], seeded[k]) for k in seeded)
    build(seed=7).load_state_dict(initial, strict=True)

    # Gradient semantics: one fused SGD step moved each table by lr * (gradient of the global mean loss),
    # i.e. the mean over ranks of each rank's half-batch gradient, not their sum.
    model = build()
    (sum(loss_of(model(*half_batch(0, r))) for r in range(2)) / 2).backward()  # type: ignore[union-attr]
    step1 = torch.load(tmp_path / "step1.pt")
    for name, p in model.named_parameters():
        if name in TABLES:
            moved = (seeded[name] - step1[name]) / OPTIMIZERS["sgd"]["lr"]
            torch.testing.assert_close(moved, p.grad, atol=1e-6, rtol=1e-4)
            assert not torch.allclose(moved, 2 * p.grad)

    # A few steps of sharded training are the single-process training on the whole batch.
    ref = reference_run("sgd")
    for step in range(STEPS):
        assert_states_close(torch.load(tmp_path / f"step{step + 1}.pt"), ref[step])

    # The failed save raised on both ranks and left the previous checkpoint in place and loadable offline.
    assert "disk full" in (tmp_path / "crash1.txt").read_text() and (tmp_path / "crash0.txt").exists()
    assert json.loads((tmp_path / "ckpt" / "last.json").read_text())["checkpoint"] == f"ckpt-{STEPS}"
    offline = dist_checkpoint.to_full_state_dict(tmp_path / "ckpt")
    assert_states_close(offline, torch.load(tmp_path / f"step{STEPS}.pt"), atol=0)
    build(seed=7).load_state_dict(offline, strict=True)


def test_column_wise_checkpoint_reshards_to_one_and_two_ranks(tmp_path: Path) -> None:
    launch(_train_worker, 2, tmp_path, "column_wise", "adagrad", "table_wise")  # and reloads table-wise
    plan = json.loads((tmp_path / "plan.json").read_text())["inputs.ebc"]
    assert [(s["rank"], s["offsets"], s["sizes"]) for s in plan["t_i"]["shards"]] == [
        (0, [0, 0], [12, 4]),
        (1, [0, 4], [12, 4]),
    ]
    seeded, initial = build().state_dict(), torch.load(tmp_path / "initial.pt")
    assert all(torch.equal(initial[k], seeded[k]) for k in seeded)
    ref = reference_run("adagrad")
    final = torch.load(tmp_path / f"step{STEPS}.pt")
    assert_states_close(final, ref[-1])
    saved = torch.load(tmp_path / "optim.pt")
    assert saved["fused"] and all(v.abs().sum() > 0 for v in saved["fused"].values())  # Adagrad's accumulators

    # 2 ranks column-wise -> 1 rank, and -> 2 ranks table-wise: weights and both optimizers' states carry over.
    launch(_load_worker, 1, tmp_path, "table_wise", "adagrad", "1")
    for tag in ("1", "2"):
        loaded = torch.load(tmp_path / f"loaded_{tag}.pt", weights_only=False)
        assert loaded["extra"] == {"step": STEPS, "rng": [1, 2]}
        assert_states_close(loaded["model"], final, atol=0)
        assert_states_close(loaded["adam"], saved["adam"], atol=0)
        assert sorted(loaded["fused"]) == sorted(saved["fused"])
        for k, v in saved["fused"].items():
            torch.testing.assert_close(loaded["fused"][k].reshape(v.shape), v, atol=0, rtol=0)
    assert_states_close(dist_checkpoint.to_full_state_dict(tmp_path / "ckpt"), final, atol=0)
