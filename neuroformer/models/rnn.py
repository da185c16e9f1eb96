"""A rate RNN: the student of the sparse-data study (Salatiello & Giese 2020; docs/sparse_rnn.md).

One Euler step of ``tau dh/dt = -h + W phi(h) + B u + b`` per time bin ``dt``::

    r_t     = phi(h_t)                            (B, H)  the units' activity
    y_t     = (C r_t + d) * output_std + output_mean   (B, O)  outputs (e.g. EMG), data units
    a_t     = g * r_t[:, :K] + c                  (B, K)  log expected spike count per bin
                                                          of the K recorded neurons
    h_{t+1} = h_t + dt/tau * (-h_t + W r_t + B u_t + b)  (+ noise while training)

How recorded neurons map to RNN units: **designated units**. Recorded neuron ``k`` is unit
``k`` of the RNN (``k < K``); only a per-neuron gain ``g_k`` and offset ``c_k`` turn that
unit's activity into the neuron's log rate (the recording's rate scale is unknown to the
RNN, its time course is not). A learned readout from all units would also fit the recorded
neurons, but then any network whose state space merely *contains* their time courses
satisfies the constraint; a designated unit must itself behave like the neuron, which ties
the student's units to the circuit's neurons one by one, as in the paper. Which units are
designated does not matter (the network is permutation invariant), so they are the first K.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from neuroformer.errors import ModelMismatchError

NONLINEARITIES = {"tanh": torch.tanh, "relu": F.relu, "softplus": F.softplus}


@dataclass
class RNNConfig:
    """Sizes and settings of a :class:`RateRNN` (everything ``RateRNN(config)`` needs).

    Attributes:
        n_inputs, n_outputs: input channels ``I`` and output channels ``O``.
        n_recorded: ``K``, recorded neurons matched to the first ``K`` units (0: output only).
        hidden: ``H``, number of units.
        nonlinearity: ``phi``, a key of ``NONLINEARITIES``.
        tau, dt: unit time constant and time step, seconds.
        noise: process noise while training: the std it gives ``h`` at rest, ignoring
            recurrence, whatever ``dt`` (0: none).
        init_gain: spectral radius scale of the initial random ``W``.
        input_gain: std of the initial input weights ``B``. Small inputs leave the units
            near-linear in the input at first, so that a new target between trained ones
            drives the network between their states (docs/sparse_rnn.md: large input weights
            let output-only students fail on held-out directions).
    """

    n_inputs: int
    n_outputs: int
    n_recorded: int = 0
    hidden: int = 200
    nonlinearity: str = "tanh"
    tau: float = 0.05
    dt: float = 0.02
    noise: float = 0.0
    init_gain: float = 0.9
    input_gain: float = 0.3

    def __post_init__(self) -> None:
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity={self.nonlinearity!r}; expected one of {sorted(NONLINEARITIES)}")
        if not 0 < self.dt <= self.tau:
            raise ValueError(f"need 0 < dt <= tau for a stable Euler step; got dt={self.dt}, tau={self.tau}")
        if self.n_recorded > self.hidden:
            raise ModelMismatchError(
                f"{self.n_recorded} recorded neurons need as many designated units, but the RNN has "
                f"hidden={self.hidden}; record fewer neurons or use a larger RNN")


class RNNOutput(NamedTuple):
    """What a :class:`RateRNN` computes for a batch of trials.

    Attributes:
        states: (B, T, H) unit activity ``phi(h_t)``.
        outputs: (B, T, O) outputs in the data's units.
        log_rates: (B, T, K) log expected spike count per bin of each recorded neuron.
    """

    states: torch.Tensor
    outputs: torch.Tensor
    log_rates: torch.Tensor


class RateRNN(nn.Module):
    """Continuous-time rate RNN, Euler-discretised (see the module docstring)."""

    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = c = config
        self.phi = NONLINEARITIES[c.nonlinearity]
        self.recurrent = nn.Linear(c.hidden, c.hidden)  # W, b
        self.input = nn.Linear(c.n_inputs, c.hidden, bias=False)  # B
        self.readout = nn.Linear(c.hidden, c.n_outputs)  # C, d
        self.h0 = nn.Parameter(torch.zeros(c.hidden))
        self.neuron_gain = nn.Parameter(torch.ones(c.n_recorded))  # g
        self.neuron_bias = nn.Parameter(torch.zeros(c.n_recorded))  # c
        self.register_buffer("output_mean", torch.zeros(c.n_outputs))
        self.register_buffer("output_std", torch.ones(c.n_outputs))
        nn.init.normal_(self.recurrent.weight, std=c.init_gain / math.sqrt(c.hidden))
        nn.init.zeros_(self.recurrent.bias)
        nn.init.normal_(self.input.weight, std=c.input_gain)
        nn.init.normal_(self.readout.weight, std=1 / math.sqrt(c.hidden))
        nn.init.zeros_(self.readout.bias)

    @classmethod
    def build(cls, spec: Any, **settings: Any) -> RateRNN:
        """A model sized for a data spec (``neuroformer.data.trials.TrialSpec``).

        Takes ``I``, ``O``, ``K`` and ``dt`` from the spec, starts the outputs at the data's
        mean and spread and each recorded neuron's rate at its mean training rate;
        ``settings`` are the other :class:`RNNConfig` fields.
        """
        model = cls(RNNConfig(n_inputs=spec.n_inputs, n_outputs=spec.n_outputs,
                              n_recorded=spec.n_recorded, dt=spec.bin_size, **settings))
        model.output_mean.copy_(torch.tensor(spec.behavior_mean))
        model.output_std.copy_(torch.tensor(spec.behavior_std))
        with torch.no_grad():
            model.neuron_bias.copy_(torch.tensor(spec.unit_mean_count).clamp_min(1e-3).log())
        return model

    def hparams(self) -> dict:
        """The config as plain JSON (``RateRNN(RNNConfig(**hparams))`` rebuilds the architecture)."""
        return asdict(self.config)

    def forward(self, inputs: torch.Tensor) -> RNNOutput:
        """Run the network over whole trials.

        Args:
            inputs: (B, T, I) input channels per time bin.
        """
        alpha = self.config.dt / self.config.tau
        noise = self.config.noise if self.training else 0.0
        drive = self.input(inputs)  # (B, T, H), all steps at once
        h = self.h0.expand(inputs.shape[0], -1)
        states = []
        for t in range(inputs.shape[1]):
            r = self.phi(h)
            states.append(r)
            h = h + alpha * (self.recurrent(r) + drive[:, t] - h)
            if noise:
                h = h + noise * math.sqrt(2 * alpha) * torch.randn_like(h)
        r = torch.stack(states, dim=1)  # (B, T, H)
        outputs = self.readout(r) * self.output_std + self.output_mean
        log_rates = self.neuron_gain * r[..., : self.config.n_recorded] + self.neuron_bias
        return RNNOutput(r, outputs, log_rates)
