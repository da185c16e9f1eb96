"""Simulated mouse-V1 recordings with known ground truth, written as NWB.

A population of linear-nonlinear-Poisson units watches a movie while the mouse runs:

* **Units** are ON or OFF centre-surround cells, direction-selective (DS) cells with a
  drifting-Gabor spatiotemporal filter, or untuned (``population="rich"``: ON and OFF each
  sustained or transient, DS with four fixed preferred directions, untuned; ``RICH_TYPES``). Each unit's log-rate is
  ``baseline + stimulus drive + speed_gain * speed / SPEED_REF + synaptic input +
  refractoriness``, and it fires at most once per ``dt`` bin (Bernoulli), capped at
  ``max_rate``.
* **Synapses** are directed, obey Dale's law and form a few hubs plus sparse random links;
  a presynaptic spike adds ``weight`` to the target's log-rate one bin later, decaying with
  ``syn_tau``.
* **Stimulus**: alternating blocks of drifting gratings and natural-like (1/f, temporally
  smooth) noise, interleaved with a few fixed clips that repeat through the session.
* **Behaviour**: running speed, a rectified Ornstein-Uhlenbeck process with run/rest bouts.

The NWB file holds everything the project's reader needs (units, ``movie`` stimulus,
``behavior/BehavioralTimeSeries/running_speed``, trials) and the ground truth: per-unit
columns of the Units table and the ``ground_truth/synapses`` table, read back by
:func:`load_ground_truth`. The same seed and config give byte-identical spike times.

Run ``python -m neuroformer.data.simulate --out sim.nwb`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from hdmf.backends.hdf5 import H5DataIO
from hdmf.common import DynamicTable, VectorData
from pynwb import NWBHDF5IO, NWBFile, TimeSeries
from pynwb.behavior import BehavioralTimeSeries
from pynwb.file import Subject
from pynwb.image import ImageSeries
from pynwb.misc import Units
from scipy.signal import lfilter

from neuroformer import cli
from neuroformer.cli import option
from neuroformer.errors import ConfigError, RecordingError
from neuroformer.files import atomic_path

CELL_TYPES = ("ON", "OFF", "DS", "untuned")
# population="rich": nine functional types, closer to what retina and V1 studies cluster.
RICH_DIRECTIONS = (0, 90, 180, 270)
RICH_TYPES = ("ON-sustained", "ON-transient", "OFF-sustained", "OFF-transient",
              *(f"DS-{d}" for d in RICH_DIRECTIONS), "untuned")
POPULATIONS = ("default", "rich")
GRATING_DIRECTIONS = np.arange(0.0, 360.0, 45.0)  # degrees; 0 = rightward, 90 = upward
SPEED_REF = 20.0  # cm/s: speed_gain is the log-rate change per SPEED_REF of running
SESSION_START = datetime(2024, 1, 15, 9, 0, 0, tzinfo=timezone.utc)
CONFIG_NOTE = "neuroformer.data.simulate config: "  # the NWB file's notes: this, then the config as JSON



@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of one simulated session (every one is also a CLI option)."""

    seed: int = option(0, "random seed: same seed and config give identical spikes")
    n_units: int = option(120, "number of units")
    duration: float = option(600.0, "session length, s")
    frame_rate: float = option(20.0, "stimulus frame rate, Hz")
    frame_size: int = option(32, "stimulus frame height, pixels (and width unless frame_width is set)")
    frame_width: int = option(0, "stimulus frame width, pixels; 0: square frames of frame_size")
    dt: float = option(0.001, "simulation bin, s (at most one spike per unit per bin)")
    mean_rate: float = option(6.5, "mean of the per-unit target rates before coupling, Hz")
    max_rate: float = option(200.0, "firing-rate ceiling, Hz")
    frac_on: float = option(0.3, "fraction of ON centre-surround units")
    frac_off: float = option(0.3, "fraction of OFF centre-surround units")
    frac_ds: float = option(0.25, "fraction of direction-selective units (rest: untuned)")
    frac_excitatory: float = option(0.8, "fraction of excitatory units (Dale's law)")
    link_prob: float = option(0.03, "probability of a random directed link")
    hub_fraction: float = option(0.03, "fraction of hub units (at least one)")
    hub_link_prob: float = option(0.3, "probability that a hub projects to a given unit")
    syn_tau: float = option(0.005, "decay time constant of a synaptic input, s")
    behavior_rate: float = option(50.0, "running-speed sampling rate, Hz")
    n_clips: int = option(4, "number of distinct repeated clips")
    clip_duration: float = option(2.0, "length of a repeated clip, s")
    block_min: float = option(2.0, "shortest grating/noise block, s")
    block_max: float = option(4.0, "longest grating/noise block, s")
    repeat_prob: float = option(0.35, "probability of a repeated clip after each block")
    population: str = option("default", "cell types: default (ON, OFF, DS, untuned) or rich (ON/OFF x "
                             "sustained/transient, DS x 4 directions, untuned; the tuned fraction "
                             "frac_on + frac_off + frac_ds split evenly over the 8 tuned types)")

    def __post_init__(self) -> None:
        positive = ("n_units", "duration", "frame_rate", "frame_size", "dt", "mean_rate",
                    "max_rate", "syn_tau", "behavior_rate", "clip_duration", "block_min")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"simulation {name} must be > 0, got {getattr(self, name)}")
        if self.frame_width < 0:
            raise ConfigError(f"simulation frame_width must be >= 0 (0: square frames), got {self.frame_width}")
        if self.frac_on + self.frac_off + self.frac_ds > 1 + 1e-9:
            raise ConfigError("simulation frac_on + frac_off + frac_ds must be at most 1")
        if self.block_max < self.block_min:
            raise ConfigError("simulation block_max must be >= block_min")
        if self.dt * self.max_rate >= 1 or self.dt > 0.5 / self.frame_rate:
            raise ConfigError("simulation dt is too coarse for max_rate or frame_rate (need dt * max_rate < 1, dt <= 0.5 / frame_rate)")
        if self.n_clips < 1:
            raise ConfigError("simulation n_clips must be >= 1")
        if self.population not in POPULATIONS:
            raise ConfigError(f"simulation population must be one of {POPULATIONS}, got {self.population!r}")

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(height, width) of a stimulus frame, pixels."""
        return self.frame_size, self.frame_width or self.frame_size

    def to_dict(self) -> dict:
        """The fields as plain JSON; ``population`` and ``frame_width`` only when not their
        defaults, so the default recording keeps the identifier, cache file and notes it had
        before these options existed."""
        d = dataclasses.asdict(self)
        if d["population"] == "default":
            del d["population"]
        if d["frame_width"] == 0:
            del d["frame_width"]
        return d

    def identifier(self) -> str:
        """Deterministic file identifier: seed plus a hash of the whole config."""
        digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode())
        return f"neuroformer-sim-seed{self.seed}-{digest.hexdigest()[:10]}"


@dataclass
class GroundTruth:
    """What generated the spikes; unit ``i`` is row ``i`` of the Units table.

    Attributes:
        connectivity: (N, N) float64, ``[pre, post]`` = increment of the post unit's
            log-rate right after a pre spike (0 = no link; > 0 excitatory, < 0 inhibitory).
        cell_types: (N,) str, one of ``CELL_TYPES`` (``RICH_TYPES`` for the rich population).
        is_excitatory: (N,) bool, sign of every outgoing link (Dale's law).
        receptive_fields: (N, H, W) float32, spatial filter at the temporal kernel's peak
            lag, log-rate per unit of contrast ((pixel - 128) / 128); zeros if untuned.
        preferred_direction: (N,) float64 degrees (0 = rightward, 90 = upward); NaN if
            not direction selective (DS, DS-<degrees>).
        speed_gain: (N,) float64 log-rate change per ``SPEED_REF`` cm/s of running.
        baseline_rate: (N,) float64 Hz, rate with no stimulus drive, running or input.
    """

    connectivity: np.ndarray
    cell_types: np.ndarray
    is_excitatory: np.ndarray
    receptive_fields: np.ndarray
    preferred_direction: np.ndarray
    speed_gain: np.ndarray
    baseline_rate: np.ndarray

    @property
    def n_units(self) -> int:
        return len(self.cell_types)

    def links(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pre, post, weight) of every link, each (n_links,), sorted by pre then post."""
        pre, post = np.nonzero(self.connectivity)
        return pre, post, self.connectivity[pre, post]


@dataclass
class Simulation:
    """A simulated session held in memory (what :func:`write_nwb` stores).

    Attributes:
        config: the parameters it was made with.
        spike_times: per unit, (n_i,) float64 seconds in [0, duration), sorted.
        frames: (n_frames, H, W) uint8 movie, frame ``k`` shown from ``k / frame_rate``.
        speed: (n_samples,) float64 running speed, cm/s, sample ``k`` at ``k / behavior_rate``.
        trials: column name -> (n_trials,) array: ``start_time``, ``stop_time``,
            ``stimulus_type``, ``clip_id``, ``direction``, ``spatial_frequency``,
            ``temporal_frequency``.
        ground_truth: the population that produced the spikes.
    """

    config: SimulationConfig
    spike_times: list[np.ndarray]
    frames: np.ndarray
    speed: np.ndarray
    trials: dict[str, np.ndarray]
    ground_truth: GroundTruth


@dataclass
class Population:
    """Model parameters: the ground truth plus what is needed to run it.

    Attributes:
        truth: the stored ground truth.
        filters: (K, H*W, N) float32 spatiotemporal filters, lag 0 = frame on screen.
        log_baseline: (N,) float64 log of the baseline rate.
    """

    truth: GroundTruth
    filters: np.ndarray
    log_baseline: np.ndarray


# --------------------------------------------------------------------------- stimulus


def _gamma_bump(t: np.ndarray, peak: float | np.ndarray) -> np.ndarray:
    """Smooth causal bump, 1 at ``t = peak`` (gamma shape 3)."""
    x = t / peak
    return x**3 * np.exp(3.0 * (1.0 - x))


def _natural_movie(rng: np.random.Generator, n: int, shape: tuple[int, int], frame_rate: float) -> np.ndarray:
    """(n, H, W) float grey-level offsets: 1/f spatial noise, AR(1)-smooth in time."""
    a = math.exp(-1.0 / (frame_rate * 0.2))  # 200 ms correlation time
    white = rng.standard_normal((n, *shape))
    start = rng.standard_normal((1, *shape))  # stationary start
    smooth = lfilter([math.sqrt(1 - a * a)], [1.0, -a], white, axis=0, zi=a * start)[0]
    size = max(shape)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]), indexing="ij"))
    amp = 1.0 / np.maximum(f, 1.0 / size)
    amp[0, 0] = 3.0 * size  # strong full-field luminance changes drive ON/OFF cells apart
    movie = np.fft.ifft2(np.fft.fft2(smooth) * amp).real
    return movie * (55.0 / np.sqrt(np.mean(amp**2)))  # 55 grey levels rms contrast


