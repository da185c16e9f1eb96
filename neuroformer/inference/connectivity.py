"""Directed unit-to-unit influence from a trained Neuroformer, scored on ground truth.

The estimator to use is the perturbation (``neuroformer.inference.perturbation``: the effect of
one added spike on the model's next-spike distribution; ``method="perturbation"``). The ones
read from the cross-attention are kept for comparison (docs/connectivity.md):

Estimator (attention x gradient). For every current-window position t whose target is a
spike of unit j, and every past-window token k, a spike of unit i, the relevance is

    R[t, k] = sum over decoder blocks and heads of  A[t, k] * d(sum_t' log p(target_t')) / dA[t, k]

where A is the cross-attention probability from position t to past token k: the first-order
change of the log-likelihood of the window's true spikes if that attention link were removed.
``M[i, j]`` is the mean of R over all (past spike of i, current target spike of j) pairs of
the evaluated windows: the influence of a past spike of i on the next spike being j.

Why not raw attention: the query at position t has seen only tokens up to t, not the spike it
is about to predict, so its attention cannot say which unit the past spikes make likely; the
gradient of that unit's log-probability can. Raw attention (``method="attention"``: weights
averaged over blocks and heads) is kept for comparison. Why not rollout: rollout propagates
attention through the self-attention layers without regard to the predicted unit; its target
independence is the same weakness.

Baseline from the data alone: the lagged cross-correlation ``cross_correlation_influence``,
spikes of j 0-10 ms after spikes of i, as a Poisson z-score against the count expected from
slow co-modulation (stimulus, running), estimated from lags of 20-50 ms on both sides.

Scoring against the truth is ``neuroformer.metrics.links.score_links``.

CLI: ``python -m neuroformer.inference.connectivity --help``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neuroformer import cli
from neuroformer.data.dataset import Batch, InputSpec, WindowDataset, batches
from neuroformer.data.nwb import read_nwb
from neuroformer.data.recording import Intervals, Recording
from neuroformer.data.simulate import load_ground_truth
from neuroformer.data.splits import window_starts
from neuroformer.data.tokenizer import N_SPECIAL
from neuroformer.errors import RecordingError
from neuroformer.inference.perturbation import perturbation_influence
from neuroformer.files import write_json
from neuroformer.metrics.links import LinkScores, score_links
from neuroformer.models.neuroformer import Neuroformer
from neuroformer.registry import load

METHODS = ("perturbation", "attention_x_gradient", "attention")


def _relevance(model: Neuroformer, batch: Batch, method: str) -> torch.Tensor:
    """(B, T, P): relevance of each past token for each current position (see the module docstring)."""
    P = batch.past_ids.shape[1]
    if method == "attention":
        with torch.no_grad():
            _, weights = model.forward_with_attention(batch.inputs)
        return torch.stack([w[..., :P] for w in weights]).mean(dim=(0, 2))
    if method != "attention_x_gradient":
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    with torch.enable_grad():
        out, weights = model.forward_with_attention(batch.inputs)
        is_unit = batch.target_ids >= N_SPECIAL
        log_p = F.log_softmax(out.id_logits, dim=-1).gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1)
        grads = torch.autograd.grad((log_p * is_unit).sum(), weights)
    return sum((w * g)[..., :P].sum(dim=1) for w, g in zip(weights, grads)).detach()


def attention_influence(
    model: Neuroformer, batches: Iterable[Batch], n_units: int, method: str = "attention_x_gradient"
) -> tuple[np.ndarray, np.ndarray]:
    """Accumulate ``M[pre, post]`` over windows (units indexed as in the model's vocabulary).

    Args:
        model: a trained Neuroformer in eval mode.
        batches: the windows to accumulate over (e.g. a test DataLoader).
        n_units: units in the vocabulary (``len(spec.vocab)``).
        method: "attention_x_gradient" or "attention".

    Returns:
        M (U, U) mean relevance of (past spike of i, target spike of j) pairs, NaN where no
        pair occurred, and the pair counts (U, U).
    """
    total = torch.zeros(n_units, n_units, dtype=torch.float64)
    counts = torch.zeros(n_units, n_units, dtype=torch.float64)
    for batch in batches:
        relevance = _relevance(model, batch, method).double()  # (B, T, P)
        pre = _one_hot_units(batch.past_ids, n_units)  # (B, P, U)
        post = _one_hot_units(batch.target_ids, n_units)  # (B, T, U)
        total += torch.einsum("bpi,btp,btj->ij", pre, relevance, post)
        counts += torch.einsum("bi,bj->ij", pre.sum(1), post.sum(1))
    influence = torch.where(counts > 0, total / counts.clamp(min=1), torch.nan)
    return influence.numpy(), counts.numpy()


def _one_hot_units(tokens: torch.Tensor, n_units: int) -> torch.Tensor:
    """(B, L) ID tokens -> (B, L, U) float64 one-hot of unit tokens; special tokens are all-zero rows."""
    unit = tokens - N_SPECIAL
    return F.one_hot(unit.clamp(min=0), n_units).double() * (unit >= 0).unsqueeze(-1)


def lagged_pair_counts(times: np.ndarray, units: np.ndarray, n_units: int, lo: float, hi: float,
                       pre: np.ndarray | None = None) -> np.ndarray:
    """(U, U) ``[i, j]``: pairs of a spike of i at t and a spike of j at s with ``lo < s - t <= hi``.

    Args:
        times: (n,) spike times, seconds. units: (n,) unit index of each spike.
        pre: (n,) bool, only these spikes count as the first of a pair (default: all), e.g. the
            spikes of one bootstrap block, with the others there as partners.
    """
    out = np.zeros((n_units, n_units))
    for j in range(n_units):
        post = np.sort(times[units == j])
        per_spike = np.searchsorted(post, times + hi, side="right") - np.searchsorted(post, times + lo, side="right")
        weights = per_spike if pre is None else per_spike * pre
        out[:, j] = np.bincount(units, weights=weights, minlength=n_units)
    return out


def cross_correlation_influence(
    times: np.ndarray,
    units: np.ndarray,
    n_units: int,
    lag: tuple[float, float] = (0.0, 0.010),
    flank: tuple[float, float] = (0.020, 0.050),
) -> np.ndarray:
    """(U, U) ``[pre, post]`` z-score of post spikes ``lag`` after pre spikes, beyond slow co-modulation.

    The expected count is the pair count at lags ``flank`` on both sides (post after and before
    pre), scaled to the width of ``lag``; the score is ``(observed - expected) / sqrt(expected)``.
    """
    return cross_correlation_z(*cross_correlation_counts(times, units, n_units, lag, flank), lag, flank)


def cross_correlation_counts(times: np.ndarray, units: np.ndarray, n_units: int,
                             lag: tuple[float, float] = (0.0, 0.010), flank: tuple[float, float] = (0.020, 0.050),
                             pre: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(U, U) pair counts at ``lag`` and at ``flank`` (both sides) of ``cross_correlation_influence``;
    ``pre``: see ``lagged_pair_counts``. Sums over stretches of data, so they can be bootstrapped."""
    lo, hi = flank
    return (lagged_pair_counts(times, units, n_units, *lag, pre=pre),
            lagged_pair_counts(times, units, n_units, lo, hi, pre=pre)
            + lagged_pair_counts(times, units, n_units, -hi, -lo, pre=pre))


def cross_correlation_z(observed: np.ndarray, far: np.ndarray, lag: tuple[float, float] = (0.0, 0.010),
                        flank: tuple[float, float] = (0.020, 0.050)) -> np.ndarray:
    """The z-score of ``cross_correlation_influence`` from its pair counts (``cross_correlation_counts``)."""
    expected = far * (lag[1] - lag[0]) / (2 * (flank[1] - flank[0]))
    return (observed - expected) / np.sqrt(np.maximum(expected, 1.0))


def spikes_in_windows(rec: Recording, t0: np.ndarray, window: float, past_window: float) -> tuple[np.ndarray, np.ndarray]:
    """Spike times and units of ``rec`` inside any window span ``[t0 - past_window, t0 + window)``."""
    spans = Intervals(np.asarray(t0) - past_window, np.asarray(t0) + window)
    inside = spans.containing(rec.units.spike_times) >= 0
    return rec.units.spike_times[inside], rec.units.spike_units[inside]


def estimate(model: Neuroformer, spec: InputSpec, rec: Recording, t0: np.ndarray, batch_size: int = 32,
             methods: Iterable[str] = METHODS, n_contexts: int = 256) -> dict[str, np.ndarray]:
    """Each estimator's (U, U) ``[pre, post]`` influence over the windows starting at ``t0``.

    Units are the recording's rows. The model's estimates (``methods``) come first, then
    ``"cross_correlation"``, the baseline from the same spikes (past and current windows).
    ``"perturbation"`` (``neuroformer.inference.perturbation``) uses ``n_contexts`` of the windows.
    """
    dataset = WindowDataset([rec], spec, [t0])
    rows = spec.vocab.indices(rec.units.names, rec.path)  # recording row -> vocabulary unit
    device = next(model.parameters()).device
    estimates = {}
    for method in methods:
        if method == "perturbation":
            estimates[method] = perturbation_influence(model, spec, rec, t0, n_contexts)
            continue
        influence, _ = attention_influence(model, batches(dataset, batch_size, device), len(spec.vocab), method)
        estimates[method] = influence[np.ix_(rows, rows)]
    tok = spec.tokenizer
    times, units = spikes_in_windows(rec, t0, tok.window, tok.past_window)
    estimates["cross_correlation"] = cross_correlation_influence(times, units, rec.units.n_units)
    return estimates


def format_table(scores: dict[str, LinkScores]) -> str:
    """A Markdown table of the scores, with the chance level as the last row."""
    lines = ["| estimator | link AUROC | link AP | direction AUROC | direction AP | direction accuracy | "
             "excitatory AUROC | inhibitory AUROC |", "|---|---|---|---|---|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {name} | {s.auroc:.3f} | {s.ap:.3f} | {s.direction_auroc:.3f} | {s.direction_ap:.3f} | "
                     f"{s.direction_accuracy:.3f} | {s.excitatory_auroc:.3f} | {s.inhibitory_auroc:.3f} |")
    any_scores = next(iter(scores.values()))
    lines.append(f"| chance | 0.500 | {any_scores.chance_ap:.3f} | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 |")
    return "\n".join(lines)


def _parser():
    parser = cli.parser(
        "python -m neuroformer.inference.connectivity",
        "Infer unit-to-unit connectivity from a trained Neuroformer (perturbation, attention) over a recording's "
        "held-out block and score it (and a cross-correlation baseline) against the simulator's ground truth.")
    parser.add_argument("--model", required=True, help="checkpoint, sharded folder, or models:/NAME/VERSION|@ALIAS")
    parser.add_argument("--data", type=Path, help="simulated NWB recording with ground truth (default: the model's)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--contexts", type=int, default=256, help="windows used as contexts by the perturbation")
    parser.add_argument("--out", type=Path, help="write the scores as JSON here")
    return parser


def _main(args) -> int:
    loaded = load(args.model)
    rec = read_nwb(args.data) if args.data else loaded.spec.source.read()
    truth = load_ground_truth(rec.path)
    tok = loaded.spec.tokenizer
    t0 = window_starts(rec.start, rec.stop, loaded.spec.split, args.split, tok.window, tok.past_window, tok.window)
    if len(t0) == 0:
        raise RecordingError(rec.path, "windows", f"no {args.split} windows under the model's split")
    estimates = estimate(loaded.model, loaded.spec, rec, t0, args.batch_size, args.methods, args.contexts)
    scores = {name: score_links(m, truth.connectivity) for name, m in estimates.items()}
    print(f"{rec.path}: {len(t0)} {args.split} windows, {rec.units.n_units} units, "
          f"{next(iter(scores.values())).n_links} true links\n")
    print(format_table(scores))
    if args.out:
        write_json(args.out, {k: asdict(v) for k, v in scores.items()})
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m neuroformer.inference.connectivity``: score a model's connectivity on a simulated recording."""
    return cli.run(_main, _parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
