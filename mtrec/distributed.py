"""Training on several processes: ``torchrun`` launches them, TorchRec's DistributedModelParallel shards the
embedding tables (:mod:`mtrec.sharding`), and every multi-task strategy stays exact under data parallelism
(:mod:`mtl.parallel`).

* **Launch.** ``torchrun --nproc_per_node=N $(which mtrec-train) ...`` or ``mtrec-train trainer.nproc_per_node=N
  ...`` (:func:`launch`: the same through ``torch.distributed.run``, standalone rendezvous); several machines:
  ``torchrun --nnodes=M --node-rank=i --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT`` with
  ``hydra.run.dir=<a folder every node sees>``. :func:`init_distributed` finds torchrun's environment and starts
  the process group: ``nccl`` with CUDA (one device per local rank), ``gloo`` on CPU.
* **Run folder.** Every rank of a job uses one folder: a ``torchrun`` worker's ``${launch_time:...}`` (the run
  folder's time stamp in ``configs/mtrec.yaml``) is its torchrun agent's start time, the same for every worker on
  the machine and for workers the agent restarts after a failure (which then resume from it by themselves);
  rank 0's folder is broadcast, so the ranks agree even when their clocks would not. Rank 0 alone writes logs,
  ``metrics.json``, ``features.json`` and the plan; every rank writes its shards of the checkpoints.
* **Data.** The global batch is ``world_size x trainer.batch_size`` rows. A file stream gives each rank its own
  row groups (:class:`mtrec.data.files.FileDataset`); data held in memory is cut per global batch
  (:class:`RankShard`: global batch ``g`` is rows ``[g B W, (g+1) B W)`` of the epoch's permutation, rank ``r``
  takes the ``r``-th of its ``W`` near-equal parts), so ``W`` ranks at ``B`` rows see what one process at ``W B``
  sees. Every collective needs every rank: training steps run while *every* rank has a batch (:func:`lockstep`;
  a stream's ranks may differ by a few batches, the extra ones are left out of that epoch), and evaluation runs
  until every rank is done, a rank out of batches forwarding a one-row filler whose outputs are dropped
  (:func:`padded`); the outputs of all ranks are then gathered (:func:`gather_rows`), so validation metrics are
  those of the whole split, identical on every rank (early stopping agrees).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from mtl.parallel import DataParallel
from mtrec.data.batch import Batch, FeatureSpec, TabularDataset, build_kjt, epoch_order

__all__ = [
    "DistContext",
    "RankShard",
    "filler_batch",
    "gather_rows",
    "init_distributed",
    "launch",
    "launch_time",
    "lockstep",
    "over_ranks",
    "padded",
    "under_torchrun",
]

log = logging.getLogger("mtrec.distributed")
T = TypeVar("T")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    data_parallel: DataParallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def restarted(self) -> bool:
        """Whether torchrun restarted this worker after a failure (``TORCHELASTIC_RESTART_COUNT > 0``)."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def under_torchrun() -> bool:
    """Whether this process is a worker that torchrun (or an equivalent launcher) started."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def init_distributed(device: str = "cpu", *, timeout_s: float = 1800.0) -> DistContext | None:
    """Join the job torchrun started (``None`` outside torchrun): the process group, and this rank's device.

    ``device``: the ``trainer.device`` setting. ``cuda``/``auto`` with CUDA present: ``nccl`` and device
    ``cuda:LOCAL_RANK``; otherwise ``gloo`` on the CPU.
    """
    if not under_torchrun():
        return None
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device}: CUDA is not available on this machine; use cpu or auto")
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # The rendezvous store (torchrun's agent hosts it) outlives a restart; gloo's peer addresses of the failed
        # attempt would still be in it (a restarted rank then connects to a dead peer: "Connection refused",
        # pytorch/pytorch#167288), so each attempt rendezvous under its own prefix.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0 and not agent_store, timeout=timeout)  # fmt: skip
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefixed = dist.PrefixStore(f"mtlib/attempt-{attempt}", store)
        dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, DataParallel())
    if not ctx.is_main:  # rank 0 alone logs (info); the others say only what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
    return ctx


# ------------------------------------------------------------------------------------------------------ launch


def _agent_start_time() -> float | None:
    """The start time (epoch seconds) of this process's parent, the torchrun agent (Linux ``/proc``)."""
    try:
        stat = Path(f"/proc/{os.getppid()}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(int(line.split()[1]) for line in lines if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


_LAUNCH_TIME: list[float] = []


def launch_time(fmt: str) -> str:
    """The ``${launch_time:FMT}`` config resolver: the job's start time as ``time.strftime(FMT)``; under torchrun
    the agent's start time (the same on every worker of the machine, and after restarts), else this process's
    first call."""
    if not _LAUNCH_TIME:
        agent = _agent_start_time() if under_torchrun() else None
        _LAUNCH_TIME.append(agent if agent is not None else time.time())
    return time.strftime(fmt, time.localtime(_LAUNCH_TIME[0]))


def launch(nproc: int, argv: Sequence[str], *, max_restarts: int = 0, run_dir: str | None = None) -> int:
    """Run ``mtrec-train`` with ``argv`` (its overrides) on ``nproc`` local processes through
    ``torch.distributed.run`` (standalone rendezvous); returns the exit status. ``hydra.run.dir`` is fixed here
    (unless given) so every worker and every restart shares one run folder."""
    from torch.distributed.run import get_args_parser, run

    args = [a for a in argv if not a.startswith("trainer.nproc_per_node=")]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        args.append(f"hydra.run.dir={run_dir or f'outputs/mtrec/{stamp}'}")
    args.append(f"trainer.nproc_per_node={nproc}")
    parsed = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", "-m", "mtrec.cli.train", *args]
    )
    try:
        run(parsed)
    except Exception as err:  # torch.distributed.elastic's ChildFailedError: the workers printed their errors
        failures = getattr(err, "failures", {}) or {}
        codes = sorted({getattr(f, "exitcode", 1) for f in failures.values()}) or [1]
        print(f"mtrec-train: a worker of {nproc} failed (exit status {codes[0]}); its message is above",
              file=sys.stderr)  # fmt: skip
        return 2 if codes == [2] else 1  # every failed worker refused the configuration: a user error
    return 0


