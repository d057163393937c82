"""Per-step cost of every loss weighting and gradient method relative to plain ``equal``, on an MMoE with k = 2, 4, 8
tasks, side by side with LibMTL 1.1.5's implementations of the same methods and with TorchJD 0.18's ``mtl_backward``
and aggregators, on the same model and data.

    make bench-peers                                  # once: LibMTL (and scipy) into benchmarks/.peers
    python benchmarks/gradient_overhead.py            # 11 rounds of 30 timed steps per method and k
    python benchmarks/gradient_overhead.py --quick    # 9 rounds of 20 timed steps (about 5 minutes on 2 cores)
    python benchmarks/gradient_overhead.py --quick --profile famo mgda_ub   # plus torch.profiler tables
    python benchmarks/gradient_overhead.py --quick --peers torchjd          # only the TorchJD comparison
    python benchmarks/gradient_overhead.py --quick --peers torchjd --profile mgda TorchJD:mgda

Model and data: mtrec's ``MMoE`` built from ``configs/model/mmoe.yaml`` (the MMoE paper's sizes: 8 experts of [16]
units, towers of [8], ReLU, no dropout) on 100 dense inputs and no sparse features. Data: the MMoE paper's
synthetic regression (Ma et al. 2018, section 3.2) generalised to k tasks: orthonormal ``u_0 .. u_k`` in R^100,
``w_i = sqrt(p) u_0 + sqrt(1 - p) u_i`` (unit norm, pairwise cosine p = 0.5), ``y_i = w_i.x + sum_m sin(a_m w_i.x +
b_m) + eps_i``, m = 10, ``a, b ~ N(0, 1)`` shared, ``eps ~ N(0, 0.1^2)``; 4,096 rows in 16 seeded shuffled batches of
256 (the MMoE benchmark's batch size), cycled. MSE losses.

A timed *step* is ``mtrec.trainer.Trainer.train_step`` itself, on a Trainer built as ``mtrec-train`` builds it
(weighting and gradient method instantiated from ``configs/weighting/<name>.yaml`` / ``configs/gradient/<name>.yaml``,
the optimiser from ``configs/optimizer/adam.yaml`` through ``mtrec.train.build_optimizer``: fused Adam, lr 1e-3, one
param group for the shared experts and one per task, plus the weighting's trainable parameters): forward (with the
shared representation for ``mgda_ub``/``great``), losses, ``weighting.weighted``, ``gradient.backward``, optimiser
step, FAMO's post-step forward and ``after_step``, and the per-step logging record (``.item()`` of every loss).
Every weighting is timed with gradient ``none``; every gradient method with weighting ``equal``. The baseline is
weighting ``equal`` + gradient ``none``. DWA's epoch-end hook is never called (no epochs end), which leaves its
per-step cost unchanged. ``control`` is a second, independent ``equal`` Trainer: its ratio measures the noise.
Two ``reference`` entries are lower bounds built in this script (see ``reference_methods``): ``post_step_forward``
(the Trainer's extra forward that any FAMO-style weighting triggers, with the weighting itself free) and
``jacobian_sum`` (the per-task Jacobian machinery every Jacobian method pays, with a free solver).

LibMTL: each of its 12 weighting classes is a mixin that expects a model with hooks (``get_share_params``,
``zero_grad_share_params``, ``task_num``, ``device``, ``rep_grad``, ``rep``/``rep_tasks``, ``epoch``,
``train_loss_buffer``); an adapter module subclasses the class and provides them around the SAME MMoE (shared
parameters: ``parameter_groups()["shared"]``, the experts). Its step is the body of LibMTL's ``Trainer.train``:
forward, losses written into ``torch.zeros(k)`` with a ``.item()`` each (``_compute_loss``/``_update_loss``, less the
metric meter), ``optimizer.zero_grad()``, ``model.backward(losses, **weight_args)``, ``optimizer.step()``, with the
same fused Adam as mtlib so that only the methods differ. ``weight_args`` are LibMTL/config.py's defaults (DWA T=2,
GradNorm alpha=1.5, GradVac beta=0.5, CAGrad calpha=0.5 rescale=1, MGDA mgda_gn='none', RLW dist='Normal', GradDrop
leak=0). ``epoch`` is 2 and ``train_loss_buffer`` holds the first batch's losses, so GradNorm (active from epoch 1)
and DWA (from epoch 2) run their real update rather than their warm-up. ``rep_grad`` is False except for GradDrop
(which requires it) and an extra ``MGDA+rep_grad`` entry: LibMTL's MGDA on the per-task gated representations, the
closest it has to MGDA-UB (it sums those gradients over the batch before the min-norm solve, which MGDA-UB does
not). With ``rep_grad`` the adapter runs the MMoE as LibMTL's own MMoE does: each task's tower reads a detached copy
of its gate's mixture. ``zero_grad_share_params`` zeroes the shared gradients in place (torch 1.x's
``Module.zero_grad()``), since LibMTL's ``_reset_grad`` assigns ``param.grad.data`` and fails on the ``None`` that torch
2's ``zero_grad()`` leaves. Mapping: EW->equal, UW->uncertainty, GradNorm->gradnorm, DWA->dwa, RLW->rlw,
PCGrad->pcgrad, GradVac->gradvac, IMTL->imtl_g (LibMTL's IMTL is IMTL-L *and* IMTL-G: learned loss scales plus the
gradient combination; ours is IMTL-G only), CAGrad->cagrad, MGDA->mgda, MGDA+rep_grad->mgda_ub; GLS and GradDrop have
no mtlib counterpart and are reported against LibMTL's EW only. A method that fails to import, build or step is
recorded with its error message and left out; the rest carry on.

Timing: ``--rounds`` rounds; in each, for every k, every method in a fresh seeded random order, each method's block
flanked by blocks of the baseline (equal, m1, equal, m2, ..., equal); a block is ``--warmup`` untimed steps then
``--steps`` timed steps of the same Trainer (models, optimisers and weighting states carry on across rounds). A
method's ratio in a round is its ms/step over the mean of its two flanking equal blocks; reported: the median over
rounds of those ratios, and the median ms/step. LibMTL's ratios to its EW and mtlib's to LibMTL are the same
per-round ratios divided (both sides normalised by their own flanking equal blocks). Contention is measured as in
benchmarks/throughput.py (cores other processes kept busy, from /proc/stat less this process's CPU time), for each
round's whole sequence at one k and for every block of at least 0.25 s (shorter blocks are below what /proc/stat's
10 ms ticks resolve); a method's round is flagged when either exceeds 0.25 cores, and the medians over unflagged
rounds (``ratio_vs_equal_quiet``) are reported beside the plain ones. ``--threads 1`` by default: on a 2-core machine
shared with other jobs, more threads make contention slow steps down many times over.

TorchJD (``torchjd`` 0.18, a dev dependency; its CAGrad and Nash-MTL need cvxpy, UPGrad and DualProj qpsolvers with
quadprog): every mtlib gradient method TorchJD also has (``TORCHJD_METHODS``: mgda, pcgrad, cagrad, upgrad,
dualproj, nash_mtl; those not yet in ``mtl.gradients.GRADIENT_METHODS`` get a JSON row saying so) is timed against
TorchJD's aggregator on the same MMoE (same seed, so the same initial weights), the same batches, the same
``build_optimizer`` fused Adam and the same k.

* mtlib side: the ``gradient:<method>`` entry above, unchanged: ``Trainer.train_step`` with weighting ``equal`` and
  the method from ``configs/gradient/<method>.yaml``, through the cut graph (``forward_with_split``, the Trainer's
  default): one backward through the grouped task heads, a batched VJP of the body per task, the method's weights
  from the float64 Gram matrix, ``.grad`` set, optimiser step, the logging record.
* TorchJD side (``TorchJDStep``), its documented MTL loop: forward; ``optimizer.zero_grad()``;
  ``torchjd.autojac.mtl_backward(losses, features=Z)`` (0.18 takes no aggregator: it back-propagates each loss
  through its own head to ``Z`` and into the head's parameters, then the ``[k, ...]`` Jacobian of ``Z`` w.r.t. the
  shared parameters, found from the graph, into their ``.jac``); ``torchjd.autojac.jac_to_grad(shared, aggregator)``;
  ``optimizer.step()``; ``.item()`` of every loss (mtlib's step logs them too). ``Z`` is the experts' output; the
  shared parameters are ``parameter_groups()["shared"]`` (the experts; the input arch has no parameters here, which
  the script checks). Forward ``--torchjd-forward per_task`` (default): the same modules run task by task
  (``towers[t](mix(gates[t](x), experts(x)))``, checked equal to ``model(...)``), so each task's backward touches its
  own head only. mtlib's grouped heads (``grouped``) make every task's backward traverse all k heads and need
  ``retain_graph=True``: slower for TorchJD (about 2x at k = 8 for MGDA in development), so not the default.
* Settings, matched where both have the knob: CAGrad ``c`` = mtlib's (0.5); mtlib also divides by ``1 + c^2``
  (``rescale``, the official default), TorchJD does not (same direction, norm 0.8x). Nash-MTL ``max_norm`` and
  ``update_weights_every`` = mtlib's (1.0, 1); TorchJD runs the official ``optim_niter = 20`` cvxpy/ECOS
  re-linearisations, mtlib a Newton solve of ``(M alpha)_i alpha_i = 1`` on the cosine matrix to 1e-10.
  TorchJD's constraint, like the official code's, is ``alpha_i (M_n alpha)_i >= 1 / ||M||_F`` (``M_n = M /
  ||M||_F``): the paper's ``alpha`` for the raw ``M``, which is mtlib's default (``normalize: false``; mtlib < 0.2
  used the normalised Gram's, ``sqrt(||M||_F)`` times longer). MGDA: both normalisation
  ``none``; TorchJD's Frank-Wolfe with its defaults (stops at step ``gamma < 1e-3``, at most 100 iterations), mtlib's
  exact active-set solve (relative KKT to 1e-10): TorchJD's answer is the less accurate one, so this is the
  conservative setting for mtlib. PCGrad: both project in an independently seeded random order per task. UPGrad,
  DualProj: TorchJD's defaults (mean preference vector, quadprog with ``norm_eps = reg_eps = 1e-4``); mtlib's from
  its config. TorchJD's CAGrad (cvxpy + Clarabel) and Nash-MTL (cvxpy + ECOS, which warns that its problem is not
  DPP) build and solve a conic program each step: slow, and that is what a TorchJD user gets.
* Agreement (``torchjd_agreement``, once per method and k, not timed): one step of each side from the same initial
  model on the same batch; the JSON row's ``agreement`` has the cosine and norm ratio (mtlib / TorchJD) of the
  shared gradients and the largest relative difference of the task-owned gradients, so one can see which methods
  compute the same update (PCGrad's random orders and the solvers' tolerances make small differences).
* Timing: each TorchJD block is timed next to its mtlib counterpart's (the pair stays together in the round's
  shuffled order, in a random order of its own), both flanked by ``equal`` blocks like every other entry.
  ``ratio`` = median over rounds of (mtlib ms/step / TorchJD ms/step in the same round); ``mtlib_ms`` and
  ``torchjd_ms`` are the medians of the absolute times. Target: ``ratio <= 0.5`` at k = 8 for every shared method.
* ``--peers torchjd`` runs only this comparison (the shared methods on both sides, plus the equal baseline) and
  replaces only the TorchJD rows (``"peer": "torchjd"``) of the existing JSON, leaving the other rows, the settings
  and the PNG as they were; its own settings and machine go under the JSON's ``torchjd`` key. ``--peers libmtl``
  leaves TorchJD out (its old rows are kept).

Writes benchmarks/results/gradient_overhead.json and gradient_overhead.png; prints a table of ratios (method rows,
k columns), the LibMTL and TorchJD comparisons, and PASS/FAIL lines for the targets: mgda_ub and famo <= 1.3x equal
at k = 8, pcgrad and cagrad <= 2x at k = 8, mtlib / TorchJD <= 0.5 at k = 8.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, machine, table, write_json
from throughput import CONTENDED, OtherLoad, other_cores_busy

PEERS = REPO / "benchmarks" / ".peers"
TARGETS = (("mgda_ub", 8, 1.3), ("famo", 8, 1.3), ("pcgrad", 8, 2.0), ("cagrad", 8, 2.0))
# LibMTL weighting class -> mtlib method (None: no counterpart). "MGDA+rep_grad" is LibMTL's MGDA with rep_grad=True.
LIBMTL_METHODS: dict[str, str | None] = {
    "EW": "equal",
    "UW": "uncertainty",
    "GradNorm": "gradnorm",
    "DWA": "dwa",
    "GLS": None,
    "GradDrop": None,
    "PCGrad": "pcgrad",
    "GradVac": "gradvac",
    "IMTL": "imtl_g",
    "CAGrad": "cagrad",
    "MGDA": "mgda",
    "MGDA+rep_grad": "mgda_ub",
    "RLW": "rlw",
}
# LibMTL/config.py's prepare_args: which of its argparse defaults each weighting receives as kwargs.
LIBMTL_KWARGS = {"DWA": ("T",), "GradNorm": ("alpha",), "MGDA": ("mgda_gn",), "GradVac": ("beta",),
                 "GradDrop": ("leak",), "CAGrad": ("calpha", "rescale"), "RLW": ("dist",)}  # fmt: skip

# mtlib gradient methods that TorchJD 0.18 also has (TorchJD's aggregator: see torchjd_aggregator).
TORCHJD_METHODS = ("mgda", "pcgrad", "cagrad", "upgrad", "dualproj", "nash_mtl")
TORCHJD_TARGET = (8, 0.5)  # mtlib's step time / TorchJD's at k = 8, every shared method

Step = Callable[[], None]


@dataclass
class Entry:
    """One thing to time at one k."""

    key: str  # unique: "weighting:famo", "gradient:pcgrad", "control:equal", "libmtl:PCGrad", "torchjd:mgda"
    system: str  # mtlib | LibMTL | TorchJD
    method: str  # mtlib's name, except for LibMTL (its class name)
    kind: str  # weighting | gradient | control | reference | libmtl | torchjd
    step: Step | None = None
    error: str | None = None
    maps_to: str | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _err(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 400 else text[:400] + " ..."


# ---------------------------------------------------------------------------------------------------------- data


def k_task_data(n: int, k: int, *, dim: int = 100, correlation: float = 0.5, num_sines: int = 10, seed: int = 0):
    """The MMoE synthetic regression generalised to ``k`` tasks (every pair of task vectors has cosine ``p``)."""
    import numpy as np
    import torch

    from mtl.tasks import TaskSpec
    from mtrec.data.batch import FeatureSpec, TabularDataset

    if not 0.0 <= correlation <= 1.0 or dim < k + 1:
        raise ValueError(f"need 0 <= correlation <= 1 and dim >= k + 1; got {correlation}, dim {dim}, k {k}")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, k + 1)))
    w = np.sqrt(correlation) * q[:, :1] + np.sqrt(1.0 - correlation) * q[:, 1:]  # [dim, k], unit columns
    a, b = rng.standard_normal(num_sines), rng.standard_normal(num_sines)
    x = rng.standard_normal((n, dim))
    s = x @ w
    y = s + np.sin(s[:, :, None] * a + b).sum(-1) + 0.1 * rng.standard_normal((n, k))
    names = [f"task{i + 1}" for i in range(k)]
    data = TabularDataset(
        dense=torch.from_numpy(x.astype(np.float32)),
        labels={t: torch.from_numpy(y[:, i].astype(np.float32)) for i, t in enumerate(names)},
    )
    features = FeatureSpec(dense_names=tuple(f"x{i}" for i in range(dim)), sparse=())
    return data, features, [TaskSpec(t, "regression") for t in names]


# ---------------------------------------------------------------------------------------------------------- mtlib


def _config(group: str, name: str) -> Any:
    from mtl.config import group_option

    try:
        return group_option(group, name)
    except ValueError:
        return None


def _factory(group: str, name: str, registry: dict[str, Any]) -> Callable[..., Any]:
    """What ``mtrec-train`` would instantiate for ``<group>=<name>``; the registry's class where no config exists."""
    from hydra.utils import instantiate

    node = _config(group, name)
    return instantiate(node) if node is not None else registry[name]


