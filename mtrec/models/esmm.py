"""ESMM: Entire Space Multi-task Model (CTR and CTCVR = CTR x CVR over the whole impression space)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.models.base import Gates, MultiTaskModel, Outputs
from mtrec.models.inputs import InputArch
from mtrec.models.layers import Tower, check_dims


def product_logit(a: Tensor, b: Tensor) -> Tensor:
    """The logit of ``sigmoid(a) * sigmoid(b)``, computed in log space without overflow or cancellation.

    ``log p = logsigmoid(a) + logsigmoid(b)`` and, since ``1 - s(a) s(b) = s(-a) + s(a) s(-b)`` is a sum of
    positive terms, ``log(1 - p) = logaddexp(logsigmoid(-a), logsigmoid(a) + logsigmoid(-b))``. This is the
    stable ``log1mexp(log p)`` without its subtraction: finite for any finite ``a, b`` (e.g. +-100) with
    finite gradients, so ``binary_cross_entropy_with_logits`` can be applied to the result.

    Example::

        >>> a, b = torch.tensor([0.0, 30.0, -30.0]), torch.tensor([0.0, 30.0, 30.0])
        >>> torch.allclose(torch.sigmoid(product_logit(a, b)), torch.sigmoid(a) * torch.sigmoid(b))
        True
    """
    log_p = F.logsigmoid(a) + F.logsigmoid(b)
    log_1mp = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(a) + F.logsigmoid(-b))
    return log_p - log_1mp


class ESMM(MultiTaskModel):
    """Entire Space Multi-task Model.

    X. Ma, L. Zhao, G. Huang, Z. Wang, Z. Hu, X. Zhu, K. Gai, "Entire Space Multi-Task Model: An Effective
    Approach for Estimating Post-Click Conversion Rate", SIGIR 2018. Shared embeddings feed a CTR tower
    and a CVR tower; the model is trained on the whole impression space through
    ``pCTCVR = pCTR * pCVR``, so the CVR tower never sees the sample selection bias of clicked-only data.

    Outputs (all logits, so every task uses BCE with logits):

    * ``output[ctr_task]``: the CTR logit ``a``;
    * ``output[ctcvr_task]``: the logit of ``sigmoid(a) * sigmoid(b)`` with ``b`` the CVR logit
      (:func:`product_logit`, stable in log space);
    * :meth:`predict_cvr` gives the CVR logit ``b`` itself (for serving pCVR).

    Args:
        ctr_task: name of the click task (its label: clicked).
        ctcvr_task: name of the click-and-convert task (its label: clicked and converted).
        ctr_dims: hidden widths of the CTR tower (``None``: ``tower_dims``).
        cvr_dims: hidden widths of the CVR tower (``None``: ``tower_dims``).

    ``tasks`` must be exactly ``[ctr_task, ctcvr_task]`` in any order. Parameter groups: the embeddings,
    the dense arch and the CTR tower are shared (both outputs depend on the CTR logit); ``ctcvr_task``
    owns the CVR tower; ``ctr_task`` owns nothing.

    Example::

        >>> from mtrec.data.batch import FeatureSpec, SparseFeature
        >>> from mtrec.models import InputArch, random_inputs
        >>> features = FeatureSpec(("price",), (SparseFeature("user", 100), SparseFeature("item", 100)))
        >>> model = ESMM(InputArch(features), ["ctr", "ctcvr"], tower_dims=[32, 16])
        >>> dense, sparse = random_inputs(features, batch_size=4)
        >>> {k: tuple(v.shape) for k, v in model(dense, sparse).items()}
        {'ctr': (4,), 'ctcvr': (4,)}
        >>> tuple(model.predict_cvr(dense, sparse).shape)
        (4,)
    """

    def __init__(
        self,
        inputs: InputArch,
        tasks: Sequence[str],
        *,
        ctr_task: str = "ctr",
        ctcvr_task: str = "ctcvr",
        ctr_dims: Sequence[int] | None = None,
        cvr_dims: Sequence[int] | None = None,
        **common: Any,
    ) -> None:
        if common.get("task_feeds"):
            raise ValueError("ESMM does not take task_feeds: its CVR tower already reads the CTR estimate's input")
        super().__init__(inputs, tasks, **common)
        if ctr_task == ctcvr_task or set(self.tasks) != {ctr_task, ctcvr_task} or len(self.tasks) != 2:
            raise ValueError(
                f"ESMM needs exactly the tasks ctr_task={ctr_task!r} and ctcvr_task={ctcvr_task!r}, got "
                f"{list(self.tasks)}; rename the tasks or set ctr_task / ctcvr_task to match them"
            )
        self.ctr_task, self.ctcvr_task = ctr_task, ctcvr_task
        ctr_dims = check_dims("ctr_dims", self.tower_dims if ctr_dims is None else ctr_dims)
        cvr_dims = check_dims("cvr_dims", self.tower_dims if cvr_dims is None else cvr_dims)
        assert self.inputs is not None
        self.ctr_tower = Tower(self.inputs.out_dim, ctr_dims, self.activation, self.dropout)
        self.cvr_tower = Tower(self.inputs.out_dim, cvr_dims, self.activation, self.dropout)

    def _forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> tuple[Outputs, Gates]:
        x = self._input_vector(dense, sparse)
        ctr = self.ctr_tower(x)
        cvr = self.cvr_tower(x)
        out = {self.ctr_task: ctr, self.ctcvr_task: product_logit(ctr, cvr)}
        return {t: out[t] for t in self.tasks}, {}

    def predict_cvr(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Tensor:
        """The CVR logit ``[B]`` (post-click conversion; ``sigmoid`` of it is pCVR)."""
        return self.cvr_tower(self._input_vector(dense, sparse))

    def _task_owned(self, task: str) -> list[nn.Module | nn.Parameter | None]:
        return [self.cvr_tower] if task == self.ctcvr_task else []
