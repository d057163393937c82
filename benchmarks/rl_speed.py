"""Training speed on Meta-World MT10: mtlib MT-SAC and CARE (``mtrl-train``'s loop, sync and async env pools)
against Stable-Baselines3 2.9 SAC in the two set-ups a user would pick instead.

    make bench-peers                        # once: stable-baselines3 into benchmarks/.peers (--no-deps)
    python benchmarks/rl_speed.py           # the MT10 preset's networks (3 x 400), 3,000 timed env steps each
    python benchmarks/rl_speed.py --quick   # [64, 64] networks, 1,000 timed env steps each (a minute or two)

What is timed (``--repeats`` rounds of all trainers, interleaved; each trainer's median round is reported, with
every round's env steps/s beside it). Every trainer first takes ``--warmup`` pool steps of uniform random actions
(no updates), then ``--skip`` training steps that are not timed (torch's first updates), then ``--steps`` timed
training steps. A pool step is one step in each of the 10 task envs (10 env steps); all numbers are env steps
(and SAC updates) per second of wall clock over the timed window. Envs: mtlib's Meta-World MT10 family (metaworld 3.1.1,
reward v2, 150-step episodes, fixed goals: ``experiment=mtrl_mt10_paper``) for every trainer, so each side steps
the same simulator code. torch runs on one thread everywhere (``trainer.num_threads=1``, ``torch.set_num_threads
(1)``).

* mtlib: ``mtrl.train.run`` with the MT10 preset (``agent.hidden`` = ``--hidden``, ``trainer.batch_size`` =
  ``--batch`` rows per task, one update per pool step), ``env.vectorization`` sync (envs in the learner's
  process) and async (``trainer.env_workers`` = 1 worker process stepping the envs while the learner updates).
  Times come from the run's ``train_log.jsonl`` (``seconds`` at the first and last timed step).
* SB3 set-up 1, ``sb3_one_hot``: one SB3 SAC on one gymnasium env that plays the 10 tasks' episodes in turn
  with the task's one-hot appended to the observation (49-d), ``net_arch`` = ``--hidden``, ``batch_size`` = 10 x
  ``--batch`` (the rows of one mtlib update), ``train_freq=10`` env steps, ``gradient_steps=1``: the same rows per
  update and the same updates per env step (0.1) as mtlib.
* SB3 set-up 2, ``sb3_per_task``: ten SB3 SACs, one per task (39-d observation), trained one after the other,
  ``batch_size`` = ``--batch``, one update per env step: the same per-task update ratio and batch as mtlib (one
  mtlib update updates every task with ``--batch`` of its rows), so the same rows per env step; 10x the updates.

Target (issue 16): mtlib >= 2x SB3's env steps/s at equal updates per env step, in both set-ups; the table and
the JSON say met or not per agent and set-up. ``ratio`` takes mtlib's faster pool on this machine (the
``env.vectorization`` a user would pick; which one is in ``mtlib_vectorization``), ``ratio_sync`` and
``ratio_async`` each pool's: the async pool only gains where a core is free for its worker; ``ratio_per_round``
compares the trainers within each round (the same load), mtlib's faster pool of that round.
``care_over_mt_sac_update_cost`` is the cost of one CARE update over one MT-SAC update on the same batch and
networks: ``benchmarks/rl_update_cost.py``'s ``measure`` (its point-mass batch and [64, 64] networks, wall-clock
median; its thread-CPU ratio beside it), or, where that is missing, timed here on an MT10 batch
(``update_cost_source`` says which).

Writes ``benchmarks/results/rl_speed.json`` (``--quick``: ``rl_speed_quick.json``)::

    {"care_over_mt_sac_update_cost": x,
     "vs_sb3": [{"setup", "agent", "mtlib_env_steps_per_s", "sb3_env_steps_per_s", "ratio", "target_met"}, ...],
     "mtlib": {...}, "sb3": {...}, "settings": {...}, "note": ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, RESULTS, agent_kwargs, random_transition, table, write_json

PEERS = REPO / "benchmarks" / ".peers"
TARGET = 2.0
AGENTS = ("mt_sac", "care")


def import_sb3() -> Any:
    """``stable_baselines3``; benchmarks/.peers goes to the END of sys.path, so the venv's packages win."""
    if not PEERS.is_dir():
        raise SystemExit(f"{PEERS} is missing: run `make bench-peers` to install stable-baselines3 there")
    if str(PEERS) not in sys.path:
        sys.path.append(str(PEERS))
    import stable_baselines3

    return stable_baselines3


