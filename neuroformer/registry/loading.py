"""One loader for trained models: ``load(source)`` -> ``LoadedModel``, whatever the source.

``source`` is any of

- a Lightning checkpoint file written by ``train()`` (``.../checkpoints/best-*.ckpt``);
- a sharded DeepSpeed checkpoint folder (consolidated to full fp32 weights on the fly);
- a registered model, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` (or a ``runs:/`` URI),
  from ``MLFLOW_TRACKING_URI`` or the local store;
- a folder holding a registered model's artifacts.

Every one carries the model card (family, model config, data spec with the recordings and
reader options it was trained with) and the training config; the family named in the card
rebuilds the network (``neuroformer.registry.families``). Weights are read with
``weights_only=True``: loading never runs code from the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import mlflow

from neuroformer.distributed.checkpoints import is_sharded_checkpoint, read_checkpoint
from neuroformer.errors import ModelMismatchError
from neuroformer.registry.families import CARD_KEY, LoadedModel, from_card
from neuroformer.registry.mlflow_model import load_model_files
from neuroformer.registry.tracking import tracking_uri, use_tracking_uri

DEFAULT_STORE = Path("outputs/mlflow.db")
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def load(source: str | Path, store: str | Path = DEFAULT_STORE) -> LoadedModel:
    """A trained model in eval mode, with its data spec and training config (module docstring).

    Args:
        source: checkpoint file, sharded checkpoint folder, model URI or model artifact folder.
        store: local MLflow SQLite store for model URIs when ``MLFLOW_TRACKING_URI`` is unset.

    Raises:
        ModelMismatchError: the source does not exist or does not hold a neuroformer model.
    """
    text = str(source)
    if text.startswith(URI_SCHEMES):
        return _load_uri(text, store)
    path = Path(source)
    if is_sharded_checkpoint(path) or path.is_file():
        return _load_checkpoint(path)
    if path.is_dir():
        return load_model_files(path / "artifacts" if (path / "artifacts").is_dir() else path, text)
    raise ModelMismatchError(
        f"{source}: no such checkpoint or model; expected a checkpoint file (.ckpt), a sharded checkpoint "
        f"folder, a model folder, or models:/NAME/VERSION | models:/NAME@ALIAS")


def _load_checkpoint(path: Path) -> LoadedModel:
    try:  # never unpickle arbitrary objects: a checkpoint must not be able to run code
        checkpoint = read_checkpoint(path)
    except pickle.UnpicklingError as err:
        raise ModelMismatchError(f"{path}: not loadable with weights_only=True (it holds objects other than "
                                 f"tensors and plain containers; was it written by neuroformer's train()?): "
                                 f"{str(err).splitlines()[0]}") from None
    card = checkpoint.get(CARD_KEY)
    if card is None:
        raise ModelMismatchError(f"{path}: not a neuroformer training checkpoint: it has no model card "
                                 f"('{CARD_KEY}' entry: family, model config, data spec)")
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    train_config = card.get("train_config", "")
    if not train_config:  # checkpoints from before the card held it: the Hydra run folder's copy
        run_config = path.parent.parent / ".hydra" / "config.yaml"
        train_config = run_config.read_text() if run_config.is_file() else ""
    return from_card(card, weights, train_config, str(path))


def _load_uri(uri: str, store: str | Path) -> LoadedModel:
    with use_tracking_uri(tracking_uri(store)):
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except mlflow.exceptions.MlflowException as err:
            raise ModelMismatchError(f"{uri}: cannot be loaded from the MLflow tracking server at "
                                     f"{mlflow.get_tracking_uri()}: {err.message}") from None
    return load_model_files(local / "artifacts" if (local / "artifacts").is_dir() else local, uri)
