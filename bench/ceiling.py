"""The ceiling and the baselines on a recording's test block, with block-bootstrap intervals.

For each recording (by default the default one and ``experiment=connectivity``'s; any experiment's,
e.g. ``alm``, a real recording), on the test block of the configured split, with the configured
tokenizer's windows and dt bins (and inside the configured intervals, e.g. trials):

* forecast table: NLB bits per spike of the simulator's forecast oracle, its stimulus-and-running
  variant (no past spikes), the coupled GLM fitted on the training block and the mean-rate
  predictor, each with its 95% block-bootstrap interval, the fraction of the oracle (paired
  interval), predicted / true spike count and seconds taken; on a real recording (no ground
  truth) the GLM and the mean rate, and each minus the GLM;
* connectivity table: the GLM's coupling (fitted at the tokenizer's resolution, or at the bins
  asked for) against lagged cross-correlation, both from the training block's spikes, scored on
  the true synapses (link AUROC / AP, direction AUROC, excitatory / inhibitory AUROC).

Usage: python bench/ceiling.py [--experiments default connectivity] [--tables forecast connectivity]
       [--samples 64] [--threads N] [--connectivity-resolutions 0.005 0.002] [--out ceiling.json]
Results: docs/baselines.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from neuroformer.baselines.glm import GLMConfig, fit_glm, split_spans
from neuroformer.baselines.mean_rate import mean_rate_counts
from neuroformer.baselines.oracle import SimulatorOracle
from neuroformer.data.nwb import read_nwb
from neuroformer.data.recording import Recording
from neuroformer.data.simulate import load_ground_truth
from neuroformer.data.splits import window_starts
from neuroformer.data.tokenizer import SpikeTokenizer
from neuroformer.errors import RecordingError
from neuroformer.inference.connectivity import cross_correlation_influence
from neuroformer.metrics.links import score_links
from neuroformer.metrics.bootstrap import bits_per_spike_interval, paired_interval
from neuroformer.data.tokenizer import bin_spikes

CONF = Path(__file__).resolve().parents[1] / "conf"


def timed(f):
    began = time.perf_counter()
    out = f()
    return out, time.perf_counter() - began


def data_module(experiment: str, overrides: list[str]):
    """The experiment's data module with its recording simulated (not set up: only its settings are needed)."""
    extra = [] if experiment == "default" else [f"experiment={experiment}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=outputs/bench", "paths.root_dir=.", *extra, *overrides])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    return dm


def in_spans(times: np.ndarray, spans: np.ndarray) -> np.ndarray:
    inside = np.zeros(len(times), bool)
    for lo, hi in spans:
        inside[np.searchsorted(times, lo) : np.searchsorted(times, hi)] = True
    return inside


@dataclasses.dataclass
class Context:
    """One recording's test windows, true counts, spans and ground truth."""

    rec: Recording
    tok: SpikeTokenizer
    truth: np.ndarray | None
    t0: np.ndarray
    true: np.ndarray
    train: np.ndarray
    val: np.ndarray


def glm_config(ctx: Context, resolution: float) -> GLMConfig:
    """The forecast GLM at the tokenizer's bins; at finer bins (connectivity only) a short history and two penalties,
    to keep the fit affordable."""
    if np.isclose(resolution, ctx.tok.resolution):
        return GLMConfig(resolution=resolution, history=ctx.tok.past_window)
    return GLMConfig(resolution=resolution, history=0.01, coupling=0.01, penalties=(1e-2, 3e-3))


def forecast_table(ctx: Context, oracle: SimulatorOracle | None, glm, t_glm: float, args: argparse.Namespace) -> dict:
    """Bits/spike of each predictor with intervals; with an oracle (simulated recordings) also the fraction of it."""
    rec, tok, t0, true = ctx.rec, ctx.tok, ctx.t0, ctx.true
    predictions, seconds = {}, {}
    if oracle is not None:
        predictions["oracle"], seconds["oracle"] = timed(lambda: oracle.expected_counts(rec, t0, tok, args.samples))
        predictions["oracle, stimulus + running only"], seconds["oracle, stimulus + running only"] = timed(
            lambda: oracle.expected_counts(rec, t0, tok, args.samples, history=False))
    predictions["coupled GLM"], seconds["coupled GLM"] = timed(lambda: glm.expected_counts(rec, t0, tok, args.samples))
    predictions["mean rate"], seconds["mean rate"] = timed(lambda: mean_rate_counts(rec, ctx.train, t0, tok))
    seconds["coupled GLM"] += t_glm
    boot = {"block": args.block, "n_boot": args.n_boot}
    reference = "oracle" if oracle is not None else "coupled GLM"
    compare = "ratio" if oracle is not None else "difference"
    column = "fraction of oracle" if oracle is not None else "minus GLM"
    rows = {}
    print(f"\n| predictor | bits/spike [95% CI] | {column} [95% CI] | predicted / true spikes | seconds |\n"
          "|---|---|---|---|---|")
    for name, rates in predictions.items():
        score = bits_per_spike_interval(rates, true, t0, **boot)
        paired = paired_interval(rates, predictions[reference], true, t0, compare=compare, **boot)
        rows[name] = {"bits_per_spike": dataclasses.asdict(score), column.replace(" ", "_"): dataclasses.asdict(paired),
                      "count_ratio": float(rates.sum() / true.sum()), "seconds": seconds[name]}
        print(f"| {name} | {score} | {paired} | {rates.sum() / true.sum():.3f} | {seconds[name]:.0f} |")
    print(f"\n{score.n_blocks} bootstrap blocks of {args.block:g} s; seconds of the GLM include its fit; "
          "penalties kept: " + ", ".join(f"{p:g} x{n}" for p, n in zip(*np.unique(glm.penalty, return_counts=True))))
    return rows


