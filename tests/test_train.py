"""End-to-end training through the Hydra config tree: every model config, metrics.json, early stopping
on validation, atomic checkpoints, exact resume, reproducibility, config errors, the command line (exit status 2
for errors a person can act on, the score it returns to sweepers), data paths and the experiment presets."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from mtl.checkpoint import load_checkpoint
from mtl.config import CONFIG_PATH
from mtl.tasks import TaskSpec
from mtrec.cli.train import main as train_main
from mtrec.train import REPO, run

CONFIG_DIR = REPO / "configs"

TINY = [
    "data.n_rows=3000",
    "data.num_users=200",
    "data.num_items=500",
    "data.num_categories=20",
    "trainer.batch_size=256",
    "trainer.progress=false",
    "trainer.tensorboard=false",
]
MODEL_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def cfg(*overrides: str) -> DictConfig:
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        return compose(config_name="mtrec", overrides=list(overrides))


def run_main_output(
    main: Callable[[], None],
    argv: Sequence[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    debug: bool = False,
    prog: str = "prog",
) -> tuple[int, str, str]:
    """A console script's ``main`` called in-process as ``prog argv...``: its exit status and what it wrote to stdout
    and to stderr (``debug``: with ``MTLIB_DEBUG=1``, else with ``MTLIB_DEBUG`` unset)."""
    monkeypatch.setattr(sys, "argv", [prog, *argv])
    if debug:
        monkeypatch.setenv("MTLIB_DEBUG", "1")
    else:
        monkeypatch.delenv("MTLIB_DEBUG", raising=False)
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def run_main(
    main: Callable[[], None],
    argv: Sequence[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    debug: bool = False,
    prog: str = "prog",
) -> tuple[int, str]:
    """:func:`run_main_output` without the stdout: the exit status and what ``main`` wrote to stderr."""
    code, _, err = run_main_output(main, argv, monkeypatch, capsys, debug=debug, prog=prog)
    return code, err


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]


def test_config_tree_has_the_groups() -> None:
    for group in ("data", "model", "trainer", "optimizer"):
        assert list((CONFIG_DIR / group).glob("*.yaml")), group
    assert {"mmoe", "omoe", "shared_bottom", "single_task", "cgc", "ple", "esmm", "l2_sharing",
            "cross_stitch"} <= set(MODEL_CONFIGS)


@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_every_model_config_trains(model: str, tmp_path: Path) -> None:
    extra = ["task_names=[click,conversion]"] if model == "esmm" else []
    c = cfg(f"model={model}", "trainer.max_steps=6", *TINY, *extra)
    metrics = run(c, tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == metrics
    assert set(written) == {"val", "test"}
    tasks = ["click", "conversion"] if model == "esmm" else ["click", "conversion", "dwell"]
    for split in ("val", "test"):
        assert list(written[split]) == tasks
        assert {"auc", "logloss"} <= set(written[split]["click"])
        if "dwell" in tasks:
            assert {"mse", "mae"} <= set(written[split]["dwell"])
        for task_metrics in written[split].values():
            assert all(v == v for k, v in task_metrics.items() if k != "auc")  # no NaN


def test_training_learns_and_tests_the_best_checkpoint(tmp_path: Path) -> None:
    c = cfg("trainer.max_epochs=3", *TINY)
    metrics = run(c, tmp_path)
    assert metrics["val"]["click"]["auc"] > 0.6, metrics
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["val"] == metrics["val"]  # reported val metrics are the best checkpoint's
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["best_step"] == best["step"]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    val_records = [r for r in log if "val/score" in r]
    assert len(val_records) == 3
    # best.pt holds the best validation score seen (early stopping reads validation only).
    assert max(r["val/score"] for r in val_records) == pytest.approx(
        -sum(metrics["val"][t]["loss"] for t in metrics["val"]) / 3
    )
    assert not list(tmp_path.glob(".*.tmp")), "no temporary checkpoint files left behind"
    # What export needs: the feature spec (round-trips) and the tasks.
    from hydra.utils import instantiate

    from mtrec.data.batch import FeatureSpec

    saved = json.loads((tmp_path / "features.json").read_text())
    assert [t["name"] for t in saved["tasks"]] == ["click", "conversion", "dwell"]
    assert saved["tasks"][2]["kind"] == "regression"
    spec = FeatureSpec.from_dict(saved["features"])
    assert spec == instantiate(c.data).features


def test_early_stopping_stops_on_validation(tmp_path: Path) -> None:
    # A learning rate of 0 never improves after the first validation: stop after `patience` more.
    c = cfg("trainer.max_epochs=20", "trainer.patience=2", "optimizer.lr=0.0", *TINY)
    run(c, tmp_path)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["stop_reason"] == "early_stopping"
    assert info["epochs"] == 3


def test_resume_gives_the_same_weights(tmp_path: Path) -> None:
    common = ["model=mmoe", "model.dropout=0.1", "trainer.checkpoint_every_steps=0", *TINY]
    # 3000 rows * 0.8 / 256 = 10 batches an epoch: 14 steps cross an epoch boundary.
    straight = tmp_path / "straight"
    run(cfg("trainer.max_steps=14", *common), straight)
    split = tmp_path / "split"
    run(cfg("trainer.max_steps=7", *common), split)
    half = weights(split)
    assert any(not torch.equal(half[k], weights(straight)[k]) for k in half)
    run(cfg("trainer.max_steps=14", "trainer.resume=true", *common), split)
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert load_checkpoint(split / "last.pt")["step"] == 14


def test_same_seed_same_metrics_other_seed_differs(tmp_path: Path) -> None:
    a = run(cfg("trainer.max_steps=5", *TINY), tmp_path / "a")
    b = run(cfg("trainer.max_steps=5", *TINY), tmp_path / "b")
    c = run(cfg("trainer.max_steps=5", "seed=1", *TINY), tmp_path / "c")
    assert a == b
    assert a != c


def test_per_task_learning_rates_reach_the_optimizer(tmp_path: Path) -> None:
    from mtrec.train import build_optimizer

    c = cfg("optimizer.shared_lr=0.5", "+tasks.click.lr=0.25", *TINY)
    from hydra.utils import instantiate

    from mtrec.models import build_model
    from mtrec.train import apply_task_overrides

    bundle = instantiate(c.data)
    tasks = apply_task_overrides(bundle.tasks, c.tasks)
    model = build_model(c.model, bundle.features, [t.name for t in tasks])
    opt = build_optimizer(c.optimizer, model, tasks)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"shared": 0.5, "click": 0.25, "conversion": 0.001, "dwell": 0.001}
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "override, needle",
    [
        ("trainer.max_step=3", "max_step"),
        ("trainer.monitor=accuracy", "trainer.monitor"),
        ("+tasks.clik.lr=0.1", "tasks.clik"),
        ("task_names=[click,purchase]", "purchase"),
        # groups of mtrl-train, and keys no part of a run reads, are refused instead of ignored
        ("+agent=mt_sac", "config key 'agent' is not used by mtrec-train"),
        ("+env=pointmass", "config key 'env' is not used by mtrec-train"),
        ("+weighted_losses=critic", "config key 'weighted_losses' is not used"),
        ("+lr=0.1", "config key 'lr' is not used"),
        ("+weighting.lrr=0.1", "config key weighting.lrr is not a parameter of Static"),
        ("+trainer.max_step=3", "config key trainer.max_step is not a parameter of TrainerConfig"),
    ],
)
def test_config_errors_name_the_key(override: str, needle: str, tmp_path: Path) -> None:
    with pytest.raises(Exception, match=needle):
        run(cfg(override, *TINY), tmp_path)


def test_cli_configuration_error_exits_2_naming_the_key(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "mtrec-train"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mtrec.cli.train"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for override, message, one_line in (
        ("+agent=mt_sac", "mtrec-train: error: config key 'agent' is not used by mtrec-train", True),
        # an error Hydra finds while composing (its own message, which names the key): status 2 as well
        ("+weighting=equal", "Multiple values for weighting", False),
    ):
        proc = subprocess.run(
            [*cmd, f"hydra.run.dir={tmp_path / 'run'}", override, *TINY],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not one_line or len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_cli_writes_metrics_json_in_the_hydra_run_dir(tmp_path: Path) -> None:
    """From another working directory: the config tree is the installed package's (pkg://mtlib_configs)."""
    exe = Path(sys.executable).parent / "mtrec-train"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mtrec.cli.train"]
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [*cmd, f"hydra.run.dir={run_dir}", "trainer.max_steps=4", *TINY],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"}
    assert (run_dir / "last.pt").exists() and (run_dir / "best.pt").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()


