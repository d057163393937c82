"""The files reader (mtrec/data/files.py) and its schema (mtrec/data/schema.py): pinned hashed ids, the schema's
checks, the streamed order (every row once per epoch across workers and ranks, seeded shuffles, exact restarts),
train statistics, serving-side encoding bit for bit, bad input named by file, and mtrec-train on Parquet and CSV."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import xxhash

from mtrec.data.batch import TabularDataset
from mtrec.data.encoding import FilesEncoding, value_encoding
from mtrec.data.errors import DataError
from mtrec.data.files import FileDataset, load_files
from mtrec.data.filetools import write_synthetic
from mtrec.data.schema import (
    HASH_SEED,
    Schema,
    SparseColumn,
    Vocabulary,
    canonical_keys,
    hash_keys,
    load_schema,
    sparse_ids,
)
from mtrec.export import RawFeatureEncoder, RecExportView, serving_features
from mtrec.models import InputArch, SharedBottom

SCHEMA = {
    "dense": [
        {"name": "row"},
        {"name": "price", "transform": "log1p", "fill": 1.5},
        {"name": "age", "transform": "standardize"},
    ],
    "sparse": [
        {"name": "user_id", "num_embeddings": 1000},
        {"name": "item", "num_embeddings": 50, "vocabulary": {"min_count": 2}},
        {"name": "history", "num_embeddings": 200, "max_len": 3, "pooling": "mean"},
    ],
    "labels": [{"name": "click", "kind": "binary"}, {"name": "dwell", "kind": "regression"}],
}


def clicks(n: int, start: int = 0, seed: int = 0) -> pa.Table:
    """A click log with string user ids, int item ids, a list column with nulls, nulls in a dense column."""
    rng = np.random.default_rng(seed)
    price = rng.exponential(10.0, n)
    history = [
        None if r % 7 == 0 else [f"i{(r * 3 + k) % 40}" if k != 1 or r % 5 else None for k in range(r % 6)]
        for r in range(start, start + n)
    ]
    click = rng.random(n) < 0.4
    return pa.table(
        {
            "row": pa.array(np.arange(start, start + n)),
            "price": pa.array(price, mask=np.arange(n) % 9 == 0),
            "age": pa.array(rng.integers(18, 80, n)),
            "user_id": pa.array([f"u{int(u)}" for u in rng.integers(0, 60, n)]),
            "item": pa.array(rng.integers(0, 30, n)),
            "history": pa.array(history, pa.list_(pa.string())),
            "click": pa.array(click.astype(np.int64)),
            "dwell": pa.array(np.where(click, rng.exponential(3.0, n), 0.0)),
            "unused": pa.array(["x"] * n),
        }
    )


def write_schema(path: Path, schema: dict | None = None) -> Path:
    path.write_text(json.dumps(schema or SCHEMA))  # JSON is YAML
    return path


def write_splits(root: Path, rows: int = 400, files: int = 3, row_group_size: int = 50) -> dict[str, str]:
    """Parquet train files (several row groups each) and val/test files; the globs and the schema file."""
    out: dict[str, str] = {}
    start = 0
    for split, n_files in (("train", files), ("val", 1), ("test", 1)):
        (root / split).mkdir(parents=True)
        for f in range(n_files):
            pq.write_table(
                clicks(rows, start, seed=start), root / split / f"part-{f}.parquet", row_group_size=row_group_size
            )
            start += rows
        out[split] = str(root / split / "*.parquet")
    out["schema"] = str(write_schema(root / "schema.yaml"))
    return out


def rows_of(batches) -> list[int]:
    return [int(r) for b in batches for r in b.dense[:, 0].tolist()]


# ---------------------------------------------------------------------------------------------- hashing


def test_hashed_ids_are_pinned() -> None:
    # Computed once with xxhash.xxh64_intdigest(utf8(key), HASH_SEED); changing the hash changes every model.
    assert HASH_SEED == 0x6D746C6962
    assert xxhash.xxh64_intdigest(b"alice", HASH_SEED) == 17176159633237960845
    assert hash_keys(["alice", "bob", "123", "-7", "日本"], 1000).tolist() == [31, 617, 370, 741, 148]
    assert hash_keys(["alice", "bob", "123"], 1 << 40).tolist() == [201485698696, 509559676916, 25720741342]


def test_int_and_string_ids_share_keys_and_missing_is_zero() -> None:
    column = SparseColumn("u", 1000)
    ints, _ = sparse_ids(pa.array([123, None, -7, 123]), column)
    strings, _ = sparse_ids(pa.array(["123", "", None, "-7"]), column)
    floats, lengths = sparse_ids(pa.array([123.0, None, -7.0, 123.0]), column)
    assert ints[:, 0].tolist() == [370, 0, 741, 370]
    assert strings[:, 0].tolist() == [370, 0, 0, 741]
    assert floats[:, 0].tolist() == ints[:, 0].tolist() and lengths.tolist() == [1, 1, 1, 1]
    with pytest.raises(TypeError, match="non-integral"):
        canonical_keys(pa.array([1.5]))
    with pytest.raises(TypeError, match="integers or strings"):
        canonical_keys(pa.array([True]))


def test_list_ids_drop_missing_truncate_and_split_csv_strings() -> None:
    column = SparseColumn("h", 1000, max_len=2)
    a, b, c = hash_keys(["a", "b", "c"], 1000).tolist()
    ids, lengths = sparse_ids(pa.array([["a", "b", "c"], None, [], [None, "b"], ["", "c"]]), column)
    assert ids.tolist() == [[a, b], [0, 0], [0, 0], [b, 0], [c, 0]] and lengths.tolist() == [2, 0, 0, 1, 1]
    split, split_lengths = sparse_ids(pa.array(["a|b|c", None, "", "|b", "|c"]), column)
    assert split.tolist() == ids.tolist() and split_lengths.tolist() == lengths.tolist()
    with pytest.raises(TypeError, match="scalar is expected"):
        sparse_ids(pa.array([["a"]]), SparseColumn("u", 10))


def test_vocabulary_keeps_frequent_keys_most_frequent_first() -> None:
    vocab = Vocabulary.fit({"a": 3, "b": 5, "c": 1, "d": 3}, min_count=2, size=2)
    assert vocab.tokens == ["b", "a"]
    column = SparseColumn("v", 3, min_count=2)
    assert sparse_ids(pa.array(["a", "b", "d", None]), column, vocab)[0][:, 0].tolist() == [2, 1, 0, 0]


# ----------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"dense": [{"name": "x", "transfrom": "log1p"}]},
            r"dense\[0\] \('x'\): unknown key 'transfrom'; valid keys: name, transform, fill",
        ),
        (
            {"dense": [{"name": "x", "transform": "log"}]},
            r"dense\[0\] \('x'\): transform 'log' is not one of none, log1p, standardize",
        ),
        ({"sparse": [{"name": "u"}]}, r"sparse\[0\] \('u'\): num_embeddings is required"),
        ({"sparse": [{"name": "u", "num_embeddings": 1}]}, r"num_embeddings must be an integer >= 2"),
        ({"sparse": [{"name": "u", "num_embeddings": 9, "vocabulary": {"min": 2}}]}, "vocabulary must be"),
        ({"labels": [{"name": "y", "kind": "ranking"}]}, r"labels\[0\] \('y'\): kind 'ranking' is not one of binary"),
        ({"labels": []}, "'labels' is empty"),
        ({"extra": []}, "unknown key 'extra'; valid keys: dense, sparse, labels"),
        ({"dense": [{"name": "click"}]}, "column 'click' appears in dense and in labels"),
    ],
)
def test_schema_errors_name_the_entry_and_the_valid_values(tmp_path: Path, change: dict, message: str) -> None:
    path = write_schema(tmp_path / "s.yaml", {"labels": [{"name": "click"}], **change})
    with pytest.raises(ValueError, match=message):
        load_schema(path)


def test_schema_round_trips_through_its_dict(tmp_path: Path) -> None:
    schema = load_schema(write_schema(tmp_path / "s.yaml"))
    assert Schema.from_dict(schema.to_dict()) == schema
    spec = schema.feature_spec()
    assert spec.dense_names == ("row", "price", "age")
    assert [(f.name, f.max_len, f.pooling) for f in spec.sparse] == [
        ("user_id", 1, "sum"),
        ("item", 1, "sum"),
        ("history", 3, "mean"),
    ]
    assert [(t.name, t.kind) for t in schema.tasks()] == [("click", "binary"), ("dwell", "regression")]


# ------------------------------------------------------------------------------------------------ stream


def test_workers_and_ranks_read_every_row_once(tmp_path: Path) -> None:
    paths = write_splits(tmp_path, rows=300, files=3, row_group_size=40)  # 3 x 8 row groups
    bundle = load_files(**paths, shuffle_buffer=64, progress=False)
    train = bundle.train
    expected = list(range(900))
    for workers in (0, 2):
        seen: list[int] = []
        for rank in range(2):
            part = FileDataset(train.units, train.schema, train.stats, num_workers=workers, shuffle_buffer=64,
                               rank=rank, world_size=2)  # fmt: skip
            got = rows_of(part.batches(32, shuffle=True, seed=3, epoch=1))
            assert len(got) > 300
            seen += got
        assert sorted(seen) == expected, workers
    single = rows_of(train.batches(32, shuffle=True, seed=3, epoch=1))
    assert sorted(single) == expected and single != expected
    assert len(list(train.batches(32, shuffle=True, seed=3, epoch=1))) == train.num_batches(32, epoch=1, seed=3)


def test_shuffle_is_seeded_and_a_restart_sees_the_same_batches(tmp_path: Path) -> None:
    bundle = load_files(**write_splits(tmp_path), shuffle_buffer=100, num_workers=2, progress=False)
    train = bundle.train
    first = rows_of(train.batches(16, shuffle=True, seed=1, epoch=0))
    assert rows_of(train.batches(16, shuffle=True, seed=1, epoch=0)) == first
    assert rows_of(train.batches(16, shuffle=True, seed=1, epoch=1)) != first
    assert rows_of(train.batches(16, shuffle=True, seed=1, epoch=0, start=5)) == first[5 * 16 :]
    # val and test are read unshuffled: in file order by one reader, every row once by several
    val = bundle.val
    assert sorted(rows_of(val.batches(64))) == list(range(1200, 1600))
    in_order = FileDataset(val.units, val.schema, val.stats, num_workers=0)
    assert rows_of(in_order.batches(64)) == list(range(1200, 1600))


def test_in_memory_holds_the_tensors_the_stream_gives(tmp_path: Path) -> None:
    paths = write_splits(tmp_path, rows=100, files=3, row_group_size=30)
    streamed = load_files(**paths, progress=False)
    held = load_files(**paths, progress=False, in_memory=True)
    assert isinstance(held.train, TabularDataset) and held.meta == streamed.meta
    for split in ("train", "val", "test"):
        a = next(iter(getattr(streamed, split).batches(10_000)))
        b = getattr(held, split)
        assert len(b) == len(getattr(streamed, split)) == a.batch_size
        assert torch.equal(a.dense, b.dense) and a.labels.keys() == b.labels.keys()
        assert all(torch.equal(a.labels[k], b.labels[k]) for k in a.labels)
        kjt = b.batch(torch.arange(len(b))).sparse
        for key in a.sparse.keys():
            assert torch.equal(a.sparse[key].values(), kjt[key].values())
            assert torch.equal(a.sparse[key].lengths(), kjt[key].lengths())
    # every rank holds the whole split (each takes its part of every global batch); no unit: no rows, same columns
    val = streamed.val
    whole = FileDataset(val.units, val.schema, val.stats, rank=1, world_size=2).materialize()
    assert torch.equal(whole.dense, held.val.dense)
    empty = FileDataset([], val.schema, val.stats).materialize()
    assert len(empty) == 0 and empty.dense.shape == (0, 3)
    assert empty.batch(torch.arange(0)).sparse.keys() == ["user_id", "item", "history"]


def test_batches_follow_the_batch_contract_and_statistics_come_from_train(tmp_path: Path) -> None:
    bundle = load_files(**write_splits(tmp_path), progress=False)
    train = [clicks(400, s, seed=s) for s in (0, 400, 800)]
    age = np.concatenate([t.column("age").to_numpy() for t in train]).astype(np.float64)
    stats = bundle.meta["statistics"]["age"]
    assert stats["mean"] == pytest.approx(age.mean(), rel=1e-12) and stats["std"] == pytest.approx(age.std(), rel=1e-12)
    assert bundle.meta["hashing"]["seed"] == HASH_SEED and bundle.meta["rows"] == {
        "train": 1200,
        "val": 400,
        "test": 400,
    }
    items = np.concatenate([t.column("item").to_numpy() for t in train])
    kept = {str(v) for v, c in zip(*np.unique(items, return_counts=True), strict=True) if c >= 2}
    assert set(bundle.meta["vocabularies"]["item"]) == kept
    batch = next(iter(bundle.train.batches(64, shuffle=True, seed=0)))
    assert batch.dense.dtype == torch.float32 and batch.dense.shape == (64, 3)
    assert batch.sparse.keys() == ["user_id", "item", "history"]
    assert batch.sparse["user_id"].lengths().tolist() == [1] * 64
    assert int(batch.sparse["history"].lengths().max()) <= 3
    assert set(batch.labels) == {"click", "dwell"} and set(batch.labels["click"].unique().tolist()) <= {0.0, 1.0}


def test_serving_encoder_gives_the_training_tensors_bit_for_bit(tmp_path: Path) -> None:
    bundle = load_files(**write_splits(tmp_path), progress=False)
    meta = json.loads(json.dumps(bundle.meta))  # as features.json holds it
    encoding = value_encoding(meta)
    assert isinstance(encoding, FilesEncoding) and encoding.truncates
    (batch,) = bundle.val.batches(400)
    raw = clicks(400, 1200, seed=1200).to_pylist()
    for j, name in enumerate(("row", "price", "age")):
        served = encoding.dense(name, [r[name] for r in raw])
        np.testing.assert_array_equal(served.view(np.uint32), batch.dense[:, j].numpy().view(np.uint32), err_msg=name)
    for name in ("user_id", "item", "history"):
        served = [encoding.ids(name, r[name] if isinstance(r[name], list) else [r[name]], 0) for r in raw]
        jt = batch.sparse[name]
        assert [len(s) for s in served] == jt.lengths().tolist(), name
        assert [i for s in served for i in s] == jt.values().tolist(), name
    # the export's encoder (mtrec.export.RawFeatureEncoder) of such a run: padded ids, lists cut to max_len
    kinds = {t.name: t.kind for t in bundle.tasks}
    model = SharedBottom(InputArch(bundle.features, embedding_dim=2), list(kinds), bottom_dims=[4])
    run_features = {"features": bundle.features.to_dict(), "tasks": [{"name": k} for k in kinds], "meta": meta}
    inputs = RawFeatureEncoder(serving_features(run_features, RecExportView(model, kinds))).encode(raw)
    np.testing.assert_array_equal(inputs["dense"].view(np.uint32), batch.dense.numpy().view(np.uint32))
    assert max(len(r["history"] or []) for r in raw) > 3
    for name in ("user_id", "item", "history"):
        lengths = inputs[f"{name}_lengths"][:, 0]
        assert lengths.tolist() == batch.sparse[name].lengths().tolist(), name
        mask = np.arange(inputs[f"{name}_ids"].shape[1])[None, :] < lengths[:, None]
        assert inputs[f"{name}_ids"][mask].tolist() == batch.sparse[name].values().tolist(), name


# -------------------------------------------------------------------------------------------- bad input


def _bundle(tmp_path: Path, table: pa.Table | None = None, schema: dict | None = None, **kw):
    paths = write_splits(tmp_path, rows=100, files=1)
    if table is not None:
        pq.write_table(table, tmp_path / "train" / "part-0.parquet", row_group_size=30)
    if schema is not None:
        write_schema(Path(paths["schema"]), schema)
    paths.update(kw)
    return load_files(**paths, progress=False)


def test_a_glob_that_matches_nothing_names_the_glob_and_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config key data.val: the glob '.*/nowhere/\*.parquet' matches no file"):
        _bundle(tmp_path, val=str(tmp_path / "nowhere" / "*.parquet"))


def test_a_missing_column_names_file_column_and_schema_entry(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train/part-0.parquet: no column 'age' \(schema dense\[2\]\)"):
        _bundle(tmp_path, clicks(100).drop_columns(["age"]))


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("age", pa.array([[1]] * 100), r"column 'age' \(schema dense\[2\]\) holds a list; it needs numbers"),
        ("price", pa.array(["12"] * 100), r"column 'price' \(schema dense\[1\]\) holds type string"),
        ("user_id", pa.array([["a"]] * 100), r"column 'user_id' \(schema sparse\[0\]\) holds a list where a scalar"),
        ("click", pa.array([[0]] * 100), r"column 'click' \(schema labels\[0\]\) holds a list"),
    ],
)
def test_a_type_that_does_not_fit_the_role(tmp_path: Path, column: str, values: pa.Array, message: str) -> None:
    table = clicks(100)
    table = table.set_column(table.schema.get_field_index(column), column, values)
    with pytest.raises(DataError, match=message):
        _bundle(tmp_path, table)


def test_a_string_in_a_dense_csv_column_names_the_file(tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(
        "row,price,age,user_id,item,history,click,dwell\n" + "1,2.0,30,u1,3,a|b,1,0.5\n" * 5 + "2,abc,30,u1,3,,0,0\n"
    )
    with pytest.raises(DataError, match=r"bad.csv: .*invalid value 'abc'"):
        list(_bundle(tmp_path, train=str(csv)).train.batches(4))


def test_a_corrupt_or_truncated_parquet_file_is_named(tmp_path: Path) -> None:
    paths = write_splits(tmp_path, rows=100, files=2)
    bad = tmp_path / "train" / "part-1.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match=r"part-1.parquet: not a readable Parquet file"):
        load_files(**paths, progress=False)


def test_a_null_label_names_file_row_group_and_row_or_is_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = clicks(100)
    dwell = table.column("dwell").to_numpy().copy()
    table = table.set_column(7, "dwell", pa.array(dwell, mask=np.isin(np.arange(100), [37, 38, 90])))
    bundle = _bundle(tmp_path, table)
    with pytest.raises(DataError, match=r"part-0.parquet field 'dwell': row group 1, row 7: label 'dwell' is null"):
        list(bundle.train.batches(16))
    train = bundle.train
    two_workers = FileDataset(train.units, train.schema, train.stats, num_workers=2)
    with pytest.raises(DataError, match=r"part-0.parquet field 'dwell': row group 1, row 7: label 'dwell' is null"):
        list(two_workers.batches(16))  # raised in a worker, the same error in the trainer's process
    schema = dict(SCHEMA, labels=[{"name": "click"}, {"name": "dwell", "kind": "regression", "on_null": "skip"}])
    (tmp_path / "again").mkdir()
    with caplog.at_level(logging.INFO, logger="mtrec.data.files"):
        rows = rows_of(_bundle(tmp_path / "again", table, schema).train.batches(16))
    assert sorted(rows) == [r for r in range(100) if r not in (37, 38, 90)]
    assert "skipped 3 rows with a null label" in caplog.text


# ---------------------------------------------------------------------------------------------- training


def test_mtrec_train_on_parquet_and_csv_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_train import run_main

    from mtrec.cli.train import main

    paths = write_splits(tmp_path / "data", rows=300, files=2)
    # one more train file, as gzipped CSV with the list column as a '|'-delimited string
    csv = clicks(200, 5000, seed=5).to_pydict()
    lines = ["row,price,age,user_id,item,history,click,dwell"]
    for r in range(200):
        hist = "|".join(v for v in (csv["history"][r] or []) if v is not None)
        price = "" if csv["price"][r] is None else repr(csv["price"][r])
        lines.append(f"{csv['row'][r]},{price},{csv['age'][r]},{csv['user_id'][r]},{csv['item'][r]},{hist},"
                     f"{csv['click'][r]},{csv['dwell'][r]}")  # fmt: skip
    with gzip.open(tmp_path / "data" / "train" / "extra.csv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    argv = [
        "data=files",
        f"data.train=[{paths['train']},{tmp_path / 'data' / 'train' / '*.csv.gz'}]",
        f"data.val={paths['val']}",
        f"data.test={paths['test']}",
        f"data.schema={paths['schema']}",
        "data.progress=false",
        "model=mmoe",
        "trainer.max_steps=5",
        "trainer.batch_size=64",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        f"hydra.run.dir={run_dir}",
    ]
    code, err = run_main(main, argv, monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) == {"click", "dwell"} and "auc" in metrics["test"]["click"]
    features = json.loads((run_dir / "features.json").read_text())
    assert features["meta"]["source"] == "files" and features["meta"]["rows"]["train"] == 800
    assert features["meta"]["schema"] == load_schema(paths["schema"]).to_dict()
    assert set(features["meta"]["statistics"]) == {"age"} and features["meta"]["hashing"]["function"] == "xxh64"

    code, err = run_main(main, [*argv[:1], "data.train=/nowhere/*.parquet", *argv[2:]], monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].endswith("config key data.train: the glob '/nowhere/*.parquet' matches no file")


def test_a_resumed_run_on_files_gives_the_same_weights(tmp_path: Path) -> None:
    from test_train import cfg, weights

    from mtrec.train import run

    paths = write_splits(tmp_path / "data", rows=300, files=2)  # 12 row groups of 50: ~10 batches an epoch
    common = [
        "data=files",
        *(f"data.{k}={v}" for k, v in paths.items()),
        "data.num_workers=2",
        "data.shuffle_buffer=128",
        "data.progress=false",
        "model=mmoe",
        "model.dropout=0.1",
        "trainer.batch_size=64",
        "trainer.progress=false",
        "trainer.tensorboard=false",
    ]
    run(cfg("trainer.max_steps=14", *common), tmp_path / "straight")
    run(cfg("trainer.max_steps=7", *common), tmp_path / "split")
    run(cfg("trainer.max_steps=14", "trainer.resume=true", *common), tmp_path / "split")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert json.loads((tmp_path / "split" / "run_info.json").read_text())["epochs"] >= 1
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------------------------- mtrec-data


def test_synthetic_files_are_written_a_row_group_at_a_time_and_read_back(tmp_path: Path) -> None:
    summary = write_synthetic(tmp_path / "clicks", 2500, num_users=300, num_items=200, rows_per_file=1000,
                              row_group_size=400, seed=3)  # fmt: skip
    assert summary["rows"] == {"train": 2500, "val": 250, "test": 250} and summary["files"]["train"] == 3
    groups = [pq.ParquetFile(p).metadata.num_row_groups for p in sorted((tmp_path / "clicks" / "train").iterdir())]
    assert groups == [3, 3, 2]
    bundle = load_files(**{k: summary[k] for k in ("train", "val", "test", "schema")}, progress=False)
    assert len(bundle.train) == 2500 and [t.name for t in bundle.tasks] == ["click", "conversion", "dwell"]
    batch = next(iter(bundle.train.batches(256, shuffle=True)))
    assert 0 < float(batch.labels["click"].mean()) < 1
    assert bool((batch.labels["conversion"] <= batch.labels["click"]).all())
    again = write_synthetic(tmp_path / "again", 2500, num_users=300, num_items=200, rows_per_file=1000,
                            row_group_size=400, seed=3)  # fmt: skip
    assert pq.read_table(again["train"].replace("*", "part-00001")).equals(
        pq.read_table(summary["train"].replace("*", "part-00001"))
    )
    with pytest.raises(ValueError, match="is not empty"):
        write_synthetic(tmp_path / "clicks", 10)


def test_mtrec_data_inspect_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mtrec.cli.data import main

    paths = write_splits(tmp_path, rows=100, files=2)
    main(["inspect", "--schema", paths["schema"], paths["train"]])
    report = json.loads(capsys.readouterr().out)
    assert report["files"] == 2 and report["units"] == 4 and report["rows"] == 200
    price_nulls = sum(clicks(100, s, seed=s).column("price").null_count for s in (0, 100))
    assert report["columns"]["price"] == {**report["columns"]["price"], "role": "dense", "nulls": price_nulls}
    assert report["columns"]["history"]["type"] == "list<element: string>"
    with pytest.raises(SystemExit) as stop:
        main(["inspect", "--schema", paths["schema"], str(tmp_path / "nowhere" / "*.parquet")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"mtrec-data: error: argument GLOB: the glob '{tmp_path / 'nowhere' / '*.parquet'}' matches no file"
    )


def test_a_model_learns_from_the_synthetic_files(tmp_path: Path) -> None:
    """Ids hashed alike in train and test, labels with their rows: two epochs on 40k rows rank test clicks well."""
    from test_train import cfg

    from mtrec.train import run

    s = write_synthetic(tmp_path / "c", 40000, num_users=2000, num_items=1000, row_group_size=5000, seed=1)
    metrics = run(
        cfg(
            "data=files",
            *(f"data.{k}={s[k]}" for k in ("train", "val", "test", "schema")),
            "data.progress=false",
            "model=mmoe",
            "trainer.max_epochs=2",
            "trainer.batch_size=512",
            "trainer.progress=false",
            "trainer.tensorboard=false",
            "optimizer.lr=0.01",
        ),
        tmp_path / "run",
    )
    assert metrics["test"]["click"]["auc"] > 0.7 and metrics["test"]["conversion"]["auc"] > 0.8


def test_an_exported_files_run_serves_raw_rows_as_the_model_saw_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """mtrec-export of a run on files; the repository's encoder turns raw Parquet rows into ONNX inputs whose
    outputs are the trained model's on the batch the reader built."""
    import onnxruntime as ort
    from test_train import cfg, run_main

    from mtrec.cli.export import main as export_main
    from mtrec.export import load_run
    from mtrec.train import run

    paths = write_splits(tmp_path / "data", rows=200, files=1)
    settings = [f"data.{k}={v}" for k, v in paths.items()]
    trainer = ["trainer.max_steps=3", "trainer.batch_size=64", "trainer.progress=false", "trainer.tensorboard=false"]
    run(cfg("data=files", *settings, "data.progress=false", "model=mmoe", *trainer), tmp_path / "run")
    argv = [f"run_dir={tmp_path / 'run'}", f"repository={tmp_path / 'models'}", "model_name=clicks"]
    code, err = run_main(export_main, argv, monkeypatch, capsys)
    assert code == 0, err
    encoder = RawFeatureEncoder.from_repository(tmp_path / "models", "clicks")
    raw = pq.read_table(paths["test"].replace("*", "part-0")).to_pylist()
    session = ort.InferenceSession(str(tmp_path / "models" / "clicks" / "1" / "model.onnx"))
    served = dict(zip([o.name for o in session.get_outputs()], session.run(None, encoder.encode(raw)), strict=True))
    bundle = load_files(**paths, progress=False)
    (batch,) = bundle.test.batches(len(raw))
    model = load_run(tmp_path / "run").model.eval()
    with torch.no_grad():
        out = model(batch.dense, batch.sparse)
    np.testing.assert_allclose(served["click"].ravel(), torch.sigmoid(out["click"]).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(served["dwell"].ravel(), out["dwell"].numpy(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- one glob, split


def _splitmix64(x: int) -> int:
    x &= 2**64 - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return x ^ (x >> 31)


def reference_parts(seed: int, file_index: int, n: int, bounds: tuple[float, float], block: int) -> list[int]:
    """The documented split rule, by hand in Python ints: within each block of ``block`` rows, rows ranked by
    splitmix64(row + splitmix64(seed ^ file_index * golden)); the first round(b0 * end) - round(b0 * start) ranks
    train, then val up to the second bound, the rest test."""
    salt = _splitmix64(seed ^ (file_index * 0x9E3779B97F4A7C15 % 2**64))
    cum = lambda b, x: int(np.floor(b * x + 0.5))  # noqa: E731
    parts = [0] * n
    for start in range(0, n, block):
        end = min(start + block, n)
        ranked = sorted(range(start, end), key=lambda r: _splitmix64(r + salt))
        n_train = cum(bounds[0], end) - cum(bounds[0], start)
        n_train_val = cum(bounds[1], end) - cum(bounds[1], start)
        for rank, r in enumerate(ranked):
            parts[r] = 0 if rank < n_train else 1 if rank < n_train_val else 2
    return parts


@pytest.mark.parametrize(("seed", "file_index", "n"), [(0, 0, 20), (7, 3, 3000), (12345, 1, 2049)])
def test_split_parts_follow_the_documented_rule_chunk_by_chunk(seed: int, file_index: int, n: int) -> None:
    from mtrec.data.files import SPLIT_BLOCK, Part, split_parts

    bounds = (0.7, 0.85)
    want = reference_parts(seed, file_index, n, bounds, SPLIT_BLOCK)
    assert split_parts(seed, file_index, n, bounds, 0, n).tolist() == want
    counts = np.bincount(want, minlength=3).tolist()
    assert counts == [round(0.7 * n + 1e-9), round(0.85 * n + 1e-9) - round(0.7 * n + 1e-9), n - round(0.85 * n + 1e-9)]
    # any cut into chunks (row groups, CSV blocks) gives the same parts, and a unit's count without its rows
    cuts = sorted({0, n, *np.random.default_rng(seed).integers(0, n, 6).tolist()})
    for a, b in zip(cuts, cuts[1:]):
        assert split_parts(seed, file_index, n, bounds, a, b).tolist() == want[a:b]
        for which in range(3):
            assert Part(which, bounds, seed, file_index, n, a).count(b - a) == want[a:b].count(which)
    assert split_parts(seed + 1, file_index, n, bounds, 0, n).tolist() != want or n < 3


def _csv_files(root: Path, sizes: list[int]) -> list[Path]:
    """Headerless CSV files: a unique row id, a spaced category, a number with '?' missing, a text label."""
    root.mkdir(parents=True, exist_ok=True)
    paths, row = [], 0
    for k, n in enumerate(sizes):
        lines = []
        for _ in range(n):
            number = "?" if row % 11 == 0 else str(row % 50)
            label = "yes" if row % 3 == 0 else "no"
            lines.append(f"{row}, c{row % 4}, {number}, {label}, {row % 2}")
            row += 1
        path = root / f"part-{k}.csv.gz"
        path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
        paths.append(path)
    return paths


TEXT_SCHEMA = {
    "csv": {"header": False, "columns": ["row", "cat", "x", "answer", "flag"], "strip": True, "null_values": ["?"]},
    "dense": [{"name": "row"}, {"name": "x", "transform": "standardize", "fill": "mean"}],
    "sparse": [{"name": "cat", "vocabulary": {"min_count": 1}}],
    "labels": [
        {"name": "yes", "column": "answer", "positive": ["yes"], "negative": ["no"]},
        {"name": "both", "all_of": ["flag", "flag"]},
    ],
}


def test_one_glob_split_three_ways_puts_every_row_in_one_split(tmp_path: Path) -> None:
    import csv

    paths = _csv_files(tmp_path / "data", [1500, 700, 40])
    schema = write_schema(tmp_path / "s.yaml", TEXT_SCHEMA)
    glob = str(tmp_path / "data" / "*.csv.gz")
    b = load_files(train=glob, schema=str(schema), split=[0.7, 0.15, 0.15], seed=3, in_memory=True, progress=False)
    # by hand: the rows of each file (gzip + csv), and each split's rows (the unique row ids)
    per_file = []
    for p in paths:
        with gzip.open(p, "rt", newline="") as f:
            per_file.append([int(r[0]) for r in csv.reader(f)])
    ids = {
        name: [int(v) for v in d.dense[:, 0].tolist()]
        for name, d in (("train", b.train), ("val", b.val), ("test", b.test))
    }
    everything = sorted(ids["train"] + ids["val"] + ids["test"])
    assert everything == sorted(sum(per_file, [])) == list(range(2240))  # each row exactly once
    for rows in per_file:  # each file's share is round(f * rows), cumulative
        n = len(rows)
        got = [sum(r in set(ids[s]) for r in rows) for s in ("train", "val", "test")]
        assert got == [
            round(0.7 * n + 1e-9),
            round(0.85 * n + 1e-9) - round(0.7 * n + 1e-9),
            n - round(0.85 * n + 1e-9),
        ]
    assert b.meta["rows"] == {k: len(v) for k, v in ids.items()}
    # statistics of the train rows only; '?' is missing and becomes the mean, 0
    xs = [r % 50 for r in ids["train"] if r % 11]
    assert b.meta["statistics"]["x"]["mean"] == pytest.approx(np.mean(xs))
    assert bool(torch.all(b.train.dense[torch.tensor([r % 11 == 0 for r in ids["train"]]), 1] == 0))
    # the derived labels, against the raw rule
    for name, d in (("train", b.train), ("val", b.val), ("test", b.test)):
        assert d.labels["yes"].tolist() == [float(r % 3 == 0) for r in ids[name]]
        assert d.labels["both"].tolist() == [float(r % 2) for r in ids[name]]
    # stripped text: the vocabulary holds 'c0'..'c3', not ' c0'
    assert sorted(b.meta["vocabularies"]["cat"]) == ["c0", "c1", "c2", "c3"]
    assert b.features.sparse[0].num_embeddings == 5  # fitted: four values + 1
    # the same seed, the same parts; another seed, others
    again = load_files(train=glob, schema=str(schema), split=[0.7, 0.15, 0.15], seed=3, in_memory=True, progress=False)
    assert torch.equal(again.val.dense, b.val.dense)
    other = load_files(train=glob, schema=str(schema), split=[0.7, 0.15, 0.15], seed=4, in_memory=True, progress=False)
    assert not torch.equal(other.val.dense, b.val.dense)
    # streamed (not in memory): the same rows
    streamed = load_files(train=glob, schema=str(schema), split=[0.7, 0.15, 0.15], seed=3, progress=False)
    assert sorted(rows_of(streamed.test.batches(64))) == sorted(ids["test"])
    assert len(streamed.train) == len(ids["train"])
    assert sum(streamed.train.num_batches(100) for _ in [0]) == -(-len(ids["train"]) // 100)


def test_split_parts_do_not_depend_on_row_groups(tmp_path: Path) -> None:
    table = clicks(2500)
    for name, size in (("a", 2500), ("b", 333)):
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "part.parquet", row_group_size=size)
    schema = str(write_schema(tmp_path / "s.yaml"))
    got = [
        load_files(train=str(tmp_path / n / "*.parquet"), schema=schema, split=(0.6, 0.3, 0.1), seed=1, progress=False)
        for n in ("a", "b")
    ]
    for split in ("train", "val", "test"):
        a, b = (rows_of(getattr(g, split).batches(500)) for g in got)
        assert a == b and len(a) == got[0].meta["rows"][split]
    assert got[0].meta["split"] == {"fractions": [0.6, 0.3, 0.1], "seed": 1, "block": 1024}


def test_split_with_a_test_glob_and_bad_splits(tmp_path: Path) -> None:
    paths = write_splits(tmp_path, rows=300, files=1)
    b = load_files(
        train=paths["train"], test=paths["test"], schema=paths["schema"], split=(0.6, 0.2, 0.2), progress=False
    )
    assert b.meta["rows"] == {"train": 225, "val": 75, "test": 300}  # train split 0.6 : 0.2 = 3 : 1
    with pytest.raises(ValueError, match="give no data.val"):
        load_files(**paths, split=(0.7, 0.15, 0.15), progress=False)
    with pytest.raises(ValueError, match=r"data.split: three non-negative fractions summing to 1"):
        load_files(train=paths["train"], schema=paths["schema"], split=(0.7, 0.4, 0.1), progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"csv": {"header": False}}, "header: false needs columns"),
        ({"csv": {"header": False, "columns": ["row"]}}, r"csv.columns lacks 'x', 'cat', 'answer', 'flag'"),
        ({"csv": {"delimiter": ";;"}}, "delimiter must be one character"),
        ({"csv": {"strip": "yes"}}, "strip must be true or false"),
        ({"csv": {"quote": '"'}}, "unknown key 'quote'; valid keys: header, columns, delimiter, null_values, strip"),
        ({"dense": [{"name": "x", "fill": "median"}]}, "fill must be a finite number or 'mean'"),
        ({"sparse": [{"name": "answer", "vocabulary": {"min_count": 1}}]}, "column 'answer' is the source of label"),
        ({"labels": [{"name": "y", "kind": "regression", "positive": ["a"]}]}, "positive makes a binary label"),
        ({"labels": [{"name": "y", "negative": ["a"]}]}, "negative needs positive or positive_prefix"),
        ({"labels": [{"name": "y", "all_of": ["a"], "column": "b"}]}, "all_of names the label's columns"),
        ({"labels": [{"name": "y", "positive": "yes"}]}, "positive must be a list of strings"),
        (
            {"labels": [{"name": "y", "column": "f", "positive": ["1"]}, {"name": "z", "all_of": ["f", "g"]}]},
            "column 'f' is text for label 'y'",
        ),
    ],
)
def test_schema_extensions_are_checked(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_schema(write_schema(tmp_path / "s.yaml", {**TEXT_SCHEMA, **change}))


def test_schema_extensions_round_trip_and_serve_as_trained(tmp_path: Path) -> None:
    schema = load_schema(write_schema(tmp_path / "s.yaml", TEXT_SCHEMA))
    assert Schema.from_dict(schema.to_dict()) == schema
    assert schema.columns == ["row", "x", "cat", "answer", "flag"]  # features, then label sources once
    _csv_files(tmp_path / "data", [300])
    b = load_files(train=str(tmp_path / "data" / "*.gz"), schema=schema, split=(0.5, 0.25, 0.25), in_memory=True)
    fitted = Schema.from_dict(b.meta["schema"])
    assert fitted.sparse[0].num_embeddings == 5 and fitted.csv == schema.csv
    # raw text rows encode at serving time bitwise as the reader did
    encoding = value_encoding(json.loads(json.dumps(b.meta)))
    rows = [int(r) for r in b.test.dense[:, 0].tolist()]
    raw_x = [" ?" if r % 11 == 0 else f" {r % 50}" for r in rows]
    got = encoding.dense("x", raw_x)
    np.testing.assert_array_equal(got.view(np.uint32), b.test.dense[:, 1].numpy().view(np.uint32))
    ids = [encoding.ids("cat", [f" c{r % 4}"], 5)[0] for r in rows]
    assert ids == b.test.sparse_ids["cat"][:, 0].tolist()
    assert encoding.ids("cat", [" ?"], 5) == encoding.ids("cat", ["  "], 5) == [0]


def test_a_bad_line_of_a_headerless_csv_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    schema = str(write_schema(tmp_path / "s.yaml", TEXT_SCHEMA))
    lines = ["1, c1, 3, yes, 1", "", "2, c2, 4, no, 0", "3, c3, 5, no, 0", "4, c1, 5, no"]  # line 2 blank

    def load(lines: list[str]) -> None:
        (tmp_path / "d" / "f.txt").write_text("\n".join(lines) + "\n")  # any name: the schema says CSV
        load_files(train=str(tmp_path / "d" / "*"), schema=schema, split=(1, 0, 0), progress=False, in_memory=True)

    with pytest.raises(DataError, match=r"f\.txt:5: expected 5 comma-separated fields, found 4$"):
        load(lines)
    lines[4] = "4, c1, 5, no, 1"
    with pytest.raises(DataError, match=r"f\.txt:4 field 'x': non-numeric value 'x' \(column 3\)$"):
        load([*lines[:3], "3, c3, x, no, 0", lines[4]])
    with pytest.raises(DataError, match=r"f\.txt:4 field 'answer': label 'yes': value 'maybe' not recognised"):
        load([*lines[:3], "3, c3, 5, maybe, 0", lines[4]])
    with pytest.raises(DataError, match=r"f\.txt:5 field 'flag': binary label 'both': value 2 of column 'flag'"):
        load([*lines[:4], "4, c1, 5, no, 2"])
