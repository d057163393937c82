"""Multi-task SAC agents: one SAC core (:mod:`mtrl.agents.sac`), networks with injected task encoders
(:mod:`mtrl.agents.networks`, :mod:`mtrl.encoders`), and the named agents (:mod:`mtrl.agents.variants`):
MT-SAC, multi-head SAC, CARE, MOORE and the task-blind SAC baseline."""

from mtrl.agents.networks import EnvSpec, SquashedGaussianActor, TaskHead, TwinCritic, squashed_gaussian
from mtrl.agents.sac import SAC, SACConfig, Transition
from mtrl.agents.variants import AGENTS, build_agent, build_sac, care, moore, mt_sac, multihead_sac, task_blind_sac

__all__ = [
    "AGENTS",
    "SAC",
    "EnvSpec",
    "SACConfig",
    "SquashedGaussianActor",
    "TaskHead",
    "Transition",
    "TwinCritic",
    "build_agent",
    "build_sac",
    "care",
    "moore",
    "mt_sac",
    "multihead_sac",
    "squashed_gaussian",
    "task_blind_sac",
]
