"""Census-Income, the built-in schema over the files path: round trips on handwritten files, error locations, the
real file, and the serving-side encoding."""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrec.data import DataError, load_census
from mtrec.data.encoding import FilesEncoding, value_encoding
from mtrec.data.files import split_parts

# One row of the 42-field format (0-based indices in the comments), as in census-income.test.
TEMPLATE = [
    "38", "Private", "6", "36", "1st 2nd 3rd or 4th grade", "0",  # 0-5
    "Not in universe", "Married-civilian spouse present", "Manufacturing-durable goods",  # 6-8
    "Machine operators assmblrs & inspctrs", "White", "Mexican (Mexicano)", "Female",  # 9-12
    "Not in universe", "Not in universe", "Full-time schedules", "0", "0", "0",  # 13-18
    "Joint one under 65 & one 65+", "Not in universe", "Not in universe", "Spouse of householder",  # 19-22
    "Spouse of householder", "1032.38", "?", "?", "?", "Not in universe under 1 year old", "?",  # 23-29
    "4", "Not in universe", "Mexico", "Mexico", "Mexico", "Foreign born- Not a citizen of U S ",  # 30-35
    "0", "Not in universe", "2", "12", "95", "- 50000.",  # 36-41
]  # fmt: skip
assert len(TEMPLATE) == 42


def row(**fields: str) -> str:
    """A census line with fields replaced by index: ``row(f0="25", f41="50000+.")``."""
    values = list(TEMPLATE)
    for k, v in fields.items():
        values[int(k[1:])] = v
    return ", ".join(values)  # the real files put a space after every comma


def census_lines(n: int, seed: int) -> list[str]:
    """Census lines with varied numbers, categories (some only in val or test) and missing values."""
    rng = np.random.default_rng(seed)
    pick = lambda *values: str(values[rng.integers(len(values))])  # noqa: E731
    lines = []
    for _ in range(n):
        lines.append(row(
            f0=pick(*range(17, 90), "?"), f1=pick("Private", "Self-employed-incorporated", "?", "Never worked"),
            f4=pick("Children", "High school graduate", "Bachelors degree(BA AB BS)", "10th grade"),
            f5=pick("0", "1200", "375.5"), f7=pick("Never married", "Divorced", "Widowed"),
            f12=pick("Female", "Male"), f16=pick("0", "15024", "2.5e3"), f30=pick(*range(7)),
            f34=pick("Mexico", "United-States", "?", f"Country-{rng.integers(40)}"), f39=pick(*range(53)),
            f41=pick("- 50000.", "50000+."),
        ) + "\n")  # fmt: skip
    return lines


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def stats(b, name: str) -> tuple[float, float]:
    """The train mean and std the bundle standardised dense feature ``name`` with."""
    return b.meta["statistics"][name]["mean"], b.meta["statistics"][name]["std"]


def vocabulary(values: list[str]) -> list[str]:
    """The vocabulary rule by hand: the distinct non-missing values, most frequent first, ties by value."""
    counts = Counter(v for v in values if v not in ("?", ""))
    return sorted(counts, key=lambda v: (-counts[v], v))


def sizes(n: int, split: tuple[float, float, float]) -> tuple[int, int, int]:
    """Rows per part of a split file of ``n`` rows: cumulative counts round(f * n) (half up)."""
    train, train_val = int(np.floor(split[0] * n + 0.5)), int(np.floor((split[0] + split[1]) * n + 0.5))
    return train, train_val - train, n - train_val


