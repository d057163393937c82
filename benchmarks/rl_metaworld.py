"""CARE vs MT-SAC on Meta-World MT10, in resumable chunks that each fit a 10-minute (GPU) command.

    python benchmarks/rl_metaworld.py --device cuda                 # advance the runs by up to --time-budget s
    python benchmarks/rl_metaworld.py --device cuda                 # ... again, until every run is complete
    python benchmarks/rl_metaworld.py --smoke                       # a few steps on CPU, two chunks per run

Every invocation reads the runs' state (``RUNS/state.json``; ``--runs-dir``, default
``outputs/rl_metaworld_runs``, which must survive between commands: each run's ``last.pt`` holds its
replay buffers, about 0.35 GB per run at the defaults), then advances unfinished runs one chunk
(``--chunk-steps`` pool steps) at a time; a chunk is one ``mtrl-train`` process (``python -m mtrl.cli.train``)
with ``trainer.resume=true`` and ``trainer.total_steps`` raised by the chunk, so the run continues exactly
where the last chunk stopped (checkpoint with replay buffers and RNG states, :mod:`mtrl.train`). A chunk is
started only when the time already used in this invocation plus the slowest chunk seen so far stays within
``--time-budget`` (default 540 s: a 10-minute command with room for start-up). The device seconds of every
chunk are recorded. When all runs are complete, the per-task success of each run's final evaluation goes to
``benchmarks/results/rl_metaworld.json`` (``--smoke``: ``rl_metaworld_smoke.json``, not a result).

Settings follow CARE's MT10 set-up (Sodhani et al., ICML 2021, Appendix; the preset
``configs/experiment/mtrl_mt10_paper.yaml``): 150-step episodes, fixed goals, three 400-unit layers, 128 rows per
task per update, SAC lr 3e-4, initial temperature 1. ``--total-steps``
pool steps (each: one step in each of the 10 task envs) with one update per pool step. The paper trained
for 2M environment steps per task; the default budget here is 100k pool steps (1M environment steps in
all), what fits a few GPU commands.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, table, write_json

AGENTS = {"care": "CARE", "mt_sac": "MT-SAC"}

FULL = [
    "experiment=mtrl_mt10_paper",  # env=mt10, 150-step episodes, [400, 400, 400], batch 128, SAC lr 3e-4, alpha 1
    "trainer.progress=false",
]
SMOKE = [
    "env=mt10",
    "env.max_episode_steps=8",
    "agent.hidden=[32,32]",
    "trainer.batch_size=4",
    "trainer.learning_starts=4",
    "trainer.eval_episodes=1",
    "trainer.log_interval=4",
    "trainer.progress=false",
]
SMOKE_CARE = ["agent.expert_hidden=[16]", "agent.expert_dim=16", "agent.context_hidden=[16]", "agent.context_dim=8"]


def load_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save_state(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def overrides(agent: str, seed: int, args: argparse.Namespace, run_dir: Path, until: int) -> list[str]:
    base = SMOKE + (SMOKE_CARE if agent == "care" else []) if args.smoke else FULL
    return [
        *base,
        f"agent={agent}",
        f"seed={seed}",
        f"trainer.device={args.device}",
        f"trainer.total_steps={until}",
        f"trainer.eval_interval={args.eval_interval}",
        f"trainer.checkpoint_interval={args.chunk_steps}",
        f"trainer.replay_capacity={args.total_steps}",  # a task never has more transitions than pool steps
        "trainer.resume=true",
        f"hydra.run.dir={run_dir}",
    ]


def run_chunk(agent: str, seed: int, args: argparse.Namespace, run_dir: Path, until: int) -> float:
    """One ``mtrl-train`` process that advances a run to ``until`` steps; returns its wall seconds."""
    cmd = [sys.executable, "-m", "mtrl.cli.train", *overrides(agent, seed, args, run_dir, until)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"mtrl-train failed for {agent} seed {seed} (exit {proc.returncode}); command: {cmd}")
    return seconds


def summarize(state: dict[str, Any], runs_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    results, rows = [], []
    for key, info in sorted(state["runs"].items()):
        result = json.loads((runs_dir / key / "eval.json").read_text())
        used = sum(c["seconds"] for c in info["chunks"])
        results.append(
            {
                "agent": info["agent"],
                "seed": info["seed"],
                "success": result["mean_success"],
                "tasks": {t: r["success"] for t, r in result["tasks"].items()},
                "return": result["mean_return"],
                "steps": result["step"],
                "env_steps": result["step"] * len(result["tasks"]),
                "chunks": len(info["chunks"]),
                "device_seconds": round(used, 1),
            }
        )
        rows.append(
            [
                AGENTS[info["agent"]],
                info["seed"],
                f"{result['mean_success']:.3f}",
                result["step"],
                len(info["chunks"]),
                f"{used:.0f}",
            ]
        )
    print(table(["agent", "seed", "success", "steps", "chunks", "seconds"], rows))
    tasks = list(results[0]["tasks"])
    per_task = [[t, *(f"{r['tasks'][t]:.2f}" for r in results)] for t in tasks]
    print(table(["task", *(f"{r['agent']}/s{r['seed']}" for r in results)], per_task))
    return {"results": results, "family": result["family"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps on CPU in two chunks per run")
    parser.add_argument("--device", default=None, help="cuda (the real run) or cpu (default: cpu with --smoke)")
    parser.add_argument("--total-steps", type=int, default=None, help="pool steps per run (default 100,000)")
    parser.add_argument("--chunk-steps", type=int, default=None, help="pool steps per chunk (default 10,000)")
    parser.add_argument("--eval-interval", type=int, default=None, help="steps between evaluations")
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds this invocation may use")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS))
    parser.add_argument(
        "--runs-dir",
        default=None,
        help="run directories and state.json (default: outputs/rl_metaworld_runs; "
        "--smoke: a temp dir). Keep it between commands: the checkpoints hold the replay buffers",
    )
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    # smoke: 8-step episodes, chunks of 6 steps: the second chunk resumes mid-episode (replays the actions)
    args.total_steps = args.total_steps or (12 if args.smoke else 100_000)
    args.chunk_steps = args.chunk_steps or (6 if args.smoke else 10_000)
    args.eval_interval = args.eval_interval if args.eval_interval is not None else (0 if args.smoke else 20_000)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(
                "rl_metaworld: the real MT10 run needs a CUDA GPU and there is none here; run it on a GPU machine "
                "(python benchmarks/rl_metaworld.py --device cuda, repeated until complete) or check the pipeline "
                "with --smoke on CPU."
            )
            return 2
    elif not args.smoke:
        print("rl_metaworld: running MT10 on CPU: expect about 10x the GPU time per update")

    if args.runs_dir:
        runs_dir = Path(args.runs_dir)
    elif args.smoke:
        runs_dir = Path(tempfile.mkdtemp(prefix="rl_metaworld_smoke_"))
    else:
        runs_dir = REPO / "outputs" / "rl_metaworld_runs"  # git-ignored; must persist between commands
    runs_dir.mkdir(parents=True, exist_ok=True)
    print(f"runs directory: {runs_dir}")
    state_path = runs_dir / "state.json"
    state = load_state(state_path)
    for agent in args.agents:
        for seed in range(args.seeds):
            info = state["runs"].setdefault(
                f"{agent}-seed{seed}", {"agent": agent, "seed": seed, "steps": 0, "chunks": []}
            )
            if info.get("total_steps", args.total_steps) != args.total_steps:
                raise SystemExit(f"{agent}-seed{seed} was started with --total-steps {info['total_steps']}")
            info["total_steps"] = args.total_steps
    t0 = time.perf_counter()
    slowest = max((c["seconds"] for i in state["runs"].values() for c in i["chunks"]), default=0.0)
    for key, info in sorted(state["runs"].items(), key=lambda kv: kv[1]["steps"]):
        while info["steps"] < args.total_steps:
            if time.perf_counter() - t0 + slowest > args.time_budget:
                break
            until = min(info["steps"] + args.chunk_steps, args.total_steps)
            seconds = run_chunk(info["agent"], info["seed"], args, runs_dir / key, until)
            info["chunks"].append(
                {
                    "from": info["steps"],
                    "to": until,
                    "seconds": round(seconds, 1),
                    "device": args.device,
                    "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            )
            info["steps"] = until
            slowest = max(slowest, seconds)
            save_state(state, state_path)
            print(f"{key}: {until}/{args.total_steps} steps ({seconds:.0f}s)", flush=True)
    used = time.perf_counter() - t0
    done = all(i["steps"] >= args.total_steps for i in state["runs"].values())
    total = sum(c["seconds"] for i in state["runs"].values() for c in i["chunks"])
    print(f"this invocation: {used:.0f}s; all chunks so far: {total:.0f}s on {args.device}")
    if not done:
        left = {k: args.total_steps - i["steps"] for k, i in state["runs"].items() if i["steps"] < args.total_steps}
        print(f"incomplete: steps left {left}; run the same command again to continue")
        return 0
    summary = summarize(state, runs_dir, args)
    if args.smoke and not args.runs_dir:
        shutil.rmtree(runs_dir, ignore_errors=True)
    write_json(
        "rl_metaworld_smoke.json" if args.smoke else "rl_metaworld.json",
        {
            "benchmark": "rl_metaworld",
            "mode": "smoke (CPU, a few steps: a pipeline check, not a result)" if args.smoke else "full",
            "device": args.device,
            "total_steps_per_run": args.total_steps,
            "chunk_steps": args.chunk_steps,
            "settings": SMOKE if args.smoke else FULL,
            "budget": {
                "device_seconds_total": round(total, 1),
                "chunks": {k: i["chunks"] for k, i in state["runs"].items()},
            },
            **summary,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
