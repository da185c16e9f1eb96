"""MDS (neuroformer/inference/mds.py): the objective, reassignment, the alternation on a toy model
with known groups, the clustering scores and the simulator's rich population."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuroformer.data.simulate import RICH_DIRECTIONS, RICH_TYPES, SimulationConfig, simulate
from neuroformer.errors import ConfigError
from neuroformer.inference.mds import (Constraint, MDSConfig, cluster_means, discriminability, kmeans, mds,
                                       reassign, separation)
from neuroformer.metrics.clustering import adjusted_rand_index, majority_types

# --------------------------------------------------------------------------- the objective


def test_objective_is_bounded_by_log_k_and_zero_at_chance():
    torch.manual_seed(0)
    for k in (2, 5, 12):
        means = torch.randn(200, k, k) * 10
        j = torch.stack([discriminability(m, 1.6) for m in means])
        assert j.max() <= math.log(k) + 1e-6
        # Chance: every cluster responds alike to every stimulus.
        torch.testing.assert_close(discriminability(torch.full((k, k), 3.7), 1.6), torch.zeros(k))
        # Only cluster k responds to stimulus k: J -> log K as the contrast grows.
        sharp = discriminability(torch.eye(k) * 200, 1.6)
        torch.testing.assert_close(sharp, torch.full((k,), math.log(k)))


def test_objective_matches_its_formula_and_cluster_means():
    responses = torch.tensor([[1.0, 3.0, 0.0, 2.0], [0.0, 1.0, 4.0, 2.0]])  # 2 stimuli x 4 units
    labels = torch.tensor([0, 0, 1, 1])
    means = cluster_means(responses, labels, 2)
    torch.testing.assert_close(means, torch.tensor([[2.0, 1.0], [0.5, 3.0]]))
    tau = 1.6
    expected = [math.log(2) + 2 / tau - math.log(math.exp(2 / tau) + math.exp(1 / tau)),
                math.log(2) + 3 / tau - math.log(math.exp(0.5 / tau) + math.exp(3 / tau))]
    torch.testing.assert_close(discriminability(means, tau), torch.tensor(expected))


def test_reassignment_follows_the_strongest_stimulus():
    # 3 stimuli (clusters) x 6 units, made by hand.
    responses = torch.tensor([[5.0, 0.1, 0.2, 2.0, 0.0, 1.0],
                              [0.0, 4.0, 0.3, 2.5, 0.0, 3.0],
                              [1.0, 0.2, 0.9, 0.1, 7.0, 0.5]])
    assert reassign(responses).tolist() == [0, 1, 2, 1, 2, 1]


def test_separation_of_pairs_of_clusters():
    # Stimuli 0 and 1 drive units 0-1 alike (duplicate clusters); stimulus 2 drives units 2-3 only.
    responses = torch.tensor([[0.9, 0.9, 0.0, 0.0], [0.9, 0.9, 0.0, 0.0], [0.0, 0.0, 0.9, 0.9]])
    sep = separation(responses, torch.tensor([0, 1, 2, 2]), 1.6)
    assert sep[0, 1] == pytest.approx(0.0) and sep[1, 0] == pytest.approx(0.0)
    assert sep[0, 2] == pytest.approx(math.log(2) + 0.9 / 1.6 - math.log(math.exp(0.9 / 1.6) + 1))
    torch.testing.assert_close(sep.diagonal(), torch.zeros(3))


def test_constraint_keeps_stimuli_in_range_and_norm():
    x = torch.randn(3, 2, 8, 8) * 10
    y = Constraint(norm=5.0, bounds=(-1.0, 2.0), smooth_space=1.0)(x)
    assert y.min() >= -1.0 - 1e-6 and y.max() <= 2.0 + 1e-6
    assert torch.all(y.flatten(1).norm(dim=1) <= 5.0 + 1e-4)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="tau"):
        MDSConfig(tau=0)
    with pytest.raises(ConfigError, match="normalize"):
        MDSConfig(normalize="max")


# --------------------------------------------------------------------------- the alternation


class Groups(torch.nn.Module):
    """20 units per group; group g sees the g-th vertical stripe of the frame (each unit with its
    own gain); rates = softplus(gain * mean contrast of its stripe over the clip's frames)."""

    def __init__(self, n_groups: int = 2, width: int = 6):
        super().__init__()
        per, stripe = 20 // n_groups, width // n_groups
        weights = torch.zeros(per * n_groups, 2, 6, width)
        for g in range(n_groups):
            weights[g * per:(g + 1) * per, ..., g * stripe:(g + 1) * stripe] = 1.0
        gain = torch.linspace(0.5, 2.0, per * n_groups)
        self.register_buffer("weights", weights * gain[:, None, None, None] / (2 * 6 * stripe))

    def predict_responses(self, stimulus: torch.Tensor) -> torch.Tensor:
        return F.softplus(torch.einsum("bthw,uthw->bu", stimulus, self.weights))


def test_a_toy_model_converges_to_its_two_groups_from_more_clusters():
    torch.manual_seed(0)
    reference = torch.randn(256, 2, 6, 6)
    result = mds(Groups(2), reference, MDSConfig(n_clusters=6, steps=30, max_iter=20))
    truth = np.repeat([0, 1], 10)
    assert result.n_clusters == 2
    assert adjusted_rand_index(result.labels, truth) == 1.0
    assert result.history[0]["n_clusters"] == 6  # it did start from more clusters
    # Each group's stimulus is brighter on its own half.
    for c in range(2):
        group = truth[result.labels == c][0]
        left, right = result.stimuli[c][..., :3].mean(), result.stimuli[c][..., 3:].mean()
        assert (left > right) == (group == 0)
    # Saturated responses lie in [0, 1): J is at most log(2 sigmoid(1 / tau)), well above chance here.
    ceiling = math.log(2 / (1 + math.exp(-1 / 1.6)))
    assert np.all(result.objective <= ceiling + 1e-6) and np.all(result.objective > 0.3 * ceiling)


def test_splits_grow_too_few_clusters_to_the_true_groups():
    torch.manual_seed(0)
    reference = torch.randn(256, 2, 6, 12)  # stripes of 4 pixels: wider than the stimuli's 2-pixel smoothing
    result = mds(Groups(3, width=12), reference, MDSConfig(n_clusters=1, steps=30, max_iter=20))
    truth = np.repeat([0, 1, 2], 6)
    assert result.n_clusters == 3
    assert adjusted_rand_index(result.labels, truth) == 1.0
    assert [h["step"] for h in result.history].count("split") == 2  # 1 -> 2 -> 3, then no split is kept


# --------------------------------------------------------------------------- scores


def test_adjusted_rand_index_known_values():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, np.array(list("xxyyzz"))) == 1.0
    assert adjusted_rand_index(a, np.array([2, 2, 0, 0, 1, 1])) == 1.0
    # Hubert & Arabie's formula by hand for a 2x2 table [[2, 1], [0, 3]]:
    # index 1 + 0 + 3 = 4, rows 3 + 3 = 6, cols 1 + 6 = 7, total 15: (4 - 2.8) / (6.5 - 2.8).
    got = adjusted_rand_index(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 1, 1]))
    assert got == pytest.approx((4 - 6 * 7 / 15) / (6.5 - 6 * 7 / 15))
    rng = np.random.default_rng(0)
    assert abs(np.mean([adjusted_rand_index(rng.integers(4, size=200), rng.integers(4, size=200))
                        for _ in range(50)])) < 0.01
    assert majority_types(np.array([0, 0, 1]), np.array(["ON", "ON", "OFF"])) == {0: "ON", 1: "OFF"}


