"""Knowledge distillation: losses against hand-computed values (soft BCE with temperature, regression MSE, alpha
mixing, teacher annealing, feature adapters, Gaussian KL), frozen teachers, the teachers command and its
manifest, distilled training through mtrec-train with exact resume, and policy distillation of SAC actors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from mtrl_helpers import TEACHER_RUN
from omegaconf import DictConfig

from mtl.checkpoint import load_checkpoint
from mtl.config import CONFIG_PATH
from mtl.distill import (
    Distiller,
    FeatureAdapters,
    annealing_lambda,
    binary_distillation,
    feature_distillation,
    gaussian_kl,
    mix_losses,
    policy_distillation_loss,
    regression_distillation,
)
from mtl.tasks import TaskSpec
from mtrec.data import load_sparse_synthetic
from mtrec.distill import (
    MANIFEST,
    StudentDistillation,
    TeacherSet,
    build_distillation,
    distill_config,
    load_teachers,
    probe_feature_dims,
    read_manifest,
)
from mtrec.models import InputArch, MMoE, SingleTask
from mtrec.train import REPO, run, teachers_score, train_teachers
from mtrec.trainer import Trainer, TrainerConfig

torch.set_num_threads(1)

TINY = [
    "data.n_rows=3000",
    "data.num_users=200",
    "data.num_items=500",
    "data.num_categories=20",
    "trainer.batch_size=256",
    "trainer.progress=false",
    "trainer.tensorboard=false",
]
CONFIG_DIR = REPO / "configs"
DISTILL_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "distill").glob("*.yaml"))


def _distill_in_defaults() -> bool:
    defaults = yaml.safe_load((CONFIG_DIR / "mtrec.yaml").read_text()).get("defaults", [])
    return any(isinstance(d, dict) and "distill" in d for d in defaults)


# `distill=X` once configs/mtrec.yaml lists the group in its defaults, `+distill=X` until then.
DISTILL = "distill=" if _distill_in_defaults() else "+distill="


def cfg(*overrides: str, name: str = "mtrec") -> DictConfig:
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(p: float, q: float) -> float:
    """Cross-entropy of Bernoulli(q) against Bernoulli(p)."""
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


# ------------------------------------------------------------------------------------------- losses


def test_binary_soft_bce_with_temperature_matches_hand_computation() -> None:
    s, z, T = [1.0, -1.0], [2.0, 0.5], 2.0
    expected = T**2 * sum(bce(sigmoid(si / T), sigmoid(zi / T)) for si, zi in zip(s, z)) / 2
    got = binary_distillation(torch.tensor(s), torch.tensor(z), T)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # T = 1: plain BCE against the teacher's probability
    got1 = binary_distillation(torch.tensor(s), torch.tensor(z), 1.0)
    assert float(got1) == pytest.approx(sum(bce(sigmoid(a), sigmoid(b)) for a, b in zip(s, z)) / 2, rel=1e-6)
    # the gradient is T * (sigmoid(s / T) - sigmoid(z / T)) / B: the T^2 scaling keeps it O(1)
    st = torch.tensor(s, requires_grad=True)
    binary_distillation(st, torch.tensor(z), T).backward()
    for g, si, zi in zip(st.grad.tolist(), s, z):
        assert g == pytest.approx(T * (sigmoid(si / T) - sigmoid(zi / T)) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        binary_distillation(torch.tensor(s), torch.tensor(z), 0.0)
    with pytest.raises(ValueError, match="shape"):
        binary_distillation(torch.tensor(s), torch.tensor([1.0]), 1.0)


def test_regression_distillation_is_mse_to_the_teacher() -> None:
    got = regression_distillation(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0]))
    assert float(got) == pytest.approx((0.5**2 + 1.0**2) / 2)


def test_alpha_mixes_task_loss_and_distillation_term() -> None:
    tasks = [TaskSpec("ctr", "binary"), TaskSpec("dwell", "regression")]
    s = {"ctr": torch.tensor([1.0, -2.0]), "dwell": torch.tensor([1.0, 2.0])}
    y = {"ctr": torch.tensor([1.0, 0.0]), "dwell": torch.tensor([0.0, 4.0])}
    z = {"ctr": torch.tensor([2.0, -1.0]), "dwell": torch.tensor([0.5, 3.0])}
    alpha, T = 0.25, 3.0
    got = Distiller(tasks, alpha=alpha, temperature=T).losses(s, y, z, step=0)
    ctr_task = (bce(sigmoid(1.0), 1.0) + bce(sigmoid(-2.0), 0.0)) / 2
    ctr_kd = T**2 * (bce(sigmoid(1 / T), sigmoid(2 / T)) + bce(sigmoid(-2 / T), sigmoid(-1 / T))) / 2
    assert float(got["ctr"]) == pytest.approx((1 - alpha) * ctr_task + alpha * ctr_kd, rel=1e-6)
    dwell_task = (1.0 + 4.0) / 2  # (1 - 0)^2, (2 - 4)^2
    dwell_kd = (0.25 + 1.0) / 2  # (1 - 0.5)^2, (2 - 3)^2
    assert float(got["dwell"]) == pytest.approx((1 - alpha) * dwell_task + alpha * dwell_kd, rel=1e-6)
    # alpha = 0 is the plain task loss; alpha = 1 the distillation term alone
    plain = Distiller(tasks, alpha=0.0).losses(s, y, z, step=0)
    assert float(plain["dwell"]) == pytest.approx(dwell_task)
    only = Distiller(tasks, alpha=1.0, temperature=T).losses(s, y, z, step=0)
    assert float(only["ctr"]) == pytest.approx(ctr_kd, rel=1e-6)
    assert float(mix_losses(torch.tensor(2.0), torch.tensor(6.0), 0.75)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="alpha"):
        Distiller(tasks, alpha=1.5)


def test_teacher_annealing_moves_the_target_from_teacher_to_gold() -> None:
    assert [annealing_lambda(s, 10) for s in (0, 5, 10, 15)] == [0.0, 0.5, 1.0, 1.0]
    tasks = [TaskSpec("ctr", "binary"), TaskSpec("dwell", "regression")]
    d = Distiller(tasks, alpha=1.0, temperature=1.0, anneal=True, total_steps=10)
    s = {"ctr": torch.tensor([0.5]), "dwell": torch.tensor([1.0])}
    y = {"ctr": torch.tensor([1.0]), "dwell": torch.tensor([3.0])}
    z = {"ctr": torch.tensor([-1.0]), "dwell": torch.tensor([2.0])}
    p_student, p_teacher = sigmoid(0.5), sigmoid(-1.0)
    start, middle, end = (d.losses(s, y, z, step=k) for k in (0, 5, 10))
    # step 0: pure teacher target
    assert float(start["ctr"]) == pytest.approx(bce(p_student, p_teacher), rel=1e-6)
    assert float(start["dwell"]) == pytest.approx((1.0 - 2.0) ** 2)
    # half-way: the mean of gold and teacher (BAM, Clark et al. 2019)
    assert float(middle["ctr"]) == pytest.approx(bce(p_student, 0.5 * 1.0 + 0.5 * p_teacher), rel=1e-6)
    assert float(middle["dwell"]) == pytest.approx((1.0 - 2.5) ** 2)
    # end: the gold label, i.e. the task's own loss
    assert float(end["ctr"]) == pytest.approx(bce(p_student, 1.0), rel=1e-6)
    assert float(end["dwell"]) == pytest.approx((1.0 - 3.0) ** 2)
    assert d.lam(3) == pytest.approx(0.3) and Distiller(tasks, alpha=1.0).lam(3) == 0.0
    with pytest.raises(ValueError, match="training steps"):
        Distiller(tasks, anneal=True)


def test_feature_adapter_loss_is_normalised_squared_error() -> None:
    u = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    # [0.6, 0.8] - [1, 0] -> 0.16 + 0.64 = 0.8; [0, 1] - [0, 1] -> 0
    assert float(feature_distillation(u, v)) == pytest.approx(0.4)
    adapters = FeatureAdapters({"ctr": (2, 2)})
    with torch.no_grad():
        adapters.adapters["ctr"].weight.copy_(torch.eye(2))
        adapters.adapters["ctr"].bias.zero_()
    d = Distiller([TaskSpec("ctr", "binary")], alpha=0.0, feature_weight=2.0, feature_dims={"ctr": (2, 2)})
    d.adapters = adapters
    s, y = {"ctr": torch.tensor([0.0, 0.0])}, {"ctr": torch.tensor([1.0, 0.0])}
    got = d.losses(s, y, {"ctr": torch.zeros(2)}, step=0, representation=u, teacher_representations={"ctr": v})
    assert float(got["ctr"].detach()) == pytest.approx(math.log(2) + 2.0 * 0.4, rel=1e-6)
    # the adapter flattens [B, E, H] representations per example
    assert tuple(FeatureAdapters({"t": (6, 4)})("t", torch.zeros(5, 2, 3)).shape) == (5, 4)
    with pytest.raises(ValueError, match="adapter sizes"):
        Distiller([TaskSpec("ctr", "binary")], feature_weight=1.0)


# ------------------------------------------------------------------------------------- frozen teachers


def _tiny_bundle():
    return load_sparse_synthetic(n_rows=600, num_users=50, num_items=80, num_categories=6, seed=0)


def test_gradient_reaches_only_the_student_and_the_adapters(tmp_path: Path) -> None:
    bundle = _tiny_bundle()
    tasks = bundle.tasks
    names = [t.name for t in tasks]
    torch.manual_seed(0)
    teachers = {t: SingleTask(InputArch(bundle.features), [t], bottom_dims=[12]) for t in names}
    before = {t: {k: v.clone() for k, v in m.state_dict().items()} for t, m in teachers.items()}
    student = MMoE(InputArch(bundle.features), names, num_experts=2, expert_dims=[8], dropout=0.0)
    teacher_set = TeacherSet(teachers)
    dims = probe_feature_dims(student, teacher_set, bundle, names)
    assert dims == {t: (2 * 8, 12) for t in names}
    hook = StudentDistillation(
        teacher_set, Distiller(tasks, alpha=0.5, temperature=2.0, feature_weight=1.0, feature_dims=dims)
    )
    assert hook.needs_representation and len(hook.trainable_parameters()) == 2 * len(names)
    adapters_before = [p.detach().clone() for p in hook.trainable_parameters()]
    student_before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.Adam([*student.parameters(), *hook.trainable_parameters()], lr=0.01)
    trainer = Trainer(student, opt, tasks, TrainerConfig(progress=False, tensorboard=False), tmp_path, loss_hook=hook)
    batch = bundle.train.batch(torch.arange(64))
    trainer.train_step(batch)
    for t, m in teachers.items():
        assert not m.training
        for name, p in m.named_parameters():
            assert not p.requires_grad and p.grad is None, (t, name)
            torch.testing.assert_close(p, before[t][name], rtol=0, atol=0)
    assert all(not torch.equal(a, b) for a, b in zip(adapters_before, hook.trainable_parameters()))
    assert sum(not torch.equal(a, b.detach()) for a, b in zip(student_before, student.parameters())) > 0
    # the teachers' state is no part of the hook's (or the checkpoint's) state
    assert set(hook.state_dict()) == {f"distiller.adapters.adapters.{t}.{w}" for t in names for w in ("weight", "bias")}

    # the student's gradient depends on the teachers: other teachers, another gradient
    def grads(teacher_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(teacher_seed)
        other = TeacherSet({t: SingleTask(InputArch(bundle.features), [t], bottom_dims=[12]) for t in names})
        h = StudentDistillation(other, Distiller(tasks, alpha=1.0, temperature=1.0))
        student.zero_grad()
        out = student(batch.dense, batch.sparse)
        sum(h.losses(tasks, out, batch, None, 0).values()).backward()
        return [p.grad.clone() for p in student.parameters() if p.grad is not None]

    g1, g2 = grads(1), grads(2)
    assert any(not torch.allclose(a, b) for a, b in zip(g1, g2))


# --------------------------------------------------------------------------------- teachers and student


@pytest.fixture(scope="module")
def teachers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teachers")
    train_teachers(cfg(*TEACHERS, name="teachers"), out)
    return out


TEACHERS = ["trainer.max_steps=6", "trainer.monitor=auc", "model.bottom_dims=[16]", *TINY]


def test_teachers_command_writes_a_manifest(teachers_dir: Path) -> None:
    manifest = read_manifest(teachers_dir / MANIFEST)
    assert read_manifest(teachers_dir) == manifest  # the folder works too
    assert list(manifest["teachers"]) == ["click", "conversion", "dwell"]
    assert manifest["data"]["n_rows"] == 3000 and manifest["seed"] == 0
    for task, entry in manifest["teachers"].items():
        run_dir = teachers_dir / entry["run_dir"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert list(metrics["val"]) == [task]  # a single-task run
        assert entry["val"] == metrics["val"][task] and entry["test"] == metrics["test"][task]
        assert (teachers_dir / entry["checkpoint"]).is_file() and (teachers_dir / entry["config"]).is_file()
        assert entry["model"] == "mtrec.models.SingleTask"
        # the monitored validation score of the teacher's best checkpoint (what mtrec-teachers returns, averaged)
        info = json.loads((run_dir / "run_info.json").read_text())
        assert (entry["monitor"], entry["score"]) == (info["monitor"], info["best_score"])
    assert [e["monitor"] for e in manifest["teachers"].values()] == ["auc", "auc", "loss"]
    assert teachers_score(manifest) == pytest.approx(sum(e["score"] for e in manifest["teachers"].values()) / 3)
    assert manifest["teachers"]["dwell"]["kind"] == "regression"
    # trainer.monitor=auc: the regression teacher early-stopped on its validation loss instead
    dwell_cfg = yaml.safe_load((teachers_dir / "dwell" / "config.yaml").read_text())
    assert dwell_cfg["trainer"]["monitor"] == "loss" and dwell_cfg["task_names"] == ["dwell"]
    # a second call reuses finished teachers; other settings in the same folder are an error
    stamp = (teachers_dir / "click" / "best.pt").stat().st_mtime_ns
    assert train_teachers(cfg(*TEACHERS, name="teachers"), teachers_dir) == manifest
    assert (teachers_dir / "click" / "best.pt").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        train_teachers(cfg(*TEACHERS, "optimizer.lr=0.5", name="teachers"), teachers_dir)


def test_student_run_reads_the_manifest(teachers_dir: Path, tmp_path: Path) -> None:
    common = ["trainer.max_steps=4", "trainer.log_every_steps=1", *TINY]
    teachers = f"distill.teachers={teachers_dir / MANIFEST}"
    metrics = run(cfg(f"{DISTILL}soft", teachers, *common), tmp_path / "soft")
    assert set(metrics["test"]) == {"click", "conversion", "dwell"}
    plain = run(cfg(*common), tmp_path / "plain")
    off = run(cfg(f"{DISTILL}none", *common), tmp_path / "none")
    assert off == plain  # distill=none is exactly plain training
    assert metrics != plain

    def first_loss(d: Path) -> float:
        return json.loads((d / "train_log.jsonl").read_text().splitlines()[0])["train/click/loss"]

    assert first_loss(tmp_path / "soft") != first_loss(tmp_path / "plain")
    # the loaded teachers hold the teacher runs' best weights
    bundle = load_sparse_synthetic(n_rows=3000, num_users=200, num_items=500, num_categories=20, seed=0)
    loaded = load_teachers(teachers_dir, bundle.tasks, features=bundle.features)
    best = load_checkpoint(teachers_dir / "click" / "best.pt")["model"]
    for k, v in loaded["click"].state_dict().items():
        torch.testing.assert_close(v, best[k], rtol=0, atol=0)


@pytest.mark.parametrize("method", DISTILL_CONFIGS)
def test_every_distill_config_trains(method: str, teachers_dir: Path, tmp_path: Path) -> None:
    c = cfg(f"{DISTILL}{method}", f"distill.teachers={teachers_dir}", "trainer.max_steps=3", *TINY)
    assert (distill_config(c.distill).alpha > 0 or distill_config(c.distill).feature_weight > 0) == (method != "none")
    metrics = run(c, tmp_path)
    assert set(metrics["test"]) == {"click", "conversion", "dwell"}
    state = load_checkpoint(tmp_path / "last.pt")["loss_hook"]
    assert (state is None) == (method == "none")


@pytest.mark.parametrize(
    "strategies",
    [
        [f"{DISTILL}annealed", "weighting=uncertainty", "gradient=pcgrad"],  # cut graph + distillation
        [f"{DISTILL}feature", "weighting=equal", "gradient=mgda_ub", "distill.total_steps=14"],  # representation
        [f"{DISTILL}feature", "weighting=famo", "gradient=none", "distill.anneal=true", "distill.total_steps=14"],
    ],
)
def test_resume_of_a_distilled_run_equals_an_uninterrupted_one(
    strategies: list[str], teachers_dir: Path, tmp_path: Path
) -> None:
    common = [
        "model=mmoe",
        "model.dropout=0.1",
        f"distill.teachers={teachers_dir}",
        "distill.total_steps=14",
        *strategies,
        *TINY,
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(cfg("trainer.max_steps=14", *common), straight)
    run(cfg("trainer.max_steps=7", *common), split)
    run(cfg("trainer.max_steps=14", "trainer.resume=true", *common), split)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["step"] == b["step"] == 14
    for part in ("model", "loss_hook"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part}.{k}")
    assert bool(a["loss_hook"]) == ("feature" in strategies[0])  # adapters are checkpointed


def test_distillation_with_tasks_from_separate_datasets(teachers_dir: Path, tmp_path: Path) -> None:
    # Per-task batches: each task's teacher runs on that task's own batch.
    common = [
        "task_split={click:0.5,conversion:0.3,dwell:0.2}",
        "weighting=famo",
        f"distill.teachers={teachers_dir}",
        *TINY,
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(cfg(f"{DISTILL}feature", "trainer.max_steps=8", *common), straight)
    run(cfg(f"{DISTILL}feature", "trainer.max_steps=4", *common), split)
    run(cfg(f"{DISTILL}feature", "trainer.max_steps=8", "trainer.resume=true", *common), split)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    for part in ("model", "loss_hook"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part}.{k}")


def test_distillation_config_errors(teachers_dir: Path, tmp_path: Path) -> None:
    base = ["trainer.max_steps=2", *TINY]
    with pytest.raises(ValueError, match="distill.teachers"):
        run(cfg(f"{DISTILL}soft", *base), tmp_path / "a")
    with pytest.raises(ValueError, match="other data"):  # another seed: another split
        run(cfg(f"{DISTILL}soft", f"distill.teachers={teachers_dir}", "seed=1", *base), tmp_path / "b")
    with pytest.raises(Exception, match="alpah"):
        run(cfg(f"{DISTILL}soft", f"distill.teachers={teachers_dir}", "+distill.alpah=0.3", *base), tmp_path / "c")
    with pytest.raises(ValueError, match="alpha"):
        run(cfg(f"{DISTILL}soft", f"distill.teachers={teachers_dir}", "distill.alpha=1.5", *base), tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="mtrec-teachers"):
        run(cfg(f"{DISTILL}soft", f"distill.teachers={tmp_path}", *base), tmp_path / "e")
    partial = tmp_path / "partial"
    partial.mkdir()
    manifest = json.loads((teachers_dir / MANIFEST).read_text())
    del manifest["teachers"]["dwell"]
    for entry in manifest["teachers"].values():
        for key in ("run_dir", "checkpoint", "config"):
            entry[key] = str(teachers_dir / entry[key])
    (partial / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"no teacher for tasks \['dwell'\]"):
        run(cfg(f"{DISTILL}soft", f"distill.teachers={partial}", *base), tmp_path / "f")
    # ... which is fine for a student of the other two tasks (absolute paths in the manifest work)
    metrics = run(
        cfg(f"{DISTILL}soft", f"distill.teachers={partial}", "task_names=[click,conversion]", *base), tmp_path / "g"
    )
    assert set(metrics["test"]) == {"click", "conversion"}
    bundle = load_sparse_synthetic(n_rows=3000, num_users=200, num_items=500, num_categories=20, seed=0)
    model = SingleTask(InputArch(bundle.features), ["click"])
    with pytest.raises(ValueError, match="shared representation"):
        build_distillation(
            cfg(f"{DISTILL}feature", f"distill.teachers={teachers_dir}").distill,
            tasks=bundle.tasks[:1],
            bundle=bundle,
            model=model,
            data_cfg=None,
            total_steps=10,
        )


def test_teachers_cli_writes_the_manifest_into_the_hydra_run_dir(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "mtrec-teachers"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mtrec.cli.teachers"]
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [*cmd, f"hydra.run.dir={out}", "task_names=[conversion]", "trainer.max_steps=2", *TINY],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(out)
    assert list(manifest["teachers"]) == ["conversion"]
    assert (out / "conversion" / "best.pt").is_file()


def test_teachers_and_student_user_errors_exit_2_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_train import run_main

    from mtrec.cli.teachers import main as teachers_main
    from mtrec.cli.train import main as train_main

    out = f"hydra.run.dir={tmp_path / 'run'}"
    code, err = run_main(teachers_main, [out, "task_names=[nope]", *TINY], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("mtrec-teachers: error: config key task_names: ['nope'] not in this dataset's tasks"), err
    code, err = run_main(teachers_main, [out, "+model.bottom_dim=[4]", *TINY], monkeypatch, capsys)
    assert code == 2 and err.startswith("mtrec-teachers: error: config key model.bottom_dim is not a parameter"), err
    student = [out, f"{DISTILL}soft", f"distill.teachers={tmp_path}", *TINY]
    code, err = run_main(train_main, student, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"mtrec-train: error: {tmp_path / MANIFEST}: no teachers manifest; train teachers first"), err


# ------------------------------------------------------------------------------------- policy distillation


def test_gaussian_kl_matches_hand_computation() -> None:
    # KL(N(0, 1) || N(1, 2^2)) = log 2 + (1 + 1) / 8 - 1/2; KL(N(1, 0.5^2) || N(1, 0.5^2)) = 0
    expected = math.log(2.0) + 2.0 / 8.0 - 0.5
    got = gaussian_kl(
        torch.tensor([[0.0, 1.0]]),
        torch.tensor([[0.0, math.log(0.5)]]),
        torch.tensor([[1.0, 1.0]]),
        torch.tensor([[math.log(2.0), math.log(0.5)]]),
    )
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(expected, rel=1e-6)
    # the teacher's side is detached: gradients reach the student only
    t_mean = torch.zeros(1, 2, requires_grad=True)
    s_mean = torch.ones(1, 2, requires_grad=True)
    policy_distillation_loss(t_mean, torch.zeros(1, 2), s_mean, torch.zeros(1, 2)).sum().backward()
    assert t_mean.grad is None
    torch.testing.assert_close(s_mean.grad, torch.ones(1, 2))  # d/dm (m - 0)^2 / 2 = m


def test_kl_of_pre_tanh_gaussians_equals_kl_of_squashed_actions() -> None:
    from mtrl.agents import squashed_gaussian

    g = torch.Generator().manual_seed(0)
    p_mean, p_log_std = torch.tensor([0.3, -1.0]), torch.tensor([-0.5, 0.2])
    q_mean, q_log_std = torch.tensor([0.8, -0.2]), torch.tensor([0.1, -0.3])
    eps = torch.randn(200_000, 2, generator=g)
    # Monte-Carlo KL through the squashed densities: E_{a ~ p}[log p(a) - log q(a)], a = tanh(u)
    action, log_p = squashed_gaussian(p_mean.expand_as(eps), p_log_std.expand_as(eps), eps)
    u = torch.atanh(action.clamp(-1 + 1e-7, 1 - 1e-7))
    eps_q = (u - q_mean) / q_log_std.exp()
    _, log_q = squashed_gaussian(q_mean.expand_as(eps), q_log_std.expand_as(eps), eps_q)
    mc = float((log_p - log_q).mean())
    exact = float(gaussian_kl(p_mean, p_log_std, q_mean, q_log_std))
    assert exact > 0.5
    assert mc == pytest.approx(exact, abs=0.02)


def _pointmass(num_goals: int = 3):
    from mtrl.envs import make_family

    return make_family("pointmass", num_goals=num_goals, max_episode_steps=20, metadata_source="random")


def test_single_task_family_is_task_zero_of_its_own() -> None:
    from mtrl.agents import EnvSpec
    from mtrl.distill import SingleTaskFamily

    family = _pointmass()
    one = SingleTaskFamily(family, "goal-120deg")
    assert one.task_names == ("goal-120deg",) and one.index == 1
    spec = EnvSpec.from_family(one)
    assert spec.num_tasks == 1 and spec.metadata.shape == (1, family.metadata.shape[1])
    env, ref = one.make_env(0), family.make_env(1)
    obs, info = env.reset(seed=3)
    ref_obs, _ = ref.reset(seed=3)
    assert obs["task"] == 0 and info["task"] == 0 and np.array_equal(obs["obs"], ref_obs["obs"])
    obs, _, _, _, info = env.step(np.array([1.0, 0.0], dtype=np.float32))
    ref_obs, *_ = ref.step(np.array([1.0, 0.0], dtype=np.float32))
    assert np.array_equal(obs["obs"], ref_obs["obs"]) and info["task"] == 0
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        one.make_env(1)


def test_tiny_policy_distillation_lowers_the_kl() -> None:
    from mtrl.agents import EnvSpec, SquashedGaussianActor, mt_sac
    from mtrl.distill import FrozenTeacher, PolicyDistillConfig, PolicyDistiller
    from mtrl.encoders import IdentityEncoder

    family = _pointmass()
    teachers = []
    for k in range(family.num_tasks):  # three different single-task policies
        torch.manual_seed(100 + k)
        teachers.append(FrozenTeacher(SquashedGaussianActor(IdentityEncoder(2, 1), [16], 2)))
    frozen = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    torch.manual_seed(0)
    student = mt_sac(EnvSpec.from_family(family), hidden=[32, 32]).actor
    config = PolicyDistillConfig(batch_size=32, rollout_steps=20, collect_every=25, lr=3e-3, student_fraction=0.5)
    distiller = PolicyDistiller(family, student, teachers, config, seed=0)
    acted = distiller.collect()
    assert set(acted) == set(family.task_names) and set(acted.values()) <= {"teacher", "student"}
    held_out = distiller.sample()  # fixed states to measure on
    before = distiller.evaluate_kl(*held_out)
    history = distiller.fit(200, log_every=100)
    after = distiller.evaluate_kl(*held_out)
    assert [h["update"] for h in history] == [100, 200]
    for name in family.task_names:
        assert after[name] < 0.2 * before[name], (name, before, after)
    for t, state in zip(teachers, frozen):  # teachers frozen
        for k, v in t.state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)
        assert all(p.grad is None for p in t.parameters())
    # states from the teachers' and the student's rollouts both reached the buffers
    assert (distiller.size > 0).all()
    distiller.close()


def test_rl_teachers_are_trained_per_task_and_distilled(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from mtrl.agents import EnvSpec, mt_sac
    from mtrl.distill import PolicyDistillConfig, PolicyDistiller, load_teachers, teachers_in_family_order
    from mtrl.distill import train_teachers as train_rl_teachers

    overrides = ["agent=mt_sac", *TEACHER_RUN]
    c = cfg(*overrides, name="mtrl")
    manifest = train_rl_teachers(c, tmp_path)
    family = instantiate(c.env)
    assert list(manifest["teachers"]) == list(family.task_names)
    run_cfg = yaml.safe_load((tmp_path / family.task_names[1] / "config.yaml").read_text())
    assert run_cfg["env"]["task"] == family.task_names[1]
    assert json.loads((tmp_path / family.task_names[1] / "eval.json").read_text())["tasks"].keys() == {
        family.task_names[1]
    }
    teachers = load_teachers(tmp_path)
    student = mt_sac(EnvSpec.from_family(family), hidden=[16, 16]).actor
    d = PolicyDistiller(
        family,
        student,
        teachers_in_family_order(teachers, family),
        PolicyDistillConfig(batch_size=16, rollout_steps=10, collect_every=20, lr=3e-3),
    )
    d.collect()
    held_out = d.sample()
    before = d.evaluate_kl(*held_out)
    d.fit(60)
    after = d.evaluate_kl(*held_out)
    assert sum(after.values()) < sum(before.values())
    d.close()
