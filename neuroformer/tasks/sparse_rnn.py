"""The sparse-data RNN family (Salatiello & Giese 2020): learn a circuit's output and, from a few
recorded neurons, its internal dynamics.

``SparseRNNTask`` trains a :class:`~neuroformer.models.rnn.RateRNN` on trial-aligned data
(``neuroformer.data.trials``) with

    loss = output loss + activity_weight * activity loss (recorded neurons only)

where the output loss is the mean squared error of the z-scored outputs (EMG) and the activity
loss is the Poisson likelihood of the recorded neurons' binned spikes (``poisson``) or the
squared error of their smoothed rates (``mse``), each neuron matched to a designated unit.
``activity_weight = 0`` (or no recorded neuron) is the output-only baseline.

``SparseRNNFamily`` rebuilds, serves and evaluates a trained student: output R^2 on held-out
conditions (beside the nearest-training-condition baseline and a noise ceiling), similarity
of its condition-averaged dynamics to the full reference population (CCA, CKA), and the
cross-validated R^2 of predicting never-recorded reference neurons from its units, each
beside an untrained random RNN of the same architecture (the floor). docs/sparse_rnn.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure

from neuroformer import plots
from neuroformer.cli import option
from neuroformer.data.recording import Recording
from neuroformer.data.simulate_reaching import load_reaching_truth
from neuroformer.data.trials import TrialBatch, TrialData, TrialSpec, trial_data
from neuroformer.errors import RecordingError
from neuroformer.inference.smoothing import gaussian_smooth
from neuroformer.metrics.behavior import behavior_scores
from neuroformer.metrics.dynamics import cca_similarity, linear_cka, principal_components, ridge_r2
from neuroformer.models.rnn import RateRNN, RNNConfig, RNNOutput
from neuroformer.registry.families import LoadedModel, ModelFamily
from neuroformer.tasks.base import Task

# --------------------------------------------------------------------------- losses


def smooth(counts: torch.Tensor, sigma_bins: float) -> torch.Tensor:
    """(B, T, K) counts smoothed along time by a Gaussian of ``sigma_bins`` bins (edges replicated)."""
    return gaussian_smooth(counts, sigma_bins, (1,))


def poisson_loss(log_rates: torch.Tensor, counts: torch.Tensor, mean_count: torch.Tensor,
                 sigma_bins: float) -> torch.Tensor:
    """Poisson negative log-likelihood per bin and neuron (without the ``log k!`` constant)."""
    return F.poisson_nll_loss(log_rates, counts, log_input=True, full=False)


def smoothed_rate_mse(log_rates: torch.Tensor, counts: torch.Tensor, mean_count: torch.Tensor,
                      sigma_bins: float) -> torch.Tensor:
    """Squared error of the rates and the smoothed counts, each neuron relative to its mean rate."""
    return F.mse_loss(log_rates.exp() / mean_count, smooth(counts, sigma_bins) / mean_count)


ACTIVITY_LOSSES = {"poisson": poisson_loss, "mse": smoothed_rate_mse}


# --------------------------------------------------------------------------- scores


def run(model: RateRNN, inputs: np.ndarray) -> RNNOutput:
    """The model (eval mode, no gradients) on (n, T, I) inputs; the fields as numpy arrays."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(torch.as_tensor(inputs, device=device))
    return RNNOutput(*(x.cpu().numpy() for x in out))


def condition_means(x: np.ndarray, condition: np.ndarray) -> np.ndarray:
    """(n, T, D) trials -> (C, T, D) mean of each condition present, in condition order."""
    return np.stack([x[condition == c].mean(axis=0) for c in np.unique(condition)])


