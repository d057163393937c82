"""``mtrl-distill``: teachers manifest validation, the student's run directory (config, checkpoint, log, evaluation of
student against teachers), exact resume, and user errors as one line with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from mtrl_helpers import ENV, STUDENT_BASE, TEACHER_RUN
from omegaconf import DictConfig
from test_train import run_main

from mtl.checkpoint import load_checkpoint
from mtl.config import CONFIG_PATH
from mtrl.cli.distill import main as distill_main
from mtrl.distill import (
    COMPARISON_FILE,
    FrozenTeacher,
    load_manifest_teachers,
    read_teacher_manifest,
    teacher_policy,
    train_teachers,
)
from mtrl.evaluate import evaluate
from mtrl.runs import load_run

TEACHER = ["agent=mt_sac", *TEACHER_RUN]
STUDENT = [
    *STUDENT_BASE,
    "distill.lr=3e-3",
    "trainer.updates=40",
    "trainer.log_interval=10",
    "trainer.checkpoint_interval=20",
    "trainer.eval_episodes=3",
    "trainer.progress=false",
]


def compose_cfg(name: str, *overrides: str) -> DictConfig:
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two single-task teachers (one tiny mtrl-train run per task) and their teachers.json."""
    out = tmp_path_factory.mktemp("teachers")
    train_teachers(compose_cfg("mtrl", *TEACHER), out)
    return out


