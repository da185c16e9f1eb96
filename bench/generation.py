"""Generation speed: the KV-cache sampler against a full forward pass per token, in one run.

Both run the same sampling loop (``neuroformer.inference.generate.sample_windows``) on the same
test windows of the default recording with the same seed; the bench checks that they draw
identical tokens and prints generated tokens/s (spikes + EOS) of each and their ratio, and the
mean generated spikes per window next to the true count of those windows.

By default the model is the default config (conf/model/neuroformer.yaml) with random weights,
whose windows are short and meaningless; pass a trained model with ``--model`` (it is run on
its own test block of the recording the data config names) to time windows of realistic length.

Usage: python bench/generation.py [--model CKPT|models:/NAME@ALIAS] [--batch-sizes 1 8 32] [--threads N]
       [hydra overrides]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from neuroformer.data.dataset import WindowDataset
from neuroformer.data.splits import window_starts
from neuroformer.data.tokenizer import N_SPECIAL
from neuroformer.inference.generate import SamplingConfig, sample_windows
from neuroformer.registry import load

CONF = Path(__file__).resolve().parents[1] / "conf"


def timed_generation(model, batch, n_bins: int, use_cache: bool, repeats: int):
    """Median seconds over ``repeats`` runs with the same seed, and the last run's samples."""
    times = []
    for _ in range(repeats):
        generator = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        out = sample_windows(model, batch, n_bins, SamplingConfig(), generator, use_cache=use_cache)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="trained model (checkpoint or registry URI); default: random weights")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args, overrides = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
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
    n_bins = spec.tokenizer.n_bins
    c = model.config
    print(f"model: {args.model or 'default config, random weights'}: n_embd {c.n_embd}, n_layer {c.n_layer}, "
          f"block {c.block_size}, context {c.past_block_size} past + {c.n_patches} patches + {c.behavior_steps} "
          f"behaviour tokens; {torch.get_num_threads()} threads\n")
    header = (f"{'batch':>5} {'tokens':>7} {'steps':>5} {'cache tok/s':>12} {'full tok/s':>11} {'speed-up':>9} "
              f"{'same':>5} {'spikes/window (true)':>21}")
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for bs in args.batch_sizes:
            batch = test.__getitems__(list(range(bs)))
            sample_windows(model, batch.inputs, n_bins, use_cache=True)  # warm-up
            cached_s, cached = timed_generation(model, batch.inputs, n_bins, True, args.repeats)
            full_s, full = timed_generation(model, batch.inputs, n_bins, False, args.repeats)
            same = torch.equal(cached.ids, full.ids) and torch.equal(cached.dts, full.dts)
            tokens = int((cached.counts + cached.ended).sum())
            true = float((batch.target_ids >= N_SPECIAL).sum(1).float().mean())
            spikes = f"{float(cached.counts.float().mean()):.1f} ({true:.1f})"
            print(f"{bs:>5} {tokens:>7} {cached.steps:>5} {tokens / cached_s:>12.0f} {tokens / full_s:>11.0f} "
                  f"{full_s / cached_s:>8.1f}x {'yes' if same else 'NO':>5} {spikes:>21}")
            if not same:
                raise SystemExit("cached and full-forward sampling drew different tokens")


if __name__ == "__main__":
    main()
