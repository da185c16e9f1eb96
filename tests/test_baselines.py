"""The simulator oracle, the coupled GLM and the mean-rate predictor against known answers."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from pynwb import NWBHDF5IO, NWBFile, TimeSeries
from pynwb.behavior import BehavioralTimeSeries
from pynwb.image import ImageSeries

from neuroformer.baselines.glm import CoupledGLM, GLMConfig, fit_glm, history_basis, split_spans
from neuroformer.baselines.mean_rate import mean_rate_counts
from neuroformer.baselines.oracle import SimulatorOracle
from neuroformer.data.nwb import read_nwb
from neuroformer.data.simulate import (
    SimulationConfig,
    external_drive,
    load_ground_truth,
    read_config,
    refractory_table,
    simulate_recording,
)
from neuroformer.data.splits import SplitSpec, window_starts
from neuroformer.data.tokenizer import SpikeTokenizer
from neuroformer.errors import RecordingError
from neuroformer.inference.connectivity import cross_correlation_influence
from neuroformer.metrics.links import score_links
from neuroformer.metrics.nlb import bits_per_spike
from neuroformer.data.tokenizer import bin_spikes

TOK = SpikeTokenizer()
SPLIT = SplitSpec(seed=42)
ALM = Path(__file__).parent / "data" / "alm_guo2017_anm00239123.nwb"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def uncoupled_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated session without synapses: units are independent given the stimulus and running."""
    config = SimulationConfig(seed=2, n_units=16, duration=20.0, link_prob=0.0, hub_link_prob=0.0)
    return simulate_recording(tmp_path_factory.mktemp("sim") / "uncoupled.nwb", config, progress=False)


@pytest.fixture(scope="module")
def small(small_sim_path: Path):
    """The 40-unit fixture: recording, its test windows and their true counts, the oracle, a fitted GLM."""
    rec = read_nwb(small_sim_path)
    t0 = window_starts(rec.start, rec.stop, SPLIT, "test", TOK.window, TOK.past_window, TOK.window)
    true = bin_spikes(rec.units.spike_times, rec.units.spike_units, t0, TOK, rec.units.n_units)
    glm = fit_glm(rec, split_spans(rec, SPLIT, "train"), split_spans(rec, SPLIT, "val"))
    return rec, t0, true, SimulatorOracle.from_file(small_sim_path), glm


# --------------------------------------------------------------------------- oracle


def _closed_form(oracle: SimulatorOracle, rec, t0: np.ndarray, history: bool, burn_in: float) -> np.ndarray:
    """(B, n_bins, U) exact expected counts of an uncoupled population, by forward recursion.

    Without synapses every unit is a Markov chain over "steps since its last spike" (its refractory
    state), driven by the known external input; propagating the state's distribution step by step
    gives the expected count of each step exactly, and a spike is uniform within its step.
    """
    cfg = oracle.config
    dt, U = cfg.dt, cfg.n_units
    table = refractory_table(dt)
    R = len(table) - 1
    out = np.zeros((len(t0), TOK.n_bins, U))
    for w, start in enumerate(t0):
        first = math.floor(start / dt)
        f = start / dt - first
        n_burn = 0 if history else round(burn_in / dt)
        n_steps = math.ceil((start + TOK.window) / dt) - first
        steps = np.arange(first - n_burn, first + n_steps)
        ext = external_drive(oracle.inputs.population, oracle.inputs.drive, oracle.inputs.speed, cfg, steps)
        state = np.zeros((U, R + 1))  # P(counter = c) before the step's advance
        known = np.zeros(U, bool)
        if history:
            for u in range(U):
                spikes = rec.units.spikes_of(u)
                past = spikes[(spikes >= start - TOK.past_window) & (spikes < start)]
                step_of = np.floor(past / dt).astype(int)
                earlier = step_of[step_of < first]
                state[u, min(first - 1 - earlier.max(), R) if len(earlier) else R] = 1.0
                known[u] = np.any(step_of == first)
        else:
            state[:, R] = 1.0
        for k, step in enumerate(steps):
            advanced = np.zeros_like(state)
            advanced[:, 1:] = state[:, :-1]
            advanced[:, R] += state[:, R]
            rate = np.minimum(np.exp(ext[k][:, None] + table[None, :]), cfg.max_rate)
            p = -np.expm1(-dt * rate)  # (U, R + 1) spike probability per counter value
            lo, hi = step * dt, (step + 1) * dt
            if history and k == 0:
                p = np.where(known[:, None], 0.0, p * (1 - f) / (1 - p * f))
                lo = start
            fired = (advanced * p).sum(1)
            if k >= n_burn:
                for b in range(TOK.n_bins):
                    a, z = start + b * TOK.resolution, start + (b + 1) * TOK.resolution
                    out[w, b] += fired * max(0.0, min(hi, z) - max(lo, a)) / (hi - lo)
            state = advanced * (1 - p)
            state[:, 0] = fired
            if history and k == 0:  # a unit that spiked in this step before t0 is certain to restart
                state[known] = 0.0
                state[known, 0] = 1.0
    return out


