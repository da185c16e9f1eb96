"""Evidence for the sparse-data RNN (docs/sparse_rnn.md): metrics versus recorded fraction, over seeds.

Runs (unless ``--no-run``) the Hydra multirun

    OMP_NUM_THREADS=1 python train.py -m experiment=sparse_rnn data.record_fraction=0,0.02,0.05,0.1,0.2 \\
        seed=0,1,2 paths.output_root=OUT hydra.sweep.dir=OUT/sweep

(each seed draws its own recorded neurons, validation trials and initialisation; fraction 0 is
the output-only baseline), then reads every run folder under ``OUT/sweep`` (``metrics.json``,
``evaluation/metrics.json``, ``.hydra/config.yaml``) and prints, per fraction, the mean and the
standard deviation over seeds of:

- output R^2 on the held-out conditions, beside the nearest-training-condition baseline and the
  noise ceiling (the same trials for every run);
- CCA and CKA similarity of the student's condition-averaged dynamics to the full reference
  population (from the go cue on), beside an untrained random RNN (the floor);
- cross-validated R^2 of the never-recorded reference neurons from the student's units, beside
  the untrained RNN.

It saves the metrics-versus-fraction plot as ``OUT/sparse_rnn_metrics.png`` and gives the
run with the best held-out output R^2 the MLflow alias ``best``.

Usage:
    python bench/sparse_rnn_sweep.py [--out DIR] [--fractions 0 0.02 ...] [--seeds 0 1 2] [--no-run]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import yaml
from matplotlib.figure import Figure

from neuroformer import plots
from neuroformer.registry.tracking import tracking_uri

ROOT = Path(__file__).resolve().parents[1]
# (label, key in the run's metrics, key of its floor or baseline, key of its ceiling)
COLUMNS = [
    ("output R^2 (held-out conditions)", "output_r2", "output_r2_nearest_condition", "output_r2_ceiling"),
    ("dynamics CCA", "dynamics_cca", "dynamics_cca_random", None),
    ("dynamics CKA", "dynamics_cka", "dynamics_cka_random", None),
    ("unrecorded-neuron R^2", "unrecorded_r2", "unrecorded_r2_random", None),
]


def sweep(out: Path, fractions: list[float], seeds: list[int]) -> None:
    cmd = [sys.executable, "train.py", "-m", "experiment=sparse_rnn",
           "data.record_fraction=" + ",".join(f"{f:g}" for f in fractions), "seed=" + ",".join(map(str, seeds)),
           f"paths.output_root={out}", f"hydra.sweep.dir={out / 'sweep'}"]
    # One BLAS/OpenMP thread per run: the RNN's and the metrics' matrices are small, and on a busy
    # machine extra threads only wait on each other (tens of times slower).
    print("$ OMP_NUM_THREADS=1 " + " ".join(cmd), flush=True)
    began = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"sweep done in {time.perf_counter() - began:.0f} s", flush=True)


def read_runs(folder: Path) -> list[dict]:
    """One dict per finished run: fraction, seed, its metrics (test/ prefix dropped), evaluation."""
    runs = []
    for metrics_file in sorted(folder.glob("*/metrics.json")):
        run = metrics_file.parent
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        metrics = json.loads(metrics_file.read_text())
        evaluation = json.loads((run / "evaluation" / "metrics.json").read_text())["metrics"]
        runs.append({"fraction": float(config["data"]["record_fraction"]), "seed": int(config["seed"]),
                     "model_uri": metrics.get("model_uri"), "tracking": metrics.get("mlflow_tracking_uri"),
                     **{k.removeprefix("test/"): v for k, v in metrics.items() if isinstance(v, float)},
                     **evaluation})
    return runs


def table(runs: list[dict]) -> tuple[str, dict]:
    """Markdown table (mean ± sd over seeds) and {fraction: {key: (mean, sd)}}."""
    by_fraction: dict[float, dict] = {}
    for f in sorted({r["fraction"] for r in runs}):
        chosen = [r for r in runs if r["fraction"] == f]
        keys = {k for _, *ks in COLUMNS for k in ks if k} | {"n_recorded"}
        by_fraction[f] = {k: (float(np.mean([r[k] for r in chosen])), float(np.std([r[k] for r in chosen], ddof=1))
                              if len(chosen) > 1 else float("nan")) for k in keys}
        by_fraction[f]["seeds"] = len(chosen)
    head = ["recorded (fraction, neurons)", "seeds"] + [f"{label} [floor]" for label, *_ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f, s in by_fraction.items():
        cells = [f"{f:g} ({s['n_recorded'][0]:.0f})", str(s["seeds"])]
        for _, key, floor, _ in COLUMNS:
            cells.append(f"{s[key][0]:.3f} ± {s[key][1]:.3f} [{s[floor][0]:.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    ceiling = np.mean([r["output_r2_ceiling"] for r in runs])
    lines.append(f"\nOutput R^2 ceiling (each held-out trial predicted by the mean of its condition's other "
                 f"trials): {ceiling:.3f}. Floors: output R^2, the nearest training condition's mean output; "
                 f"the others, an untrained RNN of the same architecture.")
    return "\n".join(lines), by_fraction


def figure(by_fraction: dict) -> Figure:
    fractions = np.array(sorted(by_fraction))
    fig = Figure(figsize=(4 * len(COLUMNS), 3.6), layout="constrained")
    for ax, (label, key, floor, ceiling) in zip(fig.subplots(1, len(COLUMNS)), COLUMNS):
        mean = np.array([by_fraction[f][key][0] for f in fractions])
        sd = np.array([by_fraction[f][key][1] for f in fractions])
        ax.errorbar(fractions, mean, yerr=sd, color=plots.MODEL_COLOR, marker="o", capsize=3, label="student")
        ax.plot(fractions, [by_fraction[f][floor][0] for f in fractions], color="0.5", ls="--",
                label="untrained RNN" if floor.endswith("random") else "nearest condition")
        if ceiling:
            ax.plot(fractions, [by_fraction[f][ceiling][0] for f in fractions], color="k", ls=":", label="ceiling")
        ax.set_xlabel("fraction of neurons recorded")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Sparse-data RNN students vs recorded fraction (mean ± sd over seeds; 0 = output only)")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_sparse_rnn")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-run", action="store_true", help="only read the runs already in OUT/sweep")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.no_run:
        sweep(out, args.fractions, args.seeds)
    runs = read_runs(out / "sweep")
    if not runs:
        raise SystemExit(f"no finished runs under {out / 'sweep'}")
    text, by_fraction = table(runs)
    print(text)
    print(f"plot: {plots.save(figure(by_fraction), out / 'sparse_rnn_metrics.png')}")
    best = max((r for r in runs if r["model_uri"]), key=lambda r: r["output_r2"], default=None)
    if best is not None:
        name, version = best["model_uri"].removeprefix("models:/").split("/")
        mlflow.set_tracking_uri(best["tracking"] or tracking_uri(out / "mlflow.db"))
        mlflow.MlflowClient().set_registered_model_alias(name, "best", version)
        print(f"best held-out output R^2 {best['output_r2']:.3f}: {best['model_uri']} (fraction {best['fraction']:g}, "
              f"seed {best['seed']}) is now models:/{name}@best")


if __name__ == "__main__":
    main()
