"""LightningDataModule: NWB files (or the built-in simulated recording) to batches."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from neuroformer.data.base import SplitDataModule
from neuroformer.data.dataset import InputSpec, WindowDataset
from neuroformer.data.nwb import read_nwb
from neuroformer.data.recording import Recording
from neuroformer.data.simulate import SimulationConfig, simulate_recording
from neuroformer.data.source import DataSource
from neuroformer.data.splits import SPLITS, SplitSpec, window_starts
from neuroformer.data.targets import BehaviorTarget
from neuroformer.data.tokenizer import SpikeTokenizer
from neuroformer.data.vocabulary import UnitVocabulary
from neuroformer.errors import ConfigError, RecordingError

log = logging.getLogger(__name__)

AUTO = "auto"
AUTO_FRAMES = 4  # frames per window (200 ms at 20 Hz) under data.n_frames=auto


def few_shot_windows(t0: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(round(fraction * n),) start times: a seeded random subset of ``t0`` (n,), in time order.

    Random rather than the first windows in time: the start of a session is often a single
    behavioural state (e.g. all running), which would make few-shot results about the session's
    start rather than about how much data a model needs.
    """
    n = max(1, int(round(len(t0) * fraction)))
    return np.sort(np.random.default_rng(seed).choice(t0, size=n, replace=False))


