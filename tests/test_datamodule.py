"""Data module: batches from NWB files, several sessions in one vocabulary, clear mismatches."""

import numpy as np
import pytest
import torch

from neuroformer.data.datamodule import NWBDataModule
from neuroformer.data.dataset import WindowDataset
from neuroformer.data.simulate import SimulationConfig, simulate_recording
from neuroformer.data.splits import SplitSpec
from neuroformer.data.tokenizer import EOS, N_SPECIAL, PAD, SOS, SpikeTokenizer
from neuroformer.errors import ModelMismatchError, RecordingError
from neuroformer.models.neuroformer import Neuroformer

ALM = "tests/data/alm_guo2017_anm00239123.nwb"


@pytest.fixture(scope="module")
def second_sim_path(tmp_path_factory):
    return simulate_recording(tmp_path_factory.mktemp("sim2") / "s2.nwb",
                              SimulationConfig(seed=2, n_units=30, duration=60.0), progress=False)


def test_batches_match_the_spikes_in_the_file(small_sim_path):
    dm = NWBDataModule(paths=[str(small_sim_path)], behavior=["running_speed"], batch_size=8)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    B, T = batch.ids.shape
    assert (B, T) == (8, dm.spec.tokenizer.max_tokens)
    assert batch.frames.shape == (8, 4, 32, 32) and batch.behavior.shape == (8, 8, 1)
    assert (batch.ids[:, 0] == SOS).all() and (batch.past_ids[:, 0] == SOS).all()
    # Each window's tokens decode to exactly the file's spikes in that window (at the resolution).
    rec, tok = dm.recordings[0], dm.spec.tokenizer
    for b in range(B):
        t0 = float(batch.t0[b])
        times, units = tok.decode(batch.ids[b].numpy(), batch.dts[b].numpy(), t0)
        sel = (rec.units.spike_times >= t0) & (rec.units.spike_times < t0 + tok.window)
        assert sorted(units.tolist()) == sorted(rec.units.spike_units[sel].tolist())
        n = int((batch.target_ids[b] != PAD).sum())
        assert batch.target_ids[b, n - 1] == EOS and n - 1 == sel.sum()
    # Frames are normalised with training statistics; the last frame is the one on screen at the
    # window's end, the others the ones before it, each read on its own here.
    stim, F = rec.stimulus, batch.frames.shape[1]
    for b in range(B):
        last = stim.index_at(np.array([float(batch.t0[b]) + tok.window - 1e-9]))[0]
        expected = (stim.read(last - F + 1, last + 1) - dm.spec.frame_mean) / dm.spec.frame_std
        np.testing.assert_allclose(batch.frames[b].numpy(), expected, rtol=1e-5, atol=1e-5)
    # Any indices, in any order, with repeats: the frames one by one.
    index = np.array([[7, 3, 3], [0, 8, 9]])
    np.testing.assert_array_equal(stim.take(index), np.stack([[stim.read(i, i + 1)[0] for i in row] for row in index]))


def test_two_sessions_share_one_vocabulary(small_sim_path, second_sim_path):
    dm = NWBDataModule(paths=[str(small_sim_path), str(second_sim_path)], n_frames=0, batch_size=64)
    dm.setup()
    assert len(dm.spec.vocab) == 40 + 30
    sessions = {n.split("/")[0] for n in dm.spec.vocab.names}
    assert len(sessions) == 2
    ds = dm.datasets["train"]
    assert set(np.unique(ds.session)) == {0, 1}
    # Tokens of session-1 windows only use session-1 units.
    idx = np.flatnonzero(ds.session == 1)[:32].tolist()
    ids = ds.__getitems__(idx).ids
    real = ids[ids >= N_SPECIAL] - N_SPECIAL
    assert (real >= 40).all()
    # A model spec made for session 1 alone refuses session 2's units.
    single = NWBDataModule(paths=[str(small_sim_path)], n_frames=0)
    single.setup()
    with pytest.raises(ModelMismatchError, match="not in the model's unit vocabulary"):
        WindowDataset([dm.recordings[1]], single.spec, [np.array([1.0])])
    # Extending it keeps session 1's indices and appends session 2's.
    extended = NWBDataModule(paths=[str(second_sim_path)], n_frames=0, vocab=single.spec.vocab)
    extended.setup()
    assert extended.spec.vocab.names[:40] == single.spec.vocab.names and len(extended.spec.vocab) == 70


