"""Dendrite nodes and the perforated-backpropagation callback (docs/perforated.md)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from neuroformer.callbacks.perforated import Perforated
from neuroformer.errors import ConfigError
from neuroformer.models import dendrites as dn
from neuroformer.models.rnn import RateRNN, RNNConfig
from neuroformer.models.twin import Twin, TwinConfig


def _with_trained_dendrites(model: nn.Module, sets: int = 2, seed: int = 0) -> nn.Module:
    """``model`` with ``sets`` dendrite sets on every Linear/Conv layer, output weights non-zero."""
    for k in range(sets):
        dn.add_dendrites(model, dn.select_layers(model), init_scale=1.0, seed=seed + k)
    with torch.no_grad():
        for p in dn.dendrite_parameters(model, "outputs"):
            p.normal_()
        for layer in dn.dendrite_layers(model).values():
            for s in layer.sets[1:]:
                s.lateral.normal_()
    return model


# --------------------------------------------------------------------------- the modules


def test_adding_dendrites_leaves_outputs_exactly_unchanged():
    torch.manual_seed(0)
    rnn = RateRNN(RNNConfig(n_inputs=3, n_outputs=2, n_recorded=2, hidden=12)).eval()
    conv = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 1))
    image = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    twin = Twin(TwinConfig(n_frames=3, height=12, width=12, n_units=5, channels=4, kernel=5, hidden_kernel=3))
    cases = [(rnn, torch.randn(4, 9, 3)), (conv, torch.randn(2, 2, 11)), (image, torch.randn(2, 1, 6, 6)),
             (twin, torch.randn(2, 3, 12, 12))]
    for model, x in cases:
        before = model(x)
        for k in range(3):  # each new set has zero output weights, whatever the earlier sets do
            new = dn.add_dendrites(model, dn.select_layers(model), init_scale=1.0, seed=k)
            after = model(x)
            for a, b in zip(after if isinstance(after, tuple) else [after], before if isinstance(before, tuple) else [before]):
                assert torch.equal(a, b)
            with torch.no_grad():  # give them a say before the next set
                for s in new:
                    s.output.normal_()
                    if s.lateral is not None:
                        s.lateral.normal_()
            before = model(x)
        assert dn.structure(model) == {name: 3 for name in dn.select_layers(model)}
    # The dendrites do act once their output weights are non-zero: a different function.
    plain = RateRNN(RNNConfig(n_inputs=3, n_outputs=2, n_recorded=2, hidden=12)).eval()
    plain.load_state_dict({k.replace(".base.", "."): v for k, v in rnn.state_dict().items() if ".sets." not in k})
    x = torch.randn(4, 9, 3)
    assert (plain(x).outputs - rnn(x).outputs).abs().max() > 1e-3


def test_dendrites_follow_the_formula_per_output_neuron():
    torch.manual_seed(1)
    model = _with_trained_dendrites(nn.Sequential(nn.Linear(5, 3)))
    layer = model[0]
    x = torch.randn(7, 4, 5)  # a sequence: the same dendrite weights at every time step
    a0 = torch.sigmoid(layer.sets[0].input(x))
    a1 = torch.sigmoid(layer.sets[1].input(x) + layer.sets[1].lateral[:, 0] * a0)
    expected = layer.base(x) + layer.sets[0].output * a0 + layer.sets[1].output * a1
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    # Convolutions: one dendrite per output channel, shared over positions.
    conv = _with_trained_dendrites(nn.Sequential(nn.Conv1d(2, 3, 3)), sets=1)[0]
    x = torch.randn(2, 2, 8)
    v = conv.sets[0].output.view(1, 3, 1)
    torch.testing.assert_close(conv(x), conv.base(x) + v * torch.sigmoid(conv.sets[0].input(x)), rtol=0, atol=1e-6)


def test_structure_rebuilds_a_fresh_model_to_identical_outputs():
    torch.manual_seed(2)
    model = _with_trained_dendrites(RateRNN(RNNConfig(n_inputs=3, n_outputs=2, hidden=10)))
    layers = json.loads(json.dumps(dn.structure(model)))  # plain JSON
    assert layers == {"recurrent": 2, "input": 2, "readout": 2}
    fresh = dn.apply_structure(RateRNN(RNNConfig(n_inputs=3, n_outputs=2, hidden=10)), layers)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 6, 3)
    assert torch.equal(fresh.eval()(x).outputs, model.eval()(x).outputs)
    # And back to fewer sets / none: what a checkpoint of an earlier state needs.
    dn.apply_structure(fresh, {"recurrent": 1})
    assert dn.structure(fresh) == {"recurrent": 1} and isinstance(fresh.input, nn.Linear)


def test_layer_choice_by_kind_and_name():
    model = nn.Sequential(nn.Linear(2, 3), nn.Conv1d(3, 3, 1), nn.LayerNorm(3), nn.Linear(3, 1))
    assert dn.select_layers(model) == ["0", "1", "3"]
    assert dn.select_layers(model, types=["Linear"]) == ["0", "3"]
    assert dn.select_layers(model, names=["^3$"]) == ["3"] and dn.select_layers(model, exclude=["0"]) == ["1", "3"]
    dn.add_dendrites(model, ["0"])
    assert dn.select_layers(model) == ["0", "1", "3"]  # a wrapped layer, never its dendrites
    with pytest.raises(ConfigError, match="'LayerNorm' is not a supported layer kind"):
        dn.select_layers(model, types=["LayerNorm"])


def test_correlation_objective_matches_numpy():
    rng = np.random.default_rng(3)
    a, e = rng.random((200, 6)), rng.standard_normal((200, 6))
    e[:, 0] += 3 * a[:, 0]  # one neuron whose error the dendrite explains
    expected = sum(abs(np.mean((a[:, o] - a[:, o].mean()) * (e[:, o] - e[:, o].mean()))) for o in range(6))
    got = dn.correlation_objective(torch.from_numpy(a), torch.from_numpy(e)).item()
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(np.abs(np.cov(a.T, e.T, bias=True)[range(6), range(6, 12)]).sum(), rel=1e-12)


# --------------------------------------------------------------------------- the callback's phases


class Regression(L.LightningModule):
    """y = f(x) by MSE with a small MLP in ``self.model`` (the ``Task`` contract the callback needs)."""

    def __init__(self, width: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))
        x = torch.randn(256, 4)
        self.data = (x, torch.sin(2 * x[:, :1]) * x[:, 1:2] + x[:, 2:3] ** 2)

    def step(self, split: str) -> torch.Tensor:
        x, y = self.data
        loss = nn.functional.mse_loss(self.model(x), y)
        self.log(f"{split}/loss", loss)
        return loss

    def training_step(self, batch, batch_idx):
        return self.step("train")

    def validation_step(self, batch, batch_idx):
        self.step("val")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(4), batch_size=1)

    val_dataloader = train_dataloader


class Snapshots(L.Callback):
    """The model's parameters at the start of every training epoch and at its validation (before the
    callback decides anything), with the phase."""

    def __init__(self, perforated: Perforated):
        self.perforated, self.epochs = perforated, []

    def _params(self, pl_module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append({"phase": self.perforated.phase, "start": self._params(pl_module)})

    def on_validation_start(self, trainer, pl_module):
        self.epochs[-1]["end"] = self._params(pl_module)


def _fit(method: str, tmp_path: Path, epochs: int = 6, precision: str = "32-true") -> tuple[Regression, Perforated,
                                                                                          Snapshots]:
    task = Regression()
    perforated = Perforated(monitor="val/loss", method=method, switch_every=1, candidate_epochs=1, max_sets=3,
                            max_tries=3, init_scale=1.0, figure=None)
    snapshots = Snapshots(perforated)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[snapshots, perforated], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu", num_sanity_val_steps=0, precision=precision)
    trainer.fit(task)
    return task, perforated, snapshots


def _kind(name: str) -> str:
    if ".sets." not in name:
        return "neuron"
    return "output" if name.endswith(".output") else "dendrite input"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # bf16: autocast, as trainer=gpu
def test_each_phase_trains_only_its_weights(tmp_path, precision):
    task, perforated, snapshots = _fit("correlation", tmp_path, precision=precision)
    phases = [e["phase"] for e in snapshots.epochs]
    assert phases[:4] == ["neuron", "dendrite", "neuron", "dendrite"], phases
    for k, epoch in enumerate(snapshots.epochs):
        changed = {name for name, v in epoch["end"].items() if name in epoch["start"]
                   and not torch.equal(v, epoch["start"][name])}
        kinds = {_kind(n) for n in changed}
        newest = max((n for n in epoch["end"] if ".sets." in n), default="", key=lambda n: int(n.split(".sets.")[1][0]))
        if epoch["phase"] == "dendrite":
            # Neurons and output weights fixed; only the newest set's input (and lateral) weights learn.
            assert kinds == {"dendrite input"}, (k, changed)
            assert all(f".sets.{newest.split('.sets.')[1][0]}." in n for n in changed), (k, changed)
        elif k > 0:
            # Neurons and output weights learn; the dendrites' input weights do not.
            assert kinds == {"neuron", "output"}, (k, changed)
    assert "dendrite inputs frozen after 1 epochs" in " ".join(e["event"] for e in perforated.events)


def test_joint_mode_trains_everything_together(tmp_path):
    task, perforated, snapshots = _fit("joint", tmp_path, epochs=3)
    assert all(e["phase"] == "neuron" for e in snapshots.epochs)
    last = snapshots.epochs[-1]
    changed = {_kind(n) for n, v in last["end"].items() if n in last["start"] and not torch.equal(v, last["start"][n])}
    assert changed == {"neuron", "output", "dendrite input"}


class Scripted(Regression):
    """Logs a given validation loss at each epoch (what the callback decides on), still training."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.values = values

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.values[self.current_epoch])


