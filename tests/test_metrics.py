"""Evaluation metrics against reference formulas and constructed cases with known answers."""

import math

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.special import gammaln

from neuroformer.data.dataset import InputSpec, WindowDataset
from neuroformer.data.nwb import read_nwb
from neuroformer.data.tokenizer import EOS, N_SPECIAL, SpikeTokenizer
from neuroformer.data.vocabulary import UnitVocabulary
from neuroformer.metrics.behavior import behavior_metrics, behavior_scores
from neuroformer.metrics.nlb import BitsPerSpike, bits_per_spike
from neuroformer.metrics.psth import noise_ceiling, psth, psth_correlation, rebin
from neuroformer.data.tokenizer import bin_spikes
from neuroformer.inference.rates import expected_counts
from neuroformer.metrics.resampling import jackknife
from neuroformer.metrics.spike_sets import SpikeSetF1, matched_counts, spike_set_scores
from neuroformer.models.neuroformer import Neuroformer


# ----------------------------------------------------------------------------- bits per spike


def nlb_bits_per_spike(rates: np.ndarray, spikes: np.ndarray) -> float:
    """The NLB definition, written out: Poisson NLL with log k!, NaN bins dropped, zero rates floored."""

    def nll(r, s):
        keep = ~np.isnan(s)
        r, s = r[keep].copy(), s[keep]
        r[r == 0] = 1e-9
        return np.sum(r - s * np.log(r) + gammaln(s + 1))

    null = np.nanmean(spikes.reshape(-1, spikes.shape[-1]), axis=0) * np.ones_like(spikes)
    return (nll(null, spikes) - nll(rates, spikes)) / np.nansum(spikes) / math.log(2)


def random_case(rng: np.random.Generator, shape=(7, 30, 12)):
    """Rates with exact zeros, Poisson spikes with NaN bins and one silent unit."""
    rates = rng.gamma(0.7, 0.2, size=shape)
    rates[rng.random(shape) < 0.05] = 0.0
    spikes = rng.poisson(rng.gamma(0.7, 0.2, size=shape)).astype(float)
    spikes[..., 3] = 0.0  # a unit that never fires: its null rate is floored too
    spikes[rng.random(shape) < 0.1] = np.nan
    return rates, spikes


@pytest.mark.parametrize("seed", range(5))
def test_bits_per_spike_matches_the_nlb_formula(seed):
    rates, spikes = random_case(np.random.default_rng(seed))
    assert bits_per_spike(rates, spikes) == pytest.approx(nlb_bits_per_spike(rates, spikes), rel=1e-10, abs=1e-10)


def test_bits_per_spike_accumulates_exactly_over_batches():
    rates, spikes = random_case(np.random.default_rng(7), shape=(12, 20, 9))
    metric = BitsPerSpike(n_units=9)
    for k in range(0, 12, 5):  # uneven batches of trials
        metric.update(torch.from_numpy(rates[k : k + 5]), torch.from_numpy(spikes[k : k + 5]))
    assert float(metric.compute()) == pytest.approx(nlb_bits_per_spike(rates, spikes), rel=1e-10)


def test_bits_per_spike_of_reference_predictions():
    rng = np.random.default_rng(3)
    true_rates = rng.gamma(2.0, 0.1, size=(1, 1, 20)) * np.ones((50, 40, 20))
    spikes = rng.poisson(true_rates).astype(float)
    null = np.broadcast_to(spikes.mean(axis=(0, 1)), spikes.shape)
    assert bits_per_spike(null, spikes) == pytest.approx(0.0, abs=1e-12)  # the null scores 0 by definition
    # Any other constant-per-unit guess is worse than the null (the mean is the Poisson MLE).
    assert bits_per_spike(null * 1.3, spikes) < 0


def test_bits_per_spike_refuses_bad_rates():
    rates, spikes = random_case(np.random.default_rng(0))
    bad = rates.copy()
    bad[0, 0, 0], spikes[0, 0, 0] = -0.1, 1.0
    with pytest.raises(ValueError, match="rates"):
        bits_per_spike(bad, spikes)
    with pytest.raises(ValueError, match="same shape"):
        bits_per_spike(rates[:, :, :5], spikes)


