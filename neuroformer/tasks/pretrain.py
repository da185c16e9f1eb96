"""The Neuroformer family: pretraining by next-token prediction (+ contrastive loss), and its
``ModelFamily`` (rebuild, serve and evaluate a trained Neuroformer)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torchmetrics import MeanMetric

from neuroformer.callbacks.ema import WeightEMA
from neuroformer.data.dataset import Batch, InputSpec
from neuroformer.data.tokenizer import N_SPECIAL, PAD, SOS
from neuroformer.errors import ConfigError
from neuroformer.inference.evaluation import EvaluationConfig
from neuroformer.inference.evaluation import evaluate as evaluate_windows
from neuroformer.metrics.baselines import unigram_cross_entropy
from neuroformer.models.calibration import calibrate_readout
from neuroformer.models.neuroformer import Neuroformer, NeuroformerConfig, NeuroformerInput
from neuroformer.registry.families import LoadedModel, ModelFamily
from neuroformer.tasks.base import SPLITS, Task

log = logging.getLogger(__name__)


class NeuroformerFamily(ModelFamily):
    """Trained Neuroformers: token arrays in, next-token logits out; evaluated by their generations."""

    name = "neuroformer"
    evaluation_config = EvaluationConfig
    headline_metrics = ("bits_per_spike", "fraction_of_oracle", "minus_glm", "psth_r_median", "spike_f1",
                        "connectivity_auroc")

    def model_config(self, model: Neuroformer) -> dict:
        return asdict(model.config)

    def build(self, model_config: dict) -> Neuroformer:
        return Neuroformer(NeuroformerConfig(**model_config))

    def spec_from_dict(self, d: dict) -> InputSpec:
        return InputSpec.from_dict(d)

    def example_inputs(self, loaded: LoadedModel) -> dict[str, np.ndarray]:
        """Two windows with no spikes: ``[SOS, PAD...]`` tokens, zero frames and behaviour."""
        cfg = loaded.model.config
        tokens = lambda n: np.concatenate([np.full((2, 1), SOS), np.full((2, n - 1), PAD)], axis=1)  # noqa: E731
        example = {"ids": tokens(cfg.block_size), "dts": tokens(cfg.block_size),
                   "past_ids": tokens(cfg.past_block_size), "past_dts": tokens(cfg.past_block_size)}
        if cfg.n_frames:
            example["frames"] = np.zeros((2, cfg.n_frames, *cfg.frame_shape), np.float32)
        if cfg.n_behavior:
            example["behavior"] = np.zeros((2, cfg.behavior_steps, cfg.n_behavior), np.float32)
        return example

    def predict(self, model: Neuroformer, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{ids, dts (B, T), past_ids, past_dts (B, P)[, frames][, behavior]} -> {id_logits, dt_logits}."""
        device = next(model.parameters()).device
        x = NeuroformerInput(**{k: torch.as_tensor(np.asarray(v), device=device) for k, v in inputs.items()})
        with torch.inference_mode():
            out = model(x)
        return {"id_logits": out.id_logits.cpu().numpy(), "dt_logits": out.dt_logits.cpu().numpy()}

    def evaluate(self, loaded: LoadedModel, out: Path, settings: EvaluationConfig, recording=None) -> dict:
        return evaluate_windows(loaded, recording if recording is not None else loaded.spec.source.read(), out,
                                settings)


class NeuroformerTask(Task):
    """What the Neuroformer tasks (pretraining, fine-tuning) share: the family, and the unigram
    baseline and headline of next-token prediction."""

    family = "neuroformer"

    def windows_in(self, batch: Batch) -> int:
        return len(batch.t0)

    def summarize(self, results: dict[str, float], datamodule: L.LightningDataModule) -> dict[str, float]:
        """Test metrics plus the unigram baseline: each unit's training frequency, on the same tokens."""
        metrics = dict(results)
        train_counts = datamodule.datasets["train"].target_counts()
        test_counts = datamodule.datasets["test"].target_counts()
        metrics["test/id_ce_unigram"] = unigram_cross_entropy(train_counts, test_counts)
        metrics["test/id_ce_vs_unigram"] = metrics["test/id_ce"] / metrics["test/id_ce_unigram"] - 1
        metrics["test/n_tokens"] = float(test_counts.sum())
        return metrics

    def report(self, metrics: dict[str, float]) -> list[str]:
        return [f"Test ID cross-entropy {metrics['test/id_ce']:.4f} nats vs unigram baseline "
                f"{metrics['test/id_ce_unigram']:.4f} ({100 * metrics['test/id_ce_vs_unigram']:+.1f}%)"]


