"""Baselines that a model must beat."""

from __future__ import annotations

import numpy as np


def unigram_cross_entropy(train_counts: np.ndarray, test_counts: np.ndarray) -> float:
    """Cross-entropy (nats per token) of test targets under the training unigram distribution.

    The baseline predicts every next ID token from each unit's (and EOS's) training
    frequency alone, ignoring stimulus, history and position: a per-unit firing-frequency
    model. Add-one smoothing over the tokens that occur as targets at all.

    Args:
        train_counts: (V,) target counts per ID token in the training windows (PAD/SOS zero).
        test_counts: (V,) target counts per ID token in the test windows.
    """
    support = (train_counts + test_counts) > 0
    p = np.where(support, train_counts + 1.0, 0.0)
    p = p / p.sum()
    n = test_counts.sum()
    if n == 0:
        raise ValueError("no test targets to score")
    return float(-(test_counts[support] * np.log(p[support])).sum() / n)
