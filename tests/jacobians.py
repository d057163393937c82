"""Jacobians that real multi-task training produces, for property tests of the gradient methods.

Rows are task gradients. Every family draws row norms log-uniformly from ``[1e-3, 1e3]`` (an MSE head next to
a rare-event BCE head, a critic next to an actor), and then adds one kind of degeneracy:

- ``spread``: random directions (general position when ``k <= p``).
- ``conflict``: random directions pushed against a common one (many negative cosines).
- ``near_duplicate``: every row within 1e-6 (relative) of one direction.
- ``duplicate``: two rows exactly equal (same direction and norm).
- ``opposite``: one row a negative multiple of another (0 in the convex hull).
- ``zero``: one row exactly zero.
- ``rank_deficient``: ``k`` rows in a subspace of dimension ``min(k - 1, 3)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FAMILIES = ("spread", "conflict", "near_duplicate", "duplicate", "opposite", "zero", "rank_deficient")
GENERAL = ("spread", "conflict")  # general position for k <= p: unique weights for every method


def jacobian(family: str, k: int, seed: int, p: int = 8, low: float = -3.0, high: float = 3.0) -> Tensor:
    """``G [k, p]`` float64 of ``family`` (see the module docstring), from ``seed``."""
    rng = np.random.default_rng(seed)
    norms = 10.0 ** rng.uniform(low, high, k)
    U = rng.standard_normal((k, p))
    if family == "conflict":
        base = rng.standard_normal(p)
        base /= np.linalg.norm(base)
        U /= np.linalg.norm(U, axis=1, keepdims=True)
        U = U - 1.5 * np.sign(rng.standard_normal(k))[:, None] * base[None, :]
    elif family == "near_duplicate":
        U = rng.standard_normal(p)[None, :] + 1e-6 * rng.standard_normal((k, p))
    elif family == "rank_deficient":
        r = max(1, min(k - 1, 3))
        U = rng.standard_normal((k, r)) @ rng.standard_normal((r, p))
    elif family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    G = U / np.linalg.norm(U, axis=1, keepdims=True) * norms[:, None]
    if family == "duplicate" and k >= 2:
        G[1] = G[0]
    elif family == "opposite" and k >= 2:
        G[1] = -G[0] * 10.0 ** rng.uniform(low, high)
    elif family == "zero":
        G[rng.integers(k)] = 0.0
    return torch.tensor(G, dtype=torch.float64)


def gross(w: Tensor, G: Tensor) -> float:
    """``sum_i |w_i| ||g_i||``: the size of the combination before cancellation, the scale at which a Gram
    matrix resolves ``w^T G`` (rounding of ``M`` is about 1e-16 of it, squared)."""
    return float((w.abs() * G.norm(dim=1)).sum())