def weighting_names() -> list[str]:
    """Every registered weighting, then every ``configs/weighting`` variant of one (e.g. ``famo_next``)."""
    from mtl.weighting import WEIGHTINGS

    extra = sorted(p.stem for p in (REPO / "configs" / "weighting").glob("*.yaml") if p.stem not in WEIGHTINGS)
    return [*WEIGHTINGS, *extra]


def build_model(features: Any, tasks: list[Any], seed: int) -> Any:
    import torch

    from mtrec.models import build_model as build_from_config

    node = _config("model", "mmoe")
    assert node is not None, "configs/model/mmoe.yaml is missing"
    sizes = (node.num_experts, list(node.expert_dims), list(node.tower_dims))
    assert sizes == (8, [16], [8]), f"configs/model/mmoe.yaml no longer has the paper's sizes: {sizes}"
    torch.manual_seed(seed)
    return build_from_config(node, features, [t.name for t in tasks])


def build_optimizer(model: Any, tasks: list[Any], extra: list[Any], lr: float) -> Any:
    from mtrec.train import build_optimizer as _build

    node = _config("optimizer", "adam")
    node.lr = lr
    return _build(node, model, tasks, extra={"weighting": list(extra)})


def reference_methods() -> dict[str, tuple[Any, Any]]:
    """Lower bounds, as ``(weighting factory, gradient factory)`` (names or classes): what a method costs with
    its own arithmetic made free, inside the same Trainer step.

    * ``post_step_forward``: ``equal`` that asks for the post-step losses (``wants_losses_after_step``) and ignores
      them: the Trainer's extra forward, the floor under FAMO.
    * ``jacobian_sum``: an ``AggregatingMethod`` whose weights are all ones (result: the plain sum): the per-task
      Jacobian, Gram matrix, ``others`` backward and stats that every Jacobian method (pcgrad, gradvac, cagrad, mgda,
      imtl_g, aligned_mtl, nash_mtl) pays before its solver runs.
    """
    from mtl.gradients import AggregatingMethod, sum_weights
    from mtl.weighting import Equal

    class PostStepForward(Equal):
        name = "post_step_forward"
        wants_losses_after_step = True

        def after_step(self, new_losses: Any) -> None:
            pass

    class JacobianSum(AggregatingMethod):
        name = "jacobian_sum"

        def weights(self, M: Any, losses: Any) -> tuple[Any, Any]:
            return sum_weights(M)

    return {"post_step_forward": (PostStepForward, "none"), "jacobian_sum": ("equal", JacobianSum)}


