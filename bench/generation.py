"""Generation speed: the KV-cache sampler against a full forward pass per token, in one run.

Both run the same sampling loop (``neuroformer.inference.generate.sample_windows``) on the same
windows with the same seed; the bench checks that they draw identical tokens and prints
generated tokens/s (spikes + EOS) of each and their ratio.

Two kinds of input:

- default: test windows of the default recording with the default config (conf/model/neuroformer.yaml)
  and random weights, or a trained model with ``--model`` (run on its own test block of the
  recording the data config names); the last column compares generated with true spikes per window.
- ``--reference-shapes full|small``: the reference implementation's shapes (``bench/reference.py``)
  with random weights and random-but-valid contexts, in the ``--design`` given (default
  ``latents+past/2``, the default model's; ``tokens`` is the reference's layout). Windows are
  forced to ``--length`` tokens (default 40); batches above 8 are timed once, without warm-up, and
  the full forward pass once per batch size. The ratio column is tokens/s over the reference's
  batch-1 tokens/s (full 16.6, small 83.5, measured on a machine whose fp32 matmul peak was
  198 GFLOP/s), scaled by this machine's measured peak.

``--memory`` (reference shapes) also measures each batch size's peak memory: a fresh process
builds the model and contexts, resets its resident-set high-water mark, samples once, and
reports the mark (``VmHWM``: peak RSS, model included) and its rise over the RSS before sampling
(what the batch's generation itself added: context encoding, caches, activations, workspace).

``--compile`` adds ``sample_windows(compile=True)`` (inductor programs for ``start_decoding``
and ``decode_tokens``): the first call's seconds, which include compiling for that batch size
(inductor's on-disk cache makes later processes faster), then its tokens/s; the bench stops if
its samples differ from the eager ones.

Usage: python bench/generation.py [--model CKPT|models:/NAME@ALIAS] [--reference-shapes full|small]
       [--design tokens|latents|latents+past]
       [--length N] [--batch-sizes 1 8 32 256] [--full-max-batch 8] [--memory] [--threads N] [--compile]
       [hydra overrides]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path

import torch

from neuroformer.data.tokenizer import N_SPECIAL
from neuroformer.inference.generate import SamplingConfig, sample_windows
from peak import matmul_peak  # bench/peak.py, next to this script
from reference import DESIGNS, N_BINS, REFERENCE_GENERATION, REFERENCE_PEAK, build, windows  # bench/reference.py

CONF = Path(__file__).resolve().parents[1] / "conf"


def timed_generation(model, inputs, n_bins: int, use_cache: bool, repeats: int, length: int | None,
                     compile: bool = False):
    """Median seconds over ``repeats`` runs with the same seed, and the last run's samples."""
    times = []
    for _ in range(repeats):
        generator = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        out = sample_windows(model, inputs, n_bins, SamplingConfig(), generator, use_cache=use_cache, length=length,
                             compile=compile)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _memory_child(size: str, design: str, batch: int, length: int, threads: int | None, queue) -> None:
    if threads:
        torch.set_num_threads(threads)
    model = build(size, design).eval()
    inputs = windows(batch, current_real=0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = _status_mib("VmRSS")
    sample_windows(model, inputs, N_BINS, SamplingConfig(), torch.Generator().manual_seed(0), length=length)
    peak = _status_mib("VmHWM")
    queue.put((peak, peak - before))


def peak_memory(size: str, design: str, batch: int, length: int, threads: int | None) -> tuple[float, float]:
    """(peak RSS, its rise during sampling) in MiB, from a fresh process generating one batch."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(size, design, batch, length, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def data_windows(args, overrides: list[str]):
    """(model, n_bins, batch -> (inputs, true spikes per window)) on the configured recording's test block."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from neuroformer.data.dataset import WindowDataset
    from neuroformer.data.splits import window_starts
    from neuroformer.registry import load

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=outputs/bench", "paths.root_dir=.", *overrides])
    dm = instantiate(cfg.data)
    dm.setup()
    if args.model:  # the model's own tokenizer and test block, on the configured recording
        loaded = load(args.model)
        model, spec = loaded.model, loaded.spec
        rec, tok = dm.recordings[0], spec.tokenizer
        starts = window_starts(rec.start, rec.stop, loaded.spec.split, "test", tok.window, tok.past_window,
                               tok.window)
        test = WindowDataset([rec], spec, [starts])
    else:
        model, spec, test = instantiate(cfg.model)(spec=dm.spec).eval(), dm.spec, dm.datasets["test"]

    def test_windows(bs: int):
        batch = test.__getitems__(list(range(bs)))
        return batch.inputs, float((batch.target_ids >= N_SPECIAL).sum(1).float().mean())

    return model, spec.tokenizer.n_bins, test_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="trained model (checkpoint or registry URI); default: random weights")
    parser.add_argument("--reference-shapes", choices=sorted(DESIGNS),
                        help="the reference implementation's model and context shapes, random weights")
    parser.add_argument("--design", default="latents+past/2", choices=list(DESIGNS["full"]),
                        help="model design at the reference shapes (bench/reference.py)")
    parser.add_argument("--length", type=int, help="force every window to this many tokens (reference shapes: 40)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 8 32 (reference shapes: 1 8 32 256)")
    parser.add_argument("--full-max-batch", type=int, default=None,
                        help="time the full-forward path only up to this batch (reference shapes: 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="peak RSS per batch size, one fresh process each")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="also time sample_windows(compile=True): the first call's seconds (compiling) and tokens/s")
    args, overrides = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = args.reference_shapes
    length = args.length or (40 if ref else None)
    batch_sizes = args.batch_sizes or ([1, 8, 32, 256] if ref else [1, 8, 32])
    full_max = args.full_max_batch if args.full_max_batch is not None else (8 if ref else max(batch_sizes))

    if ref:
        model, n_bins = build(ref, args.design).eval(), N_BINS
        contexts = lambda bs: (windows(bs, current_real=0), None)  # noqa: E731
        peak = matmul_peak()
        target = REFERENCE_GENERATION[ref] * peak / REFERENCE_PEAK
        source = (f"reference shapes '{ref}', design '{args.design}', random weights; fp32 matmul peak "
                  f"{peak / 1e9:.0f} GFLOP/s: the reference's {REFERENCE_GENERATION[ref]} tokens/s scales to "
                  f"{target:.1f}")
    else:
        model, n_bins, contexts = data_windows(args, overrides)
        source = args.model or "default config, random weights"
    c = model.config
    print(f"model: {source}\n  n_embd {c.n_embd}, n_layer {c.n_layer}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, block {c.block_size}, context "
          f"{c.past_block_size} past + {c.n_patches} patches + {c.behavior_steps} behaviour tokens; "
          f"{'length ' + str(length) if length else 'sampled lengths'}; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    cols = [f"{'batch':>5}", f"{'tokens':>7}", f"{'steps':>5}", f"{'cache tok/s':>12}", f"{'full tok/s':>11}",
            f"{'speed-up':>9}", f"{'same':>5}"]
    cols += [f"{'vs ref':>7}"] if ref else [f"{'spikes/window (true)':>21}"]
    cols += [f"{'compile s':>9}", f"{'compiled tok/s':>14}"] + ([f"{'vs ref':>7}"] if ref else []) if args.compile else []
    cols += [f"{'peak RSS MiB':>12}", f"{'rise MiB':>9}"] if args.memory else []
    header = " ".join(cols)
    print(header)
    print("-" * len(header))
    for bs in batch_sizes:
        inputs, true = contexts(bs)
        big = ref and bs > 8  # seconds to minutes per run: one run, no warm-up
        if not big:
            sample_windows(model, inputs, n_bins, length=length)  # warm-up
        cached_s, cached = timed_generation(model, inputs, n_bins, True, 1 if big else args.repeats, length)
        tokens = int((cached.counts + cached.ended).sum())
        row = [f"{bs:>5}", f"{tokens:>7}", f"{cached.steps:>5}", f"{tokens / cached_s:>12.0f}"]
        if bs <= full_max:
            full_s, full = timed_generation(model, inputs, n_bins, False, 1 if ref else args.repeats, length)
            same = torch.equal(cached.ids, full.ids) and torch.equal(cached.dts, full.dts)
            row += [f"{tokens / full_s:>11.1f}", f"{full_s / cached_s:>8.1f}x", f"{'yes' if same else 'NO':>5}"]
        else:
            same = True
            row += [f"{'-':>11}", f"{'-':>9}", f"{'-':>5}"]
        if ref:
            row.append(f"{tokens / cached_s / target:>6.1f}x")
        else:
            row.append(f"{f'{float(cached.counts.float().mean()):.1f} ({true:.1f})':>21}")
        if args.compile:
            t = time.perf_counter()
            sample_windows(model, inputs, n_bins, length=length, compile=True)  # compiles for this batch size
            first_s = time.perf_counter() - t
            compiled_s, compiled = timed_generation(model, inputs, n_bins, True, 1 if big else args.repeats, length,
                                                    compile=True)
            same = same and torch.equal(cached.ids, compiled.ids) and torch.equal(cached.dts, compiled.dts)
            row += [f"{first_s:>9.1f}", f"{tokens / compiled_s:>14.0f}"]
            row += [f"{tokens / compiled_s / target:>6.1f}x"] if ref else []
        if args.memory:
            rss, rise = peak_memory(ref, args.design, bs, length, args.threads) if ref else (float("nan"), float("nan"))
            row += [f"{rss:>12.0f}", f"{rise:>9.0f}"]
        print(" ".join(row), flush=True)
        if not same:
            raise SystemExit("cached, full-forward and compiled sampling drew different tokens")


if __name__ == "__main__":
    main()
