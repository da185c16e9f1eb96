"""Windows of recordings as model-ready batches.

``InputSpec`` fixes everything that turns a recording window into model input (tokenizer,
unit vocabulary, frame and behaviour layout and their normalisation); it is saved with every
trained model so the same transformation can be applied to new data. ``WindowDataset``
builds whole batches at once (``__getitems__``), so tokenisation is vectorised over the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from neuroformer.data.recording import Recording
from neuroformer.data.source import DataSource
from neuroformer.data.splits import SplitSpec
from neuroformer.data.targets import BehaviorTarget
from neuroformer.data.tokenizer import EOS, N_SPECIAL, PAD, SpikeTokenizer, bin_spikes
from neuroformer.data.vocabulary import UnitVocabulary
from neuroformer.errors import ModelMismatchError
from neuroformer.models.neuroformer import NeuroformerInput


class Batch(NamedTuple):
    """One batch of B windows.

    Attributes:
        ids: (B, T) current-window ID tokens ``[SOS, s1..sn, PAD..]``.
        dts: (B, T) current-window dt tokens, aligned with ``ids``.
        target_ids: (B, T) next-token ID targets ``[s1..sn, EOS, PAD..]``.
        target_dts: (B, T) next-token dt targets.
        past_ids: (B, P) past-window ID tokens ``[SOS, s1..sn, PAD..]``.
        past_dts: (B, P) past-window dt tokens.
        frames: (B, F, H, W) normalised stimulus frames ending with the current window, or None.
        behavior: (B, S, V) normalised behaviour samples over past + current window, or None.
        t0: (B,) float64 current-window start times, seconds.
        session: (B,) int64 index of the recording each window comes from.
        target_behavior: the fine-tuning target of each window (never a model input), or None:
            (B, D) float32 standardised regression targets, or (B,) int64 class labels (-1: none).
        counts: (B, n_bins, id_vocab) float32 true spike count of every ID token per dt bin of the
            current window, every spike kept (the rate read-out's target; never a model input), or None.
    """

    ids: torch.Tensor
    dts: torch.Tensor
    target_ids: torch.Tensor
    target_dts: torch.Tensor
    past_ids: torch.Tensor
    past_dts: torch.Tensor
    frames: torch.Tensor | None
    behavior: torch.Tensor | None
    t0: torch.Tensor
    session: torch.Tensor
    target_behavior: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @property
    def inputs(self) -> NeuroformerInput:
        """What the model may read: tokens and context, no target."""
        return NeuroformerInput(self.ids, self.dts, self.past_ids, self.past_dts, self.frames, self.behavior)

    def to(self, device: torch.device | str) -> Batch:
        """The batch with every tensor on ``device``."""
        return Batch(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in self))

    def trimmed(self) -> Batch:
        """The batch without the trailing token columns that are PAD in every row, current (T' <= T)
        and past (P' <= P) blocks alike.

        Blocks are sized for the busiest window of a recording, so most columns of most batches
        are PAD. The model masks PAD keys and the losses ignore PAD targets, so the kept
        positions' logits and the losses are those of the full batch; the step only costs what
        the batch uses.
        """
        t = _used_columns(self.target_ids != PAD)  # targets end with EOS: covers every real token
        p = _used_columns(self.past_ids != PAD)
        return self._replace(ids=self.ids[:, :t], dts=self.dts[:, :t], target_ids=self.target_ids[:, :t],
                             target_dts=self.target_dts[:, :t], past_ids=self.past_ids[:, :p],
                             past_dts=self.past_dts[:, :p])


def _used_columns(real: torch.Tensor) -> int:
    """1 + the last column of a (B, L) bool tensor that is True in any row (at least 1)."""
    used = torch.nonzero(real.any(0))
    return int(used.max()) + 1 if len(used) else 1


@dataclass
class InputSpec:
    """Everything needed to turn recording windows into a model's input.

    Attributes:
        tokenizer: spike tokenisation (windows, resolution, sequence lengths).
        vocab: the unit vocabulary.
        n_frames: stimulus frames per window (0: the model sees no stimulus).
        frame_shape: (H, W) of a frame, or None without stimulus.
        frame_mean, frame_std: frame normalisation.
        behavior: behaviour variable names fed to the model (empty: none).
        behavior_dims: dimension of each variable.
        behavior_steps: samples per window, evenly spread over past + current window.
        behavior_mean, behavior_std: (V,) per-channel normalisation, V = sum(behavior_dims).
        target: what each window is labelled with for fine-tuning (not an input), or None.
        source: the recordings the model was trained on and how they were read.
        split: the time-block split of those recordings (so "the test block" is never guessed).
    """

    tokenizer: SpikeTokenizer
    vocab: UnitVocabulary
    n_frames: int = 0
    frame_shape: tuple[int, int] | None = None
    frame_mean: float = 0.0
    frame_std: float = 1.0
    behavior: list[str] = field(default_factory=list)
    behavior_dims: list[int] = field(default_factory=list)
    behavior_steps: int = 0
    behavior_mean: list[float] = field(default_factory=list)
    behavior_std: list[float] = field(default_factory=list)
    target: BehaviorTarget | None = None
    source: DataSource = field(default_factory=DataSource)
    split: SplitSpec = field(default_factory=SplitSpec)

    def __post_init__(self) -> None:
        if self.target is not None and self.target.kind == "regression":
            shown = sorted(set(self.target.names) & set(self.behavior))
            if shown:
                raise ModelMismatchError(
                    f"behavior target {shown} is also a model input (data.behavior={list(self.behavior)}): a model "
                    "must not see what it predicts; drop it from data.behavior and use a model pretrained without it"
                )

    @property
    def n_behavior(self) -> int:
        return int(sum(self.behavior_dims))

    def to_dict(self) -> dict:
        return {
            "tokenizer": self.tokenizer.to_dict(),
            "vocab": self.vocab.to_dict(),
            "n_frames": self.n_frames,
            "frame_shape": list(self.frame_shape) if self.frame_shape else None,
            "frame_mean": self.frame_mean,
            "frame_std": self.frame_std,
            "behavior": list(self.behavior),
            "behavior_dims": list(self.behavior_dims),
            "behavior_steps": self.behavior_steps,
            "behavior_mean": list(self.behavior_mean),
            "behavior_std": list(self.behavior_std),
            "target": self.target.to_dict() if self.target else None,
            "source": self.source.to_dict(),
            "split": asdict(self.split),
        }

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        d = dict(d)
        d["tokenizer"] = SpikeTokenizer(**d["tokenizer"])
        d["vocab"] = UnitVocabulary.from_dict(d["vocab"])
        d["frame_shape"] = tuple(d["frame_shape"]) if d.get("frame_shape") else None
        d["target"] = BehaviorTarget.from_dict(d["target"]) if d.get("target") else None
        d["source"] = DataSource.from_dict(d.get("source"))
        d["split"] = SplitSpec(**d.get("split", {}))
        return cls(**d)

    def check_recording(self, rec: Recording) -> None:
        """Refuse a recording this spec cannot feed (missing stimulus, behaviour or units)."""
        self.vocab.indices(rec.units.names, rec.path)
        if self.n_frames:
            if rec.stimulus is None:
                raise ModelMismatchError(
                    f"{rec.path}: stimulus: the model expects {self.n_frames} stimulus frames per "
                    "window but the recording has no frames (use a model trained without stimulus, "
                    "data.n_frames=0)"
                )
            if tuple(rec.stimulus.frame_shape) != tuple(self.frame_shape or ()):
                raise ModelMismatchError(
                    f"{rec.path}: stimulus: frames are {tuple(rec.stimulus.frame_shape)} but the "
                    f"model expects {tuple(self.frame_shape or ())}"
                )
        for name, dim in zip(self.behavior, self.behavior_dims):
            if name not in rec.behavior:
                raise ModelMismatchError(
                    f"{rec.path}: behavior: the model expects variable {name!r}; the recording has "
                    f"{sorted(rec.behavior)}"
                )
            if rec.behavior[name].dim != dim:
                raise ModelMismatchError(
                    f"{rec.path}: behavior/{name}: expected {dim} dimension(s), found "
                    f"{rec.behavior[name].dim}"
                )
        if self.target is not None:
            self.target.check_recording(rec)


class WindowDataset(torch.utils.data.Dataset):
    """Current windows of one or more recordings; item ``i`` is window ``i``.

    ``__getitems__`` returns a whole ``Batch`` (the DataLoader calls it with a batch of
    indices), so use it with ``collate_fn=already_batched``.
    """

    def __init__(self, recordings: list[Recording], spec: InputSpec, starts: list[np.ndarray]):
        for rec in recordings:
            spec.check_recording(rec)
        self.recordings, self.spec = recordings, spec
        # Each recording's spikes, with units mapped into the shared vocabulary.
        self._spikes = [
            (rec.units.spike_times, spec.vocab.indices(rec.units.names, rec.path)[rec.units.spike_units])
            for rec in recordings
        ]
        self.session = np.concatenate([np.full(len(s), i) for i, s in enumerate(starts)]).astype(np.int64)
        self.t0 = np.concatenate(starts).astype(np.float64) if starts else np.zeros(0)

    def __len__(self) -> int:
        return len(self.t0)

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        t0, session = self.t0[idx], self.session[idx]
        tok, spec = self.spec.tokenizer, self.spec
        cur = {k: np.empty((len(idx), tok.max_tokens), np.int64) for k in ("ids", "dts", "target_ids", "target_dts")}
        past = {k: np.empty((len(idx), tok.max_past_tokens), np.int64) for k in ("past_ids", "past_dts")}
        frames = np.zeros((len(idx), spec.n_frames, *spec.frame_shape), np.float32) if spec.n_frames else None
        behavior = np.zeros((len(idx), spec.behavior_steps, spec.n_behavior), np.float32) if spec.behavior else None
        target = spec.target.zeros(len(idx)) if spec.target is not None else None
        counts = np.zeros((len(idx), tok.n_bins, spec.vocab.size), np.float32)
        for s in np.unique(session):
            rows = np.flatnonzero(session == s)
            times, units = self._spikes[s]
            enc = tok.encode(times, units, t0[rows], tok.window, tok.max_tokens - 1)
            for k, v in tok.current_sequences(enc).items():
                cur[k][rows] = v
            counts[rows, :, N_SPECIAL:] = bin_spikes(times, units, t0[rows], tok, len(spec.vocab))
            enc = tok.encode(times, units, t0[rows] - tok.past_window, tok.past_window, tok.max_past_tokens - 1,
                             keep_latest=True)
            for k, v in tok.past_sequences(enc).items():
                past[k][rows] = v
            rec = self.recordings[s]
            if frames is not None:
                frames[rows] = self._frames(rec, t0[rows])
            if behavior is not None:
                behavior[rows] = self._behavior(rec, t0[rows])
            if target is not None:
                target[rows] = spec.target.values(rec, t0[rows], tok.window)
        as_t = torch.from_numpy
        return Batch(
            **{k: as_t(v) for k, v in cur.items()},
            **{k: as_t(v) for k, v in past.items()},
            frames=as_t(frames) if frames is not None else None,
            behavior=as_t(behavior) if behavior is not None else None,
            t0=as_t(t0),
            session=as_t(session),
            target_behavior=as_t(target) if target is not None else None,
            counts=as_t(counts),
        )

    def _frames(self, rec: Recording, t0: np.ndarray) -> np.ndarray:
        """(n, F, H, W): the F frames on screen up to the end of each current window."""
        spec, stim = self.spec, rec.stimulus
        last = stim.index_at(t0 + spec.tokenizer.window - 1e-9)
        index = last[:, None] + np.arange(1 - spec.n_frames, 1)  # (n, F); < 0: before the first frame
        shown = index >= 0
        out = np.zeros((len(t0), spec.n_frames, *spec.frame_shape), np.float32)
        out[shown] = (stim.take(index[shown]) - spec.frame_mean) / spec.frame_std
        return out

    def _behavior(self, rec: Recording, t0: np.ndarray) -> np.ndarray:
        """(n, S, V): behaviour at S evenly spaced times over past + current window."""
        spec, tok = self.spec, self.spec.tokenizer
        span = tok.past_window + tok.window
        offsets = (np.arange(spec.behavior_steps) + 0.5) * span / spec.behavior_steps - tok.past_window
        times = (t0[:, None] + offsets[None, :]).ravel()
        values = np.concatenate([rec.behavior[name].at(times) for name in spec.behavior], axis=-1)
        values = (values - np.asarray(spec.behavior_mean)) / np.asarray(spec.behavior_std)
        return values.reshape(len(t0), spec.behavior_steps, -1).astype(np.float32)

    def target_counts(self) -> np.ndarray:
        """(vocab.size,) how often each ID token is a next-token target (units and EOS)."""
        tok = self.spec.tokenizer
        counts = np.zeros(self.spec.vocab.size, dtype=np.int64)
        for s, (times, units) in enumerate(self._spikes):
            enc = tok.encode(times, units, self.t0[self.session == s], tok.window, tok.max_tokens - 1)
            counts += np.bincount(enc.ids.ravel(), minlength=len(counts))
            counts[EOS] += int((enc.dropped == 0).sum())  # a cut window has no EOS target
        counts[PAD] = 0
        return counts


def already_batched(batch: Batch) -> Batch:
    """DataLoader ``collate_fn`` for datasets whose ``__getitems__`` returns a Batch."""
    return batch


def batches(dataset: WindowDataset, batch_size: int, device: torch.device | str | None = None) -> Iterator[Batch]:
    """The dataset's windows in order, ``batch_size`` at a time, on ``device``."""
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=already_batched):
        yield batch.to(device) if device is not None else batch