def test_real_alm_recording_windows_lie_inside_trials():
    dm = NWBDataModule(paths=[ALM], n_frames=0, restrict_to="trials",
                       tokenizer=SpikeTokenizer(window=0.1, past_window=0.3, resolution=0.01, max_tokens=24,
                                                max_past_tokens=64))
    dm.setup()
    trials = dm.recordings[0].trials
    for split, ds in dm.datasets.items():
        assert len(ds) > 100, split
        k = np.searchsorted(np.sort(trials.start), ds.t0 - 0.3, side="right") - 1
        assert (ds.t0 + 0.1 <= np.sort(trials.stop)[k] + 1e-9).all()
    batch = dm.datasets["train"].__getitems__(list(range(16)))
    assert batch.frames is None and batch.behavior is None
    assert int(batch.ids.max()) < dm.spec.vocab.size == 4 + N_SPECIAL


def test_units_only_files_train_without_a_flag_but_not_with_explicit_frames(small_sim_path, caplog):
    with caplog.at_level("INFO"):
        alm = NWBDataModule(paths=[ALM])  # n_frames: auto
        alm.setup()
    assert alm.spec.n_frames == 0 and alm.datasets["train"].__getitems__([0]).frames is None
    assert "Stimulus: none in the recording" in caplog.text
    sim = NWBDataModule(paths=[str(small_sim_path)])
    sim.setup()
    assert sim.spec.n_frames == 4 and sim.spec.frame_shape == (32, 32)  # auto: the file has a movie
    with pytest.raises(RecordingError, match=r"stimulus: no stimulus frames found, but data.n_frames=4"):
        NWBDataModule(paths=[ALM], n_frames=4).setup()


def test_missing_modalities_and_tables_are_named(small_sim_path):
    with pytest.raises(RecordingError, match="behavior/pupil"):
        NWBDataModule(paths=[str(small_sim_path)], behavior=["pupil"]).setup()
    with pytest.raises(RecordingError, match="intervals/epochs"):
        NWBDataModule(paths=[str(small_sim_path)], restrict_to="epochs").setup()
    with pytest.raises(RecordingError, match="too short"):
        NWBDataModule(paths=[str(small_sim_path)], split=SplitSpec(n_blocks=1000)).setup()


def test_few_shot_fraction_is_a_seeded_subset_spread_over_the_training_block(small_sim_path):
    full = NWBDataModule(paths=[str(small_sim_path)], n_frames=0)
    full.setup()
    few = NWBDataModule(paths=[str(small_sim_path)], n_frames=0, train_fraction=0.1)
    few.setup()
    again = NWBDataModule(paths=[str(small_sim_path)], n_frames=0, train_fraction=0.1)
    again.setup()
    all_t0, few_t0 = full.datasets["train"].t0, few.datasets["train"].t0
    assert len(few_t0) == round(0.1 * len(all_t0))
    assert np.isin(few_t0, all_t0).all() and (np.diff(few_t0) > 0).all()
    np.testing.assert_array_equal(few_t0, again.datasets["train"].t0)
    # spread over the block: not the first 10% in time
    assert few_t0.max() > np.quantile(all_t0, 0.8) and few_t0.min() < np.quantile(all_t0, 0.2)
    assert torch.equal(few.datasets["test"].__getitems__([0, 1]).ids, full.datasets["test"].__getitems__([0, 1]).ids)


@pytest.mark.parametrize("design", [{}, {"n_context_layer": 0, "n_latents": 8, "past_direct": True}],
                         ids=["tokens", "latents+past"])
def test_trimmed_batches_drop_only_all_pad_columns_and_keep_every_output(small_sim_path, design):
    dm = NWBDataModule(paths=[str(small_sim_path)], behavior=["running_speed"], batch_size=16)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    short = batch.trimmed()
    T = short.ids.shape[1]
    # Blocks are sized for the busiest window, so an ordinary batch leaves PAD columns to drop.
    assert T < batch.ids.shape[1] and short.past_ids.shape[1] < batch.past_ids.shape[1]
    for full, kept in ((batch.target_ids, short.target_ids), (batch.past_ids, short.past_ids)):
        n = kept.shape[1]
        assert torch.equal(full[:, :n], kept) and (full[:, n:] == PAD).all() and (kept[:, -1] != PAD).any()
    torch.manual_seed(0)
    model = Neuroformer.build(dm.spec, rate_readout=True, n_embd=32, n_head=4, n_layer=2, **design).eval()
    with torch.no_grad():
        a, b = model(batch.inputs, contrastive=True), model(short.inputs, contrastive=True)
        losses_a = model.losses(a, batch.target_ids, batch.target_dts, batch.counts)
        losses_b = model.losses(b, short.target_ids, short.target_dts, short.counts)
    torch.testing.assert_close(b.id_logits, a.id_logits[:, :T], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.log_rates, a.log_rates, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.neural, a.neural, rtol=1e-4, atol=1e-4)
    assert losses_a.keys() == losses_b.keys() and len(losses_a) == 4
    for key in losses_a:
        torch.testing.assert_close(losses_b[key], losses_a[key], rtol=1e-4, atol=1e-5)
