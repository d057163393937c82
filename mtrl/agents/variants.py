"""The named multi-task agents: one SAC core (:class:`~mtrl.agents.sac.SAC`), five ways to condition on the task.

==================  ====================================================  ============  ============
agent               encoder (actor and critic each have their own)        heads         temperature
==================  ====================================================  ============  ============
``mt_sac``          observation + task one-hot (:class:`OneHotEncoder`)   shared        one per task
``multihead_sac``   observation (:class:`IdentityEncoder`)                one per task  one per task
``care``            CARE mixture of encoders (:class:`CAREEncoder`)       shared        one per task
``moore``           orthogonal experts (:class:`MOOREEncoder`)            shared        one per task
``task_blind_sac``  observation (:class:`IdentityEncoder`)                shared        one for all
==================  ====================================================  ============  ============

* MT-SAC and multi-head SAC are the baselines of Yu et al., "Meta-World: A Benchmark and Evaluation for
  Multi-Task and Meta Reinforcement Learning" (CoRL 2019, Section 5) and of the CARE paper; both learn a
  temperature per task ("a separate alpha for each task", Meta-World Section 5.1).
* CARE: Sodhani, Zhang & Pineau, "Multi-Task Reinforcement Learning with Context-based Representations"
  (ICML 2021).
* MOORE: Hendawy, Peters & D'Eramo, "Multi-Task Reinforcement Learning with Mixture of Orthogonal Experts"
  (ICLR 2024).
* The task-blind agent sees neither the task index nor its metadata: on tasks that share observations
  it can only learn one behaviour for all of them (a lower bound).

Every builder has the signature the ``agent/`` config group instantiates (``_partial_: true``): the family's spec,
SAC's config, the builder's own architecture keywords and SAC's multi-task strategies
(:class:`~mtrl.agents.sac.Strategies`: ``actor_gradient``, ``critic_gradient``, ``actor_weighting``,
``critic_weighting``, ``scheduler``), which go to :class:`~mtrl.agents.sac.SAC` unchanged::

    agent = care(spec, config, critic_gradient=PCGrad(), critic_weighting=FAMO(spec.task_names), hidden=[256, 256])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mtrl.agents.networks import EnvSpec, SquashedGaussianActor, TwinCritic
from mtrl.agents.sac import SAC, SACConfig, Strategies
from mtrl.encoders import CAREEncoder, IdentityEncoder, MOOREEncoder, OneHotEncoder, TaskEncoder

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AGENTS", "build_agent", "build_sac", "care", "moore", "mt_sac", "multihead_sac", "task_blind_sac"]

EncoderFactory = Callable[[], TaskEncoder]


def build_sac(
    spec: EnvSpec,
    config: SACConfig | None,
    encoder: EncoderFactory,
    *,
    hidden: Sequence[int],
    multi_head: bool,
    per_task_temperature: bool,
    name: str,
    **strategies: Unpack[Strategies],
) -> SAC:
    """A :class:`SAC` whose actor and critic each read through their own ``encoder()``.

    ``hidden``: the widths of the actor's MLP and of each critic's MLP; ``multi_head``: one output layer
    per task; ``per_task_temperature``: one ``alpha`` per task; ``strategies``: SAC's multi-task strategies.
    """
    config = config if config is not None else SACConfig()
    heads = spec.num_tasks if multi_head else 1
    actor = SquashedGaussianActor(
        encoder(),
        hidden,
        spec.action_dim,
        num_heads=heads,
        log_std_min=config.log_std_min,
        log_std_max=config.log_std_max,
    )
    critic = TwinCritic(encoder(), hidden, spec.action_dim, num_heads=heads)
    return SAC(
        actor,
        critic,
        spec,
        config,
        per_task_temperature=per_task_temperature,
        name=name,
        **strategies,
    )


def mt_sac(
    spec: EnvSpec,
    config: SACConfig | None = None,
    *,
    hidden: Sequence[int] = (256, 256),
    **strategies: Unpack[Strategies],
) -> SAC:
    """MT-SAC (Yu et al. 2019): the task one-hot appended to the observation, one temperature per task."""
    return build_sac(
        spec,
        config,
        lambda: OneHotEncoder(spec.obs_dim, spec.num_tasks),
        hidden=hidden,
        multi_head=False,
        per_task_temperature=True,
        name="mt_sac",
        **strategies,
    )


def multihead_sac(
    spec: EnvSpec,
    config: SACConfig | None = None,
    *,
    hidden: Sequence[int] = (256, 256),
    **strategies: Unpack[Strategies],
) -> SAC:
    """Multi-head SAC (Yu et al. 2019): a shared trunk over the observation, one actor and one critic output
    head per task (the heads are the task-specific parameters for gradient methods), one temperature per task."""
    return build_sac(
        spec,
        config,
        lambda: IdentityEncoder(spec.obs_dim, spec.num_tasks),
        hidden=hidden,
        multi_head=True,
        per_task_temperature=True,
        name="multihead_sac",
        **strategies,
    )


def care(
    spec: EnvSpec,
    config: SACConfig | None = None,
    *,
    hidden: Sequence[int] = (256, 256),
    num_experts: int = 4,
    expert_hidden: Sequence[int] = (64,),
    expert_dim: int = 64,
    context_hidden: Sequence[int] = (64,),
    context_dim: int = 32,
    attention_temperature: float = 1.0,
    normalize_metadata: bool = True,
    **strategies: Unpack[Strategies],
) -> SAC:
    """CARE (Sodhani et al. 2021): the :class:`~mtrl.encoders.CAREEncoder` (``num_experts`` encoders mixed by
    attention from the context of ``spec.metadata``) feeds actor and critics; one temperature per task.

    Raises:
        ValueError: the family has no metadata.
    """
    if spec.metadata is None:
        raise ValueError("CARE needs task metadata (TaskFamily.metadata [K, M]); this family has none")

    def encoder() -> TaskEncoder:
        return CAREEncoder(
            spec.obs_dim,
            spec.num_tasks,
            spec.metadata,
            num_experts=num_experts,
            expert_hidden=expert_hidden,
            expert_dim=expert_dim,
            context_hidden=context_hidden,
            context_dim=context_dim,
            temperature=attention_temperature,
            normalize_metadata=normalize_metadata,
        )

    return build_sac(
        spec,
        config,
        encoder,
        hidden=hidden,
        multi_head=False,
        per_task_temperature=True,
        name="care",
        **strategies,
    )


def moore(
    spec: EnvSpec,
    config: SACConfig | None = None,
    *,
    hidden: Sequence[int] = (256, 256),
    num_experts: int = 4,
    expert_hidden: Sequence[int] = (64,),
    expert_dim: int = 64,
    activation: str = "none",
    **strategies: Unpack[Strategies],
) -> SAC:
    """MOORE (Hendawy et al. 2024): the :class:`~mtrl.encoders.MOOREEncoder` (``num_experts`` experts,
    orthonormalised by Gram-Schmidt per row, mixed by per-task weights) feeds actor and critics; one temperature
    per task."""

    def encoder() -> TaskEncoder:
        return MOOREEncoder(
            spec.obs_dim,
            spec.num_tasks,
            num_experts=num_experts,
            expert_hidden=expert_hidden,
            expert_dim=expert_dim,
            activation=activation,
        )

    return build_sac(
        spec,
        config,
        encoder,
        hidden=hidden,
        multi_head=False,
        per_task_temperature=True,
        name="moore",
        **strategies,
    )


def task_blind_sac(
    spec: EnvSpec,
    config: SACConfig | None = None,
    *,
    hidden: Sequence[int] = (256, 256),
    **strategies: Unpack[Strategies],
) -> SAC:
    """Plain SAC that ignores the task (observation only, shared heads, one temperature): the baseline."""
    return build_sac(
        spec,
        config,
        lambda: IdentityEncoder(spec.obs_dim, spec.num_tasks),
        hidden=hidden,
        multi_head=False,
        per_task_temperature=False,
        name="task_blind_sac",
        **strategies,
    )


AGENTS: dict[str, Callable[..., SAC]] = {
    "mt_sac": mt_sac,
    "multihead_sac": multihead_sac,
    "care": care,
    "moore": moore,
    "task_blind_sac": task_blind_sac,
}


def build_agent(name: str, spec: EnvSpec, config: SACConfig | None = None, **kwargs: Any) -> SAC:
    """``AGENTS[name](spec, config, **kwargs)``, with a clear error for an unknown name."""
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; known: {sorted(AGENTS)}")
    return AGENTS[name](spec, config, **kwargs)
