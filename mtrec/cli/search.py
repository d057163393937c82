"""``mtlib-search``: search which experts each task shares, with ENAS (Pham et al., ICML 2018) on shared weights.

Composes ``configs/search.yaml`` (everything of ``mtrec.yaml`` plus the ``search`` node of
:class:`mtrec.search.SearchConfig`) and calls :func:`mtrec.search.run_search`; see that module for the search
space, the controller and the outputs. Examples::

    mtlib-search                                              # synthetic data, 2 levels x 2 shared experts
    mtlib-search data=census search.levels=2 search.experts=4
    mtlib-search data=mmoe_synthetic search.reward=loss weighting=uncertainty gradient=pcgrad
    mtlib-search hydra.run.dir=runs/s search.resume=true      # continue an interrupted search

The task function returns the chosen child's validation reward with the shared weights (larger is better), so a
Hydra sweeper can maximise it. A configuration error prints one line naming the key and exits with status 2
(:class:`mtl.cli.ConfigErrorExit`).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli import ConfigErrorExit
from mtl.config import CONFIG_PATH
from mtrec.search import PROGRAM, run_search

_EXIT = ConfigErrorExit(PROGRAM)


@hydra.main(config_path=CONFIG_PATH, config_name="search", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    result = _EXIT.run(run_search, cfg, HydraConfig.get().runtime.output_dir)
    return float(result["reward"])


def main() -> None:
    """``mtlib-search`` (the console script). Configuration errors exit with status 2."""
    _EXIT.main(_hydra_main)


if __name__ == "__main__":
    main()