def mtlib_step(
    weighting: Any, gradient: Any, data: Any, features: Any, tasks: list[Any], args: Any, run_dir: Path
) -> Step:
    """One ``Trainer.train_step`` per call; ``weighting`` / ``gradient`` are config names or classes."""
    from mtl.gradients import GRADIENT_METHODS
    from mtl.weighting import WEIGHTINGS
    from mtrec.trainer import Trainer, TrainerConfig

    model = build_model(features, tasks, args.seed)
    sizes = {t.name: len(data) for t in tasks}
    w_factory = _factory("weighting", weighting, WEIGHTINGS) if isinstance(weighting, str) else weighting
    g_factory = _factory("gradient", gradient, GRADIENT_METHODS) if isinstance(gradient, str) else gradient
    w = w_factory(tasks=tasks, sizes=sizes, seed=args.seed)
    g = g_factory(seed=args.seed)
    opt = build_optimizer(model, tasks, w.trainable_parameters(), args.lr)
    cfg = TrainerConfig(batch_size=args.batch_size, progress=False, tensorboard=False, device="cpu")
    trainer = Trainer(model, opt, tasks, cfg, run_dir, seed=args.seed, weighting=w, gradient=g)
    batches = itertools.cycle(list(data.batches(args.batch_size, shuffle=True, seed=args.seed, drop_last=True)))

    def step() -> None:
        trainer.train_step(next(batches))

    step.trainer = trainer  # type: ignore[attr-defined]  # for --profile's phase labels
    return step


# ---------------------------------------------------------------------------------------------------------- LibMTL


def import_libmtl(peers: Path) -> tuple[Any, str | None]:
    """``(LibMTL module, None)`` or ``(None, why not)``. The peer dir goes to the END of sys.path; a stub module
    stands in for ``torchvision.models.utils`` (only LibMTL/model/resnet.py reaches it) when torchvision is absent."""
    if not (peers / "LibMTL").is_dir():
        return None, f"{peers}/LibMTL is missing: run `make bench-peers` to install LibMTL there"
    if str(peers) not in sys.path:
        sys.path.append(str(peers))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        for name in ("torchvision", "torchvision.models", "torchvision.models.utils"):
            sys.modules.setdefault(name, types.ModuleType(name))
        stub = sys.modules["torchvision.models.utils"]
        if not hasattr(stub, "load_state_dict_from_url"):

            def load_state_dict_from_url(*a: Any, **kw: Any) -> Any:
                raise RuntimeError("torchvision stub: no pretrained weights in this benchmark")

            stub.load_state_dict_from_url = load_state_dict_from_url  # type: ignore[attr-defined]
    try:
        import LibMTL
        import LibMTL.weighting  # noqa: F401
    except Exception as e:  # a broken peer install must not stop the mtlib measurement
        return None, f"cannot import LibMTL from {peers}: {_err(e)}"
    return LibMTL, None


def libmtl_kwargs() -> dict[str, dict[str, Any]]:
    """Each weighting's ``weight_args`` as LibMTL's ``prepare_args`` builds them from its argparse defaults."""
    from LibMTL.config import LibMTL_args

    defaults = vars(LibMTL_args.parse_args([]))
    return {name: {key: defaults[key] for key in LIBMTL_KWARGS.get(name.split("+")[0], ())} for name in LIBMTL_METHODS}