# ------------------------------------------------------------------------------------------------- mtlib


def mtlib_config(agent: str, args: argparse.Namespace, vectorization: str, steps: int) -> Any:
    from hydra import compose, initialize_config_dir

    from mtrl.config import CONFIG_DIR

    overrides = [
        "experiment=mtrl_mt10_paper",
        f"agent={agent}",
        f"agent.hidden=[{','.join(map(str, args.hidden))}]",
        f"env.vectorization={vectorization}",
        "trainer.env_workers=1",
        f"trainer.total_steps={steps}",
        f"trainer.learning_starts={args.warmup}",
        f"trainer.batch_size={args.batch}",
        "trainer.updates_per_step=1.0",
        f"trainer.replay_capacity={args.capacity}",
        "trainer.eval_interval=0",
        "trainer.eval_episodes=1",
        "trainer.checkpoint_interval=0",
        f"trainer.log_interval={args.log_every}",
        "trainer.num_threads=1",
        "trainer.progress=false",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="mtrl", overrides=overrides)


def time_mtlib(agent: str, vectorization: str, args: argparse.Namespace) -> dict[str, Any]:
    """One ``mtrl.train.run``; env steps and updates per second over the timed window, from its log."""
    from mtrl.train import run

    start, end = args.warmup + args.skip, args.warmup + args.skip + args.steps
    with tempfile.TemporaryDirectory(prefix="rl_speed_") as tmp:
        run(mtlib_config(agent, args, vectorization, end), tmp)
        records = [json.loads(x) for x in (Path(tmp) / "train_log.jsonl").read_text().splitlines() if x]
    seconds = {r["step"]: r["seconds"] for r in records if "seconds" in r}
    updates = {r["step"]: r["updates"] for r in records if "updates" in r}
    dt = seconds[end] - seconds[start]
    return {
        "agent": agent,
        "vectorization": vectorization,
        "env_steps": (end - start) * 10,
        "updates": updates[end] - updates[start],
        "seconds": dt,
        "env_steps_per_s": (end - start) * 10 / dt,
        "updates_per_s": (updates[end] - updates[start]) / dt,
        "updates_per_env_step": (updates[end] - updates[start]) / ((end - start) * 10),
        "rows_per_update": 10 * args.batch,
        "env_workers": 1 if vectorization == "async" else 0,
    }


# --------------------------------------------------------------------------------------------------- SB3


def _task_env(family: Any, task: int) -> Any:
    """Task ``task``'s env with the 39-d state as a Box observation (what SB3 takes)."""
    import gymnasium as gym

    class StateOnly(gym.ObservationWrapper):
        def __init__(self, env: Any) -> None:
            super().__init__(env)
            self.observation_space = env.observation_space["obs"]

        def observation(self, observation: Any) -> np.ndarray:
            return observation["obs"]

    return StateOnly(family.make_env(task))


def one_hot_env(family: Any) -> Any:
    """One gymnasium env over the family's tasks: each episode is the next task's (in turn), with the task's
    one-hot appended to the observation; episodes truncate at the family's length."""
    import gymnasium as gym
    from gymnasium import spaces

    class OneHotMT(gym.Env):
        def __init__(self) -> None:
            self.envs = [family.make_env(t) for t in range(family.num_tasks)]
            k, box = family.num_tasks, self.envs[0].observation_space["obs"]
            self.observation_space = spaces.Box(
                np.concatenate([box.low, np.zeros(k, np.float32)]),
                np.concatenate([box.high, np.ones(k, np.float32)]),
                dtype=np.float32,
            )
            self.action_space = self.envs[0].action_space
            self.task = -1

        def _obs(self, obs: dict[str, Any]) -> np.ndarray:
            hot = np.zeros(len(self.envs), np.float32)
            hot[self.task] = 1.0
            return np.concatenate([obs["obs"], hot])

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
            super().reset(seed=seed)
            self.task = (self.task + 1) % len(self.envs)
            obs, info = self.envs[self.task].reset(seed=seed)
            return self._obs(obs), info

        def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
            obs, r, term, trunc, info = self.envs[self.task].step(action)
            return self._obs(obs), r, term, trunc, info

    return OneHotMT()


