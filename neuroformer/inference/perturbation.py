"""Connectivity by asking the model the causal question: what does one more spike of unit i do to unit j?

For each of many real contexts (windows of a recording) and each unit i, a spike of i is
inserted into the past window ``lag`` seconds before the current window (``lag`` the centre of
one of the past dt bins within ``max_lag``, cycled over contexts and units), and the model is
run on the true current window, teacher-forced. At every current position in the first
``horizon`` seconds of the window (the SOS and every spike token whose dt bin starts there),
the next-token ID distribution gives ``log p(next spike is unit j)``; its mean over those
positions, minus the same without the inserted spike, is the effect ``d[c, i, j]`` in context c.

* ``log p`` is the right scale: the next spike is unit j with probability proportional to
  j's rate, so a synapse that multiplies j's rate by ``e^w`` moves ``log p_j`` by ``w``, minus
  a change of the normaliser that is the same for every j. That common shift (and any change
  of the end-of-window probability) is removed by subtracting, in each context, the median of
  ``d[c, i, :]`` over units.
* The estimate is the z-score over contexts, ``M[i, j] = mean_c d / (std_c d / sqrt(n))``:
  a link is an effect that is consistent across contexts, not one large effect in a few.
* Only the model's forward pass is used (``Neuroformer.forward``'s ID logits), and the
  perturbed past windows are tokenised by the tokenizer itself, so the estimator follows any
  change of the architecture or of the tokenisation rules.

``perturbation_influence`` returns ``M`` (U, U) ``[pre, post]`` over the recording's units, to
score with ``neuroformer.metrics.links.score_links``.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from neuroformer.data.dataset import InputSpec, WindowDataset
from neuroformer.data.recording import Recording
from neuroformer.data.tokenizer import N_SPECIAL, PAD, SOS, SpikeTokenizer
from neuroformer.models.neuroformer import Neuroformer, NeuroformerInput

log = logging.getLogger(__name__)


def insertion_lags(tok: SpikeTokenizer, max_lag: float) -> np.ndarray:
    """(K,) seconds before the window of the centres of the past dt bins that end within ``max_lag`` (at least one)."""
    k = max(1, math.floor(round(max_lag / tok.resolution, 9)))
    return (np.arange(min(k, tok.n_past_bins)) + 0.5) * tok.resolution


def past_tokens(tok: SpikeTokenizer, times: np.ndarray, units: np.ndarray, t0: np.ndarray,
                extra_unit: np.ndarray, extra_lag: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Past-window tokens of windows starting at ``t0``, each with one added spike, tokenised as the dataset does.

    Args:
        times: (n,) sorted spike times, seconds. units: (n,) their vocabulary unit indices.
        t0: (R,) current-window starts, seconds.
        extra_unit: (R,) vocabulary unit index of the spike added to each row's past (-1: none).
        extra_lag: (R,) seconds before ``t0`` of the added spike.

    Returns:
        past_ids, past_dts (R, max_past_tokens) int64.
    """
    pw, R = tok.past_window, len(t0)
    # Each row's past window is laid out on its own stretch of a virtual time axis, so windows
    # that overlap in real time do not see each other's added spike.
    stride = math.ceil(pw) + 1.0
    origin = np.arange(R) * stride
    lo = np.searchsorted(times, t0 - pw, side="left")
    n = np.searchsorted(times, t0, side="left") - lo
    row = np.repeat(np.arange(R), n)
    idx = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(n.sum())
    add = extra_unit >= 0
    v_times = np.concatenate([origin[row] + (times[idx] - (t0[row] - pw)), origin[add] + pw - extra_lag[add]])
    v_units = np.concatenate([units[idx], extra_unit[add]])
    order = np.lexsort((v_units, v_times))
    enc = tok.encode(v_times[order], v_units[order], origin, pw, tok.max_past_tokens - 1)
    seq = tok.past_sequences(enc)
    return torch.from_numpy(seq["past_ids"]), torch.from_numpy(seq["past_dts"])


