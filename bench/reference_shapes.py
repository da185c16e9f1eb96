"""Training throughput on the reference Neuroformer's own shapes, at its parameter counts.

The reference implementation (a-antoniades/Neuroformer) trains on windows with an ID vocabulary
of 2026, a current block of 100 tokens, a past block of 700 tokens (about 430 real), 3 stimulus
frames of 30 x 100 pixels and batch 8. Its measured speed on a 2-core CPU whose fp32 matmul peak
was 198 GFLOP/s (issue 16) is the yardstick: since absolute speeds differ between machines, this
bench compares fractions of the matmul peak measured in the same run.

For each size (full: width 256, 8 heads, 25.1M parameters; small: width 128, 4 heads, 2.65M)
it builds three designs at about the reference's parameter count:

- ``tokens``: every decoder block cross-attends to all ~830 context tokens, which a one-layer
  encoder per modality encodes first (the original design);
- ``latents``: the context is read once into 32 latents (PerceiverIO), most parameters sit in
  self-attention blocks over those latents, and a few decoder blocks cross-attend to them;
- ``latents+past``: the same, and the decoder also attends to every past token through one
  key/value projection shared by all its blocks (``past_direct``).

and prints, per design: parameters, FLOPs per training step (forward + backward, counted by
torch's FlopCounterMode on a real step; CPU fused attention kernels are not counted, so the
count is a lower bound), windows/s (designs timed alternately, median of rounds), achieved
GFLOP/s and its fraction of the matmul peak, the speed relative to the reference's (both as
fractions of their machines' peaks), and peak tensor memory of a step (parameters, gradients,
Adam moments and the activations autograd saves, summed exactly).

Usage: python bench/reference_shapes.py [--sizes full small] [--rounds 5] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from neuroformer.data.tokenizer import N_SPECIAL, PAD, SOS
from neuroformer.models.neuroformer import Neuroformer, NeuroformerConfig, NeuroformerInput
from throughput import matmul_peak

BATCH, BLOCK, PAST, PAST_REAL, CURRENT_REAL = 8, 100, 700, 430, 40
FRAMES, PATCH = (3, 30, 100), (1, 15, 5)  # 3 x 2 x 20 = 120 patch tokens (the reference: 121)
ID_VOCAB, DT_VOCAB = 2026, 33
REFERENCE_PEAK = 198e9  # fp32 matmul peak of the machine the reference was measured on
REFERENCE = {  # reference training windows/s and parameters (issue 16)
    "full": (4.6, 25.1e6),
    "small": (29.8, 2.65e6),
}
DESIGNS = {  # size -> design -> model hyperparameters at about the reference's parameter count
    "full": {
        "tokens": dict(n_embd=256, n_head=8, n_layer=20),
        "latents": dict(n_embd=256, n_head=8, n_layer=4, n_context_layer=0, n_latents=32, n_latent_layer=23),
        "latents+past": dict(n_embd=256, n_head=8, n_layer=4, n_context_layer=0, n_latents=32, n_latent_layer=23,
                             past_direct=True),
    },
    "small": {
        "tokens": dict(n_embd=128, n_head=4, n_layer=5),
        "latents": dict(n_embd=128, n_head=4, n_layer=2, n_context_layer=0, n_latents=32, n_latent_layer=6),
        "latents+past": dict(n_embd=128, n_head=4, n_layer=2, n_context_layer=0, n_latents=32, n_latent_layer=6,
                             past_direct=True),
    },
}


def build(hparams: dict) -> Neuroformer:
    cfg = NeuroformerConfig(id_vocab_size=ID_VOCAB, dt_vocab_size=DT_VOCAB, block_size=BLOCK, past_block_size=PAST,
                            n_frames=FRAMES[0], frame_shape=FRAMES[1:], patch=PATCH, n_behavior=1, behavior_steps=8,
                            dropout=0.1, **hparams)
    return Neuroformer(cfg).train()


def _tokens(g: torch.Generator, length: int, real: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, length) ``[SOS, real random tokens, PAD..]`` ID and dt sequences."""
    ids = torch.full((BATCH, length), PAD, dtype=torch.long)
    dts = torch.full((BATCH, length), PAD, dtype=torch.long)
    ids[:, 0] = dts[:, 0] = SOS
    ids[:, 1 : real + 1] = torch.randint(N_SPECIAL, vocab, (BATCH, real), generator=g)
    dts[:, 1 : real + 1] = torch.randint(N_SPECIAL, DT_VOCAB, (BATCH, real), generator=g).sort(dim=1).values
    return ids, dts


def batch(seed: int = 0) -> tuple[NeuroformerInput, torch.Tensor, torch.Tensor]:
    """One training batch at the reference shapes: inputs and next-token ID/dt targets (B, 100)."""
    g = torch.Generator().manual_seed(seed)
    ids, dts = _tokens(g, BLOCK, CURRENT_REAL, ID_VOCAB)
    past_ids, past_dts = _tokens(g, PAST, PAST_REAL, ID_VOCAB)
    x = NeuroformerInput(ids, dts, past_ids, past_dts, torch.randn(BATCH, *FRAMES, generator=g),
                         torch.randn(BATCH, 8, 1, generator=g))
    targets = [torch.cat([t[:, 1:], torch.full((BATCH, 1), PAD)], dim=1) for t in (ids, dts)]
    return x, *targets


class Trainer:
    """One model, its AdamW and a training step on a fixed batch (the contrastive loss on, as in pretraining)."""

    def __init__(self, hparams: dict):
        self.model = build(hparams)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(0.01), lr=1e-4)
        self.x, self.target_ids, self.target_dts = batch()

    def step(self) -> None:
        out = self.model(self.x, contrastive=True)
        loss = sum(self.model.losses(out, self.target_ids, self.target_dts).values())
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
            out = self.model(self.x, contrastive=True)
            loss = sum(self.model.losses(out, self.target_ids, self.target_dts).values())
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
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak()
    print(f"fp32 matmul peak (measured): {peak / 1e9:.0f} GFLOP/s; reference machine {REFERENCE_PEAK / 1e9:.0f}; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    header = (f"{'size':<6} {'design':<12} {'params':>7} {'GFLOP/step':>10} {'windows/s':>9} {'GFLOP/s':>8} "
              f"{'of peak':>7} {'vs reference':>12} {'peak memory':>11}")
    for size in args.sizes:
        ref_rate, ref_params = REFERENCE[size]
        trainers = {name: Trainer(h) for name, h in DESIGNS[size].items()}
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
            rate = BATCH / step_s
            achieved = flops[name] / step_s
            params = sum(p.numel() for p in t.model.parameters())
            speedup = (rate / peak) / (ref_rate / REFERENCE_PEAK)
            print(f"{size:<6} {name:<12} {params / 1e6:>6.2f}M {flops[name] / 1e9:>10.1f} {rate:>9.1f} "
                  f"{achieved / 1e9:>8.1f} {achieved / peak:>7.1%} {speedup:>11.2f}x {memory[name] / 2**20:>9.0f} MiB")
    print(f"\npeak re-measured at the end: {matmul_peak() / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
