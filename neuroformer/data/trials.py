"""Trial-aligned tensors from an NWB recording with trials, units and continuous behaviour.

Each trial becomes a window of ``n_bins`` time bins around one of its events (``align_to``,
by default the go cue), with

- **inputs**: the trial's target (its ``target`` columns, e.g. x and y) from the target's
  onset until the go cue, and a go-cue pulse; each bin holds the fraction of it the input
  is on, so the inputs do not depend on where bin edges fall;
- **behaviour**: the named behaviour series (e.g. EMG) at bin centres;
- **spike counts** of the *recorded* units only: a seeded subset of the file's units
  (``record_fraction`` or ``record_count``); the others are the neurons "never recorded"
  that evaluation predicts (docs/sparse_rnn.md);
- the trial's **condition** (its ``condition`` column, e.g. the reach direction).

Splits are by trial: every trial of the ``test_conditions`` is held out (generalisation to
new conditions); of the other conditions, a seeded ``val_fraction`` of each condition's
trials validates and the rest train. Normalisation statistics come from training trials.
With no file configured, the simulated reaching session (``data/simulate_reaching.py``) is
generated on first use and cached. Any recording with such trials works by naming its columns.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from neuroformer.data.base import SplitDataModule
from neuroformer.data.recording import Recording
from neuroformer.data.simulate_reaching import ReachingConfig, simulate_reaching
from neuroformer.data.source import DataSource
from neuroformer.errors import NeuroformerError, RecordingError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TrialSpec:
    """Everything that turns a recording into a trial model's tensors; saved with the model.

    Attributes:
        source: the recording and the reader options it is read with.
        align_to: trials column of the event each window is aligned to, seconds.
        window: (start, stop) of the window relative to that event, seconds.
        bin_size: time bin, seconds (the RNN's time step).
        condition: trials column naming each trial's condition.
        target: trials columns of the target input (held from ``target_on`` to ``go_cue``).
        target_on: trials column of the target's onset, seconds.
        go_cue: trials column of the go cue (a pulse input; it also ends the target input),
            or None: no go input, the target is held to the end of the window.
        go_pulse: length of the go-cue pulse, seconds.
        behavior: behaviour series that are the outputs, concatenated in this order.
        behavior_mean, behavior_std: (O,) per output channel, over training trials.
        recorded: names of the recorded units (``Recording.units.names``), the model's
            designated neurons in this order.
        unit_mean_count: (K,) mean spike count per bin of each recorded unit, training trials.
        conditions: every condition value in the file, sorted (a trial's condition index
            points here).
        test_conditions: conditions held out of training and validation.
    """

    source: DataSource
    align_to: str = "go_cue_time"
    window: tuple[float, float] = (-0.6, 0.9)
    bin_size: float = 0.02
    condition: str = "condition"
    target: tuple[str, ...] = ("target_x", "target_y")
    target_on: str = "target_on_time"
    go_cue: str | None = "go_cue_time"
    go_pulse: float = 0.05
    behavior: tuple[str, ...] = ("emg",)
    behavior_mean: tuple[float, ...] = ()
    behavior_std: tuple[float, ...] = ()
    recorded: tuple[str, ...] = ()
    unit_mean_count: tuple[float, ...] = ()
    conditions: tuple = ()
    test_conditions: tuple = ()

    @property
    def n_bins(self) -> int:
        return int(round((self.window[1] - self.window[0]) / self.bin_size))

    @property
    def n_inputs(self) -> int:
        return len(self.target) + (self.go_cue is not None)

    @property
    def n_outputs(self) -> int:
        return len(self.behavior_mean)

    @property
    def n_recorded(self) -> int:
        return len(self.recorded)

    def bin_times(self) -> np.ndarray:
        """(n_bins,) centre of each bin relative to ``align_to``, seconds."""
        return self.window[0] + (np.arange(self.n_bins) + 0.5) * self.bin_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["source"] = self.source.to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> TrialSpec:
        d = dict(d)
        d["source"] = DataSource.from_dict(d["source"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class TrialData(NamedTuple):
    """Trial-aligned arrays of one recording (numpy; ``n`` trials, ``T`` bins).

    Attributes:
        inputs: (n, T, I) float32 input channels.
        behavior: (n, T, O) float32 outputs in the data's units.
        counts: (n, T, K) float32 spike counts of the chosen units.
        condition: (n,) int64 index into ``spec.conditions``.
        target: (n, len(spec.target)) float32 the trial's target values.
        trial: (n,) int64 row of each trial in the trials table.
    """

    inputs: np.ndarray
    behavior: np.ndarray
    counts: np.ndarray
    condition: np.ndarray
    target: np.ndarray
    trial: np.ndarray

    def subset(self, index: np.ndarray) -> TrialData:
        return TrialData(*(a[index] for a in self))


class TrialBatch(NamedTuple):
    """A batch of trials as tensors: fields as :class:`TrialData`, ``B`` trials."""

    inputs: torch.Tensor
    behavior: torch.Tensor
    counts: torch.Tensor
    condition: torch.Tensor
    target: torch.Tensor
    trial: torch.Tensor


class TrialDataset(Dataset):
    """Trials of one split; ``__getitems__`` returns a whole :class:`TrialBatch`."""

    def __init__(self, data: TrialData):
        self.data = TrialBatch(*(torch.from_numpy(a) for a in data))

    def __len__(self) -> int:
        return len(self.data.trial)

    def __getitems__(self, index: list[int]) -> TrialBatch:
        return TrialBatch(*(a[index] for a in self.data))


# --------------------------------------------------------------------------- reading


def _column(rec: Recording, name: str, option: str) -> np.ndarray:
    """(n_trials,) values of a trials column, or a RecordingError naming it and the option."""
    if rec.trials is None:
        raise RecordingError(rec.path, "trials", "missing; expected a trials table (one row per trial) "
                             "with condition, target, target-onset and go-cue columns")
    if name in ("start_time", "stop_time"):
        return rec.trials.start if name == "start_time" else rec.trials.stop
    if name not in rec.trials.columns:
        problem = (f"no such column (data.{option}={name!r}); the trials table has "
                   f"{['start_time', 'stop_time', *sorted(rec.trials.columns)]}")
        raise RecordingError(rec.path, f"trials/{name}", problem)
    return rec.trials.columns[name]


def _numeric(rec: Recording, name: str, option: str) -> np.ndarray:
    values = _column(rec, name, option)
    if values.dtype.kind not in "biuf":
        raise RecordingError(rec.path, f"trials/{name}", f"has {values.dtype} values; expected numbers")
    return values.astype(np.float64)


def _coverage(edges: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """(n, T) fraction of each bin ``[edges[:, t], edges[:, t + 1])`` inside ``[start, stop)``."""
    lo = np.maximum(edges[:, :-1], start[:, None])
    hi = np.minimum(edges[:, 1:], stop[:, None])
    return np.clip(hi - lo, 0, None) / np.diff(edges, axis=1)


def _counts(rec: Recording, units: list[int], edges: np.ndarray) -> np.ndarray:
    """(n, T, K) spike counts of ``units`` in the bins ``edges`` (n, T + 1)."""
    counts = np.zeros((len(edges), edges.shape[1] - 1, len(units)), np.float32)
    order = np.argsort(rec.units.spike_units, kind="stable")  # keeps each unit's times sorted
    ends = np.cumsum(np.bincount(rec.units.spike_units, minlength=rec.units.n_units))
    starts = np.concatenate([[0], ends[:-1]])
    times = rec.units.spike_times[order]
    for k, u in enumerate(units):
        own = times[starts[u]:ends[u]]
        counts[:, :, k] = np.diff(np.searchsorted(own, edges, side="left"), axis=1)
    return counts


def trial_data(rec: Recording, spec: TrialSpec, units: list[str] | None = None) -> TrialData:
    """The trials of ``rec`` as aligned arrays (trials missing a needed value are left out).

    Args:
        rec: the recording (``spec.source.read()``).
        spec: windows, columns and behaviour (normalisation and condition lists may be empty).
        units: names of the units to count (default: ``spec.recorded``).

    Raises:
        RecordingError: a column, behaviour series or unit is missing, a trial's window lies
            outside the behaviour's samples, or no trial has every value.
    """
    align = _numeric(rec, spec.align_to, "align_to")
    on = _numeric(rec, spec.target_on, "target_on")
    targets = np.stack([_numeric(rec, c, "target") for c in spec.target], axis=1)
    go = _numeric(rec, spec.go_cue, "go_cue") if spec.go_cue else np.full(len(align), np.inf)
    conditions = _column(rec, spec.condition, "condition")
    needed = [align, on, *targets.T] + ([go] if spec.go_cue else [])
    keep = np.flatnonzero(np.all(np.isfinite(needed), axis=0))
    if len(keep) == 0:
        raise RecordingError(rec.path, "trials", f"no trial has finite {spec.align_to}, {spec.target_on}, "
                             f"{', '.join(spec.target)}" + (f" and {spec.go_cue}" if spec.go_cue else ""))
    if len(keep) < len(align):
        log.info("%s: %d of %d trials lack a needed value and are left out", rec.path, len(align) - len(keep),
                 len(align))
    align, on, targets, go = align[keep], on[keep], targets[keep], go[keep]

    edges = align[:, None] + spec.window[0] + np.arange(spec.n_bins + 1) * spec.bin_size  # (n, T + 1)
    held = _coverage(edges, on, go)  # target on from its onset to the go cue
    inputs = [held[..., None] * targets[:, None, :]]
    if spec.go_cue:
        inputs.append(_coverage(edges, go, go + spec.go_pulse)[..., None])

    centres = 0.5 * (edges[:, :-1] + edges[:, 1:])
    behavior = []
    for name in spec.behavior:
        if name not in rec.behavior:
            raise RecordingError(rec.path, f"behavior/{name}",
                                 f"not found (data.behavior); the file has {sorted(rec.behavior)}")
        series = rec.behavior[name]
        outside = (edges[:, 0] < series.timestamps[0]) | (edges[:, -1] > series.timestamps[-1])
        if outside.any():
            i = int(np.argmax(outside))
            raise RecordingError(rec.path, f"behavior/{name}", (
                f"trial {keep[i]}: its window [{edges[i, 0]:.3f}, {edges[i, -1]:.3f}] s lies outside the "
                f"series' samples [{series.timestamps[0]:.3f}, {series.timestamps[-1]:.3f}] s"))
        behavior.append(series.at(centres.ravel()).reshape(*centres.shape, -1))

    names = list(spec.recorded if units is None else units)
    index = {n: i for i, n in enumerate(rec.units.names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise RecordingError(rec.path, "units", f"{len(missing)} of the {len(names)} units asked for are not in "
                             f"this file (e.g. {missing[0]!r}); it has {rec.units.n_units} units")
    known = {v: i for i, v in enumerate(spec.conditions)}
    return TrialData(
        inputs=np.concatenate(inputs, axis=-1).astype(np.float32),
        behavior=np.concatenate(behavior, axis=-1).astype(np.float32),
        counts=_counts(rec, [index[n] for n in names], edges),
        condition=np.array([known.get(v.item() if hasattr(v, "item") else v, -1) for v in conditions[keep]],
                           np.int64),
        target=targets.astype(np.float32),
        trial=keep.astype(np.int64),
    )


def choose_recorded(rec: Recording, fraction: float, count: int | None, seed: int) -> tuple[str, ...]:
    """Names of the recorded units: ``count`` (or ``round(fraction * n)``) drawn with ``seed``.

    The same seed draws nested subsets: the units recorded at 5% are among those at 10%.
    """
    n_units = rec.units.n_units
    k = count if count is not None else int(round(fraction * n_units))
    if not 0 <= k <= n_units:
        asked = f"record_count={count}" if count is not None else f"record_fraction={fraction}"
        raise RecordingError(rec.path, "units", f"{asked} asks for {k} units; the file has {n_units}")
    chosen = np.sort(np.random.default_rng(seed).permutation(n_units)[:k])
    return tuple(rec.units.names[i] for i in chosen)


def split_trials(condition: np.ndarray, test: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Trial indices of each split: all trials of ``test`` conditions; ``val_fraction`` of each other.

    Args:
        condition: (n,) condition index of each trial. test: condition indices held out.
    """
    rng = np.random.default_rng(seed)
    splits: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(condition):
        trials = np.flatnonzero(condition == c)
        if np.isin(c, test):
            splits["test"].append(trials)
            continue
        trials = rng.permutation(trials)
        n_val = int(round(val_fraction * len(trials))) if val_fraction > 0 else 0
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(trials) - 1)
        splits["val"].append(np.sort(trials[:n_val]))
        splits["train"].append(np.sort(trials[n_val:]))
    return {s: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for s, v in splits.items()}


