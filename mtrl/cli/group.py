"""``mtrl-group``: which tasks of a multi-task RL family to train together, under a budget of networks.

Composes ``configs/mtrl_group.yaml`` (everything of ``mtrl.yaml`` plus the grouping keys of
:class:`mtl.grouping.GroupingConfig`, ``task_names`` and ``score``) and calls :func:`mtrl.grouping.run_rl_grouping`;
see that module for the method and the point-mass set whose answer is known. Examples::

    mtrl-group                                               # 3 point-mass goals, higher_order, budget 2
    mtrl-group agent=mt_sac trainer.total_steps=20000 budget=2
    mtrl-group --multirun budget=1,2,3                       # one grouping per budget

The task function returns the selected grouping's objective (the sum of the served per-task losses), lower is
better, so a Hydra sweeper can minimise it. A configuration error prints one line naming the key and exits with
status 2 (:class:`mtl.cli.ConfigErrorExit`).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli import ConfigErrorExit
from mtl.config import CONFIG_PATH
from mtrl.grouping import PROGRAM, run_rl_grouping

__all__ = ["main"]

_EXIT = ConfigErrorExit(PROGRAM)


@hydra.main(config_path=CONFIG_PATH, config_name="mtrl_group", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    result = _EXIT.run(run_rl_grouping, cfg, HydraConfig.get().runtime.output_dir)
    return float(result["objective"])


def main() -> None:
    """``mtrl-group`` (the console script). Configuration errors exit with status 2."""
    _EXIT.main(_hydra_main)


if __name__ == "__main__":
    main()
