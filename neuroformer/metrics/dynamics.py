"""How alike two populations' dynamics are: pure functions of trajectories (numpy in, floats out).

Trajectories are condition-averaged: ``(C, T, D)`` arrays (conditions, time bins, units), or
their flattened ``(C * T, D)`` samples. Each score is 1 for identical inputs and near 0 for
unrelated ones:

- ``cca_similarity``: mean canonical correlation between the top principal components of
  each (SVCCA: invariant to any invertible linear map of either population);
- ``linear_cka``: linear centred kernel alignment (invariant to rotations and overall scale,
  not to arbitrary linear maps: it also asks that the variance be spread alike);
- ``ridge_r2``: how well one population's units are predicted, linearly, from the other's,
  cross-validated across conditions (for neurons the model was never shown).
"""

from __future__ import annotations

import numpy as np


def _samples(x: np.ndarray) -> np.ndarray:
    """(C, T, D) or (n, D) -> (n, D) float64, centred on each column's mean."""
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    return x - x.mean(axis=0)


def principal_components(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` principal components of trajectories ``x`` ((C, T, D) or (n, D)).

    Returns:
        scores: (n, k) projections of the centred samples.
        explained: (k,) fraction of the total variance each explains.
    """
    xc = _samples(x)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    k = min(k, len(s))
    return u[:, :k] * s[:k], s[:k] ** 2 / max(float(np.sum(s**2)), 1e-300)


def canonical_correlations(x: np.ndarray, y: np.ndarray, k: int = 10) -> np.ndarray:
    """Canonical correlations between the top ``k`` principal components of ``x`` and of ``y``.

    Args:
        x: (C, T, Dx) or (n, Dx) trajectories; y: the same samples, (C, T, Dy) or (n, Dy).
        k: principal components kept of each (noise-dominated directions would otherwise
            find spurious correlations).

    Returns:
        (min(k, ranks),) correlations, descending, each in [0, 1].
    """
    xs, ys = _samples(x), _samples(y)
    if len(xs) != len(ys):
        raise ValueError(f"x has {len(xs)} samples, y has {len(ys)}; they must be the same time points")
    bases = []
    for z in (xs, ys):
        u, s, _ = np.linalg.svd(z, full_matrices=False)
        rank = int(np.sum(s > s[0] * 1e-9)) if len(s) and s[0] > 0 else 0
        bases.append(u[:, : min(k, rank)])  # orthonormal basis of the top components
    return np.clip(np.linalg.svd(bases[0].T @ bases[1], compute_uv=False), 0.0, 1.0)


def cca_similarity(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mean canonical correlation of the top ``k`` components (see ``canonical_correlations``)."""
    rho = canonical_correlations(x, y, k)
    return float(rho.mean()) if len(rho) else 0.0


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA ``||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F)`` of centred samples, in [0, 1]."""
    xs, ys = _samples(x), _samples(y)
    if len(xs) != len(ys):
        raise ValueError(f"x has {len(xs)} samples, y has {len(ys)}; they must be the same time points")
    cross = np.linalg.norm(ys.T @ xs) ** 2
    norm = np.linalg.norm(xs.T @ xs) * np.linalg.norm(ys.T @ ys)
    return float(cross / norm) if norm > 0 else 0.0


def ridge_r2(states: np.ndarray, targets: np.ndarray, alpha: float = 1e-2) -> np.ndarray:
    """Cross-validated R^2 of predicting each target unit linearly from ``states``.

    Leave one condition out: for each condition, a ridge regression fitted on the others
    predicts it, so a score is earned on trajectories the fit never saw.

    Args:
        states: (C, T, H) predictor trajectories (e.g. an RNN's units), C >= 2.
        targets: (C, T, N) trajectories to predict (e.g. reference neurons never recorded).
        alpha: ridge penalty relative to the mean variance of the (centred) states, so the
            score does not depend on their scale.

    Returns:
        (N,) R^2 of each target unit over all held-out predictions (1 - SSE / SST, SST about
        the unit's mean); NaN for a unit that does not vary.
    """
    x = np.asarray(states, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if x.shape[:2] != y.shape[:2] or x.ndim != 3 or y.ndim != 3:
        raise ValueError(f"states {x.shape} and targets {y.shape} must be (C, T, .) with the same C and T")
    n_cond = x.shape[0]
    if n_cond < 2:
        raise ValueError("ridge_r2 holds out one condition at a time: it needs at least 2")
    predicted = np.empty_like(y)
    for c in range(n_cond):
        train = np.arange(n_cond) != c
        xt, yt = x[train].reshape(-1, x.shape[2]), y[train].reshape(-1, y.shape[2])
        mx, my = xt.mean(axis=0), yt.mean(axis=0)
        xt, yt = xt - mx, yt - my
        gram = xt.T @ xt
        penalty = alpha * max(np.trace(gram) / len(gram), 1e-12)
        weights = np.linalg.solve(gram + penalty * np.eye(len(gram)), xt.T @ yt)
        predicted[c] = (x[c] - mx) @ weights + my
    y2, p2 = y.reshape(-1, y.shape[2]), predicted.reshape(-1, y.shape[2])
    sst = np.sum((y2 - y2.mean(axis=0)) ** 2, axis=0)
    sse = np.sum((y2 - p2) ** 2, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sst > 0, 1 - sse / sst, np.nan)
