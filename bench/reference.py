"""The reference Neuroformer's shapes and our designs at its parameter counts (issue 16).

Shared by ``bench/reference_shapes.py`` (training) and ``bench/generation.py --reference-shapes``
(sampling). The reference (a-antoniades/Neuroformer) was measured on a machine whose fp32 matmul
peak was 198 GFLOP/s; its speeds are compared here as fractions of the peak measured in the same
run (``bench/peak.py``).

Shapes: ID vocabulary 2026, current block 100 tokens (40 real in training), past block 700 (430
real), 3 stimulus frames of 30 x 100 pixels in (1, 15, 5) patches (120 tokens; the reference has
121), 1 behaviour variable x 8 steps, batch 8 for training.

Designs (``DESIGNS[size][name]``, each at about the reference's parameter count):

- ``tokens``: every decoder block cross-attends to all context tokens (the reference's layout);
- ``latents``: the context is read once into 32 latents (PerceiverIO), most parameters sit in
  self-attention blocks over those latents, and a few decoder blocks cross-attend to them;
- ``latents+past``: the same, and the decoder also attends to every past token through one
  shared key/value projection;
- ``latents+past/2``: the same with half the decoder blocks (their parameters moved to latent
  blocks): each generated token streams half the weights (the default model's design since
  2026-12-07: 2 decoder and 5 latent blocks).
"""

from __future__ import annotations

import torch

from neuroformer.data.tokenizer import N_SPECIAL, PAD, SOS
from neuroformer.models.neuroformer import Neuroformer, NeuroformerConfig, NeuroformerInput

ID_VOCAB, DT_VOCAB = 2026, 33
BLOCK, CURRENT_REAL = 100, 40
PAST, PAST_REAL = 700, 430
FRAMES, PATCH = (3, 30, 100), (1, 15, 5)
BEHAVIOR_STEPS = 8
N_BINS = 10  # dt bins of a current window, for sampling
TRAINING_BATCH = 8
REFERENCE_PEAK = 198e9  # fp32 matmul FLOP/s of the machine the reference was measured on
REFERENCE_TRAINING = {"full": (4.6, 25.1e6), "small": (29.8, 2.65e6)}  # windows/s, parameters
REFERENCE_GENERATION = {"full": 16.6, "small": 83.5}  # tokens/s at batch 1, a full forward per token


def _designs(width: int, heads: int, token_layers: int, latent: tuple[int, int], half: tuple[int, int]) -> dict:
    """The four designs of one size; ``latent`` and ``half`` are (decoder blocks, latent blocks)."""
    base = dict(n_embd=width, n_head=heads)
    with_latents = dict(base, n_context_layer=0, n_latents=32)
    return {
        "tokens": dict(base, n_layer=token_layers),
        "latents": dict(with_latents, n_layer=latent[0], n_latent_layer=latent[1]),
        "latents+past": dict(with_latents, n_layer=latent[0], n_latent_layer=latent[1], past_direct=True),
        "latents+past/2": dict(with_latents, n_layer=half[0], n_latent_layer=half[1], past_direct=True),
    }


DESIGNS = {  # each at about the reference's parameter count (25.1M full, 2.65M small)
    "full": _designs(256, 8, token_layers=20, latent=(4, 23), half=(2, 26)),
    "small": _designs(128, 4, token_layers=5, latent=(2, 6), half=(1, 7)),
}


def build(size: str, design: str, seed: int = 0) -> Neuroformer:
    """Our model at the reference shapes with random weights, in training mode."""
    return build_sized(DESIGNS[size][design], seed)


def build_sized(sizes: dict, seed: int = 0) -> Neuroformer:
    """A model at the reference shapes with the given ``NeuroformerConfig`` sizes (width, blocks, ...)."""
    torch.manual_seed(seed)
    cfg = NeuroformerConfig(id_vocab_size=ID_VOCAB, dt_vocab_size=DT_VOCAB, block_size=BLOCK, past_block_size=PAST,
                            n_frames=FRAMES[0], frame_shape=FRAMES[1:], patch=PATCH, n_behavior=1,
                            behavior_steps=BEHAVIOR_STEPS, dropout=0.1, **sizes)
    return Neuroformer(cfg).train()


def _sequence(g: torch.Generator, batch: int, length: int, real: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, length) ``[SOS, real random spikes in time order, PAD..]`` ID and dt tokens."""
    ids = torch.full((batch, length), PAD, dtype=torch.long)
    dts = torch.full((batch, length), PAD, dtype=torch.long)
    ids[:, 0] = dts[:, 0] = SOS
    ids[:, 1 : real + 1] = torch.randint(N_SPECIAL, ID_VOCAB, (batch, real), generator=g)
    dts[:, 1 : real + 1] = torch.randint(N_SPECIAL, DT_VOCAB, (batch, real), generator=g).sort(dim=1).values
    return ids, dts


def windows(batch: int, current_real: int = CURRENT_REAL, seed: int = 0) -> NeuroformerInput:
    """Random valid windows: current and past token blocks, frames (B, 3, 30, 100), behaviour (B, 8, 1)."""
    g = torch.Generator().manual_seed(seed)
    ids, dts = _sequence(g, batch, BLOCK, current_real)
    past_ids, past_dts = _sequence(g, batch, PAST, PAST_REAL)
    return NeuroformerInput(ids, dts, past_ids, past_dts, torch.randn(batch, *FRAMES, generator=g),
                            torch.randn(batch, BEHAVIOR_STEPS, 1, generator=g))
