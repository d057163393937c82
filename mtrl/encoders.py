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

**Update cost.** An RL update runs these networks on small batches (64 rows, 64-wide layers), where
autograd's per-node bookkeeping rivals the arithmetic. CARE's encoder and MOORE's Gram-Schmidt therefore
run, when a gradient is wanted, as single autograd nodes with hand-written backwards (autograd's arithmetic
for the same operators; higher-order gradients fall back to differentiating the plain forward, batched
gradients run under ``vmap``). ``benchmarks/rl_update_cost.py`` measures the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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
    "care_representation",
    "gram_schmidt",
    "gram_schmidt_reference",
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
        if x.dim() == 2:  # one input for every member: a stride-0 batch (half matmul's broadcast + add backward)
            return torch.baddbmm(self.bias, x.expand(self.n, *x.shape), self.weight)
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
    rows) and gathered per row; the ``k`` encoders run as one grouped product. When a gradient is wanted the
    whole encoder is one autograd node with a hand-written backward (:class:`_CAREFunction`, exact to rounding:
    tests compare it with CARE computed row by row); otherwise (acting, target critics) the same arithmetic
    runs without a graph. Parameters and ``state_dict`` keys are those of the modules below.

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
        self._n_context = len(self.context) // 2 + 1  # Linear layers of mlp(): one per hidden width, one out
        self._layer_cache: list[nn.Module] | None = None

    def _layers(self) -> list[nn.Module]:
        """The layers :func:`care_representation` reads, in its order: the context MLP's ``nn.Linear`` layers,
        the attention layer, the experts' :class:`EnsembleLinear` layers."""
        linears = [m for m in self.context if isinstance(m, nn.Linear)] + [self.attention_logits]
        return linears + [m for m in self.experts if isinstance(m, EnsembleLinear)]

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
        if self._layer_cache is None:
            self._layer_cache = self._layers()
        params = [t for m in self._layer_cache for t in (m.weight, m.bias)]
        differentiable = torch.is_grad_enabled() and (obs.requires_grad or any(p.requires_grad for p in params))
        if not differentiable or torch.jit.is_tracing() or torch.compiler.is_compiling():
            # Nothing to differentiate (acting, the target critics, the frozen critic of the actor step), or a
            # tracer that should see plain operators (ONNX export): the same arithmetic through autograd.
            return care_representation(obs, task, self.metadata, params, self._n_context, self.temperature)
        return _CAREFunction.apply(obs, task, self.metadata, self.temperature, self._n_context, *params)


def care_representation(
    obs: Tensor, task: Tensor, metadata: Tensor, params: Sequence[Tensor], n_context: int, temperature: float
) -> Tensor:
    """CARE's representation ``[B, expert_dim + context_dim]`` from the observation, the task, the (normalised)
    metadata and the layers' tensors, through plain autograd (the reference of the fused backward).

    ``params``: each context layer's ``(weight [out, in], bias [out])`` (``n_context`` of them, ReLU between
    them), the attention layer's, then each expert layer's ``(weight [k, in, out], bias [k, 1, out])`` (ReLU
    between them), as :meth:`CAREEncoder._layers` lists them. The contexts and attention weights are computed
    on the ``K`` task rows only and gathered per row; the ``k`` experts run as one grouped product.
    """
    return _care_forward(obs, task, metadata, params, n_context, temperature)[0]


def _care_forward(
    obs: Tensor, task: Tensor, metadata: Tensor, params: Sequence[Tensor], n_context: int, temperature: float
) -> tuple[Tensor, tuple[Any, ...]]:
    """:func:`care_representation` and the intermediates the fused backward reads."""
    context_inputs: list[Tensor] = []
    a = metadata
    for i in range(n_context):
        context_inputs.append(a)
        a = torch.addmm(params[2 * i + 1], a, params[2 * i].t())
        if i < n_context - 1:
            a = torch.relu(a)
    z = a  # [K, C]
    logits = torch.addmm(params[2 * n_context + 1], z, params[2 * n_context].t())
    if temperature != 1.0:
        logits = logits / temperature
    attn = torch.softmax(logits, dim=-1)  # [K, k]
    first = 2 * n_context + 2
    n_expert = (len(params) - first) // 2
    expert_inputs: list[Tensor] = []
    h = obs.expand(params[first].shape[0], *obs.shape)  # every expert reads the same observation
    for i in range(n_expert):
        expert_inputs.append(h)
        h = torch.baddbmm(params[first + 2 * i + 1], h, params[first + 2 * i])
        if i < n_expert - 1:
            h = torch.relu(h)
    # h [k, B, D]: row b's mixture is sum_j alpha_{task_b, j} h_j[b]
    w_rows = attn.index_select(0, task)  # [B, k]
    mixed = (h * w_rows.t().unsqueeze(-1)).sum(0)
    out = torch.cat([mixed, z.index_select(0, task)], dim=1)
    return out, (context_inputs, z, attn, expert_inputs, h, w_rows)


