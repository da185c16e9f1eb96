#!/bin/bash
# Body of the sbatch templates: start one train.py process per task of the allocation.
# Every process gets its rank from SLURM (Lightning's SLURMEnvironment); they meet at
# MASTER_ADDR:MASTER_PORT on the first node. Arguments are train.py overrides.
#
# Environment (set before sbatch; sbatch passes it on):
#   TRAINER   trainer preset: ddp (default), deepspeed_zero2, deepspeed_zero3,
#             deepspeed_zero3_offload, gpu, cpu
#   PYTHON    interpreter with neuroformer installed (default: .venv/bin/python if present, else python)
#   MLFLOW_TRACKING_URI  the team's MLflow server (default: a SQLite file under outputs/)
set -euo pipefail
cd "${NEUROFORMER_DIR:-$SLURM_SUBMIT_DIR}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"      # one port per job: jobs sharing a node do not collide
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1

echo "$(date -Is) job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_JOB_NUM_NODES} node(s) x" \
     "${SLURM_NTASKS_PER_NODE} task(s), master ${MASTER_ADDR}:${MASTER_PORT}"
# The run folder is named after SLURM_JOB_ID (conf/hydra/default.yaml): a requeued job
# resumes from its checkpoints/last.ckpt and continues its MLflow run.
srun --kill-on-bad-exit=1 "$PYTHON" train.py \
    trainer="${TRAINER:-ddp}" \
    trainer.devices="${SLURM_NTASKS_PER_NODE:?submit with --ntasks-per-node=<GPUs per node>}" \
    trainer.num_nodes="${SLURM_JOB_NUM_NODES}" \
    "$@"
