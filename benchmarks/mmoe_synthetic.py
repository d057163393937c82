"""Shared-Bottom vs OMoE vs MMoE on the MMoE paper's synthetic data (Ma et al., KDD 2018, Figure 4).

    python benchmarks/mmoe_synthetic.py            # p in {0.5, 0.9, 1.0}, 5 seeds
    python benchmarks/mmoe_synthetic.py --quick    # 3 seeds, shorter training (< 10 min on 2 cores)

Paper sizes: 8 experts of 16 units, towers of 8 units, Shared-Bottom with a 113-unit bottom.
Writes benchmarks/results/mmoe_synthetic.json and mmoe_synthetic.png.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict

from common import RESULTS, compose, mean_std, table, write_json

MODELS = {"shared_bottom": "Shared-Bottom", "omoe": "OMoE", "mmoe": "MMoE"}


def train_one(model: str, p: float, seed: int, args: argparse.Namespace) -> float:
    from mtrec.train import run

    cfg = compose(
        "data=mmoe_synthetic",
        f"data.correlation={p}",
        f"data.n_train={args.n_train}",
        f"model={model}",
        f"seed={seed}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.patience=5",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        f"optimizer.lr={args.lr}",
    )
    with tempfile.TemporaryDirectory() as d:
        metrics = run(cfg, d)
    # test loss: mean over the two tasks of the test MSE of the best-validation checkpoint
    return sum(metrics["test"][t]["mse"] for t in ("task1", "task2")) / 2


def plot(results: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = defaultdict(list)
    for r in results:
        by[(r["model"], r["correlation"])].append(r["test_loss"])
    ps = sorted({r["correlation"] for r in results})
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in MODELS.items():
        means = [mean_std(by[(key, p)])[0] for p in ps]
        stds = [mean_std(by[(key, p)])[1] for p in ps]
        ax.errorbar(ps, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("test loss (mean MSE of the two tasks)")
    ax.set_title("Synthetic data (Ma et al. 2018, Fig. 4)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, fewer epochs")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--correlations", type=float, nargs="+", default=[0.5, 0.9, 1.0])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.001)
    args = ap.parse_args()
    args.seeds = args.seeds or (3 if args.quick else 5)
    args.epochs = args.epochs or (30 if args.quick else 100)

    from tqdm import tqdm

    jobs = [(m, p, s) for p in args.correlations for s in range(args.seeds) for m in MODELS]
    results = []
    for model, p, seed in tqdm(jobs, desc="mmoe_synthetic"):
        loss = train_one(model, p, seed, args)
        results.append({"model": model, "correlation": p, "seed": seed, "test_loss": loss})

    rows = []
    for p in args.correlations:
        row: list = [p]
        for m in MODELS:
            mu, sd = mean_std([r["test_loss"] for r in results if r["model"] == m and r["correlation"] == p])
            row.append(f"{mu:.4f} ± {sd:.4f}")
        rows.append(row)
    print(table(["p", *MODELS.values()], rows))
    write_json(
        "mmoe_synthetic.json",
        {"settings": {k: v for k, v in vars(args).items()}, "results": results},
    )
    plot(results, RESULTS / "mmoe_synthetic.png")


if __name__ == "__main__":
    main()
