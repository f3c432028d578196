# Shared body of the bloom_jax sbatch scripts: sourced, never run. One task per node; every
# task runs `python -m bloom_jax.train`, which joins the others through jax.distributed
# (bloom_jax/distributed.py reads SLURM's variables: process id SLURM_PROCID, process count
# SLURM_NTASKS, coordinator = first node of the step on a port derived from the job id, or on
# JAX_COORDINATOR_PORT if exported).
#
# Submit from the repository root, with the Python environment of bloom_jax active and MODEL_DIR
# exported:  sbatch --export=ALL,MODEL_DIR=/scratch/$USER/bloom176b launch/slurm/bloom176b.sbatch

set -euo pipefail

: "${MODEL_DIR:?MODEL_DIR is not set: submit with sbatch --export=ALL,MODEL_DIR=/path/to/run ...}"
: "${SLURM_GPUS_ON_NODE:?no GPUs allocated: request them with #SBATCH --gpus-per-node=8}"

# --- jax ---------------------------------------------------------------------------------------
# One process drives all the GPUs of its node (jax would otherwise give a SLURM task only the GPU
# numbered SLURM_LOCALID, the right thing for one task per GPU but not for one task per node).
export JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((SLURM_GPUS_ON_NODE - 1)))"
# Let the client allocate up to 90% of each GPU's memory up front (default 75%): the 176B model's
# sharded state and activations need the room, and nothing else shares the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90

# --- XLA (each flag is checked by tests/launch/test_slurm.py against the installed XLA) ------------
XLA_FLAGS_LIST=(
  # Schedule collectives asynchronously and overlap them with independent compute.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Prefetch the next layer's FSDP all-gather / issue the previous layer's reduce-scatter inside
  # the scanned layer loop, so weight gathering and gradient reduction overlap the matmuls.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Unroll the layer loop by two so that the pipelined collectives above have work to hide under.
  --xla_gpu_enable_while_loop_double_buffering=true
  # Combine small collectives into ~128 MiB ones: fewer, larger NCCL calls use the network better.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  # Run collectives on the highest-priority stream so they are not starved by compute kernels.
  --xla_gpu_enable_highest_priority_async_stream=true
)
export XLA_FLAGS="${XLA_FLAGS:-} ${XLA_FLAGS_LIST[*]}"

# --- NCCL --------------------------------------------------------------------------------------
# Print NCCL's own errors (link down, timeouts) in the node logs; INFO when debugging topology.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Let an InfiniBand transfer retry for 4.096 us * 2^22 ~ 17 s before it fails, so a transient
# fabric hiccup does not kill a 384-GPU run (NCCL's default is 2^18 ~ 1 s).
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# Cluster specific, left to the site's defaults unless set before sbatch: NCCL_SOCKET_IFNAME (the
# interface for NCCL's bootstrap, e.g. ib0) and NCCL_IB_HCA (which InfiniBand adapters to use).

# --- one training run, requeued on preemption --------------------------------------------------
# Logs: one file per node (srun's %n is the node's index in the job, %N its host name), in a
# folder per attempt; a requeued job keeps its job id and counts SLURM_RESTART_COUNT.
LOG_DIR="${MODEL_DIR}/logs/${SLURM_JOB_ID}.${SLURM_RESTART_COUNT:-0}"
mkdir -p "${LOG_DIR}"

REQUEUE=0
SRUN_PID=""
SIGNALLED=0  # Set by the handlers: tells a `wait` cut short by a signal from srun's own exit.

# SIGUSR1 arrives --signal's lead time before the time limit: every task checkpoints on SIGTERM
# and exits cleanly, and the job goes back to the queue to resume from that checkpoint.
on_time_limit() {
  echo "[bloom] SIGUSR1: time limit near; checkpointing, then requeueing job ${SLURM_JOB_ID}"
  REQUEUE=1
  SIGNALLED=1
  [[ -n "${SRUN_PID}" ]] && kill -TERM "${SRUN_PID}" 2>/dev/null || true
}
# SIGTERM reaches the tasks from SLURM itself on preemption (the job is then requeued by SLURM
# because of --requeue) or on scancel (it is not): keep waiting so their checkpoint completes.
on_terminate() {
  echo "[bloom] SIGTERM: the tasks checkpoint and exit"
  SIGNALLED=1
  [[ -n "${SRUN_PID}" ]] && kill -TERM "${SRUN_PID}" 2>/dev/null || true
}

# Runs `python -m bloom_jax.train --gin_file=$1 --gin.MODEL_DIR=... "${@:2}"` on every node.
run_training() {
  local gin_file="$1"
  shift
  trap on_time_limit USR1
  trap on_terminate TERM
  echo "[bloom] job ${SLURM_JOB_ID} attempt ${SLURM_RESTART_COUNT:-0}:" \
    "${SLURM_JOB_NUM_NODES} nodes x ${SLURM_GPUS_ON_NODE} GPUs, logs in ${LOG_DIR}"
  # --kill-on-bad-exit: if one task fails, SLURM ends the others instead of letting them hang in
  # a collective until the wall-time. The task output goes to its node's log file.
  srun \
    --ntasks-per-node=1 \
    --kill-on-bad-exit=1 \
    --output="${LOG_DIR}/node%n-%N.log" \
    python -m bloom_jax.train \
      --gin_file="${gin_file}" \
      --gin.MODEL_DIR="\"${MODEL_DIR}\"" \
      "$@" &
  SRUN_PID=$!
  # `wait` returns early when a trapped signal arrives; keep waiting until srun itself is done.
  local status
  while true; do
    SIGNALLED=0
    wait "${SRUN_PID}" && status=0 || status=$?
    [[ "${SIGNALLED}" == 1 ]] || break
  done
  if [[ "${REQUEUE}" == 1 ]]; then
    scontrol requeue "${SLURM_JOB_ID}"
    echo "[bloom] requeued job ${SLURM_JOB_ID}; it resumes from the last checkpoint"
    return 0
  fi
  echo "[bloom] training exited with status ${status}"
  return "${status}"
}