def _r2(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over output channels of R^2 over every bin of every trial; (n, T, O) each."""
    scores = behavior_scores(pred.reshape(-1, pred.shape[-1]), true.reshape(-1, true.shape[-1]))
    return float(np.mean([v for k, v in scores.items() if k.startswith("r2/")]))


def output_scores(pred: np.ndarray, test: TrialData, train: TrialData) -> dict[str, float]:
    """Output R^2 on held-out-condition trials, beside a simple baseline and a noise ceiling.

    Args:
        pred: (n, T, O) the model's outputs for the ``test`` trials.
        test, train: trials of the held-out conditions, and of the training conditions.

    Returns:
        ``output_r2``; ``output_r2_nearest_condition``: each held-out condition predicted by
        the mean output of the training condition(s) with the nearest target;
        ``output_r2_ceiling``: each trial predicted by the mean of the *other* trials of its
        own condition (what a perfect model of the condition means would score, less a little
        for the finite number of trials).
    """
    nearest, ceiling = np.empty_like(test.behavior), np.empty_like(test.behavior)
    train_conds = np.unique(train.condition)
    train_targets = np.stack([train.target[train.condition == c].mean(axis=0) for c in train_conds])
    train_means = condition_means(train.behavior, train.condition)
    for c in np.unique(test.condition):
        own = test.condition == c
        distance = np.linalg.norm(train_targets - test.target[own].mean(axis=0), axis=1)
        nearest[own] = train_means[distance <= distance.min() + 1e-9].mean(axis=0)
        n = own.sum()
        ceiling[own] = (test.behavior[own].sum(axis=0) - test.behavior[own]) / max(n - 1, 1)
    return {"output_r2": _r2(pred, test.behavior),
            "output_r2_nearest_condition": _r2(nearest, test.behavior),
            "output_r2_ceiling": _r2(ceiling, test.behavior)}


def reference_population(rec: Recording, spec: TrialSpec, smooth_s: float) -> tuple[np.ndarray, str]:
    """Every unit of the recording on the trial bins, ``(n, T, N)`` Hz, and what it is.

    The true rates where the file has them (a simulated session's ground truth); otherwise
    the spike counts of all units, smoothed by a Gaussian of ``smooth_s`` seconds.
    """
    try:
        truth = load_reaching_truth(rec.path)
    except RecordingError:
        counts = torch.from_numpy(trial_data(rec, spec, units=rec.units.names).counts)
        rates = smooth(counts, smooth_s / spec.bin_size).numpy() / spec.bin_size
        return rates, f"spike counts of all units, smoothed ({smooth_s * 1e3:g} ms Gaussian)"
    aligned = trial_data(replace(rec, behavior={"rates": truth.rates}), replace(spec, behavior=("rates",)), units=[])
    return aligned.behavior, "true rates of every unit (simulation ground truth)"


@dataclass(frozen=True)
class SparseRNNEvaluation:
    """Settings of the evaluation of a trained student (``cfg.evaluate``)."""

    n_components: int = option(10, "principal components of each population compared by CCA")
    ridge: float = option(0.1, "ridge penalty of the unrecorded-neuron regressions, relative to the mean state variance")
    random_seed: int = option(0, "seed of the untrained random RNN (the floor)")
    smooth: float = option(0.04, "Gaussian smoothing of spike counts, s, when the file has no true rates")
    dynamics_from: float | None = option(
        0.0, "compare dynamics from this time (s, from the alignment event) to the window's end; None: the "
             "whole window. Default: the go cue. Before it the population holds an input-driven "
             "preparatory state that any network fed the target reproduces, even an untrained one")


def _trajectory_figure(reference: np.ndarray, students: dict[str, np.ndarray], bin_times: np.ndarray,
                       held_out: np.ndarray, labels: list[str], k: int) -> Figure:
    """Reference and students in the reference's top principal components.

    Args:
        reference: (C, T, N) condition-averaged reference population.
        students: name -> (C, T, H) condition-averaged states; each one's top ``k`` principal
            components are mapped onto the reference's top 3 by least squares (the view CCA
            takes: all of a population's units would fit any target, even an untrained RNN's).
        bin_times: (T,) seconds from the alignment event.
        held_out: (C,) True for conditions never trained on (dashed).
    """
    scores, explained = principal_components(reference, 3)
    shape = reference.shape[:2]
    views = {"reference": scores.reshape(*shape, -1)}
    for name, states in students.items():
        x = np.column_stack([principal_components(states, k)[0], np.ones(len(scores))])
        views[name] = (x @ np.linalg.lstsq(x, scores, rcond=None)[0]).reshape(*shape, -1)
    fig = Figure(figsize=(4.2 * len(views), 7.5), layout="constrained")
    axes = fig.subplots(2, len(views), squeeze=False)
    cmap = colormaps["hsv"]  # directions on a circle: a circular colour map
    for j, (name, v) in enumerate(views.items()):
        for c in range(len(labels)):
            style = dict(color=cmap(c / len(labels)), lw=1.5, ls="--" if held_out[c] else "-")
            axes[0, j].plot(v[c, :, 0], v[c, :, 1], **style, label=labels[c])
            axes[0, j].plot(v[c, 0, 0], v[c, 0, 1], "o", color=style["color"], ms=3)
            axes[1, j].plot(bin_times, v[c, :, 0], **style)
        axes[0, j].set_title(name, fontsize=10)
        axes[0, j].set_xlabel(f"PC1 ({100 * explained[0]:.0f}% of reference variance)")
        axes[0, j].set_ylabel(f"PC2 ({100 * explained[1]:.0f}%)")
        axes[1, j].set_xlabel("time from alignment event (s)")
        axes[1, j].set_ylabel("PC1")
    axes[0, 0].legend(fontsize=7, title="condition (dashed: held out)", title_fontsize=7)
    fig.suptitle(f"Condition-averaged trajectories in the reference's top PCs (dots: start); models: their top {k} "
                 "PCs mapped by least squares")
    return fig


def evaluate_student(loaded: LoadedModel, rec: Recording, out: Path, settings: SparseRNNEvaluation) -> dict:
    """Score a trained student against the full reference population; save the trajectory figure.

    Returns ``{"metrics": {name: float}, "settings": {"reference": what it was compared with}}``
    (``neuroformer.evaluate.evaluate`` writes them to ``out/metrics.json``).
    """
    spec: TrialSpec = loaded.spec
    data = trial_data(rec, spec)
    family = loaded.model_family
    torch.manual_seed(settings.random_seed)
    untrained = family.build(family.model_config(loaded.model)).to(next(loaded.model.parameters()).device).eval()
    reference, what = reference_population(rec, spec, settings.smooth)
    ref = condition_means(reference, data.condition)
    student = run(loaded.model, data.inputs)
    states = {"student": condition_means(student.states, data.condition),
              "untrained RNN": condition_means(run(untrained, data.inputs).states, data.condition)}
    present = np.unique(data.condition)
    test_conditions = np.flatnonzero([c in spec.test_conditions for c in spec.conditions])
    held_out = np.isin(present, test_conditions)
    recorded = set(spec.recorded)
    unrecorded = [i for i, name in enumerate(rec.units.names) if name not in recorded]

    bins = spec.bin_times() >= (settings.dynamics_from if settings.dynamics_from is not None else -np.inf)
    y = ref[:, bins]
    metrics: dict[str, float] = {}
    for suffix, x in (("", states["student"][:, bins]), ("_random", states["untrained RNN"][:, bins])):
        metrics[f"dynamics_cca{suffix}"] = cca_similarity(x, y, settings.n_components)
        metrics[f"dynamics_cka{suffix}"] = linear_cka(x, y)
        metrics[f"dynamics_cca_held_out{suffix}"] = cca_similarity(x[held_out], y[held_out], settings.n_components)
        metrics[f"unrecorded_r2{suffix}"] = float(np.nanmean(ridge_r2(x, y[..., unrecorded], settings.ridge)))
    test = np.isin(data.condition, test_conditions)
    metrics.update(output_scores(student.outputs[test], data.subset(test), data.subset(~test)))
    metrics["n_recorded"], metrics["n_unrecorded"] = float(spec.n_recorded), float(len(unrecorded))

    labels = [str(spec.conditions[c]) for c in present]
    fig = _trajectory_figure(y, {k: v[:, bins] for k, v in states.items()}, spec.bin_times()[bins], held_out,
                             labels, settings.n_components)
    plots.save(fig, Path(out) / "trajectories.png")
    return {"metrics": metrics, "settings": {"reference": what}}


# --------------------------------------------------------------------------- the family


class SparseRNNFamily(ModelFamily):
    """Trained students: trial inputs in, outputs, unit activity and recorded-neuron rates out."""

    name = "sparse_rnn"
    evaluation_config = SparseRNNEvaluation
    headline_metrics = ("output_r2", "dynamics_cca", "dynamics_cca_random", "unrecorded_r2", "unrecorded_r2_random")

    def model_config(self, model: RateRNN) -> dict:
        return model.hparams()

    def build(self, model_config: dict) -> RateRNN:
        return RateRNN(RNNConfig(**model_config))

    def spec_from_dict(self, d: dict) -> TrialSpec:
        return TrialSpec.from_dict(d)

    def example_inputs(self, loaded: LoadedModel) -> dict[str, np.ndarray]:
        """One trial with every input off: (1, T, I) zeros."""
        spec: TrialSpec = loaded.spec
        return {"inputs": np.zeros((1, spec.n_bins, spec.n_inputs), np.float32)}

    def predict(self, model: RateRNN, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{inputs (B, T, I)} -> {outputs (B, T, O), states (B, T, H), log_rates (B, T, K)}."""
        return run(model, np.asarray(inputs["inputs"], np.float32))._asdict()

    def evaluate(self, loaded: LoadedModel, out: Path, settings: SparseRNNEvaluation,
                 recording: Recording | None = None) -> dict:
        return evaluate_student(loaded, recording if recording is not None else loaded.spec.source.read(), out,
                                settings)


# --------------------------------------------------------------------------- the task


class SparseRNNTask(Task):
    """Output loss + ``activity_weight`` x activity loss on the recorded neurons (module docstring).

    Args:
        model: the student RNN (built from the data's spec).
        spec: the data's TrialSpec; saved in every checkpoint.
        activity_weight: lambda; 0 trains on the output alone (the baseline).
        activity_loss: "poisson" (binned spikes) or "mse" (smoothed rates), see ``ACTIVITY_LOSSES``.
        smooth: Gaussian smoothing of the spike counts for "mse", seconds.
        lr, weight_decay: AdamW settings.
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``min_lr_ratio * lr``.
        threads: CPU threads of torch while this task runs (restored after); None leaves them.
            The RNN steps through time in products of (B, H) by (H, H) matrices, too small to
            share: on a busy machine extra threads wait on each other (30-100x slower steps).
    """

    family = "sparse_rnn"

    def __init__(self, model: RateRNN, spec: TrialSpec, activity_weight: float = 1.0,
                 activity_loss: str = "poisson", smooth: float = 0.04, lr: float = 3e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 20, min_lr_ratio: float = 0.1,
                 threads: int | None = 1):
        super().__init__()
        if activity_loss not in ACTIVITY_LOSSES:
            raise ValueError(f"activity_loss={activity_loss!r}; expected one of {sorted(ACTIVITY_LOSSES)}")
        if activity_weight < 0:
            raise ValueError(f"activity_weight must be >= 0; got {activity_weight}")
        self.model, self.spec = model, spec
        self.save_hyperparameters(ignore=["model", "spec"])
        self.activity = ACTIVITY_LOSSES[activity_loss]
        self.register_buffer("output_std", torch.tensor(spec.behavior_std, dtype=torch.float32), persistent=False)
        self.register_buffer("mean_count", torch.tensor(spec.unit_mean_count, dtype=torch.float32).clamp_min(1e-3),
                             persistent=False)
        self._threads_before: int | None = None

    def setup(self, stage: str) -> None:
        if self.hparams.threads and self._threads_before is None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.hparams.threads)

    def teardown(self, stage: str) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def losses(self, out: RNNOutput, batch: TrialBatch) -> dict[str, torch.Tensor]:
        """``output``: MSE of the z-scored outputs; ``activity``: the recorded neurons' loss (0 if none)."""
        output = ((out.outputs - batch.behavior) / self.output_std).pow(2).mean()
        if self.spec.n_recorded == 0:
            return {"output": output, "activity": torch.zeros_like(output)}
        activity = self.activity(out.log_rates, batch.counts, self.mean_count, self.hparams.smooth / self.spec.bin_size)
        return {"output": output, "activity": activity}

    def step(self, batch: TrialBatch, split: str) -> torch.Tensor:
        losses = self.losses(self.model(batch.inputs), batch)
        # lambda = 0 leaves the activity term out altogether: the output-only baseline exactly.
        weight = self.hparams.activity_weight
        loss = losses["output"] if weight == 0 else losses["output"] + weight * losses["activity"]
        size = batch.inputs.shape[0]
        for name, value in losses.items():
            self.log(f"{split}/{name}_loss", value.detach(), on_epoch=True, on_step=False, batch_size=size,
                     sync_dist=True)
        self.log_loss(split, loss, size)
        return loss

    def summarize(self, results: dict[str, float], datamodule: L.LightningDataModule) -> dict[str, float]:
        """Test losses plus output R^2 on the held-out conditions, its baseline and its ceiling.

        The baseline's condition means use every trial of the training conditions (validation
        trials too), as ``evaluate`` does: the same numbers in metrics.json and the evaluation.
        """
        test, seen = datamodule.data["test"], TrialData(*map(np.concatenate, zip(datamodule.data["train"],
                                                                                  datamodule.data["val"])))
        scores = output_scores(run(self.model.eval(), test.inputs).outputs, test, seen)
        return {**results, **{f"test/{k}": v for k, v in scores.items()}}

    def report(self, metrics: dict[str, float]) -> list[str]:
        return [f"Held-out conditions: output R^2 {metrics['test/output_r2']:.3f} vs nearest training condition "
                f"{metrics['test/output_r2_nearest_condition']:.3f} (ceiling {metrics['test/output_r2_ceiling']:.3f}); "
                f"{self.spec.n_recorded} recorded neurons, activity weight {self.hparams.activity_weight:g}"]