class _CAREFunction(torch.autograd.Function):
    """:func:`care_representation` as one autograd node, with a hand-written backward.

    The backward is autograd's arithmetic for the same operators (``addmm``, ReLU, softmax, ``baddbmm``, the
    gathers and the weighted sum), written out so that the small networks of an RL update do not pay
    autograd's per-node bookkeeping for some thirty nodes; a gather's backward (a scatter-add into the ``K``
    task rows) is a product with the rows' one-hot. Gradients of the observation and of the metadata are
    computed only when asked for. Higher-order gradients (``create_graph=True``, as GREAT asks for) rebuild the
    forward with autograd and differentiate that, so they stay exact; batched gradients
    (``is_grads_batched``) run this backward under ``vmap``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, obs: Tensor, task: Tensor, metadata: Tensor, temperature: float, n_context: int, *params: Tensor
    ) -> Tensor:
        out, ctx.intermediates = _care_forward(obs, task, metadata, params, n_context, temperature)
        ctx.save_for_backward(obs, task, metadata, *params)  # also catches in-place changes before backward
        ctx.temperature, ctx.n_context = temperature, n_context
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        obs, task, metadata, *params = ctx.saved_tensors
        n_context, temperature = ctx.n_context, ctx.temperature
        needs = ctx.needs_input_grad
        wants = (needs[0], needs[2], *needs[5:])  # obs, metadata, params
        if torch.is_grad_enabled():  # create_graph: differentiate an autograd graph of the same forward
            inputs = [t for t, w in zip((obs, metadata, *params), wants) if w]
            with torch.enable_grad():
                out = care_representation(obs, task, metadata, params, n_context, temperature)
                found = iter(torch.autograd.grad(out, inputs, grad, create_graph=True, allow_unused=True))
            g = [next(found) if w else None for w in wants]
            return (g[0], None, g[1], None, None, *g[2:])
        context_inputs, z, attn, expert_inputs, h, w_rows = ctx.intermediates
        p_needs = needs[5:]
        grads: list[Tensor | None] = [None] * len(params)
        num_tasks, d = attn.shape[0], h.shape[-1]
        g_mixed, g_z_rows = grad[:, :d], grad[:, d:]
        rows_of = torch.eye(num_tasks, dtype=grad.dtype, device=grad.device).index_select(1, task)  # [K, B]
        g_attn = rows_of @ (h * g_mixed).sum(-1).t()  # [K, k]: sum over the task's rows of <g_mixed, h_j>
        g_logits = torch.ops.aten._softmax_backward_data(g_attn, attn, -1, attn.dtype)
        if temperature != 1.0:
            g_logits = g_logits / temperature
        a_w = 2 * n_context
        if p_needs[a_w]:
            grads[a_w] = g_logits.t() @ z
        if p_needs[a_w + 1]:
            grads[a_w + 1] = g_logits.sum(0)
        g = torch.addmm(rows_of @ g_z_rows, g_logits, params[a_w])  # dL/dz: the context's rows and the attention
        g_metadata = None
        for i in range(n_context - 1, -1, -1):
            a = context_inputs[i]
            if p_needs[2 * i]:
                grads[2 * i] = g.t() @ a
            if p_needs[2 * i + 1]:
                grads[2 * i + 1] = g.sum(0)
            if i > 0:
                g = torch.ops.aten.threshold_backward(g @ params[2 * i], a, 0)
            elif needs[2]:
                g_metadata = g @ params[0]
        first = 2 * n_context + 2
        g = w_rows.t().unsqueeze(-1) * g_mixed  # [k, B, D]
        g_obs = None
        for i in range(len(expert_inputs) - 1, -1, -1):
            a, w = expert_inputs[i], params[first + 2 * i]
            if p_needs[first + 2 * i]:
                grads[first + 2 * i] = torch.bmm(a.transpose(1, 2), g)  # a = obs expanded for i == 0
            if p_needs[first + 2 * i + 1]:
                grads[first + 2 * i + 1] = g.sum(1, keepdim=True)
            if i > 0:
                g = torch.ops.aten.threshold_backward(torch.bmm(g, w.transpose(1, 2)), a, 0)
            elif needs[0]:
                g_obs = torch.bmm(g, w.transpose(1, 2)).sum(0)
        return (g_obs, None, g_metadata, None, None, *grads)


def gram_schmidt(h: Tensor, eps: float = 1e-8) -> Tensor:
    """Orthonormalise ``k`` vectors per row, differentiably: ``h [k, B, D] -> u [k, B, D]`` with
    ``<u_i[b], u_j[b]> = [i == j]`` (needs ``k <= D``).

    Modified Gram-Schmidt in the experts' order: ``u_j = normalise(h_j - sum_{i<j} <h_j, u_i> u_i)`` (MOORE,
    Hendawy et al. 2024, Section 4, eq. 3). A vector (numerically) in the span of the ones before it gets a
    norm clamped at ``eps`` instead of a division by zero.

    When a gradient is wanted the loop runs as one autograd node with a hand-written backward
    (:class:`_GramSchmidtFunction`: the reverse of each projection and normalisation, autograd's arithmetic
    without its per-node cost); :func:`gram_schmidt_reference` is the same loop through autograd.
    """
    if h.dim() != 3:
        raise ValueError(f"gram_schmidt expects [k, B, D], got {list(h.shape)}")
    if h.shape[0] > h.shape[2]:
        raise ValueError(f"gram_schmidt: k={h.shape[0]} vectors cannot be orthonormal in D={h.shape[2]} dimensions")
    if h.requires_grad and torch.is_grad_enabled() and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
        return _GramSchmidtFunction.apply(h, eps)
    return gram_schmidt_reference(h, eps)


def gram_schmidt_reference(h: Tensor, eps: float = 1e-8) -> Tensor:
    """:func:`gram_schmidt` as a plain loop through autograd (no checks)."""
    return _gram_schmidt_forward(h, eps)[0]


def _gram_schmidt_forward(h: Tensor, eps: float) -> tuple[Tensor, tuple[Any, ...]]:
    """Modified Gram-Schmidt and what its backward reads: per vector the residuals before each projection,
    the projection coefficients, the residual's norm and the clamped norm."""
    basis: list[Tensor] = []
    residuals: list[list[Tensor]] = []
    coefficients: list[list[Tensor]] = []
    norms: list[Tensor] = []
    clamped: list[Tensor] = []
    for j in range(h.shape[0]):
        v = h[j]
        vs, cs = [], []
        for u in basis:
            c = (v * u).sum(-1, keepdim=True)
            vs.append(v)
            cs.append(c)
            v = v - c * u
        r = v.norm(dim=-1, keepdim=True)
        n = r.clamp_min(eps)
        basis.append(v / n)
        residuals.append(vs)
        coefficients.append(cs)
        norms.append(r)
        clamped.append(n)
    return torch.stack(basis), (basis, residuals, coefficients, norms, clamped)


