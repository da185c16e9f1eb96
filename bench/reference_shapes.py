"""Training throughput on the reference Neuroformer's own shapes, at its parameter counts.

Builds the designs of ``bench/reference.py`` (tokens, latents, latents+past, latents+past/2) at the reference's
shapes and parameter counts (full: width 256, 8 heads, 25.1M parameters; small: width 128, 4
heads, 2.65M) and compares them with the reference's measured training speed as fractions of
the matmul peak (198 GFLOP/s on the reference's machine, measured here in the same run). The
step is the pretraining task's: the batch is trimmed of its all-PAD columns first (40 of the
current block's 100 tokens and 430 of the past's 700 are real, so 41 and 431 columns are kept);
``--no-trim`` times the whole blocks, as the step did before 2026-12-07.

Prints, per design: parameters, FLOPs per training step (forward + backward, counted by
torch's FlopCounterMode on a real step; CPU fused attention kernels are not counted, so the
count is a lower bound), windows/s (designs timed alternately, median of rounds), achieved
GFLOP/s and its fraction of the matmul peak, the speed relative to the reference's (both as
fractions of their machines' peaks), and peak tensor memory of a step (parameters, gradients,
Adam moments and the activations autograd saves, summed exactly).

Usage: python bench/reference_shapes.py [--sizes full small] [--rounds 5] [--steps 3] [--no-trim]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from neuroformer.data.dataset import Batch
from neuroformer.data.tokenizer import PAD
from peak import matmul_peak  # bench/peak.py, next to this script
from reference import (DESIGNS, REFERENCE_PEAK, REFERENCE_TRAINING, TRAINING_BATCH, build,  # bench/reference.py
                       windows)


def training_batch(seed: int = 0) -> Batch:
    """One training batch: random windows and their next-token ID/dt targets (B, 100)."""
    x = windows(TRAINING_BATCH, seed=seed)
    target_ids, target_dts = (torch.cat([t[:, 1:], torch.full((TRAINING_BATCH, 1), PAD)], dim=1) for t in (x.ids, x.dts))
    zeros = torch.zeros(TRAINING_BATCH)
    return Batch(x.ids, x.dts, target_ids, target_dts, x.past_ids, x.past_dts, x.frames, x.behavior, zeros, zeros)


class Trainer:
    """One model, its AdamW and the pretraining task's step on a fixed batch: trimmed of its all-PAD
    columns (unless ``trim`` is off, as before 2026-12-07), the contrastive loss on."""

    def __init__(self, size: str, design: str, trim: bool = True):
        self.model = build(size, design)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(0.01), lr=1e-4)
        self.batch, self.trim = training_batch(), trim

    def loss(self) -> torch.Tensor:
        batch = self.batch.trimmed() if self.trim else self.batch
        out = self.model(batch.inputs, contrastive=True)
        return sum(self.model.losses(out, batch.target_ids, batch.target_dts).values())

    def step(self) -> None:
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops()

    def peak_memory(self) -> int:
        """Bytes: parameters + gradients + two Adam moments + every tensor autograd saves in the forward."""
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            if not isinstance(t, torch.nn.Parameter):
                saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss()
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return 4 * params + saved


def timed(fn, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["full", "small"], choices=list(DESIGNS))
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per design")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--no-trim", action="store_true", help="keep the batch's all-PAD columns (the step before 2026-12-07)")
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak()
    print(f"fp32 matmul peak (measured): {peak / 1e9:.0f} GFLOP/s; reference machine {REFERENCE_PEAK / 1e9:.0f}; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    header = (f"{'size':<6} {'design':<14} {'params':>7} {'GFLOP/step':>10} {'windows/s':>9} {'GFLOP/s':>8} "
              f"{'of peak':>7} {'vs reference':>12} {'peak memory':>11}")
    for size in args.sizes:
        ref_rate, ref_params = REFERENCE_TRAINING[size]
        trainers = {name: Trainer(size, name, trim=not args.no_trim) for name in DESIGNS[size]}
        flops = {name: t.flops() for name, t in trainers.items()}
        memory = {name: t.peak_memory() for name, t in trainers.items()}
        seconds = {name: [] for name in trainers}
        for name, t in trainers.items():  # warm-up
            timed(t.step, 1)
        for _ in range(args.rounds):
            for name, t in trainers.items():
                seconds[name].append(timed(t.step, args.steps))
        print(f"\n{size}: reference {ref_params / 1e6:.2f}M parameters, {ref_rate} windows/s at "
              f"{REFERENCE_PEAK / 1e9:.0f} GFLOP/s peak\n{header}")
        for name, t in trainers.items():
            step_s = statistics.median(seconds[name])
            rate = TRAINING_BATCH / step_s
            achieved = flops[name] / step_s
            params = sum(p.numel() for p in t.model.parameters())
            speedup = (rate / peak) / (ref_rate / REFERENCE_PEAK)
            print(f"{size:<6} {name:<14} {params / 1e6:>6.2f}M {flops[name] / 1e9:>10.1f} {rate:>9.1f} "
                  f"{achieved / 1e9:>8.1f} {achieved / peak:>7.1%} {speedup:>11.2f}x {memory[name] / 2**20:>9.0f} MiB")
    print(f"\npeak re-measured at the end: {matmul_peak() / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
