"""Training beyond one process.

- ``strategies``: DeepSpeed ZeRO strategies behind the ``conf/trainer/deepspeed_*`` presets
  (GPUs, and CPU processes over gloo where no GPU is present).
- ``checkpoints``: sharded (DeepSpeed) checkpoints: recognise, consolidate into one fp32
  state dict, rebuild the model from them.
- ``slurm``, ``preemption``: SLURM jobs, requeue on preemption, resume.
"""
