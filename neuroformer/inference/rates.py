"""Firing rates of a trained Neuroformer: expected spike counts per unit and dt bin of a window.

The model does not output rates; it defines a distribution over token sequences, sampled by
``neuroformer.inference.generate.sample_windows``. The rate of unit u in dt bin b of a window
is the expected number of generated (u, b) tokens, ``E[N_ub]``. It is estimated from S
sampled sequences per window (default S = 8) with a Rao-Blackwellised Monte Carlo estimator:
instead of counting the sampled (u, b) tokens, each sampled sequence contributes, at every
step it was still running (up to and including the one that drew EOS), the probability the
sampler gave the pair (u, b) at that step,

    rate_ub = 1/S * sum_samples sum_live_steps  P(pair = (u, b) | prefix),

the sampler's own distribution of the next pair (``pair_probabilities``: its constraints,
temperature, top-k and top-p). Since ``E[1{pair_t = (u, b)} | prefix_t] = P(pair_t = (u, b) | prefix_t)`` and
whether step t runs is decided by the prefix, this is unbiased for the same expectation as
the raw count, with lower variance, and it is positive wherever the model allows a spike: no
zero rates to floor in bits per spike. The per-step probabilities come from one
teacher-forced forward pass over each sampled sequence (the same logits the sampler saw: the
KV-cached and full-forward samplers are identical).

Plugging a noisy rate estimate into a nonlinear score biases it: bits per spike, through its
log, comes out too low by roughly c/S (docs/evaluation.md measures it). Each sample's rate map
is kept (``RateEstimate.sample_rates``) so ``jackknife`` can remove that 1/S term.

The sampled sequences themselves are kept as counts (``RateEstimate.samples``): generated
spike trains for rasters and spike-set F1.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import torch

from neuroformer.data.dataset import InputSpec, WindowDataset, batches
from neuroformer.data.recording import Recording
from neuroformer.data.tokenizer import N_SPECIAL, add_tokens
from neuroformer.errors import ConfigError
from neuroformer.inference.generate import (
    GeneratedWindows,
    SamplingConfig,
    dt_constraint,
    id_constraint,
    filter_logits,
    sample_windows,
)
from neuroformer.models.neuroformer import Neuroformer, NeuroformerInput

NEG_INF = float("-inf")
log = logging.getLogger(__name__)


class RateEstimate(NamedTuple):
    """Rates and samples of a set of windows.

    Attributes:
        sample_rates: (S, B, n_bins, U) float32 Rao-Blackwellised rate map of each sampled
            sequence; their mean is the estimate, their spread feeds ``jackknife``.
        samples: (S, B, n_bins, U) int16 spike counts of each sampled sequence.
        starts: (B,) window start times, seconds.
    """

    sample_rates: np.ndarray
    samples: np.ndarray
    starts: np.ndarray

    @property
    def rates(self) -> np.ndarray:
        """(B, n_bins, U) float64 expected spike count of each unit per dt bin (mean over samples)."""
        return self.sample_rates.mean(axis=0, dtype=np.float64)


def pair_probabilities(id_logits: torch.Tensor, dt_logits: torch.Tensor, last_bin: torch.Tensor, n_bins: int,
                       allowed: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """(N, n_bins, V_id): probability that ``sample_windows`` draws each (dt bin, unit) pair next.

    Mirrors the sampler's step: the dt is drawn first among EOS and the window's bins no earlier
    than ``last_bin``, then the ID among the allowed units; each draw after temperature / top-k / top-p.

    Args:
        id_logits: (N, V_id). dt_logits: (N, V_dt). last_bin: (N,) the previous spike's bin
        (0 before the first). allowed: (V_id,) bool, the units that may be generated.
    """
    draw_p = lambda logits, ok: filter_logits(logits.masked_fill(~ok, NEG_INF), sampling).softmax(-1)  # noqa: E731
    p_dt = draw_p(dt_logits, dt_constraint(last_bin, n_bins, dt_logits.shape[-1]))[:, N_SPECIAL : N_SPECIAL + n_bins]
    p_id = draw_p(id_logits, id_constraint(last_bin + N_SPECIAL, allowed))  # any bin: the ID does not depend on it
    return p_dt[..., None] * p_id[:, None]


def _expected_pairs(model: Neuroformer, x: NeuroformerInput, gen: GeneratedWindows, n_bins: int,
                    sampling: SamplingConfig, allowed: torch.Tensor) -> torch.Tensor:
    """(R, n_bins, V_id): per row, the sum over live steps of P(next pair = (bin, ID) | sampled prefix)."""
    out = model(x._replace(ids=gen.ids, dts=gen.dts))  # position t predicts token t + 1
    R, T = gen.ids.shape
    live = torch.arange(T - 1, device=gen.ids.device)[None] < (gen.counts + gen.ended)[:, None]  # steps run
    total = torch.zeros(R, n_bins, out.id_logits.shape[-1], device=gen.ids.device)
    for t in range(T - 1):
        rows = live[:, t]
        if not rows.any():
            break
        # The sampler's state before step t: the previous spike's bin (0 before the first).
        last_bin = gen.dts[rows, t] - N_SPECIAL if t else torch.zeros(int(rows.sum()), dtype=torch.long,
                                                                      device=rows.device)
        total[rows] += pair_probabilities(out.id_logits[rows, t], out.dt_logits[rows, t], last_bin, n_bins, allowed,
                                          sampling)
    return total


@torch.no_grad()
def expected_counts(
    model: Neuroformer,
    spec: InputSpec,
    recording: Recording,
    starts: np.ndarray,
    n_samples: int = 8,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    batch_size: int = 32,
) -> RateEstimate:
    """Expected counts of every unit of ``recording`` per dt bin of each window (module docstring).

    Each window is conditioned on its true context (past spikes, stimulus, behaviour), i.e.
    open loop.

    Args:
        model: a trained Neuroformer in eval mode.
        spec: its input spec (the recording's units must be in its vocabulary).
        starts: (B,) window starts, seconds.
        n_samples: sampled sequences per window (S).
        sampling: temperature / top-k / top-p of the sampler whose rates are estimated (T > 0).
        generator: random source of the sampler.
        batch_size: windows per model call (each repeated S times).
    """
    if sampling.temperature <= 0:
        raise ConfigError("rates need a stochastic sampler: temperature must be > 0 (0 is greedy decoding)")
    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1; got {n_samples}")
    tok = spec.tokenizer
    starts = np.asarray(starts, dtype=np.float64)
    device = next(model.parameters()).device
    unit_vocab = spec.vocab.indices(recording.units.names, recording.path)  # recording row -> vocabulary index
    unit_tokens = torch.as_tensor(unit_vocab + N_SPECIAL, device=device)
    unit_of_token = np.full(spec.vocab.size, -1)
    unit_of_token[unit_vocab + N_SPECIAL] = np.arange(len(unit_vocab))
    allowed = torch.zeros(model.config.id_vocab_size, dtype=torch.bool, device=device)
    allowed[unit_tokens] = True
    dataset = WindowDataset([recording], spec, [starts])
    B, S, U, nb = len(starts), n_samples, len(unit_vocab), tok.n_bins
    sample_rates = np.zeros((B, S, nb, U), dtype=np.float32)
    samples = np.zeros((B * S, nb, U), dtype=np.int16)
    began, report = time.perf_counter(), max(1, B // 10)
    for lo, batch in zip(range(0, B, batch_size), batches(dataset, batch_size, device)):
        if lo and lo // report != (lo - batch_size) // report:
            log.info("rates: %d/%d windows, %.0f s", lo, B, time.perf_counter() - began)
        rows = np.arange(lo, lo + len(batch.t0))
        x = batch.inputs.repeat_interleave(S)  # row b * S + s is sample s of window b
        gen = sample_windows(model, x, nb, sampling, generator, unit_tokens)
        expected = _expected_pairs(model, x, gen, nb, sampling, allowed)[..., unit_tokens]  # (R, nb, U)
        sample_rates[rows] = expected.reshape(len(rows), S, nb, U).cpu().numpy()
        add_tokens(samples[rows[0] * S : (rows[-1] + 1) * S], gen.ids.cpu().numpy(), gen.dts.cpu().numpy(),
                    unit_of_token)
    return RateEstimate(sample_rates.transpose(1, 0, 2, 3), samples.reshape(B, S, nb, U).transpose(1, 0, 2, 3), starts)