@pytest.fixture(scope="module")
def multitask_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny two-task mtrl-train run."""
    from mtrl.train import run

    out = tmp_path_factory.mktemp("mt")
    run(compose_cfg("mtrl", *TEACHER), out)
    return out


def distill(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    return run_main(distill_main, argv, monkeypatch, capsys)


def refused(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """``mtrl-distill argv...`` that must be refused as a user mistake: exit status 2 and one line on stderr, no
    traceback; that stderr."""
    code, err = distill(argv, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_student_run_writes_config_checkpoint_log_and_the_teacher_comparison(
    teachers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "student"
    code, err = distill([f"teachers={teachers}", f"hydra.run.dir={out}", *STUDENT], monkeypatch, capsys)
    assert code == 0, err
    for name in ("config.yaml", "last.pt", "train_log.jsonl", "eval.json", COMPARISON_FILE):
        assert (out / name).is_file(), name
    result = json.loads((out / COMPARISON_FILE).read_text())
    tasks = ["goal-0deg", "goal-180deg"]
    assert list(result["tasks"]) == tasks and result["update"] == 40
    # the teachers' numbers are those of each teacher run's own agent on its task, on the same evaluation episodes
    for name in tasks:
        teacher = load_run(teachers / name).agent
        seed = result["seed"]
        family = load_run(out).family
        own = evaluate(lambda o, k, a=teacher: a.act(torch.as_tensor(o), torch.zeros_like(torch.as_tensor(k)),
                                                     True).numpy(), family, episodes=3, seed=seed)  # fmt: skip
        # (the same actions up to float rounding: the teacher sees a different batch of rows)
        assert result["tasks"][name]["teacher"] == pytest.approx(own["tasks"][name], rel=1e-6)
    # the student's numbers are what mtrl-eval's loader finds in the run directory (an mtrl-train-style run)
    run = load_run(out)
    again = evaluate(run.agent, run.family, episodes=3, seed=result["seed"])
    assert {n: r["student"] for n, r in result["tasks"].items()} == again["tasks"]
    assert json.loads((out / "eval.json").read_text())["tasks"] == again["tasks"] and run.step == 40
    for r in result["tasks"].values():
        assert r["success_gap"] == pytest.approx(r["student"]["success"] - r["teacher"]["success"])
        assert r["return_gap"] == pytest.approx(r["student"]["return"] - r["teacher"]["return"])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["update"] for r in log] == [10, 20, 30, 40]
    assert log[-1]["kl/mean"] < log[0]["kl/mean"]  # the student moves towards the teachers
    assert set(result["kl"]) == set(tasks)


def test_resumed_distillation_equals_an_uninterrupted_one(
    teachers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert distill([f"teachers={teachers}", f"hydra.run.dir={straight}", *STUDENT], monkeypatch, capsys)[0] == 0
    first = [f"teachers={teachers}", f"hydra.run.dir={parts}", *STUDENT, "trainer.updates=30"]
    assert distill(first, monkeypatch, capsys)[0] == 0  # checkpoints at 20 and 30 (the end)
    assert load_checkpoint(parts / "last.pt")["step"] == 30
    resume = [f"teachers={teachers}", f"hydra.run.dir={parts}", *STUDENT, "trainer.resume=true"]
    assert distill(resume, monkeypatch, capsys)[0] == 0
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(parts / "last.pt")
    assert a["step"] == b["step"] == 40
    for key, value in a["agent"]["modules"].items():
        torch.testing.assert_close(b["agent"]["modules"][key], value, rtol=0, atol=0)
    assert np.array_equal(a["distiller"]["size"], b["distiller"]["size"])
    log = [json.loads(line)["update"] for line in (parts / "train_log.jsonl").read_text().splitlines()]
    assert log == [10, 20, 30, 40]
    assert json.loads((parts / COMPARISON_FILE).read_text())["resumed"] is True
    # a resume with another distillation config is refused, naming the section
    other = [*resume, "distill.lr=1e-2", "trainer.updates=50"]
    code, err = distill(other, monkeypatch, capsys)
    assert code == 2 and "different distill config" in err, err


def test_tasks_of_a_multitask_run_are_teachers_queried_at_their_index(multitask_run: Path, tmp_path: Path) -> None:
    from hydra.utils import instantiate

    manifest = tmp_path / "teachers.yaml"
    manifest.write_text(yaml.safe_dump({"teachers": {"goal-0deg": str(multitask_run), "goal-180deg": {
        "run_dir": str(multitask_run), "task": "goal-180deg"}}}))  # fmt: skip
    family = instantiate(compose_cfg("mtrl_distill", "teachers=x", *ENV).env)
    teachers, entries = load_manifest_teachers(manifest, family)
    assert [t.task_index for t in teachers.values()] == [0, 1]
    assert entries["goal-180deg"].run_dir == multitask_run
    run = load_run(multitask_run)
    ours = evaluate(teacher_policy([teachers[n] for n in family.task_names]), family, episodes=3, seed=5)
    theirs = evaluate(run.agent, run.family, episodes=3, seed=5)  # the run's own deterministic policy
    for name in family.task_names:
        assert ours["tasks"][name] == pytest.approx(theirs["tasks"][name], rel=1e-6)


def test_teacher_policy_routes_each_row_to_its_tasks_teacher() -> None:
    class Const(torch.nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def forward(self, obs: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.full((len(obs), 2), self.value), torch.zeros(len(obs), 2)

    act = teacher_policy([FrozenTeacher(Const(0.5)), FrozenTeacher(Const(-1.0))])
    out = act(np.zeros((3, 2), np.float32), np.array([1, 0, 1]))
    expected = np.tanh(np.array([[-1.0, -1.0], [0.5, 0.5], [-1.0, -1.0]]))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_manifest_written_by_train_teachers_reads_as_run_dirs(teachers: Path) -> None:
    file, entries = read_teacher_manifest(teachers)
    assert file == teachers / "teachers.json"
    assert {n: (e.run_dir, e.task_in_run) for n, e in entries.items()} == {
        n: (teachers / n, n) for n in ("goal-0deg", "goal-180deg")
    }


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (None, "no teachers manifest there"),
        ("teachers: [a, b]", "expected a mapping with a non-empty 'teachers' mapping"),
        ("teachers: {goal-0deg: T}\nteacher: 1", "unknown key 'teacher'"),
        ("format: mtlib-teachers/1\nteachers: {goal-0deg: T}", "is not an RL teachers manifest"),
        ("teachers: {goal-0deg: {run: T}}", "teachers.goal-0deg: unknown key 'run'"),
        ("teachers: {goal-0deg: {task: goal-0deg}}", "teachers.goal-0deg.run_dir: missing"),
        ("teachers: {goal-0deg: T}", "no teacher for tasks ['goal-180deg']"),
        ("teachers: {goal-0deg: T, goal-180deg: nowhere}", "teachers.goal-180deg.run_dir: "),
        ("teachers: {goal-0deg: T, goal-180deg: T}", "teachers.goal-180deg: the run"),
        ("teachers: {goal-0deg: T, goal-180deg: {run_dir: T, task: goal-7deg}}", "not 'goal-7deg'"),
        ("teachers: [", "cannot read it as JSON or YAML"),
    ],
)
def test_manifest_mistakes_exit_2_in_one_line_naming_the_task_and_key(
    manifest: str | None,
    expected: str,
    teachers: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "m.yaml"
    if manifest is not None:
        path.write_text(manifest.replace(": T", f": {teachers / 'goal-0deg'}"))
    err = refused([f"teachers={path}", f"hydra.run.dir={tmp_path / 'out'}", *STUDENT], monkeypatch, capsys)
    assert err.startswith("mtrl-distill: error: ") and expected in err, err


def test_a_student_on_another_env_than_the_manifests_is_refused(
    teachers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"teachers={teachers}", f"hydra.run.dir={tmp_path / 'out'}", *STUDENT, "env.max_speed=0.05"]
    code, err = distill(argv, monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        "the teachers were trained on another env than the student's (env.max_speed (0.04 vs the student's 0.05))"
        in err
    )
    # runner settings do not define the tasks
    argv = [f"teachers={teachers}", f"hydra.run.dir={tmp_path / 'ok'}", *STUDENT, "env.envs_per_task=2",
            "trainer.updates=10", "trainer.checkpoint_interval=0"]  # fmt: skip
    assert distill(argv, monkeypatch, capsys)[0] == 0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+model=mmoe", "config key 'model' is not used by mtrl-distill"),
        ("+agent.hiden=[8]", "hiden"),
        ("+distill.rollouts=3", "rollouts"),
        ("+trainer.total_steps=3", "total_steps"),
        ("trainer.updates=0", "trainer.updates must be >= 1"),
        ("distill.student_fraction=2", "student_fraction must be in [0, 1]"),
        ("teachers=null", "config key teachers: missing"),
    ],
)
def test_config_mistakes_exit_2_naming_the_key(
    override: str,
    expected: str,
    teachers: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [f"teachers={teachers}", f"hydra.run.dir={tmp_path / 'out'}", *STUDENT, override]
    err = refused(argv, monkeypatch, capsys)
    assert expected in err, err
    assert not (tmp_path / "out" / "last.pt").exists()
