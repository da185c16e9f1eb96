"""The base of every family's data module: its recordings (the configured files, or the family's
simulated default, cached) and one dataset per split, batched by the dataset itself."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from neuroformer.data.dataset import already_batched

log = logging.getLogger(__name__)


def simulated_path(cache_dir: str | Path, config: Any) -> Path:
    """Cache file of a simulated recording: one file per distinct simulator config (``to_dict()``, ``seed``)."""
    key = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"simulated_seed{config.seed}_{key}.nwb"


class SplitDataModule(L.LightningDataModule):
    """A LightningDataModule whose ``dataset(split)`` (after ``setup``) builds whole batches in
    ``__getitems__``. Subclasses set the attributes below and implement ``simulate`` and ``dataset``."""

    paths: list[Path]  # the recordings to read; empty: the simulated default below
    cache_dir: Path  # where simulated recordings are kept
    simulation: Any  # the simulator's config (``to_dict()``, ``seed``)
    batch_size: int
    num_workers: int

    def simulate(self, path: Path) -> None:
        """Write the family's default simulated recording to ``path``."""
        raise NotImplementedError

    @property
    def files(self) -> list[Path]:
        return self.paths or [simulated_path(self.cache_dir, self.simulation)]

    def prepare_data(self) -> None:
        path = self.files[0]
        if not self.paths and not path.exists():
            log.info("Simulating the recording into %s (first use; cached after)", path)
            self.simulate(path)

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` ("train", "val" or "test")."""
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.batch_size, shuffle=shuffle,
                          collate_fn=already_batched, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
