"""Distributed training at scale: MMoE samples/s on 1 and 2 CPU ranks (gloo), the bytes every step moves, and a
cost-model projection to 8, 64 and 512 GPUs.

    python benchmarks/distributed.py            # 1M train rows, 3 timing windows of 30 steps (about 4 min, 2 cores)
    python benchmarks/distributed.py --quick    # 400k rows, 1 window of 15 steps (about 2 min)

**Measured (this machine).** The synthetic click log (:func:`mtrec.data.filetools.write_synthetic`; features
user_id, item_id, category, history, 16-wide tables) is written once as Parquet into a temporary folder. For each
plan (``table_wise``: every table whole on one rank; ``column_wise`` with ``sharding.column_shard_dim=8``: every
16-wide table in two 8-wide column shards) and each world size (1, 2) this script re-invokes itself under ``torchrun
--standalone --nproc_per_node=N ... --worker``. Each rank sets ``torch.set_num_threads(1)`` (the same threads per
rank, so 2 ranks use 2 cores), composes ``data=files data.in_memory=true model=mmoe optimizer=adagrad`` (FBGEMM's
CPU kernels have no adam; adagrad trains tables and dense parameters alike), builds the trainer with
``build_training(cfg, run_dir, bundle, dist=init_distributed("cpu"))`` and steps ``trainer.train_step`` on batches
of ``--batch-size`` rows per rank, the rows read into memory once and cut per global batch as ``Trainer.fit`` does
(``RankShard(bundle.train, rank, world).batches(...)``, rank ``r`` the ``r``-th part of each global batch) wrapped
in :func:`mtrec.distributed.lockstep`. After ``--warmup`` steps, ``--windows`` windows of ``--steps`` steps are
timed (each between barriers; the slowest rank's wall time); ``samples_per_s`` is the best window's global rows per
second (``steps x batch x ranks / seconds``; the median window is reported too). Scaling efficiency is ``samples/s(2
ranks) / (2 x samples/s(1 rank))``; target (issue 14): 2 ranks >= 1.7x 1 rank, per plan.

**Bytes moved.** After timing, ``--count-steps`` more steps run with the collectives wrapped (monkeypatched in the
worker): ``torch.distributed.all_to_all_single`` (TorchRec's KJT id/length distribution and its pooled-embedding
all-to-all, :mod:`torchrec.distributed.comm_ops` / ``dist_data``), ``torch.distributed._functional_collectives
.all_to_all_single`` (the autograd variant), ``all_reduce``, ``reduce_scatter*`` and ``all_gather*``. A wrapper adds
the bytes of the tensor it is handed (sent) and of the one it fills (received), and waits for an async one at once,
so the time inside collectives is measured too (the counting steps only; the timed windows are unwrapped). Reported
per step per rank: ``alltoall_bytes`` (sent, float = pooled embeddings forward + their gradients backward, int =
ids, lengths and splits), ``allreduce_bytes`` (all of them; ``allreduce_dp_bytes`` those through
:meth:`mtl.parallel.DataParallel.all_reduce_`: the global losses and the one flat all-reduce of replicated gradients;
the rest is :func:`lockstep`'s one-int all-reduce per batch). The analytic count printed next to it:
pooled all-to-all = ``4 (B F D + W B D_own)`` bytes sent per step (forward: this rank's owned columns ``D_own`` for
the global batch ``W B``; backward: the gradient of this rank's ``B`` rows for all ``F`` features of width ``D``),
``= 2 x B F D x 4`` for a balanced plan; dense all-reduce = ``replicated parameters x 4`` + the losses (``2 k``
float64). With 1 rank nothing is all-reduced (``mtl.parallel`` skips it) but TorchRec still calls its all-to-alls
on the one rank (the bytes are copied, not sent).

**Where the time goes.** Each rank also times, per step, the wait for the next batch (data: ``RankShard`` cutting
the global batch out of the rows in memory and building the KJT), the time inside collectives in the counting
steps (compute = step - that), the same collectives replayed by themselves after a barrier (their own cost, so
the rest of the time inside them is one rank waiting for the other), and its CPU seconds per wall second
(``time.process_time``, every thread of the rank: below 1 the rank did not get its core, the machine being busy).
``samples_per_cpu_s`` (samples/s over the ranks' summed CPU share) and its 2-rank / 1-rank ratio are reported
beside the target as a diagnostic, not as the target.

**Projection (a model, not a measurement).** Weak scaling: ``B`` rows per GPU fixed, global batch ``N B``. Step time
``= compute + alltoall + allreduce`` (no overlap of communication with compute: conservative). GPU compute per step
``= measured CPU compute per step (1 rank, 1 thread, from the counting steps) / --gpu-speedup`` (default 20: an
assumed ratio of one data-centre GPU to one CPU core for this small, launch-bound MLP; a stated assumption, not a
measurement; change it on the command line). All-to-all time ``= (N-1)/N x V_a2a / bw + n_a2a (N-1) alpha``;
all-reduce ``= 2 (N-1)/N x V_ar / bw + n_ar 2 log2(N) alpha`` (a ring's bandwidth term, a tree's latency term: these
all-reduces are small), with ``V`` the per-rank bytes per step and ``n`` the collective calls per step, measured at
2 ranks with the column-wise plan; the pooled part of ``V_a2a`` is ``2 x 4 B F D`` for a balanced placement (every
GPU owning ``F D / N`` columns, which needs at least ``N`` tables or column shards) and, apart, for this model's
four 16-wide tables as they are (``as_is``: with ``N`` above its 8 column shards, an owning GPU sends ``4 N B x 8``
bytes forward, its shard for the whole global batch, and becomes the bottleneck). Bandwidths per GPU, one direction:
NVLink 300 GB/s (8 GPUs in one node only), 400 Gb/s and 100 Gb/s Ethernet/InfiniBand (50 and 12.5 GB/s; for 64 and
512 GPUs the inter-node link is the one every byte pays, a flat model that ignores hierarchical all-to-all);
per-message latency alpha 5 us on NVLink, 10 us on the network. Sharding sizes: a GPU of 80 GB HBM with 50 % for
embedding tables (40 GB); a table needs ``rows x dim x 4 x (1 + s)`` bytes with optimizer state ``s`` (adagrad 1,
rowwise_adagrad 1/dim, sgd 0): above 40 GB it cannot be on one GPU and needs ``row_wise`` (or ``table_row_wise``); a
table fitting one GPU but larger than 1.25x the average per-GPU share of all tables (or wider than the average
per-GPU share of the embedding columns, which makes its owner the all-to-all bottleneck) needs ``column_wise``.

Writes ``benchmarks/results/distributed.json`` (``--quick``: ``distributed_quick.json``) with ``machine_busy``
(``os.getloadavg()`` before the run, > 0.5 on this 2-core machine), every assumption and the targets.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, compose, machine, table, write_json

FEATURES = ("user_id", "item_id", "category", "history")
PLANS = ("table_wise", "column_wise")
SPLITS = ("train", "val", "test", "schema")
GB = 1e9
INTERCONNECTS = {  # name: (bytes/s per GPU, one direction; per-message latency s; largest N it applies to)
    "NVLink 300 GB/s": (300e9, 5e-6, 8),
    "IB/Eth 400 Gb/s": (400e9 / 8, 10e-6, None),
    "IB/Eth 100 Gb/s": (100e9 / 8, 10e-6, None),
}
HBM_BYTES = 80e9
EMBEDDING_FRACTION = 0.5
OPTIMIZER_STATE = {"sgd": lambda dim: 0.0, "adagrad": lambda dim: 1.0, "rowwise_adagrad": lambda dim: 1.0 / dim}
BALANCE_TOLERANCE = 1.25


# ------------------------------------------------------------------------------------------------------ worker


class Counter:
    """Wraps the torch.distributed collectives; adds up bytes (sent = the tensor handed in, received = the one
    filled), calls and blocking seconds per kind while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.stats: dict[str, dict[str, float]] = {}
        self.calls: list[tuple[str, int, int]] = []  # (kind, sent, received) of every call, in order
        self.in_dp = False

    def add(self, kind: str, sent: int, received: int, seconds: float) -> None:
        if not self.on:
            return
        self.calls.append((kind, sent, received))
        s = self.stats.setdefault(kind, {"calls": 0, "sent": 0, "received": 0, "seconds": 0.0})
        s["calls"] += 1
        s["sent"] += sent
        s["received"] += received
        s["seconds"] += seconds

    def install(self) -> None:
        import torch
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        from mtl.parallel import DataParallel

        counter = self

        def nbytes(t) -> int:
            if isinstance(t, torch.Tensor):
                return t.numel() * t.element_size()
            if isinstance(t, (list, tuple)):
                return sum(nbytes(x) for x in t)
            return 0

        def kind_of(prefix: str, t) -> str:
            first = t[0] if isinstance(t, (list, tuple)) and t else t
            fp = isinstance(first, torch.Tensor) and first.is_floating_point()
            return f"{prefix}_{'float' if fp else 'int'}"

        def timed(fn, prefix, out_arg, in_arg):
            signature = inspect.signature(fn)

            def wrapper(*args, **kwargs):
                if not counter.on:
                    return fn(*args, **kwargs)
                t0 = time.perf_counter()
                res = fn(*args, **kwargs)
                if kwargs.get("async_op") and res is not None:
                    res.wait()  # blocking here: the time inside the collective (counting steps only)
                seconds = time.perf_counter() - t0
                bound = signature.bind_partial(*args, **kwargs).arguments
                out, inp = bound.get(out_arg), bound.get(in_arg)
                kind = kind_of(prefix, inp)
                if prefix == "allreduce" and counter.in_dp:
                    kind = "allreduce_dp"
                counter.add(kind, nbytes(inp), nbytes(out), seconds)
                return res

            return wrapper

        dist.all_to_all_single = timed(dist.all_to_all_single, "alltoall", "output", "input")
        dist.all_reduce = timed(dist.all_reduce, "allreduce", "tensor", "tensor")
        for name in ("reduce_scatter", "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor"):
            fn = getattr(dist, name)
            params = list(inspect.signature(fn).parameters)
            setattr(dist, name, timed(fn, name, params[0], params[1]))

        fa2a = funcol.all_to_all_single

        def functional_a2a(inp, output_split_sizes, input_split_sizes, group, *args, **kwargs):
            t0 = time.perf_counter()
            out = fa2a(inp, output_split_sizes, input_split_sizes, group, *args, **kwargs)
            if counter.on:
                out = funcol.wait_tensor(out) if hasattr(funcol, "wait_tensor") else out
                received = nbytes(out)
                counter.add(kind_of("alltoall", inp), nbytes(inp), received, time.perf_counter() - t0)
            return out

        funcol.all_to_all_single = functional_a2a

        original = DataParallel.all_reduce_

        def dp_all_reduce(self, tensor):
            counter.in_dp = True
            try:
                return original(self, tensor)
            finally:
                counter.in_dp = False

        DataParallel.all_reduce_ = dp_all_reduce


