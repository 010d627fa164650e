#!/bin/bash
# hvdtrain training job for Slurm: one Horovod rank per task, launched by srun over PMIx.
#
#   sbatch slurm/train.sh                                   # configs/digits-torch.yaml, defaults below
#   sbatch slurm/train.sh configs/my.yaml train.epochs=90   # a config file and key=value overrides
#   sbatch --nodes=8 --ntasks-per-node=4 --time=12:00:00 slurm/train.sh configs/my.yaml
#   HVDTRAIN_IMAGE=hvdtrain-gpu.sif sbatch slurm/train.sh ...   # run inside an Apptainer image
#
# Environment variables (exported where you run sbatch; sbatch options override the #SBATCH lines):
#   HVDTRAIN_CONFIG      config file when none is given as the first argument (configs/digits-torch.yaml)
#   HVDTRAIN_RUN_DIR     run directory (runs/<job name>-<job id>: stable across requeues). Put it on a
#                        file system every node sees; rank 0 writes it and resuming reads it.
#   HVDTRAIN_VENV        venv to use when no image is set (the repository's .venv if it exists)
#   HVDTRAIN_IMAGE       Apptainer image (.sif); unset: no container
#   HVDTRAIN_APPTAINER   apptainer flags (default: --nv when the job has GPUs)
#   HVDTRAIN_SRUN_MPI    srun --mpi plugin (pmix)
#
# Preemption and time limits: Slurm sends USR1 to this script 120 s before the limit (--signal). The
# ranks are told to checkpoint at their next logging step and exit cleanly; the job then requeues
# itself and the next run continues from the checkpoint (--resume auto). `scancel --signal=USR1
# --batch <jobid>` does the same by hand.
#
#SBATCH --job-name=hvdtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1             # CPU nodes: 1 per socket is a good start; GPU nodes: 1 per GPU
#SBATCH --cpus-per-task=2               # threads per rank (hvdtrain uses the task's CPU binding)
##SBATCH --gpus-per-node=4              # GPU sites: uncomment, set --ntasks-per-node to the same number,
##SBATCH --gpu-bind=single:1            #   build Horovod with HOROVOD_GPU_OPERATIONS=NCCL (see README)
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append              # a requeued run appends to the same output file
#SBATCH --output=%x-%j.out

set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
repo="$(pwd)"
config="${HVDTRAIN_CONFIG:-configs/digits-torch.yaml}"
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then
    config="$1"
    shift
fi
run_dir="${HVDTRAIN_RUN_DIR:-runs/${SLURM_JOB_NAME:-hvdtrain}-${SLURM_JOB_ID:-local}}"
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

if [ -n "${HVDTRAIN_IMAGE:-}" ]; then
    flags="${HVDTRAIN_APPTAINER:-}"
    if [ -z "$flags" ] && [ -n "${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}" ]; then
        flags="--nv"
    fi
    # shellcheck disable=SC2206  # flags are words on purpose
    hvdtrain=(apptainer exec $flags "$HVDTRAIN_IMAGE" hvdtrain)
else
    venv="${HVDTRAIN_VENV:-$repo/.venv}"
    if [ -x "$venv/bin/hvdtrain" ]; then
        hvdtrain=("$venv/bin/hvdtrain")
    else
        hvdtrain=(hvdtrain)
    fi
fi

# A bad config or missing data fails here, in one line, before any node starts a rank.
"${hvdtrain[@]}" check --config "$config" "$@" || exit $?

echo "hvdtrain job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_JOB_NUM_NODES:-?} nodes" \
     "(${SLURM_JOB_NODELIST:-?}), ${SLURM_NTASKS:-?} ranks, config $config, run dir $run_dir"

stop_requested=0
on_usr1() {
    stop_requested=1
    echo "hvdtrain job: USR1 received, asking the ranks to checkpoint and stop"
    kill -USR1 "$step_pid" 2>/dev/null  # srun forwards the signal to every rank
}
trap on_usr1 USR1

# In the background, so the trap runs as soon as the signal arrives instead of after the step.
srun --mpi="${HVDTRAIN_SRUN_MPI:-pmix}" --kill-on-bad-exit=1 \
    "${hvdtrain[@]}" train --config "$config" --run-dir "$run_dir" --resume auto "$@" &
step_pid=$!
while true; do
    wait "$step_pid"
    status=$?
    kill -0 "$step_pid" 2>/dev/null || break  # wait returned for the signal: keep waiting
done

if [ "$stop_requested" = 1 ] && [ "$status" = 0 ]; then
    echo "hvdtrain job: checkpoint written; requeueing job $SLURM_JOB_ID to continue"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