def test_sets_that_do_not_help_are_removed_and_the_best_state_restored(tmp_path):
    # Epoch 0 is the best; each set (added at epochs 0 and 2, trained at 1 and 3) makes it worse.
    task = Scripted([1.0, 1.0, 1.2, 1.2, 1.3, 0.5, 0.5, 0.5])
    perforated = Perforated(monitor="val/loss", switch_every=1, candidate_epochs=1, max_sets=3, max_tries=2,
                            figure=None)
    snapshots = Snapshots(perforated)
    trainer = L.Trainer(max_epochs=8, callbacks=[snapshots, perforated], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(task)
    assert perforated.phase == "done" and trainer.current_epoch == 5  # stopped after the second failure
    assert [e["event"].split(":")[0] for e in perforated.events] == [
        "dendrite set 1 added to 2 layers", "dendrite inputs frozen after 1 epochs (mean |correlation| "
        + perforated.events[1]["event"].split("| ")[1], "no improvement (best 1)",
        "dendrite set 1 added to 2 layers", perforated.events[4]["event"], "no improvement (best 1)", "done"]
    # Back to epoch 0's state: no dendrites, its weights.
    assert dn.structure(task.model) == {}
    best = snapshots.epochs[0]["end"]
    assert dict(task.model.named_parameters()).keys() == best.keys()
    assert all(torch.equal(v, best[k]) for k, v in task.model.named_parameters())
    assert not torch.equal(snapshots.epochs[2]["end"]["0.base.weight"], best["0.weight"])  # it had moved on


# --------------------------------------------------------------------------- through train(cfg)


@pytest.fixture(scope="module")
def reach_path(tmp_path_factory) -> Path:
    from neuroformer.data.simulate_reaching import ReachingConfig, simulate_reaching

    return simulate_reaching(tmp_path_factory.mktemp("reach") / "reach.nwb",
                             ReachingConfig(seed=2, n_units=30, trials_per_condition=5))


QUICK = ["callbacks=perforated", "callbacks.perforated.switch_every=1", "callbacks.perforated.candidate_epochs=1",
         "evaluate=null"]


def test_rnn_trains_registers_resumes_and_reloads_with_dendrites(reach_path, tmp_path):
    from neuroformer import registry
    from neuroformer.data.trials import trial_data
    from neuroformer.registry.tracking import use_tracking_uri
    from neuroformer.tasks.sparse_rnn import SparseRNNTask
    from neuroformer.training import train
    from tests.configs import compose

    overrides = ["experiment=sparse_rnn", *QUICK, f"data.paths=[{reach_path}]", "model.hidden=16",
                 "trainer.check_val_every_n_epoch=1", "registry.model_name=rnn-perforated"]
    train(compose([*overrides, "trainer.max_epochs=2", "registry.register=false"], tmp_path))
    out = tmp_path / "outputs" / "run"
    first = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["neuroformer"]["dendrites"] == {"input": 1, "recurrent": 1, "readout": 1}
    # The same run folder continues from last.ckpt (the structure rebuilt before its weights load).
    cfg = compose([*overrides, "trainer.max_epochs=5"], tmp_path)
    train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    state = last["callbacks"]["Perforated"]
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2, 3, 4]  # one history, across the restart
    assert [h["phase"] for h in state["history"]] == ["neuron", "dendrite", "neuron", "dendrite", "neuron"]
    assert (out / "perforated.png").is_file()
    # MLflow has the phase, the structure, the parameter count and the figure.
    import mlflow

    client = mlflow.tracking.MlflowClient(metrics["mlflow_tracking_uri"])
    logged = client.get_run(metrics["mlflow_run_id"]).data.metrics
    # After the last validation set 2 was judged and set 3 added: a dendrite phase began.
    assert logged["perforated/dendrite_sets"] == 3 and set(last["neuroformer"]["dendrites"].values()) == {3}
    assert logged["perforated/phase"] == 1.0
    assert "perforated/correlation" in logged
    assert "perforated.png" in [f.path for f in client.list_artifacts(metrics["mlflow_run_id"])]

    with use_tracking_uri(metrics["mlflow_tracking_uri"]):
        loaded = registry.load(metrics["model_uri"])
    checkpoint = registry.load(metrics["best_checkpoint"])
    assert dn.structure(loaded.model) == dn.structure(checkpoint.model) != {}
    assert max(p.abs().max().item() for p in dn.dendrite_parameters(loaded.model, "outputs")) > 1e-4
    # The reloaded model is the tested one: its test loss is the run's.
    test = trial_data(loaded.spec.source.read(), loaded.spec)
    test = test.subset(np.isin(test.condition, np.flatnonzero([c in loaded.spec.test_conditions
                                                               for c in loaded.spec.conditions])))
    with torch.no_grad():
        outputs = loaded.model(torch.from_numpy(test.inputs)).outputs
        again = checkpoint.model(torch.from_numpy(test.inputs)).outputs
    assert torch.equal(outputs, again)
    output_std = torch.tensor(loaded.spec.behavior_std)
    mse = ((outputs - torch.from_numpy(test.behavior)) / output_std).pow(2).mean().item()
    assert mse == pytest.approx(metrics["test/output_loss"], rel=1e-4)
    assert SparseRNNTask.family == loaded.family


