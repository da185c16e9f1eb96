"""Figures that show whether a model is good, saved as PNG run artifacts.

Every function returns a matplotlib ``Figure`` built without pyplot (so no GUI backend and no
global figure state: safe in a headless job); ``save`` writes it as PNG with the Agg renderer.

- ``raster``: true versus generated spikes of the same consecutive windows.
- ``psth_panels``: predicted versus true PSTH of a few units over repeated stimuli.
- ``psth_correlation_summary``: per-unit PSTH correlations, against each unit's noise ceiling.
- ``rate_calibration``: predicted versus true mean rate per unit.
- ``behavior_trace``: a behaviour variable, true versus predicted.
- ``connectivity_matrices``: inferred versus true unit-to-unit connectivity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from neuroformer.files import atomic_path

TRUE_COLOR, MODEL_COLOR = "black", "tab:red"


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (Agg renderer), atomically (a temporary file renamed); returns the path."""
    with atomic_path(path) as tmp:
        FigureCanvasAgg(fig).print_figure(str(tmp), dpi=dpi, format="png")
    return Path(path)


def _events(counts: np.ndarray, start: float, bin_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(times, rows) of the non-empty bins of (n_bins, U) counts, at bin centres."""
    b, u = np.nonzero(counts)
    return start + (b + 0.5) * bin_s, u


def raster(true: np.ndarray, generated: np.ndarray, start: float, bin_s: float, window_bins: int | None = None,
           order: np.ndarray | None = None, title: str = "") -> Figure:
    """True (top) and generated (bottom) spikes of the same stretch, one row per unit.

    Args:
        true, generated: (n_bins, U) spike counts of consecutive bins starting at ``start``.
        bin_s: bin width, seconds.
        window_bins: bins per model window; window boundaries are drawn faintly.
        order: (U,) unit shown in each row, top to bottom (default: recording order).
    """
    order = np.arange(true.shape[1]) if order is None else np.asarray(order)
    row_of = np.empty_like(order)
    row_of[order] = np.arange(len(order))
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, sharey=True)
    stop = start + true.shape[0] * bin_s
    for ax, counts, label, color in ((axes[0], true, "true", TRUE_COLOR),
                                     (axes[1], generated, "generated", MODEL_COLOR)):
        t, u = _events(counts, start, bin_s)
        ax.scatter(t, row_of[u], marker="|", s=12, linewidths=0.8, color=color)
        if window_bins:
            for edge in np.arange(start, stop, window_bins * bin_s):
                ax.axvline(edge, color="0.85", lw=0.5, zorder=0)
        ax.set_ylabel("unit (row)")
        ax.set_title(f"{label}: {int(counts.sum())} spikes", loc="left", fontsize=10)
        ax.set_ylim(len(order) - 0.5, -0.5)
    axes[1].set_xlim(start, stop)
    axes[1].set_xlabel("time (s)")
    fig.suptitle(title or "Spike raster, same windows: true vs generated")
    return fig


def psth_panels(pred: np.ndarray, true: np.ndarray, bin_s: float, units: list[int], r: np.ndarray,
                n_trials: np.ndarray | None = None, names: list[str] | None = None, ncols: int = 3) -> Figure:
    """Predicted and true PSTHs (Hz) of a few units, every stimulus end to end.

    Args:
        pred, true: (G, n_bins, U) mean counts per bin of each of G stimuli.
        bin_s: PSTH bin, seconds.
        units: which units to show.
        r: (U,) PSTH correlation of each unit (shown in the titles).
        n_trials: (G,) trials averaged per stimulus (shown in the title).
        names: (U,) unit names.
    """
    G, n_bins, _ = true.shape
    t = np.arange(G * n_bins) * bin_s
    nrows = max(1, int(np.ceil(len(units) / ncols)))
    fig = Figure(figsize=(4 * ncols, 2.4 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, u in zip(axes, units):
        ax.plot(t, true[:, :, u].ravel() / bin_s, color=TRUE_COLOR, lw=1, label="true")
        ax.plot(t, pred[:, :, u].ravel() / bin_s, color=MODEL_COLOR, lw=1, label="model")
        for g in range(1, G):
            ax.axvline(g * n_bins * bin_s, color="0.7", lw=0.6, ls="--")
        ax.set_title(f"{names[u] if names else f'unit {u}'}: r = {r[u]:.2f}", fontsize=9)
        ax.set_xlabel("time in stimuli (s)")
        ax.set_ylabel("rate (Hz)")
    for ax in axes[len(units):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8, loc="upper right")
    trials = f", trials per stimulus: {', '.join(str(int(k)) for k in n_trials)}" if n_trials is not None else ""
    fig.suptitle(f"PSTH over {G} repeated stimuli (dashed: next stimulus{trials})")
    return fig


def psth_correlation_summary(r: np.ndarray, ceiling: np.ndarray | None = None) -> Figure:
    """Histogram of per-unit PSTH correlations and, if given, a scatter against the noise ceiling.

    Args:
        r: (U,) model PSTH correlation per unit (NaN: undefined, left out).
        ceiling: (U,) each unit's noise ceiling (``neuroformer.metrics.psth.noise_ceiling``).
    """
    ok = np.isfinite(r)
    show_ceiling = ceiling is not None and np.isfinite(ceiling[ok]).any()
    fig = Figure(figsize=(10 if show_ceiling else 5, 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, 2 if show_ceiling else 1))
    axes[0].hist(r[ok], bins=np.linspace(-1, 1, 41), color=MODEL_COLOR, alpha=0.8)
    if ok.any():
        axes[0].axvline(np.median(r[ok]), color="k", ls="--", label=f"median {np.median(r[ok]):.2f}")
        axes[0].legend(fontsize=8)
    axes[0].set_xlabel("PSTH correlation r (model vs true)")
    axes[0].set_ylabel("units")
    axes[0].set_title(f"{ok.sum()} units", fontsize=10)
    if show_ceiling:
        both = ok & np.isfinite(ceiling)
        axes[1].scatter(ceiling[both], r[both], s=12, color=MODEL_COLOR)
        axes[1].plot([0, 1], [0, 1], color="0.5", lw=1, ls="--", label="r = ceiling")
        axes[1].set_xlim(-0.05, 1.05)
        axes[1].set_ylim(-1, 1.05)
        axes[1].set_xlabel("noise ceiling (split-half, Spearman-Brown)")
        axes[1].set_ylabel("PSTH correlation r")
        axes[1].legend(fontsize=8, loc="lower right")
        axes[1].set_title("units on the dashed line: as good as the data allow", fontsize=10)
    fig.suptitle("Per-unit PSTH correlation")
    return fig


def rate_calibration(pred_hz: np.ndarray, true_hz: np.ndarray) -> Figure:
    """Scatter of each unit's predicted versus true mean rate (Hz), log-log, with the diagonal."""
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    floor = 0.05
    ax.scatter(np.maximum(true_hz, floor), np.maximum(pred_hz, floor), s=12, color=MODEL_COLOR)
    hi = max(float(np.max(true_hz, initial=1)), float(np.max(pred_hz, initial=1))) * 1.5
    ax.plot([floor, hi], [floor, hi], color="0.5", ls="--", lw=1, label="predicted = true")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true mean rate (Hz)")
    ax.set_ylabel("model mean rate (Hz)")
    ratio = float(np.sum(pred_hz) / max(np.sum(true_hz), 1e-12))
    ax.set_title(f"Rate calibration per unit (total predicted / true = {ratio:.2f})", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def behavior_trace(times: np.ndarray, true: np.ndarray, pred: np.ndarray | None = None, name: str = "behaviour",
                   scores: dict[str, float] | None = None, ax: Axes | None = None,
                   period: float | None = None) -> Figure:
    """A behaviour variable over time, true and (if given) predicted.

    Args:
        times: (N,) seconds. true: (N,) values. pred: (N,) predictions of the same samples, or None.
        scores: e.g. ``{"R^2": 0.6, "r": 0.8}``, shown in the title.
        ax: draw into this axes of an existing figure (one panel per variable) instead of a new figure.
        period: for an angle, its period (360 or 2 pi): a line that wraps round is broken there
            instead of drawn across the whole axis. NaN values (no label) leave gaps too.
    """
    if ax is None:
        ax = Figure(figsize=(11, 3.5), layout="constrained").subplots()
    fig = ax.figure
    for values, color, label in ((true, TRUE_COLOR, "true"), (pred, MODEL_COLOR, "predicted")):
        if values is not None:
            x, y = _break_wraps(np.asarray(times, float), np.asarray(values, float), period)
            ax.plot(x, y, color=color, lw=1, label=label)
    if period is not None:
        ax.set_ylim(-period / 2, period / 2)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(name)
    ax.legend(fontsize=8, loc="upper right")
    detail = ", ".join(f"{k} = {v:.3f}" for k, v in (scores or {}).items())
    ax.set_title(f"{name}: true vs predicted" + (f" ({detail})" if detail else ""), fontsize=10)
    return fig


def _break_wraps(x: np.ndarray, y: np.ndarray, period: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) with a NaN point inserted wherever an angle jumps by more than half a period."""
    if period is None or len(y) < 2:
        return x, y
    jumps = np.flatnonzero(np.abs(np.diff(y)) > period / 2) + 1
    return np.insert(x, jumps, np.nan), np.insert(y, jumps, np.nan)


def connectivity_matrices(inferred: np.ndarray, true: np.ndarray, scores: dict[str, float] | None = None,
                          title: str = "Connectivity: inferred vs true") -> Figure:
    """True connectivity, the inferred matrix and the inferred values of linked vs unlinked pairs.

    Args:
        inferred: (U, U) ``[pre, post]`` score of the estimate (NaN: no estimate).
        true: (U, U) ``[pre, post]`` true weights (0: no link; sign: excitatory/inhibitory).
        scores: e.g. AUROC and AP of link detection, shown in the title.
    """
    off = ~np.eye(len(true), dtype=bool)
    linked = (true != 0) & off
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    w = float(np.abs(true).max()) or 1.0
    im = axes[0].imshow(true, cmap="RdBu_r", vmin=-w, vmax=w, interpolation="nearest")
    fig.colorbar(im, ax=axes[0], shrink=0.8, label="true weight")
    axes[0].set_title(f"true ({linked.sum()} links)", fontsize=10)
    m = np.where(off, inferred, np.nan)
    lo, hi = np.nanpercentile(m, [1, 99]) if np.isfinite(m).any() else (0.0, 1.0)
    im = axes[1].imshow(m, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    fig.colorbar(im, ax=axes[1], shrink=0.8, label="inferred score")
    axes[1].set_title("inferred (diagonal blank)", fontsize=10)
    for ax in axes[:2]:
        ax.set_xlabel("post unit")
        ax.set_ylabel("pre unit")
    finite = np.isfinite(m)
    bins = np.linspace(lo, hi, 40)
    axes[2].hist(np.clip(m[off & ~linked & finite], lo, hi), bins=bins, density=True, alpha=0.6, color="0.5",
                 label="no link")
    axes[2].hist(np.clip(m[linked & finite], lo, hi), bins=bins, density=True, alpha=0.6, color=MODEL_COLOR,
                 label="true link")
    axes[2].locator_params(axis="x", nbins=5)
    axes[2].set_xlabel("inferred score")
    axes[2].set_ylabel("density")
    axes[2].legend(fontsize=8)
    axes[2].set_title("separated = links detectable", fontsize=10)
    detail = ", ".join(f"{k} {v:.3f}" for k, v in (scores or {}).items())
    fig.suptitle(title + (f" ({detail})" if detail else ""))
    return fig