@pytest.mark.parametrize("history", [True, False])
def test_oracle_without_synapses_converges_to_the_closed_form(uncoupled_path: Path, history: bool):
    """Monte Carlo error around the exact answer falls as 1/sqrt(S) (a biased oracle would level off)."""
    rec = read_nwb(uncoupled_path)
    oracle = SimulatorOracle.from_file(uncoupled_path)
    t0 = np.random.default_rng(0).uniform(1.0, 19.0, 12)  # anywhere, not on the 1 ms grid
    exact = _closed_form(oracle, rec, t0, history, burn_in=0.05)
    mc = {S: oracle.expected_counts(rec, t0, TOK, n_samples=S, history=history, burn_in=0.05) for S in (100, 1600)}
    rms = {S: np.sqrt(np.mean((m - exact) ** 2)) for S, m in mc.items()}
    assert rms[1600] < 0.4 * rms[100]  # 1/sqrt(16) = 0.25
    assert rms[1600] < 0.005 * exact.max()
    assert mc[1600].sum() == pytest.approx(exact.sum(), rel=2e-3)
    # Sensitivity: the drive alone (no refractoriness) is far off.
    assert abs(_drive_only(oracle, t0).sum() / exact.sum() - 1) > 0.1


def _drive_only(oracle: SimulatorOracle, t0: np.ndarray) -> np.ndarray:
    """(B, U) expected window counts from the external drive alone (no refractoriness)."""
    cfg = oracle.config
    out = []
    for start in t0:
        steps = np.arange(math.floor(start / cfg.dt), math.ceil((start + TOK.window) / cfg.dt))
        ext = external_drive(oracle.inputs.population, oracle.inputs.drive, oracle.inputs.speed, cfg, steps)
        out.append((-np.expm1(-cfg.dt * np.minimum(np.exp(ext), cfg.max_rate))).sum(0))
    return np.array(out)


def test_oracle_is_calibrated_and_beats_the_glm_and_the_mean_rate(small):
    rec, t0, true, oracle, glm = small
    forecast = oracle.expected_counts(rec, t0, TOK, n_samples=64)
    stimulus_only = oracle.expected_counts(rec, t0, TOK, n_samples=64, history=False)
    # Calibrated: total predicted counts match the observed total within Poisson noise.
    assert abs(forecast.sum() - true.sum()) < 3 * math.sqrt(true.sum())
    scores = {
        "oracle": bits_per_spike(forecast, true),
        "stimulus": bits_per_spike(stimulus_only, true),
        "glm": bits_per_spike(glm.expected_counts(rec, t0, TOK, n_samples=32), true),
        "mean": bits_per_spike(mean_rate_counts(rec, split_spans(rec, SPLIT, "train"), t0, TOK), true),
    }
    assert scores["oracle"] > scores["glm"] > scores["mean"] + 0.2, scores
    assert scores["oracle"] >= scores["stimulus"] - 0.01, scores  # the past can only help the true model


def test_oracle_refuses_a_file_it_cannot_rebuild(small, small_sim_path: Path, small_sim_config: SimulationConfig):
    assert read_config(small_sim_path) == small_sim_config  # what the oracle rebuilds from
    rec, t0, *_ = small
    with pytest.raises(RecordingError, match="general/notes"):
        SimulatorOracle.from_file(ALM)
    other = SimulatorOracle(SimulationConfig(seed=1, n_units=20, duration=60.0), small[3].inputs)
    with pytest.raises(RecordingError, match="units"):
        other.expected_counts(rec, t0[:2], TOK)


# --------------------------------------------------------------------------- GLM


def _write_units_stimulus_speed(path: Path, spikes: list[np.ndarray], frames: np.ndarray, frame_rate: float,
                                speed: np.ndarray, speed_rate: float) -> Path:
    """A minimal NWB file: units, a movie and running speed."""
    nwb = NWBFile(session_description="Poisson GLM test data", identifier="glm-recovery",
                  session_start_time=datetime(2024, 1, 1, tzinfo=timezone.utc))
    for times in spikes:
        nwb.add_unit(spike_times=times)
    nwb.add_stimulus(ImageSeries(name="movie", data=frames, unit="grey level", format="raw", rate=frame_rate,
                                 starting_time=0.0))
    behavior = nwb.create_processing_module("behavior", "running")
    behavior.add(BehavioralTimeSeries(time_series=TimeSeries(name="running_speed", data=speed, unit="cm/s",
                                                              rate=speed_rate, starting_time=0.0)))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


