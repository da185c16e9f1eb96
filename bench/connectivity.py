"""Connectivity estimators against the true synapses, every one from the same training block.

For each trained model (``--model EXPERIMENT=SOURCE``, e.g. the model ``python train.py
experiment=connectivity`` registered), on its recording's training block under its own split:

* perturbation (``neuroformer.inference.perturbation``): ``--contexts`` evenly spaced training
  windows, one added spike of every unit in each, in the current window's first bin and/or in
  the past window (``--sites``);
* attention x gradient (``neuroformer.inference.connectivity``): ``--attention-windows`` evenly
  spaced training windows;
* lagged cross-correlation: every spike of the training block;
* coupled GLM (``--glm``): fitted on the training block (validation block for its penalty) at
  2 ms bins with 10 ms of history and coupling, its coupling summed over lags up to 10 ms
  (the settings of ``bench/ceiling.py --connectivity-resolutions 0.002``);
* the model's closed-loop generations (``--generate SECONDS``): the training block generated in
  stretches of SECONDS (each from its true past window, with the true running speed), and the
  same GLM (at the tokenizer's bins) and the cross-correlation fitted to them: a model-based
  estimate that asks what wiring the model's own spike trains imply.

Scored with ``score_links``: link AUROC / AP, direction AUROC, excitatory / inhibitory AUROC.
The perturbation and the cross-correlation are functions of sums over stretches of data, so
they get 95% block-bootstrap intervals (2 s blocks, the same replicates for both); attention
x gradient and the GLM get none (the GLM would have to be refitted per replicate).

Usage: python bench/connectivity.py --model connectivity=SOURCE [--model default=SOURCE]
       [--contexts 1000] [--attention-windows 4000] [--glm] [--threads 1] [--out connectivity.json]
Results: docs/connectivity.md.
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

from neuroformer.baselines.glm import GLMConfig, fit_glm, split_spans
from neuroformer.data.dataset import WindowDataset, batches
from neuroformer.data.recording import Recording
from neuroformer.data.simulate import load_ground_truth
from neuroformer.data.splits import window_starts
from neuroformer.inference.connectivity import (
    attention_influence,
    cross_correlation_counts,
    cross_correlation_influence,
    cross_correlation_z,
)
from neuroformer.inference.generate import simulate
from neuroformer.inference.perturbation import SITES, context_starts, perturbation_effects
from neuroformer.metrics.bootstrap import BLOCK_SECONDS
from neuroformer.metrics.links import link_intervals, score_links
from neuroformer.registry import load


def timed(f):
    began = time.perf_counter()
    out = f()
    return out, time.perf_counter() - began


def stretches(spans: np.ndarray, block: float) -> np.ndarray:
    """(n, 2) the spans cut into consecutive stretches of ``block`` seconds (the last of each span shorter)."""
    return np.array([(a, min(a + block, hi)) for lo, hi in spans for a in np.arange(lo, hi, block)])


def cross_correlation_sums(times: np.ndarray, units: np.ndarray, n_units: int, spans: np.ndarray,
                           block: float) -> tuple[np.ndarray, np.ndarray]:
    """(S, 2 U^2) pair counts (at the lag, at the flanks) of the pairs whose first spike lies in each stretch of
    ``spans``, and the stretches' starts (S,). Their sum is the counts of all of the spikes."""
    parts = stretches(spans, block)
    margin = 0.05  # the longest lag of the flanks: a pair's partner may lie outside the stretch
    rows = []
    for lo, hi in parts:
        near = slice(np.searchsorted(times, lo - margin), np.searchsorted(times, hi + margin))
        t, u = times[near], units[near]
        rows.append(np.concatenate([c.ravel() for c in cross_correlation_counts(t, u, n_units,
                                                                                pre=(t >= lo) & (t < hi))]))
    return np.array(rows), parts[:, 0]


def generated_recording(model, spec, rec: Recording, spans: np.ndarray, seconds: float
                        ) -> tuple[Recording, np.ndarray]:
    """``rec`` with its spikes replaced by the model's closed-loop generations, and the (n, 2) stretches generated.

    Each stretch of ``seconds`` inside ``spans`` is generated window after window from its true past
    window, with the recording's own running speed (and stimulus); all stretches run as one batch.
    """
    tok = spec.tokenizer
    n_windows = round(seconds / tok.window)
    length = n_windows * tok.window
    starts = np.array([a for lo, hi in spans for a in np.arange(lo + tok.past_window, hi - length + 1e-9, length)])
    trains = simulate(model, spec, rec, starts, n_windows)
    times = np.concatenate([t.times for t in trains])
    units = np.concatenate([t.units for t in trains])
    order = np.lexsort((units, times))
    generated = dataclasses.replace(rec.units, spike_times=times[order], spike_units=units[order])
    return dataclasses.replace(rec, units=generated), np.stack([starts, starts + length], axis=1)