def test_kmeans_finds_separated_blobs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, (15, 3)) for c in (0.0, 3.0, 6.0)])
    assert adjusted_rand_index(kmeans(x, 3), np.repeat([0, 1, 2], 15)) == 1.0


# --------------------------------------------------------------------------- the simulator's rich population


def test_rich_population_has_nine_types_and_the_default_is_unchanged():
    default = SimulationConfig(seed=1, n_units=40, duration=2.0)
    # The identifier (and so the cached file name and the NWB notes) of every default config
    # is what it was before the population option existed.
    assert SimulationConfig().identifier() == "neuroformer-sim-seed0-6c0afdb106"
    assert "population" not in default.to_dict()
    rich = simulate(SimulationConfig(seed=1, n_units=90, duration=2.0, population="rich")).ground_truth
    assert set(rich.cell_types) == set(RICH_TYPES)
    counts = [np.sum(rich.cell_types == t) for t in RICH_TYPES[:-1]]
    assert max(counts) - min(counts) <= 1
    for d in RICH_DIRECTIONS:
        assert np.all(rich.preferred_direction[rich.cell_types == f"DS-{d}"] == d)
    assert np.all(np.isnan(rich.preferred_direction[~np.char.startswith(rich.cell_types.astype(str), "DS")]))
    # Sustained ON cells follow the sign of their centre; transient cells have no net (DC) response.
    with pytest.raises(ConfigError, match="population"):
        SimulationConfig(population="colour")