def libmtl_step(name: str, data: Any, features: Any, tasks: list[Any], args: Any) -> Step:
    import LibMTL.weighting as lw
    import numpy as np
    import torch
    from torch import nn

    from mtrec.models.layers import mix

    cls_name, rep_grad = name.split("+")[0], name.endswith("+rep_grad") or name == "GradDrop"
    weighting_cls = getattr(lw, cls_name)
    kwargs = libmtl_kwargs()[name]
    model = build_model(features, tasks, args.seed)
    names = [t.name for t in tasks]
    shared = list(model.parameter_groups()["shared"])

    class Host(nn.Module):
        """What LibMTL's weighting mixins expect of ``self``, around an mtlib MMoE."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.task_name, self.task_num = names, len(names)
            self.device = torch.device("cpu")
            self.rep_grad = rep_grad
            self.multi_input = False
            self.epoch = 2  # past GradNorm's (epoch >= 1) and DWA's (epoch > 1) warm-up
            self.train_loss_buffer = np.ones((len(names), 3))
            if rep_grad:
                self.rep: dict[str, Any] = {}
                self.rep_tasks: dict[str, Any] = {}
            self.init_param()

        def get_share_params(self) -> Any:
            return iter(shared)

        def zero_grad_share_params(self) -> None:
            for p in shared:
                if p.grad is not None:
                    p.grad.zero_()

        def forward(self, dense: Any, sparse: Any) -> dict[str, Any]:
            if not self.rep_grad:
                return self.model(dense, sparse)
            # As LibMTL's MMoE with rep_grad: each tower reads a detached copy of its task's gated mixture.
            x = self.model._input_vector(dense, sparse)
            experts = self.model.experts(x)
            out = {}
            for t in names:
                rep = mix(self.model.gates[t](x), experts)
                self.rep[t] = rep
                leaf = rep.detach().clone()
                leaf.requires_grad = True
                self.rep_tasks[t] = leaf
                out[t] = self.model.towers[t](leaf)
            return out

    adapter_cls = type(f"LibMTL{cls_name}OnMMoE", (Host, weighting_cls), {})
    adapter = adapter_cls()
    own = [p for n, p in adapter.named_parameters() if not n.startswith("model.")]  # UW/GradNorm/IMTL loss scales
    opt = build_optimizer(model, tasks, own, args.lr)
    batches = itertools.cycle(list(data.batches(args.batch_size, shuffle=True, seed=args.seed, drop_last=True)))
    with torch.no_grad():
        first = next(iter(data.batches(args.batch_size, shuffle=True, seed=args.seed, drop_last=True)))
        out = model(first.dense, first.sparse)
        initial = [float(t.loss_fn(out[t.name], first.labels[t.name])) for t in tasks]
    adapter.train_loss_buffer[:] = np.asarray(initial)[:, None]
    record: list[float] = []

    def step() -> None:
        batch = next(batches)
        adapter.train()
        preds = adapter(batch.dense, batch.sparse)
        losses = torch.zeros(len(tasks))
        for i, t in enumerate(tasks):
            loss = t.loss_fn(preds[t.name], batch.labels[t.name])
            record.append(loss.item())
            losses[i] = loss
        del record[:-100]
        opt.zero_grad()
        adapter.backward(losses, **kwargs)
        opt.step()

    return step


# ---------------------------------------------------------------------------------------------------------- TorchJD


def import_torchjd() -> tuple[Any, str | None]:
    try:
        import torchjd
        import torchjd.aggregation  # noqa: F401
        import torchjd.autojac  # noqa: F401
    except Exception as e:  # a missing dev dependency must not stop the rest
        return None, f"cannot import torchjd (a dev dependency: pip install -e '.[dev]'): {_err(e)}"
    return torchjd, None


def torchjd_version() -> str:
    from importlib.metadata import version

    return version("torchjd")


def _settings(obj: Any) -> dict[str, Any]:
    """The public scalar attributes of an mtlib gradient method (its configuration), for the JSON."""
    return {k: v for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}


def torchjd_aggregator(method: str, gradient: Any, k: int) -> Any:
    """TorchJD's aggregator for mtlib's ``method``, with the settings of mtlib's instance ``gradient`` where
    TorchJD has the same knob (see the module docstring); raises where the two cannot be matched."""
    from torchjd.aggregation import MGDA, CAGrad, DualProj, NashMTL, PCGrad, UPGrad

    if method == "mgda":
        if getattr(gradient, "normalization", "none") != "none":
            raise ValueError(f"TorchJD's MGDA has no gradient normalisation; mtlib's is {gradient.normalization!r}")
        return MGDA()
    if method == "pcgrad":
        return PCGrad()
    if method == "cagrad":
        return CAGrad(c=float(gradient.c))
    if method == "upgrad":
        return UPGrad()
    if method == "dualproj":
        return DualProj()
    if method == "nash_mtl":
        # TorchJD (like the official code) solves on the Frobenius-normalised Gram with the norm carried in its log
        # constraint: the paper's alpha, which is mtlib's default (normalize=False).
        if getattr(gradient, "normalize", False):
            raise ValueError(
                "mtlib's Nash-MTL runs with normalize=True (not the paper's alpha); TorchJD has no such mode"
            )
        return NashMTL(n_tasks=k, max_norm=float(gradient.max_norm), update_weights_every=int(gradient.update_every))
    raise ValueError(f"no TorchJD counterpart for {method!r}")


class TorchJDStep:
    """One TorchJD multi-task step per call, as TorchJD documents it: forward, ``optimizer.zero_grad()``,
    ``mtl_backward(losses, features=Z)``, ``jac_to_grad(shared, aggregator)``, ``optimizer.step()``, and the
    loss values (``.item()``), on its own MMoE built like mtlib's (same seed, same weights) and the same batches."""

    def __init__(self, aggregator: Any, data: Any, features: Any, tasks: list[Any], args: Any) -> None:
        import torch
        from torchjd.autojac import jac_to_grad, mtl_backward

        self.model = build_model(features, tasks, args.seed)
        self.tasks = list(tasks)
        self.names = [t.name for t in tasks]
        self.shared = list(self.model.parameter_groups()["shared"])
        self.optimizer = build_optimizer(self.model, tasks, [], args.lr)
        self.aggregator = aggregator
        self.per_task = args.torchjd_forward == "per_task"
        self.mtl_backward, self.jac_to_grad = mtl_backward, jac_to_grad  # attributes, for --profile's labels
        if any(p.requires_grad for p in self.model.inputs.parameters()):
            raise ValueError("the input arch has parameters: the gates' input would be a second shared feature")
        batches = list(data.batches(args.batch_size, shuffle=True, seed=args.seed, drop_last=True))
        self.batches = itertools.cycle(batches)
        with torch.no_grad():
            first = batches[0]
            ours, theirs = self.model(first.dense, first.sparse), self.forward(first)[0]
            for t in self.names:
                torch.testing.assert_close(theirs[t], ours[t], rtol=1e-5, atol=1e-6)

    def forward(self, batch: Any) -> tuple[dict[str, Any], list[Any]]:
        """The task outputs and the shared features ``[Z]`` (the experts' output)."""
        from mtrec.models.layers import mix

        m = self.model
        if not self.per_task:
            out, z = m.forward_with_representation(batch.dense, batch.sparse)
            return out, [z]
        x = m._input_vector(batch.dense, batch.sparse)
        experts = m.experts(x)  # [E, B, H]
        return {t: m.towers[t](mix(m.gates[t](x), experts)) for t in self.names}, [experts]

    def __call__(self) -> None:
        batch = next(self.batches)
        self.model.train()
        out, feats = self.forward(batch)
        losses = [t.loss_fn(out[t.name], batch.labels[t.name]) for t in self.tasks]
        self.optimizer.zero_grad(set_to_none=True)
        # Grouped heads share graph nodes between tasks: each task's backward must leave the graph for the next.
        self.mtl_backward(losses, features=feats, retain_graph=not self.per_task)
        self.jac_to_grad(self.shared, self.aggregator)
        self.optimizer.step()
        for loss in losses:
            loss.item()


def _grads(model: Any) -> tuple[Any, list[Any]]:
    """The flat shared gradient and the task-owned gradients (``.grad`` after a step) of an MMoE."""
    import torch

    groups = model.parameter_groups()
    shared = torch.cat([p.grad.reshape(-1) for p in groups["shared"]]).double()
    owned = [p.grad.double() for name, ps in groups.items() if name != "shared" for p in ps]
    return shared, owned


def torchjd_agreement(mtlib: Step, torchjd: TorchJDStep) -> dict[str, float]:
    """One step of a fresh mtlib Trainer and a fresh TorchJD step (same initial model, same first batch): how
    close their shared and task-owned gradients are. Both leave the step's gradients in ``.grad``."""
    import torch

    mtlib()
    torchjd()
    a, a_owned = _grads(mtlib.trainer.model)  # type: ignore[attr-defined]
    b, b_owned = _grads(torchjd.model)
    rel = max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a_owned, b_owned))
    return {
        "shared_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "shared_norm_ratio": float(a.norm() / b.norm().clamp_min(1e-30)),
        "task_grads_max_rel_diff": rel,
    }


# ---------------------------------------------------------------------------------------------------------- timing


MIN_BLOCK_S = 0.25  # /proc/stat counts 10 ms ticks: a shorter block's load estimate is mostly rounding


def timed(step: Step, steps: int, warmup: int) -> tuple[float, float | None]:
    """Milliseconds per step over ``steps`` steps after ``warmup`` untimed ones, and the cores other processes
    kept busy meanwhile (None for blocks shorter than MIN_BLOCK_S; the whole sequence of a round is measured too)."""
    for _ in range(warmup):
        step()
    gc.collect()
    with OtherLoad() as load:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - t0
    return 1000 * seconds / steps, (load.cores if seconds >= MIN_BLOCK_S else None)


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def flagged(row: dict[str, Any]) -> bool:
    """Whether other processes kept more than CONTENDED cores busy during the row's blocks or its round's sequence."""
    blocks = row["other_cores_busy"] if isinstance(row["other_cores_busy"], list) else [row["other_cores_busy"]]
    cores = [*blocks, row.get("sequence_other_cores_busy")]
    return any((c or 0.0) > CONTENDED for c in cores)


def summarise(entry: Entry) -> dict[str, Any]:
    rows = entry.rounds
    quiet = [r for r in rows if not flagged(r)]
    return {
        "ms_per_step": med([r["ms"] for r in rows]),
        "ratio_vs_equal": med([r["ms"] / r["equal_ms"] for r in rows]),
        "ratio_vs_equal_quiet": med([r["ms"] / r["equal_ms"] for r in quiet]),
        "ms_min": min((r["ms"] for r in rows), default=None),
        "ms_max": max((r["ms"] for r in rows), default=None),
        "rounds": len(rows),
        "contended_rounds": len(rows) - len(quiet),
    }


def paired(a: Entry, b: Entry, quiet_only: bool = False) -> float | None:
    """Median over rounds of (a / its flanking equal) / (b / its flanking equal)."""
    rb = {r["round"]: r for r in b.rounds}
    vals = [
        (r["ms"] / r["equal_ms"]) / (rb[r["round"]]["ms"] / rb[r["round"]]["equal_ms"])
        for r in a.rounds
        if r["round"] in rb and not (quiet_only and (flagged(r) or flagged(rb[r["round"]])))
    ]
    return med(vals)


# Functions of mtl.gradients / mtl.weighting / mtl.solvers labelled (torch.profiler.record_function) by --profile.
PROFILED_FUNCTIONS = {
    "mtl.gradients": ("task_gradients", "gram", "combine", "_set_grads", "_set_grad_list", "_backward_others", "_stats",
                      "pcgrad_weights", "gradvac_weights", "cagrad_weights", "mgda_weights", "imtl_g_weights",
                      "aligned_mtl_weights", "nash_mtl_weights"),
    "mtl.weighting": ("_task_grad_norms",),
    "mtl.solvers": ("min_norm_simplex", "cagrad_dual", "nash_bargaining"),
}  # fmt: skip
# Methods of mtl classes labelled the same way: the cut graph's head backward, body Jacobian and body backward.
PROFILED_METHODS = {"mtl.split": {"TaskSplit": ("head_backward", "param_jacobian", "body_grads")}}


