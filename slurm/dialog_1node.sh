#!/bin/bash
# The dialog recipe (configs/dialog_lstm.yaml) on one node, one rank per GPU, ZeRO-2. From the repository root:
#
#   sbatch slurm/dialog_1node.sh
#   AMI_DEVICE=cpu sbatch --ntasks-per-node=2 --cpus-per-task=1 slurm/dialog_1node.sh   # CPU ranks, gloo
#
# GPUs: --gpus-per-node below (change --ntasks-per-node with it: one rank per GPU).
# Preemption (USR1 300 s before the time limit), requeue and rank failure behave as in nmt_4node.sh;
# see slurm/README.md.
#
# Environment (set it for sbatch; defaults in brackets):
#   AMI_CONFIG           run config                                   [configs/dialog_lstm.yaml]
#   AMI_DS_CONFIG        DeepSpeed preset   [gpu: configs/ds_zero2_gpu_bf16.json; cpu: configs/ds_zero2.json]
#   AMI_OVERRIDES        extra config overrides, e.g. "train.mle_steps=1000"                         []
#   AMI_DEVICE           gpu or cpu                                   [gpu]
#   AMI_REPO, AMI_PYTHON, AMI_RUN_DIR, AMI_LOG_DIR, AMI_FAILURE_TIMEOUT, AMI_NET_IFNAME, MASTER_PORT,
#   MLFLOW_TRACKING_URI, NCCL_*: see slurm/common.sh
# Logs: this script's output in slurm/logs/<job name>-<job id>.out (every attempt appended), each rank's in
# slurm/logs/<job name>-<job id>/attempt<N>/rank<R>.log. Checkpoints: runs/<job name>-<job id>/checkpoints/.
#
#SBATCH --job-name=ami-dialog
#SBATCH --nodes=1
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
ami_train "${AMI_CONFIG:-configs/dialog_lstm.yaml}"
