"""Evidence for perforated backpropagation (docs/perforated.md): plain, widened, dendrites, over seeds.

Two tasks, four models each, ``--seeds`` seeds; every run stops by the same rule (the callback's
plateau test: ``patience`` validations without a 0.1% improvement), and is scored at its best
validation state on held-out test data:

(a) ``plain``: the narrow model (trained under ``Perforated(max_sets=0)``: plateau, best state);
(b) ``widened``: the plain model made wider until it has as many parameters as (c) had;
(c) ``perforated``: the narrow model with correlation-trained dendrites (the paper's method);
(d) ``joint``: the narrow model with dendrites trained jointly by backpropagation.

Tasks:

- ``teacher``: (and (d) again with new dendrites at the usual initial scale instead of 0.01)
  a random tanh MLP teacher (10 inputs, 32 hidden units, Gaussian noise of std 0.1
  on its unit-variance output) and a student of the same form with only ``--width`` hidden
  units. Metric: test MSE relative to the target variance (the oracle, the teacher itself,
  scores the noise, 0.01). Compression: plain students of widths 2x..8x against (c).
- ``rnn``: the platform's sparse-data RNN fitting the simulated reaching circuit's EMG
  (``python train.py experiment=sparse_rnn``, output only, ``--hidden`` units), through
  ``train(cfg)`` with ``callbacks=perforated``. Metric: output R^2 on the held-out reach
  directions (and the output loss), beside the nearest-training-condition baseline. Compression:
  the widened plain RNN, (b), is the larger plain model.

Usage (one thread: the models are small, and threads only wait on each other on a busy machine):
    OMP_NUM_THREADS=1 python bench/perforated.py teacher [--seeds 0 1 2 3 4] [--width 4]
    OMP_NUM_THREADS=1 python bench/perforated.py rnn [--seeds 0 1 2 3 4] [--hidden 6] [--out DIR]
Prints markdown tables (mean, standard deviation and 95% bootstrap interval of the mean over
seeds) and saves a validation-versus-epoch figure of seed 0's perforated run next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from scipy import stats
from torch import nn

from neuroformer import plots
from neuroformer.callbacks.perforated import Perforated
from neuroformer.models import dendrites as dn

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "widened", "perforated", "joint")


# --------------------------------------------------------------------------- teacher-student


def mlp(n_in: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, 1))


def make_teacher(kind: str, g: torch.Generator, n_in: int, hidden: int) -> nn.Module:
    """``mlp``: a random tanh MLP with ``hidden`` units. ``dendritic``: a tanh MLP as narrow as the
    student (4 units) whose neurons have 3 random dendrites each: the structure dendrites can
    represent exactly, the best case for them."""
    teacher = mlp(n_in, hidden if kind == "mlp" else 4)
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 2 / layer.weight.shape[1] ** 0.5)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.5)
        if kind == "dendritic":
            for k in range(3):
                for s in dn.add_dendrites(teacher, dn.select_layers(teacher), init_scale=1.0,
                                          seed=int(torch.randint(1 << 30, (1,), generator=g))):
                    s.input.weight.mul_(4.0)  # steep enough to be non-linear over the inputs' range
                    s.output.copy_(torch.randn(s.output.shape, generator=g))
                    if s.lateral is not None:
                        s.lateral.copy_(torch.randn(s.lateral.shape, generator=g))
    return teacher


def teacher_data(seed: int, kind: str = "mlp", n_in: int = 10, hidden: int = 32, noise: float = 0.1,
                 sizes: tuple[int, int, int] = (2000, 500, 5000)) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train/val/test (x, y) of a random teacher (``make_teacher``); y has unit variance plus ``noise`` std."""
    g = torch.Generator().manual_seed(1000 + seed)
    teacher = make_teacher(kind, g, n_in, hidden)
    with torch.no_grad():
        x = torch.randn(sum(sizes), n_in, generator=g)
        f = teacher(x)
        f = (f - f.mean()) / f.std()
        y = f + noise * torch.randn(f.shape, generator=g)
    parts = torch.split(torch.arange(sum(sizes)), list(sizes))
    return {name: (x[i], y[i]) for name, i in zip(("train", "val", "test"), parts)}


class Regression(L.LightningModule):
    """MSE regression of ``data`` by ``model`` (in ``self.model``, as the callback expects)."""

    def __init__(self, model: nn.Module, data: dict, lr: float = 1e-2, batch_size: int = 100):
        super().__init__()
        self.model, self.data, self.lr, self.batch_size = model, data, lr, batch_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def _loader(self, split: str, shuffle: bool) -> torch.utils.data.DataLoader:
        dataset = torch.utils.data.TensorDataset(*self.data[split])
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size if shuffle else 10_000, shuffle=shuffle)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)


