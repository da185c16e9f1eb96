"""Weight averaging (task.ema_decay): checkpoints, test and the registry get the average; a resumed
fit trains its raw weights and continues its average."""

import itertools
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from neuroformer import registry
from neuroformer.callbacks.ema import WeightEMA
from neuroformer.data.tokenizer import PAD
from neuroformer.errors import ConfigError
from neuroformer.training import train
from tests.configs import compose

DECAY = 0.4  # the ramp (1 + n) / (10 + n) reaches it at n = 5: both the ramp and the cap are used
# Deterministic training: no dropout, no contrastive loss, a constant learning rate (so a run
# stopped after one epoch follows the schedule of the uninterrupted one).
RUN = ["model.n_embd=32", "model.n_head=2", "model.n_layer=1", "model.patch=[1,8,8]", "model.dropout=0.0",
       "task.loss_weights.contrastive=0.0", "task.warmup_steps=0", "task.min_lr_ratio=1.0",
       f"task.ema_decay={DECAY}", "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2",
       "+trainer.limit_test_batches=3", "evaluate=null", "logger=none", "registry.register=false",
       "+callbacks.raw._target_=tests.test_ema.RawWeights"]


class RawWeights(L.Callback):
    """Keeps a copy of the raw (trained) weights after every optimizer step."""

    history: list[dict[str, torch.Tensor]] = []
    start: dict[str, torch.Tensor] | None = None  # the weights the first step of a fit starts from

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if RawWeights.start is None:
            RawWeights.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        RawWeights.history.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def ema_step(average: dict, weights: dict, n: int) -> dict:
    """The average after one more step, ``n`` updates in: the decay ramps up to DECAY as (1 + n) / (10 + n)."""
    d = min(DECAY, (1 + n) / (10 + n))
    return {k: d * v + (1 - d) * weights[k] if v.is_floating_point() else weights[k] for k, v in average.items()}


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_checkpoints_test_and_loader_get_the_average_of_the_trained_weights(small_sim_path, tmp_path):
    RawWeights.history = []
    cfg = compose([*RUN, "trainer.max_epochs=2"], tmp_path, sim_path=small_sim_path)
    metrics_value = train(cfg)
    ckpt = checkpoint(Path(cfg.paths.output_dir))
    raw = RawWeights.history
    assert len(raw) == ckpt["global_step"] == 10

    # The average, computed here from the raw weights after each step (the first step starts it).
    average = dict(raw[0])
    for n, weights in enumerate(raw[1:], start=1):
        average = ema_step(average, weights, n)
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(value, average[key], rtol=0, atol=1e-6, msg=key)
    for key, value in ckpt["current_model_state"].items():  # the raw weights, for a resumed fit
        torch.testing.assert_close(value, raw[-1][key], rtol=0, atol=0, msg=key)
    moved = max((average[k] - raw[-1][k]).abs().max().item() for k in average if "model." in k)
    assert moved > 1e-4  # the average is not the last raw weights

    # Test scored the averaged weights (what the loader returns), not the raw ones.
    loaded = registry.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, average["model." + key], rtol=0, atol=1e-6)
    assert metrics_value == pytest.approx(scored_id_ce(loaded.model, cfg), rel=1e-5)
    loaded.model.load_state_dict({k.removeprefix("model."): v for k, v in raw[-1].items() if k.startswith("model.")})
    assert metrics_value != pytest.approx(scored_id_ce(loaded.model, cfg), rel=1e-5)


def scored_id_ce(model, cfg) -> float:
    """test/id_ce of ``model`` over the 3 test batches the run scored (token-weighted mean)."""
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in itertools.islice(datamodule.test_dataloader(), 3):
            out = model(batch.inputs)
            real = batch.target_ids != PAD
            total += torch.nn.functional.cross_entropy(out.id_logits[real], batch.target_ids[real],
                                                       reduction="sum").item()
            n += int(real.sum())
    return total / n


def test_a_resumed_run_trains_its_raw_weights_and_continues_its_average(small_sim_path, tmp_path):
    first = compose([*RUN, "trainer.max_epochs=1"], tmp_path, sim_path=small_sim_path)
    train(first)
    stopped = checkpoint(Path(first.paths.output_dir))
    RawWeights.history, RawWeights.start = [], None
    train(compose([*RUN, "trainer.max_epochs=2"], tmp_path, sim_path=small_sim_path))  # continues it
    done = checkpoint(Path(first.paths.output_dir))
    assert (stopped["global_step"], done["global_step"], len(RawWeights.history)) == (5, 10, 5)

    # Training went on from the raw weights, not from the average the checkpoint's state_dict holds.
    for key, value in stopped["current_model_state"].items():
        torch.testing.assert_close(RawWeights.start[key], value, rtol=0, atol=0, msg=key)
    # The average went on from the stored one over the new steps.
    average = stopped["state_dict"]
    for n, weights in enumerate(RawWeights.history, start=5):
        average = ema_step(average, weights, n)
    for key, value in done["state_dict"].items():
        torch.testing.assert_close(value, average[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("decay", [1.0, -0.5])
def test_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ConfigError, match=r"task\.ema_decay must be in \(0, 1\)"):
        WeightEMA(decay)


class GrowsAt(L.Callback):
    """Adds a parameter to the model before step 3, as callbacks=perforated adds dendrite nodes."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 3 and not hasattr(pl_module.model, "grown"):
            pl_module.model.grown = torch.nn.Parameter(torch.zeros(2))


def test_averaging_stops_when_the_model_grows_and_the_raw_weights_are_kept(small_sim_path, tmp_path, caplog):
    RawWeights.history = []
    cfg = compose([*RUN, "trainer.max_epochs=2", "+callbacks.grow._target_=tests.test_ema.GrowsAt"], tmp_path,
                  sim_path=small_sim_path)
    with caplog.at_level("INFO"):
        train(cfg)
    ckpt = checkpoint(Path(cfg.paths.output_dir))
    assert "Weight averaging stops after step 4" in caplog.text  # the first step with the grown model
    assert "current_model_state" not in ckpt and "model.grown" in ckpt["state_dict"]
    for key, value in ckpt["state_dict"].items():  # the raw weights of the last step
        torch.testing.assert_close(value, RawWeights.history[-1][key], rtol=0, atol=0, msg=key)
