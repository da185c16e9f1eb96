"""Generate spike trains with a trained Neuroformer, window by window.

Within a window, (ID, dt) token pairs are sampled one position at a time until EOS or a full
block. Both tokens of a position come from the same step's logits (the model predicts them
side by side, neither conditioned on the other). The dt is drawn first: it says whether the
window ends (EOS) and whether time moves on to a later bin; then the unit ID, given that bin.
Each draw applies, in order,

1. constraints: PAD and SOS are never drawn; a dt is EOS or a bin of the current window no
   earlier than the previous spike's; the ID is EOS exactly when the dt is. That is the
   tokenizer's order (time order; any order of units within a bin), so decoding and
   re-encoding a sample gives it back. (docs/generation.md compares other orders of drawing.)
2. temperature, then top-k, then top-p (nucleus) filtering;
3. an exact draw: the argmax of log-probabilities plus Gumbel noise from a seeded generator.

Each step costs one incremental pass: ``Neuroformer.start_decoding`` encodes the context
(past window, stimulus, behaviour) once per window and caches its cross-attention keys and
values, and ``decode_step`` feeds one new token, writing its self-attention keys/values into
buffers allocated once per batch. The constraints are looked up each step in tables of additive
masks built once per call, and the Gumbel noise of the draws is made 16 steps at a time, so a
step of the loop is a handful of tensor operations around the model's. ``compile=True`` runs
the encoding and each decoding step as inductor programs (``compiled_decoding``): at batch 1 a
step is ~30 operators on one row, bound by per-operator overhead. ``length`` forces a fixed number of spikes per window (no EOS), for benchmarks.
``use_cache=False`` runs the same loop with a full forward pass per token (the reference
that the test and ``bench/generation.py`` compare against); both give identical samples.

``simulate`` strings windows together: in closed loop the generated spikes of earlier
windows become the past-window tokens of the next, so after ``past_window`` seconds the model
runs on its own output, driven only by the true stimulus and behaviour.

CLI: ``python -m neuroformer.inference.generate --help``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from neuroformer import cli
from neuroformer.data.dataset import InputSpec, WindowDataset
from neuroformer.data.nwb import read_nwb
from neuroformer.data.recording import Recording
from neuroformer.data.splits import window_starts
from neuroformer.data.tokenizer import EOS, N_SPECIAL, PAD, SOS
from neuroformer.errors import ConfigError, RecordingError
from neuroformer.files import atomic_path
from neuroformer.models.neuroformer import DecoderCache, Neuroformer, NeuroformerInput
from neuroformer.registry import load

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn from the model's logits.

    Attributes:
        temperature: logits are divided by it; 0 means greedy (argmax).
        top_k: keep only the k most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1: all).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {self}")


class GeneratedWindows(NamedTuple):
    """Sampled current windows, laid out like ``Batch.ids``/``Batch.dts``.

    Attributes:
        ids: (B, T) ``[SOS, s1..sn, PAD..]`` ID tokens.
        dts: (B, T) matching dt tokens.
        counts: (B,) number of spikes n in each window.
        ended: (B,) True where the model chose EOS (False: the block filled up first).
        steps: number of decoding steps run (tokens sampled per window, EOS included).
    """

    ids: torch.Tensor
    dts: torch.Tensor
    counts: torch.Tensor
    ended: torch.Tensor
    steps: int


class Spikes(NamedTuple):
    """A spike train: times (n,) float64 seconds, units (n,) int64 (row of the recording's units)."""

    times: np.ndarray
    units: np.ndarray


def filter_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k, then top-p on (B, V) logits; removed tokens get -inf.

    Masked (-inf) entries stay masked; at least the most likely token always survives.
    """
    if sampling.temperature > 0 and sampling.temperature != 1:  # dividing by 1 changes nothing: skip the op
        logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= sampling.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), NEG_INF)
    return logits


def draw(logits: torch.Tensor, sampling: SamplingConfig, gumbel: torch.Tensor) -> torch.Tensor:
    """One token per row of (B, V) logits: greedy if temperature is 0, else a Gumbel-max draw
    with ``gumbel``, (B, V) standard Gumbel noise (``GumbelNoise``)."""
    logits = filter_logits(logits, sampling)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    return (logits + gumbel).argmax(dim=-1)


class GumbelNoise:
    """Standard Gumbel noise for the draws of a sampling loop, made ``chunk`` steps at a time.

    Making noise is five elementwise operations, as many as the rest of a draw; at batch 1
    each costs its per-operator overhead, so making 16 steps' worth at once saves most of it.
    The noise is drawn for every row and token whatever the logits are, so the generator's
    stream, and thus the samples, depend only on the seed and on which token wins.
    """

    def __init__(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
                 chunk: int = 16):
        self.buffer = torch.empty(chunk, *shape, device=device)  # default dtype, as torch.rand's
        self.generator, self.used = generator, chunk

    def next(self) -> torch.Tensor:
        """The next step's noise, a view of the buffer: (*shape)."""
        if self.used == len(self.buffer):
            u = self.buffer.uniform_(generator=self.generator)  # what torch.rand draws
            u.clamp_(min=torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()  # -log(-log u), in place
            self.used = 0
        self.used += 1
        return self.buffer[self.used - 1]


def dt_constraint(last_bin: torch.Tensor, n_bins: int, dt_vocab: int) -> torch.Tensor:
    """(B, V_dt) bool: EOS, or a bin of the current window no earlier than the previous spike's."""
    tokens = torch.arange(dt_vocab, device=last_bin.device)
    bins = tokens - N_SPECIAL
    ok = (bins[None, :] >= last_bin[:, None]) & (bins[None, :] < n_bins)
    ok[:, EOS] = True
    return ok


def additive_mask(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``ok``, -inf elsewhere: adding it to logits is ``masked_fill(~ok, -inf)``, bit for bit."""
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, NEG_INF)


def id_constraint(new_dt: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(B, V_id) bool: EOS after a dt EOS, else an allowed unit."""
    ids = torch.arange(len(allowed), device=new_dt.device)
    ok = allowed[None, :].repeat(len(new_dt), 1)
    ok[new_dt == EOS] = ids == EOS
    return ok


class Masks(NamedTuple):
    """The constraints as additive masks (0 or -inf), built once per call and looked up each step.

    Attributes:
        dt: (V_dt, V_dt) row d: the dt tokens that may follow a spike of dt token d (PAD/SOS/EOS
            rows: anything from bin 0, as at the start).
        spike: (V_id,) the ID tokens that may go with a spike's dt.
        eos: (V_id,) those that may go with a dt EOS (EOS only).
    """

    dt: torch.Tensor
    spike: torch.Tensor
    eos: torch.Tensor


def draw_tokens(id_logits: torch.Tensor, dt_logits: torch.Tensor, prev_dt: torch.Tensor, gumbel: torch.Tensor,
                masks: Masks, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The next ID and dt token of each row, (B,) each: the dt first, then the ID given it.

    Args:
        id_logits, dt_logits: (B, V_id), (B, V_dt) the step's logits.
        prev_dt: (B,) the previous dt token.
        gumbel: (B, V_dt + V_id) standard Gumbel noise (``GumbelNoise``).
    """
    n_dt = dt_logits.shape[-1]
    new_dt = draw(dt_logits + masks.dt.index_select(0, prev_dt), sampling, gumbel[:, :n_dt])
    id_mask = torch.where((new_dt == EOS)[:, None], masks.eos, masks.spike)
    return draw(id_logits + id_mask, sampling, gumbel[:, n_dt:]), new_dt


def _decode_and_draw(model: Neuroformer, cache: DecoderCache, ids: torch.Tensor, dts: torch.Tensor,
                     positions: torch.Tensor, gumbel: torch.Tensor, masks: Masks, sampling: SamplingConfig
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One cached step: feed (B, 1) tokens at ``positions`` (1,) and draw the next ID and dt, (B,) each."""
    id_logits, dt_logits = model.decode_tokens(cache, ids, dts, positions)
    return draw_tokens(id_logits[:, 0], dt_logits[:, 0], dts[:, 0], gumbel, masks, sampling)


def _cached_steps(model: Neuroformer, x: NeuroformerInput, masks: Masks, sampling: SamplingConfig,
                  compile: bool) -> Callable:
    start, decode_and_draw = compiled_decoding(model) if compile else (model.start_decoding, _decode_and_draw)
    cache = start(x)

    def step(ids: torch.Tensor, dts: torch.Tensor, t: int, gumbel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_and_draw(model, cache, ids[:, t : t + 1], dts[:, t : t + 1], cache.positions[t : t + 1],
                               gumbel, masks, sampling)

    return step


def _full_forward_steps(model: Neuroformer, x: NeuroformerInput, masks: Masks, sampling: SamplingConfig) -> Callable:
    def step(ids: torch.Tensor, dts: torch.Tensor, t: int, gumbel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x._replace(ids=ids, dts=dts))
        return draw_tokens(out.id_logits[:, t], out.dt_logits[:, t], dts[:, t], gumbel, masks, sampling)

    return step


# Inductor with its C++ wrapper (no Python between the kernels) and autotuned matrix products:
# what pays at batch 1, where a step is ~40 operators on a single row.
_INDUCTOR = {"cpp_wrapper": True, "max_autotune": True}
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled start_decoding


@functools.cache
def _compiled_step() -> Callable:
    return torch.compile(_decode_and_draw, fullgraph=True, dynamic=False, options=_INDUCTOR)


def compiled_decoding(model: Neuroformer) -> tuple[Callable, Callable]:
    """``model.start_decoding`` and a decoding step with its draw (``_decode_and_draw``), compiled by inductor.

    The step's shapes depend on the batch size only, so one program serves every step of every
    window of that size (and sampling settings). ``start_decoding``'s depend also on the
    longest past window of the batch; after a second length it is compiled for any length.
    Each costs seconds to compile on first use (cached on disk by inductor for later
    processes). The wrappers are made once: making one costs about a millisecond, as much as
    encoding a window.
    """
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model.start_decoding, options=_INDUCTOR)
    return _COMPILED[model], _compiled_step()


@torch.inference_mode()  # no autograd bookkeeping: ~12% faster per step than no_grad on CPU
def sample_windows(
    model: Neuroformer,
    x: NeuroformerInput,
    n_bins: int,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    unit_tokens: torch.Tensor | None = None,
    use_cache: bool = True,
    length: int | None = None,
    compile: bool = False,
) -> GeneratedWindows:
    """Sample the current window of every row of ``x`` given its context.

    Args:
        model: the Neuroformer (put in eval mode by the caller for dropout-free sampling).
        x: context of each window (past tokens, frames, behaviour); its current tokens are ignored.
        n_bins: dt bins of a current window (``SpikeTokenizer.n_bins``).
        sampling: temperature / top-k / top-p.
        generator: random source; the same seed gives the same samples.
        unit_tokens: ID tokens that may be generated (e.g. one session's units); default all units.
        use_cache: incremental decoding with the KV cache; False runs a full forward pass per
            token (the reference implementation; identical samples, much slower).
        length: if given, every window gets exactly ``length`` spikes: EOS is never drawn and
            sampling stops after ``length`` steps (fixed-work benchmarks); at most ``block_size - 1``.
        compile: encode, decode and draw with ``compiled_decoding`` (inductor; needs a C++
            compiler; the first call for a batch size compiles, about half a minute). Pays in
            long runs at batch 1, where a step is bound by per-operator overhead.

    Returns:
        GeneratedWindows with (B, block_size) token tensors.
    """
    cfg = model.config
    B, T = len(x.past_ids), cfg.block_size
    if length is not None and not 0 < length < T:
        raise ConfigError(f"sample_windows: length must be in [1, {T - 1}] (block size {T}); got {length}")
    device, dtype = x.past_ids.device, next(model.parameters()).dtype
    allowed = torch.zeros(cfg.id_vocab_size, dtype=torch.bool, device=device)
    allowed[N_SPECIAL:] = True
    if unit_tokens is not None:
        allowed[N_SPECIAL:] = False
        allowed[unit_tokens] = True
    dt_ok = dt_constraint((torch.arange(cfg.dt_vocab_size, device=device) - N_SPECIAL).clamp(min=0), n_bins,
                          cfg.dt_vocab_size)
    if length is not None:
        dt_ok[:, EOS] = False
    spike_mask, eos_mask = additive_mask(id_constraint(torch.tensor([N_SPECIAL, EOS], device=device), allowed), dtype)
    masks = Masks(additive_mask(dt_ok, dtype), spike_mask, eos_mask)
    ids = torch.full((B, T), PAD, dtype=torch.long, device=device)
    dts = torch.full((B, T), PAD, dtype=torch.long, device=device)
    ids[:, 0], dts[:, 0] = SOS, SOS
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    noise = GumbelNoise((B, cfg.dt_vocab_size + cfg.id_vocab_size), generator, device)
    step = _cached_steps(model, x, masks, sampling, compile) if use_cache else _full_forward_steps(model, x, masks, sampling)
    steps = 0
    for t in range(T - 1 if length is None else length):  # position t predicts token t + 1; a block holds T - 1 spikes
        new_id, new_dt = step(ids, dts, t, noise.next())
        steps += 1
        if length is None:
            ended |= new_dt == EOS
            new_id.masked_fill_(ended, PAD)
            new_dt.masked_fill_(ended, PAD)
        ids[:, t + 1], dts[:, t + 1] = new_id, new_dt
        if length is None and ended.all():
            break
    counts = (ids[:, 1:] != PAD).sum(1)
    return GeneratedWindows(ids, dts, counts, ended, steps)


def _with_past(spec: InputSpec, x: NeuroformerInput, t0: np.ndarray, streams: list[Spikes], unit_vocab: np.ndarray
               ) -> NeuroformerInput:
    """``x`` with its past-window tokens rebuilt from each row's spike stream."""
    tok = spec.tokenizer
    past_ids, past_dts = [], []
    for start, (times, units) in zip(t0, streams):
        enc = tok.encode(times, unit_vocab[units], np.array([start - tok.past_window]), tok.past_window,
                         tok.max_past_tokens - 1, keep_latest=True)
        seq = tok.past_sequences(enc)
        past_ids.append(seq["past_ids"])
        past_dts.append(seq["past_dts"])
    as_t = lambda a: torch.from_numpy(np.concatenate(a)).to(x.past_ids.device)  # noqa: E731
    return x._replace(past_ids=as_t(past_ids), past_dts=as_t(past_dts))


def _recent(spikes: Spikes, since: float) -> Spikes:
    """The spikes at or after ``since``."""
    keep = spikes.times >= since
    return Spikes(spikes.times[keep], spikes.units[keep])


def simulate(
    model: Neuroformer,
    spec: InputSpec,
    recording: Recording,
    starts: np.ndarray,
    n_windows: int,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    closed_loop: bool = True,
    compile: bool = False,
) -> list[Spikes]:
    """Generate ``n_windows`` consecutive windows from each start time.

    Row b covers ``[starts[b], starts[b] + n_windows * window)`` of ``recording``, with its true
    stimulus and behaviour. Its first past window holds the true spikes; in closed loop every
    later past window is made of what the model generated (true spikes before ``starts[b]``,
    generated ones after), in open loop it is always the true past.

    Args:
        starts: (B,) start times, seconds; repeat a start to draw several samples of one stretch.
        compile: as in ``sample_windows``.

    Returns:
        B spike trains, units as rows of ``recording.units``; each spike at the centre of its dt bin.
    """
    tok = spec.tokenizer
    unit_vocab = spec.vocab.indices(recording.units.names, recording.path)  # recording row -> vocabulary index
    row_of_unit = np.full(len(spec.vocab), -1)
    row_of_unit[unit_vocab] = np.arange(len(unit_vocab))
    true = recording.units
    starts = np.asarray(starts, dtype=np.float64)
    # Each row's spike stream: the true spikes of the first past window, then what it generates.
    in_first_past = [(true.spike_times >= s - tok.past_window) & (true.spike_times < s) for s in starts]
    streams = [Spikes(true.spike_times[k], true.spike_units[k]) for k in in_first_past]
    device = next(model.parameters()).device
    unit_tokens = torch.as_tensor(unit_vocab + N_SPECIAL, device=device)
    generated: list[list[Spikes]] = [[] for _ in starts]
    for w in range(n_windows):
        t0 = starts + w * tok.window
        x = WindowDataset([recording], spec, [t0]).__getitems__(range(len(t0))).to(device).inputs
        if closed_loop and w > 0:
            x = _with_past(spec, x, t0, streams, unit_vocab)
        out = sample_windows(model, x, tok.n_bins, sampling, generator, unit_tokens, compile=compile)
        ids, dts = out.ids.cpu().numpy(), out.dts.cpu().numpy()
        for b in range(len(starts)):
            times, units = tok.decode(ids[b], dts[b], t0[b])
            # Bin centres: re-tokenising them as the next past window is then exact.
            window = Spikes(times + tok.resolution / 2, row_of_unit[units])
            generated[b].append(window)
            recent = _recent(streams[b], t0[b] + tok.window - tok.past_window)
            streams[b] = Spikes(np.concatenate([recent.times, window.times]), np.concatenate([recent.units, window.units]))
    return [Spikes(np.concatenate([g.times for g in gen]), np.concatenate([g.units for g in gen])) for gen in generated]


def _parser():
    parser = cli.parser(
        "python -m neuroformer.inference.generate",
        "Generate spikes with a trained Neuroformer over consecutive windows of a recording's "
        "split (default: the test block), conditioned on its true stimulus and behaviour.")
    parser.add_argument("--model", required=True, help="checkpoint, sharded folder, or models:/NAME/VERSION|@ALIAS")
    parser.add_argument("--data", type=Path, help="NWB recording (default: the one the model was trained on)")
    parser.add_argument("--out", required=True, type=Path, help="output .npz (times, units, sample, unit_names)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--n-windows", type=int, default=20, help="consecutive windows per sample")
    parser.add_argument("--samples", type=int, default=1, help="independent samples of the same stretch")
    parser.add_argument("--open-loop", action="store_true", help="condition every window on the true past")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="compile encoding and decoding (needs a C++ compiler; about half a minute once; "
                             "pays in long runs with few samples)")
    return parser


def _main(args) -> int:
    loaded = load(args.model)
    rec = read_nwb(args.data) if args.data else loaded.spec.source.read()
    tok = loaded.spec.tokenizer
    starts = window_starts(rec.start, rec.stop, loaded.spec.split, args.split, tok.window, tok.past_window,
                           tok.window)
    if len(starts) == 0:
        raise RecordingError(rec.path, "windows", f"no {args.split} windows under the model's split")
    start = float(starts[0])
    span = args.n_windows * tok.window
    generator = torch.Generator().manual_seed(args.seed)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    trains = simulate(loaded.model, loaded.spec, rec, np.full(args.samples, start), args.n_windows, sampling,
                      generator, closed_loop=not args.open_loop, compile=args.compile)
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                times=np.concatenate([s.times for s in trains]),
                units=np.concatenate([s.units for s in trains]),
                sample=np.concatenate([np.full(len(s.times), k) for k, s in enumerate(trains)]),
                unit_names=np.asarray(rec.units.names),
                interval=np.array([start, start + span]),
            )
    true = rec.units.spike_times
    n_true = int(((true >= start) & (true < start + span)).sum())
    n_gen = np.mean([len(s.times) for s in trains])
    print(f"{args.out}: {args.samples} sample(s) of [{start:.3f}, {start + span:.3f}) s "
          f"({'open' if args.open_loop else 'closed'} loop): {n_gen:.0f} generated spikes per sample vs "
          f"{n_true} true")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m neuroformer.inference.generate``: simulate a stretch of a recording's test block."""
    return cli.run(_main, _parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
