"""The digital-twin family (data/responses.py, models/twin.py, tasks/twin.py), the MDS callback and
``python -m neuroformer.mds``, end to end through ``train(cfg)`` and ``registry.load``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroformer.data.nwb import read_nwb
from neuroformer.data.responses import ResponseDataModule, ResponseSpec
from neuroformer.errors import ConfigError
from neuroformer.models.twin import ResponseModel, Twin, TwinConfig, TwinEnsemble

# --------------------------------------------------------------------------- data


def test_samples_are_clips_and_the_spikes_after_their_last_frame(small_sim_path):
    dm = ResponseDataModule(paths=[str(small_sim_path)], n_frames=4, response_window=0.05)
    dm.setup()
    rec, data, spec = read_nwb(small_sim_path), dm.data, dm.spec
    assert spec.n_units == rec.units.n_units and spec.frame_shape == tuple(rec.stimulus.frame_shape)
    frames = rec.stimulus.read(0, rec.stimulus.n_frames)
    for k in data.index["test"][[0, 5, -1]]:
        clip = data.clips(np.array([k]))[0]
        np.testing.assert_allclose(clip * spec.frame_std + spec.frame_mean, frames[k - 3:k + 1], atol=1e-4)
        t = rec.stimulus.timestamps[k]
        for u in (0, 7, 21):
            spikes = rec.units.spikes_of(u)
            assert data.counts[k, u] == np.sum((spikes >= t) & (spikes < t + 0.05))
    # No sample's clip and response window straddles a block of another split.
    starts = {s: spec.split.blocks(rec.start, rec.stop, s) for s in ("train", "val", "test")}
    for s, index in data.index.items():
        lo, hi = rec.stimulus.timestamps[index - 3], rec.stimulus.timestamps[index] + 0.05
        inside = np.zeros(len(index), bool)
        for a, b in zip(*starts[s]):
            inside |= (lo >= a) & (hi <= b + 1e-9)
        assert inside.all(), s
    assert set(data.index["train"]).isdisjoint(data.index["test"])
    assert ResponseSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    # Training means: the mean-rate predictor's rates.
    np.testing.assert_allclose(spec.unit_mean_count, data.counts[data.index["train"]].mean(0), rtol=1e-5)


def test_bad_settings_are_refused(small_sim_path):
    with pytest.raises(ConfigError, match="n_frames"):
        ResponseDataModule(paths=[str(small_sim_path)], n_frames=0)
    with pytest.raises(ConfigError, match="response_window"):
        ResponseDataModule(paths=[str(small_sim_path)], response_window=0)


# --------------------------------------------------------------------------- model


def test_twin_is_a_differentiable_response_model():
    torch.manual_seed(0)
    twin = Twin(TwinConfig(n_frames=3, height=16, width=16, n_units=5, channels=4, mean_count=(0.1,) * 5))
    assert isinstance(twin, ResponseModel)
    stimulus = torch.zeros(2, 3, 16, 16, requires_grad=True)
    rates = twin.predict_responses(stimulus)
    assert rates.shape == (2, 5) and torch.all(rates > 0)
    # Starts at the mean-rate predictor: its given mean counts on a grey clip, up to the readout's noise.
    torch.testing.assert_close(rates[0], torch.full((5,), 0.1), atol=0.05, rtol=0)
    (grad,) = torch.autograd.grad(rates[:, 2].sum(), stimulus)
    assert grad.abs().sum() > 0


def test_centred_twin_sees_at_the_middle_what_each_unit_sees_at_its_field():
    torch.manual_seed(0)
    twin = Twin(TwinConfig(n_frames=2, height=24, width=24, n_units=2, channels=4)).eval()
    with torch.no_grad():  # localised masks, away from the edges
        twin.mask.zero_()
        twin.mask[0, 5:8, 6:9] = 1.0
        twin.mask[1, 14:17, 15:18] = -1.0
    reference = torch.randn(16, 2, 24, 24)
    centres = twin.receptive_field_centres(reference)
    assert torch.all((centres[0] - torch.tensor([6, 7])).abs() <= 9 // 2 + 5 // 2)  # within the core's reach
    centred = twin.centred(reference)
    blob = torch.zeros(1, 2, 24, 24)
    blob[..., 10:14, 10:14] = torch.randn(2, 4, 4)  # a small stimulus near the middle
    with torch.no_grad():
        for u in range(2):
            shift = (centres[u] - torch.tensor([12, 12])).tolist()
            moved = blob.roll(tuple(shift), (2, 3))
            torch.testing.assert_close(centred.predict_responses(blob)[0, u], twin.predict_responses(moved)[0, u])


def _gaussian_twin(height: int, width: int, centres: list[tuple[int, int]], width_px: float = 1.5) -> Twin:
    twin = Twin(TwinConfig(n_frames=2, height=height, width=width, n_units=len(centres), channels=4,
                           readout="gaussian")).eval()
    with torch.no_grad():
        twin.centre.copy_(torch.tensor(centres, dtype=torch.float32) / twin._frame_scale() - 1)
        twin.log_width.fill_(math.log(width_px))
    return twin


def test_gaussian_readout_is_a_normalised_blob_at_its_centre():
    twin = _gaussian_twin(16, 20, [(4, 5), (11, 14)])  # non-square frames
    masks = twin.spatial_masks()
    assert masks.shape == (2, 16, 20)
    torch.testing.assert_close(masks.sum((1, 2)), torch.ones(2))
    peaks = masks.flatten(1).argmax(1)
    assert (peaks // 20).tolist() == [4, 11] and (peaks % 20).tolist() == [5, 14]
    torch.testing.assert_close(twin.centre_pixels(), torch.tensor([[4.0, 5.0], [11.0, 14.0]]))
    assert twin.readout_l1() == 0  # local by construction: no L1 penalty
    with pytest.raises(ConfigError, match="model.readout"):
        Twin(TwinConfig(n_frames=2, height=8, width=8, n_units=1, readout="spline"))


def test_place_readouts_finds_every_units_receptive_field():
    """Units driven by a blurred pixel at a known place: the spike-triggered average puts each blob there."""
    torch.manual_seed(0)
    fields = [(3, 4), (8, 15), (12, 9)]
    stimulus = torch.randn(6000, 2, 16, 20)
    rows, cols = torch.arange(16.0)[:, None], torch.arange(20.0)[None, :]
    drive = torch.stack([(stimulus[:, -1] * torch.exp(-((rows - r) ** 2 + (cols - c) ** 2) / 2)).sum((1, 2))
                         for r, c in fields], dim=1)  # (N, U)
    counts = torch.poisson(torch.exp(0.3 * drive - 1.0))
    twin = _gaussian_twin(16, 20, [(8, 10)] * 3)  # every blob starts in the middle
    twin.place_readouts(stimulus, counts)
    torch.testing.assert_close(twin.centre_pixels(), torch.tensor(fields, dtype=torch.float32))
    torch.testing.assert_close(twin.log_width.exp(), torch.full((3,), 1.6))  # a tenth of the frame, in place
    masked = Twin(TwinConfig(n_frames=2, height=16, width=20, n_units=3, channels=4))
    before = masked.mask.clone()
    masked.place_readouts(stimulus, counts)  # a free-mask readout has no centre to place
    assert torch.equal(masked.mask, before)


def test_centred_gaussian_twin_sees_at_the_middle_what_each_unit_sees_at_its_field():
    torch.manual_seed(0)
    twin = _gaussian_twin(24, 24, [(7, 8), (15, 16)])
    reference = torch.randn(16, 2, 24, 24)
    centres = twin.field_centres(reference)
    torch.testing.assert_close(centres, torch.tensor([[7.0, 8.0], [15.0, 16.0]]))  # the readouts' own centres
    centred = twin.centred(reference)
    torch.testing.assert_close(centred.centre_pixels(), torch.full((2, 2), 12.0))
    blob = torch.zeros(1, 2, 24, 24)
    blob[..., 10:14, 10:14] = torch.randn(2, 4, 4)
    with torch.no_grad():
        for u in range(2):
            moved = blob.roll(tuple((centres[u] - 12).long().tolist()), (2, 3))
            torch.testing.assert_close(centred.predict_responses(blob)[0, u], twin.predict_responses(moved)[0, u],
                                       atol=1e-4, rtol=1e-4)


def test_an_ensemble_predicts_its_members_mean_and_centres_every_member():
    torch.manual_seed(0)
    a, b = _gaussian_twin(24, 24, [(7, 8), (15, 16)]), _gaussian_twin(24, 24, [(9, 8), (15, 12)])
    ensemble = TwinEnsemble([a, b])
    assert isinstance(ensemble, ResponseModel)
    clips = torch.randn(3, 2, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(ensemble.predict_responses(clips), (a(clips) + b(clips)) / 2)
    torch.testing.assert_close(ensemble.field_centres(clips), torch.tensor([[8.0, 8.0], [15.0, 14.0]]))
    for member in ensemble.centred(clips).members:
        torch.testing.assert_close(member.centre_pixels(), torch.full((2, 2), 12.0))
    with pytest.raises(ConfigError, match="at least one twin"):
        TwinEnsemble([])


def test_a_fresh_gaussian_readout_starts_at_each_units_receptive_field(small_sim_path):
    """TwinTask places the blobs before training (spike-triggered averages): at the simulated
    ON and OFF units' true receptive-field centres, where the random start is far off."""
    import lightning as L

    from neuroformer.data.simulate import load_ground_truth
    from neuroformer.tasks.twin import TwinTask

    torch.manual_seed(0)
    dm = ResponseDataModule(paths=[str(small_sim_path)], n_frames=3)
    dm.setup()
    task = TwinTask(Twin.build(dm.spec, channels=4, readout="gaussian"), dm.spec)
    start = task.model.centre_pixels().detach().clone()
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(task, datamodule=dm)
    truth, names = load_ground_truth(small_sim_path), read_nwb(small_sim_path).units.names
    row = np.array([list(names).index(u) for u in dm.spec.units])
    fields = np.abs(truth.receptive_fields[row])  # (U, H, W), the model's unit order
    true = np.stack(np.divmod(fields.reshape(len(row), -1).argmax(1), fields.shape[2]), axis=1)
    centre_surround = np.isin(truth.cell_types[row], ["ON", "OFF"])
    placed = np.linalg.norm(task.model.centre_pixels().detach().numpy() - true, axis=1)[centre_surround]
    random = np.linalg.norm(start.numpy() - true, axis=1)[centre_surround]
    assert np.median(placed) <= 1.5 and np.median(random) > 5


