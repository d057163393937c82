"""ONNX export into a Triton-layout repository: every model of the zoo against its TorchRec original, the
repository files, ``mtrec-export`` end to end, the half-precision variant, the raw-feature encoder against
the readers' own encoding, and the errors."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from test_data_aliexpress import make_row, write_csv
from test_data_census import census_lines
from test_train import run_main
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import serving.export as sx
from mtl.config import CONFIG_PATH
from mtrec.cli.export import main as export_main
from mtrec.data import load_aliexpress, load_census
from mtrec.data.batch import DataBundle, FeatureSpec, SparseFeature, build_kjt
from mtrec.data.census import CENSUS_COLUMNS
from mtrec.data.files import split_parts
from mtrec.export import (
    FEATURES_FILE,
    PaddedInputArch,
    RawFeatureEncoder,
    RecExportView,
    export_config,
    export_run,
    load_run,
    serving_features,
)
from mtrec.models import MODELS, InputArch, MMoE, SharedBottom
from mtrec.train import REPO, run
from serving.repository import V2_TO_NUMPY, available_versions, read_config

torch.set_num_threads(1)

# One tiny spec with every pooling case: single ids (sum and mean), multi-id bags (sum and mean).
FEATURES = FeatureSpec(
    dense_names=("d0", "d1", "d2"),
    sparse=(
        SparseFeature("user", 50),
        SparseFeature("hist", 40, max_len=5, pooling="mean"),
        SparseFeature("item", 30, pooling="mean"),
        SparseFeature("tags", 20, max_len=4, pooling="sum"),
    ),
)
TASKS = ["ctr", "cvr", "dwell"]
KINDS = {"ctr": "binary", "cvr": "binary", "dwell": "regression", "ctcvr": "binary"}
KWARGS: dict[str, dict] = {
    "single_task": {"bottom_dims": [8]},
    "shared_bottom": {"bottom_dims": [8]},
    "omoe": {"num_experts": 3, "expert_dims": [6]},
    "mmoe": {"num_experts": 3, "expert_dims": [6], "task_feeds": {"cvr": "ctr"}},
    "cgc": {"num_shared_experts": 2, "num_task_experts": 1, "expert_dims": [6]},
    "ple": {"num_levels": 2, "num_shared_experts": 2, "num_task_experts": 1, "expert_dims": [6]},
    "esmm": {},
    "l2_sharing": {"bottom_dims": [8]},
    "cross_stitch": {"bottom_dims": [8, 6]},
    "searched": {"num_levels": 2, "num_shared_experts": 2, "num_task_experts": 1, "expert_dims": [6],
                 "architecture": {"ctr": ["own", [0, 1]], "cvr": [[0], "all"], "dwell": [[1], "own"]}},
}
TRAIN_TINY = [
    "data.n_rows=2000",
    "data.num_users=100",
    "data.num_items=200",
    "data.num_categories=10",
    "data.history_len=6",
    "trainer.batch_size=256",
    "trainer.max_steps=4",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "model.inputs.embedding_dim=4",
    "model.num_experts=2",
    "model.expert_dims=[4]",
]


def tasks_of(name: str) -> list[str]:
    return ["ctr", "ctcvr"] if name == "esmm" else TASKS


def build(name: str, seed: int = 0, features: FeatureSpec = FEATURES) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[name](InputArch(features, embedding_dim=4), tasks_of(name), tower_dims=[4], **KWARGS[name]).eval()


def padded_rows(features: FeatureSpec, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random rows with empty bags in every sparse feature and garbage (out-of-range) padding ids."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    if features.dense_dim:
        out["dense"] = torch.randn(batch, features.dense_dim, generator=g)
    for f in features.sparse:
        ids = torch.randint(0, f.num_embeddings, (batch, f.max_len), generator=g)
        lengths = torch.randint(0, f.max_len + 1, (batch,), generator=g)
        lengths[0] = 0  # an empty bag in every batch
        lengths[-1] = f.max_len
        padding = torch.arange(f.max_len).unsqueeze(0) >= lengths.unsqueeze(1)
        ids[padding] = torch.randint(-5, 3 * f.num_embeddings, (int(padding.sum()),), generator=g)
        out[f"{f.name}_ids"], out[f"{f.name}_lengths"] = ids, lengths.unsqueeze(1)
    return out


def torch_outputs(
    model: torch.nn.Module, features: FeatureSpec, rows: dict[str, torch.Tensor], kinds: dict[str, str] = KINDS
) -> dict[str, np.ndarray]:
    """The original model (TorchRec EBC on a KeyedJaggedTensor) with each task's serving transform."""
    batch = next(iter(rows.values())).shape[0]
    dense = rows.get("dense", torch.zeros(batch, 0))
    ids = {f.name: rows[f"{f.name}_ids"] for f in features.sparse}
    lengths = {f.name: rows[f"{f.name}_lengths"].reshape(-1) for f in features.sparse}
    with torch.no_grad():
        out = model(dense, build_kjt(ids, lengths, list(features.sparse_names)))
    return {t: (torch.sigmoid(v) if kinds[t] == "binary" else v).unsqueeze(1).numpy() for t, v in out.items()}


