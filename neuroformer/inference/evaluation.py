"""Evaluate a trained Neuroformer on a recording's held-out block: metrics and figures.

``neuroformer.evaluate`` (the command line and ``train()``) runs this through the family's
``NeuroformerFamily.evaluate``. The windows evaluated are the recording's ``split`` block
(default: test) under the model's own training split (``spec.split``), so the model never saw them.

What is measured (docs/evaluation.md has the definitions and recorded numbers):

- rates: expected counts per unit and 5 ms dt bin of every window, from the model's rate read-out
  (one pass, if it has one: ``bits_per_spike_readout``) and from ``n_samples`` sampled sequences
  per window (``neuroformer.inference.rates``; ``bits_per_spike_sampled``, jackknife-corrected for
  the finite number of samples; uncorrected ``bits_per_spike_plugin``). The headline
  ``bits_per_spike`` is the read-out's when there is one, else the sampled one;
- NLB bits per spike (``neuroformer.metrics.nlb``) of the same windows and bins for the reference
  predictors (``neuroformer.baselines``): the simulator's forecast oracle (simulated recordings:
  the ceiling), the coupled Poisson GLM fitted on the training blocks (cached in
  ``baseline_cache``) and each unit's training mean rate; the model as a fraction of the oracle
  and minus the GLM. Every one with its 95% block-bootstrap interval (``_low``, ``_high``;
  ``neuroformer.metrics.bootstrap``; paired for the fraction and the difference);
- spike-set precision/recall/F1 of the sampled windows against the true spikes, and of a
  homogeneous Poisson sampler at each unit's mean rate for reference
  (``neuroformer.metrics.spike_sets``);
- PSTH correlation per unit over the repeated-stimulus trials in the block (trials table
  column ``repeat_column``, values >= 0), with each unit's noise ceiling
  (``neuroformer.metrics.psth``);
- with a simulated recording (ground truth in the file): connectivity from attention
  against the true synapses, and the lagged cross-correlation baseline on the same spikes
  (``neuroformer.inference.connectivity``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuroformer import plots
from neuroformer.cli import option
from neuroformer.data.recording import Recording
from neuroformer.baselines.glm import GLMConfig, cached_glm, split_spans
from neuroformer.baselines.mean_rate import mean_rate_counts
from neuroformer.baselines.oracle import SimulatorOracle
from neuroformer.data.dataset import WindowDataset, batches
from neuroformer.data.splits import SplitSpec, window_starts
from neuroformer.data.tokenizer import N_SPECIAL, SpikeTokenizer, bin_spikes
from neuroformer.errors import ConfigError, RecordingError
from neuroformer.data.simulate import load_ground_truth
from neuroformer.inference import connectivity
from neuroformer.inference.rates import expected_counts
from neuroformer.metrics.bootstrap import Interval, bits_per_spike_interval, paired_interval
from neuroformer.metrics.links import score_links
from neuroformer.metrics.nlb import bits_per_spike
from neuroformer.metrics.psth import noise_ceiling, psth, psth_correlation, rebin
from neuroformer.metrics.resampling import jackknife
from neuroformer.metrics.spike_sets import SpikeSetF1
from neuroformer.registry.families import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of one evaluation; each is also a command-line option (``--n-samples`` etc.)."""

    split: str = option("test", "block of the model's own training split to evaluate on: train, val or test")
    n_samples: int = option(8, "sampled sequences per window for the rate estimate (>= 2, for the jackknife)")
    seed: int = option(0, "seed of the sampler and of the Poisson reference")
    batch_size: int = option(32, "windows per model call (each repeated n_samples times)")
    tolerance_bins: int = option(1, "largest dt-bin distance of a matched spike in spike-set F1")
    psth_bin: float = option(0.05, "PSTH bin, seconds (rounded to a multiple of the tokenizer resolution)")
    repeat_column: str = option("clip_id", "trials-table column naming the repeated stimulus (values >= 0)")
    max_windows: int = option(0, "evaluate only the first this many windows of the block (0: all)")
    connectivity: bool = option(True, "score model-based connectivity when the file has ground truth")
    connectivity_method: str = option("perturbation", "model-based connectivity estimator: perturbation (an added "
                                      "spike's effect, docs/connectivity.md) or attention_x_gradient")
    connectivity_contexts: int = option(128, "test windows the perturbation uses as contexts (each costs units + 1 "
                                        "model rows)")
    baselines: bool = option(True, "also score the oracle (simulated files), the coupled GLM and the mean rate")
    baseline_samples: int = option(64, "simulations per window of the oracle and GLM forecasts")
    baseline_cache: str = option("outputs/data/baselines", "folder keeping fitted GLMs ('': refit every time)")
    raster_seconds: float = option(2.0, "length of the raster plot's stretch, seconds")
    psth_units: int = option(6, "units shown in the PSTH plot")

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"evaluate.split must be train, val or test; got {self.split!r}")
        if self.n_samples < 2 or self.batch_size < 1 or self.tolerance_bins < 0 or self.psth_bin <= 0:
            raise ConfigError("evaluate: need n_samples >= 2, batch_size >= 1, tolerance_bins >= 0, psth_bin > 0; "
                              f"got {self}")
        if self.connectivity_method not in connectivity.METHODS:
            raise ConfigError(f"evaluate.connectivity_method must be one of {connectivity.METHODS}; "
                              f"got {self.connectivity_method!r}")


