"""The Neuroformer: a multimodal generative GPT over spike tokens (Antoniades et al., ICLR 2024).

Reading order: config, attention, the two kinds of block, the input encoders, the model.

The model predicts the spikes of the current window token by token. Each token is a
(unit ID, dt) pair; its embedding is the sum of an ID embedding, a learned dt (time-offset)
embedding and a position embedding. A causal self-attention stack runs over the current
tokens, and every block cross-attends to a context made of

- the past window's spike tokens (encoded by a small non-causal transformer),
- stimulus frames, cut into 3D (time x height x width) patches with learned positions,
- behaviour samples,

each encoded separately and concatenated, with PAD keys masked everywhere. With ``n_latents > 0``
the concatenated context is first read into a few learned latent vectors (one cross-attention,
then self-attention blocks among the latents, as in PerceiverIO and POYO), and the decoder
cross-attends to those latents instead: the per-layer cost of cross-attention no longer grows
with the hundreds of context tokens, and the parameters spent on the context run on a few
latents instead of every token (docs/performance.md). With ``past_direct`` the decoder also
attends to every past-window token, through one key/value projection that all decoder blocks
share: predicting which unit fires next needs who fired just before, which a few latents blur.
Two heads read
the next unit ID and the next dt. An optional Poisson rate read-out (``rate_bins > 0``) reads
the expected count of every unit in every dt bin of the current window from the SOS position,
which sees the context only: a forecast of the whole window in one pass, trained with the
Poisson likelihood of the window's true counts next to the token losses. With ``rate_skip`` its
log-rates also get a linear function of the (pooled) stimulus frames and of the behaviour
samples, a direct path for the linear part of the stimulus drive (a receptive field is a
linear filter) that the attention path need not learn; ``losses`` returns the L2 norm of its
weights (``rate_l2``), because a unit the stimulus does not drive otherwise gets a filter fitted
to noise. A symmetric (CLIP-style) contrastive loss aligns a pooled
embedding of the current window's spikes with pooled stimulus (and optionally behaviour)
embeddings, each through its own projection.

For generation, ``start_decoding`` encodes a window's context once and caches its
cross-attention keys/values, and ``decode_step`` feeds current tokens incrementally against a
self-attention key/value cache (``neuroformer.inference.generate`` samples with them).
``forward_with_attention`` also returns the cross-attention probabilities
(``neuroformer.inference.connectivity`` reads unit-to-unit influence from them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from neuroformer.data.tokenizer import N_SPECIAL, PAD, SOS
from neuroformer.errors import ConfigError

RATE_INIT = -3.5  # rate read-out bias at start: log of ~6 Hz in a 5 ms bin
MAX_LOG_RATE = 5.0  # log expected count per bin cap: no overflow early in training


@dataclass
class NeuroformerConfig:
    """Sizes of a Neuroformer. Data-dependent sizes come from the data's ``InputSpec``."""

    id_vocab_size: int
    dt_vocab_size: int
    block_size: int
    past_block_size: int
    n_embd: int = 128
    n_head: int = 4
    n_layer: int = 4
    n_context_layer: int = 1
    dropout: float = 0.1
    attn_dropout: float = 0.0
    n_frames: int = 0
    frame_shape: tuple[int, int] | None = None
    patch: tuple[int, int, int] = (1, 4, 4)
    n_behavior: int = 0
    behavior_steps: int = 0
    contrastive_dim: int = 64
    rate_bins: int = 0
    rate_skip: int = 0
    n_latents: int = 0
    n_latent_layer: int = 2
    past_direct: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")
        self.patch = tuple(self.patch)
        if self.n_frames:
            self.frame_shape = tuple(self.frame_shape)
            dims = (self.n_frames, *self.frame_shape)
            if any(d % p for d, p in zip(dims, self.patch)):
                raise ConfigError(f"model.patch: frames (F, H, W) = {dims} must be divisible by the patch {self.patch}")

    @property
    def n_patches(self) -> int:
        if not self.n_frames:
            return 0
        f, h, w = self.n_frames, *self.frame_shape
        pt, ph, pw = self.patch
        return (f // pt) * (h // ph) * (w // pw)


class NeuroformerInput(NamedTuple):
    """What the model reads of a window: its tokens and its context, nothing it must predict.

    Attributes:
        ids: (B, T) current-window ID tokens ``[SOS, s1..sn, PAD..]``.
        dts: (B, T) current-window dt tokens, aligned with ``ids``.
        past_ids: (B, P) past-window ID tokens ``[SOS, s1..sn, PAD..]``.
        past_dts: (B, P) past-window dt tokens.
        frames: (B, F, H, W) normalised stimulus frames, or None for a model without a stimulus.
        behavior: (B, S, V) normalised behaviour samples, or None for a model without behaviour;
            NaN where the behaviour was not recorded (masked, never imputed).
    """

    ids: torch.Tensor
    dts: torch.Tensor
    past_ids: torch.Tensor
    past_dts: torch.Tensor
    frames: torch.Tensor | None = None
    behavior: torch.Tensor | None = None

    def repeat_interleave(self, n: int) -> NeuroformerInput:
        """Every window repeated ``n`` times in a row (row ``b * n + s`` is copy ``s`` of window ``b``)."""
        return NeuroformerInput(*(t.repeat_interleave(n, dim=0) if t is not None else None for t in self))


class RatePaths(NamedTuple):
    """The rate read-out's additive log-rate terms, before calibration.

    Attributes:
        attention: (B, rate_bins, id_vocab_size) from the SOS position's hidden state (with its bias).
        stimulus: (B, 1, id_vocab_size) the linear skip path of the pooled frames (zeros without it).
        behavior: (B, 1, id_vocab_size) the linear skip path of the behaviour (zeros without it).
    """

    attention: torch.Tensor
    stimulus: torch.Tensor
    behavior: torch.Tensor


class ModelOutput(NamedTuple):
    """What a forward pass returns.

    Attributes:
        id_logits: (B, T, id_vocab_size) next-ID logits at every current position.
        dt_logits: (B, T, dt_vocab_size) next-dt logits.
        neural: (B, D) unit-norm contrastive embedding of the current window, or None.
        stimulus: (B, D) unit-norm contrastive embedding of the frames, or None.
        behavior: (B, D) unit-norm contrastive embedding of the behaviour, or None.
        log_rates: (B, rate_bins, id_vocab_size) log expected count of every ID token per dt bin
            of the current window, from the context alone (the rate read-out), or None.
        rate_paths: the read-out's terms before calibration, when asked for (``forward(with_rate_paths=True)``).
    """

    id_logits: torch.Tensor
    dt_logits: torch.Tensor
    neural: torch.Tensor | None = None
    stimulus: torch.Tensor | None = None
    behavior: torch.Tensor | None = None
    log_rates: torch.Tensor | None = None
    rate_paths: RatePaths | None = None


class Features(NamedTuple):
    """The hidden states a forward pass computes before its heads (``Neuroformer.features``).

    Attributes:
        hidden: (B, T, C) final hidden state of every current position (after ``ln_f``).
        attention: per decoder block, (B, h, T, N) cross-attention probabilities (empty unless asked).
        parts: each context modality's encoding by name, (B, N_m, C).
    """

    hidden: torch.Tensor
    attention: list[torch.Tensor]
    parts: dict[str, torch.Tensor]


@dataclass
class DecoderCache:
    """Incremental-decoding state of one batch of windows (``Neuroformer.start_decoding``).

    Every buffer is allocated once per batch and keeps its shape; ``decode_step`` writes into it
    in place. Fixed shapes are what let ``torch.compile`` make one decoding step for every position.

    Attributes:
        cross_kv: per decoder block, the context's cross-attention keys and values, each
            (B, h, N, C/h); computed once per window. N omits the past block's trailing
            columns that are PAD in every row.
        cross_mask: (B, 1, 1, N) additive attention mask: 0, or -inf for PAD context tokens.
        self_kv: per decoder block, (2, B, h, T, C/h) self-attention keys and values; positions
            below ``length`` hold the tokens fed so far.
        keep: (B, T) additive attention mask of the current tokens as keys: 0 where a fed token is
            not PAD, -inf where it is PAD and beyond ``length``.
        causal: (T, T) additive causal mask: 0 on and below the diagonal, -inf above.
        positions: (T,) the positions 0..T-1, whose slices index the positions being fed.
        qkv: per decoder block, the self-attention's query, key and value projections as one
            (3C, C) weight and (3C,) bias (its ``q`` and ``kv`` concatenated: one matmul per step).
        heads: (C, V_id + V_dt) the ID and dt heads' weights side by side, transposed (one
            matmul per step, in the layout a single row multiplies fastest).
        length: number of current-window tokens fed so far.
    """

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cross_mask: torch.Tensor
    self_kv: list[torch.Tensor]
    keep: torch.Tensor
    causal: torch.Tensor
    positions: torch.Tensor
    qkv: list[tuple[torch.Tensor, torch.Tensor]]
    heads: torch.Tensor
    length: int = 0


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over keys/values ``context`` (``x`` itself if None)."""

    def __init__(self, cfg: NeuroformerConfig):
        super().__init__()
        # Dropout on the attention probabilities, apart from the embedding/MLP dropout:
        # on CPU its random mask over every (query, key) pair is ~40% of a training step.
        self.n_head, self.dropout = cfg.n_head, cfg.attn_dropout
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.proj.is_residual = True

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, Tq, C); context: (B, Tk, C); mask: (B, 1, Tq, Tk) bool, True = may attend."""
        return self.attend(x, *self.keys_values(x if context is None else context), mask)[0]

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, h, T, C/h)."""
        B, T, C = t.shape
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention's query, key and value projections as one (3C, C) weight and (3C,) bias (copies)."""
        return torch.cat([self.q.weight, self.kv.weight]), torch.cat([self.q.bias, self.kv.bias])

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of context (B, Tk, C), each (B, h, Tk, C/h); cacheable across queries."""
        return tuple(self._heads(t) for t in self.kv(context).split(context.shape[-1], dim=2))

    def attend(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries x (B, Tq, C) over keys/values (B, h, Tk, C/h); mask broadcastable to (B, 1, Tq, Tk).

        Returns the output (B, Tq, C) and, if ``need_weights``, the attention probabilities
        (B, h, Tq, Tk). Those are computed explicitly (not by the fused kernel) and the output is
        made from them, so gradients with respect to the weights are the true ones.
        """
        B, Tq, C = x.shape
        q = self._heads(self.q(x))  # (B, h, Tq, C/h)
        dropout = self.dropout if self.training else 0.0
        if not need_weights:
            y, w = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            w = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = F.dropout(w, dropout) @ v
        return self.proj(y.transpose(1, 2).reshape(B, Tq, C)), w


