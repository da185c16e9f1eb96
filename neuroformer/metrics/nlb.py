"""Bits per spike, as the Neural Latents Benchmark (NLB; Pei et al. 2021) defines it.

For predicted rates ``r`` (expected spike counts per bin, not Hz) and observed counts ``s``
of the same bins, pooled over all trials, bins and units:

    bits/spike = (NLL_null - NLL_model) / (total spike count * ln 2)

where ``NLL(r) = sum r - s log r + log s!`` is the Poisson negative log-likelihood and the
null model gives each unit its mean count per bin over all evaluated trials and bins. As in
NLB: bins whose observed count is NaN are left out everywhere (both NLLs, the null rate, the
spike count); predicted rates that are exactly 0 are floored to 1e-9 (a unit with no spikes
gets a null rate of 1e-9 likewise); negative or NaN predicted rates at kept bins are an
error. Positive means better than the per-unit mean rate; 0 is the null model itself.

The ``log s!`` terms are the same in both NLLs and cancel, so the metric only keeps, per
unit, the kept-bin count and the spike sum (for the null) and the model's ``sum r - s log r``:
it accumulates exactly over batches.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics import Metric

RATE_FLOOR = 1e-9


def _float64(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64)
    return torch.from_numpy(np.array(x, dtype=np.float64)).to(device)  # a copy: the input may be read-only


class BitsPerSpike(Metric):
    """NLB bits per spike, accumulated over batches of (rates, spikes).

    Args:
        n_units: number of units U (the last axis of every update).
        floor: what predicted rates of exactly 0 are replaced by (NLB: 1e-9).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, n_units: int, floor: float = RATE_FLOOR, **kwargs):
        super().__init__(**kwargs)
        self.n_units, self.floor = n_units, floor
        f64 = torch.float64
        self.add_state("model_nll", default=torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("spike_sum", default=torch.zeros(n_units, dtype=f64), dist_reduce_fx="sum")
        self.add_state("bin_count", default=torch.zeros(n_units, dtype=f64), dist_reduce_fx="sum")

    def update(self, rates: np.ndarray | torch.Tensor, spikes: np.ndarray | torch.Tensor) -> None:
        """Add bins.

        Args:
            rates: (..., U) predicted expected counts per bin, >= 0 (any leading axes:
                trials, bins).
            spikes: (..., U) observed counts of the same bins, NaN where a bin is to be
                left out.
        """
        r, s = _float64(rates, self.device), _float64(spikes, self.device)
        if r.shape != s.shape or r.shape[-1:] != (self.n_units,):
            raise ValueError(f"rates {tuple(r.shape)} and spikes {tuple(s.shape)} must have the same shape "
                             f"(..., U) with U = {self.n_units} units")
        keep = ~torch.isnan(s)
        if torch.isnan(r[keep]).any() or (r[keep] < 0).any():
            raise ValueError("rates: predicted rates must be >= 0 and not NaN wherever spikes are not NaN")
        r = torch.where(r == 0, torch.as_tensor(self.floor, dtype=r.dtype, device=r.device), r)
        # Model NLL without log s! (it cancels against the null's).
        self.model_nll += torch.where(keep, r - s * torch.log(r), 0.0).sum()
        self.spike_sum += torch.where(keep, s, 0.0).reshape(-1, self.n_units).sum(0)
        self.bin_count += keep.reshape(-1, self.n_units).sum(0)

    def compute(self) -> torch.Tensor:
        """Scalar bits per spike (NaN if no spike was observed)."""
        total = self.spike_sum.sum()
        if total <= 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        null_rate = self.spike_sum / self.bin_count.clamp(min=1)
        null_rate = torch.where(null_rate == 0, torch.as_tensor(self.floor, dtype=null_rate.dtype), null_rate)
        # Over a unit's kept bins the null NLL is n * r0 - S * log r0 (same rate in every bin).
        null_nll = (self.bin_count * null_rate - self.spike_sum * torch.log(null_rate)).sum()
        return (null_nll - self.model_nll) / (total * math.log(2))


def bits_per_spike(rates: np.ndarray | torch.Tensor, spikes: np.ndarray | torch.Tensor) -> float:
    """NLB bits per spike of ``rates`` (..., U) against ``spikes`` (..., U); see the module docstring."""
    # Local arrays: never gathered across ranks, even inside a distributed job.
    metric = BitsPerSpike(n_units=int(np.shape(spikes)[-1]), sync_on_compute=False)
    metric.update(rates, spikes)
    return float(metric.compute())
