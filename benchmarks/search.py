"""mtlib-search (ENAS over sharing structures) against fixed architectures and against exhaustive enumeration.

    python benchmarks/search.py --quick    # 1 seed, 100-step budget, 16-candidate spaces (a few minutes)
    python benchmarks/search.py            # 3 seeds, 300/200-step budgets, 81-candidate spaces (~25 min, 2 cores)
    python benchmarks/search.py --datasets mmoe_p0.5 four_task --seeds 2

Data sets: the MMoE synthetic data (Ma et al. 2018, two regression tasks) at correlation p = 0.5 and 0.9
(``configs/data/mmoe_synthetic.yaml``), Census-Income (``configs/data/census.yaml``, tasks income and marital;
skipped when the file is absent) and the four-task synthetic log with an unrelated task of
``benchmarks/grouping.py`` (``mtrec.grouping.load_sparse_synthetic_unrelated``).

For each data set:

1. **Search** (seed 0): ``mtlib-search``'s library function (:func:`mtrec.search.run_search`) in an enumerable
   space: 2 shared experts and 1 own expert per task per level (MLPs of ``--expert-width`` units; Adam 0.005,
   batch 256, for every model), choices per (task, level) ``own`` / shared expert ``[0]`` / ``all`` shared
   experts; 2 levels for the two-task sets and 1 level for the four-task set, so 3^4 = 81 children each. The
   supernet trains for ``--supernet-factor`` (2) times the steps of one child trained from scratch (spread over
   10 epochs, the first ``--warmup-epochs`` (3) without controller updates), with 15 controller updates per epoch
   (ENAS's micro-search sampler: temperature 5, tanh constant 1.1) and 8 + 1 final candidates scored on 8
   validation batches.
2. **Exhaustive** (seed 0): every child of the space trained from scratch for the data set's step budget (300
   steps on the MMoE synthetic sets, 200 on Census-Income and the four-task set, 100 with ``--quick``; early
   stopping on the validation loss); the exhaustive answer is the best on validation. Cost in steps: the sum of
   their steps; search cost: every batch that went through the supernet (training steps + controller rewards +
   final scoring).
3. **Comparison** (``--seeds`` seeds, each with its own data draw and initialisation): the searched child retrained
   from scratch, Shared-Bottom, MMoE, PLE (2 levels, 2 shared + 1 own expert) and the task-grouping choice (TAG,
   Fifty et al. 2021, via ``mtrec.grouping.RecMeasurer`` at a budget of 2 networks; each chosen group a
   Shared-Bottom), every baseline's width set so that its parameters outside the input arch match the searched
   child's (the grouping choice has one input arch per network besides).

Test metric: mean test MSE (MMoE synthetic; lower is better), mean test AUC (Census-Income; higher), mean test
task loss (four-task set: BCE of click, conversion, unrelated, MSE of dwell; lower). Targets: (a) the searched
model is within noise (the gap to the best fixed architecture's mean at most one pooled standard deviation over
seeds) of the best fixed architecture or better on every data set; (b) the search costs >= 20x fewer steps than
the exhaustive enumeration; (c) the unrelated task of the four-task set gets its own experts (the shared experts
it reads, at every level, are read by no other task). Every finished training is logged to
``benchmarks/results/search_runs[_quick].jsonl`` and reused by a rerun with the same settings (``--fresh`` ignores
the log). One torch thread per training. Writes ``benchmarks/results/search[_quick].json``, ``search[_quick].png``
and the controller's policy plot of every data set, ``search_policy_<dataset>[_quick].png``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import REPO, RESULTS, RunLog, compose, mean_std, table, write_json  # noqa: E402

CENSUS_FILE = REPO.parent / "shared" / "data" / "census-income" / "census-income.test.gz"
MODELS = ("searched", "shared_bottom", "mmoe", "ple", "grouping")


def dataset_specs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per data set: its config overrides, metric, the search space's levels and the step budget."""
    q = args.quick
    mmoe = ["data=mmoe_synthetic", f"data.n_train={4000 if q else 8000}", "data.n_val=1000", "data.n_test=1000"]
    four = [
        "data._target_=mtrec.grouping.load_sparse_synthetic_unrelated",
        f"data.n_rows={6000 if q else 12000}",
        "data.num_users=500",
        "data.num_items=1000",
        "data.num_categories=30",
        "data.history_len=5",
        "model.inputs.embedding_dim=8",
    ]
    return {
        **{
            f"mmoe_p{rho}": {
                "overrides": [*mmoe, f"data.correlation={rho}"],
                "metric": "mse",
                "levels": 2,
                "steps": 100 if q else 300,
            }
            for rho in (0.5, 0.9)
        },
        "census": {"overrides": ["data=census"], "metric": "auc", "levels": 2, "steps": 100 if q else 200},
        "four_task": {"overrides": four, "metric": "loss", "levels": 1, "steps": 100 if q else 200},
    }