def connectivity_table(ctx: Context, glms: dict[float, tuple]) -> dict:
    rec = ctx.rec
    inside = in_spans(rec.units.spike_times, ctx.train)
    estimates = {f"GLM coupling, {res * 1e3:g} ms bins": (glm.coupling_strength(), secs)
                 for res, (glm, secs) in glms.items()}
    estimates["cross-correlation"] = timed(lambda: cross_correlation_influence(
        rec.units.spike_times[inside], rec.units.spike_units[inside], rec.units.n_units))
    links = {}
    seconds = np.sum(ctx.train[:, 1] - ctx.train[:, 0])
    print(f"\n| estimator (training block, {seconds:.0f} s) | link AUROC | link AP | direction AUROC | "
          "excitatory AUROC | inhibitory AUROC | seconds |\n|---|---|---|---|---|---|---|")
    for name, (influence, secs) in estimates.items():
        s = score_links(influence, ctx.truth)
        links[name] = {**dataclasses.asdict(s), "seconds": secs}
        print(f"| {name} | {s.auroc:.3f} | {s.ap:.3f} | {s.direction_auroc:.3f} | {s.excitatory_auroc:.3f} | "
              f"{s.inhibitory_auroc:.3f} | {secs:.0f} |")
    print(f"| chance | 0.500 | {s.chance_ap:.3f} | 0.500 | 0.500 | 0.500 | |")
    return links


def run(experiment: str, args: argparse.Namespace, overrides: list[str]) -> dict:
    dm = data_module(experiment, overrides)
    path, tok, split = dm.files[0], dm.tokenizer, dm.split
    rec = read_nwb(path, behavior_nan=dm.behavior_nan, stimulus=dm.stimulus_name)
    restrict = None
    if dm.restrict_to:
        restrict = rec.trials if dm.restrict_to == "trials" else rec.intervals[dm.restrict_to]
    try:
        truth, oracle = load_ground_truth(path).connectivity, SimulatorOracle.from_file(path)
    except RecordingError:
        truth, oracle = None, None  # a real recording: no ceiling, no true links
    t0 = window_starts(rec.start, rec.stop, split, "test", tok.window, tok.past_window, tok.window, restrict)
    ctx = Context(rec, tok, truth, t0,
                  bin_spikes(rec.units.spike_times, rec.units.spike_units, t0, tok, rec.units.n_units),
                  split_spans(rec, split, "train", restrict), split_spans(rec, split, "val", restrict))
    print(f"\n## {experiment}: {path.name}, {rec.units.n_units} units, {len(t0)} test windows of "
          f"{tok.window * 1e3:g} ms in {tok.n_bins} bins, {int(ctx.true.sum())} test spikes; split {split}")
    glms = {}

    def glm_at(resolution: float) -> tuple:
        if resolution not in glms:
            glms[resolution] = timed(lambda: fit_glm(rec, ctx.train, ctx.val, glm_config(ctx, resolution)))
        return glms[resolution]

    results = {"recording": str(path), "windows": len(t0), "test_spikes": int(ctx.true.sum())}
    if "forecast" in args.tables:
        results["forecast"] = forecast_table(ctx, oracle, *glm_at(tok.resolution), args)
    if "connectivity" in args.tables and truth is not None:
        resolutions = args.connectivity_resolutions or [tok.resolution]
        results["connectivity"] = connectivity_table(ctx, {r: glm_at(r) for r in resolutions})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["default", "connectivity"],
                        help="'default' or experiment config names (e.g. alm: a real recording, without oracle)")
    parser.add_argument("--samples", type=int, default=64, help="simulations per window (oracle and GLM)")
    parser.add_argument("--block", type=float, default=2.0, help="bootstrap block, seconds")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--connectivity-resolutions", type=float, nargs="+",
                        help="bins (seconds) of the GLMs whose coupling is scored (default: the tokenizer's)")
    parser.add_argument("--tables", nargs="+", default=["forecast", "connectivity"],
                        choices=["forecast", "connectivity"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args, overrides = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the GLM's and the oracle's progress lines
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} torch threads, {args.samples} simulations per window")
    results = {e: run(e, args, overrides) for e in args.experiments}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