@pytest.mark.parametrize("stop_gradient", ["true", "false"])
def test_estimate_as_feature_from_config(stop_gradient: str, tmp_path: Path) -> None:
    c = cfg("model.task_feeds={conversion:click}", f"model.feed_stop_gradient={stop_gradient}",
            "trainer.max_steps=4", *TINY)
    metrics = run(c, tmp_path)
    assert set(metrics["test"]) == {"click", "conversion", "dwell"}


STRATEGY_CONFIGS = [
    f"{group}={p.stem}"
    for group in ("weighting", "gradient", "schedule")
    for p in sorted((CONFIG_DIR / group).glob("*.yaml"))
]


@pytest.mark.parametrize("override", STRATEGY_CONFIGS)
def test_every_weighting_gradient_and_schedule_config_trains_mmoe(override: str, tmp_path: Path) -> None:
    metrics = run(cfg("model=mmoe", override, "trainer.max_steps=5", "trainer.max_epochs=1", *TINY), tmp_path)
    assert set(metrics["test"]) == {"click", "conversion", "dwell"}
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 5


@pytest.mark.parametrize(
    "strategies",
    [
        ["weighting=famo", "gradient=pcgrad", "schedule=bandit"],
        ["weighting=dwa", "gradient=gradvac", "schedule=random"],
        ["weighting=uncertainty", "gradient=mgda_ub", "schedule=all"],
    ],
)
def test_resume_is_exact_with_stateful_strategies(strategies: list[str], tmp_path: Path) -> None:
    common = ["model=mmoe", *strategies, *TINY]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(cfg("trainer.max_steps=14", *common), straight)
    run(cfg("trainer.max_steps=7", *common), split)
    run(cfg("trainer.max_steps=14", "trainer.resume=true", *common), split)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert a["weighting"].keys() == b["weighting"].keys()


