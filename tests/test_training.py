"""Training end to end: every experiment config runs, a short run learns, the registry round trip."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate

from neuroformer import registry
from neuroformer.data.dataset import InputSpec, WindowDataset
from neuroformer.data.nwb import read_nwb
from neuroformer.data.splits import window_starts
from neuroformer.evaluate import evaluate
from neuroformer.inference.evaluation import EvaluationConfig
from neuroformer.models.calibration import calibrate_readout
from neuroformer.models.neuroformer import Neuroformer, NeuroformerConfig
from neuroformer.training import train
from tests.configs import NEUROFORMER_EXPERIMENTS, compose

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.n_embd=32", "model.n_head=2", "model.n_layer=1", "model.patch=[1,8,8]"]


@pytest.mark.parametrize("experiment", [None, *NEUROFORMER_EXPERIMENTS])
def test_fast_dev_run_of_every_experiment(experiment, small_sim_path, tmp_path):
    overrides = ["debug=fast_dev_run", *TINY_MODEL] + ([f"experiment={experiment}"] if experiment else [])
    cfg = compose(overrides, tmp_path, sim_path=small_sim_path)
    value = train(cfg)
    assert np.isfinite(value)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics[cfg.optimized_metric] == value


def test_short_run_beats_unigram_and_registry_round_trip(small_sim_path, tmp_path):
    cfg = compose(
        [*TINY_MODEL, "trainer.max_epochs=6", "task.warmup_steps=10", "registry.alias=champion",
         "registry.model_name=nf-test", "data.batch_size=16"],
        tmp_path, sim_path=small_sim_path,
    )
    train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/id_ce"] < metrics["test/id_ce_unigram"], metrics
    assert metrics["model_uri"] == "models:/nf-test/1"

    # The registered model, loaded by alias, is the best checkpoint's model.
    mlflow.set_tracking_uri(metrics["mlflow_tracking_uri"])
    loaded = registry.load("models:/nf-test@champion")
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    reference = Neuroformer(NeuroformerConfig(**ckpt["neuroformer"]["model_config"])).eval()
    reference.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    spec = InputSpec.from_dict(ckpt["neuroformer"]["spec"])
    assert loaded.spec.to_dict() == spec.to_dict()
    rec = read_nwb(small_sim_path)
    tok = spec.tokenizer
    starts = window_starts(rec.start, rec.stop, instantiate(cfg.data.split), "test", tok.window,
                           tok.past_window, tok.window)
    batch = WindowDataset([rec], loaded.spec, [starts[:8]]).__getitems__(list(range(8)))
    with torch.no_grad():
        expected = reference(batch.inputs)
        got = loaded.model(batch.inputs)
    torch.testing.assert_close(got.id_logits, expected.id_logits, rtol=0, atol=0)
    # Before testing, the read-out was calibrated on the validation windows: the best checkpoint and
    # the registered model carry the gains that calibrating the checkpoint's weights gives.
    stored = reference.rate_gain.clone()
    assert (stored != 1).any(), "the best checkpoint holds no calibration"
    torch.testing.assert_close(loaded.model.rate_gain, stored)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    calibrate_readout(reference, datamodule.val_dataloader())  # from the uncalibrated paths, whatever it holds
    torch.testing.assert_close(reference.rate_gain, stored)
    torch.testing.assert_close(loaded.model.rates(batch.inputs), reference.rates(batch.inputs))

    # The run evaluated that model's generations: files in the run folder, the same in its MLflow run,
    # and the numbers `python -m neuroformer.evaluate` gives for the registered model.
    evaluation = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert evaluation["model"] == "models:/nf-test/1"
    assert {"raster.png", "rate_calibration.png", "psth.png", "connectivity.png"} <= set(evaluation["plots"])
    again = evaluate(loaded, tmp_path / "again", EvaluationConfig(**cfg.evaluate), rec)["metrics"]
    for key in ("bits_per_spike", "spike_f1", "psth_r_median", "connectivity_auroc"):
        assert np.isfinite(again[key]) and evaluation["metrics"][key] == pytest.approx(again[key], rel=1e-6), key
    run = mlflow.get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["eval/bits_per_spike"] == pytest.approx(again["bits_per_spike"], rel=1e-6)
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {f"evaluation/{name}" for name in ["metrics.json", *evaluation["plots"]]} == logged

    # The MLflow pyfunc flavour gives the same logits.
    pyfunc = mlflow.pyfunc.load_model("models:/nf-test/1")
    inputs = {k: getattr(batch, k).numpy() for k in ("ids", "dts", "past_ids", "past_dts", "frames", "behavior")}
    np.testing.assert_allclose(pyfunc.predict(inputs)["id_logits"], expected.id_logits.numpy(), rtol=1e-6, atol=1e-6)



def test_command_line_sweep_runs_every_job(small_sim_path, tmp_path):
    cmd = [sys.executable, "train.py", "-m", "debug=fast_dev_run", "model.n_layer=1,2", "model.n_embd=32", "model.n_head=2",
           f"data.paths=[{small_sim_path}]", f"paths.output_root={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(tmp_path.glob("multiruns/pretrain/*/*/metrics.json"))
    assert len(results) == 2
    layers = sorted(int(yaml.safe_load((r.parent / ".hydra" / "overrides.yaml").read_text())[1].split("=")[1])
                    for r in results)
    assert layers == [1, 2]


def test_logger_none_runs_and_a_log_file_shows_progress(small_sim_path, tmp_path, caplog):
    """``logger=none`` leaves out the callbacks that need a logger; with the output not a terminal
    (as under pytest, SLURM or ``> log``) training writes plain progress lines."""
    cfg = compose(["logger=none", *TINY_MODEL, "trainer.max_epochs=1", "+trainer.limit_train_batches=6",
                   "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "evaluate=null",
                   "callbacks.progress_log.every_n_steps=2"], tmp_path, sim_path=small_sim_path)
    with caplog.at_level("INFO", logger="neuroformer"):
        value = train(cfg)
    assert np.isfinite(value)
    lines = [r.getMessage() for r in caplog.records if r.name == "neuroformer.progress"]
    progress = [line for line in lines if line.startswith("epoch 1/1")]
    assert [line.split()[3] for line in progress] == ["2/6", "4/6", "6/6"], lines
    assert all("windows/s" in line and "train/loss" in line for line in progress)
    assert "left 0s" in progress[-1]
    assert any(line.startswith("validation after step 6: ") and "val/id_ce" in line for line in lines), lines
