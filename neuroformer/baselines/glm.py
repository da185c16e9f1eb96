"""A coupled Poisson GLM: the strong simple baseline, fitted on the training block of any recording.

Each unit's spike count in a ``resolution`` bin is Poisson with log-rate

    eta_u(t) = b_u + sum_lag frames(t - lag) . K_u[lag]         stimulus filter (if the file has frames)
                   + sum_v sum_k<Kc H_vk(t) W[v, k, u]           coupling and short self-history (v = u)
                   + sum_k>=Kc H_uk(t) h[u, k]                   long self-history
                   + behaviour(t) . g_u                          running speed and any behaviour series

* Stimulus: frames block-averaged to at most ``frame_size`` pixels a side, z-scored per pixel,
  over the ``frame_lags`` frames up to the one on screen at the bin's centre.
* History: ``H_vk(t)`` counts unit v's spikes ``l`` bins before t for the lags ``l`` of basis box k:
  boxes of doubling width, ``{1}, {2}, {3, 4}, {5..8}, ...`` up to ``history`` seconds. Boxes within
  ``coupling`` seconds couple every pair; longer ones only a unit to itself (Pillow et al. 2008), so
  a slow rate change is followed at little cost.
* Behaviour: each series' value at the bin's centre, z-scored.

Fitting: L-BFGS on the mean Poisson negative log-likelihood of the training bins plus an L2
penalty on the weights of z-scored features (all but the bias), for each penalty of a grid from
strong to weak (warm starts) until the validation likelihood gets worse; each unit keeps the
penalty with its best validation likelihood (units are independent given the data, so this is a
per-unit choice).

Forecast (``expected_counts``): like the Neuroformer, a window is predicted from its true past
and the true stimulus and behaviour; the GLM is autoregressive, so it runs through the window
bin by bin, S simulations at once, each drawing its counts (Poisson), and the expected count of a
bin is the mean over simulations of the rate given the simulated past (Rao-Blackwellised, as the
oracle). A fitted GLM with self-exciting history can run away when simulated (Gerhard et al.
2017, PLoS Comput Biol): sampled counts are capped at the unit's largest training count and
log-rates at the largest the GLM gives any training bin.

Connectivity (``coupling_strength``): the coupling kernel summed over lags up to 10 ms,
``[pre, post]``, to score with ``neuroformer.inference.connectivity.score_links``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuroformer.data.recording import FrameSeries, Intervals, Recording
from neuroformer.data.splits import SplitSpec
from neuroformer.data.tokenizer import SpikeTokenizer
from neuroformer.errors import RecordingError
from neuroformer.files import atomic_path
from neuroformer.data.tokenizer import bin_spikes

log = logging.getLogger(__name__)
MAX_ETA = 20.0  # log-rate cap while fitting: a line search's wild step must not overflow


@dataclass(frozen=True)
class GLMConfig:
    """What the GLM sees and how it is fitted.

    Attributes:
        resolution: bin width, seconds (the tokenizer's dt bins for a comparable forecast).
        history: longest self-history lag, seconds (at most the model's past window).
        coupling: longest lag at which units couple to each other, seconds.
        frame_lags: stimulus frames in the filter, the one on screen included.
        frame_size: frames are block-averaged to at most this many pixels a side.
        behavior: behaviour series to use; None: every series of the recording.
        penalties: L2 penalties tried, strongest first, until the mean validation likelihood gets worse;
            each unit keeps its best on validation.
        max_iter: L-BFGS iterations per penalty.
    """

    resolution: float = 0.005
    history: float = 0.15
    coupling: float = 0.02
    frame_lags: int = 6
    frame_size: int = 8
    behavior: tuple[str, ...] | None = None
    penalties: tuple[float, ...] = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)
    max_iter: int = 50

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.history < self.resolution or self.frame_lags < 1 or self.frame_size < 1:
            raise ValueError(f"need resolution > 0, history >= resolution, frame_lags >= 1, frame_size >= 1: {self}")
        if not self.penalties or min(self.penalties) < 0:
            raise ValueError(f"penalties must be a non-empty list of values >= 0; got {self.penalties}")

    @property
    def n_lags(self) -> int:
        return round(self.history / self.resolution)

    @property
    def basis(self) -> np.ndarray:
        """(K, n_lags) history boxes (``history_basis``)."""
        return history_basis(self.n_lags)

    @property
    def n_coupling(self) -> int:
        """Kc: the first Kc boxes, those within ``coupling`` seconds (at least one), couple every pair."""
        within = round(self.coupling / self.resolution)
        last_lag = self.basis.shape[1] - np.argmax(self.basis[:, ::-1], axis=1)  # each box's longest lag
        return max(1, int((last_lag <= within).sum()))


def history_basis(n_lags: int) -> np.ndarray:
    """(K, n_lags) 0/1 boxes over lags 1..n_lags bins: {1}, {2}, {3, 4}, {5..8}, ... (the last cut at n_lags)."""
    edges = [1, 2]
    while edges[-1] <= n_lags:
        edges.append(2 * edges[-1] - 1)
    lags = np.arange(1, n_lags + 1)
    return np.stack([(lags >= a) & (lags < b) for a, b in zip(edges[:-1], edges[1:])]).astype(np.float32)


def split_spans(rec: Recording, split: SplitSpec, name: str, restrict_to: Intervals | None = None) -> np.ndarray:
    """(n, 2) [start, stop) seconds of the blocks of ``split`` assigned to ``name`` (``SplitSpec.blocks``),
    intersected with ``restrict_to``'s intervals if given."""
    spans = np.stack(split.blocks(rec.start, rec.stop, name), axis=1)
    if restrict_to is None or not len(restrict_to):
        return spans
    lo = np.maximum(spans[:, None, 0], restrict_to.start[None])
    hi = np.minimum(spans[:, None, 1], restrict_to.stop[None])
    keep = hi > lo
    out = np.stack([lo[keep], hi[keep]], axis=1)
    return out[np.argsort(out[:, 0])]


class _Features:
    """Exogenous inputs of a recording at any times: lagged stimulus frames and behaviour, z-scored."""

    def __init__(self, rec: Recording, cfg: GLMConfig, names: list[str], fit_times: np.ndarray | None = None,
                 stats: dict[str, np.ndarray] | None = None):
        """Behaviour series ``names``; normalisation from ``stats`` (a fitted model's) or from the inputs at
        ``fit_times`` (training bins)."""
        self.cfg, self.rec, self.names = cfg, rec, list(names)
        for name in self.names:
            if name not in rec.behavior:
                raise RecordingError(rec.path, f"behavior/{name}", f"not found; the file has {sorted(rec.behavior)}")
        self.lagged = None  # (n_frames + 1, frame_lags * P): row 0 is a blank screen, frame i is row i + 1
        if rec.stimulus is not None:
            pixels = _downsample(rec.stimulus, cfg.frame_size)
            if stats is None:
                shown = np.unique(rec.stimulus.index_at(fit_times))
                stats = {"pixel_mean": pixels[shown[shown >= 0]].mean(0),
                         "pixel_std": pixels[shown[shown >= 0]].std(0) + 1e-6}
            z = np.concatenate([np.zeros((1, pixels.shape[1]), np.float32),
                                (pixels - stats["pixel_mean"]) / stats["pixel_std"]])
            self.lagged = np.concatenate([np.concatenate([np.zeros((lag, z.shape[1]), np.float32), z[: len(z) - lag]])
                                          for lag in range(cfg.frame_lags)], axis=1).astype(np.float32)
        if self.names:
            if stats is None or "behavior_mean" not in stats:
                raw = self._raw_behavior(fit_times)
                stats = {**(stats or {}), "behavior_mean": np.nanmean(raw, 0), "behavior_std": np.nanstd(raw, 0) + 1e-6}
        self.stats = stats or {}

    @property
    def n_behavior(self) -> int:
        return len(self.stats.get("behavior_mean", ()))

    def frame_rows(self, times: np.ndarray) -> np.ndarray:
        """(n,) row of ``lagged`` on screen at each time (0: before the first frame)."""
        return self.rec.stimulus.index_at(times) + 1

    def _raw_behavior(self, times: np.ndarray) -> np.ndarray:
        return np.concatenate([self.rec.behavior[n].at(times) for n in self.names], axis=1).astype(np.float32)

    def behavior(self, times: np.ndarray) -> np.ndarray:
        """(n, V) z-scored behaviour at ``times`` (V = 0 without behaviour); 0 (the mean) where the
        behaviour was not recorded: a GLM has no notion of a missing input."""
        if not self.names:
            return np.zeros((len(times), 0), np.float32)
        z = (self._raw_behavior(times) - self.stats["behavior_mean"]) / self.stats["behavior_std"]
        return np.nan_to_num(z, nan=0.0).astype(np.float32)


def _downsample(frames: FrameSeries, size: int) -> np.ndarray:
    """(n_frames, P) float32 block-averaged pixels, at most ``size`` blocks a side (edges cropped)."""
    H, W = frames.frame_shape
    fy, fx = max(1, math.ceil(H / size)), max(1, math.ceil(W / size))
    h, w = H // fy, W // fx
    out = []
    for lo in range(0, frames.n_frames, 4096):  # a long movie never has to fit in memory at full size
        x = frames.read(lo, min(lo + 4096, frames.n_frames))[:, : h * fy, : w * fx]
        out.append(x.reshape(len(x), h, fy, w, fx).mean(axis=(2, 4)).reshape(len(x), h * w))
    return np.concatenate(out).astype(np.float32)


def _history_features(counts: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """(T - L, U, K) float32 features of bins L.. of ``counts`` (T, U): unit v's spikes at box k's lags."""
    L, T = basis.shape[1], len(counts)
    csum = np.concatenate([np.zeros((1, counts.shape[1])), np.cumsum(counts, axis=0, dtype=np.float64)])
    t = np.arange(L, T)
    out = []
    for box in basis:
        lags = np.flatnonzero(box) + 1  # counts[t - b .. t - a]
        out.append(csum[t - lags.min() + 1] - csum[t - lags.max()])
    return np.stack(out, axis=2).astype(np.float32)


def _binned(rec: Recording, spans: np.ndarray, cfg: GLMConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bins of ``spans``, each cut into bins from its start; the first history-length bins only feed the history.

    Returns:
        counts (T, U) float32, history features (T, U, K) float32 (raw counts), bin centres (T,) seconds.
    """
    res, U, L = cfg.resolution, rec.units.n_units, cfg.n_lags
    counts, history, centres = [], [], []
    for lo, hi in spans:
        n = int(np.floor((hi - lo) / res + 1e-9))
        if n <= L:
            continue
        tok = SpikeTokenizer(window=n * res, past_window=res, resolution=res)
        c = bin_spikes(rec.units.spike_times, rec.units.spike_units, np.array([lo]), tok, U)[0][:n]
        counts.append(c[L:].astype(np.float32))
        history.append(_history_features(c, cfg.basis))
        centres.append(lo + (np.arange(L, n) + 0.5) * res)
    if not counts:
        raise RecordingError(rec.path, "units", f"no bins: every span is shorter than the {cfg.history} s history")
    return np.concatenate(counts), np.concatenate(history), np.concatenate(centres)


@dataclass
class CoupledGLM:
    """A fitted coupled Poisson GLM (module docstring).

    Attributes:
        config: how it was fitted.
        bias: (U,) log of the count per bin with every input at its mean and no recent spikes.
        stimulus: (frame_lags * P, U) filter on z-scored block-averaged pixels (lag-major), or None.
        coupling: (U, Kc, U) ``[pre, box, post]``: log-rate change per spike of ``pre`` at box k's lags.
        self_history: (U, K - Kc) log-rate change per own spike at the longer boxes' lags.
        behavior: (V, U) weights on z-scored behaviour.
        penalty: (U,) L2 penalty each unit kept.
        max_count: (U,) largest training count per bin (caps sampled counts).
        max_log_rate: (U,) largest log-rate the GLM gives a training bin (caps simulated log-rates).
        stats: normalisation of pixels and behaviour (training bins).
        behavior_names: the behaviour series, in the order of ``behavior``'s rows.
    """

    config: GLMConfig
    bias: np.ndarray
    stimulus: np.ndarray | None
    coupling: np.ndarray
    self_history: np.ndarray
    behavior: np.ndarray
    penalty: np.ndarray
    max_count: np.ndarray
    max_log_rate: np.ndarray
    stats: dict[str, np.ndarray]
    behavior_names: list[str]

    @property
    def n_units(self) -> int:
        return len(self.bias)

    def coupling_strength(self, max_lag: float = 0.010) -> np.ndarray:
        """(U, U) ``[pre, post]``: the coupling kernel summed over lags up to ``max_lag`` seconds (at least one bin)."""
        n = max(1, int(np.floor(max_lag / self.config.resolution + 1e-9)))
        lags_per_box = self.config.basis[: self.coupling.shape[1], :n].sum(1)
        return np.einsum("vku,k->vu", self.coupling, lags_per_box)

    def expected_counts(self, rec: Recording, starts: np.ndarray, tokenizer: SpikeTokenizer, n_samples: int = 64,
                        seed: int = 0, chunk_rows: int = 16384) -> np.ndarray:
        """(B, n_bins, U) float64 expected count per dt bin of each window, from its true past (module docstring).

        Args:
            rec: the recording (the GLM's units, in the same order).
            starts: (B,) window starts, seconds.
            tokenizer: the window and its dt bins (resolution must be the GLM's).
            n_samples: simulations per window (S).
            seed: random seed of the simulations.
            chunk_rows: windows x simulations run at once.
        """
        cfg, U = self.config, self.n_units
        if rec.units.n_units != U:
            raise RecordingError(rec.path, "units", f"{rec.units.n_units} units; the GLM was fitted on {U}")
        if not math.isclose(tokenizer.resolution, cfg.resolution):
            raise ValueError(f"dt bins of {tokenizer.resolution} s; the GLM was fitted at {cfg.resolution} s")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1; got {n_samples}")
        features = _Features(rec, cfg, self.behavior_names, stats=self.stats)
        if (features.lagged is None) != (self.stimulus is None):
            raise RecordingError(rec.path, "stimulus", "the GLM was fitted " + ("with" if self.stimulus is not None
                                 else "without") + " stimulus frames; this recording differs")
        began = time.perf_counter()
        starts = np.asarray(starts, dtype=np.float64)
        L, nb, Kc = cfg.n_lags, tokenizer.n_bins, self.coupling.shape[1]
        basis = torch.as_tensor(cfg.basis)
        past_tok = SpikeTokenizer(window=L * cfg.resolution, past_window=cfg.resolution, resolution=cfg.resolution)
        past = bin_spikes(rec.units.spike_times, rec.units.spike_units, starts - L * cfg.resolution, past_tok, U)
        exo = self._exogenous(features, (starts[:, None] + (np.arange(nb) + 0.5) * cfg.resolution).ravel())
        exo = exo.reshape(len(starts), nb, U)
        coupling = torch.as_tensor(self.coupling.reshape(U * Kc, U), dtype=torch.float32)
        self_history = torch.as_tensor(self.self_history, dtype=torch.float32)
        cap = torch.as_tensor(self.max_count, dtype=torch.float32)
        ceiling = torch.as_tensor(self.max_log_rate, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        out = np.zeros((len(starts), nb, U))
        per_chunk = max(1, chunk_rows // n_samples)
        for lo in range(0, len(starts), per_chunk):
            rows = slice(lo, min(lo + per_chunk, len(starts)))
            W, S = len(starts[rows]), n_samples
            # (W*S, L, U) counts of the last L bins, oldest first
            buffer = torch.as_tensor(past[rows, :L], dtype=torch.float32).repeat_interleave(S, 0)
            drive = torch.as_tensor(exo[rows], dtype=torch.float32)
            for b in range(nb):
                h = torch.einsum("rlu,kl->ruk", buffer.flip(1), basis)  # (W*S, U, K): lag 1 first
                eta = drive[:, b].repeat_interleave(S, 0) + h[..., :Kc].reshape(len(h), -1) @ coupling
                eta += (h[..., Kc:] * self_history).sum(-1)
                rate = torch.exp(torch.minimum(eta, ceiling))
                out[rows, b] = rate.view(W, S, U).mean(1, dtype=torch.float64).numpy()
                drawn = torch.minimum(torch.poisson(rate, generator=gen), cap)
                buffer = torch.cat([buffer[:, 1:], drawn[:, None]], dim=1)
            log.info("GLM forecast: %d/%d windows x %d simulations, %.0f s", rows.stop, len(starts), S,
                     time.perf_counter() - began)
        return out

    def _exogenous(self, features: _Features, times: np.ndarray) -> np.ndarray:
        """(n, U) bias + stimulus + behaviour part of the log-rate at ``times``."""
        eta = self.bias + features.behavior(times) @ self.behavior
        if self.stimulus is not None:
            eta = eta + (features.lagged @ self.stimulus)[features.frame_rows(times)]
        return eta


class _Design:
    """The bins of a span set as tensors, with the log-likelihood and its gradient in closed form.

    Hand-written gradients: autograd's intermediate (T, U) tensors cost more than the matrix
    products that matter here. Parameters (``fit_glm``): bias (U,), coupling (U * Kc, U),
    self_history (U, K - Kc), behavior (V, U), stimulus (P', U); all but the bias on z-scored features.

    Attributes:
        y: (T, U) counts. cross: (T, U * Kc) z-scored coupling features. own: (T, U, K - Kc) z-scored
        long self-history. b: (T, V) behaviour. rows: (T,) rows of ``lagged``, or None.
        lagged: (n_frames + 1, P') lagged pixels, or None.
    """

    def __init__(self, counts: np.ndarray, cross: np.ndarray, own: np.ndarray, behavior: np.ndarray,
                 rows: np.ndarray | None, lagged: torch.Tensor | None):
        self.y, self.cross, self.own = torch.as_tensor(counts), torch.as_tensor(cross), torch.as_tensor(own)
        self.b = torch.as_tensor(behavior)
        self.rows = torch.as_tensor(rows) if rows is not None else None
        self.lagged = lagged
        self.n = len(self.y)

    def eta(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """(T, U) log-rate, capped at ``MAX_ETA``."""
        eta = self.cross @ p["coupling"]
        eta += p["bias"]
        eta += (self.own * p["self_history"]).sum(-1)
        eta.addmm_(self.b, p["behavior"])
        if self.lagged is not None:
            eta += (self.lagged @ p["stimulus"])[self.rows]
        return eta.clamp_(max=MAX_ETA)

    def unit_nll(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """(U,) mean Poisson negative log-likelihood per bin (without log y!)."""
        eta = self.eta(p)
        return (torch.exp(eta) - self.y * eta).mean(0)

    def nll_and_grad(self, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum over units of ``unit_nll`` and its gradient per parameter."""
        eta = self.eta(p)
        nll = (torch.exp(eta) - self.y * eta).sum() / self.n
        g = torch.exp_(eta).sub_(self.y).div_(self.n)  # (T, U) d nll / d eta, in place of eta
        grad = {"bias": g.sum(0), "coupling": self.cross.T @ g, "behavior": self.b.T @ g,
                "self_history": (self.own * g[..., None]).sum(0)}
        if self.lagged is not None:
            per_frame = torch.zeros(len(self.lagged), g.shape[1]).index_add_(0, self.rows, g)
            grad["stimulus"] = self.lagged.T @ per_frame
        return nll, grad


def fit_glm(rec: Recording, train: np.ndarray, val: np.ndarray, config: GLMConfig = GLMConfig()) -> CoupledGLM:
    """Fit the coupled GLM on ``train`` spans and choose each unit's penalty on ``val`` spans.

    Args:
        rec: the recording; the stimulus filter is fitted if it has frames, behaviour per ``config.behavior``.
        train, val: (n, 2) [start, stop) seconds (e.g. ``split_spans(rec, split, "train")``).
    """
    began = time.perf_counter()
    train_counts, train_hist, train_times = _binned(rec, train, config)
    val_counts, val_hist, val_times = _binned(rec, val, config)
    names = list(rec.behavior) if config.behavior is None else list(config.behavior)
    features = _Features(rec, config, names, fit_times=train_times)
    U, Kc = rec.units.n_units, config.n_coupling
    hist_std = train_hist.std(0) + 1e-6  # (U, K): weights are fitted on z-scored history features
    lagged = torch.as_tensor(features.lagged) if features.lagged is not None else None

    def design(counts: np.ndarray, hist: np.ndarray, times: np.ndarray) -> _Design:
        z = hist / hist_std
        return _Design(counts, z[..., :Kc].reshape(len(z), -1), z[..., Kc:], features.behavior(times),
                       features.frame_rows(times) if lagged is not None else None, lagged)

    tr, va = design(train_counts, train_hist, train_times), design(val_counts, val_hist, val_times)
    del train_hist, val_hist
    params = {"bias": torch.log(tr.y.mean(0).clamp(min=1e-6)), "coupling": torch.zeros(U * Kc, U),
              "self_history": torch.zeros(U, tr.own.shape[-1]), "behavior": torch.zeros(features.n_behavior, U)}
    if lagged is not None:
        params["stimulus"] = torch.zeros(lagged.shape[1], U)
    fits, val_nll = [], []
    for penalty in config.penalties:
        opt = torch.optim.LBFGS(list(params.values()), lr=1.0, max_iter=config.max_iter, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-9)

        def closure() -> torch.Tensor:
            nll, grad = tr.nll_and_grad(params)
            loss = nll
            for name, p in params.items():
                p.grad = grad[name]
                if name != "bias":  # L2 on the weights of z-scored features
                    loss = loss + 0.5 * penalty * (p**2).sum()
                    p.grad += penalty * p
            return loss

        opt.step(closure)
        val_nll.append(va.unit_nll(params).numpy())
        fits.append({k: v.clone() for k, v in params.items()})
        log.info("GLM: penalty %g, %d evaluations, validation NLL %.5f per bin, %.0f s", penalty,
                 opt.state[opt._params[0]]["func_evals"], val_nll[-1].mean(), time.perf_counter() - began)
        if len(val_nll) > 1 and val_nll[-1].mean() > val_nll[-2].mean():
            break  # weaker penalties only overfit more
    best = torch.as_tensor(np.argmin(np.stack(val_nll), axis=0))  # (U,) each unit's best penalty
    units = torch.arange(U)
    stacked = {k: torch.stack([f[k] for f in fits]) for k in params}  # (n_fits, ...)
    # Unit u's weights from the fit it chose: the unit is the last axis, or the first for self_history.
    chosen = {k: v[best, ..., units].movedim(0, -1) for k, v in stacked.items() if k != "self_history"}
    chosen["self_history"] = stacked["self_history"][best, units]
    max_log_rate = tr.eta(chosen).amax(0).numpy()
    std = torch.as_tensor(hist_std)
    return CoupledGLM(
        config=config, bias=chosen["bias"].numpy(),
        stimulus=chosen["stimulus"].numpy() if lagged is not None else None,
        coupling=(chosen["coupling"].reshape(U, Kc, U) / std[:, :Kc, None]).numpy(),  # back to raw counts
        self_history=(chosen["self_history"] / std[:, Kc:]).numpy(),
        behavior=chosen["behavior"].numpy(), penalty=np.asarray(config.penalties)[best.numpy()],
        max_count=train_counts.max(0), max_log_rate=max_log_rate,
        stats={k: np.asarray(v) for k, v in features.stats.items()}, behavior_names=features.names,
    )


def cached_glm(rec: Recording, split: SplitSpec, config: GLMConfig, cache_dir: str | Path | None,
               restrict_to: Intervals | None = None) -> CoupledGLM:
    """``fit_glm`` on the training blocks of ``split`` (penalty chosen on its validation blocks), kept in ``cache_dir``.

    The fit depends only on the recording's content, the split, the intervals and ``config``, so it
    is stored under a key made of all four (the file's SHA-1, not its name) and reused by every
    later evaluation of any model on the same data: the fit takes minutes, loading it milliseconds.
    ``cache_dir=None`` fits without storing.
    """
    train, val = (split_spans(rec, split, name, restrict_to) for name in ("train", "val"))
    if cache_dir is None:
        return fit_glm(rec, train, val, config)
    digest = hashlib.sha1()
    with open(rec.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(json.dumps([dataclasses.asdict(split), dataclasses.asdict(config), train.tolist()],
                             sort_keys=True).encode())
    path = Path(cache_dir) / f"glm_{Path(rec.path).stem}_{digest.hexdigest()[:12]}.npz"
    if path.is_file():
        log.info("GLM baseline: loaded the fit from %s", path)
        return _load(path, config)
    glm = fit_glm(rec, train, val, config)
    arrays = {k: v for k, v in dataclasses.asdict(glm).items() if isinstance(v, np.ndarray)}
    arrays.update({f"stats_{k}": v for k, v in glm.stats.items()})
    with atomic_path(path) as tmp:
        np.savez(tmp, behavior_names=np.asarray(glm.behavior_names, dtype=str), **arrays)
    log.info("GLM baseline: fitted and stored in %s", path)
    return glm


def _load(path: Path, config: GLMConfig) -> CoupledGLM:
    """A ``CoupledGLM`` stored by ``cached_glm``."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    stats = {k.removeprefix("stats_"): arrays.pop(k) for k in list(arrays) if k.startswith("stats_")}
    names = [str(n) for n in arrays.pop("behavior_names")]
    return CoupledGLM(config=config, stimulus=arrays.pop("stimulus", None), stats=stats, behavior_names=names,
                      **arrays)
