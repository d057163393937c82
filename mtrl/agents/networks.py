"""The networks of the SAC family: a tanh-squashed Gaussian actor and twin Q critics, each reading its input
through an injected :class:`~mtrl.encoders.TaskEncoder` and ending in a single or a per-task output layer.

* :class:`TaskHead`: one output layer shared by every task, or one per task (multi-head SAC, Yu et al.,
  "Meta-World", CoRL 2019: "a shared network apart from independent heads for each task"). Every head is
  computed in one matmul and each row picks its task's head with a ``gather`` (exports as ONNX
  ``GatherElements``).
* :class:`SquashedGaussianActor`: ``encoder -> ReLU MLP -> head -> (mean, log_std)``; actions
  ``tanh(mean + std * eps)`` with the change-of-variables correction of the log-density (Haarnoja et al.,
  "Soft Actor-Critic: Off-Policy Maximum Entropy Deep Reinforcement Learning with a Stochastic Actor",
  ICML 2018, Appendix C).
* :class:`TwinCritic`: ``encoder -> [features, action] -> n independent ReLU MLPs -> heads``, ``Q [n, B]``
  (clipped double Q: Fujimoto et al., "Addressing Function Approximation Error in Actor-Critic Methods",
  ICML 2018, as SAC uses it). The ``n`` MLPs run as one batched matmul (:class:`~mtrl.encoders.EnsembleMLP`).

Both expose ``shared_parameters()`` and ``task_parameters()`` (what :mod:`mtl.gradients` methods take as
``shared`` and ``others``) and ``forward_with_representation`` (the last hidden layer, the ``Z`` of
MGDA-UB and GREAT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtrl.encoders import EnsembleLinear, EnsembleMLP, TaskEncoder

__all__ = [
    "EnvSpec",
    "SquashedGaussianActor",
    "TaskHead",
    "TwinCritic",
    "squashed_gaussian",
]

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class EnvSpec:
    """What an agent needs to know about a multi-task environment family.

    Attributes:
        obs_dim: size of the ``obs`` part of the observation.
        action_dim: size of the action (a ``Box`` in ``[-1, 1]``).
        task_names: the ``K`` task names; task index ``i`` is ``task_names[i]``.
        metadata: ``[K, M]`` float32 task metadata (CARE's context input), or ``None``.
    """

    obs_dim: int
    action_dim: int
    task_names: tuple[str, ...]
    metadata: np.ndarray | None = field(default=None, compare=False)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @classmethod
    def from_family(cls, family: Any) -> EnvSpec:
        """Read the spaces of ``family.make_env(0)`` (closed again) and the family's names and metadata.

        Raises:
            TypeError / ValueError: the observation space is not ``Dict(obs=Box, task=Discrete(K))`` or the
                action space is not a ``Box`` in ``[-1, 1]``.
        """
        from gymnasium import spaces

        names = tuple(family.task_names)
        env = family.make_env(0)
        try:
            obs_space, act_space = env.observation_space, env.action_space
        finally:
            env.close()
        if not isinstance(obs_space, spaces.Dict) or set(obs_space.spaces) != {"obs", "task"}:
            raise TypeError(f"multi-task envs must observe Dict(obs=Box, task=Discrete(K)), got {obs_space}")
        box, task = obs_space["obs"], obs_space["task"]
        if not isinstance(box, spaces.Box) or len(box.shape) != 1:
            raise TypeError(f"observation 'obs' must be a 1-d Box, got {box}")
        if not isinstance(task, spaces.Discrete) or int(task.n) != len(names):
            raise ValueError(f"observation 'task' must be Discrete({len(names)}) (one per task name), got {task}")
        if not isinstance(act_space, spaces.Box) or len(act_space.shape) != 1:
            raise TypeError(f"the action space must be a 1-d Box, got {act_space}")
        if not (np.all(act_space.low == -1.0) and np.all(act_space.high == 1.0)):
            raise ValueError(
                f"SAC's tanh policy acts in [-1, 1]; this action space is [{act_space.low}, {act_space.high}] "
                "(rescale actions in the environment wrapper)"
            )
        metadata = getattr(family, "metadata", None)
        if metadata is not None:
            metadata = np.asarray(metadata, dtype=np.float32)
            if metadata.ndim != 2 or metadata.shape[0] != len(names):
                raise ValueError(f"family.metadata must be [K={len(names)}, M], got {list(metadata.shape)}")
        return cls(int(box.shape[0]), int(act_space.shape[0]), names, metadata)


class TaskHead(nn.Module):
    """The output layer: ``num_heads == 1`` (one for every task) or ``K`` (one per task, multi-head SAC).

    Input ``[B, in]`` (or ``[n, B, in]`` with ``ensemble=n``); output ``[B, out]`` (``[n, B, out]``): row ``b``
    through head ``task[b]``. All heads are one ``Linear(in, num_heads * out)`` whose slices are the heads.
    """

    def __init__(self, in_features: int, out_features: int, num_heads: int = 1, *, ensemble: int | None = None) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"TaskHead needs num_heads >= 1, got {num_heads}")
        self.out_features, self.num_heads = out_features, num_heads
        width = out_features * num_heads
        self.linear: nn.Module = (
            nn.Linear(in_features, width) if ensemble is None else EnsembleLinear(ensemble, in_features, width)
        )

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        y = self.linear(x)
        if self.num_heads == 1:
            return y
        y = y.unflatten(-1, (self.num_heads, self.out_features))  # [..., B, heads, out]
        index = task.view(-1, 1, 1).expand(*y.shape[:-2], 1, self.out_features)
        return y.gather(-2, index).squeeze(-2)


def _hidden(widths: Sequence[int], what: str) -> list[int]:
    widths = [int(w) for w in widths]
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"{what}: give at least one positive hidden width, got {widths}")
    return widths


def squashed_gaussian(mean: Tensor, log_std: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """``a = tanh(u)``, ``u = mean + exp(log_std) * eps``, and ``log pi(a)`` summed over action dimensions.

    ``log pi(a) = sum_i [log N(u_i; mean_i, std_i) - log(1 - tanh(u_i)^2)]`` (Haarnoja et al. 2018,
    Appendix C, eq. 21), with ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))``, exact and finite for
    any ``u``. Gradients flow to ``mean`` and ``log_std`` (the reparameterisation trick).
    """
    u = mean + log_std.exp() * eps
    log_prob = (-0.5 * eps.pow(2) - log_std - _HALF_LOG_2PI).sum(-1)
    log_prob = log_prob - (2.0 * (_LOG_2 - u - F.softplus(-2.0 * u))).sum(-1)
    return torch.tanh(u), log_prob


class SquashedGaussianActor(nn.Module):
    """``pi(a | s, task) = tanh(N(mean, std))``: ``encoder -> ReLU MLP -> head -> (mean, log_std)``.

    ``log_std`` is squashed into ``[log_std_min, log_std_max]`` by ``min + (max - min) (tanh(x) + 1) / 2``
    (as in SAC-AE and CARE's code), which keeps its gradient alive at the bounds.

    Example::

        actor = SquashedGaussianActor(OneHotEncoder(4, 3), [64, 64], action_dim=2)
        action, log_prob = actor.sample(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))  # [5, 2], [5]
    """

    def __init__(
        self,
        encoder: TaskEncoder,
        hidden: Sequence[int],
        action_dim: int,
        *,
        num_heads: int = 1,
        log_std_min: float = -5.0,
        log_std_max: float = 2.0,
    ) -> None:
        super().__init__()
        if not log_std_min < log_std_max:
            raise ValueError(f"log_std_min must be < log_std_max, got {log_std_min} and {log_std_max}")
        widths = _hidden(hidden, "actor hidden")
        self.encoder = encoder
        self.action_dim = int(action_dim)
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)
        layers: list[nn.Module] = []
        d = encoder.out_dim
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU()]
            d = w
        self.trunk = nn.Sequential(*layers)
        self.head = TaskHead(d, 2 * self.action_dim, num_heads)

    def task_parameters(self) -> list[nn.Parameter]:
        """The per-task heads (multi-head) and the encoder's task parameters."""
        own = list(self.head.parameters()) if self.head.num_heads > 1 else []
        return own + self.encoder.task_parameters()

    def shared_parameters(self) -> list[nn.Parameter]:
        task_ids = {id(p) for p in self.task_parameters()}
        return [p for p in self.parameters() if id(p) not in task_ids]

    def forward_with_representation(self, obs: Tensor, task: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean [B, A], log_std [B, A], z [B, H])`` with ``z`` the last hidden layer."""
        z = self.trunk(self.encoder(obs, task))
        mean, raw = self.head(z, task).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(raw) + 1.0)
        return mean, log_std, z

    def forward(self, obs: Tensor, task: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)``, each ``[B, action_dim]``."""
        mean, log_std, _ = self.forward_with_representation(obs, task)
        return mean, log_std

    def sample(self, obs: Tensor, task: Tensor) -> tuple[Tensor, Tensor]:
        """A reparameterised action ``[B, A]`` and its log-probability ``[B]`` (noise from torch's global RNG)."""
        mean, log_std = self(obs, task)
        return squashed_gaussian(mean, log_std, torch.randn_like(mean))

    def mode(self, obs: Tensor, task: Tensor) -> Tensor:
        """The deterministic action ``tanh(mean)``."""
        return torch.tanh(self(obs, task)[0])


