"""Sharded (DeepSpeed) checkpoints: recognise them and consolidate them into one fp32 checkpoint.

Lightning writes a DeepSpeed checkpoint as a folder (the ``.ckpt`` name is kept)::

    best-epoch003-step120.ckpt/
        latest                      # the tag of the shards: "checkpoint"
        checkpoint/
            mp_rank_00_model_states.pt                # ZeRO-1/2: the module + Lightning's client state
            zero_pp_rank_{r}_mp_rank_00_model_states.pt   # ZeRO-3: rank r's module shard (+ client state)
            *_optim_states.pt                         # rank r's shard of the fp32 master weights + Adam moments

Resuming passes the folder back as ``ckpt_path`` (same world size). For evaluation, the
registry or a single-device run, ``consolidated_checkpoint`` reassembles the fp32 master
weights of all ranks into one ordinary Lightning checkpoint dict.

Shards are read under ``weights_only_loading``: tensors, plain containers and a few named
DeepSpeed bookkeeping classes only, so loading a checkpoint never runs code from the file,
although DeepSpeed's own reader asks for full unpickling.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from neuroformer import cli
from neuroformer.errors import ModelMismatchError
from neuroformer.files import atomic_path

# Keys DeepSpeed adds to the client state; the rest is Lightning's checkpoint dict.
_DEEPSPEED_KEYS = frozenset({
    "module", "optimizer", "lr_scheduler", "buffer_names", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "data_sampler", "random_ltd", "skipped_steps", "global_steps", "global_samples",
    "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version",
    "csr_tensor_module_names", "sparse_tensor_module_names",
})


@contextmanager
def weights_only_loading() -> Iterator[None]:
    """Inside, every ``torch.load`` runs with ``weights_only=True``, DeepSpeed's included.

    DeepSpeed calls ``torch.load(..., weights_only=False)``; torch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that, and the classes DeepSpeed pickles into
    its shards (ZeRO stage enum, loss scaler, ZeRO-2 fragment addresses) are allowed by name.
    A DeepSpeed version that pickles another class fails here with torch's error naming it.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a DeepSpeed checkpoint folder (as Lightning writes it)."""
    path = Path(path)
    return path.is_dir() and (path / "latest").is_file()


def _tag_dir(path: Path) -> Path:
    tag_dir = path / (path / "latest").read_text().strip()
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{path}: 'latest' names the shard folder {tag_dir.name!r}, which does not exist")
    return tag_dir


def consolidated_checkpoint(path: str | Path) -> dict[str, Any]:
    """One Lightning checkpoint dict from a sharded checkpoint folder: all ranks' fp32 weights.

    Returns:
        Lightning's checkpoint dict (``epoch``, ``global_step``, ``hyper_parameters``,
        ``neuroformer``, ...) with ``state_dict`` the full fp32 weights of the LightningModule
        (keys ``model.…``), as a single-device run would have saved it, minus optimizer state.
    """
    # Imported here: DeepSpeed is an optional dependency, needed only for sharded checkpoints.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path}: not a DeepSpeed checkpoint folder (expected a folder with a 'latest' file)")
    checkpoint = _client_state(path)
    with weights_only_loading():
        checkpoint["state_dict"] = dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=_tag_dir(path).name))
    return checkpoint


def _client_state(path: Path) -> dict[str, Any]:
    """Lightning's checkpoint dict (without weights) of a sharded folder, from rank 0's module file."""
    tag_dir = _tag_dir(path)
    # Rank 0's module file carries Lightning's client state: ZeRO-1/2 and ZeRO-3 name it differently.
    candidates = [tag_dir / "mp_rank_00_model_states.pt", tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    model_file = next((f for f in candidates if f.is_file()), None)
    if model_file is None:
        raise FileNotFoundError(f"{tag_dir}: no rank-0 model state file ({', '.join(f.name for f in candidates)})")
    with weights_only_loading():
        client_state = torch.load(model_file, map_location="cpu", weights_only=True)
    return {k: v for k, v in client_state.items() if k not in _DEEPSPEED_KEYS}


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A training checkpoint's dict without reassembling its weights (a file, or a sharded folder)."""
    if is_sharded_checkpoint(path):
        return _client_state(Path(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint as one dict with full fp32 weights: a single file, or a sharded folder."""
    if is_sharded_checkpoint(path):
        return consolidated_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def write_consolidated(path: str | Path, output: str | Path) -> Path:
    """Write the consolidated fp32 checkpoint of a sharded folder to ``output`` (atomically).

    The file loads with ``torch.load`` and ``neuroformer.registry.load``, without DeepSpeed.
    """
    with atomic_path(output) as tmp:
        torch.save(consolidated_checkpoint(path), tmp)
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    """``python -m neuroformer.distributed.checkpoints --checkpoint SHARDED_DIR --output OUTPUT.ckpt``."""
    parser = cli.parser("python -m neuroformer.distributed.checkpoints",
                        "Consolidate a sharded DeepSpeed checkpoint into one fp32 checkpoint file.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="DeepSpeed checkpoint folder written by training")
    parser.add_argument("--output", type=Path, required=True, help="single-file checkpoint to write")

    def run(args: argparse.Namespace) -> int:
        if not is_sharded_checkpoint(args.checkpoint):
            raise ModelMismatchError(f"{args.checkpoint}: not a sharded DeepSpeed checkpoint (a folder with a "
                                     "'latest' file, as train() writes under the deepspeed_* presets)")
        print(write_consolidated(args.checkpoint, args.output))
        return 0

    return cli.run(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
