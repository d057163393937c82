"""The model zoo: TorchRec sparse arch + shared / soft-shared bodies + task towers.

Every model is built as ``Model(inputs, tasks, **hyperparameters)`` from a built input arch
(:class:`~mtrec.models.inputs.InputArch` on the data's features, as TorchRec's DLRM takes a built
``EmbeddingBagCollection``; every hyperparameter a keyword with a default, so Hydra can build it with
``_partial_: true``) and follows the contract of :class:`~mtrec.models.base.MultiTaskModel`. :func:`build_model`
builds both from a ``model`` config node (its ``inputs`` node, ``configs/model/inputs/``, is the input arch).
:data:`MODELS` maps config names to classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtl.config import build_partial
from mtrec.data.batch import FeatureSpec
from mtrec.models.base import SHARED, MultiTaskModel, count_parameters
from mtrec.models.esmm import ESMM, product_logit
from mtrec.models.hard_sharing import SharedBottom, SingleTask
from mtrec.models.inputs import InputArch, random_inputs, table_name
from mtrec.models.layers import MLP, Gate, GroupedLinear, GroupedMLP, Tower, make_activation, mix
from mtrec.models.moe import CGC, PLE, MMoE, OMoE
from mtrec.models.searched import SearchedPLE, SharingSupernet
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
    "searched": SearchedPLE,
}

# The input arch's settings that model configs carried themselves before the ``inputs`` node (run configs of
# mtlib 0.1 keep them there; build_model still builds those).
_FLAT_INPUT_KEYS = ("embedding_dim", "dense_dims")


def build_model(node: DictConfig | Mapping[str, Any], features: FeatureSpec, tasks: Sequence[str]) -> MultiTaskModel:
    """The model a ``model`` config node describes, on ``features`` with ``tasks``: its ``inputs`` node (a
    ``_partial_`` :class:`InputArch`) built on the features first, then the model (a ``_partial_`` class) with it.

    A node without ``inputs`` (a run config written by mtlib 0.1, with ``embedding_dim`` and ``dense_dims`` on
    the model) builds the input arch from those keys and the model's ``activation`` and ``dropout``, as then.

    Raises:
        ValueError: a key the model or the input arch does not take, naming the section.
    """
    cfg = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    assert isinstance(cfg, dict)
    inputs_cfg = cfg.pop("inputs", None)
    if inputs_cfg is None:
        flat = {k: cfg.pop(k) for k in _FLAT_INPUT_KEYS if k in cfg}
        shared = {k: cfg[k] for k in ("activation", "dropout") if k in cfg}
        inputs = InputArch(features, **flat, **shared)
    else:
        inputs = build_partial("model.inputs", inputs_cfg, features=features)
    return build_partial("model", cfg, inputs=inputs, tasks=list(tasks))


__all__ = [
    "CGC",
    "ESMM",
    "MLP",
    "MODELS",
    "PLE",
    "SHARED",
    "SearchedPLE",
    "SharingSupernet",
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
    "build_model",
    "count_parameters",
    "make_activation",
    "mix",
    "product_logit",
    "random_inputs",
    "table_name",
]