@pytest.fixture(scope="module")
def glm_data(tmp_path_factory: pytest.TempPathFactory):
    """300 s of a Poisson GLM at 5 ms with known weights: 12 units, 6x6-pixel frames at 20 Hz
    (filters over 2 frames), running speed, and a sparse coupling acting at a lag of one bin."""
    rng = np.random.default_rng(7)
    U, res, duration, size = 12, 0.005, 300.0, 6
    n_bins, n_frames = round(duration / res), round(duration * 20)
    frames = rng.integers(0, 256, (n_frames, size, size)).astype(np.uint8)
    pixels = (frames.reshape(n_frames, -1) - 127.5) / 73.9  # about z-scored
    stim = rng.standard_normal((2, size * size, U)) * 0.08
    speed = np.abs(np.cumsum(rng.standard_normal(round(duration * 50))) * 0.5) % 40
    gain = rng.uniform(-0.5, 0.5, U)
    coupling = np.where(rng.random((U, U)) < 0.15, rng.choice([-1.5, 1.2], (U, U)), 0.0)
    np.fill_diagonal(coupling, -2.0)  # refractory-like self-inhibition
    bias = np.log(rng.uniform(5, 15, U) * res)
    centre = (np.arange(n_bins) + 0.5) * res
    frame = np.minimum((centre * 20).astype(int), n_frames - 1)
    drive_per_frame = pixels @ stim[0] + np.concatenate([np.zeros((1, U)), pixels[:-1] @ stim[1]])
    z_speed = np.interp(centre, np.arange(len(speed)) / 50, speed)
    z_speed = (z_speed - z_speed.mean()) / z_speed.std()
    exo = bias + drive_per_frame[frame] + np.outer(z_speed, gain)
    counts = np.zeros((n_bins, U), np.int64)
    for t in range(n_bins):
        eta = exo[t] + (counts[t - 1] @ coupling if t else 0.0)
        counts[t] = rng.poisson(np.exp(np.minimum(eta, 0.0)))
    bins, units = np.nonzero(counts)
    spikes = [np.sort(np.repeat(bins[units == u], counts[bins[units == u], u]) + rng.random(counts[:, u].sum()))
              * res for u in range(U)]
    path = _write_units_stimulus_speed(tmp_path_factory.mktemp("glm") / "glm.nwb", spikes, frames, 20.0, speed, 50.0)
    return path, {"stimulus": stim, "coupling": coupling, "gain": gain}


def test_glm_recovers_the_weights_of_a_glm(glm_data):
    path, truth = glm_data
    rec = read_nwb(path)
    config = GLMConfig(history=0.01, coupling=0.01, frame_lags=2, frame_size=6, penalties=(1e-4, 1e-5))
    spans = np.array([[rec.start, rec.start + 270.0]]), np.array([[rec.start + 270.0, rec.stop]])
    glm = fit_glm(rec, *spans, config)
    lag1 = glm.coupling[:, 0, :]  # box {1}: the lag the true coupling acts at
    off = ~np.eye(len(lag1), dtype=bool)
    assert np.abs(lag1 - truth["coupling"])[off].max() < 0.35
    assert np.abs(np.diag(lag1) - np.diag(truth["coupling"])).max() < 0.5
    assert np.abs(glm.coupling[:, 1, :]).max() < 0.35  # box {2}: nothing there
    assert score_links(glm.coupling_strength(0.005), truth["coupling"]).auroc == 1.0
    # Filters on z-scored pixels: the true ones up to the pixels' common scale.
    assert np.corrcoef(glm.stimulus.ravel(), truth["stimulus"].ravel())[0, 1] > 0.95
    assert np.corrcoef(glm.behavior[0], truth["gain"])[0, 1] > 0.95


def test_glm_forecast_beats_the_mean_rate(small):
    rec, t0, true, _, glm = small
    forecast = glm.expected_counts(rec, t0, TOK, n_samples=32)
    mean = mean_rate_counts(rec, split_spans(rec, SPLIT, "train"), t0, TOK)
    assert bits_per_spike(forecast, true) > bits_per_spike(mean, true) + 0.2
    assert forecast.sum() == pytest.approx(true.sum(), rel=0.15)


