"""The simulator writes a valid NWB file whose spikes carry its stored ground truth."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hdmf.backends.hdf5.h5tools import HDF5IO
from pynwb import NWBHDF5IO

from neuroformer.data.simulate import (
    CELL_TYPES,
    GroundTruth,
    Simulation,
    SimulationConfig,
    load_ground_truth,
    main,
    simulate,
    write_nwb,
)
from neuroformer.data.datamodule import NWBDataModule
from neuroformer.data.tokenizer import SpikeTokenizer
from neuroformer.errors import RecordingError
from neuroformer.models.neuroformer import Neuroformer

REAL_NWB = Path(__file__).parent / "data" / "alm_guo2017_anm00239123.nwb"


def _read(path: Path, config: SimulationConfig) -> Simulation:
    """The file's content via pynwb, in the simulator's in-memory form."""
    with NWBHDF5IO(str(path), "r") as io:
        nwb = io.read()
        spikes = [np.asarray(nwb.units.get_unit_spike_times(i)) for i in range(len(nwb.units))]
        frames = nwb.stimulus["movie"].data[:]
        speed = nwb.processing["behavior"]["BehavioralTimeSeries"]["running_speed"].data[:]
        trials = {c: np.asarray(nwb.trials[c].data[:]) for c in nwb.trials.colnames}
        trials["start_time"] = nwb.trials["start_time"].data[:]
        trials["stop_time"] = nwb.trials["stop_time"].data[:]
    return Simulation(config, spikes, frames, speed, trials, load_ground_truth(path))


@pytest.fixture(scope="module")
def sim(small_sim_path: Path, small_sim_config: SimulationConfig) -> Simulation:
    return _read(small_sim_path, small_sim_config)


def _frame_counts(sim: Simulation) -> np.ndarray:
    """(n_frames, N) spike counts per stimulus frame."""
    n_frames, rate = len(sim.frames), sim.config.frame_rate
    return np.stack([np.bincount((s * rate).astype(int), minlength=n_frames)[:n_frames]
                     for s in sim.spike_times], axis=1)


def test_file_layout(small_sim_path: Path, small_sim_config: SimulationConfig) -> None:
    cfg = small_sim_config
    with NWBHDF5IO(str(small_sim_path), "r") as io:
        nwb = io.read()
        assert str(cfg.seed) in nwb.identifier and nwb.subject.species == "Mus musculus"
        assert nwb.session_start_time.tzinfo is not None
        assert len(nwb.units) == cfg.n_units
        assert set(nwb.units.colnames) >= {"cell_type", "is_excitatory", "preferred_direction",
                                           "speed_gain", "baseline_rate", "receptive_field",
                                           "location"}
        n_spikes = 0
        for i in range(cfg.n_units):
            s = np.asarray(nwb.units.get_unit_spike_times(i))
            assert np.all(np.diff(s) > 0.002)  # sorted, absolute refractory period
            assert s.min() >= 0 and s.max() <= cfg.duration
            n_spikes += len(s)
        assert 3 < n_spikes / cfg.n_units / cfg.duration < 10

        movie = nwb.stimulus["movie"]
        assert movie.data.shape == (1200, 32, 32) and movie.data.dtype == np.uint8
        assert movie.rate == cfg.frame_rate and movie.starting_time == 0.0
        assert movie.data.chunks[0] < 100  # slices read lazily
        assert abs(movie.data[:].mean() - 128) < 10

        speed = nwb.processing["behavior"]["BehavioralTimeSeries"]["running_speed"]
        assert speed.unit == "cm/s" and speed.rate == cfg.behavior_rate
        assert speed.data.shape == (3000,) and speed.data[:].min() >= 0
        assert speed.data[:].max() > 10  # at least one running bout

        trials = nwb.trials.to_dataframe()
        assert trials.start_time.iloc[0] == 0 and trials.stop_time.iloc[-1] == cfg.duration
        np.testing.assert_allclose(trials.start_time.iloc[1:], trials.stop_time.iloc[:-1])
        assert set(trials.stimulus_type) == {"grating", "noise", "repeat"}
        assert ((trials.clip_id >= 0) == (trials.stimulus_type == "repeat")).all()
        assert (trials.direction.notna() == (trials.stimulus_type == "grating")).all()


def test_repeated_clips_are_identical(sim: Simulation) -> None:
    rate, trials = sim.config.frame_rate, sim.trials
    clips: dict[int, list[np.ndarray]] = {}
    for k in np.flatnonzero(trials["stimulus_type"] == "repeat"):
        start, stop = round(trials["start_time"][k] * rate), round(trials["stop_time"][k] * rate)
        if stop - start == round(sim.config.clip_duration * rate):  # skip a truncated last one
            clips.setdefault(int(trials["clip_id"][k]), []).append(sim.frames[start:stop])
    assert any(len(shown) >= 2 for shown in clips.values())
    for shown in clips.values():
        for frames in shown[1:]:
            np.testing.assert_array_equal(frames, shown[0])
    firsts = [shown[0] for shown in clips.values()]
    assert not np.array_equal(firsts[0], firsts[1])


def test_deterministic_and_ground_truth_round_trip(sim: Simulation,
                                                   small_sim_config: SimulationConfig) -> None:
    again = simulate(small_sim_config)
    assert len(again.spike_times) == len(sim.spike_times)
    for ours, theirs in zip(again.spike_times, sim.spike_times):
        assert ours.tobytes() == theirs.tobytes()
    np.testing.assert_array_equal(again.frames, sim.frames)
    np.testing.assert_array_equal(again.speed, sim.speed)
    for f in dataclasses.fields(GroundTruth):
        np.testing.assert_array_equal(getattr(again.ground_truth, f.name),
                                      getattr(sim.ground_truth, f.name), err_msg=f.name)

    # Another seed: another population (which does not depend on the duration).
    other = simulate(dataclasses.replace(small_sim_config, seed=2, duration=5.0))
    assert not np.array_equal(other.ground_truth.connectivity, sim.ground_truth.connectivity)
    assert not np.allclose(other.ground_truth.receptive_fields, sim.ground_truth.receptive_fields)
    assert not np.array_equal(other.spike_times[0], sim.spike_times[0][sim.spike_times[0] < 5])
    short = simulate(dataclasses.replace(small_sim_config, duration=5.0))
    np.testing.assert_array_equal(short.ground_truth.connectivity, sim.ground_truth.connectivity)


def test_ground_truth_invariants(sim: Simulation) -> None:
    gt = sim.ground_truth
    w = gt.connectivity
    assert w.shape == (40, 40) and np.all(np.diag(w) == 0)
    assert np.all(w[gt.is_excitatory] >= 0) and np.all(w[~gt.is_excitatory] <= 0)  # Dale
    assert gt.is_excitatory.sum() == 32
    out_degree = (w != 0).sum(axis=1)
    assert out_degree.max() >= 4 * max(1, np.median(out_degree))  # a hub
    assert set(gt.cell_types) == set(CELL_TYPES)
    assert np.array_equal(np.isnan(gt.preferred_direction), gt.cell_types != "DS")
    rf_peak = gt.receptive_fields.reshape(40, -1)
    signed = rf_peak[np.arange(40), np.abs(rf_peak).argmax(axis=1)]
    assert np.all(signed[gt.cell_types == "ON"] > 0) and np.all(signed[gt.cell_types == "OFF"] < 0)
    assert np.all(rf_peak[gt.cell_types == "untuned"] == 0)


def test_on_and_off_units_respond_oppositely_to_luminance(sim: Simulation) -> None:
    counts = _frame_counts(sim)
    luminance = sim.frames.reshape(len(sim.frames), -1).mean(axis=1)
    # Response one frame (50 ms) after the luminance, the peak of the temporal kernels.
    corr = np.array([np.corrcoef(luminance[:-1], counts[1:, n])[0, 1]
                     for n in range(sim.config.n_units)])
    on, off = sim.ground_truth.cell_types == "ON", sim.ground_truth.cell_types == "OFF"
    assert np.mean(corr[on] > 0) >= 0.8 and np.mean(corr[off] < 0) >= 0.8
    assert np.median(corr[on]) > 0.05 > -0.05 > np.median(corr[off])


def test_spike_triggered_average_recovers_receptive_field(sim: Simulation) -> None:
    _assert_sta_recovers_receptive_fields(sim)


def test_non_square_frames_reach_the_model_and_drive_the_units(tmp_path: Path,
                                                              small_sim_config: SimulationConfig) -> None:
    # The reference Neuroformer's stimulus is 30 x 100 pixels: frames need not be square.
    config = dataclasses.replace(small_sim_config, frame_size=16, frame_width=40)
    sim = simulate(config)
    assert sim.frames.shape[1:] == sim.ground_truth.receptive_fields.shape[1:] == (16, 40)
    _assert_sta_recovers_receptive_fields(sim)
    path = write_nwb(sim, tmp_path / "wide.nwb")
    datamodule = NWBDataModule(paths=[str(path)], tokenizer=SpikeTokenizer(), n_frames=2, cache_dir=str(tmp_path))
    datamodule.setup()
    assert datamodule.spec.frame_shape == (16, 40)
    model = Neuroformer.build(datamodule.spec, n_embd=16, n_head=2, n_layer=1, patch=(1, 8, 8))
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.frames.shape[2:] == (16, 40) and model.frames.pos.shape[0] == 2 * 2 * 5
    assert model(batch.inputs).id_logits.isfinite().all()


def _assert_sta_recovers_receptive_fields(sim: Simulation) -> None:
    gt, counts = sim.ground_truth, _frame_counts(sim)
    x = sim.frames.reshape(len(sim.frames), -1).astype(float)
    x -= x.mean(axis=0)
    sta = counts[1:].T @ x[:-1] / counts[1:].sum(axis=0)[:, None]  # (N, pixels), lag 1 frame
    tuned = np.flatnonzero(np.isin(gt.cell_types, ["ON", "OFF"]))
    rfs = gt.receptive_fields.reshape(len(gt.cell_types), -1)[tuned]
    match = np.corrcoef(sta[tuned], rfs)[: len(tuned), len(tuned):]  # [unit, rf]
    own = np.diag(match)
    others = np.where(np.eye(len(tuned), dtype=bool), np.nan, np.abs(match))
    assert np.median(own) > 0.2
    assert np.mean(own > np.nanpercentile(others, 90, axis=1)) >= 0.8


def test_synaptic_links_show_in_cross_correlograms(sim: Simulation) -> None:
    spikes, w = sim.spike_times, sim.ground_truth.connectivity

    def counts(pre: int, post: int) -> tuple[int, int]:
        """Post spikes 0.5-10 ms after / before each pre spike."""
        a, b = spikes[pre], spikes[post]
        after = np.searchsorted(b, a + 0.010) - np.searchsorted(b, a + 0.0005)
        before = np.searchsorted(b, a - 0.0005) - np.searchsorted(b, a - 0.010)
        return int(after.sum()), int(before.sum())

    excitatory = np.array([counts(*link) for link in np.argwhere(w > 0.9)]).sum(axis=0)
    rng = np.random.default_rng(0)
    pairs = [p for p in rng.choice(40, (200, 2)) if p[0] != p[1] and w[p[0], p[1]] == 0
             and w[p[1], p[0]] == 0]
    unlinked = np.array([counts(*p) for p in pairs]).sum(axis=0)
    assert excitatory[0] > 1.3 * excitatory[1]
    assert 0.9 < unlinked[0] / unlinked[1] < 1.1


def test_running_speed_modulates_firing(sim: Simulation) -> None:
    seconds = int(sim.config.duration)
    counts = np.stack([np.bincount(s.astype(int), minlength=seconds)[:seconds]
                       for s in sim.spike_times], axis=1)
    speed = sim.speed.reshape(seconds, -1).mean(axis=1)
    corr = np.array([np.corrcoef(speed, counts[:, n])[0, 1] for n in range(counts.shape[1])])
    gain = sim.ground_truth.speed_gain
    assert np.corrcoef(gain, corr)[0, 1] > 0.6
    assert np.corrcoef(speed, counts[:, gain > 0.3].sum(axis=1))[0, 1] > 0.5


def test_direction_selective_units_prefer_their_direction() -> None:
    cfg = SimulationConfig(seed=3, n_units=12, duration=240.0, frac_on=0.0, frac_off=0.0,
                           frac_ds=1.0, link_prob=0.0, hub_link_prob=0.0)
    result = simulate(cfg)
    trials = result.trials
    gratings = np.flatnonzero(trials["stimulus_type"] == "grating")
    wins = 0
    for unit, preferred in enumerate(result.ground_truth.preferred_direction):
        rate = {"preferred": [], "opposite": []}
        for k in gratings:
            start, stop = trials["start_time"][k], trials["stop_time"][k]
            offset = (trials["direction"][k] - preferred) % 360
            side = ("preferred" if min(offset, 360 - offset) <= 45
                    else "opposite" if abs(offset - 180) <= 45 else None)
            if side:
                s = result.spike_times[unit]
                rate[side].append(np.count_nonzero((s >= start) & (s < stop)) / (stop - start))
        wins += np.mean(rate["preferred"]) > 2 * np.mean(rate["opposite"])
    assert wins >= 10


def test_nwbinspector_finds_nothing_critical(small_sim_path: Path) -> None:
    from nwbinspector import Importance, inspect_nwbfile

    messages = list(inspect_nwbfile(small_sim_path, importance_threshold=Importance.CRITICAL))
    assert messages == []


def test_interrupted_write_leaves_no_partial_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    result = simulate(SimulationConfig(n_units=5, duration=2.0))
    original, calls = HDF5IO.write_dataset, []

    def failing(self, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 5:  # some datasets are on disk already
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HDF5IO, "write_dataset", failing)
    target = tmp_path / "out.nwb"
    with pytest.raises(KeyboardInterrupt):
        write_nwb(result, target)
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []

    target.write_bytes(b"previous file")  # an earlier complete file survives a failed rewrite
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        write_nwb(result, target)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"previous file"

    monkeypatch.setattr(HDF5IO, "write_dataset", original)
    write_nwb(result, target)
    assert load_ground_truth(target).n_units == 5 and list(tmp_path.iterdir()) == [target]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    # every option's default shown once, from SimulationConfig; none for the required --out
    assert f"(default: {SimulationConfig().n_units})" in text and "(default: None)" not in text
    out = tmp_path / "sub" / "cli.nwb"
    assert main(["--out", str(out), "--n-units", "6", "--duration", "3", "--seed", "4",
                 "--quiet"]) == 0
    truth = load_ground_truth(out)
    assert truth.n_units == 6 and truth.receptive_fields.shape == (6, 32, 32)
    capsys.readouterr()
    assert main(["--out", str(out), "--duration", "-1"]) == 2
    assert capsys.readouterr().err == "error: simulation duration must be > 0, got -1.0\n"


def test_load_ground_truth_rejects_a_real_recording() -> None:
    with pytest.raises(RecordingError, match="not a neuroformer simulation"):
        load_ground_truth(REAL_NWB)
