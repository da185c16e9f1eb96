"""Training beyond one process.

- ``strategies``: DeepSpeed ZeRO strategies behind the ``conf/trainer/deepspeed_*`` presets
  (GPUs, and CPU processes over gloo where no GPU is present).
- ``checkpoints``: sharded (DeepSpeed) checkpoints: recognise them, consolidate them into one
  fp32 state dict (``neuroformer.registry.load`` reads them through this).
- ``plugins``: atomic checkpoint writing, and SLURM's cluster environment inside a job.
- ``slurm``: SLURM job identity and requeueing (``neuroformer.callbacks.preemption`` uses it).
"""
