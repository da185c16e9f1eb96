"""Lightning plugins of every run: atomic checkpoint writing and, inside SLURM, its cluster environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from neuroformer.files import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint under a temporary name, then renames it: a crash or preemption
    mid-write never leaves a torn file (``conf/trainer/default.yaml``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def cluster_plugins() -> list[SLURMEnvironment]:
    """Trainer plugins for this process: SLURM's environment inside a SLURM job step, else none.

    Ranks, world size and the master address come from SLURM (``srun``, one task per
    device). Lightning's own auto-requeue is off: it checkpoints from inside the signal
    handler, in the middle of a step, and keeps training until SLURM kills the job;
    ``neuroformer.callbacks.preemption.Preemption`` checkpoints at a step boundary and
    stops at once instead.
    """
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
