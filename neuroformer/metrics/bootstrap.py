"""Block-bootstrap confidence intervals for scores of consecutive windows.

Neighbouring windows share a stimulus, a running bout, a network state: their scores are
correlated, so resampling single windows (the iid bootstrap) gives intervals that are too narrow.
The block bootstrap resamples contiguous blocks of windows instead:

1. The windows are sorted by start time and cut into runs wherever consecutive starts are more
   than ``gap`` seconds apart (e.g. the gaps between interleaved test blocks); each run is cut into
   blocks of ``block`` seconds. No block spans a gap.
2. A replicate draws as many blocks as there are, with replacement.
3. Every score here is a function of sums over windows (bits per spike: the model's NLL and each
   unit's spike and bin counts, so the null rate is re-estimated too; a mean: a sum and a count).
   A replicate's sums are the drawn blocks' sums; the score is recomputed from them, and the
   interval is the percentile interval of the replicates.

Two models scored on the same windows are compared with the same replicates (paired), so their
shared window-to-window variation cancels from a difference or a ratio (e.g. model / oracle).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from neuroformer.metrics.nlb import RATE_FLOOR

BLOCK_SECONDS = 2.0  # about the simulated stimulus blocks' length (2-4 s); longer than the network's memory


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval.

    Attributes:
        estimate: the score on all windows. low, high: interval bounds. level: e.g. 0.95.
        n_blocks: blocks resampled.
    """

    estimate: float
    low: float
    high: float
    level: float
    n_blocks: int

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def window_blocks(starts: np.ndarray, block: float = BLOCK_SECONDS, gap: float | None = None) -> np.ndarray:
    """(B,) block index of each window (step 1 of the module docstring).

    Args:
        starts: (B,) window start times, seconds, any order.
        block: block length, seconds (at least one window per block).
        gap: a larger distance between consecutive starts begins a new run; default 1.5 x the
            median spacing of consecutive windows.
    """
    starts = np.asarray(starts, dtype=np.float64)
    if starts.ndim != 1 or len(starts) == 0:
        raise ValueError(f"starts must be a non-empty 1-D array; got shape {starts.shape}")
    if block <= 0:
        raise ValueError(f"block must be > 0 seconds; got {block}")
    order = np.argsort(starts, kind="stable")
    t = starts[order]
    step = np.diff(t)
    if gap is None:
        gap = 1.5 * float(np.median(step)) if len(step) else 0.0
    run = np.concatenate([[0], np.cumsum(step > gap)])
    run_start = t[np.concatenate([[0], np.flatnonzero(step > gap) + 1])][run]
    within = np.floor((t - run_start) / block + 1e-9).astype(np.int64)
    _, ids = np.unique(np.stack([run, within], axis=1), axis=0, return_inverse=True)
    out = np.empty(len(starts), dtype=np.int64)
    out[order] = ids.ravel()
    return out


