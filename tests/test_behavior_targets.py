"""Behaviour that real sessions have: angles that wrap, and tracking that covers only part of a
session. Targets, inputs, losses, scores and plots must respect both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroformer import plots
from neuroformer.data.datamodule import NWBDataModule
from neuroformer.data.nwb import read_nwb
from neuroformer.data.recording import TimeSeries
from neuroformer.data.splits import SplitSpec
from neuroformer.data.targets import BehaviorTarget
from neuroformer.errors import RecordingError
from neuroformer.metrics.circular import circular_correlation, circular_difference, circular_mae_degrees
from neuroformer.models.neuroformer import Neuroformer
from neuroformer.training import train
from tests.configs import compose
from tests.corpus import head_direction_recording

DIRECTION = BehaviorTarget(kind="circular", names=["head_direction"], unit="radians")


@pytest.fixture(scope="module")
def hd_path(tmp_path_factory) -> Path:
    return head_direction_recording(tmp_path_factory.mktemp("hd") / "hd.nwb")


@pytest.fixture(scope="module")
def partly_tracked(tmp_path_factory) -> Path:
    """Head direction tracked over [0, 150) s of a 240 s session only."""
    return head_direction_recording(tmp_path_factory.mktemp("hd_part") / "partly.nwb", tracked=(0.0, 150.0))


def test_circular_scores_on_known_answers():
    deg = np.radians
    assert circular_mae_degrees(deg([350.0]), deg([10.0])) == pytest.approx(20.0)  # not 340
    assert circular_difference(deg(10.0), deg(350.0)) == pytest.approx(deg(20.0))
    a = np.random.default_rng(0).uniform(-np.pi, np.pi, 500)
    assert circular_correlation(a, a) == pytest.approx(1.0)
    assert circular_correlation(a, -a) == pytest.approx(-1.0)
    assert circular_correlation(a, circular_difference(a + 1.0, 0)) == pytest.approx(1.0)  # a shift
    assert abs(circular_correlation(a, np.random.default_rng(1).uniform(-np.pi, np.pi, 500))) < 0.15


def test_circular_window_mean_crosses_the_wrap_the_short_way(hd_path):
    rec = read_nwb(hd_path)
    # A direction that sweeps from 350 deg to 10 deg within one window: its mean is 0, not 180.
    t = np.linspace(0, 1, 11)
    rec.behavior["head_direction"] = TimeSeries("head_direction", t, np.radians(np.linspace(350, 370, 11)
                                                                               % 360)[:, None].astype(np.float32))
    target = DIRECTION.fit([rec], [np.array([0.0])], 1.0)
    (vector,) = target.values(rec, np.array([0.0]), 1.0)
    assert vector == pytest.approx([1.0, 0.0], abs=1e-3)
    assert target.denormalise(vector[None])[0] == pytest.approx(0.0, abs=1e-3)
    in_degrees = BehaviorTarget(kind="circular", names=["head_direction"], unit="degrees")
    assert in_degrees.denormalise(np.array([[0.0, 1.0]]))[0] == pytest.approx(90.0)


def test_untracked_windows_carry_no_label_and_no_input(partly_tracked, caplog):
    with caplog.at_level("INFO"):
        dm = NWBDataModule(paths=[str(partly_tracked)], behavior=[], target=DIRECTION,
                           split=_split_with_tracked_test_block())
        dm.setup()
    assert "Windows with a circular label (head_direction): train" in caplog.text
    train_set = dm.datasets["train"]
    targets = train_set.__getitems__(list(range(len(train_set)))).target_behavior.numpy()
    untracked = train_set.t0 + 0.05 > 150.0 + 0.02  # past the last sample (plus one sampling interval)
    assert untracked.any() and np.isnan(targets[untracked]).all() and np.isfinite(targets[~untracked]).all()

    # As an input: windows outside the tracking get NaN (masked) samples, never extrapolated ones;
    # the model's output does not depend on them.
    inputs = NWBDataModule(paths=[str(partly_tracked)], behavior=["head_direction"], n_frames=0)
    inputs.setup()
    late = np.flatnonzero(inputs.datasets["train"].t0 > 160)[:4]
    batch = inputs.datasets["train"].__getitems__(late.tolist())
    assert torch.isnan(batch.behavior).all()
    model = Neuroformer.build(inputs.spec, n_embd=32, n_head=2, n_layer=1).eval()
    with torch.no_grad():
        out = model(batch.inputs).id_logits
        filled = model(batch.inputs._replace(behavior=torch.zeros_like(batch.behavior))).id_logits
    assert torch.isfinite(out).all() and not torch.allclose(out, filled)  # zeros would be values; NaN is none
    early = inputs.datasets["train"].__getitems__(np.flatnonzero(inputs.datasets["train"].t0 < 100)[:4].tolist())
    assert torch.isfinite(early.behavior).all()


def _split_with_tracked_test_block() -> SplitSpec:
    """A split of the 240 s session into 24 s blocks whose blocks after 144 s are all training."""
    return next(SplitSpec(seed=s) for s in range(100) if (SplitSpec(seed=s).assign()[6:] == "train").all())


def test_a_split_whose_test_block_has_no_label_is_refused(partly_tracked):
    split = next(SplitSpec(seed=s) for s in range(100)
                 if (SplitSpec(seed=s).assign()[7:] == "test").any())  # a test block after 168 s
    with pytest.raises(RecordingError, match=r"behavior/head_direction: no (val or )?test window carries a label.*"
                                             r"change the split"):
        NWBDataModule(paths=[str(partly_tracked)], behavior=[], target=DIRECTION, split=split).setup()


def test_decoding_head_direction_beats_the_training_mean(hd_path, tmp_path):
    cfg = compose(["experiment=finetune_speed", f"data.paths=[{hd_path}]", "data.target.kind=circular",
                   "data.target.names=[head_direction]", "+data.target.unit=radians", "data.n_frames=0",
                   "model.n_embd=32", "model.n_head=2", "model.n_layer=1", "trainer.max_steps=150",
                   "trainer.val_check_interval=75", "task.lr=3e-3", "data.batch_size=32", "logger=none",
                   "optimized_metric=test/behavior_circular_mae_deg"], tmp_path)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    mae, baseline = metrics["test/behavior_circular_mae_deg"], metrics["test/behavior_circular_mae_deg_train_mean"]
    assert baseline > 60 and mae < 0.5 * baseline, metrics  # a direction-tuned population is easy to read
    assert metrics["test/behavior_circular_r"] > 0.6, metrics
    fig = plots.behavior_trace(np.arange(4.0), np.array([170.0, 179.0, -179.0, -170.0]), period=360.0)
    x, y = fig.axes[0].get_lines()[0].get_data()
    assert np.isnan(y).sum() == 1 and np.nanmax(np.abs(np.diff(y))) < 180  # no line across the plot
    assert (out / "behavior.png").stat().st_size > 10_000
