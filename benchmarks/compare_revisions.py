"""Step time of this checkout against an earlier commit, side by side: alternating processes, one per tree.

    python benchmarks/compare_revisions.py 9ff6a29                 # 5 pairs, k = 8, equal famo mgda_ub pcgrad
    python benchmarks/compare_revisions.py 9ff6a29 --pairs 9 --methods equal:none famo:none

The earlier commit is checked out into a temporary git worktree. Each process imports mtlib and
``benchmarks/gradient_overhead.py`` from its own tree, builds the same MMoE trainers (``mtlib_step``) and times
``--steps`` steps of each method after a warm-up; the two trees alternate ``--pairs`` times, so both see the
same machine. Reports the median over pairs of (this tree / the other) per method, and writes
benchmarks/results/compare_revisions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, table, write_json

# Run inside each tree: prints one JSON line {method: ms per step}.
_CHILD = r"""
import argparse, json, sys, tempfile, time
from pathlib import Path
root = sys.argv[1]
sys.path[:0] = [root + "/benchmarks", root]
import torch
torch.set_num_threads(1)
import gradient_overhead as go
import mtrec
assert mtrec.__file__.startswith(root), f"imported mtrec from {mtrec.__file__}, not {root}"
k, steps, methods = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
args = argparse.Namespace(seed=0, batch_size=256, lr=1e-3)
data, features, tasks = go.k_task_data(4096, k, correlation=0.5, seed=0)
out = {}
run_dir = Path(tempfile.mkdtemp(prefix="compare_revisions_run_"))
for m in methods:
    w, g = m.split(":")
    step = go.mtlib_step(w, g, data, features, tasks, args, run_dir / f"{w}_{g}")
    for _ in range(20):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    out[m] = 1000 * (time.perf_counter() - t0) / steps
print(json.dumps(out))
"""


def run_tree(root: Path, k: int, steps: int, methods: list[str]) -> dict[str, float]:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), str(k), str(steps), *methods],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the earlier commit to compare against")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["equal:none", "famo:none", "equal:mgda_ub", "equal:pcgrad"],
                    help="weighting:gradient pairs")  # fmt: skip
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="compare_revisions_") as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(other), args.rev], check=True)
        try:
            rows = []
            for i in range(args.pairs):
                theirs = run_tree(other, args.k, args.steps, args.methods)
                ours = run_tree(REPO, args.k, args.steps, args.methods)
                rows.append({"pair": i, "other": theirs, "this": ours})
                pairs = ", ".join(f"{m} {ours[m]:.2f} vs {theirs[m]:.2f} ms" for m in ours)
                print(f"pair {i + 1}/{args.pairs}: {pairs}")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)], check=False)
    summary = {
        m: {
            "this_over_other": statistics.median(r["this"][m] / r["other"][m] for r in rows),
            "this_ms": statistics.median(r["this"][m] for r in rows),
            "other_ms": statistics.median(r["other"][m] for r in rows),
        }
        for m in args.methods
    }
    print(f"\nk = {args.k}, {args.steps} steps per process, median over {args.pairs} alternating pairs; "
          f"this checkout against {args.rev}:")  # fmt: skip
    print(table(["method (weighting:gradient)", "this ms", f"{args.rev} ms", "this / other"],
                [[m, f"{s['this_ms']:.2f}", f"{s['other_ms']:.2f}", f"{s['this_over_other']:.2f}"]
                 for m, s in summary.items()]))  # fmt: skip
    write_json("compare_revisions.json", {"settings": vars(args), "pairs": rows, "summary": summary})


if __name__ == "__main__":
    main()
