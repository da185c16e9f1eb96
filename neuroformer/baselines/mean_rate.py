"""The mean-rate predictor: every unit fires at its training-block mean rate, in every bin of every window."""

from __future__ import annotations

import numpy as np

from neuroformer.data.recording import Recording
from neuroformer.data.tokenizer import SpikeTokenizer


def mean_rate_counts(rec: Recording, train: np.ndarray, starts: np.ndarray, tokenizer: SpikeTokenizer) -> np.ndarray:
    """(B, n_bins, U) expected counts: each unit's spikes per second over the ``train`` spans times the bin width.

    Args:
        rec: the recording. train: (n, 2) [start, stop) seconds. starts: (B,) window starts, seconds.
        tokenizer: the window's dt bins (the last one may be shorter than ``resolution``).
    """
    times, units = rec.units.spike_times, rec.units.spike_units
    inside = np.zeros(len(times), bool)
    for lo, hi in train:
        inside[np.searchsorted(times, lo) : np.searchsorted(times, hi)] = True
    duration = float(np.sum(np.asarray(train)[:, 1] - np.asarray(train)[:, 0]))
    rate = np.bincount(units[inside], minlength=rec.units.n_units) / duration  # (U,) Hz
    edges = np.minimum(tokenizer.resolution * np.arange(tokenizer.n_bins + 1), tokenizer.window)
    return np.broadcast_to(np.diff(edges)[:, None] * rate, (len(starts), tokenizer.n_bins, len(rate))).copy()