def ort_run(path: Path, rows: dict) -> dict[str, np.ndarray]:
    session = sx.ort_session(path)
    names = [o.name for o in session.get_outputs()]
    feed = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in rows.items()}
    return dict(zip(names, session.run(names, feed)))


# --------------------------------------------------------------------------------- every model exports


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    name = request.param
    model = build(name)
    view = RecExportView(model, KINDS)
    repo = tmp_path_factory.mktemp("zoo")
    result = sx.export_to_repository(view, repo, name)
    return name, model, view, result


def test_every_model_matches_torchrec_on_padded_ids(exported: tuple) -> None:
    name, model, view, result = exported
    for batch, seed in ((1, 1), (7, 2), (300, 3)):
        rows = padded_rows(FEATURES, batch, seed)
        want = torch_outputs(model, FEATURES, rows)
        got = ort_run(result.model_path, rows)
        assert list(got) == tasks_of(name)
        for t in want:
            assert got[t].shape == (batch, 1) and got[t].dtype == np.float32
            np.testing.assert_allclose(got[t], want[t], rtol=0, atol=1e-5, err_msg=f"{name}/{t} batch {batch}")
    # The export's own parity check ran at 1, 64 and 1024 and is recorded.
    parity = result.info["parity"]
    assert parity["passed"] and set(parity["batch_sizes"]) == {"1", "64", "1024"}
    assert all(v["max_abs_diff"] <= 1e-5 for v in parity["batch_sizes"].values())


def test_graph_has_no_loop_and_matches_config_pbtxt(exported: tuple) -> None:
    name, _, view, result = exported
    graph = onnx.load(str(result.model_path)).graph
    ops = {n.op_type for n in graph.node}
    assert "Loop" not in ops and "Gather" in ops
    assert not list(result.version_dir.glob("*.data")), "weights must be inline"
    cfg = read_config(result.repository, name)
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 1024
    assert cfg.max_queue_delay_microseconds == 100 and cfg.instance_kind == "KIND_CPU"
    session = sx.ort_session(result.model_path)
    ort_types = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
    for declared, actual in ((cfg.inputs, session.get_inputs()), (cfg.outputs, session.get_outputs())):
        assert [t.name for t in declared] == [a.name for a in actual]
        for t, a in zip(declared, actual):
            assert ort_types[a.type] == t.datatype
            assert isinstance(a.shape[0], str) and list(a.shape[1:]) == list(t.dims)  # dynamic batch axis
    names = [t.name for t in cfg.inputs]
    assert names == [
        "dense",
        "user_ids",
        "user_lengths",
        "hist_ids",
        "hist_lengths",
        "item_ids",
        "item_lengths",
        "tags_ids",
        "tags_lengths",
    ]
    assert cfg.input("hist_ids").dims == (5,) and cfg.input("hist_lengths").dims == (1,)


