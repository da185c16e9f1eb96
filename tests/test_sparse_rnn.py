"""The sparse-data RNN family: dynamics metrics, trial data, the RNN, its losses, training end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroformer.data.nwb import read_nwb
from neuroformer.data.simulate_reaching import ReachingConfig, simulate_reaching
from neuroformer.data.trials import TrialDataModule, TrialSpec, choose_recorded, split_trials
from neuroformer.errors import ModelMismatchError, RecordingError
from neuroformer.metrics.dynamics import canonical_correlations, cca_similarity, linear_cka, ridge_r2
from neuroformer.models.rnn import RateRNN, RNNConfig

SMALL = ReachingConfig(seed=2, n_units=30, trials_per_condition=5)


@pytest.fixture(scope="module")
def reach_path(tmp_path_factory) -> Path:
    """A small simulated reaching session (read-only)."""
    return simulate_reaching(tmp_path_factory.mktemp("reach") / "reach.nwb", SMALL)


def _datamodule(path: Path, **kw) -> TrialDataModule:
    dm = TrialDataModule(paths=[str(path)], **kw)
    dm.setup()
    return dm


# --------------------------------------------------------------------------- metrics


def _trajectories(rng: np.random.Generator, n_cond: int = 8, n_t: int = 60, dim: int = 4, units: int = 30):
    """(C, T, units) smooth low-dimensional trajectories: random mixtures of oscillations."""
    t = np.linspace(0, 1, n_t)
    latent = np.stack([np.stack([np.sin(2 * np.pi * (1 + k) * t + rng.uniform(0, 2 * np.pi)) for k in range(dim)],
                                axis=-1) for _ in range(n_cond)])
    return latent @ rng.standard_normal((dim, units))


def test_metrics_are_one_for_identical_and_invariant_where_they_claim():
    rng = np.random.default_rng(0)
    x = _trajectories(rng)
    assert cca_similarity(x, x, k=4) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert np.nanmin(ridge_r2(x, x, alpha=1e-6)) == pytest.approx(1.0, abs=1e-4)
    # CCA ignores any invertible linear map (and added units); CKA rotations and scale only.
    mixed = np.concatenate([x @ rng.standard_normal((30, 30)), x[..., :5]], axis=-1)
    assert cca_similarity(x, mixed, k=4) == pytest.approx(1.0, abs=1e-9)
    rotation = np.linalg.qr(rng.standard_normal((30, 30)))[0]
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0, abs=1e-12)


def test_metrics_are_near_zero_for_unrelated_trajectories():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((8, 400, 5)), rng.standard_normal((8, 400, 5))
    # Independent samples: canonical correlations of k dims in n samples are about sqrt(k / n).
    assert cca_similarity(a, b, k=5) < 0.06
    assert linear_cka(a, b) < 0.01
    assert abs(np.nanmean(ridge_r2(a, b))) < 0.01


def test_ridge_r2_matches_the_noise_it_was_given():
    rng = np.random.default_rng(2)
    x = _trajectories(rng, n_t=200, units=10)
    signal = x @ rng.standard_normal((10, 3))
    noise = rng.standard_normal(signal.shape) * signal.std(axis=(0, 1))  # equal variance: R^2 = 1/2
    r2 = ridge_r2(x, signal + noise, alpha=1e-6)
    np.testing.assert_allclose(r2, 0.5, atol=0.03)
    # The first canonical correlation of a noisy copy is the signal's correlation, 1/sqrt(2).
    rho = canonical_correlations(signal, signal[..., :1] + noise[..., :1], k=3)
    assert rho[0] == pytest.approx(1 / np.sqrt(2), abs=0.02)


def test_ridge_r2_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same C and T"):
        ridge_r2(np.zeros((4, 10, 3)), np.zeros((4, 11, 2)))


# --------------------------------------------------------------------------- trial data


def test_trials_become_aligned_tensors(reach_path):
    dm = _datamodule(reach_path, record_fraction=0.2, bin_size=0.02, window=(-0.6, 0.9))
    spec, rec = dm.spec, read_nwb(reach_path)
    assert spec.n_bins == 75 and spec.n_inputs == 3 and spec.n_outputs == SMALL.n_muscles
    assert spec.n_recorded == round(0.2 * SMALL.n_units) == dm.data["train"].counts.shape[-1]
    train = dm.data["train"]
    k, row = 0, int(train.trial[0])
    go, on = rec.trials.columns["go_cue_time"][row], rec.trials.columns["target_on_time"][row]
    edges = go - 0.6 + np.arange(76) * 0.02
    # Inputs: the target from its onset to the go cue, then a 50 ms pulse (area = pulse / bin).
    held = (edges[:-1] >= on - 1e-9) & (edges[1:] <= go + 1e-9)
    np.testing.assert_allclose(train.inputs[k, held, 0], rec.trials.columns["target_x"][row], atol=1e-6)
    np.testing.assert_allclose(train.inputs[k, ~held, :2], 0, atol=1e-6)
    assert train.inputs[k, :, 2].sum() == pytest.approx(0.05 / 0.02)
    # Counts: the recorded units' spikes in each bin; behaviour: the EMG at bin centres.
    unit = rec.units.names.index(spec.recorded[0])
    np.testing.assert_array_equal(train.counts[k, :, 0], np.histogram(rec.units.spikes_of(unit), edges)[0])
    np.testing.assert_allclose(train.behavior[k], rec.behavior["emg"].at(edges[:-1] + 0.01), rtol=1e-6)
    assert TrialSpec.from_dict(spec.to_dict()) == spec


def test_splits_hold_out_whole_conditions_and_validation_trials(reach_path):
    dm = _datamodule(reach_path, test_conditions=[1, 5], val_fraction=0.2, split_seed=3)
    trials = {s: set(d.trial.tolist()) for s, d in dm.data.items()}
    assert not (trials["train"] & trials["val"]) and not (trials["train"] & trials["test"])
    assert len(set.union(*trials.values())) == SMALL.n_trials
    rec = read_nwb(reach_path)
    conditions = rec.trials.columns["condition"]
    assert trials["test"] == set(np.flatnonzero(np.isin(conditions, [1, 5])).tolist())
    for c in set(range(8)) - {1, 5}:  # one of each training condition's 5 trials validates
        assert sum(conditions[t] == c for t in trials["val"]) == 1
    # Normalisation comes from training trials only.
    np.testing.assert_allclose(dm.spec.behavior_mean, dm.data["train"].behavior.mean(axis=(0, 1)), rtol=1e-5)


def test_recorded_subsets_are_seeded_and_nested(reach_path):
    rec = read_nwb(reach_path)
    small, large = choose_recorded(rec, 0.1, None, 7), choose_recorded(rec, 0.5, None, 7)
    assert len(small) == 3 and len(large) == 15 and set(small) <= set(large)
    assert choose_recorded(rec, 0.1, None, 8) != small
    assert len(choose_recorded(rec, 0.9, 4, 7)) == 4  # a count wins over the fraction
    assert choose_recorded(rec, 0.0, None, 7) == ()
    split = split_trials(np.array([0, 0, 0, 1, 1, 2]), np.array([2]), 0.5, 0)
    assert set(split["test"]) == {5} and len(split["val"]) == 2 + 1 and len(split["train"]) == 1 + 1


@pytest.mark.parametrize("option, value, field", [
    ("condition", "direction", "trials/direction"),
    ("target", ["target_x", "reach_y"], "trials/reach_y"),
    ("go_cue", "go", "trials/go"),
    ("behavior", ["emg", "hand_speed"], "behavior/hand_speed"),
    ("test_conditions", [1, 9], "trials/condition"),
    ("record_count", 31, "units"),
])
def test_data_errors_name_the_file_and_field(reach_path, option, value, field):
    with pytest.raises(RecordingError) as err:
        _datamodule(reach_path, **{option: value})
    assert err.value.path == str(reach_path) and err.value.field == field
    assert str(err.value).startswith(f"{reach_path}: {field}: ")


def test_a_recording_without_reaching_trials_is_refused(small_sim_path):
    with pytest.raises(RecordingError, match=r"small_sim\.nwb: trials/condition: no such column"):
        _datamodule(small_sim_path)


def test_a_window_outside_the_behaviour_is_refused(reach_path):
    with pytest.raises(RecordingError, match=r"behavior/emg: trial \d+: its window"):
        _datamodule(reach_path, window=(-1.0, 0.9))  # the first trial starts 0.8 s before its go cue


# --------------------------------------------------------------------------- the model


def test_rnn_shapes_and_designated_units(reach_path):
    spec = _datamodule(reach_path, record_count=4).spec
    model = RateRNN.build(spec, hidden=16)
    out = model(torch.zeros(3, spec.n_bins, spec.n_inputs))
    assert out.states.shape == (3, spec.n_bins, 16) and out.outputs.shape == (3, spec.n_bins, spec.n_outputs)
    # Recorded neuron k reads unit k alone: its log rate is an affine map of that unit's activity.
    with torch.no_grad():
        model.neuron_gain.copy_(torch.arange(1.0, 5.0))
        out = model(torch.randn(2, spec.n_bins, spec.n_inputs))
    torch.testing.assert_close(out.log_rates, out.states[..., :4] * torch.arange(1.0, 5.0) + model.neuron_bias)
    # Before training, outputs sit at the data's mean and neurons at their mean training rate.
    torch.testing.assert_close(model.neuron_bias.exp(), torch.tensor(spec.unit_mean_count).clamp_min(1e-3))
    with pytest.raises(ModelMismatchError, match="hidden=3"):
        RateRNN(RNNConfig(n_inputs=3, n_outputs=2, n_recorded=4, hidden=3))


# --------------------------------------------------------------------------- the task


def _task(dm: TrialDataModule, **kw):
    from neuroformer.tasks.sparse_rnn import SparseRNNTask

    torch.manual_seed(0)
    return SparseRNNTask(RateRNN.build(dm.spec, hidden=32), dm.spec, **kw)


@pytest.mark.parametrize("activity_loss", ["poisson", "mse"])
def test_lambda_zero_ignores_activity_exactly(reach_path, activity_loss):
    dm = _datamodule(reach_path, record_count=6)
    batch = next(iter(dm.train_dataloader()))
    scrambled = batch._replace(counts=torch.full_like(batch.counts, float("nan")))  # any activity at all
    task = _task(dm, activity_weight=0.0, activity_loss=activity_loss)
    task.log = lambda *a, **k: None  # no trainer attached: step's logging is not under test here

    def loss_and_grads(b):
        task.zero_grad()
        loss = task.step(b, "train")
        loss.backward()
        return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in task.model.parameters()]

    (loss, grads), (loss2, grads2) = loss_and_grads(batch), loss_and_grads(scrambled)
    assert torch.equal(loss, loss2) and loss == task.losses(task.model(batch.inputs), batch)["output"]
    for g, g2 in zip(grads, grads2):
        assert (g is None and g2 is None) or torch.equal(g, g2)
    assert task.model.neuron_gain.grad is None and task.model.neuron_bias.grad is None  # not in the loss
    # With a weight, the activity does count.
    weighted = _task(dm, activity_weight=2.0, activity_loss=activity_loss)
    weighted.log = lambda *a, **k: None
    losses = weighted.losses(weighted.model(batch.inputs), batch)
    torch.testing.assert_close(weighted.step(batch, "train"), losses["output"] + 2.0 * losses["activity"])


def test_activity_losses_against_their_formulas():
    from neuroformer.tasks.sparse_rnn import poisson_loss, smooth, smoothed_rate_mse

    log_rates = torch.randn(2, 7, 3)
    counts = torch.poisson(torch.full((2, 7, 3), 0.7))
    expected = (log_rates.exp() - counts * log_rates).mean()
    torch.testing.assert_close(poisson_loss(log_rates, counts, torch.ones(3), 0.0), expected)
    mean = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(smoothed_rate_mse(log_rates, counts, mean, 0.0),
                               ((log_rates.exp() - counts) / mean).pow(2).mean())
    # Smoothing keeps a constant, spreads an impulse as a normalised Gaussian.
    torch.testing.assert_close(smooth(torch.full((1, 20, 1), 3.0), 2.0), torch.full((1, 20, 1), 3.0))
    impulse = torch.zeros(1, 41, 1)
    impulse[0, 20, 0] = 1.0
    spread = smooth(impulse, 2.0)[0, :, 0]
    assert spread.sum().item() == pytest.approx(1.0, abs=1e-6) and spread.argmax().item() == 20
    assert (spread[22] / spread[20]).item() == pytest.approx(np.exp(-0.5), rel=1e-5)


def test_a_short_training_run_reduces_both_losses(reach_path, tmp_path):
    import lightning as L

    dm = _datamodule(reach_path, record_fraction=0.3, batch_size=16)
    task = _task(dm, activity_weight=5.0, lr=1e-2, warmup_steps=2)
    batch = next(iter(dm.val_dataloader()))
    before = _losses(task, batch)
    trainer = L.Trainer(max_epochs=80, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(task, datamodule=dm)
    after = _losses(task, batch)
    assert after["output"] < 0.5 * before["output"], (before, after)
    # The activity loss falls at least a fifth of the way to its floor: the Poisson loss of the
    # same spikes under the simulation's true rates.
    floor = _true_rate_loss(dm, batch)
    assert floor < after["activity"] < before["activity"] - 0.2 * (before["activity"] - floor), (before, after, floor)


def _losses(task, batch) -> dict[str, float]:
    task.eval()
    with torch.no_grad():
        losses = {k: v.item() for k, v in task.losses(task.model(batch.inputs), batch).items()}
    task.train()
    return losses


def _true_rate_loss(dm: TrialDataModule, batch) -> float:
    from neuroformer.tasks.sparse_rnn import poisson_loss, reference_population

    rec = dm.recordings[0]
    rates, _ = reference_population(rec, dm.spec, 0.04)  # (all trials in table order, T, N) Hz
    units = [rec.units.names.index(n) for n in dm.spec.recorded]
    expected = torch.from_numpy(rates[batch.trial.numpy()][..., units] * dm.spec.bin_size)
    return poisson_loss(expected.log(), batch.counts, torch.ones(len(units)), 0.0).item()


# --------------------------------------------------------------------------- end to end


def test_fast_dev_run_of_the_experiment_through_train(reach_path, tmp_path):
    from neuroformer.training import train
    from tests.configs import compose

    cfg = compose(["experiment=sparse_rnn", "debug=fast_dev_run", f"data.paths=[{reach_path}]", "model.hidden=16"],
                  tmp_path)
    value = train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert np.isfinite(value) and metrics["test/output_r2"] == value
    for key in ("test/output_loss", "test/activity_loss", "test/output_r2_nearest_condition", "test/output_r2_ceiling"):
        assert np.isfinite(metrics[key]), key


def test_a_short_run_registers_evaluates_and_loads_back(reach_path, tmp_path):
    import mlflow

    from neuroformer import registry
    from neuroformer.data.trials import trial_data
    from neuroformer.evaluate import evaluate
    from neuroformer.registry.tracking import use_tracking_uri
    from neuroformer.tasks.sparse_rnn import SparseRNNEvaluation
    from neuroformer.training import train
    from tests.configs import compose

    cfg = compose(["experiment=sparse_rnn", f"data.paths=[{reach_path}]", "model.hidden=24", "trainer.max_epochs=4",
                   "trainer.check_val_every_n_epoch=2", "data.record_fraction=0.2", "registry.model_name=rnn-test",
                   "registry.alias=champion"], tmp_path)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_uri"] == "models:/rnn-test/1"
    with use_tracking_uri(metrics["mlflow_tracking_uri"]):
        loaded = registry.load("models:/rnn-test@champion")
        pyfunc = mlflow.pyfunc.load_model("models:/rnn-test/1")
    checkpoint = registry.load(metrics["best_checkpoint"])
    assert loaded.family == checkpoint.family == "sparse_rnn" and loaded.spec == checkpoint.spec
    assert loaded.spec.n_recorded == 6 and loaded.spec.source.files == (str(reach_path.resolve()),)

    rec = read_nwb(reach_path)
    inputs = trial_data(rec, loaded.spec).inputs[:4]
    with torch.no_grad():
        got, expected = loaded.model(torch.from_numpy(inputs)), checkpoint.model(torch.from_numpy(inputs))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    served = pyfunc.predict({"inputs": inputs})
    np.testing.assert_allclose(served["outputs"], got.outputs.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(served["log_rates"], got.log_rates.numpy(), rtol=1e-6, atol=1e-6)

    # The run evaluated the registered model; evaluating it again gives the same numbers, and the
    # held-out output R^2 of the evaluation is the test metric of the run (the same trials).
    evaluation = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert evaluation["model"] == "models:/rnn-test/1" and evaluation["plots"] == ["trajectories.png"]
    again = evaluate(loaded, tmp_path / "again", SparseRNNEvaluation(**cfg.evaluate), rec)["metrics"]
    for key in ("dynamics_cca", "dynamics_cka", "unrecorded_r2", "dynamics_cca_random", "output_r2"):
        assert np.isfinite(again[key]) and evaluation["metrics"][key] == pytest.approx(again[key], rel=1e-9), key
    for key in ("output_r2", "output_r2_nearest_condition", "output_r2_ceiling"):
        assert evaluation["metrics"][key] == pytest.approx(metrics[f"test/{key}"], rel=1e-5), key
    assert evaluation["metrics"]["n_unrecorded"] == SMALL.n_units - 6
