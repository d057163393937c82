"""The deterministic multi-task policy as an export view for :mod:`serving.export` (ONNX, Triton layout).

:class:`PolicyExportView` wraps a copy of an agent's actor:

* inputs: ``obs`` ``FP32 [B, obs_dim]`` and ``task`` ``INT64 [B, 1]`` (the task index; ``[B, 1]`` rather
  than ``[B]`` because Triton needs non-empty ``dims`` for every tensor of a batching model, as
  :mod:`mtrec.export` does for its lengths);
* output: ``action`` ``FP32 [B, action_dim]`` = ``tanh(mean)``, the deterministic action SAC evaluates
  with (Haarnoja et al. 2018).

:func:`export_policy` writes a new model version with :func:`serving.export.export_to_repository`, which
exports through the dynamo exporter and refuses to write unless ONNX Runtime matches torch
(:func:`serving.export.check_parity`); ``policy.json`` next to the model names the tasks, so a client can
map task names to indices. :func:`export_run` does the same for a ``mtrl-train`` run directory.

Example::

    result = export_run("outputs/mtrl/RUN", "models", "pointmass_care")
    # models/pointmass_care/config.pbtxt, models/pointmass_care/1/model.onnx, .../policy.json
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtrl.agents import SAC, SquashedGaussianActor
from mtrl.runs import load_run
from serving.export import ExportResult, ParityOptions, ServingOptions, TensorSpec, export_to_repository

__all__ = ["POLICY_FILE", "PolicyExportView", "export_policy", "export_run", "policy_metadata"]

POLICY_FILE = "policy.json"


class PolicyExportView(nn.Module):
    """``(obs [B, obs_dim] float32, task [B, 1] int64) -> {"action": tanh(mean) [B, action_dim]}``.

    Holds a deep copy of the actor in eval mode, so later training does not change the view.

    Args:
        actor: the agent's actor.
        num_tasks: ``K`` (valid task indices are ``0 .. K-1``; the parity check draws from that range).
        obs_low, obs_high: the range the parity check draws observations from (``None``: standard normal).
    """

    def __init__(
        self,
        actor: SquashedGaussianActor,
        num_tasks: int,
        *,
        obs_low: float | None = None,
        obs_high: float | None = None,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.actor = copy.deepcopy(actor).eval().requires_grad_(False)
        obs_dim = actor.encoder.obs_dim
        self.input_specs = (
            TensorSpec("obs", torch.float32, (obs_dim,), low=obs_low, high=obs_high),
            TensorSpec("task", torch.int64, (1,), low=0, high=num_tasks),
        )
        self.output_specs = (TensorSpec("action", torch.float32, (actor.action_dim,)),)

    def forward(self, obs: Tensor, task: Tensor) -> dict[str, Tensor]:
        return {"action": self.actor.mode(obs, task.reshape(-1))}


def policy_metadata(agent: SAC, family: Any | None = None, *, step: int | None = None) -> dict[str, Any]:
    """``policy.json``: the agent, task names in index order, sizes, and the family's ``describe()``."""
    meta: dict[str, Any] = {
        "agent": agent.name,
        "tasks": list(agent.task_names),
        "obs_dim": agent.spec.obs_dim,
        "action_dim": agent.spec.action_dim,
        "inputs": {"obs": "FP32 [B, obs_dim]", "task": "INT64 [B, 1], the index into tasks"},
        "outputs": {"action": "FP32 [B, action_dim], tanh(mean) of the SAC actor, in [-1, 1]"},
    }
    if step is not None:
        meta["step"] = step
    if family is not None:
        meta["family"] = family.describe()
    return meta


def export_policy(
    agent: SAC,
    repository: str | Path,
    name: str,
    *,
    family: Any | None = None,
    version: int | None = None,
    parity: ParityOptions | None = None,
    serving: ServingOptions | None = None,
    obs_range: tuple[float, float] | None = None,
    source: dict[str, Any] | None = None,
    step: int | None = None,
) -> ExportResult:
    """Export ``agent``'s deterministic policy as a new version of model ``name`` in ``repository``.

    ``obs_range``: ``(low, high)`` the parity check draws observations from (default: standard normal).
    ``parity`` / ``serving``: the parity check's and ``config.pbtxt``'s settings (``None``: the defaults of
    :class:`~serving.export.ParityOptions` / :class:`~serving.export.ServingOptions`).

    Raises:
        serving.export.ParityError: ONNX Runtime disagrees with torch (nothing is written).
        serving.export.ExportError: the export failed or the repository conflicts.
    """
    low, high = obs_range if obs_range is not None else (None, None)
    view = PolicyExportView(agent.actor, agent.spec.num_tasks, obs_low=low, obs_high=high)
    return export_to_repository(
        view,
        repository,
        name,
        version=version,
        parity=parity or ParityOptions(),
        serving=serving or ServingOptions(),
        metadata={POLICY_FILE: policy_metadata(agent, family, step=step)},
        source=source or {"agent": agent.name},
    )


def export_run(
    run_dir: str | Path,
    repository: str | Path,
    name: str,
    *,
    version: int | None = None,
    parity: ParityOptions | None = None,
    serving: ServingOptions | None = None,
) -> ExportResult:
    """Export the policy of a ``mtrl-train`` run (``RUN/config.yaml`` + ``RUN/last.pt``).

    Raises:
        mtrl.runs.NotARunError: ``run_dir`` is not an ``mtrl-train`` run with a checkpoint.
    """
    run = load_run(run_dir)
    return export_policy(
        run.agent,
        repository,
        name,
        family=run.family,
        version=version,
        parity=parity,
        serving=serving,
        source={"run_dir": str(Path(run_dir).resolve()), "agent": run.agent.name, "step": run.step},
        step=run.step,
    )
