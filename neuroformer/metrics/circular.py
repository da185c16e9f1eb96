"""Scores for angles (head direction, running direction, phases): errors that respect the wrap.

An angle regressed as a plain number makes 359 deg vs 1 deg an error of 358 deg and averages
350 deg and 10 deg to 180 deg. Here every difference is taken on the circle:

- ``circular_difference(a, b)``: ``a - b`` wrapped into [-pi, pi);
- ``circular_mean(a)``: the direction of the mean unit vector;
- ``circular_mae_degrees(pred, true)``: mean absolute wrapped difference, in degrees (0 is
  perfect; 90 is what a random guess scores on average);
- ``circular_correlation(a, b)``: the circular correlation coefficient of Jammalamadaka &
  SenGupta (2001): ``sum sin(a - a_mean) sin(b - b_mean) / sqrt(sum sin^2(a - a_mean) *
  sum sin^2(b - b_mean))``, in [-1, 1], 1 for identical angles.

All angles are radians.
"""

from __future__ import annotations

import numpy as np

TWO_PI = 2 * np.pi


def circular_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` wrapped into [-pi, pi), elementwise."""
    return (np.asarray(a) - np.asarray(b) + np.pi) % TWO_PI - np.pi


def circular_mean(angles: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Direction of the mean unit vector of ``angles`` along ``axis``, in [-pi, pi)."""
    angles = np.asarray(angles)
    return np.arctan2(np.sin(angles).mean(axis=axis), np.cos(angles).mean(axis=axis))


def circular_mae_degrees(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute circular error, degrees."""
    return float(np.degrees(np.abs(circular_difference(pred, true))).mean())


def circular_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Jammalamadaka's circular correlation coefficient of paired angles a, b (n,)."""
    sa, sb = np.sin(circular_difference(a, circular_mean(a))), np.sin(circular_difference(b, circular_mean(b)))
    denominator = np.sqrt((sa**2).sum() * (sb**2).sum())
    return float((sa * sb).sum() / denominator) if denominator > 0 else float("nan")


def angle_of(vectors: np.ndarray) -> np.ndarray:
    """(..., 2) (cos, sin)-like vectors -> (...,) angles in [-pi, pi)."""
    vectors = np.asarray(vectors)
    return np.arctan2(vectors[..., 1], vectors[..., 0])
