"""Connectivity: scoring against reference values, the cross-correlation baseline on ground truth,
attention accumulation bookkeeping, and the attention estimate of a trained model."""

import numpy as np
import pytest
import torch

from neuroformer.data.nwb import read_nwb
from neuroformer.data.simulate import load_ground_truth
from neuroformer.data.tokenizer import N_SPECIAL, PAD
from neuroformer.inference.connectivity import (
    attention_influence,
    cross_correlation_influence,
    lagged_pair_counts,
    spikes_in_windows,
)
from neuroformer.inference.perturbation import (
    current_tokens,
    insertion_lags,
    past_tokens,
    perturbation_effects,
    perturbation_influence,
)
from neuroformer.metrics.links import _auroc_ap, score_links
from neuroformer.models.neuroformer import ModelOutput
from tests.test_model import make_batch, make_model


def test_auroc_and_ap_match_hand_computed_values():
    # Positives 0.35, 0.8; negatives 0.1, 0.4: 3 of 4 pos/neg pairs ordered right.
    auroc, ap = _auroc_ap(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool))
    assert auroc == pytest.approx(0.75)
    assert ap == pytest.approx((1 / 1 + 2 / 3) / 2)  # precision at each positive, ranked by score


def test_score_links_on_known_matrices():
    rng = np.random.default_rng(0)
    conn = np.where(rng.random((30, 30)) < 0.1, rng.choice([1.0, -1.5], (30, 30)), 0.0)
    np.fill_diagonal(conn, 0)
    perfect = score_links(conn, conn)
    assert perfect.auroc == 1 and perfect.ap == 1 and perfect.direction_auroc == 1 and perfect.direction_accuracy == 1
    assert perfect.excitatory_auroc == 1 and perfect.inhibitory_auroc == 1
    flipped = score_links(-conn, conn)  # the right links with the wrong signs
    assert flipped.auroc == 1 and flipped.excitatory_auroc < 0.2 and flipped.inhibitory_auroc < 0.2
    assert perfect.n_links == np.count_nonzero(conn) and perfect.chance_ap == pytest.approx(perfect.n_links / 870)
    # Right links, wrong directions.
    reversed_ = score_links(conn.T, conn)
    assert reversed_.direction_accuracy == 0 and reversed_.direction_auroc == 0
    noise = score_links(rng.normal(size=(30, 30)), conn)
    assert 0.35 < noise.auroc < 0.65
    with pytest.raises(ValueError, match="same"):
        score_links(conn[:5], conn)


def test_lagged_pair_counts_match_brute_force():
    rng = np.random.default_rng(1)
    times = np.sort(rng.uniform(0, 2, 300))
    units = rng.integers(0, 5, 300)
    counts = lagged_pair_counts(times, units, 5, 0.001, 0.02)
    lag = times[None, :] - times[:, None]  # [a, b]: spike b after spike a
    inside = (lag > 0.001) & (lag <= 0.02)
    brute = np.zeros((5, 5))
    np.add.at(brute, (units[:, None].repeat(300, 1)[inside], units[None, :].repeat(300, 0)[inside]), 1)
    np.testing.assert_array_equal(counts, brute)


def test_pair_counts_split_by_first_spike_add_up_and_bootstrap(small_sim_path):
    from neuroformer.inference.connectivity import cross_correlation_counts, cross_correlation_z
    from neuroformer.metrics.links import link_intervals

    rec, truth = read_nwb(small_sim_path), load_ground_truth(small_sim_path).connectivity
    t, u, U = rec.units.spike_times, rec.units.spike_units, rec.units.n_units
    edges = np.arange(0.0, 62.0, 2.0)
    parts = [np.concatenate([c.ravel() for c in cross_correlation_counts(t, u, U, pre=(t >= a) & (t < b))])
             for a, b in zip(edges[:-1], edges[1:])]
    whole = np.concatenate([c.ravel() for c in cross_correlation_counts(t, u, U)])
    np.testing.assert_allclose(np.sum(parts, axis=0), whole)
    influence = lambda totals: cross_correlation_z(*totals.reshape(2, U, U))  # noqa: E731
    cis = link_intervals(np.array(parts), influence, truth, edges[:-1], n_boot=50)
    point = score_links(influence(whole), truth)
    for field, ci in cis.items():
        assert ci.estimate == pytest.approx(getattr(point, field)) and ci.low <= ci.estimate + 1e-9
        assert 0 < ci.high - ci.low < 0.5 and ci.n_blocks == 30


