"""Neuroformer tokenisation: spikes in a time window become (unit-ID, dt) token pairs.

Within a window ``[t0, t0 + length)`` each spike becomes one ID token (its unit) and one
dt token (its offset from ``t0`` quantised to ``resolution`` seconds: bin ``floor((t-t0)/res)``).
Tokens are in time order, also within a bin (spikes at the same time keep their input order),
so a cause is never placed after its effect, and the inverse is exact at the resolution:
``decode(encode(spikes))`` returns every spike at the left edge of its bin, in token order,
and re-encoding that gives the same tokens.

When a window holds more spikes than its sequence, the current window keeps its earliest
spikes (the model generates forwards from ``t0``) and the past window its latest (those closest
to the window being predicted); a cut current window gets no EOS target (``current_sequences``).

Both vocabularies reserve the first ``N_SPECIAL`` indices for PAD, SOS and EOS; units and
dt bins follow. Reserving them first lets a unit vocabulary grow (new sessions) without
moving any existing token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from neuroformer.errors import TokenizerError

PAD, SOS, EOS = 0, 1, 2
N_SPECIAL = 3


@dataclass(frozen=True)
class EncodedWindows:
    """Spike tokens of a batch of windows, padded to a fixed length.

    Attributes:
        ids: (B, L) int64 ID tokens (unit index + N_SPECIAL), PAD after the last spike.
        dts: (B, L) int64 dt tokens (bin + N_SPECIAL), PAD likewise.
        counts: (B,) int64 number of real tokens kept in each window.
        dropped: (B,) int64 spikes that did not fit in ``L`` (the latest, or with ``keep_latest``
            the earliest, are dropped).
    """

    ids: np.ndarray
    dts: np.ndarray
    counts: np.ndarray
    dropped: np.ndarray


@dataclass(frozen=True)
class SpikeTokenizer:
    """Turns spike streams into current-window and past-window tokens and back.

    Attributes:
        window: length of the current window (the one the model generates), seconds.
        past_window: length of the past window just before it (context), seconds.
        resolution: dt quantisation, seconds.
        max_tokens: length of the current-window sequence, SOS/EOS included.
        max_past_tokens: length of the past-window sequence, its leading SOS included.
    """

    window: float = 0.05
    past_window: float = 0.15
    resolution: float = 0.005
    max_tokens: int = 64
    max_past_tokens: int = 160

    def __post_init__(self) -> None:
        if min(self.window, self.past_window, self.resolution) <= 0:
            raise TokenizerError("window, past_window and resolution must be positive seconds")
        if self.max_tokens < 2 or self.max_past_tokens < 1:
            raise TokenizerError("max_tokens must be >= 2 (SOS + EOS) and max_past_tokens >= 1")

    @property
    def n_bins(self) -> int:
        """dt bins in the current window."""
        return math.ceil(round(self.window / self.resolution, 9))

    @property
    def n_past_bins(self) -> int:
        """dt bins in the past window."""
        return math.ceil(round(self.past_window / self.resolution, 9))

    @property
    def dt_vocab_size(self) -> int:
        """Size of the dt vocabulary shared by current and past tokens (specials first)."""
        return N_SPECIAL + max(self.n_bins, self.n_past_bins)

    def encode(
        self,
        spike_times: np.ndarray,
        spike_units: np.ndarray,
        starts: np.ndarray,
        length: float,
        max_len: int,
        keep_latest: bool = False,
    ) -> EncodedWindows:
        """Tokenise the spikes of many windows at once (no loop over windows or units).

        Args:
            spike_times: (n,) sorted spike times, seconds.
            spike_units: (n,) unit index of each spike (already offset into the vocabulary).
            starts: (B,) window start times ``t0``, seconds.
            length: window length, seconds.
            max_len: number of token slots per window.
            keep_latest: a window with more than ``max_len`` spikes keeps its latest ones (past
                windows), not its earliest (current windows).

        Returns:
            EncodedWindows with (B, max_len) ids/dts in time order.
        """
        starts = np.asarray(starts, dtype=np.float64)
        lo = np.searchsorted(spike_times, starts, side="left")
        hi = np.searchsorted(spike_times, starts + length, side="left")
        n_in = hi - lo
        # Flat index of every spike of every window: window b owns lo[b]..hi[b]-1.
        window_of = np.repeat(np.arange(len(starts)), n_in)
        first = np.repeat(np.cumsum(n_in) - n_in, n_in)
        spike_idx = np.repeat(lo, n_in) + (np.arange(n_in.sum()) - first)
        bins = np.floor((spike_times[spike_idx] - starts[window_of]) / self.resolution).astype(np.int64)
        bins = np.clip(bins, 0, math.ceil(round(length / self.resolution, 9)) - 1)
        units = spike_units[spike_idx].astype(np.int64)
        # Spikes arrive window by window in time order: that is the token order.
        slot = np.arange(len(spike_idx)) - first
        if keep_latest:
            slot -= np.repeat(np.maximum(n_in - max_len, 0), n_in)  # the earliest get negative slots
        keep = (slot >= 0) & (slot < max_len)
        ids = np.full((len(starts), max_len), PAD, dtype=np.int64)
        dts = np.full((len(starts), max_len), PAD, dtype=np.int64)
        ids[window_of[keep], slot[keep]] = units[keep] + N_SPECIAL
        dts[window_of[keep], slot[keep]] = bins[keep] + N_SPECIAL
        counts = np.minimum(n_in, max_len)
        return EncodedWindows(ids=ids, dts=dts, counts=counts, dropped=n_in - counts)

    def decode(self, ids: np.ndarray, dts: np.ndarray, start: float) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of ``encode`` for one window: spike times (left bin edges) and unit indices.

        Special tokens (PAD/SOS/EOS) in either sequence are skipped.

        Args:
            ids: (L,) ID tokens. dts: (L,) dt tokens. start: the window's ``t0``.

        Returns:
            times (n,) float64 and units (n,) int64, in token order.
        """
        ids, dts = np.asarray(ids), np.asarray(dts)
        real = (ids >= N_SPECIAL) & (dts >= N_SPECIAL)
        times = start + (dts[real] - N_SPECIAL) * self.resolution
        return times.astype(np.float64), (ids[real] - N_SPECIAL).astype(np.int64)

    def current_sequences(self, enc: EncodedWindows) -> dict[str, np.ndarray]:
        """Teacher-forcing sequences for the current window.

        Inputs are ``[SOS, s1..sn, PAD..]`` and targets ``[s1..sn, EOS, PAD..]``, so position
        k predicts token k+1. A window cut short (``enc.dropped > 0``) does not end after its
        last kept spike, so its EOS target is PAD (ignored by the loss): the model is never
        taught a false end of window. ``enc`` must have been encoded with ``max_len = max_tokens - 1``.

        Returns:
            dict with ids, dts, target_ids, target_dts, each (B, max_tokens) int64.
        """
        batch = len(enc.counts)
        sos = np.full((batch, 1), SOS, dtype=np.int64)
        pad = np.full((batch, 1), PAD, dtype=np.int64)
        ids = np.concatenate([sos, enc.ids], axis=1)
        dts = np.concatenate([sos, enc.dts], axis=1)
        target_ids = np.concatenate([enc.ids, pad], axis=1)
        target_dts = np.concatenate([enc.dts, pad], axis=1)
        rows = np.arange(batch)
        end = np.where(enc.dropped > 0, PAD, EOS)
        target_ids[rows, enc.counts] = end
        target_dts[rows, enc.counts] = end
        return {"ids": ids, "dts": dts, "target_ids": target_ids, "target_dts": target_dts}

    def past_sequences(self, enc: EncodedWindows) -> dict[str, np.ndarray]:
        """Past-window context ``[SOS, s1..sn, PAD..]``; the SOS keeps an empty past attendable.

        ``enc`` must have been encoded with ``max_len = max_past_tokens - 1`` and ``keep_latest``.

        Returns:
            dict with past_ids, past_dts, each (B, max_past_tokens) int64.
        """
        sos = np.full((len(enc.counts), 1), SOS, dtype=np.int64)
        return {
            "past_ids": np.concatenate([sos, enc.ids], axis=1),
            "past_dts": np.concatenate([sos, enc.dts], axis=1),
        }

    def to_dict(self) -> dict:
        return asdict(self)


