"""Connectivity by asking the model the causal question: what does one more spike of unit i do to unit j?

For each of many real contexts (windows of a recording) and each unit i, one spike of i is
added to the window's spikes, and the model is run teacher-forced on the perturbed and on the
true window. At the scored current positions (those whose input token lies in the dt bins just
after the added spike), the next-token ID distribution gives ``log p(next spike is unit j)``;
its mean over those positions, minus the same on the true window, is the effect
``d[c, i, j]`` in context c. Where the spike is added (``site``):

* ``"window"`` (default): in the first dt bin of the current window; scored are the positions
  whose input spike lies in the next ``horizon`` seconds of bins (bins 1, 2, ...), each
  compared with the same position of the true window (one token earlier: the added token
  shifts them by one). Positions in the added spike's own bin are not scored: within a bin the
  tokens are ordered by unit, so there the next unit is constrained by the added one's index,
  which says nothing about synapses.
* ``"past"``: in the past window, in one of the dt bins ending within ``max_lag`` of the window
  (cycled over contexts and units); scored are the SOS and the positions whose input spike lies
  in the first ``horizon`` seconds of the current window. This asks the cross-attention path
  (the past-window encoder), which the models here learn later than the in-window path
  (docs/connectivity.md). If the model has a rate read-out (``ModelOutput.log_rates``: the
  expected count of every unit per dt bin of the window, from the context alone), the effect
  is the change of ``log rate_j`` averaged over those bins instead.

* ``log p`` is the right scale: the next spike is unit j with probability proportional to
  j's rate, so a synapse that multiplies j's rate by ``e^w`` moves ``log p_j`` by ``w``, minus
  a change of the normaliser that is the same for every j. That common shift (and any change
  of the end-of-window probability) is removed by subtracting, in each context, the median of
  ``d[c, i, :]`` over units.
* The estimate is the mean over contexts, ``M[i, j] = mean_c d[c, i, j]``: a strength, in the
  units of a synaptic weight. Not the z-score over contexts (mean / standard error): with more
  contexts every small systematic effect of the model becomes significant, and the z-score
  ranks significance, not strength (docs/connectivity.md: link AUROC 0.72 with z-scores over
  4000 contexts against 0.92 with means).
* Only the model's forward pass is used (``Neuroformer.forward``'s ID logits), and the
  perturbed windows are tokenised by the tokenizer itself, so the estimator follows any
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
from neuroformer.data.tokenizer import N_SPECIAL, SOS, EncodedWindows, SpikeTokenizer
from neuroformer.models.neuroformer import Neuroformer, NeuroformerInput

log = logging.getLogger(__name__)
SITES = ("window", "past")


def insertion_lags(tok: SpikeTokenizer, max_lag: float) -> np.ndarray:
    """(K,) seconds before the window of the centres of the past dt bins that end within ``max_lag`` (at least one)."""
    k = max(1, math.floor(round(max_lag / tok.resolution, 9)))
    return (np.arange(min(k, tok.n_past_bins)) + 0.5) * tok.resolution


def window_tokens(tok: SpikeTokenizer, times: np.ndarray, units: np.ndarray, start: np.ndarray, length: float,
                  max_len: int, extra_unit: np.ndarray, extra_offset: np.ndarray,
                  keep_latest: bool = False) -> EncodedWindows:
    """``tok.encode`` of the windows ``[start, start + length)``, each with one added spike.

    Args:
        times: (n,) sorted spike times, seconds. units: (n,) their vocabulary unit indices.
        start: (R,) window starts, seconds. length, max_len: as ``SpikeTokenizer.encode``'s.
        extra_unit: (R,) vocabulary unit index of the spike added to each row (-1: none).
        extra_offset: (R,) seconds after ``start`` of the added spike.
        keep_latest: a crowded window keeps its latest spikes (as the dataset encodes past windows).
    """
    R = len(start)
    # Each row's window is laid out on its own stretch of a virtual time axis, so windows that
    # overlap in real time do not see each other's added spike.
    origin = np.arange(R) * (math.ceil(length) + 1.0)
    lo = np.searchsorted(times, start, side="left")
    n = np.searchsorted(times, start + length, side="left") - lo
    row = np.repeat(np.arange(R), n)
    idx = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(n.sum())
    add = extra_unit >= 0
    v_times = np.concatenate([origin[row] + (times[idx] - start[row]), origin[add] + extra_offset[add]])
    v_units = np.concatenate([units[idx], extra_unit[add]])
    order = np.lexsort((v_units, v_times))
    return tok.encode(v_times[order], v_units[order], origin, length, max_len, keep_latest=keep_latest)


def past_tokens(tok: SpikeTokenizer, times: np.ndarray, units: np.ndarray, t0: np.ndarray,
                extra_unit: np.ndarray, extra_lag: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Past-window tokens (R, max_past_tokens) of windows starting at ``t0`` (R,), as the dataset makes them, each
    with a spike of ``extra_unit`` (-1: none) added ``extra_lag`` seconds before ``t0`` (``window_tokens``)."""
    enc = window_tokens(tok, times, units, t0 - tok.past_window, tok.past_window, tok.max_past_tokens - 1,
                        extra_unit, tok.past_window - extra_lag, keep_latest=True)
    seq = tok.past_sequences(enc)
    return torch.from_numpy(seq["past_ids"]), torch.from_numpy(seq["past_dts"])


