"""``mtrl-teachers``: one single-task ``mtrl-train`` run per task and the ``teachers.json`` manifest ``mtrl-distill``
reads; each teacher trains on its task alone (its replay holds only that task's rewards, recomputed by hand from the
goal's position); ``tasks=[...]``; re-running reuses finished teachers and continues interrupted ones to the weights
of one uninterrupted run; configuration mistakes as one line with exit status 2 before any teacher trains."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mtrl_helpers import STUDENT_BASE, TEACHER_RUN
from test_train import run_main_output as cli

from mtl.checkpoint import load_checkpoint
from mtrl.cli.distill import main as distill_main
from mtrl.cli.teachers import main as teachers_main
from mtrl.distill import COMPARISON_FILE, MANIFEST
from mtrl.runs import load_run

TASKS = ["goal-0deg", "goal-180deg"]  # the point-mass with two goals: (1, 0) and (-1, 0) on the unit circle
GOALS = {"goal-0deg": (1.0, 0.0), "goal-180deg": (-1.0, 0.0)}
TEACHER = TEACHER_RUN
STUDENT = [
    *STUDENT_BASE,
    "trainer.updates=20",
    "trainer.log_interval=10",
    "trainer.checkpoint_interval=0",
    "trainer.eval_episodes=2",
    "trainer.progress=false",
]


def short_steps(n: int) -> list[str]:
    """:data:`TEACHER` with ``trainer.total_steps=n``."""
    return [a for a in TEACHER if not a.startswith("trainer.total_steps=")] + [f"trainer.total_steps={n}"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's agent (its modules' state dict: actor, critics, targets, temperatures)."""
    modules = load_checkpoint(run_dir / "last.pt")["agent"]["modules"]
    return {k: v for k, v in modules.items() if isinstance(v, torch.Tensor)}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mtrl-teachers`` on the two-goal point-mass (tiny networks, 30 steps a teacher): its run dir."""
    out = tmp_path_factory.mktemp("teachers") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["prog", f"hydra.run.dir={out}", *TEACHER])
        mp.delenv("MTLIB_DEBUG", raising=False)
        try:
            teachers_main()
        except SystemExit as stop:
            assert not stop.code, stop.code
    return out


def test_manifest_lists_one_run_per_task_and_each_run_trained_only_its_task(teachers: Path) -> None:
    out = teachers
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "mtlib-rl-teachers/1" and manifest["seed"] == 0
    assert manifest["env"]["num_goals"] == 2 and list(manifest["teachers"]) == TASKS
    for name in TASKS:
        entry = manifest["teachers"][name]
        run_dir = out / entry["run_dir"]
        assert (out / entry["checkpoint"]).is_file() and (out / entry["config"]).is_file()
        # the run's family is the one task, and the run's config says so
        run = load_run(run_dir)
        assert run.family.task_names == (name,) and run.step == 30 and run.agent.name == entry["agent"] == "mt_sac"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["env"]["task"] == name and config["env"]["family"] == manifest["env"]
        assert "tasks" not in config  # the teachers' own key is not passed on to the runs
        # the manifest's numbers are those of the run's final evaluation, of that task alone
        result = json.loads((run_dir / "eval.json").read_text())
        assert list(result["tasks"]) == [name]
        assert (entry["success"], entry["return"]) == (
            result["tasks"][name]["success"],
            result["tasks"][name]["return"],
        )
        # everything the teacher learnt from: one task's transitions, rewarded for the distance to *its* goal
        replay = load_checkpoint(run_dir / "last.pt")["replay"]
        assert replay["num_tasks"] == 1 and replay["size"] == [30]
        data = replay["data"]
        next_obs, reward = data["next_obs"][0].double().numpy(), data["reward"][0].double().numpy()
        for goal_name, (gx, gy) in GOALS.items():
            dist = np.hypot(next_obs[:, 0] - gx, next_obs[:, 1] - gy)
            expected = -dist + (dist <= 0.1)  # success_bonus 1.0 within success_radius 0.1
            matches = np.allclose(reward, expected, atol=1e-5)
            assert matches == (goal_name == name), (name, goal_name)


def test_progress_is_reported_per_teacher_and_the_table_printed(
    teachers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(teachers, out)
    for name in TASKS:
        (out / name / "eval.json").unlink()  # both "interrupted" after their last checkpoint
    code, stdout, err = cli(teachers_main, [f"hydra.run.dir={out}", *TEACHER], monkeypatch, capsys)
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())
    for i, name in enumerate(TASKS, 1):
        assert f"teacher {i}/2 {name}: resuming" in stdout
        assert f"teacher {i}/2 {name}: success {manifest['teachers'][name]['success']:.3f}" in stdout
        row = next(line for line in stdout.splitlines() if line.startswith(name))
        assert row.split()[1:] == [f"{manifest['teachers'][name]['success']:.3f}",
                                   f"{manifest['teachers'][name]['return']:.2f}"]  # fmt: skip
    assert f"mtrl-distill teachers={out}/{MANIFEST}" in stdout


def test_distill_accepts_the_manifest_end_to_end(
    teachers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = teachers
    student = tmp_path / "student"
    argv = [f"teachers={out / MANIFEST}", f"hydra.run.dir={student}", *STUDENT]
    code, stdout, err = cli(distill_main, argv, monkeypatch, capsys)
    assert code == 0, err
    result = json.loads((student / COMPARISON_FILE).read_text())
    assert list(result["tasks"]) == TASKS and result["update"] == 20
    assert {n: Path(r["run_dir"]) for n, r in result["teacher_runs"].items()} == {n: out / n for n in TASKS}
    assert load_run(student).family.task_names == tuple(TASKS)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+trainer.totl_steps=5", "trainer.totl_steps"),  # a mistyped key of a schema'd section
        ("+taks=[goal-0deg]", "'taks'"),  # a top-level key neither mtrl-train nor mtrl-teachers reads
        ("+agent.hiden=[8]", "hiden"),  # a key the agent's target does not take
        ("tasks=[goal-45deg]", "goal-45deg"),  # a task the env does not have
        ("tasks=[goal-0deg,goal-0deg]", "named twice"),
        ("trainer.total_steps=0", "total_steps"),  # a value out of range
    ],
)
def test_config_mistakes_exit_2_with_one_line_naming_the_key_before_training(
    override: str, named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, _, err = cli(teachers_main, [f"hydra.run.dir={out}", *TEACHER, override], monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtrl-teachers: error:") and named in lines[0], err
    assert not any((out / name).exists() for name in TASKS) and not (out / MANIFEST).exists()


def test_rerun_reuses_finished_teachers_without_training(
    teachers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(teachers, out)
    files = [p for name in TASKS for p in (out / name).rglob("*") if p.is_file()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    manifest = json.loads((out / MANIFEST).read_text())
    # runner settings (progress, threads, vectorization) do not make a finished teacher stale
    argv = [f"hydra.run.dir={out}", *TEACHER, "trainer.num_threads=2", "env.vectorization=async"]
    code, stdout, err = cli(teachers_main, argv, monkeypatch, capsys)
    assert code == 0, err
    for i, name in enumerate(TASKS, 1):
        assert f"teacher {i}/2 {name}: reusing the finished run" in stdout
    assert len(files) >= 8  # config, last.pt, train log, eval of each teacher
    for path, (mtime, content) in before.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, path  # untouched: nothing trained
    again = json.loads((out / MANIFEST).read_text())
    assert again["teachers"] == manifest["teachers"] and again["env"] == {**manifest["env"], "vectorization": "async"}


def test_interrupted_and_extended_teachers_continue_to_the_weights_of_one_uninterrupted_run(
    teachers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, _, err = cli(teachers_main, [f"hydra.run.dir={out}", *short_steps(20)], monkeypatch, capsys)
    assert code == 0, err
    assert not any(same_weights(out / n, teachers / n) for n in TASKS)  # 20 steps are not 30
    # goal-0deg: what a Ctrl-C leaves (last.pt at step 20, no eval.json); goal-180deg: finished, now asked for more
    (out / TASKS[0] / "eval.json").unlink()
    code, stdout, err = cli(teachers_main, [f"hydra.run.dir={out}", *TEACHER], monkeypatch, capsys)
    assert code == 0, err
    for i, name in enumerate(TASKS, 1):
        assert f"teacher {i}/2 {name}: resuming" in stdout
        assert f"resumed from {out / name / 'last.pt'} at step 20" in stdout  # not trained again from step 0
        assert load_run(out / name).step == 30
        assert same_weights(out / name, teachers / name), name  # exact resume: as if never stopped
    assert json.loads((out / MANIFEST).read_text()) == json.loads((teachers / MANIFEST).read_text())


def test_tasks_option_trains_only_those_and_the_manifest_collects_them(
    teachers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, _, err = cli(teachers_main, [f"hydra.run.dir={out}", *TEACHER, "tasks=[goal-180deg]"], monkeypatch, capsys)
    assert code == 0, err
    assert not (out / "goal-0deg").exists() and list(json.loads((out / MANIFEST).read_text())["teachers"]) == [
        "goal-180deg"
    ]
    # a teacher does not depend on which other teachers are trained, nor in which order
    assert same_weights(out / "goal-180deg", teachers / "goal-180deg")
    code, stdout, err = cli(teachers_main, [f"hydra.run.dir={out}", *TEACHER, "tasks=[goal-0deg]"], monkeypatch, capsys)
    assert code == 0, err
    assert "teacher 1/1 goal-0deg: training into" in stdout
    assert set(json.loads((out / MANIFEST).read_text())["teachers"]) == set(TASKS)  # the earlier entry is kept
    assert same_weights(out / "goal-0deg", teachers / "goal-0deg")


def test_a_folder_of_other_settings_is_refused_before_training(
    teachers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(teachers, out)
    code, _, err = cli(teachers_main, [f"hydra.run.dir={out}", *TEACHER, "agent.hidden=[8]"], monkeypatch, capsys)
    assert code == 2 and "agent.hidden" in err and err.count("\n") == 1, err
    code, _, err = cli(teachers_main, [f"hydra.run.dir={out}", *TEACHER, "env.max_episode_steps=10"], monkeypatch,
                       capsys)  # fmt: skip
    assert code == 2 and "env.max_episode_steps" in err and MANIFEST in err, err
    code, _, err = cli(teachers_main, [f"hydra.run.dir={out}", *short_steps(10)], monkeypatch, capsys)
    assert code == 2 and "30 steps" in err, err
    assert same_weights(out / TASKS[0], teachers / TASKS[0])
    assert math.isfinite(json.loads((out / MANIFEST).read_text())["teachers"][TASKS[0]]["return"])
