"""Shared-Bottom vs OMoE vs MMoE on the MMoE paper's synthetic data (Ma et al., KDD 2018, Figure 4).

    python benchmarks/mmoe_synthetic.py            # p in {0.5, 0.9, 1.0}, 5 seeds, up to 200 epochs
    python benchmarks/mmoe_synthetic.py --quick    # 3 seeds, up to 60 epochs (< 10 min on 2 cores)

Each seed draws its own data set (seed also sets the model initialisation); the three models of a seed
train on the same data, so the comparison is paired. Test loss is the mean of the two tasks' test MSE
at the best-validation checkpoint (20,000 train / 1,000 val / 1,000 test rows, Adam 1e-3, batch 256).

Paper sizes: 8 experts of 16 units, towers of 8 units, Shared-Bottom with a 113-unit bottom.
Writes benchmarks/results/mmoe_synthetic.{json,png} (``--quick``: mmoe_synthetic_quick.{json,png}).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

from common import RESULTS, compose, mean_std, table, write_json

MODELS = {"shared_bottom": "Shared-Bottom", "omoe": "OMoE", "mmoe": "MMoE"}


def train_one(model: str, p: float, seed: int, args: argparse.Namespace) -> tuple[float, list[float]]:
    """Test loss of the best-validation checkpoint, and the validation loss after every epoch."""
    from mtrec.train import run

    cfg = compose(
        "data=mmoe_synthetic",
        f"data.correlation={p}",
        f"data.n_train={args.n_train}",
        f"model={model}",
        f"seed={seed}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.patience={args.patience}",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        f"optimizer.lr={args.lr}",
    )
    with tempfile.TemporaryDirectory() as d:
        metrics = run(cfg, d)
        log = [json.loads(line) for line in (Path(d) / "train_log.jsonl").read_text().splitlines()]
    curve = [(r["val/task1/mse"] + r["val/task2/mse"]) / 2 for r in log if "val/score" in r]
    # test loss: mean over the two tasks of the test MSE of the best-validation checkpoint
    return sum(metrics["test"][t]["mse"] for t in ("task1", "task2")) / 2, curve


def plot(results: list[dict], path: Path) -> None:
    """One panel per correlation, as in the paper's Figure 4: mean validation loss against epochs.

    A seed that stopped early keeps its last value, so every curve averages the same seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = defaultdict(list)
    for r in results:
        curves[(r["model"], r["correlation"])].append(r["val_curve"])
    ps = sorted({r["correlation"] for r in results}, reverse=True)
    fig, axes = plt.subplots(1, len(ps), figsize=(4.2 * len(ps), 3.6), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], ps):
        for key, label in MODELS.items():
            runs = curves[(key, p)]
            n = max(len(c) for c in runs)
            padded = [c + [c[-1]] * (n - len(c)) for c in runs]
            mean = [sum(col) / len(col) for col in zip(*padded)]
            ax.plot(range(1, n + 1), mean, label=label)
        ax.set_title(f"correlation = {p}")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("validation loss (mean MSE of 2 tasks)")
    axes[0][0].legend()
    fig.suptitle(f"Synthetic data (Ma et al. 2018, Fig. 4 style), mean of {len(runs)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, fewer epochs")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--correlations", type=float, nargs="+", default=[0.5, 0.9, 1.0])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.001)
    args = ap.parse_args()
    args.seeds = args.seeds or (3 if args.quick else 5)
    args.epochs = args.epochs or (60 if args.quick else 200)
    args.patience = args.patience or (10 if args.quick else 20)

    from tqdm import tqdm

    jobs = [(m, p, s) for p in args.correlations for s in range(args.seeds) for m in MODELS]
    results = []
    for model, p, seed in tqdm(jobs, desc="mmoe_synthetic"):
        loss, curve = train_one(model, p, seed, args)
        results.append({"model": model, "correlation": p, "seed": seed, "test_loss": loss, "val_curve": curve})

    rows = []
    for p in args.correlations:
        row: list = [p]
        for m in MODELS:
            mu, sd = mean_std([r["test_loss"] for r in results if r["model"] == m and r["correlation"] == p])
            row.append(f"{mu:.4f} ± {sd:.4f}")
        rows.append(row)
    print(table(["p", *MODELS.values()], rows))
    for p in args.correlations:
        means = {m: mean_std([r["test_loss"] for r in results if r["model"] == m and r["correlation"] == p])[0]
                 for m in MODELS}
        holds = means["mmoe"] <= means["omoe"] <= means["shared_bottom"]
        print(f"p={p}: MMoE <= OMoE <= Shared-Bottom {'holds' if holds else 'does NOT hold'}")
    stem = "mmoe_synthetic_quick" if args.quick else "mmoe_synthetic"
    write_json(f"{stem}.json", {"settings": dict(vars(args)), "results": results})
    plot(results, RESULTS / f"{stem}.png")


if __name__ == "__main__":
    main()
