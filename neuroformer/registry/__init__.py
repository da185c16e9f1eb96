"""Trained models: the families they belong to, one loader, the MLflow registry and tracking.

- ``families``: ``ModelFamily`` per model family (rebuild, serve, evaluate) and ``LoadedModel``;
- ``loading``: ``load(source)``, the one way to get a trained model back;
- ``mlflow_model``: log and register a trained model as an MLflow model (``pyfunc``: its face);
- ``tracking``: where runs go (local store or server), the Lightning logger, a local server.
"""

from neuroformer.registry.families import LoadedModel, ModelFamily, family
from neuroformer.registry.loading import load
from neuroformer.registry.mlflow_model import log_model

__all__ = ["LoadedModel", "ModelFamily", "family", "load", "log_model"]
