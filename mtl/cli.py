"""What every Hydra main of mtlib shares (``mtrec-train``, ``mtrl-train``): refusing config keys a command does not
read, building ``_partial_`` strategy configs with errors that name their section, and turning configuration
errors into one line and exit status 2. Only the mains import this module; library code never does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig


def check_config_keys(cfg: DictConfig, known: Sequence[str], program: str) -> None:
    """Refuse top-level config keys ``program`` does not read (a typo, or a group of another command added with
    ``+group=...``), which would otherwise be ignored silently.

    Raises:
        ValueError: naming the first unknown key and the keys ``program`` reads.
    """
    unknown = [k for k in cfg if k not in known]
    if unknown:
        raise ValueError(
            f"config key {unknown[0]!r} is not used by {program} (it reads {', '.join(known)}); remove it, or check "
            "the spelling (a group of another command added with +group=...?)"
        )


def build_partial(section: str, node: Any, **kwargs: Any) -> Any:
    """``instantiate(node)(**kwargs)`` for a ``_partial_`` strategy config; a wrong keyword names the section."""
    try:
        return instantiate(node)(**kwargs)
    except TypeError as err:
        raise ValueError(f"config section {section!r}: {err}") from err


class ConfigErrorExit:
    """Exit status 2, without a traceback, for configuration errors of a Hydra main ``program``: those of the run
    (a ``ValueError``, printed as one line by :meth:`run`) and those Hydra finds while composing the config (an
    override of a key that does not exist, an unknown group option, a group given twice), which Hydra reports
    itself and would end with status 1 (:meth:`main`)."""

    def __init__(self, program: str) -> None:
        self.program = program
        self.started = False  # set once Hydra has composed the config and called the task function

    def run(self, task: Callable[..., Any], *args: Any) -> Any:
        """Call ``task(*args)`` inside the Hydra task function."""
        self.started = True
        try:
            return task(*args)
        except ValueError as err:
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
