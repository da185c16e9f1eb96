"""SLURM job identity: which job (or array task) this process belongs to, and how to requeue it.

A requeued job keeps its job id, so everything derived from it (the run folder, whose
``checkpoints/last.ckpt`` and ``mlflow_run_id`` file let the job continue where it stopped)
survives preemption. ``conf/hydra/default.yaml`` names the run folder after ``SLURM_JOB_ID``.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlurmJob:
    """The SLURM job of this process, read from the environment SLURM gives it.

    Attributes:
        job_id: ``SLURM_JOB_ID`` (each array task has its own).
        array_job_id, array_task_id: the array and this task's index, for job arrays.
        restart_count: how many times the job was requeued (``SLURM_RESTART_COUNT``).
        name: ``SLURM_JOB_NAME``.
    """

    job_id: str
    array_job_id: str | None = None
    array_task_id: str | None = None
    restart_count: int = 0
    name: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlurmJob | None:
        """The job this process runs in, or None outside SLURM."""
        env = os.environ if env is None else env
        if not env.get("SLURM_JOB_ID"):
            return None
        return cls(
            job_id=env["SLURM_JOB_ID"],
            array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
            array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
            restart_count=int(env.get("SLURM_RESTART_COUNT") or 0),
            name=env.get("SLURM_JOB_NAME", ""),
        )

    @property
    def requeue_id(self) -> str:
        """The id ``scontrol requeue`` takes: ``ARRAY_TASK`` for an array task, else the job id."""
        if self.array_job_id and self.array_task_id:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id

    def requeue(self) -> None:
        """Put this job back in the queue (SLURM then stops the running one and restarts it later).

        Raises:
            RuntimeError: ``scontrol`` failed, e.g. the job was submitted with ``--no-requeue``.
        """
        cmd = ["scontrol", "requeue", self.requeue_id]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(
                f"SLURM job {self.requeue_id}: `{' '.join(cmd)}` failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}; submit with --requeue (see slurm/README.md)"
            )
        log.info("Requeued SLURM job %s (restart %d)", self.requeue_id, self.restart_count + 1)

    def tags(self) -> dict[str, str]:
        """MLflow run tags that tie a run to this job."""
        tags = {"slurm.job_id": self.job_id, "slurm.restart_count": str(self.restart_count)}
        if self.array_job_id and self.array_task_id:
            tags["slurm.array"] = self.requeue_id
        return tags
