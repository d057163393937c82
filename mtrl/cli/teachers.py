"""``mtrl-teachers``: one single-task SAC teacher per task, for ``mtrl-distill`` (Hydra over
``configs/mtrl_teachers.yaml``: the ``mtrl-train`` config with ``agent=mt_sac`` and a ``tasks`` key, which calls
:func:`mtrl.distill.train_teachers`).

    mtrl-teachers hydra.run.dir=runs/teachers                                   # every task of the env
    mtrl-teachers hydra.run.dir=runs/teachers 'tasks=[goal-0deg,goal-90deg]'   # only these tasks
    mtrl-teachers env=mt10 trainer.total_steps=200000 trainer.device=cuda hydra.run.dir=runs/mt10-teachers
    mtrl-distill teachers=runs/teachers/teachers.json hydra.run.dir=runs/student # the student
    python -m mtrl.cli.teachers ...                 # the same without the console script

Each teacher is an ``mtrl-train`` run in ``<run dir>/<task>/`` on its task alone; ``<run dir>/teachers.json`` lists
them (rewritten after every teacher). Running the same command again reuses finished teachers and continues an
interrupted one from its ``last.pt`` (exact resume), so a long job may be stopped and restarted at will; what counts
as finished and what is refused: :func:`mtrl.distill.train_teachers`. A configuration mistake (a key no part of a run
reads, a mistyped group key, an unknown task name) prints one line naming it and exits with status 2 before any
teacher trains. The Hydra main returns the teachers' mean success rate, each on its own task.
"""

from __future__ import annotations

from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli import ConfigErrorExit
from mtl.config import CONFIG_PATH
from mtrl.distill import MANIFEST, train_teachers
from mtrl.evaluate import format_table

__all__ = ["PROGRAM", "main", "teachers"]

PROGRAM = "mtrl-teachers"
_EXIT = ConfigErrorExit(PROGRAM)


def _teachers(cfg: DictConfig, run_dir: str) -> float:
    manifest: dict[str, Any] = train_teachers(cfg, run_dir, None, PROGRAM)
    rows = {n: {"success": e["success"], "return": e["return"]} for n, e in manifest["teachers"].items()}
    mean_success = sum(r["success"] for r in rows.values()) / len(rows)
    mean_return = sum(r["return"] for r in rows.values()) / len(rows)
    episodes = cfg.trainer.eval_episodes
    print(f"teachers ({episodes} deterministic episodes each, on its own task):")
    print(format_table({"tasks": rows, "mean_success": mean_success, "mean_return": mean_return}))
    print(f"wrote {run_dir}/{MANIFEST}; next: mtrl-distill teachers={run_dir}/{MANIFEST}")
    return float(mean_success)


@hydra.main(config_path=CONFIG_PATH, config_name="mtrl_teachers", version_base="1.3")
def teachers(cfg: DictConfig) -> float:
    """Train the teachers into Hydra's run directory; returns their mean success rate."""
    return _EXIT.run(_teachers, cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """``mtrl-teachers``. Configuration errors exit with status 2 (:class:`mtl.cli.ConfigErrorExit`)."""
    _EXIT.main(teachers)


if __name__ == "__main__":
    main()