@pytest.fixture(scope="module")
def coupled_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A population driven by its synapses (as ``experiment=connectivity``, shorter): 20 untuned units, dense links."""
    config = SimulationConfig(seed=0, n_units=20, duration=80.0, frac_on=0.0, frac_off=0.0, frac_ds=0.0,
                              link_prob=0.2, mean_rate=15.0)
    return simulate_recording(tmp_path_factory.mktemp("sim") / "coupled.nwb", config, progress=False)


def test_glm_coupling_finds_the_links_as_well_as_cross_correlation(coupled_path: Path):
    """At 2 ms bins (synapses act within a few ms: coarser bins put cause and effect in one bin)."""
    rec, truth = read_nwb(coupled_path), load_ground_truth(coupled_path).connectivity
    train = split_spans(rec, SPLIT, "train")
    config = GLMConfig(resolution=0.002, history=0.01, coupling=0.01, penalties=(1e-2, 3e-3))
    glm = fit_glm(rec, train, split_spans(rec, SPLIT, "val"), config)
    inside = np.zeros(len(rec.units.spike_times), bool)
    for lo, hi in train:
        inside |= (rec.units.spike_times >= lo) & (rec.units.spike_times < hi)
    xcorr = cross_correlation_influence(rec.units.spike_times[inside], rec.units.spike_units[inside],
                                        rec.units.n_units)
    glm_scores, xcorr_scores = score_links(glm.coupling_strength(), truth), score_links(xcorr, truth)
    assert glm_scores.auroc > 0.97 and glm_scores.auroc > xcorr_scores.auroc - 0.02, (glm_scores, xcorr_scores)
    assert glm_scores.direction_auroc > 0.95
    assert glm_scores.excitatory_auroc > 0.95 and glm_scores.inhibitory_auroc > 0.95


def test_glm_fits_a_units_only_recording():
    """The real ALM file: no stimulus, no behaviour, windows inside trials; history and coupling only."""
    rec = read_nwb(ALM)
    tok = SpikeTokenizer(window=0.1, past_window=0.3, resolution=0.01)
    spans = {s: split_spans(rec, SPLIT, s, rec.trials) for s in ("train", "val")}
    glm = fit_glm(rec, spans["train"], spans["val"], GLMConfig(resolution=0.01, history=0.1, penalties=(1e-2, 1e-3)))
    assert glm.stimulus is None and glm.behavior.shape == (0, rec.units.n_units)
    t0 = window_starts(rec.start, rec.stop, SPLIT, "test", tok.window, tok.past_window, tok.window, rec.trials)
    true = bin_spikes(rec.units.spike_times, rec.units.spike_units, t0, tok, rec.units.n_units)
    forecast = glm.expected_counts(rec, t0, tok, n_samples=32)
    mean = mean_rate_counts(rec, spans["train"], t0, tok)
    # The test block fires at less than half the training rate (so the mean rate scores far below 0):
    # only the recent past tells the GLM so.
    assert bits_per_spike(forecast, true) > bits_per_spike(mean, true) + 1.0


def test_history_basis_doubles_and_glm_refuses_mismatched_input(small):
    assert [list(np.flatnonzero(b) + 1) for b in history_basis(6)] == [[1], [2], [3, 4], [5, 6]]
    rec, t0, _, _, glm = small
    with pytest.raises(ValueError, match="resolution|fitted at"):
        glm.expected_counts(rec, t0[:2], SpikeTokenizer(resolution=0.002))
    assert isinstance(glm, CoupledGLM)


def test_cached_glm_is_fitted_once_per_recording_split_and_config(small_sim_path: Path, tmp_path: Path, monkeypatch):
    import neuroformer.baselines.glm as glm_module

    rec = read_nwb(small_sim_path)
    split, config = SplitSpec(seed=42), GLMConfig(max_iter=5, penalties=(0.1,))
    fitted = glm_module.cached_glm(rec, split, config, tmp_path)
    (stored,) = tmp_path.glob("glm_*.npz")

    def refit(*args, **kwargs):
        raise AssertionError("fitted again although the fit is cached")

    monkeypatch.setattr(glm_module, "fit_glm", refit)
    again = glm_module.cached_glm(rec, split, config, tmp_path)
    for name in ("bias", "stimulus", "coupling", "self_history", "behavior", "penalty", "max_count", "max_log_rate"):
        np.testing.assert_array_equal(getattr(again, name), getattr(fitted, name), err_msg=name)
    assert again.behavior_names == fitted.behavior_names and again.stats.keys() == fitted.stats.keys()
    tok = SpikeTokenizer()
    starts = window_starts(rec.start, rec.stop, split, "test", tok.window, tok.past_window, tok.window)[:20]
    np.testing.assert_array_equal(again.expected_counts(rec, starts, tok, 4), fitted.expected_counts(rec, starts, tok, 4))
    # Another split or config is another fit.
    with pytest.raises(AssertionError, match="fitted again"):
        glm_module.cached_glm(rec, SplitSpec(seed=7), config, tmp_path)
    with pytest.raises(AssertionError, match="fitted again"):
        glm_module.cached_glm(rec, split, GLMConfig(max_iter=6, penalties=(0.1,)), tmp_path)
    assert list(tmp_path.glob("glm_*.npz")) == [stored]
