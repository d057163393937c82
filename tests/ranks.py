"""Run a function on N gloo ranks on loopback, bounded in time: ``results = run_ranks(fn, 2, *args)``.

``fn(rank, world_size, *args)`` runs in a spawned process with the default process group initialised (gloo, a free
port on 127.0.0.1) and returns something picklable; ``run_ranks`` gives the list of the ranks' returns, and raises
(with the failing rank's traceback) when a rank fails or the ranks do not finish within ``timeout`` seconds, after
killing them: a distributed test fails, it never hangs.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queues
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world_size),
         "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)}
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            buffer = io.BytesIO()  # bytes, not tensors: torch would pass those as file descriptors of this process
            torch.save(fn(rank, world_size, *args), buffer)
            queue.put((rank, "ok", buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 90.0) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            try:
                rank, status, value = queue.get(timeout=timeout)
            except queues.Empty as err:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results))} did not finish within "
                                   f"{timeout:.0f} s") from err  # fmt: skip
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            import torch

            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
