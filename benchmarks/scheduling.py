"""Schedulers that learn which tasks to train: how far each moves the task distribution, and what that does.

    python benchmarks/scheduling.py --quick     # 2 processes; 12 min on the 2-core dev machine while other jobs ran
    python benchmarks/scheduling.py             # more seeds and steps
    python benchmarks/scheduling.py --parts rec --seeds 1

Three parts (``--parts``):

``sim``: controlled. Three tasks whose losses fall by 0.2% (task ``a``) or 0.05% each time they are trained,
so relative progress is about 1e-3 per step, observed with relative noise 0 to 10%; ``bandit`` with the old fixed
reward ``(progress + 1) / 2`` against Graves et al.'s quantile rescaling (``mtl.scheduling.Exp3Bandit``). Reports
p(a) after every step (mean over seeds). Milliseconds per run.

``rec``: recommendation, ``mtrec.train.build_training`` (what ``mtrec-train`` builds) on ``data=synthetic``
(tasks click, conversion, dwell; every batch carries every label, so a scheduler picks which losses count),
MMoE, batch 256, a fixed number of steps, schedules ``all``, ``random`` (one task per step), ``bandit`` with the
fixed reward, ``bandit`` rescaled, and rescaled with ``loss_smoothing=0.9`` (progress measured on an average of
each task's batch losses: a batch loss here moves by about 30% from one batch to the next). Reports the task
distribution over the steps (normalised entropy: 1 = uniform; the largest probability; the total-variation
distance from uniform) and each task's validation metric of the final model (AUC for click and conversion, MSE
for dwell).

``rl``: ``mtrl.train.run`` (``mtrl-train env=pointmass agent=mt_sac``, the settings of benchmarks/rl_pointmass.py)
with ``schedule=all`` and, each counting 2 of the 4 tasks per update, ``schedule=random`` (the control for
counting fewer rows per update), ``schedule=progress`` (absolute learning progress) and ``schedule=progress
schedule.signal=success``. The
trainer feeds the training episodes' success to ``observe_outcomes``; the scheduler's clock is the update count.
Reports the same distribution statistics and the final evaluation success per task.

The distribution at each step is ``scheduler.probabilities(step)`` when the trainer selects that step's tasks,
recorded by wrapping ``TaskScheduler.select`` in the worker process (the trainers are not changed). Each run is
one process with one torch thread (``--workers`` at a time). Writes ``benchmarks/results/scheduling.json`` and
``scheduling.png``.
"""

from __future__ import annotations

import os

# One thread per training run: set before torch is imported so its intra-op pools start at one thread.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import RESULTS, compose, mean_std, table, write_json  # noqa: E402

SIM_TASKS = ["a", "b", "c"]
SIM_RATES = {"a": 2e-3, "b": 5e-4, "c": 5e-4}  # loss falls by this fraction each time the task is trained
SIM_NOISE = [0.0, 1e-3, 1e-2, 1e-1]

REC_SCHEDULES: dict[str, list[str]] = {
    "all": ["schedule=all"],
    "random": ["schedule=random"],
    "bandit (fixed reward)": ["schedule=bandit", "schedule.reward_scaling=fixed"],
    "bandit (rescaled)": ["schedule=bandit"],
    "bandit (rescaled, smoothed)": ["schedule=bandit", "schedule.loss_smoothing=0.9"],
}
REC_SETTINGS = [
    "data=synthetic",
    "model=mmoe",
    "trainer.batch_size=256",
    "trainer.max_epochs=100000",
    "trainer.patience=100000",  # no early stopping: every schedule trains the same number of steps
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.num_threads=1",
    "trainer.log_every_steps=100000",
]
REC_METRICS = {"click": "auc", "conversion": "auc", "dwell": "mse"}

RL_PER_UPDATE = 2  # tasks counted per SAC update by the sampling schedules (of 4)
RL_SCHEDULES: dict[str, list[str]] = {
    "all": ["schedule=all"],
    "random": ["schedule=random", f"schedule.tasks_per_step={RL_PER_UPDATE}"],
    "progress": ["schedule=progress", f"schedule.tasks_per_step={RL_PER_UPDATE}"],
    "progress (success)": ["schedule=progress", "schedule.signal=success", f"schedule.tasks_per_step={RL_PER_UPDATE}"],
}
RL_AGENT = "mt_sac"

TRACE_POINTS = 200  # trajectory points kept per run in the JSON


# ------------------------------------------------------------------------------------------------- recording


