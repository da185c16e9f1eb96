"""Stimulus clips in, per-unit spike counts out: the data of a digital twin.

Every stimulus frame ``k`` of a recording is one sample:

- **stimulus**: the clip of the ``n_frames`` frames ending with frame ``k`` (the frames on
  screen up to and including ``k``), z-scored with the training frames' mean and std;
- **counts**: each unit's spikes in the response window ``[t_k, t_k + response_window)``,
  ``t_k`` the onset of frame ``k``.

Samples are split by the time blocks of ``data/splits.py``: a sample belongs to a split only
if its whole span, from the first frame of its clip to the end of its response window, lies
in one block of that split. With no file configured, the simulated mouse-V1 recording
(``data/simulate.py``; ``simulate.population=rich`` for nine functional types) is generated on
first use and cached. Frames are held in memory once; a batch gathers its clips from them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from neuroformer.data.base import SplitDataModule
from neuroformer.data.recording import Recording
from neuroformer.data.simulate import SimulationConfig, simulate_recording
from neuroformer.data.source import DataSource
from neuroformer.data.splits import SPLITS, SplitSpec
from neuroformer.errors import ConfigError, NeuroformerError, RecordingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResponseSpec:
    """Everything that turns a recording into a twin's samples; saved with the model.

    Attributes:
        source: the recording and the reader options it is read with.
        split: the time-block split the samples were drawn from.
        n_frames: frames per stimulus clip (T).
        frame_shape: (H, W) of a frame.
        frame_rate: frames per second of the stimulus.
        response_window: seconds of spikes counted after each frame's onset.
        frame_mean, frame_std: pixel statistics of the training frames (the z-scoring).
        frame_min, frame_max: pixel range of the training frames (the stimulus range).
        units: names of the modelled units (``Recording.units.names``), in output order.
        unit_mean_count: (U,) mean count per response window of each unit, training samples.
    """

    source: DataSource
    split: SplitSpec = SplitSpec()
    n_frames: int = 6
    frame_shape: tuple[int, int] = (32, 32)
    frame_rate: float = 20.0
    response_window: float = 0.05
    frame_mean: float = 0.0
    frame_std: float = 1.0
    frame_min: float = 0.0
    frame_max: float = 255.0
    units: tuple[str, ...] = ()
    unit_mean_count: tuple[float, ...] = ()

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def stimulus_range(self) -> tuple[float, float]:
        """(low, high) of the pixel range in the model's z-scored units."""
        return ((self.frame_min - self.frame_mean) / self.frame_std, (self.frame_max - self.frame_mean) / self.frame_std)

    def to_pixels(self, stimulus: np.ndarray) -> np.ndarray:
        """Z-scored frames (any shape) back to pixel values."""
        return stimulus * self.frame_std + self.frame_mean

    def to_dict(self) -> dict:
        d = asdict(self)
        d["source"] = self.source.to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> ResponseSpec:
        d = dict(d)
        d["source"] = DataSource.from_dict(d["source"])
        d["split"] = SplitSpec(**d["split"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class ResponseBatch(NamedTuple):
    """A batch of samples.

    Attributes:
        stimulus: (B, T, H, W) float32 z-scored clips, last frame = the response's frame.
        counts: (B, U) float32 spike counts in each response window.
        time: (B,) float64 onset of the response window, seconds.
    """

    stimulus: torch.Tensor
    counts: torch.Tensor
    time: torch.Tensor


@dataclass
class Responses:
    """All samples of one recording, in memory (numpy).

    Attributes:
        frames: (n_frames_total, H, W) float32 z-scored frames.
        counts: (n_frames_total, U) float32 spike counts after each frame's onset.
        times: (n_frames_total,) float64 frame onsets, seconds.
        index: split -> (n,) int64 frames whose clip and response window lie in that split.
        n_frames: clip length T.
    """

    frames: np.ndarray
    counts: np.ndarray
    times: np.ndarray
    index: dict[str, np.ndarray]
    n_frames: int

    def clips(self, frames: np.ndarray) -> np.ndarray:
        """(n, T, H, W) the clips ending at ``frames`` (n,)."""
        return self.frames[np.asarray(frames)[:, None] + np.arange(1 - self.n_frames, 1)]

    def batch(self, frames: np.ndarray) -> ResponseBatch:
        return ResponseBatch(torch.from_numpy(self.clips(frames)), torch.from_numpy(self.counts[frames]),
                             torch.from_numpy(self.times[frames]))


class ResponseDataset(Dataset):
    """The samples of one split; ``__getitems__`` returns a whole :class:`ResponseBatch`."""

    def __init__(self, data: Responses, split: str):
        self.data, self.frames = data, data.index[split]

    def __len__(self) -> int:
        return len(self.frames)

    def __getitems__(self, index: list[int]) -> ResponseBatch:
        return self.data.batch(self.frames[index])


def spike_counts(rec: Recording, units: list[int], onsets: np.ndarray, window: float) -> np.ndarray:
    """(n, K) spikes of ``units`` in ``[onsets[i], onsets[i] + window)``; ``onsets`` (n,) sorted."""
    column = np.full(rec.units.n_units, -1)
    column[units] = np.arange(len(units))
    t, u = rec.units.spike_times, column[rec.units.spike_units]
    k = np.searchsorted(onsets, t, side="right") - 1
    keep = (u >= 0) & (k >= 0) & (t < onsets[np.maximum(k, 0)] + window)
    counts = np.zeros((len(onsets), len(units)), np.float32)
    np.add.at(counts, (k[keep], u[keep]), 1.0)
    return counts


def split_frames(times: np.ndarray, start: float, stop: float, split: SplitSpec, n_frames: int,
                 frame_period: float, window: float) -> dict[str, np.ndarray]:
    """Split -> (n,) frames ``k`` whose span ``[times[k - T + 1], times[k] + max(window, period))``
    lies inside one block of that split (``times`` (n_total,) frame onsets)."""
    k = np.arange(n_frames - 1, len(times))
    lo, hi = times[k - n_frames + 1], times[k] + max(window, frame_period)
    out = {}
    for s in SPLITS:
        starts, stops = split.blocks(start, stop, s)
        block = np.searchsorted(starts, lo, side="right") - 1
        inside = (block >= 0) & (hi <= stops[np.maximum(block, 0)] + 1e-9)
        out[s] = k[inside]
    return out


def response_data(rec: Recording, spec: ResponseSpec) -> Responses:
    """The samples of ``rec`` under ``spec`` (its normalisation and units; any split)."""
    if rec.stimulus is None:
        raise RecordingError(rec.path, "stimulus", "no stimulus frames found; a digital twin predicts responses "
                             "to a stimulus (an ImageSeries in /stimulus/presentation)")
    stim = rec.stimulus
    if tuple(stim.frame_shape) != tuple(spec.frame_shape):
        raise RecordingError(rec.path, f"stimulus/{stim.name}", f"frames are {tuple(stim.frame_shape)}; the model "
                             f"was trained on {tuple(spec.frame_shape)}")
    index = {n: i for i, n in enumerate(rec.units.names)}
    missing = [n for n in spec.units if n not in index]
    if missing:
        raise RecordingError(rec.path, "units", f"{len(missing)} of the model's {spec.n_units} units are not in "
                             f"this file (e.g. {missing[0]!r})")
    frames = (stim.read(0, stim.n_frames) - spec.frame_mean) / spec.frame_std
    times = np.asarray(stim.timestamps, np.float64)
    counts = spike_counts(rec, [index[n] for n in spec.units], times, spec.response_window)
    split = split_frames(times, rec.start, rec.stop, spec.split, spec.n_frames, 1.0 / spec.frame_rate,
                         spec.response_window)
    return Responses(frames.astype(np.float32), counts, times, split, spec.n_frames)


class ResponseDataModule(SplitDataModule):
    """Stimulus clips and spike counts of one NWB recording (see the module docstring).

    Args:
        paths: one NWB file with a stimulus movie and units. If empty, the simulated recording
            described by ``simulate`` (``SimulationConfig`` fields) is generated on first use
            and cached in ``cache_dir``.
        n_frames: frames per clip (the twin's temporal receptive field).
        response_window: seconds of spikes counted from each frame's onset.
        split: the time-block split.
        stimulus, behavior_nan: reader options (the stimulus series when a file has several).
        batch_size, num_workers: DataLoader settings.
    """

    def __init__(self, paths: list[str] | None = None, simulate: dict | None = None, cache_dir: str = "data_cache",
                 n_frames: int = 6, response_window: float = 0.05, split: SplitSpec | None = None,
                 stimulus: str | None = None, behavior_nan: str = "refuse", batch_size: int = 64,
                 num_workers: int = 0):
        super().__init__()
        paths = list(paths or [])
        if len(paths) > 1:
            raise NeuroformerError(f"ResponseDataModule reads one session; got {len(paths)} files: {paths}")
        if n_frames < 1:
            raise ConfigError(f"data.n_frames must be >= 1; got {n_frames}")
        if not response_window > 0:
            raise ConfigError(f"data.response_window must be > 0 seconds; got {response_window}")
        self.paths = [Path(p) for p in paths]
        self.simulation = SimulationConfig(**(simulate or {}))
        self.cache_dir = Path(cache_dir)
        self.n_frames, self.response_window = n_frames, response_window
        self.split = split or SplitSpec()
        self.stimulus, self.behavior_nan = stimulus, behavior_nan
        self.batch_size, self.num_workers = batch_size, num_workers
        self.recordings: list[Recording] = []
        self.data: Responses | None = None
        self.spec: ResponseSpec | None = None

    def simulate(self, path: Path) -> None:
        simulate_recording(path, self.simulation)

    def setup(self, stage: str | None = None) -> None:
        if self.spec is not None:
            return
        self.prepare_data()
        source = DataSource(files=(str(self.files[0].resolve()),), behavior_nan=self.behavior_nan,
                            stimulus=self.stimulus)
        rec = source.read()
        self.recordings = [rec]
        if rec.stimulus is None:
            raise RecordingError(rec.path, "stimulus", "no stimulus frames found; a digital twin predicts "
                                 "responses to a stimulus (an ImageSeries in /stimulus/presentation)")
        times = np.asarray(rec.stimulus.timestamps)
        rate = float(1.0 / np.median(np.diff(times))) if len(times) > 1 else 1.0
        train = split_frames(times, rec.start, rec.stop, self.split, self.n_frames, 1 / rate,
                             self.response_window)["train"]
        if len(train) == 0:
            raise RecordingError(rec.path, "stimulus", f"no training samples: the recording is too short for "
                                 f"{self.split.n_blocks} blocks of {self.n_frames} frames")
        pixels = rec.stimulus.read(0, rec.stimulus.n_frames)[np.unique(train)]
        spec = ResponseSpec(source=source, split=self.split, n_frames=self.n_frames,
                            frame_shape=tuple(rec.stimulus.frame_shape), frame_rate=rate,
                            response_window=self.response_window, frame_mean=float(pixels.mean()),
                            frame_std=float(pixels.std() + 1e-6), frame_min=float(pixels.min()),
                            frame_max=float(pixels.max()), units=tuple(rec.units.names))
        self.data = response_data(rec, spec)
        for s in SPLITS:
            if len(self.data.index[s]) == 0:
                raise RecordingError(rec.path, "stimulus", f"no {s} samples: the recording is too short for "
                                     f"{self.split.n_blocks} blocks of {self.n_frames} frames")
        mean = self.data.counts[self.data.index["train"]].mean(axis=0)
        self.spec = ResponseSpec(**{**spec.__dict__, "unit_mean_count": tuple(mean.tolist())})
        log.info("Samples: %s; %d units, clips of %d frames", ", ".join(
            f"{s} {len(self.data.index[s])}" for s in SPLITS), self.spec.n_units, self.n_frames)

    def dataset(self, split: str) -> Dataset:
        return ResponseDataset(self.data, split)
