"""Training throughput (samples/s): mtlib's MMoE vs torch-rechub's MMOE, same sizes, same data, one run.

    make bench-peers                          # once: torch-rechub (and what it imports) into benchmarks/.peers
    python benchmarks/throughput.py           # 200k rows, 7 alternating repeats of 50 timed steps
    python benchmarks/throughput.py --quick   # 100k rows, 5 repeats of 20 steps (a few minutes on 2 cores)

Data: ``load_sparse_synthetic`` (user_id, item_id, category, a mean-pooled item history of up to 20 ids,
8 dense features; tasks click and conversion (binary) and dwell (regression)), its train split, batches of
``--batch-size`` rows (4096) in a seeded shuffled order, the last partial batch of an epoch dropped. Both
systems see the same batches in the same order.

A timed *step* is everything a training loop does per batch:

* mtlib: ``TabularDataset.batches`` (index the column tensors, build the KeyedJaggedTensor), forward,
  ``compute_losses`` + ``total_loss`` (BCE-with-logits, BCE-with-logits, MSE, summed), ``zero_grad``,
  backward, ``Adam.step``, ``loss.item()`` -- what ``mtrec.trainer.Trainer.train_step`` does.
* torch-rechub: index its dict-of-tensors input ``{feature: tensor}`` and ``y [N, 3]`` (converted once
  from the same dataset, untimed), forward, its own losses (``get_loss_func``: ``BCELoss`` on its
  sigmoid outputs, ``MSELoss``; summed), ``zero_grad``, backward, ``Adam.step``, ``loss.item()`` -- the
  body of ``MTLTrainer.train_one_epoch`` less its (all-zero) regularisation term, with the loss summed
  rather than averaged over tasks. Its own ``DataGenerator`` path (a ``torch.utils.data.DataLoader`` that
  indexes and collates row by row) is slower still; ``--rechub-dataloader`` times it too, as a third system
  that stays out of the ratio.

Both models: one table of width 16 per sparse feature with the same number of rows, the history mean-pooled,
the 8 dense features concatenated raw after the pooled embeddings (a 72-wide input), 8 experts of [16]
units with ReLU, one softmax gate per task, towers [8] then one output, Adam(lr=1e-3), no dropout, dense
embedding gradients. Each library uses its own default Adam: mtlib's optimizer config enables the fused
kernel, torch-rechub's ``MTLTrainer`` builds a plain ``torch.optim.Adam``.
What differs, because torch-rechub's MMOE is built that way:

* torch-rechub's ``MLP`` puts a ``BatchNorm1d`` after every Linear (experts, gates, towers) with no switch to
  leave it out: 352 more parameters and more work per step; part of its MMOE as shipped.
* Its ``SequenceFeature`` masks padding by ``padding_idx`` (else ``-1``, which ``nn.Embedding`` cannot look
  up) and our item ids start at 0, so its history ids are shifted by one and its history table has
  ``num_items + 1`` rows, row 0 the padding (16 more parameters).
* Its dense input is one ``DenseFeature("dense", embed_dim=8)`` holding the ``[B, 8]`` vector (its
  ``EmbeddingLayer`` concatenates a 2-D dense value as is, and ``DenseFeature``'s docstring allows a vector)
  -- the same 72-wide input as mtlib's ``InputArch`` with ``dense_dims=[]``; eight scalar DenseFeatures would
  give the same input with eight small concatenations.
* Initialisation (torchrec's uniform tables vs its N(0, 1e-4) tables); irrelevant to speed.

Timing: ``--repeats`` rounds, each timing ``--steps`` steps of every system in turn (A, B, A, B, ...),
after ``--warmup`` untimed steps of that system; models, optimisers and batch streams carry on across rounds.
Medians over rounds; the ratio is median(mtlib) / median(torch-rechub). Each timed block also records the
cores other processes kept busy meanwhile (/proc/stat less this process's CPU time): above 0.25 the round is
flagged, since on a small machine torch's default of one thread per core then slows steps down many times
over (seen here: 16 ms -> 1.3 s per step). Then ``--breakdown-steps`` more
steps per system with per-phase timers (batch, forward, loss, backward, optimizer), and with ``--profile``
a torch.profiler table of mtlib's step.

Writes benchmarks/results/throughput.json. Without benchmarks/.peers (or if torch_rechub fails to import)
it says so, measures mtlib alone and reports the ratio as null.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common import REPO, table, write_json

PEERS = REPO / "benchmarks" / ".peers"
PHASES = ("batch", "forward", "loss", "backward", "optimizer")

# ``step(phases)`` runs one training step and returns its loss; with a dict it adds per-phase seconds to it.
StepFn = Callable[[dict[str, float] | None], float]


class _Clock:
    """Per-phase timer; a no-op without a dict (so timed and broken-down steps run the same code)."""

    def __init__(self, phases: dict[str, float] | None) -> None:
        self.phases = phases
        self.t = time.perf_counter() if phases is not None else 0.0

    def lap(self, name: str) -> None:
        if self.phases is not None:
            now = time.perf_counter()
            self.phases[name] = self.phases.get(name, 0.0) + now - self.t
            self.t = now


CONTENDED = 0.25  # cores busy with other processes above which a timed block is flagged


def _proc_stat() -> tuple[int, int] | None:
    """``(total, idle + iowait)`` jiffies over all CPUs, or None where /proc/stat is not there."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    except (OSError, ValueError, IndexError):
        return None