# ------------------------------------------------------------------------------------------------------ data


class RankShard:
    """Rank ``rank``'s part of every global batch of a dataset held in memory (see the module docstring); the
    :class:`~mtrec.trainer.BatchSource` interface, ``batch_size`` meaning rows per rank."""

    def __init__(self, data: TabularDataset, rank: int, world_size: int) -> None:
        self.data, self.rank, self.world_size = data, rank, world_size

    def __len__(self) -> int:
        return -(-len(self.data) // self.world_size)

    def num_batches(self, batch_size: int, drop_last: bool = False, **_: Any) -> int:
        n, step = len(self.data), batch_size * self.world_size
        full, rest = divmod(n, step)
        return full + (1 if rest >= self.world_size and not drop_last else 0)  # every rank gets a row, or none

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, start: int = 0, **_: Any
    ) -> Iterator[Batch]:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        n, step = len(self.data), batch_size * self.world_size
        order = epoch_order(n, shuffle, seed, epoch)  # TabularDataset.batches's: one process at W x B sees the same
        for b in range(start, self.num_batches(batch_size)):
            rows = torch.tensor_split(order[b * step : (b + 1) * step], self.world_size)[self.rank]
            yield self.data.batch(rows)


def filler_batch(features: FeatureSpec, labels: Iterable[str]) -> Batch:
    """One row of zeros (every sparse feature one id 0): what a rank out of evaluation batches forwards so that
    the sharded tables' collectives still meet; its outputs are dropped."""
    ids = {f.name: torch.zeros(1, 1, dtype=torch.int64) for f in features.sparse}
    lengths = {f.name: torch.ones(1, dtype=torch.int64) for f in features.sparse}
    return Batch(
        torch.zeros(1, features.dense_dim),
        build_kjt(ids, lengths, features.sparse_names),
        {k: torch.zeros(1) for k in labels},
    )


def over_ranks(value: int, ctx: DistContext, op: str = "min") -> int:
    """The ``min`` (or ``max``) of an integer over the ranks."""
    t = torch.tensor([value], dtype=torch.int64, device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(t.item())


def lockstep(items: Iterable[T], ctx: DistContext | None) -> Iterator[T]:
    """``items`` while every rank still has one (one tiny all-reduce per item)."""
    if ctx is None or ctx.world_size == 1:
        yield from items
        return
    it = iter(items)
    while True:
        item = next(it, None)
        if not over_ranks(int(item is not None), ctx, "min"):
            if item is not None:
                log.info("rank %d: batches past the other ranks' last one are left out of this epoch", ctx.rank)
            return
        yield item  # type: ignore[misc]


def padded(items: Iterable[T], ctx: DistContext | None, filler: T) -> Iterator[tuple[T, bool]]:
    """``(item, True)`` for each of ``items``, then ``(filler, False)`` until every rank is done."""
    if ctx is None or ctx.world_size == 1:
        for item in items:
            yield item, True
        return
    it = iter(items)
    while True:
        item = next(it, None)
        if not over_ranks(int(item is not None), ctx, "max"):
            return
        yield (item, True) if item is not None else (filler, False)


def gather_rows(tensors: Mapping[str, Tensor], ctx: DistContext | None) -> dict[str, Tensor]:
    """Each 1-d CPU tensor of every rank, concatenated in rank order, on every rank (the keys must agree)."""
    if ctx is None or ctx.world_size == 1:
        return dict(tensors)
    keys = sorted(tensors)
    dev = ctx.device if ctx.backend == "nccl" else torch.device("cpu")  # nccl moves CUDA tensors only
    local = torch.stack([tensors[k].reshape(-1).to(dev, torch.float64) for k in keys]) if keys else torch.zeros(0, 0)
    n = torch.tensor([local.shape[1]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    pad = torch.zeros(len(keys), longest, dtype=torch.float64, device=dev)
    pad[:, : local.shape[1]] = local
    parts = [torch.empty_like(pad) for _ in range(ctx.world_size)]
    dist.all_gather(parts, pad)
    full = torch.cat([p[:, : int(s.item())] for p, s in zip(parts, sizes, strict=True)], dim=1)
    return {k: full[i].to("cpu", tensors[k].dtype) for i, k in enumerate(keys)}
