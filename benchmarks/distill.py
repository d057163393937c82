"""Knowledge distillation: single-task teachers vs a plain MMoE vs the MMoE distilled from the teachers.

    python benchmarks/distill.py [--quick] [--seeds 3] [--datasets census synthetic] [--path FILE] [--workdir DIR]

For each dataset and seed: ``mtrec-teachers`` (one single-task model per task, :func:`mtrec.train.train_teachers`),
a plain MMoE (``baseline``) and the distilled MMoE (``student``: ``mtrec-train distill=... distill.teachers=...``),
all with the same trainer settings, early stopping on validation AUC, and test metrics of the best-validation
checkpoint. The distillation settings (alpha, T, annealing, feature term) are chosen on **validation** only: every
candidate trains on seed 0; the one whose worst task, relative to that task's teacher on validation (AUC, or MSE
for regression), is best (ties by the mean over tasks) is then run on every seed (its seed-0 run is reused); test
metrics of the other candidates are never looked at. Every run uses one torch thread (``trainer.num_threads=1``).

Inference cost: the time of one forward pass per example of the student (one MMoE serves every task) and of the
teachers (one network per task, all of them run), side by side in alternating rounds, at batch 1 and 1024, in
``torch.inference_mode`` on one CPU thread.

Writes benchmarks/results/distill.json (``settings.quick`` says which variant)::

    {"results": [{"dataset", "model": teacher|student|baseline, "task", "seed", "auc"}],   # binary tasks
     "regression_results": [{"dataset", "model", "task", "seed", "mse"}],               # regression tasks
     "tuning": {dataset: {"candidates": [...], "chosen": name}}, "cost": {dataset: {...}}, "settings": {...}}

Census-Income needs ../shared/data/census-income/census-income.test.gz (or --path); without it that dataset
is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import REPO, compose, mean_std, table, write_json

CENSUS_DEFAULT = REPO.parent / "shared" / "data" / "census-income" / "census-income.test.gz"

# (name, alpha, temperature, anneal, feature_weight)
CANDIDATES_QUICK = [
    ("soft_a0.5_T1", 0.5, 1.0, False, 0.0),
    ("soft_a0.5_T2", 0.5, 2.0, False, 0.0),
    ("soft_a0.5_T4", 0.5, 4.0, False, 0.0),
    ("soft_a0.9_T2", 0.9, 2.0, False, 0.0),
    ("annealed", 1.0, 1.0, True, 0.0),
]
CANDIDATES_FULL = [
    *CANDIDATES_QUICK,
    ("soft_a0.2_T2", 0.2, 2.0, False, 0.0),
    ("feature_a0.5_T2", 0.5, 2.0, False, 1.0),
]


def dataset_settings(name: str, quick: bool, path: str | None) -> dict[str, Any]:
    """Data and trainer overrides of one dataset (the same for teachers, baseline and student)."""
    # One intra-op thread: these models are too small to gain from two, and on a shared 2-core machine two
    # threads oversubscribe (measured here: a census MMoE epoch 6x slower with 2 threads while another process ran).
    common = ["trainer.monitor=auc", "trainer.num_threads=1", "trainer.progress=false", "trainer.tensorboard=false"]
    if name == "census":
        data = ["data=census"] + ([f"data.path={path}"] if path else [])
        epochs = 8 if quick else 20
        return {"overrides": [*data, f"trainer.max_epochs={epochs}", "trainer.patience=3", *common], "epochs": epochs}
    if name == "synthetic":
        epochs = 12 if quick else 20
        # quick: 40k rows and smaller id spaces (the embedding tables dominate the optimiser's work)
        size = ["data.n_rows=40000", "data.num_users=2000", "data.num_items=5000", "data.num_categories=100"]
        data = ["data=synthetic", *(size if quick else []), "trainer.batch_size=256"]
        return {"overrides": [*data, f"trainer.max_epochs={epochs}", "trainer.patience=3", *common], "epochs": epochs}
    raise ValueError(f"unknown dataset {name!r}; choose census or synthetic")


def student_overrides(candidate: tuple[str, float, float, bool, float], teachers: Path) -> list[str]:
    _, alpha, temperature, anneal, feature = candidate
    defaults = yaml.safe_load((REPO / "configs" / "mtrec.yaml").read_text()).get("defaults", [])
    listed = any(isinstance(d, dict) and "distill" in d for d in defaults)
    group = "distill=soft" if listed else "+distill=soft"  # whether configs/mtrec.yaml lists the group yet
    return [
        group,
        f"distill.teachers={teachers}",
        f"distill.alpha={alpha}",
        f"distill.temperature={temperature}",
        f"distill.anneal={str(anneal).lower()}",
        f"distill.feature_weight={feature}",
    ]


def relative_to_teachers(val: dict[str, dict[str, float]], teachers: dict[str, Any]) -> dict[str, float]:
    """Per task, the student's validation metric relative to its teacher's, oriented so that > 0 is better:
    ``(auc_s - auc_t) / auc_t`` for binary tasks, ``(mse_t - mse_s) / mse_t`` for regression."""
    out = {}
    for task, m in val.items():
        ref = teachers[task]["val"]
        if "auc" in m:
            out[task] = (m["auc"] - ref["auc"]) / ref["auc"]
        else:
            out[task] = (ref["mse"] - m["mse"]) / ref["mse"]
    return out


def rows_of(dataset: str, model: str, seed: int, split_metrics: dict[str, dict[str, float]]) -> tuple[list, list]:
    binary, regression = [], []
    for task, m in split_metrics.items():
        if "auc" in m:
            binary.append({"dataset": dataset, "model": model, "task": task, "seed": seed, "auc": m["auc"]})
        else:
            regression.append({"dataset": dataset, "model": model, "task": task, "seed": seed, "mse": m["mse"]})
    return binary, regression


def inference_cost(data_overrides: list[str], teachers_dir: Path, rounds: int = 7) -> dict[str, Any]:
    """Forward time per example of the student (one MMoE) and of all teachers, alternating, at batch 1 and 1024."""
    import torch
    from hydra.utils import instantiate

    from mtrec.distill import load_teachers
    from mtrec.models import build_model, count_parameters

    torch.set_num_threads(1)
    cfg = compose(*data_overrides)
    bundle = instantiate(cfg.data)
    tasks = bundle.tasks
    torch.manual_seed(0)
    student = build_model(cfg.model, bundle.features, [t.name for t in tasks]).eval()
    teachers = list(load_teachers(teachers_dir, tasks, features=bundle.features).values())
    out: dict[str, Any] = {
        "student": {"networks": 1, "parameters": count_parameters(student)},
        "teachers": {"networks": len(teachers), "parameters": sum(count_parameters(m) for m in teachers)},
        "threads": torch.get_num_threads(),
        "rounds": rounds,
    }
    for batch_size in (1, 1024):
        batch = bundle.val.batch(torch.arange(batch_size))
        reps = 200 if batch_size == 1 else 10
        times: dict[str, list[float]] = {"student": [], "teachers": []}
        systems = {"student": [student], "teachers": teachers}
        with torch.inference_mode():
            for models in systems.values():  # warm-up
                for m in models:
                    m(batch.dense, batch.sparse)
            for _ in range(rounds):
                for name, models in systems.items():
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        for m in models:
                            m(batch.dense, batch.sparse)
                    times[name].append((time.perf_counter() - t0) / reps / batch_size * 1e3)
        for name in systems:
            out[name][f"ms_per_example_batch{batch_size}"] = statistics.median(times[name])
    out["teachers_over_student_batch1"] = (
        out["teachers"]["ms_per_example_batch1"] / out["student"]["ms_per_example_batch1"]
    )
    out["teachers_over_student_batch1024"] = (
        out["teachers"]["ms_per_example_batch1024"] / out["student"]["ms_per_example_batch1024"]
    )
    return out


def run_dataset(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any] | None:
    from tqdm import tqdm

    from mtrec.train import run, train_teachers

    path = args.path
    if name == "census":
        file = Path(path) if path else CENSUS_DEFAULT
        if not file.exists():
            print(f"skipping census: {file} not found (pass --path)")
            return None
    settings = dataset_settings(name, args.quick, path)
    base = settings["overrides"]
    candidates = CANDIDATES_QUICK if args.quick else CANDIDATES_FULL
    binary: list[dict[str, Any]] = []
    regression: list[dict[str, Any]] = []
    seconds: dict[str, float] = {"teachers": 0.0, "baseline": 0.0, "student": 0.0, "tuning": 0.0}
    teacher_dirs: dict[int, Path] = {}
    bar = tqdm(total=args.seeds * 2 + len(candidates) + args.seeds - 1, desc=name)
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        teacher_dirs[seed] = workdir / name / f"seed{seed}" / "teachers"
        manifest = train_teachers(compose("model=single_task", f"seed={seed}", *base), teacher_dirs[seed])
        seconds["teachers"] += time.perf_counter() - t0
        b, r = rows_of(name, "teacher", seed, {t: e["test"] for t, e in manifest["teachers"].items()})
        binary += b
        regression += r
        bar.update(1)
        t0 = time.perf_counter()
        metrics = run(compose("model=mmoe", f"seed={seed}", *base), workdir / name / f"seed{seed}" / "baseline")
        seconds["baseline"] += time.perf_counter() - t0
        b, r = rows_of(name, "baseline", seed, metrics["test"])
        binary += b
        regression += r
        bar.update(1)

    # Choose the distillation settings on validation (seed 0 only): the candidate whose worst task is closest to
    # (or furthest above) its teacher, relative to the teacher's validation metric; ties by the mean.
    tuning: list[dict[str, Any]] = []
    chosen_metrics: dict[str, Any] = {}
    teachers0 = json.loads((teacher_dirs[0] / "teachers.json").read_text())["teachers"]
    t0 = time.perf_counter()
    for cand in candidates:
        overrides = ["model=mmoe", "seed=0", *base, *student_overrides(cand, teacher_dirs[0] / "teachers.json")]
        metrics = run(compose(*overrides), workdir / name / "seed0" / f"student_{cand[0]}")
        rel = relative_to_teachers(metrics["val"], teachers0)
        entry = {
            "name": cand[0],
            "alpha": cand[1],
            "temperature": cand[2],
            "anneal": cand[3],
            "feature_weight": cand[4],
            "val": {t: {k: v for k, v in m.items() if k in ("auc", "mse")} for t, m in metrics["val"].items()},
            "val_relative_to_teacher": rel,
            "val_score": (min(rel.values()), sum(rel.values()) / len(rel)),
        }
        tuning.append(entry)
        chosen_metrics[cand[0]] = metrics
        bar.update(1)
    seconds["tuning"] = time.perf_counter() - t0
    best = max(tuning, key=lambda e: e["val_score"])
    chosen = next(c for c in candidates if c[0] == best["name"])
    b, r = rows_of(name, "student", 0, chosen_metrics[chosen[0]]["test"])
    binary += b
    regression += r
    t0 = time.perf_counter()
    for seed in range(1, args.seeds):
        overrides = [
            "model=mmoe",
            f"seed={seed}",
            *base,
            *student_overrides(chosen, teacher_dirs[seed] / "teachers.json"),
        ]
        metrics = run(compose(*overrides), workdir / name / f"seed{seed}" / "student")
        b, r = rows_of(name, "student", seed, metrics["test"])
        binary += b
        regression += r
        bar.update(1)
    seconds["student"] = time.perf_counter() - t0
    bar.close()
    cost = inference_cost(["model=mmoe", "seed=0", *base], teacher_dirs[0])
    return {
        "binary": binary,
        "regression": regression,
        "tuning": {
            "criterion": "seed 0 validation: max of (worst task, mean) relative change vs the task's teacher",
            "candidates": tuning,
            "chosen": best["name"],
        },
        "cost": cost,
        "settings": {"overrides": base, "epochs": settings["epochs"]},
        "seconds": seconds,
    }


def print_tables(results: list[dict], regression: list[dict], costs: dict[str, Any]) -> None:
    models = ("teacher", "baseline", "student")
    for dataset in sorted({r["dataset"] for r in results}):
        tasks = list(dict.fromkeys(r["task"] for r in results if r["dataset"] == dataset))
        rtasks = list(dict.fromkeys(r["task"] for r in regression if r["dataset"] == dataset))
        rows = []
        for m in models:
            row: list[Any] = [m]
            for t in tasks:
                mu, sd = mean_std(
                    [r["auc"] for r in results if (r["dataset"], r["model"], r["task"]) == (dataset, m, t)]
                )
                row.append(f"{mu:.4f} ± {sd:.4f}")
            for t in rtasks:
                vals = [r["mse"] for r in regression if (r["dataset"], r["model"], r["task"]) == (dataset, m, t)]
                mu, sd = mean_std(vals)
                row.append(f"{mu:.4f} ± {sd:.4f}")
            rows.append(row)
        print(f"\n{dataset}: test metrics (mean ± std over seeds)")
        print(table(["model", *(f"{t} AUC" for t in tasks), *(f"{t} MSE" for t in rtasks)], rows))
        c = costs[dataset]
        print(
            table(
                ["system", "networks", "parameters", "ms/example @1", "ms/example @1024"],
                [
                    [
                        s,
                        c[s]["networks"],
                        f"{c[s]['parameters']:,}",
                        f"{c[s]['ms_per_example_batch1']:.4f}",
                        f"{c[s]['ms_per_example_batch1024']:.5f}",
                    ]
                    for s in ("student", "teachers")
                ],
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", nargs="+", default=["census", "synthetic"], choices=["census", "synthetic"])
    ap.add_argument("--path", default=None, help="census file (default: ../shared/data/census-income/...)")
    ap.add_argument("--quick", action="store_true", help="fewer epochs and rows, three tuning candidates")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")

    t_start = time.perf_counter()
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
    else:
        tmp = tempfile.TemporaryDirectory()
        workdir = Path(tmp.name)
    results: list[dict] = []
    regression: list[dict] = []
    tuning: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    per_dataset: dict[str, Any] = {}
    skipped: list[str] = []
    try:
        for name in args.datasets:
            out = run_dataset(name, args, workdir)
            if out is None:
                skipped.append(name)
                continue
            results += out["binary"]
            regression += out["regression"]
            tuning[name] = out["tuning"]
            costs[name] = out["cost"]
            per_dataset[name] = {"settings": out["settings"], "seconds": out["seconds"]}
    finally:
        if tmp is not None:
            tmp.cleanup()
    if not results:
        print("no dataset ran")
        return
    print_tables(results, regression, costs)
    for name, t in tuning.items():
        scores = {c["name"]: [round(100 * v, 3) for v in c["val_score"]] for c in t["candidates"]}
        print(f"{name}: chosen on validation: {t['chosen']}; (worst task, mean) % vs teachers: {json.dumps(scores)}")
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")
    write_json(
        "distill.json",
        {
            "settings": {"seeds": args.seeds, "quick": args.quick, "datasets": per_dataset, "skipped": skipped},
            "results": results,
            "regression_results": regression,
            "tuning": tuning,
            "cost": costs,
            "seconds": total,
        },
    )


if __name__ == "__main__":
    main()
