"""Behaviour decoding scores: R^2 and Pearson r per behaviour variable.

For predictions ``y_hat`` and true values ``y`` of one variable over N samples,
``R^2 = 1 - sum (y - y_hat)^2 / sum (y - mean y)^2`` (the mean of the evaluated samples;
negative when worse than predicting that mean) and ``r`` is the Pearson correlation. Both come
from torchmetrics (``R2Score``, ``PearsonCorrCoef``), which accumulate exactly over batches.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.regression import PearsonCorrCoef, R2Score


def behavior_metrics(n_outputs: int = 1) -> MetricCollection:
    """Metrics over batches of (pred, true), each (N, n_outputs); ``compute()`` gives
    ``{"r2": (n_outputs,), "pearson_r": (n_outputs,)}`` tensors."""
    return MetricCollection({
        "r2": R2Score(multioutput="raw_values"),
        "pearson_r": PearsonCorrCoef(num_outputs=n_outputs),
    })


def _as_2d(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name}: expected (N,) or (N, n_outputs) values; got shape {tuple(t.shape)}")
    return t


def behavior_scores(pred: np.ndarray | torch.Tensor, true: np.ndarray | torch.Tensor,
                    names: list[str] | None = None) -> dict[str, float]:
    """R^2 and Pearson r of each behaviour variable, as floats keyed ``r2/<name>``, ``pearson_r/<name>``.

    Args:
        pred, true: (N,) or (N, n_outputs) predicted and true values of the same samples.
        names: variable names (default ``"0"``, ``"1"``...).
    """
    p, t = _as_2d(pred, "pred"), _as_2d(true, "true")
    if p.shape != t.shape or len(p) < 2:
        raise ValueError(f"pred {tuple(p.shape)} and true {tuple(t.shape)} must have the same shape, N >= 2")
    d = p.shape[1]
    names = names or [str(k) for k in range(d)]
    if len(names) != d:
        raise ValueError(f"{len(names)} names for {d} behaviour variables")
    metrics = behavior_metrics(d)
    metrics.set_dtype(torch.float64)
    # torchmetrics wants (N,) for a single output.
    values = metrics(p.squeeze(1), t.squeeze(1)) if d == 1 else metrics(p, t)
    return {f"{k}/{n}": float(v) for k, vs in values.items() for n, v in zip(names, vs.reshape(-1))}
