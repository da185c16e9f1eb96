"""MDS clustering as a Lightning callback: at the end of training (or every N epochs), cluster
the units of the model being trained by their most discriminative stimuli (docs/mds.md).

Works on any task whose ``model`` implements ``predict_responses`` and whose ``spec`` is a
``ResponseSpec`` (the digital twin, ``experiment=twin``). Each run writes ``stimuli.png``,
``assignments.csv``, ``stimuli.npy`` and ``mds.json`` (``neuroformer.mds.run_mds``) into
``<out>/final`` or ``<out>/epoch<N>``, and logs to MLflow the number of clusters, J per
cluster, the mean J and (with known cell types) the adjusted Rand indices as ``mds/...``
metrics, and the files as artifacts under ``mds/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from neuroformer.data.responses import ResponseSpec
from neuroformer.errors import ConfigError
from neuroformer.inference.mds import MDSConfig
from neuroformer.mds import headline, run_mds

log = logging.getLogger(__name__)


class MDSCallback(Callback):
    """Run MDS on the trained model (module docstring).

    Args:
        out_dir: folder of the results (the run folder's ``mds``).
        every_n_epochs: also run after every N-th training epoch (0: only at the end).
        n_reference: training clips used as reference stimuli.
        **settings: ``MDSConfig`` fields.
    """

    def __init__(self, out_dir: str, every_n_epochs: int = 0, n_reference: int = 1024, **settings):
        self.out_dir, self.every_n_epochs, self.n_reference = Path(out_dir), every_n_epochs, n_reference
        self.config = MDSConfig(**settings)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module.model, "predict_responses") or not isinstance(pl_module.spec, ResponseSpec):
            raise ConfigError(f"callbacks.mds needs a model that predicts responses to stimulus clips "
                              f"(predict_responses), as experiment=twin trains; this run trains a "
                              f"{type(pl_module.model).__name__}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and epoch < (trainer.max_epochs or 0):
            self._run(trainer, pl_module, f"epoch{epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module, "final")

    @rank_zero_only
    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        out = self.out_dir / name
        rec = trainer.datamodule.recordings[0]
        summary = run_mds(pl_module.model, pl_module.spec, rec, out, self.config, self.n_reference)
        log.info("%s (%s)", headline(summary), out)
        metrics = {"mds/n_clusters": float(summary["n_clusters"]), "mds/mean_J": summary["mean_J"],
                   **{f"mds/J_{k}": j for k, j in enumerate(summary["objective"])},
                   **{f"mds/{k}": summary[k] for k in ("ari_tuned", "ari_tuned_kmeans") if k in summary}}
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.log_metrics(metrics, step=trainer.global_step)
                for file in ("stimuli.png", "assignments.csv", "mds.json", "stimuli.npy"):
                    logger.experiment.log_artifact(logger.run_id, str(out / file), f"mds/{name}")
