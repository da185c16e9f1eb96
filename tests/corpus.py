"""Test NWB files: a valid synthetic session to vary, and a corpus of malformed ones.

``MALFORMED`` lists broken files as a user might bring them, each with the field and message
the platform must name. ``tests/test_nwb_reader.py`` reads each one; ``tests/test_user_errors.py``
runs ``train.py`` on each and checks that the user sees that message, exit status 2, and no
traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from pynwb import NWBHDF5IO, NWBFile, TimeSeries
from pynwb.behavior import BehavioralTimeSeries, CompassDirection, SpatialSeries
from pynwb.file import Subject
from pynwb.misc import Units

DEFAULT_SPIKES = [[0.5, 1.0, 2.0], [1.0, 1.5], []]  # unit ids 10, 11, 12; the last one silent


def make_nwb(spikes: list[list[float]] | None = DEFAULT_SPIKES) -> NWBFile:
    """A valid session with two trials and units of the given spike times (None: no Units)."""
    nwb = NWBFile(
        session_description="synthetic session",
        identifier="synth-1",
        session_start_time=datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        experimenter=["A. Tester"],
        lab="Test lab",
        subject=Subject(subject_id="m1", species="Mus musculus", sex="F", age="P90D"),
    )
    if spikes == []:
        nwb.units = Units(name="units")  # pynwb cannot infer column dtypes of an empty table
    elif spikes:
        nwb.add_unit_column("location", "brain area")
        nwb.add_unit_column("waveform", "mean waveform")
    for i, times in enumerate(spikes or []):
        waveform = np.full(4, float(i))
        nwb.add_unit(spike_times=times, location=f"area{i}", waveform=waveform, id=10 + i)
    nwb.add_trial_column("type", "trial type")
    nwb.add_trial(start_time=0.0, stop_time=1.0, type="lick left")
    nwb.add_trial(start_time=1.0, stop_time=2.0, type="lick right")
    return nwb


def write(nwb: NWBFile, tmp_path: Path, name: str = "session.nwb") -> Path:
    path = tmp_path / name
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


def add_behavior(nwb: NWBFile, data: np.ndarray, name: str = "speed", **timing) -> None:
    """A 1-D or 2-D TimeSeries in a BehavioralTimeSeries of module 'behavior' (default 10 Hz)."""
    module = nwb.processing.get("behavior") or nwb.create_processing_module("behavior", "b")
    series = TimeSeries(name=name, data=data, unit="m/s", **(timing or {"rate": 10.0}))
    module.add(BehavioralTimeSeries(time_series=[series]))




@dataclass(frozen=True)
class Malformed:
    """A broken file: how to make it in a folder, and the ``field: problem`` the error must name."""

    make: Callable[[Path], Path]
    message: str  # a regular expression matched against the error message


def _edited(folder: Path, name: str, edit: Callable[[h5py.File], None], nwb: NWBFile | None = None) -> Path:
    """A valid session written with pynwb, then broken with h5py as some other writer might."""
    path = write(nwb or make_nwb(), folder, name)
    with h5py.File(path, "a") as f:
        edit(f)
    return path


def _text_file(folder: Path) -> Path:
    path = folder / "notes.nwb"
    path.write_text("not an NWB file")
    return path


def _plain_hdf5(folder: Path) -> Path:
    path = folder / "plain.nwb"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    return path


def _empty_units(f: h5py.File) -> None:
    for name in ("id", "spike_times", "spike_times_index", "location", "waveform"):
        attrs = dict(f["units"][name].attrs)
        dtype = f["units"][name].dtype
        shape = (0, *f["units"][name].shape[1:])
        del f["units"][name]
        f["units"].create_dataset(name, shape=shape, dtype=dtype, maxshape=(None, *shape[1:]))
        f["units"][name].attrs.update(attrs)


def _index_past_end(f: h5py.File) -> None:
    f["units/spike_times_index"][1] = 105


def _trials_with(column: str, row: int, value: float) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f[f"intervals/trials/{column}"][row] = value
    return edit


def _behavior_nan(folder: Path) -> Path:
    nwb = make_nwb()
    add_behavior(nwb, np.array([1.0, np.nan, 2.0, 3.0, 4.0]))
    return write(nwb, folder, "behavior_nan.nwb")


MALFORMED: dict[str, Malformed] = {
    "missing": Malformed(lambda d: d / "absent.nwb", r"absent\.nwb: file: does not exist"),
    "text": Malformed(_text_file, r"notes\.nwb: file: is not an HDF5 file"),
    "plain_hdf5": Malformed(_plain_hdf5, r"plain\.nwb: file: is HDF5 but not NWB"),
    "no_units": Malformed(lambda d: write(make_nwb(spikes=None), d, "no_units.nwb"), r"units: no Units table"),
    "empty_units": Malformed(lambda d: _edited(d, "empty_units.nwb", _empty_units),
                             r"units: the Units table has no units"),
    "index_past_end": Malformed(lambda d: _edited(d, "index_past_end.nwb", _index_past_end),
                                r"units/spike_times_index: points past the end of spike_times "
                                r"\(row 1: index 105 > 5 spikes\)"),
    "nan_spike": Malformed(lambda d: write(make_nwb(spikes=[[0.1, 0.2], [0.3, np.nan]]), d, "nan_spike.nwb"),
                           r"units/spike_times: unit id 11: spike 1 is nan"),
    "trial_stop_before_start": Malformed(
        lambda d: _edited(d, "stop_before_start.nwb", _trials_with("stop_time", 1, 0.5)),
        r"trials: row 1: stop_time 0\.5 s is before start_time 1\.0 s"),
    "trial_nan": Malformed(lambda d: _edited(d, "trial_nan.nwb", _trials_with("start_time", 0, np.nan)),
                           r"trials: row 0: start_time is nan"),
    "overlapping_trials": Malformed(
        lambda d: _edited(d, "overlapping_trials.nwb", _trials_with("stop_time", 0, 1.5)),
        r"trials: trial 1 starts at 1\.0 s, before trial 0 ends at 1\.5 s"),
    "behavior_nan": Malformed(_behavior_nan, r"behavior/BehavioralTimeSeries/speed/data: 1 NaN values"),
}


def head_direction_recording(path: Path, duration: float = 240.0, n_units: int = 16, seed: int = 0,
                             tracked: tuple[float, float] | None = None) -> Path:
    """A units-only session of head-direction cells, with the head direction as an angle series.

    The head turns as a random walk that wraps round many times (radians in [-pi, pi)); each unit
    fires as a Poisson process at ``2 + 25 exp(3 (cos(theta - preferred) - 1))`` Hz, its preferred
    directions spread round the circle. ``tracked=(start, stop)`` keeps the direction only over
    that part of the session (tracking lost elsewhere), as real sessions often have.
    """
    rng = np.random.default_rng(seed)
    rate_hz, dt = 50.0, 0.001
    t = np.arange(0, duration, 1 / rate_hz)
    theta = np.cumsum(rng.normal(0, 0.15, len(t)))
    fine = np.arange(0, duration, dt)
    heading = np.interp(fine, t, theta)
    preferred = np.linspace(-np.pi, np.pi, n_units, endpoint=False)
    rates = 2 + 25 * np.exp(3 * (np.cos(heading[:, None] - preferred[None]) - 1))
    spikes = rng.random(rates.shape) < rates * dt
    nwb = make_nwb(spikes=[fine[spikes[:, u]].tolist() for u in range(n_units)])
    keep = (t >= tracked[0]) & (t < tracked[1]) if tracked else np.ones(len(t), bool)
    wrapped = (theta[keep] + np.pi) % (2 * np.pi) - np.pi
    module = nwb.create_processing_module("behavior", "head direction from an overhead camera")
    module.add(CompassDirection(spatial_series=SpatialSeries(
        name="head_direction", data=wrapped, timestamps=t[keep], reference_frame="arena north", unit="radians")))
    return write(nwb, path.parent, path.name)
