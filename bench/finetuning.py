"""Evidence for fine-tuning (docs/finetuning.md): few-shot behaviour decoding and multi-session transfer.

Every model is trained by the user-facing command line (``python train.py ...``, printed before
it runs); each run's folder holds its ``metrics.json`` and log, and a run whose metrics exist
is not repeated, so an interrupted benchmark resumes where it stopped.

``few-shot``: on one simulated session (``python -m neuroformer.data.simulate``),

1. pretrain without running speed as an input (``experiment=pretrain_no_behavior``) on the
   whole training block (spikes and stimulus only: no labels needed);
2. for each training fraction and seed, fine-tune the registered model to predict running
   speed from a random ``fraction`` of the training windows (``experiment=finetune_speed``:
   head first, then everything), and train the same architecture on the same windows from
   scratch; for the first seed also the pretrained model with its backbone frozen throughout,
   and the from-scratch model tested at its best validation checkpoint (see ``variants``);
3. decode speed linearly (ridge) from the same windows' per-unit spike counts, from the frozen
   pretrained model's window features, and from an untrained model's (``linear_decoders``):
   what the representation holds, independently of fine-tuning.

Prints test R^2 and Pearson r (the test block, the same for all) per fraction and variant.

``multi-session``: simulate three sessions with different units (different seeds), pretrain
one model on the first two, then fit the third from a random ``fraction`` of its training
windows: the pretrained model with its vocabulary extended (``experiment=multi_session``: new
unit rows first, then everything; or the new rows alone) versus the same architecture from
scratch. Prints the test ID cross-entropy on the third session's test block, and the unigram
baseline (each unit's training frequency).

Usage:
    python bench/finetuning.py few-shot [--fractions 0.01 0.1 1] [--seeds 0 1] [--out DIR]
    python bench/finetuning.py multi-session [--fractions 0.05 0.1 0.2] [--seeds 0] [--out DIR]
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
import torch

from neuroformer import registry
from neuroformer.data.datamodule import NWBDataModule, few_shot_windows
from neuroformer.data.splits import SplitSpec
from neuroformer.data.targets import BehaviorTarget
from neuroformer.metrics.behavior import behavior_scores
from neuroformer.models.heads import window_features
from neuroformer.models.neuroformer import Neuroformer
from neuroformer.registry.tracking import tracking_uri

ROOT = Path(__file__).resolve().parents[1]
SPLIT_SEED = 42  # one time-block split for every run: seeds vary the training, not the test block
QUIET = ["logger=none", "~callbacks.lr_monitor"]  # fine-tuning runs: metrics.json only, no MLflow run
NAMES = ["pretrained", "scratch", "pretrained_frozen", "pretrained_all", "pretrained_full_lr", "pretrained_best",
         "scratch_best"]


def simulate(path: Path, seed: int, extra: list[str]) -> Path:
    if not path.exists():
        run([sys.executable, "-m", "neuroformer.data.simulate", "--out", str(path), "--seed", str(seed),
             "--quiet", *extra])
    return path


def run(cmd: list[str], log_file: Path | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    began = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(out.stdout + out.stderr)
    if out.returncode:
        raise SystemExit(f"command failed ({out.returncode}):\n{out.stderr[-3000:]}")
    print(f"  done in {time.perf_counter() - began:.0f} s", flush=True)


def train(out: Path, name: str, overrides: list[str]) -> dict:
    """Run ``train.py`` with its run folder at ``out/runs/name`` (skipped if already done)."""
    folder = out / "runs" / name
    metrics = folder / "metrics.json"
    if not metrics.exists():
        run([sys.executable, "train.py", *overrides, f"paths.output_root={out}", f"hydra.run.dir={folder}",
             f"data.split.seed={SPLIT_SEED}"], folder / "stdout.log")
    return json.loads(metrics.read_text())


def data_module(path: Path, fraction: float) -> NWBDataModule:
    """The windows the runs at this fraction see (spikes only; for counting them)."""
    dm = NWBDataModule(paths=[str(path)], n_frames=0, behavior=[], split=SplitSpec(seed=SPLIT_SEED),
                       train_fraction=fraction)
    dm.setup()
    return dm


def ridge_r2(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, alpha: float) -> float:
    """Test R^2 of ridge regression (features standardised on the training rows, intercept unpenalised)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    design = lambda z: np.c_[(z - mu) / sd, np.ones(len(z))]  # noqa: E731
    penalty = alpha * np.eye(x.shape[1] + 1)
    penalty[-1, -1] = 0.0
    w = np.linalg.solve(design(x).T @ design(x) + penalty, design(x).T @ y)
    return behavior_scores(design(x_test) @ w, y_test)["r2/0"]


