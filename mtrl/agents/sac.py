"""The one SAC core every multi-task agent runs on.

Soft Actor-Critic (Haarnoja et al., "Soft Actor-Critic: Off-Policy Maximum Entropy Deep Reinforcement
Learning with a Stochastic Actor", ICML 2018; and "Soft Actor-Critic Algorithms and Applications",
arXiv:1812.05905, with the automatic entropy tuning of its Section 5) with twin Q critics, target critics
updated by Polyak averaging, and a tanh-squashed Gaussian actor (:mod:`mtrl.agents.networks`).

Losses, per row ``b`` of a batch whose row ``b`` belongs to task ``t = task[b]`` (``alpha_t`` is the task's
temperature, or one temperature for every task):

* critic: ``y = r + gamma (1 - terminated) (min_j Q'_j(s', a') - alpha_t log pi(a' | s'))`` with
  ``a' ~ pi(. | s')`` and ``Q'`` the target critics; ``loss_b = sum_j (Q_j(s, a) - y)^2`` (the sum of the
  twin critics' squared errors, as CleanRL and CARE's code compute it);
* actor: ``loss_b = alpha_t log pi(a~ | s) - min_j Q_j(s, a~)`` with ``a~ ~ pi(. | s)`` reparameterised
  and the critics' parameters frozen;
* temperature: ``loss_b = -alpha_t (log pi(a~ | s) + H_target)`` with the bracket detached (the paper's
  ``J(alpha)``, eq. 18 of arXiv:1812.05905), ``H_target = -action_dim`` by default; ``alpha_t =
  exp(log_alpha_t)``.

**Multi-task objective.** The critic and actor losses are averaged over each task's rows, giving the
per-task losses ``{task: L_t}`` of :mod:`mtl` (ARCHITECTURE.md: "a multi-task objective is a dict of
scalar losses"); each is divided by the number of tasks present, so their plain sum is the usual SAC loss
(the batch mean when every task has the same number of rows, which the per-task replay guarantees). The
dict goes to the actor's and the critic's :class:`~mtl.gradients.GradientMethod`: ``backward(losses,
shared=<shared parameters>, others=<per-task heads>, representation=<last hidden layer>)``; ``none``
(:class:`~mtl.gradients.Plain`, the default) is the plain sum, PCGrad and the others modulate the
per-task gradients of the shared parameters. The temperature loss touches no shared parameter and is
always summed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mtl.gradients import GradientMethod, Plain
from mtrl.agents.networks import EnvSpec, SquashedGaussianActor, TwinCritic, squashed_gaussian

__all__ = [
    "SAC",
    "SACConfig",
    "Transition",
    "actor_rows",
    "critic_rows",
    "soft_q_target",
    "task_losses",
    "temperature_rows",
]


class Transition(NamedTuple):
    """A batch of transitions (rows of any tasks, in any order).

    ``obs [B, D]`` float, ``action [B, A]`` float, ``reward [B]`` float, ``next_obs [B, D]`` float,
    ``terminated [B]`` float (1 = the episode ended in a terminal state: no bootstrap; time-limit
    truncation is not termination), ``task [B]`` int64.
    """

    obs: Tensor
    action: Tensor
    reward: Tensor
    next_obs: Tensor
    terminated: Tensor
    task: Tensor


@dataclass
class SACConfig:
    """SAC's hyperparameters (the ``sac`` section of ``configs/mtrl.yaml``)."""

    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak averaging rate of the target critics: ``target <- (1 - tau) target + tau critic``."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics."""
    temperature_lr: float = 3e-4
    """Adam learning rate of ``log alpha``."""
    init_temperature: float = 1.0
    """Initial ``alpha`` of every task."""
    target_entropy: float | None = None
    """Entropy target ``H_target``; ``null`` = ``-action_dim`` (Haarnoja et al. 2018b)."""
    actor_update_every: int = 1
    """Update the actor and temperature every N critic updates."""
    target_update_every: int = 1
    """Polyak-average the target critics every N critic updates."""
    grad_clip: float | None = None
    """Clip the actor's and the critics' gradient norms to this value (``null`` = no clipping)."""
    log_std_min: float = -5.0
    """Lower bound of the actor's log standard deviation."""
    log_std_max: float = 2.0
    """Upper bound of the actor's log standard deviation."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"sac.gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"sac.tau must be in (0, 1], got {self.tau}")
        for key in ("actor_lr", "critic_lr", "temperature_lr", "init_temperature"):
            if not getattr(self, key) > 0:
                raise ValueError(f"sac.{key} must be > 0, got {getattr(self, key)}")
        for key in ("actor_update_every", "target_update_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"sac.{key} must be >= 1, got {getattr(self, key)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"sac.grad_clip must be > 0 or null, got {self.grad_clip}")
        if not self.log_std_min < self.log_std_max:
            raise ValueError(f"sac.log_std_min must be < log_std_max, got {self.log_std_min}, {self.log_std_max}")


# ----------------------------------------------------------------------------------------------- losses


def soft_q_target(
    reward: Tensor, terminated: Tensor, next_q: Tensor, next_log_prob: Tensor, alpha: Tensor, gamma: float
) -> Tensor:
    """``y [B] = r + gamma (1 - terminated) (min_j next_q[j] - alpha * next_log_prob)``.

    ``next_q [n, B]``: the target critics at ``(s', a')``; ``next_log_prob [B]``: ``log pi(a' | s')``;
    ``alpha [B]``: each row's temperature.
    """
    soft_value = next_q.min(dim=0).values - alpha * next_log_prob
    return reward + gamma * (1.0 - terminated) * soft_value


def critic_rows(q: Tensor, target: Tensor) -> Tensor:
    """``[B]``: ``sum_j (q[j] - target)^2`` over the ``n`` critics (``q [n, B]``, ``target [B]``)."""
    return (q - target.unsqueeze(0)).pow(2).sum(0)


def actor_rows(q: Tensor, log_prob: Tensor, alpha: Tensor) -> Tensor:
    """``[B]``: ``alpha * log_prob - min_j q[j]`` (``q [n, B]`` at the actor's reparameterised actions)."""
    return alpha * log_prob - q.min(dim=0).values


def temperature_rows(alpha: Tensor, log_prob: Tensor, target_entropy: float) -> Tensor:
    """``[B]``: ``-alpha * (log_prob + target_entropy)`` with the bracket detached (gradient only to alpha)."""
    return -alpha * (log_prob.detach() + target_entropy)


def task_losses(rows: Tensor, task: Tensor, task_names: tuple[str, ...] | list[str]) -> dict[str, Tensor]:
    """``{name: mean of rows of that task / number of tasks present}`` for every task present in ``task``.

    The sum of the values is the mean over tasks of the per-task means (the batch mean when every task has
    the same number of rows).
    """
    k = len(task_names)
    counts = torch.bincount(task, minlength=k)
    if counts.numel() > k:
        raise ValueError(f"task indices must be < {k} (the number of tasks), got max {int(task.max())}")
    sums = torch.zeros(k, dtype=rows.dtype, device=rows.device).index_add(0, task, rows)
    present = (counts > 0).nonzero().flatten().tolist()
    means = sums / counts.clamp_min(1).to(rows.dtype) / len(present)
    return {task_names[i]: means[i] for i in present}


# ------------------------------------------------------------------------------------------------ agent


class SAC(nn.Module):
    """A multi-task SAC agent: actor, twin critics, target critics, temperatures and their optimisers.

    The architecture (encoder, heads) is injected through ``actor`` and ``critic``; see
    :mod:`mtrl.agents` for the named agents (MT-SAC, multi-head SAC, CARE, task-blind SAC).

    Args:
        actor: the policy network.
        critic: the twin critics (the target critics are a frozen deep copy).
        spec: the environment family's spec (task names, action size).
        config: SAC's hyperparameters.
        per_task_temperature: one learned ``alpha`` per task (MT-SAC, Yu et al. 2019; CARE) or one for all.
        actor_gradient: how per-task actor losses become gradients (default :class:`~mtl.gradients.Plain`).
        critic_gradient: the same for the critic losses (a separate instance: stateful methods keep state
            per objective).
        name: the agent's name (recorded in checkpoints and exports).

    Example::

        spec = EnvSpec(obs_dim=4, action_dim=2, task_names=("a", "b"))
        agent = mt_sac(spec)                                # mtrl.agents
        stats = agent.update(replay.sample(64), stats=True)
        action = agent.act(obs, task, deterministic=True)
    """

    def __init__(
        self,
        actor: SquashedGaussianActor,
        critic: TwinCritic,
        spec: EnvSpec,
        config: SACConfig | None = None,
        *,
        per_task_temperature: bool = True,
        actor_gradient: GradientMethod | None = None,
        critic_gradient: GradientMethod | None = None,
        name: str = "sac",
    ) -> None:
        super().__init__()
        self.config = config = config if config is not None else SACConfig()
        if actor.action_dim != spec.action_dim or critic.action_dim != spec.action_dim:
            raise ValueError(
                f"actor/critic action sizes {actor.action_dim}/{critic.action_dim} differ from the env's "
                f"{spec.action_dim}"
            )
        self.spec = spec
        self.name = name
        self.task_names = tuple(spec.task_names)
        self.actor = actor
        self.critic = critic
        self.critic_target = copy.deepcopy(critic).requires_grad_(False)
        self.per_task_temperature = per_task_temperature
        n_alpha = spec.num_tasks if per_task_temperature else 1
        self.log_alpha = nn.Parameter(torch.full((n_alpha,), math.log(config.init_temperature)))
        self.target_entropy = (
            float(config.target_entropy) if config.target_entropy is not None else -float(spec.action_dim)
        )
        # foreach: one kernel per step for all tensors (the per-tensor loop dominates tiny networks' updates)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, foreach=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, foreach=True)
        self.temperature_optimizer = torch.optim.Adam([self.log_alpha], lr=config.temperature_lr, foreach=True)
        # Parameter lists, fixed at construction (gradient methods take them every update).
        self._groups = {
            "actor": (self.actor.shared_parameters(), self.actor.task_parameters()),
            "critic": (self.critic.shared_parameters(), self.critic.task_parameters()),
        }
        self._critic_params = list(self.critic.parameters())
        self._target_params = list(self.critic_target.parameters())
        self.actor_gradient = actor_gradient if actor_gradient is not None else Plain()
        self.critic_gradient = critic_gradient if critic_gradient is not None else Plain()
        self.num_updates = 0

    # ------------------------------------------------------------------ acting
    @property
    def device(self) -> torch.device:
        return self.log_alpha.device

    def alpha(self, task: Tensor) -> Tensor:
        """``[B]``: each row's temperature ``exp(log_alpha_task)`` (in the graph of ``log_alpha``)."""
        alpha = self.log_alpha.exp()
        if self.per_task_temperature:
            return alpha.index_select(0, task)
        return alpha.expand(task.shape[0])

    @torch.no_grad()
    def act(self, obs: Tensor, task: Tensor, deterministic: bool = False) -> Tensor:
        """Actions ``[B, A]`` in ``[-1, 1]``: ``tanh(mean)`` when ``deterministic``, else a sample."""
        if deterministic:
            return self.actor.mode(obs, task)
        return self.actor.sample(obs, task)[0]

    # ------------------------------------------------------------------ learning
    def _backward(
        self, method: GradientMethod, losses: dict[str, Tensor], which: str, representation: Tensor | None
    ) -> dict[str, float]:
        shared, task = self._groups[which]
        return method.backward(losses, shared, others=task, representation=representation)

    def update_critic(self, batch: Transition) -> tuple[dict[str, Tensor], dict[str, float]]:
        """One critic step; returns the per-task losses and the gradient method's stats."""
        cfg = self.config
        with torch.no_grad():
            next_action, next_log_prob = self.actor.sample(batch.next_obs, batch.task)
            next_q = self.critic_target(batch.next_obs, batch.task, next_action)
            target = soft_q_target(
                batch.reward, batch.terminated, next_q, next_log_prob, self.alpha(batch.task), cfg.gamma
            )
        representation = None
        if self.critic_gradient.requires_representation:
            q, representation = self.critic.forward_with_representation(batch.obs, batch.task, batch.action)
        else:
            q = self.critic(batch.obs, batch.task, batch.action)
        losses = task_losses(critic_rows(q, target), batch.task, self.task_names)
        self.critic_optimizer.zero_grad(set_to_none=True)
        grad_stats = self._backward(self.critic_gradient, losses, "critic", representation)
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
        self.critic_optimizer.step()
        return losses, grad_stats

    def update_actor_and_temperature(
        self, batch: Transition
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, dict[str, float]]:
        """One actor step (critics frozen) and one temperature step; returns the per-task actor losses, the
        temperature loss, the mean log-probability and the gradient method's stats."""
        cfg = self.config
        mean, log_std, z = self.actor.forward_with_representation(batch.obs, batch.task)
        action, log_prob = squashed_gaussian(mean, log_std, torch.randn_like(mean))
        for p in self._critic_params:
            p.requires_grad_(False)
        try:
            q = self.critic(batch.obs, batch.task, action)
        finally:
            for p in self._critic_params:
                p.requires_grad_(True)
        alpha = self.alpha(batch.task)
        losses = task_losses(actor_rows(q, log_prob, alpha.detach()), batch.task, self.task_names)
        self.actor_optimizer.zero_grad(set_to_none=True)
        representation = z if self.actor_gradient.requires_representation else None
        grad_stats = self._backward(self.actor_gradient, losses, "actor", representation)
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.actor.parameters(), cfg.grad_clip)
        self.actor_optimizer.step()

        rows = temperature_rows(alpha, log_prob, self.target_entropy)
        temperature_loss = torch.stack(list(task_losses(rows, batch.task, self.task_names).values())).sum()
        self.temperature_optimizer.zero_grad(set_to_none=True)
        temperature_loss.backward()
        self.temperature_optimizer.step()
        return losses, temperature_loss.detach(), log_prob.detach().mean(), grad_stats

    @torch.no_grad()
    def update_target(self) -> None:
        """Polyak averaging: ``target <- (1 - tau) target + tau critic``."""
        torch._foreach_lerp_(self._target_params, self._critic_params, self.config.tau)

    def update(self, batch: Transition, *, stats: bool = False) -> dict[str, float]:
        """One SAC update: critic; actor and temperature every ``actor_update_every``; target every
        ``target_update_every``. With ``stats`` returns losses, entropy, temperatures and the gradient
        methods' statistics as floats (a device sync; leave it off on other steps)."""
        cfg = self.config
        critic_losses, critic_grad = self.update_critic(batch)
        out: dict[str, Any] = {}
        if self.num_updates % cfg.actor_update_every == 0:
            actor_losses, temp_loss, log_prob, actor_grad = self.update_actor_and_temperature(batch)
            if stats:
                out["loss/actor"] = float(sum(v.item() for v in actor_losses.values()))
                out["loss/temperature"] = float(temp_loss.item())
                out["entropy"] = -float(log_prob.item())
                out.update({f"grad/actor/{k}": float(v) for k, v in actor_grad.items()})
                out.update({f"loss/actor/{k}": float(v.item()) * len(actor_losses) for k, v in actor_losses.items()})
        if self.num_updates % cfg.target_update_every == 0:
            self.update_target()
        self.num_updates += 1
        if stats:
            out["loss/critic"] = float(sum(v.item() for v in critic_losses.values()))
            out.update({f"loss/critic/{k}": float(v.item()) * len(critic_losses) for k, v in critic_losses.items()})
            out.update({f"grad/critic/{k}": float(v) for k, v in critic_grad.items()})
            alphas = self.log_alpha.detach().exp().tolist()
            names = self.task_names if self.per_task_temperature else ("all",)
            out.update({f"alpha/{n}": a for n, a in zip(names, alphas)})
        return out

    # ------------------------------------------------------------------ state
    def training_state(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: weights (with targets and temperatures),
        optimisers, gradient-method state and the update counter."""
        return {
            "name": self.name,
            "modules": self.state_dict(),
            "optimizers": {
                "actor": self.actor_optimizer.state_dict(),
                "critic": self.critic_optimizer.state_dict(),
                "temperature": self.temperature_optimizer.state_dict(),
            },
            "gradient": {"actor": self.actor_gradient.state_dict(), "critic": self.critic_gradient.state_dict()},
            "num_updates": self.num_updates,
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned (weights on the agent's device)."""
        if state.get("name", self.name) != self.name:
            raise ValueError(f"checkpoint holds agent {state['name']!r}, this agent is {self.name!r}")
        self.load_state_dict(state["modules"])
        # Optimizer.load_state_dict keeps tensors that need no cast by reference: copy, so this agent never
        # shares moment buffers with the agent (or checkpoint dict) the state came from.
        optimizers = copy.deepcopy(state["optimizers"])
        self.actor_optimizer.load_state_dict(optimizers["actor"])
        self.critic_optimizer.load_state_dict(optimizers["critic"])
        self.temperature_optimizer.load_state_dict(optimizers["temperature"])
        gradient = copy.deepcopy(state["gradient"])
        self.actor_gradient.load_state_dict(gradient["actor"])
        self.critic_gradient.load_state_dict(gradient["critic"])
        self.num_updates = int(state["num_updates"])