# ----------------------------------------------------------------------------- spike sets


def brute_force_matching(pred: np.ndarray, true: np.ndarray, tolerance: int) -> int:
    """Maximum bipartite matching of individual spikes of one window and unit (scipy)."""
    p = np.repeat(np.arange(len(pred)), pred)
    t = np.repeat(np.arange(len(true)), true)
    if len(p) == 0 or len(t) == 0:
        return 0
    graph = csr_matrix((np.abs(p[:, None] - t[None, :]) <= tolerance).astype(np.int8))
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


@pytest.mark.parametrize("tolerance", [0, 1, 2, 3])
def test_matching_is_maximal(tolerance):
    rng = np.random.default_rng(tolerance)
    pred = rng.poisson(0.6, size=(40, 10, 3))
    true = rng.poisson(0.6, size=(40, 10, 3))
    got = matched_counts(pred, true, tolerance).numpy()
    expected = np.array([[brute_force_matching(pred[b, :, u], true[b, :, u], tolerance) for u in range(3)]
                         for b in range(40)])
    np.testing.assert_array_equal(got, expected)


def test_f1_of_constructed_windows():
    true = np.zeros((4, 10, 2), dtype=int)
    pred = np.zeros((4, 10, 2), dtype=int)
    # Window 0: identical spikes -> precision = recall = F1 = 1.
    true[0, [1, 5], 0] = 1
    pred[0, [1, 5], 0] = 1
    # Window 1: true spikes of unit 0 at bins 0 and 3; generated: unit 0 at bin 1 (matches bin 0
    # within one bin), unit 1 at bin 3 (wrong unit) -> 1 match of 2 and 2: P = R = F1 = 1/2.
    true[1, [0, 3], 0] = 1
    pred[1, 1, 0] = 1
    pred[1, 3, 1] = 1
    # Window 2: only true spikes -> recall 0, F1 0, precision undefined (left out).
    true[2, 4, 1] = 2
    # Window 3: empty on both sides -> left out of every average.
    scores = spike_set_scores(pred, true, tolerance=1)
    assert scores["precision"] == pytest.approx((1 + 0.5) / 2)
    assert scores["recall"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert scores["f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert scores["pooled_precision"] == pytest.approx(3 / 4)
    assert scores["pooled_recall"] == pytest.approx(3 / 6)
    assert scores["pooled_f1"] == pytest.approx(2 * 3 / 10)
    assert scores["windows"] == 4
    # With no tolerance, the one-bin offset no longer matches.
    assert spike_set_scores(pred, true, tolerance=0)["pooled_precision"] == pytest.approx(2 / 4)


def test_f1_metric_accumulates_like_one_batch():
    rng = np.random.default_rng(1)
    pred, true = rng.poisson(0.3, size=(30, 10, 5)), rng.poisson(0.3, size=(30, 10, 5))
    metric = SpikeSetF1(tolerance=1)
    metric.update(pred[:11], true[:11])
    metric.update(pred[11:], true[11:])
    whole = spike_set_scores(pred, true, tolerance=1)
    assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx(whole)


# ----------------------------------------------------------------------------- PSTH


def test_psth_averages_trials_of_each_stimulus():
    counts = np.arange(4 * 3 * 2, dtype=float).reshape(4, 3, 2)
    groups = np.array([7, 2, 7, 2])
    result = psth(counts, groups)
    np.testing.assert_array_equal(result.groups, [2, 7])
    np.testing.assert_array_equal(result.n_trials, [2, 2])
    np.testing.assert_allclose(result.mean[0], (counts[1] + counts[3]) / 2)
    np.testing.assert_allclose(result.mean[1], (counts[0] + counts[2]) / 2)


def test_psth_correlation_of_constructed_predictions():
    rng = np.random.default_rng(0)
    groups = np.array([0, 1, 0, 1, 1, 2])
    true = rng.poisson(2.0, size=(6, 8, 4)).astype(float)
    mean = psth(true, groups).mean
    by_trial = mean[np.searchsorted([0, 1, 2], groups)]  # each trial predicted by its stimulus's true PSTH
    pred = np.stack([3 * by_trial[..., 0] + 1,  # affine in the true PSTH: r = 1
                     -by_trial[..., 1],  # negated: r = -1
                     np.full(by_trial.shape[:2], 0.5),  # constant: r undefined
                     rng.random(by_trial.shape[:2])], axis=-1)
    r = psth_correlation(pred, true, groups)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and np.isnan(r[2])
    # The last unit by the textbook formula on the end-to-end PSTHs.
    expected = np.corrcoef(psth(pred, groups).mean[..., 3].ravel(), mean[..., 3].ravel())[0, 1]
    assert r[3] == pytest.approx(expected)


def test_noise_ceiling_of_noiseless_and_pure_noise_units():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), 10)
    signal = rng.random((3, 40)) * 5
    noiseless = signal[groups]  # every repeat identical
    noise = rng.poisson(1.0, size=(30, 40)).astype(float)  # no stimulus dependence at all
    ceiling = noise_ceiling(np.stack([noiseless, noise], axis=-1), groups)
    assert ceiling[0] == pytest.approx(1.0)
    assert ceiling[1] < 0.35
    # Without a stimulus shown twice there is no ceiling.
    assert np.isnan(noise_ceiling(noiseless[:3, :, None], np.arange(3))).all()


