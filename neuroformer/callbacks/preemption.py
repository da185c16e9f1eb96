"""Preemption: checkpoint at a step boundary, requeue the SLURM job, stop; resume from that checkpoint.

SLURM warns a job before its time limit with the signal of ``#SBATCH --signal=USR1@90``
and stops a preempted or requeued job with SIGTERM. On either, ``Preemption`` lets the
current optimizer step finish, writes ``checkpoints/last.ckpt`` (all ranks together, so
sharded checkpoints work), requeues the job on the warning signal, and stops training
right after the step's metrics are logged. The restarted job finds ``last.ckpt`` in the
same run folder (``resume_checkpoint``) and continues with the next step: the result has
exactly the optimizer steps of an uninterrupted run and no step is trained or logged twice.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from neuroformer.distributed.slurm import SlurmJob
from neuroformer.errors import ConfigError

log = logging.getLogger(__name__)


def last_checkpoint_path(callbacks: list[Callback], default_root_dir: str | Path) -> Path:
    """Where the run's resumable checkpoint lives: ``last.ckpt`` of its ``ModelCheckpoint``
    (or ``<default_root_dir>/checkpoints/last.ckpt`` without one)."""
    ckpt = next((cb for cb in callbacks if isinstance(cb, ModelCheckpoint)), None)
    folder = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(default_root_dir) / "checkpoints"
    return folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


def resume_checkpoint(callbacks: list[Callback], default_root_dir: str | Path) -> Path | None:
    """The checkpoint a restarted run continues from: ``last.ckpt`` if a previous attempt wrote one."""
    path = last_checkpoint_path(callbacks, default_root_dir)
    return path if path.exists() else None


class Preemption(Callback):
    """Checkpoint and stop at the next step boundary when SLURM signals; requeue on ``requeue_signal``.

    Args:
        requeue_signal: the warning signal SLURM sends before the time limit (the ``USR1``
            of ``#SBATCH --signal=USR1@90``): checkpoint, requeue the job, stop.
            SIGTERM (scheduler preemption, ``scontrol requeue``, ``scancel``): checkpoint, stop.
    """

    def __init__(self, requeue_signal: str = "SIGUSR1"):
        try:
            self.requeue_signal = signal.Signals[requeue_signal if requeue_signal.startswith("SIG") else
                                                 f"SIG{requeue_signal}"]
        except KeyError:
            raise ConfigError(f"slurm.requeue_signal: requeue_signal {requeue_signal!r} is not a signal name (e.g. SIGUSR1)") from None
        self._requested = False
        self._previous_handler: signal.Handlers | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only note it: the handler may run in the middle of a step.
        self._requested = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._requested = False
            self._previous_handler = signal.signal(self.requeue_signal, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous_handler is not None:
            # A late warning (during testing, registration) must not kill the finished job.
            previous = self._previous_handler
            signal.signal(self.requeue_signal, signal.SIG_IGN if previous == signal.SIG_DFL else previous)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # The optimizer and LR scheduler have stepped: the state is consistent here (Lightning
        # resumes a checkpoint taken in this hook with the next batch). Ranks decide together.
        if not trainer.strategy.reduce_boolean_decision(self._requested or trainer.received_sigterm, all=False):
            return
        requeue = trainer.strategy.reduce_boolean_decision(self._requested, all=False)
        path = last_checkpoint_path(trainer.callbacks, trainer.default_root_dir)
        trainer.save_checkpoint(path, weights_only=False)  # the full training state
        job = SlurmJob.from_env()
        log.warning("Preempted after %d optimizer steps: checkpoint %s", trainer.global_step, path)
        if requeue and trainer.is_global_zero:
            if job is None:
                log.warning("Not in a SLURM job: stopping without requeueing; rerun in the same run folder to resume")
            else:
                try:
                    job.requeue()
                except RuntimeError as err:  # still stop cleanly: the time limit is near
                    log.error("%s; resubmit with hydra.run.dir=%s to resume", err, trainer.default_root_dir)
        if not trainer.received_sigterm:
            # Lightning stops gracefully on SIGTERM once this step's metrics are logged.
            signal.raise_signal(signal.SIGTERM)
