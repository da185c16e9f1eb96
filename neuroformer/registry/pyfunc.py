"""The MLflow pyfunc of every registered neuroformer model (logged from code, never pickled).

MLflow loads this file to serve a registered model: ``load_context`` rebuilds the network
from the model's artifacts (``neuroformer.registry.mlflow_model``) and ``predict`` hands named
arrays to its family's ``ModelFamily.predict``.
"""

from pathlib import Path

import mlflow
import numpy as np

from neuroformer.registry.mlflow_model import WEIGHTS, load_model_files


class FamilyPyfunc(mlflow.pyfunc.PythonModel):
    """Named arrays in, named arrays out, for a model of any family."""

    def load_context(self, context) -> None:
        self.loaded = load_model_files(Path(context.artifacts[WEIGHTS]).parent)

    # MLflow hands a tensor-signature model a dict of named arrays; its type hints have no
    # dict-of-arrays type, and np.ndarray is the hint that asks for no per-row schema.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> dict:
        """model_input: {name: array} as in the model's signature; returns {name: array}."""
        return self.loaded.model_family.predict(self.loaded.model, model_input)


mlflow.models.set_model(FamilyPyfunc())