def test_pooling_matches_torchrec_including_empty_bags() -> None:
    # TorchRec's own answer for an empty bag, derived here without mtrec: MEAN and SUM give zeros.
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                num_embeddings=6, embedding_dim=2, name="m", feature_names=["m"], pooling=PoolingType.MEAN
            ),
            EmbeddingBagConfig(
                num_embeddings=6, embedding_dim=2, name="s", feature_names=["s"], pooling=PoolingType.SUM
            ),
        ]
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["m", "s"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([0, 3, 0, 1], dtype=torch.int32)
    )
    pooled = ebc(kjt).values()
    assert torch.equal(pooled[0], torch.zeros(4))
    w = ebc.embedding_bags["m"].weight.detach()
    torch.testing.assert_close(pooled[1, :2], w[[1, 2, 3]].mean(0))

    arch = InputArch(FEATURES, embedding_dim=3)
    padded = PaddedInputArch(arch)
    rows = padded_rows(FEATURES, 40, seed=5)
    sparse = {f.name: (rows[f"{f.name}_ids"], rows[f"{f.name}_lengths"]) for f in FEATURES.sparse}
    kjt = build_kjt(
        {k: v[0] for k, v in sparse.items()},
        {k: v[1].reshape(-1) for k, v in sparse.items()},
        list(FEATURES.sparse_names),
    )
    with torch.no_grad():
        torch.testing.assert_close(padded(rows["dense"], sparse), arch(rows["dense"], kjt), rtol=0, atol=1e-6)
        out = padded(rows["dense"], sparse)
    assert torch.equal(out[0, :12], torch.zeros(12)), "row 0 has only empty bags"
    # A bag's value by hand: the mean of `hist`'s valid ids (feature 2 of 4, width 3).
    n = int(rows["hist_lengths"][5])
    table = arch.ebc.embedding_bags["t_hist"].weight.detach()
    want = table[rows["hist_ids"][5, :n]].mean(0) if n else torch.zeros(3)
    torch.testing.assert_close(out[5, 3:6], want)


def test_models_without_dense_or_without_sparse_features(tmp_path: Path) -> None:
    for features in (FeatureSpec((), FEATURES.sparse), FeatureSpec(tuple(f"x{i}" for i in range(6)), ())):
        torch.manual_seed(0)
        inputs = InputArch(features, embedding_dim=4)
        model = SharedBottom(inputs, ["ctr", "dwell"], bottom_dims=[6], tower_dims=[4]).eval()
        view = RecExportView(model, KINDS)
        path = sx.export_onnx(view, tmp_path / f"m{features.dense_dim}.onnx")
        rows = padded_rows(features, 33, seed=1)
        assert sorted(rows) == sorted(s.name for s in view.input_specs)
        got, want = ort_run(path, rows), torch_outputs(model, features, rows)
        for t in want:
            np.testing.assert_allclose(got[t], want[t], rtol=0, atol=1e-5)


def test_view_errors() -> None:
    model = build("shared_bottom")
    with pytest.raises(ValueError, match=r"task_kinds lacks the model's tasks \['dwell'\]"):
        RecExportView(model, {"ctr": "binary", "cvr": "binary"})
    with pytest.raises(ValueError, match="'binary' or 'regression'"):
        RecExportView(model, {**KINDS, "dwell": "multiclass"})
    clash = SharedBottom(InputArch(FEATURES, embedding_dim=4), ["user_ids", "cvr"])
    with pytest.raises(ValueError, match=r"clash.*user_ids"):
        RecExportView(clash, {"user_ids": "binary", "cvr": "binary"})
    with pytest.raises(TypeError, match="MultiTaskModel"):
        RecExportView(torch.nn.Linear(2, 2), KINDS)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ mtrec-export end to end


def compose_config(name: str, *overrides: str) -> DictConfig:
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def export_cfg(*overrides: str) -> DictConfig:
    return compose_config("export", *overrides)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run")
    cfg = compose_config("mtrec", *TRAIN_TINY)
    run(cfg, path)
    return path


