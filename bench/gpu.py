"""The GPU measurements of issue 16, in one run, for docs/performance.md.

On one CUDA device it prints and saves (``--out``, JSON):

1. the bf16 matmul peak, measured (best of 10 products of two 8192 x 8192 matrices);
2. bf16 training (``torch.autocast``) at the reference's shapes (``bench/reference.py``) for the
   reference's full size in the default model's design (``latents+past/2``, 25M parameters) and
   a ~300M-parameter configuration of the same design: windows/s, FLOPs per step
   (``FlopCounterMode`` on a real step), achieved FLOP/s, model FLOPs utilisation (achieved over
   the measured peak) and peak GPU memory of a step;
3. generation tokens/s at batch 1, 8, 32 and 256 (windows forced to 40 spikes, the 25M model,
   bf16 weights), eager, and with ``--compile`` also with ``compile=True`` (each batch size
   compiles: minutes on a GPU);
4. DeepSpeed ZeRO-2 and ZeRO-3 through the trainer presets: ``python train.py
   trainer=deepspeed_zero2|deepspeed_zero3 trainer.precision=bf16-mixed trainer.max_epochs=1``
   on the default recording, the windows/s its last progress line reports (the first run also
   simulates the recording and fits the test's GLM baseline: minutes, not in the rate).

``--device cpu --quick`` runs every path with tiny sizes and few steps: a check of the script
itself on a machine without a GPU (its numbers mean nothing).

Usage: python bench/gpu.py [--out outputs/bench_gpu.json] [--batch 64] [--steps 20] [--compile]
       [--no-zero] [--device cuda|cpu] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from neuroformer.data.dataset import Batch
from neuroformer.data.tokenizer import PAD
from neuroformer.inference.generate import SamplingConfig, sample_windows
from reference import DESIGNS, N_BINS, build_sized, windows  # bench/reference.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
LATENT = dict(n_context_layer=0, n_latents=32, past_direct=True)
CONFIGS = {  # name -> NeuroformerConfig sizes (quick: tiny stand-ins with the same design)
    "25M": DESIGNS["full"]["latents+past/2"],
    "300M": dict(LATENT, n_embd=1024, n_head=16, n_layer=4, n_latent_layer=18),
}
QUICK = {"25M": dict(LATENT, n_embd=64, n_head=2, n_layer=1, n_latent_layer=1),
         "300M": dict(LATENT, n_embd=96, n_head=2, n_layer=1, n_latent_layer=2)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_peak(device: torch.device, n: int) -> float:
    """FLOP/s of the best of 10 bf16 n x n x n products."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(10):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def training_batch(batch: int, device: torch.device) -> Batch:
    """Random windows at the reference's shapes and their next-token targets, trimmed of all-PAD columns."""
    x = windows(batch)
    targets = [torch.cat([t[:, 1:], torch.full((batch, 1), PAD)], dim=1) for t in (x.ids, x.dts)]
    zeros = torch.zeros(batch)
    return Batch(x.ids, x.dts, *targets, x.past_ids, x.past_dts, x.frames, x.behavior, zeros, zeros).trimmed().to(device)


