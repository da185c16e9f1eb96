"""A recording as typed, time-indexed data.

Everything is indexed by time in seconds (the NWB file's own clock), never by
sample number: spikes are event times, the stimulus and behaviour are series
with their own timestamps, and trials/epochs are intervals. Stimulus frames are
read lazily from the HDF5 file, a slice at a time, so a long movie never has to
fit in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np


@dataclass(frozen=True)
class Units:
    """Spikes of all units of one session, merged into one time-sorted stream.

    Attributes:
        spike_times: (n_spikes,) float64 seconds, sorted ascending (ties by unit).
        spike_units: (n_spikes,) int64 index into ``names``.
        names: (n_units,) unit names namespaced by session, ``"<session>/<unit id>"``.
        columns: extra per-unit columns of the Units table (e.g. ``location``,
            ``cell_type``), each an array whose first axis has length n_units.
    """

    spike_times: np.ndarray
    spike_units: np.ndarray
    names: list[str]
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return len(self.names)

    def spikes_of(self, unit: int) -> np.ndarray:
        """(n,) spike times of one unit, sorted."""
        return self.spike_times[self.spike_units == unit]


@dataclass
class FrameSeries:
    """Stimulus frames that stay on disk until a slice is asked for.

    Attributes:
        path: NWB (HDF5) file holding the frames.
        dataset: HDF5 path of the ``data`` dataset, e.g. ``/stimulus/presentation/movie/data``.
        timestamps: (n_frames,) float64 onset time of each frame, seconds.
        frame_shape: (height, width) of one frame.
        name: the series' name in the file.
    """

    path: Path
    dataset: str
    timestamps: np.ndarray
    frame_shape: tuple[int, int]
    name: str = "stimulus"
    scale: float = 1.0
    _handle: Any = field(default=None, repr=False, compare=False)
    _pid: int = field(default=-1, repr=False, compare=False)

    @property
    def n_frames(self) -> int:
        return len(self.timestamps)

    def _data(self) -> h5py.Dataset:
        # One handle per process: h5py handles must not cross a fork (DataLoader workers). The
        # dataset object is kept too: looking it up by path costs as much as a small read.
        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.path, "r")[self.dataset]
            self._pid = os.getpid()
        return self._handle

    def _as_frames(self, raw: np.ndarray) -> np.ndarray:
        frames = np.asarray(raw, dtype=np.float32)
        if frames.ndim == 4:  # (T, H, W, C) colour movie: average the channels
            frames = frames.mean(axis=-1)
        return frames * self.scale

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start..stop-1`` as (stop-start, H, W) float32 (one HDF5 slice read)."""
        return self._as_frames(self._data()[start:stop])

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Frames at ``indices`` (any shape, order and repeats; each in ``0..n_frames-1``) as
        (*indices.shape, H, W) float32.

        The distinct frames are read as runs of consecutive indices, one HDF5 slice each (a
        batch's windows overlap or not at all; h5py's point selection is slower than slices).
        """
        unique, inverse = np.unique(indices, return_inverse=True)
        breaks = np.flatnonzero(np.diff(unique) > 1) + 1
        data = self._data()
        raw = np.concatenate([data[run[0] : run[-1] + 1] for run in np.split(unique, breaks)])
        return self._as_frames(raw)[inverse.reshape(indices.shape)]

    def index_at(self, times: np.ndarray) -> np.ndarray:
        """Index of the frame on screen at each time (-1 before the first frame)."""
        return np.searchsorted(self.timestamps, times, side="right") - 1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, -1
        return state


@dataclass(frozen=True)
class TimeSeries:
    """A behaviour variable sampled at known times, possibly only over part of the session.

    Attributes:
        name: the series' name (``"running_speed"``, ``"position"``...).
        timestamps: (n,) float64 seconds, ascending.
        data: (n, d) float32 values; ``d`` is 1 for a scalar variable.
        unit: physical unit from the file, if any.
        valid: (n,) bool, False where the file had NaN and the policy was ``mask``.
        max_gap: samples further apart than this (seconds) leave a gap without values; None:
            ten times the median sampling interval.
    """

    name: str
    timestamps: np.ndarray
    data: np.ndarray
    unit: str = ""
    valid: np.ndarray | None = None
    max_gap: float | None = None

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    @property
    def sampling_interval(self) -> float:
        """Median time between samples, seconds (inf for a single sample)."""
        return float(np.median(np.diff(self.timestamps))) if len(self.timestamps) > 1 else float("inf")

    def covered(self, times: np.ndarray) -> np.ndarray:
        """(len(times),) bool: True where the series has a value.

        A time is covered when it lies between two consecutive valid samples no more than
        ``max_gap`` apart, or within one sampling interval after the last valid sample (the
        last sample stands for its own interval). Before the first sample, after the last one
        and inside longer gaps (e.g. tracking paused during sleep) there is no value.
        """
        times = np.asarray(times, dtype=np.float64)
        keep = self.valid if self.valid is not None else np.ones(len(self.timestamps), bool)
        t = self.timestamps[keep]
        if not len(t):
            return np.zeros(len(times), bool)
        step = self.sampling_interval
        max_gap = self.max_gap if self.max_gap is not None else 10 * step
        k = np.searchsorted(t, times, side="right") - 1  # last valid sample at or before each time
        after = t[np.minimum(k + 1, len(t) - 1)]
        inside = (k >= 0) & (k + 1 < len(t)) & (after - t[np.maximum(k, 0)] <= max_gap)
        on_last = (k == len(t) - 1) & (times <= t[-1] + min(step, max_gap))
        return inside | on_last

    def at(self, times: np.ndarray) -> np.ndarray:
        """(len(times), d) values linearly interpolated at ``times``; NaN where not ``covered``."""
        values = np.stack(
            [np.interp(times, self.timestamps, self.data[:, k]) for k in range(self.dim)], axis=-1
        ).astype(np.float32)
        values[~self.covered(times)] = np.nan
        return values


@dataclass(frozen=True)
class Intervals:
    """An interval table (trials, epochs...): start/stop times plus any columns.

    Attributes:
        start: (n,) float64 seconds.
        stop: (n,) float64 seconds.
        columns: each (n,) array, e.g. ``type`` or ``response`` of each trial.
    """

    start: np.ndarray
    stop: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.start)

    def containing(self, times: np.ndarray) -> np.ndarray:
        """(n,) row of the interval with ``start <= t < stop`` for each time, -1 where there is none.

        Where intervals overlap, the one that started last is asked; that is exact for
        intervals that do not overlap or that end in the order they start (windows of one length).
        """
        times = np.asarray(times, dtype=np.float64)
        if not len(self):
            return np.full(len(times), -1, dtype=np.int64)
        order = np.argsort(self.start, kind="stable")
        k = np.searchsorted(self.start[order], times, side="right") - 1
        row = order[np.maximum(k, 0)]
        return np.where((k >= 0) & (times < self.stop[row]), row, -1)


@dataclass
class Recording:
    """One session: spikes, optional stimulus frames, behaviour, trials and metadata.

    Attributes:
        path: the NWB file it was read from.
        session_id: namespace for this session's unit names.
        units: spikes of every unit.
        stimulus: lazily read frames, or None for a units-only recording.
        behavior: behaviour variables by name (may be empty).
        trials: the trials table, or None.
        intervals: every other interval table by name (epochs, invalid_times...).
        metadata: session-level fields (identifier, description, subject...).
        start: first time covered by data, seconds.
        stop: last time covered by data, seconds.
    """

    path: Path
    session_id: str
    units: Units
    stimulus: FrameSeries | None = None
    behavior: dict[str, TimeSeries] = field(default_factory=dict)
    trials: Intervals | None = None
    intervals: dict[str, Intervals] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    start: float = 0.0
    stop: float = 0.0

    @property
    def duration(self) -> float:
        return self.stop - self.start