def repeated_trials(rec: Recording, split: SplitSpec, name: str, tok: SpikeTokenizer, column: str
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Repeated-stimulus trials inside the ``name`` block(s), tiled by whole windows.

    A trial counts if its ``column`` value is >= 0 and its span, with the past window before
    its onset, lies inside one block of the split (the rule every window obeys).

    Returns:
        onsets (n,), stimulus of each trial (n,), and windows per trial (the shortest trial's).
    """
    trials = rec.trials
    if trials is None or column not in trials.columns:
        return np.zeros(0), np.zeros(0, dtype=np.int64), 0
    values = np.asarray(trials.columns[column])
    if values.dtype.kind not in "iuf":
        raise RecordingError(rec.path, f"trials/{column}", f"expected numeric stimulus ids (>= 0 for a repeated "
                             f"stimulus, < 0 otherwise), got dtype {values.dtype}")
    lo, hi = split.blocks(rec.start, rec.stop, name)
    begin = trials.start - tok.past_window
    inside = ((begin[:, None] >= lo[None]) & (trials.stop[:, None] <= hi[None])).any(axis=1)
    keep = inside & (values >= 0)
    if not keep.any():
        return np.zeros(0), np.zeros(0, dtype=np.int64), 0
    per_trial = int(np.floor(np.min(trials.stop[keep] - trials.start[keep]) / tok.window + 1e-9))
    return trials.start[keep], values[keep].astype(np.int64), per_trial


def _contiguous(starts: np.ndarray, window: float, n: int) -> int:
    """How many of the first ``n`` window starts follow each other without a gap."""
    gaps = np.flatnonzero(np.abs(np.diff(starts[:n]) - window) > 1e-6)
    return int(gaps[0] + 1) if len(gaps) else min(n, len(starts))


def _spike_scores(samples: np.ndarray, true: np.ndarray, tolerance: int) -> dict[str, float]:
    """SpikeSetF1 over every sample: samples (S, B, n_bins, U), true (B, n_bins, U)."""
    metric = SpikeSetF1(tolerance, sync_on_compute=False)  # rank 0's arrays, also inside a distributed job
    for s in samples:
        metric.update(s, true)
    return {k: float(v) for k, v in metric.compute().items() if k != "windows"}


def _psth(rates: np.ndarray, true: np.ndarray, groups: np.ndarray, per_trial: int, cfg: EvaluationConfig,
          tok: SpikeTokenizer, names: list[str], out: Path) -> dict[str, float]:
    """PSTH metrics and plots of repeated trials; rates, true: (n_trials * per_trial, n_bins, U), trial-major."""
    n = len(groups)
    U = true.shape[-1]
    factor = max(1, round(cfg.psth_bin / tok.resolution))
    bin_s = factor * tok.resolution
    pred = rebin(rates.reshape(n, per_trial * tok.n_bins, U), factor)
    obs = rebin(true.reshape(n, per_trial * tok.n_bins, U).astype(np.float64), factor)
    r = psth_correlation(pred, obs, groups)
    ceiling = noise_ceiling(obs, groups)
    ok = np.flatnonzero(np.isfinite(r))
    ids, counts = np.unique(groups, return_counts=True)
    if len(ok):
        # Units from the best to the worst correlation, evenly through the ranking.
        ranked = ok[np.argsort(-r[ok])]
        shown = [int(u) for u in ranked[np.unique(np.linspace(0, len(ranked) - 1, cfg.psth_units).round().astype(int))]]
        true_psth = psth(obs, groups)
        plots.save(plots.psth_panels(psth(pred, groups).mean, true_psth.mean, bin_s, shown, r, true_psth.n_trials,
                                     names), out / "psth.png")
    plots.save(plots.psth_correlation_summary(r, ceiling), out / "psth_correlation.png")
    return {
        "psth_r_median": float(np.nanmedian(r)) if len(ok) else float("nan"),
        "psth_r_mean": float(np.nanmean(r)) if len(ok) else float("nan"),
        "psth_noise_ceiling_median": float(np.nanmedian(ceiling)) if np.isfinite(ceiling).any() else float("nan"),
        "psth_units": float(len(ok)),
        "psth_trials": float(n),
        "psth_stimuli": float(len(ids)),
        "psth_stimuli_repeated": float((counts >= 2).sum()),
        "psth_bin_s": bin_s,
    }


def _connectivity(loaded: LoadedModel, rec: Recording, starts: np.ndarray, cfg: EvaluationConfig,
                  out: Path) -> dict[str, float]:
    """Attention-based connectivity and the cross-correlation baseline against the file's ground truth."""
    try:
        truth = load_ground_truth(rec.path)
    except RecordingError:
        log.info("%s has no ground-truth connectivity: connectivity not scored", rec.path)
        return {}
    method = cfg.connectivity_method
    estimates = connectivity.estimate(loaded.model, loaded.spec, rec, starts, cfg.batch_size, methods=(method,),
                                      n_contexts=cfg.connectivity_contexts)
    scores = score_links(estimates[method], truth.connectivity)
    baseline = score_links(estimates["cross_correlation"], truth.connectivity)
    plots.save(plots.connectivity_matrices(estimates[method], truth.connectivity,
                                           {"AUROC": scores.auroc, "AP": scores.ap, "chance AP": scores.chance_ap},
                                           title=f"Connectivity from {method.replace('_', ' ')} vs true"),
               out / "connectivity.png")
    result = {f"connectivity_{k}": float(v) for k, v in dataclasses.asdict(scores).items()}
    result.update({f"xcorr_{k}": float(v) for k, v in dataclasses.asdict(baseline).items()
                   if k in ("auroc", "ap", "direction_auroc", "direction_accuracy")})
    return result


def readout_rates(loaded: LoadedModel, rec: Recording, starts: np.ndarray, batch_size: int) -> np.ndarray:
    """(B, n_bins, U) the rate read-out's expected counts of ``rec``'s units in each window (one pass)."""
    model, spec = loaded.model, loaded.spec
    device = next(model.parameters()).device
    columns = torch.as_tensor(spec.vocab.indices(rec.units.names, rec.path) + N_SPECIAL, device=device)
    dataset = WindowDataset([rec], spec, [np.asarray(starts, dtype=np.float64)])
    return np.concatenate([model.rates(batch.inputs)[..., columns].double().cpu().numpy()
                           for batch in batches(dataset, batch_size, device)])


def _interval_metrics(name: str, value: Interval) -> dict[str, float]:
    return {name: value.estimate, f"{name}_low": value.low, f"{name}_high": value.high}


def _baselines(model_rates: np.ndarray, rec: Recording, split: SplitSpec, tok: SpikeTokenizer, starts: np.ndarray,
               true: np.ndarray, cfg: EvaluationConfig) -> dict[str, float]:
    """The reference predictors on the model's windows, and the model against them (module docstring).

    Args:
        model_rates: (B, n_bins, U) the model's headline rates. true: (B, n_bins, U) true counts.
        starts: (B,) window starts (the bootstrap blocks follow them).
    """
    predictions = {}
    try:
        oracle = SimulatorOracle.from_file(rec.path)
    except RecordingError:
        log.info("%s holds no simulation: no oracle, the GLM is the reference", rec.path)
    else:
        predictions["oracle"] = oracle.expected_counts(rec, starts, tok, cfg.baseline_samples, seed=cfg.seed)
    glm = cached_glm(rec, split, GLMConfig(resolution=tok.resolution, history=tok.past_window),
                     cfg.baseline_cache or None)
    predictions["glm"] = glm.expected_counts(rec, starts, tok, cfg.baseline_samples, seed=cfg.seed)
    predictions["mean_rate"] = mean_rate_counts(rec, split_spans(rec, split, "train"), starts, tok)
    metrics = {}
    for name, rates in predictions.items():
        metrics.update(_interval_metrics(f"{name}_bits_per_spike", bits_per_spike_interval(rates, true, starts)))
        metrics[f"{name}_rate_ratio"] = float(rates.sum() / max(true.sum(), 1))
    metrics.update(_interval_metrics("minus_glm", paired_interval(model_rates, predictions["glm"], true, starts)))
    if "oracle" in predictions:
        metrics.update(_interval_metrics("fraction_of_oracle", paired_interval(
            model_rates, predictions["oracle"], true, starts, compare="ratio")))
        metrics.update(_interval_metrics("glm_fraction_of_oracle", paired_interval(
            predictions["glm"], predictions["oracle"], true, starts, compare="ratio")))
    return metrics


def evaluate(loaded: LoadedModel, rec: Recording, out: str | Path, cfg: EvaluationConfig = EvaluationConfig()
             ) -> dict:
    """Evaluate ``loaded`` on ``rec``'s ``cfg.split`` block; writes PNGs into ``out``.

    Returns:
        ``{"metrics": {name: float}, "settings": {...}}`` (``neuroformer.evaluate`` adds the
        model, the data and the figures, and writes it as metrics.json).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec, model = loaded.spec, loaded.model
    tok = spec.tokenizer
    split = spec.split
    grid = window_starts(rec.start, rec.stop, split, cfg.split, tok.window, tok.past_window, tok.window)
    if cfg.max_windows:
        grid = grid[: cfg.max_windows]
    if len(grid) == 0:
        raise RecordingError(rec.path, "windows", f"no {cfg.split} windows under the model's split {split}")
    onsets, groups, per_trial = repeated_trials(rec, split, cfg.split, tok, cfg.repeat_column)
    trial_starts = (onsets[:, None] + tok.window * np.arange(per_trial)[None]).ravel()
    starts = np.concatenate([grid, trial_starts])
    log.info("Evaluating %d %s windows and %d repeated trials x %d windows, %d samples each",
             len(grid), cfg.split, len(onsets), per_trial, cfg.n_samples)

    est = expected_counts(model, spec, rec, starts, cfg.n_samples, generator=torch.Generator().manual_seed(cfg.seed),
                          batch_size=cfg.batch_size)
    U, n = rec.units.n_units, len(grid)
    true = bin_spikes(rec.units.spike_times, rec.units.spike_units, starts, tok, U)
    rates, obs, samples = est.rates[:n], true[:n], est.samples[:, :n]

    # Reference sampler: each unit spikes as a Poisson process at its mean rate (the NLB null).
    null_rate = obs.mean(axis=(0, 1))
    null_samples = np.random.default_rng(cfg.seed).poisson(null_rate, size=samples.shape)
    true_per_window = obs.sum(axis=(1, 2))
    sampled = jackknife(lambda r: bits_per_spike(r, obs), est.sample_rates[:, :n])
    plugin = bits_per_spike_interval(rates, obs, grid)
    if model.config.rate_bins:
        readout = readout_rates(loaded, rec, starts, cfg.batch_size)  # the PSTH trials' windows too
        headline_rates = readout[:n]
        headline = bits_per_spike_interval(headline_rates, obs, grid)
    else:  # the jackknife shifts the plug-in estimate; its interval is shifted alike
        readout, headline_rates, shift = None, rates, sampled - plugin.estimate
        headline = dataclasses.replace(plugin, estimate=sampled, low=plugin.low + shift, high=plugin.high + shift)
    metrics = {
        **_interval_metrics("bits_per_spike", headline),
        "bits_per_spike_sampled": sampled,
        "bits_per_spike_plugin": plugin.estimate,
        "rate_ratio": float(headline_rates.sum() / max(obs.sum(), 1)),
        "sampled_rate_ratio": float(rates.sum() / max(obs.sum(), 1)),
        "generated_count_ratio": float(samples.sum() / max(obs.sum() * len(samples), 1)),
        **{f"spike_{k}": v for k, v in _spike_scores(samples, obs, cfg.tolerance_bins).items()},
        **{f"poisson_spike_{k}": v for k, v in _spike_scores(null_samples, obs, cfg.tolerance_bins).items()},
        "windows": float(n),
        "units": float(U),
        "true_spikes": float(obs.sum()),
        "true_spikes_per_window": float(true_per_window.mean()),
        "generated_spikes_per_window": float(samples.sum(axis=(2, 3)).mean()),
        "windows_over_capacity": float((true_per_window > tok.max_tokens - 1).mean()),
    }
    if model.config.rate_bins:
        metrics["bits_per_spike_readout"] = headline.estimate
    if cfg.baselines:
        metrics.update(_baselines(headline_rates, rec, split, tok, grid, obs, cfg))
    names = list(rec.units.names)
    if len(onsets) and per_trial:
        trial_rates = readout[n:] if readout is not None else est.rates[n:]
        metrics.update(_psth(trial_rates, true[n:], groups, per_trial, cfg, tok, names, out))
    if cfg.connectivity:
        metrics.update(_connectivity(loaded, rec, grid, cfg, out))

    n_raster = _contiguous(grid, tok.window, max(1, round(cfg.raster_seconds / tok.window)))
    window_rate = obs[:n_raster].sum(axis=(0, 1))
    plots.save(plots.raster(obs[:n_raster].reshape(-1, U), samples[0, :n_raster].reshape(-1, U), float(grid[0]),
                            tok.resolution, tok.n_bins, order=np.argsort(-window_rate, kind="stable"),
                            title=f"{cfg.split} block: true vs generated (open loop, one sample per window)"),
               out / "raster.png")
    seconds = n * tok.window
    plots.save(plots.rate_calibration(headline_rates.sum(axis=(0, 1)) / seconds, obs.sum(axis=(0, 1)) / seconds),
               out / "rate_calibration.png")
    settings = {"split_spec": dataclasses.asdict(split), "resolution_s": tok.resolution, "window_s": tok.window}
    return {"metrics": metrics, "settings": settings}
