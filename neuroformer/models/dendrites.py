"""Dendrite nodes for any layer (Brenner & Itti 2025, "Perforated Backpropagation"; docs/perforated.md).

A chosen layer (``nn.Linear``, ``nn.Conv1d``/``Conv2d`` by default) is wrapped in a
:class:`DendriteLayer`. Each output neuron ``o`` of the layer can gain dendrites ``j = 0, 1, ...``
(one *set* = one dendrite for every output neuron of the layer)::

    a_j[o] = sigmoid(D_j x [o] + sum_{j' < j} L_j[o, j'] a_j'[o])     dendrite activation
    y[o]   = W x [o] + sum_j v_j[o] a_j[o]                           the neuron's output

``D_j`` is a fresh module of the layer's own kind and shape (a Linear for a Linear, the same
convolution for a convolution), so a dendrite sees exactly the inputs of its neuron: per output
feature of a sequence model, with its weights shared over time; per output channel of a
convolution, shared over positions. ``L_j`` are the lateral weights from the neuron's earlier
dendrites and ``v_j`` the output weight of each dendrite. A new set starts with ``v_j = 0``:
adding dendrites leaves the layer's outputs exactly unchanged.

The training schedule (neurons, then dendrites by cascade-correlation, then neurons again) is
``neuroformer.callbacks.perforated``; this module holds the modules and the structural
operations: add a set (:func:`add_dendrites`), choose what trains (:func:`set_trainable`),
describe the structure as plain JSON (:func:`structure`) and give a fresh model that structure
(:func:`apply_structure`, used by ``registry.load`` and checkpoint loading).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

import torch
from torch import nn

from neuroformer.errors import ConfigError

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layer kinds that can be wrapped


def _per_channel(w: torch.Tensor, like: torch.Tensor, conv: bool) -> torch.Tensor:
    """(O,) weights shaped to broadcast against a layer output: (..., O) or (B, O, *space)."""
    return w.view(-1, *([1] * (like.dim() - 2))) if conv else w


class DendriteSet(nn.Module):
    """One dendrite per output neuron of a layer (the ``j``-th set; module docstring).

    Attributes:
        input: ``D_j``, a module of the layer's kind and shape, its weights ``init_scale`` times
            the kind's usual initialisation.
        lateral: ``L_j``, (O, j) weights from the neuron's earlier dendrites (None for ``j = 0``).
        output: ``v_j``, (O,) output weights, zero at first.
    """

    def __init__(self, base: nn.Module, index: int, init_scale: float):
        super().__init__()
        self.input = copy.deepcopy(base)
        self.input.reset_parameters()
        with torch.no_grad():
            for p in self.input.parameters():
                p.mul_(init_scale)
        n_out = base.weight.shape[0]
        ref = base.weight
        self.lateral = nn.Parameter(torch.zeros(n_out, index, device=ref.device, dtype=ref.dtype)) if index else None
        self.output = nn.Parameter(torch.zeros(n_out, device=ref.device, dtype=ref.dtype))


class DendriteLayer(nn.Module):
    """A layer with dendrites: ``base(x) + sum_j v_j * a_j(x)`` (module docstring).

    ``weight`` and ``bias`` are the wrapped layer's, so code that reads them keeps working.
    While ``trace`` is a list (the dendrite phase of the callback), every call appends its input
    (detached: the dendrites' activations are recomputed from it, on a graph of their own) and
    its output (made to require a gradient, so that the error ``dL/dy`` reaches it even with
    every weight frozen).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, SUPPORTED):
            raise ConfigError(f"perforated: cannot add dendrites to a {type(base).__name__}; supported layers: "
                              f"{', '.join(t.__name__ for t in SUPPORTED)}")
        self.base = base
        self.sets = nn.ModuleList()
        self.conv = not isinstance(base, nn.Linear)
        self.trace: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def n_out(self) -> int:
        return self.base.weight.shape[0]

    def add_set(self, init_scale: float) -> DendriteSet:
        """Append a set of new dendrites (output weights zero: the outputs do not change)."""
        new = DendriteSet(self.base, len(self.sets), init_scale)
        self.sets.append(new)
        return new

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each set's dendrite activations ``a_j``, each shaped like the layer's output."""
        acts: list[torch.Tensor] = []
        for s in self.sets:
            z = s.input(x)
            for k, earlier in enumerate(acts):
                z = z + _per_channel(s.lateral[:, k], z, self.conv) * earlier
            acts.append(torch.sigmoid(z))
        return acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        acts = self.activations(x)
        for s, a in zip(self.sets, acts):
            y = y + _per_channel(s.output, y, self.conv) * a
        if self.trace is not None and acts:
            if not y.requires_grad:  # every weight frozen: still let dL/dy be computed
                y.requires_grad_()
            y.retain_grad()
            self.trace.append((x.detach(), y))
        return y

    def extra_repr(self) -> str:
        return f"dendrite_sets={len(self.sets)}"


# --------------------------------------------------------------------------- structure


def dendrite_layers(model: nn.Module) -> dict[str, DendriteLayer]:
    """Name -> wrapped layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DendriteLayer)}


