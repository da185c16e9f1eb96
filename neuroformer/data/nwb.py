"""Read an NWB 2.x file into a :class:`~neuroformer.data.recording.Recording`.

Liberal in the layouts it accepts (behaviour in any container of a ``behavior``
module or in ``acquisition``, the stimulus movie in ``stimulus`` or ``acquisition``,
rate- or timestamp-based timing), strict in what it returns: every problem is a
:class:`~neuroformer.errors.RecordingError` naming the file, the field and what
was expected. Everything is read into numpy arrays while the file is open, except
the stimulus frames, which stay on disk (:class:`FrameSeries` reads them lazily).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from hdmf.build import Builder, ConstructError
from hdmf.common import DynamicTable, DynamicTableRegion, VectorIndex
from pynwb import NWBHDF5IO, NWBFile
from pynwb.base import TimeSeries as NWBTimeSeries
from pynwb.ecephys import ElectricalSeries
from pynwb.icephys import PatchClampSeries
from pynwb.image import ImageMaskSeries, ImageSeries, IndexSeries
from pynwb.misc import IntervalSeries
from pynwb.ophys import (
    DfOverF,
    Fluorescence,
    ImageSegmentation,
    OnePhotonSeries,
    RoiResponseSeries,
    TwoPhotonSeries,
)

from neuroformer.data.recording import FrameSeries, Intervals, Recording, TimeSeries, Units
from neuroformer.errors import ConfigError, RecordingError

log = logging.getLogger(__name__)

BEHAVIOR_NAN_POLICIES = ("refuse", "interpolate", "mask")

# Series found next to behaviour that are not behaviour variables: video, ephys,
# icephys, calcium traces, frame indices, on/off intervals.
_NOT_BEHAVIOR = (
    ImageSeries,
    ElectricalSeries,
    PatchClampSeries,
    RoiResponseSeries,
    IndexSeries,
    IntervalSeries,
)
# Image series that are microscopy or masks, never a stimulus movie.
_NOT_STIMULUS = (OnePhotonSeries, TwoPhotonSeries, ImageMaskSeries)
_OPHYS = (
    RoiResponseSeries,
    Fluorescence,
    DfOverF,
    ImageSegmentation,
    TwoPhotonSeries,
    OnePhotonSeries,
)
# Attributes through which NWB containers (Position, BehavioralTimeSeries...) hold their series.
_SERIES_DICTS = ("time_series", "spatial_series")
_SPIKES_EXPECTED = "expected spike times in /units/spike_times"

# A series and the groups leading to it, e.g. ("processing", "behavior", "Position", "xy").
Located = tuple[tuple[str, ...], NWBTimeSeries]


def read_nwb(
    path: str | Path,
    *,
    session_id: str | None = None,
    behavior_nan: str = "refuse",
    stimulus: str | None = None,
    behavior: list[str] | None = None,
    behavior_max_gap: float | None = None,
) -> Recording:
    """Read one NWB 2.x session.

    Args:
        path: the ``.nwb`` file.
        session_id: namespace of the unit names; defaults to the file's ``identifier``.
        behavior_nan: what to do with NaN/inf in behaviour: ``"refuse"`` (error),
            ``"interpolate"`` (linear in time from valid neighbours) or ``"mask"``
            (interpolate, and ``valid`` is False at those samples).
        stimulus: name of the image series to use as stimulus when there are several.
        behavior: names of the behaviour series to keep (default: all found).
        behavior_max_gap: behaviour samples further apart than this many seconds leave a gap
            with no value (default: ten sampling intervals); see ``TimeSeries.covered``.

    Raises:
        ConfigError: ``behavior_nan`` is not one of :data:`BEHAVIOR_NAN_POLICIES`.
        RecordingError: the file cannot be used as it is.
    """
    if behavior_nan not in BEHAVIOR_NAN_POLICIES:
        raise ConfigError(f"data.behavior_nan={behavior_nan!r}; expected one of {BEHAVIOR_NAN_POLICIES}")
    path = Path(path)
    nwb_version = _check_nwb_file(path)
    with _open_nwb(path) as nwb:
        session = session_id if session_id is not None else nwb.identifier
        with _reading(path, "units"):
            units = _read_units(nwb, path, session)
        with _reading(path, "stimulus"):
            frames = _read_stimulus(nwb, path, stimulus)
        with _reading(path, "behavior"):
            behaviour = _read_behavior(nwb, path, behavior, behavior_nan, behavior_max_gap)
        with _reading(path, "trials"):
            trials = _read_intervals(nwb.trials, path, "trials") if nwb.trials is not None else None
        with _reading(path, "intervals"):
            intervals = {name: _read_intervals(t, path, name) for name, t in _interval_tables(nwb).items()}
        with _reading(path, "metadata"):
            metadata = _metadata(nwb, nwb_version)
    start, stop = _span(units, frames, behaviour)
    return Recording(
        path=path,
        session_id=session,
        units=units,
        stimulus=frames,
        behavior=behaviour,
        trials=trials,
        intervals=intervals,
        metadata=metadata,
        start=start,
        stop=stop,
    )


# --- opening -------------------------------------------------------------------------


def _check_nwb_file(path: Path) -> str:
    """Refuse what is not an NWB 2.x file before pynwb sees it; return its ``nwb_version``."""
    expected = "expected an NWB 2.x (HDF5) file"
    if not path.exists():
        raise RecordingError(path, "file", f"does not exist; {expected}")
    if not path.is_file():
        raise RecordingError(path, "file", f"is not a file; {expected}")
    try:
        if not h5py.is_hdf5(path):
            raise RecordingError(path, "file", f"is not an HDF5 file; {expected}")
        with h5py.File(path, "r") as f:
            neurodata_type = _text(f.attrs.get("neurodata_type", ""))
            version = _text(f.attrs.get("nwb_version", ""))
            nwb1 = "nwb_version" in f  # NWB 1.x kept its version in a root dataset
            if not nwb1 and "units" in f:
                _check_units_layout(f["units"], path)
    except OSError as err:
        raise RecordingError(path, "file", f"cannot be opened as HDF5 ({err}); {expected}") from err
    if nwb1:
        raise RecordingError(path, "file", "is an NWB 1.x file; expected NWB 2.x (convert it)")
    if neurodata_type != "NWBFile" or not version:
        raise RecordingError(
            path,
            "file",
            "is HDF5 but not NWB (no neurodata_type='NWBFile' and nwb_version attributes "
            "at the root); expected an NWB 2.x file",
        )
    return version


def _check_units_layout(units: h5py.Group, path: Path) -> None:
    """Refuse a Units table pynwb would fail on with a message about its own internals.

    Checked on the raw HDF5 datasets: a table without rows, and a ``spike_times_index`` (the
    end offset of each unit's spikes in ``spike_times``) that is not one non-decreasing
    offset per unit within ``spike_times``.
    """
    if "id" in units and len(units["id"]) == 0:
        raise RecordingError(path, "units", f"the Units table has no units; {_SPIKES_EXPECTED}")
    if "spike_times_index" not in units or "spike_times" not in units:
        return
    index, n_spikes = units["spike_times_index"][()], len(units["spike_times"])
    n_units = len(units["id"]) if "id" in units else len(index)
    if len(index) != n_units:
        raise RecordingError(path, "units/spike_times_index",
                             f"{len(index)} entries for {n_units} units; expected one end offset per unit")
    beyond = np.flatnonzero(index > n_spikes)
    if len(beyond):
        row = int(beyond[0])
        raise RecordingError(path, "units/spike_times_index", f"points past the end of spike_times (row {row}: "
                             f"index {int(index[row])} > {n_spikes} spikes)")
    back = np.flatnonzero(np.diff(index) < 0)
    if len(back):
        row = int(back[0]) + 1
        raise RecordingError(path, "units/spike_times_index", f"row {row}: index {int(index[row])} is below row "
                             f"{row - 1}'s {int(index[row - 1])}; expected non-decreasing end offsets")


@contextmanager
def _open_nwb(path: Path) -> Iterator[NWBFile]:
    """The file read by pynwb, open for the duration of the block."""
    try:
        io = NWBHDF5IO(str(path), "r", load_namespaces=True)
    except Exception as err:  # pynwb/hdmf/h5py raise many types; the user needs one
        problem = f"cannot be opened by pynwb ({type(err).__name__}: {err})"
        raise RecordingError(path, "file", problem) from err
    try:
        try:
            nwb = io.read()
        except ConstructError as err:
            raise _construct_error(path, err) from err
        except Exception as err:
            problem = f"cannot be read as NWB 2.x ({type(err).__name__}: {err})"
            raise RecordingError(path, "file", problem) from err
        yield nwb
    finally:
        io.close()


def _construct_error(path: Path, err: ConstructError) -> RecordingError:
    """Name the object pynwb could not build (e.g. a series without timing), not the file."""
    builder = err.args[0] if err.args else None
    reason = err.args[1] if len(err.args) > 1 else str(err)
    field = builder.path.removeprefix("root/") if isinstance(builder, Builder) else "file"
    return RecordingError(path, field, f"cannot be read by pynwb: {reason}")


@contextmanager
def _reading(path: Path, field: str) -> Iterator[None]:
    """Turn an unexpected pynwb/h5py failure while reading ``field`` into a RecordingError."""
    try:
        yield
    except RecordingError:
        raise
    except Exception as err:
        problem = f"cannot be read ({type(err).__name__}: {err})"
        raise RecordingError(path, field, problem) from err


# --- units ---------------------------------------------------------------------------


def _read_units(nwb: NWBFile, path: Path, session_id: str) -> Units:
    """All spikes merged into one stream sorted by time, then by unit."""
    table = nwb.units
    if table is None or len(table) == 0:
        found = "no Units table" if table is None else "the Units table has 0 units"
        raise RecordingError(path, "units", f"{found}; {_SPIKES_EXPECTED}{_ophys_hint(nwb)}")
    ids = np.asarray(table.id.data[:])
    times, ends = _spike_time_column(table, path)
    if len(times) == 0:
        problem = f"0 spikes in total; {_SPIKES_EXPECTED}{_ophys_hint(nwb)}"
        raise RecordingError(path, "units", problem)
    counts = np.diff(ends, prepend=0)
    _check_spike_times(times, ends, counts, ids, path)
    owner = np.repeat(np.arange(len(ids), dtype=np.int64), counts)
    order = np.lexsort((owner, times))
    return Units(
        spike_times=times[order],
        spike_units=owner[order],
        names=[f"{session_id}/{_text(uid)}" for uid in ids],
        columns=_table_columns(table, exclude={"spike_times"}),
    )


def _ophys_hint(nwb: NWBFile) -> str:
    """Advice for calcium-imaging files, which carry no spikes of their own."""
    ophys = any(name.lower() == "ophys" for name in nwb.processing) or any(
        isinstance(obj, _OPHYS) for obj in nwb.objects.values()
    )
    if not ophys:
        return ""
    return (
        ". This file holds optical physiology (calcium imaging) data, which is not supported "
        "directly: deconvolve it to spike events and store them in a Units table first"
    )


def _spike_time_column(table: DynamicTable, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ragged ``spike_times`` column: (n_spikes,) float64 times, (n_units,) end offsets."""
    index = next(
        (c for c in table.columns if isinstance(c, VectorIndex) and c.target.name == "spike_times"),
        None,
    )
    if index is None:
        problem = "missing; expected a ragged spike_times column (with spike_times_index)"
        raise RecordingError(path, "units/spike_times", problem)
    times = np.asarray(index.target.data[:], dtype=np.float64)
    return times, np.asarray(index.data[:], dtype=np.int64)


def _check_spike_times(
    times: np.ndarray, ends: np.ndarray, counts: np.ndarray, ids: np.ndarray, path: Path
) -> None:
    """Refuse non-finite, negative or (within a unit) unsorted spike times, naming the first."""
    starts = ends - counts
    earlier = np.zeros(len(times), dtype=bool)
    earlier[1:] = times[1:] < times[:-1]
    earlier[starts[counts > 0]] = False  # a unit's first spike may precede the last unit's last
    checks = (
        (~np.isfinite(times), "is {value}; expected finite times in seconds"),
        (times < 0, "is {value} s; expected times >= 0 (seconds from timestamps_reference_time)"),
        (
            earlier,
            "({value} s) is earlier than the spike before it; "
            "expected each unit's spike times sorted ascending",
        ),
    )
    for bad, problem in checks:
        if bad.any():
            first = int(np.argmax(bad))
            unit = int(np.searchsorted(ends, first, side="right"))
            where = f"unit id {_text(ids[unit])}: spike {first - starts[unit]} "
            raise RecordingError(
                path, "units/spike_times", where + problem.format(value=times[first])
            )


# --- tables --------------------------------------------------------------------------


def _table_columns(table: DynamicTable, exclude: set[str]) -> dict[str, np.ndarray]:
    """Every plain column, as an array whose first axis has one entry per row.

    Ragged columns, references to other tables/objects and compound columns are
    skipped: they have no fixed-shape array form.
    """
    ragged = {c.target.name for c in table.columns if isinstance(c, VectorIndex)}
    columns = {}
    for column in table.columns:
        if (
            column.name in exclude
            or column.name in ragged
            or isinstance(column, (VectorIndex, DynamicTableRegion))
        ):
            continue
        values = _plain_array(column.data[:])
        if values is not None and len(values) == len(table):
            columns[column.name] = values
    return columns


def _plain_array(values: Any) -> np.ndarray | None:
    """Numbers, booleans or strings as a numpy array (bytes decoded); None for anything else."""
    array = np.asarray(values)
    if array.dtype.names is not None:
        return None
    if array.dtype.kind == "S":
        return np.char.decode(array, "utf-8")
    if array.dtype.kind == "O":
        flat = array.ravel()
        if not all(isinstance(v, (str, bytes)) for v in flat):
            return None
        return np.array([_text(v) for v in flat], dtype=str).reshape(array.shape)
    return array


def _read_intervals(table: DynamicTable, path: Path, name: str) -> Intervals:
    """An interval table (trials, epochs...) with its plain columns, checked.

    Refused, naming the table and row: a NaN or infinite bound, a stop before its start, and
    for trials, a trial that starts before the previous one ends (overlapping trials). Rows
    out of time order are sorted by start time with a logged warning (harmless: every row
    keeps its columns).
    """
    intervals = Intervals(
        start=np.asarray(table["start_time"].data[:], dtype=np.float64),
        stop=np.asarray(table["stop_time"].data[:], dtype=np.float64),
        columns=_table_columns(table, exclude={"start_time", "stop_time"}),
    )
    field = name if name == "trials" else f"intervals/{name}"
    start, stop = intervals.start, intervals.stop
    for bad, problem in ((~np.isfinite(start), "start_time is {start}"), (~np.isfinite(stop), "stop_time is {stop}"),
                         (stop < start, "stop_time {stop} s is before start_time {start} s")):
        if bad.any():
            row = int(np.argmax(bad))
            raise RecordingError(path, field, f"row {row}: " + problem.format(start=start[row], stop=stop[row])
                                 + "; expected finite times with start_time <= stop_time")
    order = np.argsort(start, kind="stable")
    if (np.diff(start) < 0).any():
        log.warning("%s: %s: rows are not in time order; sorted by start_time", path, field)
        intervals = Intervals(start[order], stop[order], {k: v[order] for k, v in intervals.columns.items()})
    if name == "trials":
        overlap = np.flatnonzero(intervals.start[1:] < intervals.stop[:-1])
        if len(overlap):
            k = int(overlap[0])
            raise RecordingError(path, field, f"trial {order[k + 1]} starts at {intervals.start[k + 1]} s, before "
                                 f"trial {order[k]} ends at {intervals.stop[k]} s; expected trials that do not overlap")
    return intervals


def _interval_tables(nwb: NWBFile) -> dict[str, DynamicTable]:
    """Every interval table but trials, by name (pynwb versions differ on where epochs live)."""
    tables = {"epochs": nwb.epochs, "invalid_times": nwb.invalid_times, **nwb.intervals}
    return {name: t for name, t in tables.items() if t is not None and t is not nwb.trials}


# --- stimulus ------------------------------------------------------------------------


def _read_stimulus(nwb: NWBFile, path: Path, name: str | None) -> FrameSeries | None:
    """The one image series in ``stimulus`` (else in ``acquisition``), or the one named."""
    presented = _image_series(nwb.stimulus, "stimulus/presentation")
    acquired = _image_series(nwb.acquisition, "acquisition")
    if name is not None:
        candidates = {**acquired, **presented}
        if name not in candidates:
            available = ", ".join(sorted(candidates)) or "none"
            problem = f"no image series named {name!r}; available: {available}"
            raise RecordingError(path, "stimulus", problem)
        field, series = candidates[name]
    else:
        pool = presented or acquired
        if not pool:
            return None
        if len(pool) > 1:
            names = ", ".join(sorted(pool))
            problem = f"{len(pool)} image series ({names}); pass stimulus=<name> to choose one"
            raise RecordingError(path, "stimulus", problem)
        field, series = next(iter(pool.values()))
    return _frame_series(series, field, path)


def _image_series(group: dict[str, Any], prefix: str) -> dict[str, tuple[str, ImageSeries]]:
    """Image series of a group that can be a stimulus movie, by name, with their NWB path."""
    return {
        name: (f"{prefix}/{name}", obj)
        for name, obj in group.items()
        if isinstance(obj, ImageSeries) and not isinstance(obj, _NOT_STIMULUS)
    }


def _frame_series(series: ImageSeries, field: str, path: Path) -> FrameSeries:
    """Lazy frames of an image series whose data is stored in the file."""
    if series.external_file is not None:
        files = [_text(f) for f in series.external_file[:]]
        problem = f"frames are in external file(s) {files}; expected them in {field}/data"
        raise RecordingError(path, field, problem)
    data = series.data
    if (
        not isinstance(data, h5py.Dataset)
        or data.ndim not in (3, 4)
        or data.dtype.kind not in "biuf"
        or data.shape[0] == 0
    ):
        shape, dtype = getattr(data, "shape", None), getattr(data, "dtype", type(data).__name__)
        problem = (
            f"shape {shape}, dtype {dtype}; expected numeric frames "
            "(frames, height, width[, channels]), at least one"
        )
        raise RecordingError(path, f"{field}/data", problem)
    timestamps = _sample_times(series, data.shape[0], path, field)
    _check_increasing(timestamps, path, field, strict=False)
    return FrameSeries(
        path=Path(data.file.filename).resolve(),  # the file really holding them (external links)
        dataset=data.name,
        timestamps=timestamps,
        frame_shape=(int(data.shape[1]), int(data.shape[2])),
        name=series.name,
        scale=1 / 255 if data.dtype == np.uint8 else 1.0,
    )


# --- behaviour -----------------------------------------------------------------------


def _read_behavior(
    nwb: NWBFile, path: Path, keep: list[str] | None, policy: str, max_gap: float | None
) -> dict[str, TimeSeries]:
    """Behaviour variables by name, only those in ``keep`` when given."""
    found = _unique_names(_behavior_series(nwb))
    if keep is not None:
        missing = [name for name in keep if name not in found]
        if missing:
            available = ", ".join(sorted(found)) or "none"
            problem = f"no behaviour series named {missing}; available: {available}"
            raise RecordingError(path, "behavior", problem)
        found = {name: found[name] for name in keep}
    return {
        name: _time_series(name, series, field, path, policy, max_gap)
        for name, (field, series) in found.items()
    }


def _behavior_series(nwb: NWBFile) -> list[Located]:
    """Behaviour series of each ``behavior`` processing module (any case) and of acquisition."""
    located = []
    for module_name, module in nwb.processing.items():
        if module_name.lower() == "behavior":
            located += _walk(module.data_interfaces, ("processing", module_name))
    located += _walk(nwb.acquisition, ("acquisition",))
    return [(where, series) for where, series in located if _is_behavior_variable(series)]


def _walk(group: dict[str, Any], prefix: tuple[str, ...]) -> list[Located]:
    """Bare series of a group, and those held by its containers (Position, PupilTracking...)."""
    located = []
    for name, obj in group.items():
        if isinstance(obj, NWBTimeSeries):
            located.append((prefix + (name,), obj))
            continue
        for attr in _SERIES_DICTS:
            held = getattr(obj, attr, None)
            if isinstance(held, dict):
                located += [
                    (prefix + (name, inner), series)
                    for inner, series in held.items()
                    if isinstance(series, NWBTimeSeries)
                ]
    return located


def _is_behavior_variable(series: NWBTimeSeries) -> bool:
    """A non-empty 1-D or 2-D numeric series that is not video, ephys or imaging."""
    data = series.data
    shape, dtype = getattr(data, "shape", None), getattr(data, "dtype", None)
    return (
        not isinstance(series, _NOT_BEHAVIOR)
        and shape is not None
        and len(shape) in (1, 2)
        and shape[0] > 0
        and dtype is not None
        and dtype.kind in "biuf"
    )


def _unique_names(located: list[Located]) -> dict[str, tuple[str, NWBTimeSeries]]:
    """Name each series by the shortest tail of its NWB path that no other series shares.

    Usually the series' own name; ``"<container>/<name>"`` when two series share a
    name. Values are (full NWB path, series).
    """
    named = {}
    for where, series in located:
        for k in range(1, len(where) + 1):
            if sum(other[-k:] == where[-k:] for other, _ in located) == 1:
                break
        named["/".join(where[-k:])] = ("/".join(where), series)
    return named


def _time_series(
    name: str, series: NWBTimeSeries, field: str, path: Path, policy: str, max_gap: float | None
) -> TimeSeries:
    """One behaviour variable as (n, d) float32 in physical units, NaN handled by ``policy``."""
    raw = np.asarray(series.data[:], dtype=np.float64)
    values = (raw * series.conversion + series.offset).reshape(len(raw), -1)
    timestamps = _sample_times(series, len(values), path, field)
    _check_increasing(timestamps, path, field, strict=True)
    values, valid = _apply_nan_policy(values, timestamps, policy, path, field)
    return TimeSeries(
        name=name,
        timestamps=timestamps,
        data=values.astype(np.float32),
        unit=series.unit or "",
        valid=valid,
        max_gap=max_gap,
    )


def _apply_nan_policy(
    values: np.ndarray, timestamps: np.ndarray, policy: str, path: Path, field: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, d) values with NaN/inf refused or interpolated in time; (n,) valid under "mask"."""
    missing = ~np.isfinite(values)
    if missing.any() and policy == "refuse":
        rows = int(missing.any(axis=1).sum())
        problem = (
            f"{int(missing.sum())} NaN values (in {rows} of {len(values)} samples); pass "
            "behavior_nan='interpolate' or 'mask', or leave this series out with behavior=[...]"
        )
        raise RecordingError(path, f"{field}/data", problem)
    filled = values.copy()
    for k in np.flatnonzero(missing.any(axis=0)):
        gap = missing[:, k]
        if gap.all():
            problem = f"column {k} is all NaN; nothing to interpolate from"
            raise RecordingError(path, f"{field}/data", problem)
        filled[gap, k] = np.interp(timestamps[gap], timestamps[~gap], values[~gap, k])
    valid = ~missing.any(axis=1) if policy == "mask" else None
    return filled, valid


# --- timing --------------------------------------------------------------------------


def _sample_times(series: NWBTimeSeries, n: int, path: Path, field: str) -> np.ndarray:
    """(n,) float64 time of each sample, from ``timestamps`` or ``starting_time + i / rate``."""
    if series.timestamps is not None:
        timestamps = np.asarray(series.timestamps[:], dtype=np.float64)
        if len(timestamps) != n:
            problem = f"{len(timestamps)} timestamps for {n} samples in data; expected one each"
            raise RecordingError(path, f"{field}/timestamps", problem)
        return timestamps
    if not (series.rate and series.rate > 0):  # pynwb itself refuses a series with neither
        problem = f"rate is {series.rate} Hz; expected timestamps, or a rate > 0 Hz"
        raise RecordingError(path, field, problem)
    return (series.starting_time or 0.0) + np.arange(n) / series.rate


def _check_increasing(timestamps: np.ndarray, path: Path, field: str, strict: bool) -> None:
    """Refuse non-finite timestamps, and ones that go back (or, if ``strict``, repeat)."""
    field = f"{field}/timestamps"
    finite = np.isfinite(timestamps)
    if not finite.all():
        first = int(np.argmax(~finite))
        problem = f"timestamp {first} is {timestamps[first]}; expected finite times"
        raise RecordingError(path, field, problem)
    steps = np.diff(timestamps)
    bad = steps <= 0 if strict else steps < 0
    if bad.any():
        i = int(np.argmax(bad)) + 1
        expected = "strictly increasing" if strict else "non-decreasing"
        problem = (
            f"timestamp {i} ({timestamps[i]} s) does not follow timestamp {i - 1} "
            f"({timestamps[i - 1]} s); expected {expected} times"
        )
        raise RecordingError(path, field, problem)


# --- session -------------------------------------------------------------------------


def _metadata(nwb: NWBFile, nwb_version: str) -> dict[str, Any]:
    """Session-level fields; optional ones only where the file has them."""
    metadata: dict[str, Any] = {
        "identifier": nwb.identifier,
        "session_description": nwb.session_description,
        "session_start_time": nwb.session_start_time.isoformat(),
        "nwb_version": nwb_version,
    }
    experimenter = nwb.experimenter
    optional = {
        "experimenter": [_text(e) for e in experimenter] if experimenter is not None else None,
        "institution": nwb.institution,
        "lab": nwb.lab,
    }
    if nwb.subject is not None:
        fields = ("subject_id", "species", "sex", "age")
        optional.update({f: getattr(nwb.subject, f, None) for f in fields})
    metadata.update({key: value for key, value in optional.items() if value is not None})
    return metadata


def _span(
    units: Units, frames: FrameSeries | None, behavior: dict[str, TimeSeries]
) -> tuple[float, float]:
    """(first, last) time covered by spikes, frames and behaviour, seconds."""
    series = [units.spike_times] + ([frames.timestamps] if frames is not None else [])
    series += [s.timestamps for s in behavior.values()]
    return float(min(t[0] for t in series)), float(max(t[-1] for t in series))


def _text(value: Any) -> str:
    """A str from an HDF5 attribute or value that may be bytes."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
