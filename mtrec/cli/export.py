"""``mtrec-export`` (also ``mtlib-export``): a trained ``mtrec-train`` run -> ONNX -> a Triton-layout model
repository (``configs/export.yaml``, schema :class:`mtrec.export.ExportConfig`).

Examples::

    mtrec-export run_dir=outputs/mtrec/2025-01-01/12-00-00 repository=models model_name=ranker
    mtrec-export run_dir=RUN repository=models model_name=ranker version=7 fp16=true
    mtrec-export run_dir=RUN repository=models model_name=ranker serving.max_batch_size=256 checkpoint=last

Writes ``REPO/NAME/config.pbtxt``, ``REPO/NAME/features.json`` and ``REPO/NAME/VERSION/{model.onnx,export.json}``
(:func:`mtrec.export.export_run`). It trains nothing, so its task function returns nothing for a sweeper. A
configuration error, or a ``run_dir`` that is missing or no ``mtrec-train`` run (an ``mtrl-train`` run, say),
prints one line and exits with status 2.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mtl.cli import ConfigErrorExit
from mtl.config import CONFIG_PATH
from mtrec.export import export_run

PROGRAM = "mtrec-export"
_EXIT = ConfigErrorExit(PROGRAM)


@hydra.main(config_path=CONFIG_PATH, config_name="export", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    _EXIT.run(export_run, cfg)


def main() -> None:
    """``mtrec-export`` (the console script). Configuration errors exit with status 2."""
    _EXIT.main(_hydra_main)


if __name__ == "__main__":
    main()
