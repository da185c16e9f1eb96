"""A simulated motor-cortex circuit for centre-out reaching, with ground truth, written as NWB.

The reference circuit of the sparse-data RNN study (Salatiello & Giese 2020; docs/sparse_rnn.md):

* **Dynamics.** A rate network of ``N`` units, ``tau dh/dt = -h + W tanh(h) + B u(t) + noise``.
  ``W`` has a rotational core (``n_planes`` planes of damped oscillation, 1-3 Hz) and a random
  bulk that the core drives but that does not feed back into it, so single units mix the
  rotations, filtered and rectified, as motor-cortex neurons do.
* **Trials.** A target appears (one of ``n_conditions`` directions on a circle); its input
  ``(cos, sin)`` holds the network at a condition-specific preparatory state until the go cue
  (a brief pulse, the third input). Released, the state rotates back to rest: the movement.
* **Output.** Six "muscles" read the rotating state through rectified readouts that are
  blind to the preparatory states (output-null preparation), so the EMG is quiet until the go
  cue and then multiphasic, different for each direction.
* **Observations.** Spikes are Poisson from each unit's rate, ``baseline * exp(gain * tanh(h))``;
  the EMG envelope gets a little measurement noise.

The file holds the units (Units table, with each unit's rate link), the EMG in
``processing/behavior/BehavioralTimeSeries/emg`` (read by ``neuroformer.data.nwb.read_nwb``),
trials with ``condition``, ``target_angle``, ``target_x``, ``target_y``, ``target_on_time``
and ``go_cue_time``, and the ground truth in ``processing/ground_truth``: ``rates`` (every
unit's true rate), ``network`` (weights, one row per unit) and ``muscles`` (readouts), read
back by :func:`load_reaching_truth`. The same seed and config give the same file contents.

Run ``python -m neuroformer.data.simulate_reaching --out reaching.nwb`` (see ``--help``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from hdmf.common import DynamicTable, VectorData, VectorIndex
from pynwb import NWBHDF5IO, NWBFile, TimeSeries
from pynwb.behavior import BehavioralTimeSeries
from pynwb.file import Subject
from pynwb.misc import Units
from scipy.signal import lfilter

from neuroformer import cli
from neuroformer.cli import option
from neuroformer.data.recording import TimeSeries as RecordedSeries
from neuroformer.errors import RecordingError
from neuroformer.files import atomic_path

SESSION_START = datetime(2024, 3, 4, 10, 0, 0, tzinfo=timezone.utc)
INPUTS = ("target_x", "target_y", "go_cue")  # columns of the input weights B
EMG_SOFTNESS = 3.0  # EMG = softplus(s * drive) / s: rectified, with a smooth knee


@dataclass(frozen=True)
class ReachingConfig:
    """Parameters of one simulated reaching session (every one is also a CLI option)."""

    seed: int = option(0, "random seed: same seed and config give the same file contents")
    n_units: int = option(200, "number of units in the circuit")
    n_muscles: int = option(6, "number of EMG channels")
    n_conditions: int = option(8, "reach directions, evenly spaced on a circle")
    trials_per_condition: int = option(30, "trials of each direction")
    n_planes: int = option(3, "planes of rotational dynamics in the core")
    freq_min: float = option(1.5, "slowest rotation, Hz")
    freq_max: float = option(3.5, "fastest rotation, Hz")
    damping: float = option(0.4, "decay time of the rotations, s")
    bulk_gain: float = option(0.8, "spectral radius of the random bulk connectivity")
    tau: float = option(0.05, "unit time constant, s")
    dt: float = option(0.005, "integration step, s (also the EMG sampling interval)")
    prep_norm: float = option(12.0, "norm of the linearised preparatory state (|h|, all units)")
    go_amplitude: float = option(1.0, "norm of the go-cue kick")
    go_pulse: float = option(0.05, "go-cue pulse length, s")
    input_tau: float = option(0.15, "time constant of the upstream low-pass filter on the target input, s")
    noise: float = option(0.1, "process noise on h (std of h at rest, ignoring recurrence)")
    mean_rate: float = option(10.0, "median baseline firing rate, Hz")
    emg_noise: float = option(0.03, "EMG measurement noise, fraction of the mean EMG peak")
    target_time: float = option(0.3, "target onset after trial start, s")
    delay: float = option(0.5, "target onset to go cue, s")
    after_go: float = option(1.0, "go cue to trial end, s")
    truth_bin: float = option(0.02, "bin of the stored true rates, s (mean rate in each bin)")

    def __post_init__(self) -> None:
        positive = ("n_units", "n_muscles", "n_conditions", "trials_per_condition", "n_planes",
                    "freq_min", "damping", "tau", "dt", "go_pulse", "mean_rate", "delay", "after_go",
                    "truth_bin")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if 2 * self.n_planes >= self.n_units:
            raise ValueError("n_units must exceed 2 * n_planes (the rotational core)")
        if self.freq_max < self.freq_min:
            raise ValueError("freq_max must be >= freq_min")
        if self.dt > self.tau / 2:
            raise ValueError("dt must be at most tau / 2 for a stable Euler step")
        ratio = self.truth_bin / self.dt
        if abs(ratio - round(ratio)) > 1e-6:
            raise ValueError("truth_bin must be a whole number of dt steps")
        for name in ("target_time", "delay", "after_go", "go_pulse"):
            steps = getattr(self, name) / self.dt
            if abs(steps - round(steps)) > 1e-6:
                raise ValueError(f"{name} must be a whole number of dt steps")
        if self.trial_duration / self.truth_bin % 1 > 1e-6:
            raise ValueError("the trial length must be a whole number of truth_bin")

    @property
    def trial_duration(self) -> float:
        return self.target_time + self.delay + self.after_go

    @property
    def n_trials(self) -> int:
        return self.n_conditions * self.trials_per_condition

    def identifier(self) -> str:
        """Deterministic file identifier: seed plus a hash of the whole config."""
        digest = hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        return f"neuroformer-reaching-seed{self.seed}-{digest.hexdigest()[:10]}"


@dataclass
class ReachingTruth:
    """The circuit behind the data; unit ``i`` is row ``i`` of the Units table.

    Attributes:
        recurrent: (N, N) ``W[post, pre]``, weight from unit ``pre``'s ``tanh(h)`` to ``post``.
        inputs: (N, 3) ``B``, weight of each input (``INPUTS``) onto each unit.
        readout: (M, N) muscle readout of ``tanh(h)``; EMG =
            ``softplus(s * (readout @ tanh(h) + readout_offset)) / s``, ``s = EMG_SOFTNESS``.
        readout_offset: (M,) offsets of the muscle drives.
        baseline_rate: (N,) Hz; each unit fires at ``baseline_rate * exp(rate_gain * tanh(h))``.
        rate_gain: (N,) log-rate change per unit of ``tanh(h)``.
        rates: every unit's true rate, Hz, (n_bins, N), each sample the mean over its bin.
        config: the simulation parameters (``ReachingConfig`` fields).
    """

    recurrent: np.ndarray
    inputs: np.ndarray
    readout: np.ndarray
    readout_offset: np.ndarray
    baseline_rate: np.ndarray
    rate_gain: np.ndarray
    rates: RecordedSeries
    config: dict


@dataclass
class ReachingSession:
    """A simulated session in memory (what :func:`write_nwb` stores).

    Attributes:
        config: the parameters it was made with.
        spike_times: per unit, (n_i,) float64 seconds, sorted.
        emg: (n_steps, M) float32 EMG envelope, sample ``k`` at ``k * dt``.
        trials: column -> (n_trials,) array: ``start_time``, ``stop_time``, ``condition``,
            ``target_angle``, ``target_x``, ``target_y``, ``target_on_time``, ``go_cue_time``.
        truth: the circuit and its true rates.
    """

    config: ReachingConfig
    spike_times: list[np.ndarray]
    emg: np.ndarray
    trials: dict[str, np.ndarray]
    truth: ReachingTruth


# --------------------------------------------------------------------------- the circuit


def _inputs(cfg: ReachingConfig, angles: np.ndarray) -> np.ndarray:
    """(n_steps, n_trials, 3) inputs of trials aimed at ``angles`` (radians), trial-relative time."""
    steps = round(cfg.trial_duration / cfg.dt)
    on, go = round(cfg.target_time / cfg.dt), round((cfg.target_time + cfg.delay) / cfg.dt)
    u = np.zeros((steps, len(angles), 3))
    u[on:, :, 0], u[on:, :, 1] = np.cos(angles), np.sin(angles)
    # Upstream areas pass the target on smoothly, so the network glides to its preparatory
    # state instead of ringing on the way; the go cue gates it off at once, and the released
    # state rotates: the movement. (The student sees plain steps and must learn the rise.)
    u[:, :, :2] = lfilter([cfg.dt / cfg.input_tau], [1, cfg.dt / cfg.input_tau - 1], u[:, :, :2], axis=0)
    u[go:, :, :2] = 0.0
    u[go:go + round(cfg.go_pulse / cfg.dt), :, 2] = 1.0
    return u


def _run(cfg: ReachingConfig, recurrent: np.ndarray, inputs: np.ndarray, u: np.ndarray,
         rng: np.random.Generator | None) -> np.ndarray:
    """Euler-integrate the network from rest; (n_steps, n_trials, N) float32 ``tanh(h)``.

    Args:
        u: (n_steps, n_trials, 3) inputs. rng: process noise source, or None for none.
    """
    alpha = cfg.dt / cfg.tau
    h = np.zeros((u.shape[1], cfg.n_units), np.float32)
    if rng is not None:  # start from the stationary spread around rest
        h += rng.standard_normal(h.shape, np.float32) * cfg.noise
    drive = (u @ inputs.T).astype(np.float32)  # (n_steps, n_trials, N)
    w = recurrent.T.astype(np.float32)
    out = np.empty((len(u), *h.shape), np.float32)
    kick = np.float32(cfg.noise * math.sqrt(2 * alpha))  # std of h at rest: noise, for any dt
    for k in range(len(u)):
        r = np.tanh(h, out=out[k])
        h += np.float32(alpha) * (r @ w + drive[k] - h)
        if rng is not None:
            h += kick * rng.standard_normal(h.shape, np.float32)
    return out


def _circuit(rng: np.random.Generator, cfg: ReachingConfig) -> tuple[np.ndarray, ...]:
    """Draw the weights and calibrate the readout on noise-free trials of every direction.

    Returns ``(recurrent, inputs, readout, readout_offset, baseline_rate, rate_gain)``.
    """
    n, k = cfg.n_units, cfg.n_planes
    core = np.linalg.qr(rng.standard_normal((n, 2 * k)))[0]  # (N, 2k) orthonormal
    rotation = np.zeros((2 * k, 2 * k))
    for j, f in enumerate(np.linspace(cfg.freq_min, cfg.freq_max, k)):
        # Linearised, a plane evolves as exp(t (a - 1 +- i w) / tau): decay `damping`, frequency f.
        a, w = 1 - cfg.tau / cfg.damping, 2 * math.pi * f * cfg.tau
        rotation[2 * j:2 * j + 2, 2 * j:2 * j + 2] = [[a, -w], [w, a]]
    off_core = np.eye(n) - core @ core.T
    # The bulk listens to every unit but never talks back to the core: the rotations stay exact.
    bulk = off_core @ rng.standard_normal((n, n)) * cfg.bulk_gain / math.sqrt(n)
    recurrent = core @ rotation @ core.T + bulk

    # Preparatory inputs aim into the core (plus some bulk); scaled so the linearised
    # preparatory state has norm prep_norm for every direction.
    prep = np.linalg.qr(core @ rng.standard_normal((2 * k, 2)) + 0.3 * rng.standard_normal((n, 2)) / math.sqrt(n))[0]
    settle = np.linalg.solve(np.eye(n) - recurrent, prep)  # linearised fixed point per unit input
    scale = cfg.prep_norm / np.linalg.norm(settle, axis=0).mean()
    go = core @ rng.standard_normal(2 * k) + 0.3 * rng.standard_normal(n) / math.sqrt(n)
    go *= cfg.go_amplitude / np.linalg.norm(go) * (cfg.tau / cfg.go_pulse)  # kick norm ~ go_amplitude
    inputs = np.column_stack([prep * scale, go])

    # Muscles read the core, blind to the preparatory states (those reached at the go cue):
    # quiet while preparing, active once released.
    angles = 2 * np.pi * np.arange(cfg.n_conditions) / cfg.n_conditions
    states = _run(cfg, recurrent, inputs, _inputs(cfg, angles), None)  # (T, C, N)
    null = np.linalg.qr(states[round((cfg.target_time + cfg.delay) / cfg.dt) - 1].T)[0]
    potent = core @ rng.standard_normal((2 * k, cfg.n_muscles))
    potent -= null @ (null.T @ potent)
    readout = (potent / np.linalg.norm(potent, axis=0)).T  # (M, N)
    readout /= (states @ readout.T).reshape(-1, cfg.n_muscles).std(axis=0)[:, None]
    readout_offset = -np.ones(cfg.n_muscles)  # rectification: drives above one spread fire

    baseline_rate = cfg.mean_rate * np.exp(0.5 * rng.standard_normal(n))
    rate_gain = rng.uniform(1.0, 2.0, n)
    return recurrent, inputs, readout, readout_offset, baseline_rate, rate_gain


def _emg(drive: np.ndarray) -> np.ndarray:
    """EMG envelope of a muscle drive: a smooth rectification."""
    return np.logaddexp(0.0, EMG_SOFTNESS * drive) / EMG_SOFTNESS


def simulate(config: ReachingConfig = ReachingConfig()) -> ReachingSession:
    """Simulate a session in memory (see :func:`simulate_reaching` to write it)."""
    cfg = config
    net_ss, order_ss, noise_ss, spike_ss, emg_ss = np.random.SeedSequence(cfg.seed).spawn(5)
    recurrent, inputs, readout, offset, baseline, gain = _circuit(np.random.default_rng(net_ss), cfg)

    conditions = np.random.default_rng(order_ss).permutation(
        np.repeat(np.arange(cfg.n_conditions), cfg.trials_per_condition))
    angles = 2 * np.pi * conditions / cfg.n_conditions
    r = _run(cfg, recurrent, inputs, _inputs(cfg, angles), np.random.default_rng(noise_ss))
    steps, n_trials, n = r.shape
    # Trials follow one another: session sample k*steps + s is trial k's step s.
    r = r.transpose(1, 0, 2).reshape(-1, n)  # (n_trials * steps, N)
    per_bin = round(cfg.truth_bin / cfg.dt)
    # The true rate of each bin is its mean over the bin; spikes are Poisson from exactly that.
    rates = (baseline * np.exp(gain * r)).reshape(-1, per_bin, n).mean(axis=1).astype(np.float32)
    spike_rng = np.random.default_rng(spike_ss)
    counts = spike_rng.poisson(rates * cfg.truth_bin)
    bins, unit = np.nonzero(counts)
    reps = counts[bins, unit]
    bins, unit = np.repeat(bins, reps), np.repeat(unit, reps)
    times = (bins + spike_rng.random(len(bins))) * cfg.truth_bin  # uniform within their bin
    order = np.lexsort((times, unit))
    spike_times = np.split(times[order], np.cumsum(np.bincount(unit, minlength=n))[:-1])

    emg = _emg(r @ readout.T + offset)
    peak = emg.reshape(n_trials, steps, -1).max(axis=1).mean()
    emg += cfg.emg_noise * peak * np.random.default_rng(emg_ss).standard_normal(emg.shape)

    truth = ReachingTruth(
        recurrent=recurrent, inputs=inputs, readout=readout, readout_offset=offset,
        baseline_rate=baseline, rate_gain=gain, config=dataclasses.asdict(cfg),
        rates=RecordedSeries("rates", (np.arange(len(rates)) + 0.5) * cfg.truth_bin, rates, "Hz"),
    )
    start = np.arange(n_trials) * cfg.trial_duration
    trials = {
        "start_time": start,
        "stop_time": np.arange(1, n_trials + 1) * cfg.trial_duration,  # exactly the next trial's start
        "condition": conditions.astype(np.int64),
        "target_angle": np.degrees(angles),
        "target_x": np.cos(angles),
        "target_y": np.sin(angles),
        "target_on_time": start + cfg.target_time,
        "go_cue_time": start + cfg.target_time + cfg.delay,
    }
    return ReachingSession(cfg, spike_times, emg.astype(np.float32), trials, truth)


# --------------------------------------------------------------------------- NWB


def _to_nwbfile(session: ReachingSession) -> NWBFile:
    cfg, truth = session.config, session.truth
    nwb = NWBFile(
        session_description=(
            "Simulated motor cortex during delayed centre-out reaching: a recurrent rate network "
            "with rotational dynamics after a condition-specific preparatory input, read out as "
            "multiphasic EMG."),
        identifier=cfg.identifier(),
        session_start_time=SESSION_START,
        session_id=f"reaching-seed{cfg.seed}",
        experimenter=["Simulator, Neuroformer"],
        lab="neuroformer",
        institution="neuroformer project (simulated data)",
        experiment_description=(
            "Synthetic benchmark with known ground truth (network weights, every unit's rate, "
            "muscle readouts) for training RNNs from sparse recordings."),
        keywords=["simulation", "ground truth", "motor cortex", "reaching", "EMG", "spikes"],
        notes="neuroformer.data.simulate_reaching config: " + json.dumps(dataclasses.asdict(cfg)),
        source_script="neuroformer.data.simulate_reaching",
        source_script_file_name="simulate_reaching.py",
        subject=Subject(subject_id=f"sim-monkey-{cfg.seed}", species="Macaca mulatta", age="P6Y",
                        sex="U", description="Simulated subject."),
    )
    # Whole columns at once: adding units one by one makes hdmf check every spike time alone.
    spike_times = VectorData(name="spike_times", description="spike times, s",
                             data=np.concatenate(session.spike_times))
    nwb.units = Units(
        name="units", resolution=cfg.dt, id=np.arange(cfg.n_units),
        description="Simulated units: Poisson spikes of each unit's true rate.",
        columns=[
            spike_times,
            VectorIndex(name="spike_times_index", target=spike_times,
                        data=np.cumsum([len(t) for t in session.spike_times])),
            VectorData(name="baseline_rate", description="rate at tanh(h) = 0, Hz",
                       data=truth.baseline_rate),
            VectorData(name="rate_gain", description="log-rate change per unit of tanh(h)",
                       data=truth.rate_gain),
            VectorData(name="location", description="brain area of the unit",
                       data=["simulated M1"] * cfg.n_units),
        ],
    )

    behavior = nwb.create_processing_module("behavior", "Muscle activity during reaching.")
    behavior.add(BehavioralTimeSeries(time_series=TimeSeries(
        name="emg",
        description=f"Rectified, smoothed EMG envelope of {cfg.n_muscles} muscles (columns).",
        data=session.emg, unit="a.u.", rate=1 / cfg.dt, starting_time=0.0,
    )))

    columns = {
        "condition": "reach direction index (target angle = 360 * condition / n_conditions)",
        "target_angle": "reach direction, degrees (0 = rightward, 90 = upward)",
        "target_x": "target position, x (unit circle)",
        "target_y": "target position, y (unit circle)",
        "target_on_time": "target onset, s: its (x, y) input holds until the go cue",
        "go_cue_time": f"go cue, s: a {cfg.go_pulse * 1e3:g} ms pulse input, then the movement",
    }
    for name, description in columns.items():
        nwb.add_trial_column(name=name, description=description)
    for k in range(len(session.trials["start_time"])):
        nwb.add_trial(**{name: values[k].item() for name, values in session.trials.items()})

    gt = nwb.create_processing_module(
        "ground_truth", "The circuit that generated this session (load_reaching_truth reads it).")
    gt.add(TimeSeries(
        name="rates", description="Every unit's true firing rate (columns: Units rows), mean over each bin.",
        data=truth.rates.data,  # noisy floats barely compress: gzip would only slow writing
        unit="Hz", rate=1 / cfg.truth_bin, starting_time=0.5 * cfg.truth_bin,
    ))
    gt.add(DynamicTable(
        name="network",
        description=(f"One row per unit: tau dh/dt = -h + W tanh(h) + B u + noise, tau = {cfg.tau} s; "
                     f"inputs u = {', '.join(INPUTS)}."),
        columns=[
            VectorData(name="recurrent_weights", description="row i: W[i, :], weights onto unit i",
                       data=truth.recurrent),
            VectorData(name="input_weights", description=f"row i: B[i, :], inputs {INPUTS}",
                       data=truth.inputs),
        ],
    ))
    gt.add(DynamicTable(
        name="muscles",
        description=f"One row per EMG column: EMG = softplus(s x) / s, s = {EMG_SOFTNESS}, "
                    "x = readout_weights @ tanh(h) + readout_offset.",
        columns=[
            VectorData(name="readout_weights", description="weights of tanh(h) of every unit",
                       data=truth.readout),
            VectorData(name="readout_offset", description="offset of the muscle drive",
                       data=truth.readout_offset),
        ],
    ))
    return nwb


def write_nwb(session: ReachingSession, path: str | Path) -> Path:
    """Write ``session`` to ``path`` atomically (no partial file if interrupted)."""
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not end in '.nwb'")
        with NWBHDF5IO(str(tmp), "w") as io:
            io.write(_to_nwbfile(session))
    return Path(path)


def simulate_reaching(path: str | Path, config: ReachingConfig = ReachingConfig()) -> Path:
    """Simulate a session and write it as an NWB file at ``path``; returns the path."""
    return write_nwb(simulate(config), path)


def load_reaching_truth(path: str | Path) -> ReachingTruth:
    """Read the ground truth of a file written by :func:`simulate_reaching`.

    Raises:
        RecordingError: the file lacks a ground-truth field (not a simulated reaching session).
    """
    with h5py.File(path, "r") as f:
        def read(name: str) -> np.ndarray:
            if name not in f:
                raise RecordingError(path, name, "missing: not a neuroformer reaching simulation")
            return f[name][()]

        notes = read("general/notes")
        notes = notes.decode() if isinstance(notes, bytes) else str(notes)
        prefix = "neuroformer.data.simulate_reaching config: "
        if not notes.startswith(prefix):
            raise RecordingError(path, "general/notes", f"expected {prefix!r} and the config as JSON")
        config = json.loads(notes.removeprefix(prefix))
        rates = read("processing/ground_truth/rates/data").astype(np.float32)
        step = 1 / float(f["processing/ground_truth/rates/starting_time"].attrs["rate"])
        start = float(read("processing/ground_truth/rates/starting_time"))
        return ReachingTruth(
            recurrent=read("processing/ground_truth/network/recurrent_weights"),
            inputs=read("processing/ground_truth/network/input_weights"),
            readout=read("processing/ground_truth/muscles/readout_weights"),
            readout_offset=read("processing/ground_truth/muscles/readout_offset"),
            baseline_rate=read("units/baseline_rate").astype(np.float64),
            rate_gain=read("units/rate_gain").astype(np.float64),
            rates=RecordedSeries("rates", start + np.arange(len(rates)) * step, rates, "Hz"),
            config=config,
        )


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``python -m neuroformer.data.simulate_reaching --out FILE``."""
    parser = cli.parser("python -m neuroformer.data.simulate_reaching",
                        "Simulate a motor-cortex reaching session with ground truth; write it as NWB.")
    parser.add_argument("--out", type=Path, required=True, help="NWB file to write")
    cli.add_options(parser, ReachingConfig)
    parser.add_argument("--quiet", action="store_true", help="no summary line")
    args = parser.parse_args(argv)
    try:
        config = cli.options(args, ReachingConfig)
    except ValueError as e:
        parser.error(str(e))
    began = time.perf_counter()
    session = simulate(config)
    write_nwb(session, args.out)
    if not args.quiet:
        n_spikes = sum(len(s) for s in session.spike_times)
        duration = config.n_trials * config.trial_duration
        print(f"wrote {args.out}: {config.n_units} units, {n_spikes} spikes "
              f"({n_spikes / config.n_units / duration:.2f} Hz mean), {config.n_trials} trials of "
              f"{config.n_conditions} directions, {config.n_muscles} EMG channels "
              f"in {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
