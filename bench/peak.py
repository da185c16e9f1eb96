"""This machine's measured fp32 matrix-multiply peak, shared by the benchmarks that report against it."""

from __future__ import annotations

import time

import torch


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s: the best of ``repeats`` n x n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
