"""AliExpress, the built-in schema over the files path: the 20-row sample, round trips on handwritten CSVs, error
locations, block parsing."""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import mtrec.data.files as files
from mtrec.data import DataError, load_aliexpress

CAT = [f"categorical_{i}" for i in range(1, 17)]
NUM = [f"numerical_{i}" for i in range(1, 64)]
COLUMNS = ["search_id", *CAT, *NUM, "click", "conversion"]


def make_row(i: int, *, click: int = 0, conversion: int = 0, **over: object) -> dict[str, object]:
    r: dict[str, object] = {"search_id": 100 + i, "click": click, "conversion": conversion}
    r.update({c: (i + j) % 3 for j, c in enumerate(CAT)})
    r.update({c: round(0.1 * i + 0.01 * j, 4) for j, c in enumerate(NUM)})
    r.update(over)
    return r


def vocabulary(values: list[object]) -> list[str]:
    """The vocabulary rule by hand: the distinct ids as text, most frequent first, ties by text."""
    counts = Counter(str(v) for v in values)
    return sorted(counts, key=lambda v: (-counts[v], v))


def write_csv(path: Path, rows: list[dict[str, object]], columns: list[str] = COLUMNS) -> Path:
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# the 20-row sample
# ------------------------------------------------------------------------------------------------


@pytest.mark.data
def test_sample_file(aliexpress_path: Path) -> None:
    b = load_aliexpress(aliexpress_path)
    assert (len(b.train), len(b.val), len(b.test)) == (14, 3, 3)
    assert len(b.features.sparse) == 16 and b.features.dense_dim == 63
    assert b.features.sparse_names == tuple(CAT) and b.features.dense_names == tuple(NUM)
    assert [(t.name, t.kind) for t in b.tasks] == [("ctr", "binary"), ("ctcvr", "binary")]
    with open(aliexpress_path, newline="") as f:
        rows = list(csv.DictReader(f))
    clicks = sum(int(r["click"]) for r in rows)
    both = sum(int(r["click"]) and int(r["conversion"]) for r in rows)
    for ds in (b.train, b.val, b.test):
        assert bool(torch.all(ds.labels["ctcvr"] <= ds.labels["ctr"]))
        assert ds.dense.shape[1] == 63 and ds.dense.dtype == torch.float32
        for f in b.features.sparse:
            assert ds.sparse_ids[f.name].shape == (len(ds), 1)
            assert int(ds.sparse_ids[f.name].max()) < f.num_embeddings
    assert sum(float(ds.labels["ctr"].sum()) for ds in (b.train, b.val, b.test)) == clicks
    assert sum(float(ds.labels["ctcvr"].sum()) for ds in (b.train, b.val, b.test)) == both
    # train statistics: standardised train columns have mean 0 and std 1 (or are constant 0)
    m, s = b.train.dense.mean(0), b.train.dense.std(0, unbiased=False)
    assert float(m.abs().max()) < 1e-5
    assert bool(torch.all(((s - 1).abs() < 1e-4) | (s == 0)))
    batch = next(b.train.batches(8))
    assert batch.sparse.keys() == CAT and batch.dense.shape == (8, 63)


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------


