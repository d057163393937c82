"""End-to-end training through the Hydra config tree: every model config, metrics.json, early stopping
on validation, atomic checkpoints, exact resume, reproducibility, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mtl.checkpoint import load_checkpoint
from mtrec.train import CONFIG_DIR, REPO, run

TINY = [
    "data.n_rows=3000",
    "data.num_users=200",
    "data.num_items=500",
    "data.num_categories=20",
    "trainer.batch_size=256",
    "trainer.progress=false",
    "trainer.tensorboard=false",
]
MODEL_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


def cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="mtrec", overrides=list(overrides))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]


def test_config_tree_has_the_groups() -> None:
    for group in ("data", "model", "trainer", "optimizer"):
        assert list((Path(CONFIG_DIR) / group).glob("*.yaml")), group
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

    from mtrec.train import apply_task_overrides

    bundle = instantiate(c.data)
    tasks = apply_task_overrides(bundle.tasks, c.tasks)
    model = instantiate(c.model)(features=bundle.features, tasks=[t.name for t in tasks])
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
        ("+weighting.lrr=0.1", "config section 'weighting'.*lrr"),
        ("+trainer.max_step=3", "config section 'trainer': Key 'max_step' not in 'TrainerConfig'$"),
    ],
)
def test_config_errors_name_the_key(override: str, needle: str, tmp_path: Path) -> None:
    with pytest.raises(Exception, match=needle):
        run(cfg(override, *TINY), tmp_path)


def test_cli_configuration_error_exits_2_naming_the_key(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "mtrec-train"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mtrec.train"]
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
    exe = Path(sys.executable).parent / "mtrec-train"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mtrec.train"]
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [*cmd, f"hydra.run.dir={run_dir}", "trainer.max_steps=4", *TINY],
        capture_output=True, text=True, env=env, timeout=300,
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
    for p in sorted((Path(CONFIG_DIR) / group).glob("*.yaml"))
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
