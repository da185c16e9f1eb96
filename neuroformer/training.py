"""``train(cfg)``: compose data, model, task, trainer and logger from a Hydra config and run.

The top-level ``train.py`` is a thin ``@hydra.main`` around this function; tests and
sweeps call it directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
import logging
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from neuroformer import plots, registry
from neuroformer.data.datamodule import NWBDataModule
from neuroformer.distributed.checkpoints import is_sharded_checkpoint, load_neuroformer
from neuroformer.distributed.preemption import resume_checkpoint
from neuroformer.distributed.slurm import cluster_plugins
from neuroformer.evaluate import EvaluationConfig, evaluate
from neuroformer.metrics.baselines import unigram_cross_entropy
from neuroformer.models.transfer import extend_vocabulary
from neuroformer.tracking import tracking_uri, use_tracking_uri

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


def _pretrained(cfg: DictConfig) -> registry.LoadedModel | None:
    """The registered model that ``task.pretrained`` names (from the run's MLflow store), or None."""
    uri = cfg.task.get("pretrained")
    if not uri:
        return None
    store = OmegaConf.select(cfg, "logger.mlflow.store", default=f"{cfg.paths.output_root}/mlflow.db")
    log.info("Fine-tuning %s: its tokenizer, inputs and sizes replace data.* and model.* settings", uri)
    with use_tracking_uri(OmegaConf.select(cfg, "logger.mlflow.tracking") or tracking_uri(store)):
        return registry.load_model(uri)


@contextmanager
def _active_run(logger: MLFlowLogger) -> Iterator[mlflow.ActiveRun]:
    """The logger's run as MLflow's active run, whatever experiment an earlier run left active."""
    mlflow.set_experiment(experiment_id=logger.experiment_id)
    with mlflow.start_run(run_id=logger.run_id) as run:
        yield run


def _headline(m: dict[str, float]) -> str:
    """The evaluation numbers a person reads first."""
    keys = {"bits_per_spike": "bits/spike", "psth_r_median": "PSTH r", "spike_f1": "spike F1",
            "connectivity_auroc": "connectivity AUROC"}
    return ", ".join(f"{label} {m[k]:.3f}" for k, label in keys.items() if k in m)


def train(cfg: DictConfig) -> float:
    """Fit, test, compare with the unigram baseline, log and register; returns the optimised metric."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    pretrained = _pretrained(cfg)
    # (partial: Hydra would turn a dataclass keyword argument into config)
    datamodule: NWBDataModule = instantiate(cfg.data, _partial_=True)(reference=pretrained.spec if pretrained else None)
    datamodule.setup()
    if pretrained is not None:  # its vocabulary extended with the data's new units, if any
        model = extend_vocabulary(pretrained.model, pretrained.spec.vocab, datamodule.spec.vocab)
        transfer = {"pretrained_vocab": pretrained.spec.vocab}
    else:
        model, transfer = instantiate(cfg.model)(spec=datamodule.spec), {}
    # Plain containers in the hyperparameters, so checkpoints load with weights_only=True.
    task = instantiate(cfg.task, _convert_="all")(model=model, spec=datamodule.spec, **transfer)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(cb) for cb in (cfg.get("callbacks") or {}).values()]
    plugins = [*instantiate(cfg.trainer.get("plugins") or []), *cluster_plugins()]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins)
    mlflow_logger = next((lg for lg in loggers if isinstance(lg, MLFlowLogger)), None)
    for lg in loggers:
        lg.log_hyperparams(_flat_params(cfg))
    n_parameters = sum(p.numel() for p in model.parameters())  # before fit: ZeRO-3 leaves empty shards
    log.info("Model: %.2fM parameters; data: %s", n_parameters / 1e6,
             ", ".join(str(f) for f in datamodule.files))

    # A restarted (requeued) job continues from its run folder's last checkpoint.
    ckpt_path = cfg.get("ckpt_path") or (
        resume_checkpoint(callbacks, trainer.default_root_dir) if cfg.get("auto_resume") else None)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    (result,) = trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=True)

    train_counts = datamodule.datasets["train"].target_counts()
    test_counts = datamodule.datasets["test"].target_counts()
    metrics = {k: float(v) for k, v in result.items()}
    metrics["test/id_ce_unigram"] = unigram_cross_entropy(train_counts, test_counts)
    metrics["test/id_ce_vs_unigram"] = metrics["test/id_ce"] / metrics["test/id_ce_unigram"] - 1
    metrics["test/n_tokens"] = float(test_counts.sum())
    metrics["n_parameters"] = float(n_parameters)
    if not trainer.is_global_zero:  # test metrics are synced across ranks; rank 0 alone logs and registers
        return metrics[cfg.get("optimized_metric", "test/id_ce")]

    logging_run = mlflow_logger is not None and not trainer.fast_dev_run
    # A sharded (DeepSpeed) checkpoint is consolidated into a fresh model with full fp32 weights.
    best_model = load_neuroformer(best)[0] if best and is_sharded_checkpoint(best) else task.model
    train_config = OmegaConf.to_yaml(cfg, resolve=True)
    model_uri = None
    if logging_run:
        with use_tracking_uri(mlflow_logger._tracking_uri), _active_run(mlflow_logger):
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in metrics.items() if np.isfinite(v)})
            reg = cfg.get("registry") or {}
            model_uri = registry.log_model(
                best_model, datamodule.spec, train_config,
                registered_name=reg.get("model_name") if reg.get("register", True) else None,
                alias=reg.get("alias"),
            )
        metrics_run = {"mlflow_run_id": mlflow_logger.run_id, "mlflow_tracking_uri": mlflow_logger._tracking_uri}
    else:
        metrics_run = {}
    summary = {**metrics, **metrics_run, "model_uri": model_uri, "best_checkpoint": best}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    artifacts = [out_dir / "metrics.json"] + [plots.save(fig, out_dir / name) for name, fig in task.figures().items()]
    evaluation = None
    if cfg.get("evaluate") and not trainer.fast_dev_run:
        # On the training device (a consolidated sharded model comes back on the CPU).
        loaded = registry.LoadedModel(best_model.to(trainer.strategy.root_device).eval(), datamodule.spec,
                                      train_config, model_uri or best)
        evaluation = evaluate(loaded, datamodule.recordings[0], out_dir / "evaluation",
                              EvaluationConfig(**OmegaConf.to_container(cfg.evaluate, resolve=True)))
    if logging_run:
        for path in artifacts:
            mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, str(path))
        if evaluation is not None:
            mlflow_logger.log_metrics({f"eval/{k}": v for k, v in evaluation["metrics"].items() if np.isfinite(v)})
            for name in ["metrics.json", *evaluation["plots"]]:
                mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, str(out_dir / "evaluation" / name),
                                                      "evaluation")

    print(
        f"\nTest ID cross-entropy {metrics['test/id_ce']:.4f} nats vs unigram baseline "
        f"{metrics['test/id_ce_unigram']:.4f} ({100 * metrics['test/id_ce_vs_unigram']:+.1f}%)\n"
        + (f"Test behaviour R^2 {metrics['test/behavior_r2']:.4f} vs training mean "
           f"{metrics['test/behavior_r2_train_mean']:.4f}\n" if "test/behavior_r2" in metrics else "")
        + f"Run folder:  {out_dir}\nMetrics:     {out_dir / 'metrics.json'}\n"
        + (f"MLflow:      {metrics_run['mlflow_tracking_uri']} (run {metrics_run['mlflow_run_id']})\n" if metrics_run else "")
        + (f"Model:       {model_uri}\n" if model_uri else "")
        + (f"Evaluation:  {out_dir / 'evaluation'} ({_headline(evaluation['metrics'])})\n" if evaluation else "")
    )
    return metrics[cfg.get("optimized_metric", "test/id_ce")]