def test_spikes_in_windows_keeps_exactly_the_window_spans(small_sim_path):
    rec = read_nwb(small_sim_path)
    t0 = np.array([10.0, 10.05, 30.0])
    times, units = spikes_in_windows(rec, t0, 0.05, 0.15)
    t = rec.units.spike_times
    expected = ((t >= 9.85) & (t < 10.1)) | ((t >= 29.85) & (t < 30.05))
    np.testing.assert_array_equal(times, t[expected])
    np.testing.assert_array_equal(units, rec.units.spike_units[expected])


def test_cross_correlation_baseline_finds_true_links(small_sim_path):
    rec, truth = read_nwb(small_sim_path), load_ground_truth(small_sim_path)
    z = cross_correlation_influence(rec.units.spike_times, rec.units.spike_units, rec.units.n_units)
    scores = score_links(z, truth.connectivity)
    assert scores.auroc > 0.7 and scores.ap > 5 * scores.chance_ap  # 0.78 and 12x on this seed
    assert scores.direction_auroc > 0.75  # 0.89
    # Excitatory links raise the post unit's rate right after pre spikes: positive z.
    assert np.median(z[truth.connectivity > 0]) > 1.5 and abs(np.median(z[truth.connectivity == 0])) < 0.5


def test_attention_influence_accumulates_pairs_of_past_and_target_units():
    model, batch = make_model(), make_batch(b=2, n_cur=4, n_past=3)
    # Window 0: past units (0, 1) then targets (2, 2, 4); window 1 the same past, targets (2, 5, 4).
    batch.past_ids[:, 1:3] = torch.tensor([0, 1]) + N_SPECIAL
    batch.target_ids[0, :3] = torch.tensor([2, 2, 4]) + N_SPECIAL
    batch.target_ids[1, :3] = torch.tensor([2, 5, 4]) + N_SPECIAL
    influence, counts = attention_influence(model, [batch], 10, method="attention")
    expected_counts = np.zeros((10, 10))
    expected_counts[np.ix_([0, 1], [2])] = 3
    expected_counts[np.ix_([0, 1], [4, 5])] = [[2, 1], [2, 1]]
    np.testing.assert_array_equal(counts, expected_counts)
    assert np.isnan(influence[counts == 0]).all()
    with torch.no_grad():
        _, weights = model.forward_with_attention(batch.inputs)
    mean_attention = torch.stack(weights).mean(dim=(0, 2))  # (B, T, context)
    # M[1, 5]: the only pair is window 1's second target attending to past token 2 (unit 1).
    assert influence[1, 5] == pytest.approx(float(mean_attention[1, 1, 2]), rel=1e-6)
    assert influence[0, 2] == pytest.approx(float(mean_attention[0, :2, 1].sum() + mean_attention[1, 0, 1]) / 3,
                                            rel=1e-6)
    assert counts[:, PAD].sum() == 0


def test_attention_x_gradient_averages_each_pairs_relevance():
    model, batch = make_model(), make_batch(b=2, n_cur=4, n_past=3)
    influence, counts = attention_influence(model, [batch], 10, method="attention_x_gradient")
    # Reference, pair by pair: relevance = sum over blocks and heads of A * d(log-likelihood)/dA.
    out, weights = model.forward_with_attention(batch.inputs)
    is_unit = batch.target_ids >= N_SPECIAL
    log_lik = (out.id_logits.log_softmax(-1).gather(-1, batch.target_ids[..., None])[..., 0] * is_unit).sum()
    grads = torch.autograd.grad(log_lik, weights)
    P = batch.past_ids.shape[1]
    relevance = sum((w * g)[..., :P].sum(1) for w, g in zip(weights, grads)).detach()
    pre, post = batch.past_ids - N_SPECIAL, batch.target_ids - N_SPECIAL
    i, j = int(pre[0, 1]), int(post[0, 0])
    pairs = [(b, t, k) for b in range(2) for t in range(post.shape[1]) for k in range(P)
             if post[b, t] == j and pre[b, k] == i]
    assert counts[i, j] == len(pairs)
    assert influence[i, j] == pytest.approx(float(sum(relevance[b, t, k] for b, t, k in pairs)) / len(pairs), rel=1e-5)


