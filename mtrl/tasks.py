"""Task-name tables of the task families: Meta-World's MT10 and MT50 task lists and the point-mass goals' angles
and names.

They live apart from the families (:mod:`mtrl.envs`) and from their metadata (:mod:`mtrl.metadata`), which both
need them, and import nothing else of the project, so either side can import them (and ``metaworld`` need not be
installed to know MT10's tasks).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BENCHMARKS",
    "MT10_TASKS",
    "MT50_TASKS",
    "format_angle",
    "pointmass_goal_angles",
    "pointmass_task_name",
]

MT10_TASKS: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
"""Meta-World 3.1.1's MT10 tasks in its order (``metaworld.env_dict.MT10_V3``)."""

MT50_TASKS: tuple[str, ...] = (
    "assembly-v3",
    "basketball-v3",
    "bin-picking-v3",
    "box-close-v3",
    "button-press-topdown-v3",
    "button-press-topdown-wall-v3",
    "button-press-v3",
    "button-press-wall-v3",
    "coffee-button-v3",
    "coffee-pull-v3",
    "coffee-push-v3",
    "dial-turn-v3",
    "disassemble-v3",
    "door-close-v3",
    "door-lock-v3",
    "door-open-v3",
    "door-unlock-v3",
    "hand-insert-v3",
    "drawer-close-v3",
    "drawer-open-v3",
    "faucet-open-v3",
    "faucet-close-v3",
    "hammer-v3",
    "handle-press-side-v3",
    "handle-press-v3",
    "handle-pull-side-v3",
    "handle-pull-v3",
    "lever-pull-v3",
    "pick-place-wall-v3",
    "pick-out-of-hole-v3",
    "pick-place-v3",
    "plate-slide-v3",
    "plate-slide-side-v3",
    "plate-slide-back-v3",
    "plate-slide-back-side-v3",
    "peg-insert-side-v3",
    "peg-unplug-side-v3",
    "soccer-v3",
    "stick-push-v3",
    "stick-pull-v3",
    "push-v3",
    "push-wall-v3",
    "push-back-v3",
    "reach-v3",
    "reach-wall-v3",
    "shelf-place-v3",
    "sweep-into-v3",
    "sweep-v3",
    "window-open-v3",
    "window-close-v3",
)
"""Meta-World 3.1.1's MT50 tasks in its order (``metaworld.env_dict.MT50_V3``)."""

BENCHMARKS: dict[str, tuple[str, ...]] = {"mt10": MT10_TASKS, "mt50": MT50_TASKS}
"""Meta-World family name -> ordered task names."""


def pointmass_goal_angles(num_goals: int) -> np.ndarray:
    """Angles in degrees, counter-clockwise from the positive x axis, of ``num_goals`` evenly spread goals."""
    if isinstance(num_goals, bool) or not isinstance(num_goals, int) or num_goals < 1:
        raise ValueError(f"num_goals must be an integer >= 1, got {num_goals!r}")
    return np.arange(num_goals, dtype=np.float64) * (360.0 / num_goals)


def format_angle(angle_deg: float) -> str:
    """An angle in degrees as task names and descriptions write it: one decimal, no trailing zero (``"51.4"``)."""
    return f"{round(float(angle_deg), 1):g}"


def pointmass_task_name(angle_deg: float) -> str:
    """Task name of the point-mass goal at ``angle_deg`` (e.g. ``"goal-90deg"``, ``"goal-51.4deg"``).

    Names depend on the angle only, so the goal at 90 degrees is the same task (with the same metadata) in
    every family whose K makes it a goal.
    """
    return f"goal-{format_angle(angle_deg)}deg"
