"""``python -m neuroformer.evaluate`` end to end: a model trained by ``train.py``, as a checkpoint and
as a registered model on a real MLflow tracking server; metrics.json, PNG plots and the MLflow run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pytest

from neuroformer import plots
from neuroformer.data.nwb import read_nwb
from neuroformer.data.simulate import SimulationConfig, simulate_recording
from neuroformer.data.splits import SplitSpec
from neuroformer.errors import ModelMismatchError
from neuroformer.data.simulate import load_ground_truth
from neuroformer.evaluate import evaluate, family_settings, main
from neuroformer.inference.evaluation import EvaluationConfig
from neuroformer.registry import LoadedModel, load
from neuroformer.registry.tracking import mlflow_server

ROOT = Path(__file__).resolve().parents[1]
PLOTS = {"raster.png", "rate_calibration.png", "psth.png", "psth_correlation.png", "connectivity.png"}
FAST = ["--n-samples", "2", "--max-windows", "40", "--batch-size", "40", "--no-baselines"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_sim_path):
    """A tiny model trained for two short epochs by ``train.py``, registered on an MLflow server.

    Yields the run folder and the server's URI (set as MLFLOW_TRACKING_URI while the tests run).
    """
    tmp = tmp_path_factory.mktemp("evaluate")
    with mlflow_server(tmp / "server") as uri:
        cmd = [sys.executable, "train.py", f"data.paths=[{small_sim_path}]", "model.n_embd=32", "model.n_head=2",
               "model.n_layer=1", "model.patch=[1,8,8]", "data.split.n_blocks=10", "trainer.max_epochs=2",
               "+trainer.limit_train_batches=30",
               "task.lr=3e-3", "task.warmup_steps=5", "evaluate=null",
               "+trainer.limit_val_batches=2", "registry.model_name=nf-eval", "registry.alias=champion",
               f"paths.output_root={tmp}", f"hydra.run.dir={tmp}/run"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        # A quiet run: the registered model has a signature and input example, its pyfunc is code.
        for noise in ("An input example was not provided", "Add type hints", "CloudPickle", "Downloading artifacts"):
            assert noise not in done.stderr, noise
        with pytest.MonkeyPatch.context() as env:
            env.setenv("MLFLOW_TRACKING_URI", uri)
            yield tmp / "run", uri


def repeated_test_trials(path: Path, split: SplitSpec) -> int:
    """Trials with clip_id >= 0 whose span and preceding past window (0.15 s) lie in one test block."""
    rec = read_nwb(path)
    names = split.assign()
    edges = np.linspace(rec.start, rec.stop, len(names) + 1)
    t = rec.trials
    inside = [(t.start - 0.15 >= edges[b]) & (t.stop <= edges[b + 1]) for b in np.flatnonzero(names == "test")]
    return int(((t.columns["clip_id"] >= 0) & np.any(inside, axis=0)).sum())


def test_checkpoint_evaluation_writes_metrics_and_plots(trained, small_sim_path, tmp_path, monkeypatch):
    run, _ = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # a checkpoint needs no server; nothing is logged
    checkpoint = next((run / "checkpoints").glob("best*.ckpt"))
    with_baselines = [a for a in FAST if a != "--no-baselines"] + ["--baseline-cache", str(tmp_path / "cache")]
    assert main(["--model", str(checkpoint), "--out", str(tmp_path), *with_baselines]) == 0  # data: the training file
    summary = json.loads((tmp_path / "metrics.json").read_text())
    m = summary["metrics"]
    # The reference predictors on the same windows: the oracle (a simulated file) above the GLM and the
    # mean rate; the model as a fraction of the oracle and minus the GLM, each with its interval.
    assert m["oracle_bits_per_spike"] > max(m["glm_bits_per_spike"], m["mean_rate_bits_per_spike"])
    assert m["fraction_of_oracle"] == pytest.approx(m["bits_per_spike"] / m["oracle_bits_per_spike"])
    assert m["minus_glm"] == pytest.approx(m["bits_per_spike"] - m["glm_bits_per_spike"])
    for key in ("bits_per_spike", "oracle_bits_per_spike", "glm_bits_per_spike", "fraction_of_oracle", "minus_glm"):
        assert m[f"{key}_low"] <= m[key] <= m[f"{key}_high"], key
    assert m["bits_per_spike"] == m["bits_per_spike_readout"]  # the model has a rate read-out: its headline
    (cached,) = (tmp_path / "cache").glob("glm_*.npz")  # the GLM is fitted once and kept
    assert summary["data"] == str(small_sim_path) and summary["settings"]["split"] == "test"
    assert m["windows"] == 40 and m["units"] == 40
    # The true spikes counted are those of the first 40 test windows, from the first test block's start + past
    # window, under the split the model was trained with (the run's: seed 42, 10 blocks).
    rec, split = read_nwb(small_sim_path), load(checkpoint).spec.split
    assert split == SplitSpec(n_blocks=10, seed=42)
    names = split.assign()
    t0 = np.linspace(rec.start, rec.stop, len(names) + 1)[np.flatnonzero(names == "test")[0]] + 0.15
    assert m["true_spikes"] == ((rec.units.spike_times >= t0) & (rec.units.spike_times < t0 + 40 * 0.05)).sum()
    assert m["psth_trials"] == repeated_test_trials(small_sim_path, split) > 0
    assert m["connectivity_n_links"] == np.count_nonzero(load_ground_truth(small_sim_path).connectivity)
    # Two short epochs put the trained model far ahead of the same architecture untrained, on
    # the same windows and samples.
    loaded = load(checkpoint)
    untrained = LoadedModel(loaded.model_family.build(loaded.model_family.model_config(loaded.model)).eval(),
                            loaded.spec, loaded.family, loaded.train_config, "untrained")
    settings = family_settings(EvaluationConfig, FAST + ["--no-connectivity"])
    floor = evaluate(untrained, tmp_path / "untrained", settings, rec)["metrics"]
    assert m["bits_per_spike_sampled"] > floor["bits_per_spike_sampled"] + 0.5, (m, floor)
    assert abs(np.log(m["sampled_rate_ratio"])) < abs(np.log(floor["sampled_rate_ratio"])), (m, floor)
    assert m["bits_per_spike_readout"] > floor["bits_per_spike_readout"], (m, floor)
    assert set(summary["plots"]) == PLOTS
    for name in PLOTS:
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 300 and image.shape[1] > 400 and image.std() > 0.01, name  # drawn, not blank


def test_registered_model_evaluation_is_logged_to_mlflow(trained, tmp_path, capsys):
    _, uri = trained
    out = tmp_path / "eval"
    assert main(["--model", "models:/nf-eval@champion", "--out", str(out), "--no-connectivity", *FAST]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["model"] == "models:/nf-eval@champion"
    assert "connectivity.png" not in summary["plots"] and "connectivity_auroc" not in summary["metrics"]
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["evaluate"], output_format="list")
    assert run.data.metrics["bits_per_spike"] == pytest.approx(summary["metrics"]["bits_per_spike"])
    assert run.data.tags["neuroformer.model"] == "models:/nf-eval@champion"
    assert run.data.params["n_samples"] == "2"
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert logged == {"metrics.json", *summary["plots"]}
    assert uri in capsys.readouterr().out


def test_a_recording_with_other_units_is_refused(trained, tmp_path, capsys):
    run, _ = trained
    other = simulate_recording(tmp_path / "other.nwb", SimulationConfig(seed=5, n_units=5, duration=12.0),
                               progress=False)
    checkpoint = next((run / "checkpoints").glob("best*.ckpt"))
    assert main(["--model", str(checkpoint), "--data", str(other), "--out", str(tmp_path / "x"), *FAST]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: \S*other\.nwb: units: .*not in the model.s unit vocabulary.*\n", err), err
    with pytest.raises(ModelMismatchError):  # --debug: the error itself, with its traceback
        main(["--model", str(checkpoint), "--data", str(other), "--out", str(tmp_path / "x"), "--debug", *FAST])


def test_behavior_and_connectivity_figures_show_their_inputs(tmp_path):
    t = np.linspace(0, 10, 200)
    true, pred = np.sin(t), 0.8 * np.sin(t) + 0.1
    fig = plots.behavior_trace(t, true, pred, "running_speed", {"R^2": 0.9})
    lines = fig.axes[0].get_lines()
    np.testing.assert_array_equal(lines[0].get_ydata(), true)
    np.testing.assert_array_equal(lines[1].get_ydata(), pred)
    assert "R^2 = 0.900" in fig.axes[0].get_title()
    weights = np.zeros((6, 6))
    weights[0, 3], weights[2, 5] = 1.0, -1.5
    fig = plots.connectivity_matrices(weights + 0.01, weights)
    np.testing.assert_array_equal(fig.axes[0].get_images()[0].get_array(), weights)
    for name, figure in (("behavior.png", plots.behavior_trace(t, true)), ("connectivity.png", fig)):
        image = matplotlib.image.imread(plots.save(figure, tmp_path / name))
        assert image.std() > 0.01, name
