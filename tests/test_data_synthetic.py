"""Synthetic generators: the MMoE regression benchmark and the sparse recommendation log."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl.metrics import auc
from mtrec.data import DataBundle, load_mmoe_synthetic, load_sparse_synthetic, mmoe_synthetic

# ------------------------------------------------------------------------------------------------
# MMoE synthetic
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 0.9, 1.0])
def test_mmoe_weight_cosine_and_score_correlation(p: float) -> None:
    d = mmoe_synthetic(20000, dim=50, correlation=p, scale=2.0, seed=1)
    w1, w2 = d["w1"].double(), d["w2"].double()
    assert float(w1 @ w2 / (w1.norm() * w2.norm())) == pytest.approx(p, abs=1e-12)
    assert float(w1.norm()) == pytest.approx(2.0, abs=1e-12)
    assert float(w2.norm()) == pytest.approx(2.0, abs=1e-12)
    x = d["x"].double().numpy()
    s1, s2 = x @ w1.numpy(), x @ w2.numpy()
    # Pearson correlation of the linear parts over samples: sampling error ~ (1 - p^2) / sqrt(n) < 0.006
    assert np.corrcoef(s1, s2)[0, 1] == pytest.approx(p, abs=0.02)


def test_mmoe_labels_follow_the_formula() -> None:
    d = mmoe_synthetic(5000, dim=20, correlation=0.7, num_sines=6, noise_std=0.1, seed=4)
    x = d["x"].double().numpy()
    a, b = d["alpha"].numpy(), d["beta"].numpy()
    assert a.shape == b.shape == (6,)
    for y, w in (("y1", "w1"), ("y2", "w2")):
        s = x @ d[w].numpy()
        clean = s + np.sin(s[:, None] * a[None, :] + b[None, :]).sum(axis=1)
        resid = d[y].double().numpy() - clean
        assert abs(resid.mean()) < 0.01
        assert resid.std() == pytest.approx(0.1, rel=0.05)
    noiseless = mmoe_synthetic(100, dim=20, correlation=0.7, num_sines=6, noise_std=0.0, seed=4)
    s = noiseless["x"].double().numpy() @ noiseless["w2"].numpy()
    expected = s + np.sin(s[:, None] * a[None, :] + b[None, :]).sum(axis=1)
    np.testing.assert_allclose(noiseless["y2"].double().numpy(), expected, atol=1e-5)


def test_mmoe_orthogonal_tasks_when_p_is_zero() -> None:
    d = mmoe_synthetic(10, dim=8, correlation=0.0, seed=2)
    assert float(d["w1"] @ d["w2"]) == pytest.approx(0.0, abs=1e-12)


def test_mmoe_seeding() -> None:
    a = mmoe_synthetic(300, dim=10, seed=5)
    b = mmoe_synthetic(300, dim=10, seed=5)
    c = mmoe_synthetic(300, dim=10, seed=6)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["x"], c["x"])
    assert not torch.equal(a["w1"], c["w1"])
    # task weights do not depend on the number of samples
    assert torch.equal(mmoe_synthetic(7, dim=10, seed=5)["w2"], a["w2"])


def test_mmoe_bad_arguments() -> None:
    with pytest.raises(ValueError, match="correlation"):
        mmoe_synthetic(10, correlation=1.5)
    with pytest.raises(ValueError, match="dim"):
        mmoe_synthetic(10, dim=1)


def test_load_mmoe_synthetic_bundle() -> None:
    b = load_mmoe_synthetic(n_train=200, n_val=30, n_test=40, dim=12, correlation=0.9, seed=3)
    assert isinstance(b, DataBundle)
    assert (len(b.train), len(b.val), len(b.test)) == (200, 30, 40)
    assert [(t.name, t.kind) for t in b.tasks] == [("task1", "regression"), ("task2", "regression")]
    assert b.features.dense_names == tuple(f"x{i}" for i in range(12))
    assert b.features.sparse == ()
    assert b.meta["correlation"] == 0.9 and b.meta["seed"] == 3
    # one draw split in order: every split comes from the same task weights
    full = mmoe_synthetic(270, dim=12, correlation=0.9, seed=3)
    assert torch.equal(b.train.dense, full["x"][:200])
    assert torch.equal(b.val.labels["task1"], full["y1"][200:230])
    assert torch.equal(b.test.labels["task2"], full["y2"][230:])
    batch = next(b.train.batches(64))
    assert batch.dense.shape == (64, 12)
    assert batch.sparse.keys() == []
    assert set(batch.labels) == {"task1", "task2"}


# ------------------------------------------------------------------------------------------------
# sparse synthetic
# ------------------------------------------------------------------------------------------------

SMALL = dict(n_rows=40000, num_users=2000, num_items=5000, num_categories=50, history_len=10, dense_dim=4)


@pytest.fixture(scope="module")
def sparse_bundle() -> DataBundle:
    return load_sparse_synthetic(**SMALL, seed=3)


def _all(b: DataBundle, key: str, kind: str = "labels") -> torch.Tensor:
    return torch.cat([getattr(s, kind)[key] for s in (b.train, b.val, b.test)])


def test_sparse_shapes_and_splits(sparse_bundle: DataBundle) -> None:
    b = sparse_bundle
    assert (len(b.train), len(b.val), len(b.test)) == (32000, 4000, 4000)
    assert [(t.name, t.kind) for t in b.tasks] == [
        ("click", "binary"),
        ("conversion", "binary"),
        ("dwell", "regression"),
    ]
    spec = {f.name: f for f in b.features.sparse}
    assert {k: (f.num_embeddings, f.max_len) for k, f in spec.items()} == {
        "user_id": (2000, 1),
        "item_id": (5000, 1),
        "category": (50, 1),
        "history": (5000, 10),
    }
    assert b.features.dense_names == ("d0", "d1", "d2", "d3")
    assert b.train.dense.shape == (32000, 4) and b.train.dense.dtype == torch.float32


def test_sparse_labels_consistent(sparse_bundle: DataBundle) -> None:
    click, conv, dwell = (_all(sparse_bundle, k) for k in ("click", "conversion", "dwell"))
    assert set(click.unique().tolist()) == {0.0, 1.0} and set(conv.unique().tolist()) == {0.0, 1.0}
    assert bool(torch.all(conv <= click)), "conversion must imply click"
    assert 0.05 <= float(click.mean()) <= 0.20
    cvr = float(conv.sum() / click.sum())
    assert 0.03 <= cvr <= 0.5
    assert bool(torch.all(dwell[click == 0] == 0))
    assert bool(torch.all(dwell[click == 1] > 0))


def test_sparse_ids_in_vocab_and_history_lengths(sparse_bundle: DataBundle) -> None:
    b = sparse_bundle
    for f in b.features.sparse:
        ids, lens = _all(b, f.name, "sparse_ids"), _all(b, f.name, "sparse_lengths")
        assert ids.shape[1] == f.max_len
        valid = torch.arange(f.max_len)[None, :] < lens[:, None]
        assert int(ids[valid].min()) >= 0 and int(ids[valid].max()) < f.num_embeddings, f.name
        if f.max_len == 1:
            assert bool(torch.all(lens == 1))
    hl = _all(b, "history", "sparse_lengths")
    assert int(hl.min()) == 0 and int(hl.max()) <= 10
    assert 0.0 < float((hl == 0).float().mean()) < 0.5
    assert len(hl.unique()) == 11  # every length 0..10 occurs


def test_sparse_category_is_a_function_of_item(sparse_bundle: DataBundle) -> None:
    item = _all(sparse_bundle, "item_id", "sparse_ids")[:, 0]
    cat = _all(sparse_bundle, "category", "sparse_ids")[:, 0]
    pairs = torch.unique(torch.stack([item, cat], 1), dim=0)
    assert len(pairs) == len(torch.unique(item))


def test_sparse_ids_are_zipf_skewed(sparse_bundle: DataBundle) -> None:
    item = _all(sparse_bundle, "item_id", "sparse_ids")[:, 0].numpy()
    counts = np.sort(np.bincount(item, minlength=5000))[::-1]
    top1pct = counts[:50].sum() / counts.sum()
    assert top1pct > 0.4  # uniform ids would give 0.01
    user = _all(sparse_bundle, "user_id", "sparse_ids")[:, 0].numpy()
    ucounts = np.sort(np.bincount(user, minlength=2000))[::-1]
    assert ucounts[:20].sum() / ucounts.sum() > 0.3


def _target_encoding_auc(b: DataBundle, feature: str, task: str) -> float:
    """Val AUC of a per-id smoothed train rate: a model-free check that the ids carry label signal."""
    tr_ids = b.train.sparse_ids[feature][:, 0]
    y = b.train.labels[task]
    size = {f.name: f.num_embeddings for f in b.features.sparse}[feature]
    n = torch.bincount(tr_ids, minlength=size).double()
    s = torch.bincount(tr_ids, weights=y.double(), minlength=len(n))
    prior = float(y.mean())
    rate = (s + 20 * prior) / (n + 20)
    return auc(rate[b.val.sparse_ids[feature][:, 0]].float(), b.val.labels[task])


def test_sparse_labels_are_learnable(sparse_bundle: DataBundle) -> None:
    b = sparse_bundle
    assert _target_encoding_auc(b, "item_id", "click") > 0.55
    assert _target_encoding_auc(b, "user_id", "click") > 0.55
    assert _target_encoding_auc(b, "category", "click") > 0.55
    assert _target_encoding_auc(b, "item_id", "conversion") > 0.6
    # dense features: least-squares scores fitted on train carry signal on val
    xtr = torch.cat([b.train.dense, torch.ones(len(b.train), 1)], 1).double()
    coef = torch.linalg.lstsq(xtr, b.train.labels["click"].double()[:, None]).solution
    xva = torch.cat([b.val.dense, torch.ones(len(b.val), 1)], 1).double()
    assert auc((xva @ coef)[:, 0], b.val.labels["click"]) > 0.55
    # the true probabilities (the generator's own reference) rank well
    assert b.meta["oracle_auc"]["click"] > 0.75
    assert b.meta["oracle_auc"]["conversion"] > 0.75


def test_sparse_dwell_correlates_with_conversion(sparse_bundle: DataBundle) -> None:
    b = sparse_bundle
    clicked = b.train.labels["click"] == 1
    d, c = b.train.labels["dwell"][clicked], b.train.labels["conversion"][clicked]
    assert float(d[c == 1].mean()) > float(d[c == 0].mean())


def test_sparse_batches_are_kjt_with_matching_lengths(sparse_bundle: DataBundle) -> None:
    ds = sparse_bundle.train
    index = torch.arange(100, 164)
    batch = ds.batch(index)
    kjt = batch.sparse
    assert kjt.keys() == ["user_id", "item_id", "category", "history"]
    per_key = kjt.to_dict()
    for k in kjt.keys():
        lens = ds.sparse_lengths[k][index]
        assert torch.equal(per_key[k].lengths().long(), lens)
        rows = ds.sparse_ids[k][index]
        expected = torch.cat([rows[r, : lens[r]] for r in range(len(index))])
        assert torch.equal(per_key[k].values(), expected)
    assert len(per_key["history"].lengths().unique()) > 1
    assert batch.dense.shape == (64, 4)
    assert set(batch.labels) == {"click", "conversion", "dwell"}


def test_sparse_seeding() -> None:
    kw = dict(n_rows=3000, num_users=300, num_items=800, num_categories=20, history_len=5, dense_dim=2)
    a, b, c = (load_sparse_synthetic(**kw, seed=s) for s in (7, 7, 8))
    for split in ("train", "val", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert torch.equal(x.dense, y.dense)
        for k in x.sparse_ids:
            assert torch.equal(x.sparse_ids[k], y.sparse_ids[k])
            assert torch.equal(x.sparse_lengths[k], y.sparse_lengths[k])
        for k in x.labels:
            assert torch.equal(x.labels[k], y.labels[k])
    assert not torch.equal(a.train.sparse_ids["item_id"], c.train.sparse_ids["item_id"])
    assert not torch.equal(a.train.labels["click"], c.train.labels["click"])


def test_sparse_without_history_or_dense() -> None:
    b = load_sparse_synthetic(
        n_rows=500, num_users=50, num_items=100, num_categories=5, history_len=0, dense_dim=0, seed=1
    )
    assert b.train.dense.shape == (400, 0)
    assert int(b.train.sparse_lengths["history"].max()) == 0
    assert next(b.train.batches(32)).sparse.to_dict()["history"].values().numel() == 0