def test_round_trip_with_test_file(tmp_path: Path) -> None:
    train_rows = [
        make_row(0, click=1, conversion=1, categorical_3=7, numerical_1=1.0),
        make_row(1, click=1, conversion=0, categorical_3=5, numerical_1=2.0),
        make_row(2, click=0, conversion=0, categorical_3=7, numerical_1=3.0),
        make_row(3, click=0, conversion=1, categorical_3=-2, numerical_1=6.0),  # conversion without click
    ]
    for r in train_rows:
        r["numerical_2"] = 4.5  # constant column: std guarded
    test_rows = [
        make_row(4, click=1, conversion=1, categorical_3=99, numerical_1=10.0, numerical_2=1.5),
        make_row(5, click=0, conversion=0, categorical_3=5, numerical_1=0.0, numerical_2=4.5),
    ]
    columns = list(reversed(COLUMNS))  # any column order is accepted
    train_file = write_csv(tmp_path / "train.csv", train_rows, columns)
    test_file = write_csv(tmp_path / "test.csv", test_rows, columns)
    b = load_aliexpress(train_file, split=(1.0, 0.0, 0.0), test_path=test_file)
    assert (len(b.train), len(b.val), len(b.test)) == (4, 0, 2)

    x = np.array([1.0, 2.0, 3.0, 6.0])
    mean, std = x.mean(), x.std()  # 3.0, sqrt(3.5)
    statistics = b.meta["statistics"]
    assert (statistics["numerical_1"]["mean"], statistics["numerical_1"]["std"]) == pytest.approx((3.0, np.sqrt(3.5)))
    assert statistics["numerical_2"]["std"] == 1.0
    np.testing.assert_allclose(b.test.dense[:, 0].numpy(), [(10 - mean) / std, (0 - mean) / std], atol=1e-6)
    np.testing.assert_allclose(b.test.dense[:, 1].numpy(), [1.5 - 4.5, 0.0], atol=1e-6)
    assert sorted(b.train.dense[:, 0].tolist()) == pytest.approx(sorted((x - mean) / std), abs=1e-6)
    assert bool(torch.all(b.train.dense[:, 1] == 0))

    # categorical_3: train vocabulary 7 (twice), then -2 and 5 -> ids 1, 2, 3; 99 unseen -> 0
    vocab = vocabulary([r["categorical_3"] for r in train_rows])
    assert b.meta["vocabularies"]["categorical_3"] == vocab == ["7", "-2", "5"]
    assert {f.name: f.num_embeddings for f in b.features.sparse}["categorical_3"] == 4
    assert b.test.sparse_ids["categorical_3"][:, 0].tolist() == [0, 3]
    assert b.train.sparse_ids["categorical_3"][:, 0].tolist() == [1, 3, 1, 2]  # file order

    # labels: ctr = click, ctcvr = click AND conversion; rows line up with their features
    order = torch.argsort(b.train.dense[:, 0])  # numerical_1 ascending = train_rows order
    assert b.train.labels["ctr"][order].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert b.train.labels["ctcvr"][order].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert b.test.labels["ctr"].tolist() == [1.0, 0.0] and b.test.labels["ctcvr"].tolist() == [1.0, 0.0]
    assert b.meta["rows"] == {"train": 4, "val": 0, "test": 2}


def test_single_file_split_is_seeded(tmp_path: Path) -> None:
    rows = [make_row(i, click=i % 2, conversion=int(i % 4 == 1), numerical_1=float(i)) for i in range(40)]
    path = write_csv(tmp_path / "a.csv", rows)
    a, b, c = (load_aliexpress(path, seed=s) for s in (3, 3, 4))
    assert (len(a.train), len(a.val), len(a.test)) == (28, 6, 6)
    assert torch.equal(a.train.dense, b.train.dense) and not torch.equal(a.train.dense, c.train.dense)
    # the splits partition the rows (numerical_1 = row index, recovered through the train statistics)
    mu, sd = a.meta["statistics"]["numerical_1"]["mean"], a.meta["statistics"]["numerical_1"]["std"]
    idx = torch.cat([ds.dense[:, 0] for ds in (a.train, a.val, a.test)]) * sd + mu
    assert sorted(round(float(v)) for v in idx) == list(range(40))
    train_idx = [round(float(v) * sd + mu) for v in a.train.dense[:, 0]]
    assert mu == pytest.approx(np.mean(train_idx))
    assert sum(float(ds.labels["ctcvr"].sum()) for ds in (a.train, a.val, a.test)) == 10


def test_gzip(tmp_path: Path) -> None:
    rows = [make_row(i, click=i % 2) for i in range(30)]
    plain = write_csv(tmp_path / "a.csv", rows)
    gz = tmp_path / "a.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = load_aliexpress(plain), load_aliexpress(gz)
    assert torch.equal(a.train.dense, b.train.dense) and torch.equal(a.test.labels["ctr"], b.test.labels["ctr"])
    assert sum(a.meta["rows"].values()) == 30


def test_small_blocks_give_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [make_row(i, click=i % 2, numerical_3=i * 0.5) for i in range(25)]
    path = tmp_path / "a.csv"
    lines = [",".join(COLUMNS)] + [",".join(str(r[c]) for c in COLUMNS) for r in rows]
    path.write_text("\r\n".join(lines))  # CRLF and no final newline
    ref = load_aliexpress(path)
    monkeypatch.setattr(files, "_CSV_BLOCK_BYTES", 4096)  # blocks of some lines, ending mid-line
    got = load_aliexpress(path)
    assert torch.equal(ref.train.dense, got.train.dense)
    for k in CAT:
        assert torch.equal(ref.val.sparse_ids[k], got.val.sparse_ids[k])
    assert torch.equal(ref.test.labels["ctr"], got.test.labels["ctr"])
    # an error far into the file still gets its exact line
    parts = lines[20].split(",")
    parts[COLUMNS.index("numerical_3")] = "x"
    lines[20] = ",".join(parts)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"a\.csv:21 field 'numerical_3': non-numeric value 'x' \(column 20\)$"):
        load_aliexpress(path)


# ------------------------------------------------------------------------------------------------
# errors: file, line and field in the message
# ------------------------------------------------------------------------------------------------


