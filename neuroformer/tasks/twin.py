"""The digital-twin family: stimulus clips in, per-unit spike counts out, Poisson loss.

``TwinTask`` trains a :class:`~neuroformer.models.twin.Twin` on the samples of
``neuroformer.data.responses`` (a clip of frames, the spike counts after its last frame) by
the Poisson negative log-likelihood, plus a small L1 penalty on the readout masks.
``summarize`` scores the held-out test samples next to a mean-rate predictor (each unit's
training mean) and, for a simulated recording, the linear-nonlinear oracle (the true
stimulus-and-running rate that generated the spikes, without synaptic input): bits per spike
with block-bootstrap intervals and the mean per-unit correlation of predicted and observed
counts. ``TwinFamily`` rebuilds and serves a trained twin; its ``predict_responses`` is what
``neuroformer.inference.mds`` optimises stimuli for (docs/mds.md).
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch

from neuroformer.data.recording import Recording
from neuroformer.data.responses import ResponseBatch, Responses, ResponseSpec
from neuroformer.data.simulate import SPEED_REF, read_config, session_inputs
from neuroformer.errors import RecordingError
from neuroformer.metrics.bootstrap import bits_per_spike_interval
from neuroformer.models.twin import Twin, TwinConfig
from neuroformer.registry.families import LoadedModel, ModelFamily
from neuroformer.tasks.base import Task


def poisson_nll(rates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean Poisson negative log-likelihood (without log k!) of ``counts`` under ``rates``, both (B, U)."""
    return (rates - counts * torch.log(rates + 1e-8)).mean()


