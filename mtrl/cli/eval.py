"""``mtrl-eval``: per-task success rate and mean return of a trained ``mtrl-train`` run (Hydra over
``configs/mtrl_eval.yaml``, schema :class:`mtrl.evaluate.EvalConfig`).

    mtrl-eval run_dir=outputs/mtrl/2025-01-01/12-00-00 episodes=20
    mtrl-eval run_dir=RUN video=true                  # + one rgb_array video per task
    mtrl-eval run_dir=RUN gif_dir=RUN/gifs gif_size=96  # + one small GIF per task (headless: MUJOCO_GL=egl)
    python -m mtrl.cli.eval run_dir=RUN               # the same without the console script

Prints a table and writes ``RUN/evaluation.json`` (:func:`mtrl.evaluate.evaluate_run`). A directory that is not an
``mtrl-train`` run (missing, a recommendation run of ``mtrec-train``, no checkpoint yet) is reported in a line that
says what to pass instead, with exit status 2. The Hydra main returns the mean success rate.
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from mtl.cli import ConfigErrorExit
from mtl.config import CONFIG_PATH
from mtrl.evaluate import EvalConfig, evaluate_run

__all__ = ["evaluate", "main"]

PROGRAM = "mtrl-eval"
_EXIT = ConfigErrorExit(PROGRAM)

# configs/mtrl_eval.yaml's defaults list starts from this schema, so Hydra refuses unknown keys while composing.
ConfigStore.instance().store(name="mtrl_eval_schema", node=EvalConfig)


def _evaluate(cfg: DictConfig) -> float:
    return float(evaluate_run(cfg)["mean_success"])


@hydra.main(config_path=CONFIG_PATH, config_name="mtrl_eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> float:
    """Evaluate ``cfg.run_dir``; returns the mean success rate over tasks."""
    return _EXIT.run(_evaluate, cfg)


def main() -> None:
    """``mtrl-eval``. Configuration errors and directories that are not runs exit with status 2."""
    _EXIT.main(evaluate)


if __name__ == "__main__":
    main()
