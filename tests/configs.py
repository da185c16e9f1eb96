"""Compose the real Hydra config for tests, with a temporary output folder."""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Experiments of the Neuroformer family (the default model group); every other family's
# experiments are run under fast_dev_run by its own test module (test_sparse_rnn.py, ...).
NEUROFORMER_EXPERIMENTS = [e for e in EXPERIMENTS
                           if "override /model:" not in (CONF / "experiment" / f"{e}.yaml").read_text()]


def compose(overrides: list[str], tmp_path: Path, sim_path: Path | None = None) -> DictConfig:
    """The training config as ``python train.py OVERRIDES`` would see it, writing under tmp_path.

    Runs on simulated data read ``sim_path`` instead of generating the default recording.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_root = str(tmp_path / "outputs")
        cfg.paths.output_dir = str(tmp_path / "outputs" / "run")
        if sim_path is not None and not cfg.data.paths:
            cfg.data.paths = [str(sim_path)]
            cfg.data.split.n_blocks = 10  # the default recording's 40 blocks would be 1.5 s of a 60 s test file
        del cfg.hydra  # train() sees what @hydra.main passes: the job's config without the hydra node
    return cfg
