"""Multi-session transfer: a new session's units extend a pretrained model's vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from neuroformer import registry
from neuroformer.data.datamodule import NWBDataModule
from neuroformer.data.simulate import SimulationConfig, simulate_recording
from neuroformer.data.tokenizer import N_SPECIAL, SpikeTokenizer
from neuroformer.models.neuroformer import Neuroformer
from neuroformer.models.transfer import ID_ROWS, extend_vocabulary
from neuroformer.tasks.finetune import FinetuneTask
from neuroformer.training import train
from tests.configs import compose
from tests.helpers import token_cross_entropy
from tests.test_finetune import QUIET, TINY, register


@pytest.fixture(scope="module")
def new_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second simulated session: other units (another seed), same stimulus format."""
    path = tmp_path_factory.mktemp("sim_new") / "new_session.nwb"
    return simulate_recording(path, SimulationConfig(seed=2, n_units=30, duration=30.0), progress=False)


@pytest.fixture(scope="module")
def pretrained_data(small_sim_path: Path) -> NWBDataModule:
    """The "pretraining" session's data: stimulus frames and running speed as inputs."""
    dm = NWBDataModule(paths=[str(small_sim_path)], n_frames=4, behavior=["running_speed"], batch_size=16)
    dm.setup()
    return dm


def test_a_new_session_extends_the_vocabulary_and_keeps_the_model_inputs(pretrained_data, new_session):
    reference = pretrained_data.spec
    # Settings that would change the inputs are overridden by the pretrained model's spec.
    dm = NWBDataModule(paths=[str(new_session)], reference=reference, n_frames=0, behavior=[],
                       tokenizer=SpikeTokenizer(window=0.1))
    dm.setup()
    spec, new_units = dm.spec, dm.recordings[0].units.names
    n_known = len(reference.vocab)
    assert spec.vocab.names == reference.vocab.names + new_units and len(new_units) == 30
    assert spec.tokenizer == reference.tokenizer and spec.n_frames == 4 and spec.behavior == ["running_speed"]
    # The pretrained normalisation is kept, not recomputed on the new session (where it differs).
    own = NWBDataModule(paths=[str(new_session)], n_frames=4, behavior=["running_speed"])
    own.setup()
    assert (spec.frame_mean, spec.behavior_mean) == (reference.frame_mean, reference.behavior_mean)
    assert (own.spec.frame_mean, own.spec.behavior_mean) != (reference.frame_mean, reference.behavior_mean)
    # Every spike of the new session is a new-unit token.
    batch = dm.datasets["train"].__getitems__(list(range(64)))
    units = torch.cat([batch.ids[batch.ids >= N_SPECIAL], batch.past_ids[batch.past_ids >= N_SPECIAL]])
    assert len(units) > 0 and units.min() >= N_SPECIAL + n_known


def test_new_units_stage_needs_new_units(pretrained_data):
    spec = pretrained_data.spec
    model = Neuroformer.build(spec, **TINY)
    with pytest.raises(ValueError, match="no unit the pretrained model does not already know"):
        FinetuneTask(model, spec, pretrained="models:/x/1", pretrained_vocab=spec.vocab,
                     stages=[{"train": "new_units", "steps": 5}, {"train": "all"}])
    with pytest.raises(ValueError, match="pretrained_vocab"):
        FinetuneTask(model, spec, pretrained="models:/x/1")


def test_transfer_to_a_new_session_from_a_registered_model(pretrained_data, new_session, tmp_path):
    torch.manual_seed(0)
    spec = pretrained_data.spec
    uri = register(Neuroformer.build(spec, **TINY), spec, tmp_path, "two-sessions")
    cfg = compose(["experiment=multi_session", f"task.pretrained={uri}", f"data.paths=[{new_session}]",
                   "task.stages=[{train: new_units}]", "data.batch_size=16", "trainer.max_steps=40",
                   "trainer.val_check_interval=20", *QUIET], tmp_path)
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    # Training the new units' rows made the model better on the new session's test block than
    # the registered model with its vocabulary extended and nothing trained.
    datamodule = instantiate(cfg.data, _partial_=True)(reference=spec)
    datamodule.setup()
    untrained = extend_vocabulary(registry.load(uri).model, spec.vocab, datamodule.spec.vocab).eval()
    assert metrics["test/id_ce"] < token_cross_entropy(untrained, datamodule.test_dataloader()) - 0.05, metrics
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    n_known = spec.vocab.size
    assert ckpt["neuroformer"]["model_config"]["id_vocab_size"] == n_known + 30
    assert ckpt["neuroformer"]["spec"]["vocab"]["names"][: len(spec.vocab)] == spec.vocab.names
    # Only the new units' rows trained: every other weight is the registered model's.
    for key, value in registry.load(uri).model.state_dict().items():
        trained = ckpt["state_dict"][f"model.{key}"]
        assert torch.equal(trained[:n_known] if key in ID_ROWS else trained, value), key
