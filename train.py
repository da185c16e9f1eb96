"""Train a model: ``python train.py [overrides]`` (see conf/train.yaml and README.md).

A user error (a bad recording, an invalid or unknown setting, a model that does not fit the
data) prints one message and exits with status 2; ``HYDRA_FULL_ERROR=1`` shows its traceback.
"""

from pathlib import Path

from omegaconf import DictConfig

from neuroformer.cli import hydra_main
from neuroformer.training import train


def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    raise SystemExit(hydra_main(main, config_path=str(Path(__file__).resolve().parent / "conf"), config_name="train"))
