# shellcheck shell=bash
# Sourced by the sbatch scripts in this folder (submit them from the repository root, or
# set SMOE_SLURM_DIR): rendezvous helpers and the preemption loop.
#
# Preemption: the scripts ask Slurm for SIGUSR1 a few minutes before the time limit
# (#SBATCH --signal=USR1@180). Every rank of `smoe train` catches it, finishes its step,
# writes a checkpoint and exits with 75; the script then requeues the job, and the new
# run of the same job resumes from that checkpoint (--auto-resume): no step lost or repeated.

SMOE_EXIT_STOPPED_BY_SIGNAL=75

# First host of a Slurm node list: the torch.distributed master.
smoe_master_addr() {
    scontrol show hostnames "$1" | head -n 1
}

# DeepSpeed hostfile ("host slots=N" per node) for the job's nodes.
smoe_write_hostfile() {
    local file=$1 slots=$2 nodelist=${3:-$SLURM_JOB_NODELIST}
    scontrol show hostnames "$nodelist" | sed "s/\$/ slots=$slots/" > "$file"
}

# Run a job step; when it stopped on a signal with a checkpoint, requeue this job.
smoe_step_and_requeue() {
    local status=0
    "$@" || status=$?
    if [ "$status" -eq "$SMOE_EXIT_STOPPED_BY_SIGNAL" ]; then
        echo "smoe: checkpoint written on signal; requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}

export MASTER_ADDR=${MASTER_ADDR:-$(smoe_master_addr "$SLURM_JOB_NODELIST")}
# The port from the job id, as launcher/runtime/slurm.py computes it: 10000-29999, below Linux's
# ephemeral ports (32768-60999), which outgoing connections take.
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