@pytest.fixture(scope="module")
def first_export(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> sx.ExportResult:
    """Version 1 of model ``rec`` exported from the run; tests copy the repository before changing it."""
    repo = tmp_path_factory.mktemp("repo")
    return export_run(export_cfg(f"run_dir={run_dir}", f"repository={repo}", "model_name=rec"))


def copy_repository(first: sx.ExportResult, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(first.repository, repo)
    return repo


def test_export_run_writes_versions_features_and_parity(
    run_dir: Path, first_export: sx.ExportResult, tmp_path: Path
) -> None:
    repo = copy_repository(first_export, tmp_path)
    first = first_export
    second = export_run(
        export_cfg(
            f"run_dir={run_dir}",
            f"repository={repo}",
            "model_name=rec",
            "serving.max_batch_size=256",
            "serving.instance_count=2",
        )
    )
    assert (first.version, second.version) == (1, 2)
    assert available_versions(repo, "rec") == [1, 2]
    cfg = read_config(repo, "rec")
    assert cfg == second.config and cfg.max_batch_size == 256 and cfg.instance_count == 2
    assert [t.name for t in cfg.outputs] == ["click", "conversion", "dwell"]

    info = json.loads((repo / "rec" / "2" / "export.json").read_text())
    assert info["source"]["run_dir"] == str(run_dir.resolve())
    assert info["source"]["checkpoint"].endswith("best.pt")
    assert info["precision"] == "fp32" and info["opset"] >= 18
    assert {"torch", "onnx", "onnxruntime"} <= set(info["versions"])
    assert info["parity"]["passed"] and info["parity"]["atol"] == 1e-5
    assert all(v["max_abs_diff"] <= 1e-5 for v in info["parity"]["batch_sizes"].values())

    features = json.loads((repo / "rec" / FEATURES_FILE).read_text())
    trained = json.loads((run_dir / FEATURES_FILE).read_text())
    assert {k: features[k] for k in trained} == trained  # the run's features.json, extended
    assert features["inputs"]["history"] == {
        "input": "history_ids",
        "lengths_input": "history_lengths",
        "datatype": "INT64",
        "padding_length": 6,
        "padding_id": 0,
        "pooling": "mean",
        "num_embeddings": 200,
        "vocabulary": False,
        "oov_id": None,
    }
    assert features["inputs"]["d3"]["input"] == "dense" and features["inputs"]["d3"]["column"] == 3
    assert features["outputs"]["dwell"]["value"] == "prediction"
    assert features["outputs"]["click"]["value"] == "probability"
    assert [t["name"] for t in features["tensors"]] == [t.name for t in cfg.inputs]
    assert json.loads((repo / "rec" / "1" / FEATURES_FILE).read_text()) == features

    # The served model gives the trained model's numbers on rows the encoder makes from raw values.
    loaded = load_run(run_dir)
    rows = [
        {
            "d0": 0.5,
            "d1": -1,
            **{f"d{j}": 0.1 * j for j in range(2, 8)},
            "user_id": 3,
            "item_id": 7,
            "category": 2,
            "history": [1, 2, 3],
        },
        {**{f"d{j}": -0.2 for j in range(8)}, "user_id": 99, "item_id": 0, "category": 9, "history": []},
    ]
    inputs = RawFeatureEncoder.from_repository(repo, "rec").encode(rows)
    got = ort_run(second.model_path, inputs)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    want = torch_outputs(loaded.model, loaded.model.features, tensors, loaded.task_kinds)
    for t in want:
        np.testing.assert_allclose(got[t], want[t], rtol=0, atol=1e-5)


def test_version_conflicts_and_broken_parity_leave_nothing_behind(
    run_dir: Path, first_export: sx.ExportResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = copy_repository(first_export, tmp_path)
    (repo / "rec" / "3").mkdir()  # a number is taken by any directory, complete or not
    args = [f"run_dir={run_dir}", f"repository={repo}", "model_name=rec"]
    for taken in (1, 3):
        with pytest.raises(sx.ExportError, match=rf"version {taken} of model 'rec' already exists.*free one \(4\)"):
            export_run(export_cfg(*args, f"version={taken}"))

    # A broken export: the written graph computes another model (the same graph, other weights).
    other = onnx.load(str(first_export.model_path))
    rng = np.random.default_rng(0)
    for init in other.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            w = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(w + 0.05 * rng.standard_normal(w.shape, np.float32), init.name))

    def broken_export(view: torch.nn.Module, path: Path, **kwargs: object) -> Path:
        onnx.save(other, str(path))
        return Path(path)

    monkeypatch.setattr(sx, "export_onnx", broken_export)
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    with pytest.raises(sx.ParityError, match="parity check failed") as err:
        export_run(export_cfg(*args))
    assert err.value.report.max_diff(1) > 1e-5
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before, "no version dir, no temp dir"
    with pytest.raises(sx.ParityError):
        export_run(export_cfg(f"run_dir={run_dir}", f"repository={repo}", "model_name=fresh"))
    assert not (repo / "fresh").exists()


def test_bad_inputs_give_clear_errors(run_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        export_run(export_cfg(f"run_dir={tmp_path / 'nope'}", f"repository={repo}", "model_name=m"))
    for missing in ("best.pt", "config.yaml", "features.json"):
        partial = tmp_path / f"without_{missing}"
        partial.mkdir()
        for f in ("best.pt", "config.yaml", "features.json"):
            if f != missing:
                (partial / f).write_bytes((run_dir / f).read_bytes())
        with pytest.raises(FileNotFoundError, match=rf"{missing}: missing"):
            load_run(partial)
    with pytest.raises(ValueError, match="reposiotry"):
        export_config({"run_dir": str(run_dir), "reposiotry": str(repo), "model_name": "m"})
    with pytest.raises(ValueError, match="model_name"):
        export_config({"run_dir": str(run_dir), "repository": str(repo)})
    with pytest.raises(ValueError, match="checkpoint must be 'best' or 'last'"):
        load_run(run_dir, "middle")
    with pytest.raises(Exception, match="reposiotry"):
        export_cfg(f"run_dir={run_dir}", "reposiotry=x", "model_name=m")
    with pytest.raises(sx.ExportError, match="model name"):
        export_run(export_cfg(f"run_dir={run_dir}", f"repository={repo}", "model_name=a/b"))
    with pytest.raises(ValueError, match="max_batch_size"):
        export_run(export_cfg(f"run_dir={run_dir}", f"repository={repo}", "model_name=m", "serving.max_batch_size=0"))
    assert not repo.exists()


def test_cli_fails_with_nonzero_exit_and_the_reason(run_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "rec" / "1").mkdir(parents=True)  # version 1 is taken
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtrec.cli.export",
            f"run_dir={run_dir}",
            f"repository={repo}",
            "model_name=rec",
            "version=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "version 1 of model 'rec' already exists" in proc.stderr + proc.stdout
    assert sorted(p.name for p in (repo / "rec").iterdir()) == ["1"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"run_dir \S+/target: no such directory \(expected the directory of a mtrec-train run\)$"),
        ("empty", r"run_dir \S+/target: not a mtrec-train run, it has no config.yaml, .*; pass the directory a "
                  r"mtrec-train run wrote \(its hydra.run.dir"),
        ("multirun", r"run_dir \S+/target: not a mtrec-train run, .* \(it holds the runs 0, 1\); pass the "
                     r"directory"),
        ("rl", r"run_dir \S+/target: a mtrl-train run \(its config.yaml has 'agent' and 'env' nodes\).*"
               r"mtrl.export.export_run"),
    ],
)  # fmt: skip
def test_cli_refuses_a_run_dir_that_is_no_mtrec_run_in_one_line(
    case: str, message: str, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    target = tmp_path / "target"
    if case != "missing":
        target.mkdir()
    if case == "multirun":  # a Hydra multirun folder: one run per job number
        for job in ("0", "1"):
            shutil.copytree(run_dir, target / job)
    if case == "rl":  # what mtrl-train writes: a config with agent and env, last.pt, no features.json
        (target / "config.yaml").write_text("seed: 0\nenv: {_target_: mtrl.envs.make_family}\nagent: {hidden: [8]}\n")
        (target / "last.pt").write_bytes(b"")
    args = [f"run_dir={target}", f"repository={tmp_path / 'repo'}", "model_name=m"]
    code, err = run_main(export_main, args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.match(rf"mtrec-export: error: {message}", err.strip()), err
    assert not (tmp_path / "repo").exists()
    if case == "empty":  # MTLIB_DEBUG=1 shows the traceback
        code, err = run_main(export_main, args, monkeypatch, capsys, debug=True)
        assert code == 1 and "Traceback" in err and "InputNotFoundError" in err, err


def test_cli_refuses_an_existing_version_in_one_line(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exporting into a version that exists is a user mistake: one line, exit 2, the version left as it was."""
    repo = tmp_path / "repo"
    args = [f"run_dir={run_dir}", f"repository={repo}", "model_name=m", "version=1", "parity.batch_sizes=[1]"]
    code, err = run_main(export_main, args, monkeypatch, capsys)
    assert code == 0, err
    before = (repo / "m" / "1" / "model.onnx").read_bytes()
    code, err = run_main(export_main, args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.match(r"mtrec-export: error: version 1 of model 'm' already exists .*next free one \(2\)", err.strip())
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == before


# ------------------------------------------------------------------------------------------------ fp16


def test_fp16_variant_keeps_fp32_io_and_meets_its_tolerance(tmp_path: Path) -> None:
    model = build("mmoe")
    view = RecExportView(model, KINDS)
    result = sx.export_to_repository(view, tmp_path, "half", fp16=True)
    assert result.info["precision"] == "fp16" and result.parity.passed
    atol, rtol = sx.ParityOptions().tolerance(fp16=True)
    assert (result.parity.atol, result.parity.rtol) == (atol, rtol) == (2e-3, 1e-2)
    graph = onnx.load(str(result.model_path)).graph
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    weights = [i for i in graph.initializer if i.data_type in floats and np.prod(i.dims) > 8]
    assert weights and {i.data_type for i in weights} == {onnx.TensorProto.FLOAT16}
    assert read_config(tmp_path, "half").inputs[0].datatype == "FP32"
    rows = padded_rows(FEATURES, 200, seed=9)
    got, want = ort_run(result.model_path, rows), torch_outputs(model, FEATURES, rows)
    for t in want:
        assert got[t].dtype == np.float32
        diff = np.abs(got[t] - want[t])
        assert np.all(diff <= atol + rtol * np.abs(want[t])), (t, diff.max())
        assert diff.max() > 1e-7, "a half-precision graph rounds"


# ------------------------------------------------------------------------------------------ raw encoder


def _run_features(bundle: DataBundle) -> dict:
    """What mtrec.train.run writes as features.json (JSON round trip included)."""
    return json.loads(
        json.dumps(
            {
                "features": bundle.features.to_dict(),
                "tasks": [{"name": t.name, "kind": t.kind} for t in bundle.tasks],
                "meta": bundle.meta,
            },
            default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v),
        )
    )


def encoder_matching_the_reader(bundle: DataBundle, raw: Sequence[Sequence[dict]]) -> RawFeatureEncoder:
    """The export-side encoder of ``bundle``'s run, after checking that it encodes the raw rows of each split
    (``raw``: train, val, test) to the very tensors the reader produced for training, bit for bit."""
    kinds = {t.name: t.kind for t in bundle.tasks}
    model = SharedBottom(InputArch(bundle.features, embedding_dim=2), list(kinds), bottom_dims=[4])
    encoder = RawFeatureEncoder(serving_features(_run_features(bundle), RecExportView(model, kinds)))
    for part, rows in zip((bundle.train, bundle.val, bundle.test), raw):
        inputs = encoder.encode(rows)
        assert inputs["dense"].dtype == np.float32
        np.testing.assert_array_equal(inputs["dense"].view(np.uint32), part.dense.numpy().view(np.uint32))
        for name in bundle.features.sparse_names:
            np.testing.assert_array_equal(inputs[f"{name}_ids"], part.sparse_ids[name].numpy(), err_msg=name)
            assert np.all(inputs[f"{name}_lengths"] == 1)
    return encoder


def split_rows(rows: Sequence[dict], seed: int) -> list[list[dict]]:
    """The rows of each split of a 70/15/15 split of one file by ``seed``, in file order."""
    parts = split_parts(seed, 0, len(rows), (0.7, 0.85), 0, len(rows))
    return [[rows[i] for i in np.flatnonzero(parts == k)] for k in range(3)]


def census_raw(lines: Sequence[str], n_main: int, seed: int) -> list[list[dict]]:
    """The raw rows of each split of ``load_census(..., seed=seed)`` on ``lines`` (no test file)."""
    return split_rows([dict(zip(CENSUS_COLUMNS, line.rstrip("\n").split(","))) for line in lines[:n_main]], seed)


def test_census_encoder_matches_the_reader_on_synthetic_rows(tmp_path: Path) -> None:
    lines = census_lines(400, seed=1)
    path = tmp_path / "census.csv"
    path.write_text("".join(lines))
    bundle = load_census(path, tasks=["income", "marital"], seed=5)
    encoder = encoder_matching_the_reader(bundle, census_raw(lines, len(lines), seed=5))
    ids = encoder.encode(census_raw(lines, len(lines), seed=5)[2])["country_self_ids"]
    assert (ids == 0).any() and (ids > 0).any(), "'?' and unseen countries: the out-of-vocabulary id"


def test_census_encoder_matches_the_reader_and_serves_its_rows(census_path: Path, tmp_path: Path) -> None:
    with gzip.open(census_path, "rt") as f:
        lines = [next(f) for _ in range(3000)]
    subset = tmp_path / "census.csv"
    subset.write_text("".join(lines))
    bundle = load_census(subset, tasks=["income", "marital"], seed=3)
    encoder = encoder_matching_the_reader(bundle, census_raw(lines, len(lines), seed=3))
    raw = census_raw(lines, len(lines), seed=3)[2]
    inputs = encoder.encode(raw)
    assert any((inputs[f"{n}_ids"] == 0).any() for n in bundle.features.sparse_names), "some OOV / '?' values"
    # Hand-made raw values: a missing number is the train mean (0), an unseen category the OOV id 0.
    odd = encoder.encode([{**raw[0], "age": " ?", "education": " Unheard of", "sex": "Female"}])
    assert odd["dense"][0, 0] == 0.0 and odd["education_ids"][0, 0] == 0
    assert odd["sex_ids"][0, 0] == bundle.meta["vocabularies"]["sex"].index("Female") + 1
    # Raw rows -> encoder -> ONNX Runtime gives what the model gives on the reader's batch.
    torch.manual_seed(0)
    arch = InputArch(bundle.features, embedding_dim=4)
    model = MMoE(arch, ["income", "marital"], num_experts=2, expert_dims=[4]).eval()
    path = sx.export_onnx(RecExportView(model, {"income": "binary", "marital": "binary"}), tmp_path / "census.onnx")
    got = ort_run(path, inputs)
    with torch.no_grad():
        logits = model(*bundle.test.batch(torch.arange(len(bundle.test)))[:2])
    for t in ("income", "marital"):
        np.testing.assert_allclose(got[t][:, 0], torch.sigmoid(logits[t]).numpy(), rtol=0, atol=1e-5)


def aliexpress_raw(path: Path, seed: int) -> list[list[dict]]:
    """The raw rows (numbers as floats) of each split of ``load_aliexpress(path, seed=seed)``."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    rows = [{k: float(v) for k, v in zip(header, line.split(","))} for line in lines[1:]]
    return split_rows(rows, seed)


def test_aliexpress_encoder_matches_the_reader_on_synthetic_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = [
        make_row(i, click=int(rng.integers(2)), conversion=int(rng.integers(2)),
                 **{f"categorical_{j}": int(rng.integers(30)) * 7919 for j in range(1, 17)},
                 **{f"numerical_{j}": round(float(rng.normal(3, 2)), int(rng.integers(1, 7))) for j in range(1, 64)})
        for i in range(200)
    ]  # fmt: skip
    path = write_csv(tmp_path / "ali.csv", rows)
    encoder_matching_the_reader(load_aliexpress(path, seed=4), aliexpress_raw(path, seed=4))


def test_aliexpress_encoder_matches_the_reader(aliexpress_path: Path) -> None:
    bundle = load_aliexpress(aliexpress_path, seed=0)
    raw = aliexpress_raw(aliexpress_path, seed=0)
    encoder = encoder_matching_the_reader(bundle, raw)
    unseen = encoder.encode([{**raw[2][0], "categorical_1": None, "categorical_2": 10**12}])
    assert unseen["categorical_1_ids"][0, 0] == 0 and unseen["categorical_2_ids"][0, 0] == 0
    assert unseen["categorical_1_lengths"][0, 0] == 1  # an unknown value is the OOV id, not an empty bag


def test_encoder_pads_bags_and_rejects_bad_rows() -> None:
    model = build("shared_bottom")
    run_features = {
        "features": FEATURES.to_dict(),
        "tasks": [{"name": t, "kind": KINDS[t]} for t in TASKS],
        "meta": {"source": "sparse_synthetic"},
    }
    encoder = RawFeatureEncoder(serving_features(run_features, RecExportView(model, KINDS)))
    row = {"d0": 1.5, "d1": 0, "d2": -2, "user": 7, "hist": [3, 1], "item": 4, "tags": []}
    out = encoder.encode([row, {**row, "hist": [1, 2, 3, 4, 5], "tags": (9,)}])
    assert sorted(out) == sorted(s.name for s in RecExportView(model, KINDS).input_specs)
    np.testing.assert_array_equal(out["dense"], np.array([[1.5, 0, -2]] * 2, dtype=np.float32))
    np.testing.assert_array_equal(out["hist_ids"], [[3, 1, 0, 0, 0], [1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(out["hist_lengths"], [[2], [5]])
    np.testing.assert_array_equal(out["tags_lengths"], [[0], [1]])
    missing = encoder.encode([{**row, "tags": [None, 3], "user": None}])  # no vocabulary: None is no id
    np.testing.assert_array_equal(missing["tags_ids"], [[3, 0, 0, 0]])
    assert missing["tags_lengths"][0, 0] == 1 and missing["user_lengths"][0, 0] == 0
    assert out["user_ids"].dtype == V2_TO_NUMPY["INT64"] and out["user_lengths"].shape == (2, 1)
    with pytest.raises(ValueError, match=r"row 0 lacks features \['tags'\]"):
        encoder.encode([{k: v for k, v in row.items() if k != "tags"}])
    with pytest.raises(ValueError, match=r"row 1, feature 'hist': 6 ids, at most 5"):
        encoder.encode([row, {**row, "hist": list(range(6))}])
    with pytest.raises(ValueError, match=r"row 0, feature 'user': ids \[50\] outside \[0, 50\)"):
        encoder.encode([{**row, "user": 50}])
    with pytest.raises(ValueError, match="'d1'"):
        encoder.encode([{**row, "d1": "abc"}])
    with pytest.raises(ValueError, match="features.json"):
        RawFeatureEncoder(run_features)


def test_doctest_examples_run() -> None:
    import doctest

    import mtrec.export

    result = doctest.testmod(mtrec.export, verbose=False)
    assert result.failed == 0 and result.attempted >= 8