class MLP(nn.Sequential):
    def __init__(self, cfg: NeuroformerConfig):
        proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        proj.is_residual = True
        super().__init__(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), proj, nn.Dropout(cfg.dropout))


class EncoderBlock(nn.Module):
    """Non-causal self-attention + MLP (past window, frames, behaviour)."""

    def __init__(self, cfg: NeuroformerConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.n_embd), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, N, C); mask: (B, 1, 1, N) bool (False for PAD), or None when no token is PAD."""
        x = x + self.attn(self.ln1(x), None, mask)
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    """Causal self-attention over current tokens, cross-attention to the context, MLP."""

    def __init__(self, cfg: NeuroformerConfig):
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(cfg.n_embd), Attention(cfg)
        self.ln2, self.cross_attn = nn.LayerNorm(cfg.n_embd), Attention(cfg)
        self.ln3, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        cross_mask: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """The block on n new tokens, after L earlier ones whose self-attention keys/values are given.

        A whole window is n = T tokens with no earlier ones; incremental decoding feeds one token
        at a time with the keys/values this returned for the earlier ones.

        Args:
            x: (B, n, C) the new tokens' residual stream.
            self_mask: (B, 1, n, L + n) bool, which earlier and new tokens each new one may attend to.
            cross_kv: the context's cross-attention keys/values, each (B, h, N, C/h).
            cross_mask: (B, 1, 1, N) bool, False for PAD context tokens.
            past_kv: cached self-attention keys/values of the L earlier tokens, each (B, h, L, C/h).
            need_weights: also return the cross-attention probabilities.

        Returns:
            (B, n, C) output, self-attention keys/values of all L + n tokens (the next cache),
            and the cross-attention probabilities (B, h, n, N) or None.
        """
        h = self.ln1(x)
        k, v = self.self_attn.keys_values(h)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        x = x + self.self_attn.attend(h, k, v, self_mask)[0]
        y, weights = self.cross_attn.attend(self.ln2(x), *cross_kv, cross_mask, need_weights)
        x = x + y
        return x + self.mlp(self.ln3(x)), (k, v), weights

    def decode(
        self,
        x: torch.Tensor,
        self_kv: torch.Tensor,
        positions: torch.Tensor,
        self_mask: torch.Tensor,
        qkv: tuple[torch.Tensor, torch.Tensor],
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        cross_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``forward`` on n new tokens at ``positions``, writing their keys/values in place.

        Args:
            x: (B, n, C) the new tokens' residual stream.
            self_kv: (2, B, h, T, C/h) self-attention keys/values of a whole block; the new ones
                are written at ``positions``.
            positions: (n,) int64, where the new tokens go.
            self_mask: (B, 1, n, T) additive (0 or -inf): which tokens each new one may attend to;
                -inf at every position not fed yet.
            qkv: the self-attention's fused projection (``Attention.fused_qkv``).
            cross_kv, cross_mask: as in ``forward``.

        Returns:
            (B, n, C) output.
        """
        B, n, C = x.shape
        attn = self.self_attn
        qkv_heads = F.linear(self.ln1(x), *qkv).view(B, n, 3, attn.n_head, C // attn.n_head).permute(2, 0, 3, 1, 4)
        self_kv[:, :, :, positions] = qkv_heads[1:]  # keys and values in one copy (in place, also when compiled)
        y = F.scaled_dot_product_attention(qkv_heads[0], self_kv[0], self_kv[1], attn_mask=self_mask)
        x = x + attn.proj(y.transpose(1, 2).reshape(B, n, C))
        x = x + self.cross_attn.attend(self.ln2(x), *cross_kv, cross_mask)[0]
        return x + self.mlp(self.ln3(x))


class ContextEncoder(nn.Module):
    """A stack of encoder blocks over one modality's tokens."""

    def __init__(self, cfg: NeuroformerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_context_layer))
        self.ln = nn.LayerNorm(cfg.n_embd)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C); keep: (B, N) bool, False for PAD -> (B, N, C)."""
        mask = keep[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x)


class LatentReader(nn.Module):
    """Context tokens (B, N, C) -> M learned latents (B, M, C) that summarise them (PerceiverIO).

    One cross-attention from the latents to every context token (cost linear in N, once per
    window), an MLP, then ``n_latent_layer`` self-attention blocks among the latents only.
    """

    def __init__(self, cfg: NeuroformerConfig):
        super().__init__()
        self.latents = nn.Parameter(0.02 * torch.randn(cfg.n_latents, cfg.n_embd))
        self.ln_query, self.ln_context, self.read = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd), Attention(cfg)
        self.ln_mlp, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_latent_layer))
        self.ln = nn.LayerNorm(cfg.n_embd)

    def forward(self, context: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """context: (B, N, C); keep: (B, N) bool, False for PAD -> latents (B, M, C)."""
        x = self.latents.expand(len(context), -1, -1)
        x = x + self.read(self.ln_query(x), self.ln_context(context), keep[:, None, None, :])
        x = x + self.mlp(self.ln_mlp(x))
        for block in self.blocks:
            x = block(x, None)
        return self.ln(x)


class FrameEncoder(nn.Module):
    """Frames (B, F, H, W) -> patch tokens (B, N, C): 3D patch embedding + learned positions."""

    def __init__(self, cfg: NeuroformerConfig):
        super().__init__()
        self.patchify = nn.Conv3d(1, cfg.n_embd, kernel_size=cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.zeros(cfg.n_patches, cfg.n_embd))
        self.encoder = ContextEncoder(cfg)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.patchify(frames.unsqueeze(1)).flatten(2).transpose(1, 2) + self.pos  # (B, N, C)
        return self.encoder(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))


class BehaviorEncoder(nn.Module):
    """Behaviour samples (B, S, V) -> tokens (B, S, C) and which of them hold a value (B, S).

    A sample with any NaN (behaviour not recorded at that time) is masked, never imputed.
    """

    def __init__(self, cfg: NeuroformerConfig):
        super().__init__()
        self.embed = nn.Linear(cfg.n_behavior, cfg.n_embd)
        self.pos = nn.Parameter(torch.zeros(cfg.behavior_steps, cfg.n_embd))
        self.encoder = ContextEncoder(cfg)

    def forward(self, behavior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = ~behavior.isnan().any(-1)  # (B, S)
        x = self.embed(behavior.nan_to_num(0.0)) + self.pos
        # A window with no sample at all attends among its (meaningless) tokens, so that nothing
        # is NaN; the decoder's cross-attention then ignores all of them (keep is False).
        return self.encoder(x, keep | ~keep.any(-1, keepdim=True)), keep


def masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, N, C) over positions where keep (B, N) is True -> (B, C)."""
    w = keep.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class Neuroformer(nn.Module):
    """Multimodal generative spike GPT. See the module docstring for the architecture."""

    def __init__(self, cfg: NeuroformerConfig):
        super().__init__()
        self.config = cfg
        self.id_embedding = nn.Embedding(cfg.id_vocab_size, cfg.n_embd, padding_idx=PAD)
        self.dt_embedding = nn.Embedding(cfg.dt_vocab_size, cfg.n_embd, padding_idx=PAD)
        self.current_pos = nn.Parameter(torch.zeros(cfg.block_size, cfg.n_embd))
        self.past_pos = nn.Parameter(torch.zeros(cfg.past_block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.past_encoder = ContextEncoder(cfg)
        self.frames = FrameEncoder(cfg) if cfg.n_frames else None
        self.behavior = BehaviorEncoder(cfg) if cfg.n_behavior else None
        self.latent_reader = LatentReader(cfg) if cfg.n_latents else None
        # Keys/values of the past tokens, computed once and shared by every decoder block's cross-attention.
        self.past_kv = nn.Linear(cfg.n_embd, 2 * cfg.n_embd) if cfg.n_latents and cfg.past_direct else None
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.id_head = nn.Linear(cfg.n_embd, cfg.id_vocab_size, bias=False)
        self.dt_head = nn.Linear(cfg.n_embd, cfg.dt_vocab_size, bias=False)
        self.rate_head = nn.Linear(cfg.n_embd, cfg.rate_bins * cfg.id_vocab_size) if cfg.rate_bins else None
        skip = cfg.rate_bins and cfg.rate_skip
        # Linear skip paths into the log-rates: stimulus frames avg-pooled by rate_skip, behaviour samples.
        self.rate_frames = nn.Linear(cfg.n_frames * math.prod(d // cfg.rate_skip for d in cfg.frame_shape),
                                     cfg.id_vocab_size, bias=False) if skip and cfg.n_frames else None
        self.rate_behavior = nn.Linear(cfg.behavior_steps * cfg.n_behavior, cfg.id_vocab_size,
                                       bias=False) if skip and cfg.n_behavior else None
        # Contrastive projections, one per modality, and a learned temperature.
        self.neural_proj = nn.Linear(cfg.n_embd, cfg.contrastive_dim)
        self.stimulus_proj = nn.Linear(cfg.n_embd, cfg.contrastive_dim) if self.frames else None
        self.behavior_proj = nn.Linear(cfg.n_embd, cfg.contrastive_dim) if self.behavior else None
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # shape (1,): DeepSpeed cannot shard 0-dim parameters
        self.apply(self._init_weights)
        if self.rate_head is not None:
            nn.init.constant_(self.rate_head.bias, RATE_INIT)
            # Per-unit gains of the attention and stimulus paths and an offset, chosen before each test by
            # ``models.calibration`` (validation-chosen shrinkage); the identity until then.
            self.register_buffer("rate_gain", torch.ones(2, cfg.id_vocab_size))
            self.register_buffer("rate_offset", torch.zeros(cfg.id_vocab_size))
        for skip in (self.rate_frames, self.rate_behavior):
            if skip is not None:
                nn.init.zeros_(skip.weight)
        for module in (self, self.frames, self.behavior):
            for name, p in module.named_parameters(recurse=False) if module is not None else ():
                if name.endswith("pos"):
                    nn.init.normal_(p, mean=0.0, std=0.02)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Models saved before logit_scale became shape (1,) stored it as a 0-dim tensor.
        key = prefix + "logit_scale"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        # Models saved before the read-out calibration have none: the identity.
        if self.rate_head is not None and prefix + "rate_gain" not in state_dict:
            state_dict[prefix + "rate_gain"] = torch.ones_like(self.rate_gain)
            state_dict[prefix + "rate_offset"] = torch.zeros_like(self.rate_offset)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init; residual projections scaled down with depth so the stream's variance stays put.
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "is_residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            with torch.no_grad():
                module.weight[PAD].zero_()

    def embed(self, ids: torch.Tensor, dts: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token embedding: ID + learned dt + position. ids, dts: (B, T) -> (B, T, C)."""
        return self.drop(self.id_embedding(ids) + self.dt_embedding(dts) + pos[: ids.shape[1]])

    def encode_context(self, x: NeuroformerInput) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The cross-attention memory of a batch.

        Returns:
            memory (B, N, C): the context tokens (past, stimulus, behaviour), or with ``n_latents``
            the M latents that read them; keep (B, N) bool (False for PAD); and each modality's
            encoding by name.
        """
        keep_past = x.past_ids != PAD
        parts = {"past": self.past_encoder(self.embed(x.past_ids, x.past_dts, self.past_pos), keep_past)}
        keeps = [keep_past]
        if self.frames is not None:
            parts["stimulus"] = self.frames(x.frames)
            keeps.append(torch.ones(parts["stimulus"].shape[:2], dtype=torch.bool, device=keep_past.device))
        if self.behavior is not None:
            parts["behavior"], keep_behavior = self.behavior(x.behavior)
            keeps.append(keep_behavior)
        context, keep = torch.cat(list(parts.values()), dim=1), torch.cat(keeps, dim=1)
        if self.latent_reader is not None:
            context = self.latent_reader(context, keep)
            keep = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        return context, keep, parts

    def cross_keys_values(
        self, x: NeuroformerInput
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, dict[str, torch.Tensor]]:
        """What every decoder block cross-attends to: its keys and values of the memory.

        Returns:
            per decoder block, keys and values, each (B, h, N, C/h); keep (B, N) bool, False for
            PAD; each modality's encoding by name. With ``past_direct`` the N keys are the M
            latents' followed by the P past tokens' (the latter shared by all blocks).
        """
        memory, keep, parts = self.encode_context(x)
        kvs = [block.cross_attn.keys_values(memory) for block in self.blocks]
        if self.past_kv is not None:
            heads = self.blocks[0].cross_attn._heads
            k_past, v_past = (heads(t) for t in self.past_kv(parts["past"]).split(self.config.n_embd, dim=2))
            kvs = [(torch.cat([k, k_past], dim=2), torch.cat([v, v_past], dim=2)) for k, v in kvs]
            keep = torch.cat([keep, x.past_ids != PAD], dim=1)
        return kvs, keep, parts

    def features(self, x: NeuroformerInput, need_weights: bool = False) -> Features:
        """The final hidden states of every current position (after ``ln_f``), before the heads.

        Args:
            x: the window's tokens and context.
            need_weights: also return every decoder block's cross-attention probabilities.
        """
        cross_kv, keep_ctx, parts = self.cross_keys_values(x)
        ids, T = x.ids, x.ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        self_mask = causal[None, None] & (ids != PAD)[:, None, None, :]  # (B, 1, T, T)
        cross_mask = keep_ctx[:, None, None, :]  # (B, 1, 1, N)
        h = self.embed(ids, x.dts, self.current_pos)
        weights = []
        for block, kv in zip(self.blocks, cross_kv):
            h, _, w = block(h, self_mask, kv, cross_mask, need_weights=need_weights)
            weights.append(w)
        return Features(self.ln_f(h), weights if need_weights else [], parts)

    def forward(self, x: NeuroformerInput, contrastive: bool = False, with_rate_paths: bool = False) -> ModelOutput:
        """Next-token logits for every position of the current window.

        Args:
            x: ids/dts (B, T), past_ids/past_dts (B, P), frames (B, F, H, W) if the model has a
                stimulus encoder, behavior (B, S, V) if it has a behaviour one.
            contrastive: also return the unit-norm contrastive embeddings.
            with_rate_paths: also return the rate read-out's uncalibrated terms.
        """
        f = self.features(x)
        out = self.heads(f.hidden, x, with_rate_paths)
        return self.contrastive_embeddings(x, f, out) if contrastive else out

    def heads(self, hidden: torch.Tensor, x: NeuroformerInput | None = None,
              with_rate_paths: bool = False) -> ModelOutput:
        """The ID and dt logits of hidden states (B, T, C) from ``features``, and the rate read-out if any
        (its skip paths read the frames and behaviour of ``x``)."""
        out = ModelOutput(self.id_head(hidden), self.dt_head(hidden))
        if self.rate_head is None:
            return out
        paths = self.rate_paths(hidden, x)
        log_rates = (self.rate_gain[0] * paths.attention + self.rate_gain[1] * paths.stimulus + paths.behavior
                     + self.rate_offset)
        return out._replace(log_rates=log_rates.clamp(max=MAX_LOG_RATE), rate_paths=paths if with_rate_paths else None)

    def rate_paths(self, hidden: torch.Tensor, x: NeuroformerInput) -> RatePaths:
        """The rate read-out's log-rate terms before calibration, from hidden states (B, T, C) and ``x``."""
        attention = self.rate_head(hidden[:, 0]).view(len(hidden), self.config.rate_bins, -1)  # (B, bins, V) from SOS
        zero = attention.new_zeros(len(hidden), 1, attention.shape[-1])
        stimulus = behavior = zero
        if self.rate_frames is not None:
            pooled = F.avg_pool2d(x.frames, self.config.rate_skip)  # (B, F, H/k, W/k)
            stimulus = self.rate_frames(pooled.flatten(1))[:, None]
        if self.rate_behavior is not None:
            behavior = self.rate_behavior(x.behavior.nan_to_num(0.0).flatten(1))[:, None]
        return RatePaths(attention, stimulus, behavior)

    def _read_out(self, x: NeuroformerInput, with_paths: bool = False) -> ModelOutput:
        """The forward pass of the SOS token alone: the rate read-out of the context of ``x``."""
        if self.rate_head is None:
            raise ConfigError("this Neuroformer has no rate read-out (train it with model.rate_readout=true)")
        # Through forward, which a ZeRO-3 engine hooks to gather this module's own parameters.
        sos = torch.full((len(x.past_ids), 1), SOS, dtype=torch.long, device=x.past_ids.device)
        return self(x._replace(ids=sos, dts=sos), with_rate_paths=with_paths)

    @torch.no_grad()
    def context_rate_paths(self, x: NeuroformerInput) -> RatePaths:
        """``rate_paths`` of the SOS position: the uncalibrated read-out terms of the context of ``x``."""
        return self._read_out(x, with_paths=True).rate_paths

    @torch.no_grad()
    def rates(self, x: NeuroformerInput) -> torch.Tensor:
        """(B, rate_bins, id_vocab_size) expected count of every ID token per dt bin of the current window.

        Read from the context of ``x`` only (its current tokens are not used); needs the rate read-out.
        """
        return self._read_out(x).log_rates.exp()

    def contrastive_embeddings(self, x: NeuroformerInput, f: Features, out: ModelOutput) -> ModelOutput:
        """``out`` with the unit-norm contrastive embeddings of the window's modalities."""
        # The current window's own spikes, encoded without the context, stand for the neural side.
        keep = x.ids != PAD
        neural = masked_mean(self.past_encoder(self.embed(x.ids, x.dts, self.current_pos), keep), keep)
        unit = lambda proj, h: F.normalize(proj(h), dim=-1)  # noqa: E731
        return out._replace(
            neural=unit(self.neural_proj, neural),
            stimulus=unit(self.stimulus_proj, f.parts["stimulus"].mean(1)) if self.frames else None,
            behavior=unit(self.behavior_proj, masked_mean(f.parts["behavior"], ~x.behavior.isnan().any(-1)))
            if self.behavior else None,
        )

    def forward_with_attention(self, x: NeuroformerInput) -> tuple[ModelOutput, list[torch.Tensor]]:
        """``forward(x)`` plus every decoder block's cross-attention probabilities.

        Returns:
            the outputs, and per block a (B, h, T, N) tensor: how much each current position
            attends to each context token. Context tokens are ordered as in ``encode_context``:
            the P past-window tokens first, then stimulus patches, then behaviour samples. The
            tensors are part of the autograd graph (for attention x gradient).
        """
        if self.latent_reader is not None:
            raise ConfigError("attention read-outs need a decoder that attends to the context tokens; this "
                              "model attends to latents (model.n_latents > 0): use connectivity_method=perturbation")
        f = self.features(x, need_weights=True)
        return self.heads(f.hidden, x), f.attention

    def start_decoding(self, x: NeuroformerInput) -> DecoderCache:
        """Encode a batch's context once, cache its cross-attention keys/values in every block and
        allocate the self-attention key/value buffers for a whole block.

        Only the context fields of ``x`` are read (past tokens, frames, behaviour); feed the
        current window's tokens with ``decode_step``.
        """
        # Past columns that are PAD in every row (the tail of a block longer than any row's past)
        # are masked everywhere: leaving them out saves their encoding and their keys/values in every block.
        n_past = int(torch.nonzero((x.past_ids != PAD).any(0)).max()) + 1
        cross_kv, keep_ctx, _ = self.cross_keys_values(x._replace(past_ids=x.past_ids[:, :n_past],
                                                                  past_dts=x.past_dts[:, :n_past]))
        cfg, B, T = self.config, len(keep_ctx), self.config.block_size
        k0 = cross_kv[0][0]
        shape = (2, B, cfg.n_head, T, cfg.n_embd // cfg.n_head)
        # Additive (0 / -inf) masks: SDPA converts a bool mask to one at every call.
        additive = lambda keep: torch.zeros_like(keep, dtype=k0.dtype).masked_fill_(~keep, float("-inf"))  # noqa: E731
        return DecoderCache(
            # Contiguous copies: SDPA reads views strided across heads and keys/values 2-3x slower.
            cross_kv=[tuple(t.contiguous() for t in kv) for kv in cross_kv],
            cross_mask=additive(keep_ctx[:, None, None, :]),
            self_kv=[k0.new_zeros(shape) for _ in self.blocks],
            keep=k0.new_full((B, T), float("-inf")),
            causal=additive(torch.ones(T, T, dtype=torch.bool, device=k0.device).tril()),
            positions=torch.arange(T, device=k0.device),
            qkv=[block.self_attn.fused_qkv() for block in self.blocks],
            heads=torch.cat([self.id_head.weight, self.dt_head.weight]).t().contiguous(),
        )

    def decode_step(
        self, cache: DecoderCache, ids: torch.Tensor, dts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed n current-window tokens and return the next-token logits at their positions.

        Costs one pass over the n new tokens only: earlier tokens' self-attention keys/values and
        the context's cross-attention keys/values come from ``cache``, which is updated in place.
        Feeding a window's tokens in any chunking gives the logits ``forward`` gives (PAD tokens
        are masked as keys exactly as there).

        Args:
            cache: from ``start_decoding``, holding ``cache.length`` earlier tokens.
            ids, dts: (B, n) the next tokens.

        Returns:
            id_logits (B, n, id_vocab_size) and dt_logits (B, n, dt_vocab_size).
        """
        L, n = cache.length, ids.shape[1]
        if L + n > self.config.block_size:
            raise ValueError(f"decode_step: {L} + {n} tokens exceed the block size {self.config.block_size}")
        id_logits, dt_logits = self.decode_tokens(cache, ids, dts, cache.positions[L : L + n])
        cache.length = L + n
        return id_logits, dt_logits

    def decode_tokens(
        self, cache: DecoderCache, ids: torch.Tensor, dts: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode_step`` with the positions given as a tensor, (n,) int64, and ``cache.length`` left alone.

        Every shape depends on B and n only, never on the position, so ``torch.compile`` of this
        method makes one program for every step of a window (``sample_windows(compile=True)``).
        """
        keep_new = torch.zeros(ids.shape, dtype=cache.keep.dtype, device=ids.device).masked_fill_(ids == PAD, float("-inf"))
        cache.keep[:, positions] = keep_new
        # Keys over the whole block: positions not fed yet are -inf in ``keep``; with several new
        # tokens the causal rows keep each from seeing the later ones.
        self_mask = cache.keep[:, None, None, :]  # (B, 1, 1, T)
        if ids.shape[1] > 1:
            self_mask = self_mask + cache.causal.index_select(0, positions)  # (B, 1, n, T)
        x = self.embed(ids, dts, self.current_pos.index_select(0, positions))
        for block, self_kv, qkv, cross_kv in zip(self.blocks, cache.self_kv, cache.qkv, cache.cross_kv):
            x = block.decode(x, self_kv, positions, self_mask, qkv, cross_kv, cache.cross_mask)
        logits = self.ln_f(x) @ cache.heads
        return logits[..., : self.config.id_vocab_size], logits[..., self.config.id_vocab_size :]

    def losses(self, out: ModelOutput, target_ids: torch.Tensor, target_dts: torch.Tensor,
               counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mean token cross-entropies (PAD targets ignored), the contrastive loss and the rate loss, if any.

        Args:
            out: the forward pass's outputs.
            target_ids, target_dts: (B, T) next-token targets ``[s1..sn, EOS, PAD..]``.
            counts: (B, rate_bins, id_vocab_size) true counts of the current window (every spike,
                none cut), for the rate read-out's Poisson loss ``rate_nll``: nats per true spike
                (without the log y! constant); with skip paths also ``rate_l2``, the sum of their
                squared weights.
        """
        losses = {
            "id_ce": F.cross_entropy(out.id_logits.flatten(0, 1), target_ids.flatten(), ignore_index=PAD),
            "dt_ce": F.cross_entropy(out.dt_logits.flatten(0, 1), target_dts.flatten(), ignore_index=PAD),
        }
        if out.log_rates is not None and counts is not None:
            nll = (out.log_rates.exp() - counts * out.log_rates)[..., N_SPECIAL:].sum()
            losses["rate_nll"] = nll / counts.sum().clamp_min(1.0)
            skips = [m.weight for m in (self.rate_frames, self.rate_behavior) if m is not None]
            if skips:  # an L2 penalty, as a GLM's: a unit the stimulus does not drive gets no filter from noise
                losses["rate_l2"] = sum(w.square().sum() for w in skips)
        pairs = [m for m in (out.stimulus, out.behavior) if m is not None]
        if out.neural is not None and pairs and out.neural.shape[0] > 1:
            scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
            losses["contrastive"] = sum(clip_loss(out.neural, m, scale) for m in pairs) / len(pairs)
        return losses

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices of Linear/Conv layers; not biases, norms, embeddings."""
        decay, no_decay = [], []
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                is_matrix = name == "weight" and isinstance(module, (nn.Linear, nn.Conv3d))
                (decay if is_matrix else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def hparams(self) -> dict:
        return asdict(self.config)

    @classmethod
    def build(cls, spec, rate_readout: bool = False, **hparams) -> Neuroformer:
        """A model sized for the data described by ``spec`` (an ``InputSpec``); ``rate_readout`` adds the
        Poisson rate read-out over the current window's dt bins (``rate_skip``: with its linear skip paths)."""
        tok = spec.tokenizer
        cfg = NeuroformerConfig(
            id_vocab_size=spec.vocab.size,
            dt_vocab_size=tok.dt_vocab_size,
            block_size=tok.max_tokens,
            past_block_size=tok.max_past_tokens,
            n_frames=spec.n_frames,
            frame_shape=spec.frame_shape,
            n_behavior=spec.n_behavior,
            behavior_steps=spec.behavior_steps if spec.n_behavior else 0,
            rate_bins=tok.n_bins if rate_readout else 0,
            **hparams,
        )
        return cls(cfg)


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of unit-norm embeddings a, b (B, D)."""
    logits = scale * a @ b.T  # (B, B); the diagonal holds the matched pairs
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