def test_neuroformer_trains_with_dendrites_and_loads_back(small_sim_path, tmp_path):
    from neuroformer import registry
    from neuroformer.training import train
    from tests.configs import compose

    cfg = compose([*QUICK, "model.n_embd=16", "model.n_head=2", "model.n_layer=1", "model.patch=[1,8,8]",
                   "trainer.max_epochs=3", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
                   "+trainer.limit_test_batches=1", "registry.register=false", "logger=none"],
                  tmp_path, sim_path=small_sim_path)
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    loaded = registry.load(metrics["best_checkpoint"])
    layers = dn.structure(loaded.model)
    assert layers["blocks.0.mlp.0"] >= 1 and layers["id_head"] >= 1 and len(set(layers.values())) == 1
    assert torch.load(metrics["best_checkpoint"], weights_only=True)["neuroformer"]["dendrites"] == layers


def test_twin_trains_with_dendrites_on_its_convolutions_and_loads_back(small_sim_path, tmp_path):
    from neuroformer import registry
    from neuroformer.training import train
    from tests.configs import compose

    cfg = compose(["experiment=twin", "model.channels=4", "data.n_frames=3", *QUICK, "trainer.max_epochs=3",
                   "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
                   "registry.register=false", "logger=none"], tmp_path, sim_path=small_sim_path)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["Perforated"]
    assert [h["phase"] for h in state["history"]] == ["neuron", "dendrite", "neuron"]
    best = registry.load(metrics["best_checkpoint"])
    layers = dn.structure(best.model)
    assert set(layers) == {"core.0", "core.1"} and len(set(layers.values())) == 1  # per output channel
    # The reloaded twin is the tested one: its Poisson loss on the test batch is the run's.
    from hydra.utils import instantiate

    from neuroformer.tasks.twin import poisson_nll

    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))  # limit_test_batches=1: the run's test set
    with torch.no_grad():
        nll = poisson_nll(best.model(batch.stimulus), batch.counts).item()
    assert nll == pytest.approx(metrics["test/poisson_nll"], rel=1e-5)