def _good_lines() -> list[str]:
    return [",".join(COLUMNS)] + [",".join(str(r[c]) for c in COLUMNS) for r in (make_row(i) for i in range(6))]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_error_header_lists_missing_columns(tmp_path: Path) -> None:
    cols = [c for c in COLUMNS if c not in ("numerical_5", "click")]
    path = write_csv(tmp_path / "hdr.csv", [make_row(0)], cols)
    with pytest.raises(DataError) as e:
        load_aliexpress(path)
    msg = str(e.value)
    assert "hdr.csv:1: no column 'numerical_5'" in msg and "(nor 'click'" in msg
    # columns the schema does not name are not read
    path = write_csv(tmp_path / "hdr2.csv", [make_row(i, extra="x") for i in range(5)], [*COLUMNS, "extra"])
    assert sum(load_aliexpress(path).meta["rows"].values()) == 5


def test_error_wrong_field_count(tmp_path: Path) -> None:
    lines = _good_lines()
    lines[2] = lines[2] + ",0.5"
    with pytest.raises(DataError) as e:
        load_aliexpress(_write_lines(tmp_path / "count.csv", lines))
    msg = str(e.value)
    assert "count.csv:3" in msg and "expected 82" in msg and "found 83" in msg


def test_error_non_numeric_numerical(tmp_path: Path) -> None:
    lines = _good_lines()
    parts = lines[3].split(",")
    parts[COLUMNS.index("numerical_7")] = "abc"
    lines[3] = ",".join(parts)
    lines.insert(2, "")  # a blank line is skipped but still counted: the bad row is now on line 5
    with pytest.raises(DataError) as e:
        load_aliexpress(_write_lines(tmp_path / "num.csv", lines))
    msg = str(e.value)
    assert "num.csv:5" in msg and "numerical_7" in msg and "'abc'" in msg
    assert e.value.line == 5 and e.value.field == "numerical_7"


def test_error_bad_label_and_non_integer_id(tmp_path: Path) -> None:
    lines = _good_lines()
    parts = lines[4].split(",")
    parts[COLUMNS.index("click")] = "2"
    lines[4] = ",".join(parts)
    lines.insert(1, "")
    with pytest.raises(DataError, match=r"lab\.csv:6 field 'click': binary label 'ctr': value 2 of column 'click'"):
        load_aliexpress(_write_lines(tmp_path / "lab.csv", lines))
    parts[COLUMNS.index("click")] = ""  # a missing label
    lines[5] = ",".join(parts)
    with pytest.raises(DataError, match=r"lab\.csv:6 field 'click': label 'ctr' is null"):
        load_aliexpress(_write_lines(tmp_path / "lab.csv", lines))
    lines = _good_lines()
    parts = lines[2].split(",")
    parts[COLUMNS.index("conversion")] = "yes"
    lines[2] = ",".join(parts)
    with pytest.raises(DataError, match=r"conv\.csv:3 field 'conversion': non-numeric value 'yes' \(column 82\)"):
        load_aliexpress(_write_lines(tmp_path / "conv.csv", lines))


def test_ids_are_text_and_nan_is_missing(tmp_path: Path) -> None:
    """Ids are keys (their text: 1.5 is an id of its own); NaN or an empty cell is a missing number, the mean."""
    rows = [make_row(i, click=i % 2, categorical_9=["1.5", "2", "2"][i % 3]) for i in range(9)]
    rows[4]["numerical_60"], rows[5]["numerical_60"] = "NaN", ""
    test_file = write_csv(tmp_path / "t.csv", rows[:1])
    b = load_aliexpress(write_csv(tmp_path / "a.csv", rows), split=(1, 0, 0), test_path=test_file)
    assert b.meta["vocabularies"]["categorical_9"] == vocabulary([r["categorical_9"] for r in rows]) == ["2", "1.5"]
    col = b.features.dense_names.index("numerical_60")
    values = [float(r["numerical_60"]) for i, r in enumerate(rows) if i not in (4, 5)]
    assert b.meta["statistics"]["numerical_60"]["mean"] == pytest.approx(np.mean(values))
    assert b.train.dense[4, col] == 0 and b.train.dense[5, col] == 0


def test_error_empty_and_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv:1: file is empty"):
        load_aliexpress(empty)
    header_only = _write_lines(tmp_path / "hdr_only.csv", [",".join(COLUMNS)])
    with pytest.raises(DataError, match=r"hdr_only\.csv:2.*no data rows"):
        load_aliexpress(header_only)
    missing = tmp_path / "no" / "such.csv"
    with pytest.raises(DataError, match="not found") as e:
        load_aliexpress(missing)
    assert str(missing) in str(e.value)
