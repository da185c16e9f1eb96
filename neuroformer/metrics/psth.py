"""Peri-stimulus time histograms (PSTHs) over repeated trials, and how well a model matches them.

Trials are windows of equal length aligned to the onset of a repeated stimulus; ``groups``
names the stimulus of each trial (the simulator's ``clip_id``). A unit's PSTH for one
stimulus is its mean count per bin over that stimulus's trials; a unit's PSTH correlation is
the Pearson r between the predicted and the true PSTH over all (stimulus, bin) pairs, i.e.
the PSTHs of every stimulus placed end to end.

Finite repeats make the true PSTH noisy, so even a perfect model stays below r = 1. The
noise ceiling estimates that limit per unit from the data alone: the correlation between
the PSTHs of two halves of the trials (even- and odd-numbered repeats of each stimulus),
Spearman-Brown corrected to the full number of trials, ``rho = 2 r / (1 + r)``, gives the
reliability of the full-trial PSTH, and ``sqrt(rho)`` its expected correlation with the
noise-free response (Hsu, Borst & Theunissen 2004).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PSTH(NamedTuple):
    """Mean response per stimulus.

    Attributes:
        mean: (G, n_bins, U) mean count per bin over each stimulus's trials.
        groups: (G,) the stimulus of each row, sorted.
        n_trials: (G,) trials averaged for each row.
    """

    mean: np.ndarray
    groups: np.ndarray
    n_trials: np.ndarray


def rebin(counts: np.ndarray, factor: int) -> np.ndarray:
    """Sum ``factor`` consecutive bins: (..., n_bins, U) -> (..., n_bins // factor, U); a partial last bin is dropped."""
    n = counts.shape[-2] // factor
    if n == 0:
        raise ValueError(f"cannot merge {factor} bins of a {counts.shape[-2]}-bin trial")
    cut = counts[..., : n * factor, :]
    return cut.reshape(*cut.shape[:-2], n, factor, cut.shape[-1]).sum(axis=-2)


def psth(counts: np.ndarray, groups: np.ndarray) -> PSTH:
    """PSTH of every stimulus.

    Args:
        counts: (n_trials, n_bins, U) counts (or expected counts) of each trial.
        groups: (n_trials,) stimulus of each trial.
    """
    counts, groups = np.asarray(counts, dtype=np.float64), np.asarray(groups)
    if counts.ndim != 3 or len(groups) != len(counts):
        raise ValueError(f"counts must be (n_trials, n_bins, U) with one group per trial; got counts "
                         f"{counts.shape} and {len(groups)} groups")
    ids, inverse, n = np.unique(groups, return_inverse=True, return_counts=True)
    sums = np.zeros((len(ids), *counts.shape[1:]))
    np.add.at(sums, inverse, counts)
    return PSTH(sums / n[:, None, None], ids, n)


def pearson_per_unit(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(U,) Pearson r of a[..., u] and b[..., u] over all other axes; NaN where either is constant."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, dtype=np.float64).reshape(-1, np.shape(b)[-1])
    a, b = a - a.mean(0), b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(0) / den, np.nan)


def psth_correlation(pred: np.ndarray, true: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(U,) Pearson r between predicted and true PSTHs per unit (see the module docstring).

    Args:
        pred: (n_trials, n_bins, U) predicted (expected or generated) counts of each trial.
        true: (n_trials, n_bins, U) observed counts of the same trials.
        groups: (n_trials,) stimulus of each trial.
    """
    if np.shape(pred) != np.shape(true):
        raise ValueError(f"pred {np.shape(pred)} and true {np.shape(true)} must have the same shape")
    return pearson_per_unit(psth(pred, groups).mean, psth(true, groups).mean)


def noise_ceiling(true: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(U,) expected correlation of each unit's observed PSTH with its noise-free response.

    From the split-half correlation over the stimuli with at least two trials (see the module
    docstring); 0 where the halves do not correlate positively, NaN where undefined (no
    stimulus with two trials, or a silent unit).
    """
    true, groups = np.asarray(true, dtype=np.float64), np.asarray(groups)
    repeat = np.zeros(len(groups), dtype=np.int64)  # repeat number of each trial within its stimulus
    for g in np.unique(groups):
        repeat[groups == g] = np.arange((groups == g).sum())
    n = np.array([(groups == g).sum() for g in groups])
    keep = n >= 2
    if not keep.any():
        return np.full(true.shape[-1], np.nan)
    even, odd = keep & (repeat % 2 == 0), keep & (repeat % 2 == 1)
    r = pearson_per_unit(psth(true[even], groups[even]).mean, psth(true[odd], groups[odd]).mean)
    with np.errstate(invalid="ignore"):
        return np.where(r > 0, np.sqrt(2 * r / (1 + r)), np.where(np.isnan(r), np.nan, 0.0))