def _labelled(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    from torch.profiler import record_function

    def wrapper(*a: Any, **kw: Any) -> Any:
        with record_function(label):
            return fn(*a, **kw)

    return wrapper


def profile_entry(entry: Entry, steps: int, rows: int = 25) -> None:
    """torch.profiler over ``steps`` steps: the ops table, then milliseconds per step in each phase of the step
    (the Trainer's model forward, weighting, gradient method and optimiser calls, and the mtl functions they run;
    for a TorchJD step its forward, ``mtl_backward``, ``jac_to_grad``, weighting and optimiser; labels nest:
    ``gradient.backward`` contains ``mtl.gradients.*``; ``step`` is the whole step, ``step, outside the labels``
    what the top-level phases leave out: the Trainer's bookkeeping and logging record)."""
    import importlib

    from torch.profiler import ProfilerActivity, profile, record_function

    assert entry.step is not None
    patched: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, attr: str, label: str) -> None:
        if obj is not None and hasattr(obj, attr):
            patched.append((obj, attr, obj.__dict__.get(attr)))
            setattr(obj, attr, _labelled(label, getattr(obj, attr)))

    trainer = getattr(entry.step, "trainer", None)
    if trainer is not None:
        patch(trainer.model, "forward", "model.forward")
        patch(trainer.model, "forward_with_representation", "model.forward_with_representation")
        patch(trainer.model, "forward_with_split", "model.forward_with_split")
        patch(trainer.weighting, "weighted", "weighting.weighted")
        patch(trainer.weighting, "after_step", "weighting.after_step")
        patch(trainer.gradient, "backward", "gradient.backward")
        patch(trainer.optimizer, "step", "optimizer.step")
    top = ["model.forward", "model.forward_with_representation", "model.forward_with_split", "weighting.weighted",
           "weighting.after_step", "gradient.backward", "optimizer.step"]  # fmt: skip
    if isinstance(entry.step, TorchJDStep):
        tj = entry.step
        patch(tj, "forward", "torchjd.forward")
        patch(tj, "mtl_backward", "torchjd.mtl_backward")
        patch(tj, "jac_to_grad", "torchjd.jac_to_grad")
        patch(getattr(tj.aggregator, "gramian_weighting", None) or tj.aggregator.weighting, "forward",
              "torchjd.jac_to_grad.weighting")  # fmt: skip
        patch(tj.optimizer, "step", "optimizer.step")
        top = ["torchjd.forward", "torchjd.mtl_backward", "torchjd.jac_to_grad", "optimizer.step"]
    for module, names in PROFILED_FUNCTIONS.items():
        mod = importlib.import_module(module)
        for name in names:
            patch(mod, name, f"{module}.{name}")
    for module, classes in PROFILED_METHODS.items():
        mod = importlib.import_module(module)
        for cls_name, names in classes.items():
            for name in names:
                patch(getattr(mod, cls_name, None), name, f"{module}.{cls_name}.{name}")
    try:
        for _ in range(3):
            entry.step()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("step"):
                    entry.step()
        wall = 1000 * (time.perf_counter() - t0) / steps
    finally:
        for obj, attr, before in reversed(patched):
            if before is None and not isinstance(obj, types.ModuleType):
                delattr(obj, attr)
            else:
                setattr(obj, attr, before)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    prefixes = ("step", "model.", "weighting.", "gradient.", "optimizer.", "mtl.", "torchjd.")
    labels = [e for e in events if e.key.startswith(prefixes)]
    phase_rows = [[e.key, f"{e.cpu_time_total / 1000 / steps:.3f}", f"{e.count / steps:g}"] for e in labels]
    totals = {e.key: e.cpu_time_total / 1000 / steps for e in labels}
    if "step" in totals:
        rest = totals["step"] - sum(totals.get(key, 0.0) for key in top)
        phase_rows.append(["step, outside the labels", f"{rest:.3f}", "1"])
    phase_rows.sort(key=lambda r: -float(r[1]))
    print(f"phases, CPU ms per step under the profiler (whole step: {wall:.2f} ms wall with profiling):")
    print(table(["phase", "ms/step", "calls/step"], phase_rows))


# ---------------------------------------------------------------------------------------------------------- output


def torchjd_rows(by_key: dict[int, dict[str, Entry]], ks: list[int], settings: dict[tuple[int, str], dict[str, Any]],
                 methods: list[str], when: str) -> list[dict[str, Any]]:  # fmt: skip
    """The JSON rows of the TorchJD comparison: ``{"peer": "torchjd", "method", "k", "ratio" (mtlib / TorchJD),
    "mtlib_ms", "torchjd_ms", ...}``, one per method and k, with the error where a side could not run."""
    from mtl.gradients import GRADIENT_METHODS

    rows = []
    for k in ks:
        for m in methods:
            ours, theirs = by_key[k].get(f"gradient:{m}"), by_key[k].get(f"torchjd:{m}")
            if m not in GRADIENT_METHODS:
                error: str | None = f"mtlib has no {m!r} gradient method (not in mtl.gradients.GRADIENT_METHODS)"
            elif ours is None or theirs is None:
                error = "not built"
            else:
                error = (f"TorchJD: {theirs.error}" if theirs.error else None) or (
                    f"mtlib: {ours.error}" if ours.error else None)  # fmt: skip
            mine = {r["round"]: r for r in ours.rounds} if ours is not None else {}
            per_round = [
                {"round": r["round"], "mtlib_ms": mine[r["round"]]["ms"], "torchjd_ms": r["ms"],
                 "ratio": mine[r["round"]]["ms"] / r["ms"], "mtlib_equal_ms": mine[r["round"]]["equal_ms"],
                 "torchjd_equal_ms": r["equal_ms"], "contended": flagged(mine[r["round"]]) or flagged(r)}
                for r in (theirs.rounds if theirs is not None else []) if r["round"] in mine
            ]  # fmt: skip
            ratios = [x["ratio"] for x in per_round]
            rows.append({
                "peer": "torchjd", "system": "TorchJD", "kind": "torchjd", "method": m, "k": k,
                "ratio": med(ratios),
                "mtlib_ms": med([x["mtlib_ms"] for x in per_round]),
                "torchjd_ms": med([x["torchjd_ms"] for x in per_round]),
                "ratio_quiet": med([x["ratio"] for x in per_round if not x["contended"]]),
                "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
                "mtlib_ratio_vs_equal": med([x["mtlib_ms"] / x["mtlib_equal_ms"] for x in per_round]),
                "torchjd_ratio_vs_equal": med([x["torchjd_ms"] / x["torchjd_equal_ms"] for x in per_round]),
                "rounds": len(per_round), "contended_rounds": sum(x["contended"] for x in per_round),
                **settings.get((k, m), {}), "error": error, "measured": when, "per_round": per_round,
            })  # fmt: skip
    return rows