@torch.no_grad()
def predict(model: Twin, data: Responses, frames: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(n, U) the model's expected counts for the samples ending at ``frames`` (n,)."""
    device = next(model.parameters()).device
    out = [model.predict_responses(torch.from_numpy(data.clips(frames[i:i + batch_size])).to(device)).cpu()
           for i in range(0, len(frames), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.n_units), np.float32)


def ln_oracle(rec: Recording, spec: ResponseSpec, frames: np.ndarray) -> np.ndarray | None:
    """(n, U) expected counts of a simulated recording's units without synaptic input, or None.

    The rate that generated the spikes, ``exp(baseline + stimulus drive + running)``, capped
    at the simulation's ``max_rate``, times the response window: the ceiling of any model of
    the stimulus (it also knows the running speed, which the twin does not see).
    """
    try:
        config = read_config(rec.path)
    except RecordingError:
        return None
    inputs = session_inputs(config)
    pop, times = inputs.population, np.asarray(rec.stimulus.timestamps)[frames]
    speed = np.interp(times, np.arange(len(inputs.speed)) / config.behavior_rate, inputs.speed)
    log_rate = pop.log_baseline + inputs.drive[frames] + np.outer(speed / SPEED_REF, pop.truth.speed_gain)
    row = {f"{rec.session_id}/{i}": i for i in range(config.n_units)}
    columns = [row[name] for name in spec.units]
    return (np.minimum(np.exp(log_rate), config.max_rate) * spec.response_window)[:, columns]


def mean_correlation(pred: np.ndarray, counts: np.ndarray) -> float:
    """Mean over units of the Pearson correlation of (n, U) predictions and counts (constant units left out)."""
    p, c = pred - pred.mean(0), counts - counts.mean(0)
    denom = np.sqrt((p**2).sum(0) * (c**2).sum(0))
    ok = denom > 0
    return float(np.mean((p * c).sum(0)[ok] / denom[ok])) if ok.any() else math.nan


def held_out_scores(model: Twin, data: Responses, rec: Recording, spec: ResponseSpec) -> dict[str, float]:
    """Bits per spike (with 95% block-bootstrap intervals) and mean correlation on the test samples,
    for the model, the mean-rate predictor and (simulations) the oracle."""
    frames = data.index["test"]
    counts, times = data.counts[frames], data.times[frames]
    predictors = {"": predict(model, data, frames),
                  "_mean_rate": np.broadcast_to(np.asarray(spec.unit_mean_count, np.float32), counts.shape)}
    oracle = ln_oracle(rec, spec, frames)
    if oracle is not None:
        predictors["_oracle"] = oracle
    scores = {}
    for suffix, pred in predictors.items():
        ci = bits_per_spike_interval(pred[:, None], counts[:, None], times)
        scores.update({f"test/bits_per_spike{suffix}": ci.estimate, f"test/bits_per_spike{suffix}_low": ci.low,
                       f"test/bits_per_spike{suffix}_high": ci.high})
        if suffix != "_mean_rate":  # a constant has no correlation
            scores[f"test/correlation{suffix}"] = mean_correlation(pred, counts)
    return scores


# --------------------------------------------------------------------------- the family


class TwinFamily(ModelFamily):
    """Trained twins: stimulus clips (B, T, H, W), z-scored, in; expected counts (B, U) out."""

    name = "twin"

    def model_config(self, model: Twin) -> dict:
        return model.hparams()

    def build(self, model_config: dict) -> Twin:
        return Twin(TwinConfig(**{**model_config, "mean_count": tuple(model_config.get("mean_count", ()))}))

    def spec_from_dict(self, d: dict) -> ResponseSpec:
        return ResponseSpec.from_dict(d)

    def example_inputs(self, loaded: LoadedModel) -> dict[str, np.ndarray]:
        """One grey clip: (1, T, H, W) at the mean pixel (zeros once z-scored)."""
        spec: ResponseSpec = loaded.spec
        return {"stimulus": np.zeros((1, spec.n_frames, *spec.frame_shape), np.float32)}

    def predict(self, model: Twin, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{stimulus (B, T, H, W)} -> {rates (B, U)}: expected spike counts per response window."""
        with torch.no_grad():
            stimulus = torch.as_tensor(np.asarray(inputs["stimulus"], np.float32))
            return {"rates": model.predict_responses(stimulus).numpy()}


# --------------------------------------------------------------------------- the task


class TwinTask(Task):
    """Poisson loss of the counts + ``readout_l1`` x mean |mask| (module docstring).

    Args:
        model: the twin (built from the data's spec).
        spec: the data's ResponseSpec; saved in every checkpoint.
        readout_l1: weight of the L1 penalty on the spatial masks.
        lr, weight_decay: AdamW settings.
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``min_lr_ratio * lr``.
    """

    family = "twin"

    def __init__(self, model: Twin, spec: ResponseSpec, readout_l1: float = 1.0, lr: float = 3e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 50, min_lr_ratio: float = 0.05):
        super().__init__()
        self.model, self.spec = model, spec
        self.placed = False
        self.save_hyperparameters(ignore=["model", "spec"])

    def setup(self, stage: str) -> None:
        # A fresh Gaussian readout starts at each unit's spike-triggered average (Twin.place_readouts).
        # Here, before the strategy wraps the model: DDP then gives every rank rank 0's placement,
        # and a resumed run's checkpoint, restored later, overrides it.
        if stage != "fit" or self.model.config.readout != "gaussian" or self.placed:
            return
        clips, counts = [], []
        for batch in self.trainer.datamodule.train_dataloader():
            clips.append(batch.stimulus)
            counts.append(batch.counts)
            if sum(len(c) for c in counts) >= 8192:
                break
        self.model.place_readouts(torch.cat(clips).to(self.device), torch.cat(counts).to(self.device))
        self.placed = True

    def step(self, batch: ResponseBatch, split: str) -> torch.Tensor:
        nll = poisson_nll(self.model(batch.stimulus), batch.counts)
        loss = nll + self.hparams.readout_l1 * self.model.readout_l1()
        size = batch.counts.shape[0]
        self.log(f"{split}/poisson_nll", nll.detach(), on_epoch=True, on_step=False, batch_size=size, sync_dist=True)
        self.log_loss(split, loss, size)
        return loss

    def summarize(self, results: dict[str, float], datamodule: L.LightningDataModule) -> dict[str, float]:
        """Test metrics plus bits per spike and correlation of the twin, the mean-rate predictor and the oracle."""
        scores = held_out_scores(self.model.eval(), datamodule.data, datamodule.recordings[0], self.spec)
        return {**results, **scores}

    def report(self, metrics: dict[str, float]) -> list[str]:
        def bps(suffix: str) -> str:
            m = lambda k: metrics[f"test/bits_per_spike{suffix}{k}"]  # noqa: E731
            return f"{m(''):.3f} [{m('_low'):.3f}, {m('_high'):.3f}]"

        line = (f"Held-out responses: twin {bps('')} bits/spike (r = {metrics['test/correlation']:.3f}) vs mean rate "
                f"{bps('_mean_rate')}")
        if "test/bits_per_spike_oracle" in metrics:
            line += f"; oracle {bps('_oracle')} (r = {metrics['test/correlation_oracle']:.3f})"
        return [line + f"; {self.spec.n_units} units"]
