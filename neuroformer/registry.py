"""Share trained models through the MLflow model registry, and load them back.

A registered Neuroformer is an MLflow pyfunc model whose artifacts hold everything needed
to use it: the weights (a plain state dict, loaded with ``weights_only=True`` so that
loading never runs code from the file), the model config, the data ``InputSpec``
(tokenizer and unit vocabulary, frame and behaviour layout) and the resolved training
config. ``load_model("models:/NAME/VERSION")`` or ``"models:/NAME@ALIAS"`` rebuilds it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

import neuroformer
from neuroformer.data.dataset import Batch, InputSpec
from neuroformer.errors import ModelMismatchError
from neuroformer.models.neuroformer import Neuroformer, NeuroformerConfig

WEIGHTS, MODEL_CONFIG, SPEC, TRAIN_CONFIG = "weights.pt", "model_config.json", "spec.json", "config.yaml"


@dataclass
class LoadedModel:
    """A model ready to use: eval mode, with the spec that turns data into its input."""

    model: Neuroformer
    spec: InputSpec
    train_config: str
    uri: str


def save_model_files(folder: Path, model: Neuroformer, spec: InputSpec, train_config: str = "") -> dict[str, str]:
    """Write a model's artifact files into ``folder``; returns {artifact name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        WEIGHTS: folder / WEIGHTS,
        MODEL_CONFIG: folder / MODEL_CONFIG,
        SPEC: folder / SPEC,
        TRAIN_CONFIG: folder / TRAIN_CONFIG,
    }
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, files[WEIGHTS])
    files[MODEL_CONFIG].write_text(json.dumps(model.hparams(), indent=1))
    files[SPEC].write_text(json.dumps(spec.to_dict()))
    files[TRAIN_CONFIG].write_text(train_config)
    return {k: str(v) for k, v in files.items()}


def load_model_files(folder: str | Path, uri: str = "") -> LoadedModel:
    """Rebuild a model from the files ``save_model_files`` wrote (safe: tensors only)."""
    folder = Path(folder)
    missing = [f for f in (WEIGHTS, MODEL_CONFIG, SPEC) if not (folder / f).exists()]
    if missing:
        raise ModelMismatchError(f"{uri or folder}: not a neuroformer model: missing {missing}")
    spec = InputSpec.from_dict(json.loads((folder / SPEC).read_text()))
    model = Neuroformer(NeuroformerConfig(**json.loads((folder / MODEL_CONFIG).read_text())))
    model.load_state_dict(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
    train_config = (folder / TRAIN_CONFIG).read_text() if (folder / TRAIN_CONFIG).exists() else ""
    return LoadedModel(model.eval(), spec, train_config, uri)


class NeuroformerPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc face of a Neuroformer: token arrays in, next-token logits out."""

    def load_context(self, context) -> None:
        self.loaded = load_model_files(Path(context.artifacts[WEIGHTS]).parent)

    def predict(self, context, model_input, params=None):
        """model_input: {name: array} as in ``signature``; returns {"id_logits", "dt_logits"} arrays.

        (No type hints: MLflow would read them as a per-row schema and warn.)
        """
        get = lambda k: torch.as_tensor(model_input[k]) if k in model_input else None  # noqa: E731
        ids = get("ids")
        batch = Batch(ids, get("dts"), ids, ids, get("past_ids"), get("past_dts"), get("frames"), get("behavior"),
                      torch.zeros(len(ids)), torch.zeros(len(ids), dtype=torch.long))
        with torch.no_grad():
            out = self.loaded.model(batch)
        return {"id_logits": out.id_logits.numpy(), "dt_logits": out.dt_logits.numpy()}


def signature(cfg: NeuroformerConfig) -> ModelSignature:
    """Tensor signature of the pyfunc: names, dtypes and shapes of inputs and outputs."""
    i64, f32 = np.dtype(np.int64), np.dtype(np.float32)
    inputs = [
        TensorSpec(i64, (-1, cfg.block_size), "ids"),
        TensorSpec(i64, (-1, cfg.block_size), "dts"),
        TensorSpec(i64, (-1, cfg.past_block_size), "past_ids"),
        TensorSpec(i64, (-1, cfg.past_block_size), "past_dts"),
    ]
    if cfg.n_frames:
        inputs.append(TensorSpec(f32, (-1, cfg.n_frames, *cfg.frame_shape), "frames"))
    if cfg.n_behavior:
        inputs.append(TensorSpec(f32, (-1, cfg.behavior_steps, cfg.n_behavior), "behavior"))
    outputs = [
        TensorSpec(f32, (-1, cfg.block_size, cfg.id_vocab_size), "id_logits"),
        TensorSpec(f32, (-1, cfg.block_size, cfg.dt_vocab_size), "dt_logits"),
    ]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def log_model(
    model: Neuroformer,
    spec: InputSpec,
    train_config: str = "",
    registered_name: str | None = None,
    alias: str | None = None,
) -> str:
    """Log ``model`` to the active MLflow run (and register it); returns its model URI.

    The URI is ``models:/NAME/VERSION`` when registered, else the run's model URI.
    """
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = save_model_files(Path(tmp), model, spec, train_config)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=NeuroformerPyfunc(),
            artifacts=artifacts,
            signature=signature(model.config),
            registered_model_name=registered_name,
            pip_requirements=[f"neuroformer=={neuroformer.__version__}", f"torch=={torch.__version__.split('+')[0]}"],
        )
    if not registered_name:
        return info.model_uri
    version = info.registered_model_version
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(registered_name, alias, version)
    return f"models:/{registered_name}/{version}"


def load_model(uri: str) -> LoadedModel:
    """Load ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, a ``runs:/`` URI or a local folder."""
    if Path(uri).is_dir():
        local = Path(uri)
    else:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except mlflow.exceptions.MlflowException as err:
            raise ModelMismatchError(
                f"{uri}: cannot be loaded from the MLflow tracking server at {mlflow.get_tracking_uri()}: "
                f"{err.message}"
            ) from None
    return load_model_files(local / "artifacts" if (local / "artifacts").is_dir() else local, uri)
