"""Trained models as MLflow models: logged and registered after training, read back by ``load``.

A registered model is an MLflow pyfunc whose artifacts hold everything needed to use it:

- ``weights.pt``: a plain state dict, read with ``weights_only=True``, so loading never runs
  code from the file;
- ``card.json``: the model card, ``{"family", "model_config", "spec"}`` and ``"dendrites"`` where
  the model has dendrite nodes (the family rebuilds the architecture; the spec turns recordings
  into its input);
- ``config.yaml``: the resolved training config.

The pyfunc face (``FamilyPyfunc``, logged from code rather than pickled) maps named arrays to
named arrays through the family's ``predict``; ``neuroformer.registry.load`` reads the
artifacts directly and returns the network itself.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import torch

import neuroformer
from neuroformer.errors import ModelMismatchError
from neuroformer.registry.families import LoadedModel, dendrite_card, family, from_card

WEIGHTS, CARD, TRAIN_CONFIG = "weights.pt", "card.json", "config.yaml"
PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")


def save_model_files(folder: Path, loaded: LoadedModel) -> dict[str, str]:
    """Write a model's artifact files into ``folder``; returns {artifact name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    fam = loaded.model_family
    torch.save({k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}, folder / WEIGHTS)
    card = {"family": loaded.family, "model_config": fam.model_config(loaded.model), "spec": loaded.spec.to_dict(),
            **dendrite_card(loaded.model)}
    (folder / CARD).write_text(json.dumps(card))
    (folder / TRAIN_CONFIG).write_text(loaded.train_config)
    return {name: str(folder / name) for name in (WEIGHTS, CARD, TRAIN_CONFIG)}


def read_card(folder: Path, uri: str) -> dict:
    """The model card of an artifact folder (models registered before cards were Neuroformers)."""
    if (folder / CARD).is_file():
        return json.loads((folder / CARD).read_text())
    legacy = folder / "model_config.json", folder / "spec.json"
    if all(f.is_file() for f in legacy):
        return {"family": "neuroformer", "model_config": json.loads(legacy[0].read_text()),
                "spec": json.loads(legacy[1].read_text())}
    raise ModelMismatchError(f"{uri}: not a neuroformer model: no {CARD} in its artifacts ({folder})")


def load_model_files(folder: str | Path, uri: str = "") -> LoadedModel:
    """Rebuild a model from the files ``save_model_files`` wrote (safe: tensors only)."""
    folder = Path(folder)
    uri = uri or str(folder)
    if not (folder / WEIGHTS).is_file():
        raise ModelMismatchError(f"{uri}: not a neuroformer model: no {WEIGHTS} in its artifacts ({folder})")
    weights = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    config = (folder / TRAIN_CONFIG).read_text() if (folder / TRAIN_CONFIG).is_file() else ""
    return from_card(read_card(folder, uri), weights, config, uri)


def log_model(loaded: LoadedModel, registered_name: str | None = None, alias: str | None = None) -> str:
    """Log ``loaded`` to the active MLflow run (and register it); returns its model URI.

    The URI is ``models:/NAME/VERSION`` when registered, else the run's model URI.
    """
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = save_model_files(Path(tmp), loaded)
        example = family(loaded.family).example_inputs(loaded)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts=artifacts,
            input_example=example,
            registered_model_name=registered_name,
            pip_requirements=[f"neuroformer=={neuroformer.__version__}", f"torch=={torch.__version__.split('+')[0]}"],
        )
    if not registered_name:
        return info.model_uri
    version = info.registered_model_version
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(registered_name, alias, version)
    return f"models:/{registered_name}/{version}"
