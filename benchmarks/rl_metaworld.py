"""CARE, MT-SAC, multi-head SAC and MOORE on Meta-World MT10 (fixed goals), in resumable chunks.

    python benchmarks/rl_metaworld.py --runs-dir /work/mt10-runs --deadline 15:58   # advance every run (CPU)
    # (run it from a frozen worktree: git worktree add /work/mt10-snap HEAD; cd /work/mt10-snap; python ...)
    python benchmarks/rl_metaworld.py --runs-dir /work/mt10-runs --report            # table, JSON and PNG only
    python benchmarks/rl_metaworld.py --device cuda --time-budget 540                # a 10-minute GPU command
    python benchmarks/rl_metaworld.py --smoke                                        # a pipeline check (seconds)

Runs. ``--agents`` (default all four) x ``--seeds`` (default 2) runs of ``mtrl-train
experiment=mtrl_mt10_paper``, each in its own directory under ``--runs-dir`` (default
``outputs/rl_metaworld_runs``, which must survive between commands: each run's ``last.pt`` holds its replay
buffers). A chunk is one ``mtrl-train`` process (``python -m mtrl.cli.train``, started in this script's
checkout: run the script from a frozen ``git worktree`` and edits to ``mtrl/`` in the main checkout cannot
change a run half-way) with ``trainer.resume=true`` and ``trainer.total_steps`` raised by ``--chunk-steps``, so
the run continues exactly where the last chunk stopped (checkpoint with replay buffers and RNG states,
:mod:`mtrl.train`). The runs advance round-robin, the one with the fewest steps first, so a deadline stops
them all at (nearly) the same step. A chunk is not started when the time used in this invocation plus the
slowest chunk seen so far over the same step range (else the slowest of all) would pass ``--time-budget``
seconds or the ``--deadline`` (UTC ``HH:MM``). ``RUNS/state.json`` records every chunk's wall seconds.

Budget of the committed result (``benchmarks/results/rl_metaworld.json``): 3,000 pool steps per run (30,000
environment steps: 1,500 random-action pool steps, then 1,500 updates), a first chunk of 1,500 and chunks of
500, evaluations every 250 pool steps (12 points per curve, 7 of them from the first update on): what 8 runs
one after another on one core of a shared 2-core machine allowed in under two hours (measured before the
start: 0.23 to 0.9 s per update of the paper-sized networks, depending on the agent and the machine's load).
The issue's 50,000 pool steps with an evaluation every 5,000 would be 17 times longer; the eval interval was
scaled down with the budget (50,000 / 5,000 = 10 evaluations there, 12 here).

Settings (every one is written into the result's ``settings``): Meta-World 3.1.1 (v3 environments), reward
functions v2, 150-step episodes, fixed goals (goal variation 0 of every task: CARE's MT10 set-up, Sodhani,
Zhang & Pineau, ICML 2021), the preset's three 400-unit layers, 128 rows per task per update, SAC learning
rates 3e-4, initial temperature 1, 1,500 pool steps of uniform random actions before the first update, one
update per pool step; a pool step is one step in each of the 10 task envs (10 environment steps). Two
deliberate departures from the preset, both in ``settings``:

* ``trainer.num_threads=1`` (``--threads``): the preset leaves torch its default of one thread per core; the
  CPU run gets one core of a shared machine.
* ``trainer.eval_episodes=1`` (``--eval-episodes``): with fixed goals a Meta-World v3 reset is deterministic
  (the same trajectory under any reset seed: checked for all ten MT10 tasks) and the evaluated policy is
  deterministic, so the preset's 5 evaluation episodes per task would be 5 copies of one; a task's success
  at an evaluation is therefore 0 or 1 per run, and the per-task mean over seeds is the share of seeds that
  solve it.

Evaluations every ``--eval-interval`` pool steps (and at the end of every chunk) go to each run's
``train_log.jsonl``; the report reads them into per-task success curves, takes every run's last evaluation
as its final result (the per-task table: mean and std over seeds), sets them beside the published MT10
numbers of the CARE paper (:data:`PUBLISHED`, read approximately off the paper's figure, plotted only at the
steps they refer to) and writes ``benchmarks/results/rl_metaworld.json`` and ``rl_metaworld.png``
(``--smoke``: ``rl_metaworld_smoke.json``, not a result)::

    {"settings": {...}, "results": [{"agent", "seed", "env_steps", "mean_success", "per_task": {task: s}}],
     "curves": {agent: {"env_steps": [...], "mean_success": [[per seed]...], "per_task": {task: ...}}}, ...}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, table, write_json

AGENTS = {"care": "CARE", "mt_sac": "MT-SAC", "multihead_sac": "Multi-head SAC", "moore": "MOORE"}
TASKS_PER_POOL_STEP = 10  # MT10: one env per task
LEARNING_STARTS = 1500  # pool steps of uniform random actions before the first update (the preset's)

# Published MT10 success rates (fixed goals) of Sodhani, Zhang & Pineau, "Multi-Task Reinforcement Learning with
# Context-based Representations", ICML 2021. The paper could not be downloaded here: these values were read
# APPROXIMATELY from the paper's MT10 success-vs-steps figure (from memory of it), not copied from a table, and
# are accurate to about +-0.05 at best. Keys are the figure's x-axis steps (the paper counts environment steps;
# whether per task or over all ten tasks is not certain from the figure's reading). CARE at 1M is a range (the
# curve is read as 0.4-0.5 there); multi-head SAC and MOORE (not in that paper) have no entry.
PUBLISHED: dict[str, Any] = {
    "source": "Sodhani, Zhang & Pineau 2021 (CARE), MT10 fixed goals; read approximately off the paper's figure",
    "precision": "about +-0.05; x-axis counting (per task or in all) uncertain",
    "points": {
        "care": {1_000_000: [0.4, 0.5], 2_000_000: 0.84},
        "mt_sac": {2_000_000: 0.7},
    },
}

FULL = [
    "experiment=mtrl_mt10_paper",  # env=mt10, 150-step episodes, [400, 400, 400], batch 128, SAC lr 3e-4, alpha 1
    "env.reward_function_version=v2",
    "env.random_goals=false",
    "env.max_episode_steps=150",
    "trainer.progress=false",
]
SMOKE = [
    "env=mt10",
    "env.max_episode_steps=8",
    "agent.hidden=[32,32]",
    "trainer.batch_size=4",
    "trainer.learning_starts=4",
    "trainer.log_interval=4",
    "trainer.progress=false",
]
SMOKE_EXPERTS = ["agent.expert_hidden=[16]", "agent.expert_dim=16"]
SMOKE_CARE = ["agent.context_hidden=[16]", "agent.context_dim=8"]


def load_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save_state(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def overrides(agent: str, seed: int, args: argparse.Namespace, run_dir: Path, until: int) -> list[str]:
    if args.smoke:
        base = SMOKE + (SMOKE_EXPERTS if agent in ("care", "moore") else []) + (SMOKE_CARE if agent == "care" else [])
    else:
        base = FULL
    return [
        *base,
        f"agent={agent}",
        f"seed={seed}",
        f"trainer.device={args.device}",
        f"trainer.num_threads={args.threads}",
        f"trainer.total_steps={until}",
        f"trainer.eval_interval={args.eval_interval}",
        f"trainer.eval_episodes={args.eval_episodes}",
        f"trainer.checkpoint_interval={args.chunk_steps}",
        f"trainer.replay_capacity={args.total_steps}",  # a task never has more transitions than pool steps
        "trainer.resume=true",
        f"hydra.run.dir={run_dir}",
    ]


def checkout_env(runs_dir: Path) -> dict[str, str]:
    """The environment of a chunk: ``mtl``/``mtrl`` come from this checkout (the working directory is first on
    ``sys.path``), and so must the Hydra configs, which ``mtl.config`` reads from the package ``mtlib_configs``
    (an editable install maps it onto the installed checkout's ``configs/``): a link
    ``RUNS/.pkg/mtlib_configs -> REPO/configs`` on ``PYTHONPATH`` comes before the install's finder."""
    shim = runs_dir / ".pkg"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "mtlib_configs"
    if link.is_symlink() and link.resolve() != (REPO / "configs").resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO / "configs", target_is_directory=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_chunk(agent: str, seed: int, args: argparse.Namespace, run_dir: Path, until: int) -> float:
    """One ``mtrl-train`` process (in this script's checkout) that advances a run to ``until`` steps; returns
    its wall seconds. Its output goes to ``RUN/chunks.log``."""
    cmd = [sys.executable, "-m", "mtrl.cli.train", *overrides(agent, seed, args, run_dir, until)]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = checkout_env(run_dir.parent)
    t0 = time.perf_counter()
    with open(run_dir / "chunks.log", "a") as out:
        out.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (run_dir / "chunks.log").read_text()[-4000:]
        sys.stderr.write(tail)
        raise RuntimeError(f"mtrl-train failed for {agent} seed {seed} (exit {proc.returncode}); command: {cmd}")
    return seconds


def deadline_seconds(deadline: str | None) -> float | None:
    """Seconds from now until today's UTC ``HH:MM`` (``None`` without a deadline)."""
    if deadline is None:
        return None
    try:
        hour, minute = (int(x) for x in deadline.split(":"))
    except ValueError:
        raise SystemExit(f"rl_metaworld: --deadline takes a UTC time HH:MM, got {deadline!r}") from None
    now = dt.datetime.now(dt.timezone.utc)
    return (now.replace(hour=hour, minute=minute, second=0, microsecond=0) - now).total_seconds()


def advance(state: dict[str, Any], state_path: Path, runs_dir: Path, args: argparse.Namespace) -> None:
    """Advance the runs chunk by chunk, fewest steps first, within the time budget and the deadline."""
    budget = args.time_budget
    left = deadline_seconds(args.deadline)
    if left is not None:
        budget = left if budget is None else min(budget, left)
    t0 = time.perf_counter()
    while True:
        todo = [(i["steps"], k) for k, i in state["runs"].items() if i["steps"] < args.total_steps]
        if not todo:
            return
        key = min(todo)[1]
        info = state["runs"][key]
        size = args.first_chunk_steps if info["steps"] == 0 else args.chunk_steps
        until = min(info["steps"] + size, args.total_steps)
        chunks = [c for i in state["runs"].values() for c in i["chunks"]]
        alike = [c["seconds"] for c in chunks if (c["from"], c["to"]) == (info["steps"], until)]
        estimate = max(alike or [c["seconds"] for c in chunks] or [0.0])
        if budget is not None and time.perf_counter() - t0 + estimate > budget:
            print(f"stopping: {key}'s next chunk (about {estimate:.0f}s) would pass the time budget or deadline")
            return
        seconds = run_chunk(info["agent"], info["seed"], args, runs_dir / key, until)
        info["chunks"].append(
            {
                "from": info["steps"],
                "to": until,
                "seconds": round(seconds, 1),
                "device": args.device,
                "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                "load_average_1min": round(os.getloadavg()[0], 2),
            }
        )
        info["steps"] = until
        save_state(state, state_path)
        print(f"{key}: {until}/{args.total_steps} steps ({seconds:.0f}s)", flush=True)


# ------------------------------------------------------------------------------------------------ report
def eval_records(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluation records of a run's ``train_log.jsonl``, one per step (the last one written wins: a resumed
    chunk rewinds the log to its checkpoint, so duplicates do not normally occur)."""
    by_step: dict[int, dict[str, Any]] = {}
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "eval/mean_success" in record:
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def per_task(record: dict[str, Any]) -> dict[str, float]:
    return {k[len("eval/") : -len("/success")]: float(v) for k, v in record.items() if k.endswith("/success")}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(state: dict[str, Any], runs_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Curves, final per-task results and the tables (printed); returns the JSON payload's parts."""
    results: list[dict[str, Any]] = []
    returns: dict[tuple[str, int], float] = {}
    curves: dict[str, Any] = {}
    tasks: list[str] = []
    runs = sorted(state["runs"].items(), key=lambda kv: (list(AGENTS).index(kv[1]["agent"]), kv[1]["seed"]))
    # the final result of every run is its evaluation at the same step: the last that every run has completed
    # (a chunk records its steps when it ends), or --at-step
    started = [i["steps"] for _, i in runs if i["steps"] > 0] or [0]
    at_step = args.at_step if args.at_step is not None else min(started)
    for key, info in runs:
        # only the finished chunks' evaluations (a chunk in progress may have written some beyond its start)
        records = [r for r in eval_records(runs_dir / key) if r["step"] <= info["steps"]]
        if not records:
            print(f"{key}: no finished chunk yet; left out")
            continue
        upto = [r for r in records if r["step"] <= at_step]
        last = upto[-1] if upto else records[-1]
        tasks = tasks or list(per_task(last))
        results.append(
            {
                "agent": info["agent"],
                "seed": info["seed"],
                "env_steps": int(last["step"]) * TASKS_PER_POOL_STEP,
                "mean_success": float(last["eval/mean_success"]),
                "per_task": per_task(last),
            }
        )
        returns[(info["agent"], info["seed"])] = float(last["eval/mean_return"])
        agent_curve = curves.setdefault(info["agent"], {"seeds": [], "runs": {}})
        agent_curve["seeds"].append(info["seed"])
        agent_curve["runs"][str(info["seed"])] = {
            "env_steps": [int(r["step"]) * TASKS_PER_POOL_STEP for r in records],
            "mean_success": [float(r["eval/mean_success"]) for r in records],
            "mean_return": [float(r["eval/mean_return"]) for r in records],
            "per_task": {t: [per_task(r)[t] for r in records] for t in tasks},
            "per_task_return": {t: [float(r[f"eval/{t}/return"]) for r in records] for t in tasks},
        }
    # mean and std over seeds at the env steps every seed of the agent has evaluated
    for c in curves.values():
        seeds = list(c["runs"].values())
        common = sorted(set.intersection(*(set(s["env_steps"]) for s in seeds)))
        at = lambda s, series, x: series[s["env_steps"].index(x)]  # noqa: E731
        c["env_steps"] = common
        c["mean_success"] = [mean_std([at(s, s["mean_success"], x) for s in seeds])[0] for x in common]
        c["std_success"] = [mean_std([at(s, s["mean_success"], x) for s in seeds])[1] for x in common]
        c["mean_return"] = [mean_std([at(s, s["mean_return"], x) for s in seeds])[0] for x in common]
        c["std_return"] = [mean_std([at(s, s["mean_return"], x) for s in seeds])[1] for x in common]
        c["per_task_mean"] = {
            t: [mean_std([at(s, s["per_task"][t], x) for s in seeds])[0] for x in common] for t in tasks
        }

    rows = []
    for _, info in runs:
        r = next((r for r in results if (r["agent"], r["seed"]) == (info["agent"], info["seed"])), None)
        used = sum(c["seconds"] for c in info["chunks"])
        rows.append(
            [
                AGENTS[info["agent"]],
                info["seed"],
                "-" if r is None else f"{r['mean_success']:.3f}",
                "-" if r is None else f"{returns[(info['agent'], info['seed'])]:.1f}",
                "-" if r is None else r["env_steps"],
                f"{info['steps']}/{info['total_steps']}",
                len(info["chunks"]),
                f"{used:.0f}",
            ]
        )
    print(f"final results at pool step {at_step} ({at_step * TASKS_PER_POOL_STEP:,} environment steps):")
    print(table(["agent", "seed", "success", "eval return", "env steps", "pool steps done", "chunks", "seconds"], rows))
    agents = [a for a in AGENTS if any(r["agent"] == a for r in results)]
    final = {a: {t: mean_std([r["per_task"][t] for r in results if r["agent"] == a]) for t in tasks} for a in agents}
    means = {a: mean_std([r["mean_success"] for r in results if r["agent"] == a]) for a in agents}
    per_task_rows = [[t, *(f"{final[a][t][0]:.2f} +- {final[a][t][1]:.2f}" for a in agents)] for t in tasks]
    per_task_rows.append(["mean", *(f"{means[a][0]:.3f} +- {means[a][1]:.3f}" for a in agents)])
    print("\nfinal per-task success, mean +- std over seeds:")
    print(table(["task", *(AGENTS[a] for a in agents)], per_task_rows))
    comparison = []
    for a in agents:
        steps = sorted({r["env_steps"] for r in results if r["agent"] == a})
        published = PUBLISHED["points"].get(a, {})
        comparison.append(
            {
                "agent": a,
                "env_steps": steps,
                "mean_success": round(means[a][0], 4),
                "std_success": round(means[a][1], 4),
                "published_at_same_steps": None,
                "published_points": {str(k): v for k, v in published.items()},
            }
        )
    print("\nbeside the CARE paper (MT10 fixed goals; values read approximately off its figure):")
    print(
        table(
            ["agent", "env steps here", "success here", "published (env steps: success)"],
            [
                [
                    AGENTS[c["agent"]],
                    ",".join(map(str, c["env_steps"])),
                    f"{c['mean_success']:.3f} +- {c['std_success']:.3f}",
                    "; ".join(f"{k}: {v}" for k, v in c["published_points"].items()) or "not in the paper",
                ]
                for c in comparison
            ],
        )
    )
    print(
        "The paper's figure cannot be read at this run's step count (its curves start near 0 and its first "
        "readable values are at about 1M steps), so 'published_at_same_steps' is null rather than a guess."
    )
    return {
        "results": results,
        "curves": curves,
        "final_per_task": final,
        "comparison": comparison,
        "tasks": tasks,
        "at_step": at_step,
        "final_return": {f"{a}-seed{s}": v for (a, s), v in returns.items()},
    }


def learning_cost(state: dict[str, Any]) -> dict[str, float]:
    """Wall seconds per pool step (one env step per task and one update) of each agent's chunks after the
    random-action phase, start-up and evaluations included: the total over its runs' chunks / their steps."""
    out: dict[str, list[float]] = {}
    for info in state["runs"].values():
        for c in info["chunks"]:
            if c["from"] >= LEARNING_STARTS and c["to"] > c["from"]:
                out.setdefault(info["agent"], []).extend([c["seconds"], c["to"] - c["from"]])
    return {a: round(sum(v[::2]) / sum(v[1::2]), 3) for a, v in out.items()}


def plot(curves: dict[str, Any], tasks: list[str], path: Path, title: str, learning_starts: int) -> None:
    """Mean success vs environment steps per agent (our runs; and on a log axis beside the published points),
    and one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(AGENTS, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    fig = plt.figure(figsize=(20, 11), constrained_layout=True)
    grid = fig.add_gridspec(3, 10)
    ours = fig.add_subplot(grid[0, :4])
    ret = fig.add_subplot(grid[0, 4:7])
    wide = fig.add_subplot(grid[0, 7:])
    for agent, c in curves.items():
        x = c["env_steps"]
        label = f"{AGENTS[agent]} ({len(c['seeds'])} seeds)"
        ret.plot(x, c["mean_return"], "-o", ms=3, color=colours[agent], label=label)
        lo = [m - s for m, s in zip(c["mean_return"], c["std_return"])]
        hi = [m + s for m, s in zip(c["mean_return"], c["std_return"])]
        ret.fill_between(x, lo, hi, color=colours[agent], alpha=0.15)
        mean, std = c["mean_success"], c["std_success"]
        for ax in (ours, wide):
            ax.plot(x, mean, "-o", ms=3, color=colours[agent], label=label)
            ax.fill_between(
                x,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=colours[agent],
                alpha=0.15,
            )
    for agent, points in PUBLISHED["points"].items():
        for steps, value in points.items():
            lo, hi = value if isinstance(value, list) else (value, value)
            wide.errorbar(
                [steps],
                [(lo + hi) / 2],
                yerr=[[(hi - lo) / 2]],
                fmt="*",
                ms=12,
                capsize=4,
                color=colours[agent],
                label=f"{AGENTS[agent]}, paper (approx.) at {steps / 1e6:g}M",
            )
    ours.set(
        title=title,
        xlabel="environment steps (all 10 tasks)",
        ylabel="mean success (deterministic policy)",
        ylim=(-0.05, 1.05),
    )
    wide.set(
        title="log axis; CARE paper's MT10 values (approx.)",
        xscale="log",
        xlabel="environment steps",
        ylim=(-0.05, 1.05),
    )
    for ax in (ours, ret):
        ax.axvline(learning_starts * TASKS_PER_POOL_STEP, color="grey", ls=":", lw=1)
        ax.text(
            learning_starts * TASKS_PER_POOL_STEP,
            0.02,
            " first update",
            color="grey",
            fontsize=8,
            transform=ax.get_xaxis_transform(),
        )
    ret.set(title="mean evaluation return per episode (mean +- std over seeds)", xlabel="environment steps")
    ret.legend(loc="upper left", fontsize=8)
    ours.legend(loc="upper left", fontsize=8)
    wide.legend(loc="upper left", fontsize=7)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(grid[1 + i // 5, 2 * (i % 5) : 2 * (i % 5) + 2])
        for agent, c in curves.items():
            ax.plot(c["env_steps"], c["per_task_mean"][task], "-o", ms=2, color=colours[agent], label=AGENTS[agent])
        ax.set(title=task, ylim=(-0.05, 1.05))
        if i // 5 == 1:
            ax.set_xlabel("environment steps")
        if i % 5 == 0:
            ax.set_ylabel("success (mean over seeds)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps in two chunks per run (pipeline check)")
    parser.add_argument("--report", action="store_true", help="only summarise the runs as they stand")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: one core)")
    parser.add_argument("--total-steps", type=int, default=None, help="pool steps per run (default 3,000)")
    parser.add_argument("--chunk-steps", type=int, default=None, help="pool steps per chunk (default 500)")
    parser.add_argument(
        "--first-chunk-steps",
        type=int,
        default=None,
        help="pool steps of each run's first chunk (default 1,500: the random-action phase, which needs no updates)",
    )
    parser.add_argument("--eval-interval", type=int, default=None, help="pool steps between evaluations (250)")
    parser.add_argument("--eval-episodes", type=int, default=1, help="episodes per task per evaluation (1)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds this invocation may use")
    parser.add_argument("--deadline", default=None, help="UTC HH:MM after which no chunk may still run")
    parser.add_argument(
        "--at-step",
        type=int,
        default=None,
        help="report every run's last evaluation at or before this pool step (default: the fewest steps any run has)",
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS))
    parser.add_argument(
        "--runs-dir",
        default=None,
        help="run directories and state.json (default: outputs/rl_metaworld_runs; "
        "--smoke: a temp dir). Keep it between commands: the checkpoints hold the replay buffers",
    )
    args = parser.parse_args()
    # smoke: 8-step episodes, chunks of 6 steps: the second chunk resumes mid-episode (replays the actions)
    args.total_steps = args.total_steps or (12 if args.smoke else 3_000)
    args.chunk_steps = args.chunk_steps or (6 if args.smoke else 500)
    args.first_chunk_steps = args.first_chunk_steps or (6 if args.smoke else 1_500)
    args.eval_interval = args.eval_interval if args.eval_interval is not None else (4 if args.smoke else 250)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("rl_metaworld: --device cuda but there is no CUDA GPU here; use --device cpu")
            return 2

    if args.runs_dir:
        runs_dir = Path(args.runs_dir)
    elif args.smoke:
        runs_dir = Path(tempfile.mkdtemp(prefix="rl_metaworld_smoke_"))
    else:
        runs_dir = REPO / "outputs" / "rl_metaworld_runs"  # git-ignored; must persist between commands
    runs_dir.mkdir(parents=True, exist_ok=True)
    print(f"runs directory: {runs_dir}; mtrl-train runs in {REPO}")
    state_path = runs_dir / "state.json"
    state = load_state(state_path)
    if not args.report:
        for agent in args.agents:
            for seed in range(args.seeds):
                info = state["runs"].setdefault(
                    f"{agent}-seed{seed}", {"agent": agent, "seed": seed, "steps": 0, "chunks": []}
                )
                if info.get("total_steps", args.total_steps) != args.total_steps:
                    raise SystemExit(f"{agent}-seed{seed} was started with --total-steps {info['total_steps']}")
                info["total_steps"] = args.total_steps
        save_state(state, state_path)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        (runs_dir / "code.txt").write_text(f"{commit} ({REPO})\n")
        advance(state, state_path, runs_dir, args)
    if not state["runs"]:
        print(f"rl_metaworld: no runs in {runs_dir}")
        return 2
    done = all(i["steps"] >= i["total_steps"] for i in state["runs"].values())
    total = sum(c["seconds"] for i in state["runs"].values() for c in i["chunks"])
    print(f"all chunks so far: {total:.0f}s on {args.device}; complete: {done}")
    summary = report(state, runs_dir, args)
    if not summary["results"]:
        return 0
    name = "rl_metaworld_smoke" if args.smoke else "rl_metaworld"
    first = next(iter(state["runs"].values()))
    settings = {
        "mode": "smoke (a few steps: a pipeline check, not a result)" if args.smoke else "full",
        "complete": done,
        "metaworld": f"{version('metaworld')} (v3 environments)",
        "mujoco": version("mujoco"),
        "torch": version("torch"),
        "runs_code_commit": (runs_dir / "code.txt").read_text().strip() if (runs_dir / "code.txt").exists() else None,
        "family": "mt10",
        "reward_function_version": "v2",
        "max_episode_steps": 8 if args.smoke else 150,
        "goals": "fixed (goal variation 0 of each task, CARE's set-up)",
        "overrides": overrides(first["agent"], first["seed"], args, Path("RUN"), first["total_steps"]),
        "network": "agent.hidden=[400, 400, 400] (the paper's) and each agent's config/agent defaults otherwise",
        "total_pool_steps_per_run": first["total_steps"],
        "total_env_steps_per_run": first["total_steps"] * TASKS_PER_POOL_STEP,
        "learning_starts_pool_steps": 4 if args.smoke else LEARNING_STARTS,
        "updates_per_pool_step": 1.0,
        "first_chunk_steps": args.first_chunk_steps,
        "chunk_steps": args.chunk_steps,
        "eval_interval_pool_steps": args.eval_interval,
        "eval_episodes": args.eval_episodes,
        "eval_episodes_note": "fixed goals + deterministic policy: every episode of a task is the same, so 1",
        "seeds": sorted({i["seed"] for i in state["runs"].values()}),
        "results_at_pool_step": summary["at_step"],
        "pool_steps_done": {k: i["steps"] for k, i in state["runs"].items()},
        "final_eval_return": summary["final_return"],
        "device": args.device,
        "torch_threads_per_run": args.threads,
        "machine_note": "2 shared CPU cores with other engineers' work running; runs one at a time on one core",
        "published": {
            **PUBLISHED,
            "points": {a: {str(k): v for k, v in p.items()} for a, p in PUBLISHED["points"].items()},
        },
        "budget": {
            "why": "the largest budget whose 8 runs (one at a time, one torch thread) fit between the start and "
            "16:00 UTC on a 2-core machine shared with other engineers (1-minute load average 7-10 when the budget "
            "was chosen and during the first 45 minutes, about 2 in the last 40; the chunks' seconds show it): "
            "the 1,500 random-action pool steps cost little, the updates of the paper-sized networks dominate",
            "seconds_per_pool_step_with_update": learning_cost(state),
            "device_seconds_total": round(total, 1),
            "chunks": {k: i["chunks"] for k, i in state["runs"].items()},
        },
    }
    write_json(
        f"{name}.json",
        {
            "settings": settings,
            "results": summary["results"],
            "curves": summary["curves"],
            "final_per_task_mean_std": {
                a: {t: {"mean": m, "std": s} for t, (m, s) in v.items()} for a, v in summary["final_per_task"].items()
            },
            "comparison": summary["comparison"],
        },
    )
    steps = summary["at_step"] * TASKS_PER_POOL_STEP
    plot(
        summary["curves"],
        summary["tasks"],
        RESULTS / f"{name}.png",
        f"Meta-World MT10 (fixed goals), {steps:,} env steps per run, CPU",
        settings["learning_starts_pool_steps"],
    )
    if args.smoke and not args.runs_dir:
        shutil.rmtree(runs_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
