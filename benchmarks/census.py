"""Single-task vs Shared-Bottom vs MMoE vs PLE on Census-Income (MMoE paper task group 1).

    python benchmarks/census.py [--seeds 3] [--path FILE] [--quick]

Test AUC per task (income > 50K, never married) of the best-validation checkpoint, mean and std over
seeds; the file is split 70/15/15 seeded. Writes benchmarks/results/census.json.
"""

from __future__ import annotations

import argparse
import tempfile

from common import compose, mean_std, table, write_json

MODELS = {"single_task": "Single-task", "shared_bottom": "Shared-Bottom", "mmoe": "MMoE", "ple": "PLE"}
TASKS = ("income", "marital")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--path", default=None, help="census file (default: ../shared/data/census-income/...)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer epochs")
    args = ap.parse_args()
    epochs = args.epochs or (5 if args.quick else 20)

    from tqdm import tqdm

    from mtrec.train import run

    results = []
    jobs = [(m, s) for s in range(args.seeds) for m in MODELS]
    for model, seed in tqdm(jobs, desc="census"):
        overrides = [
            "data=census",
            f"model={model}",
            f"seed={seed}",
            f"trainer.max_epochs={epochs}",
            "trainer.monitor=auc",
            "trainer.batch_size=1024",
            "trainer.progress=false",
            "trainer.tensorboard=false",
        ]
        if args.path:
            overrides.append(f"data.path={args.path}")
        with tempfile.TemporaryDirectory() as d:
            metrics = run(compose(*overrides), d)
        for task in TASKS:
            results.append({"model": model, "task": task, "seed": seed, "auc": metrics["test"][task]["auc"]})

    rows = []
    for m, label in MODELS.items():
        row: list = [label]
        for task in TASKS:
            mu, sd = mean_std([r["auc"] for r in results if r["model"] == m and r["task"] == task])
            row.append(f"{mu:.4f} ± {sd:.4f}")
        rows.append(row)
    print(table(["model", *(f"{t} test AUC" for t in TASKS)], rows))
    write_json("census.json", {"settings": {"seeds": args.seeds, "epochs": epochs}, "results": results})


if __name__ == "__main__":
    main()
