"""``mtrec-train``: train a multi-task ranking model from the Hydra config tree (``configs/mtrec.yaml``).

Examples::

    mtrec-train                                            # MMoE on synthetic sparse data
    mtrec-train data=census data.path=PATH model=mmoe      # MMoE on Census-Income
    mtrec-train experiment=census_mmoe                     # a README benchmark row (configs/experiment/)
    mtrec-train model=ple trainer.max_steps=500 tasks.income.lr=0.01
    mtrec-train hydra.run.dir=runs/a trainer.resume=true   # continue an interrupted run
    mtrec-train trainer.nproc_per_node=2 data=files ...    # 2 ranks (DMP), through torch.distributed.run
    torchrun --nproc_per_node=2 $(which mtrec-train) ...   # the same, launched by torchrun
    mtrec-train -m hydra/sweeper=optuna model.num_experts=4,8,16   # a sweep (with hydra-optuna-sweeper)

The task function returns the monitored validation score of the best checkpoint (``trainer.monitor``: the mean
validation AUC, or minus the mean validation loss; larger is better), so a Hydra sweeper can maximise it.

A configuration error (a ``ValueError``: a typo in a key, a value out of range, a key no part of the run reads
such as ``+agent=care``, a group of ``mtrl-train``, an unknown task, a bad data file) prints one line naming what
to fix and exits with status 2 (``MTLIB_DEBUG=1`` shows the traceback); see :mod:`mtrec.train` for the library.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.cli import ConfigErrorExit
from mtl.config import CONFIG_PATH
from mtrec.train import PROGRAM, train_and_evaluate

_EXIT = ConfigErrorExit(PROGRAM)


@hydra.main(config_path=CONFIG_PATH, config_name="mtrec", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    return _EXIT.run(train_and_evaluate, cfg, HydraConfig.get().runtime.output_dir).score


def _launch_request(argv: list[str]) -> tuple[int, int]:
    """``trainer.nproc_per_node`` and ``trainer.max_restarts`` of the command line (1 and 0 when not given)."""
    values = {"trainer.nproc_per_node": 1, "trainer.max_restarts": 0}
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key in values:
            try:
                values[key] = int(value)
            except ValueError:
                raise SystemExit(f"{PROGRAM}: {key} must be an integer, got {value!r}") from None
    return values["trainer.nproc_per_node"], values["trainer.max_restarts"]


def main() -> None:
    """``mtrec-train`` (the console script). Configuration errors exit with status 2. ``trainer.nproc_per_node=N``
    (N > 1) outside torchrun launches N workers through ``torch.distributed.run`` (:func:`mtrec.distributed.launch`)."""
    import sys

    from mtrec.distributed import launch, under_torchrun

    nproc, restarts = _launch_request(sys.argv[1:])
    if nproc > 1 and not under_torchrun():
        sys.exit(launch(nproc, sys.argv[1:], max_restarts=restarts))
    _EXIT.main(_hydra_main)


if __name__ == "__main__":
    main()
