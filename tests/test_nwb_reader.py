"""read_nwb: accepted layouts, lazy frames, and one clear RecordingError per broken field."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from pynwb import TimeSeries
from pynwb.behavior import BehavioralTimeSeries, CompassDirection, Position, SpatialSeries
from pynwb.ecephys import ElectricalSeries
from pynwb.image import ImageSeries, OpticalSeries

from neuroformer.data.nwb import read_nwb
from neuroformer.errors import RecordingError
from tests.corpus import MALFORMED, add_behavior, make_nwb, write

REAL_FILE = Path(__file__).parent / "data" / "alm_guo2017_anm00239123.nwb"

# pynwb warns while writing the deliberately odd files below
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def movie(n: int = 5, h: int = 4, w: int = 3) -> np.ndarray:
    """(n, h, w) uint8 frames whose pixels all equal the frame index."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, h, w)).copy()


def optical(name: str = "movie", **timing) -> OpticalSeries:
    """A 5-frame (5, 4, 3) uint8 movie, by default shown at 0.2, 0.3, ... 0.6 s."""
    timing = timing or {"timestamps": np.arange(5) * 0.1 + 0.2}
    return OpticalSeries(
        name=name,
        data=movie(),
        unit="n.a.",
        distance=0.1,
        field_of_view=[0.1, 0.1],
        orientation="up",
        **timing,
    )


# --- accepted files ------------------------------------------------------------------


def test_real_dandi_file() -> None:
    rec = read_nwb(REAL_FILE)
    assert rec.units.n_units == 4
    assert len(rec.units.spike_times) == 34_057
    assert np.all(np.diff(rec.units.spike_times) >= 0)
    assert 1498 < rec.start < 1500 and 5203 < rec.stop < 5205
    assert rec.units.names[0] == f"{rec.metadata['identifier']}/1"
    assert rec.units.columns["waveform_mean"].shape == (4, 29)
    assert "electrodes" not in rec.units.columns
    assert len(rec.trials) == 412
    assert {"lick left", "lick right"} <= set(rec.trials.columns["type"])
    assert rec.stimulus is None and rec.behavior == {}
    assert rec.metadata["nwb_version"] == "2.1.0"
    assert rec.metadata["subject_id"] == "anm00239123"


def test_units_are_merged_by_time_then_unit(tmp_path: Path) -> None:
    rec = read_nwb(write(make_nwb(), tmp_path), session_id="s7")
    np.testing.assert_array_equal(rec.units.spike_times, [0.5, 1.0, 1.0, 1.5, 2.0])
    np.testing.assert_array_equal(rec.units.spike_units, [0, 0, 1, 1, 0])
    assert rec.units.names == ["s7/10", "s7/11", "s7/12"]  # the silent unit keeps its name
    assert rec.units.columns["location"].tolist() == ["area0", "area1", "area2"]
    assert rec.units.columns["waveform"].shape == (3, 4)
    assert (rec.start, rec.stop) == (0.5, 2.0)


def test_reference_and_ragged_unit_columns_are_skipped(tmp_path: Path) -> None:
    nwb = make_nwb(spikes=None)
    device = nwb.create_device("probe")
    group = nwb.create_electrode_group("shank", description="s", location="CA1", device=device)
    nwb.add_electrode(group=group, location="CA1")
    nwb.add_unit(spike_times=[0.3], electrodes=[0], electrode_group=group, obs_intervals=[[0, 1.0]])
    units = read_nwb(write(nwb, tmp_path)).units
    assert units.columns == {} and units.names == ["synth-1/0"]


def test_trials_intervals_and_metadata(tmp_path: Path) -> None:
    nwb = make_nwb()
    nwb.add_epoch(start_time=0.0, stop_time=2.0)
    nwb.add_invalid_time_interval(start_time=0.2, stop_time=0.3)
    rec = read_nwb(write(nwb, tmp_path))
    assert rec.session_id == "synth-1" and rec.units.names[0] == "synth-1/10"
    np.testing.assert_array_equal(rec.trials.start, [0.0, 1.0])
    assert rec.trials.columns["type"].tolist() == ["lick left", "lick right"]
    assert set(rec.intervals) == {"epochs", "invalid_times"}
    np.testing.assert_array_equal(rec.intervals["invalid_times"].stop, [0.3])
    assert rec.metadata["session_start_time"] == "2024-01-02T03:04:05+00:00"
    assert rec.metadata["experimenter"] == ["A. Tester"]
    assert rec.metadata["lab"] == "Test lab" and rec.metadata["age"] == "P90D"