class _GramSchmidtFunction(torch.autograd.Function):
    """:func:`gram_schmidt_reference` as one autograd node.

    Backward, for vector ``j`` from the last to the first (``g_u`` holds every later vector's contributions
    by then): through ``u = v / max(|v|, eps)``, ``g_v = (g_u - [|v| >= eps] <g_u, u> u) / max(|v|, eps)``;
    then through each projection ``v' = v - c u_i`` with ``c = <v, u_i>`` in reverse: ``g_c = -<g_v', u_i>``,
    ``g_v = g_v' + g_c u_i``, ``g_{u_i} += -c g_v' + g_c v``. ``create_graph`` differentiates the reference
    loop instead, so higher-order gradients stay exact.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        out, ctx.intermediates = _gram_schmidt_forward(h, eps)
        ctx.save_for_backward(h)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        (h,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph
            with torch.enable_grad():
                out = gram_schmidt_reference(h, ctx.eps)
                return torch.autograd.grad(out, h, grad, create_graph=True)[0], None
        basis, residuals, coefficients, norms, clamped = ctx.intermediates
        k = h.shape[0]
        g_u: list[Tensor] = list(grad.unbind(0))
        g_h: list[Tensor] = [grad[0]] * k
        for j in range(k - 1, -1, -1):
            u, gu = basis[j], g_u[j]
            radial = (gu * u).sum(-1, keepdim=True) * (norms[j] >= ctx.eps).to(gu.dtype)
            g_v = (gu - radial * u) / clamped[j]
            for i in range(j - 1, -1, -1):
                u_i = basis[i]
                g_c = -(g_v * u_i).sum(-1, keepdim=True)
                g_u[i] = g_u[i] - coefficients[j][i] * g_v + g_c * residuals[j][i]
                g_v = g_v + g_c * u_i
            g_h[j] = g_v
        return torch.stack(g_h), None


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
