"""Reading real-sized files: rows/s of the files reader (``data=files``) and its peak memory.

    python benchmarks/data_scale.py            # 2M train rows
    python benchmarks/data_scale.py --quick    # 300k train rows (about a minute on 2 cores)

Writes a synthetic click log with :func:`mtrec.data.filetools.write_synthetic` (string user ids, int item ids, a
vocabulary feature, a list column of up to 20 ids, a log1p and a standardized dense column, three labels) into a
temporary folder, then times, each in a fresh child process (so peak RSS is its own):

* ``load``: :func:`mtrec.data.files.load_files`, the train statistics pass (mean/std, the vocabulary);
* ``epoch w=N``: one shuffled training epoch of ``Batch`` es (``--batch-size`` rows, KeyedJaggedTensor built) with
  ``N`` DataLoader workers, and the shuffle buffer of ``--shuffle-buffer`` rows.

Rows/s count the rows of the train split; peak RSS is the child's ``ru_maxrss`` (workers not included). Workers
are forked (Linux's default); where processes are spawned (macOS, Windows) each epoch's workers import torch and
pyarrow again, seconds per epoch on a small machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

from common import table, write_json


def _child(kind: str, paths: dict, workers: int, batch_size: int, shuffle_buffer: int, queue: mp.Queue) -> None:
    from mtrec.data.files import load_files

    t0 = time.perf_counter()
    bundle = load_files(**paths, num_workers=workers, shuffle_buffer=shuffle_buffer, progress=False)
    seconds = time.perf_counter() - t0
    if kind == "epoch":
        t0 = time.perf_counter()
        rows = sum(b.batch_size for b in bundle.train.batches(batch_size, shuffle=True, seed=0))
        seconds = time.perf_counter() - t0
        assert rows == len(bundle.train)
    queue.put({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def measure(kind: str, paths: dict, workers: int, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("fork")  # the DataLoader's workers fork too (Linux's default): no re-import per epoch
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, paths, workers, args.batch_size, args.shuffle_buffer, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--quick", action="store_true", help="300k rows")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--shuffle-buffer", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    rows = 300_000 if args.quick else args.rows
    from mtrec.data.filetools import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = write_synthetic(Path(tmp) / "clicks", rows, rows_per_file=500_000, row_group_size=100_000)
        written = time.perf_counter() - t0
        paths = {k: summary[k] for k in ("train", "val", "test", "schema")}
        size_mb = sum(p.stat().st_size for p in (Path(tmp) / "clicks").rglob("*.parquet")) / 2**20
        results = [{"step": "write", "workers": 0, "seconds": written, "peak_rss_mb": None}]
        results.append({"step": "load", "workers": 0, **measure("load", paths, 0, args)})
        for w in args.workers:
            results.append({"step": "epoch", "workers": w, **measure("epoch", paths, w, args)})
    for r in results:
        r["rows_per_s"] = rows / r["seconds"]
    print(f"{rows} train rows, {size_mb:.1f} MiB of Parquet, batches of {args.batch_size}")
    print(
        table(
            ["step", "workers", "seconds", "rows/s", "peak RSS MiB"],
            [
                [r["step"], r["workers"], r["seconds"], f"{r['rows_per_s']:,.0f}", r["peak_rss_mb"] or "-"]
                for r in results
            ],
        )
    )
    name = "data_scale_quick.json" if args.quick else "data_scale.json"
    write_json(name, {"rows": rows, "parquet_mib": size_mb, "batch_size": args.batch_size, "results": results})


if __name__ == "__main__":
    sys.exit(main())
