"""The default run learns, measured against the ceiling (slow: the full default configuration, as
`python train.py` runs it).

Evidence asked of the platform, on the held-out test blocks of the default simulated recording,
each number next to the simulator's forecast oracle (the best possible prediction) and the
coupled Poisson GLM fitted on the same training blocks (docs/evaluation.md, docs/baselines.md):
the ID cross-entropy is below the unigram baseline; the model's bits per spike reach a set
fraction of the oracle's and beat the GLM's, both with block-bootstrap intervals;
its generated spike counts match the true ones; and the same model without stimulus frames
loses at least a third of what the stimulus is worth to the oracle.
"""

import json
from pathlib import Path

import pytest

from neuroformer.training import train
from tests.configs import compose

pytestmark = pytest.mark.slow
# Measured on one default run (docs/evaluation.md, 2026-12-07): fraction of the oracle 0.925
# [0.905, 0.938], model - GLM +0.010 [+0.006, +0.014] bits/spike, generated / true spikes 0.982,
# ID cross-entropy 4.1% below the unigram. The thresholds leave room for run-to-run variation.
FRACTION_OF_ORACLE = 0.75  # lower end of the paired interval
GLM_LOW = -0.005  # lower end of the paired interval of model - GLM, bits per spike


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default_run")
    # Connectivity is left to tests/test_connectivity.py: its perturbation adds minutes to CI and nothing here reads it.
    cfg = compose(["registry.register=false", "evaluate.connectivity=false"], tmp)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["evaluation"] = json.loads((out / "evaluation" / "metrics.json").read_text())["metrics"]
    return metrics


def test_default_run_beats_unigram(default_run):
    m = default_run
    # Tokens are in time order within a 5 ms bin (was: by unit), so the order of the ~3 spikes of a bin
    # is now part of what is predicted: the cross-entropy per token is higher for the same model quality.
    assert m["test/id_ce"] <= 0.97 * m["test/id_ce_unigram"], m


def test_default_model_reaches_most_of_the_ceiling_and_beats_the_glm(default_run):
    e = default_run["evaluation"]
    # Paired 95% intervals: the fraction of the oracle and the margin over the GLM, on the same windows.
    assert e["fraction_of_oracle_low"] >= FRACTION_OF_ORACLE, e
    assert e["minus_glm"] > 0 and e["minus_glm_low"] > GLM_LOW, e
    assert e["bits_per_spike_low"] > e["mean_rate_bits_per_spike_high"], e
    assert e["psth_r_median"] > 0.3 * e["psth_noise_ceiling_median"] > 0, e


def test_generated_spike_counts_match_the_true_counts(default_run):
    e = default_run["evaluation"]
    assert abs(e["generated_count_ratio"] - 1) <= 0.10, e


def test_removing_the_stimulus_costs_a_third_of_what_it_is_worth(default_run, tmp_path):
    metrics = default_run
    # Only the ablated model's own bits per spike is compared: its baselines would repeat the default run's.
    cfg = compose(["experiment=no_stimulus", "registry.register=false", "evaluate.n_samples=2",
                   "evaluate.connectivity=false", "evaluate.baselines=false"], tmp_path)
    train(cfg)
    ablated = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert ablated["test/id_ce_unigram"] == pytest.approx(metrics["test/id_ce_unigram"])
    assert ablated["test/id_ce"] > metrics["test/id_ce"] + 0.02, (ablated, metrics)
    e = metrics["evaluation"]
    a = json.loads((Path(cfg.paths.output_dir) / "evaluation" / "metrics.json").read_text())["metrics"]
    # The stimulus and running alone are worth about the whole oracle here (docs/baselines.md: 99%).
    assert e["bits_per_spike"] - a["bits_per_spike"] >= e["oracle_bits_per_spike"] / 3, (e, a)