def test_behavior_in_containers_and_acquisition(tmp_path: Path) -> None:
    nwb = make_nwb()
    module = nwb.create_processing_module("Behavior", "behaviour, capitalised")
    xy = np.column_stack([np.arange(20.0), -np.arange(20.0)])
    position = SpatialSeries(name="position", data=xy, reference_frame="arena", rate=20.0)
    module.add(Position(spatial_series=position))
    heading = SpatialSeries(
        name="heading",
        data=np.linspace(0, 1, 5),
        reference_frame="north",
        unit="radians",
        rate=5.0,
        starting_time=1.0,
    )
    module.add(CompassDirection(spatial_series=heading))
    speed = TimeSeries(name="speed", data=np.ones(4), unit="m/s", rate=2.0)
    module.add(BehavioralTimeSeries(time_series=[speed]))
    nwb.add_acquisition(
        TimeSeries(name="speed", data=np.zeros(3), unit="m/s", timestamps=[0.0, 0.5, 3.0])
    )
    device = nwb.create_device("probe")
    group = nwb.create_electrode_group("shank", description="s", location="CA1", device=device)
    nwb.add_electrode(group=group, location="CA1")
    region = nwb.create_electrode_table_region([0], "the electrode")
    raw = ElectricalSeries(name="raw", data=np.zeros((10, 1)), electrodes=region, rate=1000.0)
    nwb.add_acquisition(raw)  # ephys: never behaviour
    path = write(nwb, tmp_path)
    rec = read_nwb(path)

    # same-named series are told apart by their container
    assert set(rec.behavior) == {
        "position",
        "heading",
        "BehavioralTimeSeries/speed",
        "acquisition/speed",
    }
    position = rec.behavior["position"]
    assert position.data.shape == (20, 2) and position.data.dtype == np.float32
    assert position.valid is None
    np.testing.assert_allclose(position.timestamps[:3], [0.0, 0.05, 0.1])
    heading = rec.behavior["heading"]
    assert heading.dim == 1 and heading.unit == "radians"
    np.testing.assert_allclose(heading.timestamps, [1.0, 1.2, 1.4, 1.6, 1.8])
    assert rec.stop == 3.0  # the acquisition series ends last
    assert list(read_nwb(path, behavior=["heading"]).behavior) == ["heading"]


def test_unknown_behavior_name_lists_available(tmp_path: Path) -> None:
    nwb = make_nwb()
    add_behavior(nwb, np.ones(5))
    expected = r"behavior: no behaviour series named \['pupil'\]; available: speed"
    with pytest.raises(RecordingError, match=expected):
        read_nwb(write(nwb, tmp_path), behavior=["pupil"])


@pytest.mark.parametrize("where", ["stimulus", "acquisition"])
def test_stimulus_frames_read_lazily_and_after_pickling(tmp_path: Path, where: str) -> None:
    nwb = make_nwb()
    (nwb.add_stimulus if where == "stimulus" else nwb.add_acquisition)(optical())
    rec = read_nwb(write(nwb, tmp_path))
    frames = rec.stimulus
    assert frames.name == "movie" and frames.frame_shape == (4, 3) and frames.n_frames == 5
    assert frames.scale == pytest.approx(1 / 255)
    assert frames.dataset.endswith("/movie/data")
    np.testing.assert_allclose(frames.timestamps, [0.2, 0.3, 0.4, 0.5, 0.6])
    np.testing.assert_allclose(frames.read(1, 3), movie()[1:3] / 255, rtol=1e-6)
    clone = pickle.loads(pickle.dumps(frames))  # as a DataLoader worker gets it: no open handle
    np.testing.assert_allclose(clone.read(3, 5), movie()[3:5] / 255, rtol=1e-6)
    assert rec.start == 0.2


def test_colour_movie_with_rate(tmp_path: Path) -> None:
    nwb = make_nwb()
    rgb = np.stack([np.zeros((2, 4, 3)), np.ones((2, 4, 3)), 2 * np.ones((2, 4, 3))], axis=-1)
    nwb.add_stimulus(ImageSeries(name="rgb", data=rgb, unit="n.a.", rate=30.0, starting_time=0.1))
    frames = read_nwb(write(nwb, tmp_path)).stimulus
    assert frames.frame_shape == (4, 3) and frames.scale == 1.0
    np.testing.assert_allclose(frames.timestamps, [0.1, 0.1 + 1 / 30])
    np.testing.assert_allclose(frames.read(0, 2), np.ones((2, 4, 3)))  # channels averaged


