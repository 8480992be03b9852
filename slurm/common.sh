# shellcheck shell=bash
# What the batch scripts in slurm/ share; sourced by them, not submitted by itself.
#
#   ami_setup             environment of the ranks: repository, python, master address and port, device
#                         mode (NCCL on GPUs, gloo on CPUs), MLflow URI, run and log directories
#   ami_train CONFIG ...  one srun over all tasks of the job running ami_dist/train.py, then act on how it
#                         ended: 0 done; 75 preempted (requeue this job); anything else failed (mark the
#                         MLflow run FAILED if rank 0 could not, exit non-zero)
#
# Every variable below may be set in the environment of `sbatch` (which exports it to the job):
#   AMI_REPO             repository root, where the job runs                      [the directory sbatch ran in]
#   AMI_PYTHON           python with ami-dist installed                           [$AMI_REPO/.venv/bin/python]
#   AMI_DEVICE           gpu (NCCL, one rank per GPU) or cpu (gloo; for tests)    [gpu]
#   AMI_DS_CONFIG        DeepSpeed preset (ZeRO stage)       [gpu: configs/ds_zero2_gpu_bf16.json; cpu: configs/ds_zero2.json]
#   AMI_OVERRIDES        extra config overrides, space-separated key=value        []
#   AMI_RUN_DIR          the run directory; a requeued job finds its checkpoints there
#                                                                   [$AMI_REPO/runs/<job name>-<job id>]
#   AMI_LOG_DIR          per-rank logs go to $AMI_LOG_DIR/<job name>-<job id>/attempt<N>/rank<R>.log
#                                                                   [$AMI_REPO/slurm/logs]
#   AMI_FAILURE_TIMEOUT  seconds without a heartbeat before a rank counts as failed; every rank is gone
#                        within AMI_FAILURE_TIMEOUT + 30 s of a rank's death       [60]
#   AMI_NET_IFNAME       network interface for NCCL and gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME) [unset]
#   MASTER_PORT          rendezvous port on the first node               [a free port from 20000 + job id % 10000]
#   MLFLOW_TRACKING_URI  MLflow store, passed through to rank 0          [sqlite:///$AMI_REPO/mlflow.db]
#   NCCL_*, TORCH_NCCL_* passed through; defaults set here: NCCL_DEBUG=WARN, TORCH_NCCL_ASYNC_ERROR_HANDLING=1

