"""Tokenizer: exact round trip at the resolution, time ordering, truncation, sequences, counts rule."""

import numpy as np
import pytest

from neuroformer.data.tokenizer import EOS, N_SPECIAL, PAD, SOS, SpikeTokenizer, events_from_counts
from neuroformer.data.vocabulary import UnitVocabulary
from neuroformer.errors import ModelMismatchError, TokenizerError


def random_spikes(rng, n=2000, n_units=30, duration=10.0):
    times = np.sort(rng.uniform(0, duration, n))
    units = rng.integers(0, n_units, n)
    return times, units


def test_round_trip_is_exact_at_resolution():
    rng = np.random.default_rng(0)
    tok = SpikeTokenizer(window=0.05, resolution=0.005, max_tokens=64)
    times, units = random_spikes(rng)
    starts = np.arange(0.0, 9.9, 0.05)
    enc = tok.encode(times, units, starts, tok.window, 200)
    assert enc.dropped.sum() == 0
    for b, t0 in enumerate(starts):
        sel = (times >= t0) & (times < t0 + tok.window)
        dec_t, dec_u = tok.decode(enc.ids[b], enc.dts[b], t0)
        expected_bins = np.floor((times[sel] - t0) / tok.resolution).astype(int)
        np.testing.assert_array_equal(dec_u, units[sel])  # time order, also within a bin
        np.testing.assert_allclose(dec_t, t0 + expected_bins * tok.resolution, atol=1e-12)
        # Re-tokenising the decoded spikes gives the very same tokens.
        again = tok.encode(dec_t + 1e-9, dec_u, np.array([t0]), tok.window, 200)
        np.testing.assert_array_equal(again.ids[0], enc.ids[b])
        np.testing.assert_array_equal(again.dts[0], enc.dts[b])


def test_tokens_in_time_order_within_a_bin_and_padded():
    tok = SpikeTokenizer(window=0.05, resolution=0.01)
    times = np.array([0.001, 0.002, 0.015, 0.049, 0.05])
    units = np.array([7, 3, 1, 0, 5])  # the spike at 0.05 belongs to the next window
    enc = tok.encode(times, units, np.array([0.0]), 0.05, 6)
    # Unit 7 fired before unit 3 in the same bin: it comes first (unit order would swap them).
    np.testing.assert_array_equal(enc.ids[0], [7, 3, 1, 0, PAD, PAD] + np.array([N_SPECIAL] * 4 + [0, 0]))
    np.testing.assert_array_equal(enc.dts[0][:4] - N_SPECIAL, [0, 0, 1, 4])
    assert enc.counts[0] == 4


def test_truncation_drops_the_latest_spikes_and_counts_them():
    tok = SpikeTokenizer()
    times = np.linspace(0, 0.049, 10)
    enc = tok.encode(times, np.arange(10), np.array([0.0]), 0.05, 4)
    assert enc.counts[0] == 4 and enc.dropped[0] == 6
    np.testing.assert_array_equal(enc.ids[0] - N_SPECIAL, [0, 1, 2, 3])


def test_a_crowded_past_window_keeps_its_latest_spikes():
    tok = SpikeTokenizer(window=0.05, past_window=0.15, max_past_tokens=5)
    times = np.linspace(0.0, 0.149, 10)  # the past window of the current window at t0 = 0.15
    units = np.arange(10)
    enc = tok.encode(times, units, np.array([0.0]), tok.past_window, tok.max_past_tokens - 1, keep_latest=True)
    assert enc.counts[0] == 4 and enc.dropped[0] == 6
    np.testing.assert_array_equal(enc.ids[0] - N_SPECIAL, [6, 7, 8, 9])  # those next to the current window
    np.testing.assert_array_equal(enc.dts[0] - N_SPECIAL, np.floor(times[6:] / tok.resolution))
    # A window with room for all of its spikes is unchanged by keep_latest.
    roomy = tok.encode(times, units, np.array([0.0, 0.07]), tok.past_window, 12, keep_latest=True)
    plain = tok.encode(times, units, np.array([0.0, 0.07]), tok.past_window, 12)
    np.testing.assert_array_equal(roomy.ids, plain.ids)
    np.testing.assert_array_equal(roomy.dts, plain.dts)


