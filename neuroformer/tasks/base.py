"""What every Neuroformer LightningModule shares: one step per split, the LR schedule, loss logging."""

from __future__ import annotations

import math

import lightning as L
import torch
from matplotlib.figure import Figure

from neuroformer.data.dataset import Batch

SPLITS = ("train", "val", "test")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class NeuroformerTask(L.LightningModule):
    """Base of the tasks: subclasses define ``_step(batch, split) -> loss`` and their optimizer.

    Expects hyperparameters ``warmup_steps`` and ``min_lr_ratio``.
    """

    def _step(self, batch: Batch, split: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def figures(self) -> dict[str, Figure]:
        """PNG file name -> figure of the last test, saved in the run folder and logged by ``train()``."""
        return {}

    def _log_loss(self, split: str, loss: torch.Tensor, batch_size: int) -> None:
        """The weighted total loss: per step while training, per epoch everywhere (mean over ranks)."""
        self.log(f"{split}/loss", loss.detach(), on_step=split == "train", on_epoch=True, batch_size=batch_size,
                 prog_bar=split == "train", sync_dist=True)

    def _scheduled(self, optimizer: torch.optim.Optimizer) -> dict:
        """Lightning's optimizer config: ``optimizer`` under a per-step warm-up + cosine schedule.

        The warm-up is capped at a tenth of training, so short runs still decay.
        """
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total // 10 + 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
