"""Lightning strategies behind the sharded trainer presets (``conf/trainer/deepspeed_*.yaml``).

``deepspeed_strategy`` is the presets' ``_target_``: on a machine with CUDA it returns
``ZeroStrategy`` (Lightning's DeepSpeed strategy with atomic sharded checkpoints that
evaluation can load); on a machine without one it returns ``CPUZeroStrategy``, which runs
the same ZeRO code on CPU processes talking over gloo, so the presets can be trained and
tested on laptops and CI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn

from neuroformer.distributed.checkpoints import consolidated_checkpoint, is_sharded_checkpoint, weights_only_loading


def replace_directory(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``, replacing any old ``target``.

    Each step is a rename, so ``target`` is always either the complete old folder, the
    complete new one, or (between the two renames) absent with the old one kept at
    ``target.old``; it is never a half-written mix.
    """
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


class ZeroStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with safer checkpoints.

    - Saving is atomic: every rank writes its shards into ``PATH.tmp``; once all have
      finished, rank 0 renames it to ``PATH``. A job killed mid-save (preemption, time
      limit) leaves the previous checkpoint intact, not a folder of mixed old and new shards.
    - Loading never unpickles code (``weights_only_loading``), and evaluating
      (``trainer.test/validate/predict(ckpt_path=FOLDER)``) at ZeRO stage 3 loads the
      consolidated fp32 weights: DeepSpeed 0.19 cannot load a stage-3 checkpoint into an
      engine without an optimizer (it calls the missing optimizer's
      ``_restore_from_bit16_weights``).
    """

    def init_deepspeed(self) -> None:
        # DeepSpeed (0.19) broadcasts parameters as bytes with ``p.view(torch.uint8)``, which fails
        # for 0-dim tensors with an error that names none of them.
        scalars = [name for name, p in self.lightning_module.named_parameters() if p.dim() == 0]
        if scalars:
            raise ValueError(f"DeepSpeed cannot train 0-dim parameters {scalars}: give them shape (1,)")
        super().init_deepspeed()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any = None) -> None:
        target = Path(self.broadcast(str(filepath)))
        tmp = target.with_name(target.name + ".tmp")
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier("deepspeed_save_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("deepspeed_save_written")
        if self.is_global_zero:
            replace_directory(tmp, target)
        self.barrier("deepspeed_save_done")

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if fitting or not self.zero_stage_3 or self.load_full_weights or not is_sharded_checkpoint(checkpoint_path):
            with weights_only_loading():
                return super().load_checkpoint(checkpoint_path, weights_only)
        checkpoint = consolidated_checkpoint(checkpoint_path)
        # Gathers each module's shards, loads rank 0's copy of the full weights, re-partitions.
        self._restore_zero_state(checkpoint, strict=self.lightning_module.strict_loading)
        return checkpoint


class CPUZeroStrategy(ZeroStrategy):
    """DeepSpeed ZeRO on CPU processes (gloo backend), for machines without a GPU.

    Lightning's strategy refuses any accelerator but CUDA; DeepSpeed itself runs on CPU
    (``DS_ACCELERATOR=cpu``). Only two things differ from the GPU path: the CUDA check is
    skipped, and the CPU "devices" get indices ``cpu:0 .. cpu:N-1`` because DeepSpeed
    checks that device index == local rank.
    """

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices or []))]
        super().setup_distributed()


def deepspeed_strategy(
    stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    **kwargs: Any,
) -> ZeroStrategy:
    """A DeepSpeed ZeRO strategy: ``ZeroStrategy`` on CUDA machines, ``CPUZeroStrategy`` elsewhere.

    Args:
        stage: ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.
        offload_optimizer: keep optimizer state (fp32 master weights, Adam moments) in CPU
            memory and step it on the CPU, with the task's ``torch.optim.AdamW`` (DeepSpeed
            insists on its compiled CPU Adam by default; see docs/deepspeed.md).
        offload_parameters: (stage 3) keep the parameter shards in CPU memory too.
        kwargs: any other ``lightning.pytorch.strategies.DeepSpeedStrategy`` argument.
    """
    if torch.cuda.is_available():
        cls: type[ZeroStrategy] = ZeroStrategy
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the ranks Lightning launches
        cls = CPUZeroStrategy
    strategy = cls(stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters, **kwargs)
    if offload_optimizer:
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    return strategy
