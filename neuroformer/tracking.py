"""MLflow tracking: where runs go, and the Lightning logger that writes them."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger


def tracking_uri(default_store: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a local SQLite store at ``default_store``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(default_store).resolve()}"


def mlflow_logger(experiment_name: str, store: str, artifact_root: str, run_name: str | None = None,
                  tracking: str | None = None, run_id: str | None = None) -> MLFlowLogger:
    """A Lightning MLflow logger.

    Args:
        experiment_name: MLflow experiment.
        store: local SQLite file used when neither ``tracking`` nor ``MLFLOW_TRACKING_URI`` is set.
        artifact_root: artifact folder of new experiments in that local store (a server
            chooses its own, so this is ignored for http(s) tracking URIs).
        run_name: display name of the run.
        tracking: explicit tracking URI (overrides the environment).
        run_id: continue this existing run (e.g. a requeued job) instead of starting one.
    """
    uri = tracking or tracking_uri(store)
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    local = not uri.startswith(("http://", "https://", "databricks"))
    return MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name,
        tracking_uri=uri,
        artifact_location=str(Path(artifact_root).resolve()) if local else None,
        run_id=run_id,
    )
