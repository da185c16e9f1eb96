"""Behaviour read-outs on top of a (pretrained) Neuroformer.

``window_features`` runs the Neuroformer once and returns, with its usual next-token logits,
one feature vector per window: the final-layer hidden states (after ``ln_f``) averaged over the
window's real current tokens. Each of those states has attended causally to the current
window's spikes and, through cross-attention, to the past window and the stimulus (and any
behaviour inputs), so the average summarises the window as the model sees it.

``BehaviorHead`` maps that vector to behaviour outputs (regression values or class logits).
"""

from __future__ import annotations

import torch
from torch import nn

from neuroformer.data.tokenizer import PAD
from neuroformer.models.neuroformer import ModelOutput, Neuroformer, NeuroformerInput, masked_mean


def window_features(backbone: Neuroformer, x: NeuroformerInput) -> tuple[ModelOutput, torch.Tensor]:
    """Next-token outputs and pooled window features in one forward pass.

    Args:
        backbone: the Neuroformer.
        x: the windows' tokens and context.

    Returns:
        the model's outputs (id_logits (B, T, V), dt_logits (B, T, V_dt)) and features (B, C):
        the final hidden states (``Neuroformer.features``) averaged over positions whose input
        token is not PAD.
    """
    f = backbone.features(x)
    return backbone.heads(f.hidden, x), masked_mean(f.hidden, x.ids != PAD)


class BehaviorHead(nn.Module):
    """Window features (B, C) -> behaviour outputs (B, n_outputs).

    Args:
        n_embd: feature width C (the backbone's ``n_embd``).
        n_outputs: regression dimensions, or number of classes.
        hidden: width of one hidden GELU layer; 0 gives a linear read-out.
        dropout: dropout on the features during training.
    """

    def __init__(self, n_embd: int, n_outputs: int, hidden: int = 0, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(n_embd, hidden), nn.GELU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden or n_embd, n_outputs))
        self.net = nn.Sequential(*layers)
        self.config = {"n_embd": n_embd, "n_outputs": n_outputs, "hidden": hidden, "dropout": dropout}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
