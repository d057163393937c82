"""Run directories of ``mtrl-train`` (:mod:`mtrl.runs`): what is not one is reported in a line that says where and
what to pass instead (``mtrl-eval`` exits with status 2, without a traceback unless ``MTLIB_DEBUG=1``); a resumed run
logs where it resumed from."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from test_mtrl_config import TINY as CONFIG_TINY

from mtrl.config import CONFIG_DIR
from mtrl.export import export_run
from mtrl.runs import LAST, NotARunError, check_run_dir, load_run
from mtrl.train import run

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
# test_mtrl_config's tiny run, without its step count (each test here sets its own) and logging every 5 steps
TINY = [o for o in CONFIG_TINY if not o.startswith(("trainer.total_steps=", "trainer.log_interval="))]
TINY.append("trainer.log_interval=5")


def cfg_for(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="mtrl", overrides=[*TINY, *overrides])


def mtrec_like_run(path: Path) -> Path:
    """What mtrec-train writes, as far as telling it apart goes: features.json and a config with a model node."""
    path.mkdir(parents=True)
    (path / "features.json").write_text(json.dumps({"dense": ["x0"], "sparse": {}}))
    (path / "config.yaml").write_text("model:\n  _target_: mtrec.models.MMoE\ndata:\n  name: synthetic\nseed: 0\n")
    (path / "metrics.json").write_text("{}")
    return path


def test_directories_that_are_not_runs_say_why_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NotARunError, match=r"/nowhere: no such directory; pass the directory an mtrl-train run wrote"):
        check_run_dir(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotARunError, match=r"file.txt: not a directory"):
        check_run_dir(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotARunError, match=r"/empty: no config.yaml, so not an mtrl-train run directory"):
        load_run(tmp_path / "empty")
    rec = mtrec_like_run(tmp_path / "rec")
    with pytest.raises(NotARunError, match=r"/rec is a recommendation run \(mtrec-train.*mtrec-export exports it"):
        load_run(rec)
    with pytest.raises(NotARunError, match=r"recommendation run"):
        export_run(rec, tmp_path / "repo", "policy")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("seed: 0\nfoo: 1\n")
    with pytest.raises(NotARunError, match=r"config.yaml has no env or agent node"):
        load_run(other)
    (other / "config.yaml").write_text("- a list\n")
    with pytest.raises(NotARunError, match=r"config.yaml: expected a mapping"):
        load_run(other)
    # a run that has written its config but no checkpoint yet
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text("env: {}\nagent: {}\nseed: 0\n")
    with pytest.raises(NotARunError, match=rf"no {LAST} yet .*mtrl-train hydra.run.dir=\S*started trainer.resume=true"):
        load_run(started)
    assert issubclass(NotARunError, ValueError)  # a user error: the commands print one line and exit 2


def _eval(*args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MTLIB_DEBUG"}
    if debug:
        env["MTLIB_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "mtrl.cli.eval", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )


def test_mtrl_eval_of_a_recommendation_run_or_a_missing_directory_exits_2_in_one_line(tmp_path: Path) -> None:
    rec = mtrec_like_run(tmp_path / "rec")
    proc = _eval(f"run_dir={rec}", "episodes=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"mtrl-eval: error: {rec} is a recommendation run (mtrec-train")
    assert not (rec / "evaluation.json").exists()
    missing = _eval(f"run_dir={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    assert f"mtrl-eval: error: {tmp_path / 'nowhere'}: no such directory" in missing.stderr
    debug = _eval(f"run_dir={rec}", debug=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "NotARunError" in debug.stderr
    typo = _eval(f"run_dir={rec}", "episode=3")  # a key of no mtrl-eval option: Hydra's composition error
    assert typo.returncode == 2 and "episode" in typo.stderr and "Traceback" not in typo.stderr


def test_a_resumed_run_logs_where_it_resumed_from(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mtrl"):
        run(cfg_for("trainer.total_steps=10", "trainer.resume=true"), tmp_path)
    assert f"trainer.resume=true but there is no {tmp_path / LAST}: starting at step 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtrl"):
        result = run(cfg_for("trainer.total_steps=15", "trainer.resume=true"), tmp_path)
    assert f"resumed from {tmp_path / LAST} at step 10" in caplog.text and result["step"] == 15
    assert load_run(tmp_path).step == 15