def fit_student(data: dict, width: int, method: str | None, seed: int, max_sets: int, patience: int,
                max_epochs: int, init_scale: float = 0.01) -> tuple[dict, Perforated]:
    """Train one student (``method`` None: plain) to its plateau; test MSE at the best state.
    Dendrite phases last up to ``3 * patience`` epochs (fewer when the correlation stops rising)."""
    L.seed_everything(seed, workers=False, verbose=False)
    model = mlp(data["train"][0].shape[1], width)
    callback = Perforated(monitor="val/loss", method=method or "correlation", patience=patience,
                          max_sets=max_sets if method else 0, candidate_epochs=3 * patience, init_scale=init_scale,
                          seed=seed, figure=None)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        num_sanity_val_steps=0, default_root_dir=ROOT / "outputs" / "bench_perforated")
    trainer.fit(Regression(model, data))
    if callback.phase != "done":
        raise RuntimeError(f"width {width}, {method}: no plateau in {max_epochs} epochs; raise --max-epochs")
    x, y = data["test"]
    with torch.no_grad():
        mse = nn.functional.mse_loss(model(x), y).item() / y.var().item()
    return {"test_nmse": mse, "n_parameters": sum(p.numel() for p in model.parameters()),
            "sets": max(dn.structure(model).values(), default=0), "epochs": trainer.current_epoch + 1}, callback


def width_for(n_parameters: int, n_in: int) -> int:
    """The plain MLP width with the parameter count nearest ``n_parameters``."""
    per_unit = n_in + 2  # input weights and bias, output weight
    return max(1, round((n_parameters - 1) / per_unit))


def teacher_bench(seeds: list[int], kind: str, width: int, max_sets: int, patience: int, max_epochs: int,
                  out: Path) -> None:
    extra = ("joint, init_scale 1", *(f"plain x{k}" for k in (2, 4, 8))) if kind == "mlp" else ()
    rows: dict[str, list[dict]] = {v: [] for v in (*VARIANTS, *extra)}
    for seed in seeds:
        began = time.perf_counter()
        data = teacher_data(seed, kind)
        run = lambda w, m, init=0.01: fit_student(data, w, m, seed, max_sets, patience, max_epochs, init)  # noqa: E731
        rows["plain"].append(run(width, None)[0])
        perforated, callback = run(width, "correlation")
        rows["perforated"].append(perforated)
        if seed == seeds[0]:
            plots.save(callback.plot(), out / f"perforated_teacher_{kind}_validation.png")
        rows["joint"].append(run(width, "joint")[0])
        rows["widened"].append(run(width_for(perforated["n_parameters"], data["train"][0].shape[1]), None)[0])
        if kind == "mlp":
            rows["joint, init_scale 1"].append(run(width, "joint", 1.0)[0])
            for k in (2, 4, 8):
                rows[f"plain x{k}"].append(run(k * width, None)[0])
        print(f"seed {seed}: " + ", ".join(f"{v} {r[-1]['test_nmse']:.4f} ({r[-1]['n_parameters']} p)"
                                           for v, r in rows.items()) + f"  [{time.perf_counter() - began:.0f} s]",
              flush=True)
    (out / f"perforated_teacher_{kind}.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, "test_nmse", "test MSE / target variance (oracle 0.01)"))


# --------------------------------------------------------------------------- the RNN output fit


RNN_BASE = ["experiment=sparse_rnn", "callbacks=perforated", "data.record_fraction=0", "task.activity_weight=0",
            "task.lr=1e-2", "evaluate=null", "registry.register=false", "logger=none", "trainer.max_epochs=400",
            "callbacks.perforated.patience=3", "callbacks.perforated.candidate_epochs=10",
            "callbacks.perforated.candidate_patience=3"]


def rnn_runs(out: Path, runs: dict[str, list[str]], seeds: list[int]) -> None:
    """One Hydra multirun of ``train.py`` over ``seeds`` per entry of ``runs`` (name -> overrides), into
    ``out/name``, all at once (each one thread); those already there are skipped."""
    procs = {}
    for name, overrides in runs.items():
        folder = out / name
        if folder.is_dir() and len(list(folder.glob("*/metrics.json"))) == len(seeds):
            continue
        cmd = [sys.executable, "train.py", "-m", *RNN_BASE, *overrides, "seed=" + ",".join(map(str, seeds)),
               f"paths.output_root={out}", f"hydra.sweep.dir={folder}"]
        print("$ OMP_NUM_THREADS=1 " + " ".join(cmd[1:]), flush=True)
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                       stdout=subprocess.DEVNULL, stderr=open(out / f"{name}.log", "w"))
    began = time.perf_counter()
    for name, proc in procs.items():
        if proc.wait():
            raise RuntimeError(f"{name} failed: see {out / f'{name}.log'}")
        print(f"  {name}: {time.perf_counter() - began:.0f} s", flush=True)