def select_layers(model: nn.Module, types: Iterable[str] = ("Linear", "Conv1d", "Conv2d"),
                  names: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the layers that get dendrites: of one of ``types`` (``torch.nn`` class names), whose
    name matches one of the regular expressions ``names`` (all if None) and none of ``exclude``.
    Layers already wrapped count as their wrapped kind; dendrites themselves are never chosen."""
    kinds = []
    for t in types:
        kind = getattr(nn, t, None)
        if not (isinstance(kind, type) and issubclass(kind, SUPPORTED)):
            raise ConfigError(f"perforated.types: {t!r} is not a supported layer kind; expected some of "
                              f"{[k.__name__ for k in SUPPORTED]}")
        kinds.append(kind)
    names, exclude = list(names) if names is not None else None, list(exclude)
    wrapped = dendrite_layers(model)
    chosen = []
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue  # inside a wrapped layer: its base layer or its dendrites
        layer = m.base if isinstance(m, DendriteLayer) else m
        if (isinstance(layer, tuple(kinds)) and (names is None or any(re.search(p, name) for p in names))
                and not any(re.search(p, name) for p in exclude)):
            chosen.append(name)
    return chosen


def _wrap(model: nn.Module, name: str) -> DendriteLayer:
    """The DendriteLayer at ``name``, wrapping the plain layer there first if needed."""
    layer = model.get_submodule(name)
    if isinstance(layer, DendriteLayer):
        return layer
    parent_name, _, child = name.rpartition(".")
    wrapper = DendriteLayer(layer)
    setattr(model.get_submodule(parent_name), child, wrapper)
    return wrapper


def add_dendrites(model: nn.Module, layers: Iterable[str], init_scale: float = 0.01,
                  seed: int | None = None) -> list[DendriteSet]:
    """Give every layer named in ``layers`` one more dendrite per output neuron; returns the new sets.

    The model's outputs do not change (new output weights are zero). ``seed`` makes the new
    weights the same whatever the global random state.
    """
    layers = list(layers)
    if not layers:
        raise ConfigError("perforated: no layer matches the chosen types and names; nothing to add dendrites to")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return [_wrap(model, name).add_set(init_scale) for name in layers]


def structure(model: nn.Module) -> dict[str, int]:
    """Plain JSON: wrapped layer name -> number of dendrite sets."""
    return {name: len(layer.sets) for name, layer in dendrite_layers(model).items()}


def apply_structure(model: nn.Module, layers: dict[str, int]) -> nn.Module:
    """Give ``model`` exactly the dendrites ``layers`` (from :func:`structure`) describes; the weights
    of added sets are placeholders for a state dict to fill. Removes sets and wrappers beyond it."""
    for name, layer in dendrite_layers(model).items():
        keep = layers.get(name, 0)
        if keep == 0:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base)
        else:
            del layer.sets[keep:]
    for name, n in layers.items():
        if n > 0:
            layer = _wrap(model, name)
            while len(layer.sets) < n:
                layer.add_set(init_scale=0.0)
    return model


def dendrite_parameters(model: nn.Module, which: str = "all") -> list[nn.Parameter]:
    """Parameters of the dendrites: ``inputs`` (D and L of every set), ``newest`` (D and L of the
    last set of each layer), ``outputs`` (every v) or ``all``."""
    params: list[nn.Parameter] = []
    for layer in dendrite_layers(model).values():
        for k, s in enumerate(layer.sets):
            inputs = [*s.input.parameters(), *([s.lateral] if s.lateral is not None else [])]
            if which in ("inputs", "all") or (which == "newest" and k == len(layer.sets) - 1):
                params += inputs
            if which in ("outputs", "all"):
                params.append(s.output)
    return params


def set_trainable(model: nn.Module, neurons: bool, dendrite_inputs: str, outputs: bool) -> None:
    """Choose what trains: the neurons (every parameter that is not a dendrite's), the dendrites'
    input and lateral weights (``none``, ``newest`` set only, or ``all``), their output weights."""
    if dendrite_inputs not in ("none", "newest", "all"):
        raise ValueError(f"dendrite_inputs={dendrite_inputs!r}; expected none, newest or all")
    dendritic = {id(p) for p in dendrite_parameters(model)}
    for p in model.parameters():
        if id(p) not in dendritic:
            p.requires_grad_(neurons)
    for p in dendrite_parameters(model, "inputs"):
        p.requires_grad_(dendrite_inputs == "all")
    if dendrite_inputs == "newest":
        for p in dendrite_parameters(model, "newest"):
            p.requires_grad_(True)
    for p in dendrite_parameters(model, "outputs"):
        p.requires_grad_(outputs)


# --------------------------------------------------------------------------- cascade-correlation


def correlation_objective(activations: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    """Cascade-correlation score ``S = sum_o | cov_s(a[s, o], e[s, o]) |`` of dendrite activations and
    their neurons' errors ``e = dL/dy`` over samples ``s``; both (N, O). Candidates maximise it."""
    a = activations - activations.mean(dim=0)
    e = errors - errors.mean(dim=0)
    return (a * e).mean(dim=0).abs().sum()


def samples(t: torch.Tensor, conv: bool) -> torch.Tensor:
    """A layer output as (N, O) samples of its O neurons: positions and batch flattened."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]) if conv else t.reshape(-1, t.shape[-1])
