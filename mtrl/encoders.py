"""Task encoders: how an agent's networks see the observation and the task.

Task conditioning is an injected module: every actor and critic reads its input through a :class:`TaskEncoder`,
``forward(obs [B, obs_dim] float32, task [B] int64) -> features [B, out_dim]``, so the SAC core never knows
whether the agent is task-blind, one-hot conditioned or CARE.

* :class:`IdentityEncoder`: the observation alone (the task-blind baseline).
* :class:`OneHotEncoder`: the observation with the task's one-hot appended (MT-SAC: Yu et al., "Meta-World:
  A Benchmark and Evaluation for Multi-Task and Meta Reinforcement Learning", CoRL 2019).
* :class:`CAREEncoder`: CARE's mixture of encoders (Sodhani, Zhang, Pineau, "Multi-Task Reinforcement
  Learning with Context-based Representations", ICML 2021, Section 4): ``k`` MLP encoders over the
  observation, mixed by softmax attention weights computed from a context vector, the embedding of the
  task's metadata; the mixture concatenated with the context is the representation.
* :class:`MOOREEncoder`: MOORE's mixture of orthogonal experts (Hendawy, Peters, D'Eramo, ICLR 2024): the
  same ``k`` experts, their outputs orthonormalised per row by Gram-Schmidt (:func:`gram_schmidt`), mixed by
  per-task weights (a linear layer of the task's one-hot).

Every encoder is built as ``cls(obs_dim=..., num_tasks=..., metadata=..., **its own settings)`` (the
``encoder`` argument of :mod:`mtrl.agents` builders); encoders that do not need ``num_tasks`` or
``metadata`` accept and ignore them, so a builder can pass the same keyword arguments to every class.

The module also holds the small layers the agents share: :func:`mlp` and :class:`EnsembleLinear` /
:class:`EnsembleMLP` (``n`` independent networks evaluated as one batched matmul: CARE's experts and the
twin critics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CAREEncoder",
    "EnsembleLinear",
    "EnsembleMLP",
    "MOOREEncoder",
    "IdentityEncoder",
    "OneHotEncoder",
    "TaskEncoder",
    "gram_schmidt",
    "mlp",
]


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, *, activate_output: bool = False) -> nn.Sequential:
    """``Linear -> ReLU`` for each hidden width, then ``Linear(., out_dim)`` (ReLU after it when asked).

    Example::

        mlp(4, [64, 64], 2)   # [B, 4] -> [B, 2]
    """
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, int(h)), nn.ReLU()]
        d = int(h)
    layers.append(nn.Linear(d, out_dim))
    if activate_output:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """``n`` independent linear layers applied as one batched matmul.

    Input ``[B, in]`` (the same input for every member) or ``[n, B, in]`` (one per member); output
    ``[n, B, out]``. Each member is initialised like ``nn.Linear`` (uniform in ``+-1/sqrt(in)``).

    Example::

        layer = EnsembleLinear(2, 8, 16)
        layer(torch.randn(32, 8)).shape        # (2, 32, 16)
    """

    def __init__(self, n: int, in_features: int, out_features: int) -> None:
        super().__init__()
        if n < 1 or in_features < 1 or out_features < 1:
            raise ValueError(f"EnsembleLinear needs positive sizes, got n={n}, in={in_features}, out={out_features}")
        self.n, self.in_features, self.out_features = n, in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return torch.matmul(x, self.weight) + self.bias
        if x.dim() != 3 or x.shape[0] != self.n:
            raise ValueError(
                f"EnsembleLinear expects [B, {self.in_features}] or [{self.n}, B, in], got {list(x.shape)}"
            )
        return torch.baddbmm(self.bias, x, self.weight)

    def extra_repr(self) -> str:
        return f"n={self.n}, in_features={self.in_features}, out_features={self.out_features}"


class EnsembleMLP(nn.Sequential):
    """``n`` independent MLPs (ReLU between layers, none after the last): ``[B, in]`` or ``[n, B, in]`` ->
    ``[n, B, out]``."""

    def __init__(self, n: int, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [EnsembleLinear(n, d, int(h)), nn.ReLU()]
            d = int(h)
        layers.append(EnsembleLinear(n, d, out_dim))
        super().__init__(*layers)


def _check_inputs(name: str, obs: Tensor, task: Tensor, obs_dim: int) -> None:
    if obs.dim() != 2 or obs.shape[1] != obs_dim:
        raise ValueError(f"{name}: obs must be [B, {obs_dim}], got {list(obs.shape)}")
    if task.shape != (obs.shape[0],):
        raise ValueError(f"{name}: task must be [B] = [{obs.shape[0]}] int64 task indices, got {list(task.shape)}")


class TaskEncoder(nn.Module):
    """``(obs [B, obs_dim], task [B] int64) -> features [B, out_dim]``.

    Attributes:
        obs_dim: observation size read.
        num_tasks: number of tasks the encoder knows.
        out_dim: size of the features it returns.

    :meth:`task_parameters` lists parameters that belong to single tasks (none for the encoders here);
    gradient methods (:mod:`mtl.gradients`) treat everything else as shared.
    """

    obs_dim: int
    num_tasks: int
    out_dim: int

    def task_parameters(self) -> list[nn.Parameter]:
        """Parameters that only one task's rows update (default: none)."""
        return []


