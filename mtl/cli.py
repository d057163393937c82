"""What every command-line main of mtlib shares: turning user errors into one line and exit status 2 without a
traceback (``MTLIB_DEBUG=1`` shows it). Only command-line modules (each package's ``cli``) import this module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


def debugging() -> bool:
    """Whether ``MTLIB_DEBUG`` asks for tracebacks of user errors too (any value but empty or ``0``)."""
    return os.environ.get("MTLIB_DEBUG", "") not in ("", "0")


class ConfigErrorExit:
    """Exit status 2, without a traceback, for configuration errors of a Hydra main ``program``: those of the run
    (a ``ValueError``, printed as one line by :meth:`run`) and those Hydra finds while composing the config (an
    override of a key that does not exist, an unknown group option, a group given twice), which Hydra reports
    itself and would end with status 1 (:meth:`main`)."""

    def __init__(self, program: str) -> None:
        self.program = program
        self.started = False  # set once Hydra has composed the config and called the task function

    def run(self, task: Callable[..., Any], *args: Any) -> Any:
        """Call ``task(*args)`` inside the Hydra task function (``MTLIB_DEBUG=1``: let the error show its traceback)."""
        self.started = True
        try:
            return task(*args)
        except ValueError as err:
            if debugging():
                raise
            print(f"{self.program}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def main(self, hydra_main: Callable[[], Any]) -> None:
        """Call the ``@hydra.main`` function (the console script's body)."""
        self.started = False
        try:
            hydra_main()
        except SystemExit as stop:
            if stop.code == 1 and not self.started:
                raise SystemExit(2) from None
            raise
