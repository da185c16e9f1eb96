"""A digital twin: stimulus clips in, every unit's expected spike count out.

The standard system-identification model of visual neurons: a small convolutional *core*
shared by all units turns a clip into feature maps, and a per-unit *factorised readout*
(a spatial mask times a vector of feature weights, as in Klindt et al. 2017) pools them
into one number per unit, made positive by softplus or exp:

    F = core(stimulus)                                   # (B, C, H, W)
    rate_u = f( sum_{c,h,w} F[c, h, w] mask_u[h, w] w_u[c] + b_u )

The clip's frames are the first convolution's input channels, so the first layer is a bank
of spatiotemporal filters (motion and temporal shape are visible to it).

``mask_u`` is either a free H x W mask (``readout="mask"``) or a normalised Gaussian blob with
a learned centre and width (``readout="gaussian"``, the configured default; Lurz et al. 2021
use a point version). A Gaussian leaves a unit three spatial numbers instead of H x W, so
units of one type differ only where their feature weights do; that is what clustering by
optimised stimuli needs (docs/mds.md). Blobs are placed before training at each unit's
spike-triggered average (``place_readouts``).

**The response-model protocol.** ``predict_responses(stimulus) -> rates`` with ``stimulus``
(B, T, H, W) in the model's input units (z-scored pixels, see ``ResponseSpec``) and ``rates``
(B, U), differentiable in the stimulus. Anything with that method can be optimised by
``neuroformer.inference.mds``. The Neuroformer does not implement it: it predicts spike
tokens autoregressively, with no rate head mapping a stimulus alone to per-unit rates.

A model whose units see different parts of the screen may also offer ``centred()``: the same
model with every unit's receptive field moved to the centre, so that clustering groups units
by what they respond to rather than where (the MDS tools use it when present).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from neuroformer.errors import ConfigError


@runtime_checkable
class ResponseModel(Protocol):
    """A model that predicts per-unit responses to stimulus clips, differentiably."""

    def predict_responses(self, stimulus: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W) stimulus -> (B, U) non-negative responses."""
        ...


@dataclass(frozen=True)
class TwinConfig:
    """Sizes of a twin (``conf/model/twin.yaml``; the data's sizes come from its spec).

    Attributes:
        n_frames, height, width: clip shape (T, H, W).
        n_units: U, the modelled units.
        channels: feature maps of each core layer (C).
        layers: convolutions in the core.
        kernel: first (spatiotemporal) convolution's size; hidden_kernel: the others'.
        nonlinearity: the output's, "softplus" or "exp".
        readout: "mask", a free spatial mask per unit (H x W weights), or "gaussian", a
            Gaussian blob per unit (a centre and a width: 3 numbers), which leaves a unit
            nothing but its feature weights to be idiosyncratic in.
        mean_count: (U,) initial output per unit (its training mean), so training starts at
            the mean-rate predictor.
    """

    n_frames: int
    height: int
    width: int
    n_units: int
    channels: int = 16
    layers: int = 2
    kernel: int = 9
    hidden_kernel: int = 5
    nonlinearity: str = "softplus"
    readout: str = "mask"
    mean_count: tuple[float, ...] = ()