class IdentityEncoder(TaskEncoder):
    """The observation alone: a task-blind agent (``out_dim = obs_dim``)."""

    def __init__(self, obs_dim: int, num_tasks: int = 1, metadata: np.ndarray | Tensor | None = None) -> None:
        super().__init__()
        self.obs_dim, self.num_tasks, self.out_dim = int(obs_dim), int(num_tasks), int(obs_dim)

    def forward(self, obs: Tensor, task: Tensor) -> Tensor:
        _check_inputs(type(self).__name__, obs, task, self.obs_dim)
        return obs


class OneHotEncoder(TaskEncoder):
    """``[obs, one_hot(task)]`` (``out_dim = obs_dim + num_tasks``): MT-SAC's conditioning (Yu et al. 2019).

    The one-hot is a row lookup in a constant identity matrix (exports as an ONNX ``Gather``).
    """

    def __init__(self, obs_dim: int, num_tasks: int, metadata: np.ndarray | Tensor | None = None) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"OneHotEncoder needs num_tasks >= 1, got {num_tasks}")
        self.obs_dim, self.num_tasks = int(obs_dim), int(num_tasks)
        self.out_dim = self.obs_dim + self.num_tasks
        self.register_buffer("eye", torch.eye(self.num_tasks), persistent=False)

    def forward(self, obs: Tensor, task: Tensor) -> Tensor:
        _check_inputs(type(self).__name__, obs, task, self.obs_dim)
        return torch.cat([obs, self.eye.to(obs.dtype).index_select(0, task)], dim=1)