def _plan_columns(plan, rank: int) -> tuple[int, list[dict]]:
    """The embedding columns this rank owns and the plan's shards (from :func:`mtrec.sharding.plan_dict`)."""
    from mtrec.sharding import plan_dict

    own, shards = 0, []
    for tables in plan_dict(plan).values():
        for name, p in tables.items():
            for s in p["shards"]:
                shards.append({"table": name, "type": p["sharding_type"], "rank": s["rank"], "sizes": s["sizes"]})
                if s["rank"] == rank:
                    own += s["sizes"][1]
    return own, shards


def replay_collectives(calls: list[tuple[str, int, int]], world: int, repeats: int = 10) -> float | None:
    """The seconds one step's collectives take by themselves: the same calls with the same byte counts (the max
    over ranks; an all-to-all with equal splits) after a barrier, so no rank waits for another's compute."""
    import torch
    import torch.distributed as dist

    if world == 1 or not calls:
        return None
    sizes = torch.tensor([max(sent, received) for _, sent, received in calls], dtype=torch.int64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    buffers = []
    for (kind, _, _), size in zip(calls, sizes.tolist(), strict=True):
        n = max(world, -(-size // (4 * world)) * world)
        buffers.append((kind, torch.zeros(n), torch.zeros(n)))
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for kind, a, b in buffers:
            if kind.startswith("alltoall"):
                dist.all_to_all_single(b, a)
            else:
                dist.all_reduce(a)
    return (time.perf_counter() - t0) / repeats


def worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(spec["threads"])
    counter = Counter()
    counter.install()  # off until the counting steps: the timed windows run the collectives as they are

    from mtrec.distributed import RankShard, init_distributed, lockstep
    from mtrec.train import build_training, load_data

    ctx = init_distributed("cpu")
    assert ctx is not None, "run under torchrun"
    world, rank, B = ctx.world_size, ctx.rank, spec["batch_size"]
    plan_type = spec["plan"]
    cfg = compose(
        "data=files",
        *(f"data.{k}={spec['paths'][k]}" for k in SPLITS),
        "data.in_memory=true",
        "data.progress=false",
        "model=mmoe",
        "optimizer=adagrad",
        f"trainer.batch_size={B}",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "sharding.types={" + ",".join(f"{f}:[{plan_type}]" for f in FEATURES) + "}",
        "sharding.column_shard_dim=8",
        f"seed={spec['seed']}",
    )
    t0 = time.perf_counter()
    bundle = load_data(cfg.data)
    load_s = time.perf_counter() - t0
    run_dir = Path(spec["run_dir"]) / f"rank{rank}"
    training = build_training(cfg, run_dir, bundle, dist=ctx)
    trainer = training.trainer
    own_cols, shards = _plan_columns(training.plan, rank)
    F = len(bundle.features.sparse)
    D = int(cfg.model.inputs.embedding_dim)
    replicated = sum(p.numel() for p in trainer.params.replicated or ())
    num_tasks = len(trainer.tasks)

    # what Trainer.fit does with data in memory: each rank takes its part of every global batch (RankShard)
    shard = RankShard(bundle.train, rank, world)

    def batches():
        epoch = 0
        while True:
            yield from lockstep(shard.batches(B, shuffle=True, seed=spec["seed"], epoch=epoch, drop_last=True), ctx)
            epoch += 1

    it = batches()

    def run_steps(n: int) -> dict:
        data_s = step_s = 0.0
        dist.barrier()
        t_start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(n):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            trainer.train_step(batch)
            t2 = time.perf_counter()
            data_s += t1 - t0
            step_s += t2 - t1
        cpu = time.process_time() - cpu_start  # this rank's CPU seconds (all its threads): < wall when starved
        dist.barrier()
        wall = time.perf_counter() - t_start
        return {"wall": wall, "data": data_s, "step": step_s, "cpu": cpu}

    run_steps(spec["warmup"])
    windows = [run_steps(spec["steps"]) for _ in range(spec["windows"])]
    counter.on = True
    counted = run_steps(spec["count_steps"])
    counter.on = False
    replay = replay_collectives(counter.calls[: len(counter.calls) // max(1, spec["count_steps"])], world)

    local = {
        "rank": rank,
        "rows_held": len(bundle.train),
        "load_s": load_s,
        "windows": windows,
        "counted": counted,
        "collectives": counter.stats,
        "replay_seconds_per_step": replay,
        "own_columns": own_cols,
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    if rank == 0:
        result = {
            "ranks": world,
            "plan": plan_type,
            "batch_per_rank": B,
            "features": F,
            "embedding_dim": D,
            "replicated_params": replicated,
            "tasks": num_tasks,
            "steps": spec["steps"],
            "count_steps": spec["count_steps"],
            "shards": shards,
            "per_rank": gathered,
        }
        Path(spec["out"]).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ driver


def launch(ranks: int, plan: str, paths: dict, tmp: Path, args: argparse.Namespace) -> dict:
    out = tmp / f"result-{plan}-{ranks}.json"
    spec = {
        "paths": paths,
        "plan": plan,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "windows": args.windows,
        "count_steps": args.count_steps,
        "seed": args.seed,
        "run_dir": str(tmp / f"run-{plan}-{ranks}"),
        "out": str(out),
    }
    spec_path = tmp / f"spec-{plan}-{ranks}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(Path(__file__).resolve()), "--worker", str(spec_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"torchrun --nproc-per-node={ranks} ({plan}) failed with exit status {proc.returncode}")
    raw = json.loads(out.read_text())
    raw["launch_seconds"] = time.perf_counter() - t0
    raw["loadavg_before"] = load_before
    return summarize(raw)


def summarize(raw: dict) -> dict:
    W, B, F, D = raw["ranks"], raw["batch_per_rank"], raw["features"], raw["embedding_dim"]
    per_rank = raw["per_rank"]
    n_windows = len(per_rank[0]["windows"])
    walls = [max(r["windows"][i]["wall"] for r in per_rank) for i in range(n_windows)]
    steps, cs = raw["steps"], raw["count_steps"]
    rows_per_window = steps * B * W
    best, median = min(walls), statistics.median(walls)
    # collectives per step per rank: the max over ranks (the plan's placement may load one rank more)

    def per_step(kind: str, field: str, reducer=max) -> float:
        return reducer(r["collectives"].get(kind, {}).get(field, 0) for r in per_rank) / cs

    a2a_float = per_step("alltoall_float", "sent")
    a2a_int = per_step("alltoall_int", "sent")
    ar_all = per_step("allreduce_float", "sent") + per_step("allreduce_int", "sent") + per_step("allreduce_dp", "sent")
    ar_dp = per_step("allreduce_dp", "sent")
    own_max = max(r["own_columns"] for r in per_rank)
    analytic_a2a = 4 * (B * F * D + W * B * own_max)
    analytic_ar = (raw["replicated_params"] * 4 + 2 * raw["tasks"] * 8) if W > 1 else 0
    comm_s = max(sum(v["seconds"] for v in r["collectives"].values()) for r in per_rank) / cs
    counted_step = max(r["counted"]["step"] for r in per_rank) / cs
    counted_data = max(r["counted"]["data"] for r in per_rank) / cs
    window_data = max(r["windows"][walls.index(best)]["data"] for r in per_rank) / steps
    best_i = walls.index(best)
    cpu_share = [r["windows"][best_i]["cpu"] / r["windows"][best_i]["wall"] for r in per_rank]
    replay = [r["replay_seconds_per_step"] for r in per_rank if r["replay_seconds_per_step"] is not None]
    replay_ms = 1e3 * max(replay) if replay else 0.0
    calls = {
        k: max(r["collectives"].get(k, {}).get("calls", 0) for r in per_rank) / cs
        for k in sorted({k for r in per_rank for k in r["collectives"]})
    }
    return {
        "ranks": W,
        "plan": raw["plan"],
        "batch_per_rank": B,
        "samples_per_s": rows_per_window / best,
        "samples_per_s_median": rows_per_window / median,
        "step_ms": 1e3 * best / steps,
        "window_seconds": walls,
        "alltoall_bytes": a2a_float + a2a_int,
        "alltoall_pooled_bytes": a2a_float,
        "alltoall_index_bytes": a2a_int,
        "alltoall_pooled_bytes_analytic": analytic_a2a,
        "allreduce_bytes": ar_all,
        "allreduce_dp_bytes": ar_dp,
        "allreduce_dp_bytes_analytic": analytic_ar,
        "replicated_params": raw["replicated_params"],
        "own_columns_max": own_max,
        "collective_calls_per_step": calls,
        "collective_seconds_per_step": {
            k: max(r["collectives"].get(k, {}).get("seconds", 0) for r in per_rank) / cs for k in calls
        },
        "profile_ms_per_step": {
            "step_in_counting_steps": 1e3 * counted_step,
            "communication": 1e3 * comm_s,
            "compute": 1e3 * (counted_step - comm_s),
            "data_wait": 1e3 * counted_data,
            "data_wait_timed_window": 1e3 * window_data,
            "collectives_alone": replay_ms,
            "waiting_in_collectives": 1e3 * comm_s - replay_ms,
        },
        "cpu_seconds_per_wall_second": cpu_share,
        "rows_held_per_rank": [r["rows_held"] for r in per_rank],
        "load_seconds": max(r["load_s"] for r in per_rank),
        "shards": raw["shards"],
        "loadavg_before": raw["loadavg_before"],
        "launch_seconds": raw["launch_seconds"],
    }


# ------------------------------------------------------------------------------------------------------ projection


def project(results: list[dict], args: argparse.Namespace) -> tuple[list[dict], dict]:
    one = next(r for r in results if r["ranks"] == 1 and r["plan"] == "column_wise")
    two = next(r for r in results if r["ranks"] == 2 and r["plan"] == "column_wise")
    B, F, D = two["batch_per_rank"], 4, 16
    cpu_compute_s = one["profile_ms_per_step"]["compute"] / 1e3
    gpu_compute_s = cpu_compute_s / args.gpu_speedup
    index_bytes = two["alltoall_index_bytes"]  # ids + lengths + splits per rank: N-independent for a fixed B
    v_ar = two["allreduce_dp_bytes"]
    calls = two["collective_calls_per_step"]
    n_a2a = calls.get("alltoall_float", 0) + calls.get("alltoall_int", 0)
    n_ar = calls.get("allreduce_dp", 0) + calls.get("allreduce_int", 0) + calls.get("allreduce_float", 0)
    shard_dim, shards_total = 8, F * D // 8
    rows = []
    for N in (8, 64, 512):
        for name, (bw, alpha, max_n) in INTERCONNECTS.items():
            if max_n is not None and N > max_n:
                continue
            for placement in ("balanced", "as_is"):
                if placement == "balanced":  # every GPU owns F D / N columns (enough tables or shards)
                    pooled = 2 * 4 * B * F * D
                else:  # this model's 8 column shards of width 8: an owner sends its shards for the global batch
                    own = shard_dim * -(-shards_total // N)  # the most columns one GPU owns
                    pooled = 4 * (B * F * D + N * B * own)
                v_a2a = pooled + index_bytes
                t_a2a = (N - 1) / N * v_a2a / bw + n_a2a * (N - 1) * alpha
                t_ar = 2 * (N - 1) / N * v_ar / bw + n_ar * 2 * math.ceil(math.log2(N)) * alpha
                step = gpu_compute_s + t_a2a + t_ar
                rows.append({
                    "gpus": N, "interconnect": name, "placement": placement, "alltoall_bytes_per_rank": v_a2a,
                    "allreduce_bytes_per_rank": v_ar, "compute_ms": 1e3 * gpu_compute_s, "alltoall_ms": 1e3 * t_a2a,
                    "allreduce_ms": 1e3 * t_ar, "step_ms": 1e3 * step, "samples_per_s": N * B / step,
                    "comm_fraction": (t_a2a + t_ar) / step,
                })  # fmt: skip
    budget = HBM_BYTES * EMBEDDING_FRACTION
    thresholds = []
    for dim in (16, 64, 128, 256):
        for opt, state in OPTIMIZER_STATE.items():
            per_row = dim * 4 * (1 + state(dim))
            thresholds.append({"dim": dim, "optimizer": opt, "bytes_per_row": per_row,
                               "max_rows_one_gpu": int(budget // per_row)})  # fmt: skip
    sizing = {
        "embedding_budget_bytes_per_gpu": budget,
        "row_wise_needed_when": "rows x dim x 4 x (1 + optimizer state per element) > embedding budget of one GPU",
        "column_wise_needed_when": (
            f"a table fitting one GPU but above {BALANCE_TOLERANCE}x the mean per-GPU share of all tables' bytes, or "
            "wider than sum(dims)/N columns (its owner then sends more pooled bytes than the others): split it into "
            "ceil(dim / (sum(dims)/N)) column shards"
        ),
        "thresholds": thresholds,
        "this_model": {
            "tables": {"user_id": [100_000, 16], "item_id": [50_000, 16], "category": [200, 16], "history": "item ids"},
            "note": (
                f"{F} tables x {D} columns = {F * D} columns: above {F * D // 8} GPUs (8-wide shards) even column-wise "
                "cannot give every GPU a share, the owners of the shards carry the global batch's pooled bytes "
                "(placement as_is); such small tables (6.4 MB at most, with adagrad state 12.8 MB) are better "
                "replicated (data_parallel), trading the all-to-all for an all-reduce of the table gradients"
            ),
        },
    }
    assumptions = {
        "weak_scaling": f"{B} rows per GPU fixed, global batch N x {B}",
        "gpu_compute_model": (
            f"measured CPU compute per step at 1 rank x {args.threads} thread ({1e3 * cpu_compute_s:.1f} ms, "
            f"column_wise, no collectives at 1 rank) / gpu_speedup {args.gpu_speedup} = {1e3 * gpu_compute_s:.2f} ms; "
            "an assumed ratio, not measured on a GPU"
        ),
        "gpu_speedup": args.gpu_speedup,
        "overlap": "none: step = compute + all-to-all + all-reduce",
        "alltoall_cost": "(N-1)/N x bytes / bandwidth + calls x (N-1) x latency",
        "allreduce_cost": (
            "ring bandwidth term 2 (N-1)/N x bytes / bandwidth + a tree latency term calls x 2 log2(N) x latency "
            "(the all-reduces here are small: NCCL picks trees for them; a ring's 2 (N-1) latencies would add "
            "about 3 x 2 x 511 x 10 us = 31 ms at 512 GPUs)"
        ),
        "bytes_source": (
            "measured at 2 ranks, column_wise: pooled all-to-all per rank 2 x B F D x 4 (balanced) or the "
            "as_is owner volume 4 (B F D + N B D_own); index all-to-all bytes and the dense all-reduce bytes as "
            "measured (both independent of N at fixed B); calls per step as measured"
        ),
        "interconnects": {
            k: {"bytes_per_s": v[0], "latency_s": v[1], "max_gpus": v[2]} for k, v in INTERCONNECTS.items()
        },
        "multi_node": "64 and 512 GPUs: every byte priced at the inter-node link (flat, not hierarchical)",
        "hbm_bytes": HBM_BYTES,
        "embedding_fraction_of_hbm": EMBEDDING_FRACTION,
        "optimizer_state_per_element": {"sgd": 0, "adagrad": 1, "rowwise_adagrad": "1/dim"},
        "balance_tolerance": BALANCE_TOLERANCE,
        "collective_calls_per_step": {"alltoall": n_a2a, "allreduce": n_ar},
    }
    return rows, {"sizing": sizing, "assumptions": assumptions}


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="400k rows, one window of 15 steps")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per rank per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--count-steps", type=int, default=3, help="steps with the collectives counted")
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS)
    parser.add_argument("--gpu-speedup", type=float, default=20.0, help="assumed GPU/CPU-core compute ratio")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text()))
    if args.quick:
        args.rows, args.steps, args.windows = 400_000, 15, 1
    load = os.getloadavg()
    busy = load[0] > 0.5
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (machine busy: {busy})")
    from mtrec.data.filetools import write_synthetic

    results = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        summary = write_synthetic(tmp / "clicks", args.rows, rows_per_file=args.rows // 4, row_group_size=25_000)
        paths = {k: summary[k] for k in SPLITS}
        print(f"wrote {args.rows:,} train rows in {time.perf_counter() - t0:.1f} s", flush=True)
        for plan in args.plans:
            for ranks in (1, 2):
                r = launch(ranks, plan, paths, tmp, args)
                results.append(r)
                p = r["profile_ms_per_step"]
                print(f"  {plan:11s} {ranks} rank(s): {r['samples_per_s']:>8,.0f} samples/s (median "
                      f"{r['samples_per_s_median']:,.0f}), step {r['step_ms']:.1f} ms = compute {p['compute']:.1f} + "
                      f"comm {p['communication']:.1f} (+ data {p['data_wait']:.1f}); load {r['loadavg_before']:.2f}",
                      flush=True)  # fmt: skip
    efficiency = {}
    for plan in args.plans:
        one = next(r for r in results if r["plan"] == plan and r["ranks"] == 1)
        two = next(r for r in results if r["plan"] == plan and r["ranks"] == 2)
        two["efficiency"] = two["samples_per_s"] / (2 * one["samples_per_s"])
        one["efficiency"] = 1.0
        for r in (one, two):  # rows per CPU-second each rank got: what the machine's other load cannot change
            r["samples_per_cpu_s"] = r["samples_per_s"] / sum(r["cpu_seconds_per_wall_second"])
        efficiency[plan] = {
            "speedup": two["samples_per_s"] / one["samples_per_s"],
            "efficiency": two["efficiency"],
            "efficiency_per_cpu_s": two["samples_per_cpu_s"] / one["samples_per_cpu_s"],
        }
    print(f"\nMMoE, batch {args.batch_size} per rank, {args.threads} thread per rank, gloo, {args.rows:,} rows "
          "in memory")  # fmt: skip
    print(table(
        ["plan", "ranks", "samples/s", "eff.", "step ms", "compute", "in coll.", "coll. alone", "data", "CPU/wall",
         "a2a B/step", "pooled", "analytic", "allreduce B", "dp", "dp analytic"],
        [[r["plan"], r["ranks"], f"{r['samples_per_s']:,.0f}", f"{r['efficiency']:.2f}", f"{r['step_ms']:.1f}",
          f"{r['profile_ms_per_step']['compute']:.1f}", f"{r['profile_ms_per_step']['communication']:.1f}",
          f"{r['profile_ms_per_step']['collectives_alone']:.1f}",
          f"{r['profile_ms_per_step']['data_wait_timed_window']:.1f}",
          "/".join(f"{c:.2f}" for c in r["cpu_seconds_per_wall_second"]),
          f"{r['alltoall_bytes']:,.0f}", f"{r['alltoall_pooled_bytes']:,.0f}",
          f"{r['alltoall_pooled_bytes_analytic']:,.0f}", f"{r['allreduce_bytes']:,.0f}",
          f"{r['allreduce_dp_bytes']:,.0f}", f"{r['allreduce_dp_bytes_analytic']:,.0f}"] for r in results],
    ))  # fmt: skip
    print(
        "(ms per step; compute = step - time in collectives, in the counting steps; coll. alone = the same "
        "collectives replayed by themselves; data = waiting for the next batch; bytes per step per rank, sent)"
    )
    projection, extra = ([], {}) if "column_wise" not in args.plans else project(results, args)
    if projection:
        print(f"\nProjection (a cost model; weak scaling, {args.batch_size} rows per GPU; gpu_speedup "
              f"{args.gpu_speedup})")  # fmt: skip
        print(table(
            ["GPUs", "interconnect", "placement", "compute ms", "a2a ms", "allreduce ms", "step ms", "samples/s",
             "comm %"],
            [[p["gpus"], p["interconnect"], p["placement"], f"{p['compute_ms']:.2f}", f"{p['alltoall_ms']:.2f}",
              f"{p['allreduce_ms']:.3f}", f"{p['step_ms']:.2f}", f"{p['samples_per_s']:,.0f}",
              f"{100 * p['comm_fraction']:.0f}"] for p in projection],
        ))  # fmt: skip
        print("\nLargest table on one GPU (40 GB of 80 GB HBM for embeddings), rows:")
        print(table(["dim", "optimizer", "bytes/row", "max rows"],
                    [[t["dim"], t["optimizer"], f"{t['bytes_per_row']:.0f}", f"{t['max_rows_one_gpu']:,}"]
                     for t in extra["sizing"]["thresholds"]]))  # fmt: skip
    met = {plan: v["speedup"] >= 1.7 for plan, v in efficiency.items()}
    targets = {
        "two_ranks_vs_one_samples_per_s": {
            "target": 1.7,
            "speedup": {plan: v["speedup"] for plan, v in efficiency.items()},
            "samples_per_cpu_s_ratio": {plan: v["efficiency_per_cpu_s"] for plan, v in efficiency.items()},
            "met_per_plan": met,
            "met": all(met.values()),
        }
    }
    for plan, v in efficiency.items():
        print(f"{plan}: 2 ranks / 1 rank = {v['speedup']:.2f}x (efficiency {v['efficiency']:.2f}; target >= 1.7x: "
              f"{'met' if met[plan] else 'NOT met'}); samples per CPU-second, 2 ranks / 1 rank: "
              f"{v['efficiency_per_cpu_s']:.2f}")  # fmt: skip
    load_after = os.getloadavg()
    write_json(
        "distributed_quick.json" if args.quick else "distributed.json",
        {
            "model": "mmoe",
            "command": "python benchmarks/distributed.py" + (" --quick" if args.quick else ""),
            "machine_busy": busy,
            "loadavg_before": list(load),
            "loadavg_after": list(load_after),
            "cpu_count": os.cpu_count(),
            "rows": args.rows,
            "batch_per_rank": args.batch_size,
            "threads_per_rank": args.threads,
            "warmup": args.warmup,
            "steps_per_window": args.steps,
            "windows": args.windows,
            "count_steps": args.count_steps,
            "seconds": time.perf_counter() - t_start,
            "results": results,
            "projection": projection,
            "sizing": extra.get("sizing"),
            "assumptions": {
                "measured": (
                    "gloo on one 2-core machine, in-memory data (RankShard: each rank its part of every global "
                    "batch), the best of the timed windows; samples/s = global rows / s"
                ),
                **extra.get("assumptions", {}),
            },
            "targets": targets,
            "machine_info": machine(),
        },
    )


if __name__ == "__main__":
    sys.exit(main())
