"""Progress a person can follow in a log file (a SLURM job's output, ``python train.py > log``).

A progress bar redraws one terminal line; written to a file it is either nothing or a wall of
carriage returns. When the output is not a terminal, ``ProgressLog`` writes a plain line every
``every_n_steps`` optimizer steps or ``every_seconds`` seconds, whichever comes first:

    epoch 2/4  step 640/1196 (54%)  train/loss 4.812  126.3 windows/s  elapsed 5m04s  left 4m24s

and one line per validation with its metrics. On a terminal it stays silent (the bar is there).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size

log = logging.getLogger("neuroformer.progress")


def _duration(seconds: float) -> str:
    """``1h02m``, ``5m04s`` or ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def output_is_terminal() -> bool:
    """True when stdout is an interactive terminal (then a progress bar shows progress)."""
    return sys.stdout.isatty()


class ProgressLog(Callback):
    """Plain progress lines when the output is not a terminal (see the module docstring).

    Args:
        every_n_steps: write a line at least every this many optimizer steps.
        every_seconds: ...and at least every this many seconds.
        always: also write them on a terminal.
    """

    def __init__(self, every_n_steps: int = 100, every_seconds: float = 60.0, always: bool = False):
        self.every_n_steps, self.every_seconds, self.always = every_n_steps, every_seconds, always
        self._began = self._last_time = 0.0
        self._last_step = self._first_step = 0
        self._windows = 0

    @property
    def active(self) -> bool:
        return self.always or not output_is_terminal()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._began = self._last_time = time.monotonic()
        self._first_step = self._last_step = trainer.global_step
        self._windows = 0
        if self.active and trainer.is_global_zero:
            total = trainer.estimated_stepping_batches
            log.info("Training: %s optimizer steps%s", total if math.isfinite(total) else "until stopped",
                     f", resuming at step {trainer.global_step}" if trainer.global_step else "")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        count = getattr(pl_module, "windows_in", extract_batch_size)
        self._windows += count(batch)
        now, step = time.monotonic(), trainer.global_step
        due = step - self._last_step >= self.every_n_steps or now - self._last_time >= self.every_seconds
        if not (due and self.active and trainer.is_global_zero):
            return
        self._last_step, self._last_time = step, now
        log.info(self.line(trainer, outputs, now))

    def line(self, trainer: L.Trainer, outputs: Any, now: float) -> str:
        """One progress line: epoch, step of total, loss, throughput, time spent and left."""
        elapsed = now - self._began
        total, step = trainer.estimated_stepping_batches, trainer.global_step
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{epochs}"]
        if math.isfinite(total) and total > 0:
            parts.append(f"step {step}/{int(total)} ({100 * step / total:.0f}%)")
        else:
            parts.append(f"step {step}")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            parts.append(f"train/loss {float(loss):.4f}")
        if self._windows > 0 and elapsed > 0:
            parts.append(f"{self._windows / elapsed:.1f} windows/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        done = step - self._first_step
        if math.isfinite(total) and done > 0:
            parts.append(f"left {_duration(elapsed / done * max(0, total - step))}")
        return "  ".join(parts)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.active and trainer.is_global_zero) or trainer.sanity_checking:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
        if shown:
            log.info("validation after step %d: %s", trainer.global_step,
                     "  ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())))