class CAREEncoder(TaskEncoder):
    """CARE's context-based mixture of encoders (Sodhani, Zhang & Pineau, ICML 2021, Section 4, Figure 2).

    For a row with observation ``s`` and task ``t``:

    1. context ``z_t = f(m_t)``: the task's metadata row ``m_t`` (``metadata[t]``; CARE embeds a natural
       language description of the task with a pretrained language model) through the MLP ``f``
       (``context_hidden`` ReLU layers, a linear output of ``context_dim``);
    2. ``k`` encoders ``h_j = E_j(s)`` (independent MLPs over the observation, ``expert_hidden`` ReLU
       layers, linear output of ``expert_dim``);
    3. attention ``alpha_t = softmax((W z_t + b) / T)`` over the ``k`` encoders (a linear map of the context,
       temperature ``T``): each task chooses its own mixture, so tasks that share skills share encoders;
    4. representation ``[sum_j alpha_tj h_j, z_t]`` (``out_dim = expert_dim + context_dim``).

    The contexts and attention weights depend on the task only, so they are computed once per task (``K``
    rows) and gathered per row.

    Args:
        obs_dim: observation size.
        num_tasks: ``K``.
        metadata: ``[K, M]`` float task metadata (``TaskFamily.metadata``), stored as a buffer.
        num_experts: ``k``, the number of encoders (the paper uses 4 on MT10, 6 on MT50).
        expert_hidden: hidden widths of each encoder.
        expert_dim: output size of each encoder.
        context_hidden: hidden widths of the context MLP.
        context_dim: size of the context ``z_t``.
        temperature: softmax temperature ``T`` of the attention (> 0).
        normalize_metadata: centre the metadata rows on their mean over tasks and scale each to unit norm
            before the context MLP (with ``K >= 2``). Sentence embeddings of related task descriptions are
            close (cosine 0.76-0.89 between the point-mass goals' descriptions), so at initialisation every
            task gets nearly the same context and attention; centring keeps exactly the differences between
            tasks. CARE feeds the raw embeddings: ``false`` does that.

    Example::

        enc = CAREEncoder(obs_dim=4, num_tasks=3, metadata=np.eye(3, dtype=np.float32), num_experts=2)
        enc(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])).shape   # (5, enc.out_dim)
        enc.attention(torch.tensor([0, 1])).sum(-1)                   # tensor([1., 1.])
    """

    def __init__(
        self,
        obs_dim: int,
        num_tasks: int,
        metadata: np.ndarray | Tensor | None,
        *,
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (64,),
        expert_dim: int = 64,
        context_hidden: Sequence[int] = (64,),
        context_dim: int = 32,
        temperature: float = 1.0,
        normalize_metadata: bool = True,
    ) -> None:
        super().__init__()
        if metadata is None:
            raise ValueError("CAREEncoder needs the task metadata [num_tasks, M] (TaskFamily.metadata), got None")
        meta = torch.as_tensor(np.asarray(metadata, dtype=np.float32))
        if meta.dim() != 2 or meta.shape[0] != num_tasks:
            raise ValueError(f"CAREEncoder: metadata must be [num_tasks={num_tasks}, M], got {list(meta.shape)}")
        if num_experts < 1 or expert_dim < 1 or context_dim < 1:
            raise ValueError(
                f"CAREEncoder needs num_experts, expert_dim, context_dim >= 1; got {num_experts}, {expert_dim}, "
                f"{context_dim}"
            )
        if not temperature > 0:
            raise ValueError(f"CAREEncoder: temperature must be > 0, got {temperature}")
        self.obs_dim, self.num_tasks = int(obs_dim), int(num_tasks)
        self.num_experts, self.expert_dim, self.context_dim = int(num_experts), int(expert_dim), int(context_dim)
        self.temperature = float(temperature)
        self.out_dim = self.expert_dim + self.context_dim
        if normalize_metadata and num_tasks >= 2:
            meta = meta - meta.mean(0, keepdim=True)
            meta = meta / meta.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.register_buffer("metadata", meta)
        self.context = mlp(meta.shape[1], context_hidden, self.context_dim)
        self.attention_logits = nn.Linear(self.context_dim, self.num_experts)
        self.experts = EnsembleMLP(self.num_experts, self.obs_dim, expert_hidden, self.expert_dim)

    def contexts(self) -> Tensor:
        """``[K, context_dim]``: every task's context ``z_t``."""
        return self.context(self.metadata)

    def attention_table(self) -> Tensor:
        """``[K, num_experts]``: every task's attention weights (rows sum to one)."""
        return torch.softmax(self.attention_logits(self.contexts()) / self.temperature, dim=-1)

    def attention(self, task: Tensor) -> Tensor:
        """``[B, num_experts]``: the attention weights of each row's task."""
        return self.attention_table().index_select(0, task)

    def forward(self, obs: Tensor, task: Tensor) -> Tensor:
        _check_inputs(type(self).__name__, obs, task, self.obs_dim)
        z = self.contexts()  # [K, C]
        weights = torch.softmax(self.attention_logits(z) / self.temperature, dim=-1)  # [K, k]
        h = self.experts(obs)  # [k, B, D]
        w = weights.index_select(0, task)  # [B, k]
        mixed = torch.einsum("bk,kbd->bd", w, h)
        return torch.cat([mixed, z.index_select(0, task)], dim=1)