def _sb3_learn(sb3: Any, env: Any, batch: int, train_freq: int, warmup: int, skip: int, steps: int, args: Any):
    """Train one SB3 SAC for ``warmup + skip + steps`` env steps; ``(seconds, updates)`` over the last ``steps``."""
    from stable_baselines3.common.callbacks import BaseCallback

    marks: dict[str, Any] = {}

    class Clock(BaseCallback):
        """Starts the clock when the rollout after env step ``warmup + skip`` begins (its update is done)."""

        def _on_rollout_start(self) -> None:
            if self.num_timesteps == warmup + skip:
                marks["t0"], marks["u0"] = time.perf_counter(), self.model._n_updates

        def _on_step(self) -> bool:
            return True

    model = sb3.SAC(
        "MlpPolicy",
        env,
        learning_rate=3e-4,
        buffer_size=args.capacity * 10,
        learning_starts=warmup,
        batch_size=batch,
        train_freq=(train_freq, "step"),
        gradient_steps=1,
        policy_kwargs={"net_arch": list(args.hidden)},
        device="cpu",
        seed=0,
        verbose=0,
    )
    model.learn(total_timesteps=warmup + skip + steps, callback=Clock(), progress_bar=False)
    return time.perf_counter() - marks["t0"], model._n_updates - marks["u0"]


def time_sb3_one_hot(sb3: Any, family: Any, args: argparse.Namespace) -> dict[str, Any]:
    k = family.num_tasks
    env_steps = args.steps * k
    dt, updates = _sb3_learn(sb3, one_hot_env(family), k * args.batch, k, args.warmup * k, args.skip * k,
                             env_steps, args)
    return {
        "setup": "sb3_one_hot",
        "env_steps": env_steps,
        "updates": updates,
        "seconds": dt,
        "env_steps_per_s": env_steps / dt,
        "updates_per_s": updates / dt,
        "updates_per_env_step": updates / env_steps,
        "rows_per_update": k * args.batch,
    }


def time_sb3_per_task(sb3: Any, family: Any, args: argparse.Namespace) -> dict[str, Any]:
    total_dt, total_updates = 0.0, 0
    per_task = {}
    for t, name in enumerate(family.task_names):
        dt, updates = _sb3_learn(sb3, _task_env(family, t), args.batch, 1, args.warmup, args.skip, args.steps, args)
        per_task[name] = args.steps / dt
        total_dt += dt
        total_updates += updates
    env_steps = args.steps * family.num_tasks
    return {
        "setup": "sb3_per_task",
        "env_steps": env_steps,
        "updates": total_updates,
        "seconds": total_dt,
        "env_steps_per_s": env_steps / total_dt,
        "updates_per_s": total_updates / total_dt,
        "updates_per_env_step": total_updates / env_steps,
        "rows_per_update": args.batch,
        "per_task_env_steps_per_s": per_task,
    }


# ---------------------------------------------------------------------------------------- update cost


