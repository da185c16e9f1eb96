"""``train(cfg)``: compose, fit, test, log, register, evaluate and report, for any model family.

The task class named by ``cfg.task._target_`` (a ``neuroformer.tasks.base.Task``) builds the
data module, the model and itself (``Task.compose``) and answers every family-specific question:
its baselines and metrics, the lines to print, its figures, its evaluation, its model card.
The top-level ``train.py`` is a thin ``@hydra.main`` around this function; tests and sweeps
call it directly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from neuroformer import plots
from neuroformer.callbacks.preemption import resume_checkpoint
from neuroformer.callbacks.progress import output_is_terminal
from neuroformer.distributed.checkpoints import checkpoint_metadata, is_sharded_checkpoint
from neuroformer.distributed.plugins import cluster_plugins
from neuroformer.errors import ConfigError
from neuroformer.files import atomic_path, write_json
from neuroformer.registry import LoadedModel, load, log_model
from neuroformer.registry.families import CARD_KEY
from neuroformer.registry.tracking import log_run_config, use_tracking_uri
from neuroformer.tasks.base import Task

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


@contextmanager
def _active_run(logger: MLFlowLogger) -> Iterator[mlflow.ActiveRun]:
    """The logger's run as MLflow's active run, whatever experiment an earlier run left active."""
    with use_tracking_uri(logger._tracking_uri):
        mlflow.set_experiment(experiment_id=logger.experiment_id)
        with mlflow.start_run(run_id=logger.run_id) as run:
            yield run


def _headline(task: Task, metrics: dict[str, float]) -> str:
    """The evaluation numbers a person reads first (the family's ``headline_metrics``)."""
    keys = [k for k in task.model_family.headline_metrics if k in metrics] or list(metrics)[:4]
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys)


def train(cfg: DictConfig) -> float:
    """Fit, test, compare with the family's baselines, log, register and evaluate; returns the
    metric a sweeper optimises (``cfg.optimized_metric``).

    A run that fails after its MLflow run was opened ends that run FAILED, with the error as
    the tag ``neuroformer.error``; it writes no metrics.json and registers no model.
    """
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    task_class: type[Task] = get_class(cfg.task._target_)
    task, datamodule = task_class.compose(cfg)
    task.train_config = OmegaConf.to_yaml(cfg, resolve=True)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    mlflow_logger = next((lg for lg in loggers if isinstance(lg, MLFlowLogger)), None)
    try:
        return _fit_test_register(cfg, task, datamodule, loggers, mlflow_logger, out_dir)
    except BaseException as err:
        if mlflow_logger is not None and rank_zero_only.rank == 0:
            mlflow_logger.experiment.set_tag(mlflow_logger.run_id, "neuroformer.error",
                                             f"{type(err).__name__}: {err}"[:5000])
            mlflow_logger.experiment.set_terminated(mlflow_logger.run_id, "FAILED")
        raise


def _callbacks(cfg: DictConfig, has_logger: bool) -> list[Callback]:
    """The configured callbacks; those that need a logger only with one (``logger=none``)."""
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        callback = instantiate(node)
        if isinstance(callback, LearningRateMonitor) and not has_logger:
            log.info("No logger: callback %s (%s) left out", name, type(callback).__name__)
            continue
        callbacks.append(callback)
    return callbacks


def _check_resumable(task: Task, ckpt_path: str | Path) -> None:
    """Refuse to resume ``ckpt_path`` with a model that differs from the one it holds."""
    card = checkpoint_metadata(ckpt_path).get(CARD_KEY)
    if card is None:
        return
    plain = lambda d: json.loads(json.dumps(d))  # noqa: E731 (tuples and lists compare alike)
    saved, now = plain(card["model_config"]), plain(task.model_card()["model_config"])
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if card.get("family") != task.family or changed:
        what = ", ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in changed) or f"family {card.get('family')}"
        raise ConfigError(f"{ckpt_path}: cannot resume this checkpoint with a different model ({what}); "
                          "model settings cannot change when a run continues: revert them, or start a new run "
                          "folder (another hydra.run.dir, or auto_resume=false)")