ami_say() { printf '[ami-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
ami_die() { ami_say "error: $*" >&2; exit 2; }

ami_free_port() {  # first port from $1 up that nothing on this node listens on
    "$AMI_PYTHON" - "$1" <<'EOF'
import socket, sys
port = int(sys.argv[1])
for candidate in range(port, port + 200):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", candidate))
        except OSError:
            continue
    print(candidate)
    break
else:
    sys.exit(f"no free port in {port}..{port + 199}")
EOF
}

ami_setup() {
    [[ -n ${SLURM_JOB_ID:-} ]] || ami_die "not inside a Slurm job: submit with sbatch"
    # The preemption signal is for the ranks (--signal without B:); should it reach this shell too
    # (scancel --full, --signal=B:...), it must not end the script that requeues the job.
    trap '' USR1
    AMI_REPO=${AMI_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$AMI_REPO" || ami_die "AMI_REPO=$AMI_REPO: no such directory"
    AMI_PYTHON=${AMI_PYTHON:-$AMI_REPO/.venv/bin/python}
    [[ -x $AMI_PYTHON ]] || ami_die "AMI_PYTHON=$AMI_PYTHON is not executable (run 'make setup' in $AMI_REPO)"
    AMI_DEVICE=${AMI_DEVICE:-gpu}
    AMI_FAILURE_TIMEOUT=${AMI_FAILURE_TIMEOUT:-60}
    [[ $AMI_FAILURE_TIMEOUT =~ ^[0-9]+$ ]] || ami_die "AMI_FAILURE_TIMEOUT=$AMI_FAILURE_TIMEOUT: expected whole seconds"
    AMI_JOB=${SLURM_JOB_NAME:-ami}-$SLURM_JOB_ID
    AMI_ATTEMPT=${SLURM_RESTART_COUNT:-0}  # the job id stays the same across requeues; this counts them
    AMI_RUN_DIR=${AMI_RUN_DIR:-$AMI_REPO/runs/$AMI_JOB}
    AMI_RANK_LOGS=${AMI_LOG_DIR:-$AMI_REPO/slurm/logs}/$AMI_JOB/attempt$AMI_ATTEMPT
    mkdir -p "$AMI_RANK_LOGS"

    # Rank, world size and local rank come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID in each task
    # (ami_dist/distributed/env.py); the rendezvous is on the first node of the allocation, which is
    # where this batch script runs, so a port free here is free where rank 0 listens.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    if [[ -z ${MASTER_PORT:-} ]]; then
        MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
        if [[ ${SLURMD_NODENAME:-$(hostname -s)} == "$MASTER_ADDR" ]]; then
            MASTER_PORT=$(ami_free_port "$MASTER_PORT") || ami_die "no free rendezvous port on $MASTER_ADDR"
        fi
    fi
    export MASTER_ADDR MASTER_PORT
    export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$AMI_REPO/mlflow.db}
    export PYTHONUNBUFFERED=1  # rank logs show progress as it happens, and everything before a crash
    if [[ -n ${AMI_NET_IFNAME:-} ]]; then
        export NCCL_SOCKET_IFNAME=$AMI_NET_IFNAME GLOO_SOCKET_IFNAME=$AMI_NET_IFNAME
    fi

    AMI_DEVICE_OVERRIDES=()
    case $AMI_DEVICE in
        gpu)
            AMI_DS_CONFIG=${AMI_DS_CONFIG:-configs/ds_zero2_gpu_bf16.json}
            export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
            # a failed or timed-out NCCL collective ends the process instead of blocking it forever
            export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
            export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
            if [[ -n ${SLURM_GPUS_PER_NODE:-} && ${SLURM_GPUS_PER_NODE##*:} != "${SLURM_NTASKS_PER_NODE:-}" ]]; then
                ami_say "warning: ${SLURM_GPUS_PER_NODE##*:} GPUs but ${SLURM_NTASKS_PER_NODE:-?} tasks per node; ranks share GPUs by local rank"
            fi
            ;;
        cpu)
            AMI_DS_CONFIG=${AMI_DS_CONFIG:-configs/ds_zero2.json}
            # No GPU is used even on a GPU node: torch then picks gloo, and DeepSpeed its CPU accelerator.
            export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
            export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
            AMI_DEVICE_OVERRIDES=("train.threads_per_rank=$OMP_NUM_THREADS")
            ;;
        *) ami_die "AMI_DEVICE=$AMI_DEVICE: expected gpu or cpu" ;;
    esac

    ami_say "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) attempt $AMI_ATTEMPT on $SLURM_JOB_NODELIST:" \
        "${SLURM_NTASKS:-?} ranks, ${SLURM_NTASKS_PER_NODE:-?} per node, device $AMI_DEVICE"
    ami_say "rendezvous $MASTER_ADDR:$MASTER_PORT; preset $AMI_DS_CONFIG; run dir $AMI_RUN_DIR;" \
        "rank logs $AMI_RANK_LOGS; MLflow $MLFLOW_TRACKING_URI"
}

ami_failure_reason() {  # the verdict the surviving ranks printed, else srun's status
    local verdict
    verdict=$(grep -ahoE 'ami-dist: rank [0-9]+ of [0-9]+ failed.*' "$AMI_RANK_LOGS"/rank*.log 2>/dev/null |
        head -n 1 | sed -E 's/^ami-dist: //; s/; rank [0-9]+ exits$//')
    echo "${verdict:-srun exited with status $1 (rank logs: $AMI_RANK_LOGS)}"
}

ami_prepare() {  # ami_prepare CONFIG: the corpus checked and encoded once, before any rank starts
    local config=$1 rc=0 overrides=()
    read -r -a overrides <<<"${AMI_OVERRIDES:-}"
    # A requeued job continues with the config its run was saved with; its prepared corpus is in the cache.
    [[ -f $AMI_RUN_DIR/config.yaml ]] && config=$AMI_RUN_DIR/config.yaml overrides=()
    ami_say "preparing the corpus of $config: one task per node (on a shared data.cache_dir the first takes the" \
        "lock, the others find its result; a corpus prepared before is found in the cache at once)"
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "$AMI_PYTHON" -m ami_dist.prepare --config "$config" --quiet "${overrides[@]}" || rc=$?
    if ((rc != 0)); then
        ami_say "error: preparing the corpus failed (status $rc); nothing was trained" >&2
        exit "$rc"
    fi
}

ami_train() {  # ami_train CONFIG [extra train.py arguments...]
    local config=$1 rc=0 overrides=()
    shift
    ami_prepare "$config"
    read -r -a overrides <<<"${AMI_OVERRIDES:-}"
    # No --kill-on-bad-exit: a rank that dies must leave the others time to name it and to mark the MLflow
    # run (ami_dist/distributed/watchdog.py). --wait is the backstop for ranks that cannot: whatever still
    # runs AMI_FAILURE_TIMEOUT + 30 s after the first rank ended is killed.
    srun --kill-on-bad-exit=0 --wait=$((AMI_FAILURE_TIMEOUT + 30)) \
        --output="$AMI_RANK_LOGS/rank%t.log" \
        "$AMI_PYTHON" ami_dist/train.py --config "$config" --run_dir "$AMI_RUN_DIR" --deepspeed_config "$AMI_DS_CONFIG" \
        "$@" \
        "distributed.failure_timeout_s=$AMI_FAILURE_TIMEOUT" "${AMI_DEVICE_OVERRIDES[@]}" "${overrides[@]}" ||
        rc=$?
    case $rc in
        0)
            ami_say "training finished; run dir $AMI_RUN_DIR"
            ;;
        75)  # EXIT_REQUEUE: every rank saved the checkpoint it stopped at
            ami_say "preempted after a checkpoint; requeueing job $SLURM_JOB_ID (it resumes in $AMI_RUN_DIR)"
            scontrol requeue "$SLURM_JOB_ID" || { ami_say "error: scontrol requeue failed" >&2; exit 75; }
            ;;
        *)
            local reason
            reason=$(ami_failure_reason "$rc")
            ami_say "training failed (srun status $rc): $reason" >&2
            # Rank 0 marks the run itself unless it is the rank that died; a run no longer RUNNING is kept.
            if [[ -f $AMI_RUN_DIR/mlflow_run_id ]]; then
                "$AMI_PYTHON" -m ami_dist.distributed.mark_failed "$AMI_RUN_DIR" --reason "$reason" || true
            fi
            exit "$rc"
            ;;
    esac
}
