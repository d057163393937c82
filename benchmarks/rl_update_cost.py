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

Also counted, once per agent: the matmul FLOPs of one update (``torch.utils.flop_counter``) and, with the
measured single-thread matmul rate, the floor they put under the CPU ratio for any speed-up that keeps the
architecture (``--baseline`` adds every agent timed as before the fused encoders and fused Adam).

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
from common import agent_kwargs, random_transition, table, write_json

AGENTS = ("mt_sac", "care", "moore")
TARGET = 1.2


BASELINE = "/autograd+foreach"


def _as_baseline(agent: Any) -> Any:
    """``agent`` computing as before the fused encoders: CARE's encoder and MOORE's Gram-Schmidt through plain
    autograd (:func:`~mtrl.encoders.care_representation`, :func:`~mtrl.encoders.gram_schmidt_reference`) and
    ``foreach`` Adam instead of fused Adam (same parameters, same values)."""
    from mtrl import encoders as enc

    class AutogradCARE(enc.CAREEncoder):
        def forward(self, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
            params = [t for m in self._layers() for t in (m.weight, m.bias)]
            return enc.care_representation(obs, task, self.metadata, params, self._n_context, self.temperature)

    class AutogradMOORE(enc.MOOREEncoder):
        def forward(self, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
            u = enc.gram_schmidt_reference(self.experts(obs))
            out = torch.einsum("bk,kbd->bd", self.weights(task).to(u.dtype), u)
            return torch.tanh(out) if self.activation == "tanh" else out

    for module in agent.modules():
        if type(module) is enc.CAREEncoder:
            module.__class__ = AutogradCARE
        elif type(module) is enc.MOOREEncoder:
            module.__class__ = AutogradMOORE
    for name in ("actor", "critic", "temperature"):
        opt = getattr(agent, f"{name}_optimizer")
        params = [p for g in opt.param_groups for p in g["params"]]
        setattr(agent, f"{name}_optimizer", torch.optim.Adam(params, lr=opt.param_groups[0]["lr"], foreach=True))
    return agent


def _setup(agents: Sequence[str], batch: int, hidden: Sequence[int], seed: int) -> tuple[dict[str, Any], Any]:
    """The agents (a name ending in ``BASELINE`` gets :func:`_as_baseline`) and one random point-mass batch."""
    from mtrl.agents import EnvSpec, SACConfig, build_agent
    from mtrl.envs import make_family

    spec = EnvSpec.from_family(make_family("pointmass"))
    torch.manual_seed(seed)
    rows = random_transition(spec, batch)
    built = {}
    for n in agents:
        base = n.removesuffix(BASELINE)
        agent = build_agent(base, spec, SACConfig(), **agent_kwargs(base, hidden))
        built[n] = _as_baseline(agent) if n.endswith(BASELINE) else agent
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
    count}, "settings": {...}}``; the ratios need ``"mt_sac"`` among ``agents``. An agent named
    ``"<agent>/autograd+foreach"`` is timed as before the fused encoders and fused Adam (:func:`_as_baseline`)
    and compared with ``"mt_sac/autograd+foreach"`` when that is measured too. torch's thread count is set to
    ``threads`` for the measurement and restored after.
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

        def ref(n: str) -> str:
            return "mt_sac" + BASELINE if n.endswith(BASELINE) and "mt_sac" + BASELINE in ms else "mt_sac"

        out["ratio_to_mt_sac"] = {n: v / ms[ref(n)] for n, v in ms.items()}
        out["cpu_ratio_to_mt_sac"] = {n: v / cpu_ms[ref(n)] for n, v in cpu_ms.items()}
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


def matmul_gflops(threads: int = 1, repeats: int = 2000) -> float:
    """Single-thread rate of the update's dominant product (the experts' grouped ``[4, 64, 64] @ [4, 64, 64]``),
    GFLOP/s of thread CPU time, median over ``repeats``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(4, 64, 64), torch.randn(4, 64, 64)
        for _ in range(100):
            torch.bmm(a, b)
        times = []
        for _ in range(repeats):
            c0 = time.thread_time()
            torch.bmm(a, b)
            times.append(time.thread_time() - c0)
    finally:
        torch.set_num_threads(before)
    return 2 * 4 * 64**3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="independent measurements (fresh agents each)")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also time every agent as before the fused encoders and fused Adam (<agent>/autograd+foreach)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    kw = {"updates": args.updates, "warmup": args.warmup, "batch": args.batch, "threads": args.threads}
    names = [*AGENTS, *(n + BASELINE for n in AGENTS)] if args.baseline else list(AGENTS)
    runs = []
    for r in range(args.repeats):
        runs.append(measure(names, seed=r, **kw))
        ratio, cpu_ratio = runs[-1]["ratio_to_mt_sac"], runs[-1]["cpu_ratio_to_mt_sac"]
        print(
            f"repeat {r + 1}/{args.repeats} (wall / cpu ratio): "
            + ", ".join(f"{n} {ratio[n]:.3f}x / {cpu_ratio[n]:.3f}x" for n in names)
        )
    flops = update_flops(AGENTS, batch=args.batch)
    gflops = matmul_gflops(args.threads)

    def over_repeats(key: str) -> dict[str, float]:
        return {n: statistics.median(run[key][n] for run in runs) for n in names}

    ms, cpu_ms = over_repeats("ms_per_update"), over_repeats("cpu_ms_per_update")
    ratio, cpu_ratio = over_repeats("ratio_to_mt_sac"), over_repeats("cpu_ratio_to_mt_sac")
    params = runs[0]["parameters"]
    base = {n: n.removesuffix(BASELINE) for n in names}
    rows = [
        [n, params[n], f"{flops[base[n]] / 1e6:.1f}", ms[n], ratio[n], cpu_ms[n], cpu_ratio[n]]
        + [flops[base[n]] / flops["mt_sac"]]
        for n in names
    ]
    headers = ["agent", "parameters", "MFLOP/update", "wall ms", "wall ratio", "cpu ms", "cpu ratio", "FLOP ratio"]
    print(table(headers, rows))
    # A floor under any exact speed-up: MT-SAC's time plus CARE's extra multiply-adds at the measured matmul
    # rate, as if every other extra cost (operators, autograd, Adam over 8x the parameters) were gone.
    floor = {n: 1 + (flops[n] - flops["mt_sac"]) / (gflops * 1e9) / (cpu_ms["mt_sac"] / 1e3) for n in AGENTS}
    print(
        f"matmul rate {gflops:.0f} GFLOP/s; FLOP floor of the CPU ratio: "
        + ", ".join(f"{n} {floor[n]:.2f}x" for n in AGENTS if n != "mt_sac")
    )
    met = ratio["care"] <= TARGET and cpu_ratio["care"] <= TARGET
    print(
        f"target: CARE <= {TARGET}x MT-SAC per update: {'met' if met else 'NOT met'} "
        f"({ratio['care']:.3f}x wall, {cpu_ratio['care']:.3f}x thread CPU)"
    )
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
            "matmul_gflops": gflops,
            "flop_floor_cpu_ratio": floor,
            "flop_floor_note": "MT-SAC's CPU ms plus the agent's extra matmul FLOPs at matmul_gflops: the ratio if "
            "every other extra cost were gone",
            "target": {
                "care_over_mt_sac_at_most": TARGET,
                "met": met,
                "measured_wall": ratio["care"],
                "measured_cpu": cpu_ratio["care"],
            },
            "note": "2-core machine shared with other work; agents timed interleaved; medians over repeats",
        },
    )


if __name__ == "__main__":
    main()
