"""``train(cfg)``: compose data, model, task, trainer and logger from a Hydra config and run.

The top-level ``train.py`` is a thin ``@hydra.main`` around this function; tests and
sweeps call it directly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from neuroformer import registry
from neuroformer.data.datamodule import NWBDataModule
from neuroformer.metrics.baselines import unigram_cross_entropy

log = logging.getLogger(__name__)


def _flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as flat ``a/b/c -> value`` strings (MLflow params)."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            flat[prefix] = str(node)[:500]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def train(cfg: DictConfig) -> float:
    """Fit, test, compare with the unigram baseline, log and register; returns the optimised metric."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    datamodule: NWBDataModule = instantiate(cfg.data)
    datamodule.setup()
    model = instantiate(cfg.model)(spec=datamodule.spec)
    task = instantiate(cfg.task)(model=model, spec=datamodule.spec)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(cb) for cb in (cfg.get("callbacks") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    mlflow_logger = next((lg for lg in loggers if isinstance(lg, MLFlowLogger)), None)
    for lg in loggers:
        lg.log_hyperparams(_flat_params(cfg))
    log.info("Model: %.2fM parameters; data: %s", sum(p.numel() for p in model.parameters()) / 1e6,
             ", ".join(str(f) for f in datamodule.files))

    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    (result,) = trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=False)

    train_counts = datamodule.datasets["train"].target_counts()
    test_counts = datamodule.datasets["test"].target_counts()
    metrics = {k: float(v) for k, v in result.items()}
    metrics["test/id_ce_unigram"] = unigram_cross_entropy(train_counts, test_counts)
    metrics["test/id_ce_vs_unigram"] = metrics["test/id_ce"] / metrics["test/id_ce_unigram"] - 1
    metrics["test/n_tokens"] = float(test_counts.sum())
    metrics["n_parameters"] = float(sum(p.numel() for p in model.parameters()))

    model_uri = None
    if mlflow_logger is not None and not trainer.fast_dev_run:
        mlflow.set_tracking_uri(mlflow_logger._tracking_uri)
        with mlflow.start_run(run_id=mlflow_logger.run_id):
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in metrics.items() if np.isfinite(v)})
            reg = cfg.get("registry") or {}
            model_uri = registry.log_model(
                task.model, datamodule.spec, OmegaConf.to_yaml(cfg, resolve=True),
                registered_name=reg.get("model_name") if reg.get("register", True) else None,
                alias=reg.get("alias"),
            )
        metrics_run = {"mlflow_run_id": mlflow_logger.run_id, "mlflow_tracking_uri": mlflow_logger._tracking_uri}
    else:
        metrics_run = {}
    summary = {**metrics, **metrics_run, "model_uri": model_uri, "best_checkpoint": best}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    if mlflow_logger is not None and not trainer.fast_dev_run:
        mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, str(out_dir / "metrics.json"))

    print(
        f"\nTest ID cross-entropy {metrics['test/id_ce']:.4f} nats vs unigram baseline "
        f"{metrics['test/id_ce_unigram']:.4f} ({100 * metrics['test/id_ce_vs_unigram']:+.1f}%)\n"
        f"Run folder:  {out_dir}\nMetrics:     {out_dir / 'metrics.json'}\n"
        + (f"MLflow:      {metrics_run['mlflow_tracking_uri']} (run {metrics_run['mlflow_run_id']})\n" if metrics_run else "")
        + (f"Model:       {model_uri}\n" if model_uri else "")
    )
    return metrics[cfg.get("optimized_metric", "test/id_ce")]
