"""Parameter groups with their own learning rates for shared and task-specific parameters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from mtl.tasks import TaskSpec

SHARED = "shared"


def build_param_groups(
    groups: Mapping[str, Iterable[nn.Parameter]],
    tasks: Sequence[TaskSpec],
    *,
    lr: float,
    weight_decay: float = 0.0,
    shared_lr: float | None = None,
    shared_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Turn a model's ``{"shared": params, task: params, ...}`` split into optimiser param groups.

    Each group is tagged with ``name`` so weighting, gradient modulation and logging can find it.
    The shared group uses ``shared_lr`` (default ``lr``); a task's group uses the task's ``lr``
    (default ``lr``). Every trainable parameter must appear in exactly one group.
    """
    task_by_name = {t.name: t for t in tasks}
    unknown = set(groups) - set(task_by_name) - {SHARED}
    if unknown:
        raise ValueError(f"parameter groups {sorted(unknown)} name no task; tasks: {sorted(task_by_name)}")
    seen: set[int] = set()
    out: list[dict[str, Any]] = []
    for name, params in groups.items():
        plist = [p for p in params if p.requires_grad]
        for p in plist:
            if id(p) in seen:
                raise ValueError(f"a parameter appears in more than one group (second time in {name!r})")
            seen.add(id(p))
        if not plist:
            continue
        if name == SHARED:
            g_lr = shared_lr if shared_lr is not None else lr
            g_wd = shared_weight_decay if shared_weight_decay is not None else weight_decay
        else:
            t = task_by_name[name]
            g_lr = t.lr if t.lr is not None else lr
            g_wd = t.weight_decay if t.weight_decay is not None else weight_decay
        out.append({"params": plist, "lr": g_lr, "weight_decay": g_wd, "name": name})
    return out