# Train file: ages (field 0), class of worker (1), education (4), marital (7), weeks worked (39), income (41)
TRAIN_ROWS = [
    dict(f0="20", f1="Private", f4="High school graduate", f7="Never married", f39="10", f41="- 50000."),
    dict(f0="30", f1="Private", f4="Bachelors degree(BA AB BS)", f7="Divorced", f39="20", f41="50000+."),
    dict(f0="40", f1="Self-employed-incorporated", f4="Children", f7="Never married", f39="30", f41="-50000"),
    dict(f0="50", f1="?", f4="Some college but no degree", f7="Widowed", f39="40", f41="50000+"),
    dict(f0="?", f1="Federal government", f4="Doctorate degree(PhD EdD)", f7="Divorced", f39="50",
         f41="- 50000."),
    dict(f0="60", f1="Private", f4="10th grade", f7="Never married", f39="52", f41="- 50000."),
]  # fmt: skip
TEST_ROWS = [
    dict(f0="70", f1="Never worked", f4="Masters degree(MA MS MEng MEd MSW MBA)", f7="Never married",
         f41="50000+."),
    dict(f0="25", f1="Private", f4="9th grade", f7="Separated", f41="- 50000."),
]  # fmt: skip


def test_round_trip_with_test_file(tmp_path: Path) -> None:
    train_file = write(tmp_path / "train.txt", [row(**r) for r in TRAIN_ROWS])
    test_file = write(tmp_path / "test.txt", [row(**r) for r in TEST_ROWS])
    # split (1, 0, 0) with a test file: every row of the first file is train, no val
    b = load_census(train_file, tasks="group1", split=(1.0, 0.0, 0.0), seed=0, test_path=test_file)
    assert (len(b.train), len(b.val), len(b.test)) == (6, 0, 2)
    assert [t.name for t in b.tasks] == ["income", "marital"]

    # numeric scaling with the train rows only, '?' excluded: ages 20..60 -> mean 40, std sqrt(200)
    ages = np.array([20, 30, 40, 50, 60], dtype=np.float64)
    mean, std = ages.mean(), ages.std()
    assert stats(b, "age") == pytest.approx((40.0, np.sqrt(200.0)))
    weeks = np.array([10, 20, 30, 40, 50, 52], dtype=np.float64)
    assert stats(b, "weeks_worked") == pytest.approx((weeks.mean(), weeks.std()))
    age_col = b.features.dense_names.index("age")
    got = sorted(b.train.dense[:, age_col].tolist())
    expected = sorted([(a - mean) / std for a in ages] + [0.0])  # missing age -> train mean -> 0
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # test rows keep file order; scaled with the train statistics
    np.testing.assert_allclose(b.test.dense[:, age_col].numpy(), [(70 - mean) / std, (25 - mean) / std], atol=1e-6)

    # categorical: vocabulary of train values (most frequent first), id 0 for '?' and for values unseen in train
    vocab = vocabulary([r["f1"] for r in TRAIN_ROWS])
    assert (
        b.meta["vocabularies"]["class_worker"]
        == vocab
        == ["Private", "Federal government", "Self-employed-incorporated"]
    )
    spec = {f.name: f for f in b.features.sparse}
    assert spec["class_worker"].num_embeddings == 4 and spec["class_worker"].max_len == 1  # fitted: 3 values + 1
    assert b.test.sparse_ids["class_worker"][:, 0].tolist() == [0, 1]  # "Never worked" unseen -> 0
    train_cw = b.train.sparse_ids["class_worker"][:, 0].tolist()
    assert train_cw == [vocab.index(r["f1"]) + 1 if r["f1"] in vocab else 0 for r in TRAIN_ROWS]  # '?' -> 0

    # labels: income accepts the forms with and without the dot and the space
    assert sorted(b.train.labels["income"].tolist()) == [0, 0, 0, 0, 1, 1]
    assert sorted(b.train.labels["marital"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert b.test.labels["income"].tolist() == [1.0, 0.0]
    assert b.test.labels["marital"].tolist() == [1.0, 0.0]
    # label rows line up with features: the never-married rows of train have ages 20, 40, 60
    married = b.train.labels["marital"] == 1
    np.testing.assert_allclose(
        sorted(b.train.dense[married, age_col].tolist()), [(a - mean) / std for a in (20, 40, 60)], atol=1e-6
    )

    # features: marital and income are labels, education a feature; instance weight never a feature
    names = set(b.features.sparse_names)
    assert "marital_stat" not in names and "income_50k" not in names and "instance_weight" not in names
    assert "education" in names
    assert set(b.features.dense_names) == {
        "age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp",
        "weeks_worked",
    }  # fmt: skip
    assert len(names) + len(b.features.dense_names) == 42 - 3
    assert b.meta["files"]["train"] == [str(train_file)] and b.meta["files"]["test"] == [str(test_file)]
    assert b.meta["class_rates"]["train"]["income"] == pytest.approx(2 / 6)

    batch = next(b.train.batches(4))
    assert batch.sparse.keys() == list(b.features.sparse_names)
    assert batch.dense.shape == (4, 7)


def test_group2_education_label(tmp_path: Path) -> None:
    train_file = write(tmp_path / "train.txt", [row(**r) for r in TRAIN_ROWS])
    test_file = write(tmp_path / "test.txt", [row(**r) for r in TEST_ROWS])
    b = load_census(train_file, tasks="group2", split=(1.0, 0.0, 0.0), test_path=test_file)
    assert [t.name for t in b.tasks] == ["education", "marital"]
    # college or more: Bachelors, Some college, Doctorate in train; Masters in test
    assert sorted(b.train.labels["education"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert b.test.labels["education"].tolist() == [1.0, 0.0]
    assert "education" not in b.features.sparse_names and "marital_stat" not in b.features.sparse_names
    # a list of names works like the group
    b2 = load_census(train_file, tasks=["education", "marital"], split=(1.0, 0.0, 0.0), test_path=test_file)
    assert torch.equal(b2.test.labels["education"], b.test.labels["education"])


def test_single_file_split_uses_train_statistics_only(tmp_path: Path) -> None:
    n = 20
    ages = [str(18 + 3 * i) for i in range(n)]
    workers = [f"Worker {i}" for i in range(n)]  # every value unique: seen in train or not
    labels = ["50000+." if i % 4 == 0 else "- 50000." for i in range(n)]
    lines = [row(f0=a, f1=w, f41=y) for a, w, y in zip(ages, workers, labels)]
    path = write(tmp_path / "census.txt", lines)
    b = load_census(path, split=(0.6, 0.2, 0.2), seed=7)
    assert (len(b.train), len(b.val), len(b.test)) == sizes(n, (0.6, 0.2, 0.2)) == (12, 4, 4)
    # which rows: the age of each (all ages differ) from the standardised values and the train statistics
    mean, std = stats(b, "age")
    rows = [
        [ages.index(str(round(a * std + mean))) for a in ds.dense[:, 0].tolist()] for ds in (b.train, b.val, b.test)
    ]
    assert sorted(sum(rows, [])) == list(range(n)) and all(r == sorted(r) for r in rows)  # a partition, file order
    tr = rows[0]
    train_ages = np.array([float(ages[i]) for i in tr])
    assert (mean, std) == pytest.approx((train_ages.mean(), train_ages.std()))  # train rows only
    for ds, part in zip((b.train, b.val, b.test), rows):
        assert ds.labels["income"].tolist() == [1.0 if i % 4 == 0 else 0.0 for i in part]
    # values only in val/test are out of vocabulary; the 12 train values get ids 1..12 (all seen once: by value)
    assert bool(torch.all(b.val.sparse_ids["class_worker"] == 0))
    assert bool(torch.all(b.test.sparse_ids["class_worker"] == 0))
    vocab = vocabulary([workers[i] for i in tr])
    assert b.train.sparse_ids["class_worker"][:, 0].tolist() == [vocab.index(workers[i]) + 1 for i in tr]
    assert {f.name: f.num_embeddings for f in b.features.sparse}["class_worker"] == 13


def test_same_seed_same_split_and_gzip(tmp_path: Path) -> None:
    lines = [row(f0=str(20 + i), f41="50000+." if i % 3 == 0 else "- 50000.") for i in range(15)]
    plain = write(tmp_path / "c.txt", lines)
    gz = tmp_path / "c.txt.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    a, b, c = load_census(plain, seed=1), load_census(gz, seed=1), load_census(plain, seed=2)
    assert torch.equal(a.train.dense, b.train.dense)
    assert torch.equal(a.test.labels["income"], b.test.labels["income"])
    assert not torch.equal(a.train.dense, c.train.dense)


def test_windows_line_endings_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes(("\r\n".join([row(f0="30"), "", row(f0="40"), row(f0="50")]) + "\r\n").encode())
    b = load_census(path, split=(1.0, 0.0, 0.0), test_path=write(tmp_path / "t.txt", [row()]))
    assert len(b.train) == 3
    assert stats(b, "age")[0] == pytest.approx(40.0)


# ------------------------------------------------------------------------------------------------
# errors: file, line and column in the message
# ------------------------------------------------------------------------------------------------


def _bad_file(tmp_path: Path, bad_line: str, name: str = "bad_census.txt") -> Path:
    # line 1 good, line 2 blank (still counted), line 3 good, line 4 bad, line 5 good
    return write(tmp_path / name, [row(), "", row(f0="41"), bad_line, row()])


def test_error_wrong_field_count(tmp_path: Path) -> None:
    path = _bad_file(tmp_path, ", ".join(TEMPLATE[:41]))
    with pytest.raises(DataError) as e:
        load_census(path)
    msg = str(e.value)
    assert "bad_census.txt:4" in msg and "42" in msg and "found 41" in msg
    assert e.value.line == 4


def test_error_non_numeric_age(tmp_path: Path) -> None:
    path = _bad_file(tmp_path, row(f0="abc"))
    with pytest.raises(DataError) as e:
        load_census(path)
    msg = str(e.value)
    assert "bad_census.txt:4 field 'age'" in msg and "'abc'" in msg and "(column 1)" in msg
    assert (e.value.line, e.value.field) == (4, "age")


def test_error_non_numeric_in_later_numeric_field(tmp_path: Path) -> None:
    path = write(tmp_path / "weeks.txt", [row(), row(), row(f39="many"), row(f0="x")])
    with pytest.raises(DataError) as e:
        load_census(path)
    msg = str(e.value)  # the earliest bad line wins, even though field 0 is checked first
    assert "weeks.txt:3 field 'weeks_worked'" in msg and "'many'" in msg and "(column 40)" in msg


def test_error_bad_label(tmp_path: Path) -> None:
    path = _bad_file(tmp_path, row(f41="maybe"))
    with pytest.raises(DataError) as e:
        load_census(path)
    msg = str(e.value)
    assert "bad_census.txt:4 field 'income_50k'" in msg and "label 'income'" in msg and "'maybe'" in msg


def test_error_missing_task_label(tmp_path: Path) -> None:
    path = _bad_file(tmp_path, row(f4="?"))
    load_census(path, tasks="group1")  # education is only a feature here: '?' is fine
    with pytest.raises(DataError) as e:
        load_census(path, tasks="group2")
    assert "bad_census.txt:4 field 'education'" in str(e.value) and "label 'education' is null" in str(e.value)


def test_error_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(DataError, match=r"empty\.txt:1: file is empty"):
        load_census(path)
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt:1: file is empty"):
        load_census(path)
    path.write_text("\n  \n")  # a line of spaces is a line of one field
    with pytest.raises(DataError, match=r"empty\.txt:2: expected 42 comma-separated fields, found 1"):
        load_census(path)


def test_error_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "census.gz"
    with pytest.raises(DataError, match="not found") as e:
        load_census(path)
    assert str(path) in str(e.value)


def test_error_in_test_file_names_that_file(tmp_path: Path) -> None:
    good = write(tmp_path / "train.txt", [row(), row()])
    bad = write(tmp_path / "test.txt", [row(), row(f5="n/a")])
    with pytest.raises(DataError) as e:
        load_census(good, test_path=bad)
    assert "test.txt:2 field 'wage_per_hour'" in str(e.value) and "'n/a'" in str(e.value)


def test_bad_task_names(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", [row()] * 5)
    with pytest.raises(ValueError, match="unknown census task"):
        load_census(path, tasks=["income", "age"])
    with pytest.raises(ValueError, match="twice"):
        load_census(path, tasks=["group1", "marital"])


# ------------------------------------------------------------------------------------------------
# the real file
# ------------------------------------------------------------------------------------------------


@pytest.mark.data
def test_real_census_file(census_path: Path) -> None:
    b = load_census(census_path, tasks=["income", "marital", "education"])
    n = 99_762
    assert (len(b.train), len(b.val), len(b.test)) == sizes(n, (0.7, 0.15, 0.15))
    # independent counts straight from the file text (these values occur in no other field)
    with gzip.open(census_path, "rt") as f:
        text = f.read()
    assert text.count("\n") == n
    income = text.count(", 50000+.\n")
    never = text.count(", Never married,")
    college_values = ("Some college", "Associates degree", "Bachelors", "Masters", "Prof school", "Doctorate")
    college = sum(text.count(f", {v}") for v in college_values)

    def total(task: str) -> int:
        return int(sum(float(s.labels[task].sum()) for s in (b.train, b.val, b.test)))

    assert (total("income"), total("marital"), total("education")) == (income, never, college)
    assert 0.055 < income / n < 0.07  # about 6% earn > 50K
    assert 0.41 < never / n < 0.45  # about 43% never married
    for split in ("train", "val", "test"):
        assert b.meta["class_rates"][split]["income"] == pytest.approx(income / n, abs=0.01)
    # row by row: the income label is field 41 of a naive reading, the splits' rows in file order
    fields = list(csv.reader(text.splitlines()))
    naive = np.array([float(r[41].strip() == "50000+.") for r in fields], dtype=np.float32)
    parts = split_parts(0, 0, n, (0.7, 0.85), 0, n)
    for k, ds in enumerate((b.train, b.val, b.test)):
        np.testing.assert_array_equal(ds.labels["income"].numpy(), naive[parts == k])
    assert b.train.dense.shape == (len(b.train), 7)
    assert float(b.train.dense.mean(0).abs().max()) < 1e-4
    assert len(b.features.sparse) == 42 - 7 - 1 - 3  # numeric, instance weight, three label sources
    for f in b.features.sparse:
        assert int(b.train.sparse_ids[f.name].max()) < f.num_embeddings


def test_serving_encodes_raw_values_as_the_reader(tmp_path: Path) -> None:
    """The run's features.json (the bundle's meta) encodes raw census values by the schema's rules: stripped, '?'
    and empty missing (the train mean, 0), unseen categories the out-of-vocabulary id 0."""
    b = load_census(write(tmp_path / "e.txt", [row(f0="20"), row(f0=""), row(f0="40"), row(f0="?")]), split=(1, 0, 0))
    assert sorted(b.train.dense[:, b.features.dense_names.index("age")].tolist()) == [-1.0, 0.0, 0.0, 1.0]
    enc = value_encoding(b.meta)
    assert isinstance(enc, FilesEncoding) and b.meta["source"] == "files" and b.meta["dataset"] == "census-income"
    assert enc.dense("age", [" ?", "", " ", None, " 20", 40, " 2.5e3"]).tolist() == [0, 0, 0, 0, -1, 1, 247]
    with pytest.raises(ValueError, match="non-numeric value 'abc'"):
        enc.dense("age", [" abc"])
    vocab = b.meta["vocabularies"]["class_worker"]
    assert enc.ids("class_worker", [" Private"], 2) == [vocab.index("Private") + 1]
    assert enc.ids("class_worker", [" ?"], 2) == enc.ids("class_worker", ["Unheard of"], 2) == [0]


def test_a_run_of_the_retired_census_reader_is_refused_by_name() -> None:
    """features.json of a run read by the census parser the files path replaced: its encoding is gone, so serving
    refuses it instead of encoding raw rows by other rules."""
    with pytest.raises(ValueError, match="census-income run read by the reader that mtrec.data.files replaced"):
        value_encoding({"source": "census-income", "vocabularies": {}})
