"""Splits: contiguous, seeded, and no test target is ever a training input."""

import numpy as np
import pytest

from neuroformer.data.recording import Intervals
from neuroformer.data.splits import SplitSpec, window_starts

W, PAST = 0.05, 0.15


def spans(split, spec, **kw):
    t0 = window_starts(0.0, 100.0, spec, split, W, PAST, W, **kw)
    return np.stack([t0 - PAST, t0 + W], axis=1)  # (n, 2): everything a window touches


def test_same_seed_same_split_and_other_seed_differs():
    assert (SplitSpec(seed=3).assign() == SplitSpec(seed=3).assign()).all()
    assert any((SplitSpec(seed=s).assign() != SplitSpec(seed=3).assign()).any() for s in range(4, 10))
    counts = {s: (SplitSpec(n_blocks=20).assign() == s).sum() for s in ("train", "val", "test")}
    assert counts == {"train": 16, "val": 2, "test": 2}


def test_no_test_target_is_a_training_input():
    spec = SplitSpec(n_blocks=10, seed=1)
    train, test = spans("train", spec), spans("test", spec)
    assert len(train) and len(test)
    # Any training window's span (past input + current targets) is disjoint from any test window's span.
    overlap = (train[:, None, 0] < test[None, :, 1]) & (test[None, :, 0] < train[:, None, 1])
    assert not overlap.any()
    edges = np.linspace(0, 100, 11)
    block = np.searchsorted(edges, test[:, 0], side="right") - 1
    assert (test[:, 1] <= edges[block + 1] + 1e-9).all()  # each window inside one block


def test_windows_tile_the_blocks_and_restriction_to_trials():
    spec = SplitSpec(n_blocks=4, val_fraction=0.25, test_fraction=0.25, seed=0)
    t0 = window_starts(0.0, 100.0, spec, "train", W, PAST, W)
    assert np.allclose(np.diff(t0)[np.diff(t0) < 1], W)
    trials = Intervals(start=np.array([80.0, 30.0]), stop=np.array([81.0, 30.5]))  # in train blocks 1 and 3
    t0 = window_starts(0.0, 100.0, spec, "train", W, PAST, W, restrict_to=trials)
    assert len(t0) == 7 + 17  # t0 in [30.15, 30.45] and [80.15, 80.95] on the 0.05 s grid
    inside = ((t0 - PAST >= 30.0) & (t0 + W <= 30.5)) | ((t0 - PAST >= 80.0) & (t0 + W <= 81.0))
    assert len(t0) and inside.all()


def test_bad_split_settings_are_refused():
    with pytest.raises(ValueError, match="n_blocks"):
        SplitSpec(n_blocks=2).assign()
    with pytest.raises(ValueError, match="no block for training"):
        SplitSpec(n_blocks=4, val_fraction=0.5, test_fraction=0.5).assign()


def test_default_recording_is_tested_on_interleaved_blocks_without_leakage():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.configs import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["paths.root_dir=.", "paths.output_dir=."])
    spec = instantiate(cfg.data.split)
    names = spec.assign()
    test_blocks = np.flatnonzero(names == "test")
    # Several test blocks spread over the session (not one stretch), none next to another.
    assert len(test_blocks) >= 4 and np.diff(test_blocks).min() > 1
    assert test_blocks.min() < spec.n_blocks / 3 and test_blocks.max() > 2 * spec.n_blocks / 3
    duration = cfg.data.simulate.duration
    t0 = {s: window_starts(0.0, duration, spec, s, W, PAST, W) for s in ("train", "val", "test")}
    touched = {s: np.stack([t - PAST, t + W], axis=1) for s, t in t0.items()}
    for other in ("train", "val"):
        a, b = touched[other], touched["test"]
        assert not ((a[:, None, 0] < b[None, :, 1]) & (b[None, :, 0] < a[:, None, 1])).any(), other
    assert len(t0["test"]) * W > 0.09 * duration  # still about a tenth of the recording