def gram_schmidt(h: Tensor, eps: float = 1e-8) -> Tensor:
    """Orthonormalise ``k`` vectors per row, differentiably: ``h [k, B, D] -> u [k, B, D]`` with
    ``<u_i[b], u_j[b]> = [i == j]`` (needs ``k <= D``).

    Modified Gram-Schmidt in the experts' order: ``u_j = normalise(h_j - sum_{i<j} <h_j, u_i> u_i)`` (MOORE,
    Hendawy et al. 2024, Section 4, eq. 3). A vector (numerically) in the span of the ones before it gets a
    norm clamped at ``eps`` instead of a division by zero.
    """
    if h.dim() != 3:
        raise ValueError(f"gram_schmidt expects [k, B, D], got {list(h.shape)}")
    if h.shape[0] > h.shape[2]:
        raise ValueError(f"gram_schmidt: k={h.shape[0]} vectors cannot be orthonormal in D={h.shape[2]} dimensions")
    basis: list[Tensor] = []
    for j in range(h.shape[0]):
        v = h[j]
        for u in basis:
            v = v - (v * u).sum(-1, keepdim=True) * u
        basis.append(v / v.norm(dim=-1, keepdim=True).clamp_min(eps))
    return torch.stack(basis)


class MOOREEncoder(TaskEncoder):
    """MOORE's mixture of orthogonal experts (Hendawy, Peters & D'Eramo, "Multi-Task Reinforcement Learning
    with Mixture of Orthogonal Experts", ICLR 2024, Section 4, Figure 1).

    For a row with observation ``s`` and task ``t``:

    1. ``k`` experts ``h_j = E_j(s)`` (CARE's experts: independent MLPs over the observation, evaluated as
       one grouped product, :class:`EnsembleMLP`);
    2. ``U = GS(h_1..h_k)``: Gram-Schmidt across the ``k`` expert outputs of the row (:func:`gram_schmidt`),
       so the experts span a ``k``-dimensional subspace of orthonormal directions (needs ``k <= expert_dim``);
    3. weights ``w_t = W one_hot(t)`` (a linear layer without bias of the task's one-hot: one learned
       ``k``-vector per task);
    4. representation ``sum_j w_tj u_j`` (``out_dim = expert_dim``), optionally through ``tanh``.

    Args:
        obs_dim: observation size.
        num_tasks: ``K``.
        metadata: accepted and ignored (MOORE conditions on the task index).
        num_experts: ``k`` (the paper: 4 on MT10, 6 on MT50).
        expert_hidden: hidden widths of each expert.
        expert_dim: output size of each expert (``>= num_experts``).
        activation: ``"tanh"`` after the mixture, or ``"none"``.
    """

    def __init__(
        self,
        obs_dim: int,
        num_tasks: int,
        metadata: np.ndarray | Tensor | None = None,
        *,
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (64,),
        expert_dim: int = 64,
        activation: str = "none",
    ) -> None:
        super().__init__()
        if num_tasks < 1 or num_experts < 1:
            raise ValueError(f"MOOREEncoder needs num_tasks, num_experts >= 1, got {num_tasks}, {num_experts}")
        if expert_dim < num_experts:
            raise ValueError(
                f"MOOREEncoder: {num_experts} orthonormal experts need expert_dim >= num_experts, got {expert_dim}"
            )
        if activation not in ("none", "tanh"):
            raise ValueError(f"MOOREEncoder: activation must be 'none' or 'tanh', got {activation!r}")
        self.obs_dim, self.num_tasks = int(obs_dim), int(num_tasks)
        self.num_experts, self.expert_dim = int(num_experts), int(expert_dim)
        self.activation = activation
        self.out_dim = self.expert_dim
        self.experts = EnsembleMLP(self.num_experts, self.obs_dim, expert_hidden, self.expert_dim)
        self.task_weights = nn.Linear(self.num_tasks, self.num_experts, bias=False)
        self.register_buffer("eye", torch.eye(self.num_tasks), persistent=False)

    def weights(self, task: Tensor) -> Tensor:
        """``[B, num_experts]``: each row's task weights ``W one_hot(task)``."""
        return self.task_weights(self.eye.index_select(0, task))

    def forward(self, obs: Tensor, task: Tensor) -> Tensor:
        _check_inputs(type(self).__name__, obs, task, self.obs_dim)
        u = gram_schmidt(self.experts(obs))  # [k, B, D], orthonormal per row
        out = torch.einsum("bk,kbd->bd", self.weights(task).to(u.dtype), u)
        return torch.tanh(out) if self.activation == "tanh" else out
