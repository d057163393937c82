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
per-task losses ``{task: L_t}`` of :mod:`mtl` (a multi-task objective is a dict of scalar losses:
docs/architecture.md, "Contracts between the packages"); each is divided by the number of tasks present, so
their plain sum is the usual SAC loss (the batch mean when every task has the same number of rows, which the
per-task replay guarantees).
Each of the two objectives runs through its own :class:`mtl.step.MultiTaskStep` (the one step the
recommendation trainer runs too): scheduler -> weighting -> gradient method -> optimiser step -> feedback.

* **Scheduler** (one, shared by both steps; default: every task): ``scheduler.select(num_updates)`` picks the
  tasks that count in an update. The batch keeps only those tasks' rows, so the critic, actor and temperature
  losses are of those tasks alone (and divided by their number). It learns from the critic losses
  (``observe``, after the critic step: squared TD errors, comparable over time) and from episode outcomes
  (:meth:`SAC.observe_outcomes`, called by the RL trainer).
* **Weighting** (one instance per loss family, each with its own state; default: none, the plain sum):
  ``critic_weighting`` weights the per-task critic losses, ``actor_weighting`` the actor losses. The critic
  losses are squared errors (>= 0), which every weighting accepts; the actor losses ``alpha log pi - Q`` can be
  negative, which FAMO, DWA and uncertainty refuse. ``mtrl-train`` therefore weights the critic losses only
  unless told otherwise (``weighted_losses``), as FAMO's own MT10 runs do.
* **Gradient method** (one per family; default :class:`~mtl.gradients.Plain`, the plain sum): ``backward(weighted,
  shared=<shared parameters>, others=<per-task heads>, representation=<last hidden layer>)``; PCGrad and the
  others modulate the per-task gradients of the shared parameters.

Weightings that want the losses after the optimiser step (FAMO) get the same batch's losses recomputed: the
critic's at the same targets, the actor's with the same action noise. The temperature loss touches no shared
parameter and is always summed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict

import torch
from torch import Tensor, nn

from mtl.gradients import GradientMethod
from mtl.scheduling import TaskScheduler
from mtl.step import MultiTaskStep, StepParameters
from mtl.weighting import Weighting
from mtrl.agents.networks import EnvSpec, SquashedGaussianActor, TwinCritic, squashed_gaussian

