"""Shared set-up of the ``mtrl`` tests: the tiny point-mass ``mtrl-train`` run that ``mtrl-teachers`` /
``mtrl-distill`` tests train their teachers with, and the comparison of two ``mtrl-train`` checkpoints that resume
tests use to say that an interrupted run ended bit-identical to an uninterrupted one.

Import it as ``from mtrl_helpers import ...`` (pytest puts ``tests/`` on ``sys.path``, as for ``ranks`` and
``jacobians``)."""

from __future__ import annotations

from typing import Any

import torch

#: The point-mass with two goals, (1, 0) and (-1, 0) on the unit circle, and 20-step episodes.
ENV = ["env.num_goals=2", "env.metadata_source=random", "env.max_episode_steps=20"]
#: One teacher's tiny ``mtrl-train`` run on :data:`ENV` (30 env steps, [16, 16] networks, no periodic evaluation
#: or checkpoints, no progress bar); the agent is left to the config that composes it.
TEACHER_RUN = [
    *ENV,
    "agent.hidden=[16,16]",
    "trainer.total_steps=30",
    "trainer.learning_starts=10",
    "trainer.batch_size=8",
    "trainer.replay_capacity=200",
    "trainer.eval_episodes=2",
    "trainer.eval_interval=0",
    "trainer.log_interval=10",
    "trainer.checkpoint_interval=0",
    "trainer.progress=false",
]
#: The ``mtrl-distill`` student settings the distillation tests share (on :data:`ENV`, [16, 16] networks); each test
#: module adds its own ``trainer.*`` length, logging and checkpoint settings.
STUDENT_BASE = [
    *ENV,
    "agent.hidden=[16,16]",
    "distill.batch_size=16",
    "distill.rollout_steps=10",
    "distill.collect_every=10",
]


def assert_same_agent_and_replay(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two ``mtrl-train`` checkpoints hold bit-identical agent tensors (every module's state dict), optimizer states
    (actor, critic, temperature) and replay contents."""
    for key, value in a["agent"]["modules"].items():
        assert torch.equal(value, b["agent"]["modules"][key]), key
    for opt in ("actor", "critic", "temperature"):
        sa, sb = a["agent"]["optimizers"][opt]["state"], b["agent"]["optimizers"][opt]["state"]
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (opt, i, k)
    for key in a["replay"]["data"]:
        for ta, tb in zip(a["replay"]["data"][key], b["replay"]["data"][key]):
            assert torch.equal(ta, tb), key
