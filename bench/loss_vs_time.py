"""Held-out loss against wall time for two or more model designs on the default recording.

A faster step is only a gain if the model learns as well per second. This bench starts one
``python train.py`` per design *at the same time*, each on one thread, so whatever else runs on
the machine slows them alike; it then reads each run's validation history from MLflow (every
value is timestamped) and prints, per design: steps/s, the validation loss (ID + dt
cross-entropy) it reached at the wall times of the others' validations (interpolated), its
final test metrics, and a plot ``loss_vs_time.png``.

Usage (the original design against the default one):
  python bench/loss_vs_time.py --out outputs/bench/loss_vs_time \\
      --design "tokens=model.n_latents=0 model.n_context_layer=1 model.past_direct=false" \\
      --design latents+past=
Each ``--design NAME=OVERRIDES`` names a design and its Hydra overrides (space separated);
``--common`` overrides apply to every run (default: no evaluation, no registration).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib
import mlflow
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMON = "evaluate=null registry.register=false ++trainer.val_check_interval=0.25"


def history(metrics: dict, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(wall seconds since the run started, step, value) of a logged metric, in time order."""
    client = mlflow.MlflowClient(metrics["mlflow_tracking_uri"])
    run = client.get_run(metrics["mlflow_run_id"])
    points = sorted((m.timestamp, m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
    t, step, value = (np.array(column) for column in zip(*points))
    return (t - run.info.start_time) / 1000.0, step, value


def validation_loss(metrics: dict) -> tuple[np.ndarray, np.ndarray]:
    """(wall seconds, validation ID + dt cross-entropy, nats/token) at every validation."""
    t, _, id_ce = history(metrics, "val/id_ce")
    _, _, dt_ce = history(metrics, "val/dt_ce")
    return t, id_ce + dt_ce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--design", action="append", required=True, help="NAME=OVERRIDES")
    parser.add_argument("--common", default=COMMON, help="overrides for every run")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "loss_vs_time")
    args = parser.parse_args()
    designs = dict(d.split("=", 1) for d in args.design)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    for name, overrides in designs.items():
        run_dir = args.out / name
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "train.py", *shlex.split(args.common), *shlex.split(overrides),
               f"hydra.run.dir={run_dir}", f"paths.output_root={run_dir / 'outputs'}",  # its own MLflow store
               f"paths.data_dir={ROOT / 'outputs' / 'data'}"]  # the recording, simulated once and shared
        print("$", shlex.join(cmd), flush=True)
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(run_dir / "stdout.log", "w"),
                                       stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        if proc.wait():
            sys.exit(f"{name} failed (exit {proc.returncode}): see {args.out / name / 'stdout.log'}")

    metrics = {name: json.loads((args.out / name / "metrics.json").read_text()) for name in designs}
    curves = {name: validation_loss(m) for name, m in metrics.items()}
    width = max(len(name) for name in designs)
    print(f"\n{'design':<{width}} {'wall s':>7} {'steps/s':>7} {'test id_ce':>10} {'test dt_ce':>10}  "
          "val loss at the others' validation times")
    for name, m in metrics.items():
        t, loss = curves[name]
        _, steps, _ = history(m, "train/loss_step")
        wall = t[-1]
        at_others = []
        for other, (t_o, loss_o) in curves.items():
            if other != name:
                common = t_o[t_o <= wall]
                if len(common):
                    ours = np.interp(common, t, loss)
                    at_others.append(f"vs {other}: {np.mean(ours - loss_o[: len(common)]):+.4f} mean over "
                                     f"{len(common)} times (<0: ours lower)")
        print(f"{name:<{width}} {wall:>7.0f} {steps.max() / wall:>7.2f} "
              f"{m.get('test/id_ce', float('nan')):>10.4f} {m.get('test/dt_ce', float('nan')):>10.4f}  "
              + "; ".join(at_others))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (t, loss) in curves.items():
        ax.plot(t / 60, loss, marker="o", label=name)
    ax.set(xlabel="wall time (min, one thread each, run side by side)", ylabel="validation ID + dt CE (nats/token)",
           title="Held-out loss against wall time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "loss_vs_time.png", dpi=120)
    print(f"\nplot: {args.out / 'loss_vs_time.png'}")


if __name__ == "__main__":
    main()
