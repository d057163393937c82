"""ENAS over multi-task sharing structures: the library side of ``mtlib-search`` (its command line:
:mod:`mtrec.cli.search`).

H. Pham, M. Y. Guan, B. Zoph, Q. V. Le, J. Dean, "Efficient Neural Architecture Search via Parameter Sharing",
ICML 2018, applied to the question Shared-Bottom / MMoE / CGC / PLE / task grouping each answer by hand: which
experts should each task read at each level?

* **Search space** (:class:`SearchSpace`, :mod:`mtrec.models.searched`): ``search.levels`` levels of
  ``search.experts`` shared experts plus ``search.task_experts`` own experts per task, on the model's input arch
  and task towers; one decision per (task, level) from ``search.choices`` (default: ``own`` or any non-empty
  subset of the shared experts). Every child is a :class:`~mtrec.models.SearchedPLE`, a model of the zoo.
* **Controller** (:class:`Controller`): an LSTM (``search.controller_hidden`` = 100 units, as the paper) that
  takes the decisions one after another (levels outer, tasks inner), each decision's embedding the next step's
  input, a softmax over the choices of each decision (logits ``c * tanh(z / T)`` with ``search.tanh_constant``
  ``c`` and ``search.temperature`` ``T``, as ENAS's sampler).
* **Training** (:func:`run_search`), alternating per epoch as the paper (the first ``search.warmup_epochs`` epochs
  without phase (b), so the shared weights first train on children of the initial, nearly uniform policy): (a) the
  shared weights of the :class:`~mtrec.models.SharingSupernet` on training batches, each batch through one child
  sampled from the fixed policy, with the ``mtrec-train`` machinery (:class:`mtrec.trainer.Trainer`'s ``train_step``:
  the configured weighting, gradient method and task scheduler act on that child's per-task losses; Adam as configured
  in ``optimizer``); (b) the controller on ``search.controller_steps`` validation batches with REINFORCE
  (:class:`Reinforce`): reward ``search.reward`` of the sampled child on the batch with the shared weights (``loss``:
  minus the mean over tasks of the task's loss divided by the loss of the best constant prediction on the batch;
  ``auc``: the mean AUC of the binary tasks), an exponential moving-average baseline (``search.baseline_decay``), an
  entropy bonus (``search.entropy_weight``), Adam (``search.controller_lr``).
* **End**: ``search.final_samples`` children sampled from the trained policy and its most likely child are each
  scored on the same ``search.final_batches`` validation batches with the shared weights; the best is written as
  ``architecture.yaml`` (a ``model`` config of ``mtrec-train``) and, with ``search.retrain``, retrained from
  scratch by :func:`mtrec.train.train_and_evaluate` (the run's own ``trainer`` / ``optimizer`` / ``weighting`` /
  ... settings) and evaluated on test.

Outputs (in the run directory): ``policy.jsonl`` (after each epoch: the marginal probability of every choice of
every (task, level), estimated from ``search.policy_samples`` sampled trajectories, the most likely child, the
baseline and the mean reward), ``samples.jsonl`` (every child the controller was trained on and every final
candidate, with its reward), ``architecture.yaml``, ``search.json`` (the result: best child, its reward, step
counts, wall time, settings), ``policy.png`` (choice probabilities per (task, level) over the search),
``retrain/`` (the ``mtrec-train`` run) and ``retrained_metrics.json``; the checkpoint ``supernet/last.pt``
(shared weights, their optimiser and strategies, controller, its optimiser, baseline, generators, history;
written atomically after every epoch) from which ``search.resume=true`` continues with identical results.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtl.checkpoint import atomic_write_json, atomic_write_jsonl, load_checkpoint, seed_everything
from mtl.tasks import TaskSpec
from mtrec.data.batch import Batch, DataBundle
from mtrec.models.searched import (
    OWN,
    Architecture,
    Choice,
    SharingSupernet,
    architecture_to_config,
    parse_choice,
)
from mtrec.train import CONFIG_KEYS, build_training, check_config, load_data, train_and_evaluate
from mtrec.trainer import LAST, Trainer, batch_to

PROGRAM = "mtlib-search"
SEARCHED_TARGET = "mtrec.models.SearchedPLE"
SUPERNET_TARGET = "mtrec.models.SharingSupernet"
REWARDS = ("loss", "auc")
log = logging.getLogger("mtrec.search")


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass
class SearchConfig:
    """The ``search`` node of ``configs/search.yaml`` (unknown keys fail at start-up)."""

    levels: int = 2
    """Levels ``L`` of the search space."""
    experts: int = 2
    """Shared experts per level ``E``."""
    task_experts: int = 1
    """Own experts of each task per level."""
    choices: list[Any] | None = None
    """The choices of every (task, level): ``own``, ``all`` or lists of shared-expert indices; ``null`` = ``own``
    and every non-empty subset of the shared experts (``2^E`` choices)."""
    epochs: int = 10
    """Epochs of the search; each is phase (a) then phase (b)."""
    steps_per_epoch: int | None = None
    """Shared-weight training steps of an epoch (one child per batch); ``null`` = one pass over the training set."""
    controller_steps: int = 20
    """Controller updates of an epoch, each on one sampled child and one validation batch."""
    warmup_epochs: int = 0
    """Epochs at the start whose phase (b) is skipped: the shared weights train on children of the initial (nearly
    uniform) policy before the controller learns from their rewards."""
    controller_batch_size: int = 512
    """Rows of a validation batch that rewards a child."""
    controller_hidden: int = 100
    """Hidden units of the controller's LSTM (100 in Pham et al.)."""
    controller_lr: float = 0.005
    """Adam learning rate of the controller."""
    entropy_weight: float = 0.001
    """Weight of the policy entropy added to the controller's objective."""
    baseline_decay: float = 0.9
    """Decay of the exponential moving-average reward baseline."""
    tanh_constant: float | None = 1.5
    """Logits are ``c * tanh(z / temperature)`` (ENAS's sampler); ``null`` = ``z / temperature``."""
    temperature: float = 1.0
    """Softmax temperature of the controller's logits."""
    reward: str = "loss"
    """``loss``: minus the mean normalised task loss (every task kind); ``auc``: the mean AUC of binary tasks."""
    final_samples: int = 10
    """Children sampled from the trained policy at the end (plus its most likely child), scored with the shared
    weights."""
    final_batches: int = 4
    """Validation batches (of ``controller_batch_size`` rows) each final candidate is scored on."""
    policy_samples: int = 64
    """Trajectories that estimate the marginal choice probabilities written to ``policy.jsonl``."""
    retrain: bool = True
    """Retrain the chosen child from scratch with ``mtrec-train``'s settings and test it."""
    resume: bool = False
    """Continue from ``supernet/last.pt`` in the run directory (and a retraining already under way)."""
    plot: bool = True
    """Write ``policy.png`` (needs matplotlib)."""

    def __post_init__(self) -> None:
        for key in ("levels", "experts", "task_experts", "epochs", "controller_batch_size", "controller_hidden",
                    "final_samples", "final_batches", "policy_samples"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ValueError(f"search.{key} must be >= 1, got {getattr(self, key)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"search.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.controller_steps < 0:
            raise ValueError(f"search.controller_steps must be >= 0, got {self.controller_steps}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"search.steps_per_epoch must be >= 1 or null, got {self.steps_per_epoch}")
        if self.reward not in REWARDS:
            raise ValueError(f"search.reward must be one of {list(REWARDS)}, got {self.reward!r}")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"search.baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.temperature <= 0 or (self.tanh_constant is not None and self.tanh_constant <= 0):
            raise ValueError("search.temperature and search.tanh_constant must be > 0")
        if self.controller_lr <= 0 or self.entropy_weight < 0:
            raise ValueError("search.controller_lr must be > 0 and search.entropy_weight >= 0")
        if self.choices is None and self.experts > 6:
            raise ValueError(
                f"search.experts={self.experts} with every subset as a choice gives {2**self.experts} choices per "
                "decision; give search.choices (e.g. [own, all, [0], [1]]) or use at most 6 experts"
            )


SEARCH_KEYS = tuple(f.name for f in fields(SearchConfig))


def search_config(node: Any) -> SearchConfig:
    """Validate a ``search`` node against :class:`SearchConfig` (an unknown key or a wrong type is a ``ValueError``
    naming the key)."""
    if node is None:
        return SearchConfig()
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SearchConfig), node)
    except OmegaConfBaseException as err:
        raise ValueError(f"config section 'search': {str(err).splitlines()[0]}") from err
    return SearchConfig(**OmegaConf.to_container(merged, resolve=True))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------------


def choice_label(choice: Choice) -> str:
    """``"own"`` or the shared experts joined by ``+`` (``"0+2"``)."""
    return OWN if choice == OWN else "+".join(map(str, choice))  # type: ignore[arg-type]


class SearchSpace:
    """The decisions of the search: one per (task, level), ordered levels outer, tasks inner (the controller's
    order), each from the same list of choices.

    Example::

        >>> space = SearchSpace(["a", "b"], levels=1, experts=2)
        >>> [choice_label(c) for c in space.choices], space.size
        (['own', '0', '1', '0+1'], 16)
        >>> space.decode([0, 3])
        {'a': ('own',), 'b': ((0, 1),)}
        >>> space.encode(space.decode([2, 1]))
        [2, 1]
    """

    def __init__(self, tasks: Sequence[str], levels: int, experts: int, choices: Sequence[Any] | None = None) -> None:
        self.tasks, self.levels, self.experts = tuple(tasks), int(levels), int(experts)
        if choices is None:
            subsets = [tuple(e for e in range(experts) if m >> e & 1) for m in range(1, 2**experts)]
            parsed: list[Choice] = [OWN, *sorted(subsets, key=lambda s: (len(s), s))]
        else:
            if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or len(choices) < 2:
                raise ValueError(f"search.choices must list at least two choices, got {choices!r}")
            parsed = [parse_choice(c, experts, f"search.choices[{i}]") for i, c in enumerate(choices)]
            if len(set(parsed)) != len(parsed):
                raise ValueError(f"search.choices lists a choice twice: {list(choices)}")
        self.choices: tuple[Choice, ...] = tuple(parsed)
        self.decisions: tuple[tuple[str, int], ...] = tuple((t, lv) for lv in range(self.levels) for t in self.tasks)

    @property
    def size(self) -> int:
        """The number of children."""
        return len(self.choices) ** len(self.decisions)

    def decode(self, actions: Sequence[int]) -> Architecture:
        levels: dict[str, list[Choice]] = {t: [] for t in self.tasks}
        for (t, _), a in zip(self.decisions, actions, strict=True):
            levels[t].append(self.choices[int(a)])
        return {t: tuple(v) for t, v in levels.items()}

    def encode(self, architecture: Mapping[str, Sequence[Choice]]) -> list[int]:
        return [self.choices.index(architecture[t][lv]) for t, lv in self.decisions]

    def enumerate(self) -> Iterator[Architecture]:
        """Every child, in the order of ``itertools.product`` over the decisions."""
        for actions in itertools.product(range(len(self.choices)), repeat=len(self.decisions)):
            yield self.decode(actions)

    def decision_name(self, i: int) -> str:
        t, lv = self.decisions[i]
        return f"{t}@level{lv}"


def architecture_key(architecture: Mapping[str, Sequence[Choice]]) -> str:
    """A readable, canonical string of an architecture: ``"a=own,0+1|b=1,own"``."""
    return "|".join(f"{t}=" + ",".join(choice_label(c) for c in levels) for t, levels in architecture.items())


# --------------------------------------------------------------------------------------------------
# The controller and REINFORCE
# --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One trajectory of the controller: the actions, the summed log-probability and entropy (tensors that carry
    gradients unless sampled under ``no_grad``) and the softmax of every step."""

    actions: list[int]
    log_prob: Tensor
    entropy: Tensor
    probs: list[Tensor]


class Controller(nn.Module):
    """The ENAS controller: an ``LSTMCell(hidden, hidden)`` run for one step per decision.

    Step ``i`` reads the previous step's input (a learned start vector at step 0, else the embedding of the
    previous step's action in that decision's embedding table), gives logits ``heads[i](h_i)`` shaped by the
    temperature ``T`` and the tanh constant ``c`` (``c * tanh(z / T)``, or ``z / T``), and samples its action from
    their softmax. Weights start uniform in ``+-0.1`` (as ENAS).

    Args:
        num_choices: the number of choices of each decision, in order.
        hidden: LSTM units (100 in Pham et al.).
        tanh_constant: ``c`` (``None``: no tanh).
        temperature: ``T``.

    Example::

        >>> ctrl = Controller([4, 4, 2])
        >>> s = ctrl.sample(generator=torch.Generator().manual_seed(0))
        >>> len(s.actions), float(s.log_prob) < 0, [tuple(p.shape) for p in s.probs]
        (3, True, [(4,), (4,), (2,)])
    """

    def __init__(
        self, num_choices: Sequence[int], hidden: int = 100, tanh_constant: float | None = 1.5, temperature: float = 1.0
    ) -> None:
        super().__init__()
        if not num_choices or any(n < 1 for n in num_choices):
            raise ValueError(f"Controller: num_choices must be a non-empty list of positive ints, got {num_choices}")
        self.num_choices = tuple(int(n) for n in num_choices)
        self.hidden = int(hidden)
        self.tanh_constant = tanh_constant
        self.temperature = float(temperature)
        self.start = nn.Parameter(torch.empty(1, hidden))
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.embeddings = nn.ModuleList(nn.Embedding(n, hidden) for n in self.num_choices)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.num_choices)
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def logits(self, i: int, h: Tensor) -> Tensor:
        z = self.heads[i](h).squeeze(0) / self.temperature
        return self.tanh_constant * torch.tanh(z) if self.tanh_constant is not None else z

    def sample(self, actions: Sequence[int] | None = None, generator: torch.Generator | None = None) -> Sample:
        """A trajectory: sampled (from ``generator``), or the log-probability and entropy of given ``actions``."""
        x = self.start
        state: tuple[Tensor, Tensor] | None = None
        taken: list[int] = []
        log_prob = x.new_zeros(())
        entropy = x.new_zeros(())
        probs: list[Tensor] = []
        for i in range(len(self.num_choices)):
            state = self.lstm(x, state)
            logp = torch.log_softmax(self.logits(i, state[0]), dim=-1)
            p = logp.exp()
            if actions is None:
                a = int(torch.multinomial(p.detach(), 1, generator=generator).item())
            else:
                a = int(actions[i])
            taken.append(a)
            log_prob = log_prob + logp[a]
            entropy = entropy - (p * logp).sum()
            probs.append(p)
            x = self.embeddings[i](torch.tensor([a], device=x.device))
        return Sample(taken, log_prob, entropy, probs)

    @torch.no_grad()
    def greedy(self) -> list[int]:
        """The most likely child's actions (the argmax at every step, fed forward)."""
        x, state, taken = self.start, None, []
        for i in range(len(self.num_choices)):
            state = self.lstm(x, state)
            a = int(self.logits(i, state[0]).argmax())
            taken.append(a)
            x = self.embeddings[i](torch.tensor([a], device=x.device))
        return taken

    @torch.no_grad()
    def marginals(self, samples: int, generator: torch.Generator) -> list[Tensor]:
        """The marginal probability of every choice of every decision, ``E[p_i(. | a_<i)]`` over ``samples``
        sampled trajectories (the conditional softmaxes averaged: lower variance than counting actions)."""
        total = [torch.zeros(n) for n in self.num_choices]
        for _ in range(samples):
            s = self.sample(generator=generator)
            for acc, p in zip(total, s.probs):
                acc += p.cpu()
        return [acc / samples for acc in total]


