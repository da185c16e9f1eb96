"""Model families: how a trained model of each family is rebuilt, served and evaluated.

A *family* is a kind of model the platform trains (the Neuroformer, the sparse-data RNN, the
digital twin...). Each is three things (docs/architecture.md, "Adding a model family"):

- a data module whose ``spec`` (``to_dict``/``from_dict``, with a ``source``) says how
  recordings become model input;
- a ``neuroformer.tasks.base.Task`` (a LightningModule) that trains the model and tells
  ``train(cfg)`` its baselines, metrics, figures and evaluation;
- a ``ModelFamily`` (this module's base class), the part that outlives training: rebuild the
  model from its saved config, turn plain arrays into predictions (the MLflow pyfunc), and
  evaluate a loaded model. ``FAMILIES`` names each one; checkpoints and registered models
  record the family name, and ``neuroformer.registry.load`` picks the family by it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from neuroformer.errors import ModelMismatchError
from neuroformer.models.dendrites import apply_structure, structure

CARD_KEY = "neuroformer"  # where a training checkpoint keeps its model card (Task.on_save_checkpoint)

# Family name -> "module:class" of its ModelFamily, imported on first use.
FAMILIES: dict[str, str] = {
    "neuroformer": "neuroformer.tasks.pretrain:NeuroformerFamily",
    "sparse_rnn": "neuroformer.tasks.sparse_rnn:SparseRNNFamily",
    "twin": "neuroformer.tasks.twin:TwinFamily",
}


@dataclass
class LoadedModel:
    """A trained model ready to use, whatever it was loaded from.

    Attributes:
        model: the network, in eval mode.
        spec: its family's data spec: everything that turns a recording into its input,
            including ``spec.source`` (the files and reader options it was trained with).
        family: the family's name (a key of ``FAMILIES``).
        train_config: the resolved training config as YAML ("" if unknown).
        uri: where it was loaded from (checkpoint path, sharded folder or model URI).
    """

    model: nn.Module
    spec: Any
    family: str
    train_config: str = ""
    uri: str = ""

    @property
    def model_family(self) -> ModelFamily:
        return family(self.family)


class ModelFamily:
    """Base of the per-family adapters used by the loader, the registry and evaluation.

    Subclasses set ``name`` and implement the methods below; ``evaluation_config`` is the
    dataclass of their evaluation settings (its fields become ``python -m neuroformer.evaluate``
    options and the ``evaluate:`` config keys), or None when the family has no after-training
    evaluation.
    """

    name: ClassVar[str]
    evaluation_config: ClassVar[type | None] = None
    headline_metrics: ClassVar[tuple[str, ...]] = ()  # evaluation metrics train() prints at the end

    def model_config(self, model: nn.Module) -> dict:
        """Plain-JSON sizes and settings that ``build`` turns back into the same architecture."""
        raise NotImplementedError

    def build(self, model_config: dict) -> nn.Module:
        """A freshly initialised model of this architecture (weights are loaded after)."""
        raise NotImplementedError

    def spec_from_dict(self, d: dict) -> Any:
        """The data spec saved with the model (``spec.to_dict()``), rebuilt."""
        raise NotImplementedError

    def example_inputs(self, loaded: LoadedModel) -> dict[str, np.ndarray]:
        """A small valid input of ``predict`` (the registry stores it, and infers the signature)."""
        raise NotImplementedError

    def predict(self, model: nn.Module, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Plain arrays in, plain arrays out: the MLflow pyfunc's ``predict``."""
        raise NotImplementedError

    def evaluate(self, loaded: LoadedModel, out: Path, settings: Any, recording: Any = None) -> dict | None:
        """Score ``loaded`` on held-out data of ``recording``; write its figures (PNG) into ``out``.

        Called through ``neuroformer.evaluate.evaluate``, which writes ``out/metrics.json``.

        Returns:
            ``{"metrics": {name: float}, "settings": {name: value}}`` (settings beyond
            ``settings`` itself that a reader needs, e.g. the split), or None without an evaluation.
        """
        return None


def family(name: str) -> ModelFamily:
    """The ModelFamily registered as ``name``."""
    if name not in FAMILIES:
        raise ModelMismatchError(f"unknown model family {name!r}; this version of neuroformer knows "
                                 f"{sorted(FAMILIES)}")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def dendrite_card(model: nn.Module) -> dict:
    """The card entry of a model with dendrite nodes, ``{"dendrites": {layer: sets}}`` (docs/perforated.md); {} without."""
    layers = structure(model)
    return {"dendrites": layers} if layers else {}


def from_card(card: dict, weights: dict[str, torch.Tensor], train_config: str, uri: str) -> LoadedModel:
    """The model a card describes, with ``weights`` (the network's own state dict), in eval mode."""
    fam = family(card.get("family", "neuroformer"))
    model = apply_structure(fam.build(card["model_config"]), card.get("dendrites") or {})
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ModelMismatchError(f"{uri}: the weights do not fit the {fam.name} architecture its card "
                                 f"describes: {str(err).splitlines()[0]}") from None
    return LoadedModel(model.eval(), fam.spec_from_dict(card["spec"]), fam.name, train_config, uri)