class Twin(nn.Module):
    """Conv core + factorised readout (module docstring)."""

    def __init__(self, config: TwinConfig):
        super().__init__()
        if config.nonlinearity not in ("softplus", "exp"):
            raise ConfigError(f"model.nonlinearity must be 'softplus' or 'exp'; got {config.nonlinearity!r}")
        if config.readout not in ("mask", "gaussian"):
            raise ConfigError(f"model.readout must be 'mask' or 'gaussian'; got {config.readout!r}")
        self.config = c = config
        convs, in_ch = [], c.n_frames
        for i in range(c.layers):
            k = c.kernel if i == 0 else c.hidden_kernel
            convs.append(nn.Conv2d(in_ch, c.channels, k, padding=k // 2))
            in_ch = c.channels
        self.core = nn.ModuleList(convs)
        if c.readout == "mask":
            self.mask = nn.Parameter(torch.randn(c.n_units, c.height, c.width) / (c.height * c.width))
        else:
            # Centres (row, column) in [-1, 1] frame coordinates (as grid_sample's), so that an
            # optimiser step moves every centre by a similar fraction of the frame; spread over the
            # frame. Widths (pixels) start broad, a quarter of the frame, so every unit's blob
            # overlaps its receptive field and can move to it.
            self.centre = nn.Parameter(torch.rand(c.n_units, 2) * 2 - 1)
            self.log_width = nn.Parameter(torch.full((c.n_units,), math.log(min(c.height, c.width) / 4)))
        self.features = nn.Parameter(torch.randn(c.channels, c.n_units) / c.channels**0.5)
        mean = torch.tensor(c.mean_count, dtype=torch.float32) if c.mean_count else torch.full((c.n_units,), 0.3)
        mean = mean.clamp_min(1e-3)
        # Bias so the initial output equals each unit's mean count.
        self.bias = nn.Parameter(mean.log() if c.nonlinearity == "exp" else mean + torch.log(-torch.expm1(-mean)))

    @classmethod
    def build(cls, spec, **sizes) -> Twin:
        """A twin sized for ``spec`` (a ``ResponseSpec``) with the given core sizes."""
        return cls(TwinConfig(n_frames=spec.n_frames, height=spec.frame_shape[0], width=spec.frame_shape[1],
                              n_units=spec.n_units, mean_count=tuple(spec.unit_mean_count), **sizes))

    def hparams(self) -> dict:
        d = asdict(self.config)
        d["mean_count"] = list(d["mean_count"])
        return d

    def core_features(self, stimulus: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W) -> (B, C, H, W) feature maps."""
        x = stimulus
        for conv in self.core:
            x = F.elu(conv(x))
        return x

    def spatial_masks(self) -> torch.Tensor:
        """(U, H, W) each unit's spatial readout weights: its free mask, or its Gaussian (summing to 1)."""
        if self.config.readout == "mask":
            return self.mask
        rows = torch.arange(self.config.height, dtype=self.centre.dtype, device=self.centre.device)
        cols = torch.arange(self.config.width, dtype=self.centre.dtype, device=self.centre.device)
        centre = self.centre_pixels()
        d2 = (rows[None, :, None] - centre[:, 0, None, None]) ** 2 + (cols[None, None, :] - centre[:, 1, None, None]) ** 2
        width = self.log_width.exp().clamp_min(0.5)[:, None, None]
        blob = torch.exp(-d2 / (2 * width**2))
        return blob / blob.sum((1, 2), keepdim=True)

    @torch.no_grad()
    def place_readouts(self, stimulus: torch.Tensor, counts: torch.Tensor) -> None:
        """Put each Gaussian readout's centre where its unit's spike-triggered average is strongest.

        Gradient descent moves a blob only as far as the feature maps under it correlate with the
        unit, so a blob started away from its receptive field can stall there; the
        spike-triggered average of the training clips (the counts' covariance with every pixel,
        its square summed over frames, 3 x 3 box-smoothed) finds the receptive field directly.
        The widths are set to a tenth of the frame.

        Args:
            stimulus: (N, T, H, W) training clips (z-scored).
            counts: (N, U) their spike counts.
        """
        if self.config.readout != "gaussian":
            return
        centred = counts - counts.mean(0)
        sta = torch.einsum("nthw,nu->uthw", stimulus - stimulus.mean(0), centred) / len(counts)  # (U, T, H, W)
        energy = F.avg_pool2d(sta.square().sum(1, keepdim=True), 3, 1, 1, count_include_pad=False).flatten(1)
        peak = energy.argmax(1)
        pixels = torch.stack([peak // self.config.width, peak % self.config.width], dim=1).to(self.centre.dtype)
        self.centre.copy_(pixels / self._frame_scale() - 1)
        # In place, a blob needs no reach: start it at a tenth of the frame (3 px of 32, about
        # where trained widths end), not at the broad width that lets an unplaced blob find its field.
        self.log_width.fill_(math.log(min(self.config.height, self.config.width) / 10))

    def _frame_scale(self) -> torch.Tensor:
        """(2,) pixels per unit of the [-1, 1] frame coordinates, (rows, columns)."""
        return torch.tensor([(self.config.height - 1) / 2, (self.config.width - 1) / 2], device=self.centre.device)

    def centre_pixels(self) -> torch.Tensor:
        """(U, 2) Gaussian readout centres, (row, column) in pixels."""
        return (self.centre + 1) * self._frame_scale()

    def forward(self, stimulus: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W) z-scored clips -> (B, U) expected spike counts in the response window."""
        pooled = torch.einsum("bchw,uhw->bcu", self.core_features(stimulus), self.spatial_masks())  # (B, C, U)
        drive = (pooled * self.features).sum(1) + self.bias  # (B, U)
        return torch.exp(drive) if self.config.nonlinearity == "exp" else F.softplus(drive)

    def predict_responses(self, stimulus: torch.Tensor) -> torch.Tensor:
        """The response-model protocol: ``forward``."""
        return self(stimulus)

    def receptive_field_centres(self, reference: torch.Tensor) -> torch.Tensor:
        """(U, 2) (row, column) centre of each unit's receptive field as the model sees it: the
        peak of its sensitivity map (|d rate / d stimulus| summed over the ``reference`` clips
        (B, T, H, W) and frames, 3 x 3 box-smoothed). The core's own spatial offsets are in it,
        which the mask alone would miss."""
        stimulus = reference.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            rates = self(stimulus)  # (B, U)
            maps = torch.stack([torch.autograd.grad(rates[:, u].sum(), stimulus, retain_graph=True)[0].abs().sum((0, 1))
                                for u in range(rates.shape[1])])  # (U, H, W)
        peak = F.avg_pool2d(maps[:, None], 3, 1, 1, count_include_pad=False).flatten(1).argmax(1)  # (U,)
        return torch.stack([peak // self.config.width, peak % self.config.width], dim=1)

    def field_centres(self, reference: torch.Tensor) -> torch.Tensor:
        """(U, 2) float (row, column) where ``centred`` takes each unit's field from: a Gaussian
        readout's own centre (exact and sub-pixel; the core adds the same offset to every unit
        with the same feature weights, so units of one type stay aligned), else the peak of
        ``receptive_field_centres`` over the ``reference`` clips (B, T, H, W)."""
        if self.config.readout == "gaussian":
            return self.centre_pixels().detach()
        return self.receptive_field_centres(reference).to(self.features.dtype)

    def centred(self, reference: torch.Tensor) -> Twin:
        """A copy whose units all look at the middle of the frame (pixel (H // 2, W // 2)): each
        unit's field (``field_centres``) moved there, a Gaussian's centre exactly, a free mask
        circularly by whole pixels.

        Clustering by *functional* type must not split units by where their receptive fields
        lie; Burg et al. likewise present every stimulus at each neuron's receptive field.
        """
        centres = self.field_centres(reference)
        middle = torch.tensor([self.config.height // 2, self.config.width // 2], device=centres.device)
        twin = copy.deepcopy(self)
        with torch.no_grad():
            if self.config.readout == "mask":
                shift = (middle - centres).round().long().tolist()
                twin.mask.copy_(torch.stack([m.roll(tuple(d), (0, 1)) for m, d in zip(self.mask, shift)]))
            else:
                twin.centre.copy_((middle / self._frame_scale() - 1).expand_as(twin.centre))
        return twin

    def readout_l1(self) -> torch.Tensor:
        """Mean absolute spatial-mask weight (sparse, localised masks); 0 for Gaussian readouts, local by design."""
        return self.mask.abs().mean() if self.config.readout == "mask" else self.features.new_zeros(())


class TwinEnsemble(nn.Module):
    """Several twins of one recording (trained from different seeds) as one response model:
    the mean of their predicted rates.

    Each twin fits the data's noise in its own way; optimised stimuli find and exploit such
    idiosyncrasies, and averaging independently trained twins cancels part of them (model
    ensembles are the usual response model for optimised stimuli).
    """

    def __init__(self, members: list[Twin]):
        super().__init__()
        if not members:
            raise ConfigError("a twin ensemble needs at least one twin")
        self.members = nn.ModuleList(members)

    def predict_responses(self, stimulus: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W) -> (B, U) the members' mean expected counts."""
        return torch.stack([m.predict_responses(stimulus) for m in self.members]).mean(0)

    def field_centres(self, reference: torch.Tensor) -> torch.Tensor:
        """(U, 2) the members' mean ``Twin.field_centres``."""
        return torch.stack([m.field_centres(reference) for m in self.members]).mean(0)

    def centred(self, reference: torch.Tensor) -> TwinEnsemble:
        """The ensemble of the members' ``Twin.centred`` views: every unit's field at the middle in each."""
        return TwinEnsemble([m.centred(reference) for m in self.members])
