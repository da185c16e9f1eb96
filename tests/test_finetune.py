"""Fine-tuning: behaviour targets (never inputs), vocabulary extension, frozen stages, runs from the registry."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import h5py
import lightning as L
import mlflow
import numpy as np
import pytest
import torch

from neuroformer import registry
from neuroformer.data.datamodule import NWBDataModule
from neuroformer.data.dataset import InputSpec
from neuroformer.data.targets import IGNORE, BehaviorTarget
from neuroformer.data.tokenizer import SpikeTokenizer
from neuroformer.data.vocabulary import UnitVocabulary
from neuroformer.errors import ModelMismatchError, RecordingError
from neuroformer.models.neuroformer import Neuroformer
from neuroformer.models.transfer import ID_ROWS, extend_vocabulary
from neuroformer.tasks.finetune import FinetuneTask
from neuroformer.registry.tracking import tracking_uri
from neuroformer.training import train
from tests.configs import compose

ROOT = Path(__file__).resolve().parents[1]
ALM = ROOT / "tests" / "data" / "alm_guo2017_anm00239123.nwb"
TINY = {"n_embd": 32, "n_head": 2, "n_layer": 1, "patch": (1, 8, 8)}
TINY_OVERRIDES = ["model.n_embd=32", "model.n_head=2", "model.n_layer=1", "model.patch=[1,8,8]"]
SPEED = BehaviorTarget(names=["running_speed"])
QUIET = ["logger=none", "~callbacks.lr_monitor"]


def speed_data(path: Path, **kwargs) -> NWBDataModule:
    """Spikes only (no stimulus, no behaviour input), labelled with running speed."""
    dm = NWBDataModule(paths=[str(path)], n_frames=0, behavior=[], target=SPEED, batch_size=16, **kwargs)
    dm.setup()
    return dm


def register(model: Neuroformer, spec: InputSpec, tmp_path: Path, name: str) -> str:
    """Register ``model`` as NAME@base in the MLflow store ``compose(..., tmp_path)`` runs use."""
    mlflow.set_tracking_uri(tracking_uri(tmp_path / "outputs" / "mlflow.db"))
    experiment = mlflow.create_experiment(f"register-{name}", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        registry.log_model(registry.LoadedModel(model, spec, "neuroformer"), registered_name=name, alias="base")
    return f"models:/{name}@base"


def test_speed_target_is_the_true_window_mean_and_never_an_input(small_sim_path):
    dm = speed_data(small_sim_path)
    ds = dm.datasets["test"]
    batch = ds.__getitems__(list(range(len(ds))))
    assert batch.behavior is None and batch.frames is None  # the model gets spikes only
    # Ground truth: the simulator's 50 Hz speed samples, linearly interpolated, averaged over
    # [t0, t0 + window) exactly (fine trapezoid). The 8-sample midpoint rule is within 0.1 cm/s.
    with h5py.File(small_sim_path, "r") as f:
        series = f["processing/behavior/BehavioralTimeSeries/running_speed"]
        speed = series["data"][()]
        times = series["starting_time"][()] + np.arange(len(speed)) / series["starting_time"].attrs["rate"]
    window = dm.tokenizer.window
    grid = np.linspace(0.0, window, 2001)
    truth = np.array([np.trapezoid(np.interp(t0 + grid, times, speed), grid) / window for t0 in ds.t0])
    got = dm.spec.target.denormalise(batch.target_behavior.numpy())[:, 0]
    assert speed.std() > 5  # the block has both running and rest, so this is not trivially flat
    np.testing.assert_allclose(got, truth, atol=0.1)
    # Standardised with training windows only.
    train_speed = dm.spec.target.raw(dm.recordings[0], dm.datasets["train"].t0, window)
    np.testing.assert_allclose(dm.spec.target.mean, train_speed.mean(0), rtol=1e-5)

    # A spec that also feeds the target as an input is refused, however it is built.
    with pytest.raises(ModelMismatchError, match="running_speed.*also a model input"):
        replace(dm.spec, behavior=["running_speed"], behavior_dims=[1], behavior_steps=8)
    with pytest.raises(ModelMismatchError, match="must not see what it predicts"):
        NWBDataModule(paths=[str(small_sim_path)], n_frames=0, behavior=["running_speed"], target=SPEED).setup()

    # The model's predictions do not depend on the target carried in the batch.
    task = FinetuneTask(Neuroformer.build(dm.spec, **TINY), dm.spec).eval()
    scrambled = batch._replace(target_behavior=torch.randn_like(batch.target_behavior) * 100)
    with torch.no_grad():
        torch.testing.assert_close(task(batch), task(scrambled), rtol=0, atol=0)


def test_classification_target_labels_windows_by_their_trial():
    target = BehaviorTarget(kind="classification", names=["type"], classes=["lick left", "lick right"])
    tokenizer = SpikeTokenizer(window=0.1, past_window=0.3, resolution=0.01, max_tokens=24, max_past_tokens=64)
    dm = NWBDataModule(paths=[str(ALM)], n_frames=0, behavior=[], restrict_to="trials", target=target,
                       tokenizer=tokenizer)
    dm.setup()
    rec, ds = dm.recordings[0], dm.datasets["train"]
    labels = ds.__getitems__(list(range(len(ds)))).target_behavior.numpy()
    trials = rec.trials
    for t0, label in zip(ds.t0, labels):  # brute force: the trial whose [start, stop) holds t0
        (k,) = np.flatnonzero((trials.start <= t0) & (t0 < trials.stop))
        kind = trials.columns["type"][k]
        assert label == {"lick left": 0, "lick right": 1}.get(kind, IGNORE)
    assert {0, 1, IGNORE} <= set(labels.tolist())  # both classes, and non-performing trials ignored
    with pytest.raises(RecordingError, match="intervals/trials/outcome"):
        replace(target, names=["outcome"]).check_recording(rec)
    with pytest.raises(RecordingError, match="behavior/running_speed"):
        SPEED.check_recording(rec)


def test_extend_vocabulary_keeps_known_units_and_adds_new_rows(small_sim_path):
    dm = speed_data(small_sim_path)
    old = UnitVocabulary(dm.spec.vocab.names[:30])
    torch.manual_seed(0)
    model = Neuroformer.build(replace(dm.spec, vocab=old), **TINY).eval()
    extended = extend_vocabulary(model, old, dm.spec.vocab).eval()
    assert extended.config.id_vocab_size == dm.spec.vocab.size == old.size + 10
    before, after = model.state_dict(), extended.state_dict()
    for key, value in before.items():
        if key in ID_ROWS:
            assert torch.equal(after[key][: old.size], value), key  # known tokens: the same rows
            new = after[key][old.size :]
            assert new.shape == (10, model.config.n_embd) and torch.unique(new, dim=0).shape[0] == 10
        else:
            assert torch.equal(after[key], value), key
    # On windows of known units only (the new units' spikes relabelled as the last known unit),
    # the known tokens' logits are exactly the old model's.
    batch = dm.datasets["test"].__getitems__(list(range(16)))
    batch = batch._replace(ids=batch.ids.clamp(max=old.size - 1), past_ids=batch.past_ids.clamp(max=old.size - 1))
    with torch.no_grad():
        torch.testing.assert_close(extended(batch.inputs).id_logits[..., : old.size], model(batch.inputs).id_logits, rtol=0, atol=0)
    with pytest.raises(ModelMismatchError, match="does not start with"):
        extend_vocabulary(model, old, UnitVocabulary(list(reversed(dm.spec.vocab.names))))


class Snapshots(L.Callback):
    """Weights (and whether the backbone is in train mode) before the batches of given steps."""

    def __init__(self, steps: set[int]):
        self.steps, self.states, self.backbone_training = steps, {}, {}

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx) -> None:
        self.backbone_training[trainer.global_step - 1] = task.model.training
        if trainer.global_step in self.steps:
            self.states[trainer.global_step] = copy.deepcopy(task.state_dict())


def test_stages_train_exactly_the_parameters_they_name(small_sim_path):
    dm = speed_data(small_sim_path)
    old = UnitVocabulary(dm.spec.vocab.names[:30])  # the last 10 units are new to the "pretrained" model
    torch.manual_seed(0)
    model = extend_vocabulary(Neuroformer.build(replace(dm.spec, vocab=old), **TINY), old, dm.spec.vocab)
    stages = [{"train": "heads", "steps": 3}, {"train": "new_units", "steps": 3}, {"train": "all"}]
    # Both losses, so the ID output rows get gradients too (the behaviour loss alone never reaches them).
    task = FinetuneTask(model, dm.spec, pretrained="models:/test/1", pretrained_vocab=old, lr=1e-2,
                        warmup_steps=1, loss_weights={"behavior": 1.0, "id_ce": 1.0}, stages=stages)
    start = copy.deepcopy(task.state_dict())
    snaps = Snapshots({3, 6, 9})
    L.Trainer(max_steps=9, callbacks=[snaps], logger=False, enable_checkpointing=False, limit_val_batches=0,
              enable_progress_bar=False, enable_model_summary=False).fit(task, datamodule=dm)
    states = [start, snaps.states[3], snaps.states[6], snaps.states[9]]

    def changed(a: dict, b: dict, key: str, rows: slice | None = None) -> bool:
        return not torch.equal(a[key], b[key]) if rows is None else not torch.equal(a[key][rows], b[key][rows])

    backbone = [k for k in start if k.startswith("model.")]
    head = [k for k in start if k.startswith("head.")]
    known, new = slice(0, old.size), slice(old.size, None)
    # heads: the backbone is frozen (and runs without dropout), the head learns.
    assert not any(changed(states[0], states[1], k) for k in backbone)
    assert all(changed(states[0], states[1], k) for k in head)
    assert [snaps.backbone_training[s] for s in range(9)] == [False] * 6 + [True] * 3
    # new_units: only the new units' ID rows (and the head) move; known rows stay bit for bit.
    id_rows = [f"model.{k}" for k in ID_ROWS]
    assert not any(changed(states[1], states[2], k) for k in backbone if k not in id_rows)
    for k in id_rows:
        assert not changed(states[1], states[2], k, known) and changed(states[1], states[2], k, new), k
    # all: everything that gets a gradient moves, known ID rows included.
    moved = [k for k in backbone if changed(states[2], states[3], k)]
    assert all(changed(states[2], states[3], k, known) for k in id_rows)
    assert "model.blocks.0.self_attn.q.weight" in moved and "model.dt_embedding.weight" in moved


def test_finetune_runs_from_a_registered_model_with_its_backbone_frozen(small_sim_path, tmp_path):
    dm = speed_data(small_sim_path)
    torch.manual_seed(0)
    pretrained = Neuroformer.build(dm.spec, **TINY)
    uri = register(pretrained, replace(dm.spec, target=None), tmp_path, "tiny")
    cfg = compose(["experiment=finetune_speed", f"task.pretrained={uri}", "task.stages=[{train: heads}]",
                   "data.n_frames=0", "data.batch_size=16", "trainer.max_steps=8", "trainer.val_check_interval=4",
                   *QUIET], tmp_path, sim_path=small_sim_path)
    value = train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert value == metrics["test/behavior_r2"] and np.isfinite(value)
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    meta = ckpt["neuroformer"]
    assert meta["pretrained"] == uri and meta["spec"]["target"]["names"] == ["running_speed"]
    assert meta["spec"]["behavior"] == [] and meta["head"]["n_outputs"] == 1
    # The backbone is the registered model, bit for bit; the head was trained.
    registered = registry.load(uri).model.state_dict()
    for key, value in registered.items():
        assert torch.equal(ckpt["state_dict"][f"model.{key}"], value), key
    assert any(k.startswith("head.") for k in ckpt["state_dict"])


def test_a_tiny_few_shot_run_predicts_speed_better_than_the_mean(small_sim_path, tmp_path):
    cfg = compose(["experiment=finetune_speed", *TINY_OVERRIDES, "data.n_frames=0", "data.train_fraction=0.5",
                   "data.batch_size=16", "trainer.max_steps=100", "trainer.val_check_interval=50", "task.lr=3e-3",
                   *QUIET], tmp_path, sim_path=small_sim_path)
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    # R^2 > 0 beats predicting the test block's own mean; the training mean does worse still.
    assert metrics["test/behavior_r2"] > 0.3 > metrics["test/behavior_r2_train_mean"], metrics
    # The run folder shows it: true vs predicted speed over the test block, as a PNG.
    png = Path(cfg.paths.output_dir) / "behavior.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
