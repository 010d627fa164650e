#!/bin/bash
# hvdtrain scaling benchmark on Slurm: Horovod (hvdtrain's settings), Horovod defaults, DDP and the
# no-communication ceiling at several rank counts, as job steps of one allocation; then the allreduce
# bandwidth sweep and the report (report.md, report.json, plots) in the results directory.
#
#   sbatch slurm/bench.sh                                   # 1 and 2 ranks on 2 nodes
#   sbatch --nodes=4 slurm/bench.sh                         # 1, 2 and 4 ranks (one rank per node)
#   HVDTRAIN_BENCH_ARGS="--model resnet --shape 3 32 32" sbatch slurm/bench.sh
#
# Environment variables:
#   HVDTRAIN_BENCH_OUT   results directory (benchmarks/results-<job id>); `hvdtrain bench report` reads it
#   HVDTRAIN_BENCH_NP    rank counts to sweep (1, 2, 4, ... up to the allocation's tasks)
#   HVDTRAIN_BENCH_MODES modes to run (horovod horovod-default ddp nocomm; not horovod-gloo: srun starts MPI)
#   HVDTRAIN_BENCH_ARGS  extra model arguments for the workers (see `hvdtrain bench scaling --help`)
#   HVDTRAIN_VENV        venv to use (the repository's .venv if it exists)
#   HVDTRAIN_SRUN_MPI    srun --mpi plugin (pmix)
#   GLOO_SOCKET_IFNAME   DDP (gloo) network interface, if gloo cannot find it from the host name
#
#SBATCH --job-name=hvdtrain-bench
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
venv="${HVDTRAIN_VENV:-$(pwd)/.venv}"
python="$venv/bin/python"
[ -x "$python" ] || python=python3
out="${HVDTRAIN_BENCH_OUT:-benchmarks/results-${SLURM_JOB_ID:-local}}"
raw="$out/raw"
mkdir -p "$raw"
tasks="${SLURM_NTASKS:-1}"
if [ -z "${HVDTRAIN_BENCH_NP:-}" ]; then
    HVDTRAIN_BENCH_NP=""
    n=1
    while [ "$n" -le "$tasks" ]; do HVDTRAIN_BENCH_NP="$HVDTRAIN_BENCH_NP $n"; n=$((n * 2)); done
fi
# shellcheck disable=SC2206  # words on purpose
extra=(${HVDTRAIN_BENCH_ARGS:-})
worker=("$python" -m hvdtrain.bench.scaling worker --out "$raw" "${extra[@]}")
master=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)

for np in $HVDTRAIN_BENCH_NP; do
    nodes=$(( np < SLURM_JOB_NUM_NODES ? np : SLURM_JOB_NUM_NODES ))
    step=(srun --nodes="$nodes" --ntasks="$np" --kill-on-bad-exit=1)
    echo "bench: $np rank(s) on $nodes node(s)"
    for mode in ${HVDTRAIN_BENCH_MODES:-horovod horovod-default ddp nocomm}; do
        case "$mode" in
            horovod*) "${step[@]}" --mpi="${HVDTRAIN_SRUN_MPI:-pmix}" "${worker[@]}" --mode "$mode" ;;
            # DDP and the ceiling read their rank from Slurm; DDP meets at the first node.
            ddp) MASTER_ADDR="$master" MASTER_PORT=$((29500 + np)) "${step[@]}" "${worker[@]}" --mode ddp ;;
            *) "${step[@]}" "${worker[@]}" --mode "$mode" ;;
        esac
    done
done
"$python" -m hvdtrain.bench.scaling collect --out "$out"
"$venv/bin/hvdtrain" bench report "$out"
echo "bench: report in $out/report.md"