def test_rebin_sums_consecutive_bins():
    counts = np.arange(2 * 7 * 1).reshape(2, 7, 1)
    np.testing.assert_array_equal(rebin(counts, 3)[1, :, 0], [7 + 8 + 9, 10 + 11 + 12])


# ----------------------------------------------------------------------------- behaviour


def test_behavior_scores_match_the_formulas():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(200, 2))
    pred = np.stack([true[:, 0] + 0.5 * rng.normal(size=200), np.full(200, true[:, 1].mean())], axis=1)
    scores = behavior_scores(pred, true, ["speed", "x"])
    r2 = 1 - ((true[:, 0] - pred[:, 0]) ** 2).sum() / ((true[:, 0] - true[:, 0].mean()) ** 2).sum()
    assert scores["r2/speed"] == pytest.approx(r2, rel=1e-9)
    assert scores["pearson_r/speed"] == pytest.approx(np.corrcoef(true[:, 0], pred[:, 0])[0, 1], rel=1e-9)
    assert scores["r2/x"] == pytest.approx(0.0, abs=1e-12)  # predicting the mean
    one = behavior_scores(2 * true[:, 0] + 1, true[:, 0])  # a single variable, affine prediction
    assert one["pearson_r/0"] == pytest.approx(1.0) and one["r2/0"] < 1


def test_behavior_metrics_accumulate_over_batches():
    rng = np.random.default_rng(1)
    true = torch.from_numpy(rng.normal(size=(90, 2)))
    pred = true + torch.from_numpy(rng.normal(size=(90, 2)))
    metrics = behavior_metrics(2)
    metrics.set_dtype(torch.float64)
    for k in range(0, 90, 40):
        metrics.update(pred[k : k + 40], true[k : k + 40])
    scores = behavior_scores(pred, true)
    got = metrics.compute()
    assert [float(v) for v in got["r2"]] == pytest.approx([scores["r2/0"], scores["r2/1"]])
    assert [float(v) for v in got["pearson_r"]] == pytest.approx([scores["pearson_r/0"], scores["pearson_r/1"]])


# ----------------------------------------------------------------------------- rates from the model


def test_jackknife_removes_the_one_over_s_bias_of_a_square():
    # The square of a mean overestimates the square of the expectation by var / S; the jackknife
    # of it is exactly the unbiased estimator mean^2 - s^2 / S (s^2 the unbiased sample variance).
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(7, 4, 5, 3))
    got = jackknife(lambda m: float((m**2).sum()), x)
    expected = ((x.mean(0) ** 2) - x.var(0, ddof=1) / len(x)).sum()
    assert got == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        jackknife(lambda m: 0.0, x[:1])