class NWBDataModule(SplitDataModule):
    """Windows of one or more NWB recordings, split into contiguous time blocks.

    Args:
        paths: NWB files to train on. If empty, the simulated recording described by
            ``simulate`` is used (generated on first use and cached in ``cache_dir``).
        simulate: ``SimulationConfig`` fields for the default simulated recording.
        cache_dir: where simulated recordings are cached.
        tokenizer: spike tokenisation (windows, resolution, sequence lengths).
        split: the time-block split (see ``neuroformer.data.splits``).
        n_frames: stimulus frames per window: "auto" (4 frames when the recording has a
            stimulus, none when it has none), an integer > 0 (a recording without a stimulus
            is refused), or 0 (the stimulus is not used).
        behavior: behaviour variables fed to the model (names in the files).
        behavior_steps: behaviour samples per window.
        behavior_nan: NaN policy for behaviour: "refuse", "interpolate" or "mask".
        behavior_max_gap: behaviour samples further apart than this many seconds leave a gap:
            windows there get no behaviour input and no behaviour label (None: ten sampling
            intervals; see ``TimeSeries.covered``).
        stimulus: name of the stimulus series when a file has several.
        restrict_to: an interval table (e.g. "trials") that windows must lie inside.
        train_stride: spacing of training windows in seconds (default: the window length).
        train_fraction: fraction of training windows used (few-shot): a random subset, seeded by
            the split seed, so that a small fraction still samples the whole training block.
        batch_size, num_workers: DataLoader settings.
        vocab: an existing unit vocabulary to extend (fine-tuning a trained model).
        target: the behaviour each window is labelled with for fine-tuning (not an input).
        reference: a trained model's input spec: its tokenizer, frames, behaviour inputs and
            normalisation are used instead of the arguments above, its vocabulary is extended
            with any new units (fine-tuning a pretrained model on the same or new sessions).
    """

    def __init__(
        self,
        paths: list[str] | None = None,
        simulate: dict | None = None,
        cache_dir: str = "data_cache",
        tokenizer: SpikeTokenizer | None = None,
        split: SplitSpec | None = None,
        n_frames: int | str = "auto",
        behavior: list[str] | None = None,
        behavior_steps: int = 8,
        behavior_nan: str = "refuse",
        behavior_max_gap: float | None = None,
        stimulus: str | None = None,
        restrict_to: str | None = None,
        train_stride: float | None = None,
        train_fraction: float = 1.0,
        batch_size: int = 32,
        num_workers: int = 0,
        vocab: UnitVocabulary | None = None,
        target: BehaviorTarget | None = None,
        reference: InputSpec | None = None,
    ):
        super().__init__()
        if reference is not None:
            tokenizer, n_frames, vocab = reference.tokenizer, reference.n_frames, reference.vocab
            behavior, behavior_steps = reference.behavior, reference.behavior_steps or behavior_steps
        self.paths = [Path(p) for p in (paths or [])]
        self.simulation = SimulationConfig(**(simulate or {}))
        self.cache_dir = Path(cache_dir)
        self.tokenizer = tokenizer or SpikeTokenizer()
        self.split = split or SplitSpec()
        self.n_frames, self.behavior_names, self.behavior_steps = n_frames, list(behavior or []), behavior_steps
        if not (n_frames == AUTO or (isinstance(n_frames, int) and n_frames >= 0)):
            raise ConfigError(f"data.n_frames must be {AUTO!r} or a whole number >= 0; got {n_frames!r}")
        self.behavior_nan, self.stimulus_name, self.restrict_to = behavior_nan, stimulus, restrict_to
        self.behavior_max_gap = behavior_max_gap
        self.train_stride = train_stride or self.tokenizer.window
        if not 0 < train_fraction <= 1:
            raise ConfigError(f"data.train_fraction must be in (0, 1]; got {train_fraction}")
        self.train_fraction = train_fraction
        self.batch_size, self.num_workers = batch_size, num_workers
        self.base_vocab = vocab or UnitVocabulary()
        self.target, self.reference = target, reference
        self.recordings: list[Recording] = []
        self.datasets: dict[str, WindowDataset] = {}
        self.spec: InputSpec | None = None

    def simulate(self, path: Path) -> None:
        simulate_recording(path, self.simulation)

    def setup(self, stage: str | None = None) -> None:
        if self.spec is not None:
            return
        self.prepare_data()
        self.recordings = [
            read_nwb(p, behavior_nan=self.behavior_nan, stimulus=self.stimulus_name,
                     behavior_max_gap=self.behavior_max_gap) for p in self.files
        ]
        starts = {s: [self._starts(rec, s) for rec in self.recordings] for s in SPLITS}
        if self.train_fraction < 1:
            starts["train"] = [few_shot_windows(t, self.train_fraction, self.split.seed) for t in starts["train"]]
        for s in SPLITS:
            for path, t0 in zip(self.files, starts[s]):
                if len(t0) == 0:
                    raise RecordingError(
                        path, "windows", f"no {s} windows: the recording is too short for "
                        f"{self.split.n_blocks} blocks of past_window + window seconds"
                        + (f" inside {self.restrict_to}" if self.restrict_to else "")
                    )
        self.spec = self._spec(starts["train"])
        self.datasets = {s: WindowDataset(self.recordings, self.spec, starts[s]) for s in SPLITS}
        log.info("Windows: " + ", ".join(f"{s} {len(d)}" for s, d in self.datasets.items()))
        if self.spec.target is not None:
            self._check_labels()

    def _check_labels(self) -> None:
        """Log how many windows of each split carry a label; refuse a split with none."""
        target, window = self.spec.target, self.tokenizer.window
        counts = {}
        for s, dataset in self.datasets.items():
            labels = [target.raw(rec, dataset.t0[dataset.session == i], window) for i, rec in enumerate(self.recordings)]
            counts[s] = int(sum(target.labelled(v).sum() for v in labels))
        log.info("Windows with a %s label (%s): %s", target.kind, ", ".join(target.names),
                 ", ".join(f"{s} {counts[s]} of {len(self.datasets[s])}" for s in SPLITS))
        empty = [s for s in SPLITS if counts[s] == 0]
        if empty:
            field = f"intervals/trials/{target.names[0]}" if target.kind == "classification" else \
                f"behavior/{target.names[0]}"
            raise RecordingError(
                self.files[0], field,
                f"no {' or '.join(empty)} window carries a label (the behaviour is not recorded, or no trial of "
                f"class {target.classes} lies, in the held-out time blocks); change the split (data.split.seed, "
                "data.split.n_blocks) so that labelled time falls in every split, or data.behavior_max_gap")

    def _starts(self, rec: Recording, split: str) -> np.ndarray:
        restrict = None
        if self.restrict_to:
            restrict = rec.trials if self.restrict_to == "trials" else rec.intervals.get(self.restrict_to)
            if restrict is None:
                raise RecordingError(
                    rec.path, f"intervals/{self.restrict_to}",
                    f"restrict_to names an interval table the file lacks; it has "
                    f"{(['trials'] if rec.trials else []) + sorted(rec.intervals)}"
                )
        tok = self.tokenizer
        stride = self.train_stride if split == "train" else tok.window
        return window_starts(rec.start, rec.stop, self.split, split, tok.window, tok.past_window, stride, restrict)

    def _spec(self, train_starts: list[np.ndarray]) -> InputSpec:
        """The input spec, with normalisation statistics from training windows only."""
        vocab = self.base_vocab.extend(n for rec in self.recordings for n in rec.units.names)
        target = self.target.fit(self.recordings, train_starts, self.tokenizer.window) if self.target else None
        source = DataSource(files=tuple(str(f.resolve()) for f in self.files), behavior_nan=self.behavior_nan,
                            stimulus=self.stimulus_name, restrict_to=self.restrict_to,
                            behavior_max_gap=self.behavior_max_gap)
        if self.reference is not None:  # the trained model's normalisation, not this data's
            return replace(self.reference, vocab=vocab, target=target, source=source, split=self.split)
        spec = InputSpec(tokenizer=self.tokenizer, vocab=vocab, behavior=self.behavior_names,
                         behavior_steps=self.behavior_steps if self.behavior_names else 0, target=target,
                         source=source, split=self.split)
        rec, t0 = self.recordings[0], train_starts[0]
        n_frames = self.n_frames
        if n_frames == AUTO:
            n_frames = AUTO_FRAMES if rec.stimulus is not None else 0
            log.info("Stimulus: %s", f"{n_frames} frames of {rec.stimulus.name!r} per window" if n_frames
                     else "none in the recording; training on spikes (and behaviour) alone")
        if n_frames:
            if rec.stimulus is None:
                raise RecordingError(rec.path, "stimulus", f"no stimulus frames found, but data.n_frames={n_frames}; "
                                     "set data.n_frames=0 (or auto) to train on spikes (and behaviour) alone")
            idx = np.unique(np.clip(rec.stimulus.index_at(t0[:: max(1, len(t0) // 256)]), 0, None))
            frames = np.stack([rec.stimulus.read(i, i + 1)[0] for i in idx])
            spec.n_frames, spec.frame_shape = n_frames, tuple(rec.stimulus.frame_shape)
            spec.frame_mean, spec.frame_std = float(frames.mean()), float(frames.std() + 1e-6)
        for name in self.behavior_names:
            if name not in rec.behavior:
                raise RecordingError(rec.path, f"behavior/{name}", f"not found; the file has {sorted(rec.behavior)}")
            values = np.concatenate([r.behavior[name].at(t) for r, t in zip(self.recordings, train_starts)])
            if np.isnan(values).all():
                raise RecordingError(rec.path, f"behavior/{name}", "no value at any training window; the series "
                                     "does not cover the training blocks (see data.behavior_max_gap)")
            spec.behavior_dims.append(rec.behavior[name].dim)
            spec.behavior_mean += np.nanmean(values, axis=0).tolist()
            spec.behavior_std += (np.nanstd(values, axis=0) + 1e-6).tolist()
        return spec

    def dataset(self, split: str) -> Dataset:
        return self.datasets[split]