def measure_training(sizes: dict, batch: int, steps: int, device: torch.device, peak: float) -> dict:
    """One model's bf16 training step (AdamW, contrastive loss on): speed, FLOPs, utilisation, memory."""
    model = build_sized(sizes).to(device)
    optimizer = torch.optim.AdamW(model.param_groups(0.01), lr=1e-4, fused=device.type == "cuda")
    data = training_batch(batch, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(data.inputs, contrastive=True)
            loss = sum(model.losses(out, data.target_ids, data.target_dts).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(3):  # warm-up
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - t) / steps
    flops = counter.get_total_flops()
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "windows_per_s": batch / seconds,
        "gflop_per_step": flops / 1e9,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def measure_generation(sizes: dict, batches: list[int], device: torch.device, compile: bool) -> list[dict]:
    """Tokens/s of 40-spike windows per batch size, eager (and compiled) (bf16 weights)."""
    model = build_sized(sizes).to(device, torch.bfloat16).eval()
    rows = []
    for batch in batches:
        x = windows(batch, current_real=0)
        x = x._replace(**{f: getattr(x, f).to(device) for f in ("ids", "dts", "past_ids", "past_dts")},
                       frames=x.frames.to(device, torch.bfloat16), behavior=x.behavior.to(device, torch.bfloat16))
        row = {"batch": batch}
        for name, compiled in (("eager", False), ("compiled", True))[: 1 + compile]:
            sample_windows(model, x, N_BINS, SamplingConfig(), length=40, compile=compiled)  # warm-up / compile
            synchronize(device)
            t = time.perf_counter()
            out = sample_windows(model, x, N_BINS, SamplingConfig(), torch.Generator(device).manual_seed(0),
                                 length=40, compile=compiled)
            synchronize(device)
            row[f"{name}_tokens_per_s"] = int(out.counts.sum()) / (time.perf_counter() - t)
        rows.append(row)
    return rows


def measure_zero(preset: str, device: torch.device, out: Path, quick: bool) -> dict:
    """``train.py`` with a DeepSpeed preset for one epoch; the last windows/s its progress line reports."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    cmd = [sys.executable, "train.py", f"trainer={preset}", "trainer.devices=1", f"trainer.accelerator={accelerator}",
           f"trainer.precision={precision}", "trainer.max_epochs=1", "evaluate=null", "logger=none",
           "registry.register=false", f"hydra.run.dir={out / preset}", *(["debug=fast_dev_run"] if quick else [])]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    rates = [float(m) for m in re.findall(r"([\d.]+) windows/s", done.stdout + done.stderr)]
    if done.returncode != 0 or (not rates and not quick):
        return {"preset": preset, "error": (done.stderr or done.stdout)[-2000:]}
    return {"preset": preset, "windows_per_s": rates[-1] if rates else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_gpu.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--batch", type=int, default=64, help="training windows per step")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    parser.add_argument("--compile", action="store_true", help="also time generation with compile=True")
    parser.add_argument("--no-zero", action="store_true", help="skip the DeepSpeed runs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few steps: check the script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; bench/gpu.py measures a GPU (--device cpu --quick checks the script)")
    device = torch.device(args.device)
    configs = QUICK if args.quick else CONFIGS
    steps = 2 if args.quick else args.steps
    batches = [1, 8] if args.quick else [1, 8, 32, 256]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    results["bf16_peak_tflops"] = bf16_peak(device, 256 if args.quick else 8192) / 1e12
    print(f"{name}, torch {torch.__version__}: bf16 matmul peak {results['bf16_peak_tflops']:.1f} TFLOP/s", flush=True)

    results["training"] = {}
    print("\n| config | parameters | batch | windows/s | GFLOP/step | TFLOP/s | MFU | peak memory |\n|---|---|---|---|---|---|---|---|")
    for config, sizes in configs.items():
        r = measure_training(sizes, 4 if args.quick else args.batch, steps, device, results["bf16_peak_tflops"] * 1e12)
        results["training"][config] = r
        memory = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "-"
        print(f"| {config} | {r['parameters'] / 1e6:.1f}M | {r['batch']} | {r['windows_per_s']:.1f} | "
              f"{r['gflop_per_step']:.1f} | {r['achieved_tflops']:.2f} | {r['mfu']:.1%} | {memory} |", flush=True)

    results["generation"] = measure_generation(configs["25M"], batches, device, args.compile)
    print("\n| batch | eager tokens/s | compiled tokens/s |\n|---|---|---|")
    for r in results["generation"]:
        compiled = f"{r['compiled_tokens_per_s']:.0f}" if "compiled_tokens_per_s" in r else "-"
        print(f"| {r['batch']} | {r['eager_tokens_per_s']:.0f} | {compiled} |", flush=True)

    if not args.no_zero:
        runs = args.out.parent / "bench_gpu_runs"
        results["zero"] = [measure_zero(preset, device, runs, args.quick) for preset in ("deepspeed_zero2", "deepspeed_zero3")]
        print("\n| preset | windows/s |\n|---|---|")
        for r in results["zero"]:
            print(f"| {r['preset']} | {r.get('windows_per_s', 'failed: ' + r.get('error', '')[-300:])} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{args.out}")


if __name__ == "__main__":
    main()