class OtherLoad:
    """Context manager: ``.cores``, the cores other processes kept busy meanwhile (all busy CPU time in
    /proc/stat less this process's own CPU time, over the wall time; None where /proc/stat is missing)."""

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self.s0, self.p0, self.w0 = _proc_stat(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        s1, p1, w1 = _proc_stat(), time.process_time(), time.perf_counter()
        if self.s0 is None or s1 is None or s1[0] <= self.s0[0] or w1 <= self.w0:
            return
        total, idle = s1[0] - self.s0[0], s1[1] - self.s0[1]
        busy = (1 - idle / total) * (os.cpu_count() or 1)
        self.cores = max(0.0, busy - (p1 - self.p0) / (w1 - self.w0))


def other_cores_busy(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other processes while this one sleeps ``seconds``."""
    with OtherLoad() as load:
        time.sleep(seconds)
    return load.cores


def import_rechub(peers: Path) -> tuple[Any, str | None]:
    """``(torch_rechub module, None)``, or ``(None, why not)``. The peer dir goes to the END of sys.path."""
    if not peers.is_dir():
        return None, f"{peers} is missing: run `make bench-peers` to install torch-rechub there"
    if str(peers) not in sys.path:
        sys.path.append(str(peers))
    try:
        import torch_rechub
        from torch_rechub.models.multi_task import MMOE  # noqa: F401
    except Exception as e:  # anything: a broken peer install must not stop the mtlib measurement
        return None, f"cannot import torch_rechub from {peers}: {type(e).__name__}: {e}"
    return torch_rechub, None


def _shuffled_index_batches(n: int, batch_size: int, seed: int) -> Iterator[Any]:
    """Index tensors of full batches, epoch after epoch, in ``TabularDataset.batches``' shuffled order."""
    import torch

    for epoch in itertools.count():
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for b in range(n // batch_size):
            yield order[b * batch_size : (b + 1) * batch_size]


def build_mtlib(bundle: Any, args: argparse.Namespace) -> tuple[Any, StepFn]:
    import torch

    from mtl.tasks import compute_losses, total_loss
    from mtrec.models import InputArch, MMoE

    torch.manual_seed(args.seed)
    tasks = bundle.tasks
    model = MMoE(
        InputArch(bundle.features, embedding_dim=16, dense_dims=()),
        [t.name for t in tasks],
        num_experts=8,
        expert_dims=(16,),
        tower_dims=(8,),
        dropout=0.0,
    )
    # mtlib's default optimiser config (configs/optimizer/adam.yaml) uses the fused Adam kernel.
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    train = bundle.train

    def stream() -> Iterator[Any]:
        for epoch in itertools.count():
            yield from train.batches(args.batch_size, shuffle=True, seed=args.seed, epoch=epoch, drop_last=True)

    batches = stream()

    def step(phases: dict[str, float] | None = None) -> float:
        clock = _Clock(phases)
        batch = next(batches)
        clock.lap("batch")
        model.train()
        outputs = model(batch.dense, batch.sparse)
        clock.lap("forward")
        loss = total_loss(tasks, compute_losses(tasks, outputs, batch.labels))
        clock.lap("loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clock.lap("backward")
        opt.step()
        value = loss.item()
        clock.lap("optimizer")
        return value

    return model, step


def to_rechub(bundle: Any) -> tuple[dict[str, Any], Any, list[Any]]:
    """The train split in torch-rechub's format (untimed): ``x {feature: tensor}``, ``y [N, T]``, features."""
    import torch
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature

    train, spec = bundle.train, bundle.features
    x: dict[str, Any] = {}
    features: list[Any] = []
    for f in spec.sparse:
        ids, lengths = train.sparse_ids[f.name], train.sparse_lengths[f.name]
        if f.max_len == 1:
            x[f.name] = ids[:, 0].contiguous()  # [N]; every row of these has exactly one id
            features.append(SparseFeature(f.name, vocab_size=f.num_embeddings, embed_dim=16))
        else:
            # Padded [N, L] with 0 as padding: ids shift by one, the table gets one more row (row 0).
            valid = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
            x[f.name] = torch.where(valid, ids + 1, torch.zeros_like(ids)).contiguous()
            features.append(
                SequenceFeature(f.name, vocab_size=f.num_embeddings + 1, embed_dim=16, pooling=f.pooling, padding_idx=0)
            )
    if spec.dense_dim:
        x["dense"] = train.dense.contiguous()
        features.append(DenseFeature("dense", embed_dim=spec.dense_dim))
    y = torch.stack([train.labels[t.name] for t in bundle.tasks], dim=1).contiguous()
    return x, y, features


def build_rechub(bundle: Any, args: argparse.Namespace, *, dataloader: bool = False) -> tuple[Any, StepFn]:
    import torch
    from torch_rechub.models.multi_task import MMOE
    from torch_rechub.utils.data import TorchDataset, get_loss_func

    x, y, features = to_rechub(bundle)
    task_types = ["classification" if t.kind == "binary" else "regression" for t in bundle.tasks]
    torch.manual_seed(args.seed)
    model = MMOE(
        features,
        task_types,
        n_expert=8,
        expert_params={"dims": [16], "dropout": 0.0, "activation": "relu"},
        tower_params_list=[{"dims": [8], "dropout": 0.0, "activation": "relu"} for _ in task_types],
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fns = [get_loss_func(tt) for tt in task_types]

    batches: Iterator[tuple[dict[str, Any], Any]]
    if dataloader:
        # torch-rechub's own DataGenerator path: a DataLoader over TorchDataset, row-by-row collation.
        loader = torch.utils.data.DataLoader(
            TorchDataset(x, y),
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(args.seed),
        )
        batches = itertools.chain.from_iterable(loader for _ in itertools.count())
    else:
        batches = (
            ({k: v[idx] for k, v in x.items()}, y[idx])
            for idx in _shuffled_index_batches(len(y), args.batch_size, args.seed)
        )

    def step(phases: dict[str, float] | None = None) -> float:
        clock = _Clock(phases)
        xb, yb = next(batches)
        clock.lap("batch")
        model.train()
        pred = model(xb)  # [B, T]: probabilities for classification tasks, values for regression
        clock.lap("forward")
        loss = sum(fn(pred[:, i], yb[:, i].float()) for i, fn in enumerate(loss_fns))
        clock.lap("loss")
        model.zero_grad()
        loss.backward()
        clock.lap("backward")
        opt.step()
        value = loss.item()
        clock.lap("optimizer")
        return value

    return model, step


def timed(step: StepFn, steps: int, warmup: int) -> tuple[float, list[float], float | None]:
    """Seconds for ``steps`` steps after ``warmup`` untimed ones, the timed steps' losses, and the cores
    other processes kept busy meanwhile."""
    for _ in range(warmup):
        step(None)
    gc.collect()
    losses = []
    with OtherLoad() as load:
        t0 = time.perf_counter()
        for _ in range(steps):
            losses.append(step(None))
        seconds = time.perf_counter() - t0
    return seconds, losses, load.cores


def breakdown(step: StepFn, steps: int) -> dict[str, float]:
    """Median milliseconds per phase over ``steps`` steps."""
    per_step = []
    for _ in range(steps):
        phases: dict[str, float] = {}
        step(phases)
        per_step.append(phases)
    out = {p: 1000 * statistics.median(s[p] for s in per_step) for p in PHASES}
    out["total"] = sum(out.values())
    return out


def profile_step(step: StepFn, steps: int, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(None)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows, steps and repeats (a few minutes on 2 cores)")
    ap.add_argument("--rows", type=int, default=None, help="rows generated (80%% train); default 200000, quick 100000")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per system per repeat; default 50, quick 20")
    ap.add_argument("--repeats", type=int, default=None, help="alternating rounds; default 7, quick 5")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed steps before each timed block; default 5, quick 3"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--breakdown-steps", type=int, default=10, help="steps per system timed by phase (0: skip)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS", help="torch.profiler table of mtlib's step")
    ap.add_argument("--rechub-dataloader", action="store_true", help="also time torch-rechub's DataLoader path")
    ap.add_argument("--peers", type=Path, default=PEERS, help="where `make bench-peers` installed torch-rechub")
    args = ap.parse_args()
    args.rows = args.rows or (100_000 if args.quick else 200_000)
    args.steps = args.steps or (20 if args.quick else 50)
    args.repeats = args.repeats or (5 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)

    import numpy as np
    import torch

    from mtrec.data.synthetic import load_sparse_synthetic
    from mtrec.models.base import count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    rechub, why_not = import_rechub(args.peers.resolve())
    if rechub is None:
        print(f"NOTE: torch-rechub not available -- {why_not}. Measuring mtlib alone; the ratio is null.")
    else:
        print(f"torch-rechub {rechub.__version__} from {Path(rechub.__file__).parent}")

    bundle = load_sparse_synthetic(n_rows=args.rows, seed=args.seed)
    n_train = len(bundle.train)
    if n_train < args.batch_size:
        raise SystemExit(f"the train split has {n_train} rows, fewer than one batch of {args.batch_size}")
    print(
        f"sparse synthetic: {n_train} train rows, batch {args.batch_size} ({n_train // args.batch_size} per epoch), "
        f"{torch.get_num_threads()} torch threads"
    )
    busy_before = other_cores_busy()
    if busy_before is not None and busy_before > 0.25:
        print(
            f"NOTE: other processes keep {busy_before:.2f} of {os.cpu_count()} cores busy; with as many torch threads"
            " as cores, contention can slow steps down many times over (try --threads 1, or a quiet machine)"
        )

    systems: dict[str, tuple[Any, StepFn]] = {"mtlib": build_mtlib(bundle, args)}
    if rechub is not None:
        systems["torch-rechub"] = build_rechub(bundle, args)
        if args.rechub_dataloader:
            systems["torch-rechub-dataloader"] = build_rechub(bundle, args, dataloader=True)
    params = {name: count_parameters(model) for name, (model, _) in systems.items()}
    print("parameters: " + ", ".join(f"{name} {n:,}" for name, n in params.items()))

    results: list[dict[str, Any]] = []
    losses: dict[str, list[float]] = {name: [] for name in systems}
    for r in range(args.repeats):
        for name, (_, step) in systems.items():
            seconds, ls, others = timed(step, args.steps, args.warmup)
            sps = args.steps * args.batch_size / seconds
            losses[name].extend(ls)
            results.append(
                {
                    "system": name,
                    "samples_per_s": sps,
                    "repeat": r,
                    "ms_per_step": 1000 * seconds / args.steps,
                    "other_cores_busy": others,
                }
            )
            flag = "  CONTENDED" if others is not None and others > CONTENDED else ""
            busy = "" if others is None else f", other processes {others:.2f} cores"
            ms = 1000 * seconds / args.steps
            print(f"  repeat {r} {name:<24} {sps:>10.0f} samples/s  ({ms:.1f} ms/step{busy}){flag}")

    def med(name: str) -> float | None:
        vals = [x["samples_per_s"] for x in results if x["system"] == name]
        return statistics.median(vals) if vals else None

    mtlib_median, rechub_median = med("mtlib"), med("torch-rechub")
    ratio = mtlib_median / rechub_median if mtlib_median and rechub_median else None
    contended = sorted({x["repeat"] for x in results if (x["other_cores_busy"] or 0.0) > CONTENDED})
    paired = paired_quiet = None
    if rechub_median:
        by = {(x["system"], x["repeat"]): x["samples_per_s"] for x in results}
        ratios = {r: by[("mtlib", r)] / by[("torch-rechub", r)] for r in range(args.repeats)}
        paired = statistics.median(ratios.values())
        quiet = [v for r, v in ratios.items() if r not in contended]
        paired_quiet = statistics.median(quiet) if quiet else None

    k = min(5, len(next(iter(losses.values()))))
    loss_info = {
        name: {
            "first": ls[0],
            "last": ls[-1],
            f"mean_first_{k}": statistics.fmean(ls[:k]),
            f"mean_last_{k}": statistics.fmean(ls[-k:]),
            "went_down": statistics.fmean(ls[-k:]) < statistics.fmean(ls[:k]),
        }
        for name, ls in losses.items()
    }

    rows = []
    for name in systems:
        vals = [x["samples_per_s"] for x in results if x["system"] == name]
        li = loss_info[name]
        rows.append(
            [
                name,
                f"{params[name]:,}",
                f"{statistics.median(vals):,.0f}",
                f"{min(vals):,.0f} .. {max(vals):,.0f}",
                f"{1000 * args.batch_size / statistics.median(vals):.1f}",
                f"{li['first']:.4f} -> {li['last']:.4f}",
            ]
        )
    print()
    print(table(["system", "params", "median samples/s", "range", "ms/step", "loss first -> last"], rows))
    if ratio is not None:
        print(f"\nratio mtlib / torch-rechub (medians): {ratio:.3f}   (median of per-repeat ratios: {paired:.3f})")
    else:
        print("\nratio mtlib / torch-rechub: null (torch-rechub not measured)")
    if contended:
        print(
            f"WARNING: other processes kept more than {CONTENDED} cores busy during repeats {contended}; "
            + (f"median ratio over the other repeats: {paired_quiet:.3f}" if paired_quiet else "no quiet repeat")
        )
    for name, li in loss_info.items():
        if not li["went_down"]:
            print(f"WARNING: {name}'s loss did not go down over the timed steps: {li}")

    phases: dict[str, dict[str, float]] = {}
    if args.breakdown_steps > 0:
        for name, (_, step) in systems.items():
            phases[name] = breakdown(step, args.breakdown_steps)
        print(f"\nper-step phases, median ms over {args.breakdown_steps} steps:")
        print(table(["system", *PHASES, "total"], [[n, *(f"{v:.1f}" for v in p.values())] for n, p in phases.items()]))
    if args.profile > 0:
        print(f"\ntorch.profiler, mtlib, {args.profile} steps:")
        profile_step(systems["mtlib"][1], args.profile)

    write_json(
        "throughput.json",
        {
            "settings": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "train_rows": n_train,
                "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "other_cores_busy_before": busy_before,
                "other_cores_busy_after": other_cores_busy(),
                "torch_rechub": getattr(rechub, "__version__", None),
                "torch_rechub_note": why_not,
                "parameters": params,
            },
            "results": results,
            "summary": {
                "mtlib_median": mtlib_median,
                "rechub_median": rechub_median,
                "ratio": ratio,
                "ratio_paired_median": paired,
                "contended_repeats": contended,
                "ratio_paired_median_quiet": paired_quiet,
                "rechub_dataloader_median": med("torch-rechub-dataloader"),
                "losses": loss_info,
                "phases_ms": phases,
            },
        },
    )


if __name__ == "__main__":
    main()
