"""Load a trained model for inference: a Lightning checkpoint or a registered MLflow model.

Both carry the model config and the data ``InputSpec``; the time-block split a model was
trained with comes from its training config (stored with registered models, and in the
Hydra run folder ``<run>/.hydra/config.yaml`` next to ``<run>/checkpoints/``), so inference
on "the test block" means the block the model never saw.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import mlflow
import torch
from omegaconf import OmegaConf

from neuroformer.data.dataset import InputSpec
from neuroformer.data.splits import SplitSpec
from neuroformer.errors import ModelMismatchError
from neuroformer.models.neuroformer import Neuroformer, NeuroformerConfig
from neuroformer.registry import LoadedModel, load_model
from neuroformer.tracking import tracking_uri

DEFAULT_STORE = Path("outputs/mlflow.db")


def load(source: str | Path, store: str | Path = DEFAULT_STORE) -> LoadedModel:
    """A trained model in eval mode, from a ``.ckpt`` file or ``models:/NAME/VERSION|@ALIAS``.

    Args:
        source: a Lightning checkpoint written by training, a registry/runs URI or a model folder.
        store: local MLflow SQLite store used for URIs when ``MLFLOW_TRACKING_URI`` is unset.
    """
    path = Path(source)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found")
        return _load_checkpoint(path)
    if not path.is_dir():
        mlflow.set_tracking_uri(tracking_uri(store))
    return load_model(str(source))


def _load_checkpoint(path: Path) -> LoadedModel:
    try:  # never unpickle arbitrary objects: a checkpoint must not be able to run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelMismatchError(f"{path}: not loadable with weights_only=True (it holds objects other than "
                                 f"tensors and plain containers; was it written by neuroformer's train()?): {err}") from None
    meta = ckpt.get("neuroformer")
    if meta is None:
        raise ModelMismatchError(f"{path}: checkpoint has no 'neuroformer' entry (model config and spec); "
                                 "was it written by neuroformer's PretrainTask?")
    model = Neuroformer(NeuroformerConfig(**meta["model_config"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
                           if k.startswith("model.")})
    run_config = path.parent.parent / ".hydra" / "config.yaml"
    train_config = run_config.read_text() if run_config.is_file() else ""
    return LoadedModel(model.eval(), InputSpec.from_dict(meta["spec"]), train_config, str(path))


def training_split(loaded: LoadedModel) -> SplitSpec:
    """The time-block split the model was trained with (from its training config)."""
    if not loaded.train_config:
        raise ModelMismatchError(
            f"{loaded.uri}: no training config found (looked for the registered model's config.yaml "
            "or the run folder's .hydra/config.yaml), so the test block is unknown; pass the split explicitly"
        )
    split = OmegaConf.to_container(OmegaConf.create(loaded.train_config).data.split, resolve=True)
    split.pop("_target_", None)
    return SplitSpec(**split)
