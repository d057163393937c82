"""Training from files at scale: MMoE samples/s from memory and streamed, and peak memory at 1x and 4x the rows.

    python benchmarks/data_scale.py            # 2M and 8M train rows (about 30 min on 2 cores)
    python benchmarks/data_scale.py --quick    # 100k and 400k rows (a few minutes)

Writes the synthetic click log (:func:`mtrec.data.filetools.write_synthetic`: string user ids, int item ids, a
vocabulary feature, a list column of up to 20 ids, a log1p and a standardized dense column, three labels) as
Parquet twice, ``--rows`` and 4x ``--rows`` train rows, into a temporary folder. Then, each in a fresh child process
(so peak memory is its own), it trains ``mtrec-train data=files model=mmoe trainer.batch_size=4096`` as the trainer
does (``Trainer.train_step`` on every batch of one shuffled epoch, the model, weighting and optimiser that
``mtrec.train.build_training`` builds from the config):

* ``memory``: ``data.in_memory=true``, the splits read once into column tensors (the load is timed apart);
* ``stream w=N``: the streaming reader with ``data.num_workers=N`` DataLoader workers and its shuffle buffer.

samples/s is the rows of one epoch over the epoch's wall time (the streaming reader's start-up, filling its
buffer, included); at 4x the rows ``memory`` trains only ``--capped-steps`` steps (its memory is taken at load).
The statistics pass (:func:`mtrec.data.files.load_files`: row counts, the vocabulary, mean/std) is timed on its own.

peak RSS is the job's: the training process's resident memory plus its workers' private memory (the pages a forked
worker wrote or allocated itself; the ones it shares with its parent are counted once), the peak of samples taken
every 50 ms from ``/proc`` (Linux), and at least the training process's ``ru_maxrss``. Targets (issue 13):
streaming >= 0.9x the in-memory samples/s (the best worker count), and peak RSS at 4x the rows <= 1.1x that at 1x,
for every streaming configuration measured at both sizes. Writes ``benchmarks/results/data_scale.json``
(``--quick``: ``data_scale_quick.json``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import compose, table, write_json

SPLITS = ("train", "val", "test", "schema")


def _config(paths: dict, path: str, workers: int, args: argparse.Namespace):
    return compose(
        "data=files",
        *(f"data.{k}={paths[k]}" for k in SPLITS),
        f"data.in_memory={path == 'memory'}",
        f"data.num_workers={workers}",
        f"data.shuffle_buffer={args.shuffle_buffer}",
        "data.progress=false",
        "model=mmoe",
        f"trainer.batch_size={args.batch_size}",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        f"seed={args.seed}",
    )


def _kib(pid: int, fields: tuple[str, ...]) -> int:
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:  # the process has just ended
        return 0
    return sum(int(line.split()[1]) for line in lines if line.split(":")[0] in fields)


class JobMemory:
    """The peak, sampled every ``interval`` s, of this process's RSS plus its child processes' private memory
    (a DataLoader worker's own pages: the ones it wrote or allocated, not those it shares with its parent)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak_kib, self.interval, self._stop = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.interval):
            children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
            total = _kib(me, ("Rss",)) + sum(_kib(int(c), ("Private_Clean", "Private_Dirty")) for c in children)
            self.peak_kib = max(self.peak_kib, total)

    def __enter__(self) -> JobMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _child(paths: dict, path: str, workers: int, max_steps: int | None, args: argparse.Namespace, queue) -> None:
    from mtrec.train import build_training, load_data

    cfg = _config(paths, path, workers, args)
    memory = JobMemory().__enter__()
    t0 = time.perf_counter()
    bundle = load_data(cfg.data)
    load_seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_training(cfg, run_dir, bundle).trainer
        rows = steps = 0
        t0 = time.perf_counter()
        for batch in bundle.train.batches(args.batch_size, shuffle=True, seed=args.seed, epoch=0):
            trainer.train_step(batch)
            rows += batch.batch_size
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        seconds = time.perf_counter() - t0
    memory.__exit__()
    complete = max_steps is None
    if complete:
        assert rows == len(bundle.train), (rows, len(bundle.train))
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(
        {
            "samples_per_s": rows / seconds,
            "seconds": seconds,
            "steps": steps,
            "full_epoch": complete,
            "load_seconds": load_seconds,
            "peak_rss_mb": max(main_mb, memory.peak_kib / 1024),
            "main_rss_mb": main_mb,
        }
    )


def measure(paths: dict, rows: int, path: str, workers: int, args: argparse.Namespace, max_steps: int | None = None):
    ctx = mp.get_context("spawn")  # a fresh interpreter: its memory is its own (the DataLoader's workers fork from it)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(paths, path, workers, max_steps, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    row = {"path": path, "rows": rows, "workers": workers, **result}
    print(
        f"  {path:6s} rows={rows:>9,} w={workers}: {row['samples_per_s']:>9,.0f} samples/s over {row['steps']} steps, "
        f"peak RSS {row['peak_rss_mb']:.0f} MiB",
        flush=True,
    )
    return row


def _statistics_pass(paths: dict, rows: int, queue) -> None:
    from mtrec.data.files import load_files

    t0 = time.perf_counter()
    load_files(**{k: paths[k] for k in SPLITS}, progress=False)
    queue.put({"rows": rows, "seconds": time.perf_counter() - t0})


def statistics_pass(paths: dict, rows: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_statistics_pass, args=(paths, rows, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return {**result, "rows_per_s": rows / result["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="train rows of the 1x log (the 4x log: 4 times)")
    parser.add_argument("--quick", action="store_true", help="100k and 400k rows")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--shuffle-buffer", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="streaming worker counts at 1x")
    parser.add_argument("--rss-workers", type=int, nargs="+", default=[2], help="streaming worker counts at 4x")
    parser.add_argument("--capped-steps", type=int, default=50, help="steps of the in-memory run at 4x")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = 100_000 if args.quick else args.rows
    if args.quick:
        args.shuffle_buffer = min(args.shuffle_buffer, 20_000)
    from mtrec.data.filetools import write_synthetic

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = {}
        group = min(100_000, max(1, rows // 20))  # both logs: the same row groups, at least 20 at 1x (so 10 a worker)
        for n in (rows, 4 * rows):
            t0 = time.perf_counter()
            summary = write_synthetic(Path(tmp) / f"clicks-{n}", n, rows_per_file=5 * group, row_group_size=group)
            size = sum(p.stat().st_size for p in (Path(tmp) / f"clicks-{n}").rglob("*.parquet")) / 2**20
            logs[n] = {k: summary[k] for k in SPLITS}
            print(f"wrote {n:,} train rows ({size:.0f} MiB of Parquet) in {time.perf_counter() - t0:.1f} s", flush=True)
        stats = statistics_pass(logs[rows], rows)
        print(f"statistics pass: {stats['rows_per_s']:,.0f} rows/s", flush=True)
        results.append(measure(logs[rows], rows, "memory", 0, args))
        for w in args.workers:
            results.append(measure(logs[rows], rows, "stream", w, args))
        results.append(measure(logs[4 * rows], 4 * rows, "memory", 0, args, max_steps=args.capped_steps))
        for w in args.rss_workers:
            results.append(measure(logs[4 * rows], 4 * rows, "stream", w, args))

    memory = next(r for r in results if r["path"] == "memory" and r["rows"] == rows)
    streams = [r for r in results if r["path"] == "stream" and r["rows"] == rows]
    best = max(streams, key=lambda r: r["samples_per_s"])
    speed_ratio = best["samples_per_s"] / memory["samples_per_s"]
    rss_ratios = {}
    for big in (r for r in results if r["path"] == "stream" and r["rows"] == 4 * rows):
        small = next((r for r in streams if r["workers"] == big["workers"]), None)
        if small is not None:
            rss_ratios[f"stream w={big['workers']}"] = big["peak_rss_mb"] / small["peak_rss_mb"]
    targets = {
        "streaming_vs_memory_samples_per_s": {"ratio": speed_ratio, "workers": best["workers"], "target": 0.9,
                                              "met": speed_ratio >= 0.9},
        "peak_rss_4x_vs_1x": {"ratios": rss_ratios, "target": 1.1,
                              "met": bool(rss_ratios) and max(rss_ratios.values()) <= 1.1},
    }  # fmt: skip
    print(f"\nMMoE, batch {args.batch_size}, one shuffled epoch (memory at {4 * rows:,}: {args.capped_steps} steps)")
    print(
        table(
            ["path", "rows", "workers", "samples/s", "x memory", "peak RSS MiB", "load s"],
            [
                [r["path"], f"{r['rows']:,}", r["workers"], f"{r['samples_per_s']:,.0f}",
                 f"{r['samples_per_s'] / memory['samples_per_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r['load_seconds']:.1f}"]
                for r in results
            ],  # fmt: skip
        )
    )
    print(f"statistics pass: {stats['rows_per_s']:,.0f} rows/s ({stats['rows']:,} rows in {stats['seconds']:.1f} s)")
    print(f"streaming / memory samples/s: {speed_ratio:.2f} (w={best['workers']}; target >= 0.9: "
          f"{'met' if targets['streaming_vs_memory_samples_per_s']['met'] else 'NOT met'})")  # fmt: skip
    for name, ratio in rss_ratios.items():
        print(f"peak RSS 4x / 1x, {name}: {ratio:.2f} (target <= 1.1: {'met' if ratio <= 1.1 else 'NOT met'})")
    name = "data_scale_quick.json" if args.quick else "data_scale.json"
    write_json(
        name,
        {
            "model": "mmoe",
            "batch_size": args.batch_size,
            "shuffle_buffer": args.shuffle_buffer,
            "statistics_pass": stats,
            "results": results,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
