"""A ``mtrec-train`` worker for the elastic-restart test: rank ``MTLIB_KILL_RANK`` sends itself SIGKILL just before
training step ``MTLIB_KILL_AT_STEP`` of the job's first attempt (torchrun's ``TORCHELASTIC_RESTART_COUNT`` 0); the
restarted workers run as plain ``mtrec-train`` workers. Run it with ``torchrun ... tests/fault_worker.py OVERRIDES``."""

from __future__ import annotations

import os
import signal

from mtrec.cli.train import main
from mtrec.trainer import Trainer

KILL_AT = int(os.environ.get("MTLIB_KILL_AT_STEP", "-1"))
KILL_RANK = int(os.environ.get("MTLIB_KILL_RANK", "1"))
FIRST_ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
_step = Trainer.train_step


def _train_step(self: Trainer, batch):  # noqa: ANN001, ANN202 - the wrapped method's own signature
    if FIRST_ATTEMPT and self.step == KILL_AT and int(os.environ["RANK"]) == KILL_RANK:
        os.kill(os.getpid(), signal.SIGKILL)
    return _step(self, batch)


Trainer.train_step = _train_step  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
