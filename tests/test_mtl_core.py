"""mtl core: TaskSpec, metrics against naive references, loss dict assembly, parameter groups, atomic IO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mtl import TaskSpec, auc, build_param_groups, compute_losses, log_loss, mae, mse, total_loss
from mtl.checkpoint import atomic_torch_save, atomic_write_json, atomic_write_jsonl, load_checkpoint


def naive_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_count_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 60, (1,), generator=g))
        scores = torch.randint(0, 6, (n,), generator=g).float()  # many ties
        labels = torch.randint(0, 2, (n,), generator=g)
        if labels.min() == labels.max():
            continue
        assert auc(scores, labels.float()) == pytest.approx(naive_auc(scores.tolist(), labels.tolist()))


def test_auc_known_values() -> None:
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.75)
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert math.isnan(auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])))


def test_logloss_mse_mae_by_hand() -> None:
    logits = torch.tensor([0.0, 2.0])
    labels = torch.tensor([1.0, 0.0])
    expected = (-math.log(0.5) - math.log(1 - 1 / (1 + math.exp(-2.0)))) / 2
    assert log_loss(logits, labels) == pytest.approx(expected)
    assert mse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])) == pytest.approx(5.0)
    assert mae(torch.tensor([1.0, -3.0]), torch.tensor([0.0, 0.0])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="shape"):
        mse(torch.zeros(3), torch.zeros(2))


def test_taskspec_defaults_and_validation() -> None:
    b = TaskSpec("ctr")
    assert (b.kind, b.loss, b.metrics) == ("binary", "bce", ("auc", "logloss"))
    r = TaskSpec("dwell", "regression")
    assert (r.loss, r.metrics) == ("mse", ("mse", "mae"))
    with pytest.raises(ValueError, match="'ctr'.*loss 'mse'"):
        TaskSpec("ctr", "binary", loss="mse")
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("x", "multilabel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown metrics"):
        TaskSpec("x", metrics=("f1",))
    with pytest.raises(ValueError, match="unknown override"):
        b.with_overrides(wieght=2.0)
    assert b.with_overrides(weight=2.0, lr=0.1).weight == 2.0


def test_compute_losses_and_total() -> None:
    tasks = [TaskSpec("ctr", weight=2.0), TaskSpec("dwell", "regression", weight=0.5)]
    outputs = {"ctr": torch.tensor([0.0, 0.0]), "dwell": torch.tensor([1.0, 2.0])}
    labels = {"ctr": torch.tensor([1.0, 0.0]), "dwell": torch.tensor([0.0, 0.0])}
    losses = compute_losses(tasks, outputs, labels)
    assert losses["ctr"].item() == pytest.approx(math.log(2))
    assert losses["dwell"].item() == pytest.approx(2.5)
    assert total_loss(tasks, losses).item() == pytest.approx(2 * math.log(2) + 1.25)
    with pytest.raises(KeyError, match="no label for task 'dwell'"):
        compute_losses(tasks, outputs, {"ctr": labels["ctr"]})
    with pytest.raises(ValueError, match=r"'ctr'.*\(3,\)"):
        compute_losses(tasks, {**outputs, "ctr": torch.zeros(3)}, labels)


def test_compute_losses_of_like_tasks_together_equal_each_alone() -> None:
    """Tasks sharing a loss are computed as one stacked term: the same values and gradients as loss_fn alone."""
    g = torch.Generator().manual_seed(0)
    tasks = [
        TaskSpec("c1"), TaskSpec("c2"), TaskSpec("c3"),
        TaskSpec("r1", "regression"), TaskSpec("r2", "regression"),
        TaskSpec("h1", "regression", loss="huber"), TaskSpec("m1", "regression", loss="mae"),
        TaskSpec("m2", "regression", loss="mae"),
    ]  # fmt: skip
    outputs = {t.name: torch.randn(7, generator=g, requires_grad=True) for t in tasks}
    labels = {t.name: torch.randn(7, generator=g) for t in tasks}
    for t in tasks[:3]:
        labels[t.name] = (labels[t.name] > 0).float()
    labels["c3"] = labels["c3"].double()  # another label dtype: a group of its own
    losses = compute_losses(list(reversed(tasks)), outputs, labels)
    assert list(losses) == [t.name for t in reversed(tasks)]
    for t in tasks:
        ref = t.loss_fn(outputs[t.name], labels[t.name])
        torch.testing.assert_close(losses[t.name], ref)
        (grad,) = torch.autograd.grad(losses[t.name], outputs[t.name], retain_graph=True)
        torch.testing.assert_close(grad, torch.autograd.grad(ref, outputs[t.name])[0])


def test_param_groups_lrs_and_partition() -> None:
    shared, a, b = nn.Linear(2, 2), nn.Linear(2, 1), nn.Linear(2, 1)
    tasks = [TaskSpec("a", lr=0.1, weight_decay=0.5), TaskSpec("b")]
    groups = build_param_groups(
        {"shared": shared.parameters(), "a": a.parameters(), "b": b.parameters()},
        tasks, lr=1e-3, weight_decay=0.0, shared_lr=1e-2,
    )
    by = {g["name"]: g for g in groups}
    assert (by["shared"]["lr"], by["a"]["lr"], by["b"]["lr"]) == (1e-2, 0.1, 1e-3)
    assert (by["a"]["weight_decay"], by["b"]["weight_decay"]) == (0.5, 0.0)
    opt = torch.optim.SGD(groups)
    assert len(opt.param_groups) == 3
    with pytest.raises(ValueError, match="more than one group"):
        build_param_groups({"shared": list(shared.parameters()), "a": list(shared.parameters())}, tasks, lr=1)
    with pytest.raises(ValueError, match="name no task"):
        build_param_groups({"c": a.parameters()}, tasks, lr=1)


def test_atomic_writes_round_trip(tmp_path: Path) -> None:
    obj = {"w": torch.arange(4.0), "step": 3}
    atomic_torch_save(obj, tmp_path / "sub" / "ck.pt")
    back = load_checkpoint(tmp_path / "sub" / "ck.pt")
    assert back["step"] == 3 and torch.equal(back["w"], obj["w"])
    atomic_write_json({"a": 1}, tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text().strip().startswith("{")

    class Boom:
        def __reduce__(self):  # noqa: D105
            raise RuntimeError("boom")

    atomic_torch_save({"v": 1}, tmp_path / "keep.pt")
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"v": Boom()}, tmp_path / "keep.pt")
    assert load_checkpoint(tmp_path / "keep.pt")["v"] == 1  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_jsonl_is_one_compact_object_per_line_and_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    rows = [{"step": 1, "p": [0.25, 0.75]}, {"step": 2, "name": "a b"}]
    atomic_write_jsonl(rows, tmp_path / "log.jsonl")
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1, "p": [0.25, 0.75]}\n{"step": 2, "name": "a b"}\n'
    with pytest.raises(TypeError):
        atomic_write_jsonl([{"step": 3}, {"bad": object()}], tmp_path / "log.jsonl")
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]