def events_from_counts(counts: np.ndarray, bin_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binned spike counts to spike events, for data that arrives as counts.

    The rule: ``k`` spikes of a unit in bin ``[e_i, e_{i+1})`` become ``k`` events at ``e_i``
    (the bin's left edge), so tokenising at the bin width reproduces the counts exactly.
    Non-integer or negative values (calcium fluorescence, dF/F, deconvolved rates) are
    refused: spike tokens count events, and guessing events from fluorescence is a
    modelling choice the user must make (deconvolve, then threshold) before tokenising.

    Args:
        counts: (n_bins, n_units) spike counts.
        bin_edges: (n_bins + 1,) ascending bin edges, seconds.

    Returns:
        times (n,) sorted by time then unit, and units (n,).
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or len(bin_edges) != counts.shape[0] + 1:
        raise TokenizerError(
            f"counts must be (n_bins, n_units) with n_bins + 1 bin edges; got counts "
            f"{counts.shape} and {len(bin_edges)} edges"
        )
    finite = np.isfinite(counts)
    if not finite.all() or (counts < 0).any() or not np.array_equal(counts, np.round(counts)):
        raise TokenizerError(
            "counts must be non-negative integers (spike counts); got non-integer, negative or "
            "NaN values. Calcium or other continuous signals are not spike counts: deconvolve "
            "them into spike events first."
        )
    counts = counts.astype(np.int64)
    bin_idx, unit_idx = np.nonzero(counts)
    reps = counts[bin_idx, unit_idx]
    times = np.repeat(np.asarray(bin_edges, dtype=np.float64)[bin_idx], reps)
    units = np.repeat(unit_idx, reps)
    return times, units


def add_tokens(counts: np.ndarray, ids: np.ndarray, dts: np.ndarray, unit_of_token: np.ndarray) -> None:
    """Add (B, L) token sequences into ``counts`` (B, n_bins, U); special tokens are skipped.

    ``unit_of_token`` maps each ID token to a column of ``counts``.
    """
    rows, pos = np.nonzero((ids >= N_SPECIAL) & (dts >= N_SPECIAL))
    np.add.at(counts, (rows, dts[rows, pos] - N_SPECIAL, unit_of_token[ids[rows, pos]]), 1)


def bin_spikes(times: np.ndarray, units: np.ndarray, starts: np.ndarray, tokenizer: SpikeTokenizer,
               n_units: int) -> np.ndarray:
    """(B, n_bins, U) counts of the spikes in each window ``[t0, t0 + window)``, every spike kept.

    The bins are the tokenizer's dt bins (the same rule as its ``encode``), so these counts
    line up with generated ones; unlike model input, no spike is dropped for lack of room.

    Args:
        times: (n,) sorted spike times, seconds. units: (n,) unit (0..n_units-1) of each spike.
        starts: (B,) window starts, seconds.
    """
    starts = np.asarray(starts, dtype=np.float64)
    tok = tokenizer
    n_in = np.searchsorted(times, starts + tok.window) - np.searchsorted(times, starts)
    enc = tok.encode(times, units, starts, tok.window, max(1, int(n_in.max(initial=0))))
    counts = np.zeros((len(starts), tok.n_bins, n_units), dtype=np.int64)
    add_tokens(counts, enc.ids, enc.dts, np.arange(n_units + N_SPECIAL) - N_SPECIAL)
    return counts