def _grating(n: int, shape: tuple[int, int], frame_rate: float, direction: float, sf: float, tf: float,
             phase: float) -> np.ndarray:
    """(n, H, W) grey-level offsets of a sinusoid drifting towards ``direction``."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    theta = np.deg2rad(direction)
    proj = cols * np.cos(theta) - rows * np.sin(theta)  # row 0 is the top: y = -row
    t = np.arange(n)[:, None, None] / frame_rate
    return 80.0 * np.cos(2 * np.pi * (sf * proj - tf * t) + phase)


def _make_stimulus(rng: np.random.Generator, cfg: SimulationConfig, n_frames: int
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The movie and its trials: one trial per grating/noise block or clip presentation.

    Returns:
        frames: (n_frames, H, W) uint8.
        trials: column -> (n_trials,) array (see :class:`Simulation`).
    """
    shape, fr = cfg.frame_shape, cfg.frame_rate
    clip_len = max(1, round(cfg.clip_duration * fr))
    clips = [_natural_movie(rng, clip_len, shape, fr) for _ in range(cfg.n_clips)]
    frames = np.empty((n_frames, *shape), np.uint8)
    rows: list[tuple[int, int, str, int, float, float, float]] = []
    pos, grating_next = 0, True
    while pos < n_frames:
        if rows and rows[-1][2] != "repeat" and rng.random() < cfg.repeat_prob:
            clip = int(rng.integers(cfg.n_clips))
            movie, row = clips[clip], ("repeat", clip, np.nan, np.nan, np.nan)
        else:
            n = max(1, round(rng.uniform(cfg.block_min, cfg.block_max) * fr))
            if grating_next:
                direction = float(rng.choice(GRATING_DIRECTIONS))
                sf = float(rng.choice([0.04, 0.08])) * 32 / shape[1]  # 1.3 or 2.6 cycles per frame width
                tf = float(rng.choice([1.0, 2.0]))
                movie = _grating(n, shape, fr, direction, sf, tf, rng.uniform(0, 2 * np.pi))
                row = ("grating", -1, direction, sf, tf)
            else:
                movie, row = _natural_movie(rng, n, shape, fr), ("noise", -1, np.nan, np.nan, np.nan)
            grating_next = not grating_next
        stop = min(pos + len(movie), n_frames)
        frames[pos:stop] = np.clip(np.rint(128.0 + movie[: stop - pos]), 0, 255)
        rows.append((pos, stop, *row))
        pos = stop
    cols = list(zip(*rows))
    trials = {
        "start_time": np.array(cols[0], float) / fr,
        "stop_time": np.array(cols[1], float) / fr,
        "stimulus_type": np.array(cols[2], dtype=str),
        "clip_id": np.array(cols[3], np.int64),
        "direction": np.array(cols[4], float),
        "spatial_frequency": np.array(cols[5], float),
        "temporal_frequency": np.array(cols[6], float),
    }
    return frames, trials