def _early_log_probs(model: Neuroformer, x: NeuroformerInput, horizon_bins: int, unit_tokens: torch.Tensor
                     ) -> torch.Tensor:
    """(R, U) mean over the early current positions of ``log p(next ID = unit)`` (module docstring)."""
    logp = model(x).id_logits.float().log_softmax(-1)[..., unit_tokens]  # (R, T, U)
    bins = x.dts - N_SPECIAL
    early = (x.ids == SOS) | ((x.ids != PAD) & (x.ids >= N_SPECIAL) & (bins >= 0) & (bins < horizon_bins))
    w = early.to(logp.dtype)
    return (logp * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


def context_starts(t0: np.ndarray, n_contexts: int) -> np.ndarray:
    """``n_contexts`` evenly spaced window starts among ``t0`` (all of them if there are fewer)."""
    t0 = np.asarray(t0, dtype=np.float64)
    if len(t0) == 0:
        raise ValueError("perturbation: no context windows")
    return t0[np.unique(np.linspace(0, len(t0) - 1, min(n_contexts, len(t0))).round().astype(np.int64))]


@torch.no_grad()
def perturbation_effects(model: Neuroformer, spec: InputSpec, rec: Recording, t0: np.ndarray,
                         max_lag: float = 0.010, horizon: float = 0.010, batch_size: int = 512,
                         log_every: float = 30.0) -> np.ndarray:
    """(C, U, U) float32 ``d[c, pre, post]``: the effect of an added spike of pre on post in context c.

    Args:
        model: a trained Neuroformer (eval mode). spec: its input spec. rec: the recording
            (units in its own order; each must be in the model's vocabulary).
        t0: (C,) context windows' starts, seconds (e.g. ``context_starts`` of a block's windows).
        max_lag: the spike is added in a past dt bin ending within this many seconds of the window.
        horizon: positions whose input spike (or SOS) lies in the window's first ``horizon``
            seconds are scored (at least the first dt bin).
        batch_size: model rows per forward pass (each context costs U + 1 rows).
        log_every: seconds between progress lines.
    """
    tok = spec.tokenizer
    t0 = np.asarray(t0, dtype=np.float64)
    dataset = WindowDataset([rec], spec, [t0])
    vocab_units = spec.vocab.indices(rec.units.names, rec.path)  # recording row -> vocabulary unit
    times, units = rec.units.spike_times, vocab_units[rec.units.spike_units]
    U, lags = len(vocab_units), insertion_lags(tok, max_lag)
    horizon_bins = max(1, math.floor(round(horizon / tok.resolution, 9)))
    device = next(model.parameters()).device
    unit_tokens = torch.as_tensor(vocab_units + N_SPECIAL, device=device)
    per_chunk = max(1, batch_size // (U + 1))
    effects = np.empty((len(t0), U, U), np.float32)
    began = last = time.perf_counter()
    for lo in range(0, len(t0), per_chunk):
        ctx = np.arange(lo, min(lo + per_chunk, len(t0)))
        base = dataset.__getitems__(ctx.tolist())
        # Rows: per context, first the unperturbed past, then one added spike of each unit.
        rep = np.repeat(np.arange(len(ctx)), U + 1)
        unit = np.tile(np.concatenate([[-1], np.arange(U)]), len(ctx))
        lag = lags[(ctx[rep] + np.maximum(unit, 0)) % len(lags)]
        past_ids, past_dts = past_tokens(tok, times, units, t0[ctx[rep]], np.where(unit >= 0, vocab_units[unit], -1),
                                         lag)
        pick = torch.from_numpy(rep)
        x = NeuroformerInput(base.ids[pick], base.dts[pick], past_ids, past_dts,
                             base.frames[pick] if base.frames is not None else None,
                             base.behavior[pick] if base.behavior is not None else None)
        x = NeuroformerInput(*(v.to(device) if v is not None else None for v in x))
        logp = _early_log_probs(model, x, horizon_bins, unit_tokens).double().cpu().numpy().reshape(len(ctx), U + 1, U)
        d = logp[:, 1:] - logp[:, :1]  # (C, pre, post)
        effects[ctx] = d - np.median(d, axis=2, keepdims=True)
        if time.perf_counter() - last > log_every:
            last = time.perf_counter()
            log.info("perturbation: %d/%d contexts x %d units, %.0f s", ctx[-1] + 1, len(t0), U, last - began)
    log.info("perturbation: %d contexts x %d units in %.0f s", len(t0), U, time.perf_counter() - began)
    return effects


def z_score(total: np.ndarray, total_sq: np.ndarray, n: float) -> np.ndarray:
    """(U, U) mean / standard error over contexts from the sums of ``d`` and ``d**2`` over n contexts; NaN diagonal."""
    mean = total / n
    sd = np.sqrt(np.maximum(total_sq / n - mean ** 2, 0.0) * n / max(n - 1, 1))
    z = mean / np.maximum(sd, 1e-12) * math.sqrt(n)
    np.fill_diagonal(z, np.nan)
    return z


def perturbation_influence(model: Neuroformer, spec: InputSpec, rec: Recording, t0: np.ndarray,
                           n_contexts: int = 512, **kwargs) -> np.ndarray:
    """(U, U) ``[pre, post]`` z-scored effect of an added spike of pre on post's next-spike probability.

    ``n_contexts`` evenly spaced windows among ``t0`` are the contexts; kwargs: ``perturbation_effects``'.
    Rows and columns are the recording's units; the diagonal is NaN.
    """
    d = perturbation_effects(model, spec, rec, context_starts(t0, n_contexts), **kwargs).astype(np.float64)
    return z_score(d.sum(0), (d ** 2).sum(0), len(d))