def test_deepspeed_trainers_are_refused(tmp_path):
    from neuroformer.distributed.strategies import deepspeed_strategy

    task = Regression()
    for stage in (3, 2):
        trainer = L.Trainer(strategy=deepspeed_strategy(stage=stage), accelerator="cpu", devices=1, logger=False,
                            default_root_dir=tmp_path)
        with pytest.raises(ConfigError, match=f"cannot add dendrites under DeepSpeed ZeRO-{stage}") as err:
            Perforated(monitor="val/loss").setup(trainer, task, "fit")
        assert ("sharded across ranks" in str(err.value)) == (stage == 3)
        assert "trainer=cpu or trainer=gpu" in str(err.value)


@pytest.mark.slow
def test_two_ddp_ranks_keep_identical_dendrites(reach_path, tmp_path):
    """Two CPU ranks (gloo): dendrites added, trained by correlation and reverted on both alike (the
    callback compares the ranks' parameter checksums at the end of fit and fails the run if they
    differ); the run registers a model with dendrites."""
    import os
    import subprocess
    import sys

    from neuroformer import registry

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "experiment=sparse_rnn", *QUICK, "trainer=ddp", "trainer.devices=2",
           "trainer.accelerator=cpu", f"data.paths=[{reach_path}]", "model.hidden=16", "trainer.max_epochs=5",
           "trainer.check_val_every_n_epoch=1", "data.batch_size=8", "registry.register=false", "logger=none",
           f"paths.output_root={tmp_path / 'outputs'}", f"hydra.run.dir={out}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PL_", "MLFLOW_"))
           and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(cmd, cwd=root, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["Perforated"]
    assert [h["phase"] for h in state["history"]] == ["neuron", "dendrite", "neuron", "dendrite", "neuron"]
    assert dn.structure(registry.load(metrics["best_checkpoint"]).model) != {}
