"""Every loss-weighting and gradient method on an MMoE: delta-m % against single-task baselines.

    python benchmarks/mtl_methods.py                      # 3 seeds; census 20 epochs, synthetic up to 200
    python benchmarks/mtl_methods.py --quick              # 3 seeds; census 3 epochs, synthetic 15
    python benchmarks/mtl_methods.py --seeds 1 --epochs 1 --methods equal pcgrad famo
    python benchmarks/mtl_methods.py --datasets synthetic --methods mgda cagrad

Methods: every ``configs/weighting/*.yaml`` (with ``gradient=none``) and every ``configs/gradient/*.yaml``
(with ``weighting=equal``; ``gradient=none`` with ``weighting=equal`` is the ``equal`` row), all on
``model=mmoe``. Baseline: ``model=single_task weighting=equal gradient=none`` (an independent network per
task, trained jointly), same seed.

Datasets: Census-Income (tasks income, marital; test AUC of the best-validation checkpoint; as
benchmarks/census.py: monitor AUC, batch 1024) and the MMoE paper's synthetic data at correlation 0.5
(tasks task1, task2; test MSE; as benchmarks/mmoe_synthetic.py: 20,000 training rows, batch 256,
Adam 1e-3, early-stopping patience 10 on the validation loss).

delta-m (Maninis et al. 2019; Liu et al.): the mean over tasks of the relative change against the
baseline, signed so that positive is better than single-task:

    delta_m = 100 / T * sum_t (-1)^{l_t} (M_{m,t} - M_{b,t}) / M_{b,t},   l_t = 1 if lower M is better

so +AUC counts positive and +MSE negative. It is computed per seed against that seed's baseline, then
averaged (mean ± std over seeds). A run that fails (an exception, a diverging loss) is recorded with its
error and shown as '—'. Each training runs in one torch thread, so several benchmarks can share a machine.
Writes benchmarks/results/mtl_methods.json.

Every finished run is appended to a JSON-lines log (``--runs-log``, default
``benchmarks/results/mtl_methods_runs.jsonl``, or ``..._quick.jsonl`` with ``--quick``) together with its
settings; a later invocation with the same settings reuses those runs instead of training again, so an
interrupted sweep resumes where it stopped and a sweep can be split (``--methods ...``) over several
invocations whose last one writes the whole table. ``--fresh`` ignores the log.
"""

from __future__ import annotations

import os

# One thread per training run: set before torch is imported so its intra-op pools start at one thread.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from common import REPO, compose, mean_std, table, write_json  # noqa: E402

CONFIGS = REPO / "configs"
MODEL = "mmoe"
BASELINE_MODEL = "single_task"

# dataset -> tasks, metric, whether higher is better, overrides
DATASETS: dict[str, dict[str, Any]] = {
    "census": {
        "label": "Census-Income",
        "tasks": ("income", "marital"),
        "metric": "auc",
        "higher_is_better": True,
    },
    "synthetic": {
        "label": "MMoE synthetic p=0.5",
        "tasks": ("task1", "task2"),
        "metric": "mse",
        "higher_is_better": False,
    },
}

# Rough seconds per training epoch on one thread of this project's 2-core dev machine (MMoE, equal
# weighting), and the extra cost of methods that need per-task gradients; for the up-front estimate only.
EPOCH_SECONDS = {"census": 3.0, "synthetic": 0.25}
GRADIENT_COST = 2.0


def discover_methods() -> dict[str, dict[str, Any]]:
    """``{name: {"kind", "overrides"}}``: every weighting config, then every gradient config but ``none``."""
    methods: dict[str, dict[str, Any]] = {}
    for path in sorted((CONFIGS / "weighting").glob("*.yaml")):
        methods[path.stem] = {"kind": "weighting", "overrides": [f"weighting={path.stem}", "gradient=none"]}
    for path in sorted((CONFIGS / "gradient").glob("*.yaml")):
        if path.stem == "none":  # weighting=equal gradient=none is the `equal` row already
            continue
        if path.stem in methods:
            raise RuntimeError(f"method name {path.stem!r} is both a weighting and a gradient config")
        methods[path.stem] = {"kind": "gradient", "overrides": ["weighting=equal", f"gradient={path.stem}"]}
    return methods