def record_selections() -> list[tuple[int, list[float], list[str]]]:
    """Wrap ``TaskScheduler.select`` in this process: each step's ``(step, probabilities, selected)`` is appended
    to the returned list the first time that step's tasks are selected."""
    from mtl.scheduling import TaskScheduler

    trace: list[tuple[int, list[float], list[str]]] = []
    original = TaskScheduler.select

    def select(self: Any, step: int) -> list[str]:
        out = original(self, step)
        if not trace or trace[-1][0] != step:
            trace.append((int(step), list(self.probabilities(step).values()), list(out)))
        return out

    TaskScheduler.select = select  # type: ignore[method-assign]
    return trace


def distribution_stats(trace: list[tuple[int, list[float], list[str]]], tasks: list[str]) -> dict[str, Any]:
    """Normalised entropy, largest probability and total-variation distance from uniform of each recorded
    distribution (means over all steps and over the second half), the final distribution and how often each
    task was selected; plus a thinned trajectory."""
    k = len(tasks)

    def entropy(p: list[float]) -> float:
        return -sum(x * math.log(x) for x in p if x > 0) / math.log(k)

    def tv(p: list[float]) -> float:
        return 0.5 * sum(abs(x - 1 / k) for x in p)

    if not trace:
        return {"steps": 0}
    probs = [p for _, p, _ in trace]
    half = probs[len(probs) // 2 :]
    counts = Counter(t for _, _, sel in trace for t in sel)
    stride = max(1, len(trace) // TRACE_POINTS)
    return {
        "steps": len(trace),
        "entropy_mean": sum(map(entropy, probs)) / len(probs),
        "entropy_second_half": sum(map(entropy, half)) / len(half),
        "max_prob_mean": sum(map(max, probs)) / len(probs),
        "max_prob_second_half": sum(map(max, half)) / len(half),
        "tv_from_uniform_mean": sum(map(tv, probs)) / len(probs),
        "final": dict(zip(tasks, probs[-1])),
        "selected_share": {t: counts[t] / len(trace) for t in tasks},
        "trajectory": {
            "step": [s for s, _, _ in trace[::stride]],
            "probs": [[round(x, 5) for x in p] for _, p, _ in trace[::stride]],
        },
    }


# ------------------------------------------------------------------------------------------------- parts


def sim_one(scaling: str, seed: int, steps: int, noise: float) -> list[float]:
    """p(a) after each step of the controlled problem (see the module docstring)."""
    import numpy as np

    from mtl.scheduling import Exp3Bandit

    s = Exp3Bandit(SIM_TASKS, seed=seed, reward_scaling=scaling)
    loss = dict.fromkeys(SIM_TASKS, 1.0)
    rng = np.random.default_rng([seed, 17])
    out = []
    for step in range(steps):
        (task,) = s.select(step)
        s.observe(step, {task: loss[task] * (1.0 + noise * float(rng.standard_normal()))})
        loss[task] *= 1.0 - SIM_RATES[task]
        out.append(s.probabilities(step + 1)["a"])
    return out


def rec_one(job: tuple[str, int, int, int]) -> dict[str, Any]:
    """One recommendation run (own process): the distribution statistics and the final validation metrics."""
    name, seed, steps, n_rows = job
    import torch

    torch.set_num_threads(1)
    trace = record_selections()
    from hydra.utils import instantiate

    from mtrec.train import build_training
    from mtrec.trainer import evaluate

    cfg = compose(
        *REC_SETTINGS, f"data.n_rows={n_rows}", f"trainer.max_steps={steps}", f"seed={seed}", *REC_SCHEDULES[name]
    )
    t0 = time.perf_counter()
    bundle = instantiate(cfg.data)
    with tempfile.TemporaryDirectory(prefix="scheduling_rec_") as d:
        training = build_training(cfg, d, bundle)
        trainer = training.trainer
        trainer.fit(training.train, bundle.val)
        val = evaluate(trainer.model, bundle.val, training.tasks, trainer.cfg.eval_batch_size, trainer.device)
    tasks = [t.name for t in training.tasks]
    return {
        "part": "rec",
        "schedule": name,
        "overrides": REC_SCHEDULES[name],
        "seed": seed,
        "steps": trainer.step,
        "seconds": round(time.perf_counter() - t0, 1),
        "val": {t: {m: float(v) for m, v in val[t].items()} for t in tasks},
        "distribution": distribution_stats(trace, tasks),
    }


def rl_one(job: tuple[str, int, int, int]) -> dict[str, Any]:
    """One point-mass run (own process): the distribution statistics, final success and the evaluation curve."""
    name, seed, steps, eval_interval = job
    import torch

    torch.set_num_threads(1)
    trace = record_selections()
    from rl_pointmass import SETTINGS, compose_mtrl

    from mtrl.train import run

    cfg = compose_mtrl(
        "env=pointmass",
        f"agent={RL_AGENT}",
        f"seed={seed}",
        f"trainer.total_steps={steps}",
        f"trainer.eval_interval={eval_interval}",
        *SETTINGS,
        *RL_SCHEDULES[name],
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scheduling_rl_") as d:
        result = run(cfg, d)
        log = [json.loads(line) for line in (Path(d) / "train_log.jsonl").read_text().splitlines()]
    tasks = list(result["tasks"])
    return {
        "part": "rl",
        "schedule": name,
        "overrides": RL_SCHEDULES[name],
        "seed": seed,
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "success": float(result["mean_success"]),
        "tasks": {t: float(r["success"]) for t, r in result["tasks"].items()},
        "curve": [(r["step"], r["eval/mean_success"]) for r in log if "eval/mean_success" in r],
        "distribution": distribution_stats(trace, tasks),
    }


def work(job: tuple[str, tuple[Any, ...]]) -> dict[str, Any]:
    part, args = job
    try:
        return rec_one(args) if part == "rec" else rl_one(args)  # type: ignore[arg-type]
    except Exception as exc:  # one failed run must not end the benchmark
        return {"part": part, "schedule": args[0], "seed": args[1], "error": f"{type(exc).__name__}: {exc}"[:2000]}


def rl_schedule_wired() -> str | None:
    """``None`` when ``mtrl-train`` takes ``schedule=...``, else why not."""
    try:
        from rl_pointmass import compose_mtrl

        cfg = compose_mtrl("env=pointmass", "schedule=progress")
    except Exception as exc:
        return f"mtrl-train does not take schedule=progress: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    if cfg.get("schedule") is None:
        return "configs/mtrl.yaml has no schedule group"
    return None


# ------------------------------------------------------------------------------------------------- report


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def dist_row(runs: list[dict[str, Any]]) -> list[str]:
    d = [r["distribution"] for r in runs if r.get("distribution", {}).get("steps")]
    return [
        fmt([x["entropy_mean"] for x in d]),
        fmt([x["entropy_second_half"] for x in d]),
        fmt([x["max_prob_mean"] for x in d]),
        fmt([x["tv_from_uniform_mean"] for x in d]),
    ]


def shares(runs: list[dict[str, Any]], tasks: list[str]) -> str:
    """Each seed's selection shares, e.g. '0.21/0.18/0.61; 0.50/0.25/0.25'."""
    return "; ".join("/".join(f"{r['distribution']['selected_share'][t]:.2f}" for t in tasks) for r in runs)


def plot(sim: dict[str, Any], rec: list[dict[str, Any]], rl: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    for noise, curves in sim["p_fast_task"].items():
        for scaling, style in (("quantile", "-"), ("fixed", "--")):
            mean = np.mean(curves[scaling], axis=0)
            ax.plot(np.arange(1, len(mean) + 1), mean, style, label=f"{scaling}, noise {noise}")
    ax.axhline(1 / 3, color="grey", linestyle=":", linewidth=1)
    ax.set_title("sim: bandit p(fast task), 1e-3 progress per step (mean over seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("p(task a)")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[0, 1]
    for name in REC_SCHEDULES:
        for i, r in enumerate(r for r in rec if r["schedule"] == name and "distribution" in r):
            traj = r["distribution"]["trajectory"]
            style = "-" if i == 0 else ":"
            color = f"C{list(REC_SCHEDULES).index(name)}"
            ax.plot(traj["step"], [max(p) for p in traj["probs"]], style, color=color, label=name if i == 0 else None)
    ax.set_title("rec (mtrec synthetic): largest task probability (seed 0 solid)")
    ax.set_xlabel("training step")
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for name in ("progress", "progress (success)"):
        runs = [r for r in rl if r["schedule"] == name and "distribution" in r]
        if not runs:
            continue
        traj = runs[0]["distribution"]["trajectory"]
        probs = np.array(traj["probs"])
        style = "-" if name == "progress" else "--"
        for j in range(probs.shape[1]):
            ax.plot(traj["step"], probs[:, j], style, color=f"C{j}", label=f"{name}: task {j}")
    ax.set_title(f"rl (point-mass): task probabilities, seed {rl[0]['seed'] if rl else 0}")
    ax.set_xlabel("SAC update")
    ax.set_ylabel("p(task)")
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=7, ncol=2)

    ax = axes[1, 1]
    for name in RL_SCHEDULES:
        runs = [r for r in rl if r["schedule"] == name and "curve" in r]
        if not runs:
            continue
        steps = [s for s, _ in runs[0]["curve"]]
        mean = np.mean([[v for _, v in r["curve"]] for r in runs], axis=0)
        ax.plot(steps, mean, label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    ax.set_title("rl (point-mass): evaluation success")
    ax.set_xlabel("environment step (per env)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path.relative_to(RESULTS.parents[1])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the committed run: 2 seeds rec, 1 seed rl, short runs")
    ap.add_argument("--parts", nargs="+", choices=["sim", "rec", "rl"], default=["sim", "rec", "rl"])
    ap.add_argument("--seeds", type=int, default=None, help="rec seeds (default 2 quick, 3 full)")
    ap.add_argument("--rl-seeds", type=int, default=None, help="rl seeds (default 1 quick, 3 full)")
    ap.add_argument("--rec-steps", type=int, default=None, help="rec training steps (default 800 quick, 3000)")
    ap.add_argument("--rec-rows", type=int, default=None, help="rows of data=synthetic (default 30000 quick, 200000)")
    ap.add_argument("--rl-steps", type=int, default=None, help="rl pool steps (default 2500 quick, 5000)")
    ap.add_argument("--workers", type=int, default=2, help="parallel training processes (one thread each)")
    ap.add_argument("--output", default="scheduling", help="stem of the JSON/PNG under benchmarks/results")
    args = ap.parse_args()
    seeds = args.seeds or (2 if args.quick else 3)
    rl_seeds = args.rl_seeds or (1 if args.quick else 3)
    rec_steps = args.rec_steps or (800 if args.quick else 3000)
    rec_rows = args.rec_rows or (30_000 if args.quick else 200_000)
    rl_steps = args.rl_steps or (2500 if args.quick else 5000)
    sim_steps, sim_seeds = (600, 10) if args.quick else (2000, 20)

    from tqdm import tqdm

    started = time.perf_counter()
    payload: dict[str, Any] = {"benchmark": "scheduling", "mode": "quick" if args.quick else "full"}

    # ---- sim: milliseconds per run, in this process
    sim: dict[str, Any] = {}
    if "sim" in args.parts:
        curves: dict[str, dict[str, list[list[float]]]] = {}
        jobs = [(n, sc, s) for n in SIM_NOISE for sc in ("quantile", "fixed") for s in range(sim_seeds)]
        for noise, scaling, seed in tqdm(jobs, desc="sim", dynamic_ncols=True):
            curves.setdefault(str(noise), {}).setdefault(scaling, []).append(sim_one(scaling, seed, sim_steps, noise))
        sim = {"steps": sim_steps, "seeds": sim_seeds, "rates": SIM_RATES, "p_fast_task": curves}
        rows = []
        for noise, by in curves.items():
            for scaling, runs in by.items():
                at = [min(100, sim_steps) - 1, min(300, sim_steps) - 1, sim_steps - 1]
                rows.append([noise, scaling, *(fmt([c[i] for c in runs]) for i in at)])
        print(f"\nsim: bandit p(task a), uniform 0.333, ceiling 0.933 ({sim_seeds} seeds, mean ± sd):\n")
        print(table(["noise", "reward", "step 100", "step 300", f"step {sim_steps}"], rows))
        sim["table"] = rows

    # ---- rec and rl: training runs in worker processes
    jobs: list[tuple[str, tuple[Any, ...]]] = []
    rl_missing = rl_schedule_wired() if "rl" in args.parts else None
    if "rl" in args.parts and rl_missing is None:
        eval_interval = max(rl_steps // 10, 1)
        jobs += [("rl", (name, s, rl_steps, eval_interval)) for s in range(rl_seeds) for name in RL_SCHEDULES]
    if "rec" in args.parts:
        jobs += [("rec", (name, s, rec_steps, rec_rows)) for s in range(seeds) for name in REC_SCHEDULES]
    if rl_missing:
        print(f"\nrl part skipped: {rl_missing}")
    results: list[dict[str, Any]] = []
    if jobs:
        ctx = mp.get_context("spawn")  # fresh interpreters: the select wrapper stays in the worker
        with ctx.Pool(args.workers, maxtasksperchild=1) as pool:
            bar = tqdm(total=len(jobs), desc="runs", dynamic_ncols=True)
            for r in pool.imap_unordered(work, jobs):
                results.append(r)
                bar.update(1)
                msg = r.get("error") or (
                    f"success {r['success']:.3f}"
                    if r["part"] == "rl"
                    else ", ".join(f"{t} {m} {r['val'][t][m]:.4f}" for t, m in REC_METRICS.items())
                )
                tqdm.write(f"  [{r['part']}] {r['schedule']} seed {r['seed']}: {msg} ({r.get('seconds', 0):.0f}s)")
            bar.close()
    rec = sorted(
        (r for r in results if r["part"] == "rec"), key=lambda r: (list(REC_SCHEDULES).index(r["schedule"]), r["seed"])
    )
    rl = sorted(
        (r for r in results if r["part"] == "rl"), key=lambda r: (list(RL_SCHEDULES).index(r["schedule"]), r["seed"])
    )
    failed = [r for r in results if "error" in r]

    dist_headers = ["entropy/log k", "entropy, 2nd half", "max p", "TV from uniform"]
    if rec:
        rows = []
        for name in REC_SCHEDULES:
            runs = [r for r in rec if r["schedule"] == name and "error" not in r]
            if not runs:
                continue
            metrics = [fmt([r["val"][t][m] for r in runs], 4) for t, m in REC_METRICS.items()]
            rows.append([name, len(runs), *dist_row(runs), shares(runs, list(REC_METRICS)), *metrics])
        print(
            f"\nrec: mtrec data=synthetic ({rec_rows} rows), MMoE, {rec_steps} steps of batch 256; final validation "
            "metric (mean ± sd over seeds); selection shares click/conversion/dwell per seed:\n"
        )
        print(
            table(
                ["schedule", "seeds", *dist_headers, "selected c/cv/d", *(f"{t} {m}" for t, m in REC_METRICS.items())],
                rows,
            )
        )
        payload["rec_table"] = rows
    if rl:
        tasks = list(next(r for r in rl if "tasks" in r)["tasks"]) if any("tasks" in r for r in rl) else []
        rows = []
        for name in RL_SCHEDULES:
            runs = [r for r in rl if r["schedule"] == name and "error" not in r]
            if not runs:
                continue
            per_task = "/".join(f"{sum(r['tasks'][t] for r in runs) / len(runs):.2f}" for t in tasks)
            rows.append(
                [name, len(runs), *dist_row(runs), shares(runs, tasks), fmt([r["success"] for r in runs]), per_task]
            )
        print(
            f"\nrl: mtrl-train env=pointmass agent={RL_AGENT}, {rl_steps} steps; final evaluation success; "
            f"selection shares and success per task ({'/'.join(tasks)}):\n"
        )
        print(table(["schedule", "seeds", *dist_headers, "selected", "success", "success per task"], rows))
        payload["rl_table"] = rows
    for r in failed:
        print(f"  FAILED [{r['part']}] {r['schedule']} seed {r['seed']}: {r['error'].splitlines()[0][:300]}")
    wall = time.perf_counter() - started
    print(f"\ntook {wall / 60:.1f} min with {args.workers} processes")
    sim_json = {k: v for k, v in sim.items() if k != "p_fast_task"}
    if sim:  # p(a) every 10th step, mean over seeds
        sim_json["p_fast_task_mean_every_10"] = {
            noise: {
                sc: [round(sum(c[i] for c in cs) / len(cs), 4) for i in range(9, sim_steps, 10)]
                for sc, cs in by.items()
            }
            for noise, by in sim["p_fast_task"].items()
        }
    payload.update(
        {
            "settings": {
                "rec": {
                    "settings": REC_SETTINGS,
                    "n_rows": rec_rows,
                    "steps": rec_steps,
                    "seeds": seeds,
                    "schedules": REC_SCHEDULES,
                    "metrics": REC_METRICS,
                },
                "rl": {
                    "agent": RL_AGENT,
                    "steps": rl_steps,
                    "seeds": rl_seeds,
                    "schedules": RL_SCHEDULES,
                    "skipped": rl_missing,
                },
                "workers": args.workers,
            },
            "wall_seconds": round(wall, 1),
            "sim": sim_json,
            "rec": rec,
            "rl": rl,
        }
    )
    write_json(f"{args.output}.json", payload)
    if sim or rec or rl:
        plot(sim or {"p_fast_task": {}}, rec, rl, RESULTS / f"{args.output}.png")


if __name__ == "__main__":
    main()
