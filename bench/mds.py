"""Evidence for MDS clustering (docs/mds.md): does it recover the simulated functional types?

For each population (``default``: ON, OFF, DS, untuned; ``rich``: ON/OFF x sustained/transient,
DS x 4 directions, untuned) it

1. trains a digital twin with ``python train.py experiment=twin`` (unless ``--no-run``; the
   run folder is ``OUT/<population>``) and loads its best checkpoint with ``registry.load``;
2. draws, per MDS seed, 75% of the units to cluster and holds out the rest;
3. runs MDS (``neuroformer.inference.mds``, default settings, ``--n-clusters`` to start) on the
   twin's centred view of the clustered units, and k-means on the same units' (normalised,
   z-scored) responses to the training clips, with the true number of types (a strong
   baseline: it is told K) and with MDS's recovered number;
4. scores the adjusted Rand index on the tuned units against the true types (and, for the
   default population, against DS split by preferred direction, the functional subtypes),
   and says where the untuned units land;
5. types the held-out units *online*: each MDS stimulus is shown (moved to the unit's
   receptive-field centre, estimated by the twin) to the simulated unit itself (its true
   linear-nonlinear rate, Poisson counts over ``--repeats`` presentations), the unit goes to
   the cluster whose stimulus drives it most, and takes that cluster's majority type; the
   accuracy is next to the majority-type rate (chance);
6. times MDS and its scaling with units and starting clusters (default twin).

``--members N`` trains N twins per population (seeds differ, the split does not) and clusters on
their ``TwinEnsemble``, the mean of their predictions.

``--true-model`` replaces the twin by the simulation's own units (``TrueModel``, receptive
fields centred at their energy's centre of mass): what MDS reaches with a perfect model. Its
untuned units respond alike to every stimulus, so they are left out of the clustering (any
assignment of theirs would be a tie).

Prints the tables (mean and standard deviation over MDS seeds) and writes ``OUT/mds_bench<tag>.json``.

Usage:
    OMP_NUM_THREADS=1 python bench/mds.py [--out DIR] [--seeds 0 1 2] [--no-run] [--no-scaling]
        [--twin OVERRIDE ...] [--mds FIELD=VALUE ...] [--members N] [--true-model] [--tag SUFFIX]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from neuroformer.data.recording import Recording
from neuroformer.data.responses import ResponseSpec, response_data
from neuroformer.data.simulate import read_config, session_inputs
from neuroformer.inference.mds import MDSConfig, Normalizer, kmeans, mds, profiles, respond
from neuroformer.mds import UNTUNED, cell_types, reference_clips
from neuroformer.metrics.clustering import adjusted_rand_index, majority_types
from neuroformer.models.twin import TwinEnsemble
from neuroformer.registry import load

ROOT = Path(__file__).resolve().parents[1]


class UnitSubset(nn.Module):
    """A response model restricted to some of its units: ``predict_responses`` -> (B, len(index))."""

    def __init__(self, model: nn.Module, index: np.ndarray):
        super().__init__()
        self.model, self.index = model, torch.as_tensor(index)

    def predict_responses(self, stimulus: torch.Tensor) -> torch.Tensor:
        return self.model.predict_responses(stimulus)[:, self.index]


class TrueModel(nn.Module):
    """The simulation's own linear-nonlinear units as a response model, every receptive field
    moved to the middle of the frame: MDS with a perfect, centred twin (the algorithm's ceiling).

    ``predict_responses`` takes the twin's z-scored clips and returns expected counts per
    response window, ``exp(baseline + drive)``, without running or synaptic input.
    """

    def __init__(self, rec: Recording, spec: ResponseSpec):
        super().__init__()
        pop = session_inputs(read_config(rec.path)).population
        lags, hw, n = pop.filters.shape
        h, w = spec.frame_shape
        filters = pop.filters.transpose(2, 0, 1).reshape(n, lags, h, w)
        # A field's centre is the centre of mass of its energy over lags and space: the middle of
        # a drifting Gabor's envelope, where the peak of |filter| would pick one of its lobes.
        energy = np.square(filters).sum(1)  # (N, H, W)
        grid = np.stack(np.mgrid[0:h, 0:w])  # (2, H, W)
        mass = np.einsum("nhw,chw->nc", energy, grid) / np.maximum(energy.sum((1, 2)), 1e-12)[:, None]
        self.centres = np.rint(mass).astype(int)  # (N, 2) true receptive-field centres
        rows, cols = self.centres.T
        moved = [np.roll(f, (h // 2 - r, w // 2 - c), axis=(1, 2)) for f, r, c in zip(filters, rows, cols)]
        self.register_buffer("filters", torch.from_numpy(np.stack(moved)).float())  # (N, L, H, W), lag 0 first
        self.register_buffer("log_baseline", torch.from_numpy(pop.log_baseline).float())
        self.spec, self.scale = spec, rec.stimulus.scale

    def predict_responses(self, stimulus: torch.Tensor) -> torch.Tensor:
        contrast = ((stimulus * self.spec.frame_std + self.spec.frame_mean) / self.scale - 128.0) / 128.0
        lags = min(stimulus.shape[1], self.filters.shape[1])
        recent = contrast[:, -lags:].flip(1)  # (B, lags, H, W), the current frame first
        drive = torch.einsum("blhw,nlhw->bn", recent, self.filters[:, :lags])
        return torch.exp(self.log_baseline + drive) * self.spec.response_window


def train_twin(out: Path, population: str, max_epochs: int, overrides: list[str]) -> Path:
    """Train the twin of ``population`` into ``out`` (with extra Hydra ``overrides``); returns its best checkpoint."""
    cmd = [sys.executable, "train.py", "experiment=twin", f"data.simulate.population={population}",
           f"trainer.max_epochs={max_epochs}", *overrides,
           "logger=none", "registry.register=false", f"paths.output_root={out}", f"hydra.run.dir={out}/run"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return Path(json.loads((out / "run" / "metrics.json").read_text())["best_checkpoint"])


def subtypes(rec: Recording, spec: ResponseSpec, types: np.ndarray) -> np.ndarray:
    """Types with DS split by preferred direction (``DS-<degrees>``): the functional subtypes."""
    column = rec.units.columns["preferred_direction"]
    index = {n: i for i, n in enumerate(rec.units.names)}
    direction = np.array([float(column[index[n]]) for n in spec.units])
    return np.array([f"DS-{d:g}" if t == "DS" else t for t, d in zip(types, direction)])


def shown_to_cells(stimuli: np.ndarray, rec: Recording, spec: ResponseSpec, units: np.ndarray,
                   centres: np.ndarray, repeats: int, rng: np.random.Generator) -> np.ndarray:
    """(K, len(units)) Poisson counts (summed over ``repeats``) of simulated units shown each stimulus.

    Args:
        stimuli: (K, T, H, W) z-scored stimuli, centred on the frame's middle pixel.
        units: indices into ``spec.units`` (= rows of the simulation's Units table).
        centres: (len(units), 2) receptive-field centre (row, column) of each unit: the stimulus
            is moved there before it is shown.
    """
    config = read_config(rec.path)
    pop = session_inputs(config).population
    grey = spec.to_pixels(stimuli) / rec.stimulus.scale  # the file's grey levels (the reader scales them)
    x = (grey - 128.0) / 128.0  # the simulator's contrast units
    k, t, h, w = x.shape
    middle = np.array([h // 2, w // 2])
    lags = min(t, len(pop.filters))
    counts = np.zeros((k, len(units)))
    for j, (u, c) in enumerate(zip(units, centres)):
        dy, dx = (np.asarray(c) - middle).astype(int)
        moved = np.roll(x, (dy, dx), axis=(2, 3)).reshape(k, t, -1)
        drive = sum(moved[:, t - 1 - lag] @ pop.filters[lag][:, u] for lag in range(lags))
        rate = np.minimum(np.exp(pop.log_baseline[u] + drive), config.max_rate) * spec.response_window
        counts[:, j] = rng.poisson(rate * repeats)
    return counts


def evaluate_population(checkpoints: list[Path], seeds: list[int], n_clusters: int, repeats: int,
                        settings: dict, true_model: bool = False) -> list[dict]:
    """Rows of scores per MDS seed (module docstring); several ``checkpoints``: MDS on their
    ``TwinEnsemble``; ``true_model``: MDS on ``TrueModel``."""
    loaded = load(checkpoints[0])
    spec: ResponseSpec = loaded.spec
    rec = spec.source.read()
    types = cell_types(rec, spec.units)
    fine = subtypes(rec, spec, types) if "DS" in set(types) else types
    reference = reference_clips(rec, spec, 1024)
    if true_model:
        centred = TrueModel(rec, spec)
        centres = centred.centres
    else:
        model = loaded.model.eval()
        if len(checkpoints) > 1:
            model = TwinEnsemble([model] + [load(c).model.eval() for c in checkpoints[1:]])
        centred = model.centred(reference[:64])
        centres = model.field_centres(reference[:64]).round().long().numpy()
    data = response_data(rec, spec)
    mean_count = data.counts[data.index["train"]].mean(0)  # (U,) per response window
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        order = rng.permutation(spec.n_units)
        clustered, held = np.sort(order[: round(0.75 * spec.n_units)]), np.sort(order[round(0.75 * spec.n_units):])
        if true_model:  # a perfect model's untuned units respond alike to everything: every stimulus ties
            clustered = clustered[types[clustered] != UNTUNED]
        sub = UnitSubset(centred, clustered)
        cfg = MDSConfig(n_clusters=n_clusters, seed=seed, **settings)
        began = time.perf_counter()
        result = mds(sub, reference, cfg, bounds=spec.stimulus_range)
        seconds = time.perf_counter() - began
        t, f = types[clustered], fine[clustered]
        tuned = t != UNTUNED
        # The centre-surround types (ON, OFF and their sustained/transient variants) are the well
        # separated ones; DS units of one direction differ in spatial and temporal frequency.
        surround = np.array([name.startswith(("ON", "OFF")) for name in t])
        feats = profiles(respond(sub, reference, Normalizer(torch.from_numpy(result.scale), cfg.normalize)).numpy())
        n_true = len(np.unique(t[tuned]))
        km_true = kmeans(feats, n_true + int((~tuned).any()), seed=seed)  # + 1: the untuned
        km_same = kmeans(feats, result.n_clusters, seed=seed)
        majority = majority_types(result.labels[tuned], t[tuned])
        landed = {majority.get(c, "untuned-only cluster"): 0 for c in result.labels[~tuned]}
        for c in result.labels[~tuned]:
            landed[majority.get(c, "untuned-only cluster")] += 1

        # Online typing of the held-out units from their responses to the MDS stimuli alone.
        counts = shown_to_cells(result.stimuli, rec, spec, held, centres[held], repeats, rng)
        normalizer = Normalizer(torch.from_numpy(mean_count[held] * repeats), cfg.normalize)
        assigned = normalizer(torch.from_numpy(counts)).argmax(0).numpy()
        predicted = np.array([majority.get(c, UNTUNED) for c in assigned])
        held_tuned = types[held] != UNTUNED
        values, freq = np.unique(t[tuned], return_counts=True)
        rows.append({
            "seed": seed, "n_clusters": result.n_clusters, "seconds": seconds, "iterations": len(result.history),
            "ari_mds": adjusted_rand_index(result.labels[tuned], t[tuned]),
            "ari_kmeans_true_k": adjusted_rand_index(km_true[tuned], t[tuned]),
            "ari_kmeans_same_k": adjusted_rand_index(km_same[tuned], t[tuned]),
            "ari_mds_subtypes": adjusted_rand_index(result.labels[tuned], f[tuned]),
            "ari_kmeans_true_k_subtypes": adjusted_rand_index(
                kmeans(feats, len(np.unique(f[tuned])) + int((~tuned).any()), seed=seed)[tuned], f[tuned]),
            "ari_mds_centre_surround": adjusted_rand_index(result.labels[surround], t[surround]),
            "ari_kmeans_true_k_centre_surround": adjusted_rand_index(km_true[surround], t[surround]),
            "online_accuracy": float(np.mean(predicted[held_tuned] == types[held][held_tuned])),
            "online_chance": float(freq.max() / freq.sum()),
            "untuned_landed": landed, "n_clustered": len(clustered), "n_held_out": len(held),
            "n_true_types": n_true,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def scaling(checkpoint: Path, units: list[int], clusters: list[int]) -> list[dict]:
    """Seconds of one MDS run versus units clustered and starting clusters."""
    loaded = load(checkpoint)
    spec = loaded.spec
    rec = spec.source.read()
    reference = reference_clips(rec, spec, 1024)
    centred = loaded.model.eval().centred(reference[:64])
    rows = []
    for n in units:
        for k in clusters:
            sub = UnitSubset(centred, np.arange(n))
            began = time.perf_counter()
            result = mds(sub, reference, MDSConfig(n_clusters=k), bounds=spec.stimulus_range)
            rows.append({"units": n, "start_clusters": k, "seconds": time.perf_counter() - began,
                         "iterations": len(result.history), "n_clusters": result.n_clusters})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def mds_settings(pairs: list[str]) -> dict:
    """``["steps=100", ...]`` -> ``{"steps": 100, ...}``, each value cast to its ``MDSConfig`` field's type."""
    defaults = MDSConfig()
    settings = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not hasattr(defaults, name):
            raise ValueError(f"--mds: MDSConfig has no field {name!r}")
        kind = type(getattr(defaults, name))
        try:
            settings[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"--mds {pair}: {name} must be a {kind.__name__}") from None
    return settings


def _summary(rows: list[dict], key: str) -> str:
    v = np.array([r[key] for r in rows], float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_mds")
    p.add_argument("--populations", nargs="+", default=["default", "rich"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-clusters", nargs="+", type=int, default=[12, 16], help="start, per population")
    p.add_argument("--repeats", type=int, default=10, help="presentations of each MDS stimulus to held-out units")
    p.add_argument("--no-run", action="store_true", help="reuse the trained twins in OUT")
    p.add_argument("--max-epochs", type=int, default=8, help="twin training epochs (experiment=twin: 8)")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--twin", nargs="*", default=[], metavar="OVERRIDE",
                   help="Hydra overrides of the twin's training run, e.g. model.readout=mask")
    p.add_argument("--mds", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="MDSConfig settings, e.g. min_separation=0.1 steps=100")
    p.add_argument("--tag", default="", help="suffix of the results file (mds_bench<tag>.json)")
    p.add_argument("--members", type=int, default=1,
                   help="twins per population: more than 1 clusters on their TwinEnsemble (member i > 0 is "
                        "trained with seed=i on the first twin's split, in OUT/<population>/member<i>)")
    p.add_argument("--true-model", action="store_true",
                   help="run MDS on the simulation's own (centred) units instead of the twin: the ceiling")
    args = p.parse_args()
    try:
        settings = mds_settings(args.mds)
    except ValueError as e:
        p.error(str(e))  # one line, exit status 2
    split_seed = OmegaConf.load(ROOT / "conf" / "train.yaml").seed  # the first twin's (data.split.seed: ${seed})
    torch.set_num_threads(1)
    results: dict = {}
    for population, k in zip(args.populations, args.n_clusters):
        outs = [args.out / population] + [args.out / population / f"member{i}" for i in range(1, args.members)]
        checkpoints = [Path(json.loads((out / "run" / "metrics.json").read_text())["best_checkpoint"]) if args.no_run
                       else train_twin(out, population, args.max_epochs,
                                       [*args.twin, *([f"seed={i}", f"data.split.seed={split_seed}"] if i else [])])
                       for i, out in enumerate(outs)]
        twins = [json.loads((out / "run" / "metrics.json").read_text()) for out in outs]
        results[population] = {"twin": {key: twins[0][key] for key in twins[0] if key.startswith("test/")},
                               "members_bits_per_spike": [t["test/bits_per_spike"] for t in twins],
                               "start_clusters": k, "rows": evaluate_population(
            checkpoints, args.seeds, k, args.repeats, settings, args.true_model)}
        if population == "default" and not args.no_scaling:
            results["scaling"] = scaling(checkpoints[0], [30, 60, 90], [6, 12, 24])
    (args.out / f"mds_bench{args.tag}.json").write_text(json.dumps(results, indent=1))

    print("\n| population | twin bits/spike (oracle) | start K | recovered K | ARI MDS | ARI k-means (true K) "
          "| ARI k-means (MDS's K) | online typing acc. (chance) | MDS s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for population in args.populations:
        r, twin = results[population]["rows"], results[population]["twin"]
        print(f"| {population} | {twin['test/bits_per_spike']:.3f} ({twin.get('test/bits_per_spike_oracle', np.nan):.3f}) "
              f"| {results[population]['start_clusters']} | {_summary(r, 'n_clusters')} | {_summary(r, 'ari_mds')} "
              f"| {_summary(r, 'ari_kmeans_true_k')} | {_summary(r, 'ari_kmeans_same_k')} "
              f"| {_summary(r, 'online_accuracy')} ({_summary(r, 'online_chance')}) | {_summary(r, 'seconds')} |")
    if "default" in results:
        r = results["default"]["rows"]
        print(f"\ndefault population, DS split by preferred direction: ARI MDS {_summary(r, 'ari_mds_subtypes')}, "
              f"k-means (true K) {_summary(r, 'ari_kmeans_true_k_subtypes')}")
    for population in args.populations:
        r = results[population]["rows"]
        print(f"{population} population, centre-surround units only: ARI MDS {_summary(r, 'ari_mds_centre_surround')}, "
              f"k-means (true K) {_summary(r, 'ari_kmeans_true_k_centre_surround')}")
    for population in args.populations:
        print(f"untuned units landed ({population}):", [row["untuned_landed"] for row in results[population]["rows"]])
    if "scaling" in results:
        print("\n| units | start K | seconds | iterations | recovered K |\n|---|---|---|---|---|")
        for row in results["scaling"]:
            print(f"| {row['units']} | {row['start_clusters']} | {row['seconds']:.1f} | {row['iterations']} "
                  f"| {row['n_clusters']} |")


if __name__ == "__main__":
    main()
