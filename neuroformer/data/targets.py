"""Behaviour targets: what each window is labelled with when a model is fine-tuned.

A target is read from the recording but is never a model input: ``InputSpec`` refuses a
target that is also one of its behaviour inputs, and the target travels in its own
``Batch.target_behavior`` field, which the Neuroformer does not read.

- ``regression``: the mean of one or more behaviour variables (e.g. ``running_speed``) over
  the current window ``[t0, t0 + window)``, standardised with training-window statistics.
- ``circular``: an angle (head direction, running direction, a phase; ``unit`` radians or
  degrees): the circular mean of its samples over the current window, as the unit vector
  ``(cos, sin)``; the model predicts a 2-vector whose direction is the predicted angle.
- ``classification``: the value of a trials-table column (e.g. ALM ``type``: lick left /
  lick right) for the trial that contains the window's start; windows whose trial has a
  value outside ``classes``, or that lie in no trial, get label -1 and are ignored.

A window whose behaviour series has no value somewhere in it (before the series starts,
after it ends, inside a gap: ``TimeSeries.covered``) carries no label: NaN for regression and
circular targets, -1 for classes. Losses and scores skip it; ``labelled`` counts the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from neuroformer.data.recording import Recording
from neuroformer.errors import ConfigError, RecordingError

KINDS = ("regression", "circular", "classification")
ANGLE_UNITS = {"radians": 1.0, "degrees": np.pi / 180}
IGNORE = -1  # class label of windows that carry no usable label


@dataclass
class BehaviorTarget:
    """What a fine-tuned model predicts for each window.

    Attributes:
        kind: "regression", "circular" or "classification".
        names: regression: behaviour variables whose dimensions are concatenated; circular:
            exactly one scalar angle variable; classification: exactly one trials-table column.
        classes: classification: the column values to predict, in output order.
        unit: circular: the unit of the angle in the file, "radians" or "degrees".
        samples: regression and circular: evenly spaced samples averaged over the current window.
        dims: regression: dimension of each variable (filled in by ``fit``).
        mean, std: regression: (D,) standardisation from training windows; circular: ``mean`` is
            the training windows' circular mean angle in radians (filled in by ``fit``).
    """

    kind: str = "regression"
    names: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    unit: str = "radians"
    samples: int = 8
    dims: list[int] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names, self.classes = list(self.names), [str(c) for c in self.classes]
        if self.kind not in KINDS:
            raise ConfigError(f"data.target.kind must be one of {KINDS}; got {self.kind!r}")
        if not self.names:
            raise ConfigError("data.target.names must name at least one behaviour variable or trials column")
        if self.kind == "classification" and (len(self.names) != 1 or len(self.classes) < 2):
            raise ConfigError("a classification target needs one trials column (data.target.names) and at least "
                              f"two classes; got names={self.names}, classes={self.classes}")
        if self.kind == "circular" and (len(self.names) != 1 or self.unit not in ANGLE_UNITS):
            raise ConfigError("a circular target needs one angle variable (data.target.names) and data.target.unit "
                              f"in {sorted(ANGLE_UNITS)}; got names={self.names}, unit={self.unit!r}")

    @property
    def n_outputs(self) -> int:
        """Regression: D, the summed variable dimensions; circular: 2 (cos, sin); classification: classes."""
        if self.kind == "classification":
            return len(self.classes)
        return 2 if self.kind == "circular" else int(sum(self.dims))

    def zeros(self, n: int) -> np.ndarray:
        """An empty batch of targets: (n, D) float32, or (n,) int64 labels for classes."""
        if self.kind == "classification":
            return np.zeros(n, np.int64)
        return np.zeros((n, self.n_outputs), np.float32)

    def check_recording(self, rec: Recording) -> None:
        """Refuse a recording that lacks the target (error names the file and field)."""
        if self.kind != "classification":
            for name in self.names:
                if name not in rec.behavior:
                    raise RecordingError(rec.path, f"behavior/{name}",
                                         f"the fine-tuning target is missing; the file has {sorted(rec.behavior)}")
            if self.kind == "circular" and rec.behavior[self.names[0]].dim != 1:
                raise RecordingError(rec.path, f"behavior/{self.names[0]}", f"a circular target must be one angle "
                                     f"per sample; the series has {rec.behavior[self.names[0]].dim} dimensions")
            return
        column = self.names[0]
        if rec.trials is None or column not in rec.trials.columns:
            found = sorted(rec.trials.columns) if rec.trials is not None else "no trials table"
            raise RecordingError(rec.path, f"intervals/trials/{column}",
                                 f"the classification target column is missing; found {found}")

    def _sample_times(self, t0: np.ndarray, window: float) -> np.ndarray:
        """(n, samples) evenly spaced times inside each window ``[t0, t0 + window)``."""
        return t0[:, None] + ((np.arange(self.samples) + 0.5) * window / self.samples)[None, :]

    def raw(self, rec: Recording, t0: np.ndarray, window: float) -> np.ndarray:
        """Unnormalised targets of windows starting at t0 (n,).

        Returns:
            regression: (n, D) float32 window means; circular: (n, 2) float32 unit vectors of
            the window's circular mean angle; both NaN where the window is not fully covered;
            classification: (n,) int64 class index or -1.
        """
        self.check_recording(rec)
        t0 = np.asarray(t0, dtype=np.float64)
        if self.kind == "classification":
            trials = rec.trials
            values = np.asarray(trials.columns[self.names[0]]).astype(str)
            row = trials.containing(t0)
            index = {c: i for i, c in enumerate(self.classes)}
            return np.array([index.get(values[r], IGNORE) if r >= 0 else IGNORE for r in row], dtype=np.int64)
        times = self._sample_times(t0, window).ravel()
        if self.kind == "circular":
            series = rec.behavior[self.names[0]]
            angle = series.data[:, 0].astype(np.float64) * ANGLE_UNITS[self.unit]
            # Interpolating the unit vector, not the angle, never crosses the wrap the long way round.
            vectors = np.stack([np.interp(times, series.timestamps, f(angle)) for f in (np.cos, np.sin)], axis=-1)
            vectors[~series.covered(times)] = np.nan
            mean = vectors.reshape(len(t0), self.samples, 2).mean(axis=1)
            return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)
        values = np.concatenate([rec.behavior[name].at(times) for name in self.names], axis=-1)
        return values.reshape(len(t0), self.samples, -1).mean(axis=1).astype(np.float32)

    def labelled(self, values: np.ndarray) -> np.ndarray:
        """(n,) bool: which of ``values`` (from ``raw`` or ``values``) carry a label."""
        return values != IGNORE if self.kind == "classification" else np.isfinite(values).all(axis=-1)

    def fit(self, recordings: list[Recording], starts: list[np.ndarray], window: float) -> BehaviorTarget:
        """A copy with dims and standardisation from the labelled training windows."""
        values = np.concatenate([self.raw(r, t, window) for r, t in zip(recordings, starts)])
        labelled = self.labelled(values)
        if not labelled.any():
            field = f"intervals/trials/{self.names[0]}" if self.kind == "classification" else f"behavior/{self.names[0]}"
            what = f"in a trial of class {self.classes}" if self.kind == "classification" else \
                "where the behaviour was recorded"
            raise RecordingError(recordings[0].path, field, f"no training window lies {what}")
        if self.kind == "classification":
            return replace(self)
        values = values[labelled]
        if self.kind == "circular":  # the training windows' circular mean angle: the constant to beat
            return replace(self, dims=[1], mean=[float(np.arctan2(*values.mean(0)[::-1]))], std=[])
        dims = [recordings[0].behavior[name].dim for name in self.names]
        return replace(self, dims=dims, mean=values.mean(0).tolist(), std=(values.std(0) + 1e-6).tolist())

    def values(self, rec: Recording, t0: np.ndarray, window: float) -> np.ndarray:
        """Model-ready targets: standardised (n, D) float32, (n, 2) unit vectors, or (n,) labels."""
        raw = self.raw(rec, t0, window)
        if self.kind != "regression":
            return raw
        return ((raw - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)

    def denormalise(self, y: np.ndarray) -> np.ndarray:
        """Predictions in the variables' own terms: regression (..., D) values; circular (..., 2)
        vectors -> (...,) angles in the file's unit, in [-pi, pi) radians or [-180, 180) degrees."""
        if self.kind == "circular":
            return np.arctan2(y[..., 1], y[..., 0]) / ANGLE_UNITS[self.unit]
        return y * np.asarray(self.std) + np.asarray(self.mean)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "names": list(self.names), "classes": list(self.classes), "unit": self.unit,
                "samples": self.samples, "dims": list(self.dims), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> BehaviorTarget:
        return cls(**d)
