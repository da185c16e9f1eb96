"""Behaviour targets: what each window is labelled with when a model is fine-tuned.

A target is read from the recording but is never a model input: ``InputSpec`` refuses a
target that is also one of its behaviour inputs, and the target travels in its own
``Batch.target_behavior`` field, which the Neuroformer does not read.

- ``regression``: the mean of one or more behaviour variables (e.g. ``running_speed``) over
  the current window ``[t0, t0 + window)``, standardised with training-window statistics.
- ``classification``: the value of a trials-table column (e.g. ALM ``type``: lick left /
  lick right) for the trial that contains the window's start; windows whose trial has a
  value outside ``classes``, or that lie in no trial, get label -1 and are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from neuroformer.data.recording import Recording
from neuroformer.errors import RecordingError

KINDS = ("regression", "classification")
IGNORE = -1  # class label of windows that carry no usable label


@dataclass
class BehaviorTarget:
    """What a fine-tuned model predicts for each window.

    Attributes:
        kind: "regression" or "classification".
        names: regression: behaviour variables whose dimensions are concatenated;
            classification: exactly one trials-table column.
        classes: classification: the column values to predict, in output order.
        samples: regression: evenly spaced samples averaged over the current window.
        dims: regression: dimension of each variable (filled in by ``fit``).
        mean, std: regression: (D,) standardisation from training windows (filled in by ``fit``).
    """

    kind: str = "regression"
    names: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    samples: int = 8
    dims: list[int] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names, self.classes = list(self.names), [str(c) for c in self.classes]
        if self.kind not in KINDS:
            raise ValueError(f"target kind must be one of {KINDS}; got {self.kind!r}")
        if not self.names:
            raise ValueError("target names must name at least one behaviour variable or trials column")
        if self.kind == "classification" and (len(self.names) != 1 or len(self.classes) < 2):
            raise ValueError("a classification target needs one trials column (names) and at least two classes; "
                             f"got names={self.names}, classes={self.classes}")

    @property
    def n_outputs(self) -> int:
        """Regression: D, the summed variable dimensions; classification: the number of classes."""
        return len(self.classes) if self.kind == "classification" else int(sum(self.dims))

    def zeros(self, n: int) -> np.ndarray:
        """An empty batch of targets: (n, D) float32 (regression) or (n,) int64 labels."""
        if self.kind == "classification":
            return np.zeros(n, np.int64)
        return np.zeros((n, self.n_outputs), np.float32)

    def check_recording(self, rec: Recording) -> None:
        """Refuse a recording that lacks the target (error names the file and field)."""
        if self.kind == "regression":
            for name in self.names:
                if name not in rec.behavior:
                    raise RecordingError(rec.path, f"behavior/{name}",
                                         f"the fine-tuning target is missing; the file has {sorted(rec.behavior)}")
            return
        column = self.names[0]
        if rec.trials is None or column not in rec.trials.columns:
            found = sorted(rec.trials.columns) if rec.trials is not None else "no trials table"
            raise RecordingError(rec.path, f"intervals/trials/{column}",
                                 f"the classification target column is missing; found {found}")

    def raw(self, rec: Recording, t0: np.ndarray, window: float) -> np.ndarray:
        """Unnormalised targets of windows starting at t0 (n,).

        Returns:
            regression: (n, D) float32 window means; classification: (n,) int64 class index or -1.
        """
        self.check_recording(rec)
        if self.kind == "regression":
            offsets = (np.arange(self.samples) + 0.5) * window / self.samples
            times = (t0[:, None] + offsets[None, :]).ravel()
            values = np.concatenate([rec.behavior[name].at(times) for name in self.names], axis=-1)
            return values.reshape(len(t0), self.samples, -1).mean(axis=1).astype(np.float32)
        trials = rec.trials
        order = np.argsort(trials.start, kind="stable")
        start, stop = trials.start[order], trials.stop[order]
        values = np.asarray(trials.columns[self.names[0]])[order].astype(str)
        k = np.searchsorted(start, t0, side="right") - 1
        inside = (k >= 0) & (t0 < stop[np.clip(k, 0, None)])
        index = {c: i for i, c in enumerate(self.classes)}
        labels = np.array([index.get(v, IGNORE) for v in values[np.clip(k, 0, None)]], dtype=np.int64)
        return np.where(inside, labels, IGNORE) if len(t0) else np.zeros(0, np.int64)

    def fit(self, recordings: list[Recording], starts: list[np.ndarray], window: float) -> BehaviorTarget:
        """A copy with dims and standardisation from these (training) windows."""
        if self.kind == "classification":
            labels = np.concatenate([self.raw(r, t, window) for r, t in zip(recordings, starts)])
            if not (labels != IGNORE).any():
                raise RecordingError(recordings[0].path, f"intervals/trials/{self.names[0]}",
                                     f"no training window lies in a trial of class {self.classes}")
            return replace(self)
        values = np.concatenate([self.raw(r, t, window) for r, t in zip(recordings, starts)])
        dims = [recordings[0].behavior[name].dim for name in self.names]
        return replace(self, dims=dims, mean=values.mean(0).tolist(), std=(values.std(0) + 1e-6).tolist())

    def values(self, rec: Recording, t0: np.ndarray, window: float) -> np.ndarray:
        """Model-ready targets: standardised (n, D) float32, or (n,) int64 labels."""
        raw = self.raw(rec, t0, window)
        if self.kind == "classification":
            return raw
        return ((raw - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)

    def denormalise(self, y: np.ndarray) -> np.ndarray:
        """Regression predictions (..., D) back in the variables' own units."""
        return y * np.asarray(self.std) + np.asarray(self.mean)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "names": list(self.names), "classes": list(self.classes),
                "samples": self.samples, "dims": list(self.dims), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> BehaviorTarget:
        return cls(**d)
