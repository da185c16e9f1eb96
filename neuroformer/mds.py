"""MDS clustering of a trained response model's units: files, figures and ``python -m neuroformer.mds``.

Usage (``--help`` lists every option)::

    python -m neuroformer.mds model=models:/twin@champion
    python -m neuroformer.mds --model models:/twin/1 --n-clusters 16 --out mds/

``--model`` is anything ``neuroformer.registry.load`` takes; the model must implement
``predict_responses`` (the twin does; docs/mds.md). The reference stimuli are training clips of
the recording it was trained on (``spec.source``). ``run_mds`` is also what the ``mds`` callback
(``neuroformer/callbacks/mds.py``) calls during training. It writes into ``out``:

- ``stimuli.png``: one row per cluster, the frames of its stimulus left to right (the strip);
- ``assignments.csv``: unit, cluster (and the true type where the file has a ``cell_type``
  column);
- ``mds.json``: the settings, J per cluster, the number of clusters, the history and, with
  known types, the adjusted Rand index on the tuned units next to k-means with as many
  clusters, and where the untuned units landed;
- ``stimuli.npy``: the stimuli (K, T, H, W) in pixel values.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from neuroformer import cli, plots
from neuroformer.data.recording import Recording
from neuroformer.data.responses import ResponseSpec, response_data
from neuroformer.errors import ConfigError
from neuroformer.evaluate import training_recording
from neuroformer.files import atomic_path, write_json, write_text
from neuroformer.inference.mds import MDSConfig, MDSResult, Normalizer, kmeans, mds, profiles, respond
from neuroformer.metrics.clustering import adjusted_rand_index, majority_types
from neuroformer.models.twin import ResponseModel
from neuroformer.registry import load
from neuroformer.registry.loading import DEFAULT_STORE

UNTUNED = "untuned"


def reference_clips(rec: Recording, spec: ResponseSpec, n: int, seed: int = 0) -> torch.Tensor:
    """(n, T, H, W) a seeded random subset of the training clips (z-scored), in time order."""
    data = response_data(rec, spec)
    train = data.index["train"]
    pick = np.sort(np.random.default_rng(seed).choice(train, size=min(n, len(train)), replace=False))
    return torch.from_numpy(data.clips(pick))


def cell_types(rec: Recording, names: tuple[str, ...]) -> np.ndarray | None:
    """(U,) the ``cell_type`` column of the recording's units, in ``names`` order, or None."""
    column = rec.units.columns.get("cell_type")
    if column is None:
        return None
    index = {n: i for i, n in enumerate(rec.units.names)}
    return np.asarray([str(column[index[n]]) for n in names])


def type_scores(result: MDSResult, types: np.ndarray, ref_responses: np.ndarray, seed: int) -> dict:
    """ARI of MDS and of k-means (as many clusters) on tuned units; where the untuned units land."""
    tuned = types != UNTUNED
    baseline = kmeans(profiles(ref_responses), result.n_clusters, seed=seed)
    majority = majority_types(result.labels[tuned], types[tuned]) if tuned.any() else {}
    landed = np.bincount(result.labels[~tuned], minlength=result.n_clusters)
    return {
        "ari_tuned": adjusted_rand_index(result.labels[tuned], types[tuned]),
        "ari_tuned_kmeans": adjusted_rand_index(baseline[tuned], types[tuned]),
        "n_types": int(len(np.unique(types[tuned]))),
        "untuned_landed": {f"cluster {c} ({majority.get(c, 'no tuned unit')})": int(n)
                           for c, n in enumerate(landed) if n},
    }


def stimulus_grid(result: MDSResult, spec: ResponseSpec, majority: dict | None = None) -> Figure:
    """One row per cluster: its stimulus frames left to right, grey levels in the stimulus range."""
    k, t = result.stimuli.shape[:2]
    fig = Figure(figsize=(1.1 * t + 1.6, 1.1 * k + 0.6), layout="constrained")
    axes = fig.subplots(k, t, squeeze=False)
    sizes = np.bincount(result.labels, minlength=k)
    pixels = spec.to_pixels(result.stimuli)
    for c in range(k):
        for f in range(t):
            ax = axes[c, f]
            ax.imshow(pixels[c, f], cmap="gray", vmin=spec.frame_min, vmax=spec.frame_max)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(f"t-{t - 1 - f}" if f < t - 1 else "t", fontsize=8)
        label = f"{c}: {sizes[c]} units\nJ {result.objective[c]:.2f}"
        if majority and c in majority:
            label += f"\n{majority[c]}"
        axes[c, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"Most discriminative stimuli: {k} clusters (rows), frames left to right (t: the response's frame)",
                 fontsize=9)
    return fig


