"""Scores of a clustering against known labels: adjusted Rand index, majority-type accuracy."""

from __future__ import annotations

import numpy as np


def _pairs(n: np.ndarray) -> np.ndarray:
    return n * (n - 1) / 2.0


def adjusted_rand_index(labels: np.ndarray, truth: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) of two labelings of the same (n,) items.

    1 for identical partitions (whatever the label names), about 0 for independent ones.
    """
    labels, truth = np.asarray(labels), np.asarray(truth)
    if labels.shape != truth.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and truth {truth.shape} must be the same (n,) shape")
    _, a = np.unique(labels, return_inverse=True)
    _, b = np.unique(truth, return_inverse=True)
    table = np.zeros((a.max(initial=-1) + 1, b.max(initial=-1) + 1))
    np.add.at(table, (a, b), 1)
    index = _pairs(table).sum()
    rows, cols, total = _pairs(table.sum(1)).sum(), _pairs(table.sum(0)).sum(), _pairs(np.array(len(labels)))
    expected = rows * cols / total if total > 0 else 0.0
    best = 0.5 * (rows + cols)
    if best == expected:  # both partitions trivial (one cluster each, or all singletons)
        return 1.0
    return float((index - expected) / (best - expected))


def majority_types(labels: np.ndarray, truth: np.ndarray) -> dict:
    """Cluster -> the most common true type among its (n,) items."""
    out = {}
    for c in np.unique(labels):
        values, counts = np.unique(np.asarray(truth)[labels == c], return_counts=True)
        out[c.item() if hasattr(c, "item") else c] = values[counts.argmax()]
    return out
