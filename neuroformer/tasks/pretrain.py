"""LightningModule that pretrains a Neuroformer by next-token prediction (+ contrastive loss)."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from neuroformer.data.dataset import Batch, InputSpec
from neuroformer.data.tokenizer import PAD
from neuroformer.models.neuroformer import Neuroformer
from neuroformer.tasks.base import SPLITS, NeuroformerTask


class PretrainTask(NeuroformerTask):
    """Next-token (ID and dt) prediction with an auxiliary contrastive loss.

    Args:
        model: the Neuroformer to train (built from the data's spec).
        spec: the data's InputSpec; saved in every checkpoint so it can be rebuilt alone.
        loss_weights: weight of each loss term: ``id_ce``, ``dt_ce``, ``contrastive``.
        lr, weight_decay, betas: AdamW settings (decay on matrices only).
        warmup_steps: linear warm-up steps; then cosine decay to ``min_lr_ratio * lr``.
    """

    def __init__(
        self,
        model: Neuroformer,
        spec: InputSpec,
        loss_weights: dict[str, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ):
        super().__init__()
        self.model, self.spec = model, spec
        self.loss_weights = dict(loss_weights or {"id_ce": 1.0, "dt_ce": 1.0, "contrastive": 0.1})
        self.save_hyperparameters(ignore=["model", "spec"])
        # Token-weighted means, so an epoch's id_ce is the mean over tokens, not over batches.
        self.metrics = torch.nn.ModuleDict(
            {f"{s}_{k}": MeanMetric() for s in SPLITS for k in ("id_ce", "dt_ce", "id_acc")}
        )

    def forward(self, batch: Batch):
        return self.model(batch)

    def _step(self, batch: Batch, split: str) -> torch.Tensor:
        want_contrastive = self.loss_weights.get("contrastive", 0) > 0
        out = self.model(batch, contrastive=want_contrastive)
        losses = self.model.losses(out, batch)
        loss = sum(self.loss_weights.get(k, 0.0) * v for k, v in losses.items())
        real = batch.target_ids != PAD
        n = real.sum()
        acc = (out.id_logits.argmax(-1) == batch.target_ids)[real].float().mean()
        bs = batch.ids.shape[0]
        for key, value in (("id_ce", losses["id_ce"]), ("dt_ce", losses["dt_ce"]), ("id_acc", acc)):
            metric = self.metrics[f"{split}_{key}"]
            metric.update(value.detach(), weight=n)
            self.log(f"{split}/{key}", metric, on_step=False, on_epoch=True, batch_size=bs, prog_bar=key == "id_ce")
        if "contrastive" in losses:
            self.log(f"{split}/contrastive", losses["contrastive"].detach(), on_epoch=True, batch_size=bs,
                     sync_dist=True)
        self._log_loss(split, loss, bs)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return self._scheduled(
            torch.optim.AdamW(self.model.param_groups(hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas))
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Self-describing checkpoints: the model and its data spec can be rebuilt from the file alone.
        checkpoint["neuroformer"] = {"model_config": self.model.hparams(), "spec": self.spec.to_dict()}