def test_several_stimuli_need_a_name(tmp_path: Path) -> None:
    nwb = make_nwb()
    nwb.add_stimulus(optical("movie_a"))
    nwb.add_stimulus(optical("movie_b"))
    path = write(nwb, tmp_path)
    expected = r"stimulus: 2 image series \(movie_a, movie_b\); pass stimulus="
    with pytest.raises(RecordingError, match=expected):
        read_nwb(path)
    assert read_nwb(path, stimulus="movie_b").stimulus.name == "movie_b"
    expected = r"stimulus: no image series named 'movie_c'; available: movie_a, movie_b"
    with pytest.raises(RecordingError, match=expected):
        read_nwb(path, stimulus="movie_c")


# --- refused files -------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match=r"absent\.nwb: file: does not exist"):
        read_nwb(tmp_path / "absent.nwb")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.nwb"
    path.write_text("not a recording")
    with pytest.raises(RecordingError, match="file: is not an HDF5 file"):
        read_nwb(path)


def test_plain_hdf5_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(RecordingError, match="file: is HDF5 but not NWB"):
        read_nwb(path)


def test_no_units_table(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="units: no Units table"):
        read_nwb(write(make_nwb(spikes=None), tmp_path))


def test_zero_units(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="units: the Units table has no units"):
        read_nwb(write(make_nwb(spikes=[]), tmp_path))


def test_zero_spikes_with_ophys_hint(tmp_path: Path) -> None:
    nwb = make_nwb(spikes=[[], []])
    ophys = nwb.create_processing_module("ophys", "calcium imaging")
    ophys.add(TimeSeries(name="trace", data=np.ones(3), unit="a.u.", rate=30.0))
    expected = "units: 0 spikes in total.*calcium imaging.*deconvolve"
    with pytest.raises(RecordingError, match=expected):
        read_nwb(write(nwb, tmp_path))


@pytest.mark.parametrize(
    ("spikes", "problem"),
    [
        ([[0.1, 0.2], [0.3, np.nan]], r"unit id 11: spike 1 is nan; expected finite"),
        ([[0.1, np.inf]], r"unit id 10: spike 1 is inf"),
        ([[0.1], [-0.5, 0.2]], r"unit id 11: spike 0 is -0.5 s; expected times >= 0"),
        ([[0.1, 0.3, 0.2]], r"unit id 10: spike 2 \(0.2 s\) is earlier than the spike before"),
    ],
)
def test_bad_spike_times(tmp_path: Path, spikes: list[list[float]], problem: str) -> None:
    with pytest.raises(RecordingError, match="units/spike_times: " + problem):
        read_nwb(write(make_nwb(spikes=spikes), tmp_path))


def test_external_file_stimulus(tmp_path: Path) -> None:
    nwb = make_nwb()
    video = ImageSeries(
        name="video",
        external_file=["video.mp4"],
        format="external",
        starting_frame=[0],
        num_samples=10,
        rate=30.0,
    )
    nwb.add_stimulus(video)
    expected = r"stimulus/presentation/video: frames are in external file\(s\) \['video.mp4'\]"
    with pytest.raises(RecordingError, match=expected):
        read_nwb(write(nwb, tmp_path))


def test_stimulus_without_timing(tmp_path: Path) -> None:
    nwb = make_nwb()
    nwb.add_stimulus(optical(rate=10.0))
    path = write(nwb, tmp_path)
    with h5py.File(path, "a") as f:  # pynwb cannot write this broken file itself
        del f["stimulus/presentation/movie/starting_time"]
    expected = "stimulus/presentation/movie: cannot be read by pynwb: .*'rate'"
    with pytest.raises(RecordingError, match=expected):
        read_nwb(path)


def test_stimulus_timestamps_count(tmp_path: Path) -> None:
    nwb = make_nwb()
    nwb.add_acquisition(optical())
    path = write(nwb, tmp_path)
    with h5py.File(path, "a") as f:  # pynwb refuses to build a series with too few timestamps
        del f["acquisition/movie/timestamps"]
        f["acquisition/movie/timestamps"] = [0.0, 0.1, 0.2]
    with pytest.raises(RecordingError, match="acquisition/movie/timestamps: 3 timestamps for 5"):
        read_nwb(path)