def run(experiment: str, source: str, args: argparse.Namespace) -> dict:
    loaded = load(source)
    model, spec = loaded.model, loaded.spec
    rec = spec.source.read()
    truth = load_ground_truth(rec.path).connectivity
    tok, split, U = spec.tokenizer, spec.split, rec.units.n_units
    train = split_spans(rec, split, "train")
    t0 = window_starts(rec.start, rec.stop, split, "train", tok.window, tok.past_window, tok.window)
    inside = np.zeros(len(rec.units.spike_times), bool)
    for lo, hi in train:
        inside[np.searchsorted(rec.units.spike_times, lo): np.searchsorted(rec.units.spike_times, hi)] = True
    times, units = rec.units.spike_times[inside], rec.units.spike_units[inside]
    seconds = float((train[:, 1] - train[:, 0]).sum())
    print(f"\n## {experiment}: {source} on {rec.path.name}: {U} units, {int((truth != 0).sum())} true links; "
          f"training block {seconds:.0f} s, {len(t0)} windows of {tok.window * 1e3:g} ms, {len(times)} spikes")
    boot = {"block": BLOCK_SECONDS, "n_boot": args.n_boot, "seed": 0}
    rows: dict[str, dict] = {}

    contexts = context_starts(t0, args.contexts)
    n2 = U * U
    for site in args.sites:
        d, secs = timed(lambda: perturbation_effects(model, spec, rec, contexts, site=site).astype(np.float64))
        sums = np.concatenate([d.reshape(len(d), n2), np.ones((len(d), 1))], axis=1)
        influence = lambda t: t[:n2].reshape(U, U) / t[-1]  # noqa: E731  (the mean effect; diagonal unscored)
        rows[f"perturbation, {site} ({len(contexts)} contexts)"] = {
            "influence": influence(sums.sum(0)), "seconds": secs,
            "intervals": link_intervals(sums, influence, truth, contexts, **boot)}

    windows = context_starts(t0, args.attention_windows)
    vocab_rows = spec.vocab.indices(rec.units.names, rec.path)
    dataset = WindowDataset([rec], spec, [windows])
    (m, _), secs = timed(lambda: attention_influence(model, batches(dataset, 32), len(spec.vocab)))
    rows[f"attention x gradient ({len(windows)} windows)"] = {"influence": m[np.ix_(vocab_rows, vocab_rows)],
                                                             "seconds": secs}

    (sums, starts), secs = timed(lambda: cross_correlation_sums(times, units, U, train, BLOCK_SECONDS))
    rows["cross-correlation (all spikes)"] = {
        "influence": cross_correlation_z(*sums.sum(0).reshape(2, U, U)), "seconds": secs,
        "intervals": link_intervals(sums, lambda t: cross_correlation_z(*t.reshape(2, U, U)), truth, starts, **boot)}

    if args.glm:
        cfg = GLMConfig(resolution=0.002, history=0.01, coupling=0.01, penalties=(1e-2, 3e-3))
        glm, secs = timed(lambda: fit_glm(rec, train, split_spans(rec, split, "val"), cfg))
        rows["coupled GLM (2 ms bins)"] = {"influence": glm.coupling_strength(), "seconds": secs}

    if args.generate:
        (gen, spans), secs = timed(lambda: generated_recording(model, spec, rec, train, args.generate))
        print(f"generated {len(spans)} stretches of {args.generate:g} s closed loop: {len(gen.units.spike_times)} "
              f"spikes ({len(times)} true), {secs:.0f} s")
        cfg = GLMConfig(resolution=tok.resolution, history=0.01, coupling=0.01, penalties=(1e-2, 3e-3))
        n_val = max(1, len(spans) // 8)
        glm, fit_secs = timed(lambda: fit_glm(gen, spans[:-n_val], spans[-n_val:], cfg))
        rows[f"coupled GLM on generations ({len(spans) * args.generate:.0f} s)"] = {
            "influence": glm.coupling_strength(), "seconds": secs + fit_secs}
        rows["cross-correlation of generations"] = {
            "influence": cross_correlation_influence(gen.units.spike_times, gen.units.spike_units, U), "seconds": secs}

    print("\n| estimator | link AUROC [95% CI] | link AP [95% CI] | direction AUROC [95% CI] | excitatory AUROC | "
          "inhibitory AUROC | seconds |\n|---|---|---|---|---|---|---|")
    results = {}
    for name, row in rows.items():
        s = score_links(row["influence"], truth)
        cis = row.get("intervals", {})
        cell = lambda field: str(cis[field]) if field in cis else f"{getattr(s, field):.3f}"  # noqa: E731
        print(f"| {name} | {cell('auroc')} | {cell('ap')} | {cell('direction_auroc')} | {s.excitatory_auroc:.3f} | "
              f"{s.inhibitory_auroc:.3f} | {row['seconds']:.0f} |")
        results[name] = {**dataclasses.asdict(s), "seconds": row["seconds"],
                         **{f"{k}_interval": dataclasses.asdict(v) for k, v in cis.items()}}
    print(f"| chance | 0.500 | {s.chance_ap:.3f} | 0.500 | 0.500 | 0.500 | |")
    return {"model": source, "recording": str(rec.path), "estimators": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="EXPERIMENT=SOURCE",
                        help="a name for the row group and a checkpoint or models:/NAME/VERSION (repeatable)")
    parser.add_argument("--contexts", type=int, default=1000, help="training windows used by the perturbation")
    parser.add_argument("--sites", nargs="+", default=["window", "past"], choices=SITES,
                        help="where the perturbation adds its spike")
    parser.add_argument("--attention-windows", type=int, default=4000, help="training windows for attention x gradient")
    parser.add_argument("--glm", action="store_true", help="also fit the coupled GLM (minutes)")
    parser.add_argument("--generate", type=float, default=0.0, metavar="SECONDS",
                        help="also generate the training block closed loop in stretches of SECONDS and fit the "
                             "coupled GLM (at the tokenizer's bins) and the cross-correlation to the generations")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress lines
    if args.threads:
        torch.set_num_threads(args.threads)
    models = dict(m.split("=", 1) for m in args.model)
    results = {name: run(name, source, args) for name, source in models.items()}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
