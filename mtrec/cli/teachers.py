"""``mtrec-teachers``: one single-task teacher per task, for knowledge distillation (``configs/teachers.yaml``:
the ``mtrec-train`` config with ``model=single_task``; every ``mtrec-train`` override works).

Examples::

    mtrec-teachers data=census hydra.run.dir=runs/teachers
    mtrec-teachers model=shared_bottom 'task_names=[click,dwell]' trainer.max_epochs=5
    mtrec-train distill=soft distill.teachers=runs/teachers/teachers.json          # the student

Trains each teacher into ``<run dir>/<task>/`` and writes ``<run dir>/teachers.json``
(:func:`mtrec.train.train_teachers`; :mod:`mtrec.distill` describes the manifest). The task function returns the
mean monitored validation score of the teachers (larger is better). Configuration errors print one line and exit
with status 2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli import ConfigErrorExit
from mtl.config import CONFIG_PATH
from mtrec.distill import MANIFEST
from mtrec.train import teachers_score, train_teachers

PROGRAM = "mtrec-teachers"
_EXIT = ConfigErrorExit(PROGRAM)
log = logging.getLogger("mtrec")


def _report(manifest: dict[str, Any], out: str) -> float:
    for task, entry in manifest["teachers"].items():
        log.info("teacher %s: val %s test %s", task, entry["val"], entry["test"])
    log.info("manifest: %s", Path(out) / MANIFEST)
    return teachers_score(manifest)


@hydra.main(config_path=CONFIG_PATH, config_name="teachers", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    out = HydraConfig.get().runtime.output_dir
    return _report(_EXIT.run(train_teachers, cfg, out, PROGRAM), out)


def main() -> None:
    """``mtrec-teachers`` (the console script). Configuration errors exit with status 2."""
    _EXIT.main(_hydra_main)


if __name__ == "__main__":
    main()
