#!/usr/bin/env bash
# System packages the test suite needs beyond `make setup`: Slurm and munge for the real two-node
# cluster tests (tests/slurm/), and libpmix-dev, whose libpmix.so srun --mpi=pmix loads at run time.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
[ -e /usr/lib/x86_64-linux-gnu/libpmix.so ] || ldconfig -p | grep -q 'libpmix\.so ' || need+=(libpmix-dev)
command -v ip >/dev/null || need+=(iproute2)
[ ${#need[@]} -eq 0 ] && exit 0
[ "${HVDTRAIN_SKIP_APT:-0}" = 1 ] && { echo "[test-deps] missing ${need[*]} and HVDTRAIN_SKIP_APT=1" >&2; exit 1; }
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
echo "[test-deps] apt-get install ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
