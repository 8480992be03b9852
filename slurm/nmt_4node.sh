#!/bin/bash
# The NMT recipe (configs/nmt_lstm.yaml) on 4 nodes, one rank per GPU, ZeRO-2 sharding the optimizer
# state and gradients of every engine across all ranks. From the repository root:
#
#   sbatch slurm/nmt_4node.sh
#   AMI_DEVICE=cpu sbatch --ntasks-per-node=1 slurm/nmt_4node.sh      # CPU ranks over gloo (no GPUs)
#
# GPUs per node: --gpus-per-node below (change --ntasks-per-node with it: one rank per GPU).
# Preemption: Slurm sends USR1 300 s before the time limit (--signal); every rank saves a checkpoint
# after its current step and exits with 75, and this job requeues itself; the requeued job (same job id,
# same run directory) resumes from that checkpoint into the same MLflow run.
# A rank that dies makes every other rank exit non-zero within AMI_FAILURE_TIMEOUT + 30 s, and the
# MLflow run is marked FAILED. See slurm/README.md.
#
# Environment (set it for sbatch; defaults in brackets):
#   AMI_CONFIG           run config                                   [configs/nmt_lstm.yaml]
#   AMI_DS_CONFIG        DeepSpeed preset   [gpu: configs/ds_zero2_gpu_bf16.json; cpu: configs/ds_zero2.json]
#   AMI_OVERRIDES        extra config overrides, e.g. "train.mle_steps=1000 ami.cycles=2"           []
#   AMI_DEVICE           gpu or cpu                                   [gpu]
#   AMI_REPO, AMI_PYTHON, AMI_RUN_DIR, AMI_LOG_DIR, AMI_FAILURE_TIMEOUT, AMI_NET_IFNAME, MASTER_PORT,
#   MLFLOW_TRACKING_URI, NCCL_*: see slurm/common.sh
# Logs: this script's output in slurm/logs/<job name>-<job id>.out (every attempt appended), each rank's in
# slurm/logs/<job name>-<job id>/attempt<N>/rank<R>.log. Checkpoints: runs/<job name>-<job id>/checkpoints/.
#
#SBATCH --job-name=ami-nmt
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail

AMI_REPO=${AMI_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $AMI_REPO/slurm/common.sh ]] || {
    echo "ami-slurm: error: $AMI_REPO/slurm/common.sh not found: submit from the repository root or set AMI_REPO" >&2
    exit 2
}
# shellcheck source=slurm/common.sh
source "$AMI_REPO/slurm/common.sh"
ami_setup
ami_train "${AMI_CONFIG:-configs/nmt_lstm.yaml}"