def test_behavior_timestamps_not_increasing(tmp_path: Path) -> None:
    nwb = make_nwb()
    add_behavior(nwb, np.ones(3), timestamps=[0.0, 0.2, 0.2])
    expected = (
        r"processing/behavior/BehavioralTimeSeries/speed/timestamps: timestamp 2 .*"
        "strictly increasing"
    )
    with pytest.raises(RecordingError, match=expected):
        read_nwb(write(nwb, tmp_path))


def test_invalid_nan_policy() -> None:
    expected = r"behavior_nan='drop'; expected one of \('refuse', 'interpolate', 'mask'\)"
    with pytest.raises(ValueError, match=expected):
        read_nwb(REAL_FILE, behavior_nan="drop")


# --- NaN policies --------------------------------------------------------------------


@pytest.fixture
def nan_file(tmp_path: Path) -> Path:
    """Behaviour 'xy' at 0, 1, 2, 3 s with NaN in x at 1 s and in y at 3 s."""
    nwb = make_nwb()
    xy = np.array([[0.0, 10.0], [np.nan, 20.0], [2.0, 30.0], [3.0, np.nan]])
    add_behavior(nwb, xy, name="xy", rate=1.0)
    return write(nwb, tmp_path)


def test_nan_refused_by_default(nan_file: Path) -> None:
    expected = r"BehavioralTimeSeries/xy/data: 2 NaN values \(in 2 of 4 samples\)"
    with pytest.raises(RecordingError, match=expected):
        read_nwb(nan_file)


def test_nan_interpolated(nan_file: Path) -> None:
    xy = read_nwb(nan_file, behavior_nan="interpolate").behavior["xy"]
    np.testing.assert_allclose(xy.data, [[0, 10], [1, 20], [2, 30], [3, 30]])  # held at the end
    assert xy.valid is None


def test_nan_masked(nan_file: Path) -> None:
    xy = read_nwb(nan_file, behavior_nan="mask").behavior["xy"]
    np.testing.assert_allclose(xy.data, [[0, 10], [1, 20], [2, 30], [3, 30]])
    np.testing.assert_array_equal(xy.valid, [True, False, True, False])


def test_all_nan_column_cannot_be_interpolated(tmp_path: Path) -> None:
    nwb = make_nwb()
    add_behavior(nwb, np.full(4, np.nan), name="pupil")
    expected = "BehavioralTimeSeries/pupil/data: column 0 is all NaN"
    with pytest.raises(RecordingError, match=expected):
        read_nwb(write(nwb, tmp_path), behavior_nan="interpolate")


# --- the malformed corpus (tests/corpus.py) and checked interval tables ---------------------


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_malformed_file_is_one_clear_error(case: str, tmp_path: Path) -> None:
    broken = MALFORMED[case]
    path = broken.make(tmp_path)
    with pytest.raises(RecordingError, match=broken.message) as caught:
        read_nwb(path)
    assert str(caught.value).startswith(str(path))  # the file comes first, then the field


def test_unsorted_trials_are_sorted_with_their_columns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nwb = make_nwb()
    nwb.add_trial(start_time=0.2, stop_time=0.4, type="early")  # inside trial 0 once sorted
    path = write(nwb, tmp_path)
    with pytest.raises(RecordingError, match=r"trials: trial 2 starts at 0\.2 s, before trial 0 ends at 1\.0 s"):
        read_nwb(path)
    nwb = make_nwb()
    nwb.add_trial(start_time=-1.0, stop_time=-0.5, type="before")
    with caplog.at_level("WARNING"):
        trials = read_nwb(write(nwb, tmp_path, "unsorted.nwb")).trials
    assert "not in time order; sorted" in caplog.text
    np.testing.assert_array_equal(trials.start, [-1.0, 0.0, 1.0])
    assert trials.columns["type"].tolist() == ["before", "lick left", "lick right"]


def test_overlapping_epochs_are_allowed(tmp_path: Path) -> None:
    nwb = make_nwb()
    nwb.add_epoch(start_time=0.0, stop_time=2.0)
    nwb.add_epoch(start_time=0.5, stop_time=1.0)  # nested epochs are common (a block inside a session)
    assert len(read_nwb(write(nwb, tmp_path)).intervals["epochs"]) == 2


def test_real_file_trials_pass_the_checks() -> None:
    trials = read_nwb(REAL_FILE).trials
    assert (trials.stop >= trials.start).all() and (trials.start[1:] >= trials.stop[:-1]).all()