class Reinforce:
    """REINFORCE with an exponential moving-average baseline and an entropy bonus (Williams 1992; Pham et al.).

    One :meth:`step`: sample a child, get its reward ``R``, minimise ``-(R - b) * log pi(a) - beta * H(pi)`` by one
    Adam step (``b``: the baseline before this reward; the first reward sets ``b = R``), then
    ``b <- decay * b + (1 - decay) * R``.

    Args:
        controller: the policy.
        lr: Adam learning rate.
        baseline_decay: ``decay``.
        entropy_weight: ``beta``.
    """

    def __init__(
        self, controller: Controller, lr: float = 0.005, baseline_decay: float = 0.9, entropy_weight: float = 1e-3
    ) -> None:
        self.controller = controller
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=lr)
        self.decay = float(baseline_decay)
        self.entropy_weight = float(entropy_weight)
        self.baseline: float | None = None

    def step(self, reward_of: Callable[[list[int]], float], generator: torch.Generator) -> dict[str, Any]:
        """One update; returns ``{"actions", "reward", "baseline", "advantage", "entropy", "log_prob"}``."""
        self.controller.train()
        s = self.controller.sample(generator=generator)
        reward = float(reward_of(s.actions))
        if not math.isfinite(reward):
            raise FloatingPointError(f"controller reward {reward} for actions {s.actions}")
        baseline = reward if self.baseline is None else self.baseline
        advantage = reward - baseline
        loss = -advantage * s.log_prob - self.entropy_weight * s.entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.baseline = self.decay * baseline + (1.0 - self.decay) * reward
        return {
            "actions": s.actions,
            "reward": reward,
            "baseline": baseline,
            "advantage": advantage,
            "entropy": float(s.entropy.detach()),
            "log_prob": float(s.log_prob.detach()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------


def constant_loss(task: TaskSpec, label: Tensor) -> float:
    """The task's loss of the best constant prediction on ``label`` (the normaliser of the ``loss`` reward): the
    logit of the positive rate for binary tasks, the mean for regression; 1 where that loss is 0."""
    lab = label.float()
    if task.kind == "binary":
        rate = lab.mean().clamp(1e-4, 1 - 1e-4)
        const = torch.full_like(lab, float(torch.log(rate / (1 - rate))))
    else:
        const = torch.full_like(lab, float(lab.mean()))
    value = float(task.loss_fn(const, lab))
    return value if value > 1e-12 else 1.0


@torch.no_grad()
def child_reward(
    model: SharingSupernet,
    architecture: Architecture,
    batches: Sequence[Batch],
    tasks: Sequence[TaskSpec],
    reward: str,
    device: torch.device,
) -> float:
    """The reward of ``architecture`` with the supernet's shared weights on ``batches`` (eval mode).

    ``loss``: ``-mean_t(loss_t / constant_loss_t)`` (:func:`constant_loss`), so that tasks of different scales and
    kinds weigh alike and a child no better than the constant scores -1. ``auc``: the mean AUC of the binary tasks
    (an AUC a batch leaves undefined is skipped).

    Raises:
        ValueError: ``reward="auc"`` without a binary task with a defined AUC.
    """
    was_training = model.training
    model.eval()
    model.architecture = architecture
    outs: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
    labs: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
    for batch in batches:
        b = batch_to(batch, device)
        out = model(b.dense, b.sparse)
        for t in tasks:
            outs[t.name].append(out[t.name].float().cpu())
            labs[t.name].append(batch.labels[t.name].float())
    model.train(was_training)
    if reward == "loss":
        terms = []
        for t in tasks:
            o, lab = torch.cat(outs[t.name]), torch.cat(labs[t.name])
            terms.append(float(t.loss_fn(o, lab)) / constant_loss(t, lab))
        return -sum(terms) / len(terms)
    aucs = []
    for t in tasks:
        if t.kind != "binary":
            continue
        value = t.evaluate(torch.cat(outs[t.name]), torch.cat(labs[t.name])).get("auc", float("nan"))
        if math.isfinite(value):
            aucs.append(value)
    if not aucs:
        raise ValueError("search.reward=auc needs a binary task whose AUC a validation batch defines; use reward=loss")
    return sum(aucs) / len(aucs)


# --------------------------------------------------------------------------------------------------
# Configs of the supernet, the child, the retraining
# --------------------------------------------------------------------------------------------------


def base_config(cfg: DictConfig) -> DictConfig:
    """The ``mtrec-train`` config inside a search config: every key but ``search`` (and ``hydra``), resolved."""
    node = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(node, dict)
    node.pop("search", None)
    node.pop("hydra", None)
    return OmegaConf.create(node)


def child_model_config(
    model_node: Any, space: SearchSpace, architecture: Architecture, task_experts: int | None = None
) -> dict[str, Any]:
    """The ``model`` node of the child ``architecture``: the search's model node (input arch, towers, expert
    widths, activation, ...) with the :class:`~mtrec.models.SearchedPLE` target and the architecture filled in."""
    node = OmegaConf.to_container(model_node, resolve=True) if isinstance(model_node, DictConfig) else dict(model_node)
    assert isinstance(node, dict)
    node.update(
        {
            "_target_": SEARCHED_TARGET,
            "_partial_": True,
            "num_levels": space.levels,
            "num_shared_experts": space.experts,
            "architecture": architecture_to_config(architecture),
        }
    )
    if task_experts is not None:
        node["num_task_experts"] = int(task_experts)
    return node


def child_run_config(
    base: DictConfig, space: SearchSpace, architecture: Architecture, task_experts: int | None = None
) -> DictConfig:
    """The full ``mtrec-train`` config that trains ``architecture`` from scratch."""
    out = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    out.model = child_model_config(base.model, space, architecture, task_experts)
    return out


def _supernet_config(base: DictConfig, scfg: SearchConfig) -> DictConfig:
    out = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    node = OmegaConf.to_container(out.model, resolve=True)
    assert isinstance(node, dict)
    node.pop("architecture", None)
    node.update(
        {
            "_target_": SUPERNET_TARGET,
            "_partial_": True,
            "num_levels": scfg.levels,
            "num_shared_experts": scfg.experts,
            "num_task_experts": scfg.task_experts,
        }
    )
    out.model = node
    return out


def check_search_config(cfg: DictConfig) -> tuple[SearchConfig, DictConfig]:
    """Validate a composed ``search`` config before any data loads: the ``search`` node (:class:`SearchConfig`),
    then the rest as ``mtrec-train`` does (:func:`mtrec.train.check_config`), and the model (``model=searched``).

    Raises:
        ValueError: naming the key to fix.
    """
    unknown = [k for k in cfg if k not in (*CONFIG_KEYS, "search")]
    if unknown:
        raise ValueError(
            f"config key {unknown[0]!r} is not used by {PROGRAM} (it reads search, {', '.join(CONFIG_KEYS)}); remove "
            "it, or check the spelling"
        )
    scfg = search_config(cfg.get("search"))
    base = base_config(cfg)
    target = str(base.model.get("_target_", ""))
    if target != SEARCHED_TARGET:
        raise ValueError(
            f"config key model: {PROGRAM} searches the structure of {SEARCHED_TARGET} (model=searched), got "
            f"{target!r}; the search's input arch, towers and expert widths come from that node"
        )
    check_config(base, PROGRAM)
    if base.get("task_split"):
        raise ValueError("config key task_split: the search trains every child on joint batches; set task_split=null")
    SearchSpace(["t"], scfg.levels, scfg.experts, scfg.choices)  # the choices fit the experts
    return scfg, base


# --------------------------------------------------------------------------------------------------
# The search loop
# --------------------------------------------------------------------------------------------------


@dataclass
class SearchHistory:
    """What the search writes as it goes (kept in the checkpoint, so a resumed run writes the same files)."""

    policy: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    train_steps: int = 0
    controller_steps: int = 0
    seconds: float = 0.0


class SearchTrainer(Trainer):
    """A :class:`~mtrec.trainer.Trainer` of the :class:`~mtrec.models.SharingSupernet` whose checkpoint also holds
    the controller, its REINFORCE state, the sampling generators and the search history (one atomic ``last.pt``).

    Args:
        reinforce: the controller's learner.
        generators: ``{"children": ..., "controller": ...}`` random generators of the two phases.
        *args, **kwargs: as for :class:`Trainer`.
    """

    def __init__(self, *args: Any, reinforce: Reinforce, generators: dict[str, torch.Generator], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reinforce = reinforce
        self.generators = generators
        self.history = SearchHistory()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "search": {
                "reinforce": self.reinforce.state_dict(),
                "generators": {k: g.get_state() for k, g in self.generators.items()},
                "history": asdict(self.history),
            },
        }

    def load_last(self) -> bool:
        try:
            if not super().load_last():
                return False
        except (KeyError, RuntimeError) as err:  # weights of another search space or model
            raise ValueError(
                f"{self.run_dir / LAST}: the checkpoint does not fit this search's supernet ({str(err).splitlines()[0]}"
                "); resume with the same settings or search into a new run directory"
            ) from None
        state = load_checkpoint(self.run_dir / LAST)
        if "search" not in state:
            raise ValueError(f"{self.run_dir / LAST}: not a checkpoint of {PROGRAM} (no controller state)")
        try:
            self.reinforce.load_state_dict(state["search"]["reinforce"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise ValueError(
                f"{self.run_dir / LAST}: the controller of this checkpoint does not fit this search's space "
                f"({type(err).__name__}); resume with the same search settings or search into a new run directory"
            ) from None
        for k, g in self.generators.items():
            g.set_state(state["search"]["generators"][k])
        self.history = SearchHistory(**state["search"]["history"])
        return True


def _cycle_batches(data: Any, batch_size: int, seed: int) -> Iterator[Batch]:
    """Shuffled passes over ``data`` without end (pass ``i`` seeded by ``(seed, i)``)."""
    for i in itertools.count():
        yield from data.batches(batch_size, shuffle=True, seed=seed, epoch=i)


def _policy_record(
    trainer: SearchTrainer, space: SearchSpace, scfg: SearchConfig, seed: int, epoch: int, rewards: Sequence[float]
) -> dict[str, Any]:
    ctrl = trainer.reinforce.controller
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # apart from the phases' generators
    marg = ctrl.marginals(scfg.policy_samples, gen)
    return {
        "epoch": epoch,
        "train_steps": trainer.history.train_steps,
        "controller_steps": trainer.history.controller_steps,
        "probabilities": {
            space.decision_name(i): {choice_label(c): round(float(p), 6) for c, p in zip(space.choices, m)}
            for i, m in enumerate(marg)
        },
        "most_likely": architecture_to_config(space.decode(ctrl.greedy())),
        "baseline": trainer.reinforce.baseline,
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
    }


def plot_policy(policy: Sequence[Mapping[str, Any]], space: SearchSpace, path: Path) -> Path | None:
    """``policy.png``: one panel per (task, level), rows levels and columns tasks, the marginal probability of each
    choice after every epoch. ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s", path.name)
        return None
    fig, axes = plt.subplots(
        space.levels, len(space.tasks), figsize=(3.2 * len(space.tasks), 2.6 * space.levels), squeeze=False,
        sharex=True, sharey=True,
    )  # fmt: skip
    epochs = [r["epoch"] for r in policy]
    labels = [choice_label(c) for c in space.choices]
    for i in range(len(space.decisions)):
        t, lv = space.decisions[i]
        ax = axes[lv][space.tasks.index(t)]
        name = space.decision_name(i)
        for label in labels:
            ax.plot(epochs, [r["probabilities"][name][label] for r in policy], marker=".", label=label)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for row in axes:
        row[0].set_ylabel("P(choice)")
    axes[0][-1].legend(fontsize=7, title="experts read", title_fontsize=7, loc="upper right")
    fig.suptitle("mtlib-search: controller choice probabilities per (task, level)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_architecture(path: Path, model_node: Mapping[str, Any], architecture: Architecture, reward: float) -> None:
    node = dict(model_node)
    inputs = node.pop("inputs", None)
    arch = json.dumps(architecture_to_config(architecture)).replace(" ", "").replace('"', "")
    header = (
        f"# Written by {PROGRAM}: the chosen child (validation reward {reward:.6f} with the shared weights).\n"
        "# A model config of mtrec-train: copy it to configs/model/<name>.yaml and run mtrec-train model=<name>, or\n"
        f"#   mtrec-train model=searched model.num_levels={node['num_levels']} "
        f"model.num_shared_experts={node['num_shared_experts']} model.num_task_experts={node['num_task_experts']} "
        f"'model.architecture={arch}'\n"
    )
    body: dict[str, Any] = {"defaults": [{"inputs": "default"}, "_self_"], **node}
    if inputs is not None:
        body["inputs"] = {k: v for k, v in inputs.items() if k not in ("activation", "dropout")}
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(body)))


def run_search(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the search of a composed ``configs/search.yaml`` config into ``out_dir`` (see the module docstring).

    Returns the dict written to ``search.json``: ``{"architecture", "reward", "candidates": [...],
    "train_steps", "controller_steps", "final_batches", "search_steps", "seconds", "retrained": metrics or None,
    "settings"}``.
    """
    scfg, base = check_search_config(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(base.seed)
    seed_everything(seed)
    bundle: DataBundle = load_data(base.data)
    super_cfg = _supernet_config(base, scfg)
    generators = {
        "children": torch.Generator().manual_seed(seed * 7919 + 1),
        "controller": torch.Generator().manual_seed(seed * 7919 + 2),
    }
    # the controller's initialisation is seeded apart from the supernet's (which build_training seeds)
    holder: dict[str, Any] = {}

    def make_trainer(*args: Any, **kwargs: Any) -> SearchTrainer:
        return SearchTrainer(*args, reinforce=holder["reinforce"], generators=generators, **kwargs)

    tasks_probe = _selected_tasks(base, bundle)
    space = SearchSpace(tasks_probe, scfg.levels, scfg.experts, scfg.choices)
    with torch.random.fork_rng():
        torch.manual_seed(seed * 7919 + 3)
        controller = Controller(
            [len(space.choices)] * len(space.decisions), scfg.controller_hidden, scfg.tanh_constant, scfg.temperature
        )
    holder["reinforce"] = Reinforce(controller, scfg.controller_lr, scfg.baseline_decay, scfg.entropy_weight)
    training = build_training(super_cfg, out_dir / "supernet", bundle, trainer_cls=make_trainer)  # type: ignore[arg-type]
    trainer = training.trainer
    assert isinstance(trainer, SearchTrainer)
    supernet = trainer.model
    assert isinstance(supernet, SharingSupernet)
    tasks = training.tasks
    if scfg.reward == "auc" and not any(t.kind == "binary" for t in tasks):
        raise ValueError("search.reward=auc needs a binary task; these tasks are all regression: use reward=loss")
    train = training.train
    assert not isinstance(train, dict)
    if scfg.resume and trainer.load_last():
        log.info("resumed the search at epoch %d (step %d)", trainer.epoch, trainer.step)
    elif scfg.resume:
        log.info("search.resume: no %s yet, starting at epoch 0", out_dir / "supernet" / LAST)
    history = trainer.history
    bs = trainer.cfg.batch_size
    n_batches = train.num_batches(bs)
    per_epoch = scfg.steps_per_epoch or n_batches
    show = trainer.cfg.progress
    started = time.perf_counter() - history.seconds
    while trainer.epoch < scfg.epochs:
        epoch = trainer.epoch
        # (a) the shared weights: one child from the fixed policy per training batch
        bar = tqdm(total=per_epoch, desc=f"search epoch {epoch}: shared weights", disable=not show, leave=False)
        batches = _cycle_batches(train, bs, seed * 1000 + epoch)
        for _ in range(per_epoch):
            with torch.no_grad():
                actions = controller.sample(generator=generators["children"]).actions
            supernet.architecture = space.decode(actions)
            record = trainer.train_step(next(batches))
            history.train_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{record['train/loss']:.4f}")
        bar.close()
        trainer.end_epoch()
        # (b) the controller: REINFORCE on validation batches with the shared weights
        val_batches = _cycle_batches(bundle.val, scfg.controller_batch_size, seed * 1000 + 500 + epoch)
        rewards: list[float] = []
        controller_steps = scfg.controller_steps if epoch >= scfg.warmup_epochs else 0
        for _ in tqdm(range(controller_steps), desc=f"search epoch {epoch}: controller", disable=not show,
                      leave=False):  # fmt: skip
            vb = next(val_batches)
            out = trainer.reinforce.step(
                lambda a, vb=vb: child_reward(supernet, space.decode(a), [vb], tasks, scfg.reward, trainer.device),
                generators["controller"],
            )
            history.controller_steps += 1
            rewards.append(out["reward"])
            history.samples.append(
                {
                    "epoch": epoch,
                    "phase": "controller",
                    "architecture": architecture_to_config(space.decode(out["actions"])),
                    "key": architecture_key(space.decode(out["actions"])),
                    "reward": out["reward"],
                    "baseline": out["baseline"],
                    "entropy": out["entropy"],
                }
            )
        history.policy.append(_policy_record(trainer, space, scfg, seed, epoch, rewards))
        history.seconds = time.perf_counter() - started
        log.info("search epoch %d: mean reward %s, most likely %s", epoch, history.policy[-1]["mean_reward"],
                 history.policy[-1]["most_likely"])  # fmt: skip
        trainer.save_last()
        atomic_write_jsonl(history.policy, out_dir / "policy.jsonl")
        atomic_write_jsonl(history.samples, out_dir / "samples.jsonl")
    # The end: score sampled children and the most likely one on the same validation batches.
    final_gen = torch.Generator().manual_seed(seed * 7919 + 4)
    candidates: dict[str, Architecture] = {}
    greedy = space.decode(controller.greedy())
    candidates[architecture_key(greedy)] = greedy
    with torch.no_grad():
        for _ in range(scfg.final_samples):
            arch = space.decode(controller.sample(generator=final_gen).actions)
            candidates.setdefault(architecture_key(arch), arch)
    val_iter = _cycle_batches(bundle.val, scfg.controller_batch_size, seed * 1000 + 999)
    final_batches = [next(val_iter) for _ in range(scfg.final_batches)]
    scored = []
    for key, arch in candidates.items():
        r = child_reward(supernet, arch, final_batches, tasks, scfg.reward, trainer.device)
        scored.append({"key": key, "architecture": architecture_to_config(arch), "reward": r,
                       "most_likely": key == architecture_key(greedy)})  # fmt: skip
    scored.sort(key=lambda row: -row["reward"])
    best = candidates[scored[0]["key"]]
    samples = [*history.samples, *({"phase": "final", **row} for row in scored)]
    atomic_write_jsonl(history.policy, out_dir / "policy.jsonl")
    atomic_write_jsonl(samples, out_dir / "samples.jsonl")
    model_node = child_model_config(base.model, space, best, scfg.task_experts)
    _write_architecture(out_dir / "architecture.yaml", model_node, best, scored[0]["reward"])
    search_seconds = time.perf_counter() - started
    if scfg.plot and history.policy:
        plot_policy(history.policy, space, out_dir / "policy.png")
    result: dict[str, Any] = {
        "architecture": architecture_to_config(best),
        "key": architecture_key(best),
        "reward": scored[0]["reward"],
        "reward_kind": scfg.reward,
        "candidates": scored,
        "space_size": space.size,
        "choices": [choice_label(c) for c in space.choices],
        "train_steps": history.train_steps,
        "controller_steps": history.controller_steps,
        "final_batches": scfg.final_batches * len(candidates),
        # every batch that passed through the supernet: training steps, controller rewards, final scoring
        "search_steps": history.train_steps + history.controller_steps + scfg.final_batches * len(candidates),
        "seconds": round(search_seconds, 3),
        "retrained": None,
        "settings": {"search": asdict(scfg), "seed": seed},
    }
    atomic_write_json(result, out_dir / "search.json")
    if scfg.retrain:
        retrain_cfg = child_run_config(base, space, best, scfg.task_experts)
        retrain_dir = out_dir / "retrain"
        if scfg.resume:
            retrain_cfg.trainer.resume = True
        start = time.perf_counter()
        run = train_and_evaluate(retrain_cfg, retrain_dir)
        result["retrained"] = {
            "run_dir": str(retrain_dir),
            "val": run.metrics["val"],
            "test": run.metrics["test"],
            "monitor": run.monitor,
            "score": run.score,
            "seconds": round(time.perf_counter() - start, 3),
        }
        atomic_write_json(result["retrained"], out_dir / "retrained_metrics.json")
        atomic_write_json(result, out_dir / "search.json")
    print(f"{PROGRAM}: best child {result['key']} (reward {result['reward']:.5f}); wrote {out_dir}/architecture.yaml")
    return result


def _selected_tasks(base: DictConfig, bundle: DataBundle) -> list[str]:
    from mtrec.train import select_tasks

    return [t.name for t in select_tasks(bundle.tasks, base.get("task_names"))]


__all__ = [
    "PROGRAM",
    "Controller",
    "Reinforce",
    "Sample",
    "SearchConfig",
    "SearchSpace",
    "SearchTrainer",
    "architecture_key",
    "check_search_config",
    "child_model_config",
    "child_reward",
    "child_run_config",
    "choice_label",
    "constant_loss",
    "plot_policy",
    "run_search",
    "search_config",
]
