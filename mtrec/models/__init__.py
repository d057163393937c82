"""The model zoo: TorchRec sparse arch + shared / soft-shared bodies + task towers.

Every model is built as ``Model(features, tasks, **hyperparameters)`` (every hyperparameter a keyword
with a default, so Hydra can build it with ``_partial_: true``) and follows the contract of
:class:`~mtrec.models.base.MultiTaskModel`. :data:`MODELS` maps config names to classes.
"""

from __future__ import annotations

from mtrec.models.base import SHARED, MultiTaskModel, count_parameters
from mtrec.models.esmm import ESMM, product_logit
from mtrec.models.hard_sharing import SharedBottom, SingleTask
from mtrec.models.inputs import InputArch, random_inputs, table_name
from mtrec.models.layers import MLP, Gate, GroupedLinear, GroupedMLP, Tower, make_activation, mix
from mtrec.models.moe import CGC, PLE, MMoE, OMoE
from mtrec.models.soft_sharing import CrossStitch, L2Sharing

MODELS: dict[str, type[MultiTaskModel]] = {
    "single_task": SingleTask,
    "shared_bottom": SharedBottom,
    "omoe": OMoE,
    "mmoe": MMoE,
    "cgc": CGC,
    "ple": PLE,
    "esmm": ESMM,
    "l2_sharing": L2Sharing,
    "cross_stitch": CrossStitch,
}

__all__ = [
    "CGC",
    "ESMM",
    "MLP",
    "MODELS",
    "PLE",
    "SHARED",
    "CrossStitch",
    "Gate",
    "GroupedLinear",
    "GroupedMLP",
    "InputArch",
    "L2Sharing",
    "MMoE",
    "MultiTaskModel",
    "OMoE",
    "SharedBottom",
    "SingleTask",
    "Tower",
    "count_parameters",
    "make_activation",
    "mix",
    "product_logit",
    "random_inputs",
    "table_name",
]
