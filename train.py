"""Train a model: ``python train.py [overrides]`` (see conf/train.yaml and README.md)."""

import hydra
from omegaconf import DictConfig

from neuroformer.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
