"""How well an estimated unit-to-unit influence matrix recovers the true links (scores only).

Scoring (``score_links``), on ordered pairs i != j against ``connectivity[pre, post] != 0``:
AUROC and average precision of link detection by strength ``|M - median(M)|`` (links are
excitatory or inhibitory), and of direction on the linked pairs whose reverse pair is not
linked (is the strength of i -> j larger than that of j -> i); and, keeping the sign, AUROC of
excitatory links ranked by ``M`` and of inhibitory links ranked by ``-M``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from neuroformer.metrics.bootstrap import Interval, bootstrap


@dataclass
class LinkScores:
    """How well an influence matrix recovers true links.

    Attributes:
        auroc, ap: link detection over ordered pairs i != j.
        chance_ap: AP of a random score (the fraction of pairs that are links).
        direction_auroc, direction_ap: direction on one-way links (chance 0.5 both).
        direction_accuracy: fraction of one-way links i -> j with ``M[i, j] > M[j, i]``.
        excitatory_auroc: excitatory links against all other pairs, ranked by ``M`` (sign kept).
        inhibitory_auroc: inhibitory links against all other pairs, ranked by ``-M``.
        n_links, n_pairs, n_one_way: counts behind the scores.
    """

    auroc: float
    ap: float
    chance_ap: float
    direction_auroc: float
    direction_ap: float
    direction_accuracy: float
    excitatory_auroc: float
    inhibitory_auroc: float
    n_links: int
    n_pairs: int
    n_one_way: int


def score_links(influence: np.ndarray, connectivity: np.ndarray) -> LinkScores:
    """Score ``influence[pre, post]`` against ``connectivity[pre, post]`` (nonzero = link).

    Links can be excitatory or inhibitory, so a pair's strength is its deviation from the typical
    pair, ``|M - median(M)|``; detection ranks pairs by strength, direction compares the strengths
    of ``i -> j`` and ``j -> i``; the signed scores rank ``M - median(M)`` (excitatory links) and its
    negative (inhibitory links). Pairs with no value (NaN: never observed together) count as typical.
    """
    if influence.shape != connectivity.shape or influence.ndim != 2:
        raise ValueError(f"influence {influence.shape} and connectivity {connectivity.shape} must be the same (N, N)")
    off = ~np.eye(len(influence), dtype=bool)
    median = np.nanmedian(influence[off])
    centred = np.where(np.isfinite(influence), influence, median) - median
    strength = np.abs(centred)
    linked = connectivity != 0
    one_way = linked & ~linked.T
    forward = (strength - strength.T)[one_way]
    auroc, ap = _auroc_ap(strength[off], linked[off])
    d_auroc, d_ap = _auroc_ap(np.concatenate([forward, -forward]),
                              np.concatenate([np.ones(len(forward), bool), np.zeros(len(forward), bool)]))
    return LinkScores(
        auroc=auroc, ap=ap, chance_ap=float(linked[off].mean()),
        direction_auroc=d_auroc, direction_ap=d_ap,
        direction_accuracy=float((forward > 0).mean()) if len(forward) else float("nan"),
        excitatory_auroc=_auroc_ap(centred[off], (connectivity > 0)[off])[0],
        inhibitory_auroc=_auroc_ap(-centred[off], (connectivity < 0)[off])[0],
        n_links=int(linked[off].sum()), n_pairs=int(off.sum()), n_one_way=int(one_way.sum()),
    )


def _auroc_ap(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    if labels.all() or not labels.any():
        return float("nan"), float("nan")
    s, y = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels).long()
    return float(binary_auroc(s, y)), float(binary_average_precision(s, y))


def link_intervals(sums: np.ndarray, influence: Callable[[np.ndarray], np.ndarray], connectivity: np.ndarray,
                   starts: np.ndarray, scores: tuple[str, ...] = ("auroc", "ap", "direction_auroc"),
                   **kwargs) -> dict[str, Interval]:
    """Block-bootstrap intervals of ``score_links`` fields for an estimator that is a function of sums over windows.

    Args:
        sums: (B, D) per-window (or per-stretch) statistics, e.g. flattened pair counts.
        influence: maps (D,) totals to the (U, U) influence matrix.
        connectivity: (U, U) the truth. starts: (B,) start times of the rows, seconds (define the blocks).
        scores: ``LinkScores`` fields to bootstrap.
        kwargs: ``metrics.bootstrap.bootstrap``'s (block, n_boot, level, seed, gap); the same seed
            draws the same replicates for every score and every estimator on the same windows.
    """
    def statistic(field: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda totals: np.array([getattr(score_links(influence(t), connectivity), field) for t in totals])

    return {field: bootstrap(sums, statistic(field), starts, **kwargs) for field in scores}
