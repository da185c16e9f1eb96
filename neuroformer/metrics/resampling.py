"""Resampling statistics: bias correction of scores computed from a finite number of samples."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def jackknife(statistic: Callable[[np.ndarray], float], sample_rates: np.ndarray) -> float:
    """Jackknife bias correction of ``statistic(mean rate map)`` over the S per-sample maps.

    A nonlinear statistic of a noisy mean is biased, by O(1/S): bits per spike takes the log of
    the rates, so noise lowers it (Jensen). ``S f(mean) - (S - 1) * mean_i f(mean without sample i)``
    cancels the 1/S term (Quenouille), leaving O(1/S^2).

    Args:
        statistic: maps a (B, n_bins, U) rate map to a number, e.g. ``lambda r: bits_per_spike(r, spikes)``.
        sample_rates: (S, B, n_bins, U) per-sample rate maps, S >= 2.
    """
    S = len(sample_rates)
    if S < 2:
        raise ValueError(f"the jackknife needs at least 2 samples; got {S}")
    total = sample_rates.sum(axis=0, dtype=np.float64)
    leave_one_out = [statistic((total - r) / (S - 1)) for r in sample_rates]
    return float(S * statistic(total / S) - (S - 1) * np.mean(leave_one_out))