def tiny_model(small_sim_path, max_tokens: int, seed: int = 0):
    """A random 1-layer model on the small recording, its heads scaled so its choices are far from uniform."""
    rec = read_nwb(small_sim_path)
    tok = SpikeTokenizer(window=0.05, past_window=0.1, resolution=0.01, max_tokens=max_tokens, max_past_tokens=40)
    spec = InputSpec(tokenizer=tok, vocab=UnitVocabulary(rec.units.names))
    torch.manual_seed(seed)
    model = Neuroformer.build(spec, n_embd=16, n_head=2, n_layer=1, dropout=0.0).eval()
    with torch.no_grad():
        model.id_head.weight.mul_(20)
        model.dt_head.weight.mul_(20)
        model.id_head.weight[EOS].mul_(2)  # EOS sometimes, not always
    return rec, spec, model


def test_bin_spikes_counts_every_spike_of_each_window(small_sim_path):
    rec = read_nwb(small_sim_path)
    tok = SpikeTokenizer(window=0.05, resolution=0.005, max_tokens=4)  # far fewer tokens than spikes
    starts = np.array([10.0, 10.05, 33.3])
    counts = bin_spikes(rec.units.spike_times, rec.units.spike_units, starts, tok, rec.units.n_units)
    for b, t0 in enumerate(starts):
        for u in (0, 7, 39):
            times = rec.units.spikes_of(u)
            expected, _ = np.histogram(times, bins=t0 + tok.resolution * np.arange(tok.n_bins + 1))
            np.testing.assert_array_equal(counts[b, :, u], expected)
    inside = sum(((rec.units.spike_times >= t) & (rec.units.spike_times < t + tok.window)).sum() for t in starts)
    assert counts.sum() == inside


def test_single_step_rates_are_the_model_probabilities(small_sim_path):
    # With room for one spike the rate of (unit, bin) is exactly the probability of drawing that
    # pair first: the sampler draws the dt among EOS and the window's bins, then the ID among the units.
    rec, spec, model = tiny_model(small_sim_path, max_tokens=2)
    starts = np.array([5.0, 20.0, 40.0])
    est = expected_counts(model, spec, rec, starts, n_samples=1, generator=torch.Generator().manual_seed(0))
    batch = WindowDataset([rec], spec, [starts]).__getitems__([0, 1, 2])
    with torch.no_grad():
        out = model(batch.inputs)
    n_bins = spec.tokenizer.n_bins
    p_dt = out.dt_logits[:, 0, [EOS, *range(N_SPECIAL, N_SPECIAL + n_bins)]].double().softmax(-1)[:, 1:]
    p_id = out.id_logits[:, 0, N_SPECIAL:].double().softmax(-1)
    np.testing.assert_allclose(est.rates, (p_dt[:, :, None] * p_id[:, None, :]).numpy(), rtol=1e-5, atol=1e-9)


def test_rates_agree_with_sampled_counts(small_sim_path):
    # Rao-Blackwellised rates and raw sampled counts estimate the same expectation.
    rec, spec, model = tiny_model(small_sim_path, max_tokens=8)
    starts = np.array([5.0, 22.0, 47.5])
    est = expected_counts(model, spec, rec, starts, n_samples=600, generator=torch.Generator().manual_seed(1),
                          batch_size=3)
    per_window = est.samples.sum(axis=(2, 3))  # (S, B)
    assert 0.5 < per_window.mean() < 6.5  # windows end by EOS, not only by a full block
    se = per_window.std(axis=0) / np.sqrt(len(per_window))
    np.testing.assert_array_less(np.abs(est.rates.sum(axis=(1, 2)) - per_window.mean(axis=0)), 4.5 * se + 1e-3)
    per_unit = est.samples.sum(axis=(1, 2))  # (S, U)
    se = per_unit.std(axis=0) / np.sqrt(len(per_unit))
    np.testing.assert_array_less(np.abs(est.rates.sum(axis=(0, 1)) - per_unit.mean(axis=0)), 4.5 * se + 1e-3)
    per_bin = est.samples.sum(axis=(1, 3))  # (S, n_bins)
    se = per_bin.std(axis=0) / np.sqrt(len(per_bin))
    np.testing.assert_array_less(np.abs(est.rates.sum(axis=(0, 2)) - per_bin.mean(axis=0)), 4.5 * se + 1e-3)
    # Every allowed spike keeps a positive rate: nothing for bits per spike to floor.
    assert (est.rates > 0).all()