# --------------------------------------------------------------------------- the data module


class TrialDataModule(SplitDataModule):
    """Trials of one NWB recording, split by condition and trial (see the module docstring).

    Args:
        paths: one NWB file. If empty, the simulated reaching session described by
            ``simulate`` (``ReachingConfig`` fields) is used, generated on first use and
            cached in ``cache_dir``.
        align_to, window, bin_size, condition, target, target_on, go_cue, go_pulse,
            behavior: as in :class:`TrialSpec`.
        behavior_nan: the reader's NaN policy for behaviour ("refuse", "interpolate", "mask").
        test_conditions: condition values held out entirely (generalisation).
        val_fraction: fraction of each training condition's trials used for validation.
        split_seed: seed of the validation draw.
        record_fraction, record_count, record_seed: the recorded subset of units
            (``record_count``, if given, wins over ``record_fraction``).
        batch_size, num_workers: DataLoader settings.
    """

    def __init__(
        self,
        paths: list[str] | None = None,
        simulate: dict | None = None,
        cache_dir: str = "data_cache",
        align_to: str = "go_cue_time",
        window: tuple[float, float] = (-0.6, 0.9),
        bin_size: float = 0.02,
        condition: str = "condition",
        target: list[str] = ("target_x", "target_y"),
        target_on: str = "target_on_time",
        go_cue: str | None = "go_cue_time",
        go_pulse: float = 0.05,
        behavior: list[str] = ("emg",),
        behavior_nan: str = "refuse",
        test_conditions: list = (1, 5),
        val_fraction: float = 0.2,
        split_seed: int = 0,
        record_fraction: float = 0.1,
        record_count: int | None = None,
        record_seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
    ):
        super().__init__()
        paths = list(paths or [])
        if len(paths) > 1:
            raise NeuroformerError(f"TrialDataModule reads one session; got {len(paths)} files: {paths}")
        if not 0 <= record_fraction <= 1:
            raise ValueError(f"record_fraction must be in [0, 1]; got {record_fraction}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
        self.paths = [Path(p) for p in paths]
        self.simulation = ReachingConfig(**(simulate or {}))
        self.cache_dir = Path(cache_dir)
        self.layout = dict(align_to=align_to, window=tuple(window), bin_size=bin_size, condition=condition,
                           target=tuple(target), target_on=target_on, go_cue=go_cue, go_pulse=go_pulse,
                           behavior=tuple(behavior))
        self.behavior_nan = behavior_nan
        self.test_conditions = list(test_conditions)
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.record = (record_fraction, record_count, record_seed)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.recordings: list[Recording] = []
        self.data: dict[str, TrialData] = {}
        self.spec: TrialSpec | None = None

    def simulate(self, path: Path) -> None:
        simulate_reaching(path, self.simulation)

    def setup(self, stage: str | None = None) -> None:
        if self.spec is not None:
            return
        self.prepare_data()
        source = DataSource(files=(str(self.files[0].resolve()),), behavior_nan=self.behavior_nan)
        rec = source.read()
        self.recordings = [rec]
        values = _column(rec, self.layout["condition"], "condition")
        conditions = tuple(v.item() for v in np.unique(values))
        missing = [c for c in self.test_conditions if c not in conditions]
        if missing:
            raise RecordingError(rec.path, f"trials/{self.layout['condition']}",
                                 f"test_conditions {missing} are not among its values {list(conditions)}")
        if len(self.test_conditions) >= len(conditions):
            raise RecordingError(rec.path, f"trials/{self.layout['condition']}", (
                f"test_conditions {self.test_conditions} hold out all {len(conditions)} conditions; "
                "leave at least one to train on"))
        spec = TrialSpec(source=source, recorded=choose_recorded(rec, *self.record), conditions=conditions,
                         test_conditions=tuple(self.test_conditions), **self.layout)
        data = trial_data(rec, spec)
        test = np.flatnonzero(np.isin(conditions, self.test_conditions))
        splits = split_trials(data.condition, test, self.val_fraction, self.split_seed)
        self.data = {s: data.subset(i) for s, i in splits.items()}
        train = self.data["train"]
        if len(train.trial) == 0:
            raise RecordingError(rec.path, "trials", "no training trials left after the splits")
        self.spec = replace(
            spec,
            behavior_mean=tuple(train.behavior.mean(axis=(0, 1)).tolist()),
            behavior_std=tuple((train.behavior.std(axis=(0, 1)) + 1e-6).tolist()),
            unit_mean_count=tuple(train.counts.mean(axis=(0, 1)).tolist()),
        )
        log.info("Trials: %s; %d recorded units of %d", ", ".join(f"{s} {len(d.trial)}" for s, d in self.data.items()),
                 self.spec.n_recorded, rec.units.n_units)

    def dataset(self, split: str) -> Dataset:
        return TrialDataset(self.data[split])
