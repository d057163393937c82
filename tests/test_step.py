"""The multi-task step (:mod:`mtl.step`): the same parameters, weights and scheduler state as the sequence it replaces
written out by hand, for stateful weightings, gradient methods and schedulers; the mtrec Trainer's step against the
Trainer's code before the step moved to ``mtl``; shared schedulers, epochs, state and errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from mtl.gradients import GRADIENT_METHODS, GradientMethod, Plain
from mtl.scheduling import SCHEDULERS, TaskScheduler
from mtl.split import TaskSplit
from mtl.step import MultiTaskStep, StepParameters
from mtl.tasks import TaskSpec
from mtl.weighting import WEIGHTINGS, Static, Weighting

torch.set_num_threads(1)
NAMES = ["a", "b", "c"]


class Tiny(nn.Module):
    """A shared layer, one linear head per task; fixed data per step (so losses after a step are reproducible)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({n: nn.Linear(6, 1) for n in NAMES})
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.dirs = {n: torch.randn(4, generator=torch.Generator().manual_seed(i + 1)) for i, n in enumerate(NAMES)}

    def losses(self, step: int, names: list[str]) -> dict[str, Tensor]:
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(100 + step))
        h = torch.tanh(self.body(x))
        return {n: ((self.heads[n](h).squeeze(-1) - x @ self.dirs[n] * (1 + i)) ** 2).mean() for i, n in
                enumerate(NAMES) if n in names}

    def shared(self) -> list[nn.Parameter]:
        return list(self.body.parameters())

    def task(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


def _reference(
    model: Tiny,
    weighting: Weighting,
    gradient: GradientMethod,
    scheduler: TaskScheduler | None,
    steps: int,
    epoch_every: int,
) -> list[dict[str, float]]:
    """The step written out as ``mtrec.trainer.Trainer.train_step`` did it before ``mtl.step`` existed."""
    opt = torch.optim.SGD([*model.parameters(), *weighting.trainable_parameters()], lr=0.05)
    others = model.task() + weighting.trainable_parameters()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    history = []
    for step in range(steps):
        names = scheduler.select(step) if scheduler is not None else list(NAMES)
        losses = model.losses(step, names)
        opt.zero_grad(set_to_none=True)
        weighted = weighting.weighted(losses, shared=model.shared())
        gradient.backward(weighted, model.shared(), others=others)
        opt.step()
        if weighting.wants_losses_after_step:
            with torch.inference_mode():
                after = model.losses(step, names)
            weighting.after_step(after)
        plain = {k: v.item() for k, v in losses.items()}
        if scheduler is not None:
            scheduler.observe(step, plain)
        for k, v in plain.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        if step % epoch_every == epoch_every - 1:
            weighting.on_epoch_end({k: sums[k] / counts[k] for k in sums})
            sums, counts = {}, {}
        history.append(weighting.current_weights())
    return history


def _with_step(
    model: Tiny,
    weighting: Weighting,
    gradient: GradientMethod,
    scheduler: TaskScheduler | None,
    steps: int,
    epoch_every: int,
) -> list[dict[str, float]]:
    opt = torch.optim.SGD([*model.parameters(), *weighting.trainable_parameters()], lr=0.05)
    mt = MultiTaskStep(NAMES, weighting=weighting, gradient=gradient, scheduler=scheduler)
    params = StepParameters(model.shared(), model.task() + mt.trainable_parameters(), last_shared=model.shared())
    history = []
    for step in range(steps):
        names = mt.select(step)
        losses = model.losses(step, names)
        out = mt.run(step, losses, opt, params, losses_after_step=lambda: model.losses(step, names))  # noqa: B023
        assert list(out.losses) == names and set(out.weighted) == set(names)
        if step % epoch_every == epoch_every - 1:
            mt.end_epoch()
        history.append(weighting.current_weights())
    return history


COMBOS = [
    ("famo", "pcgrad", "bandit"),
    ("dwa", "none", "round_robin"),
    ("uncertainty", "mgda", "random"),
    ("gradnorm", "cagrad", "active"),
    ("rlw", "imtl_g", None),
    ("famo_next", "gradvac", "all"),
]


@pytest.mark.parametrize(("weighting", "gradient", "schedule"), COMBOS)
def test_step_equals_the_sequence_written_out(weighting: str, gradient: str, schedule: str | None) -> None:
    def build() -> tuple[Tiny, Weighting, GradientMethod, TaskScheduler | None]:
        kwargs = {"update": "next_batch"} if weighting == "famo_next" else {}
        w = WEIGHTINGS[weighting.removesuffix("_next")](NAMES, sizes=dict.fromkeys(NAMES, 10), seed=3, **kwargs)
        s = SCHEDULERS[schedule](NAMES, seed=5) if schedule is not None else None
        return Tiny(), w, GRADIENT_METHODS[gradient](seed=7), s

    m1, w1, g1, s1 = build()
    m2, w2, g2, s2 = build()
    h1 = _reference(m1, w1, g1, s1, steps=9, epoch_every=3)
    h2 = _with_step(m2, w2, g2, s2, steps=9, epoch_every=3)
    assert h1 == h2
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    for (k, v1), v2 in zip(w1.state_dict().items(), w2.state_dict().values()):
        if isinstance(v1, Tensor):
            assert torch.equal(v1.nan_to_num(7.0), v2.nan_to_num(7.0)), k
    if s1 is not None:
        assert s1.state_dict() == s2.state_dict()
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), Tiny().parameters()))  # it trained


