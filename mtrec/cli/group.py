"""``mtlib-group``: which tasks of a recommendation dataset to train together, under an inference budget.

Composes ``configs/group.yaml`` (everything of ``mtrec.yaml`` plus the grouping keys of
:class:`mtl.grouping.GroupingConfig`) and calls :func:`mtrec.grouping.run_grouping`; see that module for the
methods. Examples::

    mtlib-group                                                # higher_order, budget 2, synthetic data
    mtlib-group method=tag budget=1.5 tag.every=10
    mtlib-group data=census data.path=PATH method=pairs budget=1 half_size=true
    mtlib-group --multirun budget=1.5,2,3                      # one grouping per budget

The task function returns the selected grouping's objective (the sum of the served validation losses; for
``method=tag`` minus the summed affinity), lower is better, so a Hydra sweeper can minimise it. A configuration
error prints one line naming the key and exits with status 2 (:class:`mtl.cli.ConfigErrorExit`).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli import ConfigErrorExit
from mtl.config import CONFIG_PATH
from mtrec.grouping import run_grouping

PROGRAM = "mtlib-group"
_EXIT = ConfigErrorExit(PROGRAM)


@hydra.main(config_path=CONFIG_PATH, config_name="group", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    result = _EXIT.run(run_grouping, cfg, HydraConfig.get().runtime.output_dir)
    return float(result["objective"])


def main() -> None:
    """``mtlib-group`` (the console script). Configuration errors exit with status 2."""
    _EXIT.main(_hydra_main)


if __name__ == "__main__":
    main()
