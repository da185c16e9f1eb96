"""The model registry through a real ``mlflow server`` (SQLite backend store, local artifact root).

Training registers its model on the server with a signature and its tokenizer; another
process loads it by alias to evaluate and to fine-tune it. A model is refused on data that
does not fit its unit vocabulary or inputs, and weights that would run code are never loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from mlflow import MlflowClient

from neuroformer import registry
from neuroformer.data.datamodule import NWBDataModule
from neuroformer.data.dataset import InputSpec, WindowDataset
from neuroformer.data.nwb import read_nwb
from neuroformer.data.splits import window_starts
from neuroformer.errors import ModelMismatchError
from neuroformer.models.neuroformer import Neuroformer, NeuroformerConfig
from neuroformer.registry.mlflow_model import CARD, WEIGHTS, save_model_files
from neuroformer.registry.tracking import mlflow_server, use_tracking_uri
from neuroformer.training import train
from tests.configs import compose
from tests.unsafe import RunsCode

ROOT = Path(__file__).resolve().parents[1]
ALM = ROOT / "tests" / "data" / "alm_guo2017_anm00239123.nwb"
TINY = {"n_embd": 32, "n_head": 2, "n_layer": 1, "patch": (1, 8, 8)}
TINY_OVERRIDES = ["model.n_embd=32", "model.n_head=2", "model.n_layer=1", "model.patch=[1,8,8]"]
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> tuple[str, Path]:
    """A running server: its URI and its folder (store and artifacts)."""
    folder = tmp_path_factory.mktemp("registry-server")
    with mlflow_server(folder) as uri:
        yield uri, folder


@pytest.fixture
def tracking(server, monkeypatch) -> str:
    """Point this process (and the processes it starts) at the server."""
    uri = server[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with use_tracking_uri(uri):
        yield uri


def register(model: Neuroformer, spec, name: str, alias: str | None = None) -> str:
    mlflow.set_experiment(f"register-{name}")
    with mlflow.start_run():
        return registry.log_model(registry.LoadedModel(model, spec, "neuroformer"), registered_name=name, alias=alias)


def test_model_is_refused_on_data_its_vocabulary_or_inputs_do_not_fit(tracking, small_sim_path):
    dm = NWBDataModule(paths=[str(small_sim_path)], n_frames=4, behavior=["running_speed"])
    dm.setup()
    register(Neuroformer.build(dm.spec, **TINY), dm.spec, "nf-mismatch", alias="champion")
    # A model for 16x16 frames, as if trained on another stimulus.
    small_frames = replace(dm.spec, frame_shape=(16, 16))
    register(Neuroformer.build(small_frames, **TINY), small_frames, "nf-mismatch")

    loaded = registry.load("models:/nf-mismatch@champion")
    sim, alm = read_nwb(small_sim_path), read_nwb(ALM)
    WindowDataset([sim], loaded.spec, [np.array([sim.start + 1.0])])  # the data it was built for
    with pytest.raises(ModelMismatchError, match=r"not in the model's unit vocabulary"):
        WindowDataset([alm], loaded.spec, [np.array([alm.start + 1.0])])  # another session's units
    other = registry.load("models:/nf-mismatch/2")
    with pytest.raises(ModelMismatchError, match=r"stimulus: frames are \(32, 32\) but the model expects \(16, 16\)"):
        WindowDataset([sim], other.spec, [np.array([sim.start + 1.0])])


def test_weights_that_would_run_code_are_refused(small_sim_path, tmp_path):
    dm = NWBDataModule(paths=[str(small_sim_path)], n_frames=0)
    dm.setup()
    folder = tmp_path / "model"
    save_model_files(folder, registry.LoadedModel(Neuroformer.build(dm.spec, **TINY), dm.spec, "neuroformer"))
    assert registry.load(folder).spec.to_dict() == dm.spec.to_dict()
    marker = tmp_path / "code-ran"
    torch.save({"id_embedding.weight": RunsCode(marker)}, folder / WEIGHTS)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        registry.load(folder)
    assert not marker.exists()


EVALUATE = """
import json, sys
import numpy as np, torch
from neuroformer.data.dataset import InputSpec, WindowDataset
from neuroformer.data.nwb import read_nwb
from neuroformer.data.splits import window_starts
from neuroformer.registry import load

loaded = load(sys.argv[1])
rec, tok = read_nwb(sys.argv[2]), loaded.spec.tokenizer
starts = window_starts(rec.start, rec.stop, loaded.spec.split, "test", tok.window, tok.past_window, tok.window)
batch = WindowDataset([rec], loaded.spec, [starts[:16]]).__getitems__(list(range(16)))
with torch.no_grad():
    out = loaded.model(batch.inputs)