def test_step_through_a_cut_equals_the_uncut_graph() -> None:
    """The cut (a TaskSplit from the model) reaches the gradient method and a split-aware weighting: the same
    gradients as the plain graph."""
    grads = []
    for cut in (False, True):
        model = Tiny()
        w = WEIGHTINGS["gradnorm"](NAMES)
        mt = MultiTaskStep(NAMES, weighting=w, gradient=GRADIENT_METHODS["pcgrad"](seed=0))
        params = StepParameters(model.shared(), model.task(), last_shared=model.shared())
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
        h = torch.tanh(model.body(x))
        split = TaskSplit(NAMES) if cut else None
        zs = split.fan_out(h) if split is not None else dict.fromkeys(NAMES, h)
        losses = {n: ((model.heads[n](zs[n]).squeeze(-1) - x @ model.dirs[n]) ** 2).mean() for n in NAMES}
        mt.run(0, losses, torch.optim.SGD(model.parameters(), lr=0.0), params, cut=split)
        grads.append([p.grad.clone() for p in model.parameters()])
        assert w.current_weights()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["bandit", "random"])
def test_mtrec_trainer_step_equals_the_trainer_code_before_the_step_moved(schedule: str, tmp_path: Path) -> None:
    """``Trainer.train_step`` through :class:`MultiTaskStep` against the Trainer's own sequence before it (copied
    below from the code it replaced), on a seeded MMoE with FAMO, PCGrad, gradient clipping and a scheduler (the
    bandit learns from the losses; two random tasks per step let FAMO's logits move)."""
    from mtrec.data import load_sparse_synthetic
    from mtrec.models import InputArch, MMoE
    from mtrec.trainer import Trainer, TrainerConfig

    bundle = load_sparse_synthetic(n_rows=400, num_users=30, num_items=40, num_categories=5)
    tasks = bundle.tasks

    def trainer(run_dir: Path) -> Trainer:
        torch.manual_seed(0)
        names = [t.name for t in tasks]
        model = MMoE(InputArch(bundle.features), names, num_experts=3, expert_dims=[8], tower_dims=[4])
        w = WEIGHTINGS["famo"](tasks)
        opt = torch.optim.Adam([*model.parameters(), *w.trainable_parameters()], lr=0.01)
        cfg = TrainerConfig(batch_size=64, progress=False, tensorboard=False, grad_clip=0.5)
        kwargs = {"tasks_per_step": 2} if schedule == "random" else {}
        s = SCHEDULERS[schedule]([t.name for t in tasks], seed=1, **kwargs)
        return Trainer(model, opt, tasks, cfg, run_dir, weighting=w, gradient=GRADIENT_METHODS["pcgrad"](seed=2),
                       scheduler=s)

    def old_train_step(self: Trainer, batch) -> None:  # noqa: ANN001 - the pre-step Trainer.train_step, verbatim
        self.model.train()
        tasks = self.active_tasks()
        batches = batch
        losses, representation = self._losses(tasks, batches)
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(representation, TaskSplit) and self.weighting.split_aware:
            weighted = self.weighting.weighted(losses, shared=self.last_shared, split=representation)
        else:
            weighted = self.weighting.weighted(losses, shared=self.last_shared)
        self.gradient.backward(weighted, self.shared_params, others=self.other_params, representation=representation)
        reg = self.model.regularization() if hasattr(self.model, "regularization") else None
        if reg is not None and reg.requires_grad:
            reg.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        if self.weighting.wants_losses_after_step:
            with torch.inference_mode():
                after = self._plain_losses(tasks, batches)
            self.weighting.after_step(after)
        plain = {k: v.item() for k, v in losses.items()}
        if self.scheduler is not None:
            self.scheduler.observe(self.step, plain)
        self.step += 1

    new, old = trainer(tmp_path / "new"), trainer(tmp_path / "old")
    for step, batch in enumerate(bundle.train.batches(64, shuffle=True, seed=0, epoch=0)):
        new.train_step(batch)
        old_train_step(old, batch)
        assert new.weighting.current_weights() == old.weighting.current_weights(), step
    for (k, p), q in zip(new.model.state_dict().items(), old.model.state_dict().values()):
        assert torch.equal(p, q), k
    assert new.scheduler.state_dict() == old.scheduler.state_dict()
    assert torch.equal(new.weighting.logits, old.weighting.logits)
    assert (new.weighting.logits.abs().sum() > 0) == (schedule == "random")  # FAMO learns nothing from one task