def _fit_test_register(cfg: DictConfig, task: Task, datamodule: L.LightningDataModule, loggers: list,
                       mlflow_logger: MLFlowLogger | None, out_dir: Path) -> float:
    callbacks = _callbacks(cfg, has_logger=bool(loggers))
    plugins = [*instantiate(cfg.trainer.get("plugins") or []), *cluster_plugins()]
    # A progress bar for a terminal; plain progress lines (callbacks.progress_log) for log files.
    bar = cfg.trainer.get("enable_progress_bar", output_is_terminal())
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins,
                                     enable_progress_bar=bar)
    # A restarted (requeued) job continues from its run folder's last checkpoint.
    ckpt_path = cfg.get("ckpt_path") or (
        resume_checkpoint(callbacks, trainer.default_root_dir) if cfg.get("auto_resume") else None)
    if ckpt_path:
        _check_resumable(task, ckpt_path)
    params = _flat_params(cfg)
    for lg in loggers:
        if isinstance(lg, MLFlowLogger):
            changes = log_run_config(lg, params) if rank_zero_only.rank == 0 else {}
            if changes:
                log.warning("Continuing MLflow run %s with changed settings (recorded as config_change/* tags): %s",
                            lg.run_id, "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items()))
        else:
            lg.log_hyperparams(params)
    n_parameters = sum(p.numel() for p in task.model.parameters())  # before fit: ZeRO-3 leaves empty shards
    log.info("Model: %s, %.2fM parameters; data: %s", task.family, n_parameters / 1e6,
             ", ".join(str(f) for f in task.spec.source.files))

    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    (result,) = trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
    metrics = task.summarize({k: float(v) for k, v in result.items()}, datamodule)
    metrics["n_parameters"] = float(n_parameters)
    if not trainer.is_global_zero:  # test metrics are synced across ranks; rank 0 alone logs and registers
        return _optimized(cfg, metrics)

    # Buffers set after fit (the read-out calibration of on_test_start) go into the best checkpoint
    # file, so that it is the model that was tested. A sharded (DeepSpeed) folder is left as it is: it
    # comes back consolidated into a fresh model with full fp32 weights, which gets them here.
    model = task.model
    if best and is_sharded_checkpoint(best):
        model = load(best).model
        model.load_state_dict(dict(task.model.named_buffers()), strict=False)
    elif best:
        _store_buffers(best, task)
    trained = LoadedModel(model, task.spec, task.family, task.train_config, best)
    logging_run = mlflow_logger is not None and not trainer.fast_dev_run
    model_uri = None
    if logging_run:
        with _active_run(mlflow_logger):
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in metrics.items() if np.isfinite(v)})
            reg = cfg.get("registry") or {}
            model_uri = log_model(trained, registered_name=reg.get("model_name") if reg.get("register", True) else None,
                                  alias=reg.get("alias"))
        run_info = {"mlflow_run_id": mlflow_logger.run_id, "mlflow_tracking_uri": mlflow_logger._tracking_uri}
    else:
        run_info = {}
    write_json(out_dir / "metrics.json", {**metrics, **run_info, "model_uri": model_uri, "best_checkpoint": best})
    artifacts = [out_dir / "metrics.json"] + [plots.save(fig, out_dir / name) for name, fig in task.figures().items()]
    evaluation = None
    if not trainer.fast_dev_run:
        # On the training device (a consolidated sharded model comes back on the CPU).
        trained.model = model.to(trainer.strategy.root_device).eval()
        trained.uri = model_uri or best
        evaluate_cfg = cfg.get("evaluate")
        settings = OmegaConf.to_container(evaluate_cfg, resolve=True) if evaluate_cfg is not None else None
        evaluation = task.evaluate(trained, datamodule, out_dir / "evaluation", settings)
    if logging_run:
        for path in artifacts:
            mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, str(path))
        if evaluation is not None:
            mlflow_logger.log_metrics({f"eval/{k}": v for k, v in evaluation["metrics"].items() if np.isfinite(v)})
            for name in ["metrics.json", *evaluation["plots"]]:
                mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, str(out_dir / "evaluation" / name),
                                                      "evaluation")

    print("\n" + "\n".join([
        *task.report(metrics),
        f"Run folder:  {out_dir}",
        f"Metrics:     {out_dir / 'metrics.json'}",
        *([f"MLflow:      {run_info['mlflow_tracking_uri']} (run {run_info['mlflow_run_id']})"] if run_info else []),
        *([f"Model:       {model_uri}"] if model_uri else []),
        *([f"Evaluation:  {out_dir / 'evaluation'} ({_headline(task, evaluation['metrics'])})"] if evaluation else []),
    ]) + "\n")
    return _optimized(cfg, metrics)


def _store_buffers(path: str, task: Task) -> None:
    """Write ``task``'s buffers into the checkpoint file at ``path`` (atomically) where they differ from it."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    changed = {name: buffer.detach().cpu() for name, buffer in task.named_buffers()
               if name in state and not torch.equal(state[name], buffer.detach().cpu())}
    if changed:
        state.update(changed)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def _optimized(cfg: DictConfig, metrics: dict[str, float]) -> float:
    """The metric a sweeper optimises (``cfg.optimized_metric``); asked for once the run is saved."""
    key = cfg.get("optimized_metric", "test/loss")
    if key not in metrics:
        raise ConfigError(f"optimized_metric: {key!r} is not a metric of this run (saved in metrics.json all the "
                          f"same); it has {sorted(metrics)}")
    return metrics[key]
