"""Block-bootstrap intervals: blocks respect gaps, estimates match the metrics, coverage is nominal."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import lfilter

from neuroformer.metrics.bootstrap import (
    bits_per_spike_interval,
    mean_interval,
    paired_interval,
    window_blocks,
)
from neuroformer.metrics.nlb import bits_per_spike

STRIDE = 0.05


def _ar1(rng: np.random.Generator, n_series: int, n: int, phi: float) -> np.ndarray:
    """(n_series, n) stationary AR(1) series with unit variance."""
    start = rng.standard_normal((n_series, 1))
    noise = rng.standard_normal((n_series, n)) * np.sqrt(1 - phi**2)
    return lfilter([1.0], [1.0, -phi], noise, axis=1, zi=phi * start)[0]


def _interleaved_starts(n_blocks: int, per_block: int) -> np.ndarray:
    """Windows of ``n_blocks`` test blocks 60 s apart, each ``per_block`` consecutive windows."""
    return (60.0 * np.arange(n_blocks)[:, None] + STRIDE * np.arange(per_block)[None]).ravel()


def test_blocks_never_span_a_gap_and_follow_time_not_order():
    starts = _interleaved_starts(3, 100)  # 3 runs of 5 s
    blocks = window_blocks(starts, block=2.0)
    assert blocks.max() + 1 == 9  # 2 s + 2 s + 1 s per run
    for b in range(9):
        assert np.ptp(starts[blocks == b]) < 2.0
    shuffled = np.random.default_rng(0).permutation(len(starts))
    assert np.array_equal(window_blocks(starts[shuffled], block=2.0), blocks[shuffled])


def test_estimates_equal_the_metrics_on_all_windows():
    rng = np.random.default_rng(1)
    rates = rng.gamma(2.0, 0.02, size=(200, 10, 6))
    spikes = rng.poisson(rates).astype(float)
    other = rates.mean(axis=(0, 1), keepdims=True) * np.ones_like(rates)
    starts = STRIDE * np.arange(200)
    assert bits_per_spike_interval(rates, spikes, starts, n_boot=50).estimate == pytest.approx(
        bits_per_spike(rates, spikes), rel=1e-9)
    diff = paired_interval(rates, other, spikes, starts, n_boot=50)
    ratio = paired_interval(rates, other + 0.01, spikes, starts, compare="ratio", n_boot=50)
    assert diff.estimate == pytest.approx(bits_per_spike(rates, spikes) - bits_per_spike(other, spikes), rel=1e-9)
    assert ratio.estimate == pytest.approx(bits_per_spike(rates, spikes) / bits_per_spike(other + 0.01, spikes),
                                           rel=1e-9)
    values = rng.standard_normal(200)
    values[3] = np.nan
    assert mean_interval(values, starts, n_boot=50).estimate == pytest.approx(np.nanmean(values))


def test_mean_interval_covers_the_true_mean_at_the_nominal_rate_and_iid_does_not():
    """Correlated per-window scores (AR(1), correlation time 10 windows) in 4 interleaved test blocks."""
    rng = np.random.default_rng(2)
    starts = _interleaved_starts(4, 300)
    n_rep = 200
    series = _ar1(rng, n_rep * 4, 300, phi=0.9).reshape(n_rep, -1)  # true mean 0
    block = [mean_interval(x, starts, block=2.0, n_boot=300, seed=i).covers(0.0) for i, x in enumerate(series)]
    iid = [mean_interval(x, starts, block=STRIDE / 2, n_boot=300, seed=i).covers(0.0) for i, x in enumerate(series)]
    assert 0.84 <= np.mean(block) <= 0.99, np.mean(block)  # measured 0.88-0.90 over 400 samples
    assert np.mean(iid) < 0.75, np.mean(iid)  # single-window resampling ignores the correlation


def test_bits_per_spike_interval_covers_the_population_value():
    """Poisson spikes of known rates ``r = base exp(a z + tuning)``, z a slow AR(1) shared modulation
    (correlation time ~1 s, z ~ N(0, 1)), in 4 interleaved test blocks of 15 s. The population bits
    per spike of the true rates is, with the null at each unit's mean rate rbar (Gaussian moments:
    E[e^{az}] = e^{a^2/2}, E[z e^{az}] = a e^{a^2/2}),
        sum (E[r log r] - E[r] log rbar) / (ln 2 sum E[r]).
    Block intervals must cover it at about the nominal rate (measured 0.84-0.88 for 95% over 400
    samples: 30 blocks of strongly correlated windows are slightly under-covered); single-window
    intervals far less often."""
    rng = np.random.default_rng(3)
    a, base = 0.6, np.array([0.02, 0.05, 0.03, 0.08])
    tuning = 0.5 * np.sin(np.arange(10)[:, None] * 0.6 + rng.uniform(0, 2 * np.pi, 4))  # (n_bins, U)
    mean_r = base * np.exp(tuning + a**2 / 2)
    mean_r_log_r = mean_r * (np.log(base) + tuning) + base * np.exp(tuning) * a * a * np.exp(a**2 / 2)
    truth = (mean_r_log_r - mean_r * np.log(mean_r.mean(0))).sum() / (np.log(2) * mean_r.sum())

    latent = _ar1(rng, 120, 1200, phi=0.9)[..., None, None]  # (series, B, 1, 1)
    rates = base * np.exp(a * latent + tuning)
    spikes = rng.poisson(rates).astype(float)
    starts = _interleaved_starts(4, 300)

    def coverage(block: float) -> float:
        return np.mean([bits_per_spike_interval(r, s, starts, block=block, n_boot=300, seed=i).covers(truth)
                        for i, (r, s) in enumerate(zip(rates, spikes))])

    assert 0.8 <= coverage(2.0) <= 0.99
    assert coverage(STRIDE / 2) < 0.75


def test_paired_difference_is_tighter_than_either_interval():
    """Two predictors that share most of their window-to-window variation: the paired difference
    of their scores has a much narrower interval than the scores themselves."""
    rng = np.random.default_rng(4)
    latent = np.repeat(_ar1(rng, 1, 400, 0.95)[0], 1)[:, None, None]
    rates = 0.05 * np.exp(0.8 * latent) * np.ones((400, 10, 5))
    spikes = rng.poisson(rates).astype(float)
    worse = rates * 1.2
    starts = STRIDE * np.arange(400)
    a = bits_per_spike_interval(rates, spikes, starts, n_boot=500)
    d = paired_interval(rates, worse, spikes, starts, n_boot=500)
    assert d.low > 0  # the true rates beat the inflated ones on every replicate's worth of data
    assert d.high - d.low < 0.2 * (a.high - a.low)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        bits_per_spike_interval(np.ones((3, 2, 1)), np.ones((3, 2, 2)), np.arange(3.0))
    with pytest.raises(ValueError, match="compare"):
        paired_interval(np.ones((3, 2, 1)), np.ones((3, 2, 1)), np.ones((3, 2, 1)), np.arange(3.0), compare="x")
    with pytest.raises(ValueError, match="non-empty"):
        window_blocks(np.zeros(0))
