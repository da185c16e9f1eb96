"""Per-rank memory of parameters and optimizer state at ZeRO stage 0 (DDP), 2 and 3, in one run.

Each stage trains the same Neuroformer for a few steps on N ranks (CPU processes where no GPU
is present) through the real trainer presets (conf/trainer/ddp.yaml, deepspeed_zero2.yaml,
deepspeed_zero3.yaml), in fp32. After the last optimizer step every rank counts the bytes of
the tensor storages it holds (each storage once):

- params: the module's parameters (at ZeRO-3 the rank's parameter shards),
- optimizer: Adam moments, plus ZeRO's fp32 master copy of the rank's partition where it
  keeps one (ZeRO-2; ZeRO-3 in fp32 updates its parameter shard in place),
- grads+buffers: everything else that appeared since the model was built: gradients (or
  gradient partitions) and communication buckets. ZeRO sizes its buckets by
  ``reduce_bucket_size``/``allgather_bucket_size``, not by the model; on CPU they are
  allocated with ``torch.empty`` and mostly never touched.

The table gives params + optimizer per rank (the worst rank) and its ratio to ZeRO-0, next to
the expected ratio for fp32 training with AdamW (4 bytes params, 8 Adam moments): ZeRO-0 12,
ZeRO-2 4 + 12/N (4 params + sharded master and moments), ZeRO-3 12/N bytes per parameter.

Usage: python bench/zero_memory.py [--n-embd 512] [--n-layer 8] [--ranks 2] [--steps 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from neuroformer.data.simulate import SimulationConfig, simulate_recording

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {0: "ddp", 2: "deepspeed_zero2", 3: "deepspeed_zero3"}
# params + optimizer state, fp32 + AdamW, N ranks (see the module docstring)
EXPECTED_BYTES_PER_PARAM = {0: lambda n: 12.0, 2: lambda n: 4 + 12 / n, 3: lambda n: 12 / n}


def live_storages() -> dict[int, int]:
    """{data pointer: bytes} of every tensor storage reachable from Python (and parameters' grads)."""
    found: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            for t in (obj, obj.grad if obj.is_leaf else None):
                if t is not None and t.untyped_storage().nbytes():
                    found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return found


def storages_of(tensors) -> dict[int, int]:
    """{data pointer: bytes} of the storages under ``tensors`` (non-tensors skipped)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()}


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (or the optimizer itself)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class MemoryProbe(L.Callback):
    """After the last training step, writes this rank's storage bytes by category to a JSON file."""

    def __init__(self, baseline: dict[int, int], out: Path, stage: int):
        self.baseline, self.out, self.stage = baseline, out, stage

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step < trainer.max_steps:
            return
        gc.collect()
        new = {p: b for p, b in live_storages().items() if p not in self.baseline}
        params = storages_of(pl_module.parameters())
        params.update(storages_of(getattr(p, "ds_tensor", None) for p in pl_module.parameters()))
        opt = innermost_optimizer(trainer.optimizers[0])
        state = [v for s in opt.state.values() for v in s.values()]
        masters = [p for g in opt.param_groups for p in g["params"]]
        optimizer = {p: b for p, b in storages_of(state + masters).items() if p not in params}
        other = {p: b for p, b in new.items() if p not in params and p not in optimizer}
        result = {
            "stage": self.stage, "rank": trainer.global_rank, "device": trainer.strategy.root_device.type,
            "n_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in pl_module.model.parameters()),
            "params": sum(params.values()), "optimizer": sum(optimizer.values()), "other": sum(other.values()),
        }
        self.out.joinpath(f"stage{self.stage}_rank{trainer.global_rank}.json").write_text(json.dumps(result))


def worker(args: argparse.Namespace) -> None:
    """One rank of one stage (Lightning re-runs this command for the other ranks)."""
    overrides = [
        f"trainer={PRESETS[args.stage]}", f"trainer.devices={args.ranks}", f"data.paths=[{args.data}]",
        "data.batch_size=2", f"model.n_embd={args.n_embd}", f"model.n_layer={args.n_layer}",
        f"model.n_head={max(1, args.n_embd // 64)}", "model.patch=[1,8,8]",
        f"paths.output_dir={args.out}/run{args.stage}", f"paths.root_dir={args.out}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    L.seed_everything(0)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    gc.collect()
    baseline = live_storages()  # data and anything else that exists before the model
    model = instantiate(cfg.model)(spec=datamodule.spec)
    task = instantiate(cfg.task)(model=model, spec=datamodule.spec)
    del model
    trainer = instantiate(
        cfg.trainer, logger=False, enable_checkpointing=False, max_steps=args.steps, limit_val_batches=0,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[MemoryProbe(baseline, Path(args.out), args.stage)],
    )
    trainer.fit(task, datamodule=datamodule)


def run_stage(stage: int, args: argparse.Namespace, data: Path, out: Path) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--stage", str(stage), "--data", str(data),
           "--out", str(out), "--n-embd", str(args.n_embd), "--n-layer", str(args.n_layer),
           "--ranks", str(args.ranks), "--steps", str(args.steps)]
    log = out / f"stage{stage}.log"
    with open(log, "w") as f:
        # Killing the process group on timeout also ends the ranks Lightning launched.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=args.timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        sys.exit(f"ZeRO-{stage} failed (exit {proc.returncode}); see the end of {log}:\n{log.read_text()[-3000:]}")
    return [json.loads(out.joinpath(f"stage{stage}_rank{r}.json").read_text()) for r in range(args.ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per stage")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, choices=sorted(PRESETS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = simulate_recording(tmp / "sim.nwb", SimulationConfig(seed=0, n_units=40, duration=60.0), progress=False)
        results = {stage: run_stage(stage, args, data, tmp) for stage in PRESETS}

    mb = 1 / 2**20
    n = results[0][0]["n_parameters"]
    held = {stage: max(ranks, key=lambda r: r["params"] + r["optimizer"]) for stage, ranks in results.items()}
    base = held[0]["params"] + held[0]["optimizer"]
    print(f"\nPer rank: Neuroformer {n / 1e6:.1f}M parameters (n_embd={args.n_embd}, n_layer={args.n_layer}), "
          f"{args.ranks} {results[0][0]['device'].upper()} ranks, fp32 + AdamW, after {args.steps} steps\n")
    header = f"{'stage':<13}{'params MB':>11}{'optimizer MB':>14}{'params+opt MB':>15}{'/ZeRO-0':>9}" \
             f"{'expected':>10}{'grads+buffers MB':>18}"
    print(header + "\n" + "-" * len(header))
    for stage, rank in held.items():
        both = rank["params"] + rank["optimizer"]
        expected = EXPECTED_BYTES_PER_PARAM[stage](args.ranks) / EXPECTED_BYTES_PER_PARAM[0](args.ranks)
        name = "ZeRO-0 (DDP)" if stage == 0 else f"ZeRO-{stage}"
        print(f"{name:<13}{rank['params'] * mb:>11.1f}{rank['optimizer'] * mb:>14.1f}{both * mb:>15.1f}"
              f"{both / base:>9.2f}{expected:>10.2f}{rank['other'] * mb:>18.1f}")

if __name__ == "__main__":
    main()