__all__ = [
    "SAC",
    "SACConfig",
    "Strategies",
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


class Strategies(TypedDict, total=False):
    """SAC's multi-task strategies: keyword arguments of :class:`SAC` and of every builder of :mod:`mtrl.agents`."""

    actor_gradient: GradientMethod | None
    critic_gradient: GradientMethod | None
    actor_weighting: Weighting | None
    critic_weighting: Weighting | None
    scheduler: TaskScheduler | None


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
        actor_weighting: weights the per-task actor losses (:mod:`mtl.weighting`, built for the task names;
            default: none, the plain sum). Its trainable parameters (uncertainty's) join the actor's optimiser.
        critic_weighting: the same for the critic losses (a separate instance).
        scheduler: picks the tasks that count in each update (:mod:`mtl.scheduling`; default: every task).
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
        actor_weighting: Weighting | None = None,
        critic_weighting: Weighting | None = None,
        scheduler: TaskScheduler | None = None,
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
        # fused: one kernel per tensor doing the whole Adam step (foreach on CPU loops over tensors op by op; the
        # optimiser step dominated tiny networks' updates). Checkpoints written with foreach load and keep it.
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr, fused=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=True)
        self.temperature_optimizer = torch.optim.Adam([self.log_alpha], lr=config.temperature_lr, fused=True)
        # One multi-task step per objective; they count the same tasks (one scheduler), the critic's feeds it.
        self.critic_step = MultiTaskStep(
            self.task_names,
            weighting=critic_weighting,
            gradient=critic_gradient,
            scheduler=scheduler,
            max_grad_norm=config.grad_clip,
        )
        self.actor_step = MultiTaskStep(
            self.task_names,
            weighting=actor_weighting,
            gradient=actor_gradient,
            scheduler=scheduler,
            feedback=False,
            max_grad_norm=config.grad_clip,
        )
        self.actor_gradient, self.critic_gradient = self.actor_step.gradient, self.critic_step.gradient
        self.scheduler = scheduler
        self._params = {
            "actor": self._step_parameters(self.actor, self.actor_optimizer, self.actor_step),
            "critic": self._step_parameters(self.critic, self.critic_optimizer, self.critic_step),
        }
        self._task_index = {n: i for i, n in enumerate(self.task_names)}
        self._critic_params = list(self.critic.parameters())
        self._target_params = list(self.critic_target.parameters())
        self.num_updates = 0

    @staticmethod
    def _step_parameters(
        net: SquashedGaussianActor | TwinCritic, optimizer: torch.optim.Optimizer, step: MultiTaskStep
    ) -> StepParameters:
        """The parameters of one objective (fixed at construction); a weighting's trainable ones join ``optimizer``."""
        extra = step.trainable_parameters()
        if extra:
            optimizer.add_param_group({"params": extra})
        shared = net.shared_parameters()
        # GradNorm measures task gradient norms at the last shared layer: the last shared parameters are the
        # output head's weight and bias (one head for every task) or the trunk's last layer (one head per task).
        others = net.task_parameters() + extra
        return StepParameters(shared, others, last_shared=shared[-2:], clipped=list(net.parameters()))

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # The weightings are not submodules (their state travels in training_state, not in the weights that
        # load_run and export read), but follow the agent's device and dtype.
        out = super()._apply(fn, *args, **kwargs)
        for step in (self.actor_step, self.critic_step):
            if step.weighting is not None:
                step.weighting._apply(fn, *args, **kwargs)
        return out

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
    def counted_rows(self, batch: Transition) -> Transition:
        """The rows of ``batch`` whose tasks count in this update (``scheduler.select(num_updates)``; all without a
        scheduler)."""
        tasks = self.critic_step.select(self.num_updates)
        if len(tasks) == len(self.task_names):
            return batch
        index = torch.tensor([self._task_index[t] for t in tasks], device=batch.task.device)
        keep = torch.isin(batch.task, index)
        return Transition(*(x[keep] for x in batch))

    def update_critic(self, batch: Transition) -> tuple[dict[str, Tensor], dict[str, float]]:
        """One critic step on the rows of the tasks that count; returns their per-task losses and the gradient
        method's stats."""
        cfg = self.config
        batch = self.counted_rows(batch)
        with torch.no_grad():
            next_action, next_log_prob = self.actor.sample(batch.next_obs, batch.task)
            next_q = self.critic_target(batch.next_obs, batch.task, next_action)
            target = soft_q_target(
                batch.reward, batch.terminated, next_q, next_log_prob, self.alpha(batch.task), cfg.gamma
            )
        representation = None
        if self.critic_step.requires_representation:
            q, representation = self.critic.forward_with_representation(batch.obs, batch.task, batch.action)
        else:
            q = self.critic(batch.obs, batch.task, batch.action)
        losses = task_losses(critic_rows(q, target), batch.task, self.task_names)

        def losses_after_step() -> dict[str, Tensor]:  # the same rows and targets, the stepped critic
            q_after = self.critic(batch.obs, batch.task, batch.action)
            return task_losses(critic_rows(q_after, target), batch.task, self.task_names)

        out = self.critic_step.run(
            self.num_updates,
            losses,
            self.critic_optimizer,
            self._params["critic"],
            cut=representation,
            losses_after_step=losses_after_step,
        )
        return losses, out.stats

    def update_actor_and_temperature(
        self, batch: Transition
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, dict[str, float]]:
        """One actor step (critics frozen) and one temperature step on the rows of the tasks that count; returns
        their per-task actor losses, the temperature loss, the mean log-probability and the gradient method's
        stats."""
        batch = self.counted_rows(batch)
        mean, log_std, z = self.actor.forward_with_representation(batch.obs, batch.task)
        noise = torch.randn_like(mean)
        action, log_prob = squashed_gaussian(mean, log_std, noise)
        for p in self._critic_params:
            p.requires_grad_(False)
        try:
            q = self.critic(batch.obs, batch.task, action)
        finally:
            for p in self._critic_params:
                p.requires_grad_(True)
        alpha = self.alpha(batch.task)
        losses = task_losses(actor_rows(q, log_prob, alpha.detach()), batch.task, self.task_names)

        def losses_after_step() -> dict[str, Tensor]:  # the same rows and action noise, the stepped actor
            mean_after, log_std_after = self.actor(batch.obs, batch.task)
            action_after, log_prob_after = squashed_gaussian(mean_after, log_std_after, noise)
            q_after = self.critic(batch.obs, batch.task, action_after)
            return task_losses(actor_rows(q_after, log_prob_after, alpha.detach()), batch.task, self.task_names)

        out = self.actor_step.run(
            self.num_updates,
            losses,
            self.actor_optimizer,
            self._params["actor"],
            cut=z if self.actor_step.requires_representation else None,
            losses_after_step=losses_after_step,
        )

        rows = temperature_rows(alpha, log_prob, self.target_entropy)
        temperature_loss = torch.stack(list(task_losses(rows, batch.task, self.task_names).values())).sum()
        self.temperature_optimizer.zero_grad(set_to_none=True)
        temperature_loss.backward()
        self.temperature_optimizer.step()
        return losses, temperature_loss.detach(), log_prob.detach().mean(), out.stats

    def observe_outcomes(self, outcomes: Mapping[str, float]) -> None:
        """Episode outcomes for the scheduler (:meth:`mtl.scheduling.TaskScheduler.observe_outcomes`):
        ``{task: success rate in [0, 1]}`` of some tasks' recent episodes, at the current update. No-op without a
        scheduler."""
        if self.scheduler is not None and outcomes:
            self.scheduler.observe_outcomes(self.num_updates, outcomes)

    def end_epoch(self) -> None:
        """Hand each weighting the mean per-task losses of the updates since the last call (DWA's epochs)."""
        self.critic_step.end_epoch()
        self.actor_step.end_epoch()

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
                out.update(_weights("actor", self.actor_step))
        if self.num_updates % cfg.target_update_every == 0:
            self.update_target()
        self.num_updates += 1
        if stats:
            out["loss/critic"] = float(sum(v.item() for v in critic_losses.values()))
            out.update({f"loss/critic/{k}": float(v.item()) * len(critic_losses) for k, v in critic_losses.items()})
            out.update({f"grad/critic/{k}": float(v) for k, v in critic_grad.items()})
            out.update(_weights("critic", self.critic_step))
            alphas = self.log_alpha.detach().exp().tolist()
            names = self.task_names if self.per_task_temperature else ("all",)
            out.update({f"alpha/{n}": a for n, a in zip(names, alphas)})
        return out

    # ------------------------------------------------------------------ state
    def training_state(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: weights (with targets and temperatures),
        optimisers, the multi-task steps' state (weightings, gradient methods, scheduler) and the update counter."""
        return {
            "name": self.name,
            "modules": self.state_dict(),
            "optimizers": {
                "actor": self.actor_optimizer.state_dict(),
                "critic": self.critic_optimizer.state_dict(),
                "temperature": self.temperature_optimizer.state_dict(),
            },
            "steps": {"actor": self.actor_step.state_dict(), "critic": self.critic_step.state_dict()},
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
        if "steps" in state:
            steps = copy.deepcopy(state["steps"])
        else:  # written before the multi-task steps: gradient-method state only
            steps = {k: {"gradient": v} for k, v in copy.deepcopy(state["gradient"]).items()}
        self.actor_step.load_state_dict(steps["actor"])
        self.critic_step.load_state_dict(steps["critic"])
        self.num_updates = int(state["num_updates"])


def _weights(family: str, step: MultiTaskStep) -> dict[str, float]:
    """``{"weight/<family>/<task>": w}`` of the step's weighting's last call (``{}`` without a weighting)."""
    if step.weighting is None:
        return {}
    return {f"weight/{family}/{k}": v for k, v in step.weighting.current_weights().items()}
