"""The model-family contract: what every family's LightningModule tells ``train(cfg)``.

``train(cfg)`` (``neuroformer/training.py``) knows no family: it asks the task class named by
``cfg.task._target_`` to ``compose`` the data module, model and task, fits and tests them, then
asks the task for its summary (baselines next to the test metrics), the lines to print, its
figures and its after-test evaluation, and registers ``task.model`` through the family's
``ModelFamily`` (``neuroformer.registry.families``). docs/architecture.md, "Adding a model
family", walks through a new family.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.data import extract_batch_size
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import nn

from neuroformer.evaluate import evaluate
from neuroformer.models.dendrites import apply_structure
from neuroformer.registry.families import CARD_KEY, LoadedModel, ModelFamily, dendrite_card, family

SPLITS = ("train", "val", "test")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Task(L.LightningModule):
    """Base of every family's LightningModule (see the module docstring).

    A subclass sets ``family`` (a key of ``registry.families.FAMILIES``), keeps its network in
    ``self.model`` and its data spec in ``self.spec``, and overrides what differs from the
    defaults below. Training steps go in ``step(batch, split) -> loss``.
    """

    family: ClassVar[str]
    model: nn.Module
    spec: Any
    train_config: str = ""  # the resolved training config (YAML), set by train(); kept in checkpoints

    # ------------------------------------------------------------------ building

    @classmethod
    def compose(cls, cfg: DictConfig) -> tuple[Task, L.LightningDataModule]:
        """The data module (set up), the model sized from its spec, and the task around it.

        ``cfg.data`` and ``cfg.model`` are partials taking the data module's spec: the default
        builds ``data``, then ``model(spec=...)``, then ``task(model=..., spec=...)``.
        """
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.setup()
        model = instantiate(cfg.model)(spec=datamodule.spec)
        # Plain containers in the hyperparameters, so checkpoints load with weights_only=True.
        task = instantiate(cfg.task, _convert_="all")(model=model, spec=datamodule.spec)
        return task, datamodule

    @property
    def model_family(self) -> ModelFamily:
        return family(self.family)

    # ------------------------------------------------------------------ steps

    def step(self, batch: Any, split: str) -> torch.Tensor:
        """The loss of one batch of ``split`` ("train", "val", "test"); logs its metrics."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch, "test")

    def windows_in(self, batch: Any) -> int:
        """How many windows (samples) ``batch`` holds: for throughput and per-sample means."""
        return extract_batch_size(batch)

    def log_loss(self, split: str, loss: torch.Tensor, batch_size: int) -> None:
        """The weighted total loss: per step while training, per epoch everywhere (mean over ranks)."""
        self.log(f"{split}/loss", loss.detach(), on_step=split == "train", on_epoch=True, batch_size=batch_size,
                 prog_bar=split == "train", sync_dist=True)

    def scheduled(self, optimizer: torch.optim.Optimizer, warmup_steps: int, min_lr_ratio: float) -> dict:
        """Lightning's optimizer config: ``optimizer`` under a per-step warm-up + cosine schedule.

        The warm-up is capped at a tenth of training, so short runs still decay.
        """
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(warmup_steps, total // 10 + 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_optimizers(self) -> dict:
        """AdamW over every parameter under warm-up + cosine, from the hyperparameters ``lr``,
        ``weight_decay``, ``warmup_steps`` and ``min_lr_ratio``; families that need more override it."""
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return self.scheduled(optimizer, hp.warmup_steps, hp.min_lr_ratio)

    # ------------------------------------------------------------------ what train() asks after testing

    def summarize(self, results: dict[str, float], datamodule: L.LightningDataModule) -> dict[str, float]:
        """The test metrics with the family's baselines beside them: what metrics.json holds."""
        return dict(results)

    def report(self, metrics: dict[str, float]) -> list[str]:
        """The lines ``train()`` prints first at the end of a run (the headline result)."""
        return [f"Test loss {metrics['test/loss']:.4f}"] if "test/loss" in metrics else []

    def figures(self) -> dict[str, Figure]:
        """PNG file name -> figure of the last test, saved in the run folder and logged by ``train()``."""
        return {}

    def evaluate(self, loaded: LoadedModel, datamodule: L.LightningDataModule, out: Path,
                 settings: dict | None) -> dict | None:
        """After-test evaluation of the trained model (``cfg.evaluate``; None skips it).

        The default runs the family's evaluation (``ModelFamily.evaluate``, through
        ``neuroformer.evaluate.evaluate``, which writes ``out/metrics.json``) on the first
        recording of ``datamodule``; returns its summary, or None.
        """
        config_cls = self.model_family.evaluation_config
        if settings is None or config_cls is None:
            return None
        recordings = getattr(datamodule, "recordings", None)
        return evaluate(loaded, out, config_cls(**settings), recordings[0] if recordings else None)

    # ------------------------------------------------------------------ the trained model

    def model_card(self) -> dict:
        """What rebuilds ``self.model`` without this task: family, model config, data spec (and its
        dendrite nodes, if it has any: ``neuroformer.callbacks.perforated``)."""
        return {"family": self.family, "model_config": self.model_family.model_config(self.model),
                "spec": self.spec.to_dict(), **dendrite_card(self.model)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Self-describing checkpoints: the model, its data spec and the training config can be
        # rebuilt from the file alone (neuroformer.registry.load).
        checkpoint[CARD_KEY] = {**self.model_card(), "train_config": self.train_config}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The checkpoint's dendrite nodes (added while training) exist before its weights load.
        apply_structure(self.model, checkpoint.get(CARD_KEY, {}).get("dendrites") or {})