def choices(args: argparse.Namespace) -> list[Any]:
    return ["own", "all"] if args.quick else ["own", [0], "all"]


def trainer_overrides(steps: int, seed: int) -> list[str]:
    return [
        "trainer.batch_size=256",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=1000",
        "trainer.patience=3",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.num_threads=1",
        "trainer.eval_batch_size=8192",
        "optimizer.lr=0.005",
        f"seed={seed}",
    ]


def metric_of(test: dict[str, dict[str, float]], metric: str, tasks: list[str]) -> float:
    return statistics.fmean(float(test[t][metric]) for t in tasks if metric in test[t])


def body_params(model: Any) -> int:
    """Parameters outside the input arch (the embedding tables and dense MLP every model has alike)."""
    total = sum(p.numel() for p in model.parameters())
    return total - sum(p.numel() for p in model.inputs.parameters())


def train_eval(cfg: Any, bundle: Any, seconds_key: str = "seconds") -> dict[str, Any]:
    """Train ``cfg`` on the loaded ``bundle`` as mtrec-train does (build_training, fit, best checkpoint, test)."""
    import torch

    from mtrec.train import build_training
    from mtrec.trainer import evaluate

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="search_bench_") as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training = build_training(cfg, d, bundle)
        trainer = training.trainer
        trainer.fit(training.train, bundle.val)
        trainer.load_best()
        test = evaluate(trainer.model, bundle.test, training.tasks, trainer.cfg.eval_batch_size)
        params = body_params(trainer.model)
    return {"val": trainer.best_val, "test": test, "steps": trainer.step, "params": params,
            seconds_key: round(time.perf_counter() - start, 3)}  # fmt: skip


def load(cfg: Any) -> Any:
    from mtrec.train import load_data

    return load_data(cfg.data)


def match_width(make_node: Any, features: Any, tasks: list[str], target: int) -> tuple[int, int]:
    """The width whose model (``make_node(width)``) has the body parameter count closest to ``target``."""
    from mtrec.models import build_model

    def count(w: int) -> int:
        return body_params(build_model(make_node(w), features, tasks))

    lo, hi = 1, 2048
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    best = min((w for w in (lo - 1, lo) if w >= 1), key=lambda w: abs(count(w) - target))
    return best, count(best)


def model_node(cfg: Any, name: str, width: int, levels: int) -> Any:
    """The ``model`` node of a baseline of ``width``."""
    from omegaconf import OmegaConf

    from mtl.config import group_option

    node = OmegaConf.to_container(group_option("model", name), resolve=False)
    inputs = OmegaConf.to_container(cfg.model.inputs, resolve=True)
    node["inputs"] = inputs
    node["tower_dims"] = list(cfg.model.tower_dims)
    if name == "shared_bottom":
        node["bottom_dims"] = [width]
    elif name == "mmoe":
        node.update(num_experts=4, expert_dims=[width])
    elif name == "ple":
        node.update(num_levels=levels, num_shared_experts=2, num_task_experts=1, expert_dims=[width])
    return OmegaConf.create(node)


def compose_search(overrides: list[str]) -> Any:
    from hydra import compose as _compose
    from hydra import initialize_config_module

    from mtl.config import CONFIG_PATH

    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        return _compose(config_name="search", overrides=overrides)


def with_model(cfg: Any, node: Any, task_names: list[str] | None = None) -> Any:
    from omegaconf import OmegaConf

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.model = node
    if task_names is not None:
        out.task_names = list(task_names)
    return out


