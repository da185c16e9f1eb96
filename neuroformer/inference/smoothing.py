"""Gaussian smoothing of tensors along chosen dimensions (spike counts in time, stimuli in space and time)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_smooth(x: torch.Tensor, sigma: float, dims: tuple[int, ...]) -> torch.Tensor:
    """``x`` (any shape) smoothed by a Gaussian of ``sigma`` samples along each of ``dims``.

    Edges are replicated, so a constant stays constant; ``sigma <= 0`` returns ``x`` unchanged.
    """
    if sigma <= 0:
        return x
    half = max(1, math.ceil(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    for d in dims:
        moved = x.movedim(d, -1)
        flat = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (half, half), mode="replicate")
        x = F.conv1d(flat, kernel).reshape(moved.shape).movedim(-1, d)
    return x
