"""MLflow tracking: where runs go, the Lightning logger that writes them, and a local server.

A run folder remembers its MLflow run (``mlflow_run_id`` next to the checkpoints), so a
requeued SLURM job, which reuses its run folder, continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from neuroformer.distributed.slurm import SlurmJob
from neuroformer.files import write_text


def tracking_uri(default_store: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a local SQLite store at ``default_store``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(default_store).resolve()}"


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_model``...) at ``uri`` inside the block.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which would send every
    later run of this process (a sweep, a test session) to this store; both are restored here.
    """
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    uri_before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(uri_before)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def mlflow_logger(experiment_name: str, store: str, artifact_root: str, run_name: str | None = None,
                  tracking: str | None = None, run_id: str | None = None,
                  run_id_file: str | None = None) -> MLFlowLogger:
    """A Lightning MLflow logger.

    Args:
        experiment_name: MLflow experiment.
        store: local SQLite file used when neither ``tracking`` nor ``MLFLOW_TRACKING_URI`` is set.
        artifact_root: artifact folder of new experiments in that local store (a server
            chooses its own, so this is ignored for http(s) tracking URIs).
        run_name: display name of the run.
        tracking: explicit tracking URI (overrides the environment).
        run_id: continue this existing run instead of starting one.
        run_id_file: file (in the run folder) that remembers the run: if it exists and
            ``run_id`` is not given, that run is continued; a new run's id is written to it.
    """
    uri = tracking or tracking_uri(store)
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    local = not uri.startswith(("http://", "https://", "databricks"))
    remembered = Path(run_id_file) if run_id_file else None
    if run_id is None and remembered is not None and remembered.exists():
        run_id = remembered.read_text().strip() or None
        if run_id and rank_zero_only.rank == 0:
            _check_run_exists(uri, run_id, remembered)
    artifact_location = str(Path(artifact_root).resolve()) if local else None
    if rank_zero_only.rank == 0:
        _ensure_experiment(uri, experiment_name, artifact_location)
    job = SlurmJob.from_env()
    logger = MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name,
        tracking_uri=uri,
        artifact_location=artifact_location,
        run_id=run_id,
        tags=job.tags() if job is not None and run_id is None else None,
    )
    if remembered is not None and rank_zero_only.rank == 0:
        _remember_run(logger, remembered)
    return logger


def log_run_config(logger: MLFlowLogger, params: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Log a run's flat config as MLflow params; a continued run logs only what is new.

    MLflow refuses to change a param once logged. A run continued with changed settings (a
    restart in the same run folder with, say, more epochs) records each change as a tag
    ``config_change/<key>`` = ``"old -> new"`` and all of them in an artifact
    ``config_changes/<time>.json``.

    Returns:
        the changed settings, ``{key: (old, new)}``.
    """
    client, run_id = logger.experiment, logger.run_id
    logged = client.get_run(run_id).data.params
    changes = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
    logger.log_hyperparams({k: v for k, v in params.items() if k not in logged})
    if changes:
        for key, (old, new) in changes.items():
            client.set_tag(run_id, f"config_change/{key}", f"{old} -> {new}"[:5000])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
            path.write_text(json.dumps({k: {"old": old, "new": new} for k, (old, new) in changes.items()}, indent=1))
            client.log_artifact(run_id, str(path), "config_changes")
    return changes


def _check_run_exists(uri: str, run_id: str, remembered: Path) -> None:
    """Refuse to continue a remembered run that this tracking store does not have."""
    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException as err:
        raise MlflowException(
            f"{remembered}: the run folder continues MLflow run {run_id}, which {uri} does not have "
            f"({err.error_code}); point MLFLOW_TRACKING_URI at the store it was started in, or delete "
            f"{remembered.name} to start a new run"
        ) from None


def _ensure_experiment(uri: str, name: str, artifact_location: str | None) -> None:
    """Create the experiment unless it exists; the jobs of a sweep may all try at once."""
    client = MlflowClient(uri)
    if client.get_experiment_by_name(name) is not None:
        return
    try:
        client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another job was first
            raise


def _remember_run(logger: MLFlowLogger, path: Path) -> None:
    """Start the run now and write its id to ``path`` (atomically), so a restart continues it."""
    run_id = logger.run_id  # creates the run on first access
    if not path.exists() or path.read_text().strip() != run_id:
        write_text(path, run_id + "\n")
    if job := SlurmJob.from_env():
        logger.experiment.set_tag(run_id, "slurm.restart_count", str(job.restart_count))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: str | Path, host: str = "127.0.0.1", port: int | None = None,
                  timeout: float = 120.0) -> Iterator[str]:
    """Run an MLflow tracking and registry server while the block runs; yields its URI.

    The server keeps runs and registered models in ``folder/mlflow.db`` (SQLite) and
    serves artifacts from ``folder/artifacts``; clients only need the URI.

    Raises:
        RuntimeError: the server did not answer within ``timeout`` seconds (its log is quoted).
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    uri = f"http://{host}:{port}"
    log_path = folder / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"), "--workers", "1",
    ]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server at {uri} did not start: {log_path}:\n"
                                   + log_path.read_text()[-3000:])
            time.sleep(0.5)
        yield uri
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
