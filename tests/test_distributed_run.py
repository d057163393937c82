"""A distributed ``mtrec-train`` run end to end on 2 gloo ranks (CPU): launched by ``trainer.nproc_per_node`` and by
``torchrun``; it trains on Parquet files (each rank its own row groups), evaluates over the whole split, writes its
files once, checkpoints sharded; the checkpoint resumes on another world size; a rank killed with SIGKILL under
``torchrun --max-restarts=1`` is restarted and the job ends with the weights of an uninterrupted run; and
``mtrec-export`` turns the run into a served model that passes its parity check. Each launch is bounded in time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT = 240


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from mtrec.data.filetools import write_synthetic

    out = tmp_path_factory.mktemp("clicks") / "log"
    summary = write_synthetic(out, 8000, num_users=2000, num_items=1000, rows_per_file=2000, row_group_size=1000)
    return {k: summary[k] for k in ("train", "val", "test", "schema")}


def _overrides(files: dict[str, str], run_dir: Path, *extra: str) -> list[str]:
    return [
        "data=files",
        *(f"data.{k}={v}" for k, v in files.items()),
        "optimizer=adagrad",
        "trainer.batch_size=256",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.log_every_steps=5",
        "trainer.checkpoint_every_steps=5",
        "sharding.types={user_id:[column_wise],item_id:[table_wise]}",
        "sharding.column_shard_dim=8",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a launcher in its own process group; past ``TIMEOUT`` the whole group (its workers too) is killed."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})}, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[0]} did not finish within {TIMEOUT} s:\n{out[-2000:]}{err[-4000:]}") from None
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from mtrec.dist_checkpoint import to_full_state_dict

    return to_full_state_dict(run_dir / "checkpoints")


def test_nproc_per_node_trains_evaluates_and_exports(files: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run([str(BIN / "mtrec-train"), "trainer.nproc_per_node=2", "trainer.max_epochs=2", *_overrides(files, run_dir)])
    info = json.loads((run_dir / "run_info.json").read_text())
    # 8000 rows in 8 row groups, 4 a rank, 256 rows a rank a step: 16 steps an epoch
    assert info["world_size"] == 2 and info["steps"] == 32 and info["stop_reason"] == "max_epochs"
    plan = json.loads((run_dir / "sharding_plan.json").read_text())
    tables = plan["inputs.ebc"]
    assert tables["t_user_id"]["sharding_type"] == "column_wise" and tables["t_user_id"]["ranks"] == [0, 1]
    assert tables["t_item_id"]["sharding_type"] == "table_wise"
    # rank 0 alone wrote the log: one record per 5 steps and one per validation, not twice
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train/loss" in r] == [5, 10, 15, 20, 25, 30]
    assert sum("val/score" in r for r in log) == 2
    # the sharded best checkpoint, gathered, is the model the run tested: one process on the test files agrees
    from mtrec.data.files import load_files
    from mtrec.export import load_run
    from mtrec.trainer import evaluate

    run = load_run(run_dir)
    bundle = load_files(**files, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = evaluate(run.model, bundle.test, bundle.tasks, 4096)
    for task, values in metrics["test"].items():
        for name, value in values.items():
            assert test[task][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, name)
    # export: the gathered weights in ONNX, parity-checked against the torch model
    from mtrec.export import export_run

    export = export_run(
        {"run_dir": str(run_dir), "repository": str(tmp_path / "repo"), "model_name": "clicks",
         "parity": {"batch_sizes": [1, 64]}}
    )  # fmt: skip
    assert export.model_path.is_file() and export.parity.passed


def test_torchrun_resumes_a_killed_rank_and_reshards(files: dict[str, str], tmp_path: Path) -> None:
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2"]
    steps = ["trainer.max_epochs=1", "trainer.max_steps=15"]
    # uninterrupted
    _run([*torchrun, "-m", "mtrec.cli.train", *_overrides(files, tmp_path / "whole"), *steps])
    # rank 1 SIGKILLs itself before step 12 (checkpoint at 10); torchrun restarts both, which resume by themselves
    killed = _run(
        [*torchrun, "--max-restarts=1", str(REPO / "tests" / "fault_worker.py"),
         *_overrides(files, tmp_path / "killed"), *steps],
        env={"MTLIB_KILL_AT_STEP": "12", "MTLIB_KILL_RANK": "1"},
    )  # fmt: skip
    out = killed.stdout + killed.stderr
    assert "Signals.SIGKILL" in out or "-9" in out, out[-3000:]
    assert "resumed from" in out and "at step 10" in out, out[-3000:]
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for k, v in whole.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-6, atol=1e-7, msg=k)
    # resharding: the 2-rank checkpoint (step 15) continues on 1 rank, its tables in one piece
    one = _run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=1", "-m", "mtrec.cli.train",
         *_overrides(files, tmp_path / "whole"), "trainer.max_epochs=1", "trainer.max_steps=20", "trainer.resume=true"]
    )  # fmt: skip
    assert "resumed from" in one.stdout + one.stderr and "at step 15" in one.stdout + one.stderr
    info = json.loads((tmp_path / "whole" / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["steps"] == 20