def run_mds(model: ResponseModel, spec: ResponseSpec, rec: Recording, out: str | Path, cfg: MDSConfig,
            n_reference: int = 1024) -> dict:
    """Cluster ``model``'s units by MDS on training clips of ``rec``; write the files of the module
    docstring into ``out``; returns the summary written to ``mds.json``."""
    if not isinstance(model, ResponseModel):
        raise ConfigError(f"MDS needs a model that predicts responses to stimuli (predict_responses); "
                          f"{type(model).__name__} does not (the Neuroformer does not; train experiment=twin)")
    began = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    reference = reference_clips(rec, spec, n_reference, cfg.seed).to(device)
    # A copy in eval mode, with receptive fields centred where the model can (Twin.centred).
    model = copy.deepcopy(model).eval()
    if cfg.centre and hasattr(model, "centred"):
        model = model.centred(reference[:64])
    result = mds(model, reference, cfg, bounds=spec.stimulus_range)
    ref_responses = respond(model, reference, Normalizer(torch.from_numpy(result.scale).to(device), cfg.normalize))
    types = cell_types(rec, spec.units)
    summary = {
        "settings": {**dataclasses.asdict(cfg), "n_reference": len(reference)},
        "n_clusters": result.n_clusters,
        "objective": result.objective.tolist(),
        "mean_J": float(result.objective.mean()),
        "cluster_sizes": np.bincount(result.labels, minlength=result.n_clusters).tolist(),
        "history": result.history,
    }
    majority = None
    if types is not None:
        summary.update(type_scores(result, types, ref_responses.cpu().numpy(), cfg.seed))
        tuned = types != UNTUNED
        majority = majority_types(result.labels[tuned], types[tuned]) if tuned.any() else None
    summary["seconds"] = time.perf_counter() - began

    rows = ["unit,cluster" + (",cell_type" if types is not None else "")]
    rows += [f"{name},{c}" + (f",{types[i]}" if types is not None else "")
             for i, (name, c) in enumerate(zip(spec.units, result.labels))]
    write_text(out / "assignments.csv", "\n".join(rows) + "\n")
    with atomic_path(out / "stimuli.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, spec.to_pixels(result.stimuli).astype(np.float32))
    plots.save(stimulus_grid(result, spec, majority), out / "stimuli.png")
    write_json(out / "mds.json", summary)
    return summary


def headline(summary: dict) -> str:
    """One line: clusters, mean J and, with known types, the ARIs."""
    line = f"MDS: {summary['n_clusters']} clusters, mean J {summary['mean_J']:.3f}"
    if "ari_tuned" in summary:
        line += (f", ARI on tuned units {summary['ari_tuned']:.3f} (k-means with as many clusters "
                 f"{summary['ari_tuned_kmeans']:.3f}; {summary['n_types']} true types)")
    return line


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m neuroformer.mds",
                        "Cluster a trained response model's units by their most discriminative stimuli "
                        "(Burg et al. 2024); writes stimuli.png, assignments.csv and mds.json.")
    parser.add_argument("--model", required=True,
                        help="checkpoint, sharded checkpoint folder, or models:/NAME/VERSION | models:/NAME@ALIAS")
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/mds/<date>)")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE,
                        help="local MLflow store used when MLFLOW_TRACKING_URI is unset")
    parser.add_argument("--n-reference", type=int, default=1024, help="training clips used as reference stimuli")
    cli.add_options(parser, MDSConfig)
    return parser


def _main(args: argparse.Namespace) -> int:
    loaded = load(args.model, store=args.store)
    if not isinstance(loaded.spec, ResponseSpec):
        raise ConfigError(f"{args.model}: a {loaded.family} model; MDS needs a model that predicts responses "
                          "to stimulus clips (predict_responses), e.g. one trained with experiment=twin")
    out = args.out or Path("outputs/mds") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    summary = run_mds(loaded.model, loaded.spec, training_recording(loaded), out, cli.options(args, MDSConfig),
                      args.n_reference)
    print(f"{headline(summary)}\nWrote {out} (stimuli.png, assignments.csv, mds.json) in {summary['seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m neuroformer.mds``."""
    return cli.run(_main, _parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