def test_tasks_given_by_name_train_like_task_specs() -> None:
    """A weighting built for task names (an RL agent's) runs the same step as one built for TaskSpecs."""
    for name in sorted(WEIGHTINGS):
        hist = []
        for tasks in (NAMES, [TaskSpec(n, "regression") for n in NAMES]):
            w = WEIGHTINGS[name](tasks, sizes=dict.fromkeys(NAMES, 4), seed=0)
            hist.append(_with_step(Tiny(), w, Plain(), None, steps=4, epoch_every=2))
        assert hist[0] == hist[1], name


def test_steps_sharing_a_scheduler_select_alike_and_only_one_feeds_it() -> None:
    scheduler = SCHEDULERS["bandit"](NAMES, seed=0)
    critic = MultiTaskStep(NAMES, scheduler=scheduler)
    actor = MultiTaskStep(NAMES, scheduler=scheduler, feedback=False)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    params = StepParameters(model.shared(), model.task())
    for step in range(6):
        tasks = critic.select(step)
        assert actor.select(step) == tasks and len(tasks) == 1
        critic.run(step, model.losses(step, NAMES), opt, params)  # losses of other tasks do not count
        out = actor.run(step, model.losses(step, tasks), opt, params)
        assert list(out.losses) == tasks
    assert any(v is not None for v in scheduler.last_loss)  # the critic step fed it
    assert critic.state_dict()["scheduler"] == scheduler.state_dict() and actor.state_dict()["scheduler"] is None


def test_state_dict_round_trip_continues_identically() -> None:
    def build() -> tuple[Tiny, MultiTaskStep, torch.optim.Optimizer]:
        model = Tiny()
        w = WEIGHTINGS["dwa"](NAMES)
        mt = MultiTaskStep(NAMES, weighting=w, gradient=GRADIENT_METHODS["gradvac"](seed=1),
                           scheduler=SCHEDULERS["active"](NAMES, seed=2))
        return model, mt, torch.optim.SGD(model.parameters(), lr=0.05)

    def steps(model: Tiny, mt: MultiTaskStep, opt: torch.optim.Optimizer, start: int, n: int) -> None:
        params = StepParameters(model.shared(), model.task())
        for step in range(start, start + n):
            mt.run(step, model.losses(step, mt.select(step)), opt, params)
            if step % 4 == 3:
                mt.end_epoch()

    m1, mt1, o1 = build()
    steps(m1, mt1, o1, 0, 6)  # stops mid-epoch: the epoch's losses so far are state too
    assert mt1.epoch_loss_count
    m2, mt2, o2 = build()
    m2.load_state_dict(m1.state_dict())
    o2.load_state_dict(o1.state_dict())
    mt2.load_state_dict(copy.deepcopy(mt1.state_dict()))
    steps(m1, mt1, o1, 6, 6)
    steps(m2, mt2, o2, 6, 6)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(mt1.weighting.last_epoch_losses, mt2.weighting.last_epoch_losses)