# --------------------------------------------------------------------------- end to end


def _fast(overrides: list[str]) -> list[str]:
    return ["experiment=twin", "model.channels=4", "data.n_frames=3", "callbacks=mds", "callbacks.mds.steps=3",
            "callbacks.mds.max_iter=2", "callbacks.mds.n_reference=64", "callbacks.mds.n_clusters=4", *overrides]


def test_fast_dev_run_of_the_experiment_with_the_mds_callback(small_sim_path, tmp_path):
    from neuroformer.training import train
    from tests.configs import compose

    cfg = compose(_fast(["debug=fast_dev_run"]), tmp_path, small_sim_path)
    value = train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/bits_per_spike"] == value
    # The baselines sit beside the model: the oracle (true rates) beats the training-mean predictor.
    assert metrics["test/bits_per_spike_oracle"] > metrics["test/bits_per_spike_mean_rate"] + 0.2
    summary = json.loads((out / "mds" / "final" / "mds.json").read_text())
    assert summary["n_clusters"] == len(summary["objective"]) == len(summary["cluster_sizes"])
    assert sum(summary["cluster_sizes"]) == 40
    assert all(j <= np.log(summary["n_clusters"]) + 1e-6 for j in summary["objective"])
    assert -1 <= summary["ari_tuned"] <= 1 and "untuned_landed" in summary
    rows = (out / "mds" / "final" / "assignments.csv").read_text().splitlines()
    assert rows[0] == "unit,cluster,cell_type" and len(rows) == 41
    assert (out / "mds" / "final" / "stimuli.png").stat().st_size > 1000
    stimuli = np.load(out / "mds" / "final" / "stimuli.npy")
    assert stimuli.shape == (summary["n_clusters"], 3, 32, 32)