class CoupledToy(torch.nn.Module):
    """A next-spike model with known coupling: each spike of unit i in the last ``recent`` past dt bins, and each
    earlier spike of i in the current window, adds ``weights[i, j]`` to unit j's ID logit (the true answer)."""

    def __init__(self, weights: np.ndarray, n_past_bins: int, recent: int, n_dt: int):
        super().__init__()
        self.weights = torch.nn.Parameter(torch.as_tensor(weights, dtype=torch.float32))
        self.n_past_bins, self.recent, self.n_dt = n_past_bins, recent, n_dt

    def forward(self, x) -> ModelOutput:
        U = len(self.weights)
        one_hot = lambda ids: torch.nn.functional.one_hot((ids - N_SPECIAL).clamp(min=0), U) * (ids >= N_SPECIAL)[..., None]  # noqa: E731
        recent = (x.past_dts - N_SPECIAL >= self.n_past_bins - self.recent)[..., None]
        past = (one_hot(x.past_ids) * recent).sum(1, keepdim=True).float()  # (B, 1, U)
        current = one_hot(x.ids).cumsum(1).float()  # (B, T, U): spikes up to and including each position
        B, T = x.ids.shape
        ids = torch.zeros(B, T, N_SPECIAL + U)
        ids[..., N_SPECIAL:] = (past + current) @ self.weights
        return ModelOutput(ids, torch.zeros(B, T, self.n_dt))


def test_past_tokens_match_the_dataset_and_add_one_spike(small_sim_path):
    from neuroformer.data.dataset import InputSpec, WindowDataset
    from neuroformer.data.tokenizer import SpikeTokenizer
    from neuroformer.data.vocabulary import UnitVocabulary

    rec = read_nwb(small_sim_path)
    tok = SpikeTokenizer(max_past_tokens=40)  # some windows overflow: truncation must match too
    spec = InputSpec(tok, UnitVocabulary(list(rec.units.names)))
    t0 = np.arange(5.0, 15.0, 0.05)
    batch = WindowDataset([rec], spec, [t0]).__getitems__(list(range(len(t0))))
    times, units = rec.units.spike_times, rec.units.spike_units
    none = np.full(len(t0), -1)
    ids, dts = past_tokens(tok, times, units, t0, none, np.zeros(len(t0)))
    assert torch.equal(ids, batch.past_ids) and torch.equal(dts, batch.past_dts)
    lags = insertion_lags(tok, 0.010)
    np.testing.assert_allclose(lags, [0.0025, 0.0075])  # centres of the last two 5 ms bins
    added, added_dts = past_tokens(tok, times, units, t0, np.full(len(t0), 7), np.full(len(t0), lags[1]))
    fits = (batch.past_ids != PAD).sum(1) < tok.max_past_tokens
    new = ((added == 7 + N_SPECIAL) & (added_dts == tok.n_past_bins - 2 + N_SPECIAL)).sum(1) - \
        ((batch.past_ids == 7 + N_SPECIAL) & (batch.past_dts == tok.n_past_bins - 2 + N_SPECIAL)).sum(1)
    assert 20 < fits.sum() < len(t0) - 20 and (new[fits] == 1).all()  # 71 of 200 have room


@pytest.mark.parametrize("site", ["window", "past"])
def test_perturbation_recovers_the_coupling_of_a_known_model(small_sim_path, site):
    from neuroformer.data.dataset import InputSpec
    from neuroformer.data.tokenizer import SpikeTokenizer
    from neuroformer.data.vocabulary import UnitVocabulary

    rec = read_nwb(small_sim_path)
    U, tok = rec.units.n_units, SpikeTokenizer()
    weights = np.zeros((U, U))
    weights[3, 7], weights[5, 2], weights[7, 11] = 0.8, -1.2, 0.3  # excitatory, inhibitory, a chain
    model = CoupledToy(weights, tok.n_past_bins, recent=2, n_dt=tok.dt_vocab_size)
    spec = InputSpec(tok, UnitVocabulary(list(rec.units.names)))
    t0 = np.arange(1.0, 50.0, 0.05)
    m = perturbation_influence(model, spec, rec, t0, n_contexts=64, batch_size=256, site=site)
    assert np.isnan(np.diag(m)).all()
    scores = score_links(m, weights)
    assert min(scores.auroc, scores.ap, scores.direction_auroc, scores.excitatory_auroc,
               scores.inhibitory_auroc) == pytest.approx(1)
    assert m[3, 7] > 0 and m[7, 11] > 0 and m[5, 2] < 0
    # Each context's effect is exactly the coupling (or 0 where no position was scored); a misaligned comparison
    # (another spike counted as the added one) would leak into other pairs.
    d = perturbation_effects(model, spec, rec, t0[:64], site=site)
    off = ~np.eye(U, dtype=bool)
    exact = np.abs(d - weights).max(axis=(1, 2)) < 1e-4
    unscored = np.abs(d[:, off]).max(axis=1) < 1e-4
    assert (exact | unscored).all() and exact.mean() > 0.5