def read_rnn(folder: Path) -> list[dict]:
    """Per run (seed order): held-out output R^2 and loss, its baseline, parameters and sets of the best model."""
    from neuroformer import registry

    rows = []
    for metrics_file in sorted(folder.glob("*/metrics.json"), key=lambda p: int(p.parent.name)):
        m = json.loads(metrics_file.read_text())
        model = registry.load(m["best_checkpoint"]).model
        # The best validation loss (output MSE on held-out trials of the trained directions) the callback saw.
        state = torch.load(metrics_file.parent / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
        rows.append({"output_r2": m["test/output_r2"], "output_loss": m["test/output_loss"],
                     "val_loss": state["Perforated"]["best"],
                     "nearest": m["test/output_r2_nearest_condition"], "ceiling": m["test/output_r2_ceiling"],
                     "n_parameters": sum(p.numel() for p in model.parameters()),
                     "sets": max(dn.structure(model).values(), default=0),
                     "hidden": model.config.hidden if hasattr(model, "config") else None})
    return rows


def rnn_hidden_for(n_parameters: float, spec_sizes: tuple[int, int]) -> int:
    """The plain RNN width with the parameter count nearest ``n_parameters`` (no recorded neurons)."""
    from neuroformer.models.rnn import RateRNN, RNNConfig

    n_in, n_out = spec_sizes
    count = lambda h: sum(p.numel() for p in RateRNN(RNNConfig(n_inputs=n_in, n_outputs=n_out, hidden=h)).parameters())  # noqa: E731
    return min(range(1, 200), key=lambda h: abs(count(h) - n_parameters))


def rnn_bench(seeds: list[int], hidden: int, out: Path) -> None:
    from neuroformer import registry

    # The simulated session is written once, before the runs that read it start at once.
    subprocess.run([sys.executable, "train.py", *RNN_BASE, "debug=fast_dev_run", f"paths.output_root={out}",
                    f"hydra.run.dir={out / 'warmup'}"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    rnn_runs(out, {"plain": ["callbacks.perforated.max_sets=0", f"model.hidden={hidden}"],
                   "perforated": [f"model.hidden={hidden}"],
                   "joint": [f"model.hidden={hidden}", "callbacks.perforated.method=joint"]}, seeds)
    rows = {v: read_rnn(out / v) for v in ("plain", "perforated", "joint")}
    first = next((out / "perforated").glob("*/metrics.json"))
    spec = registry.load(json.loads(first.read_text())["best_checkpoint"]).spec
    wide = rnn_hidden_for(np.mean([r["n_parameters"] for r in rows["perforated"]]), (spec.n_inputs, spec.n_outputs))
    rnn_runs(out, {"widened": ["callbacks.perforated.max_sets=0", f"model.hidden={wide}"]}, seeds)
    rows["widened"] = read_rnn(out / "widened")
    (out / "perforated_rnn.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, "output_r2", "output R^2, held-out directions"))
    print(table(rows, "output_loss", "output MSE (z-scored), held-out directions"))
    print(table(rows, "val_loss", "output MSE (z-scored), validation trials of the trained directions"))
    print(f"nearest-training-condition baseline R^2 {rows['plain'][0]['nearest']:.3f}, "
          f"ceiling {rows['plain'][0]['ceiling']:.3f}")


# --------------------------------------------------------------------------- tables


def interval(v: np.ndarray) -> tuple[float, float]:
    """95% t-interval of the mean of ``v`` (seeds are few: not a bootstrap)."""
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return v.mean() - half, v.mean() + half


def table(rows: dict[str, list[dict]], key: str, label: str) -> str:
    """Markdown: per model, mean, std and 95% interval of ``key`` over seeds, the paired difference
    from the perforated model (same seed: same data and initial weights), parameters and sets."""
    lines = [f"| model | {label}: mean | std | 95% CI | minus perforated (paired), 95% CI | parameters | "
             "dendrite sets | seeds |", "|---|---|---|---|---|---|---|---|"]
    ref = np.array([r[key] for r in rows["perforated"]])
    for name, runs in rows.items():
        v = np.array([r[key] for r in runs])
        lo, hi = interval(v)
        d = v - ref
        dlo, dhi = interval(d) if name != "perforated" else (np.nan, np.nan)
        diff = f"{d.mean():+.4f} [{dlo:+.4f}, {dhi:+.4f}]" if name != "perforated" else "-"
        lines.append(f"| {name} | {v.mean():.4f} | {v.std(ddof=1):.4f} | [{lo:.4f}, {hi:.4f}] | {diff} | "
                     f"{np.mean([r['n_parameters'] for r in runs]):.0f} | {np.mean([r['sets'] for r in runs]):.1f} | "
                     f"{len(v)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["teacher", "rnn"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--teacher", choices=["mlp", "dendritic"], default="mlp", help="teacher: its kind (make_teacher)")
    parser.add_argument("--width", type=int, default=4, help="teacher: the student's hidden units")
    parser.add_argument("--hidden", type=int, default=6, help="rnn: the student RNN's units")
    parser.add_argument("--max-sets", type=int, default=3)
    parser.add_argument("--patience", type=int, default=10, help="teacher: validations to a plateau")
    parser.add_argument("--max-epochs", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_perforated")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.task == "teacher":
        teacher_bench(args.seeds, args.teacher, args.width, args.max_sets, args.patience, args.max_epochs, args.out)
    else:
        rnn_bench(args.seeds, args.hidden, args.out)


if __name__ == "__main__":
    main()