@pytest.mark.parametrize("schedule", ["all", "temperature", "round_robin"])
def test_tasks_from_separate_datasets_of_different_sizes(schedule: str, tmp_path: Path) -> None:
    # 2400 train rows split 60/25/5 %: the small task's stream must restart many times without stalling.
    split = "task_split={click:0.6,conversion:0.25,dwell:0.05}"
    common = [split, f"schedule={schedule}", "weighting=famo", *TINY]
    metrics = run(cfg("trainer.max_steps=30", *common), tmp_path / "a")
    assert set(metrics["test"]) == {"click", "conversion", "dwell"}
    streams = load_checkpoint(tmp_path / "a" / "last.pt")["streams"]
    assert streams is not None
    # resume equivalence in the per-task regime
    run(cfg("trainer.max_steps=15", *common), tmp_path / "b")
    run(cfg("trainer.max_steps=30", "trainer.resume=true", *common), tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_split_by_task_sizes_and_disjointness() -> None:
    from mtrec.data import load_sparse_synthetic
    from mtrec.data.batch import split_by_task

    bundle = load_sparse_synthetic(n_rows=1000, num_users=50, num_items=100, num_categories=5)
    parts = split_by_task(bundle.train, {"click": 0.5, "conversion": 0.3, "dwell": 0.1}, seed=0)
    assert {k: len(v) for k, v in parts.items()} == {"click": 400, "conversion": 240, "dwell": 80}
    rows = [tuple(r.tolist()) for p in parts.values() for r in p.dense]
    assert len(set(rows)) == len(rows)  # disjoint
    with pytest.raises(ValueError, match="sum to at most 1"):
        split_by_task(bundle.train, {"click": 0.8, "conversion": 0.3})
    with pytest.raises(ValueError, match="no label column"):
        split_by_task(bundle.train, {"purchase": 0.5})


def test_representation_methods_refuse_per_task_datasets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="different batch"):
        run(cfg("task_split={click:0.5,conversion:0.3,dwell:0.2}", "gradient=mgda_ub", "trainer.max_steps=2", *TINY),
            tmp_path)


