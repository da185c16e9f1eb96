"""Where a model's data came from and how it was read: saved with every trained model.

A ``DataSource`` travels inside each family's data spec (``spec.source``), in checkpoints and in
the registry, so evaluation and inference read "the same recording with the same
preprocessing" without guessing it from config defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from neuroformer.data.nwb import read_nwb
from neuroformer.data.recording import Recording


@dataclass(frozen=True)
class DataSource:
    """The recordings a model was trained on and the reader options they were read with.

    Attributes:
        files: absolute paths of the NWB files, in session order.
        behavior_nan: the reader's NaN policy for behaviour ("refuse", "interpolate", "mask").
        stimulus: the stimulus series chosen when a file has several, or None.
        restrict_to: the interval table windows had to lie in (e.g. "trials"), or None.
        behavior_max_gap: behaviour samples further apart than this (seconds) leave a gap with
            no value (None: ten sampling intervals).
    """

    files: tuple[str, ...] = ()
    behavior_nan: str = "refuse"
    stimulus: str | None = None
    restrict_to: str | None = None
    behavior_max_gap: float | None = None

    def read(self, index: int = 0) -> Recording:
        """Recording ``index`` read as it was for training."""
        return read_nwb(self.files[index], behavior_nan=self.behavior_nan, stimulus=self.stimulus,
                        behavior_max_gap=self.behavior_max_gap)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = list(self.files)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> DataSource:
        d = dict(d or {})
        d["files"] = tuple(str(Path(f)) for f in d.get("files", ()))
        return cls(**d)
