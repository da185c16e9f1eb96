"""Train/validation/test splits as contiguous time blocks, and the windows inside them.

The rule (also in docs/data.md):

1. The recording's span ``[start, stop)`` is cut into ``n_blocks`` equal contiguous blocks.
2. A seeded permutation of the blocks gives the first ``round(test_fraction * n_blocks)``
   (at least 1) to test, the next ``round(val_fraction * n_blocks)`` (at least 1) to
   validation, the rest to training. Same seed, same split.
3. A window is kept only if its whole span, past window included,
   ``[t0 - past_window, t0 + window)``, lies inside one block. So the stretch of
   ``past_window`` seconds at the start of each block is a gap that no window's target
   covers: no test target is ever a training input, nor the reverse.
4. Optionally (``restrict_to``), windows must also lie inside an interval table's rows
   (e.g. trials), for trial-structured recordings with dead time between trials.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuroformer.data.recording import Intervals
from neuroformer.errors import ConfigError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSpec:
    """How to split one recording. Fractions are of blocks, not of time points."""

    n_blocks: int = 10
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def assign(self) -> np.ndarray:
        """(n_blocks,) split name of each block."""
        if self.n_blocks < 3:
            raise ConfigError(f"data.split.n_blocks must be >= 3 to hold train, val and test; got {self.n_blocks}")
        n_test = max(1, round(self.test_fraction * self.n_blocks))
        n_val = max(1, round(self.val_fraction * self.n_blocks))
        if n_test + n_val >= self.n_blocks:
            raise ConfigError("data.split.val_fraction + test_fraction leave no block for training")
        order = np.random.default_rng(self.seed).permutation(self.n_blocks)
        names = np.array(["train"] * self.n_blocks, dtype=object)
        names[order[:n_test]] = "test"
        names[order[n_test : n_test + n_val]] = "val"
        return names

    def blocks(self, start: float, stop: float, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi), each (n,): the time spans of the blocks of ``[start, stop)`` assigned to ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        edges = np.linspace(start, stop, self.n_blocks + 1)
        mine = self.assign() == split
        return edges[:-1][mine], edges[1:][mine]


def window_starts(
    start: float,
    stop: float,
    spec: SplitSpec,
    split: str,
    window: float,
    past_window: float,
    stride: float,
    restrict_to: Intervals | None = None,
) -> np.ndarray:
    """Start times ``t0`` of the current windows of one split.

    Args:
        start, stop: the recording's span, seconds.
        spec: the block split.
        split: "train", "val" or "test".
        window, past_window: lengths in seconds; stride: spacing of consecutive ``t0``.
        restrict_to: optional intervals the whole window span must lie in.

    Returns:
        (n,) sorted float64 window starts.
    """
    starts = []
    for lo, hi in zip(*spec.blocks(start, stop, split)):
        first, last = lo + past_window, hi - window
        if last >= first:
            starts.append(first + stride * np.arange(int(np.floor((last - first) / stride + 1e-9)) + 1))
    t0 = np.concatenate(starts) if starts else np.zeros(0)
    if restrict_to is not None and len(restrict_to):
        # The interval holding each window's beginning must also hold its end.
        row = restrict_to.containing(t0 - past_window)
        t0 = t0[(row >= 0) & (t0 + window <= restrict_to.stop[row])]
    return np.sort(t0)
