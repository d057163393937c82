"""Dynamic batching of concurrent inference requests over a fixed set of model instances.

Requests wait in one FIFO queue per model version. A free instance takes the request at the head of the queue
plus every later queued request whose inputs concatenate with it (same non-batch dims: a model with a
variable axis may receive requests that differ there; those stay queued in order and run in a later batch),
up to ``max_batch_size`` rows. The batch is concatenated along axis 0, run once in a worker thread (the
runner, e.g. ``onnxruntime.InferenceSession.run``, releases the GIL, so the event loop keeps serving), and
split back into per-request views. With ``max_batch_size == 0`` (no batch axis) each request runs alone.

When to dispatch. Triton's dynamic batcher (``docs/user_guide/model_configuration.md``, "Dynamic Batcher")
holds a batch that has not reached a preferred or the maximum size for up to ``max_queue_delay_microseconds``
hoping for more requests, even when the model is idle, so a lone request always pays that delay. Here the
batcher is work-conserving instead:

* if no execution of this model version is in flight, a free instance runs what is queued at once: a request
  arriving at an idle model pays no queue delay, and nothing suggests a partner is about to arrive;
* while executions are in flight, requests accumulate on their own (natural batching): when an instance
  frees up it takes everything queued, up to ``max_batch_size``;
* only when another instance is still busy but one is free does a batch below ``max_batch_size`` (and below
  every preferred size) wait, for at most ``max_queue_delay`` after its oldest request arrived; under load
  that lets the free instance collect a fuller batch instead of racing the busy one with single requests.

With one instance (``instance_group { count: 1 }``) the delay therefore never applies, and under load the
batch size follows the arrival rate during one execution. Dispatch waits for the end of the event-loop
iteration in which a request arrived (see :meth:`DynamicBatcher.infer`), so requests whose bytes arrived
together batch together. A batch that fails (say one request holds an embedding index out of range) is re-run
request by request, so one bad request fails alone.

Where a batch runs. A batch normally runs in the worker thread of its instance. Handing work to a thread and
back costs two thread wake-ups: 26-40 us measured in a tight loop on this 2-core machine, 50-240 us inside the
busy server, more than a small model's whole execution (an MLP at batch 1: ~10 us in ONNX Runtime). So when
nothing of this version is executing and the batch's expected run time (a moving average of measured
executions, scaled by rows) is at most ``inline_max_us``, the batch runs on the event-loop thread instead,
blocking the loop for about that long. ``inline_max_us=0`` always uses the threads. ``mtlib-serve`` defaults to
200 us: the benchmark's MMoE takes ~70-90 us at batch 1 and ~140 us at batch 64, and running it inline cut the
p50 at concurrency 1 from ~0.48 to ~0.36 ms over HTTP and from ~1.29 to ~0.98 ms over gRPC (whose completion
queue adds its own thread hand-off) on this machine, against 50 us before.

Results are bitwise equal to running each request alone only when the model's kernels are batch-invariant:
measured for ONNX Runtime CPU MLPs with embeddings (MLAS GEMM, Gather) at 1 and 2 intra-op threads, checked
in ``tests/test_server.py``; GPU kernels (cuBLAS picks algorithms by shape) are not in general.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

Runner = Callable[[dict[str, np.ndarray], list[str]], list[np.ndarray]]
"""Runs one batch: ``runner(feed, output_names) -> arrays`` (one per name), called in a worker thread."""

Timing = tuple[int, int, int, int]
"""Per request: (queue ns, compute-input ns: concatenation, compute-infer ns: the runner, rows in the batch)."""


class _Pending:
    __slots__ = ("inputs", "rows", "key", "outputs", "future", "enqueued")

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        key: Any,
        outputs: list[str],
        future: asyncio.Future[tuple[list[np.ndarray], Timing]],
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.outputs = outputs
        self.future = future
        self.enqueued = time.perf_counter_ns()


class BatcherClosed(RuntimeError):
    """Raised by :meth:`DynamicBatcher.infer` after :meth:`DynamicBatcher.close`."""


class DynamicBatcher:
    """Queues requests for one model version and runs them in batches on ``len(runners)`` instances.

    All methods except the runners themselves run on the event loop's thread; ``on_execution(requests, rows)``
    (optional) is called there once per batch run, e.g. to count executions.

    Example::

        batcher = DynamicBatcher([session_run], max_batch_size=64, max_queue_delay_us=100)
        arrays, timing = await batcher.infer({"x": x}, rows=x.shape[0], outputs=["y"])
    """

    def __init__(
        self,
        runners: Sequence[Runner],
        *,
        max_batch_size: int,
        max_queue_delay_us: int = 0,
        preferred_batch_sizes: Sequence[int] = (),
        on_execution: Callable[[int, int], None] | None = None,
        inline_max_us: float = 0.0,
        name: str = "batcher",
    ) -> None:
        if not runners:
            raise ValueError(f"{name}: a batcher needs at least one runner (model instance), got none")
        if max_batch_size < 0 or max_queue_delay_us < 0:
            raise ValueError(
                f"{name}: max_batch_size and max_queue_delay_us must be >= 0, "
                f"got {max_batch_size} and {max_queue_delay_us}"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.delay_ns = max_queue_delay_us * 1000
        self.preferred = frozenset(b for b in preferred_batch_sizes if 0 < b <= max(max_batch_size, 1))
        self._runners = list(runners)
        self._free = list(range(len(runners)))
        self._executor = ThreadPoolExecutor(max_workers=len(runners), thread_name_prefix=name)
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None
        self._idle: asyncio.Event | None = None
        self._closed = False
        self._on_execution = on_execution
        self._loop: asyncio.AbstractEventLoop | None = None
        self._leader = False  # a request is about to dispatch the queue (see infer)
        self.inline_max_ns = inline_max_us * 1000.0
        self._ema_ns = 0.0  # moving average of execution time and of rows per execution (0: nothing measured yet)
        self._ema_rows = 0.0

    @property
    def pending(self) -> int:
        """Requests queued or executing."""
        return len(self._queue) + self._running

    async def infer(
        self, inputs: dict[str, np.ndarray], rows: int, outputs: list[str], key: Any = ()
    ) -> tuple[list[np.ndarray], Timing]:
        """Queue one request and wait for its output arrays (in ``outputs`` order) and its timing.

        ``inputs`` must list the model's inputs in the same order for every request; ``rows`` is the size of
        their first axis. Requests concatenate only when their ``key`` is equal: pass the non-batch shapes
        when the model has variable axes, anything constant otherwise.

        The first request to find an instance free leads: it yields to the event loop once, so every request
        that arrived in the same loop iteration queues behind it, then dispatches the queue itself. When its
        own batch runs inline, its result is ready when it resumes and it never suspends again (one loop
        iteration in all, where a scheduled dispatch plus a wake-up would take two).
        """
        if self._closed:
            raise BatcherClosed(f"{self.name} is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[list[np.ndarray], Timing]] = loop.create_future()
        self._queue.append(_Pending(inputs, rows, key, outputs, future))
        self._queued_rows += rows
        if self._free and not self._leader:
            self._leader = True
            try:
                await asyncio.sleep(0)
            except BaseException:
                future.cancel()
                raise
            finally:
                self._leader = False
                if not self._closed:
                    self._pump()
        return await future

    def observe(self, exec_ns: float, rows: int) -> None:
        """Feed one measured execution into the run-time estimate (done for every batch; call it to seed the
        estimate, e.g. from a warm-up run)."""
        if self._ema_ns == 0.0:
            self._ema_ns, self._ema_rows = float(exec_ns), float(max(rows, 1))
        else:
            self._ema_ns += 0.1 * (exec_ns - self._ema_ns)
            self._ema_rows += 0.1 * (max(rows, 1) - self._ema_rows)

    def _inline(self, rows: int) -> bool:
        if not self.inline_max_ns or self._running or self._ema_ns == 0.0:
            return False
        return self._ema_ns * max(1.0, rows / self._ema_rows) <= self.inline_max_ns

    async def drain(self) -> None:
        """Wait until every queued and executing request has finished."""
        while self._queue or self._running:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    def close(self) -> None:
        """Refuse new requests and release the worker threads (after :meth:`drain`, nothing is lost)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(BatcherClosed(f"{self.name} closed before the request ran"))
        self._queue.clear()
        self._executor.shutdown(wait=False)

    # ------------------------------------------------------------------------------------------ scheduling

    def _pump(self) -> None:
        while self._free and self._queue:  # (_take may replace self._queue: no local alias)
            if self._running and self.delay_ns and not self._full():
                wait_ns = self._queue[0].enqueued + self.delay_ns - time.perf_counter_ns()
                if wait_ns > 0:
                    if self._timer is None:
                        assert self._loop is not None
                        self._timer = self._loop.call_later(wait_ns / 1e9, self._on_timer)
                    return
            batch = self._take()
            if batch:
                self._launch(batch)
        if self._timer is not None and not self._queue:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _full(self) -> bool:
        rows = self._queued_rows
        return rows >= self.max_batch_size or rows in self.preferred

    def _take(self) -> list[_Pending]:
        queue = self._queue
        head = queue.popleft()
        while head.future.done():  # cancelled while queued: drop it
            self._queued_rows -= head.rows
            if not queue:
                return []
            head = queue.popleft()
        batch = [head]
        rows = head.rows
        limit = self.max_batch_size
        if limit > 0 and queue and rows < limit:
            keep: deque[_Pending] = deque()
            key = head.key
            while queue and rows < limit:
                p = queue.popleft()
                if p.future.done():
                    self._queued_rows -= p.rows
                elif p.key == key and rows + p.rows <= limit:
                    batch.append(p)
                    rows += p.rows
                else:
                    keep.append(p)
            if keep:
                keep.extend(queue)
                self._queue = keep
        self._queued_rows -= rows
        return batch

    def _launch(self, batch: list[_Pending]) -> None:
        inline = self._inline(sum(p.rows for p in batch))
        instance = self._free.pop()
        self._running += len(batch)
        outputs = batch[0].outputs
        for p in batch:
            if p.outputs is not outputs and p.outputs != outputs:
                outputs = list(dict.fromkeys(n for q in batch for n in q.outputs))
                break
        if inline:
            self._execute(instance, batch, outputs, inline=True)
        else:
            self._executor.submit(self._execute, instance, batch, outputs)

    # ------------------------------------------------------------------------- worker thread (or inline) side

    def _execute(self, instance: int, batch: list[_Pending], outputs: list[str], inline: bool = False) -> None:
        results: list[Any] = []
        t0 = t1 = t2 = time.perf_counter_ns()
        try:
            runner = self._runners[instance]
            if len(batch) == 1:
                feed = batch[0].inputs
            else:
                feed = {k: np.concatenate([p.inputs[k] for p in batch]) for k in batch[0].inputs}
            t1 = time.perf_counter_ns()
            try:
                arrays = runner(feed, outputs)
            except Exception as err:
                arrays = None
                results = [err] if len(batch) == 1 else [_run_alone(runner, p) for p in batch]
            t2 = time.perf_counter_ns()
            if arrays is not None:
                if len(batch) == 1:
                    results = [arrays if batch[0].outputs == outputs else _pick(arrays, outputs, batch[0].outputs)]
                else:
                    start = 0
                    for p in batch:
                        stop = start + p.rows
                        mine = arrays if p.outputs == outputs else _pick(arrays, outputs, p.outputs)
                        results.append([a[start:stop] for a in mine])
                        start = stop
        except BaseException as err:  # noqa: BLE001 - every waiting request must hear back
            results = [err] * len(batch)
        finally:
            if inline:  # already on the loop: the calling _pump goes on with the queue itself
                self._complete(instance, batch, results, t0, t1, t2, pump=False)
            else:
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(self._complete, instance, batch, results, t0, t1, t2)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass

    def _complete(
        self, instance: int, batch: list[_Pending], results: list[Any], t0: int, t1: int, t2: int, pump: bool = True
    ) -> None:
        self._free.append(instance)
        self._running -= len(batch)
        rows = sum(p.rows for p in batch)
        self.observe(t2 - t1, rows)
        if pump and self._queue and not self._closed:
            self._pump()  # start the next batch before answering this one
        if self._on_execution is not None:
            self._on_execution(len(batch), rows)
        for p, result in zip(batch, results):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result((result, (t0 - p.enqueued, t1 - t0, t2 - t1, rows)))
        if self._idle is not None and not self._queue and not self._running:
            self._idle.set()
            self._idle = None


def _pick(arrays: list[np.ndarray], names: list[str], wanted: list[str]) -> list[np.ndarray]:
    return [arrays[names.index(n)] for n in wanted]


def _run_alone(runner: Runner, p: _Pending) -> Any:
    try:
        return runner(p.inputs, p.outputs)
    except Exception as err:
        return err