def test_a_short_run_registers_loads_back_and_runs_the_mds_tool(small_sim_path, tmp_path):
    import mlflow

    from neuroformer import mds, registry
    from neuroformer.registry.tracking import use_tracking_uri
    from neuroformer.training import train
    from tests.configs import compose

    cfg = compose(_fast(["trainer.max_epochs=1", "registry.model_name=twin-test", "registry.alias=champion"]),
                  tmp_path, small_sim_path)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_uri"] == "models:/twin-test/1"
    with use_tracking_uri(metrics["mlflow_tracking_uri"]):
        loaded = registry.load("models:/twin-test@champion")
        pyfunc = mlflow.pyfunc.load_model("models:/twin-test/1")
        run = mlflow.get_run(metrics["mlflow_run_id"])
        artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "mds/final")]
    assert "mds_n_clusters" in run.data.metrics or "mds/n_clusters" in run.data.metrics
    assert "mds/final/stimuli.png" in artifacts and "mds/final/assignments.csv" in artifacts
    checkpoint = registry.load(metrics["best_checkpoint"])
    assert loaded.family == checkpoint.family == "twin" and loaded.spec == checkpoint.spec
    clips = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = loaded.model.predict_responses(clips)
        torch.testing.assert_close(got, checkpoint.model.predict_responses(clips), rtol=0, atol=0)
    np.testing.assert_allclose(pyfunc.predict({"stimulus": clips.numpy()})["rates"], got.numpy(), rtol=1e-6)

    store = Path(cfg.paths.output_root) / "mlflow.db"
    code = mds.main(["model=models:/twin-test@champion", f"--store={store}", f"--out={tmp_path / 'cli'}",
                     "steps=3", "max_iter=2", "n_clusters=4", "n_reference=64"])
    assert code == 0 and (tmp_path / "cli" / "mds.json").is_file()
    assert mds.main([f"--model={tmp_path / 'absent.ckpt'}", f"--store={store}"]) == 2


