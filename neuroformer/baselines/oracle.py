"""The simulator's forecast oracle: the best possible prediction of a window of a simulated recording.

A simulated session (``neuroformer.data.simulate``) is a coupled Bernoulli GLM at ``dt`` = 1 ms
whose every parameter is rebuilt from the config stored in the file. For a window
``[t0, t0 + window)`` the oracle predicts what a model is asked to predict, from what a model
is given: the true spikes of the past window ``[t0 - past_window, t0)`` set each unit's
refractory state and synaptic input, the stimulus and running speed are the true ones, and
the network is run forward through the window ``S`` times with its own random spikes.

Rao-Blackwellised estimate. Each simulation contributes, at every 1 ms step, the probability
of a spike given the simulated history so far, ``p_k = 1 - exp(-dt * min(rate_k, max_rate))``,
spread over the 5 ms bins by the overlap of the step with each bin (spike times are uniform
within their step). ``E[1{spike_k} | history_<k] = p_k``, so the mean over simulations is
unbiased for the expected count, with less noise than counting sampled spikes. Summing the
*true* 1 ms intensity instead would condition on the window's own spikes: not a forecast.

The step containing ``t0`` is partly in the past: a unit that spiked in it before ``t0`` cannot
spike again in it, and one that did not spikes after ``t0`` with probability
``p (1 - f) / (1 - p f)``, ``f`` the fraction of the step before ``t0``.

``history=False`` is the stimulus-and-running-only oracle: no past spikes are given; each
simulation starts at rest ``burn_in`` seconds before ``t0`` and runs through the window, so
spike history and coupling are averaged out rather than known. The difference between the
two says what the past spikes are worth; this one alone what the stimulus and running are worth.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from neuroformer.data.recording import Recording
from neuroformer.data.simulate import (
    SessionInputs,
    SimulationConfig,
    external_drive,
    load_ground_truth,
    read_config,
    refractory_table,
    session_inputs,
)
from neuroformer.data.tokenizer import SpikeTokenizer
from neuroformer.errors import RecordingError

log = logging.getLogger(__name__)


@dataclass
class SimulatorOracle:
    """The true network of a simulated session, ready to forecast windows.

    Attributes:
        config: the session's simulation config.
        inputs: its population, movie, running speed and stimulus drive.
    """

    config: SimulationConfig
    inputs: SessionInputs

    @classmethod
    def from_file(cls, path) -> SimulatorOracle:
        """Rebuild the network of a file written by ``simulate_recording`` from the config in its notes.

        Raises:
            RecordingError: no simulation config in the file, or the rebuilt synapses differ
                from the file's ground truth (the file was not made by this simulator version).
        """
        config = read_config(path)
        inputs = session_inputs(config)
        stored = load_ground_truth(path).connectivity
        if not np.array_equal(stored, inputs.population.truth.connectivity):
            raise RecordingError(path, "processing/ground_truth/synapses",
                                 "differs from the synapses rebuilt from the config in general/notes")
        return cls(config, inputs)

    def expected_counts(
        self,
        rec: Recording,
        starts: np.ndarray,
        tokenizer: SpikeTokenizer,
        n_samples: int = 64,
        history: bool = True,
        burn_in: float = 0.1,
        seed: int = 0,
        chunk_rows: int = 16384,
    ) -> np.ndarray:
        """(B, n_bins, U) float64 expected spike count of every unit per dt bin of each window.

        Args:
            rec: the simulated recording (its spikes are the past the oracle conditions on).
            starts: (B,) window starts ``t0``, seconds.
            tokenizer: window, past window and dt bins, as the model's (``bin_spikes`` bins the
                true spikes the same way).
            n_samples: simulations per window (S).
            history: condition on the true past spikes (the forecast oracle); False: stimulus
                and running only (see the module docstring).
            burn_in: with ``history=False``, seconds simulated from rest before each window.
            seed: random seed of the simulations.
            chunk_rows: windows x simulations run at once (memory: about 40 bytes x U each).
        """
        cfg = self.config
        U = cfg.n_units
        if rec.units.n_units != U:
            raise RecordingError(rec.path, "units", f"{rec.units.n_units} units, the simulation config has {U}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1; got {n_samples}")
        if tokenizer.resolution < cfg.dt:
            raise ValueError(f"dt bins of {tokenizer.resolution} s are finer than the simulation's {cfg.dt} s steps")
        starts = np.asarray(starts, dtype=np.float64)
        out = np.zeros((len(starts), tokenizer.n_bins, U))
        gen = torch.Generator().manual_seed(seed)
        per_chunk = max(1, chunk_rows // n_samples)
        began = time.perf_counter()
        for lo in range(0, len(starts), per_chunk):
            rows = slice(lo, min(lo + per_chunk, len(starts)))
            out[rows] = self._forecast(rec, starts[rows], tokenizer, n_samples, history, burn_in, gen)
            log.info("oracle%s: %d/%d windows x %d simulations, %.0f s", "" if history else " (stimulus only)",
                     rows.stop, len(starts), n_samples, time.perf_counter() - began)
        return out

    def _forecast(self, rec: Recording, t0: np.ndarray, tok: SpikeTokenizer, S: int, history: bool,
                  burn_in: float, gen: torch.Generator) -> np.ndarray:
        """(W, n_bins, U) expected counts of the windows starting at ``t0`` (W,)."""
        cfg, pop = self.config, self.inputs.population
        dt, W, U = cfg.dt, len(t0), cfg.n_units
        first = np.floor(t0 / dt).astype(np.int64)  # step holding t0
        before = t0 / dt - first  # fraction of that step before t0
        n_steps = int(np.max(np.ceil((t0 + tok.window) / dt - 1e-9).astype(np.int64) - first))
        n_burn = round(burn_in / dt) if not history else 0
        steps = first[:, None] + np.arange(-n_burn, n_steps)[None]  # (W, K) simulation steps
        external = external_drive(pop, self.inputs.drive, self.inputs.speed, cfg, steps.ravel())
        external = torch.as_tensor(external.reshape(W, -1, U), dtype=torch.float32)
        weight = torch.as_tensor(_overlap(t0, first, before, n_steps, tok, dt, history), dtype=torch.float32)

        table = torch.as_tensor(refractory_table(dt), dtype=torch.float32)
        recovered = len(table) - 1
        coupling = torch.as_tensor(pop.truth.connectivity, dtype=torch.float32)
        decay = math.exp(-dt / cfg.syn_tau)
        if history:
            since, syn, known = self._past_state(rec, t0, first, tok.past_window, recovered, decay)
        else:
            since = np.full((W, U), recovered)
            syn, known = np.zeros((W, U)), np.zeros((W, U), bool)
        rep = lambda x, dtype: torch.as_tensor(x, dtype=dtype).repeat_interleave(S, dim=0)  # noqa: E731  (W*S, U)
        since, syn = rep(since, torch.long), rep(syn, torch.float32)
        known = rep(known, torch.bool)
        f0 = rep(np.repeat(before[:, None], U, 1), torch.float32)
        log_max = math.log(cfg.max_rate)

        total = torch.zeros(W, tok.n_bins, U, dtype=torch.float64)
        for k in range(n_burn + n_steps):
            since = torch.clamp(since + 1, max=recovered)
            log_rate = (external[:, k].repeat_interleave(S, dim=0) + syn + table[since]).clamp(max=log_max)
            p = -torch.expm1(-dt * torch.exp(log_rate))  # (W*S, U) spike probability this step
            if history and k == 0:  # the step holding t0: conditioned on what happened before t0
                p = torch.where(known, 0.0, p * (1 - f0) / (1 - p * f0))
            if k >= n_burn:
                mean_p = p.view(W, S, U).mean(1, dtype=torch.float64)
                total += weight[:, k - n_burn, :, None].double() * mean_p[:, None]
            fired = torch.rand(p.shape, generator=gen) < p
            if history and k == 0:
                fired |= known
            since = torch.where(fired, 0, since)
            syn = syn * decay + fired.float() @ coupling
        return total.numpy()

    def _past_state(self, rec: Recording, t0: np.ndarray, first: np.ndarray, past_window: float, recovered: int,
                    decay: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """State of every unit at the start of step ``first`` from the true spikes in ``[t0 - past_window, t0)``.

        Returns:
            since (W, U) int: steps since the last spike minus one (the simulator's counter before
            it advances), capped at ``recovered``; syn (W, U): synaptic input; known (W, U) bool:
            the unit spiked in step ``first`` before t0.
        """
        dt, U = self.config.dt, self.config.n_units
        times, units = rec.units.spike_times, rec.units.spike_units
        lo = np.searchsorted(times, t0 - past_window, side="left")
        hi = np.searchsorted(times, t0, side="left")
        n = hi - lo
        win = np.repeat(np.arange(len(t0)), n)
        idx = np.repeat(lo, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        step = np.floor(times[idx] / dt).astype(np.int64)
        ago = first[win] - step  # >= 1: an earlier step; 0: the step holding t0, before t0
        unit = units[idx]
        since = np.full((len(t0), U), recovered)
        np.minimum.at(since, (win, unit), np.where(ago > 0, ago - 1, recovered))
        known = np.zeros((len(t0), U), bool)
        known[win[ago == 0], unit[ago == 0]] = True
        pre = np.zeros((len(t0), U))
        np.add.at(pre, (win[ago > 0], unit[ago > 0]), decay ** (ago[ago > 0] - 1.0))
        return since, pre @ self.inputs.population.truth.connectivity, known


def _overlap(t0: np.ndarray, first: np.ndarray, before: np.ndarray, n_steps: int, tok: SpikeTokenizer, dt: float,
             history: bool) -> np.ndarray:
    """(W, K, n_bins): where a spike of step ``first + k`` lands, as a fraction per dt bin of the window.

    A spike is uniform in its step; bins are ``[t0 + b res, t0 + (b + 1) res)`` within ``[t0, t0 + window)``.
    Conditioned on the past (``history``), a spike of the first step is known to fall after t0.
    """
    lo = (first[:, None] + np.arange(n_steps)[None]) * dt  # (W, K) step starts
    if history:
        lo[:, 0] = t0
    hi = (first[:, None] + 1 + np.arange(n_steps)[None]) * dt
    edges = t0[:, None] + tok.resolution * np.arange(tok.n_bins + 1)[None]
    edges[:, -1] = t0 + tok.window
    inside = (np.minimum(hi[..., None], edges[:, None, 1:]) - np.maximum(lo[..., None], edges[:, None, :-1]))
    return np.clip(inside, 0, None) / (hi - lo)[..., None]
