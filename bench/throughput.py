"""Throughput of the default pretraining setup, measured in one run on this machine.

Prints a table:
- windows/s of the data pipeline (NWB file -> token batches, one DataLoader worker) next to
  the windows/s the model consumes in training, and their ratio (> 1: data never limits);
- training tokens/s (current-window target tokens; with past/stimulus/behaviour context too);
- the training step's achieved FLOP/s (counted by torch's FlopCounterMode on a real step)
  as a fraction of this machine's measured fp32 matrix-multiply peak (torch.matmul).

Usage: python bench/throughput.py [hydra overrides, e.g. model.n_layer=2]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from neuroformer.data.tokenizer import PAD
from peak import matmul_peak  # bench/peak.py, next to this script

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(overrides: list[str]) -> None:
    torch.manual_seed(0)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=outputs/bench", "paths.root_dir=.", *overrides])
    dm = instantiate(cfg.data, num_workers=1)
    dm.setup()
    model = instantiate(cfg.model)(spec=dm.spec).train()
    task = instantiate(cfg.task)(model=model, spec=dm.spec)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.task.weight_decay), lr=cfg.task.lr)
    loss_weights = task.loss_weights

    # Data pipeline: NWB -> Batch, one worker process, timed after the worker has started.
    loader = dm.train_dataloader()
    it = iter(loader)
    batches = [next(it)]
    n_data = 40
    t = time.perf_counter()
    batches += [next(it) for _ in range(n_data)]
    data_s = time.perf_counter() - t
    windows = sum(len(b.ids) for b in batches[1:])
    data_rate = windows / data_s

    def step(batch) -> None:
        out = model(batch.inputs, contrastive=loss_weights.get("contrastive", 0) > 0)
        losses = model.losses(out, batch.target_ids, batch.target_dts)
        loss = sum(loss_weights.get(k, 0.0) * v for k, v in losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for b in batches[:3]:  # warm-up
        step(b)
    with FlopCounterMode(display=False) as counter:
        step(batches[3])
    flops_per_step = counter.get_total_flops()
    timed = batches[4:]
    t = time.perf_counter()
    for b in timed:
        step(b)
    train_s = time.perf_counter() - t
    train_windows = sum(len(b.ids) for b in timed)
    targets = sum(int((b.target_ids != PAD).sum()) for b in timed)
    context = sum(int((b.past_ids != PAD).sum()) for b in timed)
    train_rate = train_windows / train_s
    achieved = flops_per_step * len(timed) / train_s
    peak = matmul_peak()

    rows = [
        ("data pipeline (1 worker)", f"{data_rate:,.0f} windows/s", ""),
        ("training consumes", f"{train_rate:,.0f} windows/s", ""),
        ("data / training", f"{data_rate / train_rate:.1f}x", "> 1: data never limits training"),
        ("training tokens/s (targets)", f"{targets / train_s:,.0f}", "current-window tokens incl. EOS"),
        ("training tokens/s (+ past)", f"{(targets + context) / train_s:,.0f}", "plus past-window context tokens"),
        ("FLOPs per step", f"{flops_per_step / 1e9:.2f} GFLOP", f"batch {cfg.data.batch_size}, fwd+bwd"),
        ("achieved", f"{achieved / 1e9:.1f} GFLOP/s", ""),
        ("fp32 matmul peak (measured)", f"{peak / 1e9:.1f} GFLOP/s", "torch.matmul 2048^3"),
        ("achieved / peak", f"{achieved / peak:.1%}", ""),
    ]
    print(f"\nThroughput, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>18}  {note}")


if __name__ == "__main__":
    main(sys.argv[1:])