@pytest.mark.parametrize("method", ["great", "mgda_ub"])
def test_representation_methods_through_a_ragged_last_batch(method: str, tmp_path: Path) -> None:
    # 2400 train rows / 256 = 9 full batches and one of 96 rows: the representation's batch size changes.
    metrics = run(cfg(f"gradient={method}", "trainer.max_epochs=1", *TINY), tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 10
    assert set(metrics["test"]) == {"click", "conversion", "dwell"}


# ------------------------------------------------------------------------------------ the command line


# One mistyped key per group: (the key, the name the start-up check gives the group's schema).
GROUP_TYPOS = [
    ("data.n_row", "load_census"),
    ("model.num_expert", "MMoE"),
    ("trainer.max_step", "TrainerConfig"),
    ("optimizer.lrr", "Adam"),
    ("weighting.weight", "Static"),
    ("gradient.pref", "Plain"),
    ("schedule.temperature", "AllTasks"),
    ("distill.alpah", "DistillConfig"),
]


@pytest.mark.parametrize("key, schema", GROUP_TYPOS, ids=[k for k, _ in GROUP_TYPOS])
def test_cli_refuses_a_mistyped_key_of_every_group_in_both_forms(
    key: str, schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a missing data file too: the keys are checked before any data loads
    common = [f"hydra.run.dir={tmp_path / 'run'}", "data=census", f"data.path={tmp_path}/none.gz"]
    # key=value: Hydra refuses a key the struct config lacks while composing (its own message names the key)
    code, err = run_main(train_main, [*common, f"{key}=4"], monkeypatch, capsys)
    assert code == 2 and f"Could not override '{key}'" in err and "Traceback" not in err, err
    # +key=value: the start-up check refuses what the group's target (or schema) does not take, in one line
    code, err = run_main(train_main, [*common, f"+{key}=4"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"mtrec-train: error: config key {key} is not a parameter of {schema}"), err
    assert "valid keys: " in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def _census_file(tmp_path: Path) -> Path:
    from test_data_census import census_lines

    path = tmp_path / "census.txt"
    path.write_text("".join(census_lines(300, seed=0)))
    return path


@pytest.mark.parametrize("case", ["task", "missing_file", "missing_data_dir", "bad_csv", "bad_census"])
def test_cli_user_errors_exit_2_in_one_line_saying_what_to_fix(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_data_aliexpress import make_row, write_csv

    monkeypatch.setenv("MTLIB_DATA_DIR", str(tmp_path / "empty"))
    if case == "bad_csv":
        write_csv(tmp_path / "ali.csv", [make_row(0), make_row(1), make_row(2, numerical_3="n/a"), make_row(3)])
    if case == "bad_census":  # line 7 lacks its first field
        lines = _census_file(tmp_path).read_text().splitlines(keepends=True)
        lines[6] = lines[6].split(",", 1)[1]
        (tmp_path / "census.txt").write_text("".join(lines))
    args = {
        "task": ["task_names=[nope]", *TINY],
        "missing_file": ["data=census", f"data.path={tmp_path}/census.gz"],
        "missing_data_dir": ["data=aliexpress"],
        "bad_csv": ["data=aliexpress", f"data.path={tmp_path}/ali.csv"],
        "bad_census": ["data=census", f"data.path={tmp_path}/census.txt"],
    }[case]
    expected = {
        "task": r"config key task_names: \['nope'\] not in this dataset's tasks \['click', 'conversion', 'dwell'\]$",
        "missing_file": rf"{tmp_path}/census.gz: file not found$",
        "missing_data_dir": rf"{tmp_path}/empty/aliexpress/aliexpress_test_sample.csv: file not found \(the "
                            r"configs' data files, \$\{data_path:x\}, are \$MTLIB_DATA_DIR/x, .*"
                            rf"here {tmp_path}/empty, \$MTLIB_DATA_DIR\); set MTLIB_DATA_DIR=DIR or data.path=FILE$",
        "bad_csv": rf"{tmp_path}/ali.csv:4 field 'numerical_3': non-numeric value 'n/a' \(column 20\)$",
        "bad_census": rf"{tmp_path}/census.txt:7: expected 42 comma-separated fields, found 41$",
    }[case]  # fmt: skip
    code, err = run_main(train_main, [f"hydra.run.dir={tmp_path / 'run'}", *args], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.match("mtrec-train: error: " + expected, err.strip()), err


def test_cli_bugs_keep_their_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mtrec.cli.train

    def broken(*args: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(mtrec.cli.train, "train_and_evaluate", broken)
    code, err = run_main(train_main, [f"hydra.run.dir={tmp_path}", *TINY], monkeypatch, capsys)
    assert code == 1 and "Traceback" in err and "KeyError: 'a bug'" in err, err


@pytest.mark.parametrize("monitor", ["loss", "auc"])
def test_the_hydra_main_returns_the_monitored_validation_score(monitor: str, tmp_path: Path) -> None:
    """What a sweeper (Optuna, Ax) optimises: the score early stopping used, of the best checkpoint."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from mtrec.cli.train import _hydra_main
    from mtrec.trainer import monitor_score

    overrides = ["trainer.max_steps=12", f"trainer.monitor={monitor}", "task_names=[click,conversion]", *TINY]
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        full = compose(config_name="mtrec", overrides=overrides, return_hydra_config=True)
        with open_dict(full):
            full.hydra.runtime.output_dir = str(tmp_path)
        HydraConfig.instance().set_config(full)
        score = _hydra_main(compose(config_name="mtrec", overrides=overrides))  # Hydra's pass-through call
    assert isinstance(score, float)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["monitor"] == monitor and info["best_score"] == score
    tasks = [TaskSpec("click", "binary"), TaskSpec("conversion", "binary")]
    assert score == monitor_score(metrics["val"], tasks, monitor)
    if monitor == "auc":
        assert 0 < score <= 1


def test_a_resumed_run_says_where_it_resumed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mtrec.trainer"):
        run(cfg("trainer.max_steps=3", "trainer.resume=true", *TINY), tmp_path)
        assert f"trainer.resume: no {tmp_path / 'last.pt'} yet, starting at step 0" in caplog.text
        caplog.clear()
        run(cfg("trainer.max_steps=5", "trainer.resume=true", *TINY), tmp_path)
    assert f"resumed from {tmp_path / 'last.pt'} at step 3" in caplog.text


def test_an_undefined_auc_warns_with_split_task_and_counts(tmp_path: Path) -> None:
    from mtrec.data import load_sparse_synthetic
    from mtrec.models import InputArch, SharedBottom
    from mtrec.trainer import UndefinedMetricWarning, evaluate, monitor_score

    bundle = load_sparse_synthetic(n_rows=600, num_users=50, num_items=80, num_categories=6)
    val = bundle.val
    val.labels["click"] = torch.zeros(len(val))
    val.labels["conversion"] = torch.ones(len(val))
    model = SharedBottom(InputArch(bundle.features), ["click", "conversion", "dwell"])
    with pytest.warns(UndefinedMetricWarning) as record:
        metrics = evaluate(model, val, bundle.tasks, split="val")
    assert [str(w.message) for w in record] == [
        f"val/click: AUC undefined: all {len(val)} labels are 0 (reported as NaN)",
        f"val/conversion: AUC undefined: all {len(val)} labels are 1 (reported as NaN)",
    ]
    assert metrics["click"]["auc"] != metrics["click"]["auc"]  # NaN
    with pytest.raises(ValueError, match=r"trainer.monitor='auc': the validation AUC of \['click', 'conversion'\] "
                       r"is undefined .*\(trainer.monitor=loss\)"):  # fmt: skip
        monitor_score(metrics, bundle.tasks, "auc")


def test_data_path_is_the_data_dir_then_the_checkout_then_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mtrec.train

    monkeypatch.setenv("MTLIB_DATA_DIR", str(tmp_path / "d"))
    assert mtrec.train.data_path("census/x.gz") == str(tmp_path / "d" / "census" / "x.gz")
    monkeypatch.delenv("MTLIB_DATA_DIR")
    assert mtrec.train.data_path("x.csv") == str(REPO.parent / "shared" / "data" / "x.csv")  # a checkout
    monkeypatch.setattr(mtrec.train, "REPO", tmp_path / "site-packages")  # installed: no checkout beside it
    monkeypatch.chdir(tmp_path)
    assert mtrec.train.data_path("x.csv") == str(tmp_path / "data" / "x.csv")
    assert mtrec.train.data_root() == (tmp_path / "data", "in the working directory")


# ------------------------------------------------------------------------------------------ experiments

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("mtrl_"))


def test_experiment_presets_hold_the_benchmark_settings() -> None:
    assert {"census_mmoe", "synthetic_mmoe"} <= set(EXPERIMENTS)
    census = cfg("experiment=census_mmoe")
    assert census.data._target_ == "mtrec.data.load_census" and census.model._target_ == "mtrec.models.MMoE"
    assert list(census.data.tasks) == ["income", "marital"] and list(census.data.split) == [0.7, 0.15, 0.15]
    assert (census.trainer.max_epochs, census.trainer.monitor, census.trainer.batch_size) == (20, "auc", 1024)
    for model, target in (("ple", "PLE"), ("single_task", "SingleTask"), ("shared_bottom", "SharedBottom")):
        assert cfg(f"experiment=census_{model}").model._target_ == f"mtrec.models.{target}"
    figure4 = cfg("experiment=synthetic_omoe")
    assert figure4.data._target_ == "mtrec.data.load_mmoe_synthetic" and figure4.data.n_train == 20000
    assert figure4.model._target_ == "mtrec.models.OMoE" and figure4.optimizer.lr == 0.001
    assert (figure4.trainer.max_epochs, figure4.trainer.batch_size, figure4.trainer.patience) == (200, 256, 20)
    # the preset comes after _self_ in mtrec.yaml's defaults, and the command line after the preset
    assert cfg("experiment=census_mmoe", "trainer.max_epochs=3", "model=ple").trainer.max_epochs == 3
    assert cfg("experiment=census_mmoe", "model=ple").model._target_ == "mtrec.models.PLE"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_builds_and_trains(experiment: str, tmp_path: Path) -> None:
    tiny = ["trainer.max_steps=2", "trainer.progress=false", "trainer.tensorboard=false", "trainer.batch_size=64"]
    if experiment.startswith("census"):
        tiny.append(f"data.path={_census_file(tmp_path)}")
    else:
        tiny += ["data.n_train=300", "data.n_val=100", "data.n_test=100"]
    metrics = run(cfg(f"experiment={experiment}", *tiny), tmp_path / "run")
    assert set(metrics["test"]) == ({"income", "marital"} if experiment.startswith("census") else {"task1", "task2"})
