"""LightningModule that fine-tunes a pretrained Neuroformer: behaviour read-out, new units, or both.

What is learned comes from the data and the loss weights:

- with a behaviour target in the data's spec (``data.target``), a ``BehaviorHead`` on the
  model's window features predicts it (regression: MSE on standardised values; classification:
  cross-entropy, windows labelled -1 ignored);
- the next-token losses (``id_ce``, ``dt_ce``) train the model on new sessions, e.g. after its
  unit vocabulary was extended (``neuroformer.models.transfer``).

Which parameters train is a schedule of ``stages``, each lasting a number of optimizer steps
(the last one until training ends):

- ``heads``: the behaviour head only; the whole backbone is frozen (and kept in eval mode);
- ``new_units``: the new units' rows of the ID embedding and ID output head, plus the behaviour
  head if any; every other weight, and every row of a known token, stays exactly as it was;
- ``all``: everything (the backbone at ``backbone_lr_ratio`` times the learning rate).

Without a pretrained model the same task trains from scratch: everything, from the first step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import R2Score

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from neuroformer import plots
from neuroformer.data.dataset import Batch, InputSpec
from neuroformer.data.targets import IGNORE
from neuroformer.data.tokenizer import PAD
from neuroformer.data.vocabulary import UnitVocabulary
from neuroformer.errors import ConfigError
from neuroformer.metrics.behavior import behavior_metrics, behavior_scores
from neuroformer.metrics.circular import angle_of, circular_correlation, circular_mae_degrees
from neuroformer.models.heads import BehaviorHead, window_features
from neuroformer.models.neuroformer import Neuroformer
from neuroformer.models.transfer import ID_ROWS, extend_vocabulary, new_id_rows
from neuroformer.registry import load
from neuroformer.registry.tracking import tracking_uri, use_tracking_uri
from neuroformer.tasks.base import SPLITS
from neuroformer.tasks.pretrain import NeuroformerTask

log = logging.getLogger(__name__)

TRAINABLE = ("heads", "new_units", "all")


@dataclass(frozen=True)
class Stage:
    """Train the ``train`` parameter set for ``steps`` optimizer steps (None: until the end)."""

    train: str
    steps: int | None = None


def parse_stages(stages: list[dict] | None) -> list[Stage]:
    """Stages from config dicts, checked: known names, every stage but the last has a length."""
    parsed = [Stage(str(s["train"]), s.get("steps")) for s in (stages or [{"train": "all"}])]
    for i, stage in enumerate(parsed):
        if stage.train not in TRAINABLE:
            raise ConfigError(f"task.stages[{i}].train must be one of {TRAINABLE}; got {stage.train!r}")
        if stage.steps is None and i < len(parsed) - 1:
            raise ConfigError(f"task.stages[{i}] needs steps: only the last stage may run until the end")
    return parsed


class FinetuneTask(NeuroformerTask):
    """Fine-tune a Neuroformer on behaviour and/or new units (see the module docstring).

    Args:
        model: the Neuroformer: a pretrained one with its vocabulary extended to the data's
            (``train()`` does this when ``pretrained`` is set), or a fresh one (from scratch).
        spec: the data's InputSpec; ``spec.target`` is the behaviour to predict, or None.
        pretrained: the registered model it starts from (``models:/NAME/VERSION|@ALIAS``);
            ``train()`` loads it. None trains from scratch.
        pretrained_vocab: the pretrained model's unit vocabulary: ID tokens from
            ``pretrained_vocab.size`` on are the new units. Required with ``pretrained``.
        stages: list of ``{"train": "heads" | "new_units" | "all", "steps": int | None}``.
        head_hidden, head_dropout: the behaviour head (0 hidden units: a linear read-out).
        loss_weights: weights of ``behavior``, ``id_ce`` and ``dt_ce`` (default: ``behavior``
            alone with a target, else the two next-token losses).
        lr: peak learning rate of the head (and of the backbone trained from scratch).
        backbone_lr_ratio: a pretrained backbone trains at ``lr * backbone_lr_ratio``.
        weight_decay, betas, warmup_steps, min_lr_ratio: AdamW and warm-up + cosine schedule.
            The ID embedding and ID head are never decayed, so rows held fixed stay fixed.
    """

    def __init__(
        self,
        model: Neuroformer,
        spec: InputSpec,
        pretrained: str | None = None,
        pretrained_vocab: UnitVocabulary | None = None,
        stages: list[dict] | None = None,
        head_hidden: int = 0,
        head_dropout: float = 0.1,
        loss_weights: dict[str, float] | None = None,
        lr: float = 1e-3,
        backbone_lr_ratio: float = 1.0,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
    ):
        super().__init__()
        self._stage: str | None = None  # the parameter set training now (set per step)
        if pretrained and pretrained_vocab is None:
            raise ConfigError("pretrained needs pretrained_vocab (the pretrained model's spec.vocab); train() "
                             "passes it when task.pretrained is set")
        self.model, self.spec, self.target = model, spec, spec.target
        self.head = BehaviorHead(model.config.n_embd, self.target.n_outputs, head_hidden, head_dropout) \
            if self.target is not None else None
        self.from_pretrained = pretrained_vocab is not None
        self.n_known_ids = pretrained_vocab.size if self.from_pretrained else 0
        self.loss_weights = dict(loss_weights or ({"behavior": 1.0} if self.target else {"id_ce": 1.0, "dt_ce": 1.0}))
        if self.loss_weights.get("behavior", 0) and self.target is None:
            raise ConfigError("task.loss_weights.behavior > 0 but the data has no behaviour target (set data.target)")
        self.stages = parse_stages(stages) if self.from_pretrained else [Stage("all")]
        self._check_stages(stages)
        self.save_hyperparameters(ignore=["model", "spec", "pretrained_vocab"])
        self._mask_known_rows()
        self._build_metrics()
        self._test_rows: list[tuple[np.ndarray, ...]] = []  # (t0, session, pred, target) of test batches

    # ------------------------------------------------------------------ what trains when

    def _check_stages(self, requested: list[dict] | None) -> None:
        names = {s.train for s in self.stages}
        if "heads" in names and self.head is None:
            raise ConfigError("task.stages: stage 'heads' trains the behaviour head, but the data has no behaviour "
                              "target (set data.target)")
        if "new_units" in names and self.spec.vocab.size == self.n_known_ids:
            raise ConfigError("task.stages: stage 'new_units': the data has no unit the pretrained model does not "
                              "already know")
        if not self.from_pretrained and requested and any(s["train"] != "all" for s in requested):
            log.info("No pretrained model: training every parameter from scratch (task.stages ignored)")

    def _mask_known_rows(self) -> None:
        """During 'new_units', gradients of known tokens' rows are zeroed (they stay as trained)."""
        if not self.from_pretrained:
            return
        mask = new_id_rows(self.n_known_ids, self.spec.vocab.size)[:, None]
        for name, p in self.model.named_parameters():
            if name in ID_ROWS:
                p.register_hook(lambda g, m=mask: g * m.to(g) if self._stage == "new_units" else g)

    def stage_at(self, step: int) -> Stage:
        """The stage that optimizer step ``step`` (0-based) belongs to."""
        end = 0
        for stage in self.stages:
            end += stage.steps or 0
            if stage.steps is None or step < end:
                return stage
        return self.stages[-1]

    def _apply_stage(self, train: str) -> None:
        if train == self._stage:
            return
        self._stage = train
        for name, p in self.model.named_parameters():
            p.requires_grad_(train == "all" or (train == "new_units" and name in ID_ROWS))
        self.train(self.training)
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info("Fine-tuning stage %r from step %d: %d trainable parameters", train, self.global_step, n)

    def train(self, mode: bool = True) -> FinetuneTask:
        super().train(mode)
        if mode and self._stage in ("heads", "new_units"):
            self.model.eval()  # a frozen backbone runs without dropout
        return self

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._apply_stage(self.stage_at(self.global_step).train)

    # ------------------------------------------------------------------ losses and metrics

    def _build_metrics(self) -> None:
        keys = ["id_ce", "dt_ce"] + (["behavior_loss"] if self.target else [])
        self.means = torch.nn.ModuleDict({f"{s}_{k}": MeanMetric() for s in SPLITS for k in keys})
        self.scores = torch.nn.ModuleDict()
        if self.target is None:
            return
        for s in SPLITS:
            if self.target.kind == "regression":
                self.scores[f"{s}_score"] = behavior_metrics(self.target.n_outputs)
                # The training mean is 0 after standardisation: the constant baseline to beat.
                self.scores[f"{s}_train_mean"] = R2Score(multioutput="raw_values")
            elif self.target.kind == "circular":
                # Angles need every pair at once (circular correlation): predicted and true vectors.
                self.scores[f"{s}_pred"], self.scores[f"{s}_true"] = CatMetric(), CatMetric()
            else:
                self.scores[f"{s}_score"] = MulticlassAccuracy(self.target.n_outputs, average="micro",
                                                               ignore_index=IGNORE)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Behaviour predictions (B, n_outputs): standardised values or class logits."""
        if self.head is None:
            raise ConfigError("this task has no behaviour head (the data has no target); use task.model for logits")
        return self.head(window_features(self.model, batch.inputs)[1])

    def _labelled(self, target: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the windows that carry a label (NaN or -1: the behaviour was not recorded)."""
        return target != IGNORE if self.target.kind == "classification" else target.isfinite().all(-1)

    def _behavior_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Regression: MSE on standardised values; circular: squared distance between the predicted
        2-vector and the true unit vector (its direction is the angle); classes: cross-entropy.
        Unlabelled windows are left out."""
        labelled = self._labelled(target)
        if not labelled.any():
            return pred.sum() * 0.0  # no labelled window in this batch
        if self.target.kind == "classification":
            return F.cross_entropy(pred[labelled], target[labelled])
        return F.mse_loss(pred[labelled], target[labelled])

    def _update_scores(self, split: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        labelled = self._labelled(target)
        pred, target = pred.detach()[labelled], target[labelled]
        if not len(target):
            return
        if self.target.kind == "classification":
            self.scores[f"{split}_score"].update(pred, target)
            return
        if self.target.kind == "circular":
            self.scores[f"{split}_pred"].update(pred)
            self.scores[f"{split}_true"].update(target)
            return
        squeeze = (lambda t: t.squeeze(-1)) if pred.shape[-1] == 1 else (lambda t: t)  # noqa: E731
        self.scores[f"{split}_score"].update(squeeze(pred), squeeze(target))
        self.scores[f"{split}_train_mean"].update(squeeze(torch.zeros_like(pred)), squeeze(target))

    def step(self, batch: Batch, split: str) -> torch.Tensor:
        batch = batch.trimmed()
        if self.head is not None:
            out, features = window_features(self.model, batch.inputs)
            pred = self.head(features)
        else:
            out, pred = self.model(batch.inputs), None
        losses = self.model.losses(out, batch.target_ids, batch.target_dts)
        if pred is not None:
            losses["behavior"] = self._behavior_loss(pred, batch.target_behavior)
            self._update_scores(split, pred, batch.target_behavior)
            if split == "test":
                self._test_rows.append(tuple(t.detach().cpu().numpy() for t in
                                             (batch.t0, batch.session, pred, batch.target_behavior)))
        loss = sum(w * losses[k] for k, w in self.loss_weights.items() if w)
        bs, n_tokens = batch.ids.shape[0], (batch.target_ids != PAD).sum()
        for key, value, weight in (("id_ce", losses["id_ce"], n_tokens), ("dt_ce", losses["dt_ce"], n_tokens),
                                   ("behavior_loss", losses.get("behavior"), bs)):
            if value is not None:
                metric = self.means[f"{split}_{key}"]
                metric.update(value.detach(), weight=weight)
                self.log(f"{split}/{key}", metric, on_step=False, on_epoch=True, batch_size=bs)
        self.log_loss(split, loss, bs)
        return loss

    def _log_scores(self, split: str) -> None:
        if self.target is None:
            return
        if self.target.kind == "circular":
            self._log_circular(split)
            return
        if self.target.kind == "classification":
            self.log(f"{split}/behavior_acc", self.scores[f"{split}_score"].compute())
        else:
            values = self.scores[f"{split}_score"].compute()
            self.log(f"{split}/behavior_r2", values["r2"].mean())
            self.log(f"{split}/behavior_r", values["pearson_r"].mean())
            self.log(f"{split}/behavior_r2_train_mean", self.scores[f"{split}_train_mean"].compute().mean())
            self.scores[f"{split}_train_mean"].reset()
        self.scores[f"{split}_score"].reset()

    def _log_circular(self, split: str) -> None:
        """Circular mean absolute error (degrees) and circular correlation of the split's windows,
        and the error of always predicting the training windows' circular mean angle."""
        pred_metric, true_metric = self.scores[f"{split}_pred"], self.scores[f"{split}_true"]
        if not pred_metric.update_count:
            return
        pred, true = (angle_of(m.compute().cpu().numpy().reshape(-1, 2)) for m in (pred_metric, true_metric))
        self.log(f"{split}/behavior_circular_mae_deg", circular_mae_degrees(pred, true))
        self.log(f"{split}/behavior_circular_r", circular_correlation(pred, true))
        self.log(f"{split}/behavior_circular_mae_deg_train_mean",
                 circular_mae_degrees(np.full_like(true, self.target.mean[0]), true))
        pred_metric.reset()
        true_metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_scores("train")

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_start(self) -> None:
        self._test_rows = []

    def figures(self) -> dict[str, Figure]:
        """``behavior.png``: each regression or circular target over this rank's test windows of the
        first session, true vs predicted, in the variable's units (angles without wrap artefacts)."""
        if self.target is None or self.target.kind == "classification" or not self._test_rows:
            return {}
        t0, session, pred, true = (np.concatenate(c) for c in zip(*self._test_rows))
        keep = session == session.min()
        order = np.argsort(t0[keep])
        pred, true = (self.target.denormalise(v[keep][order]) for v in (pred, true))
        times = t0[keep][order] + self.spec.tokenizer.window / 2
        if self.target.kind == "circular":
            labelled = np.isfinite(true)
            period = 360.0 if self.target.unit == "degrees" else 2 * np.pi
            scale = np.pi / 180 if self.target.unit == "degrees" else 1.0
            scores = {"circular MAE (deg)": circular_mae_degrees(pred[labelled] * scale, true[labelled] * scale),
                      "circular r": circular_correlation(pred[labelled] * scale, true[labelled] * scale)}
            fig = plots.behavior_trace(times, true, pred, self.target.names[0], scores, period=period)
            return {"behavior.png": fig}
        fig = Figure(figsize=(11, 3.2 * len(self.target.names)), layout="constrained")
        for i, (ax, name) in enumerate(zip(np.atleast_1d(fig.subplots(len(self.target.names))), self.target.names)):
            labelled = np.isfinite(true[:, i])
            scores = behavior_scores(pred[labelled, i], true[labelled, i])
            plots.behavior_trace(times, true[:, i], pred[:, i], name,
                                 {"R^2": scores["r2/0"], "r": scores["pearson_r/0"]}, ax=ax)
        return {"behavior.png": fig}

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    # ------------------------------------------------------------------ optimisation and checkpoints

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = self.model.param_groups(hp.weight_decay)
        id_rows = {id(p) for name, p in self.model.named_parameters() if name in ID_ROWS}
        backbone_lr = hp.lr * (hp.backbone_lr_ratio if self.from_pretrained else 1.0)
        groups = [
            {"params": [p for p in decay["params"] if id(p) not in id_rows], "weight_decay": hp.weight_decay,
             "lr": backbone_lr},
            {"params": no_decay["params"] + [p for p in decay["params"] if id(p) in id_rows], "weight_decay": 0.0,
             "lr": backbone_lr},
        ]
        if self.head is not None:
            head = list(self.head.parameters())
            groups += [{"params": [p for p in head if p.ndim > 1], "weight_decay": hp.weight_decay, "lr": hp.lr},
                       {"params": [p for p in head if p.ndim <= 1], "weight_decay": 0.0, "lr": hp.lr}]
        return self.scheduled(torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas)), hp.warmup_steps,
                              hp.min_lr_ratio)

    def model_card(self) -> dict:
        # The backbone's card, plus the behaviour head's settings and the model it started from.
        return {**super().model_card(), "head": self.head.config if self.head is not None else None,
                "pretrained": self.hparams.pretrained}

    def report(self, metrics: dict[str, float]) -> list[str]:
        lines = super().report(metrics)
        if "test/behavior_r2" in metrics:
            lines.append(f"Test behaviour R^2 {metrics['test/behavior_r2']:.4f} vs training mean "
                         f"{metrics['test/behavior_r2_train_mean']:.4f}")
        if "test/behavior_acc" in metrics:
            lines.append(f"Test behaviour accuracy {metrics['test/behavior_acc']:.4f}")
        return lines

    @classmethod
    def compose(cls, cfg: DictConfig) -> tuple[FinetuneTask, L.LightningDataModule]:
        """With ``task.pretrained``: the registered model, its data spec imposed on the data module
        (tokenizer, inputs, normalisation) and its unit vocabulary extended with the data's new units."""
        uri = cfg.task.get("pretrained")
        if not uri:
            return super().compose(cfg)
        log.info("Fine-tuning %s: its tokenizer, inputs and sizes replace data.* and model.* settings", uri)
        store = OmegaConf.select(cfg, "logger.mlflow.store", default=f"{cfg.paths.output_root}/mlflow.db")
        with use_tracking_uri(OmegaConf.select(cfg, "logger.mlflow.tracking") or tracking_uri(store)):
            pretrained = load(uri, store)
        datamodule = instantiate(cfg.data, _partial_=True, _convert_="all")(reference=pretrained.spec)
        datamodule.setup()
        model = extend_vocabulary(pretrained.model, pretrained.spec.vocab, datamodule.spec.vocab)
        task = instantiate(cfg.task, _convert_="all")(model=model, spec=datamodule.spec,
                                                       pretrained_vocab=pretrained.spec.vocab)
        return task, datamodule
