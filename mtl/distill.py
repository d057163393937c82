"""Knowledge distillation from single-task teachers into a multi-task student: task-agnostic losses.

Everything here is a pure function of tensors (or a small ``nn.Module`` holding the feature adapters);
data, models and teachers are the caller's business (:mod:`mtrec.distill` for ranking models,
:mod:`mtrl.distill` for SAC policies).

**Student loss of task t** (one scalar per task, so loss weighting and gradient methods still apply)::

    L_t = (1 - alpha) * ell_t(s, y) + alpha * D_t + beta * F_t

* ``ell_t(s, y)``: the task's own loss against the gold label ``y`` (:meth:`mtl.tasks.TaskSpec.loss_fn`).
* ``D_t``, the distillation term against the teacher's output ``z`` (computed without gradient):

  - binary (``s``, ``z`` logits): ``D_t = T^2 * BCE(sigmoid(s / T), q)`` with target
    ``q = lambda * y + (1 - lambda) * sigmoid(z / T)``. With ``lambda = 0`` this is Hinton et al.,
    "Distilling the Knowledge in a Neural Network" (2015), for a two-class softmax: both logits divided by
    the temperature ``T``, the term scaled by ``T^2`` so its gradient, ``T * (sigmoid(s/T) - q)``, keeps its
    size as ``T`` changes (for large ``T`` it tends to ``(s - z) / 4``, logit matching);
  - regression (``s``, ``z`` predictions): ``D_t = MSE(s, lambda * y + (1 - lambda) * z)``.

* ``lambda``, teacher annealing (Clark et al., "BAM! Born-Again Multi-Task Networks for Natural Language
  Understanding", ACL 2019): ``0`` without annealing; with it ``lambda = step / total_steps`` (clamped to
  ``[0, 1]``), so the target moves linearly from the teacher's prediction (step 0) to the gold label (end
  of training). BAM's own loss is ``alpha = 1``, ``T = 1``: ``L_t = BCE(sigmoid(s), lambda y + (1 - lambda)
  sigmoid(z))``. (BCE is linear in its target, so for ``T = 1`` mixing targets equals mixing the gold and
  the teacher losses; for MSE the two differ by a term free of ``s``, i.e. have equal gradients.)
* ``F_t``, feature distillation (in the spirit of Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR
  2015): a per-task ``Linear`` adapter ``A_t`` maps the student's shared representation ``r`` (flattened
  per example) to the size of the teacher's representation ``h``; both are L2-normalised per example and
  ``F_t = mean_b || A_t(r_b) / |A_t(r_b)| - h_b / |h_b| ||^2`` (the squared error summed over features and
  averaged over examples, ``= 2 - 2 cos``, in ``[0, 4]``).

**Policy distillation** (Rusu et al., "Policy Distillation", ICLR 2016; Teh et al., "Distral: Robust
Multitask Reinforcement Learning", NeurIPS 2017): the student minimises ``KL(pi_teacher || pi_student)`` on
visited states. For SAC's tanh-squashed diagonal Gaussian policies the KL is computed in closed form on the
pre-tanh Gaussians (:func:`gaussian_kl`): ``tanh`` is a bijection and the KL divergence is invariant under
a bijective change of variables, so this *equals* the KL of the squashed action distributions, exactly and
without sampling noise.

Example::

    >>> import torch
    >>> from mtl.tasks import TaskSpec
    >>> d = Distiller([TaskSpec("ctr", "binary")], alpha=0.5, temperature=2.0)
    >>> s, z, y = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.0])
    >>> round(float(d.losses({"ctr": s}, {"ctr": y}, {"ctr": z}, step=0)["ctr"]), 4)
    1.3737
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.tasks import TaskSpec

__all__ = [
    "Distiller",
    "FeatureAdapters",
    "annealing_lambda",
    "binary_distillation",
    "distillation_term",
    "feature_distillation",
    "gaussian_kl",
    "mix_losses",
    "policy_distillation_loss",
    "regression_distillation",
]


def annealing_lambda(step: int, total_steps: int) -> float:
    """Teacher annealing weight of the gold label: ``min(max(step / total_steps, 0), 1)`` (Clark et al. 2019).

    ``0`` at the first step (pure teacher target), ``0.5`` half-way, ``1`` from ``total_steps`` on (pure gold).

    Raises:
        ValueError: ``total_steps`` is not positive.
    """
    if total_steps <= 0:
        raise ValueError(f"teacher annealing needs total_steps > 0, got {total_steps}")
    return min(max(step / total_steps, 0.0), 1.0)


def _check_shapes(name: str, student: Tensor, teacher: Tensor, gold: Tensor | None) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student output shape {tuple(student.shape)} differs from the teacher's {tuple(teacher.shape)}"
        )
    if gold is not None and gold.shape != student.shape:
        raise ValueError(
            f"{name}: label shape {tuple(gold.shape)} differs from the output shape {tuple(student.shape)}"
        )


def _check_lambda(lam: float, gold: Tensor | None) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"the annealing weight lambda must be in [0, 1], got {lam}")
    if lam > 0.0 and gold is None:
        raise ValueError("teacher annealing (lambda > 0) mixes in the gold label: pass gold=labels")


def binary_distillation(
    student_logit: Tensor,
    teacher_logit: Tensor,
    temperature: float = 1.0,
    *,
    gold: Tensor | None = None,
    lam: float = 0.0,
) -> Tensor:
    """``T^2 * mean BCE(sigmoid(s / T), lam * y + (1 - lam) * sigmoid(z / T))`` (Hinton et al. 2015).

    ``teacher_logit`` is detached (teachers are frozen); ``gold`` (0/1 labels) is needed only when ``lam > 0``.
    """
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    _check_shapes("binary distillation", student_logit, teacher_logit, gold)
    _check_lambda(lam, gold)
    target = torch.sigmoid(teacher_logit.detach().to(student_logit.dtype) / temperature)
    if lam > 0.0:
        assert gold is not None
        target = lam * gold.to(student_logit.dtype) + (1.0 - lam) * target
    bce = F.binary_cross_entropy_with_logits(student_logit / temperature, target)
    return temperature**2 * bce


def regression_distillation(
    student: Tensor, teacher: Tensor, *, gold: Tensor | None = None, lam: float = 0.0
) -> Tensor:
    """``mean (s - (lam * y + (1 - lam) * z))^2``: MSE to the teacher's prediction (annealed towards gold)."""
    _check_shapes("regression distillation", student, teacher, gold)
    _check_lambda(lam, gold)
    target = teacher.detach().to(student.dtype)
    if lam > 0.0:
        assert gold is not None
        target = lam * gold.to(student.dtype) + (1.0 - lam) * target
    return F.mse_loss(student, target)


