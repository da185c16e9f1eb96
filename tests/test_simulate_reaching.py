"""The reaching simulator: deterministic, its NWB file round-trips, its ground truth is what it claims."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from neuroformer.data.nwb import read_nwb
from neuroformer.data.simulate_reaching import (
    ReachingConfig,
    load_reaching_truth,
    main,
    simulate,
    simulate_reaching,
    write_nwb,
)
from neuroformer.errors import RecordingError

SMALL = ReachingConfig(seed=3, n_units=40, trials_per_condition=3)


@pytest.fixture(scope="module")
def session():
    return simulate(SMALL)


@pytest.fixture(scope="module")
def written(session, tmp_path_factory):
    return write_nwb(session, tmp_path_factory.mktemp("reach") / "reach.nwb")


def test_same_seed_same_session_other_seed_other(session):
    again = simulate(SMALL)
    assert all(np.array_equal(a, b) for a, b in zip(session.spike_times, again.spike_times))
    np.testing.assert_array_equal(session.emg, again.emg)
    np.testing.assert_array_equal(session.truth.rates.data, again.truth.rates.data)
    other = simulate(dataclasses.replace(SMALL, seed=4))
    assert not np.array_equal(session.truth.recurrent, other.truth.recurrent)
    assert not np.array_equal(session.spike_times[0], other.spike_times[0])


def test_nwb_round_trip_through_read_nwb(session, written):
    rec = read_nwb(written)
    assert rec.units.n_units == SMALL.n_units
    for i in (0, 17, SMALL.n_units - 1):
        np.testing.assert_array_equal(rec.units.spikes_of(i), session.spike_times[i])
    emg = rec.behavior["emg"]
    np.testing.assert_array_equal(emg.data, session.emg)
    np.testing.assert_allclose(emg.timestamps, np.arange(len(session.emg)) * SMALL.dt)
    for name, values in session.trials.items():
        got = {"start_time": rec.trials.start, "stop_time": rec.trials.stop}.get(name, rec.trials.columns.get(name))
        np.testing.assert_array_equal(got, values, err_msg=name)

    truth = load_reaching_truth(written)
    for field in ("recurrent", "inputs", "readout", "readout_offset", "baseline_rate", "rate_gain"):
        np.testing.assert_array_equal(getattr(truth, field), getattr(session.truth, field), err_msg=field)
    np.testing.assert_array_equal(truth.rates.data, session.truth.rates.data)
    np.testing.assert_allclose(truth.rates.timestamps, session.truth.rates.timestamps)
    assert truth.config == dataclasses.asdict(SMALL)


def test_spikes_are_poisson_from_the_stored_rates(session):
    rates, bin_s = session.truth.rates.data, SMALL.truth_bin
    expected = rates.sum(axis=0) * bin_s  # (N,) expected spike count of each unit
    observed = np.array([len(s) for s in session.spike_times])
    z = (observed - expected) / np.sqrt(expected)
    assert np.abs(z).max() < 4.5, z
    # Bin by bin too: counts in each bin against that bin's rate, pooled over units.
    edges = np.arange(len(rates) + 1) * bin_s
    counts = np.stack([np.histogram(s, edges)[0] for s in session.spike_times], axis=1)
    for chosen in (rates * bin_s > 0.5, rates * bin_s < 0.1):  # high-rate and low-rate bins alike
        expected = (rates * bin_s)[chosen].sum()
        assert abs(counts[chosen].sum() - expected) < 4 * np.sqrt(expected)


def test_core_rotates_at_the_configured_frequencies(session):
    # Linearised at rest, tau dh/dt = (W - I) h: eigenvalues (lambda - 1) / tau.
    eig = (np.linalg.eigvals(session.truth.recurrent) - 1) / SMALL.tau
    oscillating = eig[eig.imag > 1e-6]
    freqs = np.sort(oscillating.imag / (2 * np.pi))
    expected = np.linspace(SMALL.freq_min, SMALL.freq_max, SMALL.n_planes)
    slow = [oscillating[np.argmin(np.abs(oscillating.imag / (2 * np.pi) - f))] for f in expected]
    np.testing.assert_allclose([z.imag / (2 * np.pi) for z in slow], expected, rtol=1e-6)
    np.testing.assert_allclose([-1 / z.real for z in slow], SMALL.damping, rtol=1e-6)
    assert np.all(np.linalg.eigvals(session.truth.recurrent).real < 1)  # stable at rest
    assert len(freqs) >= SMALL.n_planes


def test_emg_is_quiet_while_preparing_and_multiphasic_after_the_go_cue(session):
    cfg = SMALL
    steps = round(cfg.trial_duration / cfg.dt)
    emg = session.emg.reshape(cfg.n_trials, steps, -1)
    go = round((cfg.target_time + cfg.delay) / cfg.dt)
    means = np.stack([emg[session.trials["condition"] == c].mean(axis=0) for c in range(cfg.n_conditions)])
    late_delay = means[:, go - round(0.2 / cfg.dt):go]  # the preparatory state, reached
    movement = means[:, go:go + round(0.6 / cfg.dt)]
    assert late_delay.mean() < 0.15 * movement.mean()
    # Directions differ: the muscles' condition means are far from one shared pattern.
    spread = movement.std(axis=0).mean() / movement.mean()
    assert spread > 0.5


def test_cli_writes_a_readable_file_atomically(tmp_path: Path, capsys):
    out = tmp_path / "cli.nwb"
    assert main(["--out", str(out), "--n-units", "12", "--trials-per-condition", "1", "--seed", "5"]) == 0
    assert "12 units" in capsys.readouterr().out
    assert read_nwb(out).units.n_units == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.nwb"]  # no temporary file left
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad.nwb"), "--dt", "0.04"])  # dt > tau / 2


def test_simulate_reaching_is_deterministic_on_disk(tmp_path):
    a = simulate_reaching(tmp_path / "a.nwb", dataclasses.replace(SMALL, n_units=10, trials_per_condition=1))
    b = simulate_reaching(tmp_path / "b.nwb", dataclasses.replace(SMALL, n_units=10, trials_per_condition=1))
    ra, rb = read_nwb(a), read_nwb(b)
    np.testing.assert_array_equal(ra.units.spike_times, rb.units.spike_times)
    assert ra.metadata["identifier"] == rb.metadata["identifier"]


def test_truth_of_a_file_that_is_not_a_reaching_simulation(small_sim_path):
    with pytest.raises(RecordingError, match=r"small_sim\.nwb: general/notes"):
        load_reaching_truth(small_sim_path)
