"""``mtrl-distill``: distil single-task teacher runs into one multi-task student (Hydra over
``configs/mtrl_distill.yaml``, which calls :func:`mtrl.distill.distill_run`).

    mtrl-distill teachers=runs/teachers/teachers.json hydra.run.dir=runs/student
    mtrl-distill teachers=my_teachers.yaml agent=care trainer.updates=5000 distill.student_fraction=0.8
    mtrl-distill teachers=T hydra.run.dir=runs/student trainer.resume=true trainer.updates=10000   # continue
    python -m mtrl.cli.distill ...                 # the same without the console script

The manifest names each task's teacher: the ``teachers.json`` of :func:`mtrl.distill.train_teachers` (one
``mtrl-train`` run per task), or a JSON/YAML file ``teachers: {task: run_dir}`` (a run directory may be a
multi-task run, serving each task it trained; :func:`mtrl.distill.read_teacher_manifest`). What a run writes:
:func:`mtrl.distill.distill_run`. A configuration or manifest mistake prints one line naming the key, task or path
and exits with status 2. The Hydra main returns the student's final mean success rate.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli import ConfigErrorExit
from mtl.config import CONFIG_PATH
from mtrl.distill import PROGRAM, distill_run
from mtrl.evaluate import format_table

__all__ = ["distill", "main"]

_EXIT = ConfigErrorExit(PROGRAM)


def _distill(cfg: DictConfig, run_dir: str) -> float:
    result = distill_run(cfg, run_dir)
    rows = {
        "tasks": {
            name: {"success": r["student"]["success"], "return": r["student"]["return"]}
            for name, r in result["tasks"].items()
        },
        "mean_success": result["mean_success"]["student"],
        "mean_return": result["mean_return"]["student"],
    }
    teachers = {**rows, "tasks": {n: r["teacher"] for n, r in result["tasks"].items()}}
    teachers.update(mean_success=result["mean_success"]["teacher"], mean_return=result["mean_return"]["teacher"])
    print(f"teachers ({result['episodes']} deterministic episodes per task, seed {result['seed']}):")
    print(format_table(teachers))
    print(f"student {result['agent']} after {result['update']} distillation updates:")
    print(format_table(rows))
    print(f"wrote {run_dir}/distill_eval.json")
    return float(result["mean_success"]["student"])


@hydra.main(config_path=CONFIG_PATH, config_name="mtrl_distill", version_base="1.3")
def distill(cfg: DictConfig) -> float:
    """Distil into Hydra's run directory; returns the student's final mean success rate."""
    return _EXIT.run(_distill, cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """``mtrl-distill``. Configuration and manifest errors exit with status 2 (:class:`mtl.cli.ConfigErrorExit`)."""
    _EXIT.main(distill)


if __name__ == "__main__":
    main()