def print_torchjd(rows: list[dict[str, Any]], ks: list[int], args: Any) -> list[dict[str, Any]]:
    """Print the TorchJD table; return the targets (mtlib / TorchJD <= TORCHJD_TARGET at its k)."""
    k_target, limit = TORCHJD_TARGET
    ms = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    table_rows = []
    for r in rows:
        agree = r.get("agreement") or {}
        spread = "-" if r["ratio_min"] is None else f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
        cos = agree.get("shared_cosine")
        nr = agree.get("shared_norm_ratio")
        table_rows.append([r["method"], r["k"], ms(r["mtlib_ms"]), ms(r["torchjd_ms"]),
                           "error" if r["ratio"] is None else f"{r['ratio']:.3f}", spread,
                           "-" if cos is None else f"{cos:.4f}", "-" if nr is None else f"{nr:.3f}"])  # fmt: skip
    print(f"\nTorchJD 0.18 (mtl_backward + jac_to_grad, forward {args.torchjd_forward}) on the same MMoE, data and "
          f"optimiser: ms/step (medians over {args.rounds} rounds of {args.steps} steps) and mtlib / TorchJD "
          "(median of the per-round ratios; < 1: mtlib faster); shared gradient of one step from the same state: "
          "cosine and norm ratio mtlib / TorchJD:")  # fmt: skip
    print(table(["method", "k", "mtlib ms", "TorchJD ms", "mtlib/TorchJD", "range", "grad cos", "grad norm ratio"],
                table_rows))  # fmt: skip
    for r in rows:
        if r["error"]:
            print(f"  {r['method']} at k={r['k']}: {r['error']}")
    targets = []
    for r in rows:
        if r["k"] == k_target:
            ok = r["ratio"] is not None and r["ratio"] <= limit
            keep = ("method", "ratio", "ratio_quiet", "error")
            targets.append({"peer": "torchjd", "k": k_target, "limit": limit, "pass": ok, **{x: r[x] for x in keep}})
    return targets


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def plot(entries: dict[int, list[Entry]], summaries: dict[tuple[int, str], dict[str, Any]], ks: list[int],
         lib_ratio: dict[tuple[int, str], float | None], path: Path) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [e.key for e in entries[ks[0]] if e.system == "mtlib"]
    mapped = [n for n, m in LIBMTL_METHODS.items() if m is not None]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(10, 0.65 * len(ours)), 9))
    width = 0.8 / len(ks)
    for j, k in enumerate(ks):
        vals = [summaries.get((k, key), {}).get("ratio_vs_equal") or float("nan") for key in ours]
        ax1.bar([i + (j - (len(ks) - 1) / 2) * width for i in range(len(ours))], vals, width, label=f"k = {k}")
        vals2 = [lib_ratio.get((k, n)) or float("nan") for n in mapped]
        ax2.bar([i + (j - (len(ks) - 1) / 2) * width for i in range(len(mapped))], vals2, width, label=f"k = {k}")
    suffix = {"weighting": " (w)", "gradient": "", "control": " (control)", "reference": " (floor)"}
    labels = [key.split(":")[1] + suffix.get(key.split(":")[0], "") for key in ours]
    ax1.set_xticks(range(len(ours)), labels, rotation=45, ha="right")
    ax1.axhline(1.0, color="k", lw=0.8)
    for method, _, target in TARGETS:
        for key in ours:
            if key.endswith(":" + method):
                i = ours.index(key)
                ax1.plot([i - 0.45, i + 0.45], [target, target], color="r", lw=1.5)
    ax1.set_yscale("log")
    ax1.set_ylabel("ms/step / equal's ms/step")
    ax1.set_title("mtlib: step time / equal's (equal weighting + plain backward); (w): weighting; red: target at k = 8")
    ax1.legend()
    ax2.set_xticks(range(len(mapped)), [f"{n}\n({LIBMTL_METHODS[n]})" for n in mapped], rotation=0, fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_ylabel("mtlib ms/step / LibMTL ms/step")
    ax2.set_title("mtlib vs LibMTL 1.1.5, same method, model and data (< 1: mtlib faster; missing: LibMTL failed)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


# ---------------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and steps (a few minutes on 2 cores)")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="numbers of tasks")
    ap.add_argument("--rows", type=int, default=4096, help="synthetic rows (cycled in batches)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--correlation", type=float, default=0.5, help="cosine between every two task vectors")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds; default 11, quick 9")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per block; default 30, quick 20")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before each block; default 3, quick 2")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: torch's default)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-libmtl", action="store_true", help="leave LibMTL out (same as --peers without libmtl)")
    ap.add_argument("--peers", nargs="+", choices=["libmtl", "torchjd"], default=["libmtl", "torchjd"],
                    help="peers to compare with (default both); `--peers torchjd` alone runs only the TorchJD "
                    "comparison and updates only its rows of the JSON")  # fmt: skip
    ap.add_argument("--torchjd-forward", choices=["per_task", "grouped"], default="per_task",
                    help="TorchJD side's forward: the towers and gates one task at a time (default), or the model's "
                    "grouped heads (needs retain_graph=True)")  # fmt: skip
    ap.add_argument("--no-reference", action="store_true", help="leave out the two lower-bound reference entries")
    ap.add_argument("--only", nargs="+", default=None, help="time only these methods (mtlib names or LibMTL classes)")
    ap.add_argument(
        "--profile",
        nargs="+",
        default=[],
        metavar="METHOD",
        help="torch.profiler table of these methods' steps at the largest k (e.g. famo, LibMTL:PCGrad, TorchJD:mgda)",
    )
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--libmtl-dir", type=Path, default=PEERS, help="where `make bench-peers` installed LibMTL")
    ap.add_argument("--output", default="gradient_overhead", help="file stem of the JSON and PNG in benchmarks/results")
    args = ap.parse_args()  # fmt: skip
    args.rounds = args.rounds or (9 if args.quick else 11)
    args.steps = args.steps or (20 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    ks = sorted(set(args.ks))
    t_start = time.perf_counter()

    import numpy as np
    import torch

    from mtl.gradients import GRADIENT_METHODS
    from mtrec.models.base import count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    peers = set(args.peers) - ({"libmtl"} if args.no_libmtl else set())
    torchjd_only = peers == {"torchjd"}  # only the TorchJD comparison: the rest of the JSON stays as it was
    if "libmtl" not in peers:
        libmtl, why_not = None, "not in --peers" if not args.no_libmtl else "--no-libmtl"
    else:
        libmtl, why_not = import_libmtl(args.libmtl_dir.resolve())
    if libmtl is None:
        if not torchjd_only:
            print(f"NOTE: LibMTL not available -- {why_not}.")
    else:
        print(f"LibMTL {getattr(libmtl, '__version__', '1.1.5')} from {Path(libmtl.__file__).parent}")
    torchjd, torchjd_why_not = import_torchjd() if "torchjd" in peers else (None, "not in --peers")
    if torchjd is None and "torchjd" in peers:
        print(f"NOTE: TorchJD not available -- {torchjd_why_not}.")
    elif torchjd is not None:
        print(f"TorchJD {torchjd_version()} from {Path(torchjd.__file__).parent}; forward: {args.torchjd_forward}")
    if torchjd_only and torchjd is None:
        raise SystemExit(f"--peers torchjd: {torchjd_why_not}")
    busy_before = other_cores_busy()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores; "
        f"other processes keep {busy_before if busy_before is None else round(busy_before, 2)} cores busy"
    )
    if busy_before is not None and busy_before > CONTENDED:
        print(f"NOTE: the machine is busy (other processes: {busy_before:.2f} cores); blocks will be flagged")

    def wanted(name: str) -> bool:
        return args.only is None or name in args.only or name in ("equal", "EW")

    tmp = tempfile.TemporaryDirectory(prefix="gradient_overhead_")
    tj_settings: dict[tuple[int, str], dict[str, Any]] = {}  # TorchJD: aggregator, mtlib's settings, agreement
    entries: dict[int, list[Entry]] = {}
    baselines: dict[int, Entry] = {}
    params: dict[int, int] = {}
    for k in ks:
        data, features, tasks = k_task_data(args.rows, k, correlation=args.correlation, seed=args.seed)
        run = Path(tmp.name) / f"k{k}"
        if torchjd_only:
            plan = [("baseline", "equal", "equal", "none")]
            plan += [("gradient", g, "equal", g) for g in TORCHJD_METHODS if g in GRADIENT_METHODS and wanted(g)]
        else:
            plan = [("baseline", "equal", "equal", "none"), ("control", "equal", "equal", "none")]
            plan += [("weighting", w, w, "none") for w in weighting_names() if w != "equal" and wanted(w)]
            plan += [("gradient", g, "equal", g) for g in GRADIENT_METHODS if g != "none" and wanted(g)]
            if not args.no_reference:
                plan += [("reference", name, w, g) for name, (w, g) in reference_methods().items()]
        entries[k] = []
        for kind, method, w, g in plan:
            e = Entry(f"{kind}:{method}", "mtlib", method, kind)
            try:
                e.step = mtlib_step(w, g, data, features, tasks, args, run / e.key.replace(":", "_"))
                for _ in range(3):
                    e.step()
            except Exception as ex:
                e.step, e.error = None, _err(ex)
                print(f"  k={k} mtlib {method}: FAILED -- {e.error}")
            (baselines.__setitem__(k, e) if kind == "baseline" else entries[k].append(e))
        if baselines[k].step is None:
            raise SystemExit(f"the equal baseline failed at k={k}: {baselines[k].error}")
        params[k] = count_parameters(build_model(features, tasks, args.seed))
        if libmtl is not None:
            for name, maps_to in LIBMTL_METHODS.items():
                if not wanted(name):
                    continue
                e = Entry(f"libmtl:{name}", "LibMTL", name, "libmtl", maps_to=maps_to)
                try:
                    e.step = libmtl_step(name, data, features, tasks, args)
                    for _ in range(3):
                        e.step()
                except Exception as ex:
                    e.step, e.error = None, _err(ex)
                    print(f"  k={k} LibMTL {name}: FAILED -- {e.error}")
                entries[k].append(e)
        if torchjd is not None:
            ours_by_method = {e.method: e for e in entries[k] if e.kind == "gradient"}
            for m in TORCHJD_METHODS:
                if not wanted(m) or m not in GRADIENT_METHODS:
                    continue
                e = Entry(f"torchjd:{m}", "TorchJD", m, "torchjd", maps_to=m)
                ours = ours_by_method.get(m)
                try:
                    if ours is None or ours.step is None:
                        raise RuntimeError(f"mtlib's {m} step failed: {ours.error if ours else 'not built'}")
                    mtlib_gradient = ours.step.trainer.gradient  # type: ignore[attr-defined]
                    agg = torchjd_aggregator(m, mtlib_gradient, k)
                    tj_settings[(k, m)] = {"aggregator": repr(agg), "mtlib": _settings(mtlib_gradient)}
                    fresh = mtlib_step("equal", m, data, features, tasks, args, run / f"agreement_{m}")
                    fresh_tj = TorchJDStep(torchjd_aggregator(m, mtlib_gradient, k), data, features, tasks, args)
                    tj_settings[(k, m)]["agreement"] = torchjd_agreement(fresh, fresh_tj)
                    e.step = TorchJDStep(agg, data, features, tasks, args)
                    for _ in range(3):
                        e.step()
                except Exception as ex:
                    e.step, e.error = None, _err(ex)
                    print(f"  k={k} TorchJD {m}: FAILED -- {e.error}")
                entries[k].append(e)
        print(f"k={k}: {len(entries[k])} entries built ({params[k]:,} model parameters)")

    for name in args.profile:
        key = name if ":" in name else None
        k = ks[-1]
        found = [
            e
            for e in [baselines[k], *entries[k]]
            if e.step is not None
            and (
                e.key == key
                or e.method == name
                or (name.startswith("LibMTL:") and e.key == "libmtl:" + name[7:])
                or (name.startswith("TorchJD:") and e.key == "torchjd:" + name[8:])
            )
        ]
        for e in found[:1]:
            print(f"\ntorch.profiler, {e.system} {e.method} at k={k}, {args.profile_steps} steps:")
            profile_entry(e, args.profile_steps)
        if not found:
            print(f"--profile {name}: no such method (or it failed)")

    # Everything built so far lives to the end: keep it out of the garbage collector's scans (cheaper collections).
    gc.collect()
    gc.freeze()

    # ------------------------------------------------------------------------------------------ alternating rounds
    equal_rows: dict[int, list[dict[str, Any]]] = {k: [] for k in ks}
    for r in range(args.rounds):
        t_round = time.perf_counter()
        flagged_rows = 0
        for k in ks:
            base = baselines[k]
            assert base.step is not None
            # A TorchJD entry is timed next to its mtlib counterpart (the pair in a random order of its own).
            live = [e for e in entries[k] if e.step is not None]
            partner = {e.maps_to: e for e in live if e.kind == "torchjd"}
            units = [[e, partner[e.method]] if e.kind == "gradient" and e.method in partner else [e]
                     for e in live if e.kind != "torchjd"]  # fmt: skip
            rng = random.Random(args.seed * 1000 + r * 10 + k)
            rng.shuffle(units)
            order = [e for u in units for e in (u if len(u) == 1 or rng.random() < 0.5 else u[::-1])]
            rows_now: list[dict[str, Any]] = []
            with OtherLoad() as sequence:
                prev_ms, prev_busy = timed(base.step, args.steps, args.warmup)
                equal_rows[k].append({"round": r, "ms": prev_ms, "other_cores_busy": prev_busy})
                for e in order:
                    assert e.step is not None
                    try:
                        ms, busy = timed(e.step, args.steps, args.warmup)
                    except Exception as ex:  # e.g. a solver that returns None on some batch
                        e.step, e.error = None, f"round {r}: {_err(ex)}"
                        print(f"  k={k} {e.system} {e.method}: FAILED -- {e.error}")
                        continue
                    next_ms, next_busy = timed(base.step, args.steps, args.warmup)
                    equal_rows[k].append({"round": r, "ms": next_ms, "other_cores_busy": next_busy})
                    row = {
                        "round": r,
                        "ms": ms,
                        "equal_ms": (prev_ms + next_ms) / 2,
                        "other_cores_busy": [prev_busy, busy, next_busy],
                    }
                    e.rounds.append(row)
                    rows_now.append(row)
                    prev_ms, prev_busy = next_ms, next_busy
            for row in [*rows_now, *(x for x in equal_rows[k] if x["round"] == r)]:
                row["sequence_other_cores_busy"] = sequence.cores
            flagged_rows += sum(map(flagged, rows_now))
        note = f", {flagged_rows} of its method timings flagged as contended" if flagged_rows else ""
        print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - t_round:.0f} s{note}")

    # ------------------------------------------------------------------------------------------ summaries
    summaries: dict[tuple[int, str], dict[str, Any]] = {}
    for k in ks:
        eq = [x["ms"] for x in equal_rows[k]]
        summaries[(k, "baseline:equal")] = {
            "ms_per_step": med(eq),
            "ratio_vs_equal": 1.0,
            "ratio_vs_equal_quiet": 1.0,
            "ms_min": min(eq),
            "ms_max": max(eq),
            "rounds": args.rounds,
            "contended_rounds": len({x["round"] for x in equal_rows[k] if flagged(x)}),
            "blocks": len(eq),
        }
        for e in entries[k]:
            summaries[(k, e.key)] = summarise(e)

    by_key = {k: {e.key: e for e in entries[k]} for k in ks}
    lib_vs_ew: dict[tuple[int, str], float | None] = {}
    ours_vs_lib: dict[tuple[int, str], float | None] = {}
    ours_vs_lib_quiet: dict[tuple[int, str], float | None] = {}
    for k in ks:
        ew = by_key[k].get("libmtl:EW")
        for name, maps_to in LIBMTL_METHODS.items():
            lib = by_key[k].get(f"libmtl:{name}")
            if lib is None or not lib.rounds:
                continue
            lib_vs_ew[(k, name)] = paired(lib, ew) if ew is not None and ew.rounds else None
            if maps_to is None:
                continue
            if maps_to == "equal":
                ours_rows = [{"round": x["round"], "ms": x["ms"], "equal_ms": x["ms"], "other_cores_busy": [None]}
                             for x in equal_rows[k]]  # fmt: skip
                ours = Entry("baseline:equal", "mtlib", "equal", "baseline", rounds=ours_rows)
            else:
                ours = by_key[k].get(f"weighting:{maps_to}") or by_key[k].get(f"gradient:{maps_to}")
            if ours is None or not ours.rounds:
                continue
            ours_vs_lib[(k, name)] = paired(ours, lib)
            ours_vs_lib_quiet[(k, name)] = paired(ours, lib, quiet_only=True)

    # ------------------------------------------------------------------------------------------ printed tables
    ours_keys = ["baseline:equal"] + [e.key for e in entries[ks[0]] if e.system == "mtlib"]
    rows = []
    for key in ours_keys:
        kind, method = key.split(":")
        cells = []
        for k in ks:
            s = summaries.get((k, key))
            err = next((e.error for e in entries[k] if e.key == key and e.error), None)
            cells.append("error" if err and not (s and s["rounds"]) else fmt_ratio(s and s["ratio_vs_equal"]))
        last = summaries.get((ks[-1], key)) or {}
        ms = last.get("ms_per_step")
        rows.append([method, "baseline" if kind == "baseline" else kind, *cells, "-" if ms is None else f"{ms:.2f}"])
    print(f"\nstep time / equal's step time (median over {args.rounds} rounds; batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s)); equal = weighting equal + gradient none:")  # fmt: skip
    print(table(["method", "kind", *[f"k={k}" for k in ks], f"ms/step k={ks[-1]}"], rows))
    print("equal's ms/step: " + ", ".join(f"k={k} {summaries[(k, 'baseline:equal')]['ms_per_step']:.2f}" for k in ks))

    if libmtl is not None:
        lrows = []
        for name, maps_to in LIBMTL_METHODS.items():
            if not any(f"libmtl:{name}" in by_key[k] for k in ks):
                continue
            cells1, cells2 = [], []
            for k in ks:
                e = by_key[k].get(f"libmtl:{name}")
                failed = e is not None and e.error is not None and not e.rounds
                cells1.append("error" if failed else fmt_ratio(lib_vs_ew.get((k, name))))
                mine = "-" if maps_to is None else fmt_ratio(ours_vs_lib.get((k, name)))
                cells2.append("error" if failed else mine)
            lrows.append([name, maps_to or "-", *cells1, *cells2])
        print("\nLibMTL 1.1.5 on the same MMoE and data: its step time / its EW's, and mtlib's step time / LibMTL's "
              "for the same method (< 1: mtlib faster):")  # fmt: skip
        print(table(["LibMTL", "mtlib", *[f"/EW k={k}" for k in ks], *[f"mtlib/LibMTL k={k}" for k in ks]], lrows))
        seen: set[tuple[str, str | None]] = set()
        for e in (e for k in ks for e in entries[k] if e.system == "LibMTL" and e.error):
            if (e.method, e.error) not in seen:
                seen.add((e.method, e.error))
                ks_failed = [kk for kk in ks if (by_key[kk].get(e.key) and by_key[kk][e.key].error == e.error)]
                print(f"  LibMTL {e.method} failed at k={ks_failed}: {e.error}")
    for k in ks:
        for e in entries[k]:
            if e.system == "mtlib" and e.error:
                print(f"  mtlib {e.method} failed at k={k}: {e.error}")

    # ------------------------------------------------------------------------------------------ TorchJD
    tj_methods = [m for m in TORCHJD_METHODS if wanted(m)]
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    tj_rows = torchjd_rows(by_key, ks, tj_settings, tj_methods, when) if torchjd is not None else []
    tj_targets = print_torchjd(tj_rows, ks, args) if torchjd is not None else []

    # ------------------------------------------------------------------------------------------ targets
    print()
    target_results = []
    for method, k, limit in [] if torchjd_only else TARGETS:
        key = f"weighting:{method}" if method in weighting_names() else f"gradient:{method}"
        s = summaries.get((k, key))
        ratio = s["ratio_vs_equal"] if s else None
        quiet = s["ratio_vs_equal_quiet"] if s else None
        ok = ratio is not None and ratio <= limit
        target_results.append({"method": method, "k": k, "limit": limit, "ratio": ratio, "ratio_quiet": quiet,
                               "pass": ok})  # fmt: skip
        qtxt = "" if quiet is None or s is None or not s["contended_rounds"] else f"; quiet rounds only: {quiet:.2f}x"
        print(f"{'PASS' if ok else 'FAIL'} {method} at k={k}: {fmt_ratio(ratio)} equal (target <= {limit}x{qtxt})")
    for t in tj_targets:
        qtxt = "" if t["ratio_quiet"] is None else f"; quiet rounds only: {t['ratio_quiet']:.2f}"
        verdict = "PASS" if t["pass"] else ("FAIL" if t["ratio"] is not None else "N/A ")
        print(f"{verdict} {t['method']} at k={t['k']}: mtlib / TorchJD {fmt_ratio(t['ratio'])} (target <= "
              f"{t['limit']}{qtxt}){' -- ' + t['error'] if t.get('error') else ''}")  # fmt: skip

    contended = {k: sorted({r["round"] for e in entries[k] for r in e.rounds if flagged(r)}) for k in ks}
    if any(contended.values()):
        print(
            f"WARNING: other processes kept more than {CONTENDED} cores busy during some blocks (rounds per k: "
            f"{contended}); ratios are against equal blocks of the same round, which share the slow-down, and the "
            "medians over unflagged rounds are in the JSON (ratio_vs_equal_quiet, ratio_quiet)"
        )
    control = [summaries.get((k, "control:equal"), {}).get("ratio_vs_equal") for k in ks]
    if not torchjd_only:
        print("noise check: an identical second equal Trainer measured " + ", ".join(
            f"k={k} {fmt_ratio(c)}" for k, c in zip(ks, control)))  # fmt: skip

    # ------------------------------------------------------------------------------------------ JSON + PNG
    out = args.output
    path = RESULTS / f"{out}.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        old = {}
    old_rows = old.get("results", [])
    measured = {(r["method"], r["k"]) for r in tj_rows}
    tj_all = [r for r in old_rows if r.get("peer") == "torchjd" and (r["method"], r["k"]) not in measured] + tj_rows
    rank = {m: i for i, m in enumerate(TORCHJD_METHODS)}
    tj_all.sort(key=lambda r: (r["k"], rank.get(r["method"], len(rank))))
    tj_block = old.get("torchjd")
    if "torchjd" in peers:
        tj_block = {
            "machine": machine(),
            "version": None if torchjd is None else torchjd_version(),
            "note": torchjd_why_not,
            "settings": {"ks": ks, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                         "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "batch_size": args.batch_size,
                         "rows": args.rows, "seed": args.seed, "lr": args.lr, "only": args.only,
                         "torchjd_forward": args.torchjd_forward, "methods": tj_methods,
                         "mtlib_step": "mtrec.trainer.Trainer.train_step, weighting equal, configs/gradient/<method>"
                         ".yaml, cut graph (forward_with_split)",
                         "torchjd_step": "forward; optimizer.zero_grad(); torchjd.autojac.mtl_backward(losses, "
                         "features=[experts' output]); torchjd.autojac.jac_to_grad(shared, aggregator); "
                         "optimizer.step(); loss.item() per task",
                         "optimizer": "configs/optimizer/adam.yaml, mtrec.train.build_optimizer (fused Adam), both",
                         "ratio": "median over rounds of mtlib ms/step / TorchJD ms/step in the same round"},
            "other_cores_busy_before": busy_before,
            "other_cores_busy_after": other_cores_busy(),
            "targets": tj_targets,
            "wall_seconds": time.perf_counter() - t_start,
        }  # fmt: skip
    if torchjd_only:
        # Only the TorchJD rows are new: everything else (including the machine the rest was measured on) stays.
        payload = {**old, "results": [r for r in old_rows if r.get("peer") != "torchjd"] + tj_all, "torchjd": tj_block}
        write_json(f"{out}.json", payload)
        print(f"total {time.perf_counter() - t_start:.0f} s")
        tmp.cleanup()
        return
    results: list[dict[str, Any]] = []
    for k in ks:
        eq = summaries[(k, "baseline:equal")]
        for kind in ("weighting", "gradient"):
            results.append({"system": "mtlib", "method": "equal" if kind == "weighting" else "none", "kind": kind,
                            "k": k, "baseline": True, **eq})  # fmt: skip
        for e in entries[k]:
            if e.kind == "torchjd":
                continue  # in tj_all, in their own format
            s = summaries[(k, e.key)]
            row: dict[str, Any] = {"system": e.system, "method": e.method, "kind": e.kind, "k": k, **s}
            if e.system == "LibMTL":
                row["maps_to"] = e.maps_to
                row["ratio_vs_libmtl_ew"] = lib_vs_ew.get((k, e.method))
                row["mtlib_over_libmtl"] = ours_vs_lib.get((k, e.method))
                row["mtlib_over_libmtl_quiet"] = ours_vs_lib_quiet.get((k, e.method))
            row["error"] = e.error
            row["per_round"] = e.rounds
            results.append(row)
    write_json(
        f"{out}.json",
        {
            "settings": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "ks": ks,
                "model": "mtrec.models.MMoE from configs/model/mmoe.yaml: 8 experts of [16], towers [8], ReLU, "
                "100 dense inputs",
                "parameters": {str(k): v for k, v in params.items()},
                "data": f"MMoE synthetic regression generalised to k tasks, pairwise cosine {args.correlation}, "
                f"{args.rows} rows, batch {args.batch_size}",
                "optimizer": "configs/optimizer/adam.yaml, mtrec.train.build_optimizer (fused Adam); same for LibMTL",
                "step": "mtrec.trainer.Trainer.train_step; LibMTL: forward, losses, zero_grad, backward(losses, "
                "**weight_args), optimizer.step",
                "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "other_cores_busy_before": busy_before,
                "other_cores_busy_after": other_cores_busy(),
                "contended_threshold": CONTENDED,
                "libmtl": None if libmtl is None else getattr(libmtl, "__version__", "1.1.5"),
                "libmtl_note": why_not,
                "libmtl_weight_args": libmtl_kwargs() if libmtl is not None else None,
                "libmtl_mapping": LIBMTL_METHODS,
                "wall_seconds": time.perf_counter() - t_start,
            },
            "results": results + tj_all,
            "equal_blocks": {str(k): v for k, v in equal_rows.items()},
            "summary": {
                "targets": target_results,
                "contended_rounds": {str(k): v for k, v in contended.items()},
                "control_ratio": dict(zip(map(str, ks), control)),
            },
            "torchjd": tj_block,
        },
    )
    plot(entries, summaries, ks, ours_vs_lib, RESULTS / f"{out}.png")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    tmp.cleanup()


if __name__ == "__main__":
    main()
