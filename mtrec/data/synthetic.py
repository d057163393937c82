"""Synthetic multi-task data: the MMoE regression benchmark and a sparse recommendation log.

Both generators are vectorised numpy, seeded by one ``numpy.random.Generator`` whose draws happen in a
fixed order, so the same arguments always give the same data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from mtl.metrics import auc
from mtl.tasks import TaskSpec
from mtrec.data.batch import DataBundle, FeatureSpec, SparseFeature, TabularDataset, split_indices

__all__ = ["load_mmoe_synthetic", "load_sparse_synthetic", "mmoe_synthetic"]


# --------------------------------------------------------------------------------------------------
# MMoE synthetic data (Ma et al. 2018, section 3.2)
# --------------------------------------------------------------------------------------------------


def mmoe_synthetic(
    n: int,
    dim: int = 100,
    correlation: float = 0.5,
    num_sines: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Two regression tasks whose correlation is controlled by the cosine of their weight vectors.

    ``u1, u2`` are orthonormal (QR of a seeded Gaussian ``[dim, 2]`` matrix), ``w1 = c u1`` and
    ``w2 = c (p u1 + sqrt(1 - p^2) u2)`` so that ``cos(w1, w2) = p``. With ``x ~ N(0, I)``::

        y_i = w_i.x + sum_k sin(a_k w_i.x + b_k) + eps_i

    with ``a_k, b_k ~ N(0, 1)`` shared by both tasks and ``eps_i ~ N(0, noise_std^2)``.

    The weights, ``a`` and ``b`` are drawn before ``x``, so they depend on ``seed`` (and ``dim``,
    ``num_sines``) but not on ``n``.

    Args:
        n: number of samples.
        dim: input dimension ``d`` (>= 2).
        correlation: ``p``, the cosine between the two task weight vectors, in ``[-1, 1]``.
        num_sines: ``m``, the number of sine terms.
        scale: ``c``, the norm of both weight vectors.
        noise_std: standard deviation of the label noise (0.1 is the paper's variance 0.01).
        seed: random seed.

    Returns:
        ``{"x": float32 [n, dim], "y1": float32 [n], "y2": float32 [n], "w1": float64 [dim],
        "w2": float64 [dim], "alpha": float64 [m], "beta": float64 [m]}``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2 (two orthogonal directions are needed), got {dim}")
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must lie in [-1, 1], got {correlation}")
    if num_sines < 0:
        raise ValueError(f"num_sines must be >= 0, got {num_sines}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    p = float(correlation)
    w1 = scale * u1
    w2 = scale * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)
    alpha = rng.standard_normal(num_sines)
    beta = rng.standard_normal(num_sines)
    x = rng.standard_normal((n, dim))
    eps = rng.standard_normal((n, 2)) * noise_std

    def label(w: np.ndarray, e: np.ndarray) -> np.ndarray:
        s = x @ w
        return s + np.sin(np.outer(s, alpha) + beta).sum(axis=1) + e

    return {
        "x": torch.from_numpy(x.astype(np.float32)),
        "y1": torch.from_numpy(label(w1, eps[:, 0]).astype(np.float32)),
        "y2": torch.from_numpy(label(w2, eps[:, 1]).astype(np.float32)),
        "w1": torch.from_numpy(w1),
        "w2": torch.from_numpy(w2),
        "alpha": torch.from_numpy(alpha),
        "beta": torch.from_numpy(beta),
    }


def load_mmoe_synthetic(
    n_train: int = 10000,
    n_val: int = 1000,
    n_test: int = 1000,
    dim: int = 100,
    correlation: float = 0.5,
    num_sines: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    seed: int = 0,
) -> DataBundle:
    """The MMoE synthetic benchmark as a :class:`DataBundle` with regression tasks ``task1`` and ``task2``.

    One call to :func:`mmoe_synthetic` draws all ``n_train + n_val + n_test`` rows (so every split shares
    the same task weights); the rows are i.i.d., so the first ``n_train`` are train, the next ``n_val``
    val and the rest test. Dense features are ``x0 .. x{dim-1}``; there are no sparse features.
    """
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    d = mmoe_synthetic(
        n_train + n_val + n_test,
        dim=dim,
        correlation=correlation,
        num_sines=num_sines,
        scale=scale,
        noise_std=noise_std,
        seed=seed,
    )
    full = TabularDataset(dense=d["x"], labels={"task1": d["y1"], "task2": d["y2"]})
    bounds = [0, n_train, n_train + n_val, n_train + n_val + n_test]
    train, val, test = (full.subset(torch.arange(bounds[i], bounds[i + 1])) for i in range(3))
    w1, w2 = d["w1"], d["w2"]
    cos = float(w1 @ w2 / (w1.norm() * w2.norm())) if scale != 0 else float("nan")
    return DataBundle(
        train=train,
        val=val,
        test=test,
        features=FeatureSpec(dense_names=tuple(f"x{i}" for i in range(dim)), sparse=()),
        tasks=[TaskSpec("task1", "regression"), TaskSpec("task2", "regression")],
        meta={
            "source": "mmoe_synthetic",
            "correlation": float(correlation),
            "weight_cosine": cos,
            "label_correlation_train": _pearson(train.labels["task1"], train.labels["task2"]),
            "seed": int(seed),
            "dim": int(dim),
            "num_sines": int(num_sines),
            "scale": float(scale),
            "noise_std": float(noise_std),
            "sizes": {"train": n_train, "val": n_val, "test": n_test},
        },
    )


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


# --------------------------------------------------------------------------------------------------
# Sparse synthetic recommendation log
# --------------------------------------------------------------------------------------------------

_TARGET_CTR = 0.10  # mean click probability over impressions
_TARGET_CVR = 0.15  # mean conversion probability over clicked impressions


def _zipf_cdf(n: int, a: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** (-float(a))
    c = np.cumsum(w)
    return c / c[-1]


def _sample_cdf(rng: np.random.Generator, cdf: np.ndarray, size: int | tuple[int, ...]) -> np.ndarray:
    """Inverse-CDF sampling of ranks ``0 .. len(cdf)-1``."""
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(cdf) - 1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _calibrate_bias(z: np.ndarray, target: float, max_rows: int = 200_000) -> float:
    """The offset ``b`` with ``mean(sigmoid(z + b)) = target`` (bisection on at most ``max_rows`` rows)."""
    z = z[:max_rows]
    if z.size == 0:
        return math.log(target / (1.0 - target))
    lo, hi = -30.0, 30.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if _sigmoid(z + mid).mean() < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nk,nk->n", a, b)


def load_sparse_synthetic(
    n_rows: int = 200000,
    num_users: int = 10000,
    num_items: int = 50000,
    num_categories: int = 500,
    history_len: int = 20,
    zipf_a: float = 1.2,
    dense_dim: int = 8,
    latent_dim: int = 8,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> DataBundle:
    """A synthetic impression log with Zipf-distributed ids and three correlated tasks.

    Generative story (all vectorised):

    * Users and items are drawn with Zipf(``zipf_a``) popularity over their id spaces (popularity rank is
      mapped to ids by a seeded permutation). Each item has one category (``item -> category`` is a fixed
      table).
    * Latent factors: category vectors ``C``, item vectors ``V = 0.7 C[cat] + 0.7 N(0, I)``, user vectors
      ``U``; plus user, item and category biases.
    * Each user has a taste-driven history: ``history_len`` items chosen among popularity-drawn candidates
      by affinity to the user; a row shows a prefix of it whose length varies per row (0 allowed).
    * Dense features are ``N(0, 1)`` context features with linear effects on both binary tasks.
    * ``click ~ Bernoulli(sigmoid(U.V + 0.8 mean(V[history]).V + biases + dense.w + b0))``, with ``b0``
      calibrated to a 10% click rate.
    * ``conversion = click AND Bernoulli(sigmoid(U'.V + 0.5 U.V + quality + dense.w' + b1))``, ``U'``
      correlated with ``U`` (``b1`` calibrated to a 15% rate among clicks), so conversion is labelled over
      all impressions (CTCVR-style) and implies click.
    * ``dwell = log1p(dwell seconds)`` on clicked rows (log-normal, driven by the same affinities), else 0.

    Features: ``user_id`` (``num_users`` ids), ``item_id`` (``num_items``), ``category``
    (``num_categories``), ``history`` (item ids, up to ``history_len`` per row, mean pooling) and dense
    ``d0 .. d{dense_dim-1}``. ``meta["oracle_auc"]`` holds the test AUC of the true probabilities, an upper
    reference for models.
    """
    for name, v in (
        ("n_rows", n_rows),
        ("num_users", num_users),
        ("num_items", num_items),
        ("num_categories", num_categories),
        ("latent_dim", latent_dim),
    ):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if history_len < 0 or dense_dim < 0:
        raise ValueError(f"history_len and dense_dim must be >= 0, got {history_len}, {dense_dim}")
    if zipf_a <= 0:
        raise ValueError(f"zipf_a must be > 0, got {zipf_a}")
    split = tuple(float(f) for f in split)
    rng = np.random.default_rng(seed)
    k, H, n = latent_dim, history_len, n_rows
    rk = 1.0 / math.sqrt(k)

    # --- entity tables -----------------------------------------------------------------------------
    item_cdf = _zipf_cdf(num_items, zipf_a)
    user_cdf = _zipf_cdf(num_users, zipf_a)
    item_of_rank = rng.permutation(num_items)
    user_of_rank = rng.permutation(num_users)
    cat_of_item = rng.integers(0, num_categories, size=num_items)
    cat_vec = rng.standard_normal((num_categories, k))
    item_vec = 0.7 * cat_vec[cat_of_item] + 0.7 * rng.standard_normal((num_items, k))
    user_vec = rng.standard_normal((num_users, k))
    user_vec2 = 0.6 * user_vec + 0.8 * rng.standard_normal((num_users, k))  # conversion taste
    user_bias = 0.5 * rng.standard_normal(num_users)
    item_bias = 0.5 * rng.standard_normal(num_items)
    cat_bias = 0.5 * rng.standard_normal(num_categories)
    item_quality = 0.7 * rng.standard_normal(num_items)
    w_click = 0.6 / math.sqrt(max(dense_dim, 1)) * rng.standard_normal(dense_dim)
    w_conv = 0.5 * w_click + 0.5 / math.sqrt(max(dense_dim, 1)) * rng.standard_normal(dense_dim)

    # --- per-user histories: top-H of 3H popularity-drawn candidates by affinity + Gumbel noise ------
    user_len = rng.integers(0, H + 1, size=num_users)
    hist_prefix = np.zeros((num_users, H + 1, k), dtype=np.float32)  # prefix sums of history item vectors
    user_hist = np.zeros((num_users, H), dtype=np.int64)
    if H > 0:
        n_cand = 3 * H
        block = max(1, 2_000_000 // n_cand)
        for s in range(0, num_users, block):
            e = min(num_users, s + block)
            cand = item_of_rank[_sample_cdf(rng, item_cdf, (e - s, n_cand))]
            score = np.einsum("uk,uck->uc", user_vec[s:e], item_vec[cand]) * rk + rng.gumbel(size=cand.shape)
            top = np.argsort(-score, axis=1)[:, :H]
            user_hist[s:e] = np.take_along_axis(cand, top, axis=1)
            hist_prefix[s:e, 1:] = np.cumsum(item_vec[user_hist[s:e]], axis=1)

    # --- impressions -------------------------------------------------------------------------------
    u = user_of_rank[_sample_cdf(rng, user_cdf, n)]
    i = item_of_rank[_sample_cdf(rng, item_cdf, n)]
    c = cat_of_item[i]
    hlen = rng.binomial(user_len[u], 0.8)
    dense = rng.standard_normal((n, dense_dim)).astype(np.float32)
    hist = user_hist[u]
    hist[np.arange(H)[None, :] >= hlen[:, None]] = 0

    vi = item_vec[i]
    aff = _dot(user_vec[u], vi) * rk
    hmean = hist_prefix[u, hlen] / np.maximum(hlen, 1)[:, None]
    haff = _dot(hmean, vi) * rk
    z_click = aff + 0.8 * haff + user_bias[u] + item_bias[i] + cat_bias[c] + dense @ w_click
    b_click = _calibrate_bias(z_click, _TARGET_CTR)
    p_click = _sigmoid(z_click + b_click)
    click = rng.random(n) < p_click

    z_conv = _dot(user_vec2[u], vi) * rk + 0.5 * aff + item_quality[i] + dense @ w_conv
    b_conv = _calibrate_bias(z_conv[click], _TARGET_CVR)
    p_conv = _sigmoid(z_conv + b_conv)
    conversion = click & (rng.random(n) < p_conv)

    log_sec = 3.0 + 0.4 * aff + 0.3 * z_conv + 0.5 * rng.standard_normal(n)
    dwell = np.where(click, np.log1p(np.exp(log_sec)), 0.0)

    # --- assemble ----------------------------------------------------------------------------------
    ones = torch.ones(n, dtype=torch.int64)
    full = TabularDataset(
        dense=torch.from_numpy(dense),
        sparse_ids={
            "user_id": torch.from_numpy(u).unsqueeze(1),
            "item_id": torch.from_numpy(i).unsqueeze(1),
            "category": torch.from_numpy(c).unsqueeze(1),
            "history": torch.from_numpy(hist),
        },
        sparse_lengths={
            "user_id": ones,
            "item_id": ones,
            "category": ones,
            "history": torch.from_numpy(hlen),
        },
        labels={
            "click": torch.from_numpy(click.astype(np.float32)),
            "conversion": torch.from_numpy(conversion.astype(np.float32)),
            "dwell": torch.from_numpy(dwell.astype(np.float32)),
        },
    )
    idx = split_indices(n, split, seed)
    train, val, test = (full.subset(ix) for ix in idx)

    oracle: dict[str, float] = {}
    if len(test) > 0:
        t = idx[2].numpy()
        oracle["click"] = auc(torch.from_numpy(p_click[t]), test.labels["click"])
        oracle["conversion"] = auc(torch.from_numpy(p_click[t] * p_conv[t]), test.labels["conversion"])

    features = FeatureSpec(
        dense_names=tuple(f"d{j}" for j in range(dense_dim)),
        sparse=(
            SparseFeature("user_id", num_users),
            SparseFeature("item_id", num_items),
            SparseFeature("category", num_categories),
            SparseFeature("history", num_items, max_len=H, pooling="mean"),
        ),
    )
    return DataBundle(
        train=train,
        val=val,
        test=test,
        features=features,
        tasks=[
            TaskSpec("click", "binary"),
            TaskSpec("conversion", "binary"),
            TaskSpec("dwell", "regression"),
        ],
        meta={
            "source": "sparse_synthetic",
            "seed": int(seed),
            "n_rows": int(n),
            "num_users": int(num_users),
            "num_items": int(num_items),
            "num_categories": int(num_categories),
            "history_len": int(H),
            "zipf_a": float(zipf_a),
            "dense_dim": int(dense_dim),
            "latent_dim": int(k),
            "split": list(split),
            "sizes": {"train": len(train), "val": len(val), "test": len(test)},
            "rates": {
                "click": float(click.mean()),
                "conversion": float(conversion.mean()),
                "conversion_given_click": float(conversion[click].mean()) if click.any() else float("nan"),
                "dwell_mean_clicked": float(dwell[click].mean()) if click.any() else float("nan"),
            },
            "oracle_auc": oracle,
        },
    )