def test_a_cut_current_window_has_no_eos_target():
    tok = SpikeTokenizer(max_tokens=4)
    times = np.array([0.001, 0.002, 0.003, 0.004, 1.01])
    enc = tok.encode(times, np.array([1, 2, 3, 4, 5]), np.array([0.0, 1.0]), tok.window, tok.max_tokens - 1)
    seq = tok.current_sequences(enc)
    # Window 0 holds 4 spikes, 3 fit: it does not end after the third, so nothing is taught there.
    np.testing.assert_array_equal(seq["target_ids"][0], [1 + N_SPECIAL, 2 + N_SPECIAL, 3 + N_SPECIAL, PAD])
    assert seq["target_dts"][0][-1] == PAD
    np.testing.assert_array_equal(seq["target_ids"][1], [5 + N_SPECIAL, EOS, PAD, PAD])  # window 1 fits: EOS


def test_teacher_forcing_sequences():
    tok = SpikeTokenizer(max_tokens=5)
    enc = tok.encode(np.array([0.01, 0.02]), np.array([4, 2]), np.array([0.0, 1.0]), 0.05, 4)
    seq = tok.current_sequences(enc)
    np.testing.assert_array_equal(seq["ids"][0], [SOS, 4 + N_SPECIAL, 2 + N_SPECIAL, PAD, PAD])
    np.testing.assert_array_equal(seq["target_ids"][0], [4 + N_SPECIAL, 2 + N_SPECIAL, EOS, PAD, PAD])
    np.testing.assert_array_equal(seq["ids"][1], [SOS, PAD, PAD, PAD, PAD])  # empty window
    np.testing.assert_array_equal(seq["target_ids"][1], [EOS, PAD, PAD, PAD, PAD])
    past = tok.past_sequences(enc)
    assert past["past_ids"].shape == (2, 5) and (past["past_ids"][:, 0] == SOS).all()


def test_counts_rule_and_refusal_of_calcium():
    counts = np.array([[0, 2], [1, 0], [0, 1]])
    edges = np.array([0.0, 0.01, 0.02, 0.03])
    times, units = events_from_counts(counts, edges)
    np.testing.assert_allclose(times, [0.0, 0.0, 0.01, 0.02])
    np.testing.assert_array_equal(units, [1, 1, 0, 1])
    tok = SpikeTokenizer(window=0.03, resolution=0.01)
    enc = tok.encode(times, units, np.array([0.0]), 0.03, 8)
    rebinned = np.zeros_like(counts)
    np.add.at(rebinned, (enc.dts[0][: enc.counts[0]] - N_SPECIAL, enc.ids[0][: enc.counts[0]] - N_SPECIAL), 1)
    np.testing.assert_array_equal(rebinned, counts)
    with pytest.raises(TokenizerError, match="deconvolve"):
        events_from_counts(np.array([[0.3, 1.7]]), np.array([0.0, 0.1]))
    with pytest.raises(TokenizerError, match="non-negative integers"):
        events_from_counts(np.array([[np.nan, 1]]), np.array([0.0, 0.1]))


def test_vocabulary_extends_without_moving_units():
    vocab = UnitVocabulary(["s1/0", "s1/1"])
    bigger = vocab.extend(["s2/0", "s1/1", "s2/1"])
    assert bigger.names[:2] == vocab.names and len(bigger) == 4
    np.testing.assert_array_equal(bigger.indices(["s2/1", "s1/0"]), [3, 0])
    assert bigger.size == 4 + N_SPECIAL
    with pytest.raises(ModelMismatchError, match="not in the model's unit vocabulary"):
        vocab.indices(["s3/0"])
    assert UnitVocabulary.from_dict(bigger.to_dict()).names == bigger.names
