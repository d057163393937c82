"""Helpers shared by the benchmark scripts: config composition, tables, JSON results, plots."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def compose(*overrides: str):
    """The ``mtrec`` config with overrides, as ``mtrec-train`` would see it."""
    from hydra import compose as _compose
    from hydra import initialize_config_module

    from mtl.config import CONFIG_PATH

    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        return _compose(config_name="mtrec", overrides=list(overrides))


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (prints well in a terminal too)."""

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


class RunLog:
    """JSON-lines log of finished trainings keyed by everything that determines them; reused on a rerun.

    ``path`` holds one ``{"key": ..., "record": ...}`` line per training (``fresh``: ignore what is there; a line
    that does not parse is skipped). :meth:`get_or_run` returns the logged record of a key or runs ``fn`` and
    appends its record. ``reused`` counts the records taken from the log, and ``seconds`` sums the ``"seconds"``
    of every record returned (reused or run: the wall time of the trainings the results use, when they ran).
    """

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        self.reused = 0
        self.seconds = 0.0
        if path.exists() and not fresh:
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.done[entry["key"]] = entry["record"]

    def get_or_run(self, key: dict[str, Any], fn: Any) -> dict:
        k = json.dumps(key, sort_keys=True)
        if k in self.done:
            self.reused += 1
            self.seconds += float(self.done[k].get("seconds") or 0.0)
            return self.done[k]
        record = fn()
        self.seconds += float(record.get("seconds") or 0.0)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": k, "record": record}) + "\n")
        self.done[k] = record
        return record


def agent_kwargs(name: str, hidden: Sequence[int] = (64, 64)) -> dict[str, Any]:
    """The agent's ``configs/agent/<name>.yaml`` without Hydra's keys, with ``hidden`` MLPs."""
    from omegaconf import OmegaConf

    from mtrl.config import CONFIG_DIR

    cfg = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/agent/{name}.yaml"))
    assert isinstance(cfg, dict)
    return {k: v for k, v in cfg.items() if not str(k).startswith("_")} | {"hidden": list(hidden)}


def random_transition(spec: Any, rows: int) -> Any:
    """A :class:`mtrl.agents.Transition` of ``rows`` random rows shaped by ``spec`` (an ``EnvSpec``), drawn from
    torch's global generator (seed it first): normal observations and rewards, uniform actions in ``[-1, 1]``,
    no episode ends, tasks ``0, 1, ..., num_tasks - 1`` in turn."""
    import torch

    from mtrl.agents import Transition

    return Transition(
        torch.randn(rows, spec.obs_dim),
        torch.rand(rows, spec.action_dim) * 2 - 1,
        torch.randn(rows),
        torch.randn(rows, spec.obs_dim),
        torch.zeros(rows),
        torch.arange(rows) % spec.num_tasks,
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