def current_tokens(tok: SpikeTokenizer, times: np.ndarray, units: np.ndarray, t0: np.ndarray,
                   extra_unit: np.ndarray, extra_offset: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Current-window input tokens ids, dts (R, max_tokens) of windows starting at ``t0`` (R,), as the dataset makes
    them, each with a spike of ``extra_unit`` (-1: none) added ``extra_offset`` seconds after ``t0``."""
    enc = window_tokens(tok, times, units, t0, tok.window, tok.max_tokens - 1, extra_unit, extra_offset)
    seq = tok.current_sequences(enc)
    return torch.from_numpy(seq["ids"]), torch.from_numpy(seq["dts"])


def _scored_log_probs(logp: torch.Tensor, ids: torch.Tensor, dts: torch.Tensor, bins: tuple[int, int],
                      shift: torch.Tensor | None = None) -> torch.Tensor:
    """(R, U) mean of ``logp`` (R, T, U) over the positions whose input is SOS (if bin 0 is scored) or a spike in
    dt bins ``[bins[0], bins[1])``. Where ``shift`` (R,) is True, ``logp`` is the true window's and ``ids``/``dts`` the
    perturbed one's: each scored position is read one position earlier (the added token is missing there)."""
    b = dts - N_SPECIAL
    scored = ((ids >= N_SPECIAL) & (b >= bins[0]) & (b < bins[1])) | ((ids == SOS) & (bins[0] == 0))
    if shift is not None:  # position p of the true window is position p + 1 of the perturbed one
        scored = torch.where(shift[:, None], torch.cat([scored[:, 1:], scored[:, :1] & False], 1), scored)
    w = scored.to(logp.dtype)
    return (logp * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


def context_starts(t0: np.ndarray, n_contexts: int) -> np.ndarray:
    """``n_contexts`` evenly spaced window starts among ``t0`` (all of them if there are fewer)."""
    t0 = np.asarray(t0, dtype=np.float64)
    if len(t0) == 0:
        raise ValueError("perturbation: no context windows")
    return t0[np.unique(np.linspace(0, len(t0) - 1, min(n_contexts, len(t0))).round().astype(np.int64))]


@torch.no_grad()
def perturbation_effects(model: Neuroformer, spec: InputSpec, rec: Recording, t0: np.ndarray, site: str = "window",
                         horizon: float = 0.006, max_lag: float = 0.010, batch_size: int = 512,
                         log_every: float = 30.0) -> np.ndarray:
    """(C, U, U) float32 ``d[c, pre, post]``: the effect of an added spike of pre on post in context c.

    Args:
        model: a trained Neuroformer (eval mode). spec: its input spec. rec: the recording
            (units in its own order; each must be in the model's vocabulary).
        t0: (C,) context windows' starts, seconds (e.g. ``context_starts`` of a block's windows).
        site: where the spike is added, "window" or "past" (module docstring).
        horizon: seconds of dt bins scored after the added spike's bin (at least one bin).
        max_lag: "past" only: the spike is added in a past dt bin ending within this many seconds of the window.
        batch_size: model rows per forward pass (each context costs U + 1 rows).
        log_every: seconds between progress lines.
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}; got {site!r}")
    tok = spec.tokenizer
    t0 = np.asarray(t0, dtype=np.float64)
    dataset = WindowDataset([rec], spec, [t0])
    vocab_units = spec.vocab.indices(rec.units.names, rec.path)  # recording row -> vocabulary unit
    times, units = rec.units.spike_times, vocab_units[rec.units.spike_units]
    U, lags = len(vocab_units), insertion_lags(tok, max_lag)
    n_scored = max(1, math.floor(round(horizon / tok.resolution, 9)))
    bins = (1, 1 + n_scored) if site == "window" else (0, n_scored)
    device = next(model.parameters()).device
    unit_tokens = torch.as_tensor(vocab_units + N_SPECIAL, device=device)
    per_chunk = max(1, batch_size // (U + 1))
    effects = np.empty((len(t0), U, U), np.float32)
    began = last = time.perf_counter()
    for lo in range(0, len(t0), per_chunk):
        ctx = np.arange(lo, min(lo + per_chunk, len(t0)))
        base = dataset.__getitems__(ctx.tolist())
        # Rows: per context, first the true window, then one added spike of each unit.
        rep = np.repeat(np.arange(len(ctx)), U + 1)
        unit = np.tile(np.concatenate([[-1], np.arange(U)]), len(ctx))
        added = np.where(unit >= 0, vocab_units[np.maximum(unit, 0)], -1)
        pick = torch.from_numpy(rep)
        ids, dts, past_ids, past_dts = base.ids[pick], base.dts[pick], base.past_ids[pick], base.past_dts[pick]
        if site == "window":
            ids, dts = current_tokens(tok, times, units, t0[ctx[rep]], added, np.full(len(rep), tok.resolution / 2))
        else:
            lag = lags[(ctx[rep] + np.maximum(unit, 0)) % len(lags)]
            past_ids, past_dts = past_tokens(tok, times, units, t0[ctx[rep]], added, lag)
        x = NeuroformerInput(ids, dts, past_ids, past_dts, base.frames[pick] if base.frames is not None else None,
                             base.behavior[pick] if base.behavior is not None else None)
        x = NeuroformerInput(*(v.to(device) if v is not None else None for v in x))
        out = model(x)
        logp = out.id_logits.float().log_softmax(-1)[..., unit_tokens]  # (R, T, U)
        log_rates = getattr(out, "log_rates", None)  # a rate read-out's (R, n_bins, V) forecast, if the model has one
        ids, dts = x.ids, x.dts
        if site == "past" and log_rates is not None:  # it reads the context only: the past site's direct answer
            rates = log_rates[:, bins[0]:bins[1]][..., unit_tokens].float().mean(1).double().cpu().numpy()
            d = rates.reshape(len(ctx), U + 1, U)
            d = d[:, 1:] - d[:, :1]
        elif site == "window":  # score the true window at the perturbed window's positions
            true_rows = torch.from_numpy(rep * (U + 1)).to(device)
            shift = torch.from_numpy(unit >= 0).to(device)
            reference = _scored_log_probs(logp[true_rows], ids, dts, bins, shift)  # ids/dts: the perturbed rows'
            perturbed = _scored_log_probs(logp, ids, dts, bins)
            d = (perturbed - reference).double().cpu().numpy().reshape(len(ctx), U + 1, U)[:, 1:]
        else:
            logp = _scored_log_probs(logp, ids, dts, bins).double().cpu().numpy().reshape(len(ctx), U + 1, U)
            d = logp[:, 1:] - logp[:, :1]  # (C, pre, post)
        effects[ctx] = d - np.median(d, axis=2, keepdims=True)
        if time.perf_counter() - last > log_every:
            last = time.perf_counter()
            log.info("perturbation: %d/%d contexts x %d units, %.0f s", ctx[-1] + 1, len(t0), U, last - began)
    log.info("perturbation: %d contexts x %d units in %.0f s", len(t0), U, time.perf_counter() - began)
    return effects


def perturbation_influence(model: Neuroformer, spec: InputSpec, rec: Recording, t0: np.ndarray,
                           n_contexts: int = 512, **kwargs) -> np.ndarray:
    """(U, U) ``[pre, post]`` mean effect of an added spike of pre on ``log p(next spike is post)``.

    ``n_contexts`` evenly spaced windows among ``t0`` are the contexts; kwargs: ``perturbation_effects``'.
    Rows and columns are the recording's units; the diagonal is NaN.
    """
    influence = perturbation_effects(model, spec, rec, context_starts(t0, n_contexts), **kwargs).mean(0, dtype=np.float64)
    np.fill_diagonal(influence, np.nan)
    return influence