def _make_speed(rng: np.random.Generator, cfg: SimulationConfig, n: int) -> np.ndarray:
    """(n,) running speed, cm/s: rectified OU relaxing to a per-bout target, run/rest bouts."""
    dt = 1.0 / cfg.behavior_rate
    tau, mean_run, mean_rest = 0.8, 8.0, 12.0  # s: relaxation time, mean bout lengths
    running = rng.random() < mean_run / (mean_run + mean_rest)
    target, sigma = (rng.uniform(15, 35), 6.0) if running else (-8.0, 3.0)
    noise = rng.standard_normal(n)
    switch = rng.random(n)
    v = max(target, 0.0)
    speed = np.empty(n)
    for k in range(n):
        if switch[k] < dt / (mean_run if running else mean_rest):
            running = not running
            target, sigma = (rng.uniform(15, 35), 6.0) if running else (-8.0, 3.0)
        v += (target - v) * dt / tau + sigma * math.sqrt(2 * dt / tau) * noise[k]
        speed[k] = max(v, 0.0)
    return speed


def stimulus_drive(frames: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """(n_frames, N) float64 filter output per frame; frames before the first are grey."""
    n_frames = len(frames)
    x = (frames.reshape(n_frames, -1).astype(np.float32) - 128.0) / 128.0
    drive = np.zeros((n_frames, filters.shape[2]))
    for lag in range(min(len(filters), n_frames)):
        drive[lag:] += x[: n_frames - lag] @ filters[lag]
    return drive


# --------------------------------------------------------------------------- population


def _make_population(rng: np.random.Generator, calib_rng: np.random.Generator,
                     cfg: SimulationConfig) -> Population:
    """Draw cell types, filters, gains and synapses, then calibrate the rates.

    Filters are scaled so the stimulus drive has a per-unit std of 1.2-1.6 (log-rate), and
    baselines so the mean rate matches a per-unit target, both on a reference stimulus and
    speed trace drawn from ``calib_rng`` (so the population does not depend on duration).
    """
    n, (height, width), fr = cfg.n_units, cfg.frame_shape, cfg.frame_rate
    if cfg.population == "rich":
        tuned = RICH_TYPES[:-1]
        n_tuned = min(n, round((cfg.frac_on + cfg.frac_off + cfg.frac_ds) * n))
        counts = [n_tuned // len(tuned) + (k < n_tuned % len(tuned)) for k in range(len(tuned))]
        names = RICH_TYPES
    else:
        counts = [round(cfg.frac_on * n), round(cfg.frac_off * n), round(cfg.frac_ds * n)]
        counts[2] = min(counts[2], n - counts[0] - counts[1])
        names = CELL_TYPES
    types = np.repeat(np.array(names), counts + [n - sum(counts)])[rng.permutation(n)]

    # Temporal kernels over the last K frames (about 300 ms).
    n_lags = max(2, math.ceil(0.3 * fr))
    t = (np.arange(n_lags) + 0.5) / fr
    scale = min(height, width) / 32.0  # spatial parameters are given for a 32-pixel frame
    rows, cols = np.mgrid[0:height, 0:width].astype(float)
    filters = np.zeros((n_lags, height * width, n), np.float32)
    preferred = np.full(n, np.nan)
    for i, kind in enumerate(types):
        cy, cx = rng.uniform(2 * scale, np.array([height, width]) - 1 - 2 * scale, 2)
        y, x = -(rows - cy), cols - cx
        r2 = x**2 + y**2
        if kind in ("ON", "OFF"):
            sc = rng.uniform(1.0, 2.0) * scale
            ss = 2.5 * sc
            dog = np.exp(-r2 / (2 * sc**2)) / sc**2 - 0.6 * np.exp(-r2 / (2 * ss**2)) / ss**2
            temporal = _gamma_bump(t, rng.uniform(0.05, 0.08)) - rng.uniform(
                0.2, 0.4) * _gamma_bump(t, rng.uniform(0.14, 0.2))
            sign = 1.0 if kind == "ON" else -1.0
            st = sign * temporal[:, None, None] * dog[None] / np.abs(temporal).max()
        elif kind.startswith(("ON-", "OFF-")):
            sc = rng.uniform(1.0, 2.0) * scale
            ss = 2.5 * sc
            dog = np.exp(-r2 / (2 * sc**2)) / sc**2 - 0.6 * np.exp(-r2 / (2 * ss**2)) / ss**2
            if kind.endswith("sustained"):  # one slow lobe: follows the luminance
                temporal = _gamma_bump(t, rng.uniform(0.08, 0.12))
            else:  # a fast lobe and a slow lobe of equal area: responds to changes only
                fast, slow = _gamma_bump(t, rng.uniform(0.04, 0.06)), _gamma_bump(t, rng.uniform(0.14, 0.2))
                temporal = fast - slow * fast.sum() / slow.sum()
            sign = 1.0 if kind.startswith("ON") else -1.0
            st = sign * temporal[:, None, None] * dog[None] / np.abs(temporal).max()
        elif kind.startswith("DS"):
            preferred[i] = float(kind[3:]) if kind != "DS" else float(rng.choice(GRATING_DIRECTIONS))
            theta = np.deg2rad(preferred[i])
            proj = x * np.cos(theta) + y * np.sin(theta)
            sf = rng.uniform(0.04, 0.08) / scale
            tf = rng.uniform(1.5, 3.0)
            env = np.exp(-r2 / (2 * (rng.uniform(2.5, 4.0) * scale) ** 2))
            # Phase advancing with lag along +proj: a space-time oriented filter that
            # matches (and so responds to) motion towards ``preferred`` only.
            st = (_gamma_bump(t, rng.uniform(0.07, 0.1))[:, None, None] * env
                  * np.cos(2 * np.pi * (sf * proj[None] + tf * t[:, None, None])))
        else:
            continue
        filters[:, :, i] = st.reshape(n_lags, -1)

    speed_gain = np.clip(rng.normal(0.5, 0.4, n), -0.5, 1.5)
    target = cfg.mean_rate * np.exp(0.5 * rng.standard_normal(n) - 0.125)
    drive_std = rng.uniform(1.2, 1.6, n)

    is_exc = np.zeros(n, bool)
    is_exc[rng.permutation(n)[: round(cfg.frac_excitatory * n)]] = True
    linked = rng.random((n, n)) < cfg.link_prob
    hubs = rng.permutation(n)[: max(1, round(cfg.hub_fraction * n))]
    linked[hubs] |= rng.random((len(hubs), n)) < cfg.hub_link_prob
    np.fill_diagonal(linked, False)
    # Excitatory links multiply the target's rate by 2-3.3x at their peak.
    weight = np.where(is_exc[:, None], rng.uniform(0.7, 1.2, (n, n)),
                      -rng.uniform(1.0, 2.0, (n, n)))
    connectivity = np.where(linked, weight, 0.0)

    # Calibrate on a reference session (120 s of stimulus and running).
    ref_frames, _ = _make_stimulus(calib_rng, cfg, round(120 * fr))
    ref_speed = _make_speed(calib_rng, cfg, round(120 * cfg.behavior_rate))
    drive = stimulus_drive(ref_frames, filters)
    sd = drive.std(axis=0)
    gain = np.divide(drive_std, sd, out=np.zeros(n), where=sd > 0)  # untuned units stay 0
    filters *= gain.astype(np.float32)
    drive *= gain
    speed_at_frames = np.interp(np.arange(len(ref_frames)) / fr,
                                np.arange(len(ref_speed)) / cfg.behavior_rate, ref_speed)
    modulation = np.exp(drive + np.outer(speed_at_frames / SPEED_REF, speed_gain)).mean(axis=0)
    log_baseline = np.log(target / modulation)

    peak = np.abs(filters).sum(axis=1).argmax(axis=0)  # (N,) lag of each unit's strongest filter
    truth = GroundTruth(
        connectivity=connectivity,
        cell_types=types,
        is_excitatory=is_exc,
        receptive_fields=filters[peak, :, np.arange(n)].reshape(n, height, width),
        preferred_direction=preferred,
        speed_gain=speed_gain,
        baseline_rate=np.exp(log_baseline),
    )
    return Population(truth, filters, log_baseline)


# --------------------------------------------------------------------------- spiking


def refractory_table(dt: float) -> np.ndarray:
    """(L + 1,) log-rate term indexed by bins since the last spike (L = recovered).

    No spike within 2 ms, then a relative refractory period recovering with tau 4 ms.
    """
    lag = np.arange(1, math.ceil(0.03 / dt) + 1) * dt
    table = np.concatenate([[0.0], -3.0 * np.exp(-(lag - 0.002) / 0.004), [0.0]])
    table[1:-1][lag <= 0.002 + 1e-12] = -np.inf
    return table


def _progress(chunks: range, enabled: bool) -> Iterable[int]:
    """``chunks`` wrapped in a tqdm bar on a terminal, else plain stderr percentages, if enabled."""
    if not enabled:
        return chunks
    if not sys.stderr.isatty():  # a log file: lines, not a redrawn bar
        return _plain_progress(chunks)
    from tqdm import tqdm

    return tqdm(chunks, desc="simulating", unit="s", leave=False)


def _plain_progress(chunks: range) -> Iterator[int]:
    step = max(1, len(chunks) // 10)
    for k, chunk in enumerate(chunks):
        if k % step == 0:
            print(f"simulating: {100 * k // len(chunks)}%", file=sys.stderr, flush=True)
        yield chunk


def external_drive(pop: Population, drive: np.ndarray, speed: np.ndarray, cfg: SimulationConfig,
                   bins: np.ndarray) -> np.ndarray:
    """(len(bins), N) log-rate from baseline, stimulus and running in simulation bins ``bins``.

    Everything but the synaptic input and refractoriness, evaluated at each bin's centre.

    Args:
        drive: (n_frames, N) stimulus drive per frame (``stimulus_drive``).
        speed: (n_samples,) running speed at ``cfg.behavior_rate``.
        bins: (n,) int indices of ``cfg.dt`` bins from time 0.
    """
    centre = (bins + 0.5) * cfg.dt
    frame = np.minimum((centre * cfg.frame_rate).astype(np.int64), len(drive) - 1)
    speed_times = np.arange(len(speed)) / cfg.behavior_rate
    return (pop.log_baseline + drive[frame]
            + np.outer(np.interp(centre, speed_times, speed) / SPEED_REF, pop.truth.speed_gain))


def _run_network(rng: np.random.Generator, pop: Population, drive: np.ndarray,
                 speed: np.ndarray, cfg: SimulationConfig, progress: bool) -> list[np.ndarray]:
    """Simulate the coupled Bernoulli GLM bin by bin; returns per-unit spike times.

    Args:
        drive: (n_frames, N) stimulus drive per frame.
        speed: (n_samples,) running speed at ``cfg.behavior_rate``.
    """
    n, dt = cfg.n_units, cfg.dt
    n_bins = round(cfg.duration / dt)
    weights = pop.truth.connectivity
    decay = math.exp(-dt / cfg.syn_tau)
    history = refractory_table(dt)
    recovered = len(history) - 1
    since = np.full(n, recovered)  # bins since each unit's last spike, capped
    syn = np.zeros(n)  # synaptic input to each unit (log-rate)
    log_max = math.log(cfg.max_rate)
    chunk = round(1.0 / dt)  # one second of bins per vectorised chunk
    all_bins, all_units, all_offsets = [], [], []
    for start in _progress(range(0, n_bins, chunk), progress):
        bins = np.arange(start, min(start + chunk, n_bins))
        external = external_drive(pop, drive, speed, cfg, bins)
        # Spike iff min(rate, max_rate) * dt > Exp(1), i.e. with p = 1 - exp(-rate dt):
        # comparing log-rates to log thresholds keeps the loop free of exp().
        threshold = np.log(rng.standard_exponential((len(bins), n)) / dt)
        threshold[threshold >= log_max] = np.inf
        spikes = np.empty((len(bins), n), bool)
        for k in range(len(bins)):
            since += 1
            np.minimum(since, recovered, out=since)
            log_rate = external[k] + syn
            log_rate += history[since]
            fired = np.greater(log_rate, threshold[k], out=spikes[k])
            since[fired] = 0
            syn *= decay
            if fired.any():
                syn += weights[fired].sum(axis=0)
        hit_bins, hit_units = np.nonzero(spikes)
        all_bins.append(hit_bins + start)
        all_units.append(hit_units)
        all_offsets.append(rng.random(len(hit_bins)))  # spike time within its bin
    units = np.concatenate(all_units)
    times = (np.concatenate(all_bins) + np.concatenate(all_offsets)) * dt
    order = np.argsort(units, kind="stable")  # keeps each unit's spikes in time order
    return np.split(times[order], np.cumsum(np.bincount(units, minlength=n))[:-1])


@dataclass
class SessionInputs:
    """Everything that generated a session except the spikes' random draws.

    Attributes:
        population: the units, their filters and synapses.
        frames: (n_frames, H, W) uint8 movie.
        trials: column -> (n_trials,) array (see :class:`Simulation`).
        speed: (n_samples,) float64 running speed, cm/s, at ``config.behavior_rate``.
        drive: (n_frames, N) float64 stimulus drive per frame (``stimulus_drive``).
    """

    population: Population
    frames: np.ndarray
    trials: dict[str, np.ndarray]
    speed: np.ndarray
    drive: np.ndarray


def _seeds(config: SimulationConfig) -> list[np.random.SeedSequence]:
    """Independent seeds of population, calibration, stimulus, behaviour and spikes."""
    return np.random.SeedSequence(config.seed).spawn(5)


def session_inputs(config: SimulationConfig) -> SessionInputs:
    """Rebuild a session's population, movie and running speed from its config (no spikes)."""
    pop_ss, calib_ss, stim_ss, behav_ss, _ = _seeds(config)
    pop = _make_population(np.random.default_rng(pop_ss), np.random.default_rng(calib_ss), config)
    frames, trials = _make_stimulus(np.random.default_rng(stim_ss), config,
                                    round(config.duration * config.frame_rate))
    speed = _make_speed(np.random.default_rng(behav_ss), config,
                        round(config.duration * config.behavior_rate))
    return SessionInputs(pop, frames, trials, speed, stimulus_drive(frames, pop.filters))


def simulate(config: SimulationConfig = SimulationConfig(), progress: bool = False) -> Simulation:
    """Simulate a session in memory (see :func:`simulate_recording` to write it)."""
    inputs = session_inputs(config)
    spikes = _run_network(np.random.default_rng(_seeds(config)[4]), inputs.population, inputs.drive,
                          inputs.speed, config, progress)
    return Simulation(config, spikes, inputs.frames, inputs.speed, inputs.trials, inputs.population.truth)


# --------------------------------------------------------------------------- NWB


def _to_nwbfile(sim: Simulation) -> NWBFile:
    cfg, truth = sim.config, sim.ground_truth
    nwb = NWBFile(
        session_description=(
            "Simulated mouse V1 population (linear-nonlinear-Poisson units coupled by "
            "directed synapses) viewing drifting gratings, natural-like noise and repeated "
            "clips while running on a wheel."),
        identifier=cfg.identifier(),
        session_start_time=SESSION_START,
        session_id=f"sim-seed{cfg.seed}",
        experimenter=["Simulator, Neuroformer"],
        lab="neuroformer",
        institution="neuroformer project (simulated data)",
        experiment_description=(
            "Synthetic benchmark with known ground truth (cell types, receptive fields, "
            "direction tuning, speed gains, synaptic connectivity) for testing models."),
        keywords=["simulation", "ground truth", "visual cortex", "V1", "spikes", "running"],
        notes=CONFIG_NOTE + json.dumps(cfg.to_dict()),
        source_script="neuroformer.data.simulate",
        source_script_file_name="simulate.py",
        subject=Subject(
            subject_id=f"sim-mouse-{cfg.seed}",
            species="Mus musculus",
            age="P90D",
            sex="U",
            description="Simulated subject.",
        ),
    )

    nwb.units = Units(
        name="units",
        description="Simulated units; spike times are uniform within their simulation bin.",
        resolution=cfg.dt,
    )
    columns = {
        "cell_type": "functional type: ON, OFF (centre-surround), DS (direction selective) "
                     "or untuned" if cfg.population == "default" else
                     "functional type: ON or OFF (centre-surround) -sustained or -transient, "
                     "DS-<preferred direction, degrees> or untuned",
        "is_excitatory": "True if the unit's outgoing synapses are excitatory (Dale's law)",
        "preferred_direction": "preferred motion direction of DS units, degrees (0 = rightward, "
                               "90 = upward on screen); NaN if not direction selective",
        "speed_gain": f"change of log firing rate per {SPEED_REF:g} cm/s of running speed",
        "baseline_rate": "firing rate without stimulus drive, running or synaptic input, Hz",
        "receptive_field": "spatial filter (height x width of a frame) at the peak lag of the "
                           "temporal kernel, log-rate per unit contrast ((pixel-128)/128)",
        "location": "brain area of the unit",
    }
    for name, description in columns.items():
        nwb.add_unit_column(name=name, description=description)
    for i in range(truth.n_units):
        nwb.add_unit(
            id=i,
            spike_times=sim.spike_times[i],
            cell_type=str(truth.cell_types[i]),
            is_excitatory=bool(truth.is_excitatory[i]),
            preferred_direction=float(truth.preferred_direction[i]),
            speed_gain=float(truth.speed_gain[i]),
            baseline_rate=float(truth.baseline_rate[i]),
            receptive_field=truth.receptive_fields[i],
            location="simulated V1",
        )

    chunk_frames = min(8, len(sim.frames))
    nwb.add_stimulus(ImageSeries(
        name="movie",
        description="Grey-scale movie: drifting gratings, natural-like 1/f noise and "
                    "repeated clips (see trials); mean grey 128.",
        data=H5DataIO(sim.frames, chunks=(chunk_frames, *cfg.frame_shape),
                      compression="gzip", compression_opts=4),
        unit="grey level (0-255)",
        format="raw",
        rate=cfg.frame_rate,
        starting_time=0.0,
    ))

    behavior = nwb.create_processing_module("behavior", "Running on a wheel.")
    behavior.add(BehavioralTimeSeries(time_series=TimeSeries(
        name="running_speed",
        description="Running speed on the wheel.",
        data=sim.speed,
        unit="cm/s",
        rate=cfg.behavior_rate,
        starting_time=0.0,
    )))

    trial_columns = {
        "stimulus_type": "grating, noise (natural-like 1/f movie) or repeat (a fixed clip)",
        "clip_id": "index of the repeated clip, -1 if not a repeat",
        "direction": "grating drift direction, degrees (0 = rightward, 90 = upward); NaN if "
                     "not a grating",
        "spatial_frequency": "grating spatial frequency, cycles per pixel; NaN if not a grating",
        "temporal_frequency": "grating temporal frequency, Hz; NaN if not a grating",
    }
    for name, description in trial_columns.items():
        nwb.add_trial_column(name=name, description=description)
    n_trials = len(sim.trials["start_time"])
    for k in range(n_trials):
        nwb.add_trial(**{name: values[k].item() for name, values in sim.trials.items()})

    pre, post, weight = truth.links()
    gt = nwb.create_processing_module(
        "ground_truth", "Parameters of the simulation that generated this session.")
    gt.add(DynamicTable(
        name="synapses",
        description=(f"Directed synaptic links. A spike of unit `pre` adds `weight` to the "
                     f"log firing rate of unit `post` one bin ({cfg.dt * 1e3:g} ms) later, "
                     f"decaying with time constant {cfg.syn_tau * 1e3:g} ms."),
        columns=[
            VectorData(name="pre", description="presynaptic unit (row of the Units table)",
                       data=pre.astype(np.int64)),
            VectorData(name="post", description="postsynaptic unit (row of the Units table)",
                       data=post.astype(np.int64)),
            VectorData(name="weight", description="log-rate increment; > 0 excitatory",
                       data=weight.astype(np.float64)),
        ],
    ))
    return nwb


def write_nwb(sim: Simulation, path: str | Path) -> Path:
    """Write ``sim`` to ``path`` atomically: a temp file in the same folder, then rename.

    An interrupted write leaves no partial file and keeps any previous file at ``path``.
    """
    nwbfile = _to_nwbfile(sim)
    with atomic_path(path) as tmp, NWBHDF5IO(str(tmp), "w") as io:
        io.write(nwbfile)
    return Path(path)


def simulate_recording(path: str | Path, config: SimulationConfig = SimulationConfig(),
                       progress: bool = True) -> Path:
    """Simulate a session and write it as an NWB file at ``path``; returns the path."""
    return write_nwb(simulate(config, progress=progress), path)


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read the ground truth of a file written by :func:`simulate_recording`.

    Raises:
        RecordingError: the file lacks a ground-truth field (not a simulated session).
    """
    with h5py.File(path, "r") as f:
        def read(name: str) -> np.ndarray:
            if name not in f:
                raise RecordingError(path, name, "missing: not a neuroformer simulation")
            return f[name].asstr()[()] if f[name].dtype.kind in "OS" else f[name][()]

        n = len(read("units/id"))
        pre = read("processing/ground_truth/synapses/pre").astype(np.int64)
        post = read("processing/ground_truth/synapses/post").astype(np.int64)
        if len(pre) and (max(pre.max(), post.max()) >= n or min(pre.min(), post.min()) < 0):
            raise RecordingError(path, "processing/ground_truth/synapses",
                                 f"unit index outside 0..{n - 1}")
        connectivity = np.zeros((n, n))
        connectivity[pre, post] = read("processing/ground_truth/synapses/weight")
        return GroundTruth(
            connectivity=connectivity,
            cell_types=np.asarray(read("units/cell_type"), dtype=str),
            is_excitatory=read("units/is_excitatory").astype(bool),
            receptive_fields=read("units/receptive_field"),
            preferred_direction=read("units/preferred_direction").astype(np.float64),
            speed_gain=read("units/speed_gain").astype(np.float64),
            baseline_rate=read("units/baseline_rate").astype(np.float64),
        )


def read_config(path: str | Path) -> SimulationConfig:
    """The :class:`SimulationConfig` a file written by :func:`simulate_recording` was made with.

    Raises:
        RecordingError: the file's notes do not hold a simulation config.
    """
    with h5py.File(path, "r") as f:
        notes = f["general/notes"][()] if "general/notes" in f else b""
    notes = notes.decode() if isinstance(notes, bytes) else str(notes)
    if not notes.startswith(CONFIG_NOTE):
        raise RecordingError(path, "general/notes", f"expected {CONFIG_NOTE!r} and the config as JSON: "
                             "not a neuroformer simulation")
    try:
        return SimulationConfig(**json.loads(notes[len(CONFIG_NOTE):]))
    except (ValueError, TypeError) as e:
        raise RecordingError(path, "general/notes", f"unreadable simulation config: {e}") from e


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = cli.parser("neuroformer-simulate",
                        "Simulate a mouse-V1 recording with known ground truth and write it as an NWB file.")
    parser.add_argument("--out", type=Path, required=True, help="NWB file to write")
    cli.add_options(parser, SimulationConfig)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def _main(args: argparse.Namespace) -> int:
    config = cli.options(args, SimulationConfig)
    began = time.perf_counter()
    sim = simulate(config, progress=not args.quiet)
    write_nwb(sim, args.out)
    if not args.quiet:
        n_spikes = sum(len(s) for s in sim.spike_times)
        print(f"wrote {args.out}: {config.n_units} units, {n_spikes} spikes "
              f"({n_spikes / config.n_units / config.duration:.2f} Hz mean), "
              f"{np.count_nonzero(sim.ground_truth.connectivity)} links, "
              f"{len(sim.frames)} frames, {len(sim.trials['start_time'])} trials "
              f"in {time.perf_counter() - began:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``neuroformer-simulate``, ``python -m neuroformer.data.simulate``)."""
    return cli.run(_main, _parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
