"""Cost of one SAC update per agent: MT-SAC vs CARE vs MOORE on the point-mass family's spec.

    python benchmarks/rl_update_cost.py                 # 3 repeats of 300 timed updates after 30 warm-up ones
    python benchmarks/rl_update_cost.py --repeats 5 --updates 500

Every agent gets the same SAC settings, ``hidden=[64, 64]`` MLPs, the architecture of its
``configs/agent/*.yaml`` and the same random batch (64 rows, the point-mass spec: obs 2, action 2, 4 tasks,
its shipped 384-d metadata). The agents are timed interleaved (one update of each in turn) so that load from
other processes falls on all of them alike. Each update is timed twice: wall clock and the thread's CPU time
(``time.thread_time``: not counting the time the thread waits for a core, so it is the steadier of the two on
a shared machine). The table gives, per repeat and over repeats, the median milliseconds per update and the
ratio to MT-SAC; the target is CARE at most ``TARGET`` (1.2) times MT-SAC.

Also counted, once per agent: the multiply-add FLOPs of one update (``torch.utils.flop_counter``), the floor
under any speed-up that keeps the architecture.

Importable (``benchmarks/rl_speed.py`` uses it)::

    from rl_update_cost import measure
    result = measure(("mt_sac", "care"))
    result["ms_per_update"]["care"], result["ratio_to_mt_sac"]["care"]

Writes ``benchmarks/results/rl_update_cost.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from common import table, write_json

AGENTS = ("mt_sac", "care", "moore")
TARGET = 1.2


def agent_kwargs(name: str, hidden: Sequence[int] = (64, 64)) -> dict[str, Any]:
    """The agent's ``configs/agent/<name>.yaml`` without Hydra's keys, with ``hidden`` MLPs."""
    from omegaconf import OmegaConf

    from mtrl.config import CONFIG_DIR

    cfg = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/agent/{name}.yaml"))
    assert isinstance(cfg, dict)
    return {k: v for k, v in cfg.items() if not str(k).startswith("_")} | {"hidden": list(hidden)}


def _setup(agents: Sequence[str], batch: int, hidden: Sequence[int], seed: int) -> tuple[dict[str, Any], Any]:
    from mtrl.agents import EnvSpec, SACConfig, Transition, build_agent
    from mtrl.envs import make_family

    spec = EnvSpec.from_family(make_family("pointmass"))
    torch.manual_seed(seed)
    rows = Transition(
        torch.randn(batch, spec.obs_dim),
        torch.rand(batch, spec.action_dim) * 2 - 1,
        torch.randn(batch),
        torch.randn(batch, spec.obs_dim),
        torch.zeros(batch),
        torch.arange(batch) % spec.num_tasks,
    )
    built = {n: build_agent(n, spec, SACConfig(), **agent_kwargs(n, hidden)) for n in agents}
    return built, rows


def measure(
    agents: Sequence[str] = ("mt_sac", "care"),
    *,
    updates: int = 300,
    warmup: int = 30,
    batch: int = 64,
    threads: int = 1,
    hidden: Sequence[int] = (64, 64),
    seed: int = 0,
) -> dict[str, Any]:
    """Median cost of one SAC update of each agent, timed interleaved on the same point-mass batch.

    Returns ``{"ms_per_update": {agent: wall ms}, "cpu_ms_per_update": {agent: thread CPU ms},
    "ratio_to_mt_sac": {agent: wall ratio}, "cpu_ratio_to_mt_sac": {agent: CPU ratio}, "parameters": {agent:
    count}, "settings": {...}}``; the ratios need ``"mt_sac"`` among ``agents``. torch's thread count is set
    to ``threads`` for the measurement and restored after.
    """
    if updates < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"measure needs updates >= 1, warmup >= 0, batch >= 1; got {updates}, {warmup}, {batch}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        built, rows = _setup(agents, batch, hidden, seed)
        wall: dict[str, list[float]] = {n: [] for n in built}
        cpu: dict[str, list[float]] = {n: [] for n in built}
        for i in range(warmup + updates):
            for n, agent in built.items():
                c0, t0 = time.thread_time(), time.perf_counter()
                agent.update(rows)
                t1, c1 = time.perf_counter(), time.thread_time()
                if i >= warmup:
                    wall[n].append(t1 - t0)
                    cpu[n].append(c1 - c0)
    finally:
        torch.set_num_threads(before)
    ms = {n: statistics.median(t) * 1e3 for n, t in wall.items()}
    cpu_ms = {n: statistics.median(t) * 1e3 for n, t in cpu.items()}
    out: dict[str, Any] = {
        "ms_per_update": ms,
        "cpu_ms_per_update": cpu_ms,
        "parameters": {n: sum(p.numel() for p in a.parameters()) for n, a in built.items()},
        "settings": {"updates": updates, "warmup": warmup, "batch": batch, "threads": threads, "hidden": list(hidden)},
    }
    if "mt_sac" in ms:
        out["ratio_to_mt_sac"] = {n: v / ms["mt_sac"] for n, v in ms.items()}
        out["cpu_ratio_to_mt_sac"] = {n: v / cpu_ms["mt_sac"] for n, v in cpu_ms.items()}
    return out


def update_flops(agents: Sequence[str], *, batch: int = 64, hidden: Sequence[int] = (64, 64)) -> dict[str, int]:
    """Matmul FLOPs of one update per agent (after one warm-up update), counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    built, rows = _setup(agents, batch, hidden, 0)
    flops = {}
    for n, agent in built.items():
        agent.update(rows)
        with FlopCounterMode(display=False) as counter:
            agent.update(rows)
        flops[n] = int(counter.get_total_flops())
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="independent measurements (fresh agents each)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    kw = {"updates": args.updates, "warmup": args.warmup, "batch": args.batch, "threads": args.threads}
    runs = []
    for r in range(args.repeats):
        runs.append(measure(AGENTS, seed=r, **kw))
        ratio = runs[-1]["ratio_to_mt_sac"]
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {ratio[n]:.3f}x" for n in AGENTS))
    flops = update_flops(AGENTS, batch=args.batch)

    def over_repeats(key: str) -> dict[str, float]:
        return {n: statistics.median(run[key][n] for run in runs) for n in AGENTS}

    ms, cpu_ms = over_repeats("ms_per_update"), over_repeats("cpu_ms_per_update")
    ratio, cpu_ratio = over_repeats("ratio_to_mt_sac"), over_repeats("cpu_ratio_to_mt_sac")
    params = runs[0]["parameters"]
    rows = [
        [n, params[n], f"{flops[n] / 1e6:.1f}", ms[n], ratio[n], cpu_ms[n], cpu_ratio[n], flops[n] / flops["mt_sac"]]
        for n in AGENTS
    ]
    headers = ["agent", "parameters", "MFLOP/update", "wall ms", "wall ratio", "cpu ms", "cpu ratio", "FLOP ratio"]
    print(table(headers, rows))
    met = ratio["care"] <= TARGET
    print(f"target: CARE <= {TARGET}x MT-SAC per update: {'met' if met else 'NOT met'} ({ratio['care']:.3f}x wall)")
    write_json(
        "rl_update_cost.json",
        {
            "settings": vars(args)
            | {"hidden": [64, 64], "spec": "pointmass (obs 2, action 2, 4 tasks, 384-d metadata)"},
            "median_ms_per_update": ms,
            "median_cpu_ms_per_update": cpu_ms,
            "ratio_to_mt_sac": ratio,
            "cpu_ratio_to_mt_sac": cpu_ratio,
            "per_repeat": [
                {k: run[k] for k in ("ms_per_update", "cpu_ms_per_update", "ratio_to_mt_sac", "cpu_ratio_to_mt_sac")}
                for run in runs
            ],
            "parameters": params,
            "matmul_flops_per_update": flops,
            "flop_ratio_to_mt_sac": {n: flops[n] / flops["mt_sac"] for n in AGENTS},
            "target": {"care_over_mt_sac_at_most": TARGET, "met": met, "measured": ratio["care"]},
            "note": "2-core machine shared with other work; agents timed interleaved; medians over repeats",
        },
    )


if __name__ == "__main__":
    main()
