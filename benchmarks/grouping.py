"""Task grouping on a four-task synthetic log: the chosen grouping vs all-in-one vs all-separate.

    python benchmarks/grouping.py --quick     # 3 seeds, 60k rows, 3000-step budget (< 10 min on 2 cores)
    python benchmarks/grouping.py             # 5 seeds, 200k rows, 6000-step budget
    python benchmarks/grouping.py --seeds 1 --budgets 2

Data: the sparse synthetic log (tasks click, conversion, dwell) plus a deliberately unrelated binary task
(``mtrec.grouping.load_sparse_synthetic_unrelated``: labels from ``1.5 * d0 * d1 + e[category]`` with its own
random draws). Every network is a Shared-Bottom (``--bottom`` units, Adam 1e-3, batch 256, early stopping on
the validation loss with patience 3 epochs) trained through ``mtrec.train.run``.

For each seed (its own data and initialisation):

1. **Scoring** (``--fraction`` of the full step budget, Standley et al.'s early-stopping approximation): every
   single task and pair, plus every task alone in a half-size network (widths x0.5); one joint run of all
   tasks measuring TAG's lookahead affinity every ``--tag-every`` steps (Fifty et al. 2021).
2. **Selection** at each budget (``--budgets``, in full networks) with branch and bound, from the candidates of
   ``pairs`` (singles and pairs), ``higher_order`` (every group, 3+ from pairs), ``higher_order+half`` (plus
   half-size single-task networks of cost 0.5) and ``tag`` (every group scored by affinity).
3. **Evaluation**: every full-size group (15 for four tasks) and every half-size single-task network is
   trained on the full budget; an alternative's total loss is the sum over tasks of the validation / test
   loss (BCE for click, conversion, unrelated; MSE for dwell) of the network that serves the task. Baselines:
   all-in-one (cost 1), all-separate (cost 4), all-separate half-size (cost 2), and the *oracle* at each
   budget: branch and bound on the full-budget validation losses of every network (the best choice the
   candidates allow, picked on validation), against which each method's test regret is reported.

Every finished training is appended to a JSON-lines log (``benchmarks/results/grouping_runs[_quick].jsonl``)
with its settings; a later invocation with the same settings reuses it, so an interrupted run resumes
(``--fresh`` ignores the log). Each training runs in one torch thread. Writes
benchmarks/results/grouping.json (``--output``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import REPO, RESULTS, RunLog, compose, mean_std, table, write_json  # noqa: E402

TASKS = ("click", "conversion", "dwell", "unrelated")
METHODS = ("pairs", "higher_order", "higher_order+half", "tag")


def overrides(args: argparse.Namespace, seed: int) -> list[str]:
    return [
        "data._target_=mtrec.grouping.load_sparse_synthetic_unrelated",
        f"data.n_rows={args.n_rows}",
        f"data.num_users={args.num_users}",
        f"data.num_items={args.num_items}",
        f"data.num_categories={args.num_categories}",
        "model=shared_bottom",
        f"model.bottom_dims=[{args.bottom}]",
        "trainer.batch_size=256",
        f"trainer.max_steps={args.max_steps}",
        "trainer.max_epochs=1000",
        "trainer.patience=3",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.num_threads=1",
        f"seed={seed}",
    ]


def network(cfg: Any, tasks: tuple[str, ...], steps: int, width: float | None, key: dict, log: RunLog) -> dict:
    """Per-task val/test losses of one network (trained once per settings; see RunLog)."""
    from mtrec.grouping import train_network

    def fn() -> dict:
        with tempfile.TemporaryDirectory(prefix="grouping_") as d:
            r = train_network(cfg, tasks, steps, d, width)
            info = json.loads((Path(d) / "run_info.json").read_text())
        return {"val": r["val"], "test": r["test"], "seconds": r["seconds"], "run_info": info}

    return log.get_or_run({**key, "tasks": list(tasks), "steps": steps, "width": width}, fn)


def tag_run(cfg: Any, bundle: Any, steps: int, args: argparse.Namespace, key: dict, log: RunLog) -> dict:
    from mtrec.grouping import network_config, train_with_affinity

    def fn() -> dict:
        with tempfile.TemporaryDirectory(prefix="grouping_tag_") as d:
            r = train_with_affinity(network_config(cfg, TASKS, steps), bundle, d, args.tag_every, args.tag_lr)
        return {k: r[k] for k in ("affinity", "measurements", "lookahead_lr", "val", "test", "steps", "seconds")}

    return log.get_or_run({**key, "tag": True, "steps": steps, "every": args.tag_every, "lr": args.tag_lr}, fn)


def evaluate_choice(
    networks: list[tuple[tuple[str, ...], str]], served: dict[str, int], full: dict, halves: dict
) -> dict[str, Any]:
    """Actual full-budget losses of a choice: each task's loss in the network serving it."""
    from mtl.grouping import group_name

    per_task: dict[str, dict[str, float]] = {"val": {}, "test": {}}
    for t, i in served.items():
        tasks, kind = networks[i]
        r = halves[tasks[0]] if kind == "half" else full[tasks]
        for split in ("val", "test"):
            per_task[split][t] = r[split][t]
    return {
        "networks": [group_name(t, k) for t, k in networks],
        "cost": sum(0.5 if k == "half" else 1.0 for _, k in networks),
        "served": {t: group_name(*networks[i]) for t, i in served.items()},
        "val": per_task["val"],
        "test": per_task["test"],
        "val_total": sum(per_task["val"].values()),
        "test_total": sum(per_task["test"].values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, 60k rows, 3000-step budget")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds 0 .. n-1 (default 5, quick 3)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.5, 2.0, 3.0], help="budgets in full networks")
    ap.add_argument("--n-rows", type=int, default=None, help="rows of the synthetic log (default 200k, quick 60k)")
    ap.add_argument("--max-steps", type=int, default=None, help="full step budget (default 6000, quick 3000)")
    ap.add_argument("--fraction", type=float, default=0.2, help="scoring share of the full budget")
    ap.add_argument("--bottom", type=int, default=32, help="shared-bottom width (small: capacity is contested)")
    ap.add_argument("--half-width", type=float, default=0.5)
    ap.add_argument("--tag-every", type=int, default=5)
    ap.add_argument("--tag-lr", type=float, default=None, help="lookahead step (default: the optimiser's lr)")
    ap.add_argument("--output", default="grouping.json", help="file name under benchmarks/results/")
    ap.add_argument("--runs-log", default=None, help="JSON-lines log of finished trainings")
    ap.add_argument("--fresh", action="store_true", help="train everything again, ignoring the runs log")
    args = ap.parse_args()
    if os.path.basename(args.output) != args.output:
        ap.error("--output is a file name under benchmarks/results/, not a path")
    args.seeds = args.seeds or (3 if args.quick else 5)
    args.n_rows = args.n_rows or (60_000 if args.quick else 200_000)
    scale = args.n_rows / 60_000
    args.num_users, args.num_items, args.num_categories = int(3000 * scale), int(10_000 * scale), int(200 * scale)
    args.max_steps = args.max_steps or (3000 if args.quick else 6000)
    runs_path = (
        Path(args.runs_log) if args.runs_log else RESULTS / f"grouping_runs{'_quick' if args.quick else ''}.jsonl"
    )
    log = RunLog(runs_path, args.fresh)

    import torch
    from hydra.utils import instantiate

    from mtl.checkpoint import seed_everything
    from mtl.grouping import (
        Candidate,
        all_groups,
        branch_and_bound,
        group_name,
        loss_candidates,
        scoring_steps,
        tag_candidates,
    )

    torch.set_num_threads(1)
    steps = scoring_steps(args.max_steps, args.fraction)
    n_scoring = len(all_groups(TASKS, 2)) + len(TASKS)
    n_full = len(all_groups(TASKS)) + len(TASKS)
    print(
        f"{args.seeds} seeds x ({n_scoring} scoring networks of {steps} steps + 1 TAG run + {n_full} networks of up to "
        f"{args.max_steps} steps); {args.n_rows} rows, bottom {args.bottom}, budgets {args.budgets}",
        flush=True,
    )
    started = time.perf_counter()
    seeds_out: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        t_seed = time.perf_counter()
        cfg = compose(*overrides(args, seed))
        key = {"seed": seed, "overrides": overrides(args, seed)}
        seed_everything(seed)
        bundle = instantiate(cfg.data)
        # 1. scoring
        t0 = time.perf_counter()
        scoring = {g: network(cfg, g, steps, None, key, log) for g in all_groups(TASKS, 2)}
        scoring_half = {t: network(cfg, (t,), steps, args.half_width, key, log) for t in TASKS}
        scoring_seconds = sum(r["seconds"] for r in [*scoring.values(), *scoring_half.values()])
        tag = tag_run(cfg, bundle, steps, args, key, log)
        print(f"[seed {seed}] scoring done ({time.perf_counter() - t0:.0f}s)", flush=True)
        # 2. full-budget networks: every group and every half-size single
        full = {g: network(cfg, g, args.max_steps, None, key, log) for g in all_groups(TASKS)}
        halves = {t: network(cfg, (t,), args.max_steps, args.half_width, key, log) for t in TASKS}
        print(f"[seed {seed}] full-budget networks done ({time.perf_counter() - t_seed:.0f}s)", flush=True)
        # 3. candidates and choices
        val = {g: r["val"] for g, r in scoring.items()}
        half_val = {t: r["val"][t] for t, r in scoring_half.items()}
        candidates = {
            "pairs": loss_candidates(TASKS, val, higher_order=False),
            "higher_order": loss_candidates(TASKS, val, higher_order=True),
            "higher_order+half": loss_candidates(TASKS, val, higher_order=True, half=half_val),
            "tag": tag_candidates(TASKS, tag["affinity"]),
        }
        oracle_full = [Candidate(g, full[g]["val"], 1.0, "full", "full-budget val") for g in all_groups(TASKS)]
        oracle_half = oracle_full + [
            Candidate((t,), {t: halves[t]["val"][t]}, 0.5, "half", "full-budget val") for t in TASKS
        ]
        choices: dict[str, dict[str, Any]] = {}
        for budget in args.budgets:
            for name, cands in [*candidates.items(), ("oracle", oracle_full), ("oracle+half", oracle_half)]:
                try:
                    sel = branch_and_bound(cands, TASKS, budget)
                except ValueError as err:  # budget below the cheapest cover of these candidates
                    choices[f"{name}@{budget:g}"] = {"error": str(err)}
                    continue
                nets = [(n.tasks, n.kind) for n in sel.networks]
                rec = evaluate_choice(nets, sel.served, full, halves)
                rec["predicted"] = sel.objective if name != "tag" else None
                rec["objective"] = sel.objective
                rec["budget"] = budget
                rec["method"] = name
                choices[f"{name}@{budget:g}"] = rec
        for name, nets in [
            ("all-in-one", [(TASKS, "full")]),
            ("all-separate", [((t,), "full") for t in TASKS]),
            ("all-separate-half", [((t,), "half") for t in TASKS]),
        ]:
            served = {t: (0 if len(nets) == 1 else i) for i, t in enumerate(TASKS)}
            choices[name] = {**evaluate_choice(nets, served, full, halves), "method": name, "budget": None}
        seeds_out.append(
            {
                "seed": seed,
                "scoring": {group_name(g): r for g, r in scoring.items()}
                | {group_name((t,), "half"): r for t, r in scoring_half.items()},
                "scoring_seconds": round(scoring_seconds, 2),
                "tag": tag,
                "full": {group_name(g): r for g, r in full.items()}
                | {group_name((t,), "half"): r for t, r in halves.items()},
                "choices": choices,
                "seconds": round(time.perf_counter() - t_seed, 1),
            }
        )
        best = {k: v for k, v in choices.items() if "error" not in v}
        print(
            f"[seed {seed}] "
            + ", ".join(f"{k}: {v['test_total']:.4f}" for k, v in best.items() if "@2" in k or "all" in k),
            flush=True,
        )
    elapsed = time.perf_counter() - started

    # ---- tables ----
    rows_keys = [f"{m}@{b:g}" for b in args.budgets for m in (*METHODS, "oracle", "oracle+half")]
    rows_keys += ["all-in-one", "all-separate-half", "all-separate"]
    headers = [
        "alternative",
        "cost",
        "networks (count over seeds)",
        "val total",
        "test total",
        "test vs all-in-one",
        "test regret vs oracle",
    ]
    rows = []
    summary: dict[str, dict[str, Any]] = {}
    for k in rows_keys:
        recs = [s["choices"][k] for s in seeds_out if k in s["choices"] and "error" not in s["choices"][k]]
        if not recs:
            if any(k in s["choices"] for s in seeds_out):  # every seed: budget below the cheapest cover
                rows.append([k, "—", "budget below the cheapest cover of these candidates", "—", "—", "", ""])
            continue
        vm, vs = mean_std([r["val_total"] for r in recs])
        tm, ts = mean_std([r["test_total"] for r in recs])
        regret = None
        if "@" in k:
            b = k.split("@")[1]
            oracle_key = f"oracle+half@{b}" if "half" in k else f"oracle@{b}"
            regrets = [
                s["choices"][k]["test_total"] - s["choices"][oracle_key]["test_total"]
                for s in seeds_out
                if k in s["choices"] and "error" not in s["choices"][k] and "error" not in s["choices"][oracle_key]
            ]
            regret = mean_std(regrets)
        # paired over seeds: each seed has its own data, so differences are tighter than the totals' spread
        vs_one = mean_std(
            [
                s["choices"][k]["test_total"] - s["choices"]["all-in-one"]["test_total"]
                for s in seeds_out
                if k in s["choices"] and "error" not in s["choices"][k]
            ]
        )
        groupings = Counter(" | ".join(r["networks"]) for r in recs)
        cost = mean_std([r["cost"] for r in recs])[0]
        summary[k] = {
            "cost_mean": cost,
            "val_total": [vm, vs],
            "test_total": [tm, ts],
            "test_vs_all_in_one": list(vs_one),
            "test_regret": list(regret) if regret else None,
            "groupings": dict(groupings),
            "seeds": len(recs),
        }
        rows.append(
            [
                k,
                f"{cost:g}",
                "; ".join(f"{g} (x{c})" for g, c in groupings.most_common()),
                f"{vm:.4f} ± {vs:.4f}",
                f"{tm:.4f} ± {ts:.4f}",
                f"{vs_one[0]:+.4f} ± {vs_one[1]:.4f}" if k != "all-in-one" else "",
                f"{regret[0]:+.4f} ± {regret[1]:.4f}" if regret else "",
            ]
        )
    n = len(seeds_out)
    print(
        f"\nTotal loss over the 4 tasks (sum of each task's loss in its serving network, full budget of "
        f"{args.max_steps} steps; mean ± std over {n} seed{'s' if n != 1 else ''}, differences paired by seed; "
        f"scoring at {args.fraction:g} of the budget; lower is better):\n"
    )
    totals_table = table(headers, rows)
    print(totals_table)
    z = seeds_out[0]["tag"]["affinity"]
    print("\nTAG lookahead affinity Z[i -> j] of seed 0 (rows: source i; x 1e6):\n")
    affinity_table = table(["i \\ j", *TASKS], [[i, *(f"{1e6 * z[i][j]:+.2f}" for j in TASKS)] for i in TASKS])
    print(affinity_table)
    scoring_s = mean_std([s["scoring_seconds"] for s in seeds_out])[0]
    tag_s = mean_std([s["tag"]["seconds"] for s in seeds_out])[0]
    print(
        f"\nscoring cost per seed: {n_scoring} networks in {scoring_s:.1f}s (pairs/higher-order/half) vs one TAG run "
        f"in {tag_s:.1f}s"
    )
    training_seconds = sum(
        r["seconds"] for s in seeds_out for r in [*s["scoring"].values(), *s["full"].values(), s["tag"]]
    )
    print(
        f"took {elapsed / 60:.1f} min ({log.reused} trainings reused from {runs_path.name}; the trainings themselves "
        f"took {training_seconds / 60:.1f} min when they ran)"
    )
    settings = {
        "quick": args.quick,
        "seeds": list(range(args.seeds)),
        "tasks": list(TASKS),
        "budgets": args.budgets,
        "n_rows": args.n_rows,
        "num_users": args.num_users,
        "num_items": args.num_items,
        "num_categories": args.num_categories,
        "model": f"shared_bottom bottom_dims=[{args.bottom}] (half-size: widths x{args.half_width})",
        "full_steps": args.max_steps,
        "scoring_steps": steps,
        "fraction": args.fraction,
        "tag_every": args.tag_every,
        "tag_lr": args.tag_lr,
        "overrides_seed0": overrides(args, 0),
        "losses": "click, conversion, unrelated: BCE; dwell: MSE; totals are sums over the four tasks",
        "elapsed_s": round(elapsed, 1),
        "training_seconds": round(training_seconds, 1),
        "reused_trainings": log.reused,
        "runs_log": str(runs_path.relative_to(REPO)) if runs_path.is_relative_to(REPO) else str(runs_path),
    }
    write_json(
        args.output,
        {
            "settings": settings,
            "table": totals_table,
            "tag_affinity_seed0_x1e6": affinity_table,
            "summary": summary,
            "seeds": seeds_out,
        },
    )


if __name__ == "__main__":
    main()