print(json.dumps({"id_ce": float(loaded.model.losses(out, batch.target_ids, batch.target_dts)["id_ce"]),
                  "t0": batch.t0.tolist(),
                  "logits": out.id_logits[:, :4].flatten().tolist()}))
"""


@pytest.mark.slow
def test_model_registered_on_the_server_is_loaded_by_alias_in_other_processes(
        tracking, server, small_sim_path, tmp_path):
    cfg = compose([*TINY_OVERRIDES, "data.n_frames=0", "data.behavior=[]", "data.batch_size=16",
                   "trainer.max_epochs=2", "+trainer.limit_train_batches=8", "+trainer.limit_val_batches=4",
                   "registry.model_name=nf-server", "registry.alias=champion"], tmp_path / "pretrain",
                  sim_path=small_sim_path)
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["mlflow_tracking_uri"] == tracking and metrics["model_uri"] == "models:/nf-server/1"

    # Registered with its alias, a tensor signature and its tokenizer; artifacts on the server.
    client = MlflowClient(tracking)
    assert client.get_model_version_by_alias("nf-server", "champion").version == "1"
    model_config = torch.load(metrics["best_checkpoint"], weights_only=True)["neuroformer"]["model_config"]
    inputs = mlflow.models.get_model_info("models:/nf-server@champion").signature.inputs
    assert inputs.input_names() == ["ids", "dts", "past_ids", "past_dts"]
    assert inputs.inputs[0].shape == (-1, model_config["block_size"])
    card = json.loads(Path(mlflow.artifacts.download_artifacts(
        "models:/nf-server@champion", dst_path=str(tmp_path / "download"))).joinpath("artifacts", CARD).read_text())
    assert card["family"] == "neuroformer"
    spec = card["spec"]
    assert spec["tokenizer"] == instantiate(cfg.data.tokenizer).to_dict()
    assert len(spec["vocab"]["names"]) == 40  # the recording's units
    assert list((server[1] / "artifacts").rglob(WEIGHTS)), "artifacts are not on the server"

    # Evaluation in another process, by alias: the logits of the best checkpoint's model.
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    result = subprocess.run([sys.executable, "-c", EVALUATE, "models:/nf-server@champion", str(small_sim_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    reference = Neuroformer(NeuroformerConfig(**ckpt["neuroformer"]["model_config"])).eval()
    reference.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    rec, spec = read_nwb(small_sim_path), InputSpec.from_dict(ckpt["neuroformer"]["spec"])
    tok = spec.tokenizer
    starts = window_starts(rec.start, rec.stop, instantiate(cfg.data.split), "test", tok.window, tok.past_window,
                           tok.window)
    assert got["t0"] == pytest.approx(starts[:16].tolist())  # the held-out block the model never saw
    batch = WindowDataset([rec], spec, [starts[:16]]).__getitems__(list(range(16)))
    with torch.no_grad():
        out = reference(batch.inputs)
    np.testing.assert_allclose(got["logits"], out.id_logits[:, :4].flatten().numpy(), rtol=1e-5, atol=1e-5)
    assert got["id_ce"] == pytest.approx(float(reference.losses(out, batch.target_ids, batch.target_dts)["id_ce"]),
                                         rel=1e-5)

    # Fine-tuning in another process, from the model the alias names on the server.
    finetune_root = tmp_path / "finetune"
    cmd = [sys.executable, "train.py", "experiment=finetune_speed", "task.pretrained=models:/nf-server@champion",
           "task.stages=[{train: heads}]", f"data.paths=[{small_sim_path}]", "data.n_frames=0", "data.batch_size=16",
           "trainer.max_steps=4", "trainer.val_check_interval=2", "+trainer.limit_val_batches=2",
           "+trainer.limit_test_batches=2", "registry.register=false", f"paths.output_root={finetune_root}",
           f"hydra.run.dir={finetune_root}/run"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    tuned = json.loads((finetune_root / "run" / "metrics.json").read_text())
    assert tuned["mlflow_tracking_uri"] == tracking
    logged = {a.path for a in MlflowClient(tracking).list_artifacts(tuned["mlflow_run_id"])}
    assert {"metrics.json", "behavior.png"} <= logged, logged  # true vs predicted speed, on the server
    tuned_ckpt = torch.load(tuned["best_checkpoint"], map_location="cpu", weights_only=True)
    assert tuned_ckpt["neuroformer"]["pretrained"] == "models:/nf-server@champion"
    for key, value in reference.state_dict().items():  # the frozen backbone is the registered model
        assert torch.equal(tuned_ckpt["state_dict"][f"model.{key}"], value), key
