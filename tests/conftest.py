"""Shared fixtures: small simulated recordings, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuroformer.data.simulate import SimulationConfig, simulate_recording


@pytest.fixture(scope="session")
def small_sim_config() -> SimulationConfig:
    """Config of ``small_sim_path``: 40 units, 60 s, seed 1."""
    return SimulationConfig(seed=1, n_units=40, duration=60.0)


@pytest.fixture(scope="session")
def small_sim_path(tmp_path_factory: pytest.TempPathFactory,
                   small_sim_config: SimulationConfig) -> Path:
    """A small simulated NWB recording with ground truth (read-only: do not modify)."""
    path = tmp_path_factory.mktemp("sim") / "small_sim.nwb"
    return simulate_recording(path, small_sim_config, progress=False)