@pytest.mark.slow
def test_mds_on_a_trained_twin_recovers_the_simulated_types(tmp_path):
    """A twin trained on a 60-unit, 300 s recording; MDS from 10 clusters through the callback.

    The bar is what docs/mds.md measured on the default recording (ARI 0.5-0.7 on tuned units
    over MDS seeds): well above chance (0) and not below k-means given as many clusters.
    """
    from neuroformer.training import train
    from tests.configs import compose

    cfg = compose(["experiment=twin", "callbacks=mds", "callbacks.mds.n_clusters=10", "data.simulate.seed=3",
                   "data.simulate.n_units=60", "data.simulate.duration=300", "trainer.max_epochs=5", "logger=none",
                   "registry.register=false", f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/bits_per_spike"] > 0.5 * metrics["test/bits_per_spike_oracle"]
    summary = json.loads((out / "mds" / "final" / "mds.json").read_text())
    assert summary["ari_tuned"] > 0.4
    assert summary["ari_tuned"] >= summary["ari_tuned_kmeans"] - 0.05


def test_the_mds_callback_refuses_a_model_without_predict_responses(small_sim_path, tmp_path):
    from neuroformer.training import train
    from tests.configs import compose

    cfg = compose(["callbacks=mds", "debug=fast_dev_run", "logger=none"], tmp_path, small_sim_path)
    with pytest.raises(ConfigError, match="predict_responses.*Neuroformer"):
        train(cfg)