class PretrainTask(NeuroformerTask):
    """Next-token (ID and dt) prediction with an auxiliary contrastive loss.

    Args:
        model: the Neuroformer to train (built from the data's spec).
        spec: the data's InputSpec; saved in every checkpoint so it can be rebuilt alone.
        loss_weights: weight of each loss term: ``id_ce``, ``dt_ce``, ``contrastive``, ``rate_nll``
            (the rate read-out's Poisson loss, nats per true spike; used if the model has the read-out)
            and ``rate_l2`` (the L2 penalty on the read-out's skip paths).
        lr, weight_decay, betas: AdamW settings (decay on matrices only).
        warmup_steps: linear warm-up steps; then cosine decay to ``min_lr_ratio * lr``.
        ema_decay: > 0: validation, test, checkpoints and the registry get an exponential moving
            average of the weights, its decay per step ramping up to this (``callbacks.ema.WeightEMA``);
            0: the raw weights.
        calibrate_readout: before testing, choose each unit's shrinkage of the rate read-out's
            attention and stimulus paths on the validation windows (``models.calibration``); the
            tested, registered and evaluated model carries it.
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
        ema_decay: float = 0.0,
        calibrate_readout: bool = False,
    ):
        super().__init__()
        if not isinstance(calibrate_readout, bool):
            raise ConfigError(f"task.calibrate_readout must be true or false; got {calibrate_readout!r}")
        self.model, self.spec = model, spec
        self.loss_weights = dict(loss_weights or {"id_ce": 1.0, "dt_ce": 1.0, "contrastive": 0.1})
        self.save_hyperparameters(ignore=["model", "spec"])
        # Token-weighted means, so an epoch's id_ce is the mean over tokens, not over batches.
        self.metrics = torch.nn.ModuleDict(
            {f"{s}_{k}": MeanMetric() for s in SPLITS for k in ("id_ce", "dt_ce", "id_acc", "rate_nll")}
        )

    def forward(self, batch: Batch):
        return self.model(batch.inputs)

    def configure_callbacks(self) -> list[L.Callback]:
        # Asked again by trainer.test after fit: the fit's average is already attached then.
        attached = any(isinstance(cb, WeightEMA) for cb in self.trainer.callbacks)
        return [WeightEMA(self.hparams.ema_decay)] if self.hparams.ema_decay and not attached else []

    def on_test_start(self) -> None:
        if not (self.hparams.calibrate_readout and self.model.rate_head is not None):
            return
        # The whole validation set on every rank (no distributed sampler): every rank gets the same gains.
        batches = (self.transfer_batch_to_device(b, self.device, 0) for b in self.trainer.datamodule.val_dataloader())
        with self.trainer.precision_plugin.forward_context():
            result = calibrate_readout(self.model, batches)
        if result is None:
            log.warning("No validation windows: the rate read-out is tested uncalibrated")
            return
        gain = result.gain[:, N_SPECIAL:]
        log.info("Read-out calibrated on the validation windows: NLL %.4f -> %.4f nats/spike; mean gain "
                 "attention %.2f, stimulus %.2f", result.nll_before, result.nll_after, *gain.mean(1).tolist())

    def step(self, batch: Batch, split: str) -> torch.Tensor:
        batch = batch.trimmed()
        want_contrastive = self.loss_weights.get("contrastive", 0) > 0
        out = self.model(batch.inputs, contrastive=want_contrastive)
        losses = self.model.losses(out, batch.target_ids, batch.target_dts, batch.counts)
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
        if "rate_nll" in losses:
            metric = self.metrics[f"{split}_rate_nll"]
            metric.update(losses["rate_nll"].detach(), weight=batch.counts.sum())
            self.log(f"{split}/rate_nll", metric, on_step=False, on_epoch=True, batch_size=bs)
        self.log_loss(split, loss, bs)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.model.param_groups(hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas))
        return self.scheduled(optimizer, hp.warmup_steps, hp.min_lr_ratio)