def run_dataset(name: str, spec: dict[str, Any], args: argparse.Namespace, log: RunLog) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from mtrec.models.searched import check_architecture
    from mtrec.search import SearchSpace, architecture_key, child_run_config, run_search

    steps, levels = spec["steps"], spec["levels"]
    width = args.expert_width
    common = [*spec["overrides"], f"model.expert_dims=[{width}]", "model.tower_dims=[8]"]
    key = {"dataset": name, "overrides": common, "steps": steps, "levels": levels, "choices": choices(args)}
    # ---- 1. the search (seed 0)
    per_epoch = max(1, int(args.supernet_factor * steps) // 10)
    search_overrides = [
        *common,
        *trainer_overrides(steps, 0),
        f"search.levels={levels}",
        "search.experts=2",
        "search.task_experts=1",
        f"search.choices={json.dumps(choices(args)).replace(' ', '')}",
        "search.epochs=10",
        f"search.steps_per_epoch={per_epoch}",
        "search.controller_steps=15",
        f"search.warmup_epochs={args.warmup_epochs}",
        f"search.temperature={args.temperature}",
        f"search.tanh_constant={args.tanh_constant}",
        "search.controller_batch_size=512",
        "search.final_samples=8",
        "search.final_batches=8",
        "search.policy_samples=32",
        f"search.reward={'auc' if spec['metric'] == 'auc' else 'loss'}",
        "search.retrain=false",
    ]
    scfg = compose_search(search_overrides)
    suffix = "_quick" if args.quick else ""

    def do_search() -> dict:
        out = Path(tempfile.mkdtemp(prefix=f"search_{name}_"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = run_search(scfg, out)
        if (out / "policy.png").exists():
            shutil.copy(out / "policy.png", RESULTS / f"search_policy_{name}{suffix}.png")
        policy = [json.loads(line) for line in (out / "policy.jsonl").read_text().splitlines()]
        shutil.rmtree(out, ignore_errors=True)
        return {**{k: r[k] for k in ("architecture", "key", "reward", "train_steps", "controller_steps",
                                      "final_batches", "search_steps", "seconds", "candidates", "space_size")},
                "final_policy": policy[-1]}  # fmt: skip

    search = log.get_or_run({**key, "search": search_overrides}, do_search)
    print(f"[{name}] search: {search['key']} in {search['seconds']:.1f}s, {search['search_steps']} steps", flush=True)
    tasks_cfg = compose(*common, *trainer_overrides(steps, 0), "model=searched")
    bundle0 = load(tasks_cfg)
    tasks = [t.name for t in bundle0.tasks]
    space = SearchSpace(tasks, levels, 2, choices(args))
    base0 = OmegaConf.create(OmegaConf.to_container(tasks_cfg, resolve=True))
    base0.model.num_levels, base0.model.num_shared_experts, base0.model.num_task_experts = levels, 2, 1
    # ---- 2. exhaustive enumeration (seed 0)
    exhaustive = []
    t0 = time.perf_counter()
    for arch in space.enumerate():
        cfg = child_run_config(base0, space, arch, task_experts=1)
        k = architecture_key(arch)
        r = log.get_or_run({**key, "exhaustive": k, "seed": 0}, lambda cfg=cfg: train_eval(cfg, bundle0))
        exhaustive.append({"key": k, "val": metric_of(r["val"], spec["metric"], tasks),
                           "test": metric_of(r["test"], spec["metric"], tasks), "steps": r["steps"],
                           "seconds": r["seconds"], "params": r["params"]})  # fmt: skip
    higher = spec["metric"] == "auc"
    exhaustive.sort(key=lambda e: -e["val"] if higher else e["val"])
    print(f"[{name}] exhaustive: {len(exhaustive)} children, best {exhaustive[0]['key']} "
          f"({time.perf_counter() - t0:.0f}s here)", flush=True)  # fmt: skip
    rank = next(i for i, e in enumerate(exhaustive) if e["key"] == search["key"]) + 1
    searched_arch = check_architecture(search["architecture"], tasks, levels, 2)
    target_params = next(e["params"] for e in exhaustive if e["key"] == search["key"])
    # ---- 3. the comparison over seeds
    results: list[dict[str, Any]] = []
    grouping = None
    for seed in range(args.seeds):
        base_cfg = compose(*common, *trainer_overrides(steps, seed), "model=searched")
        bundle = bundle0 if seed == 0 else load(base_cfg)
        base = OmegaConf.create(OmegaConf.to_container(base_cfg, resolve=True))
        base.model.num_levels, base.model.num_shared_experts, base.model.num_task_experts = levels, 2, 1
        runs: dict[str, dict[str, Any]] = {}
        cfg = child_run_config(base, space, searched_arch, task_experts=1)
        runs["searched"] = log.get_or_run({**key, "model": "searched", "arch": search["key"], "seed": seed},
                                          lambda cfg=cfg, b=bundle: train_eval(cfg, b))  # fmt: skip
        for m in ("shared_bottom", "mmoe", "ple"):
            w, n = match_width(
                lambda w, m=m, b=base: model_node(b, m, w, levels), bundle.features, tasks, target_params
            )
            cfg = with_model(base, model_node(base, m, w, levels))
            r = log.get_or_run(
                {**key, "model": m, "width": w, "seed": seed}, lambda cfg=cfg, b=bundle: train_eval(cfg, b)
            )
            runs[m] = {**r, "width": w}
        if grouping is None:
            grouping = choose_grouping(base, bundle, tasks, steps, key, log)
        per_task: dict[str, dict[str, float]] = {}
        gparams = 0
        for group in grouping["networks"]:
            share = target_params * len(group) / len(tasks)
            w, n = match_width(
                lambda w, b=base: model_node(b, "shared_bottom", w, levels), bundle.features, group, share
            )
            cfg = with_model(base, model_node(base, "shared_bottom", w, levels), group)
            r = log.get_or_run({**key, "model": "grouping", "group": group, "width": w, "seed": seed},
                               lambda cfg=cfg, b=bundle: train_eval(cfg, b))  # fmt: skip
            gparams += r["params"]
            for t in group:
                if grouping["served"][t] == group:
                    per_task[t] = r["test"][t]
        runs["grouping"] = {"test": per_task, "params": gparams, "networks": grouping["networks"]}
        for m in MODELS:
            results.append({"dataset": name, "model": m, "seed": seed,
                            "test_metric": metric_of(runs[m]["test"], spec["metric"], tasks),
                            "higher_is_better": higher, "metric": spec["metric"],
                            "params_outside_inputs": runs[m]["params"]})  # fmt: skip
        print(f"[{name}] seed {seed}: " + ", ".join(f"{r['model']}={r['test_metric']:.4f}" for r in results[-5:]),
              flush=True)  # fmt: skip
    # how the shared weights rank the final candidates against their stand-alone validation metric
    by_key = {e["key"]: e for e in exhaustive}
    rewards = [c["reward"] for c in search["candidates"]]
    alone = [by_key[c["key"]]["val"] * (1 if higher else -1) for c in search["candidates"]]
    exhaustive_steps = sum(e["steps"] for e in exhaustive)
    exhaustive_seconds = sum(e["seconds"] for e in exhaustive)
    found = exhaustive[0]["key"] == search["key"]
    cost = {"dataset": name, "search_steps": search["search_steps"], "exhaustive_steps": exhaustive_steps,
            "found_exhaustive_best": found, "search_seconds": search["seconds"],
            "exhaustive_seconds": round(exhaustive_seconds, 3), "candidates": len(exhaustive),
            "search_rank_in_exhaustive_by_val": rank, "searched": search["key"],
            "exhaustive_best": exhaustive[0]["key"],
            "step_ratio": round(exhaustive_steps / search["search_steps"], 2),
            "final_candidates": len(rewards), "candidates_spearman_reward_vs_standalone_val": spearman(rewards, alone),
            "wall_ratio": round(exhaustive_seconds / max(search["seconds"], 1e-9), 2)}  # fmt: skip
    unrelated = None
    if "unrelated" in tasks:
        unrelated = own_experts(searched_arch, "unrelated", levels)
    return {"results": results, "cost": cost, "search": search, "exhaustive": exhaustive, "grouping": grouping,
            "unrelated_own_experts": unrelated, "tasks": tasks}  # fmt: skip


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (no ties expected); ``None`` below 3 points."""
    n = len(a)
    if n < 3:
        return None

    def ranks(v: list[float]) -> list[int]:
        order = sorted(range(n), key=lambda i: v[i])
        out = [0] * n
        for r, i in enumerate(order):
            out[i] = r
        return out

    ra, rb = ranks(a), ranks(b)
    return round(1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1)), 4)


def own_experts(arch: dict[str, tuple], task: str, levels: int) -> bool:
    """Whether the shared experts ``task`` reads at every level are read by no other task (own experts count)."""
    for lv in range(levels):
        mine = arch[task][lv]
        if mine == "own":
            continue
        others = {e for t, ch in arch.items() if t != task and ch[lv] != "own" for e in ch[lv]}
        if set(mine) & others:
            return False
    return True


def choose_grouping(base: Any, bundle: Any, tasks: list[str], steps: int, key: dict, log: RunLog) -> dict[str, Any]:
    """The task-grouping choice: TAG (one joint Shared-Bottom run measuring lookahead affinity) at a budget of 2."""
    from omegaconf import OmegaConf

    from mtl.grouping import group_tasks, grouping_config
    from mtrec.grouping import RecMeasurer

    def fn() -> dict:
        gcfg = grouping_config(OmegaConf.create({"method": "tag", "budget": 2.0, "fraction": 1.0, "tag": {"every": 5}}))
        cfg = with_model(base, model_node(base, "shared_bottom", 32, 1))
        with tempfile.TemporaryDirectory(prefix="search_group_") as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = group_tasks(tasks, RecMeasurer(cfg, bundle, gcfg, d), gcfg)
        return {"networks": [list(n["tasks"]) for n in r["networks"]], "served": r["served"],
                "seconds": r.get("seconds")}  # fmt: skip

    return log.get_or_run({**key, "grouping": "tag", "budget": 2.0}, fn)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in results}, key=[r["dataset"] for r in results].index)
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.4 * len(datasets), 3.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        rows = [r for r in results if r["dataset"] == ds]
        means, stds = [], []
        for m in MODELS:
            vals = [r["test_metric"] for r in rows if r["model"] == m]
            mu, sd = mean_std(vals)
            means.append(mu)
            stds.append(sd)
        colors = ["tab:red" if m == "searched" else "tab:gray" for m in MODELS]
        ax.bar(range(len(MODELS)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(MODELS)), MODELS, rotation=35, fontsize=7)
        lo, hi = min(means) - 2 * max(stds + [1e-4]), max(means) + 2 * max(stds + [1e-4])
        if not rows[0]["higher_is_better"]:
            lo = max(lo, 0.0)  # losses and MSEs are >= 0
        ax.set_ylim(lo, hi)
        better = "higher" if rows[0]["higher_is_better"] else "lower"
        ax.set_title(f"{ds}: test {rows[0]['metric']} ({better} is better)", fontsize=8)
    fig.suptitle("mtlib-search: retrained searched child vs fixed architectures (mean +- std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path.relative_to(REPO)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 100-step budgets, 16-candidate spaces")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0 .. n-1 of the comparison (default 3, quick 1)")
    ap.add_argument("--datasets", nargs="+", default=None, help="mmoe_p0.5 mmoe_p0.9 census four_task")
    ap.add_argument("--expert-width", type=int, default=16)
    ap.add_argument("--supernet-factor", type=float, default=2.0, help="supernet steps / one child's step budget")
    ap.add_argument("--warmup-epochs", type=int, default=3, help="search epochs before the controller learns")
    ap.add_argument("--temperature", type=float, default=5.0, help="controller temperature (ENAS micro: 5)")
    ap.add_argument("--tanh-constant", type=float, default=1.1, help="controller tanh constant (ENAS micro: 1.1)")
    ap.add_argument("--output", default=None, help="file name under benchmarks/results/")
    ap.add_argument("--fresh", action="store_true", help="train everything again, ignoring the runs log")
    args = ap.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 3)
    suffix = "_quick" if args.quick else ""
    log = RunLog(RESULTS / f"search_runs{suffix}.jsonl", args.fresh)
    specs = dataset_specs(args)
    names = args.datasets or list(specs)
    started = time.perf_counter()
    out: dict[str, Any] = {"results": [], "cost": [], "datasets": {}, "skipped": {}}
    for name in names:
        if name == "census" and not CENSUS_FILE.is_file() and not os.environ.get("MTLIB_DATA_DIR"):
            out["skipped"][name] = f"{CENSUS_FILE} not found"
            print(f"[census] skipped: {CENSUS_FILE} not found")
            continue
        d = run_dataset(name, specs[name], args, log)
        out["results"] += d["results"]
        out["cost"].append(d["cost"])
        out["datasets"][name] = {k: d[k] for k in ("search", "exhaustive", "grouping", "unrelated_own_experts",
                                                    "tasks")}  # fmt: skip
    # ---- targets
    checks: dict[str, Any] = {"within_noise": {}, "cheaper_20x": {}, "unrelated_own_experts": None}
    rows = []
    for name in out["datasets"]:
        res = [r for r in out["results"] if r["dataset"] == name]
        higher = res[0]["higher_is_better"]
        stats = {m: mean_std([r["test_metric"] for r in res if r["model"] == m]) for m in MODELS}
        fixed = {m: s for m, s in stats.items() if m != "searched"}
        best = max(fixed, key=lambda m: fixed[m][0]) if higher else min(fixed, key=lambda m: fixed[m][0])
        gap = (stats["searched"][0] - fixed[best][0]) * (1 if higher else -1)  # > 0: the search is better
        pooled = math.sqrt((stats["searched"][1] ** 2 + fixed[best][1] ** 2) / 2)
        met = gap >= 0 or -gap <= pooled
        by_seed = {(r["model"], r["seed"]): r["test_metric"] for r in res}
        paired = [(by_seed[("searched", s)] - by_seed[(best, s)]) * (1 if higher else -1) for s in range(args.seeds)]
        checks["within_noise"][name] = {"best_fixed": best, "searched_mean": stats["searched"][0],
                                        "best_fixed_mean": fixed[best][0], "gap_in_favour_of_search": gap,
                                        "pooled_std": pooled, "met": met,
                                        "paired_gap_per_seed": paired,
                                        "single_seed_no_noise_estimate": args.seeds < 2}  # fmt: skip
        for m in MODELS:
            rows.append([name, m, stats[m][0], stats[m][1],
                         statistics.fmean(r["params_outside_inputs"] for r in res if r["model"] == m)])  # fmt: skip
    for c in out["cost"]:
        checks["cheaper_20x"][c["dataset"]] = {"step_ratio": c["step_ratio"], "met": c["step_ratio"] >= 20}
    if "four_task" in out["datasets"]:
        checks["unrelated_own_experts"] = {"architecture": out["datasets"]["four_task"]["search"]["architecture"],
                                           "met": out["datasets"]["four_task"]["unrelated_own_experts"]}  # fmt: skip
    targets = {
        "searched_within_noise_of_best_fixed_on_every_dataset": all(v["met"] for v in checks["within_noise"].values()),
        "search_at_least_20x_cheaper_than_exhaustive": all(v["met"] for v in checks["cheaper_20x"].values()),
        "unrelated_task_gets_its_own_experts": (checks["unrelated_own_experts"] or {}).get("met"),
    }
    print(table(["dataset", "model", "test metric mean", "std", "params outside inputs"], rows))
    print(table(["dataset", "search steps", "exhaustive steps", "ratio", "search s", "exhaustive s", "found best",
                 "rank (val)", "rho final", "searched", "exhaustive best"],
                [[c["dataset"], c["search_steps"], c["exhaustive_steps"], c["step_ratio"], c["search_seconds"],
                  c["exhaustive_seconds"], c["found_exhaustive_best"], c["search_rank_in_exhaustive_by_val"],
                  c["candidates_spearman_reward_vs_standalone_val"], c["searched"], c["exhaustive_best"]]
                 for c in out["cost"]]))  # fmt: skip
    for k, v in targets.items():
        print(f"target {k}: {'met' if v else 'NOT met' if v is not None else 'not measured'}")
    out.update(
        {
            "settings": {
                "quick": args.quick,
                "seeds": args.seeds,
                "expert_width": args.expert_width,
                "specs": {k: v for k, v in specs.items() if k in names},
                "choices": choices(args),
                "search": f"10 epochs ({args.warmup_epochs} warm-up epochs without controller updates), supernet "
                f"steps = {args.supernet_factor} x the child budget, 15 controller steps/epoch, controller "
                f"temperature {args.temperature}, tanh constant {args.tanh_constant}, 8+1 final candidates on 8 "
                "validation batches; reward loss (census: auc)",
                "baselines": "widths matched to the searched child's parameters outside the input arch; MMoE 4 "
                "experts, PLE 2 levels 2 shared + 1 own, grouping: TAG budget 2 with Shared-Bottom networks",
                "machine_note": "2 CPU cores shared with other engineers' work running at the same time; one torch "
                "thread per training; wall times are noisy",
                "wall_seconds": round(time.perf_counter() - started, 1),
                "reused_trainings": log.reused,
                "seconds_of_all_trainings_when_run": round(log.seconds, 1),
            },
            "checks": checks,
            "targets": targets,
        }
    )
    name = args.output or f"search{suffix}.json"
    write_json(name, out)
    if out["results"]:
        plot(out["results"], RESULTS / name.replace(".json", ".png"))


if __name__ == "__main__":
    main()