def dataset_overrides(dataset: str, args: argparse.Namespace) -> list[str]:
    common = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.num_threads=1"]
    if dataset == "census":
        out = [
            "data=census",
            f"trainer.max_epochs={args.census_epochs}",
            "trainer.monitor=auc",
            "trainer.batch_size=1024",
        ]
        if args.census_path:
            out.append(f"data.path={args.census_path}")
        return out + common
    return [
        "data=mmoe_synthetic",
        f"data.correlation={args.correlation}",
        f"data.n_train={args.n_train}",
        f"trainer.max_epochs={args.synthetic_epochs}",
        f"trainer.patience={args.patience}",
        "trainer.monitor=loss",
        f"trainer.batch_size={args.batch_size}",
        f"optimizer.lr={args.lr}",
    ] + common


def train_one(dataset: str, model: str, method_overrides: list[str], seed: int, args: argparse.Namespace) -> dict:
    """Test metric per task of the best-validation checkpoint: ``{"metrics": {task: v}, "seconds": s}``."""
    from mtrec.train import run

    spec = DATASETS[dataset]
    cfg = compose(*dataset_overrides(dataset, args), f"model={model}", *method_overrides, f"seed={seed}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtl_methods_") as d:
        out = run(cfg, d)
    metrics = {t: float(out["test"][t][spec["metric"]]) for t in spec["tasks"]}
    bad = [t for t, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite test {spec['metric']} for {bad}")
    return {"metrics": metrics, "seconds": round(time.perf_counter() - start, 2)}


def delta_m(dataset: str, metrics: dict[str, float], baseline: dict[str, float]) -> float:
    """100 / T * sum_t sign_t * (M_m,t - M_b,t) / M_b,t; sign +1 where higher is better, -1 where lower is."""
    spec = DATASETS[dataset]
    sign = 1.0 if spec["higher_is_better"] else -1.0
    tasks = spec["tasks"]
    return 100.0 * sum(sign * (metrics[t] - baseline[t]) / baseline[t] for t in tasks) / len(tasks)


def safe_run(dataset: str, model: str, overrides: list[str], seed: int, args: argparse.Namespace) -> dict:
    try:
        return train_one(dataset, model, overrides, seed, args)
    except Exception as exc:  # one bad method must not end the sweep
        return {"error": f"{type(exc).__name__}: {exc}".strip()[:2000]}


def fmt_pm(values: list[float], n: int, signed: bool = True, digits: int = 2) -> str:
    """'mean ± std' of the successful seeds, '—' if none succeeded, '(k/n seeds)' if some failed."""
    if not values:
        return "—"
    mu, sd = mean_std(values)
    s = f"{mu:+.{digits}f} ± {sd:.{digits}f}" if signed else f"{mu:.{digits}f} ± {sd:.{digits}f}"
    return s if len(values) == n else f"{s} ({len(values)}/{n} seeds)"


def estimate_seconds(datasets: list[str], methods: dict[str, dict], args: argparse.Namespace) -> float:
    epochs = {"census": args.census_epochs, "synthetic": args.synthetic_epochs}
    total = 0.0
    for ds in datasets:
        per_run = EPOCH_SECONDS[ds] * epochs[ds] * (args.n_train / 20000 if ds == "synthetic" else 1.0)
        cost = 1.0 + sum(GRADIENT_COST if m["kind"] == "gradient" else 1.0 for m in methods.values())
        total += per_run * cost * len(args.seed_list)
    return total


def run_key(dataset: str, seed: int, name: str, overrides: list[str], args: argparse.Namespace) -> str:
    """What identifies one training run in the runs log: dataset, seed, method and every setting it used."""
    return json.dumps(
        {"dataset": dataset, "seed": seed, "name": name, "overrides": dataset_overrides(dataset, args) + overrides},
        sort_keys=True,
    )


def load_runs(path: Any) -> dict[str, dict]:
    """``{key: record}`` of the successful runs in the JSON-lines log (the last one wins)."""
    runs: dict[str, dict] = {}
    if not path.exists():
        return runs
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            print(f"{path}:{lineno}: skipping a line that is not JSON ({exc})")
            continue
        if "error" not in entry["record"]:
            runs[entry["key"]] = entry["record"]
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    all_methods = discover_methods()
    ap.add_argument("--quick", action="store_true", help="3 seeds; census 3 epochs, synthetic 15 epochs")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds: 0 .. seeds-1 (default 3)")
    ap.add_argument("--epochs", type=int, default=None, help="max epochs for every dataset (overrides the defaults)")
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--methods", nargs="+", choices=list(all_methods), default=None, help="subset (default: all)")
    ap.add_argument("--census-path", default=None, help="census file (default: ../shared/data/census-income/...)")
    ap.add_argument("--correlation", type=float, default=0.5)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256, help="synthetic batch size (census uses 1024)")
    ap.add_argument("--lr", type=float, default=0.001, help="synthetic learning rate")
    ap.add_argument("--patience", type=int, default=10, help="synthetic early-stopping patience (epochs)")
    ap.add_argument("--output", default="mtl_methods.json", help="file name under benchmarks/results/")
    ap.add_argument("--runs-log", default=None, help="JSON-lines log of finished runs (default: see the docstring)")
    ap.add_argument("--fresh", action="store_true", help="train every run again, ignoring the runs log")
    args = ap.parse_args()
    if os.path.basename(args.output) != args.output:
        ap.error("--output is a file name under benchmarks/results/, not a path")
    if args.quick:
        args.seeds = 3
    args.census_epochs = args.epochs or (3 if args.quick else 20)
    args.synthetic_epochs = args.epochs or (15 if args.quick else 200)
    args.seed_list = list(range(args.seeds))
    methods = {k: v for k, v in all_methods.items() if args.methods is None or k in args.methods}
    runs_log = (
        REPO / "benchmarks" / "results" / ("mtl_methods_runs_quick.jsonl" if args.quick else "mtl_methods_runs.jsonl")
    )
    if args.runs_log:
        from pathlib import Path

        runs_log = Path(args.runs_log).resolve()
    done = {} if args.fresh else load_runs(runs_log)

    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)

    n_runs = len(args.datasets) * len(args.seed_list) * (1 + len(methods))
    est = estimate_seconds(args.datasets, methods, args)
    print(
        f"{len(methods)} methods + baseline x {len(args.datasets)} datasets x {len(args.seed_list)} seeds = "
        f"{n_runs} runs; census {args.census_epochs} epochs, synthetic up to {args.synthetic_epochs}; "
        f"estimated {est / 60:.0f} min on one free core (early stopping shortens it, a busy core lengthens it)",
        flush=True,
    )

    baseline: list[dict] = []
    results: list[dict] = []
    jobs = [(ds, seed, name) for ds in args.datasets for seed in args.seed_list for name in ["baseline", *methods]]
    base_by: dict[tuple[str, int], dict] = {}
    started = time.perf_counter()
    bar = tqdm(jobs, desc="mtl_methods", dynamic_ncols=True)
    reused = 0

    def cached_run(ds: str, model: str, overrides: list[str], seed: int, name: str) -> dict:
        nonlocal reused
        key = run_key(ds, seed, name, [f"model={model}", *overrides], args)
        if key in done:
            reused += 1
            return {"metrics": done[key]["metrics"], "seconds": done[key]["seconds"], "reused": True}
        out = safe_run(ds, model, overrides, seed, args)
        runs_log.parent.mkdir(parents=True, exist_ok=True)
        with runs_log.open("a") as f:  # one line per run, appended as soon as it ends
            f.write(json.dumps({"key": key, "record": out}) + "\n")
        return out

    for ds, seed, name in bar:
        bar.set_postfix_str(f"{ds} seed={seed} {name}")
        if name == "baseline":
            out = cached_run(ds, BASELINE_MODEL, ["weighting=equal", "gradient=none"], seed, name)
            rec = {"dataset": ds, "seed": seed, "model": BASELINE_MODEL, **out}
            baseline.append(rec)
            base_by[(ds, seed)] = rec
            msg = rec.get("error") or ", ".join(f"{t}={v:.4f}" for t, v in rec["metrics"].items())
            tqdm.write(f"[{ds} seed={seed}] baseline: {msg}")
            continue
        m = methods[name]
        out = cached_run(ds, MODEL, m["overrides"], seed, name)
        rec = {"method": name, "kind": m["kind"], "dataset": ds, "seed": seed, "delta_m": None, **out}
        base = base_by[(ds, seed)]
        if "error" not in rec:
            if "error" in base:
                rec["error"] = "no baseline for this seed: " + base["error"]
            else:
                rec["delta_m"] = delta_m(ds, rec["metrics"], base["metrics"])
        if "error" in rec:
            msg = "ERROR " + rec["error"].splitlines()[0][:200]
        else:
            msg = ", ".join(f"{t}={v:.4f}" for t, v in rec["metrics"].items()) + f", delta_m={rec['delta_m']:+.3f}%"
        tqdm.write(f"[{ds} seed={seed}] {name}: {msg}")
        results.append(rec)
    bar.close()
    elapsed = time.perf_counter() - started

    # Per-task test metrics (mean ± std over seeds), baseline first.
    n = len(args.seed_list)
    headers = ["method", "kind"]
    for ds in args.datasets:
        headers += [f"{t} test {DATASETS[ds]['metric'].upper()}" for t in DATASETS[ds]["tasks"]]
    rows = []
    for name, kind, recs in [("single-task", "baseline", baseline)] + [
        (k, v["kind"], [r for r in results if r["method"] == k]) for k, v in methods.items()
    ]:
        row = [name, kind]
        for ds in args.datasets:
            ok = [r for r in recs if r["dataset"] == ds and "metrics" in r]
            row += [fmt_pm([r["metrics"][t] for r in ok], n, signed=False, digits=4) for t in DATASETS[ds]["tasks"]]
        rows.append(row)
    print("\nTest metrics of the best-validation checkpoint (mean ± std over seeds):\n")
    print(table(headers, rows))

    # The delta-m table, in Markdown for the README.
    headers = ["method", "kind", *(f"Δm % {DATASETS[ds]['label']}" for ds in args.datasets)]
    rows = []
    for k, v in methods.items():
        row = [k, v["kind"]]
        for ds in args.datasets:
            recs = [r for r in results if r["method"] == k and r["dataset"] == ds]
            vals = [r["delta_m"] for r in recs if r["delta_m"] is not None]
            row.append(fmt_pm(vals, n))
        rows.append(row)
    print(
        f"\nΔm % against single-task (MMoE; mean ± std over {n} seed{'s' if n != 1 else ''}; positive = better than "
        f"single-task; census {args.census_epochs} epochs, synthetic up to {args.synthetic_epochs}):\n"
    )
    print(table(headers, rows))
    failed = [r for r in [*baseline, *results] if "error" in r]
    if failed:
        print(f"\n{len(failed)} run(s) failed:")
        for r in failed:
            first = r["error"].splitlines()[0][:300]
            print(f"  {r['dataset']} seed={r['seed']} {r.get('method', 'baseline')}: {first}")
    print(f"\ntook {elapsed / 60:.1f} min for {n_runs} runs ({reused} reused from {runs_log.name})")

    settings = {
        "model": MODEL,
        "baseline_model": BASELINE_MODEL,
        "seeds": args.seed_list,
        "datasets": args.datasets,
        "methods": {k: v["kind"] for k, v in methods.items()},
        "quick": args.quick,
        "census": {
            "max_epochs": args.census_epochs,
            "batch_size": 1024,
            "monitor": "auc",
            "metric": "test auc",
            "tasks": list(DATASETS["census"]["tasks"]),
            "path": args.census_path,
        },
        "synthetic": {
            "max_epochs": args.synthetic_epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "patience": args.patience,
            "monitor": "loss",
            "n_train": args.n_train,
            "correlation": args.correlation,
            "metric": "test mse",
            "tasks": list(DATASETS["synthetic"]["tasks"]),
        },
        "delta_m": "100/T * sum_t s_t (M_t - B_t) / B_t, s_t = +1 (AUC) / -1 (MSE), per seed vs same-seed baseline",
        "num_threads": 1,
        "elapsed_s": round(elapsed, 1),
        "reused_runs": reused,
        "runs_log": runs_log.name,
        "training_seconds": round(sum(r.get("seconds", 0.0) for r in [*baseline, *results]), 1),
    }
    write_json(args.output, {"settings": settings, "baseline": baseline, "results": results})


if __name__ == "__main__":
    main()
