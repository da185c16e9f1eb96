"""Spike-set precision, recall and F1 per window: generated versus true spikes.

Both spike sets are binned counts of the same windows, shaped (B, n_bins, U) (generated
spikes are on the tokenizer's dt grid already; bin the true spikes the same way, e.g. with
``neuroformer.metrics.rates.bin_spikes``). A generated spike matches a true spike of the
same unit in the same window at most ``tolerance`` bins away, each spike at most once; the
number of matches is the largest such one-to-one matching. In each window b, with M_b matches,
N_b true and G_b generated spikes:

    precision_b = M_b / G_b,   recall_b = M_b / N_b,   F1_b = 2 M_b / (N_b + G_b)

(undefined, and left out of the averages, for windows without generated spikes, without true
spikes, and without either, respectively). ``SpikeSetF1`` reports their means over windows and
the pooled values (sum of matches over sum of counts).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric


def matched_counts(pred: np.ndarray | torch.Tensor, true: np.ndarray | torch.Tensor, tolerance: int) -> torch.Tensor:
    """(B, U) size of the maximum matching of each window's and unit's spikes within ``tolerance`` bins.

    Greedy in time order, which is optimal for points on a line matched within a fixed
    distance: the oldest unmatched spike, which expires first, takes the earliest spike of the
    other set within reach. Unmatched spikes carried over from earlier bins are therefore all of
    one kind (true or generated), kept per age 1..tolerance.

    Args:
        pred, true: (B, n_bins, U) non-negative integer spike counts.
        tolerance: largest bin distance of a match (0: same bin only).
    """
    p_all, t_all = torch.as_tensor(pred).long(), torch.as_tensor(true).long()
    if p_all.shape != t_all.shape or p_all.ndim != 3:
        raise ValueError(f"pred {tuple(p_all.shape)} and true {tuple(t_all.shape)} must both be (B, n_bins, U)")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 bins; got {tolerance}")
    B, n_bins, U = p_all.shape
    carry_true = torch.zeros(B, U, tolerance, dtype=torch.long)  # [..., a - 1]: unmatched from bin j - a
    carry_pred = torch.zeros(B, U, tolerance, dtype=torch.long)
    matched = torch.zeros(B, U, dtype=torch.long)
    for j in range(n_bins):
        t, p = t_all[:, j].clone(), p_all[:, j].clone()
        for age in range(tolerance, 0, -1):  # oldest first
            m = torch.minimum(carry_true[..., age - 1], p)
            carry_true[..., age - 1] -= m
            p -= m
            matched += m
            m = torch.minimum(carry_pred[..., age - 1], t)
            carry_pred[..., age - 1] -= m
            t -= m
            matched += m
        m = torch.minimum(t, p)
        matched += m
        if tolerance:
            carry_true = torch.cat([(t - m)[..., None], carry_true[..., :-1]], dim=-1)
            carry_pred = torch.cat([(p - m)[..., None], carry_pred[..., :-1]], dim=-1)
    return matched


class SpikeSetF1(Metric):
    """Spike-set precision/recall/F1 per window (see the module docstring), over batches.

    Args:
        tolerance: largest bin distance between matched spikes.

    ``compute()`` returns a dict of scalars: ``precision``, ``recall``, ``f1`` (means over
    windows where defined), ``pooled_precision``, ``pooled_recall``, ``pooled_f1``, ``windows``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    NAMES = ("precision", "recall", "f1")

    def __init__(self, tolerance: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.tolerance = tolerance
        f64 = torch.float64
        for name in (*self.NAMES, *(f"n_{k}" for k in self.NAMES), "matched", "n_true", "n_pred", "windows"):
            self.add_state(name, default=torch.zeros((), dtype=f64), dist_reduce_fx="sum")

    def update(self, pred: np.ndarray | torch.Tensor, true: np.ndarray | torch.Tensor) -> None:
        """Add windows: ``pred`` and ``true`` (B, n_bins, U) spike counts of the same windows."""
        m = matched_counts(pred, true, self.tolerance).sum(1).double().to(self.device)  # (B,)
        g = torch.as_tensor(pred).sum(dim=(1, 2)).double().to(self.device)
        n = torch.as_tensor(true).sum(dim=(1, 2)).double().to(self.device)
        for name, num, den in (("precision", m, g), ("recall", m, n), ("f1", 2 * m, n + g)):
            ok = den > 0
            setattr(self, name, getattr(self, name) + (num[ok] / den[ok]).sum())
            setattr(self, f"n_{name}", getattr(self, f"n_{name}") + ok.sum())
        self.matched += m.sum()
        self.n_true += n.sum()
        self.n_pred += g.sum()
        self.windows += len(m)

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        ratio = lambda a, b: a / b if b > 0 else nan  # noqa: E731
        out = {k: ratio(getattr(self, k), getattr(self, f"n_{k}")) for k in self.NAMES}
        out["pooled_precision"] = ratio(self.matched, self.n_pred)
        out["pooled_recall"] = ratio(self.matched, self.n_true)
        out["pooled_f1"] = ratio(2 * self.matched, self.n_true + self.n_pred)
        out["windows"] = self.windows
        return out


def spike_set_scores(pred: np.ndarray | torch.Tensor, true: np.ndarray | torch.Tensor, tolerance: int = 1
                     ) -> dict[str, float]:
    """``SpikeSetF1`` of one set of windows, as plain floats."""
    metric = SpikeSetF1(tolerance, sync_on_compute=False)  # local arrays: never gathered across ranks
    metric.update(pred, true)
    return {k: float(v) for k, v in metric.compute().items()}
