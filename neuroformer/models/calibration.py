"""Calibration of the Neuroformer's rate read-out on validation windows, once training is done.

The read-out's log-rate is a sum of paths (``RatePaths``): the attention path from the SOS hidden
state, a linear stimulus path and a linear behaviour path. Fitted to a few thousand training
windows, part of their window-to-window variation is fitted to noise: a unit the stimulus does not
drive still gets a stimulus filter, and the attention path varies more than the unit's rate does
(docs/evaluation.md measures both). A GLM meets the same problem by choosing its penalty per unit
on validation data; here each unit chooses how much of each path's variation to keep: gains
``g_a`` (attention) and ``g_s`` (stimulus) from a coarse grid, by its validation likelihood. A
shrunk path keeps its validation mean (the offset takes ``(1 - g) * mean``), so a unit's mean
rate does not move, only its modulation shrinks. With gains of 1 and offset 0 the read-out is
unchanged, which is how it trains.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from neuroformer.data.dataset import Batch
from neuroformer.data.tokenizer import N_SPECIAL
from neuroformer.models.neuroformer import MAX_LOG_RATE, Neuroformer, RatePaths

GAINS = (0.0, 0.25, 0.5, 0.75, 1.0)  # coarse on purpose: a finer grid fits the validation noise


class Calibration(NamedTuple):
    """Per-unit gains (2, V) of the attention and stimulus paths, the offset (V,), and the
    validation NLL in nats per true spike before and after (units' columns only)."""

    gain: torch.Tensor
    offset: torch.Tensor
    nll_before: float
    nll_after: float


def shrinkage_gains(paths: RatePaths, counts: torch.Tensor, gains: tuple[float, ...] = GAINS) -> Calibration:
    """Each column's pair of gains from ``gains`` x ``gains`` with the lowest Poisson NLL.

    Args:
        paths: the read-out's terms over W windows: attention (W, bins, V), stimulus and behavior (W, 1, V).
        counts: (W, bins, V) true counts.
        gains: candidate gains; ties keep the identity (1, 1).
    """
    attention, stimulus, behavior = (p.double() for p in paths)
    counts = counts.double()
    mean_a, mean_s = attention.mean((0, 1)), stimulus.mean((0, 1))  # (V,)
    centred_a, centred_s = attention - mean_a, stimulus - mean_s
    base = mean_a + mean_s + behavior

    def nll(g_a: float, g_s: float) -> torch.Tensor:  # (V,) summed over windows and bins
        log_rates = (base + g_a * centred_a + g_s * centred_s).clamp(max=MAX_LOG_RATE)
        return (log_rates.exp() - counts * log_rates).sum((0, 1))

    identity = nll(1.0, 1.0)
    best, best_gain = identity.clone(), torch.ones(2, len(identity), dtype=torch.float64)
    for g_a in gains:
        for g_s in gains:
            value = nll(g_a, g_s)
            better = value < best
            best = torch.where(better, value, best)
            best_gain[0, better], best_gain[1, better] = g_a, g_s
    offset = (1 - best_gain[0]) * mean_a + (1 - best_gain[1]) * mean_s
    spikes = counts[..., N_SPECIAL:].sum().clamp_min(1.0)
    return Calibration(best_gain.float(), offset.float(), float(identity[N_SPECIAL:].sum() / spikes),
                       float(best[N_SPECIAL:].sum() / spikes))


@torch.no_grad()
def calibrate_readout(model: Neuroformer, batches: Iterable[Batch]) -> Calibration | None:
    """Fit and set ``model``'s read-out calibration on ``batches`` (the validation windows, on the
    model's device); None, and the model unchanged, if there are none."""
    collected: list[RatePaths] = []
    counts = []
    for batch in batches:
        collected.append(RatePaths(*(p.float() for p in model.context_rate_paths(batch.inputs))))
        counts.append(batch.counts)
    if not collected:
        return None
    paths = RatePaths(*(torch.cat(p).cpu() for p in zip(*collected)))
    result = shrinkage_gains(paths, torch.cat(counts).cpu())
    model.rate_gain.copy_(result.gain)
    model.rate_offset.copy_(result.offset)
    return result