def distillation_term(
    kind: str,
    student: Tensor,
    teacher: Tensor,
    *,
    temperature: float = 1.0,
    gold: Tensor | None = None,
    lam: float = 0.0,
) -> Tensor:
    """``D_t`` of the module docstring for a task of ``kind`` (``binary`` or ``regression``)."""
    if kind == "binary":
        return binary_distillation(student, teacher, temperature, gold=gold, lam=lam)
    if kind == "regression":
        return regression_distillation(student, teacher, gold=gold, lam=lam)
    raise ValueError(f"distillation supports task kinds 'binary' and 'regression', got {kind!r}")


def mix_losses(task_loss: Tensor, distill: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) * task_loss + alpha * distill`` (``alpha`` in ``[0, 1]``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * task_loss + alpha * distill


def feature_distillation(student_projected: Tensor, teacher_representation: Tensor) -> Tensor:
    """``mean_b || u_b / |u_b| - v_b / |v_b| ||^2``: both flattened per example and L2-normalised.

    ``student_projected [B, D]`` is the adapter's output; ``teacher_representation [B, ...]`` is detached.
    """
    u = student_projected.flatten(1)
    v = teacher_representation.detach().flatten(1).to(u.dtype)
    if u.shape != v.shape:
        raise ValueError(
            f"feature distillation: adapter output {tuple(u.shape)} does not match the teacher representation "
            f"{tuple(v.shape)} (flattened per example)"
        )
    diff = F.normalize(u, dim=1) - F.normalize(v, dim=1)
    return diff.pow(2).sum(1).mean()


class FeatureAdapters(nn.Module):
    """One ``Linear(student_dim, teacher_dim_t)`` per task: the student's flattened shared representation to
    the size of task ``t``'s teacher representation (training-only parameters; never exported).

    Example::

        >>> a = FeatureAdapters({"ctr": (128, 64), "cvr": (128, 32)})
        >>> tuple(a("cvr", torch.zeros(5, 8, 16)).shape)
        (5, 32)
    """

    def __init__(self, dims: Mapping[str, tuple[int, int]]) -> None:
        super().__init__()
        bad = {t: d for t, d in dims.items() if len(d) != 2 or min(d) < 1}
        if bad:
            raise ValueError(f"feature adapters need positive (student_dim, teacher_dim) per task, got {bad}")
        self.adapters = nn.ModuleDict({t: nn.Linear(int(i), int(o)) for t, (i, o) in dims.items()})

    def forward(self, task: str, representation: Tensor) -> Tensor:
        """``A_task(representation.flatten(1))``."""
        if task not in self.adapters:
            raise KeyError(f"no feature adapter for task {task!r}; adapters: {sorted(self.adapters)}")
        return self.adapters[task](representation.flatten(1))


class Distiller(nn.Module):
    """Per-task student losses ``L_t = (1 - alpha) ell_t + alpha D_t + beta F_t`` (see the module docstring).

    Args:
        tasks: the student's tasks (kind and gold loss of each).
        alpha: weight of the distillation term, in ``[0, 1]`` (``0``: gold loss only).
        temperature: ``T`` of binary tasks (``> 0``).
        anneal: teacher annealing (Clark et al. 2019): the target moves from teacher to gold,
            ``lambda = step / total_steps``.
        total_steps: the training length that annealing spreads over (required with ``anneal``).
        feature_weight: ``beta``, weight of the feature term (``0`` = off).
        feature_dims: ``{task: (student_dim, teacher_dim)}`` of the adapters (required with ``beta > 0``).
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        alpha: float = 0.5,
        temperature: float = 1.0,
        anneal: bool = False,
        total_steps: int | None = None,
        feature_weight: float = 0.0,
        feature_dims: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {alpha}")
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"distill.temperature must be a finite number > 0, got {temperature}")
        if not feature_weight >= 0 or not math.isfinite(feature_weight):
            raise ValueError(f"distill.feature_weight must be a finite number >= 0, got {feature_weight}")
        if anneal and (total_steps is None or total_steps <= 0):
            raise ValueError(f"teacher annealing needs the number of training steps (> 0), got {total_steps}")
        for t in tasks:
            if t.kind not in ("binary", "regression"):
                raise ValueError(f"task {t.name!r}: distillation supports binary and regression, got {t.kind!r}")
        self.tasks = list(tasks)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.anneal, self.total_steps = bool(anneal), total_steps
        self.feature_weight = float(feature_weight)
        self.adapters: FeatureAdapters | None = None
        if self.feature_weight > 0:
            names = [t.name for t in self.tasks]
            if feature_dims is None or set(feature_dims) != set(names):
                got = sorted(feature_dims) if feature_dims is not None else None
                raise ValueError(f"feature distillation needs adapter sizes for the tasks {names}, got {got}")
            self.adapters = FeatureAdapters(feature_dims)

    @property
    def uses_features(self) -> bool:
        """Whether the feature term is on (the caller must then pass the representations)."""
        return self.adapters is not None

    def lam(self, step: int) -> float:
        """The gold-label share of the target at ``step``: ``step / total_steps`` with annealing, else 0."""
        if not self.anneal:
            return 0.0
        assert self.total_steps is not None
        return annealing_lambda(step, self.total_steps)

    def losses(
        self,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        teacher_outputs: Mapping[str, Tensor],
        *,
        step: int,
        representation: Tensor | None = None,
        teacher_representations: Mapping[str, Tensor] | None = None,
        tasks: Sequence[TaskSpec] | None = None,
    ) -> dict[str, Tensor]:
        """``{task: L_t}`` for ``tasks`` (default: all of the distiller's tasks).

        ``representation``: the student's shared representation ``[B, ...]`` and ``teacher_representations``
        ``{task: [B, ...]}``, both needed when the feature term is on.
        """
        lam = self.lam(step)
        out: dict[str, Tensor] = {}
        for t in tasks if tasks is not None else self.tasks:
            for what, d in (("output", outputs), ("label", labels), ("teacher output", teacher_outputs)):
                if t.name not in d:
                    raise KeyError(f"distillation: no {what} for task {t.name!r}; got {sorted(d)}")
            s, y = outputs[t.name], labels[t.name]
            loss = t.loss_fn(s, y) if self.alpha < 1.0 else s.new_zeros(())
            if self.alpha > 0.0:
                d_t = distillation_term(
                    t.kind, s, teacher_outputs[t.name], temperature=self.temperature, gold=y, lam=lam
                )
                loss = mix_losses(loss, d_t, self.alpha)
            if self.adapters is not None:
                if representation is None or teacher_representations is None:
                    raise ValueError("feature distillation needs the student's and the teachers' representations")
                projected = self.adapters(t.name, representation)
                loss = loss + self.feature_weight * feature_distillation(projected, teacher_representations[t.name])
            out[t.name] = loss
        return out

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, temperature={self.temperature}, anneal={self.anneal}, "
            f"total_steps={self.total_steps}, feature_weight={self.feature_weight}"
        )


# ------------------------------------------------------------------------------------- policy distillation


def gaussian_kl(p_mean: Tensor, p_log_std: Tensor, q_mean: Tensor, q_log_std: Tensor) -> Tensor:
    """``KL(N(p_mean, p_std^2) || N(q_mean, q_std^2))`` of diagonal Gaussians, summed over the last axis.

    Per dimension: ``log(q_std / p_std) + (p_std^2 + (p_mean - q_mean)^2) / (2 q_std^2) - 1/2``. Returns ``[...]``
    (the shape without the last axis). For tanh-squashed Gaussians (SAC) this is also the KL of the squashed
    distributions: KL is invariant under the bijection ``tanh``.
    """
    shapes = {tuple(x.shape) for x in (p_mean, p_log_std, q_mean, q_log_std)}
    if len(shapes) != 1:
        raise ValueError(f"gaussian_kl: means and log-stds must share one shape, got {sorted(shapes)}")
    var_ratio = torch.exp(2.0 * (p_log_std - q_log_std))
    mean_term = (p_mean - q_mean).pow(2) * torch.exp(-2.0 * q_log_std)
    return (q_log_std - p_log_std + 0.5 * (var_ratio + mean_term) - 0.5).sum(-1)


def policy_distillation_loss(
    teacher_mean: Tensor, teacher_log_std: Tensor, student_mean: Tensor, student_log_std: Tensor
) -> Tensor:
    """``[B]`` rows of ``KL(pi_teacher || pi_student)`` on the pre-tanh Gaussians (Rusu et al. 2016); the
    teacher's side is detached, so only the student gets gradients."""
    return gaussian_kl(teacher_mean.detach(), teacher_log_std.detach(), student_mean, student_log_std)
