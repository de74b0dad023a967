#!/bin/bash
# plot_ds on a Slurm cluster: one DeepSpeed launcher per node (started by srun), which starts one
# rank per GPU of its node. Submit from the repository root:
#
#     sbatch launch/slurm.sh path/to/config.yaml [--section.key value ...]
#
# Edit only the lines marked EDIT. The training config is the same one you use on one box.
#
# Preemption and the time limit: Slurm sends USR1 to this script WARN_SECONDS (see --signal) before
# the limit; the script passes it to every rank, which finish their step, write a checkpoint and
# exit 75; the script then requeues the job, and the requeued job resumes from that checkpoint
# (train.resume is "auto"). The same happens with `scancel --signal=USR1 --batch <jobid>`.
#
#SBATCH --job-name=plot_ds
#SBATCH --nodes=2                    # EDIT: number of nodes
#SBATCH --ntasks-per-node=1          # keep: one launcher per node
#SBATCH --gpus-per-node=8            # EDIT: GPUs per node (one rank each)
#SBATCH --cpus-per-task=64           # EDIT: CPU cores per node
#SBATCH --time=24:00:00              # EDIT: time limit
#SBATCH --partition=gpu              # EDIT: partition
#SBATCH --output=logs/%x-%j.out      # EDIT: log file (%x = job name, %j = job id); the folder must exist
#SBATCH --open-mode=append           # keep: a requeued job appends instead of truncating
#SBATCH --requeue                    # keep: may be requeued after preemption or the warning below
#SBATCH --signal=B:USR1@600          # keep B:USR1; EDIT the seconds: enough to finish a step and checkpoint
set -euo pipefail

# --- EDIT: your environment -------------------------------------------------------------------
# source /path/to/venv/bin/activate                      # EDIT: the Python environment with plot_ds
# module load cuda/12.4                                  # EDIT: modules your cluster needs
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"                  # INFO when a job hangs at start
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # fail, not hang, on a dead peer
# export NCCL_SOCKET_IFNAME=ib0                          # EDIT: the interface between nodes, if not auto-detected
# export NCCL_IB_HCA=mlx5                                # EDIT: InfiniBand adapters, if several fabrics
RUN_DIR="${RUN_DIR:-}"            # EDIT (optional): run directory; empty = train.output_dir of the config
# ----------------------------------------------------------------------------------------------

if [ "$#" -lt 1 ]; then
    echo "usage: sbatch launch/slurm.sh path/to/config.yaml [--section.key value ...]" >&2
    exit 2
fi
CONFIG="$1"
shift
PLOT_DS_DIR="${PLOT_DS_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$PLOT_DS_DIR"
if [ ! -f "$CONFIG" ]; then
    echo "config file not found: $CONFIG (relative paths are read from $PLOT_DS_DIR)" >&2
    exit 2
fi

# Ranks per node: the GPUs Slurm gave each node; PROCS_PER_NODE overrides (CPU-only partitions).
PROCS_PER_NODE="${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}"
PROCS_PER_NODE="${PROCS_PER_NODE##*:}"    # "gpu:8" -> "8"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}"
export MASTER_ADDR MASTER_PORT

# DeepSpeed's hostfile for this allocation: every node with its ranks; each launcher starts the
# ranks of its own node (--no_ssh) so no ssh between nodes is needed.
HOSTFILE="${PLOT_DS_DIR}/.slurm/hostfile-${SLURM_JOB_ID}"
mkdir -p "$(dirname "$HOSTFILE")"
scontrol show hostnames "$SLURM_JOB_NODELIST" | while read -r host; do
    printf '%s slots=%s\n' "$host" "$PROCS_PER_NODE"
done > "$HOSTFILE"

RUN_ARGS=(--config "$CONFIG")
if [ -n "$RUN_DIR" ]; then
    RUN_ARGS+=(--train.output_dir "$RUN_DIR")
fi

echo "plot_ds: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES} node(s)" \
     "x ${PROCS_PER_NODE} rank(s); master ${MASTER_ADDR}:${MASTER_PORT}; config ${CONFIG}"

# The warning signal reaches only this script (B:). Pass it to the ranks of every job step; the
# launchers ignore USR1 (set below, inherited across exec) so that only the ranks act on it.
# shellcheck disable=SC2329  # invoked by the trap
forward_warning() {
    echo "plot_ds: USR1 received at $(date -u +%FT%TZ): asking every rank to checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
}
trap forward_warning USR1

# `srun ... & wait` rather than a foreground srun: bash runs a trap only between commands.
# shellcheck disable=SC2016  # expanded on each node, where SLURM_NODEID differs
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '
    trap "" USR1
    exec deepspeed --hostfile "$0" --no_ssh --node_rank "$SLURM_NODEID" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        launch/train.py "$@"
' "$HOSTFILE" "${RUN_ARGS[@]}" "$@" &
LAUNCHERS=$!
set +e
wait "$LAUNCHERS"
STATUS=$?
while kill -0 "$LAUNCHERS" 2>/dev/null; do  # wait returns early when the trap ran: wait again
    wait "$LAUNCHERS"
    STATUS=$?
done
set -e

if [ "$STATUS" -eq 75 ]; then
    echo "plot_ds: checkpoint written; requeueing job ${SLURM_JOB_ID} to resume from it"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "plot_ds: training ended with status ${STATUS}"
exit "$STATUS"