def update_cost_ratio(args: argparse.Namespace) -> tuple[float, float | None, str]:
    """``(wall ratio, thread-CPU ratio or None, source)`` of CARE's update cost over MT-SAC's:
    ``rl_update_cost.measure`` when it exists, else timed here on one MT10-shaped batch (interleaved medians)."""
    try:
        from rl_update_cost import measure
    except ImportError:
        measure = None
    if measure is not None:
        result = measure(AGENTS, updates=args.cost_updates)
        return (
            float(result["ratio_to_mt_sac"]["care"]),
            float(result["cpu_ratio_to_mt_sac"]["care"]),
            f"benchmarks/rl_update_cost.py measure({AGENTS}, updates={args.cost_updates}): {result['settings']}, "
            "point-mass batch",
        )
    import torch

    from mtrl.agents import EnvSpec, SACConfig, build_agent
    from mtrl.envs import make_family

    spec = EnvSpec.from_family(make_family("mt10", max_episode_steps=150))
    torch.manual_seed(0)
    b = 10 * args.batch
    batch = random_transition(spec, b)
    agents = {name: build_agent(name, spec, SACConfig(), **agent_kwargs(name, args.hidden)) for name in AGENTS}
    times: dict[str, list[float]] = {n: [] for n in AGENTS}
    for i in range(10 + args.cost_updates):
        for name, agent in agents.items():
            t0 = time.perf_counter()
            agent.update(batch)
            if i >= 10:
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    return med["care"] / med["mt_sac"], None, (
        f"timed in rl_speed.py (rl_update_cost.measure() not available): median of {args.cost_updates} "
        f"interleaved updates, MT10 spec, hidden {list(args.hidden)}, {b} rows"
    )


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="[64, 64] networks, 100 timed pool steps")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden layers (default 400 400 400)")
    parser.add_argument("--batch", type=int, default=128, help="rows per task per update (the MT10 preset: 128)")
    parser.add_argument("--warmup", type=int, default=150, help="pool steps of random actions (no updates)")
    parser.add_argument("--skip", type=int, default=50, help="training pool steps before the timed window")
    parser.add_argument("--steps", type=int, default=None, help="timed pool steps (default 300; --quick 100)")
    parser.add_argument("--capacity", type=int, default=20_000, help="replay rows per task")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all trainers (the median is reported)")
    parser.add_argument("--cost-updates", type=int, default=300, help="timed updates per agent for the cost ratio")
    args = parser.parse_args()
    args.hidden = args.hidden or ([64, 64] if args.quick else [400, 400, 400])
    args.steps = args.steps or (100 if args.quick else 300)
    args.log_every = _gcd(args.warmup + args.skip, args.steps)

    import torch

    torch.set_num_threads(1)
    sb3 = import_sb3()
    from mtrl.envs import make_family

    family = make_family("mt10", max_episode_steps=150)
    mtlib: dict[str, dict[str, Any]] = {}
    sb3_results: dict[str, dict[str, Any]] = {}
    # Interleaved, so that load from other processes falls on every trainer alike.
    plan = [
        ("mtlib", "mt_sac", "async"),
        ("sb3", "sb3_one_hot", None),
        ("mtlib", "mt_sac", "sync"),
        ("mtlib", "care", "async"),
        ("sb3", "sb3_per_task", None),
        ("mtlib", "care", "sync"),
    ]
    samples: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for side, name, vec in plan:
            t0 = time.perf_counter()
            if side == "mtlib":
                res = time_mtlib(name, str(vec), args)
            else:
                res = (time_sb3_one_hot if name == "sb3_one_hot" else time_sb3_per_task)(sb3, family, args)
            samples.setdefault(f"{name}/{vec}" if side == "mtlib" else name, []).append(res)
            print(f"[{repeat + 1}/{args.repeats}] {side} {name} {vec or ''}: {res['env_steps_per_s']:.1f} env steps/s, "
                  f"{res['updates_per_s']:.2f} updates/s ({time.perf_counter() - t0:.0f} s)", flush=True)
    for key, runs in samples.items():
        # the repeat with the median env steps/s (the lower middle one of an even count), every repeat beside it
        middle = sorted(runs, key=lambda r: r["env_steps_per_s"])[(len(runs) - 1) // 2]
        entry = {**middle, "repeats_env_steps_per_s": [r["env_steps_per_s"] for r in runs]}
        (mtlib if "/" in key else sb3_results)[key] = entry
    cost, cpu_cost, cost_source = update_cost_ratio(args)

    vs = []
    for setup in ("sb3_one_hot", "sb3_per_task"):
        for agent in AGENTS:
            theirs = sb3_results[setup]["env_steps_per_s"]
            by_pool = {v: mtlib[f"{agent}/{v}"]["env_steps_per_s"] for v in ("sync", "async")}
            best = max(by_pool, key=by_pool.__getitem__)  # the env.vectorization a user would pick here
            ratio = by_pool[best] / theirs
            # the same comparison within each round (the trainers of one round ran under the same load)
            rounds = [
                max(samples[f"{agent}/{v}"][r]["env_steps_per_s"] for v in ("sync", "async"))
                / samples[setup][r]["env_steps_per_s"]
                for r in range(args.repeats)
            ]
            vs.append({
                "setup": setup,
                "agent": agent,
                "mtlib_env_steps_per_s": by_pool[best],
                "sb3_env_steps_per_s": theirs,
                "ratio": ratio,
                "mtlib_vectorization": best,
                "ratio_sync": by_pool["sync"] / theirs,
                "ratio_async": by_pool["async"] / theirs,
                "ratio_per_round": rounds,
                "mtlib_updates_per_env_step": mtlib[f"{agent}/{best}"]["updates_per_env_step"],
                "sb3_updates_per_env_step": sb3_results[setup]["updates_per_env_step"],
                "target_met": ratio >= TARGET,
            })
    rows = [[k, v["env_steps_per_s"], v["updates_per_s"], v["updates_per_env_step"], v["rows_per_update"]]
            for k, v in [*(("mtlib " + k, v) for k, v in mtlib.items()), *sb3_results.items()]]
    print(table(["trainer", "env steps/s", "updates/s", "updates/env step", "rows/update"], rows))
    print(table(["vs", "agent", "mtlib (pool)", "SB3", "ratio", "ratio sync", "ratio async", "per round",
                 f">= {TARGET}x"],
                [[v["setup"], v["agent"], f"{v['mtlib_env_steps_per_s']:.1f} ({v['mtlib_vectorization']})",
                  v["sb3_env_steps_per_s"], v["ratio"], v["ratio_sync"], v["ratio_async"],
                  " ".join(f"{x:.2f}" for x in v["ratio_per_round"]), "met" if v["target_met"] else "NOT met"]
                 for v in vs]))
    print(f"CARE / MT-SAC update cost: {cost:.2f} ({cost_source})")
    stem = "rl_speed_quick" if args.quick else "rl_speed"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(mtlib, sb3_results, RESULTS / f"{stem}.png",
         f"Meta-World MT10, hidden {list(args.hidden)}, {args.batch} rows/task/update, 1 update per pool step "
         "(2-core shared machine)")
    write_json(
        f"{stem}.json",
        {
            "care_over_mt_sac_update_cost": cost,
            "care_over_mt_sac_update_cpu_cost": cpu_cost,
            "update_cost_source": cost_source,
            "vs_sb3": vs,
            "target": f"mtlib >= {TARGET}x SB3's env steps/s at equal updates per env step (ratio: mtlib's faster "
            "env.vectorization here, ratio_sync / ratio_async: each)",
            "target_met": all(v["target_met"] for v in vs),
            "mtlib": mtlib,
            "sb3": sb3_results,
            "settings": {
                "benchmark": "Meta-World MT10 (metaworld 3.1.1, reward v2, 150-step episodes, fixed goals)",
                "hidden": list(args.hidden),
                "batch_per_task": args.batch,
                "updates_per_pool_step": 1.0,
                "warmup_pool_steps": args.warmup,
                "untimed_training_pool_steps": args.skip,
                "timed_pool_steps": args.steps,
                "timed_env_steps": args.steps * 10,
                "replay_capacity_per_task": args.capacity,
                "torch_threads": 1,
                "mtlib_env_workers_async": 1,
                "sb3_version": sb3.__version__,
                "quick": args.quick,
                "repeats": args.repeats,
            },
            "note": "2-core machine shared with other engineers' work (tests, training runs) while this ran; the "
            "trainers were run interleaved so the load falls on all of them, but absolute numbers are noisy",
        },
    )


def plot(mtlib: dict[str, dict[str, Any]], sb3: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Bars of env steps/s per trainer (and updates/s written on them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*(f"mtlib {k}" for k in mtlib), *sb3]
    values = [*(v["env_steps_per_s"] for v in mtlib.values()), *(v["env_steps_per_s"] for v in sb3.values())]
    ups = [*(v["updates_per_s"] for v in mtlib.values()), *(v["updates_per_s"] for v in sb3.values())]
    spread = [v["repeats_env_steps_per_s"] for v in [*mtlib.values(), *sb3.values()]]
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["tab:blue"] * len(mtlib) + ["tab:gray"] * len(sb3)
    bars = ax.bar(range(len(names)), values, color=colors)
    for i, runs in enumerate(spread):
        ax.plot([i] * len(runs), runs, "k.", markersize=4)
    for bar, u in zip(bars, ups):
        ax.annotate(f"{u:.1f} upd/s", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("env steps / s (wall clock)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path.relative_to(REPO)}")


def _gcd(a: int, b: int) -> int:
    import math

    return math.gcd(a, b)


if __name__ == "__main__":
    main()
