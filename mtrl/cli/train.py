"""``mtrl-train``: train a multi-task SAC agent on a task family (Hydra over ``configs/mtrl.yaml``).

    mtrl-train                                        # CARE on the 4-goal point-mass, the quick start
    mtrl-train agent=mt_sac gradient=pcgrad seed=1
    mtrl-train experiment=mtrl_pointmass_paper        # SAC-paper-scale settings (configs/experiment/)
    python -m mtrl.cli.train ...                      # the same without the console script

What a run does and writes: :mod:`mtrl.train`. The Hydra main returns the run's :func:`mtrl.train.monitored_metric`
(the final evaluation's mean success rate), so a sweeper (``--multirun hydra/sweeper=optuna``) can maximise it.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli import ConfigErrorExit
from mtl.config import CONFIG_PATH
from mtrl.config import PROGRAM
from mtrl.train import monitored_metric, run

__all__ = ["main", "train"]

_EXIT = ConfigErrorExit(PROGRAM)


def _train(cfg: DictConfig, run_dir: str) -> float:
    return monitored_metric(run(cfg, run_dir))


@hydra.main(config_path=CONFIG_PATH, config_name="mtrl", version_base="1.3")
def train(cfg: DictConfig) -> float:
    """Train into Hydra's run directory; returns the final mean success rate."""
    return _EXIT.run(_train, cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """``mtrl-train``. Configuration errors exit with status 2 (:class:`mtl.cli.ConfigErrorExit`)."""
    _EXIT.main(train)


if __name__ == "__main__":
    main()