def test_regulariser_and_clipping() -> None:
    model = Tiny()
    mt = MultiTaskStep(NAMES, max_grad_norm=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg = sum(p.pow(2).sum() for p in model.parameters())
    mt.run(0, model.losses(0, NAMES), opt, StepParameters(model.shared(), model.task(), clipped=list(
        model.parameters())), regularizer=reg)
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert norm == pytest.approx(1e-3, rel=1e-4)
    # without clipping: the plain gradient of the sum plus the regulariser's
    ref = Tiny()
    sum(ref.losses(0, NAMES).values()).add(sum(p.pow(2).sum() for p in ref.parameters())).backward()
    mt2 = MultiTaskStep(NAMES)
    model2 = Tiny()
    reg2 = sum(p.pow(2).sum() for p in model2.parameters())
    mt2.run(0, model2.losses(0, NAMES), torch.optim.SGD(model2.parameters(), lr=0.0),
            StepParameters(model2.shared(), model2.task()), regularizer=reg2)
    for p, q in zip(ref.parameters(), model2.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_errors_say_what_was_expected() -> None:
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    params = StepParameters(model.shared(), model.task())
    with pytest.raises(ValueError, match=r"weighting was built for tasks \['a', 'b'\]"):
        MultiTaskStep(NAMES, weighting=Static(["a", "b"]))
    with pytest.raises(ValueError, match="scheduler was built"):
        MultiTaskStep(NAMES, scheduler=SCHEDULERS["all"](["a"]))
    with pytest.raises(TypeError, match="string"):
        MultiTaskStep("abc")
    rr = MultiTaskStep(NAMES, scheduler=SCHEDULERS["round_robin"](NAMES))
    with pytest.raises(ValueError, match=r"step 1 counts tasks \['b'\], but losses has none for \['b'\]"):
        rr.run(1, model.losses(1, ["a"]), opt, params)
    famo = MultiTaskStep(NAMES, weighting=WEIGHTINGS["famo"](NAMES))
    with pytest.raises(ValueError, match="losses_after_step"):
        famo.run(0, model.losses(0, NAMES), opt, params)
    assert MultiTaskStep(NAMES).end_epoch() == {}  # no losses recorded: nothing to hand on


def test_strategies_flags_for_the_trainer() -> None:
    assert MultiTaskStep(NAMES, gradient=GRADIENT_METHODS["pcgrad"]()).wants_split
    assert not MultiTaskStep(NAMES).wants_split
    assert MultiTaskStep(NAMES, weighting=WEIGHTINGS["gradnorm"](NAMES)).wants_split
    assert MultiTaskStep(NAMES, gradient=GRADIENT_METHODS["mgda_ub"]()).requires_representation
    unc = WEIGHTINGS["uncertainty"](NAMES)
    assert MultiTaskStep(NAMES, weighting=unc).trainable_parameters() == list(unc.log_vars)


def test_loss_values_are_floats_of_the_counted_losses() -> None:
    model = Tiny()
    mt = MultiTaskStep(NAMES, weighting=Static(NAMES, weights={"b": 2.0}))
    out = mt.run(0, model.losses(0, NAMES), torch.optim.SGD(model.parameters(), lr=0.0),
                 StepParameters(model.shared(), model.task()))
    assert set(out.loss_values) == set(NAMES) and all(isinstance(v, float) for v in out.loss_values.values())
    expected = out.loss_values["a"] + 2.0 * out.loss_values["b"] + out.loss_values["c"]
    assert out.objective == pytest.approx(expected, rel=1e-6) and math.isfinite(out.objective)