class TwinCritic(nn.Module):
    """``Q_j(s, a, task)`` for ``j < num_critics``: ``[encoder(s, task), a] -> n ReLU MLPs -> heads``.

    One encoder feeds all ``n`` critics (as in CARE's code); the MLPs and heads are independent.

    Example::

        critic = TwinCritic(IdentityEncoder(4), [64, 64], action_dim=2)
        critic(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.zeros(5, 2)).shape   # (2, 5)
    """

    def __init__(
        self,
        encoder: TaskEncoder,
        hidden: Sequence[int],
        action_dim: int,
        *,
        num_heads: int = 1,
        num_critics: int = 2,
    ) -> None:
        super().__init__()
        if num_critics < 1:
            raise ValueError(f"TwinCritic needs num_critics >= 1, got {num_critics}")
        widths = _hidden(hidden, "critic hidden")
        self.encoder = encoder
        self.action_dim, self.num_critics = int(action_dim), int(num_critics)
        self.trunk = EnsembleMLP(num_critics, encoder.out_dim + self.action_dim, widths[:-1], widths[-1])
        self.trunk.append(nn.ReLU())
        self.head = TaskHead(widths[-1], 1, num_heads, ensemble=num_critics)

    def task_parameters(self) -> list[nn.Parameter]:
        own = list(self.head.parameters()) if self.head.num_heads > 1 else []
        return own + self.encoder.task_parameters()

    def shared_parameters(self) -> list[nn.Parameter]:
        task_ids = {id(p) for p in self.task_parameters()}
        return [p for p in self.parameters() if id(p) not in task_ids]

    def forward_with_representation(self, obs: Tensor, task: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q [n, B], z [B, n, H])`` with ``z`` every critic's last hidden layer (batch first)."""
        x = torch.cat([self.encoder(obs, task), action], dim=1)
        z = self.trunk(x).transpose(0, 1)  # [B, n, H]
        return self.head(z.transpose(0, 1), task).squeeze(-1), z

    def forward(self, obs: Tensor, task: Tensor, action: Tensor) -> Tensor:
        """``Q [n, B]``."""
        return self.forward_with_representation(obs, task, action)[0]