def resample_counts(n_blocks: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_blocks) float64: how often each block is drawn in each replicate (step 2 of the module docstring)."""
    flat = (np.arange(n_boot)[:, None] * n_blocks + rng.integers(n_blocks, size=(n_boot, n_blocks))).ravel()
    return np.bincount(flat, minlength=n_boot * n_blocks).reshape(n_boot, n_blocks).astype(np.float64)


def bootstrap(sums: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], starts: np.ndarray,
              block: float = BLOCK_SECONDS, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
              gap: float | None = None) -> Interval:
    """Percentile interval of any score that is a function of sums over windows.

    Args:
        sums: (B, D) per-window sufficient statistics (e.g. a score and a 1 per window, for a mean).
        statistic: maps (R, D) totals over the windows of R replicates to (R,) scores.
        starts: (B,) window starts, seconds (define the blocks).
        block, gap: see ``window_blocks``. n_boot: replicates. level: coverage, e.g. 0.95.
        seed: random seed of the resampling (the same seed and windows give the same replicates).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    sums = np.asarray(sums, dtype=np.float64).reshape(len(sums), -1)
    blocks = window_blocks(starts, block, gap)
    if len(blocks) != len(sums):
        raise ValueError(f"{len(sums)} windows of statistics but {len(blocks)} window starts")
    n_blocks = int(blocks.max()) + 1
    per_block = np.zeros((n_blocks, sums.shape[1]))
    np.add.at(per_block, blocks, sums)
    estimate = float(statistic(sums.sum(0, keepdims=True))[0])
    reps = statistic(resample_counts(n_blocks, n_boot, np.random.default_rng(seed)) @ per_block)
    reps = reps[np.isfinite(reps)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(reps, [tail, 100 - tail]) if len(reps) else (math.nan, math.nan)
    return Interval(estimate, float(low), float(high), level, n_blocks)


def mean_interval(values: np.ndarray, starts: np.ndarray, **kwargs) -> Interval:
    """Interval of the mean of a per-window score ``values`` (B,) (NaN windows left out); kwargs: ``bootstrap``'s."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    sums = np.stack([np.where(ok, values, 0.0), ok], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return bootstrap(sums, lambda t: t[:, 0] / t[:, 1], starts, **kwargs)


def _bps_sums(rates: np.ndarray, spikes: np.ndarray) -> np.ndarray:
    """(B, 1 + 2U) per-window sufficient statistics of bits per spike, as ``nlb.BitsPerSpike`` counts them
    (NaN spikes left out, zero rates floored): model NLL without log s!, spike sum per unit, kept bins per unit.

    Args:
        rates, spikes: (B, n_bins, U).
    """
    r, s = np.asarray(rates, dtype=np.float64), np.asarray(spikes, dtype=np.float64)
    if r.shape != s.shape or r.ndim != 3:
        raise ValueError(f"rates {r.shape} and spikes {s.shape} must have the same shape (B, n_bins, U)")
    keep = ~np.isnan(s)
    if np.isnan(r[keep]).any() or (r[keep] < 0).any():
        raise ValueError("rates: predicted rates must be >= 0 and not NaN wherever spikes are not NaN")
    r = np.where(keep & (r == 0), RATE_FLOOR, np.where(keep, r, 1.0))
    s0 = np.where(keep, s, 0.0)
    nll = np.where(keep, r - s0 * np.log(r), 0.0).sum(axis=(1, 2))
    return np.concatenate([nll[:, None], s0.sum(1), keep.sum(1)], axis=1)


def _bps(nll: np.ndarray, spike_sum: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """(R,) bits per spike from totals: model NLL (R,), spikes and kept bins per unit (R, U)."""
    r0 = np.where(spike_sum > 0, spike_sum / np.maximum(bins, 1), RATE_FLOOR)
    null = (bins * r0 - spike_sum * np.log(r0)).sum(1)
    total = spike_sum.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (null - nll) / (total * math.log(2)), np.nan)


def bits_per_spike_interval(rates: np.ndarray, spikes: np.ndarray, starts: np.ndarray, **kwargs) -> Interval:
    """Interval of NLB bits per spike of ``rates`` against ``spikes`` (B, n_bins, U); kwargs: ``bootstrap``'s.

    The estimate equals ``nlb.bits_per_spike(rates, spikes)``.
    """
    U = np.shape(spikes)[-1]
    return bootstrap(_bps_sums(rates, spikes), lambda t: _bps(t[:, 0], t[:, 1 : 1 + U], t[:, 1 + U :]), starts,
                     **kwargs)


def paired_interval(rates_a: np.ndarray, rates_b: np.ndarray, spikes: np.ndarray, starts: np.ndarray,
                    compare: str = "difference", **kwargs) -> Interval:
    """Interval of bits per spike of model a minus (``"difference"``) or over (``"ratio"``) that of model b.

    Both are scored on the same replicates of the same windows; e.g. ``compare="ratio"`` with b the
    oracle gives the fraction of the ceiling a model reaches. kwargs: ``bootstrap``'s.
    """
    if compare not in ("difference", "ratio"):
        raise ValueError(f"compare must be 'difference' or 'ratio'; got {compare!r}")
    U = np.shape(spikes)[-1]
    a, b = _bps_sums(rates_a, spikes), _bps_sums(rates_b, spikes)

    def statistic(t: np.ndarray) -> np.ndarray:
        x = _bps(t[:, 0], t[:, 2 : 2 + U], t[:, 2 + U :])
        y = _bps(t[:, 1], t[:, 2 : 2 + U], t[:, 2 + U :])
        return x - y if compare == "difference" else x / y

    return bootstrap(np.concatenate([a[:, :1], b], axis=1), statistic, starts, **kwargs)