def test_perturbation_reads_a_rate_readout_when_the_model_has_one(small_sim_path):
    from typing import NamedTuple

    from neuroformer.data.dataset import InputSpec
    from neuroformer.data.tokenizer import SpikeTokenizer
    from neuroformer.data.vocabulary import UnitVocabulary

    class WithRates(NamedTuple):
        id_logits: torch.Tensor
        log_rates: torch.Tensor

    class RateToy(CoupledToy):
        """ID logits that know nothing; log-rates that carry the coupling (the read-out the past site should use)."""

        def forward(self, x):
            out = super().forward(x)
            n_bins = 10
            return WithRates(torch.zeros_like(out.id_logits), out.id_logits[:, :1].expand(-1, n_bins, -1))

    rec = read_nwb(small_sim_path)
    U, tok = rec.units.n_units, SpikeTokenizer()
    weights = np.zeros((U, U))
    weights[3, 7], weights[5, 2] = 0.8, -1.2
    model = RateToy(weights, tok.n_past_bins, recent=2, n_dt=tok.dt_vocab_size)
    spec = InputSpec(tok, UnitVocabulary(list(rec.units.names)))
    d = perturbation_effects(model, spec, rec, np.arange(1.0, 10.0, 0.5), site="past")
    np.testing.assert_allclose(d, np.broadcast_to(weights, d.shape), atol=1e-5)


def test_current_tokens_match_the_dataset(small_sim_path):
    from neuroformer.data.dataset import InputSpec, WindowDataset
    from neuroformer.data.tokenizer import SpikeTokenizer
    from neuroformer.data.vocabulary import UnitVocabulary

    rec = read_nwb(small_sim_path)
    tok = SpikeTokenizer(max_tokens=12)
    spec = InputSpec(tok, UnitVocabulary(list(rec.units.names)))
    t0 = np.arange(5.0, 15.0, 0.05)
    batch = WindowDataset([rec], spec, [t0]).__getitems__(list(range(len(t0))))
    ids, dts = current_tokens(tok, rec.units.spike_times, rec.units.spike_units, t0, np.full(len(t0), -1),
                              np.zeros(len(t0)))
    assert torch.equal(ids, batch.ids) and torch.equal(dts, batch.dts)


@pytest.mark.slow
def test_a_trained_model_recovers_synapses(tmp_path):
    """Train the connectivity experiment briefly on a small synapse-driven population and score it."""
    from hydra.utils import instantiate

    from neuroformer.data.simulate import SimulationConfig, simulate_recording
    from neuroformer.data.splits import SPLITS, window_starts
    from neuroformer.inference.connectivity import estimate
    from neuroformer.registry import load
    from neuroformer.training import train
    from tests.configs import compose

    sim = SimulationConfig(seed=1, n_units=12, duration=240.0, frac_on=0, frac_off=0, frac_ds=0, link_prob=0.25,
                           mean_rate=20.0)
    path = simulate_recording(tmp_path / "coupled.nwb", sim, progress=False)
    cfg = compose(["experiment=connectivity", f"data.paths=[{path}]", "model.n_embd=48", "trainer.max_epochs=6",
                   "registry.register=false"], tmp_path)
    train(cfg)
    loaded = load(next((tmp_path / "outputs" / "run" / "checkpoints").glob("best*.ckpt")))
    rec, truth = read_nwb(path), load_ground_truth(path)
    tok = loaded.spec.tokenizer
    # Every window of the recording: this checks what the model learned, with little estimator noise.
    split = instantiate(cfg.data.split)
    t0 = np.concatenate([window_starts(rec.start, rec.stop, split, s, tok.window, tok.past_window, tok.window)
                         for s in SPLITS])
    estimates = estimate(loaded.model, loaded.spec, rec, t0, batch_size=64, n_contexts=1000,
                         methods=("perturbation", "attention_x_gradient"))
    pert, attn, xcorr = (score_links(estimates[k], truth.connectivity)
                         for k in ("perturbation", "attention_x_gradient", "cross_correlation"))
    assert xcorr.auroc > 0.9
    # This short run (6 epochs) has learned part of the wiring: the perturbation finds it (AUROC 0.72, AP 0.62 with
    # chance 0.26, direction 0.86), attention x gradient less (0.67, direction 0.78; with the model before the rate
    # read-out and time-ordered tokens: 0.56 and 0.40). The trained connectivity experiment reaches 0.92
    # (docs/connectivity.md); both stay below the baseline.
    assert pert.auroc > 0.6 and pert.ap > 1.5 * pert.chance_ap and pert.direction_auroc > 0.7, pert
    assert pert.auroc > attn.auroc + 0.02 and pert.direction_auroc > attn.direction_auroc + 0.03, (pert, attn)