def linear_decoders(path: Path, out: Path, uri: str, fractions: list[float], alpha: float) -> dict[float, dict]:
    """Linear read-outs of speed from the same windows, per fraction: why pretraining helps or not.

    Three feature sets of each window, each decoded by ridge regression from a ``fraction`` of
    the training windows (exactly the windows ``data.train_fraction`` keeps):
    ``counts``: per-unit spike counts over past + current window (the span the model sees);
    ``pretrained``: the frozen pretrained model's pooled window features (``window_features``);
    ``random``: the same features from an untrained model of the same architecture (a control).

    Returns {fraction: {windows, seconds, speed_mean, speed_sd, running, counts, pretrained, random}},
    plus the test block's speed statistics under the key ``"test"``.
    """
    mlflow.set_tracking_uri(tracking_uri(out / "mlflow.db"))
    loaded = registry.load(uri)
    dm = NWBDataModule(paths=[str(path)], reference=loaded.spec, split=SplitSpec(seed=SPLIT_SEED),
                       target=BehaviorTarget(names=["running_speed"]), batch_size=128)
    dm.setup()
    rec, tok = dm.recordings[0], dm.tokenizer
    torch.manual_seed(0)
    models = {"pretrained": loaded.model.eval(), "random": Neuroformer(loaded.model.config).eval()}

    def features(split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ds = dm.datasets[split]
        lo = np.searchsorted(rec.units.spike_times, ds.t0 - tok.past_window)
        hi = np.searchsorted(rec.units.spike_times, ds.t0 + tok.window)
        feats = {"counts": np.stack([np.bincount(rec.units.spike_units[a:b], minlength=rec.units.n_units)
                                     for a, b in zip(lo, hi)]).astype(float)}
        with torch.no_grad():
            batches = [ds.__getitems__(list(range(i, min(i + 128, len(ds))))) for i in range(0, len(ds), 128)]
            for name, model in models.items():
                feats[name] = np.concatenate([window_features(model, b.inputs)[1].numpy() for b in batches])
        return feats, dm.spec.target.raw(rec, ds.t0, tok.window)[:, 0]

    (train_x, train_y), (test_x, test_y) = features("train"), features("test")
    result: dict = {"test": (test_y.mean(), test_y.std(), (test_y > 1.0).mean())}
    for fraction in fractions:
        keep = np.isin(dm.datasets["train"].t0, few_shot_windows(dm.datasets["train"].t0, fraction, SPLIT_SEED))
        k, y = int(keep.sum()), train_y[keep]
        result[fraction] = {"windows": k, "seconds": k * dm.train_stride, "speed_mean": y.mean(),
                            "speed_sd": y.std(), "running": (y > 1.0).mean()}
        for name, x in train_x.items():
            result[fraction][name] = ridge_r2(x[keep], y, test_x[name], test_y, alpha)
    return result


def variants(uri: str, val_metric: str, mode: str, frozen: list[str]) -> dict[str, tuple[list[str], bool]]:
    """Ways to learn from the same windows: {name: (overrides, run for every seed or the first only)}.

    ``pretrained`` follows the experiment's stages; ``pretrained_frozen`` trains only ``frozen``
    (the head, or the new units' rows) and never the rest; ``pretrained_all`` trains everything
    from the first step at the full learning rate, like ``scratch``; ``pretrained_full_lr`` follows the
    experiment's stages but trains the backbone at the head's full learning rate. The ``_best`` variants test the
    checkpoint with the best validation score (every 100 steps) instead of the last: early stopping
    on the whole validation block, more held-out data than a few-shot user has; it shows how much
    of a gap is overfitting of the fixed step budget.
    """
    best = [f"callbacks.model_checkpoint.monitor={val_metric}", f"callbacks.model_checkpoint.mode={mode}"]
    pretrained = f"task.pretrained={uri}"
    return {"pretrained": ([pretrained], True), "scratch": ([], True),
            "pretrained_frozen": ([pretrained, f"task.stages=[{{train: {frozen}}}]"], False),
            "pretrained_all": ([pretrained, "task.stages=[{train: all}]", "task.backbone_lr_ratio=1.0"], False),
            "pretrained_full_lr": ([pretrained, "task.backbone_lr_ratio=1.0"], False),
            "pretrained_best": ([pretrained, *best], False), "scratch_best": (best, False)}


def per_seed(runs: dict, metric: str, digits: int) -> str:
    """The variants run for several seeds, with each seed's value."""
    return "; ".join(f"{k} " + " ".join(f"{m[metric]:.{digits}f}" for m in v) for k, v in runs.items() if len(v) > 1)


def compare(out: Path, base: list[str], fraction: float, seeds: list[int], ways: dict) -> dict:
    """{variant: [metrics of each seed it runs for]} at one training fraction."""
    runs = {}
    for name, (extra, every_seed) in ways.items():
        runs[name] = [train(out, f"{name}_f{fraction}_s{seed}", [*base, f"data.train_fraction={fraction}",
                                                                 f"seed={seed}", *extra])
                      for seed in (seeds if every_seed else seeds[:1])]
    return runs


def few_shot(args: argparse.Namespace) -> None:
    out = args.out / "few_shot"
    data = simulate(out / "data" / "session.nwb", args.session_seed, [])
    common = [f"data.paths=[{data}]", *args.model]
    pretrain = train(out, "pretrain", ["experiment=pretrain_no_behavior", *common,
                                       f"trainer.max_epochs={args.pretrain_epochs}", "registry.alias=base"])
    uri = "models:/neuroformer-pretrain_no_behavior@base"
    print(f"pretrained {pretrain['model_uri']} (= {uri}): test id_ce {pretrain['test/id_ce']:.3f} "
          f"(unigram {pretrain['test/id_ce_unigram']:.3f})")
    base = ["experiment=finetune_speed", *common, f"trainer.max_steps={args.steps}", *QUIET]
    ways = {k: v for k, v in variants(uri, "val/behavior_r2", "max", frozen="heads").items() if k in args.variants}
    runs = {f: compare(out, base, f, args.seeds, ways) for f in args.fractions}
    decoders = linear_decoders(data, out, uri, args.fractions, args.ridge_alpha)
    mean, sd, running = decoders["test"]
    print(f"\nRunning speed, test block: {mean:.1f} +- {sd:.1f} cm/s, running {100 * running:.0f}% of windows. "
          f"{args.steps} fine-tuning steps; seeds {args.seeds} (the frozen and _best variants: the first only).")
    print("Fine-tuned models: test R^2 (Pearson r), mean over seeds")
    print(f"{'fraction':>8} {'windows':>7} {'labels':>7} {'speed cm/s':>11} {'running':>7} | "
          + " ".join(f"{k:>17}" for k in ways) + " | per seed R2")
    for fraction, by_way in runs.items():
        ref = decoders[fraction]
        r2 = {k: [m["test/behavior_r2"] for m in v] for k, v in by_way.items()}
        cells = " ".join(f"{np.mean(r2[k]):>8.3f} ({np.mean([m['test/behavior_r'] for m in v]):.3f})"
                         for k, v in by_way.items())
        print(f"{fraction:>8g} {ref['windows']:>7d} {ref['seconds']:>6.1f}s {ref['speed_mean']:>5.1f} "
              f"+-{ref['speed_sd']:>4.1f} {100 * ref['running']:>6.0f}% | {cells} | "
              + per_seed(by_way, "test/behavior_r2", 3))
    print(f"\nLinear decoders (ridge, alpha {args.ridge_alpha} on standardised features): test R^2")
    print(f"{'fraction':>8} | {'spike counts':>12} {'pretrained features':>19} {'untrained features':>18}")
    for fraction in args.fractions:
        ref = decoders[fraction]
        print(f"{fraction:>8g} | {ref['counts']:>12.3f} {ref['pretrained']:>19.3f} {ref['random']:>18.3f}")


def multi_session(args: argparse.Namespace) -> None:
    out = args.out / "multi_session"
    sim = ["--n-units", str(args.n_units), "--duration", str(args.duration)]
    a, b, c = (simulate(out / "data" / f"session_seed{s}.nwb", s, sim) for s in args.session_seeds)
    pretrain = train(out, "pretrain", [f"data.paths=[{a},{b}]", "task_name=pretrain_two_sessions", *args.model,
                                       f"trainer.max_epochs={args.pretrain_epochs}", "registry.alias=base"])
    uri = "models:/neuroformer-pretrain_two_sessions@base"
    print(f"pretrained {pretrain['model_uri']} (= {uri}) on {a.name} + {b.name}: test id_ce "
          f"{pretrain['test/id_ce']:.3f} (unigram {pretrain['test/id_ce_unigram']:.3f})")
    base = ["experiment=multi_session", f"data.paths=[{c}]", *args.model, f"trainer.max_steps={args.steps}", *QUIET]
    ways = {k: v for k, v in variants(uri, "val/id_ce", "min", frozen="new_units").items() if k in args.variants}
    rows = [(f, compare(out, base, f, args.seeds, ways)) for f in args.fractions]
    print(f"\nTest ID cross-entropy (nats/token) on {c.name}, the new session; {args.steps} steps; "
          f"mean over seeds {args.seeds}")
    print(f"{'fraction':>8} {'windows':>7} | " + " ".join(f"{k:>17}" for k in ways) + f" {'unigram':>8} | "
          "per seed")
    for fraction, runs in rows:
        ce = {k: [m["test/id_ce"] for m in v] for k, v in runs.items()}
        windows = len(data_module(c, fraction).datasets["train"])
        print(f"{fraction:>8g} {windows:>7} | " + " ".join(f"{np.mean(ce[k]):>17.4f}" for k in ways)
              + f" {next(iter(runs.values()))[0]['test/id_ce_unigram']:>8.4f} | " + per_seed(runs, "test/id_ce", 4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fractions, seeds, steps in (("few-shot", [0.01, 0.02, 0.05, 0.1, 1.0], [0, 1], 400),
                                          ("multi-session", [0.05, 0.1, 0.2], [0], 400)):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_finetuning")
        p.add_argument("--fractions", type=float, nargs="+", default=fractions)
        p.add_argument("--seeds", type=int, nargs="+", default=seeds)
        p.add_argument("--steps", type=int, default=steps, help="fine-tuning optimizer steps")
        p.add_argument("--pretrain-epochs", type=int, default=3)
        p.add_argument("--variants", nargs="+", default=NAMES, choices=NAMES, help="see variants()")
        p.add_argument("--model", nargs="*", default=["model.n_embd=64", "model.n_layer=2"],
                       help="model overrides shared by pretraining and scratch runs")
    few = sub.choices["few-shot"]
    few.add_argument("--session-seed", type=int, default=0)
    few.add_argument("--ridge-alpha", type=float, default=10.0)
    multi = sub.choices["multi-session"]
    multi.add_argument("--session-seeds", type=int, nargs=3, default=[11, 12, 13])
    multi.add_argument("--n-units", type=int, default=80)
    multi.add_argument("--duration", type=float, default=300.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    (few_shot if args.command == "few-shot" else multi_session)(args)


if __name__ == "__main__":
    main()
