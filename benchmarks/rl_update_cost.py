"""Cost of one SAC update per agent: MT-SAC vs CARE vs MOORE on the point-mass family's spec.

    python benchmarks/rl_update_cost.py            # 300 timed updates per agent after 30 warm-up ones
    python benchmarks/rl_update_cost.py --updates 100

Every agent gets the same SAC settings, ``hidden=[64, 64]`` MLPs, the architecture of its
``configs/agent/*.yaml`` and the same random batch (64 rows, the point-mass spec: obs 2, action 2, 4 tasks,
its shipped metadata). The agents are timed interleaved (one update of each in turn) so that load from other
processes falls on all of them alike; the table gives the median seconds per update and the ratio to MT-SAC.

Writes ``benchmarks/results/rl_update_cost.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from common import table, write_json

AGENTS = ("mt_sac", "care", "moore")


def agent_kwargs(name: str) -> dict[str, Any]:
    """The agent's ``configs/agent/<name>.yaml`` without Hydra's keys."""
    from omegaconf import OmegaConf

    from mtrl.config import CONFIG_DIR

    cfg = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/agent/{name}.yaml"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")} | {"hidden": [64, 64]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mtrl.agents import EnvSpec, SACConfig, Transition, build_agent
    from mtrl.envs import make_family

    family = make_family("pointmass")
    spec = EnvSpec.from_family(family)
    torch.manual_seed(0)
    b = args.batch
    batch = Transition(
        torch.randn(b, spec.obs_dim),
        torch.rand(b, spec.action_dim) * 2 - 1,
        torch.randn(b),
        torch.randn(b, spec.obs_dim),
        torch.zeros(b),
        torch.arange(b) % spec.num_tasks,
    )
    agents = {n: build_agent(n, spec, SACConfig(), **agent_kwargs(n)) for n in AGENTS}
    times: dict[str, list[float]] = {n: [] for n in AGENTS}
    for i in range(args.warmup + args.updates):
        for n, agent in agents.items():
            t0 = time.perf_counter()
            agent.update(batch)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[n].append(dt)
    median = {n: statistics.median(t) for n, t in times.items()}
    params = {n: sum(p.numel() for p in a.parameters()) for n, a in agents.items()}
    rows = [[n, params[n], median[n] * 1e3, median[n] / median["mt_sac"]] for n in AGENTS]
    print(table(["agent", "parameters", "median ms / update", "ratio to mt_sac"], rows))
    write_json(
        "rl_update_cost.json",
        {
            "settings": vars(args)
            | {
                "hidden": [64, 64],
                "spec": {"obs_dim": spec.obs_dim, "action_dim": spec.action_dim, "num_tasks": spec.num_tasks},
            },
            "median_seconds": median,
            "ratio_to_mt_sac": {n: median[n] / median["mt_sac"] for n in AGENTS},
            "parameters": params,
            "note": "2-core machine shared with other work; agents timed interleaved",
        },
    )


if __name__ == "__main__":
    main()
